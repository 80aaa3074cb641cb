// GET /v1/stats: counts of keys by type and status.
import { Type, type ObjectOptions } from '@sinclair/typebox'
import { KEY_STATUSES, KEY_TYPES } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'

const counts = (names: readonly string[], options: ObjectOptions = {}) => Type.Object(Object.fromEntries(names.map((n) => [n, Type.Integer()])), options)

export default defineOperation({
  id: 'getStats',
  method: 'GET',
  path: '/v1/stats',
  tag: 'reports',
  summary: 'Key counts by type and status',
  query: Type.Object(
    { expiring_within_days: Type.Optional(Type.Integer({ minimum: 1, maximum: 365, default: 7, description: 'Window of `expiring_soon`.' })) },
    { additionalProperties: false },
  ),
  response: {
    status: 200,
    description: 'The counts.',
    schema: Type.Object({
      total: Type.Integer(),
      by_type: counts(KEY_TYPES),
      by_status: counts(KEY_STATUSES, { description: "By the status each key has now, as a key's `status` reads." }),
      legacy: Type.Integer({ description: 'Keys imported from the replaced system, whatever their status now (GET /v1/keys?legacy=true&status=active lists those still accepted).' }),
      expiring_soon: Type.Integer({ description: 'Active keys whose expiry or announced rotation deadline falls within `expiring_within_days`.' }),
      expiring_within_days: Type.Integer(),
    }),
  },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const days = query.expiring_within_days ?? 7
    const s = await services.keys.stats(days)
    return { total: s.total, by_type: s.byType, by_status: s.byStatus, legacy: s.legacy, expiring_soon: s.expiringSoon, expiring_within_days: days }
  },
})
