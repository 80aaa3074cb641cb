// DELETE /v1/deny-list/{id}: the address or range is accepted again from the next request on.
import { defineOperation } from '../operation.ts'
import { DenyEntryIdParam, DenyEntrySchema, denyJson } from '../schemas.ts'

export default defineOperation({
  id: 'removeDenyEntry',
  method: 'DELETE',
  path: '/v1/deny-list/{id}',
  ids: { id: DenyEntryIdParam },
  tag: 'deny list',
  summary: 'Remove a deny list entry',
  response: { status: 200, description: 'The entry removed.', schema: DenyEntrySchema },
  errors: ['deny_entry_not_found'],
  async handle({ params, actor, services }) {
    return denyJson(await services.denyList.remove(params.id as string, actor))
  },
})
