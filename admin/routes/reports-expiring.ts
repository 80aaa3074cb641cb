// GET /v1/reports/expiring: keys that stop working soon (expiry, the end of a rotation's grace period,
// or an announced rotation deadline), each with what ends it.
import { Type } from '@sinclair/typebox'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { Cursor, KeySchema, NextCursor } from '../schemas.ts'

export default defineOperation({
  id: 'reportExpiring',
  method: 'GET',
  path: '/v1/reports/expiring',
  tag: 'reports',
  summary: 'Keys expiring soon',
  description:
    'Keys that stop working within the window, soonest first: active keys whose expiry or announced rotation deadline (the scheduler expires a key not rotated by then), and rotating keys whose grace period (or expiry, or the announced rotation deadline of the active key that replaced them, whichever comes first), falls in it. `end_reason` says which: `expires_at`, `grace_ended` or `rotation_overdue`, as the `key.expired` audit row will. Follow `next_cursor` for the next page.',
  query: Type.Object(
    {
      within_days: Type.Optional(Type.Integer({ minimum: 1, maximum: 365, default: 7 })),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
      cursor: Type.Optional(Cursor),
    },
    { additionalProperties: false },
  ),
  response: {
    status: 200,
    description: 'One page of the keys, soonest first (then by id).',
    schema: Type.Object({
      within_days: Type.Integer(),
      items: Type.Array(
        Type.Composite([
          KeySchema,
          Type.Object({
            ends_at: Type.String({ format: 'date-time', description: 'When the key stops working: the earliest of its expiry, its grace end and its announced rotation deadline (for a rotating key, that of the active key that replaced it).' }),
            end_reason: Type.Union([Type.Literal('expires_at'), Type.Literal('grace_ended'), Type.Literal('rotation_overdue')], {
              description: 'What ends it at ends_at: its expiry, the end of its grace period, or a rotation deadline announced and not met.',
            }),
          }),
        ]),
      ),
      next_cursor: NextCursor,
    }),
  },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const days = query.within_days ?? 7
    const page = await services.keys.expiring(days * 86_400_000, { limit: query.limit ?? 100, ...(query.cursor !== undefined ? { cursor: query.cursor } : {}) })
    return { within_days: days, items: page.items.map((r) => ({ ...keyJson(r.key), ends_at: r.endsAt.toISOString(), end_reason: r.reason })), next_cursor: page.nextCursor }
  },
})
