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
