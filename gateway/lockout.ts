// The lockout check stage. A failed attempt is a presented key that does not authenticate the
// request (malformed, unknown, wrong secret, revoked, expired, used from an address it is not
// bound to); a request without a key is not one. The lockout itself is core/lockout.ts, shared
// with the admin API; its check is a memory look-up, so this stage is synchronous.
import { lockedOutMessage, type Lockout } from '../core/lockout.ts'
import type { GatewayMetrics } from '../core/metrics.ts'
import type { RequestState, Stage, Verdict } from './state.ts'

/**
 * The answer to a locked-out address, counted (this stage's, and validation's for an attempt that
 * waited while the lockout began): Retry-After, the lockout's, and no RateLimit-* headers. The
 * lockout is no rate limit, and its stage runs before the rate limits; an attempt that waited had
 * passed them, and before, it alone carried the per-address limit's headers.
 */
export function lockedOut(s: RequestState, retryAfterS: number, metrics: GatewayMetrics): Verdict {
  s.retryAfterS = retryAfterS
  s.message = lockedOutMessage(retryAfterS)
  s.rlLimit = -1
  metrics.lockedOutRequests.inc()
  return 'ip_locked_out'
}

export function createLockoutStage(lockout: Lockout, metrics: GatewayMetrics): Stage {
  return (s: RequestState) => {
    const retryAfterS = lockout.lockedFor(s.addressKey)
    return retryAfterS === undefined ? undefined : lockedOut(s, retryAfterS, metrics)
  }
}
