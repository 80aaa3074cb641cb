// Rate limiters from rate-limiter-flexible: in memory, or in Redis with an in-memory insurance
// limiter that takes over when Redis is down or slow (so a Redis failure never means no limit).
import { RateLimiterMemory, RateLimiterRedis, RateLimiterRes, RLWrapperTimeouts } from 'rate-limiter-flexible'
import type { Redis } from 'ioredis'

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
  /** A Redis call slower than this is answered by the insurance limiter. */
  redisTimeoutMs?: number
}

export function createLimiter(options: LimiterOptions): Limiter {
  const base = { points: options.points, duration: options.durationS, keyPrefix: options.keyPrefix }
  const memory = new RateLimiterMemory(base)
  if (!options.redis) return memory as unknown as Limiter
  // inMemoryBlockOnConsumed: once a key is over its limit it is refused from memory until its
  // window ends, so a client hammering past its limit costs no Redis round trips.
  const redis = new RateLimiterRedis({ ...base, storeClient: options.redis, rejectIfRedisNotReady: true, insuranceLimiter: memory, inMemoryBlockOnConsumed: options.points + 1 })
  return new RLWrapperTimeouts({ limiter: redis, timeoutMs: options.redisTimeoutMs ?? 200, insuranceLimiter: memory }) as unknown as Limiter
}

/** Seconds until `ms` have passed, at least 1 (for Retry-After and RateLimit-Reset). */
export function secondsFrom(ms: number): number {
  return ms <= 1000 ? 1 : Math.ceil(ms / 1000)
}
