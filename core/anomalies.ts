// Anomaly detection (SPEC §5). The gateway tells the detector about every answer it gives
// (the usage hook: a few Map updates, no I/O); every `check_interval_ms` the detector adds what
// it counted to shared windows (Redis when present, so every instance's traffic counts; this
// process's memory otherwise) and judges each key that was active: requests per minute, error
// rate, distinct addresses per hour, and hours unusual for the key (from its own hourly usage
// rows). A finding is inserted into `api_key_anomalies`, one row per key, type and dedupe
// window whichever instance sees it first; only the insert that made the row publishes it
// (Redis channel, `anomaly.detected` on the event bus), so one anomaly is one alert everywhere.
import type { Redis } from 'ioredis'
import QuickLRU from 'quick-lru'
import type { Config } from '../config/schema.ts'
import type { Actor, AuditLog } from './audit.ts'
import type { Db, Queryable } from './db.ts'
import type { EventBus, KeygateEvent } from './events.ts'
import { oncePer, type Logger } from './log.ts'
import { coalesced } from './coalesce.ts'
import { OneOut, TimedOut, within } from './deadline.ts'
import { addressKeyer } from './lockout.ts'
import { keepSubscribed, subscriberConnection } from './redis.ts'
import { BUCKET_MS, ByWindow, type UsageSink } from './usage.ts'

/**
 * An anomaly id as the API takes it: digits that fit the table's bigint. 18 digits at most
 * (bigint holds 19 digits, but not every 19-digit number): a larger id cannot exist, and
 * PostgreSQL refuses to compare a bigint with it.
 */
export const ANOMALY_ID_PATTERN = '^[0-9]{1,18}$'
const ANOMALY_ID = new RegExp(ANOMALY_ID_PATTERN)
export const isAnomalyId = (id: string): boolean => ANOMALY_ID.test(id)

export const ANOMALY_TYPES = ['request_rate', 'error_rate', 'distinct_addresses', 'unusual_hour'] as const
export type AnomalyType = (typeof ANOMALY_TYPES)[number]

export interface Anomaly {
  id: string
  keyId: string
  type: AnomalyType
  windowStart: Date
  details: Record<string, unknown>
  detectedAt: Date
  acknowledgedAt: Date | null
  acknowledgedBy: string | null
}

/** The JSON form of an anomaly: admin API answers, SSE events, Redis messages and webhook data. */
export function anomalyJson(a: Anomaly) {
  return {
    id: a.id,
    key_id: a.keyId,
    type: a.type,
    details: a.details,
    window_start: a.windowStart.toISOString(),
    detected_at: a.detectedAt.toISOString(),
    acknowledged_at: a.acknowledgedAt?.toISOString() ?? null,
    acknowledged_by: a.acknowledgedBy,
  }
}
export type AnomalyJson = ReturnType<typeof anomalyJson>

export function anomalyFromJson(j: AnomalyJson): Anomaly {
  return {
    id: j.id,
    keyId: j.key_id,
    type: j.type,
    details: j.details,
    windowStart: new Date(j.window_start),
    detectedAt: new Date(j.detected_at),
    acknowledgedAt: j.acknowledged_at === null ? null : new Date(j.acknowledged_at),
    acknowledgedBy: j.acknowledged_by,
  }
}

interface AnomalyRow {
  id: string | number
  key_id: string
  type: AnomalyType
  window_start: Date
  details: Record<string, unknown>
  detected_at: Date
  acknowledged_at: Date | null
  acknowledged_by: string | null
}

const COLUMNS = 'id::text AS id, key_id, type, window_start, details, detected_at, acknowledged_at, acknowledged_by'
// `ORDER BY id` would sort by the text column above ('10' before '9'): order by the table's bigint.
const BY_ID = 'api_key_anomalies.id'

function toAnomaly(r: AnomalyRow): Anomaly {
  return {
    id: String(r.id),
    keyId: r.key_id,
    type: r.type,
    windowStart: new Date(r.window_start),
    details: r.details,
    detectedAt: new Date(r.detected_at),
    acknowledgedAt: r.acknowledged_at === null ? null : new Date(r.acknowledged_at),
    acknowledgedBy: r.acknowledged_by,
  }
}

/** The `api_key_anomalies` table. */
export class AnomalyLog {
  readonly #db: Db

  constructor(db: Db) {
    this.#db = db
  }

  /** Inserts a finding unless its key, type and window already have one (with `q`, a transaction); the new row, or undefined. */
  async insert(a: { keyId: string; type: AnomalyType; windowStart: Date; details: Record<string, unknown>; detectedAt: Date }, q: Queryable = this.#db): Promise<Anomaly | undefined> {
    const rows = await q.query<AnomalyRow>(
      `INSERT INTO api_key_anomalies (key_id, type, window_start, details, detected_at) VALUES ($1, $2, $3, $4, $5)
       ON CONFLICT (key_id, type, window_start) DO NOTHING RETURNING ${COLUMNS}`,
      [a.keyId, a.type, a.windowStart, JSON.stringify(a.details), a.detectedAt],
    )
    return rows[0] ? toAnomaly(rows[0]) : undefined
  }

  /** Newest first; `before`: ids below it (the next page). */
  async list(options: { limit: number; before?: string; keyId?: string; type?: AnomalyType; acknowledged?: boolean }): Promise<Anomaly[]> {
    const where: string[] = []
    const params: unknown[] = []
    const add = (sql: string, value: unknown) => {
      params.push(value)
      where.push(sql.replace('?', `$${params.length}`))
    }
    if (options.before !== undefined) add('id < ?::bigint', options.before)
    if (options.keyId !== undefined) add('key_id = ?', options.keyId)
    if (options.type !== undefined) add('type = ?', options.type)
    if (options.acknowledged !== undefined) where.push(options.acknowledged ? 'acknowledged_at IS NOT NULL' : 'acknowledged_at IS NULL')
    params.push(options.limit)
    const rows = await this.#db.query<AnomalyRow>(
      `SELECT ${COLUMNS} FROM api_key_anomalies ${where.length > 0 ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY ${BY_ID} DESC LIMIT $${params.length}`,
      params,
    )
    return rows.map(toAnomaly)
  }

  /** Oldest first, ids above `after` (an SSE client resuming with Last-Event-ID). */
  async after(after: string, limit: number): Promise<Anomaly[]> {
    const rows = await this.#db.query<AnomalyRow>(`SELECT ${COLUMNS} FROM api_key_anomalies WHERE id > $1::bigint ORDER BY ${BY_ID} LIMIT $2`, [after, limit])
    return rows.map(toAnomaly)
  }

  /** The ids of the newest `limit` rows, newest first (no row read: where a feed's poll begins). */
  async newestIds(limit: number): Promise<string[]> {
    const rows = await this.#db.query<{ id: string }>(`SELECT id::text AS id FROM api_key_anomalies ORDER BY ${BY_ID} DESC LIMIT $1`, [limit])
    return rows.map((r) => r.id)
  }

  /** The rows with these ids, oldest first (one query, however many ids). */
  async among(ids: readonly string[]): Promise<Anomaly[]> {
    const rows = await this.#db.query<AnomalyRow>(`SELECT ${COLUMNS} FROM api_key_anomalies WHERE id = ANY($1::bigint[]) ORDER BY ${BY_ID}`, [ids])
    return rows.map(toAnomaly)
  }

  async get(id: string): Promise<Anomaly | undefined> {
    const rows = await this.#db.query<AnomalyRow>(`SELECT ${COLUMNS} FROM api_key_anomalies WHERE id = $1::bigint`, [id])
    return rows[0] ? toAnomaly(rows[0]) : undefined
  }

  /** Marks it acknowledged (the first acknowledgement stands) with an audit row; undefined when there is no such row. */
  async acknowledge(id: string, actor: Actor, at: Date, audit?: AuditLog): Promise<Anomaly | undefined> {
    const rows = await this.#db.transaction(async (tx) => {
      const r = await tx.query<AnomalyRow>(
        `UPDATE api_key_anomalies SET acknowledged_at = $2, acknowledged_by = $3 WHERE id = $1::bigint AND acknowledged_at IS NULL RETURNING ${COLUMNS}`,
        [id, at, actor.actor],
      )
      if (r[0] && audit) await audit.write(tx, actor, { keyId: r[0].key_id, action: 'anomaly.acknowledged', details: { anomaly_id: String(r[0].id), type: r[0].type } })
      return r
    })
    return rows[0] ? toAnomaly(rows[0]) : this.get(id)
  }
}

/** What one process counted for one key since the last check. */
interface Tally {
  keyId: string
  /** Start of the minute, of the error-rate window and of the hour the requests fell in. */
  minute: number
  errWindow: number
  hour: number
  lastMs: number
  requests: number
  errors: number
  /**
   * The clients, as limits and lockouts count them (addressKeyer): an IPv4 address, an IPv6
   * network of `rate_limits.ipv6_prefix_bits` (`2001:db8:1:2::/64`), since one host holds a whole
   * /64 and rotates its temporary addresses within it.
   */
  addresses: Set<string>
  /** The address (as the gateway gave it) added last (keep-alive clients repeat theirs): skips the Set for a repeat. */
  lastAddress: string
}

/** The totals of the shared windows after a tally was added. */
interface Totals {
  perMinute: number
  errWindowRequests: number
  errWindowErrors: number
  distinctAddresses: number
  /** When distinctAddresses is over the `over` asked for: up to SEEN of the hour's addresses the window holds (else none). */
  seen: string[]
}

/**
 * Windows shared by every instance (Redis) or held by this one (memory). `over`: a key whose
 * hour holds more addresses than this has some of them read back (`Totals.seen`).
 */
export interface SharedWindows {
  add(tallies: readonly Tally[], over: number): Promise<Totals[]>
}

const MINUTE_MS = 60_000
/** Alerts kept for publishing again while Redis does not take them (the table has them all). */
const MAX_UNPUBLISHED = 1000
/** A key's addresses kept between two checks; enough to cross any sane threshold. */
const MAX_ADDRESSES = 1000
/** The addresses a `distinct_addresses` finding lists (`seen_here`). */
const SEEN = 20

/** The first `n` of a set, in the order they were added. */
function firstOf(set: Set<string>, n: number): string[] {
  const out: string[] = []
  for (const a of set) {
    if (out.length === n) break
    out.push(a)
  }
  return out
}

export class MemoryWindows implements SharedWindows {
  readonly #counts = new Map<string, { n: number; until: number }>()
  readonly #sets = new Map<string, { s: Set<string>; until: number }>()
  readonly #errWindowMs: number
  /** `anomalies.check_interval_ms`: how much later than a window's end the last of its counts may come. */
  readonly #keepMs: number
  #lastSweep = 0

  /**
   * `checkIntervalMs`: a window's counts are kept that much longer, as the check after the one
   * that added the first of them adds the rest up to that much later. Before (found by a review),
   * with `check_interval_ms` over a minute, a minute's first counts were swept before its last
   * ones came, and a burst shared by two checks was judged in halves, each under its threshold.
   */
  constructor(errWindowS: number, checkIntervalMs = 0) {
    this.#errWindowMs = errWindowS * 1000
    this.#keepMs = checkIntervalMs
  }

  async add(tallies: readonly Tally[], over: number): Promise<Totals[]> {
    const now = tallies.reduce((m, t) => Math.max(m, t.lastMs), 0)
    if (now - this.#lastSweep > MINUTE_MS) {
      this.#lastSweep = now
      for (const [k, v] of this.#counts) if (v.until < now) this.#counts.delete(k)
      for (const [k, v] of this.#sets) if (v.until < now) this.#sets.delete(k)
    }
    const incr = (k: string, n: number, until: number) => {
      const c = this.#counts.get(k) ?? { n: 0, until }
      c.n += n
      this.#counts.set(k, c)
      return c.n
    }
    return tallies.map((t) => {
      const set = this.#sets.get(`a:${t.keyId}:${t.hour}`) ?? { s: new Set<string>(), until: t.hour + 2 * BUCKET_MS + this.#keepMs }
      this.#sets.set(`a:${t.keyId}:${t.hour}`, set)
      for (const a of t.addresses) if (set.s.size < MAX_ADDRESSES) set.s.add(a)
      const errUntil = t.errWindow + 2 * this.#errWindowMs + this.#keepMs
      return {
        perMinute: incr(`r:${t.keyId}:${t.minute}`, t.requests, t.minute + 2 * MINUTE_MS + this.#keepMs),
        errWindowRequests: incr(`q:${t.keyId}:${t.errWindow}`, t.requests, errUntil),
        errWindowErrors: incr(`e:${t.keyId}:${t.errWindow}`, t.errors, errUntil),
        distinctAddresses: set.s.size,
        seen: set.s.size > over ? firstOf(set.s, SEEN) : [],
      }
    })
  }
}

/** A tally as it crosses cluster IPC (a Set does not survive serialisation). */
type WireTally = Omit<Tally, 'addresses'> & { addresses: string[] }

/** What a gateway worker asks its primary, and what it answers (cli/serve.ts routes them). */
export type WindowsRequest = { keygate: 'windows'; id: number; tallies: WireTally[]; over: number }
export type WindowsAnswer = { keygate: 'windows-totals'; id: number; totals: Totals[] }

/**
 * The windows of a `--workers` gateway without Redis: each worker's counts are added in the
 * primary's memory, so a key's traffic spread over the workers is judged as one (as the rate
 * limits and the lockout are). Without an answer in time the detector judges its own counts.
 */
export class ClusterWindows implements SharedWindows {
  readonly #send: (m: WindowsRequest) => void
  readonly #waiting = new Map<number, { resolve: (t: Totals[]) => void; timer: NodeJS.Timeout }>()
  readonly #timeoutMs: number
  #next = 0

  constructor(send: (m: WindowsRequest) => void, timeoutMs = 2000) {
    this.#send = send
    this.#timeoutMs = timeoutMs
  }

  add(tallies: readonly Tally[], over: number): Promise<Totals[]> {
    const id = ++this.#next
    return new Promise<Totals[]>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiting.delete(id)
        reject(new Error('the primary did not answer with the anomaly windows'))
      }, this.#timeoutMs)
      timer.unref()
      this.#waiting.set(id, { resolve, timer })
      this.#send({ keygate: 'windows', id, tallies: tallies.map((t) => ({ ...t, addresses: [...t.addresses] })), over })
    })
  }

  /** The primary's answer (a message of another kind is ignored). */
  receive(m: WindowsAnswer): void {
    const w = this.#waiting.get(m.id)
    if (!w) return
    this.#waiting.delete(m.id)
    clearTimeout(w.timer)
    w.resolve(m.totals)
  }
}

/** The primary's side of ClusterWindows: adds a worker's tallies to its own memory windows. */
export async function answerWindows(windows: MemoryWindows, m: WindowsRequest): Promise<WindowsAnswer> {
  const totals = await windows.add(
    m.tallies.map((t) => ({ ...t, addresses: new Set(t.addresses) })),
    m.over,
  )
  return { keygate: 'windows-totals', id: m.id, totals }
}

/**
 * One key's part of a check, at once: adds ARGV[1] requests to its minute (KEYS[1], kept ARGV[8]
 * s), ARGV[1] requests and ARGV[2] errors to its error-rate window (KEYS[2] and KEYS[3], kept ARGV[3]
 * s), and the addresses ARGV[9..] to its set for the hour (KEYS[4]) while it holds fewer than
 * ARGV[4] (the bound the in-memory windows keep too: a key used from more networks than any sane
 * threshold, or per address with `ipv6_prefix_bits` 128, would otherwise add a member for each),
 * setting the set's expiry (ARGV[5] s) when it added any. Answers the three counts and the set's
 * size, followed, when that is over ARGV[6], by up to ARGV[7] of its members (read in the same
 * round trip: a finding lists the hour's addresses, not only those of the check that crossed the
 * threshold).
 */
const ADD_TALLY = `local out = {redis.call('INCRBY', KEYS[1], ARGV[1]), redis.call('INCRBY', KEYS[2], ARGV[1]), redis.call('INCRBY', KEYS[3], ARGV[2])}
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
local n = redis.call('SCARD', KEYS[4])
local max = tonumber(ARGV[4])
for i = 9, #ARGV do
  if n >= max then break end
  n = n + redis.call('SADD', KEYS[4], ARGV[i])
end
if #ARGV >= 9 then redis.call('EXPIRE', KEYS[4], ARGV[5]) end
out[4] = n
if n > tonumber(ARGV[6]) then
  for _, a in ipairs(redis.call('SRANDMEMBER', KEYS[4], ARGV[7])) do out[#out + 1] = a end
end
return out`

/** Where the Redis windows' keys are (after `redis.key_prefix`). */
const WINDOWS_PREFIX = 'keygate:anomaly'

/** How long a check waits for the shared windows before it judges this process's counts alone. */
export const SHARED_WINDOWS_TIMEOUT_MS = 1000

export class RedisWindows implements SharedWindows {
  readonly #redis: Redis
  readonly #prefix: string
  readonly #errWindowS: number
  /** As MemoryWindows: an instance's next check adds to a window up to `check_interval_ms` after its last one did. */
  readonly #keepS: number

  constructor(redis: Redis, errWindowS: number, prefix = WINDOWS_PREFIX, checkIntervalMs = 0) {
    this.#redis = redis
    this.#prefix = prefix
    this.#errWindowS = errWindowS
    this.#keepS = Math.ceil(checkIntervalMs / 1000)
  }

  async add(tallies: readonly Tally[], over: number): Promise<Totals[]> {
    // A pipeline of one script per key, not one MULTI for all: each key's counts are read as they
    // were added (its error rate's requests and errors together), and Redis serves its other
    // clients between two keys. Before (found by a review), the check was a MULTI of seven
    // commands per key, run at a stretch: 250 ms for 5,000 active keys, the rate limits' and
    // lockouts' calls of every instance waiting behind it, and a round trip past
    // SHARED_WINDOWS_TIMEOUT_MS, after which each instance judged its own counts alone.
    const m = this.#redis.pipeline()
    const p = this.#prefix
    for (const t of tallies) {
      const k = `${p}:{${t.keyId}}`
      const keep = this.#keepS
      m.eval(ADD_TALLY, 4, `${k}:r:${t.minute}`, `${k}:q:${t.errWindow}`, `${k}:e:${t.errWindow}`, `${k}:a:${t.hour}`, t.requests, t.errors, 2 * this.#errWindowS + keep, MAX_ADDRESSES, 7200 + keep, over, SEEN, 120 + keep, ...t.addresses)
    }
    const results = (await m.exec()) ?? []
    return results.map(([err, v]) => {
      if (err) throw err
      const [perMinute, errWindowRequests, errWindowErrors, distinctAddresses, ...seen] = v as [number, number, number, number, ...string[]]
      return { perMinute, errWindowRequests, errWindowErrors, distinctAddresses, seen }
    })
  }
}

export type Thresholds = Config['anomalies']

export interface DetectorOptions {
  db: Db
  thresholds: Thresholds
  /** Redis: shared windows and the alert channel. */
  redis?: Redis | undefined
  channel: string
  events?: EventBus | undefined
  log: Logger
  /** 0: no timer (tests call check()). */
  checkIntervalMs: number
  /** Called for each anomaly this process recorded (the metric). */
  onAnomaly?: (type: AnomalyType) => void
  /** Where counts are pooled without Redis (a `--workers` primary); else this process's memory. */
  windows?: SharedWindows | undefined
  /** `rate_limits.ipv6_prefix_bits`: an IPv6 client counts as its network of this size toward `distinct_addresses`, as it does for limits and lockouts. */
  ipv6PrefixBits: number
}

/** A finding judged from the totals, before it is stored. */
interface Finding {
  keyId: string
  type: AnomalyType
  atMs: number
  details: Record<string, unknown>
  /** When the finding could not be stored: what lets the next check find it again. */
  refused?: () => void
}

/** A key's usage history as the unusual-hour check reads it: requests in all, at the hour judged, and its first hourly row. */
interface History {
  total: number
  at_hour: number
  first: Date | null
}

/**
 * The most keys whose histories one query reads (HISTORIES): about half a ms a key on PostgreSQL
 * (two weeks of its rows, through the index), and a plan PostgreSQL estimates well under
 * jit_above_cost (100,000 by default; at 500 keys, some 40,000). A plan over it is compiled
 * first: a first form of this read, whose plan was estimated at a million, spent 1.8 s of its
 * 2.3 s for 500 keys compiling it.
 */
export const HISTORY_BATCH = 250

/**
 * The usage histories of many keys at once: for the n-th key ($1), the requests of its lineage
 * (the key and those it replaced, through replaced_by) from $2 up to $3 (excluded), in all and at
 * the hour of the day $4 (UTC), and the first hourly row; a row for each n. Each lineage key's
 * rows are summed by a subquery of its own (an aggregate, so the planner cannot merge it into a
 * join): read through the table's primary key (key_id, bucket), never the whole table.
 */
const HISTORIES = `WITH RECURSIVE asked AS (
  SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int[]) WITH ORDINALITY AS a(root, since, until, hour, n)
), lineage(n, id) AS (
  SELECT n, root FROM asked
  UNION SELECT l.n, k.id FROM api_keys k JOIN lineage l ON k.replaced_by = l.id
), lineages AS (
  SELECT n, array_agg(id) AS ids FROM lineage GROUP BY n
)
SELECT a.n::int AS n, coalesce(u.total, 0)::float8 AS total, coalesce(u.at_hour, 0)::float8 AS at_hour, u.first
FROM asked a JOIN lineages l ON l.n = a.n
CROSS JOIN LATERAL (
  SELECT sum(requests) AS total, sum(requests) FILTER (WHERE extract(hour FROM bucket AT TIME ZONE 'UTC') = a.hour) AS at_hour, min(bucket) AS first
  FROM api_key_usage WHERE key_id = ANY(l.ids) AND bucket >= a.since AND bucket < a.until
) u`

/**
 * Answers keygate gives when its upstream or its store fails, or it stops: an outage, not the
 * key's doing. Counted as its errors, an upstream down for a minute recorded an `error_rate`
 * anomaly, with its webhook and stream event, for every key in use (found by a review).
 */
const NOT_THE_KEYS: ReadonlySet<string> = new Set(['upstream_unavailable', 'upstream_timeout', 'store_unavailable', 'shutting_down', 'internal_error'])

export class AnomalyDetector implements UsageSink {
  readonly #db: Db
  readonly #t: Thresholds
  readonly #redis: Redis | undefined
  readonly #channel: string
  /**
   * Alerts stored but not (yet) published, in order. `late`: a publish that outlasted its bound and
   * may still go out when Redis answers; it is not sent again meanwhile (found by a review: a
   * paused Redis then sent one copy per check to the channel's subscribers).
   */
  readonly #unpublished: Array<{ message: string; late: boolean }> = []
  readonly #events: EventBus | undefined
  readonly #onAnomaly: ((type: AnomalyType) => void) | undefined
  readonly #log: Logger
  readonly #anomalies: AnomalyLog
  readonly #memory: MemoryWindows
  readonly #shared: SharedWindows
  /** An address → the client it counts as (IPv6: its network). */
  readonly #clientOf: (address: string) => string
  /** By minute and key id. */
  readonly #pending = new ByWindow<Tally>()
  /** `key|type|window` already stored (by anyone): not tried again. */
  readonly #reported = new Map<string, number>()
  /** `key|hour` already judged for unusual activity. */
  readonly #hourJudged = new Map<string, number>()
  #timer: NodeJS.Timeout | undefined
  /** The shared windows failed at the last check (logged once an outage). */
  #sharedDown = false
  /**
   * The shared windows' add while it is unanswered, past its timeout too: a check meanwhile judges
   * this process's counts alone and sends nothing. Before (found by a review), each check sent a
   * script per active key beside those a frozen Redis held, for as long as it stayed frozen where
   * nothing reconnected (redis.invalidation_check_ms 0): 5 checks of 3 keys held 15.
   */
  readonly #sharedOut = new OneOut()
  /**
   * An alert's PUBLISH while it is unanswered, past its bound too: an alert meanwhile is not sent
   * but kept for a later check (#unpublished), as one that failed. Before (found by a review),
   * each finding sent its PUBLISH beside those a frozen Redis held, and waited out its bound for
   * it: one more held command per finding for as long as Redis stayed frozen.
   */
  readonly #publishOut = new OneOut()
  /** The store failed the last history read or insert (logged once an outage). */
  #storeDown = false

  constructor(options: DetectorOptions) {
    this.#db = options.db
    this.#t = options.thresholds
    this.#redis = options.redis
    this.#channel = options.channel
    this.#events = options.events
    this.#onAnomaly = options.onAnomaly
    this.#log = options.log
    this.#anomalies = new AnomalyLog(options.db)
    this.#clientOf = addressKeyer(options.ipv6PrefixBits)
    const { error_rate_window_s: errWindowS, check_interval_ms: intervalMs } = options.thresholds
    this.#memory = new MemoryWindows(errWindowS, intervalMs)
    this.#shared = options.redis ? new RedisWindows(options.redis, errWindowS, WINDOWS_PREFIX, intervalMs) : (options.windows ?? this.#memory)
    if (options.checkIntervalMs > 0) {
      this.#timer = setInterval(() => void this.check(), options.checkIntervalMs)
      this.#timer.unref()
    }
  }

  /**
   * The request path: counts in memory only. A known key that was refused counts as the key's (an
   * error answer from its address). An answer keygate gave because its upstream or its store
   * failed (NOT_THE_KEYS) is a request of the key but not one of its errors.
   */
  count(authenticated: string | undefined, outcome: string, nowMs: number, address?: string, status?: number, refusedKeyId?: string): void {
    const keyId = authenticated ?? refusedKeyId
    if (keyId === undefined) return
    const minute = nowMs - (nowMs % MINUTE_MS)
    const errMs = this.#t.error_rate_window_s * 1000
    const errWindow = nowMs - (nowMs % errMs)
    // A tally spans neither a minute's end nor an error-rate window's (before: grouped by minute,
    // a 10 s window took all of its minute's errors, and a 90 s one its neighbour's).
    const pending = this.#pending.of(Math.max(minute, errWindow))
    let t = pending.get(keyId)
    if (t === undefined) {
      t = { keyId, minute, errWindow, hour: nowMs - (nowMs % BUCKET_MS), lastMs: nowMs, requests: 0, errors: 0, addresses: new Set(), lastAddress: '' }
      pending.set(keyId, t)
    }
    t.requests++
    if (status !== undefined && status >= 400 && !NOT_THE_KEYS.has(outcome)) t.errors++
    if (address && address !== t.lastAddress && t.addresses.size < MAX_ADDRESSES) {
      t.addresses.add(this.#clientOf(address))
      t.lastAddress = address
    }
    if (nowMs > t.lastMs) t.lastMs = nowMs
  }

  /**
   * Adds what was counted before this call to the shared windows and records what crosses a
   * threshold (one check at a time; see coalesced: a shutdown judges what came during a check).
   */
  check(): Promise<void> {
    return this.#checkOnce()
  }

  readonly #checkOnce = coalesced(() => this.#check().catch((err: unknown) => this.#log.warn('anomaly check failed', { err: err as Error })))

  async #check(): Promise<void> {
    await this.#republish()
    if (this.#pending.empty) return
    const tallies: Tally[] = []
    // One push a tally: spread, each was an argument of one call, and past some 120,000 keys in an
    // interval V8 threw "Maximum call stack size exceeded", every check failing (found by a review).
    for (const byKey of this.#pending.take().values()) for (const tally of byKey.values()) tallies.push(tally)
    let totals: Totals[]
    const shared = this.#redis ? 'Redis' : 'the primary'
    try {
      // Bounded: a Redis (or primary) that keeps its connection and stops answering (paused, a long
      // script) held this check, and every one after it, for as long (found by a chaos review:
      // nothing was detected, recorded or logged through a 30 s freeze).
      // Not sent beside the last check's counts while those are unanswered (see #sharedOut).
      if (this.#sharedOut.out) throw new Error(`${shared} has not answered an earlier check's counts yet`)
      totals = await within(this.#sharedOut.send(this.#shared.add(tallies, this.#t.distinct_addresses_per_hour)), SHARED_WINDOWS_TIMEOUT_MS, `${shared}: anomaly windows`)
      if (this.#sharedDown) this.#log.info(`${shared} answers again for anomaly windows; judging every instance's counts again`)
      this.#sharedDown = false
    } catch (err) {
      // Once an outage at warn, as Redis's own health and the webhooks log theirs (before, found
      // by a review: a warning at every check, each check_interval_ms, while traffic came).
      if (this.#sharedDown) this.#log.debug(`${shared} is still unavailable for anomaly windows`, { err: err as Error })
      else this.#log.warn(`${shared} is unavailable for anomaly windows; judging this process alone until it returns (logged once until it does)`, { err: err as Error })
      this.#sharedDown = true
      totals = await this.#memory.add(tallies, this.#t.distinct_addresses_per_hour)
    }
    const findings: Finding[] = []
    tallies.forEach((t, i) => findings.push(...this.#judge(t, totals[i] as Totals)))
    // The counts' findings first: a failed history look-up below must not lose them (the counts
    // are already in the windows and will not be judged again).
    for (const f of findings) await this.#record(f)
    for await (const f of this.#unusualHours(tallies)) await this.#record(f)
  }

  #judge(t: Tally, x: Totals): Finding[] {
    const out: Finding[] = []
    const { keyId, lastMs: atMs } = t
    if (x.perMinute > this.#t.request_rate_per_min) {
      out.push({ keyId, atMs, type: 'request_rate', details: { requests: x.perMinute, per_minute_limit: this.#t.request_rate_per_min, minute: new Date(t.minute).toISOString() } })
    }
    if (x.errWindowRequests >= this.#t.error_rate_min_requests && x.errWindowErrors * 100 > this.#t.error_rate_percent * x.errWindowRequests) {
      out.push({
        keyId,
        atMs,
        type: 'error_rate',
        details: {
          requests: x.errWindowRequests,
          errors: x.errWindowErrors,
          error_percent: Math.round((x.errWindowErrors * 10_000) / x.errWindowRequests) / 100,
          threshold_percent: this.#t.error_rate_percent,
          window_s: this.#t.error_rate_window_s,
        },
      })
    }
    if (x.distinctAddresses > this.#t.distinct_addresses_per_hour) {
      out.push({
        keyId,
        atMs,
        type: 'distinct_addresses',
        // The hour's addresses the windows hold (with Redis, any instance's), not only this check's.
        details: { addresses: x.distinctAddresses, per_hour_limit: this.#t.distinct_addresses_per_hour, hour: new Date(t.hour).toISOString(), seen_here: x.seen },
      })
    }
    return out
  }

  /**
   * Once per key and hour of activity: is this hour of the day one the key's own history rarely
   * saw? The history is the key's lineage (the keys it replaced, so a rotation does not start it
   * afresh) and must span `unusual_hour_min_days`: counted in requests alone, a busy key had
   * "enough" in its first hour and every later hour of its first day was unusual (found by a
   * review: some 22 alerts a day for a new 24/7 key, and again after each rotation).
   *
   * The histories of the keys not judged yet in their hour are read HISTORY_BATCH keys a query
   * (the findings of each batch yielded before the next is read). Before (found by a review), each
   * key's was a query of its own, one after another, and the planner took the lineage's
   * recursive CTE for some hundred keys and read every key's usage rows of the history's days for
   * each: at the turn of an hour with 1,000 active keys, two weeks of history each, a check (and
   * the checks queued behind it) took 40 s on PostgreSQL and 80 s on the embedded store, and
   * 10 minutes with 5,000 (bench/unusual-hours.ts); now 0.2 to 0.3 s, and 1 to 1.5 s.
   */
  async *#unusualHours(tallies: readonly Tally[]): AsyncGenerator<Finding> {
    // A key's first tally in an hour stands for it (a check can hold several: minutes, windows).
    const asked = new Map<string, Tally>()
    for (const t of tallies) {
      const id = `${t.keyId}|${t.hour}`
      if (!this.#hourJudged.has(id) && !asked.has(id)) asked.set(id, t)
    }
    const waiting = [...asked.values()]
    for (let at = 0; at < waiting.length; at += HISTORY_BATCH) {
      const batch = waiting.slice(at, at + HISTORY_BATCH)
      let histories: History[]
      try {
        histories = await this.#histories(batch)
      } catch (err) {
        // Not judged: the key's next request in this hour (its next check) tries again.
        this.#storeFailed('could not read the usage history for the unusual-hour check; the next request of the key in this hour tries again', {
          key_ids: batch.slice(0, 10).map((t) => t.keyId),
          keys: batch.length,
          err: err as Error,
        })
        continue
      }
      this.#storeAnswers()
      for (const [i, t] of batch.entries()) {
        const id = `${t.keyId}|${t.hour}`
        // Judged once the history was read: a failed look-up is tried again by the next check.
        if (this.#hourJudged.size > 100_000) this.#hourJudged.clear()
        this.#hourJudged.set(id, t.hour)
        const f = this.#unusualHour(t, histories[i] as History)
        // Judged again by the key's next request in that hour (before: the hour stayed judged, and the anomaly was lost).
        if (f) yield { ...f, refused: () => this.#hourJudged.delete(id) }
      }
    }
  }

  /** The usage histories of these keys' lineages, in their order (one query). */
  async #histories(batch: readonly Tally[]): Promise<History[]> {
    const days = this.#t.unusual_hour_history_days * 86_400_000
    const rows = await this.#db.query<History & { n: number }>(HISTORIES, [
      batch.map((t) => t.keyId),
      batch.map((t) => new Date(t.hour - days)),
      batch.map((t) => new Date(t.hour)),
      batch.map((t) => new Date(t.hour).getUTCHours()),
    ])
    const out: History[] = batch.map(() => ({ total: 0, at_hour: 0, first: null }))
    for (const r of rows) out[r.n - 1] = r
    return out
  }

  /** The key's finding for its hour, from its history (none when the history is too short, or the hour a usual one). */
  #unusualHour(t: Tally, h: History): Omit<Finding, 'refused'> | undefined {
    const { total, at_hour: atHour, first } = h
    if (total < this.#t.unusual_hour_min_requests) return undefined
    if (!first || t.hour - new Date(first).getTime() < this.#t.unusual_hour_min_days * 86_400_000) return undefined
    if (atHour * 100 > this.#t.unusual_hour_max_percent * total) return undefined
    return {
      keyId: t.keyId,
      atMs: t.lastMs,
      type: 'unusual_hour',
      details: {
        hour_utc: new Date(t.hour).getUTCHours(),
        history_days: this.#t.unusual_hour_history_days,
        history_since: new Date(first).toISOString(),
        history_requests: total,
        history_requests_at_hour: atHour,
        max_percent: this.#t.unusual_hour_max_percent,
      },
    }
  }

  async #record(f: Finding): Promise<void> {
    const dedupeMs = this.#t.dedupe_window_s * 1000
    const windowStart = f.atMs - (f.atMs % dedupeMs)
    const id = `${f.keyId}|${f.type}|${windowStart}`
    if (this.#reported.has(id)) return
    if (this.#reported.size > 100_000) this.#reported.clear()
    this.#reported.set(id, windowStart)
    let row: Anomaly | undefined
    let event: KeygateEvent | undefined
    const finding = { keyId: f.keyId, type: f.type, windowStart: new Date(windowStart), details: f.details, detectedAt: new Date(f.atMs) }
    const events = this.#events
    try {
      // With its webhook deliveries, in one transaction (EventBus.stage), as the key events are:
      // before (found by a review), they were queued after the row had committed, and a failure
      // between the two (the store going away, a crash) left an anomaly recorded and streamed
      // that no webhook ever got. Now a refused delivery row leaves the finding to the next check.
      row = events
        ? await this.#db.transaction(async (tx) => {
            const made = await this.#anomalies.insert(finding, tx)
            if (made) event = await events.stage(tx, 'anomaly.detected', anomalyJson(made))
            return made
          })
        : await this.#anomalies.insert(finding)
    } catch (err) {
      // Not stored, so not reported: the next check that finds it tries again.
      this.#reported.delete(id)
      f.refused?.()
      this.#storeFailed('could not record an anomaly; it is tried again when next found', { key_id: f.keyId, type: f.type, err: err as Error })
      return
    }
    this.#storeAnswers()
    if (!row) return
    const json = anomalyJson(row)
    this.#log.warn('anomaly detected', { anomaly_id: row.id, key_id: row.keyId, type: row.type })
    this.#onAnomaly?.(row.type)
    if (this.#redis) {
      const entry = { message: JSON.stringify(json), late: false }
      // Stored, but no instance's stream has it: sent again at a later check (the streams' feeds
      // also read what they missed from the table when their subscription comes back).
      if (!(await this.#publish(entry)) && this.#unpublished.length < MAX_UNPUBLISHED) {
        this.#unpublished.push(entry)
        this.#log.warn('could not publish an anomaly alert; it is published again at a later check', { anomaly_id: row.id })
      }
    }
    if (event) events?.publish(event)
  }

  /**
   * A history read or an insert the store failed: at warn once an outage, then at debug until the
   * store answers again. Before (found by the anomalies review), a warning at every check for every
   * key active in an hour not yet judged, and for every finding: 500 lines in 12 s for 20 keys
   * whose history could not be read (every active key is one when the hour turns during an
   * outage), where the gateway's key look-ups log one an outage.
   */
  #storeFailed(message: string, fields: Record<string, unknown>): void {
    if (this.#storeDown) return this.#log.debug(message, fields)
    this.#storeDown = true
    this.#log.warn(`${message} (the store fails; logged once until it answers again)`, fields)
  }

  /** A history read or an insert the store answered: the end of an outage is said once. */
  #storeAnswers(): void {
    if (!this.#storeDown) return
    this.#storeDown = false
    this.#log.info('the store answers again for anomaly checks; findings are recorded and hours judged again')
  }

  /**
   * Publishes an alert, waiting SHARED_WINDOWS_TIMEOUT_MS at most (a paused Redis held the check
   * here too); true once published. One still on its way then is `late` until it settles: out
   * (it is dropped from #unpublished), or failed (sent again at a later check). None is sent
   * while an earlier one is on its way (#publishOut): false at once.
   */
  async #publish(entry: { message: string; late: boolean }): Promise<boolean> {
    if (this.#publishOut.out) return false
    const sent = this.#publishOut.send((this.#redis as Redis).publish(this.#channel, entry.message))
    try {
      await within(sent, SHARED_WINDOWS_TIMEOUT_MS, 'Redis: anomaly alert')
      return true
    } catch (err) {
      if (!(err instanceof TimedOut)) return false
      entry.late = true
      sent.then(
        () => {
          const at = this.#unpublished.indexOf(entry)
          if (at !== -1) this.#unpublished.splice(at, 1)
        },
        () => (entry.late = false),
      )
      return false
    }
  }

  /** Alerts whose publication failed, in order, until one fails again or is still on its way. */
  async #republish(): Promise<void> {
    while (this.#redis && this.#unpublished.length > 0) {
      const entry = this.#unpublished[0] as { message: string; late: boolean }
      if (entry.late || !(await this.#publish(entry))) return
      this.#unpublished.shift()
    }
  }

  /** Stops the timer and judges what is pending. */
  async close(): Promise<void> {
    clearInterval(this.#timer)
    await this.check()
  }
}

export type AnomalyListener = (anomaly: AnomalyJson) => void

/** The recorded anomalies: what a feed streams (a message on the channel only says where to look). */
export interface AnomalyHistory {
  /** The newest id recorded, or undefined when there is none. */
  latestId(): Promise<string | undefined>
  /** Anomalies with an id above `id`, oldest first. */
  after(id: string, limit: number): Promise<AnomalyJson[]>
  /** The anomalies with these ids (one read), oldest first; an id with none is left out. */
  among(ids: readonly string[]): Promise<AnomalyJson[]>
  /** The ids of the newest `limit` anomalies, newest first. */
  newestIds(limit: number): Promise<string[]>
}

/** The table as a feed's history. */
export function anomalyHistory(log: AnomalyLog): AnomalyHistory {
  return {
    latestId: async () => (await log.list({ limit: 1 }))[0]?.id,
    after: async (id, limit) => (await log.after(id, limit)).map(anomalyJson),
    among: async (ids) => (await log.among(ids)).map(anomalyJson),
    newestIds: (limit) => log.newestIds(limit),
  }
}

/** Whether anomaly id `a` (bigint digits) comes after `b`. */
function idAfter(a: string, b: string): boolean {
  return a.length !== b.length ? a.length > b.length : a > b
}

/** How often, at most, the feed logs the messages it dropped, and the reads that failed. */
const DROPPED_LOG_MS = 60_000

/**
 * How far below the newest id it delivered a feed still looks up an id a message names: one
 * committed after higher ones (another instance's insert, still open while they were read). An
 * id further below is old: streamed already, or never live (a stream resumes it from the table).
 */
export const LATE_WINDOW = 1_000
/**
 * The ids a feed remembers as delivered. Every id delivered since one in the window was
 * delivered lies within LATE_WINDOW of it on either side, so at most 2 × LATE_WINDOW of them:
 * each id in the window is still remembered, and none is streamed twice.
 */
const DELIVERED = 10 * LATE_WINDOW
/** How often a feed PINGs its subscriber connection (the invalidation subscriber checks its own likewise). */
const SUBSCRIBER_CHECK_MS = 5_000
/** Ids named on the channel that wait for the next read of the table; more are dropped (a flood). */
export const MAX_WAITING = 1_000

/** Without Redis: how often a feed reads the table for other instances' findings (admin.stream_poll_ms). */
export const POLL_MS = 1_000
/** Anomalies one poll of the table reads at most after the newest it read; the rest wait for the next. */
export const POLL_PAGE = 500

/** Where a table poll begins: after `cursor`, with `gaps` (ids below it that had no row, within LATE_WINDOW) looked up again. */
interface PollStart {
  cursor: bigint
  gaps: Iterable<bigint>
}

/** Where the table is now; the ids just below its newest that have no row may be open inserts. */
async function whereTableIs(history: AnomalyHistory): Promise<PollStart> {
  const ids = (await history.newestIds(LATE_WINDOW)).map(BigInt)
  const top = ids[0] ?? 0n
  const gaps: bigint[] = []
  let above = top
  // Fewer rows than the window: none below the oldest.
  for (const id of [...ids, 0n]) {
    gaps.push(...skipped(id, above, top))
    above = id
  }
  return { cursor: top, gaps }
}

/** The ids between `from` and `to` (both excluded) within LATE_WINDOW below `top`, highest first. */
function* skipped(from: bigint, to: bigint, top: bigint): Generator<bigint> {
  for (let id = to - 1n; id > from && id > top - BigInt(LATE_WINDOW) && id > 0n; id--) yield id
}

/**
 * Without Redis (or while its subscription is down), the table read every `everyMs` while
 * `wanted()` (a stream is open), from where `from` says (default: where the table is), and at once
 * when `now()` is called (this process recorded a finding: it is in the table by then). Each read
 * takes the rows above the newest id it read (a page at most), and looks again at the ids it
 * passed that had no row, within LATE_WINDOW below that newest: ids are taken at INSERT and seen
 * at COMMIT, so another instance's lower id can appear after a higher one was read. One read at a
 * time, so each row is delivered once, in id order. Stopped, it forgets where it was: a stream
 * opened later gets only what is recorded after it opened (what it missed comes from its
 * Last-Event-ID).
 */
function tablePoll(o: {
  history: AnomalyHistory
  everyMs: number
  log: Logger
  deliver: (a: AnomalyJson) => void
  wanted: () => boolean
  /** Where a read begins: the newest id, and the ids below it that had no row (default: where the table is). */
  from?: () => Promise<PollStart>
}) {
  const window = BigInt(LATE_WINDOW)
  /** The newest id read: where the next poll reads from. */
  let cursor: bigint | undefined
  /** Ids below `cursor` (within the window) that had no row when passed. */
  const gaps = new Set<string>()
  let timer: NodeJS.Timeout | undefined
  /** A read runs: a timer's tick skips it (but `now()` does not: the running read may have begun before the finding). */
  let reading = false
  let beginning: Promise<void> | undefined
  /** Streams between start() and their listener: the poll goes on for them. */
  let starting = 0
  /** Bumped by a stop: a read that began before it changes nothing after it. */
  let run = 0
  const failedLog = oncePer(DROPPED_LOG_MS)
  let failed = 0
  const failure = (err: unknown) => {
    failed++
    if (!failedLog()) return
    o.log.warn('could not read the table for new anomalies; read again at the next poll', { failed_reads: failed, err: err as Error })
    failed = 0
  }
  const prune = () => {
    for (const id of gaps) if (cursor === undefined || BigInt(id) <= cursor - window) gaps.delete(id)
  }
  /** Notes the ids between `from` and `to` (both excluded) as passed without a row, within the window below `top`. */
  const passed = (from: bigint, to: bigint, top: bigint) => {
    for (const id of skipped(from, to, top)) gaps.add(String(id))
  }
  const begin = async (me: number) => {
    const from = await (o.from ?? (() => whereTableIs(o.history)))()
    if (me !== run) return
    for (const id of from.gaps) gaps.add(String(id))
    cursor = from.cursor
  }
  const begun = (): Promise<void> => {
    if (beginning) return beginning
    const b: Promise<void> = begin(run).finally(() => {
      if (beginning === b) beginning = undefined
    })
    return (beginning = b)
  }
  const poll = async () => {
    // Not begun yet (a stream's start() still reading where the table is, or that read failed):
    // begin, then read. A row committed meanwhile is either below where the table turns out to
    // be (recorded before the stream listened: its resume has it) or above it, and read here.
    if (cursor === undefined) await begun()
    const me = run
    if (cursor === undefined) return
    prune()
    const late = gaps.size > 0 ? await o.history.among([...gaps]) : []
    const page = await o.history.after(String(cursor), POLL_PAGE)
    if (me !== run) return
    for (const a of late) gaps.delete(a.id)
    const top = page.length > 0 ? BigInt((page.at(-1) as AnomalyJson).id) : cursor
    let below = cursor
    for (const a of page) {
      passed(below, BigInt(a.id), top)
      below = BigInt(a.id)
    }
    cursor = top
    prune()
    // In id order: the late ones are all below where the page began.
    late.forEach(o.deliver)
    page.forEach(o.deliver)
  }
  /** Stops; returns the ids it had passed without a row (within the window: a late commit may fill one yet). */
  const stop = (): string[] => {
    prune()
    const unread = [...gaps]
    clearInterval(timer)
    timer = undefined
    cursor = undefined
    beginning = undefined
    gaps.clear()
    run++
    return unread
  }
  // One read at a time (see coalesced): two at once would both read from the same cursor and
  // deliver what they found twice. A failed read changes nothing: what it would have delivered
  // is read by the next.
  const read = coalesced(async () => {
    if (!o.wanted() && starting === 0) {
      stop()
      return
    }
    reading = true
    await poll()
      .catch(failure)
      .finally(() => (reading = false))
  })
  return {
    /** Polls from now on, once it knows where the table is (or could not read it: the next poll tries again). */
    async start(): Promise<void> {
      if (timer === undefined) {
        timer = setInterval(() => void (reading || read()), o.everyMs)
        timer.unref()
      }
      if (cursor !== undefined) return
      starting++
      await begun()
        .catch(failure)
        .finally(() => starting--)
    },
    /**
     * Reads the table at once, or right after the read that runs (one more, shared by every call
     * made meanwhile); nothing while no stream is open (one opened later begins where the table is).
     */
    now(): void {
      if (timer !== undefined) void read()
    },
    /** The newest id read (undefined before the first read): what it delivers from now on is above it, or a late commit at most LATE_WINDOW below. */
    position: (): bigint | undefined => cursor,
    stop,
  }
}

/**
 * Every anomaly found by any instance, as it is recorded, each once and in id order, read from
 * the table: with Redis, when the channel announces one (an instance's own finding comes back on
 * it too); without Redis, and with Redis while its subscription is down (before it is first
 * confirmed, and from a close of its connection until it is confirmed again), while a stream is
 * open, every `admin.stream_poll_ms` (the other instances' findings) and at once when this
 * process's event bus says it recorded one. The admin SSE stream listens here, and calls
 * `ready()` before it does.
 */
export class AnomalyFeed {
  readonly #listeners = new Map<AnomalyListener, (() => void) | undefined>()
  #stop: () => void
  #ready: () => Promise<void> = () => Promise.resolve()
  #position: () => bigint | undefined = () => undefined
  #closed = false

  /**
   * With Redis, `history` (the table) is required: it is the only source of what is streamed. A
   * message on the channel is a sign that something was recorded, not the anomaly: the feed reads
   * the table from the newest id it delivered, so the announced anomaly comes with any recorded
   * before it whose publication is late or lost, in id order. While the subscription is down the
   * table is polled as without Redis, from the newest id delivered; once it is confirmed again the
   * poll stops and one read takes what follows that id, and the ids the poll passed without a row
   * (a late commit whose announcement came while the subscription was down): none is lost across
   * either switch, and none is sent twice (each id is delivered once). A message naming no recorded
   * anomaly (forged, or another deployment's on the same channel) is dropped: before, it was
   * streamed, and its id, as clients' Last-Event-ID and as this feed's replay cursor, hid every
   * real anomaly with a lower id from their resumes.
   *
   * The table is read by one reader, one read at a time, for every id the messages named
   * meanwhile (at most MAX_WAITING of them): before, each message was a read of its own, all at
   * once, so a flood of messages (forged, or another deployment's) was as many concurrent reads.
   */
  constructor(options: { redis?: Redis | undefined; channel: string; events: EventBus; log: Logger; history?: AnomalyHistory; checkIntervalMs?: number; pollMs?: number }) {
    // With Redis an anomaly can be announced twice (read from the table with a later one, then
    // published again by its instance): each id is delivered once.
    const delivered = options.redis ? new QuickLRU<string, true>({ maxSize: DELIVERED }) : undefined
    /** The newest id delivered, from the table: where the next read starts. */
    let newest: string | undefined
    if (options.redis) this.#position = () => (newest === undefined ? undefined : BigInt(newest))
    const deliver = (a: AnomalyJson) => {
      if (delivered) {
        if (delivered.has(a.id)) return
        delivered.set(a.id, true)
        if (newest === undefined || idAfter(a.id, newest)) newest = a.id
      }
      for (const l of this.#listeners.keys()) {
        try {
          l(a)
        } catch {}
      }
    }
    if (options.redis && delivered) {
      const { log, channel, history } = options
      if (!history) throw new Error('an anomaly feed on Redis needs the table (history): the channel only announces what the table holds')
      const sub = subscriberConnection(options.redis)
      let subscribed = false
      /** The newest id when the feed began: an older one is no live anomaly (its streams resume from the table). */
      let floor: string | undefined
      const begun = history.latestId().then(
        (id) => {
          newest ??= id ?? '0'
          floor = newest
        },
        () => {},
      )
      // Each warned about once a minute at most: a flood of messages, or a store down under a
      // stream of them, must not flood the log.
      const droppedLog = oncePer(DROPPED_LOG_MS)
      let dropped = 0
      let unread = 0
      const drop = (id: string, why: 'unknown' | 'unread') => {
        if (why === 'unread') unread++
        else dropped++
        if (!droppedLog()) return
        log.warn('dropped anomaly alerts on the channel that name no recorded anomaly, or none recent (malformed, forged, or another deployment on the same channel)', {
          channel,
          dropped: dropped + unread,
          not_looked_up: unread,
          last_id: id,
        })
        dropped = 0
        unread = 0
      }
      const failedLog = oncePer(DROPPED_LOG_MS)
      let failed = 0
      const failure = (err: unknown) => {
        failed++
        if (!failedLog()) return
        log.warn('could not read the anomalies announced on the channel from the table; read again at the next message', { failed_reads: failed, err: err as Error })
        failed = 0
      }
      /** Ids named on the channel since the last read. */
      const waiting = new Set<string>()
      /** Whether rows may have been recorded unannounced (the subscription was down). */
      let behind = false
      /**
       * Ids the table poll passed without a row while the subscription was down, looked up by the
       * first read once it is back: one committed late whose announcement came before the
       * subscription did (or never came: its instance stopped first) is in no message.
       */
      const unseen = new Set<string>()
      /** One read of the table: the waiting ids that may be late commits, then what follows `newest`. */
      const readOnce = async (): Promise<void> => {
        await begun
        // The feed could not learn where the table was when it began: it learns now, with no
        // floor, so the anomaly that was announced (at most LATE_WINDOW below) is looked up.
        newest ??= (await history.latestId()) ?? '0'
        const from = newest
        const ids = [...waiting]
        waiting.clear()
        const passed = [...unseen]
        unseen.clear()
        const wasBehind = behind
        behind = false
        // Below `from`, only a late commit is looked up: within LATE_WINDOW of it (an older id was
        // streamed already, and may be forgotten, or was never live) and above where the feed began.
        const lowest = BigInt(from) - BigInt(LATE_WINDOW)
        const late = [...new Set([...ids, ...passed])].filter((id) => !idAfter(id, from) && !delivered.has(id) && BigInt(id) > lowest && (floor === undefined || idAfter(id, floor)))
        try {
          if (late.length > 0) (await history.among(late)).forEach(deliver)
          if (wasBehind || ids.some((id) => idAfter(id, from))) {
            for (;;) {
              const page = await history.after(newest, 500)
              page.forEach(deliver)
              if (page.length < 500) break
            }
          }
        } catch (err) {
          // Read again at the next message (or when the subscription is back).
          for (const id of ids) if (waiting.size < MAX_WAITING) waiting.add(id)
          else drop(id, 'unread')
          for (const id of passed) if (BigInt(id) > lowest) unseen.add(id)
          behind ||= wasBehind
          throw err
        }
        for (const id of ids) if (!delivered.has(id)) drop(id, 'unknown')
      }
      // One reader at a time (see coalesced): a message during a read gets a read after it, which
      // finds its id already taken when the running one took it.
      const read = coalesced(async () => {
        try {
          while (waiting.size > 0 || behind) await readOnce()
        } catch (err) {
          failure(err)
        }
      })
      // Until the subscription is confirmed, and from when its connection closes until it is
      // confirmed again, no message comes: the streams are fed from the table as without Redis
      // (every admin.stream_poll_ms while one is open, and at once for this process's own
      // findings), by one poll for the process. Before (found by a review), they went quiet for
      // the whole of a Redis outage, the findings recorded all the same.
      let live = false
      const poll = tablePoll({
        history,
        everyMs: options.pollMs ?? POLL_MS,
        log,
        deliver,
        wanted: () => !live && this.#listeners.size > 0,
        from: async () => {
          await begun
          if (this.#listeners.size === 0 || newest === undefined) {
            // No stream waits for what came since the last delivered one (a stream opening now
            // catches up from its own start): from where the table is, as without Redis.
            const at = await whereTableIs(history)
            if (newest === undefined || at.cursor > BigInt(newest)) newest = String(at.cursor)
            return at
          }
          // The streams open when the subscription went down: from the newest they got, and the
          // ids just below it that none got since the feed began (inserts still open then).
          const top = BigInt(newest)
          const bottom = floor === undefined ? 0n : BigInt(floor)
          return { cursor: top, gaps: [...skipped(bottom, top, top)].filter((id) => !delivered.has(String(id))) }
        },
      })
      const offEvents = options.events.on((e) => {
        if (e.type === 'anomaly.detected' && !live) poll.now()
      })
      // Confirmed on the connection that is up now: what is announced from here on comes as a
      // message, and the read that follows (after this) finds what was recorded before, above the
      // newest delivered, and the ids the poll passed without a row. The poll stops first: a read
      // of its that is under way delivers nothing, so none comes twice or out of turn.
      const subscribedNow = (): void => {
        if (live || sub.status !== 'ready') return
        live = true
        for (const id of poll.stop()) unseen.add(id)
        behind = true
        void read()
      }
      sub.on('close', () => {
        if (!live) return
        live = false
        if (this.#listeners.size > 0) void poll.start()
      })
      // Warned once an outage (then at debug): ioredis retries every 500 ms at most, and each try
      // was a warning, some 7,200 an hour of an outage (found by a review); Redis's own health
      // says when it is back.
      let subscriberFailing = false
      // Subscribed again on each 'ready' (keepSubscribed, below): before (found by a review), a
      // refusal after a reconnection (an ACL that took the channel away) was dropped, and the
      // streams read the table for good.
      sub.on('ready', () => (subscriberFailing = false))
      sub.on('error', (err: Error) => {
        if (subscriberFailing) return log.debug('anomaly alert subscriber error', { err })
        subscriberFailing = true
        log.warn('anomaly alert subscriber error; retrying (logged once until it is back)', { err })
      })
      sub.on('message', (ch: string, message: string) => {
        if (ch !== channel) return
        let id: unknown
        try {
          id = (JSON.parse(message) as { id?: unknown } | null)?.id
        } catch {}
        // Looked up in the table: anything but an anomaly id names none (and its id, as an SSE
        // `id:` line, could add lines to the stream).
        if (typeof id !== 'string' || !isAnomalyId(id)) {
          drop(String(id).slice(0, 40), 'unknown')
          return
        }
        // As the table writes it ("07" is 7, delivered as "7").
        const named = String(BigInt(id))
        if (delivered.has(named)) return
        if (!waiting.has(named)) {
          if (waiting.size >= MAX_WAITING) {
            drop(named, 'unread')
            return
          }
          waiting.add(named)
        }
        void read()
      })
      // A SUBSCRIBE Redis refuses (an ACL user without the channel) is warned of and asked again
      // until it is taken (keepSubscribed). Before, it was never asked again while the connection
      // stayed up, and the streams were fed from the table for good, with nothing said. Subscribed
      // on each connection, the first as the later ones: its answer says when the subscription
      // holds (a table read begun at 'ready' could run before it did, and an anomaly announced in
      // between would reach neither).
      const unsubscribe = keepSubscribed(sub, channel, {
        log,
        meanwhile: "anomaly streams read other instances' findings from api_key_anomalies every admin.stream_poll_ms",
        flowing: 'anomaly alerts',
        onSubscribed: () => {
          subscribed = true
          subscribedNow()
        },
      })
      // A subscriber connection that died without closing (half-open: a Redis host gone, a NAT or
      // proxy that dropped it) gets no message and no error, for as long as TCP keepalive takes
      // to notice (two hours with the kernel's defaults): the streams got no live anomaly all
      // that time (found by a review). A PING not answered in time reconnects it; its 'ready'
      // then reads from the table what was announced meanwhile.
      const every = options.checkIntervalMs ?? SUBSCRIBER_CHECK_MS
      let checking = false
      // Once per connection: ioredis says 'ready' until the silent connection it ends has closed
      // (its disconnectTimeout, 2 s), and each disconnect added a listener to it (a check every
      // 100 ms passed Node's bound of 10: found by a read-back of the suite's warnings).
      let reconnecting = false
      sub.on('ready', () => (reconnecting = false))
      const check = (): void => {
        if (checking || reconnecting || !subscribed || sub.status !== 'ready') return
        checking = true
        within(sub.ping(), every, 'Redis: anomaly subscriber PING')
          .catch((err: unknown) => {
            if (!(err instanceof TimedOut) || sub.status !== 'ready') return
            log.warn('the anomaly alert subscriber did not answer a PING in time: reconnecting it (what was announced meanwhile is read from the table)', { timeout_ms: every })
            reconnecting = true
            sub.disconnect(true)
          })
          .finally(() => (checking = false))
      }
      const timer = every > 0 ? setInterval(check, every) : undefined
      timer?.unref()
      this.#ready = () => (live ? Promise.resolve() : poll.start())
      this.#stop = () => {
        unsubscribe()
        clearInterval(timer)
        offEvents()
        poll.stop()
        sub.disconnect()
      }
    } else {
      const { history } = options
      // With the table, everything streamed is read from it, in id order: this process's finding
      // on the bus only says that it is there (its row is committed before the event is
      // emitted), and has it read at once. Before, it was delivered from the bus at once and the
      // other instances' findings at the next poll, so a stream could carry an own finding before
      // another instance's lower id, and a client resuming between the two never got the lower
      // one (found by a review); and a finding whose event came while a stream was opening, after
      // the read of where the table was, reached no listener yet and was then skipped by the
      // table's read as sent: that stream never got it. Without the table (an admin API built
      // without one) there is nothing to read: the bus's events are delivered as they come.
      const poll = history ? tablePoll({ history, everyMs: options.pollMs ?? POLL_MS, log: options.log, deliver, wanted: () => this.#listeners.size > 0 }) : undefined
      const off = options.events.on((e) => {
        if (e.type !== 'anomaly.detected') return
        if (poll) poll.now()
        else deliver(e.data as AnomalyJson)
      })
      if (poll) {
        this.#ready = () => poll.start()
        this.#position = () => poll.position()
      }
      this.#stop = () => {
        off()
        poll?.stop()
      }
    }
  }

  /** How many listen now (the open streams). */
  get listeners(): number {
    return this.#listeners.size
  }

  /**
   * Call before `on`: without Redis, or while its subscription is down, begins reading the table
   * (until no listener is left, or the subscription is back) and settles once it knows where the
   * table is, so any finding recorded after this (this instance's or another's) is delivered.
   * Never rejects (a failed read is tried again at the next poll).
   */
  ready(): Promise<void> {
    return this.#ready()
  }

  /**
   * Where the feed is: the newest id it read or delivered. Whatever it delivers later is above it,
   * or a late commit at most LATE_WINDOW below (undefined: not known yet, or a feed without the table).
   */
  position(): bigint | undefined {
    return this.#position()
  }

  /**
   * `onClose` is called when the feed closes (shutdown: the stream ends), soon after this call when
   * it has closed already. Returns the unsubscriber.
   */
  on(listener: AnomalyListener, onClose?: () => void): () => void {
    // A stream whose request was in flight as the stop began (its handler reading the store) comes
    // after the close: it ends as the others did. Before (found by a review), it listened on the
    // closed feed, nothing ended it, and the stop waited for its connection until its deadline
    // (gateway.shutdown_timeout_ms) cut it. After this call returns: the caller holds the unsubscriber.
    if (this.#closed) {
      if (onClose) queueMicrotask(onClose)
      return () => {}
    }
    this.#listeners.set(listener, onClose)
    return () => this.#listeners.delete(listener)
  }

  close(): void {
    this.#closed = true
    const closing = [...this.#listeners.values()]
    this.#listeners.clear()
    // Once: serve closes the feed as its stop begins and again at its end, and a second
    // disconnect of the closed subscriber started ioredis's 2 s timer to destroy it, which held
    // the exit that long after `stopped` (found by a review).
    const stop = this.#stop
    this.#stop = () => {}
    this.#ready = () => Promise.resolve()
    stop()
    for (const c of closing) c?.()
  }
}
