// POST /v1/gitea/tokens/verify: whether Gitea accepts a token, and whose it is.
import { GiteaVerificationSchema, VerifySecretBody } from '../../core/integrations/schemas.ts'
import { GITEA_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'

export default defineOperation({
  id: 'verifyGiteaToken',
  method: 'POST',
  path: '/v1/gitea/tokens/verify',
  tag: 'gitea',
  summary: 'Verify a Gitea token',
  description: 'The token travels in the body, so it stays out of URLs and access logs. Answers 200 either way; `valid` says whether Gitea accepted it.',
  body: VerifySecretBody,
  bodyExample: { secret: '<the Gitea token>' },
  response: { status: 200, description: 'The verdict, with the local record when keygate made the token.', schema: GiteaVerificationSchema },
  errors: ['validation_failed', ...GITEA_CALL_ERRORS],
  async handle({ body, services }) {
    return services.gitea.verify(body.secret)
  },
})
