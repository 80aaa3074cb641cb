// One small SQL interface over PostgreSQL (pg) and the embedded store (PGlite), so every
// migration and every query in keygate is written once and runs on both.
import { accessSync, chmodSync, closeSync, existsSync, constants as fsConstants, fstatSync, linkSync, lstatSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, renameSync, rmSync, statSync, unlinkSync, utimesSync, type Stats } from 'node:fs'
import net from 'node:net'
import { extname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import type pg from 'pg'
import { Worker } from 'node:worker_threads'
import type { Fatal, Ready, Reply, Request, WireError, WorkerOptions } from './embedded-worker.ts'
import { TimedOut } from './deadline.ts'
import { isKeygateError, KeygateError, systemErrorWords } from './errors.ts'
import { ownTempName, writeNewFile } from './files.ts'
import { makeFolders } from './folders.ts'

/**
 * What a store_locked refusal advises, after naming the process that holds the store: by
 * default a CLI command's way (the owner is usually `serve`); the caller that is no CLI command
 * says its own (OpenDbOptions.lockedHint).
 */
const STORE_LOCKED_HINT = 'stop it, or point the CLI at its admin API with KEYGATE_ADMIN_URL and KEYGATE_ADMIN_TOKEN'

/**
 * The CLI's advice where the owner is a `serve --only gateway`, which has no admin API (before,
 * found by a docs walk: told to point the CLI at it, which answers 404 there).
 */
const GATEWAY_ONLY_HINT = 'stop it: it serves no admin API to point the CLI at, and the embedded store serves one process (a gateway beside an admin API needs a shared store, DATABASE_URL)'

export interface Queryable {
  query<R = Record<string, unknown>>(text: string, params?: readonly unknown[]): Promise<R[]>
  /** Runs a script of several statements without parameters (migrations). */
  exec(script: string): Promise<void>
}

export interface TransactionOptions {
  /**
   * Without the store's query timeout (PostgreSQL): for work that may rightly wait or run long,
   * such as migrations (which wait for another instance's).
   */
  untimed?: boolean
}

export interface Db extends Queryable {
  readonly kind: 'postgres' | 'embedded'
  /**
   * Calls `listener` once if the store is gone for good (the embedded store's thread ended: every
   * call fails from then on); a PostgreSQL store never is, its connections are made again.
   */
  onLost(listener: (err: Error) => void): void
  /**
   * The store as a health probe asks it: a statement not answered within `ms` fails (TimedOut),
   * whatever store.query_timeout_ms says (longer, or no limit). PostgreSQL cancels it at `ms`, and
   * a connection that answered nothing at all is dropped a second later, not kept for the store's
   * own timeout or for good. On PostgreSQL the probes have a connection of their own, outside the
   * pool (see PostgresDb's), and a wait for a table lock another session holds fails at a quarter
   * of `ms` (55P03: store_unavailable, details.sqlstate). Its statements take no parameters.
   */
  probing(ms: number): Queryable
  /** Runs `fn` in one transaction: committed when it resolves, rolled back when it throws. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>, options?: TransactionOptions): Promise<T>
  close(): Promise<void>
}

/** SQLSTATE of a database error, when it is one. */
export function sqlState(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : undefined
}

/** The most rows one statement of a batched write (statementBatches) carries. */
export const STATEMENT_MAX_ROWS = 1000

/** About the most parameter text one statement of a batched write carries, past its first row. */
export const STATEMENT_MAX_CHARS = 512 * 1024

/**
 * `items` cut into the batches that a multi-row statement each writes (an import's keys, their
 * audit rows, queued webhook deliveries): at most STATEMENT_MAX_ROWS rows, and no more than
 * STATEMENT_MAX_CHARS of them by `size` (an item's characters, about), but never an empty batch.
 * `rows`: how many rows an item writes (an event queues a delivery for each webhook that takes
 * it), 1 when not given; `size` is then of all of them. Bounded by size as well as rows, a
 * statement takes about as long whatever its rows hold: 1,000 rows of 130 characters took 70 ms
 * on the embedded store, and 1,000 of the largest rows an import takes (10 MB) 0.6 to 1.2 s, a
 * large share of a store.query_timeout_ms set low (found by a review).
 */
export function statementBatches<T>(items: readonly T[], size: (item: T) => number, rows: (item: T) => number = () => 1): T[][] {
  const out: T[][] = []
  let batch: T[] = []
  let chars = 0
  let written = 0
  for (const item of items) {
    const s = size(item)
    const r = rows(item)
    if (batch.length > 0 && (written + r > STATEMENT_MAX_ROWS || chars + s > STATEMENT_MAX_CHARS)) {
      out.push(batch)
      batch = []
      chars = 0
      written = 0
    }
    batch.push(item)
    chars += s
    written += r
  }
  if (batch.length > 0) out.push(batch)
  return out
}

/** Column types a row's value cannot take inside an array parameter as it is, and what carries it there instead. */
const CARRIED: Record<string, { as: string; encode: (v: unknown) => unknown; decode: (column: string) => string }> = {
  // An array of arrays must be rectangular in PostgreSQL: each row's list goes as JSON, read back in order.
  'text[]': { as: 'jsonb', encode: (v) => JSON.stringify(v), decode: (c) => `ARRAY(SELECT e FROM jsonb_array_elements_text(${c}) WITH ORDINALITY AS a(e, i) ORDER BY i)` },
  // As hex text, which node-postgres and PGlite pass alike.
  bytea: { as: 'text', encode: (v) => (v as Buffer).toString('hex'), decode: (c) => `decode(${c}, 'hex')` },
}

/** The rows of a batched write, and the parameters that carry them. */
export interface Rows {
  /** A query giving the rows, their columns in the order given: `INSERT INTO t (columns) ${query}`. */
  query: string
  /** The rows as a FROM item named `alias` (with the columns' names). */
  as(alias: string): string
  params: unknown[]
}

/**
 * The rows of a batched INSERT: `columns` (name, SQL type, one value a row), with parameters
 * numbered from `first`. Several rows are `unnest` of one array parameter a column; a single row,
 * the usual case (a key created, its audit row, its event), is a plain VALUES, which the store
 * parses and plans faster: a key's creation through unnest took 10 to 16 % longer than the one-row
 * statements it replaced (POST /v1/keys; its INSERT alone 80 µs more on PostgreSQL).
 */
export function rowsOf(columns: ReadonlyArray<readonly [name: string, type: string, values: readonly unknown[]]>, first = 1): Rows {
  const names = columns.map(([name]) => name).join(', ')
  const single = columns[0]?.[2].length === 1
  const query = single
    ? `VALUES (${columns.map(([, type], i) => `$${first + i}::${type}`).join(', ')})`
    : `SELECT ${columns.map(([name, type]) => CARRIED[type]?.decode(`u.${name}`) ?? `u.${name}`).join(', ')}
       FROM unnest(${columns.map(([, type], i) => `$${first + i}::${CARRIED[type]?.as ?? type}[]`).join(', ')}) AS u(${names})`
  return {
    query,
    as: (alias) => `(${query}) AS ${alias}(${names})`,
    params: columns.map(([, type, values]) => {
      if (single) return values[0]
      const carried = CARRIED[type]
      return carried === undefined ? values : values.map((v) => (v === null ? null : carried.encode(v)))
    }),
  }
}

export const UNIQUE_VIOLATION = '23505'
/** A table the statement names does not exist (a schema older than the code). */
export const UNDEFINED_TABLE = '42P01'

/** SQLSTATE of a statement PostgreSQL cancelled: a statement_timeout, or pg_cancel_backend. */
export const QUERY_CANCELED = '57014'
/** SQLSTATE of a lock not taken: past the lock_timeout set on keygate's role or database (or NOWAIT, which keygate does not use). */
export const LOCK_NOT_AVAILABLE = '55P03'
/** SQLSTATE of the statement PostgreSQL ends to break a deadlock: its transaction is rolled back, and the same work may succeed again. */
export const DEADLOCK_DETECTED = '40P01'
/** node-postgres's words when a statement's answer did not come within its query_timeout. */
const READ_TIMEOUT = 'Query read timeout'

/**
 * Whether a pool gave up making a connection within its connectionTimeoutMillis (node-postgres's
 * words: the first while it waits for the server's socket, the second once connected).
 */
const isConnectTimeout = (err: unknown): boolean => err instanceof Error && /^(?:timeout exceeded when trying to connect|Connection terminated due to connection timeout)$/.test(err.message)

/** Whether a statement got no answer within its query_timeout (its connection is still held by it). */
const isReadTimeout = (err: unknown): boolean => err instanceof Error && err.message === READ_TIMEOUT

/** Socket errors of a connection to PostgreSQL that failed or broke. */
const SOCKET_ERRORS = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE'])

/**
 * The errors a new connection failed with, whatever PostgreSQL's SQLSTATE: a database that takes
 * no connections (ALTER DATABASE ... ALLOW_CONNECTIONS false, 55000) is as unusable as one
 * missing. Before (found by a docs walk), such a 55000 was a 500 internal_error at the admin API,
 * where the gateway answered 503 store_unavailable.
 */
const AT_CONNECT = new WeakSet<object>()

/**
 * Whether `err` says PostgreSQL cannot be reached or used at all, rather than refusing one
 * statement: a socket error, node-postgres's own words for a lost or timed-out connection, or
 * SQLSTATE class 08 (connection exception, but 08P01), 28 (bad credentials), 57P01-57P03
 * (shutting down, crashed, not yet accepting), 53300 (too many connections) or 3D000 (no such
 * database), or any error a new connection failed with (AT_CONNECT).
 */
function isUnreachable(err: unknown): boolean {
  const code = (err as { code?: unknown }).code
  // 08P01 (protocol violation) is also what a malformed statement gets (too many parameters): a bug to surface, not an outage.
  if (typeof code === 'string' && code !== '08P01' && (SOCKET_ERRORS.has(code) || /^(?:08|28|57P0[123]$|53300$|3D000$)/.test(code))) return true
  if (typeof err === 'object' && err !== null && AT_CONNECT.has(err)) return true
  const message = err instanceof Error ? err.message : ''
  return /^Connection terminated|timeout exceeded when trying to connect|is not queryable/.test(message)
}

/**
 * SQLSTATE class 53, insufficient resources (53100 disk full, 53200 out of memory, 53400 a
 * configured limit), but 53300 (too many connections, counted as unreachable): the store cannot
 * take the statement now, which is the store's state, not the request's fault or keygate's.
 */
function outOfResources(err: unknown, where: string): KeygateError | undefined {
  const code = sqlState(err)
  if (code === undefined || !code.startsWith('53') || code === '53300') return undefined
  return new KeygateError('store_unavailable', `${where} is out of resources (SQLSTATE ${code}): ${(err as Error).message}`, { sqlstate: code }, { cause: err })
}

/** SQLSTATE 25006: a write in a read-only transaction (a standby, default_transaction_read_only). */
const READ_ONLY_TRANSACTION = '25006'

/** `PostgreSQL at host:port`, as messages name the server (never with its credentials). */
function postgresAt(url: string): string {
  const u = URL.canParse(url) ? new URL(url) : undefined
  return u?.hostname ? `PostgreSQL at ${u.hostname}:${u.port || 5432}` : 'PostgreSQL'
}

/**
 * How long the client waits for an answer beyond the statement_timeout it gave the server: the
 * server's cancellation (57014) normally comes first, and this catches a server or a network that
 * says nothing at all (a connection dropped by a firewall, a host gone). The connection is then
 * dropped, not reused.
 */
const WIRE_GRACE_MS = 1000

/** The share of a health probe's bound (Db.probing's `ms`) its statement may wait for a lock. */
const PROBE_LOCK_SHARE = 0.25

/** A connection taken from the pool, and how it goes back (see PostgresDb's #acquire). */
interface Checkout {
  client: pg.PoolClient
  giveBack(broken: boolean): void
}

class PostgresDb implements Db {
  readonly kind = 'postgres'
  readonly #Pool: typeof pg.Pool
  readonly #url: string
  readonly #pool: pg.Pool
  /** The health probes' own connection (probing), made at the first probe. */
  #probePool: pg.Pool | undefined
  readonly #where: string
  readonly #timeoutMs: number
  /** The client-side read timeout of a timed statement; undefined without a timeout. */
  readonly #readTimeout: number | undefined

  /** `Pool`: the driver's, loaded by openDb when a store is PostgreSQL (the embedded store and the admin API's clients never load it). */
  constructor(Pool: typeof pg.Pool, url: string, max: number, queryTimeoutMs: number) {
    this.#Pool = Pool
    this.#url = url
    this.#timeoutMs = queryTimeoutMs
    this.#readTimeout = queryTimeoutMs > 0 ? queryTimeoutMs + WIRE_GRACE_MS : undefined
    this.#pool = new Pool({
      connectionString: url,
      max,
      connectionTimeoutMillis: 5000,
      idleTimeoutMillis: 30_000,
    })
    // An idle client losing its connection must not crash the process; the next query reconnects.
    this.#pool.on('error', () => {})
    this.#where = postgresAt(url)
  }

  /** Connections that have been given the statement_timeout and `jit = off`. */
  readonly #prepared = new WeakSet<pg.PoolClient>()

  /**
   * A connection from the pool, for one statement or a transaction. A new one first gets the
   * server's half of the limit (`SET statement_timeout`) and `SET jit = off`, in one simple query
   * awaited before any other statement: not
   * a startup parameter, which PgBouncer refuses ("unsupported startup parameter") unless told to
   * ignore it, and not a statement sent from the pool's 'connect' event, which would overlap the
   * caller's (node-postgres warns of that on every new connection, and pg 9 refuses it).
   *
   * The pool listens for errors only on idle clients. A connection lost while it is checked out
   * (PostgreSQL restarting, the network cut, an idle-in-transaction timeout) emits 'error' on the
   * client, and unheard that ends the process; its statements fail on their own. So it is heard
   * from the moment it is taken, its SET included, until `giveBack`: `broken`, it is destroyed,
   * not returned to the pool, and keeps the listener, for its socket's last words. Before (found
   * by a review: serve ended under load as the PostgreSQL behind it went away), the SET was not
   * heard: a connection lost during it ended serve with an unhandled 'error' event.
   *
   * `pool`: the pool's, or the health probes' own (probing), which gets no SET.
   */
  async #acquire(pool = this.#pool): Promise<Checkout> {
    const client = await pool.connect().catch((err: unknown) => {
      if (typeof err === 'object' && err !== null) AT_CONNECT.add(err)
      throw err
    })
    const onLost = (): void => {}
    client.on('error', onLost)
    const giveBack = (broken: boolean): void => {
      if (!broken) client.off('error', onLost)
      client.release(broken)
    }
    // The probes' own connection sets its bound with each statement (probing).
    if (pool !== this.#pool || this.#prepared.has(client)) return { client, giveBack }
    try {
      // And PostgreSQL's JIT off: keygate's statements are short, and where one's estimated cost
      // passes jit_above_cost (the expiring report and stats with a thousand keys in grace),
      // compiling it may take longer than running it (bench/ends-report.ts, bench/RESULTS.md).
      await client.query(this.#statement(this.#readTimeout === undefined ? 'SET jit = off' : `SET statement_timeout = ${this.#timeoutMs}; SET jit = off`, undefined))
    } catch (err) {
      giveBack(true)
      throw err
    }
    this.#prepared.add(client)
    return { client, giveBack }
  }

  /**
   * One statement on a pooled connection. After an error PostgreSQL answered (a constraint, a
   * cancellation) the connection goes back to the pool; after any other (no answer in time, a
   * broken or refused connection, a protocol error) it is dropped.
   */
  async #once(statement: pg.QueryConfig, pool = this.#pool): Promise<pg.QueryResult> {
    const { client, giveBack } = await this.#acquire(pool)
    try {
      const result = await client.query(statement)
      giveBack(false)
      return result
    } catch (err) {
      const state = sqlState(err)
      giveBack(state === undefined || state.startsWith('08') || isUnreachable(err))
      throw err
    }
  }

  /**
   * `err` as store_unavailable when PostgreSQL could not be reached or used, or did not answer
   * within the query timeout of a timed statement (the admin API and the gateway answer 503, not
   * 500), or within a timeout set on keygate's role or database: its lock_timeout (55P03, a table
   * held by a migration or a VACUUM FULL), or, with store.query_timeout_ms 0, its
   * statement_timeout (57014; README advises the role's behind PgBouncer), which cannot be told
   * from an operator's pg_cancel_backend; and a deadlock PostgreSQL broke by ending the statement
   * (40P01). Before (found by a review), those kept PostgreSQL's
   * error, answered 500 internal_error by the admin API where the gateway answered the same failed
   * look-up 503. In an untimed transaction (migrations, which may rightly wait) a cancellation or
   * a lock not taken keeps PostgreSQL's own words and code.
   */
  #unreachable(err: unknown, untimed = false): unknown {
    if (!untimed) {
      if (this.#readTimeout !== undefined && isReadTimeout(err)) {
        return new KeygateError('store_unavailable', `the store (${this.#where}) did not answer within store.query_timeout_ms (${this.#timeoutMs} ms) and a second more: ${READ_TIMEOUT}`, undefined, { cause: err })
      }
      // PostgreSQL's words say which cancellation it was (in the server's language).
      const code = sqlState(err)
      if (code === QUERY_CANCELED) {
        const whose = this.#readTimeout !== undefined ? `store.query_timeout_ms is ${this.#timeoutMs} ms` : 'SQLSTATE 57014; store.query_timeout_ms is 0, so a statement_timeout set on the role or the database, or an operator'
        return new KeygateError('store_unavailable', `the store (${this.#where}) cancelled the statement (${whose}): ${(err as Error).message}`, { sqlstate: code }, { cause: err })
      }
      if (code === LOCK_NOT_AVAILABLE) {
        return new KeygateError('store_unavailable', `the store (${this.#where}) could not take a lock the statement needs (SQLSTATE 55P03, lock_timeout): ${(err as Error).message}`, { sqlstate: code }, { cause: err })
      }
      // A deadlock with another session (an operator's script, rows taken in another order): the
      // store's, not keygate's defect, and the request succeeds tried again. Before (left open by a
      // review), PostgreSQL's error as it was: 500 internal_error, logged as unexpected. keygate's
      // transactions run at READ COMMITTED, so a serialization failure (40001) never reaches here.
      if (code === DEADLOCK_DETECTED) {
        return new KeygateError('store_unavailable', `the store (${this.#where}) ended the statement to break a deadlock with another session (SQLSTATE 40P01); nothing of it was written: try again: ${(err as Error).message}`, { sqlstate: code }, { cause: err })
      }
    }
    const exhausted = outOfResources(err, `the store (${this.#where})`)
    if (exhausted) return exhausted
    // Before (found by a failure review): a 500 internal_error for every write, while reads went on.
    if (sqlState(err) === READ_ONLY_TRANSACTION) {
      return new KeygateError('store_unavailable', `the store (${this.#where}) refuses writes: it is read-only (a standby, or default_transaction_read_only on); DATABASE_URL must name the primary`, { sqlstate: READ_ONLY_TRANSACTION }, { cause: err })
    }
    if (!isUnreachable(err)) return err
    return new KeygateError('store_unavailable', `the store (${this.#where}) cannot be reached: ${(err as Error).message}`, undefined, { cause: err })
  }

  /** A statement for node-postgres, with the read timeout unless `untimed`. */
  #statement(text: string, params: readonly unknown[] | undefined, untimed = false): pg.QueryConfig {
    return { text, values: params as unknown[] | undefined, ...(untimed || this.#readTimeout === undefined ? {} : { query_timeout: this.#readTimeout }) } as pg.QueryConfig
  }

  async query<R>(text: string, params?: readonly unknown[]): Promise<R[]> {
    try {
      return (await this.#once(this.#statement(text, params))).rows as R[]
    } catch (err) {
      throw this.#unreachable(err)
    }
  }

  async exec(script: string): Promise<void> {
    try {
      await this.#once(this.#statement(script, undefined))
    } catch (err) {
      throw this.#unreachable(err)
    }
  }

  /**
   * The probes have a connection of their own, outside the pool: before (found by a review), a
   * probe waited for a pool connection like any statement, so a pool busy with real work on a
   * healthy store read as a store not answering (`/readyz` 503, keygate_store_up 0), and a load
   * balancer took a busy instance out. One more connection a process, then, made at the first
   * probe (bounded by `ms` too) and kept, not closed when idle: made again at each scrape of a
   * Prometheus scraping once a minute, it would read a server at max_connections as down while
   * the pool worked. A broken one is dropped and made again at the next probe.
   *
   * Each statement is sent after a `SET LOCAL statement_timeout` of `ms`, in one simple query (one
   * round trip, one implicit transaction, which the setting ends with: nothing is left set on a
   * server connection PgBouncer hands to others): PostgreSQL cancels it at `ms`, and the client
   * drops a connection that answered nothing a second later, as for any statement
   * (WIRE_GRACE_MS). Before (found by a review), only the client gave up, at `ms`: a statement
   * waiting on a lock went on waiting in its backend after its connection was dropped (with
   * store.query_timeout_ms 0, for as long as the lock was held), one more each probe, until the
   * server had no connection left for anyone. So a probe's statement takes no parameters.
   *
   * And a `SET LOCAL lock_timeout` of a quarter of `ms` (PROBE_LOCK_SHARE), whatever keygate's
   * role or database sets: a wait for a table lock another session holds (an operator's LOCK
   * TABLE or VACUUM FULL of keygate_migrations, which /readyz reads) fails with SQLSTATE 55P03
   * (store_unavailable, details.sqlstate) well within the probe's `ms`, telling a store that
   * answered but could not lock from one that did not answer. Before (found by a review), such a
   * wait ran to the statement_timeout (TimedOut, "store not answering") or to the role's own
   * lock_timeout, and /readyz made every instance unready for as long as the lock lasted.
   */
  probing(ms: number): Queryable {
    const pool = (this.#probePool ??= this.#newProbePool(ms))
    const lockWait = Math.max(1, Math.floor(ms * PROBE_LOCK_SHARE))
    const once = async (text: string, params?: readonly unknown[]): Promise<pg.QueryResult> => {
      if (params !== undefined && params.length > 0) throw new Error("a health probe's statement takes no parameters")
      const bounded = `SET LOCAL statement_timeout = ${ms}; SET LOCAL lock_timeout = ${lockWait}; ${text}`
      try {
        const results = (await this.#once({ text: bounded, query_timeout: ms + WIRE_GRACE_MS } as pg.QueryConfig, pool)) as unknown as pg.QueryResult[]
        return results[2] as pg.QueryResult
      } catch (err) {
        if (isReadTimeout(err) || sqlState(err) === QUERY_CANCELED || isConnectTimeout(err)) throw new TimedOut(`the store (${this.#where}): no answer within ${ms} ms`, { cause: err })
        throw this.#unreachable(err)
      }
    }
    return {
      query: async <R>(text: string, params?: readonly unknown[]) => (await once(text, params)).rows as R[],
      exec: async (script: string) => void (await once(script)),
    }
  }

  #newProbePool(ms: number): pg.Pool {
    const pool = new this.#Pool({ connectionString: this.#url, max: 1, connectionTimeoutMillis: ms, idleTimeoutMillis: 0 })
    pool.on('error', () => {})
    return pool
  }

  async transaction<T>(fn: (tx: Queryable) => Promise<T>, options: TransactionOptions = {}): Promise<T> {
    let taken: Checkout
    try {
      taken = await this.#acquire()
    } catch (err) {
      throw this.#unreachable(err)
    }
    const { client, giveBack } = taken
    const untimed = options.untimed === true
    const run = (t: string, p?: readonly unknown[]) => client.query(this.#statement(t, p, untimed))
    const tx: Queryable = {
      query: async <R>(t: string, p?: readonly unknown[]) => (await run(t, p)).rows as R[],
      exec: async (script: string) => {
        await run(script)
      },
    }
    try {
      await run('BEGIN')
      if (untimed && this.#readTimeout !== undefined) await run('SET LOCAL statement_timeout = 0')
      const result = await fn(tx)
      await run('COMMIT')
      giveBack(false)
      return result
    } catch (err) {
      try {
        // A statement that got no answer still holds the connection: a ROLLBACK would only wait
        // behind it. Dropping the connection rolls the transaction back on the server.
        if (isReadTimeout(err)) throw err
        await run('ROLLBACK')
        giveBack(false)
      } catch {
        giveBack(true)
      }
      throw this.#unreachable(err, untimed)
    }
  }

  onLost(): void {}

  async close(): Promise<void> {
    await Promise.all([this.#pool.end(), this.#probePool?.end()])
  }
}

/** A PostgreSQL error from the store's thread, with its fields (code, detail, constraint…) as PGlite gave them. */
function storeError(e: WireError): Error {
  const err = Object.assign(new Error(e.message), e.fields)
  return outOfResources(err, 'the embedded store') ?? err
}

/**
 * The embedded store: PGlite on its own worker thread (core/embedded-worker.ts), so neither its
 * WebAssembly heap nor the time its queries take lands on the thread that serves requests. The
 * worker keeps the process alive only while a call is outstanding.
 */
class EmbeddedDb implements Db {
  readonly kind = 'embedded'
  readonly #worker: Worker
  readonly #release: () => void
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>()
  #nextId = 1
  #gone: Error | undefined
  #closing = false
  readonly #lost: Array<(err: Error) => void> = []

  private constructor(worker: Worker, release: () => void) {
    this.#worker = worker
    this.#release = release
    worker.unref()
    const fail = (err: Error) => {
      const first = this.#gone === undefined
      this.#gone ??= new KeygateError('store_unavailable', `the embedded store stopped: ${err.message}`, undefined, { cause: err })
      for (const p of this.#pending.values()) p.reject(this.#gone)
      this.#pending.clear()
      if (first && !this.#closing) for (const listener of this.#lost.splice(0)) listener(this.#gone)
    }
    // The store's thread is ended, as if it had crashed: the store is lost, serve stops and exits
    // 1, and the next start opens the files (recovers them, after a PANIC).
    const end = (why: string) => {
      fail(new Error(why))
      void worker.terminate()
    }
    worker.on('message', (r: Reply | Fatal) => {
      // PostgreSQL ends its session on a FATAL (an idle session or transaction timeout set on the
      // store, say); PGlite shuts the database down and is left answering nothing, its thread
      // spinning a CPU. Before (found by a review), as after a PANIC: no call came back, and
      // serve ran on without a store, /readyz 'store not answering'.
      if ('fatal' in r) {
        end(`PostgreSQL stopped on a FATAL error (${r.fatal}); the next start opens the store again`)
        return
      }
      const p = this.#pending.get(r.id)
      if (p === undefined) return
      this.#pending.delete(r.id)
      if (this.#pending.size === 0) worker.unref()
      if (r.ok) {
        p.resolve(r.value)
        return
      }
      p.reject(storeError(r.error))
      // PostgreSQL ends itself on a PANIC (a WAL write that failed: a full disk, a file size
      // limit), for its files to be recovered as after a crash; PGlite cannot, and is left broken.
      // Before (found by a review), every later call failed ("cannot drop active portal") or
      // never came back, its thread spinning a CPU, and serve ran on without a store.
      if (r.error.fields.severity === 'PANIC') end(`PostgreSQL stopped on a PANIC (${r.error.message}); the next start recovers its files, as after a crash`)
    })
    worker.on('error', fail)
    worker.on('exit', (code) => fail(new Error(`its thread exited (${code})`)))
    // A reply that could not be read here is lost, and with it which call it answered: every call
    // waiting fails (the store itself still works), rather than one waiting for ever.
    worker.on('messageerror', (err: Error) => {
      const lost = new Error(`a reply of the embedded store could not be read: ${err.message}`, { cause: err })
      for (const p of this.#pending.values()) p.reject(lost)
      this.#pending.clear()
      worker.unref()
    })
  }

  /** Starts the store's thread and resolves once PGlite is open there (in memory without `dataDir`). */
  static async open(options: WorkerOptions, release: () => void): Promise<EmbeddedDb> {
    // .ts in a clone, .js compiled into an installed package's dist/.
    const worker = new Worker(new URL(`./embedded-worker${extname(fileURLToPath(import.meta.url))}`, import.meta.url), { workerData: options })
    let onExit: ((code: number) => void) | undefined
    let onError: ((err: Error) => void) | undefined
    // Only these listeners come off afterwards: the Worker's own (which start its message port) must stay.
    const ready = await new Promise<Ready>((resolve, reject) => {
      onError = reject
      onExit = (code) => reject(new Error(`the store's thread exited (${code})`))
      worker.once('message', resolve).once('error', onError).once('exit', onExit)
    }).finally(() => worker.off('error', onError as (err: Error) => void).off('exit', onExit as (code: number) => void))
    if (!ready.ready) {
      await worker.terminate()
      throw storeError(ready.error)
    }
    return new EmbeddedDb(worker, release)
  }

  #call<T>(request: DistributiveOmit<Request, 'id'>): Promise<T> {
    if (this.#gone) return Promise.reject(this.#gone)
    const id = this.#nextId++
    return new Promise<T>((resolve, reject) => {
      if (this.#pending.size === 0) this.#worker.ref()
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject })
      try {
        this.#worker.postMessage({ ...request, id })
      } catch (err) {
        // A parameter that cannot cross the thread (a function, say): refused here, nothing left waiting.
        this.#pending.delete(id)
        if (this.#pending.size === 0) this.#worker.unref()
        reject(err as Error)
      }
    })
  }

  query<R>(text: string, params?: readonly unknown[], tx?: number): Promise<R[]> {
    return this.#call<R[]>({ op: 'query', sql: text, params, tx })
  }

  async exec(script: string, tx?: number): Promise<void> {
    await this.#call({ op: 'exec', sql: script, tx })
  }

  /** No pool to hold and no network to wait on: a probe's statement is one more call to the store's thread, bounded by the probe's own wait. */
  probing(): Queryable {
    return this
  }

  /** PGlite runs in this process: no network to wait on, so no query timeout either. */
  async transaction<T>(fn: (tx: Queryable) => Promise<T>, _options?: TransactionOptions): Promise<T> {
    const id = await this.#call<number>({ op: 'begin' })
    let result: T
    try {
      result = await fn({ query: (q, p) => this.query(q, p, id), exec: (script) => this.exec(script, id) })
    } catch (err) {
      await this.#call({ op: 'rollback', tx: id }).catch(() => {})
      throw err
    }
    await this.#call({ op: 'commit', tx: id })
    return result
  }

  onLost(listener: (err: Error) => void): void {
    if (this.#gone === undefined) this.#lost.push(listener)
  }

  async close(): Promise<void> {
    this.#closing = true
    try {
      // PGlite closes (and writes its files) on its thread; then the thread is ended.
      if (!this.#gone) await this.#call({ op: 'close' })
      this.#worker.ref()
      await this.#worker.terminate()
    } finally {
      this.#release()
    }
  }
}

type DistributiveOmit<T, K extends keyof T> = T extends unknown ? Omit<T, K> : never

/**
 * Whether a process of this pid is alive (one of another user's counts: the kill is refused, not
 * failed). A zombie is not: it has exited, and only waits for its parent to read its status
 * (found by an upgrade review: a keygate killed under an init that reaps late held its store as
 * `store_locked` until reaped).
 */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false
  }
  return processState(pid) !== 'Z'
}

/** The state letter of process `pid` (`R`, `S`, `Z`...), or undefined where it cannot be read. */
function processState(pid: number): string | undefined {
  return statFields(pid)?.[0]
}

/** The words of process `pid`'s command line where the system shows it (Linux's /proc), or undefined. */
function commandLineOf(pid: number): string[] | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')
  } catch {
    return undefined
  }
}

/** Where in a command line keygate's own program stands (`keygate`, `.../bin/keygate.js`), or -1. */
const keygateBinAt = (args: readonly string[]): number => args.findIndex((a) => /(^|\/)keygate(\.[cm]?[jt]s)?$/.test(a))

/**
 * The program process `pid` runs (its command line's first word, without the folder; never the
 * arguments, which may hold secrets), where its command line shows it is no keygate command;
 * undefined for a keygate command, or where that cannot be told. (Not /proc/PID/comm: Node names
 * its main thread `MainThread`.)
 */
function otherProgramOf(pid: number): string | undefined {
  const args = commandLineOf(pid)
  if (args === undefined || args[0] === undefined || args[0] === '' || keygateBinAt(args) !== -1) return undefined
  const name = args[0].slice(args[0].lastIndexOf('/') + 1)
  return /^[\w.+-]{1,64}$/.test(name) ? name : 'another program'
}

/** keygate's commands that are not a group: their next word is no subcommand. */
const SINGLE_COMMANDS = new Set(['serve', 'migrate'])

/**
 * Whether process `pid` is a `keygate serve --only gateway` (or `--only=gateway`). Of its flags
 * only `--only` is looked at, and only compared: the others may hold secrets.
 */
function servesGatewayOnly(pid: number): boolean {
  const args = commandLineOf(pid) ?? []
  const at = args.indexOf('--only', keygateBinAt(args) + 1)
  return (at !== -1 && args[at + 1] === 'gateway') || args.includes('--only=gateway')
}

/**
 * The keygate command process `pid` runs (`serve`, `api-key create`), read from its command line
 * where the system shows it (Linux's /proc); undefined for any other process, or where unknown.
 * Only the command's words: the flags may hold secrets (--gitea-password) and are never read.
 */
function keygateCommandOf(pid: number): string | undefined {
  const args = commandLineOf(pid)
  const bin = args === undefined ? -1 : keygateBinAt(args)
  if (args === undefined || bin === -1) return undefined
  const first = args[bin + 1]
  if (first === undefined || !/^[a-z][a-z0-9-]{0,20}$/.test(first)) return undefined
  const second = args[bin + 2]
  // A group's subcommand (`api-key create`, `deny-list add`), whichever groups there are.
  return !SINGLE_COMMANDS.has(first) && second !== undefined && /^[a-z][a-z0-9-]{0,20}$/.test(second) ? `${first} ${second}` : first
}

/** The first line of a small system file (/proc, /etc), or undefined. */
function systemLine(path: string, pattern: RegExp): string | undefined {
  try {
    const line = readFileSync(path, 'utf8').trim()
    return pattern.test(line) ? line : undefined
  } catch {
    return undefined
  }
}

/** A namespace of this process (`pid:[4026531836]`), or undefined. */
function namespace(kind: 'pid' | 'time'): string | undefined {
  try {
    const ns = readlinkSync(`/proc/self/ns/${kind}`)
    return new RegExp(`^${kind}:\\[\\d+\\]$`).test(ns) ? ns : undefined
  } catch {
    return undefined
  }
}

const bootId = () => systemLine('/proc/sys/kernel/random/boot_id', /^[0-9a-f-]{1,64}$/)
const machineId = () => systemLine('/etc/machine-id', /^[0-9a-f]{32}$/)

/** When process `pid` started, in clock ticks since the boot (field 22 of /proc/PID/stat; no wall clock, but shifted by a time namespace), or undefined. */
function startTicks(pid: number): string | undefined {
  const start = statFields(pid)?.[19]
  return start !== undefined && /^\d+$/.test(start) ? start : undefined
}

/** The fields of /proc/PID/stat after the command (the state first), or undefined where it cannot be read. */
function statFields(pid: number): string[] | undefined {
  const stat = systemLine(`/proc/${pid}/stat`, /\)/)
  // The command name, in parentheses, may hold spaces and parentheses itself: the fields are counted after the last `)`.
  return stat?.slice(stat.lastIndexOf(')') + 2).split(' ')
}

/** When this boot began, in ms since the epoch, on the wall clock as it reads now (/proc/stat's btime), or undefined. */
function bootTimeMs(): number | undefined {
  try {
    const btime = /^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'utf8'))?.[1]
    return btime === undefined ? undefined : Number(btime) * 1000
  } catch {
    return undefined
  }
}

/**
 * What the lock's owner writes beside the lock (`keygate.lock.owner`), where Linux shows it: its
 * pid, the kernel's boot id, the machine id (`-` where /etc has none), its pid and time
 * namespaces (`-` for a kernel without time namespaces) and its start in clock ticks since the
 * boot. Undefined where the boot id, the pid namespace or the start cannot be read (another
 * system, /proc hidden).
 */
export function processIdentity(pid: number): string | undefined {
  const boot = bootId()
  const pidNs = namespace('pid')
  const start = startTicks(pid)
  if (boot === undefined || pidNs === undefined || start === undefined) return undefined
  return `${pid} ${boot} ${machineId() ?? '-'} ${pidNs} ${namespace('time') ?? '-'} ${start}`
}

/** The owner file's fields: processIdentity's six, and whether the owner listens on its socket (`sock`, or `-`). */
const OWNER_FIELDS = 7

/** A lock or owner file as read: its text, and which file it was (the inode) and when it was written. */
interface LockRead {
  text: string
  dev: number
  ino: number
  mtimeMs: number
}

/**
 * Reads a lock or owner file: a regular file of at most 256 bytes, opened without following a
 * symlink or waiting on a FIFO; undefined where there is none, 'odd' for anything else (found by a
 * review: an owner file linked to /dev/zero grew a command to 13.8 GB, a FIFO hung it).
 */
function readLockFile(path: string): LockRead | 'odd' | undefined {
  let fd: number
  try {
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT') return undefined
    // A symbolic link (ELOOP) or a socket (ENXIO: it cannot be opened at all).
    if (code === 'ELOOP' || code === 'ENXIO') return 'odd'
    throw err
  }
  try {
    const st = fstatSync(fd)
    if (!st.isFile() || st.size > 256) return 'odd'
    const bytes = Buffer.alloc(256)
    const n = readSync(fd, bytes, 0, 256, 0)
    return { text: bytes.toString('utf8', 0, n).trim(), dev: st.dev, ino: st.ino, mtimeMs: st.mtimeMs }
  } finally {
    closeSync(fd)
  }
}

/**
 * The owner file's fields where it is one of OWNER_FIELDS naming pid `held`, else undefined (none,
 * odd, another format, another pid); and whether it was written for `lock` (`bound`): not before
 * it. The owner writes it after its lock, so a lock newer than the file is another lock, of the
 * same pid: one a keygate of a version before the owner file took over, leaving the file in place
 * (found by an upgrade review: a new CLI read the gone owner's file beside an old `serve`'s lock,
 * judged it gone, took the store over and lost a created key). By the time written, not the
 * inode: an inode is soon given to a new file (ext4 at once), and a lock copied into place
 * keeps its time (a review). Only a bound file tells its owner gone; any file naming the pid may
 * tell it alive (its socket answers) or out of reach (another pid namespace), and the lock stands.
 */
function ownerRecord(ownerFile: string, held: number, lock: LockRead): { fields: string[]; bound: boolean } | undefined {
  const read = ownerRead(ownerFile)
  if (read === undefined) return undefined
  const fields = read.text.split(' ')
  if (fields.length !== OWNER_FIELDS || fields[0] !== String(held)) return undefined
  return { fields, bound: lock.mtimeMs <= read.mtimeMs }
}

/** The owner file as read, or undefined where it cannot be read as one (none, odd, unreadable). */
function ownerRead(ownerFile: string): LockRead | undefined {
  try {
    const read = readLockFile(ownerFile)
    return typeof read === 'object' ? read : undefined
  } catch {
    return undefined
  }
}

/** The owner file's text (ownerRead). */
function ownerText(ownerFile: string): string | undefined {
  return ownerRead(ownerFile)?.text
}

/**
 * Whether the lock `lock`, holding pid `held`, is known to be left by a process that is gone,
 * though a process of that pid runs. After an unclean stop (a power loss, a kernel panic,
 * SIGKILL) the lock stays, and its pid is soon another process's: after a reboot, services start
 * in the same order and take the same pids, and every start was refused as `store_locked` until
 * someone removed the lock. The owner file beside it (processIdentity) tells, where it names
 * `held`:
 * - written on this machine (its machine id) in an earlier boot, by a lock older than this boot:
 *   gone. (Another boot id alone does not tell: another kernel sharing the folder, a virtual
 *   machine's, has its own, and its lock may be older than this boot too.)
 * - in this boot, this pid namespace and this time namespace (which shifts the start ticks read),
 *   by a process that started at another tick: gone, its pid taken since.
 * Anything else is judged by the pid alone, as without an owner file (a lock of a version before
 * it, or one whose owner could not write it). That includes a process in another pid namespace
 * sharing the data folder (a container): its pid means another process here, and as before, a
 * second keygate there is not told apart from one that is gone (README: one keygate to an
 * embedded store).
 */
function leftByGoneProcess(lock: LockRead, ownerFile: string, held: number): boolean {
  const owner = ownerRecord(ownerFile, held, lock)
  if (owner === undefined || !owner.bound) return false
  const recorded = owner.fields
  const [, boot, machine, pidNs, timeNs, start] = recorded
  const thisBoot = bootId()
  if (thisBoot === undefined) return false
  if (boot !== thisBoot) {
    const booted = bootTimeMs()
    return machine !== '-' && machine === machineId() && booted !== undefined && lock.mtimeMs < booted - 1000
  }
  if (pidNs !== namespace('pid') || timeNs !== (namespace('time') ?? '-')) return false
  const now = startTicks(held)
  return now !== undefined && now !== start
}

/**
 * Listens on `socketFile` (a stale one of a gone owner removed first) for as long as the lock is
 * held, answering nothing: a process that connects learns the owner runs (ownerListening). Not
 * kept for the event loop. Undefined where it cannot (a path longer than a socket's 107 bytes, a
 * file system without sockets): the lock is then judged as without one.
 */
async function listenForLiveness(socketFile: string): Promise<net.Server | undefined> {
  try {
    unlinkSync(socketFile)
  } catch {}
  const server = net.createServer((socket) => socket.destroy())
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen({ path: socketFile, exclusive: true }, () => resolve())
    })
  } catch {
    server.close()
    return undefined
  }
  server.on('error', () => {})
  server.unref()
  return server
}

/**
 * Whether the lock's owner answers on its socket, where the owner file names `held` in this boot
 * (the kernel's sockets are this kernel's): 'alive' when it answers, in any pid namespace (two
 * containers sharing a data folder: a container's keygate has a pid that means another process
 * here, or this process's own; found by a review, both then opened the store), 'gone' when the
 * socket is there and refuses (its owner is gone, whatever runs under its pid now), and
 * 'unknown' otherwise (no owner file naming `held`, another boot or kernel, no socket: an owner
 * of a version before it, or one that could not listen), for the pid to judge. A stopped (frozen)
 * owner still answers: the kernel takes the connection.
 */
async function ownerListening(socketFile: string, ownerFile: string, held: number, lock: LockRead): Promise<'alive' | 'gone' | 'unknown'> {
  const owner = ownerRecord(ownerFile, held, lock)
  // Only an owner that says it listens: one that could not would leave a stale socket refusing.
  if (owner === undefined || owner.fields[1] !== bootId() || owner.fields[6] !== 'sock') return 'unknown'
  // A socket that refuses says its owner is gone only where the file speaks for this lock.
  const refused = owner.bound ? 'gone' : 'unknown'
  return new Promise((resolve) => {
    const socket = net.connect({ path: socketFile })
    const done = (verdict: 'alive' | 'gone' | 'unknown') => {
      socket.destroy()
      clearTimeout(timer)
      resolve(verdict)
    }
    // A connection the kernel cannot queue (EAGAIN) is an owner too busy to take one: alive.
    const timer = setTimeout(() => done('alive'), 2000)
    socket.once('connect', () => done('alive'))
    socket.once('error', (err: NodeJS.ErrnoException) => done(err.code === 'ECONNREFUSED' ? refused : err.code === 'EAGAIN' ? 'alive' : 'unknown'))
  })
}

/** The signals that end a short command, whose default action skips 'exit' handlers (lockDataDir). */
const LOCK_SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const

/**
 * The embedded store is one process's: a lock file holding the owner's pid keeps a second
 * process (a CLI beside a running server) from opening and corrupting it. A lock left by a
 * process that no longer runs is taken over, and so is one whose pid another process has
 * since taken (leftByGoneProcess): the owner's identity is written beside the lock, in
 * `keygate.lock.owner`, once the lock is held. The lock itself holds the pid alone, as before,
 * so a keygate of an earlier version still reads it.
 *
 * The lock appears with the pid already in it (written to a file of this process's own, then
 * hard-linked into place; a link fails if the lock exists), so no process ever reads an empty
 * lock and takes it for stale. A stale lock is moved aside under a name of this process's own
 * before it is replaced, and checked to be the very file judged stale (its inode, not its text:
 * a live keygate that took a stale lock of its own pid over meanwhile wrote the same text; found
 * by a review): two processes taking over the same stale lock cannot both win. A process removes
 * the lock only while it still holds its pid.
 */
async function lockDataDir(dir: string, hints: { other: string; server: string; gatewayOnly?: string }, shortLived: boolean): Promise<() => void> {
  const file = join(dir, 'keygate.lock')
  const pid = String(process.pid)
  const mine = ownTempName(file)
  const ownerFile = `${file}.owner`
  const socketFile = `${file}.sock`
  /** What this process wrote to the owner file: its identity, and whether it listens (`sock`, or `-`). */
  let owned: string | undefined
  let listening: net.Server | undefined
  let unlockTaking: (() => void) | undefined
  // Once: the marker is known by its inode, which the file system may give another process's
  // marker once this one is gone (a signal after the lock was taken would have removed that one;
  // found by a review).
  const giveTakingBack = () => {
    const give = unlockTaking
    unlockTaking = undefined
    give?.()
  }
  const release = () => {
    // The socket first, then the owner file: removed with the lock still held, neither is ever
    // another process's.
    // The socket's file before the server closes (found by a review): in between, a process
    // asking would be refused and judge this owner gone, and this unlink would then remove its
    // new socket. Without the file it asks nothing, and the pid judges.
    if (listening !== undefined) {
      try {
        unlinkSync(socketFile)
      } catch {}
      listening.close()
      listening = undefined
    }
    if (owned !== undefined && ownerText(ownerFile) === owned) {
      try {
        unlinkSync(ownerFile)
      } catch {}
    }
    try {
      const lock = readLockFile(file)
      if (typeof lock === 'object' && lock.text === pid) unlinkSync(file)
    } catch {}
  }
  let linked = false
  // A short command (the CLI's) ended by SIGINT, SIGTERM or SIGHUP: Node's default action ends it
  // without 'exit' handlers, and a Ctrl-C of a long import left the lock, its owner file and
  // socket behind (found by a review). Given back here, then the command ends by the same signal,
  // as before, unless something else of the process handles it. (`serve` handles its signals
  // itself, and closes the store as it stops.) From the moment this process's own file is
  // written, not once the lock is held: a Ctrl-C while waiting for another process's
  // keygate.lock.taking, up to 20 s, left that file behind for good (found by a review), and one
  // while this process held the marker left it for the next command to wait on.
  const onSignal = (signal: NodeJS.Signals) => {
    for (const s of LOCK_SIGNALS) process.off(s, onSignal)
    if (linked) release()
    giveTakingBack()
    try {
      unlinkSync(mine)
    } catch {}
    if (process.listenerCount(signal) === 0) process.kill(process.pid, signal)
  }
  if (shortLived) for (const s of LOCK_SIGNALS) process.on(s, onSignal)
  const offSignals = () => {
    for (const s of LOCK_SIGNALS) process.off(s, onSignal)
  }
  // Outside the try below, which removes it: a write that fails removes it itself (before, found
  // by a review, one that failed on a full disk left it behind, empty).
  try {
    writeNewFile(mine, pid, 0o600, false)
  } catch (err) {
    offSignals()
    throw err
  }
  const identity = processIdentity(process.pid)
  try {
    unlockTaking = await takingLock(dir)
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        linkSync(mine, file)
        linked = true
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
      }
      if (linked) {
        // Given back also when the process exits without closing the store: `serve` stopped during
        // its start exits at once (process.exit), and left the lock, its owner file and socket
        // behind, a stopped store that looked in use (found by a deployment review; the next
        // start took them over). Only a SIGKILL leaves them now. From the moment it is linked
        // (an exit while the socket below starts listening too).
        const onExit = () => release()
        process.once('exit', onExit)
        // Listening before the owner file is written: a process that reads this owner file
        // finds this socket answering (ownerListening).
        if (identity !== undefined) {
          listening = await listenForLiveness(socketFile)
          owned = `${identity} ${listening === undefined ? '-' : 'sock'}`
          writeOwner(ownerFile, owned)
          notOlderThan(ownerFile, mine)
        }
        return () => {
          process.off('exit', onExit)
          offSignals()
          release()
        }
      }
      const lock = readLockFile(file)
      if (lock === undefined) continue // released meanwhile
      if (lock === 'odd') throw new KeygateError('store_unavailable', `cannot lock the embedded store in ${dir}: ${file} is not a lock keygate writes (a symbolic link, a folder, or a file of another kind or size); if no keygate process uses the store, remove it`)
      const held = lock.text
      const owner = Number(held)
      const valid = Number.isInteger(owner) && owner > 0
      // The owner's socket tells first where it can (ownerListening). An owner of another pid
      // namespace that cannot be asked (it could not listen: a data folder path too long for a
      // socket; found by a review, a container of pid 1 then took it over as its own) holds it.
      // Else its pid, as before.
      const liveness = valid ? await ownerListening(socketFile, ownerFile, owner, lock) : 'unknown'
      const unaskable = liveness === 'unknown' && valid && otherNamespaceOf(ownerFile, owner, lock)
      if (liveness === 'alive' || unaskable || (liveness === 'unknown' && valid && owner !== process.pid && processAlive(owner) && !leftByGoneProcess(lock, ownerFile, owner))) {
        const named = keygateCommandOf(owner)
        const gatewayOnly = hints.gatewayOnly !== undefined && named === 'serve' && servesGatewayOnly(owner) ? hints.gatewayOnly : undefined
        const command = gatewayOnly !== undefined ? 'serve --only gateway' : named
        // Another command ends by itself: the advice for a server (stop it, or use its admin API)
        // misled there (found by a review: three parallel creates, two told to use an admin API).
        // A server never ends by itself: its holder is told what to do about a server, which may
        // differ from the advice where the holder cannot be named (found by a docs walk: a second
        // serve was told to wait for the first to end, "a keygate command ends by itself").
        const why = gatewayOnly ?? (command === 'serve' ? hints.server : command === undefined ? hints.other : 'run this command again once it has ended (a keygate command ends by itself)')
        // A program that is no keygate command holds the pid: most likely the lock's owner is
        // gone, and what cannot be told gone (leftByGoneProcess) is the operator's to judge.
        // Not where the owner file names another pid namespace: there the pid is another
        // process's by nature (a container's keygate, alive or not; found by a review).
        const elsewhere = otherNamespaceOf(ownerFile, owner, lock)
        const other = command === undefined && !elsewhere ? otherProgramOf(owner) : undefined
        const inUse = `the embedded store in ${dir} is in use by process ${owner}`
        throw new KeygateError(
          'store_locked',
          elsewhere
            ? `${inUse} of another pid namespace (a container sharing the data folder; its pid here is another process): stop that keygate; if it is gone, remove ${file} and ${ownerFile}`
            : other !== undefined
              ? `${inUse} (${other}, no keygate command): if no keygate process uses this store, the lock was left by one that is gone, and its pid is ${other}'s since: remove ${file} and ${ownerFile}; else ${why}`
              : `${inUse}${command === undefined ? '' : ` (keygate ${command})`}; ${why}`,
          { pid: owner, ...(command === undefined ? {} : { command }) },
        )
      }
      const aside = `${file}.stale.${pid}`
      try {
        renameSync(file, aside)
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue // another process moved it first
        throw err
      }
      // Another process may have taken the stale lock over between the read and the move: then
      // what was moved is its live lock (another file, whatever its text), which goes back.
      const moved = statSync(aside)
      if (moved.ino !== lock.ino || moved.dev !== lock.dev) {
        try {
          linkSync(aside, file)
        } catch {}
        unlinkSync(aside)
        continue
      }
      unlinkSync(aside)
      // The gone owner's identity goes with its lock: were a process of its pid to take the lock
      // next, its lock would read as left by a gone process until it wrote its own.
      if (ownerText(ownerFile)?.split(' ')[0] === held) {
        try {
          unlinkSync(ownerFile)
        } catch {}
      }
    }
    throw new KeygateError('store_locked', `could not lock the embedded store in ${dir}`)
  } catch (err) {
    // Not held: nothing is left to give back (held, the lock is given back at exit or signal).
    if (!linked) offSignals()
    throw err
  } finally {
    giveTakingBack()
    unlinkSync(mine)
  }
}

/** How old a marker of a lock being taken may be before it counts as left by a process that died taking it (it is held for milliseconds). */
const TAKING_STALE_MS = 10_000
/** How long a process waits for another to finish taking the lock, at most. */
const TAKING_WAIT_MS = 20_000

/**
 * Takes `keygate.lock.taking`, a marker that one process at a time holds while it takes the lock
 * (links it, or judges a lock there and takes it over, and writes its owner file and socket);
 * resolves with its release. Found by a review, each step alone left a gap: a lock linked and its
 * owner file not yet written read as an earlier version's (a container of pid 1 then took it over
 * as its own), and a stale lock moved aside by one process while a second took it over and a
 * third linked its own lost the second's lock (both ran). Created exclusively; a marker older or
 * younger than TAKING_STALE_MS by the clock is a dead process's and is removed (judged by age, not
 * pid: a container's pid means another process here). A keygate of a version before it takes
 * the lock without it, as before.
 */
async function takingLock(dir: string): Promise<() => void> {
  const marker = join(dir, 'keygate.lock.taking')
  const mine = String(process.pid)
  const until = Date.now() + TAKING_WAIT_MS
  for (;;) {
    try {
      writeNewFile(marker, mine, 0o600, false)
      // Released by its inode, not its text: a container's process of the same pid may have
      // removed it as stale and made its own.
      const made = statSync(marker)
      return () => {
        try {
          const held = readLockFile(marker)
          if (typeof held === 'object' && held.ino === made.ino && held.dev === made.dev) unlinkSync(marker)
        } catch {}
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
    const held = readLockFile(marker)
    if (held === 'odd') throw new KeygateError('store_unavailable', `cannot lock the embedded store in ${dir}: ${marker} is not a file keygate writes; if no keygate process uses the store, remove it`)
    if (held !== undefined && Math.abs(Date.now() - held.mtimeMs) > TAKING_STALE_MS) {
      try {
        unlinkSync(marker)
      } catch (err) {
        // One that cannot be removed would be met again at once, for ever (found by a review: a
        // marker made immutable spun a CPU past the wait's bound).
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new KeygateError('store_unavailable', `cannot lock the embedded store in ${dir}: ${marker}, left by a process that died taking the lock, cannot be removed (${systemErrorWords(err)}); remove it`)
      }
      continue
    }
    if (Date.now() > until) throw new KeygateError('store_locked', `another keygate process has been taking the lock of the embedded store in ${dir} for ${TAKING_WAIT_MS / 1000} s (${marker}); try again, or remove that file if no keygate process runs`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/**
 * Whether the owner file names `held` in a pid namespace other than this process's, in this boot:
 * a process whose pid means another one here (a container), which only its socket can speak for.
 */
function otherNamespaceOf(ownerFile: string, held: number, lock: LockRead): boolean {
  const recorded = ownerRecord(ownerFile, held, lock)?.fields
  return recorded !== undefined && recorded[1] === bootId() && recorded[3] !== namespace('pid')
}

/**
 * Dates `ownerFile` no earlier than `lockFile`, where a clock stepped back between their writes
 * (the lock's is written before the wait for keygate.lock.taking, up to 20 s): an owner file older
 * than its lock never says its owner is gone (ownerRecord), and the store would stay locked after
 * this process was (found by a review).
 */
function notOlderThan(ownerFile: string, lockFile: string): void {
  try {
    const lock = statSync(lockFile)
    const owner = statSync(ownerFile)
    // A millisecond more: seconds as a double, and the kernel's rounding, may land a little short.
    if (owner.mtimeMs < lock.mtimeMs) utimesSync(ownerFile, owner.atime, (lock.mtimeMs + 1) / 1000)
  } catch {}
}

/**
 * Writes the lock owner's identity beside the lock, whole (through a file of this process's
 * own, renamed into place). Not flushed: after a crash the file may be gone or empty, and the
 * lock is then judged by its pid alone, as without one. A write that fails (a full disk) leaves
 * the lock so judged too, and is no reason to refuse the store.
 */
function writeOwner(ownerFile: string, identity: string): void {
  const temp = ownTempName(ownerFile)
  try {
    writeNewFile(temp, identity, 0o600, false)
    renameSync(temp, ownerFile)
  } catch {
    try {
      unlinkSync(temp)
    } catch {}
  }
}

/**
 * The folder PGlite keeps the database in, readable by its owner only. PGlite writes its files
 * with mode 0666 (the catalogs, pg_control, the WAL; found by a review): in a data folder made
 * by an operator or systemd's StateDirectory (0755), every local user could change or destroy
 * the key store. A folder of 0700 closes them all, whatever their own modes; one made by an
 * earlier keygate is tightened, if this user owns it.
 */
function privateFolder(path: string): void {
  makeFolders(path, 0o700)
  if ((statSync(path).mode & 0o077) === 0) return
  try {
    chmodSync(path, 0o700)
  } catch (err) {
    // Not this user's folder (a group-writable volume of a container platform that runs under
    // an arbitrary uid): its layout is its owner's choice, and the store opens as before.
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') throw err
  }
}

/** The name of user `uid` in /etc/passwd; undefined when it has none there. */
function userName(uid: number): string | undefined {
  try {
    for (const line of readFileSync('/etc/passwd', 'utf8').split('\n')) {
      const [name, , id] = line.split(':')
      if (name && id !== undefined && id !== '' && Number(id) === uid) return name
    }
  } catch {}
  return undefined
}

interface ForeignOwner {
  uid: number
  user: string | undefined
  /** Writable by every user (a shared volume: /tmp, a Kubernetes emptyDir). */
  everyone?: boolean
}

/**
 * The owner of `path`, a folder of the embedded store, when it is another user than this
 * process's (undefined when it is this user's or is not there). A folder this process may write
 * into through its group (a group-writable volume of a platform that runs under an arbitrary uid)
 * is not another user's: only root writes into a folder regardless of its mode, and that is what
 * breaks the store of the user it belongs to.
 */
function foreignOwner(path: string): ForeignOwner | undefined {
  const euid = process.geteuid?.()
  if (euid === undefined) return undefined // Windows: no owners to compare
  let stat
  try {
    stat = statSync(path)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined
    throw err
  }
  if (stat.uid === euid) return undefined
  const byGroup = (stat.mode & 0o020) !== 0 && (stat.gid === process.getegid?.() || (process.getgroups?.() ?? []).includes(stat.gid))
  if (euid !== 0 && byGroup) return undefined
  return { uid: stat.uid, user: userName(stat.uid), everyone: (stat.mode & 0o002) !== 0 }
}

/** `uid N (name)`, and how to run a command as that user. */
function ownerWords(owner: ForeignOwner): { who: string; runAs: string } {
  // sudo takes a uid as '#N', quoted, since # starts a comment in a shell.
  const sudoUser = owner.user ?? `'#${owner.uid}'`
  return {
    who: `uid ${owner.uid}${owner.user ? ` (${owner.user})` : ''}`,
    runAs: `run keygate as that user, such as \`sudo -u ${sudoUser} keygate …\``,
  }
}

/**
 * Refuses a data folder, or PGlite's folder in it, that another user owns, before anything is
 * written there. Found by a review: root's `keygate api-key create --data-dir` on the folder of a
 * service running as its own user left the encryption key and files of PGlite's (mode 0600)
 * owned by root, and the service then failed to start with "Aborted(). Build with
 * -sASSERTIONS…". PostgreSQL itself refuses a data folder it does not own, for the same reason.
 */
function refuseForeignFolders(dir: string, pgdata: string): void {
  for (const folder of [dir, pgdata]) {
    let owner: ForeignOwner | undefined
    try {
      owner = foreignOwner(folder)
    } catch (err) {
      throw new KeygateError('store_unavailable', `cannot open the embedded store in ${dir}: ${systemErrorWords(err)} (${folder})`, undefined, { cause: err })
    }
    if (owner === undefined) continue
    const { who } = ownerWords(owner)
    // A folder every user may write into is a shared volume, not another user's store: running as
    // its owner (root, most often) is the wrong advice (found by a deployment review, for an
    // emptyDir in a pod that runs as a user of its own).
    const runAs = owner.everyone
      ? `it is open to every user (a shared volume, such as a Kubernetes emptyDir): point KEYGATE_DATA_DIR (store.data_dir) at a folder inside it, which keygate makes as this user's own, or give the volume this user's group (a pod's securityContext.fsGroup)`
      : ownerWords(owner).runAs
    throw new KeygateError(
      'store_unavailable',
      `the embedded store's folder ${folder} belongs to ${who}, not to this process's user (uid ${process.geteuid?.()}): files written there as this user can be unreadable to their owner, whose store then fails to start; ${runAs}`,
      { uid: owner.uid, ...(owner.user ? { user: owner.user } : {}) },
    )
  }
}

/** The most entries of PGlite's folder looked at for one of another user (a store holds about 1,500). */
const MAX_LOOKED_AT = 100_000

/**
 * The first file or folder in `pgdata` that another user owns and this process's user cannot
 * read and write, or undefined (also as root, who reads everything, and on Windows). Looked for
 * only once PGlite has failed to open the store: a command an older keygate ran as root on a
 * service's folder left root's files (mode 0600) in it, and PGlite then ended with "Aborted()"
 * and nothing more. Files written so are not looked for at every open: it costs a walk of the
 * folder, and the folders' own owners are checked before anything is written (refuseForeignFolders).
 */
function unreachableFileIn(pgdata: string): { path: string; owner: ForeignOwner } | undefined {
  const euid = process.geteuid?.()
  if (euid === undefined || euid === 0) return undefined
  const foreign = (path: string, uid: number) => ({ path, owner: { uid, user: userName(uid) } })
  return firstInFolder(
    pgdata,
    (path, stat) => {
      if (stat.uid === euid) return undefined
      try {
        accessSync(path, fsConstants.R_OK | fsConstants.W_OK)
        return undefined
      } catch {
        return foreign(path, stat.uid)
      }
    },
    // Not listable: another user's is the answer; this user's own (a mode it set) is not what is looked for.
    (folder) => {
      const uid = lstatOrNone(folder)?.uid
      return uid !== undefined && uid !== euid ? foreign(folder, uid) : undefined
    },
  )
}

/**
 * The first answer `pick` gives for an entry of `folder` (its path and lstat), walked depth first,
 * at most MAX_LOOKED_AT entries, symbolic links not followed (PGlite makes none; a target's owner
 * is not the store's); `unlistable` answers for a folder that cannot be listed.
 */
function firstInFolder<T>(folder: string, pick: (path: string, stat: Stats) => T | undefined, unlistable: (folder: string) => T | undefined = () => undefined): T | undefined {
  const folders = [folder]
  let looked = 0
  while (folders.length > 0 && looked < MAX_LOOKED_AT) {
    const current = folders.pop() as string
    let names: string[]
    try {
      names = readdirSync(current)
    } catch {
      const answer = unlistable(current)
      if (answer !== undefined) return answer
      continue
    }
    for (const name of names) {
      looked++
      const path = join(current, name)
      const stat = lstatOrNone(path)
      if (stat === undefined || stat.isSymbolicLink()) continue
      const answer = pick(path, stat)
      if (answer !== undefined) return answer
      if (stat.isDirectory()) folders.push(path)
    }
  }
  return undefined
}

/**
 * The first file or folder in `pgdata` (or `pgdata` itself) of this process's user whose mode
 * denies that user reading and writing it (and searching a folder), or undefined (also as root,
 * whom modes do not stop, and on Windows). Looked for only once PGlite has failed to open the
 * store, as unreachableFileIn: before (found by a review), a store restored from a read-only
 * snapshot, or a `chmod` gone wrong, failed with "PGlite failed to initialize properly" or
 * "Aborted()", naming nothing.
 */
function ownFileWithoutRights(pgdata: string): { path: string; mode: number } | undefined {
  const euid = process.geteuid?.()
  if (euid === undefined || euid === 0) return undefined
  const lacks = (stat: Stats): boolean => {
    const needed = stat.isDirectory() ? 0o700 : 0o600
    return stat.uid === euid && (stat.mode & needed) !== needed
  }
  const top = lstatOrNone(pgdata)
  if (top !== undefined && lacks(top)) return { path: pgdata, mode: top.mode & 0o7777 }
  return firstInFolder(pgdata, (path, stat) => (lacks(stat) ? { path, mode: stat.mode & 0o7777 } : undefined))
}

/** lstat of `path`, or undefined when it cannot be read (gone, or a folder on the way this user may not search). */
function lstatOrNone(path: string): Stats | undefined {
  try {
    return lstatSync(path)
  } catch {
    return undefined
  }
}

/** The file beside pgdata/ while a store is being made in it (see openDb). */
const MAKING_MARK = 'keygate.making'

/**
 * Refuses PGlite's folder when it holds a database's files (`base/` or `global/`) without
 * PG_VERSION: PGlite makes a new store (initdb) wherever PG_VERSION is missing, whatever is
 * there, and a store whose PG_VERSION was lost (a restore or copy that missed it, a damaged file
 * system) was made anew over its files by the next `serve`, `migrate` or `api-key create`, its
 * keys gone (found by a review). PostgreSQL's own initdb refuses a folder that is not empty.
 */
function refuseStoreWithoutMark(dir: string, pgdata: string): void {
  const mark = join(pgdata, 'PG_VERSION')
  if (lstatOrNone(mark) !== undefined) return
  if (!['base', 'global'].some((name) => lstatOrNone(join(pgdata, name))?.isDirectory())) return
  throw new KeygateError(
    'store_unavailable',
    `the embedded store in ${dir} has lost ${mark}, PostgreSQL's mark of a data folder, but still holds a database's files: keygate makes no new store over them, which would lose every key in it. Restore the data folder from a backup, or PG_VERSION alone: each database's folder holds the same file (cp ${join(pgdata, 'base', '1', 'PG_VERSION')} ${mark}); if this folder never held a store (a first start of an earlier keygate, cut short), remove ${pgdata}`,
  )
}

/** Removes what `folder` holds, leaving it empty; what cannot be removed stays (the next start says so). */
function emptyFolder(folder: string): void {
  let names: string[]
  try {
    names = readdirSync(folder)
  } catch {
    return
  }
  for (const name of names) {
    try {
      rmSync(join(folder, name), { recursive: true, force: true })
    } catch {}
  }
}

/** PostgreSQL's own mark of a data folder initdb has made, in PGlite's folder (see privateFolder). */
const storeMark = (dir: string) => join(dir, 'pgdata', 'PG_VERSION')

/**
 * Whether an embedded store has been made in `dir` (a data folder): PG_VERSION, without the mark
 * of a making under way or cut short (PGlite writes PG_VERSION early in its making).
 */
export function embeddedStoreExists(dir: string): boolean {
  const at = resolve(dir)
  return existsSync(storeMark(at)) && !existsSync(join(at, MAKING_MARK))
}

/**
 * Refuses a data folder that holds no store (`advice` says what to do), and one this user cannot
 * read, as such: before (found by a review), a folder that could not be read (existsSync's false
 * on EACCES) was reported as holding no store, with the advice to make one there.
 */
function requireStore(dir: string, advice: string): void {
  const mark = storeMark(dir)
  try {
    statSync(mark)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      // A store that lost PG_VERSION is a store, not none: said so, as every command that opens
      // it says (before, found by a review, a command that only reads advised making one there).
      refuseStoreWithoutMark(dir, join(dir, 'pgdata'))
      throw new KeygateError('store_unavailable', `no embedded store in ${dir}: ${advice}`)
    }
    let owner: ForeignOwner | undefined
    try {
      owner = foreignOwner(dir)
    } catch {}
    const words = owner ? ownerWords(owner) : undefined
    throw new KeygateError(
      'store_unavailable',
      `cannot read the embedded store in ${dir}: ${systemErrorWords(err)} (${mark})${words ? `; ${dir} belongs to ${words.who}: ${words.runAs}` : ''}`,
      undefined,
      { cause: err },
    )
  }
}

export interface OpenDbOptions {
  databaseUrl?: string | undefined
  dataDir?: string | undefined
  poolMax?: number
  /** PostgreSQL: a statement unanswered after this long fails (store_unavailable); 0 or absent for no limit (config: store.query_timeout_ms). */
  queryTimeoutMs?: number
  /** An embedded store in memory only (tests). */
  memory?: boolean
  /** What a store_locked refusal advises after naming the owner (default: a CLI command's way, through the admin API). */
  lockedHint?: string
  /** What it advises instead when the owner is a `keygate serve` (default: lockedHint). */
  serverHeldHint?: string
  /**
   * The embedded store only if one is there: a data folder that holds none is refused
   * (store_unavailable, naming it, then this advice) and left as it is. For commands that only
   * read: before (found by a review), a mistyped --data-dir, or ./.keygate from the wrong working
   * folder, became a new empty store, and `validate` answered key_invalid from it.
   */
  existingOnly?: string
  /**
   * The embedded store serves one short command (the CLI's): it starts with 16 MB of shared
   * buffers, not PostgreSQL's 128 MB, which a few queries never fill and whose zeroing at start
   * was about a third of the CPU of opening the store (1.0 s against 1.5 s, here).
   */
  shortLived?: boolean
  /** The embedded store's shared_buffers in MiB, when not `shortLived` (config: store.embedded_shared_buffers_mb); absent: PostgreSQL's 128. */
  sharedBuffersMb?: number
  /**
   * PostgreSQL: how long to go on trying, once a second, while it is not up yet (isNotUpYet);
   * `onWait` is told of each failed try (config: store.start_wait_s; `serve` only). Absent: no wait.
   */
  waitMs?: number
  onWait?: (err: Error, waitedMs: number) => void
  /** Told once PostgreSQL answered, with how long it took (a start that waited says so). */
  onReached?: (waitedMs: number) => void
}

/** How often a start waiting for PostgreSQL (OpenDbOptions.waitMs) tries again. */
const START_RETRY_MS = 1000

/**
 * Failures of a PostgreSQL that is not up yet, or not reachable yet, and may be in a moment: a
 * refused, reset or timed-out connection, a host name not resolved (yet), a server starting up
 * (57P03) or out of connections (53300), a connection ended by the server as it starts. Not a
 * wrong password or database name: waiting would not mend them.
 */
export function isNotUpYet(err: Error): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code
    if (typeof code === 'string' && NOT_UP_YET.has(code)) return true
    if (NOT_UP_YET_WORDS.has(e.message)) return true
  }
  return false
}
/** The driver's errors of that kind that carry no code (pg and pg-pool). */
const NOT_UP_YET_WORDS = new Set(['Connection terminated unexpectedly', 'timeout expired', 'Connection terminated due to connection timeout', 'timeout exceeded when trying to connect'])
// A name not found is waited for too: a Compose service's or a Kubernetes Service's name resolves
// only once it exists (a review's `db` failed at once). A mistyped one is said every 10 s meanwhile.
const NOT_UP_YET = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ENOTFOUND', '57P03', '53300'])

/** Where the embedded store lives without store.data_dir: the working folder's `.keygate`. */
export const DEFAULT_DATA_DIR = './.keygate'

/** PostgreSQL's shared_buffers for an embedded store opened by a short command. */
const SHORT_LIVED_SHARED_BUFFERS = '16MB'

export async function openDb(options: OpenDbOptions): Promise<Db> {
  if (options.databaseUrl) {
    const { default: driver } = await import('pg')
    const db = new PostgresDb(driver.Pool, options.databaseUrl, options.poolMax ?? 10, options.queryTimeoutMs ?? 0)
    const started = performance.now()
    for (;;) {
      try {
        await db.query('SELECT 1')
        options.onReached?.(performance.now() - started)
        return db
      } catch (err) {
        // The driver's own words, not those of the store_unavailable it was already wrapped in.
        const cause = isKeygateError(err) && err.cause instanceof Error ? err.cause : (err as Error)
        const waited = performance.now() - started
        // Tried until the wait has passed (before, found by a review, a second short of it: 1 s waited not at all).
        const notUpYet = isNotUpYet(cause)
        if (!notUpYet || waited >= (options.waitMs ?? 0)) {
          await db.close().catch(() => {})
          const after = options.waitMs && notUpYet ? ` (still, after trying for ${Math.round(waited / 1000)} s)` : ''
          throw new KeygateError('store_unavailable', `cannot reach ${postgresAt(options.databaseUrl)}: ${cause.message}${after}`, undefined, { cause })
        }
        options.onWait?.(cause, waited)
        await new Promise((r) => setTimeout(r, START_RETRY_MS))
      }
    }
  }
  const sharedBuffers = options.shortLived ? SHORT_LIVED_SHARED_BUFFERS : options.sharedBuffersMb !== undefined ? `${options.sharedBuffersMb}MB` : undefined
  if (options.memory) return EmbeddedDb.open({ dataDir: undefined, sharedBuffers }, () => {})
  const dir = resolve(options.dataDir ?? DEFAULT_DATA_DIR)
  const pgdata = join(dir, 'pgdata')
  // While a store is being made, `keygate.making` beside pgdata/ says so: a making cut short (the
  // process killed during PGlite's initdb) is known by it, and holds nothing yet.
  const makingMark = join(dir, MAKING_MARK)
  const takeLock = async (): Promise<() => void> => {
    try {
      const other = options.lockedHint ?? STORE_LOCKED_HINT
      // The CLI's own advice (no lockedHint given) has a word for a gateway-only server too.
      const gatewayOnly = options.lockedHint === undefined ? { gatewayOnly: GATEWAY_ONLY_HINT } : {}
      return await lockDataDir(dir, { other, server: options.serverHeldHint ?? other, ...gatewayOnly }, options.shortLived === true)
    } catch (err) {
      if (isKeygateError(err)) throw err
      const at = (err as NodeJS.ErrnoException).path
      throw new KeygateError('store_unavailable', `cannot lock the embedded store in ${dir}: ${systemErrorWords(err)}${at ? ` (${at})` : ''}`, undefined, { cause: err })
    }
  }
  if (options.existingOnly !== undefined) {
    // A store being made is its maker's (store_locked, from its lock), and one whose making was
    // cut short holds none. Before (found by a docs walk), a command run during `serve`'s first
    // start was told there was no store, to make one with `keygate serve`, or that the store had
    // lost PG_VERSION and pgdata/ could be removed. With PG_VERSION too, which PGlite writes
    // early in its making: before (found by a review), a making killed after it passed for a
    // store, and a command that only reads emptied pgdata/ and made a new store there.
    if (lstatOrNone(makingMark) !== undefined) {
      refuseForeignFolders(dir, pgdata)
      ;(await takeLock())()
      if (lstatOrNone(makingMark) !== undefined) throw new KeygateError('store_unavailable', `no embedded store in ${dir}: ${options.existingOnly}`)
    }
    requireStore(dir, options.existingOnly)
  }
  refuseForeignFolders(dir, pgdata)
  try {
    makeFolders(dir, 0o700)
  } catch (err) {
    throw new KeygateError('store_unavailable', `cannot create the embedded store folder ${dir}: ${systemErrorWords(err)}`, undefined, { cause: err })
  }
  const release = await takeLock()
  let making: boolean
  try {
    privateFolder(pgdata)
    const cutShort = lstatOrNone(makingMark) !== undefined
    if (cutShort) emptyFolder(pgdata)
    making = readdirSync(pgdata).length === 0
    if (!making) refuseStoreWithoutMark(dir, pgdata)
    else if (!cutShort) writeNewFile(makingMark, `${process.pid}\n`, 0o600, true)
  } catch (err) {
    release()
    if (isKeygateError(err)) throw err
    throw new KeygateError('store_unavailable', `cannot prepare the embedded store folder ${pgdata}: ${systemErrorWords(err)}`, undefined, { cause: err })
  }
  let db: EmbeddedDb
  try {
    db = await EmbeddedDb.open({ dataDir: pgdata, sharedBuffers }, release)
  } catch (err) {
    // A store being made that failed (a full disk, a file size limit) holds nothing yet: what
    // PGlite left goes, so that the next start makes it anew. Before (found by a review), a partial
    // store with PG_VERSION in it was left, which every later start failed to open ("Aborted()").
    if (making) {
      emptyFolder(pgdata)
      try {
        unlinkSync(makingMark)
      } catch {}
    }
    release()
    let foreign: ReturnType<typeof unreachableFileIn>
    // The store is this user's own (its folder is): the file is the stray, given back with chown.
    // In a folder shared through its group, the store may be the other user's: run as that user.
    let mine = true
    try {
      foreign = unreachableFileIn(pgdata)
      mine = statSync(pgdata).uid === process.geteuid?.()
    } catch {}
    if (foreign !== undefined) {
      const { who, runAs } = ownerWords(foreign.owner)
      const mend = mine ? `give the store's files back to its user, as root: chown -R ${process.geteuid?.()}:${process.getegid?.()} ${dir}` : runAs
      throw new KeygateError(
        'store_unavailable',
        `cannot open the embedded store in ${dir}: ${foreign.path} belongs to ${who}, not to this process's user (uid ${process.geteuid?.()}), which cannot both read and write it (was a command run as that user on this folder?); ${mend}`,
        { uid: foreign.owner.uid, ...(foreign.owner.user ? { user: foreign.owner.user } : {}) },
        { cause: err },
      )
    }
    let denied: ReturnType<typeof ownFileWithoutRights>
    try {
      denied = ownFileWithoutRights(pgdata)
    } catch {}
    if (denied !== undefined) {
      throw new KeygateError(
        'store_unavailable',
        `cannot open the embedded store in ${dir}: ${denied.path} (mode ${denied.mode.toString(8).padStart(4, '0')}) is not both readable and writable by its owner, this process's user (uid ${process.geteuid?.()}): give the store's files back their owner's rights: chmod -R u+rwX ${pgdata}`,
        undefined,
        { cause: err },
      )
    }
    throw new KeygateError('store_unavailable', `cannot open the embedded store in ${dir}: ${(err as Error).message}`, undefined, { cause: err })
  }
  // Made: from here on it holds what keygate writes, and is never emptied as a making cut short.
  if (making) {
    try {
      unlinkSync(makingMark)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        await db.close().catch(() => {})
        throw new KeygateError('store_unavailable', `cannot finish making the embedded store in ${dir}: ${systemErrorWords(err)} (${makingMark})`, undefined, { cause: err })
      }
    }
  }
  return db
}
