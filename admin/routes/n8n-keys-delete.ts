// DELETE /v1/n8n/keys/{ref}: deletes an API key in n8n (by n8n's id or label) and closes its record.
import { N8nKeyDeletedSchema } from '../../core/integrations/schemas.ts'
import { N8N_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'
import { N8nKeyRefParam } from '../schemas.ts'

export default defineOperation({
  id: 'deleteN8nKey',
  method: 'DELETE',
  path: '/v1/n8n/keys/{ref}',
  ids: { ref: N8nKeyRefParam },
  tag: 'n8n',
  summary: 'Delete an n8n API key',
  description: "`ref` is n8n's key id or its label. A key already gone from n8n only has its record closed (`remote_missing`).",
  response: { status: 200, description: 'The key was deleted.', schema: N8nKeyDeletedSchema },
  errors: ['n8n_key_not_found', 'conflict', ...N8N_CALL_ERRORS],
  async handle({ params, actor, services }) {
    return services.n8n.delete(params.ref as string, actor)
  },
})
