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
  consume(key: string): Promise<RateLimiterRes>
  penalty(key: string, points?: number): Promise<RateLimiterRes>
  get(key: string): Promise<RateLimiterRes | null>
  block(key: string, secDuration: number): Promise<RateLimiterRes>
  delete(key: string): Promise<boolean>
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

  consume(key: string) {
    return this.#run((l) => l.consume(key))
  }
  penalty(key: string, points?: number) {
    return this.#run((l) => l.penalty(key, points))
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
  // inMemoryBlockOnConsumed: once a key is over its limit it is refused from memory until its
  // window ends, so a client hammering past its limit costs no Redis round trips.
  const shared = new RateLimiterRedis({ ...base, storeClient: options.redis, rejectIfRedisNotReady: true, inMemoryBlockOnConsumed: options.points + 1 }) as unknown as Limiter
  return new Insured(shared, local, redisHealth(options.redis))
}

/** In the cluster primary, before forking: answers the workers' RateLimiterCluster calls from its memory. */
export function clusterLimitsPrimary(): void {
  new RateLimiterClusterMaster()
}

/** Seconds until `ms` have passed, at least 1 (for Retry-After and RateLimit-Reset). */
export function secondsFrom(ms: number): number {
  return ms <= 1000 ? 1 : Math.ceil(ms / 1000)
}
