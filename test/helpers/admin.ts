// Test harness for the admin API: the real admin server on port 0 over a real store (from
// forEachStore), the real key service, deny list, lockout and usage recorder, and optionally a
// real gateway on port 0 sharing them all, as `keygate serve` does. Torn down with the test.
import type http from 'node:http'
import type { Test } from 'tap'
import { Agent, request } from 'undici'
import { Value } from '@sinclair/typebox/value'
import { createAdminApi } from '../../admin/index.ts'
import { OPERATIONS } from '../../admin/routes/index.ts'
import { createAdminServer } from '../../admin/server.ts'
import { AuditCipher, AuditLog } from '../../core/audit.ts'
import type { Db } from '../../core/db.ts'
import { DenyListService } from '../../core/deny-list.ts'
import type { GiteaTokenService } from '../../core/integrations/gitea.ts'
import type { N8nKeyService } from '../../core/integrations/n8n.ts'
import { KeyService } from '../../core/keys/service.ts'
import { createLockout, type Lockout } from '../../core/lockout.ts'
import { silentLogger } from '../../core/log.ts'
import { createGatewayMetrics, createMetricsRegistry } from '../../core/metrics.ts'
import { keyServiceOptions } from '../../core/runtime.ts'
import { UsageRecorder } from '../../core/usage.ts'
import { createGateway, type Gateway } from '../../gateway/index.ts'
import { answerOf, listen, makeConfig, startUpstream, type Answer, type Upstream } from './gateway.ts'
import { TEST_ENCRYPTION_KEY } from './stores.ts'

export const BOOTSTRAP_TOKEN = 'test-bootstrap-token-0123456789'
export const MAX_BODY_BYTES = 4096

export interface CallOptions {
  /** The credential (Bearer); null sends none. Default: the admin key. */
  auth?: string | null
  /** A JSON body (sent as application/json). */
  body?: unknown
  /** A body sent as is. */
  raw?: string | Buffer
  headers?: Record<string, string>
}

export interface AdminHarness {
  db: Db
  keys: KeyService
  audit: AuditLog
  denyList: DenyListService
  lockout: Lockout
  usage: UsageRecorder
  url: string
  port: number
  /** Every request the admin server received (for the isolation test). */
  requests: string[]
  adminKey: string
  adminKeyId: string
  gateway?: { gateway: Gateway; url: string; port: number; upstream: Upstream }
  call(method: string, path: string, options?: CallOptions): Promise<Answer>
  /** A request to the gateway (with `gateway: true`). */
  through(path: string, headers?: Record<string, string>): Promise<Answer>
  auditRows(): Promise<number>
}

export interface AdminHarnessOptions {
  gateway?: boolean
  /** Config overrides (lockout, gateway, ...). */
  config?: Record<string, unknown>
  /** The integration services behind /v1/gitea and /v1/n8n (absent: not configured). */
  gitea?: GiteaTokenService
  n8n?: N8nKeyService
}

export async function startAdmin(t: Test, db: Db, options: AdminHarnessOptions = {}): Promise<AdminHarness> {
  const base = { lockout: { max_attempts: 1_000_000 }, admin: { max_body_bytes: MAX_BODY_BYTES }, ...(options.config ?? {}) }
  const upstream = options.gateway ? await startUpstream(t) : undefined
  const config = makeConfig({ ...base, routes: upstream ? [{ name: 'api', path: '/', upstream: upstream.url }] : [] })
  const audit = new AuditLog(new AuditCipher(TEST_ENCRYPTION_KEY))
  const keys = new KeyService({ db, audit, ...keyServiceOptions(config) })
  const denyList = new DenyListService({ db, audit })
  const metrics = createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), config.routes.map((r) => r.name))
  const lockout = createLockout({ maxAttempts: config.lockout.max_attempts, windowS: config.lockout.window_s, onLockout: () => metrics.lockouts.inc() })
  const usage = new UsageRecorder({ db, log: silentLogger })
  const server = createAdminServer({
    log: silentLogger,
    routes: createAdminApi({
      db,
      keys,
      audit,
      denyList,
      lockout,
      log: silentLogger,
      token: BOOTSTRAP_TOKEN,
      maxBodyBytes: config.admin.max_body_bytes,
      ipv6PrefixBits: config.rate_limits.ipv6_prefix_bits,
      flushUsage: () => usage.flush(),
      ...(options.gitea ? { gitea: options.gitea } : {}),
      ...(options.n8n ? { n8n: options.n8n } : {}),
    }),
  })
  const requests: string[] = []
  server.prependListener('request', (req: http.IncomingMessage) => requests.push(`${req.method} ${req.url}`))
  const port = await listen(server)
  const agent = new Agent({ keepAliveTimeout: 1000 })
  t.teardown(async () => {
    await agent.close()
    server.closeAllConnections()
    await new Promise((r) => server.close(r))
  })
  let gw: AdminHarness['gateway']
  if (upstream) {
    const gateway = await createGateway({ config, keys, db, log: silentLogger, metrics, denyList, lockout, usage })
    const gport = await listen(gateway.server)
    t.teardown(() => gateway.shutdown(1000))
    gw = { gateway, url: `http://127.0.0.1:${gport}`, port: gport, upstream }
  }
  const admin = await keys.create({ name: 'test admin', type: 'system', scopes: ['admin'] }, { actor: 'test' })
  const url = `http://127.0.0.1:${port}`
  return {
    db,
    keys,
    audit,
    denyList,
    lockout,
    usage,
    url,
    port,
    requests,
    adminKey: admin.key,
    adminKeyId: admin.record.id,
    ...(gw ? { gateway: gw } : {}),
    async call(method, path, o = {}) {
      const headers: Record<string, string> = { ...(o.headers ?? {}) }
      const auth = o.auth === undefined ? admin.key : o.auth
      if (auth !== null) headers.authorization = `Bearer ${auth}`
      let body: string | Buffer | undefined
      if (o.body !== undefined) {
        body = JSON.stringify(o.body)
        headers['content-type'] ??= 'application/json'
      } else if (o.raw !== undefined) body = o.raw
      return answerOf(await request(url + path, { method: method as 'GET', headers, ...(body !== undefined ? { body } : {}), dispatcher: agent }))
    },
    async through(path, headers = {}) {
      if (!gw) throw new Error('startAdmin without gateway: true')
      return answerOf(await request(gw.url + path, { headers, dispatcher: agent }))
    },
    async auditRows() {
      const rows = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM api_key_audit_log')
      return rows[0]?.n ?? -1
    },
  }
}

/** Asserts an answer has its operation's status and matches the operation's documented schema. */
export function documented(t: Test, operationId: string, a: Answer): void {
  const op = OPERATIONS.find((o) => o.id === operationId)
  if (!op) throw new Error(`no operation ${operationId}`)
  t.equal(a.status, op.response.status, `${operationId}: ${op.response.status}`)
  t.same([...Value.Errors(op.response.schema, a.json)].map((e) => `${e.path} ${e.message}`), [], `${operationId}: the answer matches its documented schema`)
}
