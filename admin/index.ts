// The admin API as routes for createAdminServer: the operations (credential required), the
// OpenAPI document and the interactive docs (public: they hold no data).
import { AnomalyFeed, AnomalyLog } from '../core/anomalies.ts'
import { VERSION } from '../core/package.ts'
import type { AuditLog } from '../core/audit.ts'
import type { Db } from '../core/db.ts'
import type { DenyListService } from '../core/deny-list.ts'
import type { GiteaTokenService } from '../core/integrations/gitea.ts'
import type { N8nKeyService } from '../core/integrations/n8n.ts'
import type { KeyService } from '../core/keys/service.ts'
import { addressKeyer, type Lockout } from '../core/lockout.ts'
import type { Logger } from '../core/log.ts'
import { EventBus } from '../core/events.ts'
import { UsageReports } from '../core/usage.ts'
import type { WebhookService } from '../core/webhooks.ts'
import { adminApiRoutes } from './api.ts'
import { StreamSlots } from './operation.ts'
import { createAuthenticator } from './auth.ts'
import { docsRoutes } from './docs.ts'
import { openApiDocument } from './openapi.ts'
import { OPERATIONS } from './routes/index.ts'
import type { AdminRoute } from './server.ts'

export interface AdminApiDeps {
  db: Db
  keys: KeyService
  audit: AuditLog
  denyList: DenyListService
  lockout: Lockout
  log: Logger
  /** The bootstrap token (KEYGATE_ADMIN_TOKEN). */
  token?: string | undefined
  maxBodyBytes: number
  /** Anomaly streams one credential may hold open at once (admin.max_streams_per_credential). */
  maxStreamsPerCredential: number
  /** Milliseconds between an anomaly stream's heartbeats (admin.stream_heartbeat_s). */
  streamHeartbeatMs: number
  ipv6PrefixBits: number
  /** Writes this process's pending usage counts before a report (the recorder's flush). */
  flushUsage?: () => Promise<void>
  now?: () => Date
  /** The Gitea and n8n services of the integration operations. */
  gitea: GiteaTokenService
  n8n: N8nKeyService
  /** Anomalies recorded by any instance (the SSE stream); closing it ends the open streams. */
  anomalyFeed?: AnomalyFeed
  webhooks: WebhookService
  /** Counts a request answered ip_locked_out (keygate_locked_out_requests_total). */
  onLockedOut?: () => void
}

/**
 * The OpenAPI document, as served: made at its first request, then kept (it is the same for every
 * admin API of the process). Made at each start, it was 50 to 60 ms of CPU there, for a page few
 * servers are ever asked for.
 */
let servedDocument: string | undefined

export function createAdminApi(deps: AdminApiDeps): AdminRoute[] {
  const addressKey = addressKeyer(deps.ipv6PrefixBits)
  const authenticate = createAuthenticator({ keys: deps.keys, lockout: deps.lockout, addressKey, token: deps.token, log: deps.log, ...(deps.onLockedOut ? { onLockedOut: deps.onLockedOut } : {}) })
  const services = {
    db: deps.db,
    keys: deps.keys,
    audit: deps.audit,
    denyList: deps.denyList,
    lockout: deps.lockout,
    addressKey,
    usage: new UsageReports(deps.db),
    anomalies: new AnomalyLog(deps.db),
    anomalyFeed: deps.anomalyFeed ?? new AnomalyFeed({ events: new EventBus(), channel: '', log: deps.log }),
    webhooks: deps.webhooks,
    flushUsage: deps.flushUsage ?? (async () => {}),
    now: deps.now ?? (() => new Date()),
    log: deps.log,
    gitea: deps.gitea,
    n8n: deps.n8n,
    streams: new StreamSlots(deps.maxStreamsPerCredential),
    streamHeartbeatMs: deps.streamHeartbeatMs,
  }
  return [
    ...adminApiRoutes({ operations: OPERATIONS, services, authenticate, maxBodyBytes: deps.maxBodyBytes }),
    {
      method: 'GET',
      path: '/openapi.json',
      handle: ({ res }) => {
        const document = (servedDocument ??= JSON.stringify(openApiDocument(OPERATIONS, { version: VERSION })))
        res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(document), 'cache-control': 'no-cache', 'x-content-type-options': 'nosniff' })
        res.end(document)
      },
    },
    ...docsRoutes(),
  ]
}
