// POST /v1/gitea/tokens: a personal access token made in Gitea for a user; the answer holds it, once.
import { CreateGiteaTokenBody, GiteaTokenCreatedSchema } from '../../core/integrations/schemas.ts'
import { GITEA_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'

export default defineOperation({
  id: 'createGiteaToken',
  method: 'POST',
  path: '/v1/gitea/tokens',
  tag: 'gitea',
  summary: 'Create a Gitea token',
  description: 'Scopes are checked against Gitea\'s scope names before the call. keygate keeps a record (Gitea\'s id, name, user, scopes, last eight characters, SHA-256), never the token: it is in this answer only.',
  body: CreateGiteaTokenBody,
  bodyExample: { name: 'ci-deploy', scopes: ['read:repository'] },
  response: { status: 201, description: 'The token was created.', schema: GiteaTokenCreatedSchema },
  errors: ['validation_failed', 'gitea_scope_unknown', 'gitea_token_exists', 'gitea_user_not_found', ...GITEA_CALL_ERRORS],
  async handle({ body, actor, services }) {
    return services.gitea.create(body, actor)
  },
})
