// GET /v1/gitea/tokens: Gitea's tokens and keygate's records side by side, drift marked.
import { GiteaTokenListSchema } from '../../core/integrations/schemas.ts'
import { GITEA_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'

export default defineOperation({
  id: 'listGiteaTokens',
  method: 'GET',
  path: '/v1/gitea/tokens',
  tag: 'gitea',
  summary: 'List Gitea tokens',
  description: 'Every page of Gitea\'s list for each user keygate has records of (and GITEA_USERNAME), beside the local records; `state` marks a token deleted in Gitea by hand or one keygate has no record of.',
  response: { status: 200, description: 'Remote and local, side by side.', schema: GiteaTokenListSchema },
  errors: ['gitea_user_not_found', ...GITEA_CALL_ERRORS],
  async handle({ services }) {
    return services.gitea.list()
  },
})
