// The gitea and n8n commands against a running server's admin API (KEYGATE_ADMIN_URL with
// KEYGATE_ADMIN_TOKEN), as the api-key commands do: the server calls Gitea or n8n with its own
// settings and keeps the records in its store, which it owns when it is the embedded one. The
// admin API answers with the same JSON the services give here, so the commands print the same.
// No body may carry a NUL (the admin API refuses it whole): a secret holding one cannot be a
// token or key, which is the service's verdict too.
import type { GiteaTokenService } from '../core/integrations/gitea.ts'
import type { N8nKeyService } from '../core/integrations/n8n.ts'
import { adminClient, pathSegment } from './admin-client.ts'
import { shownInput } from '../core/validate.ts'
import { UsageError } from './io.ts'

export type GiteaOperations = Pick<GiteaTokenService, 'create' | 'list' | 'delete' | 'verify'>
export type N8nOperations = Pick<N8nKeyService, 'create' | 'list' | 'delete' | 'verify'>

/** The one name after /v1/gitea/tokens/ and /v1/n8n/keys/ that is an operation's path (served before `{ref}`). */
const VERIFY: ReadonlySet<string> = new Set(['verify'])

/** A token or key named in the URL's path. */
function pathRef(value: string, what: string, path: string): string {
  const why = VERIFY.has(value) ? `${path}/verify is the verify operation's path` : 'no URL path carries it'
  return pathSegment(value, () => new UsageError(`${JSON.stringify(shownInput(value))} cannot be named through the admin API (${why}): give the ${what}'s id`), VERIFY)
}

export function remoteGitea(baseUrl: string, token: string, options: { timeoutMs?: number } = {}): GiteaOperations {
  const { call } = adminClient(baseUrl, token, { ...options, checkWith: '`keygate gitea list`' })
  return {
    create: (body) => call('POST', '/v1/gitea/tokens', body),
    list: () => call('GET', '/v1/gitea/tokens', undefined, ['items']),
    delete: (ref, _actor, o = {}) => {
      const query = new URLSearchParams({ ...(o.user !== undefined ? { user: o.user } : {}), ...(o.forget === true ? { forget: 'true' } : {}) })
      return call('DELETE', `/v1/gitea/tokens/${pathRef(ref, 'token', '/v1/gitea/tokens')}${query.size > 0 ? `?${query}` : ''}`)
    },
    verify: async (secret) => (secret.includes('\u0000') ? { valid: false, reason: 'malformed', record: null } : call('POST', '/v1/gitea/tokens/verify', { secret })),
  }
}

export function remoteN8n(baseUrl: string, token: string, options: { timeoutMs?: number } = {}): N8nOperations {
  const { call } = adminClient(baseUrl, token, { ...options, checkWith: '`keygate n8n list`' })
  return {
    create: (body) => call('POST', '/v1/n8n/keys', body),
    list: () => call('GET', '/v1/n8n/keys', undefined, ['items']),
    delete: (ref) => call('DELETE', `/v1/n8n/keys/${pathRef(ref, 'key', '/v1/n8n/keys')}`),
    verify: async (secret) => (secret.includes('\u0000') ? { valid: false, reason: 'malformed', record: null } : call('POST', '/v1/n8n/keys/verify', { secret })),
  }
}
