// Lockout (SPEC §3): `lockout.max_attempts` failed key attempts from one address (its IPv6
// network, see client-address.ts) within `lockout.window_s` lock that address out for
// `lockout.window_s`. A failed attempt is a presented key that does not authenticate the
// request (malformed, unknown, wrong secret, revoked, expired, used from an address it is not
// bound to); a request without a key is not one.
//
// Attempts are counted in the limiter (Redis when configured, so every instance counts
// together). The lockouts in force are mirrored in memory, so the per-request check is a map
// look-up and never a Redis round trip: the instance that locks an address out publishes it on
// the invalidation channel, every instance applies it, and an instance reads the lockouts in
// force from Redis when it starts and whenever Redis comes back.
import QuickLRU from 'quick-lru'
import type { Redis } from 'ioredis'
import type { GatewayMetrics } from '../core/metrics.ts'
import { publishInvalidation } from '../core/invalidation.ts'
import type { Logger } from '../core/log.ts'
import { createLimiter, secondsFrom, type Limiter } from './limiters.ts'
import type { RequestState, Stage } from './state.ts'

export const LOCKOUT_KEY_PREFIX = 'keygate:lockout'
/** Locked-out addresses held in memory; each took `max_attempts` failures to get there. */
const MIRROR_MAX = 100_000

export interface Lockout {
  /** Synchronous: answers `ip_locked_out` for an address locked out here or on another instance. */
  stage: Stage
  recordFailure(addressKey: string): Promise<void>
  /** Applies a lockout decided by another instance (an invalidation message `lock:<ms>:<address>`). */
  applyMessage(message: string): void
  /** Reads the lockouts in force from Redis; runs at start and when Redis reconnects. */
  load(): Promise<void>
}

export function createLockout(options: { maxAttempts: number; windowS: number; redis?: Redis | undefined; metrics: GatewayMetrics; log?: Logger }): Lockout {
  const { maxAttempts, windowS, metrics, redis, log } = options
  const limiter: Limiter = createLimiter({ points: maxAttempts, durationS: windowS, keyPrefix: LOCKOUT_KEY_PREFIX, redis })
  const locked = new QuickLRU<string, number>({ maxSize: MIRROR_MAX })
  const lock = (addressKey: string, ms: number) => {
    if (ms > 0) locked.set(addressKey, Date.now() + ms, { maxAge: ms })
  }

  const load = async (): Promise<void> => {
    if (!redis || redis.status !== 'ready') return
    try {
      let cursor = '0'
      do {
        const [next, keys] = await redis.scan(cursor, 'MATCH', `${LOCKOUT_KEY_PREFIX}:*`, 'COUNT', 1000)
        cursor = next
        if (keys.length === 0) continue
        const pipeline = redis.pipeline()
        for (const k of keys) pipeline.get(k).pttl(k)
        const replies = (await pipeline.exec()) ?? []
        keys.forEach((k, i) => {
          const count = Number(replies[2 * i]?.[1])
          const ttl = Number(replies[2 * i + 1]?.[1])
          if (count >= maxAttempts && ttl > 0) lock(k.slice(LOCKOUT_KEY_PREFIX.length + 1), ttl)
        })
      } while (cursor !== '0')
    } catch (err) {
      log?.warn('could not read the lockouts in force from Redis', { err: err as Error })
    }
  }
  redis?.on('ready', () => void load())

  return {
    stage: (s: RequestState) => {
      const until = locked.get(s.addressKey)
      if (until === undefined) return undefined
      const left = until - Date.now()
      if (left <= 0) return undefined
      s.retryAfterS = secondsFrom(left)
      metrics.lockedOutRequests.inc()
      return 'ip_locked_out'
    },
    async recordFailure(addressKey: string) {
      const r = await limiter.penalty(addressKey, 1)
      if (r.consumedPoints < maxAttempts) return
      if (r.consumedPoints === maxAttempts) {
        // The attempt that reaches the limit starts a full window of lockout from now.
        await limiter.block(addressKey, windowS)
        metrics.lockouts.inc()
        lock(addressKey, windowS * 1000)
        if (redis) await publishInvalidation(redis, `lock:${windowS * 1000}:${addressKey}`, log)
        return
      }
      // Past the limit: locked out already (by another instance whose message is late, or before a restart).
      lock(addressKey, r.msBeforeNext)
    },
    applyMessage(message: string) {
      const m = /^lock:(\d+):(.+)$/.exec(message)
      if (m) lock(m[2] as string, Math.min(Number(m[1]), windowS * 1000))
    },
    load,
  }
}
