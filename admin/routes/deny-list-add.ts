// POST /v1/deny-list: refuse an address or range at the gateway, from the next request on.
import { Type } from '@sinclair/typebox'
import { PRINTABLE } from '../../core/validate.ts'
import { defineOperation } from '../operation.ts'
import { DenyEntrySchema, denyJson } from '../schemas.ts'

export default defineOperation({
  id: 'addDenyEntry',
  method: 'POST',
  path: '/v1/deny-list',
  tag: 'deny list',
  summary: 'Add a deny list entry',
  description: 'The address or range is stored normalised (IPv4-mapped IPv6 as IPv4, a range as its network). An entry for a range already listed is a conflict.',
  body: Type.Object(
    {
      cidr: Type.String({ format: 'cidr', description: 'IPv4 or IPv6 address or CIDR range.' }),
      reason: Type.Optional(Type.Union([Type.String({ minLength: 1, maxLength: 500, pattern: PRINTABLE }), Type.Null()])),
      expires_at: Type.Optional(Type.Union([Type.String({ format: 'date-time' }), Type.Null()], { description: 'It stops applying then; omit or null for never.' })),
    },
    { additionalProperties: false },
  ),
  response: { status: 201, description: 'The entry was added.', schema: DenyEntrySchema },
  errors: ['validation_failed', 'conflict'],
  async handle({ body, actor, services }) {
    const entry = await services.denyList.add({ cidr: body.cidr, reason: body.reason ?? null, expiresAt: body.expires_at ?? null }, actor)
    return denyJson(entry)
  },
})
