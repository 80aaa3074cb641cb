// POST /v1/deny-list: refuse an address or range at the gateway, from the next request on.
import { AddDenyBody } from '../../core/deny-list.ts'
import { defineOperation } from '../operation.ts'
import { DenyEntrySchema, denyJson } from '../schemas.ts'

export default defineOperation({
  id: 'addDenyEntry',
  method: 'POST',
  path: '/v1/deny-list',
  tag: 'deny list',
  summary: 'Add a deny list entry',
  description: 'The address or range is stored normalised (IPv4-mapped IPv6 as IPv4, a range as its network). An entry for a range already listed is a conflict.',
  body: AddDenyBody,
  bodyExample: { cidr: '192.0.2.0/24', reason: 'scanner' },
  response: { status: 201, description: 'The entry was added.', schema: DenyEntrySchema },
  errors: ['validation_failed', 'conflict'],
  async handle({ body, actor, services }) {
    const entry = await services.denyList.add({ cidr: body.cidr, reason: body.reason ?? null, expiresAt: body.expires_at ?? null }, actor)
    return denyJson(entry)
  },
})
