// GET /v1/keys/{id}/audit: the key's audit trail, newest first, details decrypted.
import { Type } from '@sinclair/typebox'
import { decodeCursor, encodeCursor } from '../../core/cursor.ts'
import { defineOperation } from '../operation.ts'
import { AuditSchema, auditJson, Cursor, NextCursor } from '../schemas.ts'

export default defineOperation({
  id: 'getKeyAudit',
  method: 'GET',
  path: '/v1/keys/{id}/audit',
  tag: 'keys',
  summary: "A key's audit trail",
  description: 'Every change of the key: who (actor), from where (address), what (details), newest first.',
  query: Type.Object(
    {
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 100 })),
      cursor: Type.Optional(Cursor),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'One page of audit records.', schema: Type.Object({ items: Type.Array(AuditSchema), next_cursor: NextCursor }) },
  errors: ['validation_failed', 'key_not_found', 'audit_decrypt_failed'],
  async handle({ params, query, services }) {
    const key = await services.keys.get(params.id as string)
    const limit = query.limit ?? 100
    const rows = await services.audit.list(services.db, { keyId: key.id, limit: limit + 1, ...(query.cursor ? { before: decodeCursor(query.cursor) } : {}) })
    const items = rows.slice(0, limit)
    const last = items[items.length - 1]
    return { items: items.map(auditJson), next_cursor: rows.length > limit && last ? encodeCursor(last.createdAt, last.id) : null }
  },
})
