// The key entity as the domain sees it (camelCase), and its public JSON form (snake_case,
// never the hash).

export const KEY_TYPES = ['system', 'user', 'service', 'integration', 'emergency'] as const
export type KeyType = (typeof KEY_TYPES)[number]

export const KEY_STATUSES = ['active', 'rotating', 'revoked', 'expired'] as const
export type KeyStatus = (typeof KEY_STATUSES)[number]

export interface RateLimit {
  limit: number
  windowS: number
}

export interface KeyRecord {
  id: string
  keyHash: string
  name: string
  type: KeyType
  status: KeyStatus
  scopes: string[]
  owner: string | null
  metadata: Record<string, unknown>
  allowedCidrs: string[]
  rateLimit: RateLimit | null
  rotationIntervalS: number | null
  rotatedFrom: string | null
  replacedBy: string | null
  graceUntil: Date | null
  legacy: boolean
  createdAt: Date
  updatedAt: Date
  expiresAt: Date | null
  lastUsedAt: Date | null
  revokedAt: Date | null
  revokedReason: string | null
  /**
   * When the key stops (or stopped) being accepted, where its row cannot tell (keyValidUntil works
   * it out otherwise): a status the key service derived (a key past its expiry or grace reads
   * `expired` before the scheduler marks its row, and ended then, not at the row's last change),
   * or the API's `valid_until` as the CLI received it.
   */
  validUntil?: Date | null
}

const iso = (d: Date | null) => (d ? d.toISOString() : null)

export function keyJson(k: KeyRecord) {
  return {
    id: k.id,
    name: k.name,
    type: k.type,
    status: k.status,
    scopes: k.scopes,
    owner: k.owner,
    metadata: k.metadata,
    allowed_cidrs: k.allowedCidrs,
    rate_limit: k.rateLimit ? { limit: k.rateLimit.limit, window_s: k.rateLimit.windowS } : null,
    rotation_interval_s: k.rotationIntervalS,
    rotated_from: k.rotatedFrom,
    replaced_by: k.replacedBy,
    grace_until: iso(k.graceUntil),
    legacy: k.legacy,
    created_at: k.createdAt.toISOString(),
    updated_at: k.updatedAt.toISOString(),
    expires_at: iso(k.expiresAt),
    last_used_at: iso(k.lastUsedAt),
    revoked_at: iso(k.revokedAt),
    revoked_reason: k.revokedReason,
    valid_until: iso(keyValidUntil(k)),
  }
}
export type KeyJson = ReturnType<typeof keyJson>

/**
 * When a key stops being accepted, by the gateway's rule: the earliest of its expiry, the end of
 * its grace (a key a rotation replaced) and, revoked, its revocation; null for never. In every
 * key's JSON as `valid_until` (before, found by a review, only in a rotation's `previous`: a script
 * worked out min(expires_at, grace_until) itself). For the key a rotation replaced (its answer's
 * and its `key.rotated` event's `previous`) it is never null: the earlier of its expiry and the end
 * of its grace, or the rotation's time when the rotation revoked it (forced, or a grace period of
 * 0); `grace_until` alone overstated it for a key expiring within its grace (found by a review).
 *
 * Once a key has ended it is when it ended, not when its row changed (found by a review: a key
 * whose grace had ended read `expired` with `valid_until` null, "never", and one revoked after its
 * expiry read the revocation's time). A key the scheduler ended for its rotation deadline (which
 * the gateway does not judge by) ended at that round, the row's last change (an expired key takes
 * no change but a revocation), unless its expiry came first. Revoked after such an end, it reads
 * the revocation's time: the row keeps no other trace of that end than its audit entry.
 */
export function keyValidUntil(k: KeyRecord): Date | null {
  if (k.validUntil !== undefined) return k.validUntil
  let until = k.expiresAt ? k.expiresAt.getTime() : Infinity
  if (k.graceUntil) until = Math.min(until, k.graceUntil.getTime())
  if (k.status === 'revoked') until = Math.min(until, (k.revokedAt ?? k.updatedAt).getTime())
  else if (k.status === 'expired') until = Math.min(until, k.updatedAt.getTime())
  return until === Infinity ? null : new Date(until)
}

/** The answer to a rotation, from the admin API and `api-key rotate --json` alike. */
export function rotationJson(key: string, record: KeyRecord, previous: KeyRecord) {
  return { ...keyJson(record), key, previous: keyJson(previous) }
}
