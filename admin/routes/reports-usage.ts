// GET /v1/reports/usage: requests per key over a time range (hourly resolution), by key id, one
// page at a time.
import { Type } from '@sinclair/typebox'
import { decodeCursor, pageOf } from '../../core/cursor.ts'
import { fieldInvalid } from '../../core/errors.ts'
import { defineOperation } from '../operation.ts'
import { Cursor, NextCursor, RangeQuery, RangeSchema, resolveRange } from '../schemas.ts'

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
  description:
    'Counted by every gateway process and written every `usage.flush_interval_s`; with `key_id`, that key only, with its hourly counts. By key id, so that a key whose count grows during a walk is listed once; follow `next_cursor` for the next page, which keeps the range of the first (its `to`, when none was given). `/v1/reports/top-keys` gives the most used.',
  query: Type.Object(
    {
      ...RangeQuery,
      key_id: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
      cursor: Type.Optional(Cursor),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'One page of the usage per key, by key id.', schema: Type.Object({ ...RangeSchema, items: Type.Array(Usage), next_cursor: NextCursor }) },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    // The cursor holds the end of the range and the last key id: a walk without `to` reads one
    // range, not one that moves on with every page (a key used only at its start dropped out).
    const after = query.cursor !== undefined ? decodeCursor('usage', query.cursor) : undefined
    const range = resolveRange(query, after?.at ?? services.now())
    if (after !== undefined && range.to.getTime() !== after.at.getTime()) throw fieldInvalid('cursor', `walks the range ending at ${after.at.toISOString()}; give that \`to\`, or none`)
    await services.flushUsage()
    const limit = query.limit ?? 100
    const rows = await services.usage.byKey(range, {
      order: 'key_id',
      limit: limit + 1,
      ...(query.key_id ? { keyId: query.key_id } : {}),
      ...(after !== undefined ? { after: after.id } : {}),
    })
    const page = pageOf('usage', rows, limit, (r) => ({ at: range.to, id: r.keyId }))
    const items = []
    for (const r of page.items) {
      const item = { key_id: r.keyId, name: r.name, type: r.type, requests: r.requests, rejected: r.rejected }
      if (query.key_id === undefined) items.push(item)
      else {
        const buckets = await services.usage.buckets(r.keyId, range)
        items.push({ ...item, buckets: buckets.map((b) => ({ start: b.start.toISOString(), requests: b.requests, rejected: b.rejected })) })
      }
    }
    return { from: range.from.toISOString(), to: range.to.toISOString(), items, next_cursor: page.nextCursor }
  },
})
