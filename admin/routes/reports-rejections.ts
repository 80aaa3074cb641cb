// GET /v1/reports/rejections: gateway requests refused, by the error code answered.
import { Type } from '@sinclair/typebox'
import { defineOperation } from '../operation.ts'
import { RangeQuery, RangeSchema, resolveRange } from '../schemas.ts'

export default defineOperation({
  id: 'reportRejections',
  method: 'GET',
  path: '/v1/reports/rejections',
  tag: 'reports',
  summary: 'Rejections by reason',
  description: 'Every gateway request not forwarded, counted by the error code it was answered with (`key_invalid`, `rate_limited`, `ip_blocked`, ...).',
  query: Type.Object(RangeQuery, { additionalProperties: false }),
  response: {
    status: 200,
    description: 'Counts by reason, most frequent first.',
    schema: Type.Object({ ...RangeSchema, total: Type.Integer(), items: Type.Array(Type.Object({ reason: Type.String(), count: Type.Integer() })) }),
  },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const range = resolveRange(query, services.now())
    await services.flushUsage()
    const items = await services.usage.rejections(range)
    return { from: range.from.toISOString(), to: range.to.toISOString(), total: items.reduce((n, r) => n + r.count, 0), items }
  },
})
