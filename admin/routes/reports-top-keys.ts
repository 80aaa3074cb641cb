// GET /v1/reports/top-keys: the most used keys over a time range.
import { Type } from '@sinclair/typebox'
import { defineOperation } from '../operation.ts'
import { RangeQuery, RangeSchema, resolveRange } from '../schemas.ts'

export default defineOperation({
  id: 'reportTopKeys',
  method: 'GET',
  path: '/v1/reports/top-keys',
  tag: 'reports',
  summary: 'Most used keys',
  query: Type.Object({ ...RangeQuery, limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 100, default: 10 })) }, { additionalProperties: false }),
  response: {
    status: 200,
    description: 'The keys with the most requests, most first.',
    schema: Type.Object({
      ...RangeSchema,
      items: Type.Array(Type.Object({ rank: Type.Integer(), key_id: Type.String(), name: Type.Union([Type.String(), Type.Null()]), requests: Type.Integer(), share: Type.Number({ description: 'Fraction of all authenticated requests in the range.' }) })),
    }),
  },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const range = resolveRange(query, services.now())
    await services.flushUsage()
    const all = await services.usage.byKey(range, { limit: 1_000_000 })
    const total = all.reduce((n, r) => n + r.requests, 0)
    const items = all.slice(0, query.limit ?? 10).map((r, i) => ({ rank: i + 1, key_id: r.keyId, name: r.name, requests: r.requests, share: total > 0 ? r.requests / total : 0 }))
    return { from: range.from.toISOString(), to: range.to.toISOString(), items }
  },
})
