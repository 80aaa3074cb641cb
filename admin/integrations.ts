// The errors each kind of call to Gitea or n8n can answer (listed in the OpenAPI document of
// every integration operation). A server without the settings answers `<service>_not_configured`
// from the service itself.
import type { ErrorCode } from '../core/errors.ts'

/** What a call to the service can fail with, whatever the operation. */
export const GITEA_CALL_ERRORS: readonly ErrorCode[] = ['gitea_not_configured', 'gitea_unreachable', 'gitea_timeout', 'gitea_auth_failed', 'gitea_error']
export const N8N_CALL_ERRORS: readonly ErrorCode[] = ['n8n_not_configured', 'n8n_unreachable', 'n8n_timeout', 'n8n_auth_failed', 'n8n_error']
