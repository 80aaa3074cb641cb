// keygate as a platform team installs it from npm: `npm pack` compiles the TypeScript into dist/
// (Node strips no types under node_modules, so an installed package of .ts files did not run at
// all), the tarball is installed into an empty project, and its `keygate` command creates a key
// on the embedded store and serves it through the gateway. The install is `npm ci --offline` with
// a lockfile made of the repository's own (its runtime packages, at the versions locked there),
// so it needs no registry: the tarballs are in npm's cache since the `npm ci` that set up the
// repository.
import t from 'tap'
import { hash } from 'node:crypto'
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { childEnv, runCli, spawnClean } from './helpers/cli.ts'
import { bearer, startUpstream, type Tap } from './helpers/gateway.ts'
import { isolatedEnv, serve } from './helpers/serve.ts'

const ROOT = new URL('..', import.meta.url).pathname
const PACKAGE = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string }

interface Lock {
  packages: Record<string, { version?: string; license?: string; dependencies?: Record<string, string>; engines?: Record<string, string>; dev?: boolean }>
}

/** Runs `command`; stdout and stderr apart. Killed if the test ends first. */
function run(t: Pick<Tap, 'teardown'>, command: string, args: string[], cwd: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawnClean(command, args, { cwd, env: childEnv({ npm_config_update_notifier: 'false' }), stdio: ['ignore', 'pipe', 'pipe'] })
    t.teardown(() => void child.kill('SIGKILL'))
    let stdout = ''
    let stderr = ''
    child.stdout!.on('data', (d: Buffer) => (stdout += d))
    child.stderr!.on('data', (d: Buffer) => (stderr += d))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

t.test('npm pack, npm install, then the installed keygate creates a key and serves it', async (t) => {
  const work = mkdtempSync(join(tmpdir(), 'keygate-package-'))
  t.teardown(() => rmSync(work, { recursive: true, force: true }))
  // A copy of what the repository holds, so the build writes nothing into the work tree.
  const src = join(work, 'src')
  for (const entry of ['package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json', 'README.md', 'LICENSE', 'bin', 'core', 'gateway', 'admin', 'config', 'cli', 'migrations', 'deploy', 'docs']) {
    cpSync(join(ROOT, entry), join(src, entry), { recursive: true })
  }
  symlinkSync(join(ROOT, 'node_modules'), join(src, 'node_modules'))
  const packed = await run(t, 'npm', ['pack', '--json', '--pack-destination', work], src)
  t.equal(packed.code, 0, 'npm pack')
  if (packed.code !== 0) t.comment(packed.stderr)
  // The build's own output goes to stdout before npm's JSON.
  const [info] = JSON.parse(packed.stdout.slice(packed.stdout.indexOf('\n[') + 1)) as Array<{ filename: string; files: Array<{ path: string }> }>
  const files = (info?.files ?? []).map((f) => f.path)
  for (const needed of ['bin/keygate.js', 'bin/worker-preload.cjs', 'dist/bin/keygate.js', 'dist/cli/main.js', 'dist/core/embedded-worker.js', 'migrations/0001_keys_and_audit.sql', 'package.json', 'README.md', 'LICENSE']) {
    t.ok(files.includes(needed), `the package holds ${needed}`)
  }
  t.notOk(files.some((f) => f.startsWith('test/') || f.startsWith('bench/') || f.endsWith('.ts')), 'and no tests, benchmarks or TypeScript sources')

  const project = join(work, 'project')
  mkdirSync(project)
  const tarball = join(work, info?.filename as string)
  const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as Lock
  const self = lock.packages[''] ?? {}
  const dependency = { [PACKAGE.name]: `file:../${info?.filename}` }
  const packages: Lock['packages'] = {
    '': { dependencies: dependency },
    [`node_modules/${PACKAGE.name}`]: {
      version: PACKAGE.version,
      resolved: dependency[PACKAGE.name],
      integrity: `sha512-${hash('sha512', readFileSync(tarball), 'base64')}`,
      license: self.license,
      dependencies: self.dependencies,
      engines: self.engines,
      bin: { keygate: 'bin/keygate.js' },
    } as Lock['packages'][string],
  }
  for (const [path, entry] of Object.entries(lock.packages)) if (path !== '' && entry.dev !== true) packages[path] = entry
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'project', private: true, dependencies: dependency }))
  writeFileSync(join(project, 'package-lock.json'), JSON.stringify({ name: 'project', lockfileVersion: 3, requires: true, packages }))
  const installed = await run(t, 'npm', ['ci', '--offline', '--omit=dev', '--ignore-scripts', '--no-audit', '--no-fund'], project)
  t.equal(installed.code, 0, 'npm ci of the tarball, offline')
  if (installed.code !== 0) t.comment(installed.stderr)
  // The command as npm links it (npx runs the same link).
  const bin = join(project, 'node_modules', '.bin', 'keygate')

  const version = await runCli(['--version'], { bin, cwd: project })
  t.equal(version.stdout.trim(), PACKAGE.version, 'keygate --version')
  const env = isolatedEnv({ KEYGATE_DATA_DIR: join(project, 'store') })
  const created = await runCli(['api-key', 'create', '--name', 'installed', '--type', 'user', '--json'], { bin, cwd: project, env })
  t.equal(created.code, 0, 'keygate api-key create')
  if (created.code !== 0) t.comment(created.stderr)
  const key = created.json() as { id: string; key: string }

  const upstream = await startUpstream(t)
  const served = await serve(t, { bin, cwd: project, env, args: ['--upstream', upstream.url], tiering: 'full' })
  const answer = await fetch(`${served.gateway}/through`, { headers: bearer(key.key) })
  t.equal(answer.status, 200, 'the key passes the installed gateway')
  t.equal(upstream.received[0]?.headers['x-keygate-key-id'], key.id, 'with its identity header')
  t.equal((await fetch(`${served.gateway}/through`)).status, 401, 'and no key does not')
  t.equal(await served.stop(), 0, 'SIGTERM: exit 0')

  // Unpacked where no node_modules is in the path (/opt/keygate, a container's /app), as the
  // systemd unit has it: the launcher runs dist/ there too.
  const opt = join(work, 'opt', 'keygate')
  mkdirSync(opt, { recursive: true })
  t.equal((await run(t, 'tar', ['xzf', tarball, '--strip-components=1', '-C', opt], work)).code, 0, 'unpacked')
  symlinkSync(join(project, 'node_modules'), join(opt, 'node_modules'))
  const unpacked = await runCli(['--version'], { bin: join(opt, 'bin', 'keygate.js'), cwd: work })
  t.equal(unpacked.stdout.trim(), PACKAGE.version, `keygate --version from an unpacked package${unpacked.stderr ? `: ${unpacked.stderr}` : ''}`)
})
