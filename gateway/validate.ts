// Key validation: format check (a malformed key never reaches the store), cache or store
// look-up, status, expiry, rotation grace and CIDR binding. Every refusal is a failed
// attempt for the lockout. With `gateway.reveal_key_status` off every bad key is answered
// `key_invalid`, so the answer never tells unknown, wrong secret, revoked, expired or malformed
// apart; the metrics and the debug log do.
import { digestKey, keyKind, keyShape, type KeyPrefixes } from '../core/keys/format.ts'
import { outageLog, type Logger } from '../core/log.ts'
import type { BadKeyReason, GatewayMetrics } from '../core/metrics.ts'
import type { CachedKey, KeyCache, Miss } from './key-cache.ts'
import { createLookupFailures, type Lockout } from '../core/lockout.ts'
import { lockedOut } from './lockout.ts'
import type { RequestState, Stage, StageResult, Verdict } from './state.ts'

export interface ValidateOptions {
  cache: KeyCache
  prefixes: KeyPrefixes
  acceptLegacy: boolean
  revealKeyStatus: boolean
  lockout: Lockout
  metrics: GatewayMetrics
  log: Logger
  now: () => number
}

export function createValidateStage(o: ValidateOptions): Stage {
  const { cache, prefixes, acceptLegacy, lockout, log, now } = o
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

  /** Counts a refused key, then ends its attempt: the failure is counted toward the lockout before another attempt from the address may start. */
  const refuse = async (s: RequestState, reason: BadKeyReason, keyId: string | undefined): Promise<StageResult> => {
    badKeys[reason].inc()
    // A known key used where it may not be (outside its bindings, revoked, expired) counts toward
    // its addresses and error rate: before, it raised nothing however many addresses tried it,
    // the clearest sign of a leaked key (found by the anomalies review). The answer is the same.
    s.refusedKeyId = keyId
    if (debug) log.debug('key refused', { request_id: s.id, reason, key_id: keyId ?? null, address: s.address })
    try {
      await lockout.finish(s.addressKey, true)
    } catch (err) {
      log.warn('could not record a failed key attempt', { request_id: s.id, err: err as Error })
    }
    return codeFor(reason)
  }

  /** Why `found` does not authenticate the request, or undefined (then `s.key` is set). */
  const judge = (s: RequestState, found: CachedKey | Miss): [BadKeyReason, string | undefined] | undefined => {
    if (typeof found === 'string') return [found, undefined]
    const refused = found.refused
    if (refused !== undefined) return [refused, found.id]
    if (now() >= found.validUntil) return [found.rotating ? 'grace_ended' : 'expired', found.id]
    const binding = found.binding
    if (binding !== undefined) {
      if (binding.lastAddress !== s.address) {
        binding.lastAllowed = binding.allowedFrom(s.address)
        binding.lastAddress = s.address
      }
      if (!binding.lastAllowed) return ['address_not_bound', found.id]
    }
    s.key = found
    return undefined
  }

  const settle = (s: RequestState, found: CachedKey | Miss): StageResult | Promise<StageResult> => {
    const refused = judge(s, found)
    if (refused !== undefined) return refuse(s, refused[0], refused[1])
    void lockout.finish(s.addressKey, false)
    return undefined
  }

  // Once an outage at warn, and once its end at info, each failed look-up in between at debug
  // (core/log.ts outageLog).
  const outage = outageLog(log, now, {
    start: 'key store look-ups fail: keys not in the cache are answered 503 store_unavailable (logged once until look-ups succeed again; each at debug)',
    each: 'key store look-up failed',
    end: 'key store look-ups succeed again',
  })
  // An attempt that waited for its place while look-ups failed, two or more in a row, is answered
  // 503 as it is let in, without asking the store (core/lockout.ts createLookupFailures).
  const lookups = createLookupFailures()
  // A look-up is counted once, whatever the number of requests that shared it (the key cache's
  // one promise for every caller of a key asking meanwhile): before (found by a review), one
  // failure shared by two attempts of a burst of one key was two in a row, and the address's
  // whole queue was answered 503 without asking the store.
  const failedLookups = new WeakSet<Promise<unknown>>()
  const storeDown = (s: RequestState, err: unknown, lookup?: Promise<unknown>): StageResult => {
    if (lookup === undefined || !failedLookups.has(lookup)) lookups.failed()
    if (lookup !== undefined) failedLookups.add(lookup)
    void lockout.finish(s.addressKey, false)
    storeErrors.inc()
    outage.failed({ request_id: s.id, err: err as Error })
    return 'store_unavailable'
  }

  // A hash found in the cache is a stored key's, so a hit needs only the cheap length and
  // prefix check; the full format check (checksum included) runs before the store is asked.
  // A cached key that authenticates the request is the one outcome that cannot be a failed
  // attempt; every other look-up holds a place among the address's attempts in doubt
  // (core/lockout.ts), so a burst of bad keys gets no more of them checked than the lockout
  // allows (before, each request of the burst passed the lockout stage before any had failed).
  return (s: RequestState) => {
    const presented = s.presented as string
    const kind = keyKind(presented, prefixes, acceptLegacy)
    const digest = kind === undefined ? undefined : digestKey(presented, kind)
    const hit = digest === undefined ? undefined : cache.hit(digest)
    if (hit !== undefined && judge(s, hit) === undefined) return undefined
    const place = lockout.attempt(s.addressKey)
    if (place === undefined) return held(s, presented, digest, hit)
    const waited = lookups.mark()
    return place.then((lockedS) => (lockedS === undefined ? held(s, presented, digest, hit, waited) : lockedOut(s, lockedS, o.metrics)))
  }

  /** A waiting attempt let in after look-ups failed meanwhile: its place goes at once to the next one, and it is answered as they were. */
  function storeFailedMeanwhile(s: RequestState): StageResult {
    void lockout.finish(s.addressKey, false)
    if (debug) log.debug('key not looked up: look-ups failed while it waited for its place', { request_id: s.id })
    return 'store_unavailable'
  }

  /** `lookUp`, giving its place back should it throw (a stage that throws is answered 500). */
  function held(s: RequestState, presented: string, digest: string | undefined, hit: CachedKey | undefined, waited?: number): StageResult | Promise<StageResult> {
    try {
      return lookUp(s, presented, digest, hit, waited)
    } catch (err) {
      void lockout.finish(s.addressKey, false)
      throw err
    }
  }

  /**
   * The look-up of a key that may fail, holding its place among the attempts in doubt (`hit`: the
   * cached key, refused; `waited`: where the look-ups stood as it began to wait for its place).
   * Only one that would ask the store is answered 503 after look-ups failed while it waited: a
   * malformed key, or one the cache knows, is answered as ever (before, found by a review, 503).
   */
  function lookUp(s: RequestState, presented: string, digest: string | undefined, hit: CachedKey | undefined, waited?: number): StageResult | Promise<StageResult> {
    if (digest === undefined) return refuse(s, 'malformed', undefined)
    // One that waited may find its key cached meanwhile (by an attempt of the same key ahead of
    // it): before (found by a review), it was looked up again, a query per group of max_attempts
    // in a burst of one key, and answered 503 without one once look-ups had failed in a row.
    if (waited !== undefined) hit ??= cache.hit(digest)
    if (hit !== undefined) return settle(s, hit)
    if (keyShape(presented, prefixes, acceptLegacy) === undefined) return refuse(s, 'malformed', undefined)
    const known = cache.known(digest)
    if (known !== undefined) return settle(s, known)
    if (waited !== undefined && lookups.failedSince(waited)) return storeFailedMeanwhile(s)
    let found: ReturnType<KeyCache['miss']>
    try {
      found = cache.miss(digest, presented)
    } catch (err) {
      return storeDown(s, err)
    }
    return found.then(
      (f) => {
        lookups.answered()
        outage.succeeded()
        return settle(s, f)
      },
      (err: unknown) => storeDown(s, err, found),
    )
  }
}
