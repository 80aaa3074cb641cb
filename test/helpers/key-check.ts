// The tests of the store's encryption key check (migration 0021, core/audit.ts checkStoreKey),
// written once for both stores, through real `keygate` processes: every instance of a store
// agrees on the encryption key from the first start, and a wrong key is refused at start also
// when the audit log is empty or pruned, while a rotation (new key, old one among the previous
// keys) passes. Before (found by a review), a start read only the newest audit row: on a store
// without one (a new store, starts with KEYGATE_ADMIN_TOKEN set writing none, a log pruned
// whole) any key passed. Run by test/store-key-check-*.test.ts, split so each file's real
// processes (the embedded store's take 3 to 5 s each) stay well within tap's timeout.
import t, { type Test } from 'tap'
import { randomBytes } from 'node:crypto'
import { existsSync, readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import pg from 'pg'
import { AuditCipher, encryptionKeyId } from '../../core/audit.ts'
import { openDb } from '../../core/db.ts'
import { runCli, type CliResult } from './cli.ts'
import { isolated, tempDir } from './cli-lifecycle.ts'
import { seedDataDir } from './pglite-template.ts'
import type { Tap } from './gateway.ts'
import { isolatedEnv, serve, type Served } from './serve.ts'
import { freshDatabase, type StoreKind } from './stores.ts'

const ADMIN_TOKEN = 'an-admin-token-of-32-characters!'
const newKey = (): string => randomBytes(32).toString('base64')
const idOf = (key: string): string => encryptionKeyId(Buffer.from(key, 'base64'))

/** A fresh store of `kind`: how a process is pointed at it, and SQL run on it from this process (the store not in use). */
async function freshStore(t: Tap, kind: StoreKind): Promise<{ where: Record<string, string>; sql: (text: string, params?: unknown[]) => Promise<Array<Record<string, unknown>>> }> {
  if (kind === 'postgres') {
    const url = await freshDatabase(t)
    return {
      where: { DATABASE_URL: url },
      sql: async (text, params = []) => {
        const client = new pg.Client({ connectionString: url })
        await client.connect()
        try {
          return (await client.query(text, params)).rows as Array<Record<string, unknown>>
        } finally {
          await client.end()
        }
      },
    }
  }
  const dir = await seedDataDir(join(tempDir(), 'store'), { migrated: true })
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return {
    where: { KEYGATE_DATA_DIR: dir },
    sql: async (text, params = []) => {
      const db = await openDb({ dataDir: dir, shortLived: true })
      try {
        return await db.query(text, params)
      } finally {
        await db.close()
      }
    },
  }
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
    t.same(await store.sql(`SELECT count(*)::int AS n FROM api_key_audit_log`), [{ n: 0 }], 'no start wrote an audit row: the log is empty')
    t.same(await checkKey(store.sql), idOf(survivor), 'the check names the key of the start that made it')
    const again = await serve(t, { env: env(survivor) })
    t.equal(await again.stop(), 0, 'the first key starts again (before, a row of the other made it refused)')
    const loserKey = survivor === keyA ? keyB : keyA
    const cli = await list({ ...store.where, KEYGATE_ENCRYPTION_KEY: loserKey })
    t.equal(cli.code, 1, 'a command with the other key is refused too')
    t.equal(cli.json().error.code, 'encryption_key_missing')
  })
}

/** A pruned log, and a store upgraded with only webhook secrets sealed. */
export function prunedLog(kind: StoreKind): void {
  t.test(`${kind}: a wrong key on a pruned log is refused, also on a store upgraded with nothing but webhook secrets sealed`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB] = [newKey(), newKey()]
    const env = (key: string) => ({ ...store.where, KEYGATE_ENCRYPTION_KEY: key })
    const created = await runCli(['api-key', 'create', '--type', 'user', '--name', 'a', '--json'], { env: isolated(env(keyA)) })
    t.equal(created.code, 0, created.stderr)
    // A webhook whose secret is sealed with key A, and the log's retention pruning every row.
    const sealed = new AuditCipher(Buffer.from(keyA, 'base64')).sealSecret('webhook wh_1', 'whsec_secret')
    await store.sql(`INSERT INTO webhooks (id, url, events, sealed_secret, created_by) VALUES ('wh_1', 'https://example.com/hook', '{key.created}', $1, 'test')`, [sealed])
    await store.sql('DELETE FROM api_key_audit_log')
    const pruned = await list(env(keyB))
    t.equal(pruned.code, 1, 'a wrong key on a pruned log is refused (before, it passed)')
    t.match(pruned.json().error, { code: 'encryption_key_missing', message: `the store's encryption key check (table encryption_key_check) was sealed with encryption key ${idOf(keyA)}` })

    // A store upgraded from a keygate without the check, whose log was pruned: what it holds
    // sealed (the webhook secret) decides.
    await store.sql('DELETE FROM encryption_key_check')
    const upgraded = await list(env(keyB))
    t.equal(upgraded.code, 1, 'a wrong key on an upgraded store holding only webhook secrets is refused')
    t.match(upgraded.json().error, { code: 'encryption_key_missing', message: `the audit log is empty, and the webhook secrets are sealed with encryption key ${idOf(keyA)}` })
    t.same(await store.sql('SELECT * FROM encryption_key_check'), [], 'and it made no check')
    const right = await list(env(keyA))
    t.equal(right.code, 0, right.stderr)
    t.same(await store.sql('SELECT * FROM encryption_key_check'), [], 'a listing makes no check (readOnlyCommands)')
    await start(t, env(keyA))
    t.equal(await checkKey(store.sql), idOf(keyA), 'the right key makes the check')
  })
}

/** An existing deployment upgraded. */
export function upgraded(kind: StoreKind): void {
  t.test(`${kind}: an existing deployment upgraded: the check is made from what the store holds`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB, keyC] = [newKey(), newKey(), newKey()]
    const env = (key: string, previous?: string) => ({ ...store.where, KEYGATE_ENCRYPTION_KEY: key, KEYGATE_PREVIOUS_ENCRYPTION_KEYS: previous })
    const created = await runCli(['api-key', 'create', '--type', 'user', '--name', 'a', '--json'], { env: isolated(env(keyA)) })
    t.equal(created.code, 0, created.stderr)
    // As a store migrated to 0021 by an upgrade finds it: rows, and no check yet.
    await store.sql('DELETE FROM encryption_key_check')
    const wrong = await list(env(keyB))
    t.equal(wrong.code, 1, 'a wrong key is refused (by the newest row)')
    t.same(await store.sql('SELECT * FROM encryption_key_check'), [], 'and makes no check')
    await start(t, env(keyC, keyA))
    t.equal(await checkKey(store.sql), idOf(keyC), 'a rotation passes, and makes the check under its current key')
    await store.sql('DELETE FROM encryption_key_check')
    await start(t, env(keyA))
    t.equal(await checkKey(store.sql), idOf(keyA), 'the key the rows were sealed with passes')
    t.equal((await list(env(keyA))).code, 0, 'and again')
  })
}

/** A rotation. */
export function rotation(kind: StoreKind): void {
  t.test(`${kind}: a rotation (new key current, old one previous) passes, and the old key alone is refused after it`, async (t) => {
    const store = await freshStore(t, kind)
    const [keyA, keyB] = [newKey(), newKey()]
    const env = (key: string, previous?: string) => ({ ...store.where, KEYGATE_ENCRYPTION_KEY: key, KEYGATE_PREVIOUS_ENCRYPTION_KEYS: previous })
    await start(t, env(keyA))
    t.equal(await checkKey(store.sql), idOf(keyA))
    // The README's two-step rotation: the new key among the previous ones first, then current.
    const firstStep = await list(env(keyA, keyB))
    t.equal(firstStep.code, 0, firstStep.stderr)
    t.equal(await checkKey(store.sql), idOf(keyA), 'the first step leaves the check as it was')
    await start(t, env(keyB, keyA))
    t.equal(await checkKey(store.sql), idOf(keyB), 'a rotation passes, and seals the check under the new key')
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
    await start(t, env(keyA))
    t.equal(await checkKey(store.sql), idOf(keyA), 'the first instance makes it')
    t.equal((await list(env(mistyped))).code, 1, 'the mistyped key is refused from then on')
    // The README's two-step rotation, its second step done: the instances run with B, A previous.
    await start(t, env(keyB, keyA))
    t.equal(await checkKey(store.sql), idOf(keyB))
    const stale = await list(env(keyA, keyB))
    t.equal(stale.code, 0, `a shell still on the first step lists: ${stale.stderr}`)
    t.equal(await checkKey(store.sql), idOf(keyB), 'and leaves the check with the new key: before, it sealed it back with the old one, and instances that then dropped the old key were refused')
    await start(t, env(keyB))
  })
}

/** The embedded store's generated key file. */
export function lostKeyFile(): void {
  t.test('embedded: a lost key file that sealed nothing but the check is replaced, with a warning; another configured key is refused', async (t) => {
    const store = await freshStore(t, 'embedded')
    const dir = store.where.KEYGATE_DATA_DIR as string
    const file = join(dir, 'encryption.key')
    t.equal((await list(store.where)).code, 0, 'the first start generates a key')
    const generated = await checkKey(store.sql)
    t.ok(existsSync(file))
    await start(t, { ...store.where, KEYGATE_ENCRYPTION_KEY: newKey() })
    t.not(await checkKey(store.sql), generated, 'a configured key takes over from the generated one (which stays a previous key): the check is sealed with it')
    const other = newKey()
    const refused = await list({ ...store.where, KEYGATE_ENCRYPTION_KEY: other })
    t.equal(refused.code, 1, 'another configured key is refused on an empty log')
    t.equal(refused.json().error.code, 'encryption_key_missing')
    rmSync(file)
    const regenerated = await list(store.where)
    t.equal(regenerated.code, 0, `with nothing sealed but the check, a new key is generated, as before the check: ${regenerated.stderr}`)
    t.match(regenerated.stderr + regenerated.stdout, /the store's encryption key check was sealed with encryption key \w+, which is not configured \(the key file was lost, or KEYGATE_ENCRYPTION_KEY left out\); nothing else/)
    t.equal(await checkKey(store.sql), encryptionKeyId(Buffer.from(readFileSync(file, 'utf8').trim(), 'base64')))
  })
}

function list(env: Record<string, string | undefined>): Promise<CliResult> {
  return runCli(['api-key', 'list', '--json'], { env: isolated(env) })
}

/**
 * `serve` started (with the admin token, so it writes no audit row) and stopped: a start that
 * makes the check or seals it anew, which a command that changes nothing (list) does not.
 */
async function start(t: Test, env: Record<string, string | undefined>): Promise<void> {
  const served = await serve(t, { env: isolatedEnv({ ...env, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN }) })
  t.equal(await served.stop(), 0)
}

/** The key id the store's check was sealed with. */
async function checkKey(sql: (text: string) => Promise<Array<Record<string, unknown>>>): Promise<unknown> {
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
