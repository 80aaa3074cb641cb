// What the `api-key` commands need, whether they open the store themselves or, when a server
// owns the store, go through its admin API.
import type { Actor, AuditLog, AuditRecord } from '../core/audit.ts'
import type { Page } from '../core/cursor.ts'
import type { Db } from '../core/db.ts'
import type { KeyService, Validation } from '../core/keys/service.ts'
import type { KeyRecord, KeyType } from '../core/keys/types.ts'

export interface KeyOperations {
  create(body: Record<string, unknown>): Promise<{ key: string; record: KeyRecord }>
  list(query: Record<string, unknown>): Promise<Page<KeyRecord>>
  get(id: string): Promise<KeyRecord>
  update(id: string, body: Record<string, unknown>): Promise<KeyRecord>
  validate(key: string, address?: string): Promise<Validation>
  revoke(id: string, reason?: string): Promise<KeyRecord>
  rotate(id: string, force: boolean): Promise<{ key: string; record: KeyRecord; previous: KeyRecord }>
  stats(): Promise<Awaited<ReturnType<KeyService['stats']>>>
  importLegacy(rows: unknown[], type?: string): Promise<KeyRecord[]>
  /** The key's audit trail, newest first, details opened (a row that does not open has none: see `integrity`). */
  audit(id: string, page: { limit?: number; cursor?: string }): Promise<Page<AuditRecord>>
}

export function localOperations(store: { keys: KeyService; audit: AuditLog; db: Db }, actor: Actor): KeyOperations {
  const { keys } = store
  return {
    create: (body) => keys.create(body, actor),
    list: (query) => keys.list(query),
    get: (id) => keys.get(id),
    update: (id, body) => keys.update(id, body, actor),
    validate: (key, address) => keys.validate(key, address === undefined ? {} : { address }),
    revoke: (id, reason) => keys.revoke(id, reason, actor),
    rotate: (id, force) => keys.rotate(id, { force }, actor),
    stats: () => keys.stats(),
    importLegacy: (rows, type) => keys.importLegacy(rows, actor, type === undefined ? {} : { type: type as KeyType }),
    async audit(id, page) {
      const key = await keys.get(id)
      return store.audit.pageAt(store.db, { keyId: key.id }, page)
    },
  }
}
