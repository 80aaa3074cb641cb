// The `keygate` command as a real process: help, config check, the embedded store held by another
// process, and the baseline compiler of store commands. (The key lifecycle on the embedded store is
// test/cli-embedded.test.ts, on PostgreSQL test/cli-postgres.test.ts, and usage errors and input no store can hold are
// test/cli-input.test.ts; stdin, rotation and unwritable output are test/cli-edges.test.ts, so they run side by side.)
import t from 'tap'
import { execFileSync, spawnSync } from 'node:child_process'
import { closeSync, existsSync, openSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { KEYGATE_BIN, childEnv, runCli, runCliHere, spawnClean } from './helpers/cli.ts'
import { until } from './helpers/gateway.ts'
import { isolated, tempDir } from './helpers/cli-lifecycle.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { openDb } from '../core/db.ts'

t.test('help and version', async (t) => {
  const help = await runCli(['--help'])
  t.equal(help.code, 0)
  t.match(help.stdout, /api-key <command>/)
  const sub = await runCli(['api-key', 'create', '--help'])
  t.equal(sub.code, 0)
  t.match(sub.stdout, /--name NAME --type/)
  const version = await runCli(['--version'])
  t.match(version.stdout, /^\d+\.\d+\.\d+\n$/)
})

t.test('config check', async (t) => {
  const dir = tempDir()
  const good = join(dir, 'good.yaml')
  writeFileSync(good, 'routes:\n  - { name: api, path: /api, upstream: "http://127.0.0.1:3000" }\nlockout: { max_attempts: 3 }\n')
  const ok = await runCli(['config', 'check', good])
  t.equal(ok.code, 0)
  t.match(ok.stdout, /valid \(1 route\)/)

  const bad = join(dir, 'bad.yaml')
  writeFileSync(bad, 'gateway:\n  listen: "nowhere"\n  colour: blue\ncache: { ttl_s: 0 }\n')
  const r = await runCli(['config', 'check', bad, '--json'], { env: { CACHE_TTL_SECONDS: 'abc' } })
  t.equal(r.code, 1, 'an invalid file is refused with exit 1')
  t.match(r.stderr, /gateway\.listen: "nowhere" is not allowed; expected host:port/)
  t.match(r.stderr, /gateway\.colour: unknown key/)
  t.match(r.stderr, /cache\.ttl_s: 0 is not allowed; expected an integer from 1 to 86400/)
  t.notMatch(r.stderr, /CACHE_TTL_SECONDS/, 'check looks at the file alone, not the environment')
  t.same(r.json().error.details.problems.length, 3, 'every problem at once')

  // Without a file named: the one every other command would read (before: a usage error, although --help says [FILE]).
  // (The checks whose answer alone is looked at run through the command line's entry in this
  // process, runCliHere: the real process of each exit code and of ./keygate.yaml is here too.)
  const fromEnv = await runCliHere(['config', 'check'], { env: { KEYGATE_CONFIG: good } })
  t.equal(fromEnv.code, 0, 'KEYGATE_CONFIG is checked')
  t.equal(fromEnv.stdout, `${good}: valid (1 route)\n`)
  writeFileSync(join(dir, 'keygate.yaml'), 'cache: { ttl_s: 0 }\n')
  const fromCwd = await runCli(['config', 'check'], { env: { KEYGATE_CONFIG: undefined }, cwd: dir })
  t.equal(fromCwd.code, 1, './keygate.yaml is checked')
  t.match(fromCwd.stderr, /cache\.ttl_s: 0 is not allowed/)

  // A KEYGATE_CONFIG of white space alone is refused naming it, by config check and by every
  // command that reads the configuration (before, found by a review: `  : cannot be read (ENOENT)`);
  // an empty one is an unset one, as every variable's.
  for (const args of [['config', 'check'], ['api-key', 'list', '--admin-url', 'http://127.0.0.1:9']]) {
    const blank = await runCliHere(args, { env: { KEYGATE_CONFIG: ' \t' } })
    t.equal(blank.code, 1, `${args.join(' ')}: a blank KEYGATE_CONFIG is refused`)
    t.equal(blank.stderr, 'keygate: invalid configuration:\n  KEYGATE_CONFIG: " \\t" is not allowed; expected the path of a configuration file (or leave it unset, for ./keygate.yaml when present)\n', `${args.join(' ')}: naming it`)
  }
  const unsetToo = await runCli(['config', 'check'], { env: { KEYGATE_CONFIG: '' }, cwd: dir })
  t.match(unsetToo.stderr, /cache\.ttl_s: 0 is not allowed/, 'an empty KEYGATE_CONFIG is unset: ./keygate.yaml is checked')

  const missing = await runCliHere(['config', 'check', join(dir, 'nope.yaml')])
  t.equal(missing.code, 1)
  t.match(missing.stderr, /nope\.yaml: cannot be read \(ENOENT\)/)

  // Valid, with a warning (found by a read-back): /api strips its prefix to the upstream that / also
  // reaches, so /x by / is /api/x's resource without /api's scopes.
  const around = join(dir, 'around.yaml')
  writeFileSync(around, 'routes:\n  - { name: api, path: /api, upstream: "http://127.0.0.1:3000", strip_prefix: true, scopes: [admin] }\n  - { name: web, path: /, upstream: "http://127.0.0.1:3000" }\n')
  const warned = await runCli(['config', 'check', around])
  t.equal(warned.code, 0, 'still valid')
  t.equal(warned.stdout, `${around}: valid (2 routes)\nwarning: route "api" has scopes, but route "web" reaches its upstream paths without them: /api/x by "api" and /x by "web" are both /x to the upstream; give "web" the same scopes, or another upstream or base path\n`)
  const warnedJson = await runCliHere(['config', 'check', around, '--json'])
  t.match(warnedJson.json(), { valid: true, warnings: [/^route "api" has scopes, but route "web" reaches/] })
  t.equal(warnedJson.json().warnings.length, 1, 'the one warning, as printed')
  t.same((await runCliHere(['config', 'check', good, '--json'])).json().warnings, [], 'none where no route goes around another')
  // The upstream shortcut beside routes that ask for scopes (found by a deployment review): its
  // route for /, without scopes, takes every path they do not cover, for any valid key.
  const shortcut = join(dir, 'shortcut.yaml')
  writeFileSync(shortcut, 'upstream: "http://127.0.0.1:3000"\nroutes:\n  - { name: orders, path: /orders, upstream: "http://127.0.0.1:3000", scopes: [orders:read] }\n')
  const beside = await runCliHere(['config', 'check', shortcut])
  t.equal(beside.code, 0, 'still valid')
  t.equal(
    beside.stdout,
    `${shortcut}: valid (2 routes)\nwarning: the upstream shortcut (upstream, KEYGATE_UPSTREAM) adds route "default" for / without scopes beside routes that ask for scopes ("orders"): any valid key, admin keys included, reaches every path those routes do not cover; leave the shortcut out and name a route for / where that is not meant\n`,
  )
  writeFileSync(shortcut, 'upstream: "http://127.0.0.1:3000"\nroutes:\n  - { name: orders, path: /orders, upstream: "http://127.0.0.1:3000" }\n')
  t.same((await runCliHere(['config', 'check', shortcut, '--json'])).json().warnings, [], 'none beside routes without scopes')

  const docs = await runCliHere(['config', 'docs'])
  t.equal(docs.code, 0)
  t.match(docs.stdout, /\| `cache\.ttl_s` \| `300` \| `CACHE_TTL_SECONDS`/)
})

t.test('the embedded store is refused while another process holds it', async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'), { migrated: true })
  const held = await openDb({ dataDir })
  t.teardown(() => held.close())
  const r = await runCli(['api-key', 'list', '--json'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.equal(r.code, 1)
  t.equal(r.json().error.code, 'store_locked')
  t.match(r.stderr, new RegExp(`in use by process ${process.pid}`))
  t.match(r.stderr, /KEYGATE_ADMIN_URL/)
  // The holder (this test's process) is no keygate command: the lock may be a gone keygate's,
  // its pid since another program's, and the message says which file to remove then.
  t.match(r.stderr, `(node, no keygate command): if no keygate process uses this store, the lock was left by one that is gone, and its pid is node's since: remove ${join(dataDir, 'keygate.lock')} and ${join(dataDir, 'keygate.lock.owner')}; else`)
  // The gitea and n8n commands are sent to the admin API too, and go through it when it is set.
  for (const group of ['gitea', 'n8n']) {
    const locked = await runCli([group, 'list', '--json'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
    t.equal(locked.code, 1)
    t.match(locked.json().error, { code: 'store_locked', message: /in use by process \d+ \(node, no keygate command\): .*; else stop it, or point the CLI at its admin API with KEYGATE_ADMIN_URL and KEYGATE_ADMIN_TOKEN$/ }, `${group}: the same hint`)
    // (Through the command line's entry in this process: no store is opened on this path.)
    const remote = await runCliHere([group, 'list', '--json'], { env: isolated({ KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_URL: 'http://127.0.0.1:1', KEYGATE_ADMIN_TOKEN: 'x'.repeat(20) }) })
    t.equal(remote.code, 1)
    t.match(remote.json().error, { code: 'admin_unavailable', message: /cannot reach the admin API at http:\/\/127\.0\.0\.1:1/ }, `${group}: through the admin API when KEYGATE_ADMIN_URL is set`)
  }
})

t.test("a store command runs on V8's baseline compiler in a child process, which ends with the command, by any signal", async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'), { migrated: true })
  const lock = join(dataDir, 'keygate.lock')
  const gone = (pid: number) => {
    try {
      process.kill(pid, 0)
      return false
    } catch {
      return true
    }
  }
  // stdin is a FIFO this test holds open (not a pipe of the command's, which closes as it ends):
  // `import -` waits on it for the file's end with the store open (and locked by its pid), so only the
  // end of the command can end the process that holds the store.
  const fifo = join(cwd, 'stdin')
  execFileSync('mkfifo', [fifo])
  const stdin = openSync(fifo, 'r+')
  t.teardown(() => closeSync(stdin))
  for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
    const command = spawnClean(process.execPath, [KEYGATE_BIN, 'api-key', 'import', '-'], { env: childEnv(isolated({ KEYGATE_DATA_DIR: dataDir })), cwd, stdio: [stdin, 'ignore', 'ignore'] })
    const ended = new Promise<string | number | null>((resolve) => command.on('exit', (code, s) => resolve(s ?? code)))
    let holder = 0
    await until(t, `${signal}: the store is opened`, () => {
      holder = existsSync(lock) ? Number(readFileSync(lock, 'utf8')) : 0
      return holder > 0 && holder !== command.pid && !gone(holder)
    }, 60_000)
    t.ok(readFileSync(`/proc/${holder}/cmdline`, 'utf8').split('\0').includes('--liftoff-only'), 'by another process, which runs with --liftoff-only')
    if (signal === 'SIGTERM') {
      // Before (found by a review): "stop it, or point the CLI at its admin API", a server's advice.
      const refused = await runCli(['api-key', 'list'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
      t.equal(refused.code, 1)
      t.equal(refused.stderr, `keygate: the embedded store in ${dataDir} is in use by process ${holder} (keygate api-key import); run this command again once it has ended (a keygate command ends by itself)\n`, 'another command holds it: wait for it')
    }
    command.kill(signal)
    const outcome = await Promise.race([ended, new Promise<string>((resolve) => setTimeout(() => resolve('still running after 20 s'), 20_000).unref())])
    if (outcome !== signal) command.kill('SIGKILL')
    t.equal(outcome, signal, `the command ends by the ${signal} it was sent`)
    await until(t, `${signal}: and so does the process that held the store`, () => gone(holder))
  }
  const full = await runCli(['api-key', 'list', '--json'], { asInstalled: true, cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir, KEYGATE_WASM_TIERING: 'full' }) })
  t.equal(full.code, 0, 'KEYGATE_WASM_TIERING=full runs the command in its own process (with TurboFan), on the store left behind')
})

t.test('a Node.js older than 22.18 is told so, with no stack trace', async (t) => {
  // Before: ERR_UNKNOWN_FILE_EXTENSION ".ts" and a stack trace (the systemd unit's /usr/bin/node
  // may well be older). The older Node is played by Node 24 with its version rewritten.
  for (const version of ['22.17.1', '20.20.2']) {
    const r = spawnSync(process.execPath, ['--import', `data:text/javascript,Object.defineProperty(process.versions,"node",{value:"${version}"})`, KEYGATE_BIN, '--help'], { encoding: 'utf8', env: childEnv({}) })
    t.equal(r.status, 1, `${version}: exit 1`)
    t.equal(r.stderr, `keygate: needs Node.js 22.18 or later (24 is the target); this is v${version} at ${process.execPath}\n`, `${version}: one line saying why`)
    t.equal(r.stdout, '')
  }
})

