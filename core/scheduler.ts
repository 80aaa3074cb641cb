// The scheduler (SPEC §2 scheduled rotation, §5 cleanup): every `scheduler.interval_s`, in
// transactions that each first take a PostgreSQL advisory lock (so no two instances change keys
// at once; one that finds it held skips that round; held by a transaction only, it does not keep
// another instance's round from running after this one's key changes, nor its prunes and jobs
// beside this one's), with the clock given to it (tests pass their own):
//
// 1. Grace ends: a `rotating` key whose grace_until has passed becomes `expired`.
// 2. Expiry: an `active` or `rotating` key whose expires_at has passed becomes `expired`.
// 3. Scheduled rotation, announced: an active key with a rotation interval whose deadline
//    (created_at + rotation_interval_s; a rotation's successor starts anew) is within
//    `rotation_notice_hours` is announced once: `key.expiring` on the event bus and a
//    `key.expiring` audit row. The deadline announced is never less than the notice period
//    from the announcement: one that comes sooner (the round after the window opened, by up to
//    `scheduler.interval_s`; an interval shorter than the key's age, or one that leaves it
//    minutes, was just set; no scheduler ran for a while) is moved to the notice period from
//    now, so no key is cut off with less notice than promised. Keys whose expires_at comes
//    within the notice period are announced the same way, again if expires_at is moved: the
//    key service drops the notice when it changes expires_at (so a date moved away and back is
//    announced again), and a notice whose deadline is not the key's expiry is replaced.
// 4. Scheduled rotation, enforced: at the announced deadline a key not rotated yet becomes
//    `expired`. It is not rotated for its owner: a new secret would be shown to no one (SPEC §2:
//    the plaintext is shown once, to whoever rotates), so the owner rotates before the deadline
//    and the successor carries the policy on.
// 5. Pruning: rows older than their retention are deleted from each table of `pruneRules` that
//    exists (tables of other features join the list; a missing table is skipped), by the
//    instance that did 1-4, once their transaction has committed, 5,000 rows to a statement
//    (each its own transaction), so each stays within store.query_timeout_ms and none holds a
//    key's lock; a stop ends a prune after the statement it is on. One that fails is logged and
//    the others still run.
// 6. Other jobs (`jobs`: sealing and clearing webhook secrets, removing what deleted webhooks
//    left), by the same instance, after the prunes, each on its own: one that fails is logged and
//    the others still run.
//
// Every status change writes a `key.expired` audit row (actor `system`) and, once committed, is
// told to the key service's listeners, so caches and other instances drop the key.
import type { AuditLog } from './audit.ts'
import type { Db, Queryable } from './db.ts'
import type { EventBus, KeygateEvent } from './events.ts'
import { keyEndsFrom, LINEAGE_DEPTH, liveEndPassedSql, type KeyEndReason } from './keys/ends.ts'
import { columnsOf, toRecord, type KeyChange, type KeyRow, type KeyService } from './keys/service.ts'
import { keyJson, type KeyRecord } from './keys/types.ts'
import type { Logger } from './log.ts'

/** pg_try_advisory_xact_lock id of the scheduler ("kgsc"). */
export const SCHEDULER_LOCK = 0x6b67_7363

const SYSTEM = { actor: 'system' }
const DAY_MS = 86_400_000

export interface PruneRule {
  table: string
  /** The timestamp column compared with the retention. */
  column: string
  retentionDays: number
  /** Rows kept whatever their age (a fixed SQL condition on the table's own columns). */
  unless?: string
  /**
   * The rows one statement deletes, as a SELECT of at most `$2` ctids (pruneBatch), `$1` the time
   * before which rows go: for a table whose indexes do not lead with `column`, a look-up one of
   * them serves. Default: by `column` (and `unless`), which needs an index led by it.
   */
  rows?: string
}

/**
 * Upkeep another feature asks the scheduler to run each round, after the prunes. Not by one
 * instance at a time: another instance's round may run it at the same moment, so each of its
 * statements must hold beside another's (a compare-and-set, a delete of what is still there).
 */
export interface SchedulerJob {
  name: string
  /**
   * Returns how many rows it changed. A job with much to do ends after the statement it is on
   * once `stopping()` is true (a stop is under way), leaving the rest to the next round.
   */
  run(now: Date, stopping: () => boolean): Promise<number>
}

export interface SchedulerOptions {
  db: Db
  keys: KeyService
  audit: AuditLog
  events?: EventBus
  log: Logger
  /**
   * The time a round judges by. Default: the store's clock, read once per round, so that an
   * instance whose own clock runs ahead ends no key early for every instance (tests set their own).
   */
  now?: () => Date
  /** Keys one transaction ends or announces at most (default 1000): a backlog is worked through in batches. */
  batchSize?: number
  intervalS: number
  noticeMs: number
  pruneRules: readonly PruneRule[]
  jobs?: readonly SchedulerJob[]
}

export interface SchedulerRun {
  graceEnded: string[]
  expired: string[]
  rotationOverdue: string[]
  announced: Array<{ keyId: string; kind: 'rotation' | 'expiry'; deadline: Date }>
  /** Rows deleted per table. */
  pruned: Record<string, number>
  /** Rows each job changed (a job that failed is absent). */
  jobs: Record<string, number>
}

/** The retention rules of keygate's own tables and of the features that keep logs (skipped until their table exists). */
export function defaultPruneRules(r: { auditDays: number; anomalyDays: number; webhookDeliveryDays: number; usageDays: number }): PruneRule[] {
  return [
    { table: 'api_key_audit_log', column: 'created_at', retentionDays: r.auditDays },
    // Every kind, named, so that the (kind, deadline) index finds the old ones: by deadline alone,
    // with no statistics (the embedded store has no autovacuum), PostgreSQL read every notice
    // each round to find none (found by a review).
    {
      table: 'api_key_notices',
      column: 'deadline',
      retentionDays: r.auditDays,
      rows: `SELECT ctid FROM api_key_notices WHERE kind IN ('rotation', 'expiry') AND deadline < $1 LIMIT $2`,
    },
    { table: 'api_key_anomalies', column: 'detected_at', retentionDays: r.anomalyDays },
    // A delivery still being retried is kept: its retries may span longer than the retention
    // (max_attempts up to 100, retry_max_ms up to a day), and pruning it lost the event unseen.
    // Webhook by webhook, through migration 0013's log index (webhook_id, created_at to the
    // millisecond, id): no index leads with created_at, and before (found by a review) every
    // round read the whole log to find nothing to prune, 257 ms for 200,000 rows on the embedded
    // store, which answers nothing else meanwhile; an index of its own would cost every delivery
    // queued (bench/delivery-prune.ts, bench/RESULTS.md). `$1` is a JS time, in milliseconds: the
    // log index's created_at, cut to them, is before it exactly when created_at is.
    {
      table: 'webhook_deliveries',
      column: 'created_at',
      retentionDays: r.webhookDeliveryDays,
      rows: `SELECT d.ctid FROM webhooks w CROSS JOIN LATERAL (
          SELECT ctid FROM webhook_deliveries WHERE webhook_id = w.id AND status <> 'pending'
            AND date_trunc('milliseconds', created_at AT TIME ZONE 'UTC') < ($1::timestamptz AT TIME ZONE 'UTC') LIMIT $2
        ) d LIMIT $2`,
    },
    { table: 'api_key_usage', column: 'bucket', retentionDays: r.usageDays },
    { table: 'api_key_rejections', column: 'bucket', retentionDays: r.usageDays },
  ]
}

/** The store's clock: every instance judges deadlines by the same one. */
async function storeTime(db: Db): Promise<Date> {
  const [row] = await db.query<{ at: Date }>('SELECT now() AS at')
  return new Date((row as { at: Date }).at)
}

type Ended = { key: KeyRecord; reason: KeyEndReason; deadline: Date }

// The notices a round records, on `api_keys k` ($1 now, $2 the end of the notice period). What
// ends a key is KEY_ENDS_FROM's, shared with the expiring report.
const ROTATION_NOTICE_DUE = `(k.status = 'active' AND k.rotation_interval_s IS NOT NULL AND k.created_at + k.rotation_interval_s * interval '1 second' <= $2)`
const EXPIRY_NOTICE_DUE = `(k.status = 'active' AND k.expires_at > $1 AND k.expires_at <= $2)`

/**
 * A recursive CTE, `name (id, status, depth)`: the keys of `heads` (a SELECT of `id`; status
 * 'head', depth 0) and, back through replaced_by, the keys each replaced, a key at a time while
 * the key stepped from is rotating or ended (expired), as keyEndsFrom walks forward (a reader
 * keeps the rotating ones). Each step is migration
 * 0011's replaced_by index alone: with the status beside it in the join, the embedded store (no
 * statistics) also read the status index at every step, all the rotating keys each time.
 */
function replacedBackCte(name: string, heads: string): string {
  return `${name} (id, status, depth) AS (
      SELECT h.id, 'head', 0 FROM (${heads}) h
      UNION ALL
      SELECT p.id, p.status, ${name}.depth + 1 FROM ${name} JOIN api_keys p ON p.replaced_by = ${name}.id
      WHERE ${name}.status IN ('head', 'rotating', 'expired') AND ${name}.depth < ${LINEAGE_DEPTH})`
}

/**
 * The active keys whose announced rotation deadline passed by $1, and the rotating keys each
 * replaced, back through its lineage (KEY_ENDS_FROM ends them with it): api_key_notices' (kind,
 * deadline) index, then migration 0011's replaced_by index a step at a time.
 */
const OVERDUE_LINEAGES = `WITH RECURSIVE ${replacedBackCte(
  'lineage',
  `SELECT k.id FROM api_key_notices n JOIN api_keys k ON k.id = n.key_id
   WHERE n.kind = 'rotation' AND n.deadline <= $1 AND k.status = 'active' AND k.rotation_interval_s IS NOT NULL`,
)}
  SELECT id FROM lineage WHERE status IN ('head', 'rotating')`

/**
 * The keys a round may change ($1 now, $2 the end of the notice period), a superset of those
 * #lockDue selects, as sets an index reads each: keys past their expiry or grace (migration
 * 0020's api_keys_live_end_idx), announced rotation deadlines passed (api_key_notices' (kind,
 * deadline) index) with the rotating keys they replaced (OVERDUE_LINEAGES), rotations due for notice (0022's index of ROTATION_NOTICE_DUE's deadline, in
 * UTC: that of a timestamptz plus an interval is no index expression, its time zone may move
 * days; of seconds only, the same instant), expiries due for notice (0001's expires_at index).
 * Before (found by a review), the selection read every key each round, due or not: 230 to 275
 * ms with 100,000 keys and none due on the embedded store, which answers nothing else meanwhile.
 * The rotation notices passed are those of keys due to end: a key's rotation notice goes when it
 * stops being active (migration 0024). Before (found by a review), they were kept for the audit
 * retention, and every round read the fewer of them and the active keys with an interval: with
 * 100,000 keys all rotating, 45 to 78 ms, 213 to 375 ms on the embedded store, which keeps no
 * statistics (bench/RESULTS.md).
 */
const DUE_CANDIDATES = `SELECT k.id FROM api_keys k WHERE ${liveEndPassedSql('k', '$1')}
  UNION SELECT id FROM (${OVERDUE_LINEAGES}) o
  UNION SELECT k.id FROM api_keys k
    WHERE k.status = 'active' AND k.rotation_interval_s IS NOT NULL
      AND (k.created_at AT TIME ZONE 'UTC') + k.rotation_interval_s * interval '1 second' <= ($2::timestamptz AT TIME ZONE 'UTC')
  UNION SELECT k.id FROM api_keys k WHERE k.status = 'active' AND k.expires_at > $1 AND k.expires_at <= $2`

/**
 * The statement of #lockDue ($1 now, $2 the end of the notice period, $3 the batch): the keys
 * that look due to end, or to be announced, first by id (`picked`), and the rotating keys each
 * of them past its lineage's announced rotation deadline (an active key's own, or a rotating
 * key's successor's) replaced (OVERDUE_LINEAGES), all locked in id order. Only DUE_CANDIDATES
 * are judged, by the same conditions as before they were read apart (test/scheduler-due.test.ts
 * compares). Taken as an array, whose keys are then read by the
 * primary key: as `k.id IN (...)` the planner, which keeps no statistics of a partial index's
 * expression, took a third of the keys to be past their end, and read them all again to join them.
 * The replaced keys are locked beside their successor, past the batch's limit, because they end
 * by its announced deadline, whose notice goes when it ends (migration 0024): a batch ending the
 * successor alone left them to a later batch that no longer found them due (found by a review).
 * So are those a rotating key so due replaced: locked beside the newest key alone, they were
 * judged in a later batch, where a key between them, ended before it, led them to no deadline
 * (found by a later review: the oldest key worked on to the end of its grace, or ended for it
 * where the expiring report had said rotation_overdue).
 */
export const LOCK_DUE = `WITH RECURSIVE candidates AS (${DUE_CANDIDATES}),
  picked AS (
    SELECT k.id, d.rotation_end <= $1 AS overdue
    FROM ${keyEndsFrom('ARRAY(SELECT id FROM candidates)')}
    WHERE k.id = ANY (ARRAY(SELECT id FROM candidates))
      AND (e.ends_at <= $1
        OR (${ROTATION_NOTICE_DUE} AND n.key_id IS NULL)
        OR (${EXPIRY_NOTICE_DUE} AND NOT EXISTS (SELECT 1 FROM api_key_notices xn WHERE xn.key_id = k.id AND xn.kind = 'expiry' AND xn.deadline = k.expires_at)))
    ORDER BY k.id LIMIT $3),
  ${replacedBackCte('overdue_lineage', 'SELECT id FROM picked WHERE overdue')}
  SELECT k.id, k.id IN (SELECT id FROM picked) AS picked FROM api_keys k
  WHERE k.id = ANY (ARRAY(SELECT id FROM picked UNION SELECT id FROM overdue_lineage WHERE status = 'rotating'))
  ORDER BY k.id FOR UPDATE OF k`

export class Scheduler {
  readonly #o: SchedulerOptions
  readonly #now: () => Promise<Date>
  readonly #batch: number
  #timer: NodeJS.Timeout | undefined
  #running: Promise<SchedulerRun | null> | undefined
  /** Set by stop(): the round in flight ends after the statement it is on. */
  #stopping = false

  constructor(options: SchedulerOptions) {
    this.#o = options
    const given = options.now
    this.#now = given ? async () => given() : () => storeTime(options.db)
    this.#batch = options.batchSize ?? 1000
  }

  /** Runs every job once; null when another instance holds the lock. Concurrent calls share one run. */
  runOnce(): Promise<SchedulerRun | null> {
    this.#running ??= this.#run().finally(() => {
      this.#running = undefined
    })
    return this.#running
  }

  start(): void {
    this.#stopping = false
    const tick = () =>
      void this.runOnce().catch((err: unknown) => this.#o.log.warn('scheduler run failed; trying again next interval', { err: err as Error }))
    this.#timer = setInterval(tick, this.#o.intervalS * 1000)
    this.#timer.unref()
    tick()
  }

  /**
   * Stops the timer and waits for the round in flight, which ends after the batch or prune
   * statement it is on (before, it went through every batch, prune and job, whose statements each may take
   * store.query_timeout_ms, and held up the process's stop). What it left is the next round's.
   */
  async stop(): Promise<void> {
    this.#stopping = true
    clearInterval(this.#timer)
    await this.#running?.catch(() => {})
  }

  async #run(): Promise<SchedulerRun | null> {
    const now = await this.#now()
    const ended: Ended[] = []
    const announced: Array<{ key: KeyRecord; kind: 'rotation' | 'expiry'; deadline: Date }> = []
    const pruned: Record<string, number> = {}
    const notice = new Date(now.getTime() + this.#o.noticeMs)
    // A batch of keys per transaction (each takes the lock again): a backlog of tens of thousands
    // is neither one statement past store.query_timeout_ms, rolled back every round, nor row
    // locks held on all of them while admin calls on those keys wait. A batch that changes
    // nothing (its keys changed meanwhile) ends the round; the next round goes on. A batch that
    // fails is logged and the round goes on to the prunes and jobs, as a prune that fails does:
    // before (found by a review), its error ended the round, so what the batches before it had
    // done was in no log line, and a batch failing every round kept every prune and job from running.
    try {
      for (;;) {
        const batch = await this.#o.db.transaction(async (tx) => {
          const [lock] = await tx.query<{ ok: boolean }>('SELECT pg_try_advisory_xact_lock($1) AS ok', [SCHEDULER_LOCK])
          if (!lock?.ok) return undefined
          const { ids: locked, picked } = await this.#lockDue(tx, now, notice, this.#batch)
          const done = { full: picked === this.#batch, ended: [] as Ended[], announced: [] as typeof announced, events: [] as KeygateEvent[] }
          if (locked.length === 0) return done
          done.ended = await this.#endKeys(tx, now, locked)
          done.announced = await this.#announce(tx, now, notice, locked)
          await this.#o.audit.writeMany(tx, SYSTEM, [
            ...done.ended.map((e) => ({ keyId: e.key.id, action: 'key.expired', details: { reason: e.reason, deadline: e.deadline.toISOString() } })),
            ...done.announced.map((a) => ({ keyId: a.key.id, action: 'key.expiring', details: { kind: a.kind, deadline: a.deadline.toISOString() } })),
          ])
          // In this transaction: the notices are recorded as sent, so their events must not be lost.
          const staged = await this.#o.events?.stageMany(
            tx,
            done.announced.map((a) => ({ type: 'key.expiring' as const, data: { key: keyJson(a.key), kind: a.kind, deadline: a.deadline.toISOString() } })),
          )
          if (staged) done.events.push(...staged)
          return done
        })
        // Another instance holds the lock: this round is its (or, after a first batch, it goes on with it).
        if (batch === undefined) {
          if (ended.length === 0 && announced.length === 0) return null
          break
        }
        ended.push(...batch.ended)
        announced.push(...batch.announced)
        this.#o.keys.notify(batch.ended.map((e): KeyChange => ({ action: 'expired', key: e.key })))
        for (const event of batch.events) this.#o.events?.publish(event)
        if (!batch.full || batch.ended.length + batch.announced.length === 0 || this.#stopping) break
      }
    } catch (err) {
      this.#o.log.warn('scheduler key changes failed; trying again next interval', { err: err as Error })
    }
    // After the keys' transaction, a statement at a time: a long prune holds no key's row lock
    // (an admin call on a key being expired would wait out its own query timeout behind it), and
    // a prune that fails takes no expiry with it. Each on its own, as the jobs: one that fails is
    // logged and the rest still run (before, found by a review, its error ended the round, so a
    // prune failing every round, on a statement timeout or a missing DELETE permission, kept every
    // later prune and job from running).
    for (const rule of this.#o.pruneRules) {
      if (this.#stopping) break
      try {
        const n = await prune(this.#o.db, rule, now, () => this.#stopping)
        if (n !== undefined) pruned[rule.table] = n
      } catch (err) {
        this.#o.log.warn('scheduler prune failed; trying again next interval', { table: rule.table, err: err as Error })
      }
    }
    const jobs: Record<string, number> = {}
    for (const job of this.#o.jobs ?? []) {
      if (this.#stopping) break
      try {
        jobs[job.name] = await job.run(now, () => this.#stopping)
      } catch (err) {
        this.#o.log.warn('scheduler job failed; trying again next interval', { job: job.name, err: err as Error })
      }
    }
    const run: SchedulerRun = {
      graceEnded: ended.filter((e) => e.reason === 'grace_ended').map((e) => e.key.id),
      expired: ended.filter((e) => e.reason === 'expires_at').map((e) => e.key.id),
      rotationOverdue: ended.filter((e) => e.reason === 'rotation_overdue').map((e) => e.key.id),
      announced: announced.map((a) => ({ keyId: a.key.id, kind: a.kind, deadline: a.deadline })),
      pruned,
      jobs,
    }
    if (ended.length > 0 || announced.length > 0 || [...Object.values(pruned), ...Object.values(jobs)].some((n) => n > 0)) {
      this.#o.log.info('scheduler run', {
        grace_ended: run.graceEnded.length,
        expired: run.expired.length,
        rotation_overdue: run.rotationOverdue.length,
        announced: announced.length,
        pruned,
        jobs,
      })
    }
    return run
  }

  /**
   * Locks a batch (`limit`, the first by id) of the keys this round may change, in one statement
   * and in id order: the keys that look
   * due to end (past their grace, their expiry or their announced rotation deadline) and those
   * with a notice to record (not yet announced, or whose expiry moved), and beside them, past the
   * limit, the rotating keys that end with a successor past its deadline; `picked` counts the
   * first, which a full batch has `limit` of. #endKeys and #announce
   * then judge only these, again, each with a snapshot taken once the locks are held: a change
   * committed meanwhile (a raised rotation interval, which drops the announced deadline) is seen,
   * where a single statement re-checks a locked row against the rest of its first snapshot, and
   * so enforced, or announced again, a deadline the committed change removed.
   *
   * One statement, because every other transaction that locks several keys (the usage flush)
   * locks them in id order too: keys locked in two statements, each in order (A to end, then Z to
   * announce, with Z < A), deadlocked with a flush that held Z and waited for A.
   */
  async #lockDue(tx: Queryable, now: Date, notice: Date, limit: number): Promise<{ ids: string[]; picked: number }> {
    const rows = await tx.query<{ id: string; picked: boolean }>(LOCK_DUE, [now, notice, limit])
    return { ids: rows.map((r) => r.id), picked: rows.filter((r) => r.picked).length }
  }

  /** Marks expired every locked key that is past its grace, its expiry, or its announced rotation deadline. */
  async #endKeys(tx: Queryable, now: Date, locked: string[]): Promise<Ended[]> {
    const rows = await tx.query<KeyRow & { reason: Ended['reason']; deadline: Date }>(
      `WITH due AS (
         SELECT k.id, e.end_reason AS reason, e.ends_at AS deadline FROM ${keyEndsFrom('$2::text[]')}
         WHERE k.id = ANY($2) AND e.ends_at <= $1)
       UPDATE api_keys SET status = 'expired', updated_at = $1 FROM due WHERE api_keys.id = due.id
       RETURNING ${columnsOf('api_keys')}, due.reason, due.deadline`,
      [now, locked],
    )
    return rows.map((r) => ({ key: toRecord(r), reason: r.reason, deadline: new Date(r.deadline) }))
  }

  /** Records and returns the notices due by `notice` (the end of the notice period), for the locked keys, that were not sent before. */
  async #announce(tx: Queryable, now: Date, notice: Date, locked: string[]): Promise<Array<{ key: KeyRecord; kind: 'rotation' | 'expiry'; deadline: Date }>> {
    const rows = await tx.query<KeyRow & { kind: 'rotation' | 'expiry'; deadline: Date }>(
      `WITH rotation AS (
         INSERT INTO api_key_notices (key_id, kind, deadline, notified_at)
         SELECT id, 'rotation', GREATEST(created_at + rotation_interval_s * interval '1 second', $2), $1
         FROM api_keys k
         WHERE id = ANY($3) AND ${ROTATION_NOTICE_DUE}
         ON CONFLICT (key_id, kind) DO NOTHING
         RETURNING key_id, kind, deadline),
       expiry AS (
         INSERT INTO api_key_notices (key_id, kind, deadline, notified_at)
         SELECT id, 'expiry', expires_at, $1 FROM api_keys k
         WHERE id = ANY($3) AND ${EXPIRY_NOTICE_DUE}
         ON CONFLICT (key_id, kind) DO UPDATE SET deadline = EXCLUDED.deadline, notified_at = EXCLUDED.notified_at
           WHERE api_key_notices.deadline <> EXCLUDED.deadline
         RETURNING key_id, kind, deadline)
       SELECT ${columnsOf('k')}, n.kind, n.deadline
       FROM (SELECT * FROM rotation UNION ALL SELECT * FROM expiry) n JOIN api_keys k ON k.id = n.key_id
       ORDER BY n.deadline, k.id`,
      [now, notice, locked],
    )
    return rows.map((r) => ({ key: toRecord(r), kind: r.kind, deadline: new Date(r.deadline) }))
  }
}

/**
 * Deletes the rows of `rule` older than its retention, and says how many; undefined when the
 * table or column does not exist. Once `stopping()` is true it ends after the statement it is on,
 * leaving the rest to the next round: before (found by a review), it went on to its last batch,
 * and a stop during a first prune of 1,000,000 audit rows on PostgreSQL waited 10 s for it (a
 * larger one, past the stop's backstop, exited with the usage counts unwritten).
 */
async function prune(tx: Queryable & Pick<Db, 'kind'>, rule: PruneRule, now: Date, stopping: () => boolean): Promise<number | undefined> {
  const [found] = await tx.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2`,
    [rule.table, rule.column],
  )
  if (!found?.n) return undefined
  const table = quoteIdent(rule.table)
  const before = new Date(now.getTime() - rule.retentionDays * DAY_MS)
  // In batches, so that each statement stays well within store.query_timeout_ms however much a
  // first run (a long retention just shortened, say) has to delete.
  const batch = pruneBatch(tx.kind)
  let total = 0
  for (;;) {
    const [gone] = await tx.query<{ n: number }>(
      `WITH gone AS (DELETE FROM ${table} WHERE ctid IN (${rule.rows ?? `SELECT ctid FROM ${table} WHERE ${quoteIdent(rule.column)} < $1${rule.unless ? ` AND NOT (${rule.unless})` : ''} LIMIT $2`}) RETURNING 1) SELECT count(*)::int AS n FROM gone`,
      [before, batch],
    )
    const n = gone?.n ?? 0
    total += n
    if (n < batch || stopping()) return total
  }
}

/** Rows one prune statement deletes at most on PostgreSQL. */
export const PRUNE_BATCH = 5000

/**
 * Rows one prune statement deletes at most on a store of `kind`. The embedded store runs one
 * statement at a time for every caller, and a backlog's prune (a retention just shortened) held
 * the gateway's key look-ups and the admin API 110 to 310 ms a 5,000-row statement: a 1,000-row
 * one holds them about a quarter as long, at about 1.3 times the time a row (bench/prune-batch.ts,
 * bench/RESULTS.md). PostgreSQL runs the others beside it.
 */
export function pruneBatch(kind: Db['kind']): number {
  return kind === 'embedded' ? 1000 : PRUNE_BATCH
}

function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`
}
