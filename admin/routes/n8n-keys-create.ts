// POST /v1/n8n/keys: an API key made in n8n (label, scopes, optional expiry); the answer holds it, once.
import { CreateN8nKeyBody, N8nKeyCreatedSchema } from '../../core/integrations/schemas.ts'
import { N8N_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'

export default defineOperation({
  id: 'createN8nKey',
  method: 'POST',
  path: '/v1/n8n/keys',
  tag: 'n8n',
  summary: 'Create an n8n API key',
  description: "keygate logs in with N8N_EMAIL/N8N_PASSWORD, checks the scopes against the instance's allowed list and keeps labels unique. It keeps a record (n8n's id, label, scopes, last eight characters, SHA-256), never the key: it is in this answer only. n8n enforces the scopes only when its licence has API key scopes: without, the key is made all the same, and `warning` says it can do whatever its user's role may.",
  body: CreateN8nKeyBody,
  bodyExample: { label: 'ci-deploy', scopes: ['workflow:list', 'workflow:read'] },
  response: { status: 201, description: 'The key was created.', schema: N8nKeyCreatedSchema },
  errors: ['validation_failed', 'n8n_scope_unknown', 'n8n_key_exists', ...N8N_CALL_ERRORS],
  async handle({ body, actor, services }) {
    return services.n8n.create(body, actor)
  },
})
