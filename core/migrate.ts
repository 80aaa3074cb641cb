// Applies the numbered SQL files of migrations/ in order, each once, recording what it applied.
// One transaction holds an advisory lock for the whole run, so instances starting together
// apply each file exactly once; PostgreSQL DDL is transactional, so a failing file leaves
// nothing half-applied.
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { hash } from 'node:crypto'
import { DEADLOCK_DETECTED, LOCK_NOT_AVAILABLE, QUERY_CANCELED, sqlState, type Db, type Queryable } from './db.ts'
import { isKeygateError, KeygateError } from './errors.ts'
import { PACKAGE_ROOT } from './package.ts'

export const MIGRATIONS_DIR = join(PACKAGE_ROOT, 'migrations')
const FILE = /^(\d{4})_[a-z0-9_]+\.sql$/
/** pg_advisory_xact_lock id the migrations run under ("kgmg"): one instance migrates at a time. */
export const MIGRATION_LOCK_ID = 0x6b67_6d67
/** The table of applied migrations, which keygate's own statements read and write under the migration lock. */
const RECORDS = 'keygate_migrations'

export interface Migration {
  version: number
  name: string
  /** SHA-256 of the text with LF line endings, as recorded when it is applied. */
  checksum: string
  /** The checksums a record of this file may hold: `checksum`, and those of its text with CRLF line endings and as read (see checksumsOf). */
  accepted: readonly string[]
  sql: string
}

/**
 * The checksum of `sql` (of its text with LF line endings), and every checksum a record of the
 * same text may hold. Line endings are no change: before (found by a review), the checksum was of
 * the file's bytes, and a checkout with CRLF line endings (Git for Windows' core.autocrlf, a
 * package packed from one) had changed every file a database migrated from LF files had applied,
 * and the reverse: every command stopped with migration_modified. A record an earlier keygate
 * made from CRLF files (its bytes' checksum) still matches.
 */
function checksumsOf(sql: string): { checksum: string; accepted: string[] } {
  const lf = sql.replaceAll('\r\n', '\n')
  const checksum = hash('sha256', lf, 'hex')
  return { checksum, accepted: [...new Set([checksum, hash('sha256', lf.replaceAll('\n', '\r\n'), 'hex'), hash('sha256', sql, 'hex')])] }
}

export function readMigrations(dir: string = MIGRATIONS_DIR): Migration[] {
  const files = readdirSync(dir).filter((f) => f.endsWith('.sql')).sort()
  const out: Migration[] = []
  for (const name of files) {
    const m = FILE.exec(name)
    if (!m) throw new KeygateError('migration_modified', `migration file ${name} is not named NNNN_words.sql`)
    const version = Number(m[1])
    if (out.some((x) => x.version === version)) throw new KeygateError('migration_modified', `two migration files are numbered ${m[1]}`)
    const sql = readFileSync(join(dir, name), 'utf8')
    out.push({ version, name, sql, ...checksumsOf(sql) })
  }
  return out
}

/**
 * Creates keygate_migrations where it is not there yet. Looked for first: PostgreSQL checks the
 * schema's CREATE right before it looks for the table of a CREATE TABLE IF NOT EXISTS, so a role
 * given only its rows' rights, on a database its owner migrated, could start nothing with
 * store.auto_migrate on (found by a review: "unexpected error: permission denied for schema
 * public", with nothing pending). Under the migrations' lock, no instance creates it meanwhile.
 */
async function ensureTable(tx: Queryable): Promise<void> {
  const exists = await tx.query<{ t: string | null }>(`SELECT to_regclass('keygate_migrations')::text AS t`)
  if (exists[0]?.t) return
  try {
    await tx.exec(`CREATE TABLE keygate_migrations (
      version    integer PRIMARY KEY,
      name       text NOT NULL,
      checksum   text NOT NULL,
      applied_at timestamptz NOT NULL DEFAULT now()
    )`)
  } catch (err) {
    const code = sqlState(err)
    throw new KeygateError('migration_failed', `cannot create keygate_migrations, the table of applied migrations: ${(err as Error).message}${code ? ` (SQLSTATE ${code})` : ''}; nothing was applied`, code ? { sqlstate: code } : undefined)
  }
}

async function applied(tx: Queryable): Promise<Array<{ version: number; name: string; checksum: string }>> {
  return tx.query('SELECT version, name, checksum FROM keygate_migrations ORDER BY version')
}

/**
 * The files not applied yet, and the applied migrations newer than every file: a newer keygate
 * has migrated the database during a rolling upgrade. This one keeps running on it, since each
 * migration is written so that the release before it still runs (columns and tables are added,
 * never renamed or dropped in the same release). A recorded file missing below the newest file,
 * or changed, is an error.
 */
function compare(files: readonly Migration[], done: Array<{ version: number; name: string; checksum: string }>): { pending: Migration[]; newer: string[] } {
  const newest = Math.max(0, ...files.map((f) => f.version))
  const newer: string[] = []
  for (const row of done) {
    const file = files.find((f) => f.version === row.version)
    if (!file && row.version > newest) {
      newer.push(row.name)
      continue
    }
    if (!file) {
      throw new KeygateError('migration_modified', `migration ${row.name} is applied but its file is missing`, { migration: row.name })
    }
    if (!file.accepted.includes(row.checksum)) {
      throw new KeygateError('migration_modified', `migration ${row.name} was changed after it was applied; restore it and put the change in a new numbered file`, { migration: row.name })
    }
  }
  const doneVersions = new Set(done.map((r) => r.version))
  return { pending: files.filter((f) => !doneVersions.has(f.version)), newer }
}

/** Applies pending migrations; returns the names applied by this call (not those a newer keygate recorded: see applyMigrations). */
export async function migrate(db: Db, dir?: string): Promise<string[]> {
  return (await applyMigrations(db, dir)).applied
}

/**
 * A wait that a lock_timeout set on keygate's role or database cut (SQLSTATE 55P03): for the
 * migration lock, or, once it was taken, for a lock a migration's statement needs (`migration`),
 * or one on keygate_migrations that keygate's own statement on it needs (`table`); or such a
 * statement that PostgreSQL ended to break a deadlock with another session (`deadlock`, SQLSTATE 40P01).
 */
export interface LockWaitCut {
  /**
   * What was waited for: the migration lock; a table a migration's statement needs (`migration`),
   * or keygate_migrations (`table`); or that statement, which PostgreSQL ended to break a deadlock
   * (40P01), not a lock_timeout.
   */
  kind: 'lock' | 'table' | 'deadlock'
  /** Who holds the lock, as PostgreSQL shows that session (see lockHolder). */
  holder: string
  /** The file whose statement waited for a lock another session holds (a table); absent with neither this nor `table`: the wait was for the migration lock. */
  migration?: string
  /** keygate_migrations, when the statement that waited was keygate's own on it (the read of what is applied, a file's record), not a file's. */
  table?: typeof RECORDS
  /** The lock_timeout that cut the wait ("200ms"); '' when it could not be read, or for a deadlock. */
  lockTimeout: string
  /** PostgreSQL's error. */
  err: Error
}

export interface ApplyOptions {
  /**
   * Wait for the migration lock, and for the locks the migrations' statements need (a table
   * another session's transaction holds; keygate_migrations, for keygate's own statements),
   * through a lock_timeout set on keygate's role or database: each wait it cuts is tried again,
   * the whole run (after lockRetryPause's pause, as long as it takes, as the wait is without a
   * lock_timeout; the run is one transaction, so a cut leaves nothing applied), and the first cut
   * of each kind is told here, keygate_migrations' apart (`serve`: a start waits for another
   * instance migrating, or for a transaction on a table a migration changes). Absent: a
   * cut ends the run as store_unavailable, saying who holds the lock and what to do (`keygate migrate`).
   * A migration's statement that PostgreSQL ended to break a deadlock with another session is
   * told and tried again alike (`deadlock`), with a table wait's pause.
   */
  onLockWait?: (cut: LockWaitCut) => void
}

/** How often a wait that a lock_timeout cuts (ApplyOptions.onLockWait) tries again, at most. */
const LOCK_RETRY_MS = 1000
/** The longest pause between a migration's tries for a table another session holds. */
const TABLE_RETRY_MAX_MS = 30_000

/**
 * How long to pause after a wait a lock_timeout cut (`waitedMs`, the try's length) before the next
 * try. For the migration lock: up to a second from the try's start, at once when the lock_timeout
 * is a second or more, so that the lock is waited for most of the time (its wait blocks no one).
 * For a table (`tableCuts`, the table waits cut so far, the first 0): as long as the wait at
 * least, twice as long after each cut, up to 30 s, since every other statement on the table
 * queues behind the migration's while it waits. Before (found by a review), a table wait was tried
 * again at once too: with a lock_timeout of 2 s, 18 of 21 reads of the table in 8 s waited behind
 * it, for as long as the transaction the migration waited for lasted.
 */
export function lockRetryPause(waitedMs: number, tableCuts?: number): number {
  const pause = Math.max(0, LOCK_RETRY_MS - waitedMs)
  return tableCuts === undefined ? pause : Math.max(pause, Math.min(TABLE_RETRY_MAX_MS, waitedMs * 2 ** tableCuts))
}

/** Applies pending migrations; returns the names applied by this call, and those a newer keygate recorded. */
export async function applyMigrations(db: Db, dir?: string, options: ApplyOptions = {}): Promise<{ applied: string[]; newer: string[] }> {
  const files = readMigrations(dir)
  // The kinds of wait told already: the holder is looked up for the first cut of each alone
  // (before, found by a read-back, at every cut, about once a second, for a warning said once).
  // A wait on keygate_migrations is told apart from a file's: they are different tables' holders.
  const told = new Set<string>()
  let tableCuts = 0
  for (;;) {
    const tried = performance.now()
    try {
      return await applyUnderLock(db, files)
    } catch (err) {
      if (!(err instanceof LockWaitCutError)) throw err
      if (!options.onLockWait) {
        const { holder, lockTimeout } = await lockHolder(db, err.on)
        throw lockHeld(holder, lockTimeout, err)
      }
      const wait = err.on === RECORDS ? `${err.kind} ${RECORDS}` : err.kind
      if (!told.has(wait)) {
        told.add(wait)
        const { holder, lockTimeout } = await lockHolder(db, err.on)
        options.onLockWait({ kind: err.kind, holder, lockTimeout: err.kind === 'deadlock' ? '' : lockTimeout, err: err.cause, ...(err.migration ? { migration: err.migration.name } : {}), ...(err.on === RECORDS ? { table: RECORDS } : {}) })
      }
      const pause = lockRetryPause(performance.now() - tried, err.kind === 'lock' ? undefined : tableCuts++)
      await new Promise((r) => setTimeout(r, pause))
    }
  }
}

/**
 * A wait cut by a lock_timeout (55P03): for the migration lock, before it was taken (`on`
 * undefined), or for a lock the statement of a migration (`on`) or keygate's own statement on
 * keygate_migrations (`on` RECORDS) needs; or that statement ended by PostgreSQL to break a
 * deadlock with another session (40P01, `deadlock`).
 */
class LockWaitCutError extends Error {
  declare cause: Error
  readonly on: Migration | typeof RECORDS | undefined
  readonly kind: LockWaitCut['kind']
  constructor(on: Migration | typeof RECORDS | undefined, cause: Error) {
    super(on === undefined ? 'the wait for the migration lock was cut' : `${typeof on === 'string' ? `a statement on ${on}` : `migration ${on.name}`} waited for a lock, and the wait was cut`, { cause })
    this.on = on
    this.kind = on === undefined ? 'lock' : sqlState(cause) === DEADLOCK_DETECTED ? 'deadlock' : 'table'
  }

  get migration(): Migration | undefined {
    return typeof this.on === 'object' ? this.on : undefined
  }
}

/** `err` as a LockWaitCutError of `on` when it is a wait a lock_timeout cut, or a deadlock PostgreSQL broke. */
function lockWaitCut(err: unknown, on: Migration | typeof RECORDS): unknown {
  const code = sqlState(err)
  return code === LOCK_NOT_AVAILABLE || code === DEADLOCK_DETECTED ? new LockWaitCutError(on, err as Error) : err
}

/** One run: the migration lock, then the files not applied yet, in one transaction. */
async function applyUnderLock(db: Db, files: readonly Migration[]): Promise<{ applied: string[]; newer: string[] }> {
  let locked = false
  // Untimed: it waits for another instance's migrations to end, and a migration may take long.
  return db.transaction(async (tx) => {
    await tx.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK_ID])
    locked = true
    // keygate's own statements on keygate_migrations wait for an operator's lock on it (LOCK
    // TABLE, VACUUM FULL) as a file's for its tables: before (found by a review), a lock_timeout's
    // cut of such a wait kept PostgreSQL's words, "unexpected error: canceling statement due to
    // lock timeout" from `keygate migrate`, and `serve` exited 1. (to_regclass takes no lock.)
    const onRecords = <T>(statement: Promise<T>) => statement.catch((err: unknown) => Promise.reject(lockWaitCut(err, RECORDS)))
    await ensureTable(tx)
    const { pending, newer } = compare(files, await onRecords(applied(tx)))
    for (const m of pending) {
      try {
        await tx.exec(m.sql)
      } catch (err) {
        // A wait for a table that another session's transaction holds (during a rolling upgrade,
        // an instance not upgraded yet; an operator's LOCK TABLE), which a lock_timeout cut: not
        // the file's fault. Before (found by a review), migration_failed with PostgreSQL's words,
        // "canceling statement due to lock timeout", and `serve` exited 1. Likewise a wait that
        // PostgreSQL ended to break a deadlock with such a transaction (before, also found by a
        // review: "failed: deadlock detected"): the other session goes on, and so may a new try.
        const cut = lockWaitCut(err, m)
        if (cut instanceof LockWaitCutError) throw cut
        // Named, with PostgreSQL's reason; the transaction leaves nothing of the run behind.
        const code = sqlState(err)
        throw new KeygateError('migration_failed', `migration ${m.name} failed: ${(err as Error).message}${code ? ` (SQLSTATE ${code})` : ''}; nothing was applied`, { migration: m.name, ...(code ? { sqlstate: code } : {}) })
      }
      await onRecords(tx.query('INSERT INTO keygate_migrations (version, name, checksum) VALUES ($1, $2, $3)', [m.version, m.name, m.checksum]))
    }
    return { applied: pending.map((m) => m.name), newer }
  }, { untimed: true }).catch((err: unknown) => {
    if (!locked && sqlState(err) === LOCK_NOT_AVAILABLE) throw new LockWaitCutError(undefined, err as Error)
    throw err
  })
}

/** A session as PostgreSQL shows it (another role's: its pid, role and application alone, without pg_read_all_stats). */
const SESSION_COLUMNS = `l.pid, a.usename, a.application_name, host(a.client_addr) AS client_addr,
       to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS xact_start`

/** A lock in pg_locks (`l`) is this database's: pg_locks shows every database's, and an advisory lock is per database. */
const THIS_DATABASE = 'l.database = (SELECT oid FROM pg_database WHERE datname = current_database())'

interface SessionRow {
  pid: number
  usename: string | null
  application_name: string | null
  client_addr: string | null
  xact_start: string | null
}

function session(row: SessionRow): string {
  const about = [`PostgreSQL pid ${row.pid}`, row.application_name ? `application ${JSON.stringify(row.application_name)}` : '', row.usename ? `role ${JSON.stringify(row.usename)}` : '', row.client_addr ? `from ${row.client_addr}` : '', row.xact_start ? `its transaction open since ${row.xact_start}` : '']
  return about.filter(Boolean).join(', ')
}

/**
 * `words` as a text[] literal, for a statement without parameters (a health probe's: Db.probing).
 * Only names (`[a-z_][a-z0-9_$]*`, as lockHolder finds them) are taken: nothing in one needs quoting.
 */
function namesLiteral(words: readonly string[]): string {
  if (words.some((w) => !/^[a-z_][a-z0-9_$]*$/.test(w))) throw new Error('a table name to look up is not a plain name')
  return `ARRAY[${words.map((w) => `'${w}'`).join(', ')}]::text[]`
}

/**
 * Who holds the lock whose wait a lock_timeout cut (or a deadlock ended), as PostgreSQL shows that
 * session, and the lock_timeout in force. Without `on`: the migration lock. With a migration: a
 * lock on a table its file names, held by another session of this database (PostgreSQL's error
 * does not say which lock the statement waited for, and the wait is over); with RECORDS, one on
 * keygate_migrations (`modes`: of those modes alone, PostgreSQL's names: a read waits for
 * AccessExclusiveLock only, held or still waited for, since reads queue behind a waiting request
 * too); the oldest transaction first, a lock held before one waited for. `held`: such a lock was
 * seen. When the store fails these look-ups too: without who, or the lock_timeout's value ('').
 * Without parameters: a health probe asks it too (Db.probing; /readyz's read of keygate_migrations).
 * Before (found by a review), a request still waiting (an operator's VACUUM FULL behind a long
 * transaction reading the table, a pg_dump) was not seen: the read it queued behind was told as
 * "held a lock (and has let it go since)", or, cancelled, as a slow store.
 */
async function lockHolder(db: Queryable, on?: Migration | typeof RECORDS, modes?: readonly string[]): Promise<{ holder: string; lockTimeout: string; held: boolean }> {
  const table = on === RECORDS ? RECORDS : 'a table it names'
  let holder = on ? `another session holds a lock on ${table}` : "another session holds keygate's migration lock"
  let lockTimeout = ''
  let held = false
  try {
    lockTimeout = (await db.query<{ t: string }>("SELECT current_setting('lock_timeout') AS t"))[0]?.t ?? ''
    if (on) {
      const named = on === RECORDS ? [RECORDS] : [...new Set(on.sql.toLowerCase().match(/[a-z_][a-z0-9_$]*/g) ?? [])]
      // With `modes`, a request still waiting counts too: the reads queue behind it.
      const rows = await db.query<SessionRow & { locks: string; granted: boolean }>(
        `SELECT ${SESSION_COLUMNS},
                string_agg(DISTINCT upper(regexp_replace(regexp_replace(l.mode, 'Lock$', ''), '([a-z])([A-Z])', '\\1 \\2', 'g')) || ' on ' || c.relname, ', ') AS locks,
                bool_and(l.granted) AS granted
           FROM pg_locks l JOIN pg_class c ON c.oid = l.relation LEFT JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'relation' AND ${modes ? '' : 'l.granted AND '}l.pid <> pg_backend_pid()
            AND ${THIS_DATABASE}
            AND c.relkind IN ('r', 'p') AND c.relname = ANY(${namesLiteral(named)})${modes ? ` AND lower(l.mode) = ANY(${namesLiteral(modes.map((m) => m.toLowerCase()))})` : ''}
          GROUP BY l.pid, a.usename, a.application_name, a.client_addr, a.xact_start
          ORDER BY bool_and(l.granted) DESC, a.xact_start NULLS LAST, l.pid`,
      )
      const [first] = rows
      held = first !== undefined
      const others = rows.length > 1 ? `, and ${rows.length - 1} other session${rows.length > 2 ? 's' : ''} lock ${on === RECORDS ? 'it' : 'tables it names'}` : ''
      if (first === undefined) holder = `another session held a lock on ${table} (and has let it go since)`
      else if (!first.granted) holder = `another session waits for ${first.locks}, which reads of the table queue behind (${session(first)})${others}`
      else holder = `another session holds ${first.locks} (${session(first)})${others}`
    } else {
      // A bigint advisory key is shown as its high and low 32 bits (classid, objid), objsubid 1.
      const [row] = await db.query<SessionRow>(
        `SELECT ${SESSION_COLUMNS}
           FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND ${THIS_DATABASE}
            AND l.classid = ${Math.floor(MIGRATION_LOCK_ID / 2 ** 32)}::bigint::oid AND l.objid = ${MIGRATION_LOCK_ID % 2 ** 32}::bigint::oid AND l.objsubid = 1
          LIMIT 1`,
      )
      held = row !== undefined
      if (row === undefined) holder = "another session held keygate's migration lock (and has let it go since)"
      else holder += ` (${session(row)})`
    }
  } catch {
    // Said without who: the store failed this look-up too.
  }
  return { holder, lockTimeout, held }
}

/** What cut a lock wait, as lockHeld and RecordsLocked tell it: the lock_timeout (`lockTimeout`, '' when it could not be read). */
function lockTimeoutCut(lockTimeout: string): string {
  return `the lock_timeout${lockTimeout ? ` (${lockTimeout})` : ''} set on keygate's role or database cut the wait for it (SQLSTATE 55P03)`
}

/**
 * What a wait cut short by a lock_timeout set on keygate's role or database is told (`cut`,
 * PostgreSQL's 55P03 as its cause) when it is not waited through (`keygate migrate`): which wait
 * (the migration lock, or a table lock a migration's statement needed), who holds the lock, what
 * cut the wait, and what to do. Before (found by a review), `keygate migrate` and a `keygate
 * serve` start said "unexpected error: canceling statement due to lock timeout" for the first, as
 * for a bug, and "migration NNNN_….sql failed: canceling statement due to lock timeout" for the
 * second, as for a broken file. A migration's statement that PostgreSQL ended to break a deadlock
 * (`cut.kind` deadlock, 40P01) is told as such: no lock_timeout cut it, and trying again is what to do.
 * keygate's own statements on keygate_migrations (`cut.on` RECORDS) are told alike, naming that
 * table (before, found by a review, "unexpected error: canceling statement due to lock timeout").
 */
function lockHeld(holder: string, lockTimeout: string, cut: LockWaitCutError): KeygateError {
  const timeout = `${lockTimeoutCut(lockTimeout)}: nothing was applied`
  const wait = "or let keygate wait for it: a longer lock_timeout (or 0) for the role that migrates (ALTER ROLE … SET lock_timeout), or for one run PGOPTIONS='-c lock_timeout=0'"
  const { migration } = cut
  // PostgreSQL's context, when its error gives one (a row lock: "while updating tuple … in relation …").
  const where = (cut.cause as { where?: unknown }).where
  const context = typeof where === 'string' && where ? ` (${where})` : ''
  const records = "keygate's statement on keygate_migrations, the table of applied migrations,"
  if (cut.kind === 'deadlock') {
    return new KeygateError(
      'store_unavailable',
      migration
        ? `migration ${migration.name}'s statement was ended by PostgreSQL to break a deadlock with another session (SQLSTATE 40P01): it waited for a lock on a table${context} that the other session held, while that session waited for one the migration held; ${holder}, most likely a transaction of a keygate not upgraded yet, or an operator's; nothing was applied; try again (the other session went on once the migration's statement was ended)`
        : `${records} was ended by PostgreSQL to break a deadlock with another session (SQLSTATE 40P01): it waited for a lock on that table${context} that the other session held, while that session waited for one the migrations held; ${holder}, most likely an operator's transaction; nothing was applied; try again (the other session went on once keygate's statement was ended)`,
      { sqlstate: DEADLOCK_DETECTED, ...(migration ? { migration: migration.name } : {}) },
      { cause: cut.cause },
    )
  }
  return new KeygateError(
    'store_unavailable',
    migration
      ? `migration ${migration.name} waited for a lock on a table${context}: ${holder}, most likely an open transaction of a keygate not upgraded yet, or an operator's (LOCK TABLE, VACUUM FULL), and ${timeout}; try again once that transaction ends, ${wait} (statements on that table wait behind the migration meanwhile)`
      : cut.kind === 'table'
        ? `${records} waited for a lock on it${context}: ${holder}, most likely an operator's open transaction (LOCK TABLE, VACUUM FULL), and ${timeout}; try again once that transaction ends, ${wait}`
        : `${holder}, most likely another keygate migrating this database (a \`keygate migrate\`, or a \`keygate serve\` starting), and ${timeout}; try again once it ends, ${wait}`,
    { sqlstate: LOCK_NOT_AVAILABLE, ...(migration ? { migration: migration.name } : {}) },
    { cause: cut.cause },
  )
}

/**
 * The read of what is applied (migrationState) could not lock keygate_migrations: another session
 * holds it (`holder`, as lockHolder says it), most likely an operator's LOCK TABLE or VACUUM FULL.
 * store_unavailable, naming the table and that session, and what cut the wait.
 */
export class RecordsLocked extends KeygateError {
  readonly holder: string
  constructor(holder: string, lockTimeout: string, cut: Error, sqlstate: string) {
    const by =
      sqlstate === LOCK_NOT_AVAILABLE
        ? lockTimeoutCut(lockTimeout)
        : `the statement was cancelled while it waited (${cut.message})`
    super('store_unavailable', `keygate's read of keygate_migrations, the table of applied migrations, waited for a lock on it: ${holder}, most likely an operator's open transaction (LOCK TABLE, VACUUM FULL), and ${by}; try again once that transaction ends`, { sqlstate, table: RECORDS }, { cause: cut })
    this.holder = holder
  }
}

/** A read of keygate_migrations waits for AccessExclusiveLock alone (LOCK TABLE's default mode, VACUUM FULL's, ALTER TABLE's). */
const BLOCKS_A_READ = ['AccessExclusiveLock']

export interface StateOptions {
  /**
   * Wait for a lock another session holds on keygate_migrations (an operator's LOCK TABLE, VACUUM
   * FULL): the read of what is applied, whose wait a lock_timeout set on keygate's role or
   * database cut (55P03), or that was cancelled (57014: store.query_timeout_ms, a statement_timeout)
   * while another session held the table, is tried again until it is read (at once after a wait
   * of a second or more: the read's wait blocks no one), the first cut told here (a `serve` start
   * with store.auto_migrate off). Absent: a cut is RecordsLocked.
   */
  onLockWait?: (cut: LockWaitCut) => void
}

/**
 * The applied migrations (`applied`), read waiting for an operator's lock on keygate_migrations as
 * `options` says. Before (found by a review), a cut of that wait was the store's error as for any
 * statement ("cancelled the statement (store.query_timeout_ms …)", "could not take a lock the
 * statement needs (SQLSTATE 55P03, lock_timeout)"), naming neither the table nor who held it; a
 * `serve` start with store.auto_migrate off exited 1, and /readyz, whose probe bounds its lock
 * waits so (Db.probing), made every instance unready for as long as the lock lasted.
 */
async function readApplied(db: Queryable, options: StateOptions): Promise<Array<{ version: number; name: string; checksum: string }>> {
  let told = false
  for (;;) {
    const tried = performance.now()
    try {
      return await applied(db)
    } catch (err) {
      // The store's own errors say a lock_timeout's cut or a cancellation as store_unavailable
      // with its SQLSTATE (Db's), a health probe's lock wait too (Db.probing); its TimedOut, a
      // store that did not answer at all, is no lock wait.
      const code = isKeygateError(err, 'store_unavailable') ? err.details?.sqlstate : sqlState(err)
      if (code !== LOCK_NOT_AVAILABLE && code !== QUERY_CANCELED) throw err
      const { holder, lockTimeout, held } = await lockHolder(db, RECORDS, BLOCKS_A_READ)
      // Cancelled while no session holds the table: a slow store, not a lock.
      if (code === QUERY_CANCELED && !held) throw err
      const cause = isKeygateError(err) && err.cause instanceof Error ? err.cause : (err as Error)
      if (!options.onLockWait) throw new RecordsLocked(holder, lockTimeout, err as Error, code)
      if (!told) {
        told = true
        options.onLockWait({ kind: 'table', table: RECORDS, holder, lockTimeout: code === LOCK_NOT_AVAILABLE ? lockTimeout : '', err: cause })
      }
      await new Promise((r) => setTimeout(r, lockRetryPause(performance.now() - tried)))
    }
  }
}

/**
 * Names of migrations not yet applied, and of those applied by a newer keygate, and whether none
 * is applied (`unmigrated`); throws when an applied file was changed or is missing, and
 * RecordsLocked when another session's lock on keygate_migrations cut the read's wait (see
 * StateOptions). `from`: the folder to read, or the files already read.
 */
export async function migrationState(db: Queryable, from?: string | readonly Migration[], options: StateOptions = {}): Promise<{ pending: string[]; newer: string[]; unmigrated: boolean }> {
  const files = typeof from === 'object' ? from : readMigrations(from)
  const exists = await db.query<{ t: string | null }>(`SELECT to_regclass('keygate_migrations')::text AS t`)
  if (!exists[0]?.t) return { pending: files.map((f) => f.name), newer: [], unmigrated: true }
  const done = await readApplied(db, options)
  const { pending, newer } = compare(files, done)
  return { pending: pending.map((m) => m.name), newer, unmigrated: done.length === 0 }
}

/** Names of migrations not yet applied (for /readyz: of the files serve read as it started); throws when an applied file was changed, and RecordsLocked (see migrationState). */
export async function pendingMigrations(db: Queryable, from?: string | readonly Migration[]): Promise<string[]> {
  return (await migrationState(db, from)).pending
}
