// POST /v1/n8n/keys/verify: whether n8n's public API accepts a key.
import { N8nVerificationSchema, VerifySecretBody } from '../../core/integrations/schemas.ts'
import { N8N_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'

export default defineOperation({
  id: 'verifyN8nKey',
  method: 'POST',
  path: '/v1/n8n/keys/verify',
  tag: 'n8n',
  summary: 'Verify an n8n API key',
  description: 'The key travels in the body, so it stays out of URLs and access logs. Answers 200 either way; `valid` says whether n8n accepted it.',
  body: VerifySecretBody,
  bodyExample: { secret: '<the n8n API key>' },
  response: { status: 200, description: 'The verdict, with the local record when keygate made the key.', schema: N8nVerificationSchema },
  errors: ['validation_failed', ...N8N_CALL_ERRORS],
  async handle({ body, services }) {
    return services.n8n.verify(body.secret)
  },
})
