// The key entity as the domain sees it (camelCase), and its public JSON form (snake_case,
// never the hash).
import { validUntilOf } from './evaluate.ts'

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
  }
}
export type KeyJson = ReturnType<typeof keyJson>

/**
 * When the key a rotation replaced stops being accepted: at once when the rotation revoked it
 * (forced, or a grace period of 0; its revoked_at is the rotation's time), else the earlier of its
 * expiry and the end of its grace, by the gateway's own rule. `grace_until` alone overstated it
 * for a key expiring within its grace (found by a review).
 */
export function replacedKeyValidUntil(previous: KeyRecord): Date {
  return previous.status === 'rotating' ? new Date(validUntilOf(previous)) : (previous.revokedAt ?? previous.updatedAt)
}

/** The key a rotation replaced, with `valid_until`: in the rotation's answer and its `key.rotated` event alike. */
export function replacedKeyJson(previous: KeyRecord) {
  return { ...keyJson(previous), valid_until: replacedKeyValidUntil(previous).toISOString() }
}

/** The answer to a rotation, from the admin API and `api-key rotate --json` alike. */
export function rotationJson(key: string, record: KeyRecord, previous: KeyRecord) {
  return { ...keyJson(record), key, previous: replacedKeyJson(previous) }
}
