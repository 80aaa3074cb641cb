// Test harness for the gateway: a real echo upstream on port 0, a real PGlite store, the real
// key service, and a gateway listening on port 0. Everything is torn down with the test.
import http from 'node:http'
import { randomInt } from 'node:crypto'
import net, { type AddressInfo } from 'node:net'
import { Value } from '@sinclair/typebox/value'
import { Agent, request } from 'undici'
import { ConfigSchema, type Config } from '../../config/schema.ts'
import { deepFreeze } from '../../config/load.ts'
import { AuditCipher, AuditLog } from '../../core/audit.ts'
import type { Db } from '../../core/db.ts'
import { memoryDb } from './stores.ts'
import { DenyListService } from '../../core/deny-list.ts'
import type { EventBus } from '../../core/events.ts'
import type { UsageSink } from '../../core/usage.ts'
import type { Lockout } from '../../core/lockout.ts'
import { KeyService } from '../../core/keys/service.ts'
import { silentLogger, type Logger } from '../../core/log.ts'
import { TimedOut, within } from '../../core/deadline.ts'
import { createGatewayMetrics, createMetricsRegistry, type GatewayMetrics } from '../../core/metrics.ts'
import type { Registry } from 'prom-client'
import { migrate } from '../../core/migrate.ts'
import { keyServiceOptions } from '../../core/runtime.ts'
import { createGateway, type Gateway } from '../../gateway/index.ts'

export interface Tap {
  teardown(fn: () => unknown): void
}

export interface Received {
  method: string
  url: string
  headers: http.IncomingHttpHeaders
  rawHeaders: string[]
  bodyBytes: number
}

export interface Upstream {
  url: string
  port: number
  server: http.Server
  received: Received[]
}

export type UpstreamHandler = (req: http.IncomingMessage, res: http.ServerResponse, received: Received[]) => void

/** Echoes what it received as JSON (the body is counted, not kept). */
export const echo: UpstreamHandler = (req, res, received) => {
  let bodyBytes = 0
  req.on('data', (c: Buffer) => (bodyBytes += c.length))
  req.on('end', () => {
    const r: Received = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, rawHeaders: req.rawHeaders, bodyBytes }
    received.push(r)
    const body = JSON.stringify(r)
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
    res.end(body)
  })
}

export async function listen(server: http.Server, host = '127.0.0.1'): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, host, resolve))
  return (server.address() as AddressInfo).port
}

export async function startUpstream(t: Tap, handler: UpstreamHandler = echo): Promise<Upstream> {
  const received: Received[] = []
  const server = http.createServer((req, res) => handler(req, res, received))
  const port = await listen(server)
  t.teardown(() => {
    server.closeAllConnections()
    return new Promise((r) => server.close(r))
  })
  return { url: `http://127.0.0.1:${port}`, port, server, received }
}

/**
 * An upstream that holds each request (those `hold` picks; by default all) until `release()`,
 * then echoes it; `arrived` settles as the first one held reaches it.
 */
export async function heldUpstream(t: Tap, hold: (req: http.IncomingMessage) => boolean = () => true): Promise<{ upstream: Upstream; arrived: Promise<void>; release(): void }> {
  let arrive!: () => void
  const arrived = new Promise<void>((r) => (arrive = r))
  let release!: () => void
  const released = new Promise<void>((r) => (release = r))
  const upstream = await startUpstream(t, (req, res, received) => {
    if (!hold(req)) return echo(req, res, received)
    arrive()
    void released.then(() => echo(req, res, received))
  })
  return { upstream, arrived, release }
}

/** A frozen Config from a partial one, with the schema's defaults (as loadConfig would). */
export function makeConfig(partial: Record<string, unknown>): Config {
  const value = Value.Default(ConfigSchema, Value.Clone(partial)) as Config
  const errors = [...Value.Errors(ConfigSchema, value)]
  if (errors.length > 0) throw new Error(`test config invalid: ${errors.map((e) => `${e.path} ${e.message}`).join('; ')}`)
  return deepFreeze(value)
}

export const ACTOR = { actor: 'test' }

export interface Store {
  db: Db
  audit: AuditLog
  keys: KeyService
  denyList: DenyListService
}

export async function openStore(t: Tap, config: Config): Promise<Store> {
  const db = await memoryDb({ migrated: true })
  await migrate(db)
  const audit = new AuditLog(new AuditCipher(Buffer.alloc(32, 7)))
  const keys = new KeyService({ db, audit, ...keyServiceOptions(config) })
  const denyList = new DenyListService({ db, audit })
  t.teardown(() => db.close().catch(() => {}))
  return { db, audit, keys, denyList }
}

let shared: Promise<Store> | undefined
function sharedStore(config: Config): Promise<Store> {
  shared ??= openStore({ teardown: () => {} }, config)
  return shared
}

export interface Harness extends Store {
  config: Config
  gateway: Gateway
  metrics: GatewayMetrics
  url: string
  port: number
  upstream: Upstream
  agent: Agent
  /** Creates a key through the key service and returns its plaintext. */
  key(input?: Record<string, unknown>): Promise<{ key: string; id: string }>
  get(path: string, headers?: Record<string, string | string[]>, method?: string): Promise<Answer>
}

export interface Answer {
  status: number
  headers: Record<string, string | string[] | undefined>
  text: string
  json: any
}

export interface HarnessOptions {
  config?: Record<string, unknown>
  upstream?: UpstreamHandler
  /** Routes; `{upstream}` in an upstream value is replaced with the echo upstream's URL. */
  routes?: Array<Record<string, unknown>>
  store?: Store
  redis?: any
  log?: Logger
  host?: string
  now?: () => Date
  /** Share the store's DenyListService with the gateway (as `serve` does). */
  shareDenyList?: boolean
  /** The usage hook (a usage recorder, an anomaly detector, or both with teeUsage). */
  usage?: UsageSink
  /** The lockout the gateway consults (else it makes its own from the config). */
  lockout?: Lockout
  /** The event bus (rate_limit.exceeded). */
  events?: EventBus
  /** Use one store for the whole test file (opening PGlite is the slow part); not for tests that change the deny list or close the store. */
  sharedStore?: boolean
}

export async function startGateway(t: Tap, options: HarnessOptions = {}): Promise<Harness> {
  const upstream = await startUpstream(t, options.upstream)
  const routes = (options.routes ?? [{ name: 'api', path: '/' , upstream: '{upstream}' }]).map((r) => ({
    ...r,
    upstream: String(r.upstream).replace('{upstream}', upstream.url),
  }))
  const config = makeConfig({ ...(options.config ?? {}), routes })
  const store = options.store ?? (options.sharedStore ? await sharedStore(config) : await openStore(t, config))
  const metrics = createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), config.routes.map((r) => r.name))
  const gateway = await createGateway({
    config,
    keys: store.keys,
    db: store.db,
    log: options.log ?? silentLogger,
    metrics,
    ...(options.redis ? { redis: options.redis } : {}),
    ...(options.now ? { now: options.now } : {}),
    ...(options.shareDenyList !== false ? { denyList: store.denyList } : {}),
    ...(options.usage ? { usage: options.usage } : {}),
    ...(options.lockout ? { lockout: options.lockout } : {}),
    ...(options.events ? { events: options.events } : {}),
  })
  const port = await listen(gateway.server, options.host)
  const agent = new Agent({ keepAliveTimeout: 1000 })
  t.teardown(async () => {
    await agent.close()
    await gateway.shutdown(1000)
  })
  const host = options.host?.includes(':') ? `[${options.host}]` : (options.host ?? '127.0.0.1')
  const url = `http://${host}:${port}`
  return {
    ...store,
    config,
    gateway,
    metrics,
    url,
    port,
    upstream,
    agent,
    async key(input = {}) {
      const { key, record } = await store.keys.create({ name: 'test key', type: 'user', ...input }, ACTOR)
      return { key, id: record.id }
    },
    async get(path, headers = {}, method = 'GET') {
      return answerOf(await request(url + path, { method: method as 'GET', headers, dispatcher: agent }))
    },
  }
}

/** Reads an undici response whole; `json` when it parses. */
export async function answerOf(res: Awaited<ReturnType<typeof request>>): Promise<Answer> {
  const text = await res.body.text()
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {}
  return { status: res.statusCode, headers: res.headers as Answer['headers'], text, json }
}

export const bearer = (key: string) => ({ authorization: `Bearer ${key}` })

/** 198.18.0.0/15, RFC 2544's range for benchmarks: 2^17 addresses. */
const ADDRESSES = 1 << 17
let nextAddress = randomInt(ADDRESSES)

/**
 * A client address (for X-Forwarded-For) that this test process has not used before: a random
 * draw for each could meet an address an earlier test locked out or limited (a lockout lasts
 * its window), so they are taken in turn from a random start in 198.18.0.0/15. The start also
 * keeps counters left in a shared Redis by an earlier run, or by another test file, away.
 */
export function freshAddress(): string {
  for (;;) {
    const n = nextAddress++ % ADDRESSES
    const last = n & 255
    if (last !== 0 && last !== 255) return `198.${18 + (n >> 16)}.${(n >> 8) & 255}.${last}`
  }
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/**
 * Polls until `check` holds, then passes `what`; fails it after `ms`. For changes that travel
 * between processes: a hang guard, not a latency bound (bench/ measures latencies).
 */
export async function until(t: { pass(m: string): void; fail(m: string): void }, what: string, check: () => Promise<boolean> | boolean, ms = 20_000): Promise<void> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (await check()) {
      t.pass(what)
      return
    }
    await sleep(20)
  }
  t.fail(`${what}: not within ${ms} ms`)
}

/**
 * A hang guard: what `pending` settles to, or 'still waiting' if it has not within `ms`. The limit
 * stands for "for ever" and is set far beyond the behaviour's own time: no test measures speed
 * (the bench does).
 */
export function unlessHung<T>(pending: Promise<T>, ms = 30_000): Promise<T | 'still waiting'> {
  return within(pending, ms, 'hang guard').catch((err: unknown) => {
    if (err instanceof TimedOut) return 'still waiting' as const
    throw err
  })
}

/** One raw HTTP/1.1 exchange (the client libraries refuse some of the headers sent here). */
export function rawExchange(port: number, text: string | Buffer): Promise<string> {
  return new Promise((resolve, reject) => {
    // Written, not ended: Node's server drops a request whose client half-closes before the answer.
    const socket = net.connect(port, '127.0.0.1', () => socket.write(text))
    socket.setTimeout(5000, () => socket.destroy())
    let out = ''
    socket.setEncoding('latin1')
    socket.on('data', (d: string) => (out += d))
    socket.on('close', () => resolve(out))
    socket.on('error', reject)
  })
}

/**
 * `rawExchange` read as an answer: its status, its headers (names in lower case, a repeated one's
 * lines joined with ", "), its body as UTF-8, and that body's JSON when it parses.
 */
export async function rawAnswer(port: number, text: string | Buffer): Promise<Answer> {
  const out = await rawExchange(port, text)
  const end = out.indexOf('\r\n\r\n')
  const [statusLine = '', ...lines] = out.slice(0, end === -1 ? out.length : end).split('\r\n')
  const headers: Record<string, string> = {}
  for (const line of lines) {
    const colon = line.indexOf(':')
    const name = line.slice(0, colon).toLowerCase()
    const value = line.slice(colon + 1).trim()
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`
  }
  const body = end === -1 ? '' : Buffer.from(out.slice(end + 4), 'latin1').toString('utf8')
  let json: unknown
  try {
    json = JSON.parse(body)
  } catch {}
  return { status: Number(statusLine.split(' ')[1]), headers, text: body, json }
}

/** One step of `converse`: once what was received satisfies `when`, `send` is written (null ends the connection). */
export interface ConversationStep {
  when: (received: string) => boolean
  send: string | null
}

/**
 * A raw HTTP/1.1 conversation on one connection: writes `first`, then each step in turn once its
 * `when` holds for everything received so far. Resolves with all that was received (latin1) when
 * the connection closes, or after 5 s without an end.
 */
export function converse(port: number, first: string, steps: readonly ConversationStep[] = [], host = '127.0.0.1'): Promise<string> {
  return new Promise((resolve) => {
    let received = ''
    let next = 0
    const socket = net.connect(port, host, () => socket.write(first))
    socket.setEncoding('latin1')
    socket.on('data', (d: string) => {
      received += d
      const step = steps[next]
      if (step === undefined || !step.when(received)) return
      next++
      if (step.send === null) socket.end()
      else socket.write(step.send)
    })
    socket.on('error', () => {})
    socket.on('close', () => resolve(received))
    socket.setTimeout(5000, () => socket.destroy())
  })
}

/** What a raw client got on one connection: the bytes, whether the server ended it (FIN), and the error if it was reset. */
export interface RawOutcome {
  text: string
  ended: boolean
  error: string | undefined
}

/**
 * Follows a raw client connection `s` into `out`: what it received (latin1), whether the server
 * ended it (FIN; `onEnd` is called then) and the error if it was reset. Resolves with `out` when
 * the connection closes; it is destroyed after 10 s (a hang guard).
 */
export function followRaw(s: net.Socket, out: RawOutcome, onEnd: () => void): Promise<RawOutcome> {
  s.setEncoding('latin1').on('data', (d: string) => (out.text += d))
  s.on('end', () => {
    out.ended = true
    onEnd()
  })
  s.on('error', (err: NodeJS.ErrnoException) => (out.error = err.code ?? err.message))
  setTimeout(() => s.destroy(), 10_000).unref()
  return new Promise((resolve) => s.on('close', () => resolve(out)))
}

/**
 * Sends `head`, then `size` bytes of body in 64 KiB pieces whatever comes back, as a client
 * uploading a large body does (undici, curl), and ends its own side once it has sent them all and
 * the server has ended its side. A server that closes while bytes are still coming makes its
 * kernel answer them with a reset: the client's `error` (ECONNRESET, EPIPE), and it may lose the
 * answer it was sent. `size` may be less than the body the head declares: the client then waits
 * for the server to end the connection.
 */
export function uploadWhileAnswered(port: number, head: string, size: number): Promise<RawOutcome> {
  const piece = Buffer.alloc(65_536, 0x61)
  const out: RawOutcome = { text: '', ended: false, error: undefined }
  let sent = 0
  const finish = () => {
    if (out.ended && sent === size) s.end()
  }
  const more = () => {
    while (sent < size && s.writable) {
      const n = Math.min(piece.length, size - sent)
      sent += n
      if (!s.write(n === piece.length ? piece : piece.subarray(0, n))) return void s.once('drain', more)
    }
    finish()
  }
  const s = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () => {
    s.write(head)
    more()
  })
  return followRaw(s, out, finish)
}

/** A metric's value in `registry` (NaN when no series has `labels`). */
export async function metric(registry: Registry, name: string, labels: Record<string, string> = {}): Promise<number> {
  const m = registry.getSingleMetric(name)
  if (!m) throw new Error(`no metric ${name}`)
  const { values } = await m.get()
  const v = values.find((x) => Object.entries(labels).every(([k, l]) => x.labels[k] === l))
  return v?.value ?? NaN
}

/** A request to a running keygate (a new connection each time), JSON in and out; `token` as a Bearer credential. */
export async function call(url: string, options: { method?: string; token?: string; body?: unknown; headers?: Record<string, string> } = {}) {
  const headers: Record<string, string> = { ...(options.headers ?? {}) }
  if (options.token) headers.authorization = `Bearer ${options.token}`
  if (options.body !== undefined) headers['content-type'] = 'application/json'
  return answerOf(await request(url, { method: (options.method ?? 'GET') as 'GET', headers, ...(options.body !== undefined ? { body: JSON.stringify(options.body) } : {}), reset: true }))
}
