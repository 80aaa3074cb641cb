// GET /v1/lockouts: the addresses locked out now, as this instance holds them (the lift's
// counterpart: before, an operator could lift a lockout but not see which were in force, short
// of reading Redis's keys or the gateway's log).
import { Type } from '@sinclair/typebox'
import { firstInOrder } from '../../core/first.ts'
import { secondsFrom } from '../../core/limiters.ts'
import { defineOperation } from '../operation.ts'
import { lockoutAddress, LockoutSchema } from '../schemas.ts'

/** Latest lockout first; of those ending together, by address (each address is held once). */
const latestFirst = (a: readonly [string, number], b: readonly [string, number]) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)

export default defineOperation({
  id: 'listLockouts',
  method: 'GET',
  path: '/v1/lockouts',
  tag: 'lockouts',
  summary: 'List the lockouts in force',
  description:
    "The addresses locked out after `lockout.max_attempts` failed key or credential attempts, latest lockout first, as this instance holds them: with Redis, every instance's (read from Redis when the instance starts or reconnects, and told by pub/sub since); without it, this process's (and, in a `--workers` primary, its workers'). `total` counts them all; `items` holds the first `limit`. `address` looks up one address (its IPv6 network). Lift one with `DELETE /v1/lockouts/{address}`.",
  query: Type.Object(
    {
      address: Type.Optional(Type.String({ format: 'lockout-address', maxLength: 64, description: 'Only the lockout of this address (IPv4 or IPv6; an IPv6 address finds its network), or of the IPv6 network as `address_key` gives it.' })),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 1000, default: 100 })),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'The lockouts in force.', schema: Type.Object({ items: Type.Array(LockoutSchema), total: Type.Integer({ minimum: 0, description: 'How many are in force; items holds the first `limit` of them.' }) }) },
  errors: ['validation_failed'],
  storeBacked: false,
  async handle({ query, services }) {
    const only = query.address === undefined ? undefined : lockoutAddress(query.address, 'address', services.addressKey).addressKey
    const now = Date.now()
    const held = services.lockout.held().filter(([key]) => only === undefined || key === only)
    // The page, not every lockout, put in order (core/first.ts).
    const items = firstInOrder(held, query.limit ?? 100, latestFirst).map(([key, until]) => ({ address_key: key, locked_until: new Date(until).toISOString(), retry_after_s: secondsFrom(until - now) }))
    return { items, total: held.length }
  },
})
