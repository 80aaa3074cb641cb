// Lockout (SPEC §3): `lockout.max_attempts` failed key attempts from one address (its IPv6
// network, see client-address.ts) within `lockout.window_s` lock that address out for
// `lockout.window_s`. A failed attempt is a presented key that does not authenticate the
// request (malformed, unknown, wrong secret, revoked, expired, used from an address it is not
// bound to); a request without a key is not one.
import type { GatewayMetrics } from '../core/metrics.ts'
import { createLimiter, secondsFrom, type Limiter } from './limiters.ts'
import type { Redis } from 'ioredis'
import type { RequestState, Stage } from './state.ts'

export interface Lockout {
  stage: Stage
  recordFailure(addressKey: string): Promise<void>
}

export function createLockout(options: { maxAttempts: number; windowS: number; redis?: Redis | undefined; metrics: GatewayMetrics }): Lockout {
  const { maxAttempts, windowS, metrics } = options
  const limiter: Limiter = createLimiter({ points: maxAttempts, durationS: windowS, keyPrefix: 'keygate:lockout', redis: options.redis })
  return {
    stage: async (s: RequestState) => {
      const r = await limiter.get(s.addressKey)
      if (r !== null && r.consumedPoints >= maxAttempts) {
        s.retryAfterS = secondsFrom(r.msBeforeNext)
        metrics.lockedOutRequests.inc()
        return 'ip_locked_out'
      }
      return undefined
    },
    async recordFailure(addressKey: string) {
      const r = await limiter.penalty(addressKey, 1)
      // The attempt that reaches the limit starts a full window of lockout from now.
      if (r.consumedPoints === maxAttempts) {
        await limiter.block(addressKey, windowS)
        metrics.lockouts.inc()
      }
    },
  }
}
