// DELETE /v1/gitea/tokens/{ref}: deletes a token in Gitea (by Gitea's id or by name) and closes its record.
import { DeleteGiteaTokenQuery, GiteaTokenDeletedSchema } from '../../core/integrations/schemas.ts'
import { GITEA_CALL_ERRORS } from '../integrations.ts'
import { defineOperation } from '../operation.ts'
import { GiteaTokenRefParam } from '../schemas.ts'

export default defineOperation({
  id: 'deleteGiteaToken',
  method: 'DELETE',
  path: '/v1/gitea/tokens/{ref}',
  ids: { ref: GiteaTokenRefParam },
  tag: 'gitea',
  summary: 'Delete a Gitea token',
  description: '`ref` is Gitea\'s token id or the token\'s name. A token already gone from Gitea only has its record closed (`remote_missing`). An id that is both a token keygate has no record of and a record of an earlier token Gitea gave that id is a conflict: delete by name. With `forget=true`, only keygate\'s live record is closed (`forgotten`), and Gitea is not called: for a user whose tokens Gitea will not list (`unreadable` in the list).',
  query: DeleteGiteaTokenQuery,
  response: { status: 200, description: 'The token was deleted.', schema: GiteaTokenDeletedSchema },
  errors: ['validation_failed', 'gitea_token_not_found', 'gitea_user_not_found', 'conflict', ...GITEA_CALL_ERRORS],
  async handle({ params, query, actor, services }) {
    return services.gitea.delete(params.ref as string, actor, { ...(query.user === undefined ? {} : { user: query.user }), ...(query.forget === true ? { forget: true } : {}) })
  },
})
