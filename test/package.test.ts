// keygate as a platform team installs it from npm: `npm pack` compiles the TypeScript into dist/
// (Node strips no types under node_modules, so an installed package of .ts files did not run at
// all), the tarball is installed into an empty project, and its `keygate` command creates a key
// on the embedded store and serves it through the gateway.
import t from 'tap'
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { childEnv, runCli, spawnClean } from './helpers/cli.ts'
import { bearer, startUpstream } from './helpers/gateway.ts'
import { isolatedEnv, serve } from './helpers/serve.ts'

const ROOT = new URL('..', import.meta.url).pathname
const PACKAGE = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { name: string; version: string }

function run(command: string, args: string[], cwd: string): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawnClean(command, args, { cwd, env: childEnv({ npm_config_update_notifier: 'false' }), stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    child.stdout!.on('data', (d: Buffer) => (out += d))
    child.stderr!.on('data', (d: Buffer) => (out += d))
    child.on('error', reject)
    child.on('close', (code) => resolve({ code, out }))
  })
}

t.test('npm pack, npm install, then the installed keygate creates a key and serves it', async (t) => {
  const work = mkdtempSync(join(tmpdir(), 'keygate-package-'))
  t.teardown(() => rmSync(work, { recursive: true, force: true }))
  // A copy of what the repository holds, so the build writes nothing into the work tree.
  const src = join(work, 'src')
  for (const entry of ['package.json', 'package-lock.json', 'tsconfig.json', 'tsconfig.build.json', 'README.md', 'bin', 'core', 'gateway', 'admin', 'config', 'cli', 'migrations', 'deploy', 'docs']) {
    cpSync(join(ROOT, entry), join(src, entry), { recursive: true })
  }
  symlinkSync(join(ROOT, 'node_modules'), join(src, 'node_modules'))
  const packed = await run('npm', ['pack', '--json', '--pack-destination', work], src)
  t.equal(packed.code, 0, 'npm pack')
  if (packed.code !== 0) t.comment(packed.out)
  const [info] = JSON.parse(packed.out.slice(packed.out.indexOf('['))) as Array<{ filename: string; files: Array<{ path: string }> }>
  const files = (info?.files ?? []).map((f) => f.path)
  for (const needed of ['bin/keygate.js', 'dist/bin/keygate.js', 'dist/cli/main.js', 'dist/core/embedded-worker.js', 'migrations/0001_keys_and_audit.sql', 'package.json', 'README.md']) {
    t.ok(files.includes(needed), `the package holds ${needed}`)
  }
  t.notOk(files.some((f) => f.startsWith('test/') || f.startsWith('bench/') || f.endsWith('.ts')), 'and no tests, benchmarks or TypeScript sources')

  const project = join(work, 'project')
  mkdirSync(project)
  // Dependencies from the npm cache where it has them (npm ci filled it), else from the registry.
  const installed = await run('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', '--omit=dev', join(work, info?.filename as string)], project)
  t.equal(installed.code, 0, 'npm install of the tarball')
  if (installed.code !== 0) t.comment(installed.out)
  const bin = join(project, 'node_modules', PACKAGE.name, 'bin', 'keygate.js')

  const version = await runCli(['--version'], { bin, cwd: project })
  t.equal(version.stdout.trim(), PACKAGE.version, 'keygate --version')
  const env = isolatedEnv({ KEYGATE_DATA_DIR: join(project, 'store') })
  const created = await runCli(['api-key', 'create', '--name', 'installed', '--type', 'user', '--json'], { bin, cwd: project, env })
  t.equal(created.code, 0, 'keygate api-key create')
  if (created.code !== 0) t.comment(created.stderr)
  const key = created.json() as { id: string; key: string }

  const upstream = await startUpstream(t)
  const served = await serve(t, { bin, cwd: project, env, args: ['--upstream', upstream.url] })
  const answer = await fetch(`${served.gateway}/through`, { headers: bearer(key.key) })
  t.equal(answer.status, 200, 'the key passes the installed gateway')
  t.equal(upstream.received[0]?.headers['x-keygate-key-id'], key.id, 'with its identity header')
  t.equal((await fetch(`${served.gateway}/through`)).status, 401, 'and no key does not')
  t.equal(await served.stop(), 0, 'SIGTERM: exit 0')
})
