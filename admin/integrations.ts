// The Gitea and n8n services behind the admin API's integration operations, and the errors each
// kind of call can answer (listed in the OpenAPI document of every such operation).
import { KeygateError, type ErrorCode } from '../core/errors.ts'
import type { GiteaTokenService } from '../core/integrations/gitea.ts'
import type { N8nKeyService } from '../core/integrations/n8n.ts'
import type { AdminServices } from './operation.ts'

/** What a call to the service can fail with, whatever the operation. */
export const GITEA_CALL_ERRORS: readonly ErrorCode[] = ['gitea_not_configured', 'gitea_unreachable', 'gitea_timeout', 'gitea_auth_failed', 'gitea_error']
export const N8N_CALL_ERRORS: readonly ErrorCode[] = ['n8n_not_configured', 'n8n_unreachable', 'n8n_timeout', 'n8n_auth_failed', 'n8n_error']

export function giteaOf(services: AdminServices): GiteaTokenService {
  if (!services.gitea) throw new KeygateError('gitea_not_configured', 'Gitea is not configured on this server: set GITEA_URL, GITEA_USERNAME and GITEA_PASSWORD')
  return services.gitea
}

export function n8nOf(services: AdminServices): N8nKeyService {
  if (!services.n8n) throw new KeygateError('n8n_not_configured', 'n8n is not configured on this server: set N8N_URL, N8N_EMAIL and N8N_PASSWORD')
  return services.n8n
}
