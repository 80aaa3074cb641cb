// The embedded store's files, from a review of them against real processes: files that must
// appear whole, a store PostgreSQL cannot start on or that ends, and how a file-system error reads.
// Who may open a data folder is test/store-files.test.ts.
import t from 'tap'
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { encryptionKeyId, loadAuditCipher } from '../core/audit.ts'
import { createLogger } from '../core/log.ts'
import { openDb } from '../core/db.ts'
import { EMSCRIPTEN_ERRNO, fileSystemErrorWords } from '../core/errors.ts'
import { childEnv, KEYGATE_BIN, outcome, runCli, runCliHere, spawnClean } from './helpers/cli.ts'
import { SHORT_COMMAND_V8_FLAGS } from '../bin/v8-flags.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { rejection } from './helpers/stores.ts'
import { embeddedEnv, storeScript, tempDir, withNoFileSpace } from './helpers/store-files.ts'

t.test('a generated encryption key whose write fails leaves no file, and the next start generates one', async (t) => {
  const dir = tempDir(t)
  const failed = await withNoFileSpace(`
    const { loadAuditCipher } = await import(core + 'audit.ts')
    try {
      loadAuditCipher({ storeKind: 'embedded', dataDir: ${JSON.stringify(dir)} })
      console.log(JSON.stringify({ ok: true }))
    } catch (err) {
      console.log(JSON.stringify({ code: err.code, message: err.message }))
    }`)
  t.equal(failed.code, 0, failed.stderr)
  t.same(JSON.parse(failed.stdout), { code: 'config_invalid', message: `${join(dir, 'encryption.key')} cannot be created: the file size limit was reached` })
  t.same(readdirSync(dir), [], 'no encryption.key, and no file of the attempt, is left')
  // Before, an empty encryption.key was left, and every start failed: "does not hold 32 bytes in base64".
  const cipher = loadAuditCipher({ storeKind: 'embedded', dataDir: dir })
  t.equal(Buffer.from(readFileSync(join(dir, 'encryption.key'), 'utf8').trim(), 'base64').length, 32)
  t.ok(cipher.currentKeyId)
  t.same(readdirSync(dir), ['encryption.key'])

  // Processes creating it at once: of the links into place one wins, and the others read its key.
  const raced = tempDir(t)
  const script = `const { loadAuditCipher } = await import(${JSON.stringify(new URL('../core/audit.ts', import.meta.url).href)}); console.log(loadAuditCipher({ storeKind: 'embedded', dataDir: ${JSON.stringify(raced)} }).currentKeyId)`
  const runs = await Promise.all([0, 1, 2].map(() => outcome(spawnClean(process.execPath, [...SHORT_COMMAND_V8_FLAGS, '--input-type=module', '-e', script], { env: childEnv() }), ['(a script creating the key)'])))
  const ids = runs.map((r) => r.stdout.trim())
  t.same(runs.map((r) => r.code), [0, 0, 0], runs.map((r) => r.stderr).join(''))
  t.equal(new Set(ids).size, 1, 'every process has the same key')
  t.same(readdirSync(raced), ['encryption.key'], 'and no file of theirs is left beside it')
})

t.test('an empty encryption.key (left by an older keygate whose write of it failed) is replaced, unless the store holds something sealed', async (t) => {
  const dir = tempDir(t)
  const file = join(dir, 'encryption.key')
  writeFileSync(file, '', { mode: 0o600 })
  // Not knowing what the store holds, it is not replaced.
  const thrown = (f: () => unknown): unknown => {
    try {
      f()
    } catch (err) {
      return err
    }
    return 'nothing thrown'
  }
  t.match(thrown(() => loadAuditCipher({ storeKind: 'embedded', dataDir: dir })), { code: 'config_invalid', message: `${file} is empty: it holds no key (an older keygate's write of it failed); remove it, and the next start generates one` })
  // The store holds rows sealed with a key: that was the file's, lost; a new key would open none of them.
  t.match(thrown(() => loadAuditCipher({ storeKind: 'embedded', dataDir: dir, sealed: ['k1a2b3c4'] })), {
    code: 'encryption_key_missing',
    message: `${file} is empty, but the store holds audit rows or webhook secrets sealed with encryption key k1a2b3c4: restore the file from its backup (or set KEYGATE_ENCRYPTION_KEY to that key); a new key could open none of them`,
  })
  t.equal(readFileSync(file, 'utf8'), '', 'left as it was')
  // A link to an empty file is not replaced by a file of its own (its target would stay empty).
  const linked = tempDir(t)
  symlinkSync(file, join(linked, 'encryption.key'))
  t.match(thrown(() => loadAuditCipher({ storeKind: 'embedded', dataDir: linked, sealed: [] })), { code: 'config_invalid', message: `${join(linked, 'encryption.key')} is a link to an empty file, which holds no key` })
  t.ok(lstatSync(join(linked, 'encryption.key')).isSymbolicLink(), 'the link stays')
  // Nothing sealed: a new key in its place, said.
  const lines: string[] = []
  const cipher = loadAuditCipher({ storeKind: 'embedded', dataDir: dir, sealed: [], log: createLogger({ level: 'info', write: (line) => void lines.push(line) }) })
  const key = Buffer.from(readFileSync(file, 'utf8').trim(), 'base64')
  t.equal(key.length, 32, 'a key of 32 bytes in its place')
  t.equal(cipher.currentKeyId, encryptionKeyId(key), 'and it is the key in use')
  t.equal(statSync(file).mode & 0o777, 0o600, 'readable by its owner only')
  t.same(readdirSync(dir), ['encryption.key'], 'no file of the replacement is left beside it')
  t.match(lines.join(''), /"level":"warn".*in place of an empty key file/, 'said at warn')

  // Through the CLI: a new store with an empty key file works; once it has sealed audit rows, an
  // emptied file is refused, naming the key they were sealed with. The store's PGlite folder is
  // copied from the tests' initialised one (helpers/pglite-template.ts): PGlite's initdb took 6
  // of the command's 8 s, and the key file is read after it (after the migrations), whichever way
  // the folder came about; migrated already, as the migrations are not what is tested. The
  // commands run in this process (runCliHere): the key file, not the process, is the subject.
  const store = await seedDataDir(tempDir(t), { migrated: true })
  writeFileSync(join(store, 'encryption.key'), '\n')
  const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'after an empty key file', '--json'], { env: embeddedEnv(store) })
  t.equal(created.code, 0, created.stderr)
  const id = encryptionKeyId(Buffer.from(readFileSync(join(store, 'encryption.key'), 'utf8').trim(), 'base64'))
  writeFileSync(join(store, 'encryption.key'), '')
  const listed = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
  t.equal(listed.code, 1, listed.stderr)
  t.match(listed.json().error, { code: 'encryption_key_missing', message: new RegExp(`is empty, but the store holds audit rows or webhook secrets sealed with encryption key ${id}: restore the file`) })
})

t.test("the lock's own file is removed when its write fails", async (t) => {
  const dir = tempDir(t)
  const failed = await withNoFileSpace(`
    const { openDb } = await import(core + 'db.ts')
    try {
      await (await openDb({ dataDir: ${JSON.stringify(dir)} })).close()
      console.log(JSON.stringify({ ok: true }))
    } catch (err) {
      console.log(JSON.stringify({ code: err.code, message: err.message }))
    }`)
  t.equal(failed.code, 0, failed.stderr)
  t.same(JSON.parse(failed.stdout), { code: 'store_unavailable', message: `cannot lock the embedded store in ${dir}: the file size limit was reached` })
  t.same(readdirSync(dir), [], 'no keygate.lock.<pid>.<hex> is left behind')
})

t.test("Emscripten's errno numbers, in words", async (t) => {
  // The table PGlite's file system numbers its errors by (Emscripten's, not Linux's).
  const pglite = readFileSync(new URL('../node_modules/@electric-sql/pglite/dist/pglite.js', import.meta.url), 'utf8')
  const literal = /ERRNO_CODES=\{([^}]*)\}/.exec(pglite)?.[1]
  t.ok(literal, "PGlite's ERRNO_CODES is found")
  const table = new Map((literal ?? '').split(',').map((pair) => pair.split(':') as [string, string]).map(([code, n]) => [code, Number(n)]))
  for (const [errno, code] of Object.entries(EMSCRIPTEN_ERRNO)) t.equal(table.get(code), Number(errno), `${code} is ${errno}`)

  t.equal(fileSystemErrorWords(51), 'file system error ENOSPC (no space left on the device)', 'a full disk, without the hint of a file in the way')
  t.equal(fileSystemErrorWords(2), 'file system error EACCES (permission denied)')
  t.equal(fileSystemErrorWords(69), 'file system error EROFS (the file system is read-only)')
  t.equal(fileSystemErrorWords(44), 'file system error ENOENT (a file or folder is missing)')
  t.equal(fileSystemErrorWords(54), 'file system error ENOTDIR (a file is in the way; is something in the data folder not what the store expects, such as a file where a folder should be?)')
  t.equal(fileSystemErrorWords(31), 'file system error EISDIR (it is a folder; is something in the data folder not what the store expects, such as a file where a folder should be?)')
  t.equal(fileSystemErrorWords(1), "file system error errno 1 (in Emscripten's numbering)", 'a number not in the table stays a number')
})

t.test('a file where PGlite makes a folder, in a new store: ENOTDIR in words, with the hint', async (t) => {
  // initdb runs here (some 6 s of CPU): what PGlite throws as a bare {errno} comes from its file
  // system while it makes a store.
  const dir = tempDir(t)
  mkdirSync(join(dir, 'pgdata'), { mode: 0o700 })
  writeFileSync(join(dir, 'pgdata', 'global'), 'not a folder')
  const err = await rejection(openDb({ dataDir: dir }))
  t.equal(err.code, 'store_unavailable')
  t.equal(err.message, `cannot open the embedded store in ${dir}: file system error ENOTDIR (a file is in the way; is something in the data folder not what the store expects, such as a file where a folder should be?)`)
  t.notOk(existsSync(join(dir, 'keygate.lock')), 'the lock is released')
})

// Before (found by a review of migrations and the stores): PGlite makes a store (initdb) wherever
// pgdata/ has no PG_VERSION, whatever else is there. A store whose PG_VERSION was lost (a restore
// or copy that missed it, a damaged file system) was made anew over its files by the next
// `serve`, `migrate` or `api-key create`: its keys, audit rows and webhooks were gone, and a read
// command's advice ("make the store there with `keygate migrate`") led there too.
t.test('a store that lost PG_VERSION is refused, not made anew over its keys', async (t) => {
  // The commands run in this process (runCliHere), as a process of their own cost about a second
  // of CPU more each: what they find in the folder is the subject, not the process.
  const store = await seedDataDir(join(tempDir(t), 'data'), { migrated: true })
  const env = embeddedEnv(store)
  const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'kept', '--json'], { env })
  t.equal(created.code, 0, created.stderr)
  const mark = join(store, 'pgdata', 'PG_VERSION')
  const version = readFileSync(mark, 'utf8')
  rmSync(mark)

  // `serve` opens the store as these do (openDb); a command that only reads says the same, not
  // that there is no store (before, found by a review, it advised making one there).
  for (const args of [['migrate'], ['api-key', 'create', '--type', 'user', '--name', 'after'], ['api-key', 'list']]) {
    const refused = await runCliHere(args, { env })
    t.equal(refused.code, 1, `${args.join(' ')}: refused`)
    t.match(refused.stderr, `the embedded store in ${store} has lost ${mark}, PostgreSQL's mark of a data folder, but still holds a database's files: keygate makes no new store over them, which would lose every key in it`, `${args.join(' ')}: says why`)
    t.notOk(existsSync(mark), `${args.join(' ')}: no new store was made`)
  }
  t.notOk(existsSync(join(store, 'keygate.lock')), 'the lock is given back')

  writeFileSync(mark, version)
  const listed = await runCliHere(['api-key', 'list', '--json'], { env })
  t.equal(listed.code, 0, listed.stderr)
  t.same(listed.json().items.map((k: { name: string }) => k.name), ['kept'], 'with PG_VERSION put back, the key is there')
})

// Before: a first start cut short while PGlite made the store (a full disk, a file size limit)
// left a partial store with PG_VERSION in it, which every later start failed to open, with
// PGlite's "Aborted(). Build with -sASSERTIONS for more info."
t.test('a store whose making fails leaves nothing behind, and the next start makes it', async (t) => {
  const store = join(tempDir(t), 'data')
  // A file size limit of 64 KiB: the lock's files are written, PGlite's initdb is not.
  const child = spawnClean('sh', ['-c', 'ulimit -f 64 && exec "$0" "$@"', process.execPath, KEYGATE_BIN, 'migrate'], { env: childEnv(embeddedEnv(store)) })
  const cut = await outcome(child, ['migrate (with a file size limit)'])
  t.equal(cut.code, 1, cut.stderr)
  t.match(cut.stderr, `cannot open the embedded store in ${store}`)
  t.same(readdirSync(join(store, 'pgdata')), [], 'nothing of the store that failed is left in pgdata/')
  t.notOk(existsSync(join(store, 'keygate.making')), 'nor the mark of its making')

  const again = await runCli(['migrate', '--json'], { env: embeddedEnv(store) })
  t.equal(again.code, 0, again.stderr)
  t.equal(again.json().applied.length, readdirSync(new URL('../migrations/', import.meta.url)).filter((f) => f.endsWith('.sql')).length, 'the store is made, and migrated')
})
// Before (found by a review of migrations and the stores): PGlite's own words were all a command
// said of a store PostgreSQL could not start on: "Aborted(). Build with -sASSERTIONS for more
// info." for a pg_control or WAL cut short, "PGlite failed to initialize properly" for files of
// another PostgreSQL version. PostgreSQL's log lines say which file and why (its HINT, "It looks
// like you need to initdb", is left out: that would make a new store over the old).
t.test("a store PostgreSQL cannot start on: the command gives PostgreSQL's words, not PGlite's", async (t) => {
  const dir = tempDir(t)
  for (const [what, damage, said] of [
    ['pg_control cut short', (pgdata: string) => writeFileSync(join(pgdata, 'global', 'pg_control'), ''), 'PANIC: could not read file "global/pg_control": read 0 of '],
    ['the WAL gone', (pgdata: string) => { for (const f of readdirSync(join(pgdata, 'pg_wal'))) if (/^[0-9A-F]{24}$/.test(f)) rmSync(join(pgdata, 'pg_wal', f)) }, 'PANIC: could not locate a valid checkpoint record'],
    ['another PostgreSQL version', (pgdata: string) => writeFileSync(join(pgdata, 'PG_VERSION'), '99\n'), 'FATAL: database files are incompatible with server; DETAIL: The data directory was initialized by PostgreSQL version 99'],
  ] as const) {
    const store = await seedDataDir(join(dir, what.replaceAll(' ', '-')))
    damage(join(store, 'pgdata'))
    // In this process (runCliHere): PostgreSQL's start fails on the store's thread, which the
    // command's process, whichever it is, outlives.
    const listed = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
    t.equal(listed.code, 1, `${what}: refused`)
    const { error } = listed.json()
    t.equal(error.code, 'store_unavailable')
    t.match(error.message, `cannot open the embedded store in ${store}: PostgreSQL could not start on its files: `)
    t.match(error.message, said, `${what}: PostgreSQL's words`)
    t.match(error.message, 'restore the data folder from a backup; keygate makes no new store over them')
    t.notMatch(error.message, /Aborted\(\)|ASSERTIONS|failed to initialize|initdb/, `${what}: not PGlite's words, nor PostgreSQL's hint to make a new store`)
  }
})

// A first start killed while PGlite makes the store (a pod killed during its slow first start, a
// SIGKILL) leaves a partial pgdata/, with or without PG_VERSION: `keygate.making` beside it says
// that it never held anything, and the next start makes the store anew, where a pgdata/ without
// that mark and without PG_VERSION is refused (above).
t.test('a making killed part way: the next start makes the store anew', async (t) => {
  const store = join(tempDir(t), 'data')
  const child = spawnClean(process.execPath, [KEYGATE_BIN, 'migrate'], { env: childEnv(embeddedEnv(store)), stdio: 'ignore' })
  const ended = new Promise((resolve) => child.once('exit', resolve))
  const pgdata = join(store, 'pgdata')
  // Once PGlite has begun writing a database's files (base/), which a store that lost PG_VERSION holds too.
  while (!existsSync(join(pgdata, 'base'))) await new Promise((resolve) => setTimeout(resolve, 5))
  child.kill('SIGKILL')
  await ended
  t.ok(existsSync(join(store, 'keygate.making')), 'the mark of the making is left, with part of a store')

  const again = await runCli(['api-key', 'create', '--type', 'user', '--name', 'after', '--json'], { env: embeddedEnv(store) })
  t.equal(again.code, 0, again.stderr)
  t.notOk(existsSync(join(store, 'keygate.making')), 'made: the mark is gone')
  // Read back in this process (runCliHere): the store made anew by the real command above is the subject.
  const listed = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
  t.same(listed.json().items.map((k: { name: string }) => k.name), ['after'])
})

// Found by a docs walk: a command run while another process was making the store (`serve`'s
// first start, which takes seconds) looked for PG_VERSION before it asked for the lock, and said
// "no embedded store ... make the store there with `keygate serve`" or, once PGlite had begun
// writing the files, that the store had lost PG_VERSION and that pgdata/ could be removed, where
// the store is that process's (store_locked). A making cut short is no store that lost its mark.
// Found by a later review: that check looked for the making's mark only where PG_VERSION was
// missing, and PGlite writes PG_VERSION early in its making: a making killed after it passed for a
// store, and `api-key list` emptied pgdata/ and made a whole new store there (exit 0, no keys),
// and `api-key create` made one without the warning that it had.
t.test('a store being made is held by its maker; one whose making was cut short is none (found by a docs walk)', async (t) => {
  // Stopped once PGlite has begun writing the database's files, before its PG_VERSION, and once
  // it has written PG_VERSION: the making is under way, its lock held.
  for (const at of ['base', 'PG_VERSION']) {
    t.test(`stopped at pgdata/${at}`, async (t) => {
      const store = join(tempDir(t), 'data')
      // In one process (KEYGATE_WASM_TIERING=full), so that the process stopped and killed is the one making the store.
      const child = spawnClean(process.execPath, [KEYGATE_BIN, 'migrate'], { env: childEnv({ ...embeddedEnv(store), KEYGATE_WASM_TIERING: 'full' }), stdio: 'ignore' })
      const ended = new Promise((resolve) => child.once('exit', resolve))
      t.teardown(() => child.kill('SIGKILL'))
      while (!existsSync(join(store, 'pgdata', at))) await new Promise((resolve) => setTimeout(resolve, 2))
      child.kill('SIGSTOP')
      t.ok(existsSync(join(store, 'keygate.making')), 'the store is being made')
      const reader = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
      t.equal(reader.code, 1)
      t.equal(reader.json().error.code, 'store_locked', reader.stderr)
      t.match(reader.stderr, `in use by process ${child.pid} (keygate migrate)`)
      t.notMatch(reader.stderr, /has lost|no embedded store|remove /, 'no advice to make the store anew, or to remove it')

      child.kill('SIGKILL')
      await ended
      const cut = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
      t.equal(cut.code, 1, cut.stdout)
      t.match(cut.stderr, `no embedded store in ${store}`, 'a making cut short holds no store')
      t.notMatch(cut.stderr, /has lost/)
      t.ok(existsSync(join(store, 'keygate.making')), 'left as it is, for the next making')
      t.notOk(existsSync(join(store, 'encryption.key')), 'nothing made')
      // A command that makes the store makes it anew there, and says it made one.
      const made = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'after', '--json'], { env: embeddedEnv(store) })
      t.equal(made.code, 0, made.stderr)
      t.match(made.stderr, 'made a new embedded store: none was there')
    })
  }
})

t.test('a PANIC of PostgreSQL (a WAL write that failed) ends the embedded store: told as lost, every later call refused; a start still short of room is told to make room; one with room recovers it', async (t) => {
  // Before (found by a review, serve on a tmpfs that filled up): PGlite, which cannot end as
  // PostgreSQL does on a PANIC, was left broken: every later call failed with "cannot drop active
  // portal", or never came back with its thread spinning a CPU, and serve ran on without a store.
  // A file size limit set just past the WAL's end makes the WAL write fail as a full disk does.
  const work = tempDir(t)
  const dir = await seedDataDir(join(work, 'store'))
  const ran = await storeScript(work, 'panic.mjs', '(a script whose WAL write fails)', `
    const { execFileSync } = await import('node:child_process')
    const db = await openDb({ dataDir: ${JSON.stringify(dir)}, shortLived: true })
    const said = []
    db.onLost((err) => said.push({ lost: err.code, message: err.message }))
    await db.exec('CREATE TABLE filler (pad text)')
    const [{ lsn }] = await db.query('SELECT pg_current_wal_insert_lsn()::text AS lsn')
    const inSegment = parseInt(lsn.split('/')[1], 16) % (16 * 1024 * 1024)
    execFileSync('prlimit', ['--pid', String(process.pid), '--fsize=' + (inSegment + 256 * 1024)])
    const call = (p) => p.then(() => ({ ok: true }), (err) => ({ code: err.code, severity: err.severity, message: err.message }))
    said.push(await call(db.transaction((tx) => tx.query("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)"))))
    said.push(await call(db.query('SELECT 1')))
    said.push(await call(db.transaction((tx) => tx.query('SELECT 1'))))
    await db.close()
    console.log(JSON.stringify(said))
    console.log(inSegment)`)
  t.equal(ran.code, 0, ran.stderr)
  const [outcomes = '', walEnd = ''] = ran.stdout.split('\n')
  const [lost, insert, select, transaction] = JSON.parse(outcomes) as Array<Record<string, string>>
  t.match(insert, { severity: 'PANIC', message: /^could not write to log file .*: File too large$/ }, 'the write that met the PANIC fails with it')
  t.match(lost, { lost: 'store_unavailable', message: /^the embedded store stopped: PostgreSQL stopped on a PANIC \(could not write to log file .*\); the next start recovers its files, as after a crash$/ }, 'the store is told lost, for serve to stop')
  t.same(select, { code: 'store_unavailable', message: lost?.message }, 'a later call is refused at once')
  t.same(transaction, select)
  t.same(readdirSync(dir).sort(), ['pgdata'], 'the lock is given back')

  // A start still short of room (its recovery writes to the WAL) is told to make room, not to
  // restore a backup over files PostgreSQL recovers once it can write. Before, the backup.
  const short = await storeScript(work, 'again.mjs', '(a start still without room)', `
    const { execFileSync } = await import('node:child_process')
    execFileSync('prlimit', ['--pid', String(process.pid), '--fsize=${walEnd}'])
    await openDb({ dataDir: ${JSON.stringify(dir)}, shortLived: true }).then(() => console.log('opened'), (err) => console.log(err.message))`)
  t.equal(short.code, 0, short.stderr)
  t.match(short.stdout, /^cannot open the embedded store in .*: PostgreSQL could not start on its files: .*File too large\. The data folder's file system is full \(or a disk quota, or the file size limit of ulimit -f, was reached\): make room there and start again, and PostgreSQL recovers its files as after a crash; do not restore a backup over them for this\n$/)
  t.notMatch(short.stdout, 'restore the data folder from a backup')

  // Without the limit, the next start recovers the store: the table made before, nothing of the insert.
  const db = await openDb({ dataDir: dir, shortLived: true })
  t.same(await db.query('SELECT count(*)::int AS n FROM filler'), [{ n: 0 }])
  await db.close()
})

t.test('a FATAL error of PostgreSQL (an idle session timeout set on the store) ends the embedded store as a PANIC does: told as lost, every later call refused, and the next start opens it (found by a review)', async (t) => {
  // Before (found by a review, serve on a store whose postgresql.auto.conf set
  // idle_session_timeout): PostgreSQL, which ends its session on a FATAL, shut down inside PGlite,
  // which then logged "terminating connection because protocol synchronization was lost" without
  // end, its thread spinning a CPU; no call came back and nothing was told, serve ran on, /readyz
  // 'store not answering'. PGlite answers nothing on a FATAL: only its log line tells of it.
  const work = tempDir(t)
  const dir = await seedDataDir(join(work, 'store'))
  // Every wait is bounded (a hang guard, not a timing): before, the store was never told lost, and no call came back.
  const ran = await storeScript(work, 'fatal.mjs', '(a session that meets a FATAL)', `
    const db = await openDb({ dataDir: ${JSON.stringify(dir)}, shortLived: true })
    const guard = () => new Promise((resolve) => setTimeout(() => resolve({ hung: true }), 20_000))
    const lost = new Promise((resolve) => db.onLost((err) => resolve({ lost: err.code, message: err.message })))
    const call = (p) => Promise.race([p.then(() => ({ ok: true }), (err) => ({ code: err.code, message: err.message })), guard()])
    await db.exec('CREATE TABLE kept (n int)')
    await db.query('INSERT INTO kept VALUES (1)')
    // The timeout's FATAL comes with the first call after it passed (PostgreSQL acts on it when a
    // command arrives): a call after a pause longer than it, tried again should the pause have
    // been too short for the store's thread to see it pass.
    await db.exec("SET idle_session_timeout = '1ms'")
    let met = { ok: true }
    for (let i = 0; i < 100 && met.ok; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20))
      met = await call(db.query('SELECT 1'))
    }
    const said = [await Promise.race([lost, guard()]), met]
    said.push(await call(db.query('SELECT 1')))
    said.push(await call(db.transaction((tx) => tx.query('SELECT 1'))))
    said.push(await call(db.close()))
    console.log(JSON.stringify(said))
    process.exit(0)`)
  t.equal(ran.code, 0, ran.stderr)
  const [lost, met, select, transaction, closed] = JSON.parse(ran.stdout) as Array<Record<string, unknown>>
  t.match(lost, { lost: 'store_unavailable', message: /^the embedded store stopped: PostgreSQL stopped on a FATAL error \(terminating connection due to idle-session timeout\); the next start opens the store again$/ }, 'the store is told lost, for serve to stop')
  t.same(met, { code: 'store_unavailable', message: lost?.message }, 'the call that met the FATAL fails with it')
  t.same(select, met, 'a later call is refused at once')
  t.same(transaction, select)
  t.same(closed, { ok: true }, 'and the store closes')
  t.same(readdirSync(dir).sort(), ['pgdata'], 'the lock is given back')

  const db = await openDb({ dataDir: dir, shortLived: true })
  t.same(await db.query('SELECT n FROM kept'), [{ n: 1 }], 'the next start opens the store, with what was committed')
  await db.close()
})
