// GET /v1/n8n/keys: n8n's API keys and keygate's records side by side, drift marked.
import { N8nKeyListSchema } from '../../core/integrations/schemas.ts'
import { N8N_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'

export default defineOperation({
  id: 'listN8nKeys',
  method: 'GET',
  path: '/v1/n8n/keys',
  tag: 'n8n',
  summary: 'List n8n API keys',
  description: "The instance's keys of the N8N_EMAIL user beside the local records; `state` marks a key deleted in n8n by hand or one keygate has no record of.",
  response: { status: 200, description: 'Remote and local, side by side.', schema: N8nKeyListSchema },
  errors: [...N8N_CALL_ERRORS],
  async handle({ services }) {
    return services.n8n.list()
  },
})
