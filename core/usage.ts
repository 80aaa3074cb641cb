// Per-key request counts and rejections by reason, for the admin API's reports. The gateway
// counts in memory on the request path (a Map update or two, no I/O); the recorder adds the counts
// to hourly rows every `usage.flush_interval_s` and on shutdown. A failed flush keeps its counts
// for the next one. Memory is bounded by the keys that authenticated (per hour) since the last
// flush that succeeded (reasons are a closed set of error codes); a flush writes FLUSH_BATCH rows
// to a statement, so one after a long store outage still fits store.query_timeout_ms.
import { coalesced } from './coalesce.ts'
import type { Db } from './db.ts'
import type { Logger } from './log.ts'

export const BUCKET_MS = 3_600_000

/** Rows one statement of a flush writes at most. */
export const FLUSH_BATCH = 10_000

/** Parallel arrays (one per statement parameter, a row per index) cut into FLUSH_BATCH rows at a time. */
function* batches(columns: ReadonlyArray<readonly unknown[]>): Generator<unknown[][]> {
  const rows = columns[0]?.length ?? 0
  for (let i = 0; i < rows; i += FLUSH_BATCH) yield columns.map((c) => c.slice(i, i + FLUSH_BATCH))
}

/** What the gateway calls once per answered request. */
export interface UsageSink {
  /**
   * `keyId` when the request authenticated; `outcome` is `forwarded` or the error code answered;
   * `address` the client address and `status` the HTTP status answered (the anomaly detector);
   * `refusedKeyId` the stored key that was presented but refused (revoked, expired, outside its
   * CIDR bindings): no use of the key for the usage rows, but a sign of a leak for the detector.
   */
  count(keyId: string | undefined, outcome: string, nowMs: number, address?: string, status?: number, refusedKeyId?: string): void
}

export const NO_USAGE: UsageSink = { count: () => {} }

/** One sink that counts into several (the usage recorder and the anomaly detector). */
export function teeUsage(...sinks: ReadonlyArray<UsageSink | undefined>): UsageSink {
  const list = sinks.filter((s): s is UsageSink => s !== undefined)
  if (list.length === 0) return NO_USAGE
  if (list.length === 1) return list[0] as UsageSink
  return {
    count(keyId, outcome, nowMs, address, status, refusedKeyId) {
      for (let i = 0; i < list.length; i++) (list[i] as UsageSink).count(keyId, outcome, nowMs, address, status, refusedKeyId)
    },
  }
}

interface KeyCounts {
  requests: number
  rejected: number
  lastMs: number
}

const bucketOf = (ms: number) => ms - (ms % BUCKET_MS)

/**
 * Counts by time window (the window's start, epoch ms) and then by id, for what the request
 * path tallies between two flushes. The map of the window asked for last is kept at hand, so a
 * request costs one Map look-up by id and no composite key is ever built; `take` hands the
 * whole lot to a flush and starts afresh.
 */
export class ByWindow<T> {
  #windows = new Map<number, Map<string, T>>()
  #window = -1
  #current = new Map<string, T>()

  /** The entries of `window` (made empty when it has none yet). */
  of(window: number): Map<string, T> {
    if (window !== this.#window) {
      let m = this.#windows.get(window)
      if (m === undefined) {
        m = new Map()
        this.#windows.set(window, m)
      }
      this.#window = window
      this.#current = m
    }
    return this.#current
  }

  get empty(): boolean {
    return this.#windows.size === 0
  }

  /** Everything counted so far, by window, left where it is. */
  get all(): ReadonlyMap<number, ReadonlyMap<string, T>> {
    return this.#windows
  }

  /** Everything counted so far, by window; this starts empty again. */
  take(): Map<number, Map<string, T>> {
    const all = this.#windows
    this.#windows = new Map()
    this.#window = -1
    this.#current = new Map()
    return all
  }
}

export class UsageRecorder implements UsageSink {
  readonly #db: Db
  readonly #log: Logger | undefined
  /** By hourly bucket and key id. */
  readonly #keys = new ByWindow<KeyCounts>()
  /** By hourly bucket and rejection reason. */
  readonly #reasons = new ByWindow<number>()
  /** What the flush in flight took (until it is written, or put back). */
  #writing: { keys: ReadonlyMap<number, ReadonlyMap<string, KeyCounts>>; reasons: ReadonlyMap<number, ReadonlyMap<string, number>> } | undefined
  #timer: NodeJS.Timeout | undefined

  constructor(options: { db: Db; log?: Logger; flushIntervalS?: number }) {
    this.#db = options.db
    this.#log = options.log
    if (options.flushIntervalS && options.flushIntervalS > 0) {
      this.#timer = setInterval(() => void this.flush(), options.flushIntervalS * 1000)
      this.#timer.unref()
    }
  }

  count(keyId: string | undefined, outcome: string, nowMs: number): void {
    const bucket = bucketOf(nowMs)
    const rejected = outcome !== 'forwarded'
    if (keyId !== undefined) {
      const keys = this.#keys.of(bucket)
      let c = keys.get(keyId)
      if (c === undefined) {
        c = { requests: 0, rejected: 0, lastMs: nowMs }
        keys.set(keyId, c)
      }
      c.requests++
      if (rejected) c.rejected++
      if (nowMs > c.lastMs) c.lastMs = nowMs
    }
    if (rejected) {
      const reasons = this.#reasons.of(bucket)
      reasons.set(outcome, (reasons.get(outcome) ?? 0) + 1)
    }
  }

  /** Adds what was counted before this call to the store (one flush at a time; see coalesced). */
  flush(): Promise<void> {
    return this.#flush()
  }

  readonly #flush = coalesced(() => this.#write())

  async #write(): Promise<void> {
    if (this.#keys.empty && this.#reasons.empty) return
    const keys = this.#keys.take()
    const reasons = this.#reasons.take()
    this.#writing = { keys, reasons }
    // Rows in one order on every instance (key, then hour), and key rows locked in id order as the
    // scheduler locks them: in the order of first use, which differs per instance, two flushes
    // at once deadlocked on each other's rows (and held the keys' rows a second, until PostgreSQL
    // broke the deadlock).
    const rows: Array<{ keyId: string; bucket: string; requests: number; rejected: number }> = []
    const last = new Map<string, number>()
    for (const [bucket, counts] of keys) {
      for (const [keyId, c] of counts) {
        rows.push({ keyId, bucket: new Date(bucket).toISOString(), requests: c.requests, rejected: c.rejected })
        if ((last.get(keyId) ?? 0) < c.lastMs) last.set(keyId, c.lastMs)
      }
    }
    rows.sort((x, y) => byText(x.keyId, y.keyId) || byText(x.bucket, y.bucket))
    const k = { ids: rows.map((x) => x.keyId), buckets: rows.map((x) => x.bucket), requests: rows.map((x) => x.requests), rejected: rows.map((x) => x.rejected) }
    const lastIds = [...last.keys()].sort(byText)
    const rejections: Array<{ bucket: string; reason: string; count: number }> = []
    for (const [bucket, counts] of reasons) {
      for (const [reason, count] of counts) rejections.push({ bucket: new Date(bucket).toISOString(), reason, count })
    }
    rejections.sort((x, y) => byText(x.bucket, y.bucket) || byText(x.reason, y.reason))
    const r = { buckets: rejections.map((x) => x.bucket), reasons: rejections.map((x) => x.reason), counts: rejections.map((x) => x.count) }
    try {
      // One transaction (all or nothing: a failed flush keeps every count), in statements of at
      // most FLUSH_BATCH rows: one statement for everything pending after a long store outage
      // outgrew store.query_timeout_ms, failed, and grew again at every retry.
      await this.#db.transaction(async (tx) => {
        for (const params of batches([k.ids, k.buckets, k.requests, k.rejected])) {
          await tx.query(
            `INSERT INTO api_key_usage (key_id, bucket, requests, rejected)
             SELECT u.key_id, u.bucket::timestamptz, u.requests, u.rejected FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS u(key_id, bucket, requests, rejected)
             ON CONFLICT (key_id, bucket) DO UPDATE SET requests = api_key_usage.requests + EXCLUDED.requests, rejected = api_key_usage.rejected + EXCLUDED.rejected`,
            params,
          )
        }
        for (const params of batches([lastIds, lastIds.map((id) => new Date(last.get(id) as number).toISOString())])) {
          // An UPDATE ... FROM locks in the order of its join, which is the planner's choice. The
          // lock is the one the UPDATE takes (FOR NO KEY UPDATE): FOR UPDATE would also wait for,
          // and hold up, the key-share locks of rows referring to the key (a notice, a rotation).
          await tx.query('SELECT 1 FROM api_keys WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE', [params[0]])
          await tx.query(
            `UPDATE api_keys SET last_used_at = GREATEST(coalesce(api_keys.last_used_at, u.at::timestamptz), u.at::timestamptz)
             FROM unnest($1::text[], $2::text[]) AS u(id, at) WHERE api_keys.id = u.id`,
            params,
          )
        }
        for (const params of batches([r.buckets, r.reasons, r.counts])) {
          await tx.query(
            `INSERT INTO api_key_rejections (bucket, reason, count)
             SELECT u.bucket::timestamptz, u.reason, u.count FROM unnest($1::text[], $2::text[], $3::int8[]) AS u(bucket, reason, count)
             ON CONFLICT (bucket, reason) DO UPDATE SET count = api_key_rejections.count + EXCLUDED.count`,
            params,
          )
        }
      })
    } catch (err) {
      // Keep the counts for the next flush.
      for (const [bucket, counts] of keys) {
        const into = this.#keys.of(bucket)
        for (const [keyId, c] of counts) {
          const now = into.get(keyId)
          if (now) {
            now.requests += c.requests
            now.rejected += c.rejected
            now.lastMs = Math.max(now.lastMs, c.lastMs)
          } else into.set(keyId, c)
        }
      }
      for (const [bucket, counts] of reasons) {
        const into = this.#reasons.of(bucket)
        for (const [reason, n] of counts) into.set(reason, (into.get(reason) ?? 0) + n)
      }
      this.#log?.warn('could not write usage counts; keeping them for the next flush', { err: err as Error })
    } finally {
      this.#writing = undefined
    }
  }

  /**
   * Stops the timer and writes what is pending. What cannot be written then (the store down at
   * shutdown) is lost, and said so with how much: before, the last word was "keeping them for
   * the next flush", and no flush came (found by a review).
   */
  async close(): Promise<void> {
    clearInterval(this.#timer)
    await this.flush()
    const lost = this.unwritten()
    if (lost === undefined) return
    this.#keys.take()
    this.#reasons.take()
    this.#log?.error('could not write the last usage counts at shutdown: they are lost', lost)
  }

  /** How much is counted and not yet written (undefined when nothing is): what a stop cut short loses. */
  unwritten(): { keys: number; requests: number; rejected: number; refusals_without_key: number } | undefined {
    if (this.#keys.empty && this.#reasons.empty && this.#writing === undefined) return undefined
    let requests = 0
    let rejected = 0
    const keyIds = new Set<string>()
    let refusals = 0
    // Also what a flush in flight took, which it puts back if it fails.
    for (const { keys, reasons } of [{ keys: this.#keys.all, reasons: this.#reasons.all }, ...(this.#writing ? [this.#writing] : [])]) {
      for (const counts of keys.values()) {
        for (const [keyId, c] of counts) {
          keyIds.add(keyId)
          requests += c.requests
          rejected += c.rejected
        }
      }
      for (const counts of reasons.values()) for (const n of counts.values()) refusals += n
    }
    return { keys: keyIds.size, requests, rejected, refusals_without_key: refusals }
  }
}

export interface Range {
  from: Date
  to: Date
}

export interface KeyUsage {
  keyId: string
  name: string | null
  type: string | null
  requests: number
  rejected: number
}

/** The hourly buckets a range touches: from the hour holding `from` to before `to`. */
function bounds(range: Range): [Date, Date] {
  return [new Date(bucketOf(range.from.getTime())), range.to]
}

/** The reports read what the recorders wrote, by the hourly buckets a range touches. */
export class UsageReports {
  readonly #db: Db

  constructor(db: Db) {
    this.#db = db
  }

  /**
   * Requests per key in the range (`keyId`: that key only): most used first, or by key id
   * (`order: 'key_id'`, from after the key id `after`), the order the usage report walks every
   * key in: counts that grow meanwhile cannot move a key across a page's end.
   */
  async byKey(range: Range, options: { keyId?: string; limit?: number; order?: 'requests' | 'key_id'; after?: string } = {}): Promise<KeyUsage[]> {
    const params: unknown[] = [...bounds(range), options.limit ?? 100]
    const where = ['u.bucket >= $1 AND u.bucket < $2']
    if (options.keyId !== undefined) {
      params.push(options.keyId)
      where.push(`u.key_id = $${params.length}`)
    }
    if (options.after !== undefined) {
      params.push(options.after)
      where.push(`u.key_id > $${params.length}`)
    }
    const rows = await this.#db.query<{ key_id: string; name: string | null; type: string | null; requests: number; rejected: number }>(
      `SELECT u.key_id, k.name, k.type, sum(u.requests)::float8 AS requests, sum(u.rejected)::float8 AS rejected
       FROM api_key_usage u LEFT JOIN api_keys k ON k.id = u.key_id
       WHERE ${where.join(' AND ')}
       GROUP BY u.key_id, k.name, k.type ORDER BY ${options.order === 'key_id' ? 'u.key_id' : 'requests DESC, u.key_id'} LIMIT $3`,
      params,
    )
    return rows.map((r) => ({ keyId: r.key_id, name: r.name, type: r.type, requests: r.requests, rejected: r.rejected }))
  }

  /** One key's hourly counts in the range, oldest first. */
  async buckets(keyId: string, range: Range): Promise<Array<{ start: Date; requests: number; rejected: number }>> {
    const rows = await this.#db.query<{ bucket: Date; requests: number; rejected: number }>(
      `SELECT bucket, requests::float8 AS requests, rejected::float8 AS rejected FROM api_key_usage
       WHERE key_id = $1 AND bucket >= $2 AND bucket < $3 ORDER BY bucket`,
      [keyId, ...bounds(range)],
    )
    return rows.map((r) => ({ start: new Date(r.bucket), requests: r.requests, rejected: r.rejected }))
  }

  /** Rejected gateway requests by the error code answered, most frequent first. */
  async rejections(range: Range): Promise<Array<{ reason: string; count: number }>> {
    return this.#db.query<{ reason: string; count: number }>(
      `SELECT reason, sum(count)::float8 AS count FROM api_key_rejections WHERE bucket >= $1 AND bucket < $2
       GROUP BY reason ORDER BY count DESC, reason`,
      bounds(range),
    )
  }
}

/** Code-point order: the same on every instance, whatever the locale. */
function byText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0
}
