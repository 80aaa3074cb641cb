// The lockout check stage. A failed attempt is a presented key that does not authenticate the
// request (malformed, unknown, wrong secret, revoked, expired, used from an address it is not
// bound to); a request without a key is not one. The lockout itself is core/lockout.ts, shared
// with the admin API; its check is a memory look-up, so this stage is synchronous.
import type { Lockout } from '../core/lockout.ts'
import type { GatewayMetrics } from '../core/metrics.ts'
import type { RequestState, Stage } from './state.ts'

export function createLockoutStage(lockout: Lockout, metrics: GatewayMetrics): Stage {
  return (s: RequestState) => {
    const retryAfterS = lockout.lockedFor(s.addressKey)
    if (retryAfterS === undefined) return undefined
    s.retryAfterS = retryAfterS
    metrics.lockedOutRequests.inc()
    return 'ip_locked_out'
  }
}
