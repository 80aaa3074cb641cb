// The api-key commands against a running server's admin API (KEYGATE_ADMIN_URL with
// KEYGATE_ADMIN_TOKEN): the same operations as on a store opened here, so the embedded store,
// which one process owns, can be managed while the server runs.
import { keyNotFound, type ErrorCode } from '../core/errors.ts'
import { checkImportSize, emptyImport } from '../core/keys/service.ts'
import type { AuditRecord } from '../core/audit.ts'
import type { KeyJson, KeyRecord } from '../core/keys/types.ts'
import { adminClient, pathSegment } from './admin-client.ts'
import type { KeyOperations } from './key-operations.ts'

/** The segments after /v1/keys/ that name an operation (a literal path, served before /v1/keys/{id}), and no key's id. */
const KEY_OPERATION_SEGMENTS: ReadonlySet<string> = new Set(['validate', 'import'])

const date = (s: string | null) => (s === null ? null : new Date(s))

/** A key as the API answers it; the hash is never sent, so it is empty here. */
export function keyFromJson(j: KeyJson): KeyRecord {
  return {
    id: j.id,
    keyHash: '',
    name: j.name,
    type: j.type,
    status: j.status,
    scopes: j.scopes,
    owner: j.owner,
    metadata: j.metadata,
    allowedCidrs: j.allowed_cidrs,
    rateLimit: j.rate_limit ? { limit: j.rate_limit.limit, windowS: j.rate_limit.window_s } : null,
    rotationIntervalS: j.rotation_interval_s,
    rotatedFrom: j.rotated_from,
    replacedBy: j.replaced_by,
    graceUntil: date(j.grace_until),
    legacy: j.legacy,
    createdAt: new Date(j.created_at),
    updatedAt: new Date(j.updated_at),
    expiresAt: date(j.expires_at),
    lastUsedAt: date(j.last_used_at),
    revokedAt: date(j.revoked_at),
    revokedReason: j.revoked_reason,
    // As the server judged it: the record alone cannot tell a key past its expiry from one the
    // scheduler ended earlier (absent from a server older than valid_until: worked out here).
    ...(j.valid_until === undefined ? {} : { validUntil: date(j.valid_until) }),
  }
}

export function remoteOperations(baseUrl: string, token: string, options: { timeoutMs?: number } = {}): KeyOperations {
  const { call, notAdmin } = adminClient(baseUrl, token, { ...options, checkWith: '`keygate api-key get` (or list)' })
  // A page after a cursor never ends at that cursor: one that does is page 1 again, from a server
  // (a proxy that drops the query string) that ignores it. Before (found by a review), `--all`
  // followed it for ever, holding every page until memory ran out; without it, the first page was
  // printed as the page after --cursor.
  const following = (sent: string | undefined, next: string | null): string | null => {
    if (sent === undefined || next !== sent) return next
    throw notAdmin(`answered the page after cursor ${sent} with that cursor again as its next_cursor: it ignores the query string (a proxy in front of the admin listener that drops it?)`)
  }
  // '', '.' and '..' are no key's id, and no URL carries them as a path segment (the URL parser
  // resolves dot segments, even escaped): answered as the store answers them, not as another route.
  // Nor are `validate` and `import`, whose /v1/keys/... paths are those operations' (the admin
  // API answers a GET of them 405, not a key's look-up).
  const id = (value: string) => pathSegment(value, () => keyNotFound(value), KEY_OPERATION_SEGMENTS)
  return {
    async create(body) {
      const r = await call<KeyJson & { key: string }>('POST', '/v1/keys', body)
      return { key: r.key, record: keyFromJson(r) }
    },
    async list(query) {
      const q = new URLSearchParams(Object.entries(query).map(([k, v]): [string, string] => [k, String(v)]))
      const r = await call<{ items: KeyJson[]; next_cursor: string | null }>('GET', `/v1/keys${q.size ? `?${q}` : ''}`, undefined, ['items'])
      return { items: r.items.map(keyFromJson), nextCursor: following(typeof query.cursor === 'string' ? query.cursor : undefined, r.next_cursor) }
    },
    get: async (keyId) => keyFromJson(await call<KeyJson>('GET', `/v1/keys/${id(keyId)}`)),
    update: async (keyId, body) => keyFromJson(await call<KeyJson>('PATCH', `/v1/keys/${id(keyId)}`, body)),
    async validate(key, address) {
      // No body may carry a NUL (the admin API refuses it whole): a string holding one cannot be
      // a key, which is the store's verdict too.
      if (key.includes('\u0000')) return { valid: false, code: 'key_invalid', reason: 'malformed' }
      const r = await call<{ valid: boolean; key?: KeyJson; code?: ErrorCode; reason?: string; key_id?: string | null }>('POST', '/v1/keys/validate', {
        key,
        ...(address !== undefined ? { address } : {}),
      })
      if (r.valid && r.key) return { valid: true, key: keyFromJson(r.key) }
      return { valid: false, code: r.code ?? 'key_invalid', reason: r.reason ?? 'unknown', ...(r.key_id ? { keyId: r.key_id } : {}) }
    },
    revoke: async (keyId, reason) => keyFromJson(await call<KeyJson>('POST', `/v1/keys/${id(keyId)}/revoke`, reason === undefined ? {} : { reason })),
    async rotate(keyId, force) {
      const r = await call<KeyJson & { key: string; previous: KeyJson }>('POST', `/v1/keys/${id(keyId)}/rotate`, { force })
      return { key: r.key, record: keyFromJson(r), previous: keyFromJson(r.previous) }
    },
    async stats() {
      const s = await call<{ total: number; by_type: Record<string, number>; by_status: Record<string, number>; legacy: number; expiring_soon: number }>('GET', '/v1/stats')
      return { total: s.total, byType: s.by_type, byStatus: s.by_status, legacy: s.legacy, expiringSoon: s.expiring_soon } as Awaited<ReturnType<KeyOperations['stats']>>
    },
    async audit(keyId, page) {
      const q = new URLSearchParams()
      if (page.limit !== undefined) q.set('limit', String(page.limit))
      if (page.cursor !== undefined) q.set('cursor', page.cursor)
      type Row = { id: string; key_id: string | null; action: string; actor: string; address: string | null; details: Record<string, unknown> | null; integrity: AuditRecord['integrity']; sealed_with?: string | null; created_at: string }
      const r = await call<{ items: Row[]; next_cursor: string | null }>('GET', `/v1/keys/${id(keyId)}/audit${q.size ? `?${q}` : ''}`, undefined, ['items'])
      return {
        items: r.items.map((a) => ({ id: a.id, keyId: a.key_id, action: a.action, actor: a.actor, address: a.address, details: a.details, integrity: a.integrity, ...(a.sealed_with ? { sealedWith: a.sealed_with } : {}), createdAt: new Date(a.created_at) })),
        nextCursor: following(page.cursor, r.next_cursor),
      }
    },
    async importLegacy(rows, type) {
      // The store's own answers, where the admin API's schema would say validation_failed.
      checkImportSize(rows.length)
      if (rows.length === 0) throw emptyImport()
      const r = await call<{ items: KeyJson[] }>('POST', '/v1/keys/import', { rows, ...(type !== undefined ? { type } : {}) }, ['items'])
      return r.items.map(keyFromJson)
    },
  }
}
