// The key lifecycle of the `keygate` command on PostgreSQL: migrate, every api-key command, no
// plaintext key in pg_dump's output or any captured log, and the audit format the commands write
// as audit.seal_format says. The api-key commands run through the command line's entry in this
// process (runCliHere), where each in a process of its own cost 0.6 s of CPU:
// test/cli-embedded.test.ts runs the same lifecycle as real processes, and what differs here is
// the store. The commands whose process is the point (migrate, a refusal before the store is
// reached, the stderr of a command that succeeds, serve, an import told of its keygate.yaml) are
// real processes.
import t from 'tap'
import { execFileSync } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import pg from 'pg'
import { encryptionKeyId } from '../core/audit.ts'
import { runCli, runCliHere } from './helpers/cli.ts'
import { ENCRYPTION_KEY, isolated, lifecycle, noPlaintextInOutput, plaintexts, tempDir } from './helpers/cli-lifecycle.ts'
import { freshDatabase } from './helpers/stores.ts'

t.test('key lifecycle on PostgreSQL', async (t) => {
  const url = await freshDatabase(t)
  const cwd = tempDir()
  const missing = await runCli(['api-key', 'list'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.equal(missing.code, 1, 'PostgreSQL without an encryption key is refused')
  t.match(missing.stderr, /KEYGATE_ENCRYPTION_KEY is required with DATABASE_URL/)

  const migrated = await runCli(['migrate', '--json'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.equal(migrated.code, 0, migrated.stderr)
  t.same(migrated.json().store, 'postgres')
  const again = await runCli(['migrate'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.match(again.stdout, /nothing to apply/)

  await lifecycle(t, { cwd, env: isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY }), here: true })

  // Nothing on stderr from a command that succeeded: before, every command on PostgreSQL printed
  // node-postgres's DeprecationWarning (a statement sent on a new connection while the
  // statement_timeout SET was still running; pg 9 refuses that).
  const listed = await runCli(['api-key', 'list', '--json'], { cwd, env: isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY }) })
  t.equal(listed.code, 0)
  t.equal(listed.stderr, '', 'a command that succeeds writes nothing to stderr')

  const dump = execFileSync('pg_dump', ['--data-only', url], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 })
  t.match(dump, /demo-renamed/, 'the dump holds the stored rows')
  for (const p of plaintexts) t.notOk(dump.includes(p), 'no plaintext key in the PostgreSQL dump')

  const down = await runCli(['api-key', 'list'], { cwd, env: isolated({ DATABASE_URL: 'postgres://postgres@127.0.0.1:1/none', KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY }) })
  t.equal(down.code, 1)
  t.match(down.stderr, /cannot reach PostgreSQL at 127\.0\.0\.1:1/)
})

// (On PostgreSQL, with migrations applied by `keygate migrate`, the commands log nothing at all.)
t.test('no captured log or error output holds a plaintext key', async (t) => noPlaintextInOutput(t, { logLines: false }))

t.test('audit.seal_format (KEYGATE_AUDIT_SEAL_FORMAT) decides the format of the rows the command writes', async (t) => {
  const url = await freshDatabase(t)
  const cwd = tempDir()
  const env = (format?: string) => isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, ...(format ? { KEYGATE_AUDIT_SEAL_FORMAT: format } : {}) })
  t.equal((await runCli(['migrate'], { cwd, env: env() })).code, 0)
  const formatOf = async (format?: string): Promise<unknown> => {
    const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', `f${format ?? 'default'}`, '--json'], { env: env(format) })
    t.equal(created.code, 0, created.stderr)
    const id = created.json().id as string
    return execFileSync('psql', [url, '-At', '-c', `SELECT format FROM api_key_audit_log WHERE key_id = '${id}'`], { encoding: 'utf8' }).trim()
  }
  t.equal(await formatOf(), '2', 'format 2 by default')
  t.equal(await formatOf('1'), '1', 'format 1 when set so')
  const bad = await runCliHere(['api-key', 'list'], { env: env('3') })
  t.equal(bad.code, 1, 'an invalid configuration exits 1')
  t.match(bad.stderr, /KEYGATE_AUDIT_SEAL_FORMAT/)
  const listed = await runCliHere(['api-key', 'list', '--json'], { env: env() })
  t.equal(listed.code, 0, 'rows of both formats are read')
})

t.test('a wrong KEYGATE_ENCRYPTION_KEY is refused: the newest audit row names a key that is not configured', async (t) => {
  const url = await freshDatabase(t)
  const cwd = tempDir()
  const keyA = ENCRYPTION_KEY
  const keyB = randomBytes(32).toString('base64')
  const idA = encryptionKeyId(Buffer.from(keyA, 'base64'))
  const idB = encryptionKeyId(Buffer.from(keyB, 'base64'))
  const env = (current: string, previous?: string) => isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: current, KEYGATE_PREVIOUS_ENCRYPTION_KEYS: previous })
  const auditRows = () => execFileSync('psql', [url, '-At', '-c', 'SELECT enc_key_id FROM api_key_audit_log ORDER BY created_at'], { encoding: 'utf8' }).trim().split('\n').filter(Boolean)
  t.equal((await runCli(['migrate'], { cwd, env: env(keyA) })).code, 0)
  // A listing seals nothing: on a new store it passes with any key, and leaves the store's key
  // check to the first start that may seal (test/helpers/key-check.ts, readOnlyCommands).
  const empty = await runCliHere(['api-key', 'list', '--json'], { env: env(keyB) })
  t.equal(empty.code, 0, empty.stderr)

  const create = (name: string, e: Record<string, string | undefined>) => runCliHere(['api-key', 'create', '--type', 'user', '--name', name, '--json'], { env: e })
  const first = await create('sealed-with-a', env(keyA))
  t.equal(first.code, 0, first.stderr)
  plaintexts.push(first.json().key)

  // Before, this succeeded and wrote a row key A's instances list as key_missing, its details lost.
  const wrong = await create('sealed-with-b', env(keyB))
  t.equal(wrong.code, 1, 'a random key is refused')
  t.equal(wrong.json().error.code, 'encryption_key_missing')
  t.match(wrong.json().error.message, `the newest audit row was sealed with encryption key ${idA}, which is not configured (the current key is ${idB}`)
  t.same(auditRows(), [idA], 'and nothing was written')
  const serve = await runCli(['serve', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'], { cwd, env: { ...env(keyB), KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' } })
  t.equal(serve.code, 1, 'serve is refused too')
  t.match(serve.stderr, `sealed with encryption key ${idA}, which is not configured`)

  const rotated = await create('rotated', env(keyB, keyA))
  t.equal(rotated.code, 0, `a rotation (new key current, old one previous) passes: ${rotated.stderr}`)
  plaintexts.push(rotated.json().key)
  t.same(auditRows(), [idA, idB])
  const listed = await runCliHere(['api-key', 'list', '--json'], { env: env(keyB) })
  t.equal(listed.code, 0, `the old key dropped once the newest row is sealed with the new one: ${listed.stderr}`)
  // The old key's rows are key_missing, naming the key to list among the previous ones: before
  // (found by a review), `api-key audit` said only "(key_missing: not opened)", and on the store
  // (no admin log) nothing named the key.
  const trail = await runCliHere(['api-key', 'audit', first.json().id], { env: env(keyB) })
  t.equal(trail.code, 0, trail.stderr)
  t.match(trail.stdout, `(key_missing: sealed with encryption key ${idA}, not configured)`)
  const trailJson = await runCliHere(['api-key', 'audit', first.json().id, '--json'], { env: env(keyB) })
  t.match(trailJson.json().items, [{ integrity: 'key_missing', sealed_with: idA }])
  // Its one row (the refused create wrote none): t.match takes an array as the items it starts with (found by a review).
  t.same(trailJson.json().items.map((i: { action: string }) => i.action), ['key.created'], 'the create, once')
  const stale = await runCliHere(['api-key', 'list', '--json'], { env: env(keyA) })
  t.equal(stale.code, 1, 'the old key alone, after the rotation, is refused')
  t.match(stale.json().error.message, `sealed with encryption key ${idB}`)
  // The README's two-step rotation: an instance still on the first step (old key current, new key
  // among the previous ones) opens what the new key sealed, so it is not refused.
  const firstStep = await runCliHere(['api-key', 'list', '--json'], { env: env(keyA, keyB) })
  t.equal(firstStep.code, 0, `the old key current with the new one previous passes: ${firstStep.stderr}`)
})

t.test('an import whose statement the store cancels says that nothing was imported', async (t) => {
  // Two imports of one file at once: the second waits on the first's rows, and past
  // store.query_timeout_ms PostgreSQL cancels its statement. Before (found by a review), the
  // message said only that, and not that the import had been rolled back. A lock held by this
  // test stands in for the first import (the import's check reads past it, its insert waits).
  const url = await freshDatabase(t)
  const cwd = tempDir()
  const env = isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY })
  t.equal((await runCli(['migrate'], { cwd, env })).code, 0)
  writeFileSync(join(cwd, 'keygate.yaml'), 'store:\n  query_timeout_ms: 200\n')
  writeFileSync(join(cwd, 'keys.jsonl'), JSON.stringify({ key_hash: createHash('sha256').update('a-legacy-key').digest('hex'), name: 'held' }) + '\n')
  const holder = new pg.Client({ connectionString: url })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('BEGIN')
  await holder.query('LOCK TABLE api_keys IN SHARE MODE')
  const held = await runCli(['api-key', 'import', 'keys.jsonl', '--json'], { cwd, env })
  await holder.query('ROLLBACK')
  t.equal(held.code, 1)
  t.match(held.json().error, { code: 'store_unavailable', message: /^nothing imported \(the import was rolled back\): the store \(PostgreSQL at .*\) cancelled the statement \(store\.query_timeout_ms is 200 ms\)/ })
  t.equal((await runCli(['api-key', 'list', '--json'], { cwd, env })).json().items.length, 0, 'and nothing was')
})
