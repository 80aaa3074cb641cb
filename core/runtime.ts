// Opens what every command needs from the configuration: the store (migrated), the audit log
// and the key service.
import type { Config } from '../config/schema.ts'
import { existsSync } from 'node:fs'
import { AuditLog, checkNewestSealed, checkStoreKey, embeddedKeyFile, isBlank, loadAuditCipher, sealedKeyIds, type AuditCipher } from './audit.ts'
import { LOCK_NOT_AVAILABLE, openDb, sqlState, type Db } from './db.ts'
import { KeygateError } from './errors.ts'
import { EventBus } from './events.ts'
import { KeyService } from './keys/service.ts'
import type { Logger } from './log.ts'
import { applyMigrations, migrationState, type LockWaitCut } from './migrate.ts'

export interface Runtime {
  config: Config
  db: Db
  audit: AuditLog
  /** The encryption keys: audit details and stored secrets (webhook signing secrets). */
  cipher: AuditCipher
  keys: KeyService
  /** The process's event bus (SPEC §5 events): the scheduler emits on it, webhooks and streams listen. */
  events: EventBus
  close(): Promise<void>
}

export function keyServiceOptions(config: Config) {
  return { prefix: config.keys.prefix, previousPrefixes: config.keys.previous_prefixes, acceptLegacy: config.keys.accept_legacy, graceHours: config.keys.grace_hours }
}

/** Why a data folder without an embedded store is refused when store.auto_migrate is off, and what makes one. */
export const NO_STORE_AUTO_MIGRATE_OFF =
  'store.auto_migrate is off, so only `keygate migrate` makes one; check the data folder (--data-dir, KEYGATE_DATA_DIR or store.data_dir; by default ./.keygate in the working folder), or make the store there with `keygate migrate`'

/** How a `serve` start that waits for an operator's lock on keygate_migrations begins its warning, whether it migrates or only reads what is applied. */
const RECORDS_WAIT = "waiting for a lock on keygate_migrations, the table of applied migrations, that another session holds or is queued for (most likely an operator's LOCK TABLE or VACUUM FULL)"

/** What cut a wait a start waits through: a lock_timeout, as its warnings say it. */
const LOCK_TIMEOUT_CUT = "the lock_timeout set on keygate's role or database cut a wait for it (SQLSTATE 55P03)"

/** What a migrating start does after a cut wait, as its warnings say it. */
const MIGRATIONS_AGAIN = 'so the migrations, of which nothing was applied, are tried again'

/** The log fields of a lock wait a start waits through: who holds the lock, the lock_timeout that cut the wait, and the file or table waited for. */
function lockWaitFields(cut: LockWaitCut): Record<string, string> {
  return { holder: cut.holder, ...(cut.lockTimeout ? { lock_timeout: cut.lockTimeout } : {}), ...(cut.migration ? { migration: cut.migration } : {}), ...(cut.table ? { table: cut.table } : {}) }
}

/**
 * `lockedHint`, `serverHeldHint`, `existingOnly`, `shortLived`: as core/db.ts OpenDbOptions has them. `readOnly`: a
 * command that changes nothing, which neither makes nor moves the store's key check (checkStoreKey).
 */
export async function openRuntime(config: Config, log: Logger, options: { now?: () => Date; lockedHint?: string; serverHeldHint?: string; existingOnly?: string; shortLived?: boolean; waitForStore?: boolean; readOnly?: boolean } = {}): Promise<Runtime> {
  // `serve` waits for a PostgreSQL that is not up yet (store.start_wait_s), saying so every 10 s.
  let warnedAt = -Infinity
  const wait = options.waitForStore && config.store.start_wait_s > 0
  const db = await openDb({
    ...(wait
      ? {
          waitMs: config.store.start_wait_s * 1000,
          onWait: (err: Error, waitedMs: number) => {
            if (waitedMs - warnedAt < 10_000) return
            warnedAt = waitedMs
            log.warn('PostgreSQL is not up yet; trying again every second', { waited_s: Math.round(waitedMs / 1000), gives_up_after_s: config.store.start_wait_s, err })
          },
          onReached: (waitedMs: number) => {
            if (warnedAt > -Infinity) log.info('PostgreSQL answers; starting', { waited_s: Math.round(waitedMs / 1000) })
          },
        }
      : {}),
    databaseUrl: config.store.database_url,
    dataDir: config.store.data_dir,
    poolMax: config.store.pool_max,
    queryTimeoutMs: config.store.query_timeout_ms,
    sharedBuffersMb: config.store.embedded_shared_buffers_mb,
    ...(options.lockedHint ? { lockedHint: options.lockedHint } : {}),
    ...(options.serverHeldHint ? { serverHeldHint: options.serverHeldHint } : {}),
    // With store.auto_migrate off, only `keygate migrate` makes a store: before (found by a
    // review), a data folder without one became a new store of about 40 MB, then refused as
    // lacking every migration.
    ...(!config.store.auto_migrate ? { existingOnly: NO_STORE_AUTO_MIGRATE_OFF } : options.existingOnly !== undefined ? { existingOnly: options.existingOnly } : {}),
    ...(options.shortLived ? { shortLived: true } : {}),
  })
  try {
    const cipherOf = (sealed?: readonly string[]) =>
      loadAuditCipher({
        encryptionKey: config.audit.encryption_key,
        previousKeys: config.audit.previous_encryption_keys,
        storeKind: db.kind,
        dataDir: config.store.data_dir,
        ...(sealed ? { sealed } : {}),
        log,
      })
    // PostgreSQL: a missing key is refused before anything else. The embedded store generates
    // its own when none is configured, after its migrations, once it has seen that the store
    // holds nothing sealed with a key that is lost.
    let cipher = db.kind === 'postgres' ? cipherOf() : undefined
    let newer: string[]
    // On both stores alike: off, the schema is changed by `keygate migrate` alone (before, found
    // by a docs walk, the embedded store was migrated whatever the setting said).
    if (config.store.auto_migrate) {
      // `serve` waits for another instance migrating, and for a transaction on a table a
      // migration changes (during a rolling upgrade, an instance not upgraded yet), through a
      // lock_timeout set on keygate's role or database as without one (not bounded by
      // store.start_wait_s: see README, Migrations), saying so once for each. Before (found by
      // reviews), the lock_timeout's cut ended the start, exit 1: in a rolling start of many
      // instances, all but the one migrating; and any start whose migration met such a transaction.
      // Likewise a migration's statement PostgreSQL ended to break a deadlock with such a
      // transaction (before, found by a review: "failed: deadlock detected", exit 1).
      // applyMigrations tells the first cut of each kind alone.
      const lockWait = options.waitForStore
        ? {
            onLockWait: (cut: LockWaitCut) => {
              const fields = lockWaitFields(cut)
              // keygate's own statement on keygate_migrations (its read of what is applied, a record).
              const records = "keygate's statement on keygate_migrations, the table of applied migrations,"
              if (cut.kind === 'deadlock' && cut.table) {
                log.warn(`${records} was ended by PostgreSQL to break a deadlock with another session (SQLSTATE 40P01; most likely an operator's transaction), ${MIGRATIONS_AGAIN}`, fields)
              } else if (cut.kind === 'table' && cut.table) {
                log.warn(
                  `${RECORDS_WAIT}; ${LOCK_TIMEOUT_CUT}, ${MIGRATIONS_AGAIN} until it is free`,
                  fields,
                )
              } else if (cut.kind === 'deadlock') {
                log.warn(
                  `migration ${cut.migration}'s statement was ended by PostgreSQL to break a deadlock with another session (SQLSTATE 40P01; most likely an open transaction of a keygate not upgraded yet), ${MIGRATIONS_AGAIN}`,
                  fields,
                )
              } else if (cut.kind === 'table') {
                log.warn(
                  `waiting for a table lock that migration ${cut.migration} needs, held by another session (most likely an open transaction of a keygate not upgraded yet); ${LOCK_TIMEOUT_CUT}, ${MIGRATIONS_AGAIN} until it is free`,
                  fields,
                )
              } else {
                log.warn(
                  `waiting for keygate's migration lock, held by another session (most likely another keygate migrating this database); ${LOCK_TIMEOUT_CUT}, so it is tried again until it is free`,
                  fields,
                )
              }
            },
          }
        : {}
      const run = await applyMigrations(db, undefined, lockWait)
      if (run.applied.length > 0) log.info('applied migrations', { migrations: run.applied })
      newer = run.newer
    } else {
      // `serve` waits for an operator's lock on keygate_migrations (LOCK TABLE, VACUUM FULL)
      // through store.query_timeout_ms and a lock_timeout set on keygate's role or database, as
      // the start with auto_migrate on does, saying so once; a command is told the table and who
      // holds it (RecordsLocked). Before (found by a review), both ended with the store's words
      // for any statement ("cancelled the statement", "could not take a lock"), exit 1.
      const recordsWait = {
        onLockWait: (cut: LockWaitCut) => {
          const by =
            sqlState(cut.err) === LOCK_NOT_AVAILABLE
              ? LOCK_TIMEOUT_CUT
              : 'its read was cancelled while it waited for it (SQLSTATE 57014: store.query_timeout_ms, or a statement_timeout set on the role or database)'
          log.warn(`${RECORDS_WAIT}; ${by}, so the read, which tells whether every migration is applied (store.auto_migrate is off), is tried again until it is free`, lockWaitFields(cut))
        },
      }
      const state = await migrationState(db, undefined, options.waitForStore ? recordsWait : {})
      if (state.pending.length > 0) throw new KeygateError('store_unavailable', `${state.unmigrated ? `the database holds no keygate schema yet (none of its ${state.pending.length} migrations is applied)` : `the database lacks migrations ${state.pending.join(', ')}`}: run \`keygate migrate\``)
      newer = state.newer
    }
    if (newer.length > 0) log.warn('the database has migrations newer than this keygate (a rolling upgrade?); running on them', { migrations: newer })
    // What the store holds sealed is read when the embedded store's key is to be generated (its
    // file missing, or empty: left so by an older keygate).
    const keyFile = embeddedKeyFile(config.store.data_dir)
    // The embedded store is this process's alone (its lock), so no other makes the key meanwhile.
    const generating = !cipher && !config.audit.encryption_key && (!existsSync(keyFile) || isBlank(keyFile))
    cipher ??= cipherOf(generating ? await sealedKeyIds(db) : undefined)
    await checkNewestSealed(db, cipher)
    await checkStoreKey(db, cipher, { generated: generating, readOnly: options.readOnly === true, log })
    const audit = new AuditLog(cipher, config.audit.seal_format === 1 ? 1 : 2)
    const keys = new KeyService({ db, audit, ...keyServiceOptions(config), ...(options.now ? { now: options.now } : {}) })
    return { config, db, audit, cipher, keys, events: new EventBus(options.now ? { now: options.now } : {}), close: () => db.close() }
  } catch (err) {
    await db.close().catch(() => {})
    throw err
  }
}
