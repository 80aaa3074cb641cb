// GET /v1/deny-list: stored deny list entries (those of the config file are not listed).
import { Type } from '@sinclair/typebox'
import { defineOperation } from '../operation.ts'
import { DenyEntrySchema, denyJson } from '../schemas.ts'

export default defineOperation({
  id: 'listDenyList',
  method: 'GET',
  path: '/v1/deny-list',
  tag: 'deny list',
  summary: 'List deny list entries',
  description: 'Entries added through the API, oldest first; `deny_list` of the config file applies too but is not listed.',
  query: Type.Object({ include_expired: Type.Optional(Type.Boolean({ default: false, description: 'Also list entries whose expiry has passed.' })) }, { additionalProperties: false }),
  response: { status: 200, description: 'The entries.', schema: Type.Object({ items: Type.Array(DenyEntrySchema) }) },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const entries = await services.denyList.list({ includeExpired: query.include_expired === true })
    return { items: entries.map(denyJson) }
  },
})
