// GET /v1/reports/usage: requests per key over a time range (hourly resolution).
import { Type } from '@sinclair/typebox'
import { defineOperation } from '../operation.ts'
import { RangeQuery, RangeSchema, resolveRange } from '../schemas.ts'

const Usage = Type.Object({
  key_id: Type.String(),
  name: Type.Union([Type.String(), Type.Null()]),
  type: Type.Union([Type.String(), Type.Null()]),
  requests: Type.Integer({ description: 'Requests that authenticated with the key.' }),
  rejected: Type.Integer({ description: 'Of those, answered with an error (rate limit, scope, upstream).' }),
  buckets: Type.Optional(
    Type.Array(Type.Object({ start: Type.String({ format: 'date-time' }), requests: Type.Integer(), rejected: Type.Integer() }), { description: 'Hourly counts, with `key_id` only.' }),
  ),
})

export default defineOperation({
  id: 'reportUsage',
  method: 'GET',
  path: '/v1/reports/usage',
  tag: 'reports',
  summary: 'Usage per key over a time range',
  description: 'Counted by every gateway process and written every `usage.flush_interval_s`; with `key_id`, that key only, with its hourly counts.',
  query: Type.Object(
    {
      ...RangeQuery,
      key_id: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'Usage per key, most used first.', schema: Type.Object({ ...RangeSchema, items: Type.Array(Usage) }) },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const range = resolveRange(query, services.now())
    await services.flushUsage()
    const rows = await services.usage.byKey(range, { limit: query.limit ?? 100, ...(query.key_id ? { keyId: query.key_id } : {}) })
    const items = []
    for (const r of rows) {
      const item = { key_id: r.keyId, name: r.name, type: r.type, requests: r.requests, rejected: r.rejected }
      if (query.key_id === undefined) items.push(item)
      else {
        const buckets = await services.usage.buckets(r.keyId, range)
        items.push({ ...item, buckets: buckets.map((b) => ({ start: b.start.toISOString(), requests: b.requests, rejected: b.rejected })) })
      }
    }
    return { from: range.from.toISOString(), to: range.to.toISOString(), items }
  },
})
