// GET /v1/audit: the whole audit log, newest first, by key, action or actor: the changes of
// keys, and also those about no key (deny list entries, webhooks) and of the Gitea and n8n
// records, which no key's trail shows.
import { Type } from '@sinclair/typebox'
import { defineOperation } from '../operation.ts'
import { AUDIT_ACTIONS, auditPage, AuditPageSchema, Cursor } from '../schemas.ts'

export default defineOperation({
  id: 'listAudit',
  method: 'GET',
  path: '/v1/audit',
  tag: 'audit',
  summary: 'The audit log',
  description:
    'Every admin action (keys, deny list, webhooks, anomalies, Gitea tokens, n8n keys): who (actor), from where (address), what (details), newest first; filters combine. A row that does not open is listed without details (see `integrity`).',
  query: Type.Object(
    {
      key_id: Type.Optional(Type.String({ minLength: 1, maxLength: 128, description: 'Only rows about this key, Gitea token or n8n key record.' })),
      action: Type.Optional(Type.String({ pattern: '^[a-z0-9_]+(\\.[a-z0-9_]+)+$', maxLength: 64, description: `Only this action: ${AUDIT_ACTIONS}.` })),
      actor: Type.Optional(Type.String({ minLength: 1, maxLength: 200, description: 'Only this actor (`key:<id>`, `token`, `cli:<user>` (`cli:<uid>` for a uid no user is named by), `system`).' })),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 100 })),
      cursor: Type.Optional(Cursor),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'One page of audit records.', schema: AuditPageSchema },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    return auditPage(services, { keyId: query.key_id, action: query.action, actor: query.actor }, query)
  },
})
