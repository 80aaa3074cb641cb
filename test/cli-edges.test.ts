// The `keygate` command as a real process, on the embedded store, where it reads and writes at the
// edges: `-` and stdin within bounds, an import file's size, rotation's answers, and output that
// cannot be written. Afterwards no plaintext key in any captured log. (Split from
// test/cli.test.ts, so the two run side by side.) What is not the embedded store's (stdin's bounds,
// a rotation's refusal of a lineage, the output of a change that cannot be written) runs on a
// fresh PostgreSQL database (postgresEnv): there a command costs about half the CPU as a process
// (0.85 s against 1.8 s) and a twentieth through runCliHere (0.05 s against 0.8 s, opening PGlite).
import t from 'tap'
import { createHash } from 'node:crypto'
import http from 'node:http'
import { chmodSync, chownSync, closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { createServer, type AddressInfo, type Socket } from 'node:net'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { KEYGATE_BIN, capturedStderr, childEnv, runCli, runCliHere, spawnClean } from './helpers/cli.ts'
import { until } from './helpers/gateway.ts'
import { ENCRYPTION_KEY, isolated, noPlaintextInOutput, plaintexts, postgresEnv, tempDir } from './helpers/cli-lifecycle.ts'
import { freshDatabase } from './helpers/stores.ts'
import { seedDataDir } from './helpers/pglite-template.ts'

t.test('`-` reads the first line of stdin and answers while the writer keeps it open; stdin is read within bounds', { timeout: 120_000 }, async (t) => {
  // Before (found by a review): stdin was read to its end, so `(echo KEY; sleep 8) | keygate
  // api-key validate -` answered 8 s late and `yes KEY | keygate api-key validate -` never, its
  // memory growing without bound. Each command here is waited for with its stdin still open, and
  // only then is stdin closed: the old command would never have ended.
  const cwd = tempDir()
  const { env } = await postgresEnv(t)
  // The key to validate, made through the command line's entry here: the commands reading stdin are the processes.
  const created = await runCliHere(['api-key', 'create', '--name', 'piped', '--type', 'user', '--json'], { env })
  t.equal(created.code, 0, 'a key to validate')
  const { id, key } = created.json() as { id: string; key: string }
  plaintexts.push(key)
  const withOpenStdin = async (args: string[], input: Buffer | string) => {
    const command = spawnClean(process.execPath, [KEYGATE_BIN, ...args], { env: childEnv(env), cwd, stdio: ['pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    command.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d))
    command.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    // The command may stop reading before all of `input` is written: its end of the pipe then closes.
    command.stdin?.on('error', () => {})
    command.stdin?.write(input)
    const code = await new Promise<number | null>((resolve) => command.on('close', (c) => resolve(c)))
    command.stdin?.end()
    capturedStderr.push(stderr)
    return { code, stdout, stderr }
  }
  const valid = await withOpenStdin(['api-key', 'validate', '-'], `${key}\n${key}\nmore lines the command never reads\n`)
  t.equal(valid.code, 0, 'the command ends, with stdin still open')
  t.match(valid.stdout, new RegExp(`^valid: ${id} \\(piped, user, active\\)\\n$`), 'the key on the first line is checked')
  // A first line longer than any key: refused once 64 KiB have come without a line break.
  const long = await withOpenStdin(['api-key', 'validate', '-', '--json'], 'a'.repeat(70_000))
  t.equal(long.code, 1)
  t.match(JSON.parse(long.stdout).error, { code: 'validation_failed', message: 'the first line of stdin is longer than 64 KiB; give the key or token alone on the first line' })
  // An import from stdin reads no more than the admin API takes in one body (32 MiB).
  const big = await withOpenStdin(['api-key', 'import', '-', '--json'], Buffer.alloc(32 * 1024 * 1024 + 1, 0x20))
  t.equal(big.code, 1)
  t.match(JSON.parse(big.stdout).error, { code: 'import_invalid', message: /^stdin holds more than 32 MiB, the most one import reads from it \(as the admin API takes in one body\): split the file$/ })
  // And from a file (before: read whole, whatever its size; `import /dev/zero` ran Node out of
  // memory): by its size, or, for a device that has none, once more than 32 MiB are read.
  const huge = join(cwd, 'huge.jsonl')
  closeSync(openSync(huge, 'w'))
  truncateSync(huge, 64 * 1024 * 1024)
  for (const [file, size] of [[huge, ' \\(67108864 bytes\\)'], ['/dev/zero', '']] as const) {
    const r = await runCli(['api-key', 'import', file, '--json'], { cwd, env })
    t.equal(r.code, 1, `${file}: exit 1`)
    t.match(JSON.parse(r.stdout).error, { code: 'import_invalid', message: new RegExp(`^${file}: the file is larger than 32 MiB${size}, the most one import reads \\(as the admin API takes in one body\\): split the file$`) })
  }
})

t.test('rotate on the embedded store: when the old key stops, and which key can be rotated instead', async (t) => {
  const cwd = tempDir()
  const env = isolated({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store'), { migrated: true }) })
  // The keys and lineages the rotations are asked of are made through the command line's entry in
  // this process (runCliHere, `here`), each as a process of its own cost over a second of CPU; the
  // rotations whose answers are checked are real processes.
  const run = async (args: string[], here = false, on = env) => {
    const r = here ? await runCliHere(['api-key', ...args], { env: on }) : await runCli(['api-key', ...args], { env: on, cwd })
    if (r.code === 0 && args.includes('--json') && typeof r.json().key === 'string') plaintexts.push(r.json().key)
    return r
  }
  const iso = (s: string) => s.replace(/\.\d{3}Z$/, 'Z')

  // A system key (72 h of grace) that expires in 2 h stops at its expiry, as the gateway has it.
  const soon = (await run(['create', '--name', 'soon', '--type', 'system', '--expires-in', '2h', '--json'], true)).json()
  const json = await run(['rotate', soon.id, '--json'])
  t.equal(json.code, 0, json.stderr)
  const r = json.json()
  t.equal(r.expires_at, soon.expires_at, 'the new key keeps the old expiry')
  t.ok(Date.parse(r.previous.grace_until) > Date.parse(soon.expires_at), 'grace_until is the grace deadline, after the expiry')
  t.equal(r.previous.valid_until, soon.expires_at, '--json: valid_until is the expiry')

  const soon2 = (await run(['create', '--name', 'soon 2', '--type', 'system', '--expires-in', '2h', '--json'], true)).json()
  const human = await run(['rotate', soon2.id])
  t.equal(human.code, 0, human.stderr)
  plaintexts.push(human.stdout.trim().split('\n').at(-1) as string)
  const first = human.stdout.split('\n')[0] as string
  t.match(first, `${soon2.id} stays valid until ${iso(soon2.expires_at)} (its expiry, before its grace period ends).`, 'the message gives the expiry')
  t.match(first, `, expiring ${iso(soon2.expires_at)} as the old one did;`, 'and says the new key keeps it')
  t.notMatch(first, 'rotation deadline', 'a key without a rotation interval ends by nothing else')

  // A rotation interval shorter than the grace: the old key ends with the new one if the new one
  // misses its rotation deadline (the scheduler ends both), which the message says.
  const often = (await run(['create', '--name', 'often', '--type', 'system', '--rotate-every', '1h', '--json'], true)).json()
  const rotatedOften = await run(['rotate', often.id])
  t.equal(rotatedOften.code, 0, rotatedOften.stderr)
  plaintexts.push(rotatedOften.stdout.trim().split('\n').at(-1) as string)
  t.match(rotatedOften.stdout.split('\n')[0], new RegExp(`${often.id} stays valid until \\S+, or with \\w+ if it is not rotated by its rotation deadline\\.`), 'the message says the old key may end sooner')

  // a → b → c, c rotated with force to d: a, b and c are revoked; the refusal names d. On
  // PostgreSQL: the refusal is the key service's, the same on either store, and its lineage took
  // four commands more on the embedded store.
  const { env: pg } = await postgresEnv(t)
  const a = (await run(['create', '--name', 'lineage', '--type', 'service', '--json'], true, pg)).json()
  const b = (await run(['rotate', a.id, '--json'], true, pg)).json()
  const c = (await run(['rotate', b.id, '--json'], true, pg)).json()
  const d = (await run(['rotate', c.id, '--force', '--json'], true, pg)).json()
  const refused = await run(['rotate', a.id], false, pg)
  t.equal(refused.code, 1)
  t.match(refused.stderr, `keygate: key ${a.id} is revoked and cannot be rotated; it was replaced by ${b.id}; the active key of its lineage is ${d.id}, rotate that key instead\n`)
  t.notMatch(refused.stderr, /    at /, 'no stack trace')
})

t.test('output that cannot be written: a created key is named with what to do, no stack trace, and the store is closed', async (t) => {
  // Before (found by a review): a full disk or a closed pipe on stdout ended the command with
  // Node's "Unhandled 'error' event" and a stack trace, after the key was created, whose secret
  // was then shown nowhere; the store's lock was left behind.
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'), { migrated: true })
  const full = openSync('/dev/full', 'w')
  t.teardown(() => closeSync(full))
  const command = spawnClean(process.execPath, [KEYGATE_BIN, 'api-key', 'create', '--name', 'unseen', '--type', 'user'], { env: childEnv(isolated({ KEYGATE_DATA_DIR: dataDir })), cwd, stdio: ['ignore', full, 'pipe'] })
  let stderr = ''
  command.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const code = await new Promise<number | null>((resolve) => command.on('close', (c) => resolve(c)))
  t.equal(code, 1, 'exit 1')
  const id = /keygate: key (\w{12}) was created \(revoke it with keygate api-key revoke \1, and create another\), but could not write the output \(stdout: no space left on the device\)/.exec(stderr)?.[1]
  t.ok(id, `says what was made and what to do: ${stderr.trim().split('\n').at(-1)}`)
  t.notMatch(stderr, /\n\s+at |Unhandled 'error'/, 'no stack trace')
  // The next command through the command line's entry here: it takes the store's lock as a process does.
  const listed = await runCliHere(['api-key', 'list', '--json'], { env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.equal(listed.code, 0, 'the store was closed: the next command opens it')
  t.ok(JSON.parse(listed.stdout).items.some((k: { id: string }) => k.id === id), 'and holds the key')
})

t.test('output that cannot be written after a change: the error says what was done', async (t) => {
  // Before (found by a review): `api-key import FILE --json | head -1` said only "could not write
  // the output", exit 1, with every row imported (a retry was refused as duplicates); revoke and
  // update > /dev/full the same, the change made.
  // On a fresh PostgreSQL database, not migrated: what is said is the command's, on either store.
  const cwd = tempDir()
  const env = isolated({ DATABASE_URL: await freshDatabase(t), KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY })
  const full = openSync('/dev/full', 'w')
  t.teardown(() => closeSync(full))
  // stdout is /dev/full, or a pipe whose reader is gone before the command writes ('closed').
  const unwritten = async (args: string[], stdout: number | 'closed') => {
    const command = spawnClean(process.execPath, [KEYGATE_BIN, ...args], { env: childEnv(env), cwd, stdio: ['ignore', stdout === 'closed' ? 'pipe' : stdout, 'pipe'] })
    if (stdout === 'closed') command.stdout?.destroy()
    let stderr = ''
    command.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    const code = await new Promise<number | null>((resolve) => command.on('close', (c) => resolve(c)))
    capturedStderr.push(stderr)
    t.equal(code, 1, `${args.join(' ')}: exit 1`)
    t.notMatch(stderr, /\n\s+at |Unhandled 'error'/, `${args.join(' ')}: no stack trace`)
    return stderr.trimEnd().split('\n').at(-1)
  }
  t.equal(await unwritten(['migrate'], full), `keygate: applied ${readdirSync(join(KEYGATE_BIN, '../../migrations')).filter((f) => f.endsWith('.sql')).sort().join(', ')}, but could not write the output (stdout: no space left on the device)`)
  const file = join(cwd, 'bulk.jsonl')
  writeFileSync(file, ['11111111-1111-4111-8111-111111111111', '22222222-2222-4222-8222-222222222222'].map((uuid, i) => JSON.stringify({ key_hash: createHash('sha256').update(uuid).digest('hex'), name: `bulk ${i}` })).join('\n'))
  t.equal(
    await unwritten(['api-key', 'import', file, '--json'], 'closed'),
    'keygate: 2 legacy keys were imported (keygate api-key list shows them; importing the file again is refused as duplicates), but could not write the output (stdout: the reader closed it)',
  )
  // What the store holds, read through the command line's entry in this process.
  const listed = await runCliHere(['api-key', 'list', '--json'], { env })
  const [id] = (listed.json().items as Array<{ id: string }>).map((k) => k.id)
  t.equal(listed.json().items.length, 2, 'both were imported')
  t.equal(await unwritten(['api-key', 'update', id as string, '--name', 'renamed'], full), `keygate: key ${id} was updated, but could not write the output (stdout: no space left on the device)`)
  t.equal(await unwritten(['api-key', 'revoke', id as string], full), `keygate: key ${id} was revoked, but could not write the output (stdout: no space left on the device)`)
  t.match((await runCliHere(['api-key', 'get', id as string, '--json'], { env })).json(), { name: 'renamed', status: 'revoked' }, 'both changes were made')
})


t.test('a failure after the answer is printed still closes the store, and with --json leaves stdout one JSON document (found by a review)', async (t) => {
  // Before: the error object followed the created key on stdout, two documents that no JSON
  // reader takes, and a script lost the key it had been shown once. Here the failure is the
  // warning that Redis could not be told, which cannot be written to a full stderr; it also
  // skipped the closing of the store after it, and the command sat on its idle PostgreSQL
  // connection for the pool's 30 s before it ended.
  const cwd = tempDir()
  const { env } = await postgresEnv(t)
  const full = openSync('/dev/full', 'w')
  t.teardown(() => closeSync(full))
  const command = spawnClean(process.execPath, [KEYGATE_BIN, 'api-key', 'create', '--name', 'told-once', '--type', 'user', '--json'], {
    env: childEnv({ ...env, LOG_LEVEL: undefined, REDIS_URL: 'redis://127.0.0.1:1' }),
    cwd,
    stdio: ['ignore', 'pipe', full],
  })
  let stdout = ''
  command.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  let code: number | null | undefined
  command.on('close', (c) => (code = c))
  t.teardown(() => command.kill('SIGKILL'))
  // The pool would end its idle connection after 30 s, which this wait does not reach.
  await until(t, 'the command ends, its store closed', () => code !== undefined)
  t.equal(code, 1, 'exit 1: the warning could not be written')
  let answer: { id?: string; key?: string } = {}
  t.doesNotThrow(() => (answer = JSON.parse(stdout)), 'stdout is one JSON document')
  t.match(answer, { name: 'told-once', key: /^kg_/ }, 'the created key, as shown once')
  if (answer.key) plaintexts.push(answer.key)
})

t.test("from the second run on, the compile cache serves the command's TypeScript and the embedded store's thread", async (t) => {
  // Before: the cache was turned on in bin/keygate.ts, after Node had stripped that file's types,
  // and the store's thread (a Worker) and the command's child never used it.
  const cwd = tempDir()
  const env = isolated({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store'), { migrated: true }), XDG_CACHE_HOME: join(cwd, 'cache'), NODE_COMPILE_CACHE: undefined, NODE_DISABLE_COMPILE_CACHE: undefined, NODE_DEBUG_NATIVE: 'COMPILE_CACHE' })
  // As installed: the command's second process must take the cache up too.
  t.equal((await runCli(['api-key', 'list', '--json'], { asInstalled: true, cwd, env })).code, 0, 'the first run fills the cache')
  const second = await runCli(['api-key', 'list', '--json'], { asInstalled: true, cwd, env })
  t.equal(second.code, 0)
  t.same(second.json().items, [], 'the command answers as ever')
  for (const file of ['bin/keygate.ts', 'cli/main.ts', 'core/embedded-worker.ts']) {
    t.match(second.stderr, new RegExp(`transpile cache for StrippedTypeScript file://\\S*/${file.replace('.', '\\.')}\\.\\.\\.success`), `${file}: read from the cache`)
  }
  t.ok(readdirSync(join(cwd, 'cache', 'keygate', 'compile-cache')).length > 0, 'in the user cache folder')
})

t.test('the compile cache is left off in a folder another user could write, or could rename on the way to it', async (t) => {
  // The cache holds keygate's TypeScript stripped of its types as plain text, checked by a CRC
  // alone: a file planted there (a CRC recomputed) runs as keygate, with its secrets. Before
  // (found by a review), folders already there were taken as they were: a compile-cache folder
  // of mode 0777, or a cache home of another user's (sudo keeping HOME), was written and read.
  const cwd = tempDir()
  const cases: Array<[string, (home: string) => void, boolean]> = [
    ['a compile-cache folder anyone may write', (home) => {
      mkdirSync(join(home, 'keygate', 'compile-cache'), { recursive: true })
      chmodSync(join(home, 'keygate', 'compile-cache'), 0o777)
    }, false],
    ['a keygate folder its group may write', (home) => {
      mkdirSync(join(home, 'keygate'), { recursive: true })
      chmodSync(join(home, 'keygate'), 0o770)
    }, false],
    ['a cache home anyone may write, not sticky', (home) => {
      mkdirSync(home)
      chmodSync(home, 0o777)
    }, false],
    // As /tmp: another user can rename nothing of this user's in it.
    ['a sticky cache home anyone may write', (home) => {
      mkdirSync(home)
      chmodSync(home, 0o1777)
    }, true],
    ...(process.getuid?.() === 0
      ? ([['a keygate folder of another user', (home: string) => {
          mkdirSync(join(home, 'keygate'), { recursive: true, mode: 0o700 })
          chownSync(join(home, 'keygate'), 65534, 65534)
        }, false]] as Array<[string, (home: string) => void, boolean]>)
      : []),
  ]
  for (const [what, prepare, used] of cases) {
    const home = join(cwd, what.replaceAll(' ', '-'))
    prepare(home)
    const run = await runCli(['--version'], { asInstalled: true, cwd, env: { XDG_CACHE_HOME: home, NODE_COMPILE_CACHE: undefined, NODE_DISABLE_COMPILE_CACHE: undefined } })
    t.equal(run.code, 0, `${what}: the command runs`)
    const folder = join(home, 'keygate', 'compile-cache')
    const entries = existsSync(folder) ? readdirSync(folder).length : 0
    if (used) t.ok(entries > 0, `${what}: the cache is used`)
    else t.equal(entries, 0, `${what}: the cache is left off`)
  }
})

t.test('a command through the admin API runs in one process, loading none of the store, Redis or outbound HTTP code', async (t) => {
  // Before: it ran again in a child process (the baseline compiler's, for the embedded store it
  // never opens) and loaded pg, ioredis and undici with the rest of the command line, about a
  // third of its start-up.
  const cwd = tempDir()
  const recorder = loadRecorder(cwd)
  // An admin API that takes the connection and never answers: the command waits on it, as it is.
  const held = new Set<Socket>()
  const admin = createServer((socket) => held.add(socket))
  await new Promise<void>((resolve) => admin.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const s of held) s.destroy()
    admin.close()
  })
  const url = `http://127.0.0.1:${(admin.address() as AddressInfo).port}`
  for (const [how, extra, args] of [
    ['KEYGATE_ADMIN_URL', { KEYGATE_ADMIN_URL: url }, []],
    ['--admin-url', {}, ['--admin-url', url]],
  ] as const) {
    recorder.clear()
    const connected = new Promise<void>((resolve) => admin.once('connection', () => resolve()))
    const env = childEnv(isolated({ ...extra, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!', ...recorder.env }))
    const command = spawnClean(process.execPath, [KEYGATE_BIN, 'api-key', 'list', '--json', ...args], { env, cwd, stdio: ['ignore', 'ignore', 'ignore'] })
    const ended = new Promise((resolve) => command.on('exit', resolve))
    t.teardown(() => command.kill('SIGKILL'))
    await connected
    const children = spawnSync('pgrep', ['-P', String(command.pid)], { encoding: 'utf8' }).stdout.trim()
    t.equal(children, '', `${how}: no second process`)
    const urls = recorder.urls()
    t.ok(urls.some((u) => u.endsWith('/cli/admin-client.ts')), `${how}: the hook saw the command's modules`)
    t.same(urls.filter((u) => /\/node_modules\/(pg|pg-[a-z-]+|ioredis|undici|@electric-sql)\//.test(u)).map((u) => u.replace(/.*\/node_modules\//, '')), [], `${how}: no store driver, Redis client or undici`)
    command.kill('SIGKILL')
    await ended
  }
})

t.test("a command through the admin API reaches an admin listener on any port serve listens on, those fetch refuses included (found by a review)", async (t) => {
  // Before: `--admin-listen 127.0.0.1:6000` served, and every command through it was "cannot reach
  // the admin API at http://127.0.0.1:6000 (KEYGATE_ADMIN_URL or --admin-url): bad port": fetch
  // refuses the ports the Fetch standard lists as bad (6000, 6665-6669, 10080, 5060, ...), which
  // curl and keygate's own listeners take.
  const seen: string[] = []
  const admin = http.createServer((req, res) => {
    seen.push(`${req.method} ${req.url} ${req.headers.authorization}`)
    res.writeHead(200, { 'content-type': 'application/json', 'x-keygate-admin': '1' })
    res.end(JSON.stringify({ total: 3, by_type: { system: 1, user: 2 }, by_status: { active: 3 }, legacy: 0, expiring_soon: 1 }))
  })
  // The first of the Fetch standard's bad ports that is free here.
  let port: number | undefined
  for (const candidate of [10080, 6666, 6667, 6668, 6669, 6679, 6697, 6000, 6566, 5060, 5061, 4190, 3659]) {
    const bound = await new Promise<boolean>((resolve) => {
      admin.once('error', () => resolve(false))
      admin.listen(candidate, '127.0.0.1', () => resolve(true))
    })
    admin.removeAllListeners('error')
    if (bound) {
      port = candidate
      break
    }
  }
  if (port === undefined) return t.fail('none of the ports fetch refuses is free here')
  t.teardown(() => admin.close())
  const token = 'an-admin-token-of-32-characters!'
  const cwd = tempDir()
  t.teardown(() => rmSync(cwd, { recursive: true, force: true }))
  const r = await runCli(['api-key', 'stats', '--json', '--admin-url', `http://127.0.0.1:${port}`], { env: isolated({ KEYGATE_ADMIN_TOKEN: token }), cwd })
  t.equal(r.code, 0, `through an admin API on port ${port}: ${r.stderr}`)
  t.same(r.json(), { total: 3, by_type: { system: 1, user: 2 }, by_status: { active: 3 }, legacy: 0, expiring_soon: 1, expiring_within_days: 7, expiring_within_7d: 1 }, "the server's answer")
  t.same(seen, [`GET /v1/stats Bearer ${token}`], 'one call, with the credential')
})

t.test('a command on the embedded store queues its key events for the servers and loads no outbound HTTP code', async (t) => {
  // Before: the webhook code it queues with loaded undici at once (and the Node modules undici
  // needs, 224 of the command's 604 modules), about 0.13 s of CPU in every such command.
  const cwd = tempDir()
  const recorder = loadRecorder(cwd)
  const env = isolated({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store'), { migrated: true }), ...recorder.env })
  const created = await runCli(['api-key', 'create', '--name', 'no-http', '--type', 'service', '--json'], { cwd, env })
  t.equal(created.code, 0, 'the key is created')
  plaintexts.push((created.json() as { key: string }).key)
  const urls = recorder.urls()
  t.ok(urls.some((u) => u.endsWith('/core/webhooks.ts')), 'the webhook code that queues the key events was loaded')
  t.same(urls.filter((u) => /\/node_modules\/undici\//.test(u)), [], 'undici was not')
})

/** A hook for NODE_OPTIONS that writes down every module a command loads: `env` to run it with, `urls()` to read them, `clear()` to start again. */
function loadRecorder(cwd: string): { env: Record<string, string>; urls(): string[]; clear(): void } {
  const loaded = join(cwd, 'loaded.txt')
  const hook = join(cwd, 'hook.mjs')
  writeFileSync(hook, "import module from 'node:module'\nimport { appendFileSync } from 'node:fs'\nmodule.registerHooks({ load(url, context, next) { appendFileSync(process.env.LOADED_FILE, url + '\\n'); return next(url, context) } })\n")
  writeFileSync(loaded, '')
  return {
    clear: () => writeFileSync(loaded, ''),
    env: { LOADED_FILE: loaded, NODE_OPTIONS: `--import ${hook}` },
    urls: () => readFileSync(loaded, 'utf8').split('\n').filter(Boolean),
  }
}

t.test('a command that makes a new embedded store says so, naming the folder; one on a store that is there does not', async (t) => {
  // Before (found by a deployment review): `sudo -u keygate keygate api-key create` lost the
  // service's KEYGATE_DATA_DIR, made a store of its own in the working folder without a word, and
  // printed a key the service never knew.
  const cwd = tempDir()
  const env = isolated({ KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 5).toString('base64'), LOG_LEVEL: 'info' })
  const made = await runCli(['api-key', 'create', '--name', 'stray', '--type', 'user', '--json'], { cwd, env })
  t.equal(made.code, 0, made.stderr)
  plaintexts.push((made.json() as { key: string }).key)
  const said = made.stderr.split('\n').filter((l) => l.includes('made a new embedded store'))
  t.equal(said.length, 1, 'said once')
  t.equal(JSON.parse(said[0] as string).data_dir, join(cwd, '.keygate'), 'naming the folder it made')
  t.match(said[0], /KEYGATE_DATA_DIR/, 'and where a service keeps its store')
  const again = await runCli(['api-key', 'create', '--name', 'second', '--type', 'user', '--json'], { cwd, env })
  t.equal(again.code, 0, again.stderr)
  plaintexts.push((again.json() as { key: string }).key)
  t.notMatch(again.stderr, /made a new embedded store/, 'not said for a store that is there')
})

t.test('no captured log or error output holds a plaintext key', async (t) => noPlaintextInOutput(t, { logLines: true }))
