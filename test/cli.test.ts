// The `keygate` command as a real process: help, config check, the key lifecycle on the embedded
// store, and afterwards no plaintext key in the store files or any captured log. (The lifecycle
// on PostgreSQL is test/cli-postgres.test.ts, and usage errors and input no store can hold are
// test/cli-input.test.ts, so they run side by side.)
import t from 'tap'
import { execFileSync, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { closeSync, existsSync, openSync, readdirSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { KEYGATE_BIN, capturedStderr, childEnv, folderBytes, runCli, spawnClean } from './helpers/cli.ts'
import { until } from './helpers/gateway.ts'
import { isolated, lifecycle, noPlaintextInOutput, plaintexts, tempDir } from './helpers/cli-lifecycle.ts'
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
  const fromEnv = await runCli(['config', 'check'], { env: { KEYGATE_CONFIG: good } })
  t.equal(fromEnv.code, 0, 'KEYGATE_CONFIG is checked')
  t.equal(fromEnv.stdout, `${good}: valid (1 route)\n`)
  writeFileSync(join(dir, 'keygate.yaml'), 'cache: { ttl_s: 0 }\n')
  const fromCwd = await runCli(['config', 'check'], { env: { KEYGATE_CONFIG: undefined }, cwd: dir })
  t.equal(fromCwd.code, 1, './keygate.yaml is checked')
  t.match(fromCwd.stderr, /cache\.ttl_s: 0 is not allowed/)

  const missing = await runCli(['config', 'check', join(dir, 'nope.yaml')])
  t.equal(missing.code, 1)
  t.match(missing.stderr, /nope\.yaml: cannot be read \(ENOENT\)/)

  const docs = await runCli(['config', 'docs'])
  t.equal(docs.code, 0)
  t.match(docs.stdout, /\| `cache\.ttl_s` \| `300` \| `CACHE_TTL_SECONDS`/)
})

t.test('key lifecycle on the embedded store', async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'))
  await lifecycle(t, { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.ok(statSync(join(dataDir, 'encryption.key')).mode & 0o600, 'an encryption key was generated into the data folder')
  t.equal(statSync(join(dataDir, 'encryption.key')).mode & 0o077, 0, 'readable by its owner only')
  t.notOk(existsSync(join(dataDir, 'keygate.lock')), 'the store lock is released on exit')

  const everything = folderBytes(dataDir)
  t.ok(everything.includes(Buffer.from('demo-renamed')), 'the data files hold the stored text (the scan below can see strings)')
  for (const p of plaintexts) t.notOk(everything.includes(Buffer.from(p)), 'no plaintext key in the embedded store files')
})

t.test('the embedded store is refused while another process holds it', async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'))
  const held = await openDb({ dataDir })
  t.teardown(() => held.close())
  const r = await runCli(['api-key', 'list', '--json'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.equal(r.code, 1)
  t.equal(r.json().error.code, 'store_locked')
  t.match(r.stderr, new RegExp(`in use by process ${process.pid}`))
  t.match(r.stderr, /KEYGATE_ADMIN_URL/)
  // The gitea and n8n commands are sent to the admin API too, and go through it when it is set.
  for (const group of ['gitea', 'n8n']) {
    const locked = await runCli([group, 'list', '--json'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
    t.equal(locked.code, 1)
    t.match(locked.json().error, { code: 'store_locked', message: /in use by process \d+; stop it, or point the CLI at its admin API with KEYGATE_ADMIN_URL and KEYGATE_ADMIN_TOKEN$/ }, `${group}: the same hint`)
    const remote = await runCli([group, 'list', '--json'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_URL: 'http://127.0.0.1:1', KEYGATE_ADMIN_TOKEN: 'x'.repeat(20) }) })
    t.equal(remote.code, 1)
    t.match(remote.json().error, { code: 'admin_unavailable', message: /cannot reach the admin API at http:\/\/127\.0\.0\.1:1/ }, `${group}: through the admin API when KEYGATE_ADMIN_URL is set`)
  }
})

t.test("a store command runs on V8's baseline compiler in a child process, which ends with the command, by any signal", async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'))
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
  // `validate -` waits on it for the key with the store open (and locked by its pid), so only the
  // end of the command can end the process that holds the store.
  const fifo = join(cwd, 'stdin')
  execFileSync('mkfifo', [fifo])
  const stdin = openSync(fifo, 'r+')
  t.teardown(() => closeSync(stdin))
  for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
    const command = spawnClean(process.execPath, [KEYGATE_BIN, 'api-key', 'validate', '-'], { env: childEnv(isolated({ KEYGATE_DATA_DIR: dataDir })), cwd, stdio: [stdin, 'ignore', 'ignore'] })
    const ended = new Promise<string | number | null>((resolve) => command.on('exit', (code, s) => resolve(s ?? code)))
    let holder = 0
    await until(t, `${signal}: the store is opened`, () => {
      holder = existsSync(lock) ? Number(readFileSync(lock, 'utf8')) : 0
      return holder > 0 && holder !== command.pid && !gone(holder)
    }, 60_000)
    t.ok(readFileSync(`/proc/${holder}/cmdline`, 'utf8').split('\0').includes('--liftoff-only'), 'by another process, which runs with --liftoff-only')
    command.kill(signal)
    const outcome = await Promise.race([ended, new Promise<string>((resolve) => setTimeout(() => resolve('still running after 20 s'), 20_000).unref())])
    if (outcome !== signal) command.kill('SIGKILL')
    t.equal(outcome, signal, `the command ends by the ${signal} it was sent`)
    await until(t, `${signal}: and so does the process that held the store`, () => gone(holder))
  }
  const full = await runCli(['api-key', 'list', '--json'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir, KEYGATE_WASM_TIERING: 'full' }) })
  t.equal(full.code, 0, 'KEYGATE_WASM_TIERING=full runs the command in its own process (with TurboFan), on the store left behind')
})

t.test('`-` reads the first line of stdin and answers while the writer keeps it open; stdin is read within bounds', { timeout: 120_000 }, async (t) => {
  // Before (found by a review): stdin was read to its end, so `(echo KEY; sleep 8) | keygate
  // api-key validate -` answered 8 s late and `yes KEY | keygate api-key validate -` never, its
  // memory growing without bound. Each command here is waited for with its stdin still open, and
  // only then is stdin closed: the old command would never have ended.
  const cwd = tempDir()
  const env = isolated({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store')) })
  const created = await runCli(['api-key', 'create', '--name', 'piped', '--type', 'user', '--json'], { cwd, env })
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
  const env = isolated({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store')) })
  const run = async (args: string[]) => {
    const r = await runCli(['api-key', ...args], { env, cwd })
    if (r.code === 0 && args.includes('--json') && typeof r.json().key === 'string') plaintexts.push(r.json().key)
    return r
  }
  const iso = (s: string) => s.replace(/\.\d{3}Z$/, 'Z')

  // A system key (72 h of grace) that expires in 2 h stops at its expiry, as the gateway has it.
  const soon = (await run(['create', '--name', 'soon', '--type', 'system', '--expires-in', '2h', '--json'])).json()
  const json = await run(['rotate', soon.id, '--json'])
  t.equal(json.code, 0, json.stderr)
  const r = json.json()
  t.equal(r.expires_at, soon.expires_at, 'the new key keeps the old expiry')
  t.ok(Date.parse(r.previous.grace_until) > Date.parse(soon.expires_at), 'grace_until is the grace deadline, after the expiry')
  t.equal(r.previous.valid_until, soon.expires_at, '--json: valid_until is the expiry')

  const soon2 = (await run(['create', '--name', 'soon 2', '--type', 'system', '--expires-in', '2h', '--json'])).json()
  const human = await run(['rotate', soon2.id])
  t.equal(human.code, 0, human.stderr)
  plaintexts.push(human.stdout.trim().split('\n').at(-1) as string)
  const first = human.stdout.split('\n')[0] as string
  t.match(first, `${soon2.id} stays valid until ${iso(soon2.expires_at)} (its expiry, before its grace period ends).`, 'the message gives the expiry')
  t.match(first, `, expiring ${iso(soon2.expires_at)} as the old one did;`, 'and says the new key keeps it')

  // a → b → c, c rotated with force to d: a, b and c are revoked; the refusal names d.
  const a = (await run(['create', '--name', 'lineage', '--type', 'service', '--json'])).json()
  const b = (await run(['rotate', a.id, '--json'])).json()
  const c = (await run(['rotate', b.id, '--json'])).json()
  const d = (await run(['rotate', c.id, '--force', '--json'])).json()
  const refused = await run(['rotate', a.id])
  t.equal(refused.code, 1)
  t.match(refused.stderr, `keygate: key ${a.id} is revoked and cannot be rotated; it was replaced by ${b.id}; the active key of its lineage is ${d.id}, rotate that key instead\n`)
  t.notMatch(refused.stderr, /    at /, 'no stack trace')
})

t.test('no captured log or error output holds a plaintext key', async (t) => noPlaintextInOutput(t, { logLines: true }))

t.test('a Node.js older than 22.18 is told so, with no stack trace', async (t) => {
  // Before: ERR_UNKNOWN_FILE_EXTENSION ".ts" and a stack trace (the systemd unit's /usr/bin/node
  // may well be older). The older Node is played by Node 24 with its version rewritten.
  for (const version of ['22.17.1', '20.20.2']) {
    const r = spawnSync(process.execPath, ['--import', `data:text/javascript,Object.defineProperty(process.versions,"node",{value:"${version}"})`, join(KEYGATE_BIN, '..', 'keygate.js'), '--help'], { encoding: 'utf8', env: childEnv({}) })
    t.equal(r.status, 1, `${version}: exit 1`)
    t.equal(r.stderr, `keygate: needs Node.js 22.18 or later (24 is the target); this is v${version} at ${process.execPath}\n`, `${version}: one line saying why`)
    t.equal(r.stdout, '')
  }
})

t.test('output that cannot be written: a created key is named with what to do, no stack trace, and the store is closed', async (t) => {
  // Before (found by a review): a full disk or a closed pipe on stdout ended the command with
  // Node's "Unhandled 'error' event" and a stack trace, after the key was created, whose secret
  // was then shown nowhere; the store's lock was left behind.
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'))
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
  const listed = await runCli(['api-key', 'list', '--json'], { env: isolated({ KEYGATE_DATA_DIR: dataDir }), cwd })
  t.equal(listed.code, 0, 'the store was closed: the next command opens it')
  t.ok(JSON.parse(listed.stdout).items.some((k: { id: string }) => k.id === id), 'and holds the key')
})

t.test('output that cannot be written after a change: the error says what was done', async (t) => {
  // Before (found by a review): `api-key import FILE --json | head -1` said only "could not write
  // the output", exit 1, with every row imported (a retry was refused as duplicates); revoke and
  // update > /dev/full the same, the change made.
  const cwd = tempDir()
  const env = isolated({ KEYGATE_DATA_DIR: join(cwd, 'store') })
  await seedDataDir(join(cwd, 'store'))
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
  const listed = await runCli(['api-key', 'list', '--json'], { cwd, env })
  const [id] = (listed.json().items as Array<{ id: string }>).map((k) => k.id)
  t.equal(listed.json().items.length, 2, 'both were imported')
  t.equal(await unwritten(['api-key', 'update', id as string, '--name', 'renamed'], full), `keygate: key ${id} was updated, but could not write the output (stdout: no space left on the device)`)
  t.equal(await unwritten(['api-key', 'revoke', id as string], full), `keygate: key ${id} was revoked, but could not write the output (stdout: no space left on the device)`)
  t.match((await runCli(['api-key', 'get', id as string, '--json'], { cwd, env })).json(), { name: 'renamed', status: 'revoked' }, 'both changes were made')
})
