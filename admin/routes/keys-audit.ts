// GET /v1/keys/{id}/audit: the key's audit trail, newest first, details decrypted.
import { Type } from '@sinclair/typebox'
import { defineOperation } from '../operation.ts'
import { auditPage, AuditPageSchema, Cursor, KeyIdParam } from '../schemas.ts'

export default defineOperation({
  id: 'getKeyAudit',
  method: 'GET',
  path: '/v1/keys/{id}/audit',
  ids: { id: KeyIdParam },
  tag: 'keys',
  summary: "A key's audit trail",
  description: 'Every change of the key: who (actor), from where (address), what (details), newest first. A row that does not open is listed without details (see `integrity`).',
  query: Type.Object(
    {
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 100 })),
      cursor: Type.Optional(Cursor),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'One page of audit records.', schema: AuditPageSchema },
  errors: ['validation_failed', 'key_not_found'],
  async handle({ params, query, services }) {
    const key = await services.keys.get(params.id as string)
    return auditPage(services, { keyId: key.id }, query)
  },
})
