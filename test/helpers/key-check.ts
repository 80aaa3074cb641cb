// The tests of the store's encryption key check (migration 0021, core/audit.ts checkStoreKey),
// written once for both stores: every instance of a store agrees on the encryption key from the
// first start, and a wrong key is refused at start also when the audit log is empty or pruned,
// while a rotation (new key, old one among the previous keys) passes. Before (found by a review),
// a start read only the newest audit row: on a store without one (a new store, starts with
// KEYGATE_ADMIN_TOKEN set writing none, a log pruned whole) any key passed. Run by
// test/store-key-check-*.test.ts, split so that each file stays well within tap's timeout.
//
// Real `keygate serve` processes where the process is part of the claim: two first starts (one
// refused, as serve tells it), a rolling restart of several instances, a start on the embedded
// store's generated key file; and a real `keygate api-key list` refused. Elsewhere a start is what
// `serve` does to the store as it starts (cli/serve.ts: the runtime opened without `readOnly`),
// and a command the CLI's own entry (runCliHere), in this process: a process costs 1 to 2 s of
// CPU on the embedded store, and these files started some 45 of them.
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { existsSync, readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import pg from 'pg'
import { AuditCipher, encryptionKeyId } from '../../core/audit.ts'
import { openDb } from '../../core/db.ts'
import { silentLogger } from '../../core/log.ts'
import { openRuntime } from '../../core/runtime.ts'
import { loadConfig } from '../../config/load.ts'
import { childEnv, runCli, runCliHere, type CliResult } from './cli.ts'
import { isolated, tempDir } from './cli-lifecycle.ts'
import { seedDataDir } from './pglite-template.ts'
import type { Tap } from './gateway.ts'
import { isolatedEnv, serve, type Served } from './serve.ts'
import { freshDatabase, type StoreKind } from './stores.ts'

const ADMIN_TOKEN = 'an-admin-token-of-32-characters!'
const newKey = (): string => randomBytes(32).toString('base64')
const idOf = (key: string): string => encryptionKeyId(Buffer.from(key, 'base64'))

type Rows = Array<Record<string, unknown>>
type Sql = (text: string, params?: unknown[]) => Promise<Rows>

/**
 * A fresh store of `kind`: how a process is pointed at it, and SQL run on it from this process
 * while nothing else has it open: `sql` one statement, `session` several in one opening (an
 * opening of the embedded store costs about 0.8 s of CPU).
 */
async function freshStore(t: Tap, kind: StoreKind): Promise<{ where: Record<string, string>; sql: Sql; session: <T>(work: (sql: Sql) => Promise<T>) => Promise<T> }> {
  let session: <T>(work: (sql: Sql) => Promise<T>) => Promise<T>
  let where: Record<string, string>
  if (kind === 'postgres') {
    const url = await freshDatabase(t)
    where = { DATABASE_URL: url }
    session = async (work) => {
      const client = new pg.Client({ connectionString: url })
      await client.connect()
      try {
        return await work(async (text, params = []) => (await client.query(text, params)).rows as Rows)
      } finally {
        await client.end()
      }
    }
  } else {
    const dir = await seedDataDir(join(tempDir(), 'store'), { migrated: true })
    t.teardown(() => rmSync(dir, { recursive: true, force: true }))
    where = { KEYGATE_DATA_DIR: dir }
    session = async (work) => {
      const db = await openDb({ dataDir: dir, shortLived: true })
      try {
        return await work((text, params = []) => db.query(text, params))
      } finally {
        await db.close()
      }
    }
  }
  return { where, session, sql: (text, params) => session((sql) => sql(text, params)) }
}

/** Two first starts with different keys. */
export function twoFirstStarts(kind: StoreKind): void {
  t.test(`${kind}: two first starts with different keys: the second is refused, and the first is not at its restart`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB] = [newKey(), newKey()]
    const env = (key: string) => isolatedEnv({ ...store.where, KEYGATE_ENCRYPTION_KEY: key, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN })
    let survivor: string
    if (kind === 'postgres') {
      // Both at once, each with the admin token (so neither writes an audit row): one makes the
      // check, and the other is checked against it.
      const started = await Promise.all([keyA, keyB].map(async (key) => ({ key, served: await serveOrExit(t, env(key)) })))
      const refused = started.filter((s) => typeof s.served === 'string')
      t.equal(refused.length, 1, 'of two first starts with different keys, one is refused')
      const winner = started.find((s) => typeof s.served !== 'string')
      survivor = winner?.key ?? keyA
      const loser = refused[0]
      if (loser) t.match(loser.served, `the store's encryption key check (table encryption_key_check) was sealed with encryption key ${idOf(survivor)}, which is not configured (the current key is ${idOf(loser.key)}`)
      if (winner && typeof winner.served !== 'string') t.equal(await winner.served.stop(), 0)
    } else {
      const first = await serve(t, { env: env(keyA) })
      t.equal(await first.stop(), 0)
      survivor = keyA
      const second = await serveOrExit(t, env(keyB))
      t.match(second, `the store's encryption key check (table encryption_key_check) was sealed with encryption key ${idOf(keyA)}`, 'a second start with another key is refused')
    }
    await store.session(async (sql) => {
      t.same(await sql(`SELECT count(*)::int AS n FROM api_key_audit_log`), [{ n: 0 }], 'no start wrote an audit row: the log is empty')
      t.same(await checkKey(sql), idOf(survivor), 'the check names the key of the start that made it')
    })
    t.equal(await start(env(survivor)), idOf(survivor), 'the first key starts again (before, a row of the other made it refused)')
    const loserKey = survivor === keyA ? keyB : keyA
    const cli = await runCli(['api-key', 'list', '--json'], { env: isolated({ ...store.where, KEYGATE_ENCRYPTION_KEY: loserKey }) })
    t.equal(cli.code, 1, 'a command (a real process) with the other key is refused too')
    t.equal(cli.json().error.code, 'encryption_key_missing')
  })
}

/** A pruned log, and a store upgraded with only webhook secrets sealed. */
export function prunedLog(kind: StoreKind): void {
  t.test(`${kind}: a wrong key on a pruned log is refused, also on a store upgraded with nothing but webhook secrets sealed`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB] = [newKey(), newKey()]
    const env = (key: string) => ({ ...store.where, KEYGATE_ENCRYPTION_KEY: key })
    const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'a', '--json'], { env: isolated(env(keyA)) })
    t.equal(created.code, 0, created.stderr)
    // A webhook whose secret is sealed with key A, and the log's retention pruning every row.
    const sealed = new AuditCipher(Buffer.from(keyA, 'base64')).sealSecret('webhook wh_1', 'whsec_secret')
    await store.session(async (sql) => {
      await sql(`INSERT INTO webhooks (id, url, events, sealed_secret, created_by) VALUES ('wh_1', 'https://example.com/hook', '{key.created}', $1, 'test')`, [sealed])
      await sql('DELETE FROM api_key_audit_log')
    })
    const pruned = await list(env(keyB))
    t.equal(pruned.code, 1, 'a wrong key on a pruned log is refused (before, it passed)')
    t.match(pruned.json().error, { code: 'encryption_key_missing', message: `the store's encryption key check (table encryption_key_check) was sealed with encryption key ${idOf(keyA)}` })

    // A store upgraded from a keygate without the check, whose log was pruned: what it holds
    // sealed (the webhook secret) decides.
    await store.sql('DELETE FROM encryption_key_check')
    const upgraded = await list(env(keyB))
    t.equal(upgraded.code, 1, 'a wrong key on an upgraded store holding only webhook secrets is refused')
    t.match(upgraded.json().error, { code: 'encryption_key_missing', message: `the audit log is empty, and the webhook secrets are sealed with encryption key ${idOf(keyA)}` })
    const right = await list(env(keyA))
    t.equal(right.code, 0, right.stderr)
    t.same(await store.sql('SELECT * FROM encryption_key_check'), [], 'neither the refused listing nor the right one made a check (readOnlyCommands)')
    t.equal(await start(env(keyA)), idOf(keyA), 'the right key makes the check')
  })
}

/** An existing deployment upgraded. */
export function upgraded(kind: StoreKind): void {
  t.test(`${kind}: an existing deployment upgraded: the check is made from what the store holds`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB, keyC] = [newKey(), newKey(), newKey()]
    const env = (key: string, previous?: string) => ({ ...store.where, KEYGATE_ENCRYPTION_KEY: key, KEYGATE_PREVIOUS_ENCRYPTION_KEYS: previous })
    const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'a', '--json'], { env: isolated(env(keyA)) })
    t.equal(created.code, 0, created.stderr)
    // As a store migrated to 0021 by an upgrade finds it: rows, and no check yet.
    await store.sql('DELETE FROM encryption_key_check')
    const wrong = await list(env(keyB))
    t.equal(wrong.code, 1, 'a wrong key is refused (by the newest row)')
    t.same(await store.sql('SELECT * FROM encryption_key_check'), [], 'and makes no check')
    t.equal(await start(env(keyC, keyA)), idOf(keyC), 'a rotation passes, and makes the check under its current key')
    await store.sql('DELETE FROM encryption_key_check')
    t.equal(await start(env(keyA)), idOf(keyA), 'the key the rows were sealed with passes')
    t.equal((await list(env(keyA))).code, 0, 'and again')
  })
}

/** A rotation. */
export function rotation(kind: StoreKind): void {
  t.test(`${kind}: a rotation (new key current, old one previous) passes, and the old key alone is refused after it`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB] = [newKey(), newKey()]
    const env = (key: string, previous?: string) => ({ ...store.where, KEYGATE_ENCRYPTION_KEY: key, KEYGATE_PREVIOUS_ENCRYPTION_KEYS: previous })
    t.equal(await start(env(keyA)), idOf(keyA))
    // The README's two-step rotation: the new key among the previous ones first, then current.
    const firstStep = await list(env(keyA, keyB))
    t.equal(firstStep.code, 0, firstStep.stderr)
    t.equal(await checkKey(store.sql), idOf(keyA), 'the first step leaves the check as it was')
    t.equal(await start(env(keyB, keyA)), idOf(keyB), 'a rotation passes, and seals the check under the new key')
    const stillFirst = await list(env(keyA, keyB))
    t.equal(stillFirst.code, 0, `a process still on the first step passes: ${stillFirst.stderr}`)
    t.equal((await list(env(keyB, keyA))).code, 0)
    const dropped = await list(env(keyB))
    t.equal(dropped.code, 0, `the old key dropped, on a log with no rows: ${dropped.stderr}`)
    const stale = await list(env(keyA))
    t.equal(stale.code, 1, 'the old key alone is refused')
    t.match(stale.json().error, { code: 'encryption_key_missing', message: `sealed with encryption key ${idOf(keyB)}, which is not configured (the current key is ${idOf(keyA)}` })
  })
}

/** A rolling restart onto a new key (PostgreSQL: several instances at once). */
export function rollingRestart(): void {
  t.test('postgres: a rolling restart onto a new key: running instances on the old one are not stopped, and restart onto the new one', async (t) => {
    const store = await freshStore(t, 'postgres')
    const [keyA, keyB] = [newKey(), newKey()]
    const env = (key: string, previous?: string) => isolatedEnv({ ...store.where, KEYGATE_ENCRYPTION_KEY: key, KEYGATE_PREVIOUS_ENCRYPTION_KEYS: previous, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN })
    const one = await serve(t, { env: env(keyA) })
    const two = await serve(t, { env: env(keyA) })
    t.equal(await two.stop(), 0)
    const twoNew = await serve(t, { env: env(keyB, keyA) })
    t.equal(await checkKey(store.sql), idOf(keyB))
    t.equal(await one.stop(), 0, 'the instance still on the old key ran on until stopped')
    const oneNew = await serve(t, { env: env(keyB, keyA) })
    t.equal(await oneNew.stop(), 0)
    t.equal(await twoNew.stop(), 0)
  })
}

/** Commands that change nothing, on a new store and after a rotation. */
export function readOnlyCommands(kind: StoreKind): void {
  t.test(`${kind}: a command that changes nothing neither makes the check nor seals it anew: a mistyped or stale key there locks out no instance`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB, mistyped] = [newKey(), newKey(), newKey()]
    const env = (key: string, previous?: string) => ({ ...store.where, KEYGATE_ENCRYPTION_KEY: key, KEYGATE_PREVIOUS_ENCRYPTION_KEYS: previous })
    // An operator lists the keys of a new store, the key mistyped, before any instance started.
    const listed = await list(env(mistyped))
    t.equal(listed.code, 0, `nothing is sealed yet, so nothing is refused: ${listed.stderr}`)
    t.same(await store.sql('SELECT * FROM encryption_key_check'), [], 'and the listing made no check: before (found by a review), it sealed it with the mistyped key, and every instance with the right one was refused')
    t.equal(await start(env(keyA)), idOf(keyA), 'the first instance makes it')
    t.equal((await list(env(mistyped))).code, 1, 'the mistyped key is refused from then on')
    // The README's two-step rotation, its second step done: the instances run with B, A previous.
    t.equal(await start(env(keyB, keyA)), idOf(keyB))
    const stale = await list(env(keyA, keyB))
    t.equal(stale.code, 0, `a shell still on the first step lists: ${stale.stderr}`)
    t.equal(await start(env(keyB)), idOf(keyB), 'and leaves the check with the new key (an instance that then dropped the old key starts): before, it sealed it back with the old one, and such instances were refused')
  })
}

/** The embedded store's generated key file. */
export function lostKeyFile(): void {
  t.test('embedded: a lost key file that sealed nothing but the check is replaced, with a warning; another configured key is refused', async (t) => {
    const store = await freshStore(t, 'embedded')
    const dir = store.where.KEYGATE_DATA_DIR as string
    const file = join(dir, 'encryption.key')
    t.equal((await runCli(['api-key', 'list', '--json'], { env: isolated(store.where) })).code, 0, 'the first start (a real process) generates a key')
    const generated = await checkKey(store.sql)
    t.ok(existsSync(file))
    const configured = newKey()
    t.equal(await start({ ...store.where, KEYGATE_ENCRYPTION_KEY: configured }), idOf(configured), 'a configured key takes over from the generated one (which stays a previous key): the check is sealed with it')
    t.equal(generated, encryptionKeyId(Buffer.from(readFileSync(file, 'utf8').trim(), 'base64')), 'the first start sealed the check with the generated key')
    const other = newKey()
    const refused = await list({ ...store.where, KEYGATE_ENCRYPTION_KEY: other })
    t.equal(refused.code, 1, 'another configured key is refused on an empty log')
    const { code, message } = refused.json().error
    t.equal(code, 'encryption_key_missing')
    // An embedded store is one process's: before (found by a review), the refusal gave
    // PostgreSQL's advice, the key "the store's other instances use".
    t.match(message, `sealed with encryption key ${idOf(configured)}, which is not configured (the current key is ${idOf(other)}, from KEYGATE_ENCRYPTION_KEY, and neither KEYGATE_PREVIOUS_ENCRYPTION_KEYS nor the embedded store's key file holds ${idOf(configured)})`)
    t.match(message, `set KEYGATE_ENCRYPTION_KEY to the key this store was started with (${idOf(configured)}) again, or, when rotating, list that key in KEYGATE_PREVIOUS_ENCRYPTION_KEYS`)
    t.notMatch(message, /other instances/, 'an embedded store has no other instances')
    rmSync(file)
    const regenerated = await list(store.where)
    t.equal(regenerated.code, 0, `with nothing sealed but the check, a new key is generated, as before the check: ${regenerated.stderr}`)
    t.match(regenerated.stderr + regenerated.stdout, /the store's encryption key check was sealed with encryption key \w+, which is not configured \(the key file was lost, or KEYGATE_ENCRYPTION_KEY left out\); nothing else/)
    t.equal(await checkKey(store.sql), encryptionKeyId(Buffer.from(readFileSync(file, 'utf8').trim(), 'base64')))
  })
}

/** The embedded store's key file in use where another key sealed the check. */
export function keyFileRefused(): void {
  t.test("embedded: the key file's key refused where a configured key sealed the check: the refusal names the file, not other instances", async (t) => {
    const store = await freshStore(t, 'embedded')
    const file = join(store.where.KEYGATE_DATA_DIR as string, 'encryption.key')
    const generated = await start(store.where)
    t.ok(existsSync(file), 'the first start generates the key file')
    const configured = newKey()
    t.equal(await start({ ...store.where, KEYGATE_ENCRYPTION_KEY: configured }), idOf(configured), 'a start with a configured key seals the check with it')
    // KEYGATE_ENCRYPTION_KEY left out of the next start (the service's environment file lost it):
    // the key file's key is current, and the check names the configured one.
    const refused = await list(store.where)
    t.equal(refused.code, 1)
    const { code, message } = refused.json().error
    t.equal(code, 'encryption_key_missing')
    t.match(message, `sealed with encryption key ${idOf(configured)}, which is not configured (the current key is ${generated}, from the embedded store's key file ${file}`)
    t.match(message, `set KEYGATE_ENCRYPTION_KEY to the key this store was started with (${idOf(configured)}) again`)
    t.notMatch(message, /other instances/, "an embedded store has no other instances (before, the advice was PostgreSQL's)")
  })
}

/** `keygate api-key list --json`, a command that changes nothing, through the CLI's entry in this process. */
function list(env: Record<string, string | undefined>): Promise<CliResult> {
  return runCliHere(['api-key', 'list', '--json'], { env: isolated(env) })
}

/**
 * What `serve` does to the store as it starts (cli/serve.ts: the runtime opened without
 * `readOnly`, which makes the check or seals it anew, as a command that changes nothing does not),
 * with the admin token set so that it writes no audit row; then the key id the check is sealed
 * with, read in the same opening. Throws as serve's start would be refused.
 */
async function start(env: Record<string, string | undefined>): Promise<unknown> {
  const config = loadConfig({ env: childEnv(isolatedEnv({ ...env, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN, KEYGATE_EMBEDDED_SHARED_BUFFERS_MB: '16' })) })
  const runtime = await openRuntime(config, silentLogger, { waitForStore: true })
  try {
    return await checkKey((text) => runtime.db.query(text))
  } finally {
    await runtime.close()
  }
}

/** The key id the store's check was sealed with. */
async function checkKey(sql: (text: string) => Promise<Rows>): Promise<unknown> {
  return (await sql(`SELECT split_part(sealed, '.', 1) AS id FROM encryption_key_check`))[0]?.id
}

/** A `serve` that serves, or what it said as it exited before it listened. */
async function serveOrExit(t: Tap, env: Record<string, string | undefined>): Promise<Served | string> {
  try {
    return await serve(t, { env })
  } catch (err) {
    return (err as Error).message
  }
}
