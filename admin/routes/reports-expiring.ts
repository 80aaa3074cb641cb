// GET /v1/reports/expiring: keys that stop working soon (expiry, or the end of a rotation's grace period).
import { Type } from '@sinclair/typebox'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeySchema } from '../schemas.ts'

export default defineOperation({
  id: 'reportExpiring',
  method: 'GET',
  path: '/v1/reports/expiring',
  tag: 'reports',
  summary: 'Keys expiring soon',
  description: 'Active keys whose expiry, and rotating keys whose grace period, ends within the window; soonest first.',
  query: Type.Object(
    {
      within_days: Type.Optional(Type.Integer({ minimum: 1, maximum: 365, default: 7 })),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
    },
    { additionalProperties: false },
  ),
  response: {
    status: 200,
    description: 'The keys, soonest first.',
    schema: Type.Object({ within_days: Type.Integer(), items: Type.Array(Type.Composite([KeySchema, Type.Object({ ends_at: Type.String({ format: 'date-time' }) })])) }),
  },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const days = query.within_days ?? 7
    const rows = await services.keys.expiring(days * 86_400_000, query.limit ?? 100)
    return { within_days: days, items: rows.map((r) => ({ ...keyJson(r.key), ends_at: r.endsAt.toISOString() })) }
  },
})
