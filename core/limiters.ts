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
import QuickLRU from 'quick-lru'
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

  #run<T>(op: (l: Limiter) => Promise<T>): Promise<T> {
    if (!this.#gate.up) return op(this.#second)
    return new Promise<T>((resolve, reject) => {
      const fallBack = (err: unknown) => {
        this.#gate.down(err === TIMED_OUT ? 'timeout' : 'error', err as Error)
        op(this.#second).then(resolve, reject)
      }
      const pending = this.#watch.watch(() => fallBack(TIMED_OUT))
      let call: Promise<T>
      try {
        call = op(this.#first)
      } catch (err) {
        pending.late = undefined
        fallBack(err)
        return
      }
      call.then(
        (value) => {
          if (pending.late === undefined) return
          pending.late = undefined
          resolve(value)
        },
        (err: unknown) => {
          if (pending.late === undefined) return
          pending.late = undefined
          if (err instanceof RateLimiterRes) reject(err)
          else fallBack(err)
        },
      )
    })
  }

  /** Which limiter answers: changes when the gate switches, so answers kept from the other one can be dropped. */
  get source(): number {
    return this.#gate.up ? 1 : 0
  }

  consume(key: string, points?: number) {
    return this.#run((l) => l.consume(key, points))
  }
  penalty(key: string, points?: number) {
    return this.#run((l) => l.penalty(key, points))
  }
  reward(key: string, points?: number) {
    return this.#run((l) => l.reward(key, points))
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
}

const CLUSTER_GATE: Gate = { up: true, timeoutMs: CLUSTER_TIMEOUT_MS, down: () => {} }

export function createLimiter(options: LimiterOptions): Limiter {
  const base = { points: options.points, duration: options.durationS, keyPrefix: options.keyPrefix }
  const memory = new RateLimiterMemory(base) as unknown as Limiter
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
  /** Points reserved in the store and not yet used by this process. */
  left: number
  /** Points the reservation took, and when (performance.now()): the next one is sized to the rate they were used at. */
  size: number
  at: number
  /** The key's rate (points per ms) this lease was sized by. */
  rate: number
  /** The limiter's source when reserved. */
  source: number | undefined
  /** What the store had left for others after the reservation. */
  remaining: number
  /** Epoch ms when the store's window (and so the lease) ends. */
  until: number
  /** The store refused even one point: refuse until `until`. */
  refused: boolean
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
/** Two window ends closer than this are the same window's. */
const SAME_WINDOW_MS = 250
/** Keys with a lease held at once; the least recently used lease is dropped (its points are lost for the window: counted, never given twice). */
const MAX_LEASES = 10_000

/**
 * Rate limits on the request path, without a store round trip per request: points are reserved
 * from the limiter (memory, the cluster primary or Redis) a few at a time and used from memory.
 * A reservation is an ordinary atomic consume of several points, so the store never allows more
 * than the limit across every process sharing it; what a lease has not used when its window
 * ends is counted but unused (a process can refuse slightly early, never admit more).
 * - Size: what the key's last lease was used at, over about 100 ms, at most MAX_LEASE and 1/8
 *   of what the store has left (one point for a key not seen by this process), so a slow key is
 *   counted one point at a time, and near its limit every key is. The first lease of a new
 *   window is sized by the last window's rate too: a busy key waits for one reservation when its
 *   window ends, not for a one-point lease and then another.
 * - A refusal is kept until the window ends (a client past its limit costs no store round trips).
 * - Leases and refusals are dropped when the answering store changes (Redis down or back).
 * - A lease of AHEAD_FROM points or more is renewed when a quarter is left, in the background;
 *   what it still holds is carried into the next if both are of the same window (so a process
 *   holds at most a lease and a quarter unused).
 * - Concurrent requests for a key wait for one reservation.
 * - RateLimit-Remaining is what the store had left at the last reservation plus this process's
 *   unused lease: exact with one process.
 */
export class LeasedLimit implements RateLimit {
  readonly points: number
  readonly #limiter: Limiter
  readonly #leases = new QuickLRU<string, Lease>({ maxSize: MAX_LEASES / 2 })
  readonly #reserving = new Map<string, Promise<void>>()

  constructor(limiter: Limiter, points: number) {
    this.#limiter = limiter
    this.points = points
  }

  remaining = 0
  msBeforeNext = 0

  take(key: string): boolean {
    const lease = this.#leases.get(key)
    if (lease === undefined || lease.left === 0 || lease.source !== this.#limiter.source) return false
    const ms = lease.until - Date.now()
    if (ms <= 0) return false
    lease.left--
    this.remaining = lease.remaining + lease.left
    this.msBeforeNext = ms
    // A busy key's next reservation is asked for while a quarter of this one is left, so its
    // requests do not wait for the store's answer when the lease runs out.
    // A failure here is left for the request that finds the lease used up: it asks again, and sees it.
    if (lease.size >= AHEAD_FROM && lease.left <= lease.size >> 2 && !this.#reserving.has(key)) this.#track(key, this.#reserve(key, lease).catch(() => {}))
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
      const lease = this.#leases.get(key)
      if (lease !== undefined && lease.refused && lease.source === this.#limiter.source) {
        const ms = lease.until - Date.now()
        if (ms > 0) throw new RateLimiterRes(0, ms, this.points + 1, false)
      }
      await (this.#reserving.get(key) ?? this.#track(key, this.#reserve(key, lease)))
    }
    // Other requests keep taking what each reservation brings: count this one on its own.
    return this.#taken(key) ?? this.#limiter.consume(key, 1)
  }

  async #reserve(key: string, previous: Lease | undefined): Promise<void> {
    const now = performance.now()
    // The last lease from the same store tells the key's rate, whether or not its window has
    // ended (a key idle since has a low rate: its points used over all the time since); a
    // refusal or a lease from the other store does not.
    const known = previous !== undefined && previous.source === this.#limiter.source && !previous.refused
    const sameWindow = known && previous.until > Date.now()
    let rate = 0
    if (known) {
      const elapsed = now - previous.at
      rate = (previous.size - previous.left) / Math.max(1, elapsed)
      // A lease too young to tell (one whose window ended a moment after it was granted) passes
      // on the rate it was sized by.
      if (elapsed < LEASE_TARGET_MS / 4 && previous.rate > rate) rate = previous.rate
    }
    // As many as that rate uses in LEASE_TARGET_MS (one point for a key not known), at most
    // MAX_LEASE and 1/LEASE_SHARE of what the store has left (all of it in a new window).
    const wanted = known ? Math.round(rate * LEASE_TARGET_MS) : 1
    let size = Math.max(1, Math.min(wanted, MAX_LEASE, Math.floor((sameWindow ? previous.remaining : this.points) / LEASE_SHARE)))
    let answer = await this.#ask(key, size)
    if (answer.refused && size > 1) {
      // Others used more than this process knew: give the points back and ask for one.
      await this.#limiter.reward(key, size)
      size = 1
      answer = await this.#ask(key, 1)
    }
    const r = answer.res
    // Kept with the source that answered (read after the answer: a call that fell back to the insurance was answered by it).
    const source = this.#limiter.source
    const until = Date.now() + r.msBeforeNext
    // Asked ahead: what the lease still holds stays usable if it belongs to the same window
    // (windows are at least a second long; the same window's end differs only by clock jitter).
    const carried = sameWindow && previous.source === source && Math.abs(until - previous.until) < SAME_WINDOW_MS ? previous.left : 0
    if (answer.refused) {
      if (carried === 0) this.#leases.set(key, { left: 0, size: 1, at: now, rate: 0, source, remaining: 0, until, refused: true })
    } else this.#leases.set(key, { left: carried + size, size: carried + size, at: now, rate, source, remaining: r.remainingPoints, until, refused: false })
  }

  /** `points` from the store: its answer, or its refusal (a RateLimiterRes too); other failures reject. */
  #ask(key: string, points: number): Promise<{ res: RateLimiterRes; refused: boolean }> {
    return this.#limiter.consume(key, points).then(
      (res) => ({ res, refused: false }),
      (err: unknown) => {
        if (err instanceof RateLimiterRes) return { res: err, refused: true }
        throw err
      },
    )
  }
}

/** The request path's rate limit of `options`: a LeasedLimit over the limiter createLimiter makes. */
export function createRateLimit(options: LimiterOptions): RateLimit {
  return new LeasedLimit(createLimiter(options), options.points)
}

/** In the cluster primary, before forking: answers the workers' RateLimiterCluster calls from its memory. */
export function clusterLimitsPrimary(): void {
  new RateLimiterClusterMaster()
}

/** Seconds until `ms` have passed, at least 1 (for Retry-After and RateLimit-Reset). */
export function secondsFrom(ms: number): number {
  return ms <= 1000 ? 1 : Math.ceil(ms / 1000)
}
