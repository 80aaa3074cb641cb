// `keygate serve` as a real process whose start waits on PostgreSQL: another instance's migration
// lock, a table lock or an operator's lock on keygate_migrations that a lock_timeout keeps cutting,
// a deadlock PostgreSQL breaks; each waited through with one warning, and a stop signal during the
// wait ending the start at once. (Split from test/admin-serve.test.ts, so that they run side by side.)
import t from 'tap'
import type { Test } from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import pg from 'pg'
import { MIGRATION_LOCK_ID, readMigrations } from '../core/migrate.ts'
import { isolatedEnv, serve as startKeygate, type LogLine, type Served } from './helpers/serve.ts'
import { call, type Tap } from './helpers/gateway.ts'
import { deadlockingMigrations, freshDatabase, holdMigrationLock, lockTable, migratedBelow, migratedDatabase, ownSession, setOnDatabase } from './helpers/stores.ts'
import { scratchDir } from './helpers/scratch.ts'

const ENCRYPTION_KEY = Buffer.alloc(32, 9).toString('base64')
const ADMIN_TOKEN = 'an-admin-token-of-32-characters!'

t.test('a stop signal while the start waits on the store (another instance migrating) ends it at once, exit 0', async (t) => {
  // Before (found by a review): the signal was swallowed; once the other migration was done the
  // process bound its listeners and served, and systemctl stop ended in SIGKILL.
  const url = await freshDatabase(t)
  const migrating = await holdMigrationLock(t, url, 'another-keygate')
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const serve = await startKeygate(t, { args: ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', 'http://127.0.0.1:9'], env, waitFor: { gateway: false, admin: false } })
  // Waiting on the migration lock: seen in PostgreSQL, not guessed from time.
  for (let waiting = false; !waiting; ) {
    const { rows } = await migrating.query(`SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1`, [MIGRATION_LOCK_ID])
    waiting = rows.length > 0
    if (!waiting) await new Promise((r) => setTimeout(r, 50))
  }
  await stopsWhileWaiting(t, serve)
})

/** A `serve` started on the database at `url` (auto_migrate on, unless `extra`, more of its environment, says otherwise), returned once it has logged `waits` (a wait for a lock a lock_timeout cut). */
async function serveWaiting(t: Tap, url: string, waits: (l: LogLine) => boolean, extra: Record<string, string> = {}) {
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN, ...extra })
  const serve = await startKeygate(t, { args: ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', 'http://127.0.0.1:9'], env, waitFor: { gateway: false, admin: false } })
  return { serve, warned: await serve.waitForLog(waits) }
}

/**
 * A `serve` started while another session (another keygate migrating) holds the migration lock,
 * the database's lock_timeout 200 ms: returned once the start has logged that it waits, a wait cut
 * by that lock_timeout already behind it.
 */
async function serveWaitingOnLockTimeout(t: Tap) {
  const url = await freshDatabase(t)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const migrating = await holdMigrationLock(t, url, 'another-keygate')
  const waits = (l: LogLine) => l.level === 'warn' && /migration lock/.test(l.message)
  return { migrating, waits, ...(await serveWaiting(t, url, waits)) }
}

/**
 * A `serve` started on a database an earlier keygate migrated (up to 0022), the database's
 * lock_timeout 200 ms, while another session's open transaction (a keygate not upgraded yet
 * reading keys) holds n8n_api_keys, which migration 0023 alters: returned once the start has
 * logged that it waits, a migration cut by that lock_timeout already behind it. `observer`: a
 * session of the test's, outside that transaction (in which pg_stat_activity stays as first read).
 */
async function serveWaitingOnTableLock(t: Tap) {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const reader = await lockTable(t, url, 'n8n_api_keys', 'ACCESS SHARE', 'keygate-before')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /table lock/.test(l.message)
  return { reader, observer, waits, ...(await serveWaiting(t, url, waits)) }
}

/**
 * The waiting start (serveWaiting) tries again, more than once: `tries` transactions of its own
 * seen waiting in PostgreSQL (`waiting`: their xact_start, as `observer` sees them), each after
 * the first cut (which was before the warning); once `release` frees the lock, it migrates and
 * serves, having said the wait once.
 */
async function waitsThenServes(t: Test, serve: Served, waits: (l: LogLine) => boolean, observer: pg.Client, waiting: pg.QueryConfig, release: () => Promise<unknown>, tries = 3) {
  const seen = new Set<string>()
  // A hang guard, not a latency bound: a serve that stopped trying fails here, not at tap's timeout.
  const giveUp = Date.now() + 60_000
  while (seen.size < tries && serve.child.exitCode === null && Date.now() < giveUp) {
    const { rows } = await observer.query<{ xact_start: string }>(waiting)
    for (const r of rows) seen.add(r.xact_start)
    if (seen.size < tries) await new Promise((r) => setTimeout(r, 50))
  }
  t.equal(seen.size, tries, `${tries} tries seen waiting, each in a transaction of its own`)
  t.equal(serve.child.exitCode, null, 'still running')
  await release()
  const admin = `http://${(await serve.waitForLog((l) => l.message === 'admin listening')).address as string}`
  await serve.waitForLog((l) => l.message === 'gateway listening')
  t.equal((await call(`${admin}/readyz`)).status, 200, 'ready once the lock is free')
  const { rows } = await observer.query<{ n: number }>('SELECT count(*)::int AS n FROM keygate_migrations')
  t.equal(rows[0]?.n, readMigrations().length, 'and migrated')
  t.equal(serve.logs.filter(waits).length, 1, 'the wait is said once')
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
}

/** A stop signal to a start that waits (for the store, a lock) ends it at once, exit 0. */
async function stopsWhileWaiting(t: Test, serve: Served) {
  serve.child.kill('SIGTERM')
  const code = await Promise.race([serve.exited, new Promise<string>((r) => setTimeout(() => r('still running after 30 s'), 30_000).unref())])
  t.equal(code, 0, 'exit 0')
  t.ok(serve.logs.some((l) => l.message === 'stopped during start-up, before serving' && l.signal === 'SIGTERM'), 'says so')
  t.notOk(serve.logs.some((l) => /listening$/.test(l.message)), 'and never listened')
}

// Before (found by a review): with a lock_timeout set on keygate's role or database (common on
// managed PostgreSQL), a `serve` starting while another instance migrated exited 1 once the
// lock_timeout cut its wait for the migration lock: in a rolling start of many instances, all but
// the migrating one, until a service manager restarted them.
t.test("a start whose wait for the migration lock the role's or database's lock_timeout cuts keeps waiting, says so once, and serves once the lock is free", async (t) => {
  const { migrating, serve, waits, warned } = await serveWaitingOnLockTimeout(t)
  t.match(warned.message, /waiting for keygate's migration lock, held by another session/, 'says what it waits for')
  t.match(warned.message, /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/, 'and what cut a wait')
  t.match(warned, { lock_timeout: '200ms', holder: /PostgreSQL pid \d+, application "another-keygate"/ }, 'naming the lock_timeout and the session that holds the lock')
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objid = $1`, values: [MIGRATION_LOCK_ID] }
  await waitsThenServes(t, serve, waits, migrating, waiting, () => migrating.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK_ID]))
})

t.test('a stop signal while the start waits on a migration lock that the lock_timeout keeps cutting ends it at once, exit 0', async (t) => {
  await stopsWhileWaiting(t, (await serveWaitingOnLockTimeout(t)).serve)
})

// Before (found by a review): once the migration lock was taken, a migration's own statement
// whose wait for a table lock the role's or database's lock_timeout cut (during a rolling
// upgrade, an instance not upgraded yet in a transaction on that table) ended the start, exit 1,
// with "migration ... failed: canceling statement due to lock timeout", as for a broken file.
t.test("a start whose migration's wait for a table lock the role's or database's lock_timeout cuts tries the migrations again, says so once, and serves once the table is free", async (t) => {
  const { reader, observer, serve, waits, warned } = await serveWaitingOnTableLock(t)
  t.match(warned.message, /waiting for a table lock that migration 0023_n8n_key_scopes_enforced\.sql needs, held by another session/, 'says what it waits for')
  t.match(warned.message, /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/, 'and what cut a wait')
  t.match(warned, { lock_timeout: '200ms', migration: '0023_n8n_key_scopes_enforced.sql', holder: new RegExp(`ACCESS SHARE on n8n_api_keys \\(PostgreSQL pid ${reader.pid}, application "keygate-before"`) }, 'naming the lock_timeout, the file and the session that holds the table')
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => reader.client.query('ROLLBACK'))
})

t.test("a stop signal while the start's migrations wait on a table lock that the lock_timeout keeps cutting ends it at once, exit 0", async (t) => {
  await stopsWhileWaiting(t, (await serveWaitingOnTableLock(t)).serve)
})

// Before (found by a review): once the migration lock was taken, keygate's read of
// keygate_migrations waited for an operator's lock on it (LOCK TABLE, VACUUM FULL), the
// role's or database's lock_timeout cut the wait, and the start ended, exit 1, with "unexpected
// error: canceling statement due to lock timeout", as for a bug.
t.test("a start whose wait for keygate_migrations, held by an operator, the role's or database's lock_timeout cuts tries the migrations again, says so once, and serves once the table is free", async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const operator = await lockTable(t, url, 'keygate_migrations', 'ACCESS EXCLUSIVE', 'operator')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /keygate_migrations/.test(l.message)
  const { serve, warned } = await serveWaiting(t, url, waits)
  t.match(warned.message, /^waiting for a lock on keygate_migrations, the table of applied migrations, that another session holds or is queued for/, 'says what it waits for')
  t.match(warned.message, /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/, 'and what cut a wait')
  t.match(warned, { lock_timeout: '200ms', table: 'keygate_migrations', holder: new RegExp(`ACCESS EXCLUSIVE on keygate_migrations \\(PostgreSQL pid ${operator.pid}, application "operator"`) }, 'naming the lock_timeout, the table and the session that holds it')
  t.notOk('migration' in warned, 'and no file')
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'keygate_migrations'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => operator.client.query('ROLLBACK'))
})

/**
 * A `serve` started with store.auto_migrate off (store.query_timeout_ms 500) on a migrated
 * database whose keygate_migrations an operator's open transaction holds (ACCESS EXCLUSIVE), with
 * `lockTimeout` on the database if given: returned once the start has logged that its read of the
 * table waits, a cut of that read behind it. `observer`: a session of the test's.
 */
async function serveWaitingOnRecords(t: Tap, lockTimeout?: string) {
  const { url } = await migratedDatabase(t)
  if (lockTimeout) await setOnDatabase(url, 'lock_timeout', lockTimeout)
  const cwd = scratchDir('keygate-records-held-')
  writeFileSync(join(cwd, 'keygate.yaml'), 'store:\n  auto_migrate: false\n  query_timeout_ms: 500\n')
  const operator = await lockTable(t, url, 'keygate_migrations', 'ACCESS EXCLUSIVE', 'operator')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /keygate_migrations/.test(l.message)
  return { operator, observer, waits, ...(await serveWaiting(t, url, waits, { KEYGATE_CONFIG: join(cwd, 'keygate.yaml') })) }
}

// Before (found by a review): with store.auto_migrate off, the start's read of keygate_migrations
// (is every migration applied?) waited for an operator's lock on it like any statement, and the
// start ended, exit 1, once store.query_timeout_ms or a lock_timeout cut the wait ("the store ...
// cancelled the statement", "could not take a lock the statement needs"), naming neither the
// table nor the session holding it.
t.test('store.auto_migrate off: a start whose read of keygate_migrations, held by an operator, store.query_timeout_ms or a lock_timeout cuts reads it again, says so once, and serves once the table is free', async (t) => {
  for (const lockTimeout of [undefined, '200ms']) {
    await t.test(lockTimeout ? `with a lock_timeout of ${lockTimeout} on the database` : 'store.query_timeout_ms, without a lock_timeout', async (t) => {
      const { operator, observer, waits, serve, warned } = await serveWaitingOnRecords(t, lockTimeout)
      t.match(warned.message, /^waiting for a lock on keygate_migrations, the table of applied migrations, that another session holds or is queued for/, `says what it waits for: ${warned.message}`)
      t.match(warned.message, lockTimeout ? /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/ : /cancelled while it waited for it \(SQLSTATE 57014/, 'and what cut a wait')
      t.match(warned.message, /store\.auto_migrate is off/, 'and why it reads the table')
      t.match(warned, { table: 'keygate_migrations', holder: new RegExp(`ACCESS EXCLUSIVE on keygate_migrations \\(PostgreSQL pid ${operator.pid}, application "operator"`) }, 'naming the table and the session that holds it')
      if (lockTimeout) t.match(warned, { lock_timeout: lockTimeout }, 'and the lock_timeout')
      else t.notOk('lock_timeout' in warned, 'without a lock_timeout')
      const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'keygate_migrations'::regclass` }
      await waitsThenServes(t, serve, waits, observer, waiting, () => operator.client.query('ROLLBACK'))
    })
  }
})

// As the waits with store.auto_migrate on: the signal is not held until the table is free.
t.test("store.auto_migrate off: a stop signal while the start's read of keygate_migrations waits for an operator's lock on it ends it at once, exit 0", async (t) => {
  for (const lockTimeout of [undefined, '200ms']) {
    await t.test(lockTimeout ? `with a lock_timeout of ${lockTimeout} on the database` : 'store.query_timeout_ms, without a lock_timeout', async (t) => {
      await stopsWhileWaiting(t, (await serveWaitingOnRecords(t, lockTimeout)).serve)
    })
  }
})

t.test('a start that waited for keygate_migrations, then for a table a migration needs, says each wait once', async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const reader = await lockTable(t, url, 'n8n_api_keys', 'ACCESS SHARE', 'keygate-before')
  const operator = await lockTable(t, url, 'keygate_migrations', 'ACCESS EXCLUSIVE', 'operator')
  const observer = await ownSession(t, url)
  const onRecords = (l: LogLine) => l.level === 'warn' && /keygate_migrations/.test(l.message)
  const { serve } = await serveWaiting(t, url, onRecords)
  await operator.client.query('ROLLBACK')
  const waits = (l: LogLine) => l.level === 'warn' && /table lock/.test(l.message)
  const warned = await serve.waitForLog(waits)
  t.match(warned, { migration: '0023_n8n_key_scopes_enforced.sql', holder: new RegExp(`ACCESS SHARE on n8n_api_keys \\(PostgreSQL pid ${reader.pid}`) }, "the file's wait is said too")
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => reader.client.query('ROLLBACK'), 1)
  t.equal(serve.logs.filter(onRecords).length, 1, 'the wait for keygate_migrations is said once')
})

// Before (found by a review): a migration's statement that PostgreSQL ended to break a deadlock
// with another session (a keygate not upgraded yet, its transaction writing keys and reading
// n8n_api_keys) ended the start, exit 1, with "migration ... failed: deadlock detected".
t.test("a start whose migration's statement PostgreSQL ends to break a deadlock tries the migrations again, says so once, and serves once the other session ends", async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  const other = await deadlockingMigrations(t, url, 'keygate-before')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /deadlock/.test(l.message)
  const { serve, warned } = await serveWaiting(t, url, waits)
  await other.read
  t.match(warned.message, /^migration 0024_rotation_notices_of_active_keys\.sql's statement was ended by PostgreSQL to break a deadlock with another session \(SQLSTATE 40P01/, 'says what ended the statement')
  t.notMatch(warned.message, /lock_timeout|55P03/, 'and not a lock_timeout')
  t.match(warned, { migration: '0024_rotation_notices_of_active_keys.sql', holder: new RegExp(`on api_keys[^(]*\\(PostgreSQL pid ${other.pid}, application "keygate-before"`) }, 'naming the file and the other session')
  t.notOk('lock_timeout' in warned, 'without a lock_timeout')
  // Tried again: its next try waits for n8n_api_keys, which the other session read meanwhile.
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => other.client.query('ROLLBACK'), 1)
})

t.test("a start whose statement on keygate_migrations PostgreSQL ends to break a deadlock (an operator's transaction) tries the migrations again, says so once, and serves once the other session ends", async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  const other = await deadlockingMigrations(t, url, 'operator', { table: 'keygate_migrations', mode: 'SHARE' })
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /deadlock/.test(l.message)
  const { serve, warned } = await serveWaiting(t, url, waits)
  await other.read
  t.match(warned.message, /^keygate's statement on keygate_migrations, the table of applied migrations, was ended by PostgreSQL to break a deadlock with another session \(SQLSTATE 40P01/, 'says what ended the statement')
  t.match(warned, { table: 'keygate_migrations', holder: new RegExp(`SHARE on keygate_migrations \\(PostgreSQL pid ${other.pid}, application "operator"`) }, 'naming the table and the other session')
  t.notOk('migration' in warned || 'lock_timeout' in warned, 'without a file or a lock_timeout')
  // Tried again: its next try waits for n8n_api_keys, which the other session read meanwhile.
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => other.client.query('ROLLBACK'), 1)
})
