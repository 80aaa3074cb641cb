// Real stores for tests: the embedded store (PGlite in memory) and a fresh database on the real
// PostgreSQL server, so a suite written once runs on both. PostgreSQL being unreachable fails
// the test with a message saying what to do; it is never skipped.
import { randomBytes } from 'node:crypto'
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import type { Test } from 'tap'
import { AUDIT_FORMAT, AuditCipher, AuditLog } from '../../core/audit.ts'
import { openDb, processAlive, type Db, type Queryable, type TransactionOptions } from '../../core/db.ts'
import { KeygateError } from '../../core/errors.ts'
import { KeyService } from '../../core/keys/service.ts'
import { MIGRATION_LOCK_ID, migrate, readMigrations } from '../../core/migrate.ts'
import { keyServiceOptions } from '../../core/runtime.ts'
import { loadConfig } from '../../config/load.ts'
import { seedDataDir } from './pglite-template.ts'

export type StoreKind = 'embedded' | 'postgres'
export const STORE_KINDS: readonly StoreKind[] = ['embedded', 'postgres']

export interface Store {
  kind: StoreKind
  db: Db
  /** The PostgreSQL URL of the fresh database (postgres only). */
  url?: string
}

export const BASE_DATABASE_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres'

export async function adminClient(): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: BASE_DATABASE_URL, connectionTimeoutMillis: 5000 })
  client.on('error', () => {})
  try {
    await client.connect()
  } catch (err) {
    await client.end().catch(() => {})
    const where = new URL(BASE_DATABASE_URL)
    throw new Error(
      `PostgreSQL is not reachable at ${where.hostname}:${where.port || 5432} (${(err as Error).message}); ` +
        'the store tests need it: start PostgreSQL, or set DATABASE_URL to a server where this user may CREATE DATABASE',
      { cause: err },
    )
  }
  return client
}

/**
 * Creates an empty database on the PostgreSQL server and returns its URL; it is dropped (with
 * any connections still open to it) when `t` ends.
 */
export async function freshDatabase(t: Pick<Test, 'teardown'>): Promise<string> {
  const name = `kg_t_${randomBytes(6).toString('hex')}`
  const client = await adminClient()
  try {
    await client.query(`CREATE DATABASE ${name}`)
  } finally {
    await client.end()
  }
  t.teardown(async () => {
    const c = await adminClient()
    try {
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    } finally {
      await c.end()
    }
  })
  const url = new URL(BASE_DATABASE_URL)
  url.pathname = `/${name}`
  return url.toString()
}

/** A fresh database (freshDatabase), migrated: its URL, and a store on it reached directly, closed when `t` ends. */
export async function migratedDatabase(t: Pick<Test, 'teardown'>): Promise<{ url: string; direct: Db }> {
  const url = await freshDatabase(t)
  const direct = await openDb({ databaseUrl: url })
  t.teardown(() => direct.close())
  await migrate(direct)
  return { url, direct }
}

/** Ends every other connection to the PostgreSQL database at `url`, as a server restart or a network failure would. */
export async function endConnections(url: string): Promise<void> {
  const admin = new pg.Client({ connectionString: url })
  await admin.connect()
  try {
    await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()')
  } finally {
    await admin.end()
  }
}

/** Sets `setting` on the database at `url` (`ALTER DATABASE ... SET`), as on keygate's role: for connections made from then on. */
export async function setOnDatabase(url: string, setting: string, value: string): Promise<void> {
  const root = await adminClient()
  try {
    await root.query(`ALTER DATABASE "${new URL(url).pathname.slice(1)}" SET ${setting} = '${value}'`)
  } finally {
    await root.end()
  }
}

/** `table` held in ACCESS EXCLUSIVE mode by a session of its own (a migration, a VACUUM FULL), until `release` (or the end of `t`). */
export async function holdTable(t: Pick<Test, 'teardown'>, url: string, table: string): Promise<{ release(): Promise<void> }> {
  const { client } = await lockTable(t, url, table, 'ACCESS EXCLUSIVE')
  return { release: async () => void (await client.query('ROLLBACK')) }
}

/**
 * A PostgreSQL session of a test's own at `url`, named `application`, that waits for any lock as
 * long as it takes (`lock_timeout` 0, whatever the database says), ended with `t`.
 */
export async function ownSession(t: Pick<Test, 'teardown'>, url: string, application?: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url, ...(application === undefined ? {} : { application_name: application }) })
  await client.connect()
  t.teardown(() => client.end().catch(() => {}))
  await client.query('SET lock_timeout = 0')
  return client
}

/**
 * `table` locked in `mode` in an open transaction of a session of its own named `application` (a
 * keygate not upgraded yet reading it, an operator's LOCK TABLE), until it lets it go (or the end
 * of `t`). Returned: that session, and its PostgreSQL pid.
 */
export async function lockTable(t: Pick<Test, 'teardown'>, url: string, table: string, mode: string, application?: string): Promise<{ client: pg.Client; pid: number }> {
  const client = await ownSession(t, url, application)
  await client.query('BEGIN')
  await client.query(`LOCK TABLE ${table} IN ${mode} MODE`)
  return { client, pid: (await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid }
}

/** The database at `url` migrated with keygate's migration files numbered below `version` alone (a database an earlier keygate migrated). */
export async function migratedBelow(t: Pick<Test, 'teardown'>, url: string, version: number): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-migrations-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  for (const m of readMigrations()) if (m.version < version) writeFileSync(join(dir, m.name), m.sql)
  const db = await openDb({ databaseUrl: url, poolMax: 1 })
  try {
    await migrate(db, dir)
  } finally {
    await db.close()
  }
}

/**
 * A session of its own named `application` (a keygate not upgraded yet, writing keys) that will
 * deadlock with the migrations of a database at `url` migrated below 0023 (migratedBelow), keygate
 * the deadlock's victim: it holds api_keys (ROW EXCLUSIVE, as an UPDATE), for which 0024's CREATE
 * TRIGGER waits once 0023 has taken n8n_api_keys (ACCESS EXCLUSIVE); seen that wait in pg_locks,
 * it reads n8n_api_keys, waiting in turn for the migration. PostgreSQL ends the statement of the
 * session whose deadlock_timeout check finds the cycle: the database's is set to 1 s (for the
 * connections keygate makes from then on: call this before it starts), this session's to 60 s, and
 * the cycle is closed as soon as keygate's statement is seen waiting. `read`: that read, done once
 * the migration's statement was ended; the session's transaction stays open until it lets it go.
 * `holds`: another table the session holds, and how, for which keygate waits once it has taken
 * n8n_api_keys (keygate_migrations in SHARE mode: the record of 0023 waits).
 */
export async function deadlockingMigrations(t: Pick<Test, 'teardown'>, url: string, application: string, holds = { table: 'api_keys', mode: 'ROW EXCLUSIVE' }): Promise<{ client: pg.Client; pid: number; read: Promise<unknown> }> {
  await setOnDatabase(url, 'deadlock_timeout', '1s')
  const other = await lockTable(t, url, holds.table, holds.mode, application)
  await other.client.query("SET deadlock_timeout = '60s'")
  const observer = await ownSession(t, url)
  const read = (async () => {
    for (;;) {
      const { rows } = await observer.query(`SELECT 1 FROM pg_locks WHERE locktype = 'relation' AND NOT granted AND relation = $1::regclass AND pid <> $2`, [holds.table, other.pid])
      if (rows.length > 0) break
      await new Promise((r) => setTimeout(r, 20))
    }
    return other.client.query('SELECT count(*) FROM n8n_api_keys')
  })()
  read.catch(() => {}) // awaited by the test, once the migration is over
  return { ...other, read }
}

/** keygate's migration lock held by a session of its own, named `application` (another instance migrating), until it lets it go (or the end of `t`). */
export async function holdMigrationLock(t: Pick<Test, 'teardown'>, url: string, application: string): Promise<pg.Client> {
  const holder = await ownSession(t, url, application)
  await holder.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_ID])
  return holder
}

/**
 * A fresh embedded store, in a data folder copied from the tests' initialised one
 * (helpers/pglite-template.ts; with `migrated`, the migrated one when a store is opened anew), with the CLI's 16 MB of shared buffers (`shortLived`): a test's
 * few rows never fill more, and the store starts in about two thirds of the CPU. The folder is
 * opened as `serve` opens one, so PGlite reads from it only the pages it uses: a store in memory
 * started from the same folder as a tar took 1.1 to 1.4 s of CPU to open, loading all 40 MB into
 * PGlite's file system, and a copied folder takes 0.45 to 0.55 s, the copy included.
 *
 * A store one test closed is emptied (its schema dropped and made again, the session reset) and
 * lent to the next test of the same process rather than a PGlite started anew (the suite's test
 * processes opened some 150 before). Each test gets a store of its own (`LentDb`): once closed,
 * its calls are refused as a closed store's are, so nothing a test left running reaches the next
 * test's rows. A store that cannot be emptied is closed for good and its folder removed.
 */
export async function memoryDb(options: { migrated?: boolean } = {}): Promise<Db> {
  const idle = idleStores.pop()
  if (idle) {
    // Emptied when it was given back (EMPTY): migrated again when asked so. Before, one asked
    // `migrated` after an earlier test's store had been given back came without a table.
    const lent = new LentDb(idle)
    if (options.migrated === true) await migrate(lent)
    return lent
  }
  const dir = await seedDataDir(join(storesRoot(), `store-${++storeCount}`), options)
  let db: Db
  try {
    db = await openDb({ dataDir: dir, shortLived: true })
  } catch (err) {
    rmSync(dir, { recursive: true, force: true })
    throw err
  }
  return new LentDb(closingRemoves(db, dir))
}

let root: string | undefined
let storeCount = 0
const ROOT_PREFIX = 'keygate-test-stores-'

/**
 * This process's folder of store folders, removed as it exits. One left by a test process that
 * was killed (a timeout's SIGKILL runs no exit handler) is removed by the next that starts.
 */
function storesRoot(): string {
  if (root !== undefined) return root
  for (const name of readdirSync(tmpdir())) {
    const pid = name.startsWith(ROOT_PREFIX) ? Number(name.slice(ROOT_PREFIX.length).split('-')[0]) : 0
    if (pid > 0 && !processAlive(pid)) rmSync(join(tmpdir(), name), { recursive: true, force: true })
  }
  const made = mkdtempSync(join(tmpdir(), `${ROOT_PREFIX}${process.pid}-`))
  process.on('exit', () => rmSync(made, { recursive: true, force: true }))
  root = made
  return made
}

/** `db`, whose close also removes its data folder. */
function closingRemoves(db: Db, dir: string): Db {
  const close = db.close.bind(db)
  db.close = async () => {
    try {
      await close()
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  }
  return db
}

/** This process's emptied stores, waiting for the next memoryDb(); one whose thread ended leaves it. */
const idleStores: Db[] = []

/** What empties a store for the next test: every object keygate makes is in schema public. */
const EMPTY = 'DROP SCHEMA public CASCADE; CREATE SCHEMA public'

class LentDb implements Db {
  readonly kind = 'embedded' as const
  #db: Db | undefined
  #lost = false

  constructor(db: Db) {
    this.#db = db
    db.onLost(() => {
      if (this.#db === db) this.#lost = true
    })
  }

  #live(): Db {
    if (this.#db === undefined) throw new KeygateError('store_unavailable', 'the embedded store stopped: it was closed')
    return this.#db
  }

  async query<R = Record<string, unknown>>(text: string, params?: readonly unknown[]): Promise<R[]> {
    return this.#live().query<R>(text, params)
  }

  async exec(script: string): Promise<void> {
    return this.#live().exec(script)
  }

  probing(ms: number): Queryable {
    return this.#live().probing(ms)
  }

  async transaction<T>(fn: (tx: Queryable) => Promise<T>, options?: TransactionOptions): Promise<T> {
    return this.#live().transaction(fn, options)
  }

  onLost(listener: (err: Error) => void): void {
    const db = this.#db
    db?.onLost((err) => {
      if (this.#db === db) listener(err)
    })
  }

  async close(): Promise<void> {
    const db = this.#db
    if (db === undefined) return
    this.#db = undefined
    if (this.#lost) return db.close()
    // Waits as a store's close does for a transaction the test left running (PGlite's lock).
    const emptied = await db
      .exec(EMPTY)
      .then(() => db.query('DISCARD ALL'))
      .then(
        () => true,
        () => false,
      )
    if (!emptied) return db.close()
    idleStores.push(db)
    db.onLost(() => {
      const at = idleStores.indexOf(db)
      if (at !== -1) idleStores.splice(at, 1)
    })
  }
}

/** One store of `kind`, fresh, migrated unless `migrated: false`, closed (and dropped) when `t` ends. */
export async function openStore(t: Test, kind: StoreKind, options: { migrated?: boolean } = {}): Promise<Store> {
  let store: Store
  if (kind === 'embedded') {
    store = { kind, db: await memoryDb({ migrated: options.migrated !== false }) }
  } else {
    const url = await freshDatabase(t)
    store = { kind, db: await openDb({ databaseUrl: url, poolMax: 10 }), url }
  }
  // Teardowns run last-registered first: the pool closes before its database is dropped.
  t.teardown(() => store.db.close())
  if (options.migrated !== false) await migrate(store.db)
  return store
}

/**
 * Runs `fn` once per store kind, each in its own subtest with its own fresh store; tests inside
 * `fn` share that store, so they should look only at rows they made.
 */
export async function forEachStore(
  t: Test,
  fn: (t: Test, store: Store) => Promise<void>,
  options: { kinds?: readonly StoreKind[]; migrated?: boolean } = {},
): Promise<void> {
  for (const kind of options.kinds ?? STORE_KINDS) {
    await t.test(kind, async (t) => {
      const store = await openStore(t, kind, options)
      await fn(t, store)
    })
  }
}

/** A fixed audit encryption key, so rows written by one test service open in another. */
export const TEST_ENCRYPTION_KEY = Buffer.alloc(32, 0x4b)

export const T0 = new Date('2030-01-01T00:00:00.000Z')

export interface Clock {
  now(): Date
  set(at: Date): void
  advance(ms: number): Date
}

export function testClock(start: Date = T0): Clock {
  let now = new Date(start)
  return {
    now: () => now,
    set: (at) => {
      now = new Date(at)
    },
    advance: (ms) => {
      now = new Date(now.getTime() + ms)
      return now
    },
  }
}

/** Configuration defaults (what `serve` runs with when nothing is set). */
export const DEFAULT_CONFIG = loadConfig({ env: {}, onlyFile: true })

export interface Services {
  keys: KeyService
  audit: AuditLog
  cipher: AuditCipher
  clock: Clock
}

/**
 * A KeyService and its AuditLog over `db`, built like the runtime builds them (default key
 * options), with the fixed test encryption key and a controllable clock.
 */
export function testServices(
  db: Db,
  options: { clock?: Clock; audit?: AuditLog; acceptLegacy?: boolean; prefix?: string } = {},
): Services {
  const cipher = new AuditCipher(TEST_ENCRYPTION_KEY)
  const audit = options.audit ?? new AuditLog(cipher)
  const clock = options.clock ?? testClock()
  const keys = new KeyService({
    db,
    audit,
    ...keyServiceOptions(DEFAULT_CONFIG),
    ...(options.acceptLegacy !== undefined ? { acceptLegacy: options.acceptLegacy } : {}),
    ...(options.prefix !== undefined ? { prefix: options.prefix } : {}),
    now: clock.now,
  })
  return { keys, audit, cipher, clock }
}

/**
 * Moves the audit rows of a key to another time, sealed again as keygate would have sealed them
 * then: the time is bound into a row's sealed details, so changing created_at alone makes the
 * row fail to open (test/audit.test.ts).
 */
export async function backdateAudit(db: Db, cipher: AuditCipher, keyId: string, at: Date): Promise<void> {
  for (const { details, integrity: _integrity, problem: _problem, ...row } of await new AuditLog(cipher).list(db, { keyId, limit: 1000 })) {
    const sealed = cipher.seal({ ...row, createdAt: at }, details ?? {})
    await db.query('UPDATE api_key_audit_log SET created_at = $2, enc_key_id = $3, nonce = $4, details = $5, format = $6 WHERE id = $1', [row.id, at, sealed.encKeyId, sealed.nonce, sealed.details, AUDIT_FORMAT])
  }
}

/** Resolves to the error `promise` rejects with; fails when it resolves. */
export async function rejection(promise: Promise<unknown>): Promise<Error & { code?: string; status?: number; details?: Record<string, unknown> }> {
  try {
    await promise
  } catch (err) {
    return err as Error
  }
  throw new Error('expected a rejection, but the promise resolved')
}

/**
 * `db` with its queries counted (and their SQL kept, in order, in `statements`), failing while
 * `down` holds, and answering only once `held` settles (the query has run: what it read is as it
 * was then), as an anomaly feed's history reads it.
 */
export function watchedDb() {
  const w = { reads: 0, inFlight: 0, most: 0, down: false, held: Promise.resolve(), statements: [] as string[] }
  const wrap = (db: Db): Db =>
    new Proxy(db, {
      get(target, prop) {
        if (prop === 'query') {
          return async (q: string, p?: readonly unknown[]) => {
            w.reads++
            w.statements.push(q)
            w.most = Math.max(w.most, ++w.inFlight)
            try {
              if (w.down) throw new Error('the store is unavailable')
              const rows = await target.query(q, p)
              await w.held
              return rows
            } finally {
              w.inFlight--
            }
          }
        }
        const v = Reflect.get(target, prop) as unknown
        return typeof v === 'function' ? v.bind(target) : v
      },
    })
  return { w, wrap }
}

/** `db` with every statement it is given recorded in `seen`, to be explained on the same store. */
export function recordingDb(db: Db, seen: Array<{ sql: string; params: unknown[] }>): Db {
  return new Proxy(db, {
    get(target, p) {
      if (p === 'query') return (sql: string, params: unknown[] = []) => (seen.push({ sql, params }), target.query(sql, params))
      const v = Reflect.get(target, p) as unknown
      return typeof v === 'function' ? v.bind(target) : v
    },
  })
}

export interface PlanNode {
  'Node Type': string
  'Relation Name'?: string
  'Index Name'?: string
  /** Of `EXPLAIN (ANALYZE)`. */
  'Actual Rows'?: number
  'Actual Loops'?: number
  'Rows Removed by Filter'?: number
  Plans?: PlanNode[]
}

/** Every node of a plan as `EXPLAIN (FORMAT JSON)` gives it (its `QUERY PLAN`), subplans too, depth first. */
export function planNodes(queryPlan: unknown): PlanNode[] {
  const out: PlanNode[] = []
  const walk = (node: PlanNode) => {
    out.push(node)
    for (const p of node.Plans ?? []) walk(p)
  }
  walk((queryPlan as Array<{ Plan: PlanNode }>)[0]!.Plan)
  return out
}
