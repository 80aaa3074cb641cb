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

/** `first`, unless its gate is down or it fails or is late; then `second`. A refusal (RateLimiterRes) is an answer, not a failure. */
class Insured implements Limiter {
  readonly #first: Limiter
  readonly #second: Limiter
  readonly #gate: Gate

  constructor(first: Limiter, second: Limiter, gate: Gate) {
    this.#first = first
    this.#second = second
    this.#gate = gate
  }

  async #run<T>(op: (l: Limiter) => Promise<T>): Promise<T> {
    if (!this.#gate.up) return op(this.#second)
    let timer: NodeJS.Timeout | undefined
    try {
      return await Promise.race([op(this.#first), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(TIMED_OUT), this.#gate.timeoutMs)))])
    } catch (err) {
      if (err instanceof RateLimiterRes) throw err
      this.#gate.down(err === TIMED_OUT ? 'timeout' : 'error', err as Error)
      return op(this.#second)
    } finally {
      clearTimeout(timer)
    }
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
