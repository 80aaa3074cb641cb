// Test harness for the admin API: the real admin server on port 0 over a real store (from
// forEachStore), the real key service, deny list, lockout and usage recorder, and optionally a
// real gateway on port 0 sharing them all, as `keygate serve` does. Torn down with the test.
import http from 'node:http'
import type { Test } from 'tap'
import { Agent, request } from 'undici'
import { FormatRegistry } from '@sinclair/typebox'
import { Ajv2020 } from 'ajv/dist/2020.js'
import addFormatsModule from 'ajv-formats'
import { createAdminApi } from '../../admin/index.ts'
import { OPERATIONS } from '../../admin/routes/index.ts'
import { adminServerOptions, createAdminServer } from '../../admin/server.ts'
import { AnomalyDetector, AnomalyFeed, AnomalyLog, anomalyHistory } from '../../core/anomalies.ts'
import { AuditCipher, AuditLog } from '../../core/audit.ts'
import { EventBus } from '../../core/events.ts'
import { bindKeyEvents, WebhookService } from '../../core/webhooks.ts'
import type { Config } from '../../config/schema.ts'
import type { Redis } from 'ioredis'
import type { Db } from '../../core/db.ts'
import { DenyListService } from '../../core/deny-list.ts'
import { GiteaTokenService } from '../../core/integrations/gitea.ts'
import { N8nKeyService } from '../../core/integrations/n8n.ts'
import { KeyService } from '../../core/keys/service.ts'
import { createLockout, type Lockout } from '../../core/lockout.ts'
import { silentLogger, type Logger } from '../../core/log.ts'
import { createGatewayMetrics, createMetricsRegistry } from '../../core/metrics.ts'
import { keyServiceOptions } from '../../core/runtime.ts'
import { teeUsage, UsageRecorder } from '../../core/usage.ts'
import { createGateway, type Gateway } from '../../gateway/index.ts'
import { auditRows } from './audit.ts'
import { answerOf, listen, makeConfig, startUpstream, type Answer, type Upstream } from './gateway.ts'
import { TEST_ENCRYPTION_KEY } from './stores.ts'

const addFormats = addFormatsModule as unknown as (ajv: Ajv2020) => Ajv2020

export const BOOTSTRAP_TOKEN = 'test-bootstrap-token-0123456789'
export const MAX_BODY_BYTES = 4096

/** Headers of the message's framing, which OpenAPI leaves to HTTP (Content-Type is the media type's). */
const FRAMING = new Set(['content-type', 'content-length', 'date', 'connection', 'keep-alive', 'transfer-encoding'])

/**
 * What an answer's headers and its documented response in /openapi.json disagree on: each header
 * sent that the response does not list, and each it lists as required that was not sent (before,
 * found by a review: no response listed any, not Retry-After, X-Request-Id nor Accept-Encoding).
 */
/**
 * The OpenAPI document `doc` with every reference into components.schemas and
 * components.responses replaced by what it names (header references are left as they are:
 * headerProblems reads them); a reference to nothing throws.
 */
export function followRefs<T>(doc: T): T {
  return refFollower(doc)(doc) as T
}

/**
 * What followRefs does, for any node of `doc`: the node with every reference into doc's
 * components replaced by what it names (a node alone, not the whole document again).
 */
export function refFollower(doc: unknown): (node: unknown) => unknown {
  const root = doc as { components: Record<string, Record<string, unknown>> }
  const follow = (node: unknown): unknown => {
    if (Array.isArray(node)) return node.map(follow)
    if (typeof node !== 'object' || node === null) return node
    const ref = (node as { $ref?: unknown }).$ref
    const at = typeof ref === 'string' ? /^#\/components\/(schemas|responses)\/([\w.-]+)$/.exec(ref) : null
    if (at !== null) {
      const target = root.components[at[1] as string]?.[at[2] as string]
      if (target === undefined) throw new Error(`${ref as string} names nothing in the document`)
      return follow(target)
    }
    return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, follow(v)]))
  }
  return follow
}

/** The document's own keywords at its root, which are no JSON Schema keywords: ajv reads them as none. */
const DOCUMENT_KEYWORDS = ['openapi', 'info', 'servers', 'security', 'components', 'tags', 'paths']

const pointer = (parts: ReadonlyArray<string | number>) => parts.map((p) => String(p).replaceAll('~', '~0').replaceAll('/', '~1')).join('/')

/**
 * A standard JSON Schema 2020-12 validator (ajv, strict) over an OpenAPI 3.1 document as served,
 * as a client's would read it: each schema compiled where the document holds it, its references
 * followed there. The formats JSON Schema defines (date-time) are checked as ajv-formats checks
 * them; keygate's own (cidr, ip, ...), which the document explains in words, as keygate does.
 */
export function documentValidator(doc: unknown): DocumentValidator {
  const ajv = new Ajv2020({ strict: true, allErrors: true })
  addFormats(ajv)
  for (const [name, check] of FormatRegistry.Entries()) if (ajv.formats[name] === undefined) ajv.addFormat(name, check)
  ajv.addVocabulary(DOCUMENT_KEYWORDS)
  ajv.addSchema({ ...(doc as object), $id: 'openapi.json' })
  const paths = (doc as { paths: Record<string, Record<string, { responses: Record<string, { $ref?: string }> }>> }).paths
  const problems = (at: ReadonlyArray<string | number>, value: unknown) => {
    const validate = ajv.getSchema(`openapi.json#/${pointer(at)}`)
    if (!validate) throw new Error(`no schema at ${pointer(at)}`)
    return validate(value) ? [] : (validate.errors ?? []).map((e) => `${e.instancePath || '/'} ${e.message ?? ''}${e.params && 'allowedValues' in e.params ? ` ${JSON.stringify(e.params.allowedValues)}` : ''}`)
  }
  return {
    problems,
    answerProblems(op, status, body) {
      const method = op.method.toLowerCase()
      const response = paths[op.path]?.[method]?.responses[String(status)]
      if (response === undefined) return [`${op.method} ${op.path} documents no ${status} answer`]
      const at = response.$ref !== undefined ? response.$ref.replace(/^#\//, '').split('/') : ['paths', op.path, method, 'responses', String(status)]
      return problems([...at, 'content', 'application/json', 'schema'], body)
    },
  }
}

export interface DocumentValidator {
  /** What is wrong with `value` as the schema at `at` (the path to it in the document) says, as `/where what`. */
  problems(at: ReadonlyArray<string | number>, value: unknown): string[]
  /** What is wrong with the JSON body of a `status` answer of `op`, as its response in the document says (following a reference to components.responses). */
  answerProblems(op: { path: string; method: string }, status: number, body: unknown): string[]
}

const servedValidators = new WeakMap<AdminHarness, Promise<DocumentValidator>>()

/** A validator over the document `h` serves at /openapi.json, fetched once per harness. */
export function servedValidator(h: AdminHarness): Promise<DocumentValidator> {
  let v = servedValidators.get(h)
  if (!v) {
    v = h.call('GET', '/openapi.json', { auth: null }).then((a) => documentValidator(a.json))
    servedValidators.set(h, v)
  }
  return v
}

export function headerProblems(response: { headers?: Record<string, { $ref: string }> } | undefined, sent: Record<string, unknown>, components: Record<string, { required?: boolean; schema?: unknown }>): string[] {
  const documented = new Map(Object.entries(response?.headers ?? {}).map(([name, ref]) => [name.toLowerCase(), components[ref.$ref.replace('#/components/headers/', '')]]))
  const extra = Object.keys(sent).filter((h) => !FRAMING.has(h.toLowerCase()) && !documented.has(h.toLowerCase())).map((h) => `${h}: sent, not documented`)
  const missing = [...documented].filter(([h, c]) => c?.required === true && sent[h] === undefined).map(([h]) => `${h}: documented as always sent, not sent`)
  return [...extra, ...missing]
}

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
  config: Config
  events: EventBus
  webhooks: WebhookService
  anomalyFeed: AnomalyFeed
  /** With `gateway: true` and anomalies enabled. */
  detector?: AnomalyDetector
  url: string
  port: number
  /** Every request the admin server received (for the isolation test). */
  requests: string[]
  adminKey: string
  adminKeyId: string
  gateway?: { gateway: Gateway; url: string; port: number; upstream: Upstream }
  call(method: string, path: string, options?: CallOptions): Promise<Answer>
  /** Opens a Server-Sent Events stream (an error answer is read whole into `error`). */
  stream(path: string, options?: { auth?: string | null; headers?: Record<string, string> }): Promise<SseStream>
  /** A request to the gateway (with `gateway: true`). */
  through(path: string, headers?: Record<string, string>): Promise<Answer>
  auditRows(): Promise<number>
  /**
   * A JSON request declaring a body of `contentLength` bytes (Content-Length) and sending only its
   * first KiB: for the answer to a body too large to send in a test.
   */
  declared(method: string, path: string, contentLength: number): Promise<Answer>
}

export interface AdminHarnessOptions {
  gateway?: boolean
  /** Config overrides (lockout, gateway, ...). */
  config?: Record<string, unknown>
  /** The integration services behind /v1/gitea and /v1/n8n (default: from the harness's config, which configures neither). */
  gitea?: GiteaTokenService
  n8n?: N8nKeyService
  /** Shared windows, alerts and the SSE feed over Redis (as `serve` with REDIS_URL). */
  redis?: Redis
  /** The admin server's and its API's log (default: none). */
  log?: Logger
  /** The webhook service's log (default: none): what it says of each delivery attempt. */
  webhookLog?: Logger
  /** The admin API's clock, and its server's (default: the wall clock). */
  now?: () => Date
}

export async function startAdmin(t: Test, db: Db, options: AdminHarnessOptions = {}): Promise<AdminHarness> {
  const base = { lockout: { max_attempts: 1_000_000 }, admin: { max_body_bytes: MAX_BODY_BYTES }, ...(options.config ?? {}) }
  const upstream = options.gateway ? await startUpstream(t) : undefined
  const config = makeConfig({ ...base, routes: upstream ? [{ name: 'api', path: '/', upstream: upstream.url }, ...((options.config?.routes as unknown[] | undefined) ?? [])] : [] })
  const cipher = new AuditCipher(TEST_ENCRYPTION_KEY)
  const audit = new AuditLog(cipher)
  const keys = new KeyService({ db, audit, ...keyServiceOptions(config) })
  const denyList = new DenyListService({ db, audit })
  const metrics = createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), config.routes.map((r) => r.name))
  const lockout = createLockout({ maxAttempts: config.lockout.max_attempts, windowS: config.lockout.window_s, onLockout: () => metrics.lockouts.inc() })
  const usage = new UsageRecorder({ db, log: silentLogger })
  const events = new EventBus()
  const webhooks = new WebhookService({ db, cipher, audit, config: config.webhooks, log: options.webhookLog ?? silentLogger })
  const offQueue = webhooks.bind(events)
  const offKeys = bindKeyEvents(keys, events)
  webhooks.start()
  const redis = options.redis
  const integrationDeps = { db, audit, log: silentLogger, config }
  const gitea = options.gitea ?? new GiteaTokenService(integrationDeps)
  const n8n = options.n8n ?? new N8nKeyService(integrationDeps)
  const anomalyFeed = new AnomalyFeed({ redis, channel: config.redis.anomaly_channel, events, log: silentLogger, history: anomalyHistory(new AnomalyLog(db)), pollMs: config.admin.stream_poll_ms })
  t.teardown(async () => {
    anomalyFeed.close()
    if (!options.gitea) await gitea.close()
    if (!options.n8n) await n8n.close()
    offQueue()
    offKeys()
    await webhooks.close()
  })
  const server = createAdminServer({
    server: http.createServer(adminServerOptions(config.admin)),
    log: options.log ?? silentLogger,
    allowedHosts: config.admin.allowed_hosts,
    ...(options.now ? { now: () => (options.now as () => Date)().getTime() } : {}),
    routes: createAdminApi({
      db,
      keys,
      audit,
      denyList,
      lockout,
      log: options.log ?? silentLogger,
      token: BOOTSTRAP_TOKEN,
      maxBodyBytes: config.admin.max_body_bytes,
      maxStreamsPerCredential: config.admin.max_streams_per_credential,
      streamHeartbeatMs: config.admin.stream_heartbeat_s * 1000,
      ipv6PrefixBits: config.rate_limits.ipv6_prefix_bits,
      flushUsage: () => usage.flush(),
      gitea,
      n8n,
      webhooks,
      anomalyFeed,
      ...(options.now ? { now: options.now } : {}),
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
  let detector: AnomalyDetector | undefined
  if (upstream) {
    const a = config.anomalies
    if (a.enabled) {
      const d = new AnomalyDetector({ db, thresholds: a, redis, channel: config.redis.anomaly_channel, events, log: silentLogger, checkIntervalMs: a.check_interval_ms, ipv6PrefixBits: config.rate_limits.ipv6_prefix_bits })
      t.teardown(() => d.close())
      detector = d
    }
    const gateway = await createGateway({ config, keys, db, log: silentLogger, metrics, denyList, lockout, usage: teeUsage(usage, detector), events, ...(redis ? { redis } : {}) })
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
    config,
    events,
    webhooks,
    anomalyFeed,
    ...(detector ? { detector } : {}),
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
    async stream(path, o = {}) {
      const headers: Record<string, string> = { ...(o.headers ?? {}) }
      const auth = o.auth === undefined ? admin.key : o.auth
      if (auth !== null) headers.authorization = `Bearer ${auth}`
      return openSse(url + path, headers, agent)
    },
    async through(path, headers = {}) {
      if (!gw) throw new Error('startAdmin without gateway: true')
      return answerOf(await request(gw.url + path, { headers, dispatcher: agent }))
    },
    auditRows: () => auditRows(db),
    declared(method, path, contentLength) {
      return new Promise<Answer>((resolve, reject) => {
        const req = http.request(url + path, { method, headers: { authorization: `Bearer ${admin.key}`, 'content-type': 'application/json', 'content-length': String(contentLength) } }, (res) => {
          const chunks: Buffer[] = []
          res.on('data', (c: Buffer) => chunks.push(c))
          res.on('end', () => {
            req.destroy()
            const text = Buffer.concat(chunks).toString('utf8')
            let json: unknown
            try {
              json = JSON.parse(text)
            } catch {}
            resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json })
          })
        })
        // An error once the answer is in (the server closed without reading the rest) changes nothing.
        req.on('error', reject)
        req.write(' '.repeat(Math.min(1024, contentLength)))
      })
    },
  }
}

/**
 * Asserts an answer has `status` (default: its operation's) and that its body matches the schema
 * the document `h` serves gives that answer, read by a standard validator (documentValidator).
 * Before (found by a review), answers were checked against the TypeBox schemas in the code, which
 * could say otherwise than the JSON Schema served.
 */
export async function documented(t: Test, h: AdminHarness, operationId: string, a: Answer, status?: number): Promise<void> {
  const op = OPERATIONS.find((o) => o.id === operationId)
  if (!op) throw new Error(`no operation ${operationId}`)
  const expected = status ?? op.response.status
  t.equal(a.status, expected, `${operationId}: ${expected}`)
  t.same((await servedValidator(h)).answerProblems(op, a.status, a.json), [], `${operationId}: the ${a.status} answer matches the schema /openapi.json documents`)
}

export interface SseEvent {
  id: string | undefined
  event: string | undefined
  data: string
}

export interface SseStream {
  status: number
  headers: Record<string, string | string[] | undefined>
  /** The JSON error when the stream was refused. */
  error: any
  /** The next event (comments are skipped); rejects when the stream ends first. */
  next(): Promise<SseEvent>
  /** Events received so far and not yet taken by next(). */
  buffered(): SseEvent[]
  /** The last event id as a browser's EventSource holds it: set by every `id:` line, also of a block that is no event. */
  lastEventId(): string | undefined
  close(): void
}

/** The stream's next event, or undefined when none comes within `ms` (the test fails rather than hangs). */
export async function nextWithin(s: SseStream, ms: number): Promise<SseEvent | undefined> {
  let timer: NodeJS.Timeout | undefined
  const none = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), ms)))
  try {
    return await Promise.race([s.next(), none])
  } finally {
    clearTimeout(timer)
  }
}

/** A small SSE reader written for the tests (not the server's code): events split on blank lines. */
export async function openSse(target: string, headers: Record<string, string>, dispatcher: Agent): Promise<SseStream> {
  const controller = new AbortController()
  const res = await request(target, { headers, dispatcher, signal: controller.signal })
  const queue: SseEvent[] = []
  const waiting: Array<{ resolve: (e: SseEvent) => void; reject: (err: Error) => void }> = []
  let ended = false
  if (res.statusCode !== 200 || !String(res.headers['content-type']).startsWith('text/event-stream')) {
    const text = await res.body.text()
    let error: unknown
    try {
      error = JSON.parse(text)
    } catch {}
    return { status: res.statusCode, headers: res.headers, error, next: () => Promise.reject(new Error('no stream')), buffered: () => [], lastEventId: () => undefined, close: () => {} }
  }
  let text = ''
  let lastId: string | undefined
  const push = (e: SseEvent) => {
    const w = waiting.shift()
    if (w) w.resolve(e)
    else queue.push(e)
  }
  res.body.setEncoding('utf8')
  res.body.on('data', (chunk: string) => {
    text += chunk
    let end: number
    while ((end = text.indexOf('\n\n')) !== -1) {
      const block = text.slice(0, end)
      text = text.slice(end + 2)
      const e: SseEvent = { id: undefined, event: undefined, data: '' }
      let any = false
      for (const line of block.split('\n')) {
        if (line.startsWith(':') || line === '') continue
        const colon = line.indexOf(':')
        const field = colon === -1 ? line : line.slice(0, colon)
        const value = colon === -1 ? '' : line.slice(colon + 1).replace(/^ /, '')
        if (field === 'id') {
          e.id = value
          lastId = value
        } else if (field === 'event') e.event = value
        else if (field === 'data') e.data = e.data === '' ? value : `${e.data}\n${value}`
        else continue
        any = true
      }
      if (any && (e.data !== '' || e.event !== undefined)) push(e)
    }
  })
  const finish = () => {
    ended = true
    for (const w of waiting.splice(0)) w.reject(new Error('the stream ended'))
  }
  res.body.on('end', finish)
  res.body.on('error', finish)
  res.body.on('close', finish)
  return {
    status: res.statusCode,
    headers: res.headers,
    error: undefined,
    next: () => {
      const e = queue.shift()
      if (e) return Promise.resolve(e)
      if (ended) return Promise.reject(new Error('the stream ended'))
      return new Promise((resolve, reject) => waiting.push({ resolve, reject }))
    },
    buffered: () => queue.splice(0),
    lastEventId: () => lastId,
    close: () => controller.abort(),
  }
}
