// GET /v1/anomalies: recorded anomalies, newest first.
import { Type } from '@sinclair/typebox'
import { ANOMALY_ID_PATTERN, ANOMALY_TYPES, anomalyJson } from '../../core/anomalies.ts'
import { defineOperation } from '../operation.ts'
import { AnomalySchema, NextCursor } from '../schemas.ts'

export default defineOperation({
  id: 'listAnomalies',
  method: 'GET',
  path: '/v1/anomalies',
  tag: 'anomalies',
  summary: 'List anomalies',
  description: 'Newest first; filter by key, type or acknowledgement.',
  query: Type.Object(
    {
      key_id: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
      type: Type.Optional(Type.Union(ANOMALY_TYPES.map((t) => Type.Literal(t)))),
      acknowledged: Type.Optional(Type.Boolean({ description: 'true: only acknowledged ones; false: only open ones.' })),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 100 })),
      cursor: Type.Optional(Type.String({ pattern: ANOMALY_ID_PATTERN, description: 'next_cursor of the previous page.' })),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'One page of anomalies.', schema: Type.Object({ items: Type.Array(AnomalySchema), next_cursor: NextCursor }) },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const limit = query.limit ?? 100
    const rows = await services.anomalies.list({
      limit: limit + 1,
      ...(query.cursor !== undefined ? { before: query.cursor } : {}),
      ...(query.key_id !== undefined ? { keyId: query.key_id } : {}),
      ...(query.type !== undefined ? { type: query.type } : {}),
      ...(query.acknowledged !== undefined ? { acknowledged: query.acknowledged } : {}),
    })
    const items = rows.slice(0, limit)
    return { items: items.map(anomalyJson), next_cursor: rows.length > limit ? (items[items.length - 1]?.id ?? null) : null }
  },
})
