// Rate limiters from rate-limiter-flexible. Where the counts live:
// - Redis when configured (shared by every instance), with an insurance limiter that answers
//   whenever Redis is down or slower than its command timeout (RedisHealth in redis.ts decides,
//   and counts and logs the switches), so a Redis failure never means no limit;
// - the insurance, and the only store without Redis: this process's memory, or in a
//   `serve --workers N` gateway worker the cluster primary's memory over IPC
//   (RateLimiterCluster), so the workers of one machine share one limit. A primary that does not
//   answer in time leaves the worker with its own memory for that call.
import { RateLimiterCluster, RateLimiterClusterMaster, RateLimiterMemory, RateLimiterRedis, RateLimiterRes } from 'rate-limiter-flexible'
import type { Redis } from 'ioredis'
import { redisHealth, type DownReason } from './redis.ts'

export { RateLimiterRes }

export interface Limiter {
  consume(key: string, points?: number): Promise<RateLimiterRes>
  penalty(key: string, points?: number): Promise<RateLimiterRes>
  reward(key: string, points?: number): Promise<RateLimiterRes>
  get(key: string): Promise<RateLimiterRes | null>
  block(key: string, secDuration: number): Promise<RateLimiterRes>
  delete(key: string): Promise<boolean>
  /** Which store answers now, where that can change (Redis and its insurance); answers from another source are not kept. */
  readonly source?: number
  /**
   * The source that gave `res` (a `consume` answer or refusal): the gate may switch while a call
   * is out, so `source` read after the answer can name the other store.
   */
  answeredBy?(res: RateLimiterRes): number | undefined
  /** Gives `points` back to the limiter that gave `res` (which counted them), whichever answers now. */
  giveBack?(res: RateLimiterRes, key: string, points: number): Promise<unknown>
  /** Deletes `key`'s count from this process's memory (see forgetKey). */
  forget?(key: string): Promise<void>
}

/**
 * Deletes `key`'s count from this process's memory, where `l` keeps one: the memory limiter's, or
 * the insurance's beside a shared store (whose own count the caller deletes: a lift in Redis, the
 * cluster primary's by clusterLimitsPrimary's delete).
 */
export function forgetKey(l: Limiter, key: string): Promise<void> {
  return l.forget ? l.forget(key) : l.delete(key).then(() => undefined)
}

export interface LimiterOptions {
  points: number
  durationS: number
  keyPrefix: string
  redis?: Redis | undefined
  /** In a cluster worker: count in the primary's memory (needs `clusterLimitsPrimary()` there). */
  cluster?: boolean
}

/** How long a worker waits for the primary's answer before counting in its own memory. */
const CLUSTER_TIMEOUT_MS = 500

/** Whether the first limiter is used, and what to do when it fails. */
interface Gate {
  readonly up: boolean
  readonly timeoutMs: number
  down(reason: DownReason, err?: Error): void
}

const TIMED_OUT = new Error('limiter call timed out')

/** The source (see `Limiter.source`) of answers given by Redis's insurance. */
export const INSURANCE = 0

/** A call to the first limiter that has not answered yet. */
interface Pending {
  readonly deadline: number
  /** Cleared when the call settles; the watch then skips it. */
  late: (() => void) | undefined
}

/**
 * Deadlines of the calls in flight, checked by one timer for all of them instead of a
 * setTimeout and a Promise.race per call (two per request with Redis). Calls are queued in the
 * order they start and share one timeout, so the deadlines are in order too: the check stops at
 * the first that is not due. A call is found late within a quarter of the timeout of its
 * deadline; the timer runs only while calls are in flight.
 */
class DeadlineWatch {
  readonly #timeoutMs: number
  #queue: Pending[] = []
  #head = 0
  #timer: NodeJS.Timeout | undefined

  constructor(timeoutMs: number) {
    this.#timeoutMs = timeoutMs
  }

  watch(late: () => void): Pending {
    const p: Pending = { deadline: performance.now() + this.#timeoutMs, late }
    this.#queue.push(p)
    if (this.#timer === undefined) {
      this.#timer = setInterval(() => this.#check(), Math.max(1, Math.floor(this.#timeoutMs / 4)))
      this.#timer.unref()
    }
    return p
  }

  #check(): void {
    const now = performance.now()
    const q = this.#queue
    let i = this.#head
    for (; i < q.length; i++) {
      const p = q[i] as Pending
      if (p.late === undefined) continue
      if (p.deadline > now) break
      const late = p.late
      p.late = undefined
      late()
    }
    if (i >= q.length) {
      this.#queue = []
      this.#head = 0
      clearInterval(this.#timer)
      this.#timer = undefined
    } else if (i > 1024 && i * 2 > q.length) {
      this.#queue = q.slice(i)
      this.#head = 0
    } else this.#head = i
  }
}

/** `points` back to `l`, to the limiter within it that gave `res` where it tells (Insured), else as a reward. */
function giveBackTo(l: Limiter, res: RateLimiterRes, key: string, points: number): Promise<unknown> {
  return l.giveBack ? l.giveBack(res, key, points) : l.reward(key, points)
}

/** `first`, unless its gate is down or it fails or is late; then `second`. A refusal (RateLimiterRes) is an answer, not a failure. */
class Insured implements Limiter {
  readonly #first: Limiter
  readonly #second: Limiter
  readonly #gate: Gate
  readonly #watch: DeadlineWatch

  constructor(first: Limiter, second: Limiter, gate: Gate) {
    this.#first = first
    this.#second = second
    this.#gate = gate
    this.#watch = new DeadlineWatch(gate.timeoutMs)
  }

  /** Which source gave each answer or refusal (see `answeredBy`), and which limiter (see `giveBack`). */
  readonly #answers = new WeakMap<RateLimiterRes, number>()
  readonly #givers = new WeakMap<RateLimiterRes, Limiter>()

  #tag(res: RateLimiterRes, by: Limiter, source: number): void {
    this.#answers.set(res, source)
    this.#givers.set(res, by)
  }

  /**
   * `op` on the first limiter while the gate is up, else on the second; with `fallBack` a failure
   * or a late answer of the first is answered by the second (a give-back must not be: the second
   * never counted what the first did).
   */
  #run<T>(op: (l: Limiter) => Promise<T>, fallBack = true): Promise<T> {
    if (!this.#gate.up) return this.#from(op(this.#second), this.source)
    return new Promise<T>((resolve, reject) => {
      const failed = (err: unknown) => {
        this.#gate.down(err === TIMED_OUT ? 'timeout' : 'error', err as Error)
        if (fallBack) this.#from(op(this.#second), this.source).then(resolve, reject)
        else reject(err as Error)
      }
      const pending = this.#watch.watch(() => failed(TIMED_OUT))
      let call: Promise<T>
      try {
        call = op(this.#first)
      } catch (err) {
        pending.late = undefined
        failed(err)
        return
      }
      call.then(
        (value) => {
          if (pending.late === undefined) return
          pending.late = undefined
          if (value instanceof RateLimiterRes) this.#tag(value, this.#first, 1)
          resolve(value)
        },
        (err: unknown) => {
          if (pending.late === undefined) return
          pending.late = undefined
          if (err instanceof RateLimiterRes) {
            this.#tag(err, this.#first, 1)
            reject(err)
          } else failed(err)
        },
      )
    })
  }

  /** `call` answered by the second limiter, known as `source` (1 still, behind a gate that never goes down). */
  #from<T>(call: Promise<T>, source: number): Promise<T> {
    return call.then(
      (value) => {
        if (value instanceof RateLimiterRes) this.#tag(value, this.#second, source)
        return value
      },
      (err: unknown) => {
        if (err instanceof RateLimiterRes) this.#tag(err, this.#second, source)
        throw err
      },
    )
  }

  /** Which limiter answers: changes when the gate switches, so answers kept from the other one can be dropped. */
  get source(): number {
    return this.#gate.up ? 1 : INSURANCE
  }

  answeredBy(res: RateLimiterRes): number | undefined {
    return this.#answers.get(res)
  }

  giveBack(res: RateLimiterRes, key: string, points: number): Promise<unknown> {
    const by = this.#givers.get(res)
    return by === undefined ? this.reward(key, points) : giveBackTo(by, res, key, points)
  }

  consume(key: string, points?: number) {
    return this.#run((l) => l.consume(key, points))
  }
  penalty(key: string, points?: number) {
    return this.#run((l) => l.penalty(key, points))
  }
  reward(key: string, points?: number) {
    return this.#run((l) => l.reward(key, points), false)
  }
  get(key: string) {
    return this.#run((l) => l.get(key))
  }
  block(key: string, secDuration: number) {
    return this.#run((l) => l.block(key, secDuration))
  }
  delete(key: string) {
    return this.#run((l) => l.delete(key))
  }
  // The insurance's, whichever answers now: what it counted would come back with a switch.
  forget(key: string): Promise<void> {
    return forgetKey(this.#second, key)
  }
}

const CLUSTER_GATE: Gate = { up: true, timeoutMs: CLUSTER_TIMEOUT_MS, down: () => {} }

/**
 * Counts one memory limiter keeps at most: past it the count that began first is forgotten (its
 * key's window starts afresh). About 200 bytes each, so a memory limiter holds at most about
 * 20 MB, and far less where its counts end sooner than that many others begin.
 */
export const MEMORY_MAX_KEYS = 100_000

/** Ended entries a write drops, at most: more than it adds, so they never pile up, and never a long pause. */
const SWEEP = 8

/**
 * A Map of entries that end, in the order they began, holding `max` at most: each `begin` drops
 * up to SWEEP ended entries from the front, and past `max` the first. Where entries last alike
 * (one limiter's windows, one lockout window) the first to begin is the first to end, so ended
 * entries go within a few writes of their end, and what is held is what has not ended, or the
 * `max` that began last. Before, quick-lru held ended entries until `max` others had come after
 * them, and up to twice `max` (its two generations): a flood of bad keys from distinct addresses
 * kept 200,000 counts of the per-address limit, each of which had ended 2 s after it began
 * (found by a review of memory under such a flood: a part of 1.3 GB RSS).
 *
 * The front is read through one iterator kept from call to call. A Map keeps a deleted entry's
 * place until its table is rebuilt, and a new iterator steps over each of those places: before,
 * each `begin` started one at the front, and at the cap (every `begin` deleting the first entry)
 * it stepped over up to some 160,000 deleted places, 70 µs a begin against about 1 µs below the
 * cap, which a flood of more distinct addresses than the cap within the lockout's window reaches
 * (bench/ending-map.ts, bench/bad-key-flood.ts --malformed). The kept iterator steps over each
 * place once. It sees entries as the language defines a Map's iterator to (in the order they were
 * put, one deleted before it reaches it skipped, one put after it started seen), so the front is
 * the entry it gave last, until that entry is deleted (every deletion here comes through
 * `delete`). lru-cache's list would also do, but it allocates its arrays for `max` entries up
 * front: 3.8 MiB for each empty map of 100,000.
 */
export class EndingMap<V> extends Map<string, V> {
  #max: number
  readonly #endOf: (value: V) => number | null
  readonly #onDrop: ((key: string, value: V) => void) | undefined
  /** The iterator that reads the front, and the entry it gave last while that entry is held. */
  #cursor: MapIterator<[string, V]> | undefined
  #first: [string, V] | undefined

  /** `endOf`: when an entry ends (epoch ms), null for never. `onDrop`: told of each entry dropped past `max`. */
  constructor(max: number, endOf: (value: V) => number | null, onDrop?: (key: string, value: V) => void) {
    super()
    this.#max = max
    this.#endOf = endOf
    this.#onDrop = onDrop
  }

  override delete(key: string): boolean {
    if (this.#first !== undefined && this.#first[0] === key) this.#first = undefined
    return super.delete(key)
  }

  override clear(): void {
    this.#first = undefined
    this.#cursor = undefined
    super.clear()
  }

  /** The entry that began first. */
  #front(): [string, V] | undefined {
    if (this.#first !== undefined) return this.#first
    this.#cursor ??= super.entries()
    const step = this.#cursor.next()
    if (step.done === true) {
      // Every entry it gave has been deleted: none is held. One put later starts a new iterator.
      this.#cursor = undefined
      return undefined
    }
    return (this.#first = step.value)
  }

  /**
   * An iterator holds the tables the Map has outgrown since it last moved (it needs them to find
   * its place): one that stays at the front while the Map grows and nothing ends held them all,
   * 7 MiB more for the lockout's two maps of 100,000 (bench/lockout-heap.ts). A new one, made as
   * the Map grows, gives the same front entry, and holds none of them.
   */
  #anchor(): void {
    this.#cursor = super.entries()
    this.#first = this.#cursor.next().value
  }

  /** The entry of `key`, unless it has ended (it is then dropped). */
  live(key: string, now = Date.now()): V | undefined {
    const value = this.get(key)
    if (value === undefined) return undefined
    const end = this.#endOf(value)
    if (end === null || end > now) return value
    this.delete(key)
    return undefined
  }

  /** Puts `value` for `key` as an entry that begins now, behind every other. */
  begin(key: string, value: V, now = Date.now()): void {
    this.delete(key)
    for (let swept = 0; swept < SWEEP; swept++) {
      const first = this.#front()
      if (first === undefined) break
      const [firstKey, held] = first
      const end = this.#endOf(held)
      if (end !== null && end > now) break
      this.delete(firstKey)
      // One that never ends goes behind the others, so those that do are still reached.
      if (end === null) super.set(firstKey, held)
    }
    super.set(key, value)
    const size = this.size
    if (size <= this.#max) {
      // Growing: one past each power of two, where V8 has just moved the Map to a table twice as
      // large, the front is read again through a new iterator (see #anchor).
      if (size > 1024 && ((size - 1) & (size - 2)) === 0 && this.#first !== undefined) this.#anchor()
      return
    }
    const first = this.#front()
    if (first === undefined) return
    this.delete(first[0])
    this.#onDrop?.(first[0], first[1])
  }

  override set(key: string, value: V): this {
    this.begin(key, value)
    return this
  }

  /** Holds up to `max` from now on (only ever raised: what is held past it stays until it ends). */
  raise(max: number): void {
    this.#max = Math.max(this.#max, max)
  }

  get max(): number {
    return this.#max
  }
}

/** A count as rate-limiter-flexible's MemoryStorage keeps it (its `dump()` reads `value` and `expiresAt`). */
interface Count {
  value: number
  /** Epoch ms; null for a count that never ends (a block of 0 s). */
  expiresAt: number | null
}

/**
 * RateLimiterMemory's store (incrby, set, get, delete: the fixed window that starts with a
 * key's first point) in an EndingMap of MEMORY_MAX_KEYS counts. rate-limiter-flexible's own
 * keeps every key, with a timer each, for its whole window and has no bound: a flood of bad keys
 * from distinct addresses held about 650 bytes an address for the lockout's 15 minutes (378 MB
 * after 220,000 requests). Here an ended count is dropped when it is next looked at, or within a
 * few counts begun after its end, without a timer.
 */
class BoundedStorage {
  readonly _storage = new EndingMap<Count>(MEMORY_MAX_KEYS, (c) => c.expiresAt)

  incrby(key: string, value: number, durationS: number): RateLimiterRes {
    const count = this._storage.live(key)
    if (count === undefined) return this.set(key, value, durationS)
    count.value += value
    return new RateLimiterRes(0, count.expiresAt === null ? -1 : count.expiresAt - Date.now(), count.value, false)
  }

  set(key: string, value: number, durationS: number): RateLimiterRes {
    const ms = durationS * 1000
    const now = Date.now()
    this._storage.begin(key, { value, expiresAt: ms > 0 ? now + ms : null }, now)
    return new RateLimiterRes(0, ms === 0 ? -1 : ms, value, true)
  }

  get(key: string): RateLimiterRes | null {
    const count = this._storage.live(key)
    return count === undefined ? null : new RateLimiterRes(0, count.expiresAt === null ? -1 : count.expiresAt - Date.now(), count.value, false)
  }

  delete(key: string): boolean {
    return this._storage.delete(key)
  }
}

/**
 * Gives `limiter` a BoundedStorage in place of its own (once). RateLimiterMemory keeps the
 * fixed-window logic (consume, penalty, reward, block, get, delete); only where the counts live
 * changes. Its store is a private field of rate-limiter-flexible, so a version that renames it
 * fails here rather than leaving the counts unbounded.
 */
function bound(limiter: RateLimiterMemory): RateLimiterMemory {
  const held = limiter as unknown as { _memoryStorage?: unknown }
  if (!(held._memoryStorage instanceof Object)) throw new Error("rate-limiter-flexible's RateLimiterMemory no longer keeps its counts in _memoryStorage: the memory limiters cannot be bounded")
  if (!(held._memoryStorage instanceof BoundedStorage)) held._memoryStorage = new BoundedStorage()
  return limiter
}

export function createLimiter(options: LimiterOptions): Limiter {
  const base = { points: options.points, duration: options.durationS, keyPrefix: options.keyPrefix }
  const memory = bound(new RateLimiterMemory(base)) as unknown as Limiter
  const local = options.cluster ? new Insured(new RateLimiterCluster({ ...base, timeoutMs: 1000 }) as unknown as Limiter, memory, CLUSTER_GATE) : memory
  if (!options.redis) return local
  const shared = new RateLimiterRedis({ ...base, storeClient: options.redis, rejectIfRedisNotReady: true }) as unknown as Limiter
  return new Insured(shared, local, redisHealth(options.redis))
}

/** A rate limit as the request path uses it (see LeasedLimit). */
export interface RateLimit {
  readonly points: number
  /**
   * Takes a point from this process's lease of the key's points, without a promise or an
   * allocation: true, with `remaining` and `msBeforeNext` set for this answer (read them before
   * the next call); false when the store must be asked (`consume`).
   */
  take(key: string): boolean
  readonly remaining: number
  readonly msBeforeNext: number
  /** Takes one point, asking the store when the lease is used up; rejects with a RateLimiterRes when the limit is reached. */
  consume(key: string): Promise<RateLimiterRes>
}

interface Lease {
  /** The limit the lease was reserved for: only a LeasedLimit of that limit uses it (see `#handOver`). */
  readonly points: number
  /** The store's answer that granted it, to give its points back to the limiter that counted them. */
  readonly res: RateLimiterRes
  /** Points reserved in the store and not yet used by this process. */
  left: number
  /** Points the reservation took (with what the lease it renewed still held), and when they began to be used (on the ticks clock, performance.now() outside tests): the next one is sized to the rate they were used at. */
  size: number
  /**
   * When the store's answer came back, or for a lease reserved ahead, when its window began and it
   * took over. Before (found by the suite failing under load), when it was asked for: a renewal
   * the store took 30 ms to answer, asked about on the next window a request later, measured the
   * key's rate as one point over 30 ms, and the busy key's next window began with a lease of 3
   * points, too small to be renewed ahead, so its requests waited for the store.
   */
  at: number
  /** The key's rate (points per ms) this lease was sized by. */
  rate: number
  /** The limiter's source when reserved. */
  source: number | undefined
  /** Points of the store's count that this process carried into it from the other store at a switch within the window (see `#carry`). */
  carried: number
  /**
   * Points this process itself counted in the lease's store in its window, this lease's and those
   * before it (asks, less what was given back; not carries): what it used there is `own - left`.
   * Carried back into Redis from the insurance, which a `--workers` machine's workers share, this
   * counts each worker's own points once (the insurance's count holds the others' too).
   */
  own: number
  /** What the store had left for others after the reservation. */
  remaining: number
  /** The window the points were reserved in (see LeasedLimit), and when it ends (epoch ms). */
  window: number
  until: number
  /** The store refused even one point: refuse until `until`. */
  refused: boolean
  /** The next window's lease, reserved during this window's last LEASE_TARGET_MS. */
  next: Lease | undefined
}

/**
 * Most points one reservation takes. Leases are sized by time (LEASE_TARGET_MS) and by what the
 * store has left (LEASE_SHARE); this only bounds a very busy key's: at 10,000 requests a second
 * a lease of 1000 points lasts 100 ms, and the renewal asked at its last quarter has 25 ms to come
 * back, time enough for a Redis round trip on a loaded machine (at 64 points it had 1.6 ms, and
 * at full load the requests queued behind it).
 */
export const MAX_LEASE = 1024
/** A reservation is sized to last about this long at the rate the last one was used. */
const LEASE_TARGET_MS = 100
/** A reservation takes at most this share of what the store has left, so a lease never holds much of a limit that is nearly used up. */
const LEASE_SHARE = 8
/** Leases of at least this many points are renewed ahead, when a quarter is left. */
const AHEAD_FROM = 8
/**
 * Keys with a lease held at once, for one limit; past it the lease reserved first is dropped (its
 * points are lost for the window: counted, never given twice).
 */
const MAX_LEASES = 10_000
/** The most a limiter's shared lease map is grown to, with one limit after another over it (see LeasedLimit). */
const MAX_SHARED_LEASES = 4 * MAX_LEASES

/** The leases of one limiter's counts and the reservations in flight, shared by every LeasedLimit over that limiter (see LeasedLimit). */
interface Leases {
  readonly windowMs: number
  readonly byKey: EndingMap<Lease>
  readonly reserving: Map<string, Promise<void>>
}

const leasesOf = new WeakMap<Limiter, Leases>()

/**
 * Where a key's windows start: an offset from the epoch, under `windowMs`, that depends on the key
 * alone (FNV-1a), so every process agrees on a key's windows without asking the store, and keys
 * do not all start new windows at the same moment.
 */
export function windowPhase(key: string, windowMs: number): number {
  let h = 0x811c9dc5
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193)
  return (h >>> 0) % windowMs
}

/**
 * Rate limits on the request path, without a store round trip per request: points are reserved
 * from the limiter (memory, the cluster primary or Redis) a few at a time and used from memory.
 * A reservation is an ordinary atomic consume of several points, so the store never allows more
 * than the limit across every process sharing it; what a lease has not used when its window
 * ends is counted but unused (a process can refuse slightly early, never admit more).
 * - Windows: a key's windows follow one another back to back, at an offset from the epoch that
 *   depends on the key (`windowPhase`), and each window is its own counter in the store (the key
 *   with the window's number). Every process therefore knows when a key's next window starts, and
 *   a busy key's first lease of it is reserved during the last LEASE_TARGET_MS of the window
 *   before: its requests do not wait for the store when a window ends. (The store's own windows,
 *   which start at a key's first consume, could not be reserved before they exist.)
 * - Size: what the key's last lease was used at, over about 100 ms, at most MAX_LEASE and 1/8
 *   of what the store has left (one point for a key not seen by this process), so a slow key is
 *   counted one point at a time, and near its limit every key is. The first lease of a new
 *   window is sized by the last window's rate too. Near a window's end a lease takes no more than
 *   the rest of the window needs (what a lease holds when its window ends is lost).
 * - A refusal is kept until the window ends (a client past its limit costs no store round trips).
 * - A reservation the store refuses keeps what the store had left before it (known from the
 *   count, which includes the ask) and gives back only the rest, so the count is at the limit
 *   once it is given back: a refusal another process met in between was right, and near the limit
 *   no second ask is needed.
 * - When the answering store changes (Redis down or back) a lease of the other store is no longer
 *   used, but a refusal stays in force until its window ends, and the first reservation from the
 *   store now answering carries into it what this process knew the other had counted in the
 *   window and it has not (`#carry`): a switch does not start the key's count afresh, so one
 *   process never admits more than the limit in a window because of a switch.
 * - A lease of AHEAD_FROM points or more is renewed when a quarter is left, in the background;
 *   what it still holds is carried into the next if both are of the same window (so a process
 *   holds at most a lease and a quarter unused).
 * - Concurrent requests for a key wait for one reservation.
 * - RateLimit-Remaining is what the store had left at the last reservation plus this process's
 *   unused lease: exact with one process.
 * - LeasedLimits over one limiter (createRateLimits: one per limit, for the keys with that limit)
 *   share one map of leases, so a key whose limit changes within a window finds the lease its
 *   old limit reserved, and hands it back to the store (`#handOver`) before reserving for the
 *   new one: the store's count is again what the key used. Before, each limit had its own map,
 *   and what the old one had reserved and not used stayed counted for the rest of the window:
 *   raised from 200 to 250 after 61 requests over three gateways, a key was admitted 132 more
 *   instead of 189 (found by a review).
 */
export class LeasedLimit implements RateLimit {
  readonly points: number
  readonly #limiter: Limiter
  readonly #windowMs: number
  readonly #now: () => number
  readonly #ticks: () => number
  readonly #leases: EndingMap<Lease>
  readonly #reserving: Map<string, Promise<void>>

  /**
   * `limiter` counts each window under its own store key, so its own duration only bounds how
   * long the store keeps a count: at least two windows (createRateLimit), since a window's first
   * lease may be reserved before the window starts. `now` is the clock of the windows, and
   * `ticks` the monotonic clock a key's rate is measured on (tests set both). LeasedLimits over
   * one limiter share its leases, and must have one window length.
   */
  constructor(limiter: Limiter, points: number, windowMs: number, now: () => number = Date.now, ticks: () => number = () => performance.now()) {
    let leases = leasesOf.get(limiter)
    if (leases === undefined) {
      // A lease is kept a window past its own end (and its next window's, reserved ahead), for the
      // rate its key was used at (see #reserve); then it is dropped as others are reserved. Before
      // (found by a review of the lease bounds), a quick-lru of MAX_LEASES / 2, which held up to
      // twice its size and every ended lease until others pushed it out.
      leases = { windowMs, byKey: new EndingMap<Lease>(MAX_LEASES, (l) => (l.next ?? l).until + windowMs), reserving: new Map<string, Promise<void>>() }
      leasesOf.set(limiter, leases)
    } else if (leases.windowMs !== windowMs) throw new Error(`LeasedLimits over one limiter must have one window length (${leases.windowMs} ms, not ${windowMs} ms)`)
    // Room for as many leases as each limit had in a map of its own before they were shared (found
    // by a review: 3,000 keys on each of two limits of one window evicted each other's leases, whose
    // points are then lost for the window, and 2.4% of requests under the limit were refused), up
    // to MAX_SHARED_LEASES for however many limits there are.
    else leases.byKey.raise(Math.min(leases.byKey.max + MAX_LEASES / 2, MAX_SHARED_LEASES))
    this.#leases = leases.byKey
    this.#reserving = leases.reserving
    this.#limiter = limiter
    this.points = points
    this.#windowMs = windowMs
    this.#now = now
    this.#ticks = ticks
  }

  remaining = 0
  msBeforeNext = 0

  /**
   * Whether a reservation for `key` is on its way (a request that finds the lease used up waits
   * for it rather than asking for one of its own): with a renewal asked ahead, such a wait is the
   * store answering late, not a renewal that was never asked.
   */
  reserving(key: string): boolean {
    return this.#reserving.has(key)
  }

  /** The leases this process holds for every limit over this one's limiter (they share them). */
  get leasesHeld(): number {
    return this.#leases.size
  }

  /** Resolves once the leases being reserved now are in place (or failed). */
  async reserved(): Promise<void> {
    await Promise.allSettled(this.#reserving.values())
  }

  take(key: string): boolean {
    let lease = this.#leases.get(key)
    if (lease === undefined) return false
    const now = this.#now()
    if (now >= lease.until) {
      // The window has ended: the next window's lease, if it was reserved ahead, takes over.
      const next = lease.next
      if (next === undefined || now >= next.until) return false
      this.#leases.begin(key, next, now)
      next.at = this.#ticks()
      lease = next
    }
    if (lease.left === 0 || lease.source !== this.#limiter.source || lease.points !== this.points) return false
    const ms = lease.until - now
    lease.left--
    this.remaining = lease.remaining + lease.left
    this.msBeforeNext = ms
    // A busy key's next reservation is asked for while a quarter of this lease is left, and its
    // next window's first one during this window's last LEASE_TARGET_MS, so its requests do not
    // wait for the store's answer when the lease runs out or the window ends.
    // A failure here is left for the request that finds the lease used up: it asks again, and sees it.
    // Near the window's end a lease that holds what the rest of the window needs at its rate is not renewed.
    if (lease.size >= AHEAD_FROM && !this.#reserving.has(key)) {
      if (lease.left <= lease.size >> 2 && lease.left < lease.rate * ms) this.#track(key, this.#reserve(key, lease, false, now).catch(() => {}))
      else if (ms <= LEASE_TARGET_MS && lease.next === undefined) this.#track(key, this.#reserve(key, lease, true, now).catch(() => {}))
    }
    return true
  }

  /** The key's reservation in flight: concurrent requests wait for it instead of starting their own. */
  #track(key: string, reservation: Promise<void>): Promise<void> {
    const reserving = reservation.finally(() => this.#reserving.delete(key))
    this.#reserving.set(key, reserving)
    return reserving
  }

  /** `take`'s answer as a RateLimiterRes (the promise path). */
  #taken(key: string): RateLimiterRes | undefined {
    return this.take(key) ? new RateLimiterRes(this.remaining, this.msBeforeNext, this.points - this.remaining, false) : undefined
  }

  async consume(key: string): Promise<RateLimiterRes> {
    for (let attempt = 0; attempt < 3; attempt++) {
      const answer = this.#taken(key)
      if (answer !== undefined) return answer
      const lease = this.#leases.live(key, this.#now())
      // A refusal holds until its window ends, whichever store answers now, for the limit that
      // was refused (raised, the key may have more; lowered, the store tells).
      if (lease !== undefined && lease.refused && lease.points === this.points) {
        const ms = lease.until - this.#now()
        if (ms > 0) throw new RateLimiterRes(0, ms, this.points + 1, false)
      }
      await (this.#reserving.get(key) ?? this.#track(key, this.#reserve(key, lease, false)))
    }
    // Other requests keep taking what each reservation brings: count this one on its own.
    return this.#taken(key) ?? this.#one(key)
  }

  /** One point of the current window straight from the store, with the window's own reset. */
  async #one(key: string): Promise<RateLimiterRes> {
    const now = this.#now()
    const { window, until } = this.#window(key, now, false)
    const { res, consumed, remaining, refused, source } = await this.#ask(`${key}:${window}`, 1)
    if (refused) {
      // Not admitted, so not counted: the store counts for limits of any size (a key's raised
      // limit must find only what it admitted).
      this.#giveBack(res, `${key}:${window}`, 1)
      throw new RateLimiterRes(0, until - now, consumed - 1, false)
    }
    const lease = this.#leases.get(key)
    if (lease !== undefined && lease.window === window && lease.source === source) lease.own++
    return new RateLimiterRes(remaining, until - now, consumed, false)
  }

  /** The key's window at `now` (or the one after it), and when that ends. */
  #window(key: string, now: number, next: boolean): { window: number; until: number } {
    const w = this.#windowMs
    const phase = windowPhase(key, w)
    const window = Math.floor((now - phase) / w) + (next ? 1 : 0)
    return { window, until: (window + 1) * w + phase }
  }

  /**
   * Reserves points of the key's window at `clock`, or with `ahead` of the one after it (kept as
   * the current lease's `next`). `take` passes the clock it decided by, so a window boundary
   * passing meanwhile cannot make it reserve for a window it did not mean.
   */
  async #reserve(key: string, previous: Lease | undefined, ahead: boolean, clock = this.#now()): Promise<void> {
    const now = this.#ticks()
    const { window, until } = this.#window(key, clock, ahead)
    // The last lease from the same store tells the key's rate, whether or not its window has
    // ended (a key idle since has a low rate: its points used over all the time since); a
    // refusal or a lease from the other store does not.
    const known = previous !== undefined && previous.source === this.#limiter.source && !previous.refused
    const sameWindow = known && previous.window === window
    let rate = 0
    if (known) {
      const elapsed = now - previous.at
      rate = (previous.size - previous.left) / Math.max(1, elapsed)
      // A lease too young to tell (one whose window ended a moment after it was granted) passes
      // on the rate it was sized by.
      if (elapsed < LEASE_TARGET_MS / 4 && previous.rate > rate) rate = previous.rate
    }
    // What the store had left of this limit at the last reservation. A lease of another of the
    // key's limits is handed back first: the count it knew, less what it hands back, was used.
    let storeLeft = sameWindow ? previous.remaining : this.points
    if (previous !== undefined && previous.points !== this.points) {
      if (sameWindow) storeLeft = Math.max(0, this.points - (previous.points - previous.remaining - previous.left))
      this.#handOver(key, previous)
    }
    // As many as that rate uses in LEASE_TARGET_MS (one point for a key not known), and never
    // more than the rest of the window needs beyond what the lease still holds (carried into the
    // new one): what a lease holds when its window ends is counted and lost. At most MAX_LEASE
    // and 1/LEASE_SHARE of what the store has left (all of it in a new window).
    const wanted = !known ? 1 : ahead ? Math.round(rate * LEASE_TARGET_MS) : Math.round(Math.min(rate * LEASE_TARGET_MS, rate * (until - clock) - (sameWindow ? previous.left : 0)))
    let size = Math.max(1, Math.min(wanted, MAX_LEASE, Math.floor(storeLeft / LEASE_SHARE)))
    const storeKey = `${key}:${window}`
    let answer = await this.#ask(storeKey, size)
    const source = answer.source
    // Answered by the store the gate has switched away from while the call was out (Redis, just
    // after the switch to the insurance): a lease from it would not be used, so what it counted
    // goes back to it, and the next request asks the store in use.
    if (source !== this.#limiter.source) {
      this.#giveBack(answer.res, storeKey, size)
      return
    }
    // The first reservation of the window from this store since the other answered: what that
    // one had counted and this one has not is counted here too (after the ask, as the switch is
    // known only from the answer: a Redis call that times out is answered by the insurance).
    let carry = this.#carry(previous, window, source)
    if (carry > 0 && source === INSURANCE) {
      // Into the insurance, which the workers of a `--workers` machine share (the primary's
      // memory): each of them knows Redis's count, the same points, so the insurance is raised to
      // the largest count any of them told it (kept beside the window's count), not by each one's.
      // Before, both workers added what they knew: a key that had used 60 of 100 had 1 more in
      // the window once Redis went, and the refusal held until the window ended (found by a review).
      const toldKey = `${storeKey}:told`
      const told = await this.#ask(toldKey, 0)
      carry = Math.max(0, carry - told.consumed)
      if (told.source !== source || (carry > 0 && (await this.#ask(toldKey, carry)).source !== source)) {
        this.#giveBack(answer.res, storeKey, size)
        return
      }
    }
    if (carry > 0) {
      const more = await this.#ask(storeKey, carry)
      if (more.source !== source || source !== this.#limiter.source) {
        // Switched again meanwhile: neither answer is used.
        this.#giveBack(answer.res, storeKey, size)
        this.#giveBack(more.res, storeKey, carry)
        return
      }
      answer = more
    }
    let refused = answer.refused
    let remaining = answer.remaining
    if (refused) {
      // Others used more than this process knew. The store had `points - before` left when this
      // ask came (its count includes the ask): keep that much and give back the rest, a refused
      // ask of one point too (the store counts for limits of any size: before, a key refused at 5
      // and raised to 7 was refused again, 5 admitted and 7 counted).
      const before = answer.consumed - size
      const keep = Math.max(0, Math.min(size, this.points - before))
      if (size > keep) this.#giveBack(answer.res, storeKey, size - keep)
      refused = keep === 0
      size = Math.max(1, keep)
      remaining = 0
    }
    const at = this.#ticks()
    const lease: Lease = refused
      ? { points: this.points, res: answer.res, left: 0, size: 1, at, rate: 0, source, carried: carry, own: 0, remaining: 0, window, until, refused: true, next: undefined }
      : { points: this.points, res: answer.res, left: size, size, at, rate, source, carried: carry, own: size, remaining, window, until, refused: false, next: undefined }
    const current = this.#leases.get(key)
    if (ahead) {
      // Used once this window ends; dropped (counted, unused) if the current lease has gone meanwhile.
      if (current !== undefined && current.window === window - 1) current.next = lease
      return
    }
    // A renewal that comes back after the window it was asked in has ended, and the next window's
    // lease (reserved ahead) has taken over, is for an ended window: dropped (counted, unused).
    if (current !== undefined && current.window > window) return
    // A lease of another of the key's limits put in place while this reservation was out: handed
    // back (its `left` is then 0), not added to this one.
    if (current !== undefined && current.points !== this.points) this.#handOver(key, current)
    if (current !== undefined && current.window === window && current.source === source && !current.refused) lease.carried += current.carried
    if (current !== undefined && current.window === window && current.source === source) lease.own += current.own
    // A renewal: what the lease it replaces still holds in the same window stays usable, and a
    // next window's lease reserved meanwhile is kept.
    if (current !== undefined && current.window === window && current.source === source && !current.refused && current.left > 0) {
      if (lease.refused) return
      lease.left += current.left
      lease.size += current.left
    }
    if (current !== undefined && current.next !== undefined && current.next.window === window + 1) lease.next = current.next
    this.#leases.begin(key, lease, this.#now())
  }

  /**
   * What `previous`, a lease of the other store in `window`, tells that `source` has not counted.
   * Into the insurance: Redis's count at the last reservation, less the points of that lease this
   * process will not use and what Redis had itself been carried from the insurance (the caller
   * raises the insurance to it, see `#reserve`). Into Redis: the points this process itself used
   * on the insurance, which no other process counted in Redis (the insurance's count, which the
   * workers of a `--workers` machine share, holds theirs too, and each carries its own). Zero
   * from the same store, another window or without a switch.
   */
  #carry(previous: Lease | undefined, window: number, source: number | undefined): number {
    if (previous === undefined || previous.source === source || previous.window !== window || previous.refused) return 0
    if (source !== INSURANCE) return Math.max(0, previous.own - previous.left)
    return Math.max(0, previous.points - previous.remaining - previous.left - previous.carried)
  }

  /**
   * Gives back to the store what `lease`, reserved for another of the key's limits, and the next
   * window's lease reserved with it still hold, so the store's count is what the key used and
   * this limit is compared with that. Only to the store answering now: a lease of the other one
   * is not used, and `#carry` counts it as such.
   */
  #handOver(key: string, lease: Lease): void {
    const source = this.#limiter.source
    for (let l: Lease | undefined = lease; l !== undefined; l = l.next) {
      if (l.left > 0 && l.source === source && l.points !== this.points) {
        this.#giveBack(l.res, `${key}:${l.window}`, l.left)
        l.own -= l.left
        l.left = 0
      }
    }
  }

  /**
   * Points back to the limiter that counted them. Not waited for: a frozen Redis must not hold
   * the requests waiting for a reservation, and a give-back that fails leaves the points counted
   * (a process may refuse early, never admit more).
   */
  #giveBack(res: RateLimiterRes, storeKey: string, points: number): void {
    giveBackTo(this.#limiter, res, storeKey, points).catch(() => {})
  }

  /**
   * `points` from the store: its answer or its refusal (a RateLimiterRes too, kept as `res` for
   * give-backs), the count, what is left of this limit and whether it is passed (judged here: the
   * store may count for limits of any size, see createRateLimits), and which source gave it;
   * other failures reject.
   */
  #ask(key: string, points: number): Promise<{ res: RateLimiterRes; consumed: number; remaining: number; refused: boolean; source: number | undefined }> {
    const limiter = this.#limiter
    const answer = (res: RateLimiterRes) => ({
      res,
      consumed: res.consumedPoints,
      remaining: Math.max(0, this.points - res.consumedPoints),
      refused: res.consumedPoints > this.points,
      source: limiter.answeredBy?.(res) ?? limiter.source,
    })
    return limiter.consume(key, points).then(answer, (err: unknown) => {
      if (err instanceof RateLimiterRes) return answer(err)
      throw err
    })
  }
}

/** The request path's rate limit of `options`: a LeasedLimit over the limiter createLimiter makes. */
export function createRateLimit(options: LimiterOptions): RateLimit {
  return createRateLimits(options)(options.points)
}

/**
 * Request-path rate limits of one window length and any number of points, all counted in one
 * store under `keyPrefix` (the limit is not part of the store key): a key whose limit changes
 * within a window keeps its count and is held to the new limit. The store itself never refuses;
 * each LeasedLimit compares the count with its own points. They share one limiter, and so its
 * leases: the new limit's LeasedLimit hands back what the old one reserved and did not use.
 */
export function createRateLimits(options: Omit<LimiterOptions, 'points'>): (points: number) => RateLimit {
  // Each window is counted under its own store key; the store keeps a count two windows, long
  // enough for a window whose first lease was reserved just before it started.
  const limiter = createLimiter({ ...options, points: Number.MAX_SAFE_INTEGER, durationS: options.durationS * 2 })
  const byPoints = new Map<number, RateLimit>()
  return (points) => {
    let l = byPoints.get(points)
    if (!l) {
      l = new LeasedLimit(limiter, points, options.durationS * 1000)
      byPoints.set(points, l)
    }
    return l
  }
}

/**
 * In the cluster primary, before forking: answers the workers' RateLimiterCluster calls from its
 * memory (bounded as createLimiter's is). Returns the delete of a key's count there, by the
 * limiter's keyPrefix (an operator's lift of a lockout).
 */
export function clusterLimitsPrimary(): (keyPrefix: string, key: string) => Promise<void> {
  // rate-limiter-flexible makes the primary's limiters itself, a RateLimiterMemory for each
  // keyPrefix a worker names, into this object: each is bounded as it is added.
  const primary = new RateLimiterClusterMaster() as unknown as { _rateLimiters: Record<string, RateLimiterMemory> }
  const limiters = new Proxy<Record<string, RateLimiterMemory>>({}, { set: (target, prefix, limiter: RateLimiterMemory) => Reflect.set(target, prefix, bound(limiter)) })
  Object.assign(limiters, primary._rateLimiters)
  primary._rateLimiters = limiters
  return async (keyPrefix, key) => void (await limiters[keyPrefix]?.delete(key))
}

/** Seconds until `ms` have passed, at least 1 (for Retry-After and RateLimit-Reset). */
export function secondsFrom(ms: number): number {
  return ms <= 1000 ? 1 : Math.ceil(ms / 1000)
}
