// The `keygate` command as a real process, on the embedded store, in its life as a process: a
// command ended by a signal gives the store's lock back and leaves no files, commands other than
// serve log at warn, a diagnostic report holds no environment, the short commands' V8 flags, and
// the --all walks against an admin API that ignores the cursor. (Split from
// test/cli-edges.test.ts, which came within reach of tap's 300 s per file on a loaded machine.)
import t from 'tap'
import http from 'node:http'
import { mkdirSync, readdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs'
import { createServer, type AddressInfo } from 'node:net'
import { join } from 'node:path'
import { KEYGATE_BIN, childEnv, runCli, runCliHere, spawnClean } from './helpers/cli.ts'
import { until } from './helpers/gateway.ts'
import { ENCRYPTION_KEY, isolated, tempDir } from './helpers/cli-lifecycle.ts'
import { freshDatabase } from './helpers/stores.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { SHORT_COMMAND_V8_FLAGS } from '../bin/v8-flags.ts'

t.test('a command ended by SIGINT, SIGTERM or SIGHUP while it holds the embedded store gives its lock back, and ends by that signal', async (t) => {
  // Before (found by a review): Node's default action ended such a command at once, without its
  // 'exit' handlers, and the lock, its owner file and socket stayed behind (a Ctrl-C of a long
  // import, say), where the README promises that only a SIGKILL or a crash leaves them.
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'), { migrated: true })
  const env = childEnv(isolated({ KEYGATE_DATA_DIR: dataDir }))
  const lockFiles = () => readdirSync(dataDir).filter((f) => f.startsWith('keygate.lock')).sort()
  for (const [signal, flags] of [['SIGINT', SHORT_COMMAND_V8_FLAGS], ['SIGTERM', SHORT_COMMAND_V8_FLAGS], ['SIGHUP', SHORT_COMMAND_V8_FLAGS], ['SIGINT', []]] as const) {
    const how = flags.length === 0 ? 'as installed (two processes)' : 'one process'
    // (Without the fix, what an earlier round left; the wait below is for this command's lock.)
    for (const f of lockFiles()) rmSync(join(dataDir, f))
    // `import -` opens the store, then waits for the end of stdin, kept open here.
    const command = spawnClean(process.execPath, [...flags, KEYGATE_BIN, 'api-key', 'import', '-'], { env, cwd, stdio: ['pipe', 'pipe', 'pipe'] })
    let stderr = ''
    command.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    const ended = new Promise<[number | null, NodeJS.Signals | null]>((resolve) => command.on('exit', (code, sig) => resolve([code, sig])))
    await until(t, `${signal}, ${how}: the command holds the store`, () => lockFiles().includes('keygate.lock.owner'))
    command.kill(signal)
    const [code, sig] = await ended
    command.stdin!.destroy()
    t.same([code, sig], [null, signal], `${signal}, ${how}: it ends by the signal, as before`)
    t.same(lockFiles(), [], `${signal}, ${how}: no lock, owner file or socket is left`)
    t.notMatch(stderr, /keygate:|Error/, 'and says nothing')
  }
  // Through the command line's entry here: it takes the store's lock as a process does.
  const after = await runCliHere(['api-key', 'list', '--json'], { env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.equal(after.code, 0, 'the store opens afterwards')
})

t.test('a command ended by a signal while it waits to take the embedded store\'s lock leaves none of its files behind (found by a review)', async (t) => {
  // Before: the file of its own it links into place as the lock (keygate.lock.<pid>.<hex>) is
  // written before the wait for another process's keygate.lock.taking (up to 20 s), and the
  // signal handler that cleans up came only once the lock was held: a Ctrl-C during the wait
  // left that file in the data folder for good.
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'), { migrated: true })
  const env = childEnv(isolated({ KEYGATE_DATA_DIR: dataDir }))
  const taking = join(dataDir, 'keygate.lock.taking')
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    // Another process taking the lock, its marker fresh: the command waits for it.
    writeFileSync(taking, String(process.pid))
    const before = readdirSync(dataDir)
    const command = spawnClean(process.execPath, [...SHORT_COMMAND_V8_FLAGS, KEYGATE_BIN, 'api-key', 'list'], { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    command.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    const ended = new Promise<[number | null, NodeJS.Signals | null]>((resolve) => command.on('exit', (code, sig) => resolve([code, sig])))
    const own = () => readdirSync(dataDir).filter((f) => f.startsWith(`keygate.lock.${command.pid}.`))
    await until(t, `${signal}: the command waits to take the lock`, () => {
      // Kept fresh: a marker 10 s old is taken for a dead process's, on a slow start too.
      utimesSync(taking, new Date(), new Date())
      return own().length > 0
    })
    command.kill(signal)
    t.same(await ended, [null, signal], `${signal}: it ends by the signal`)
    t.same(own(), [], `${signal}: none of its files is left`)
    t.same(readdirSync(dataDir).sort(), before.sort(), `${signal}: the data folder is as it was`)
    t.notMatch(stderr, /keygate:|Error/, `${signal}: and says nothing`)
    rmSync(taking)
  }
})


t.test('commands other than serve log at warn unless LOG_LEVEL is set, whatever the file\'s log.level (README, Decisions: --json output stays clean)', async (t) => {
  const cwd = tempDir()
  const file = join(cwd, 'keygate.yaml')
  writeFileSync(file, 'log: { level: debug }\n')
  // Each command applies the migrations of a fresh database, which is said at info.
  const run = async (logLevel: string | undefined) => {
    const env = isolated({ DATABASE_URL: await freshDatabase(t), KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, LOG_LEVEL: logLevel })
    const r = await runCliHere(['api-key', 'list', '--json', '--config', file], { env })
    t.equal(r.code, 0, r.stderr)
    t.same(r.json(), { items: [], next_cursor: null }, 'stdout holds the answer alone')
    return r.stderr.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { level: string; message: string })
  }
  t.same(await run(undefined), [], 'without LOG_LEVEL: no info line (the file\'s debug is not used), and nothing else to say here')
  // All of stderr's lines, not t.match's items an array starts with: a line said twice passed (found by a review).
  t.same((await run('info')).map((l) => [l.level, l.message]), [['info', 'applied migrations']], 'LOG_LEVEL=info: the info line, on stderr, once')
})

t.test('a diagnostic report an operator turns on (NODE_OPTIONS=--report-on-signal) holds no environment, where the secrets are', async (t) => {
  // Node's report lists every environment variable by default: KEYGATE_ENCRYPTION_KEY, the admin
  // token, DATABASE_URL's password. Before (found by a review), such a report written on a signal
  // or a fatal error put them in a file of the report directory.
  const dir = tempDir()
  const reports = join(dir, 'reports')
  mkdirSync(reports)
  const secret = 'report-secret-Zq81xW'
  const env = isolated({ KEYGATE_DATA_DIR: join(dir, 'store'), KEYGATE_ADMIN_TOKEN: `${secret}-token-long-enough`, NODE_OPTIONS: `--report-on-signal --report-signal=SIGUSR2 --report-directory=${reports}` })
  // `validate -` waits on stdin in a second process (the short commands' V8 flags) that this one started.
  const command = spawnClean(process.execPath, [KEYGATE_BIN, 'api-key', 'validate', '-'], { env: childEnv(env), stdio: ['pipe', 'ignore', 'ignore'] })
  const exited = new Promise<void>((resolve) => command.once('exit', () => resolve()))
  t.teardown(() => void command.kill('SIGKILL'))
  const children = () => {
    try {
      return readFileSync(`/proc/${command.pid}/task/${command.pid}/children`, 'utf8').trim()
    } catch {
      return ''
    }
  }
  await until(t, 'the command has started its second process', () => children() !== '')
  command.kill('SIGUSR2')
  await until(t, 'the report is written', () => readdirSync(reports).some((f) => f.endsWith('.json')))
  let report: { header?: unknown; environmentVariables?: unknown } = {}
  await until(t, 'the report is whole', () => {
    try {
      report = JSON.parse(readFileSync(join(reports, readdirSync(reports).find((f) => f.endsWith('.json')) as string), 'utf8'))
      return true
    } catch {
      return false
    }
  })
  t.ok(report.header, 'a report was written')
  t.equal(report.environmentVariables, undefined, 'without the environment')
  for (const f of readdirSync(reports)) t.notOk(readFileSync(join(reports, f), 'utf8').includes(secret), `${f} holds no secret`)
  command.stdin?.end()
  command.kill('SIGTERM')
  await exited
})

t.test('every command that may open the embedded store runs it in a second process with the short commands\' V8 flags, deny-list among them (found by a review)', async (t) => {
  // deny-list opens the store as api-key does, and ran in one process with both of V8's compilers:
  // the README's list of such commands left it out, and its start cost what theirs no longer does.
  const dir = tempDir()
  const env = childEnv(isolated({ KEYGATE_DATA_DIR: join(dir, 'store') }))
  // Commands that change something: they make the store (one that only reads is refused at once without one).
  for (const args of [['api-key', 'create', '--name', 'flags', '--type', 'user'], ['deny-list', 'add', '192.0.2.1']]) {
    const command = spawnClean(process.execPath, [KEYGATE_BIN, ...args], { env, cwd: dir, stdio: ['ignore', 'ignore', 'ignore'] })
    let exited = false
    command.once('exit', () => (exited = true))
    t.teardown(() => void command.kill('SIGKILL'))
    let flags: string[] | undefined
    // Asked until the child has its own command line: between its fork and its exec, a child's
    // /proc cmdline is still the parent's (a first run read it there, without the flag).
    await until(t, `${args.join(' ')}: started its second process with the flag, or ended`, () => {
      if (exited) return true
      try {
        const child = readFileSync(`/proc/${command.pid}/task/${command.pid}/children`, 'utf8').trim().split(' ')[0]
        if (child) flags = readFileSync(`/proc/${child}/cmdline`, 'utf8').split('\0')
      } catch {}
      return flags?.includes(SHORT_COMMAND_V8_FLAGS[0] as string) === true
    })
    t.ok(flags?.includes(SHORT_COMMAND_V8_FLAGS[0] as string), `${args.join(' ')}: a second process with ${SHORT_COMMAND_V8_FLAGS[0]}`)
    await new Promise<void>((resolve) => (exited ? resolve() : command.once('exit', () => resolve())))
  }
})

t.test('api-key list --all and audit --all against an admin API that ignores the cursor stop at the page that repeats, and say so (found by a review)', async (t) => {
  // A proxy in front of the admin listener that drops the query string answers the first page,
  // with the same next_cursor, to every request. Before, `--all` followed it for ever, holding
  // every page's items until memory ran out. This server gives up after 50 pages so that the
  // walk before the fix ends (and fails the bound below).
  const at = '2030-01-02T03:04:05.000Z'
  const key = { id: 'k_repeat', name: 'repeated', type: 'user', status: 'active', scopes: [], owner: null, metadata: {}, allowed_cidrs: [], rate_limit: null, rotation_interval_s: null, rotated_from: null, replaced_by: null, grace_until: null, legacy: false, created_at: at, updated_at: at, expires_at: null, last_used_at: null, revoked_at: null, revoked_reason: null, valid_until: null }
  const row = { id: 'a_repeat', key_id: 'k_repeat', action: 'key.created', actor: 'cli:tester', address: null, details: null, integrity: 'ok', created_at: at }
  const cursorOf = (list: string) => Buffer.from(JSON.stringify([at, 'k_repeat', list])).toString('base64url')
  const asked: string[] = []
  const admin = http.createServer((req, res) => {
    asked.push(req.url ?? '')
    const audit = req.url?.startsWith('/v1/keys/k_repeat/audit') === true
    const next = asked.length >= 50 ? null : cursorOf(audit ? 'audit' : 'keys')
    res.writeHead(200, { 'content-type': 'application/json', 'x-keygate-admin': '1' }).end(JSON.stringify({ items: [audit ? row : key], next_cursor: next }))
  })
  await new Promise<void>((resolve) => admin.listen(0, '127.0.0.1', resolve))
  t.teardown(() => admin.close())
  const env = isolated({ KEYGATE_ADMIN_URL: `http://127.0.0.1:${(admin.address() as AddressInfo).port}`, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  for (const args of [['list', '--all', '--json'], ['audit', 'k_repeat', '--all', '--json']]) {
    asked.length = 0
    const r = await runCliHere(['api-key', ...args], { env })
    t.equal(r.code, 1, `${args[0]} --all fails: ${r.stderr}`)
    t.match(r.stderr, /^keygate: the admin API at http:\/\/127\.0\.0\.1:\d+ answered the page after cursor \S+ with that cursor again as its next_cursor: it ignores the query string \(a proxy in front of the admin listener that drops it\?\); is the admin URL \(KEYGATE_ADMIN_URL or --admin-url\) the admin listener\?/m, `${args[0]} --all: says the cursor was ignored`)
    t.matchStrict(r.json(), { error: { code: 'admin_unavailable', message: /ignores the query string/ } }, `${args[0]} --all: the error as JSON, no partial list`)
    t.equal(asked.length, 2, `${args[0]} --all: stopped at the second page (${asked.length} requests)`)
  }
})
