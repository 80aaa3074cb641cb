// POST /v1/deny-list: refuse an address or range at the gateway, from the next request on.
import { AddDenyBody, denyEntryWarnings } from '../../core/deny-list.ts'
import { defineOperation, OtherStatus } from '../operation.ts'
import { AddedDenyEntrySchema, denyJson } from '../schemas.ts'

export default defineOperation({
  id: 'addDenyEntry',
  method: 'POST',
  path: '/v1/deny-list',
  tag: 'deny list',
  summary: 'Add a deny list entry, or update the one for that range',
  description:
    'The address or range is stored normalised (IPv4-mapped IPv6 as IPv4, IPv6 compressed in lower case, one address without /32 or /128); a range with host bits set (10.1.2.3/8) is refused, naming the network it would cover. A range already listed is updated, not added again: its `expires_at` becomes the one given (omitted or null: never), its `reason` the one given (omitted: kept), its id and `created_at` stay; answered 200 instead of 201, audited as deny_list.updated. One restated as it is (the same `expires_at` and `reason`) is left so: answered 200 with the entry, nothing audited or changed. A range that denies every client (`::/0`) or every IPv4 client (`0.0.0.0/0`, `::/64`: an IPv6 range holding `::ffff:0:0/96`) is taken, as closing the gate may be meant, and `warnings` says so (empty otherwise); the admin listener does not check the deny list.',
  body: AddDenyBody,
  bodyExample: { cidr: '192.0.2.0/24', reason: 'scanner' },
  response: { status: 201, description: 'The entry was added.', schema: AddedDenyEntrySchema },
  otherStatus: { status: 200, description: 'The range was listed already: its entry, updated (or as it was, when restated as it is).' },
  errors: ['validation_failed', 'conflict'],
  async handle({ body, actor, services }) {
    const { entry, updated } = await services.denyList.save({ cidr: body.cidr, ...(body.reason !== undefined ? { reason: body.reason } : {}), expiresAt: body.expires_at ?? null }, actor)
    const answer = { ...denyJson(entry), warnings: denyEntryWarnings(entry.cidr) }
    return updated ? new OtherStatus(answer) : answer
  },
})
