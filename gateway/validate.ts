// Key validation: format check (a malformed key never reaches the store), cache or store
// look-up, status, expiry, rotation grace and CIDR binding. Every refusal is a failed
// attempt for the lockout. With `gateway.reveal_key_status` off every bad key is answered
// `key_invalid`, so the answer never tells unknown, wrong secret, revoked, expired or malformed
// apart; the metrics and the debug log do.
import { digestKey, keyKind, keyShape } from '../core/keys/format.ts'
import type { Logger } from '../core/log.ts'
import type { BadKeyReason, GatewayMetrics } from '../core/metrics.ts'
import type { CachedKey, KeyCache, Miss } from './key-cache.ts'
import type { Lockout } from '../core/lockout.ts'
import type { RequestState, Stage, StageResult, Verdict } from './state.ts'

export interface ValidateOptions {
  cache: KeyCache
  prefix: string
  acceptLegacy: boolean
  revealKeyStatus: boolean
  lockout: Lockout
  metrics: GatewayMetrics
  log: Logger
  now: () => number
}

export function createValidateStage(o: ValidateOptions): Stage {
  const { cache, prefix, acceptLegacy, lockout, log, now } = o
  const badKeys = o.metrics.badKeys
  const storeErrors = o.metrics.storeErrors.lookup
  const debug = log.enabled('debug')

  const codeFor = (reason: BadKeyReason): Verdict => {
    if (reason === 'address_not_bound') return 'ip_blocked'
    if (!o.revealKeyStatus) return 'key_invalid'
    if (reason === 'revoked') return 'key_revoked'
    if (reason === 'expired' || reason === 'grace_ended') return 'key_expired'
    return 'key_invalid'
  }

  const refuse = async (s: RequestState, reason: BadKeyReason, keyId: string | undefined): Promise<StageResult> => {
    badKeys[reason].inc()
    if (debug) log.debug('key refused', { request_id: s.id, reason, key_id: keyId ?? null, address: s.address })
    try {
      await lockout.recordFailure(s.addressKey)
    } catch (err) {
      log.warn('could not record a failed key attempt', { request_id: s.id, err: err as Error })
    }
    return codeFor(reason)
  }

  const settle = (s: RequestState, found: CachedKey | Miss): StageResult | Promise<StageResult> => {
    if (typeof found === 'string') return refuse(s, found, undefined)
    const refused = found.refused
    if (refused !== undefined) return refuse(s, refused, found.id)
    if (now() >= found.validUntil) return refuse(s, found.rotating ? 'grace_ended' : 'expired', found.id)
    const binding = found.binding
    if (binding !== undefined) {
      if (binding.lastAddress !== s.address) {
        binding.lastAllowed = binding.allowedFrom(s.address)
        binding.lastAddress = s.address
      }
      if (!binding.lastAllowed) return refuse(s, 'address_not_bound', found.id)
    }
    s.key = found
    return undefined
  }

  const storeDown = (s: RequestState, err: unknown): StageResult => {
    storeErrors.inc()
    log.warn('key store look-up failed', { request_id: s.id, err: err as Error })
    return 'store_unavailable'
  }

  // A hash found in the cache is a stored key's, so a hit needs only the cheap length and
  // prefix check; the full format check (checksum included) runs before the store is asked.
  return (s: RequestState) => {
    const presented = s.presented as string
    const kind = keyKind(presented, prefix, acceptLegacy)
    if (kind === undefined) return refuse(s, 'malformed', undefined)
    const digest = digestKey(presented, kind)
    const hit = cache.hit(digest)
    if (hit !== undefined) return settle(s, hit)
    if (keyShape(presented, prefix, acceptLegacy) === undefined) return refuse(s, 'malformed', undefined)
    let found: ReturnType<KeyCache['miss']>
    try {
      found = cache.miss(digest, presented)
    } catch (err) {
      return storeDown(s, err)
    }
    if (found instanceof Promise) {
      return found.then(
        (f) => settle(s, f),
        (err: unknown) => storeDown(s, err),
      )
    }
    return settle(s, found)
  }
}
