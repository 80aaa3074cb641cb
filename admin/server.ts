// The admin listener: a table of routes matched by method and path, JSON errors from the one
// catalogue, never a stack trace. Health, readiness and metrics need no credential; the admin
// API routes (their own files) are added to the same table.
import type http from 'node:http'
import { randomBytes } from 'node:crypto'
import { isIP } from 'node:net'
import type { Duplex } from 'node:stream'
import { within } from '../core/deadline.ts'
import { ERRORS, errorBody, isKeygateError, KeygateError, type ErrorCode } from '../core/errors.ts'
import { framingProblem, hostProblem, versionProblem } from '../core/framing.ts'
import { targetProblem, type RequestTarget } from '../core/target.ts'
import { ADMIN_MARK, afterResponses, answerClientError, clientErrorCode, closeWhenAnswered, hasBody, headersTimeoutOptions, hostName, isTlsFailure, rawError, trackConnections } from '../core/http.ts'
import { outageLog, type Logger } from '../core/log.ts'
import { escapeUnprintable, shownInput } from '../core/validate.ts'

/** A refusal that carries response headers (WWW-Authenticate, Retry-After, Connection). */
export class AdminError extends KeygateError {
  readonly headers: http.OutgoingHttpHeaders

  constructor(code: ErrorCode, message?: string, headers: http.OutgoingHttpHeaders = {}, details?: Record<string, unknown>, options?: ErrorOptions) {
    super(code, message, details, options)
    this.headers = headers
  }
}

export interface AdminRequest {
  req: http.IncomingMessage
  res: http.ServerResponse
  requestId: string
  params: Record<string, string>
  url: URL
}

export interface AdminRoute {
  method: 'GET' | 'POST' | 'PATCH' | 'PUT' | 'DELETE'
  /** `/v1/keys/{id}` style; `{name}` matches one path segment. */
  path: string
  handle(ctx: AdminRequest): Promise<void> | void
  /**
   * The route reads the request body (or refuses it) itself. Any other route leaves a body unread:
   * its answer closes the connection, in stages, rather than read a body of any size that no
   * credential was asked for.
   */
  readsBody?: true
  /**
   * The route's answers come from the store (the admin API's operations, but those marked
   * storeBacked: false): one answered without an error ends a logged outage of 503
   * store_unavailable. The others (/healthz, /metrics, /docs, /readyz, whose 503 is an answer, not
   * an error) answer without the store and say nothing of it.
   */
  storeBacked?: true
}

interface Compiled {
  route: AdminRoute
  pattern: RegExp
  names: string[]
  /** Per path segment, 1 where the route's path has a literal segment, 0 where a `{name}`: the larger wins. */
  rank: string
}

function compile(route: AdminRoute): Compiled {
  const names: string[] = []
  const source = route.path.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\\?\{(\w+)\\?\}|\{(\w+)\}/g, (_m, a: string, b: string) => {
    names.push(a ?? b)
    return '([^/]+)'
  })
  const rank = route.path.split('/').map((segment) => (/\{\w+\}/.test(segment) ? '0' : '1')).join('')
  return { route, pattern: new RegExp(`^${source}$`), names, rank }
}

/**
 * The routes of `table` that serve `path`: of those whose pattern matches it, the ones with a
 * literal segment where the others have a `{name}`, first from the left (a path matched by routes
 * of the same segments once, every route of that path, whatever its method). OpenAPI 3.1's Paths
 * Object has concrete paths matched before their templated counterparts: `/v1/keys/validate` is
 * that path's, and a GET of it is 405 (Allow: POST), not a look-up of the key "validate" by
 * `GET /v1/keys/{id}`. Before (found by a review), the first route of the method took it, and a
 * GET of `/v1/keys/validate` or `/v1/keys/import` was "no key has the id ..." (404), a DELETE of
 * `/v1/gitea/tokens/verify` the deletion of a token named "verify".
 */
function servingRoutes(table: readonly Compiled[], path: string): Array<{ c: Compiled; m: RegExpExecArray }> {
  let best: Array<{ c: Compiled; m: RegExpExecArray }> = []
  for (const c of table) {
    const m = c.pattern.exec(path)
    if (m === null) continue
    // Ranks of one path's matches have as many segments each: compared as text, a literal (1) first wins.
    if (best.length === 0 || c.rank > best[0]!.c.rank) best = [{ c, m }]
    else if (c.rank === best[0]!.c.rank) best.push({ c, m })
  }
  return best
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown, headers: http.OutgoingHttpHeaders = {}): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store', 'x-content-type-options': 'nosniff', ...headers })
  res.end(text)
}

export function sendError(res: http.ServerResponse, code: ErrorCode, requestId: string, message?: string, details?: Record<string, unknown>, headers: http.OutgoingHttpHeaders = {}): void {
  if (res.headersSent) {
    res.destroy()
    return
  }
  // A refusal that closes the connection with the body still coming reads and drops what the
  // client still sends for a while after the answer (closeWhenAnswered). Before (found by a
  // review), the socket closed at once, the kernel answered the bytes still coming with a reset,
  // and a client could lose the refusal (`api-key import` with a wrong token: EPIPE). So does one
  // the client asked to close (`Connection: close`, HTTP/1.0), which Node closes once answered:
  // before (found by a review), a 413 whose body was being drained was lost so (Python's urllib).
  if ((headers.connection === 'close' || !res.shouldKeepAlive) && !res.req.complete && hasBody(res.req.headers)) closeWhenAnswered(res.req)
  // Format and C1 characters escaped (`\u202e`), as a refused value is in a validation message:
  // the same JSON, which a client printing the message shows as it is. Before (found by a review),
  // an unknown id echoed in a 404 (`no key has the id "\u202ex"`) carried a bidi override as is.
  const body = escapeUnprintable(errorBody(code, requestId, message, details))
  res.writeHead(ERRORS[code].status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
    'x-content-type-options': 'nosniff',
    'x-request-id': requestId,
    ...headers,
  })
  res.end(body)
}

export function newRequestId(): string {
  return randomBytes(12).toString('base64url')
}

export interface AdminServerOptions {
  routes: readonly AdminRoute[]
  log: Logger
  /** The server to attach to (http, or https for TLS), made with adminServerOptions. */
  server: http.Server
  /** Host names answered besides IP addresses and localhost (admin.allowed_hosts; "*" for any). */
  allowedHosts?: readonly string[]
  /** Why `/v1` is not served here, when it is not (`serve --only gateway`): said in its 404, not "no admin route". */
  noApi?: string
  /** The clock of the store outage's log lines (default: the wall clock). */
  now?: () => number
}

/**
 * Whether a request's Host is one this listener answers to: an IP address (no page can rebind
 * one), localhost (browsers resolve it, and *.localhost, to loopback themselves), or a name in
 * `allowed`. A web page whose DNS name an attacker rebinds to the listener's address sends its own
 * name: without this check it could read /metrics, and send bad credentials that lock the
 * browser's address out of the admin API and the gateway. No Host (HTTP/1.0) is no browser.
 */
export function hostAllowed(host: string | undefined, allowed: ReadonlySet<string>): boolean {
  if (host === undefined || allowed.has('*')) return true
  let name = hostName(host.toLowerCase())
  if (name.startsWith('[')) return name.includes(']')
  if (name.endsWith('.')) name = name.slice(0, -1)
  return isIP(name) !== 0 || name === 'localhost' || name.endsWith('.localhost') || allowed.has(name)
}

/**
 * What is wrong with a request target (its origin-form, checked as the gateway checks it before:
 * core/target.ts) that the URL parser routing here would read as another path than the one
 * written, where a path filter in front of the listener would not see what is served: `//x/v1/keys`
 * (read as host `x` and path `/v1/keys`), and a backslash, which it reads as `/` (`/v1\stats`).
 * The gateway routes its own way and passes both on as they are; dot segments, which the parser
 * resolves, are refused by both.
 */
function routingProblem(target: string): string | undefined {
  if (target.startsWith('//')) return 'the request target must be a path (one leading slash)'
  const q = target.indexOf('?')
  if ((q === -1 ? target : target.slice(0, q)).includes('\\')) return 'the request path holds a backslash; send / between segments'
  return undefined
}

/** The 421 of a Host (or an absolute-form target's host, standing for a missing Host) this listener does not answer to. */
function hostNotAllowed(res: http.ServerResponse, requestId: string, host: string | undefined): void {
  sendError(res, 'host_not_allowed', requestId, `this admin listener does not answer to Host ${JSON.stringify(host === undefined ? undefined : shownInput(host))}; add the name to admin.allowed_hosts`, undefined, { connection: 'close' })
}

// joinDuplicateHeaders: a repeated header arrives joined with ", " (a repeated Cookie with "; ")
// rather than Node keeping the first line and dropping the rest, so a second Authorization or Host
// cannot hide behind the first (auth.ts and the Host check below refuse them). A repeated
// Content-Type or Last-Event-ID then no longer parses and is refused too; a repeated Content-Length
// is refused by the parser either way. requireHostHeader off: a request without Host is answered
// by the Host check below, in JSON, where Node's was a bare 400.
// The limits are admin.max_header_bytes, admin.request_timeout_ms and admin.headers_timeout_ms
// (before, fixed at their defaults: an import of admin.max_body_bytes over a slow link was cut
// at 60 s whatever was configured).
export function adminServerOptions(limits: { max_header_bytes: number; request_timeout_ms: number; headers_timeout_ms: number }): http.ServerOptions {
  return { maxHeaderSize: limits.max_header_bytes, requestTimeout: limits.request_timeout_ms, ...headersTimeoutOptions(limits.headers_timeout_ms), joinDuplicateHeaders: true, requireHostHeader: false }
}

/** The handlers each admin server has running: a drain's deadline ends their connections, not them. */
const running = new WeakMap<http.Server, Set<Promise<void>>>()

/**
 * Resolves once every handler `server` started has ended, or after `ms`. A stop waits for them
 * before it closes the store: before (found by a review), a request the drain's deadline cut went
 * on, and its next statement met the closed store ("Cannot use a pool after calling end on the
 * pool", logged as admin request failed), an import cut between its look-up and its transaction
 * then made nothing.
 */
export async function handlersEnded(server: http.Server, ms: number): Promise<void> {
  const handlers = running.get(server)
  if (handlers === undefined || handlers.size === 0) return
  // Past `ms` the stop goes on without them (within's TimedOut, the only rejection here).
  await within(Promise.allSettled([...handlers]), ms, 'the admin handlers').catch(() => {})
}

export function createAdminServer(options: AdminServerOptions): http.Server {
  const table = options.routes.map(compile)
  const handlers = new Set<Promise<void>>()
  const log = options.log
  const server = options.server
  const allowedHosts = new Set(options.allowedHosts ?? [])
  // A 503 store_unavailable is logged as the gateway logs its failed look-ups: at warn once an
  // outage, with the request's id, its route and the error (its cause, the driver's, when there is
  // one), each after it at debug, and the outage's end at info. Before (found by a review), none
  // was: GET /v1/keys while a migration held api_keys past the role's lock_timeout was a 503 with
  // nothing in keygate's log.
  const outage = outageLog(log, options.now ?? Date.now, {
    start: 'admin requests fail: answered 503 store_unavailable (logged once until they are answered without it again; each at debug)',
    each: 'admin request answered 503 store_unavailable',
    end: 'admin requests are answered without store_unavailable again',
  })
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    const requestId = newRequestId()
    // Every answer says it is the admin API's: the CLI takes no other server's JSON for one (the
    // gateway, given the admin key, would pass /v1/stats on to its upstream).
    res.setHeader(ADMIN_MARK, '1')
    // Closed (a shutdown): the answer closes the connection, as the gateway's do, rather than
    // offer a keep-alive the drain would end under the client.
    if (!server.listening) res.shouldKeepAlive = false
    // The checks of the request head the gateway makes too (core/framing.ts), each answer closing
    // the connection. Before (found by a review), `GET /v1/keys HTTP/2.0` was answered 200, a
    // `gzip, chunked` body read with only its chunking undone, an HTTP/1.0 body read as chunked, an
    // HTTP/1.1 request without Host answered Node's bare 400, and a Host that is no host 421 (or,
    // as `[::1]x`, taken).
    const version = versionProblem(req)
    if (version !== undefined) {
      sendError(res, 'version_not_supported', requestId, version, undefined, { connection: 'close' })
      return
    }
    // RFC 9112 §3.2: a Host missing (HTTP/1.1), repeated (joined, the lines hold a comma) or not a host is a 400.
    const hostRefused = hostProblem(req, req.headers.host)
    if (hostRefused !== undefined) {
      sendError(res, 'bad_request', requestId, hostRefused, undefined, { connection: 'close' })
      return
    }
    if (!hostAllowed(req.headers.host, allowedHosts)) {
      hostNotAllowed(res, requestId, req.headers.host)
      return
    }
    // After the Host: a transfer coding other than chunked, or in an HTTP/1.0 request, and an
    // Expect other than 100-continue (Node sends an HTTP/1.1 one here through 'checkExpectation',
    // below; before, found by a review, Node's own bare 417 answered it, without a code or the
    // headers of every answer, and before the Host check).
    const framing = framingProblem(req, req.headers)
    if (framing !== undefined) {
      sendError(res, framing.code, requestId, framing.message, undefined, { connection: 'close' })
      return
    }
    // A refusal before any route reads the body (a bad target, no route, a wrong method) closes
    // the connection rather than read and drop a body of any size, unauthenticated, to keep it.
    const closing: http.OutgoingHttpHeaders = hasBody(req.headers) ? { connection: 'close' } : {}
    // The request target, checked as the gateway checks it (core/target.ts): a fragment, dot
    // segments, a percent-encoded control character, %u escape or bytes that are not UTF-8 in the
    // path are refused, and an absolute-form target is taken as its origin-form, its host as Host
    // in an HTTP/1.0 request without one (so checked against the allowed hosts). Before (found by
    // a review), `/v1/keys#x` was served as `/v1/keys`, `/v1/keys/a%09b` read as the id "a\tb",
    // `/v1/keys/%252e%252e` as "%2e%2e", and `GET http://127.0.0.1/v1/keys` refused, where RFC
    // 9112 §3.2.2 has a server accept it and the gateway does.
    const hadHost = req.headers.host !== undefined
    const checked: RequestTarget = { target: req.url ?? '/', pathBytes: undefined, headers: req.headers }
    const problem = targetProblem(checked) ?? routingProblem(checked.target)
    if (problem !== undefined) {
      sendError(res, 'bad_request', requestId, problem, undefined, closing)
      return
    }
    if (!hadHost && req.headers.host !== undefined && !hostAllowed(req.headers.host, allowedHosts)) {
      hostNotAllowed(res, requestId, req.headers.host)
      return
    }
    const target = checked.target
    let url: URL
    try {
      url = new URL(target, 'http://admin.invalid')
    } catch {
      sendError(res, 'bad_request', requestId, 'the request target is not a valid path', undefined, closing)
      return
    }
    const serving = servingRoutes(table, url.pathname)
    for (const { c, m } of serving) {
      if (c.route.method !== req.method && !(req.method === 'HEAD' && c.route.method === 'GET')) continue
      // (A NUL, which PostgreSQL text cannot hold, is a percent-encoded control character,
      // refused with the target above.)
      const params: Record<string, string> = {}
      let bad = false
      c.names.forEach((n, i) => {
        try {
          params[n] = decodeURIComponent(m[i + 1] as string)
        } catch {
          bad = true
        }
      })
      if (bad) {
        sendError(res, 'bad_request', requestId, 'the path is not validly encoded', undefined, closing)
        return
      }
      // Before (found by a review), GET /healthz with `Content-Length: 2 GiB` was answered
      // keep-alive, and the body read to its end.
      if (c.route.readsBody !== true && hasBody(req.headers)) {
        res.setHeader('connection', 'close')
        closeWhenAnswered(req)
      }
      const handled = Promise.resolve()
        .then(() => c.route.handle({ req, res, requestId, params, url }))
        .then(() => {
          // Only a route that asked the store and was answered ends an outage: before (found by a
          // read-back), a kubelet's /healthz 10 s after the last 503 logged the outage's end while
          // the store was still down, and so did a 401 of a request without a credential.
          if (c.route.storeBacked) outage.succeeded()
        })
        .catch((err: unknown) => {
          if (isKeygateError(err)) {
            if (err.code === 'store_unavailable')
              outage.failed({ request_id: requestId, method: req.method, route: c.route.path, err, ...(err.cause instanceof Error ? { cause: err.cause } : {}) })
            sendError(res, err.code, requestId, err.message, err.details as Record<string, unknown> | undefined, err instanceof AdminError ? err.headers : {})
            return
          }
          log.error('admin request failed', { request_id: requestId, method: req.method, path: url.pathname, err: err as Error })
          sendError(res, 'internal_error', requestId)
        })
      handlers.add(handled)
      const ended = () => void handlers.delete(handled)
      handled.then(ended, ended)
      return
    }
    if (serving.length > 0) {
      // HEAD is served wherever GET is (above), so it is allowed there too (before, Allow left it out).
      const allowed = serving.flatMap(({ c }) => (c.route.method === 'GET' ? ['GET', 'HEAD'] : [c.route.method]))
      sendError(res, 'method_not_allowed', requestId, `${req.method} is not allowed here; allowed: ${allowed.join(', ')}`, undefined, { allow: allowed.join(', '), ...closing })
      return
    }
    // Cut: a path of up to gateway.max_header_bytes came back whole in the answer (found by a review).
    const noApi = options.noApi !== undefined && (url.pathname === '/v1' || url.pathname.startsWith('/v1/'))
    sendError(res, 'not_found', requestId, noApi ? (options.noApi as string) : `no admin route ${shownInput(url.pathname)}`, undefined, closing)
  }
  server.on('request', onRequest)
  running.set(server, handlers)
  // Expect: 100-continue is answered only once the request has been routed and its credential and
  // headers accepted (api.ts), right before its body is read: a refusal comes instead, and the
  // body is never sent. Before, Node sent the 100 at once, to any request.
  server.on('checkContinue', onRequest)
  server.on('checkExpectation', onRequest)
  // CONNECT (no admin route takes it): the 405 every other method without a route gets, after the
  // responses to the requests before it. Before (found by a review), Node, without a listener,
  // closed the connection without a word.
  server.on('connect', (req: http.IncomingMessage, socket: Duplex) => {
    // Node takes its own error listener off a socket it hands to 'connect' (a reset was an uncaught error).
    socket.on('error', () => socket.destroy())
    afterResponses(socket, () => {
      if (!socket.writable) socket.destroy()
      else rawError(socket, 'method_not_allowed', newRequestId(), { [ADMIN_MARK]: '1', 'x-content-type-options': 'nosniff' })
    })
  })
  server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
    if (isTlsFailure(err)) {
      socket.destroy()
      return
    }
    // After the responses to the requests before it (an event stream goes on until it ends).
    // The gateway's JSON answer and codes (before: an empty 400 or 431 without a code, and a body
    // too slow for requestTimeout an empty 400 where it is 408 request_timeout).
    answerClientError(socket, () => rawError(socket, clientErrorCode(err), newRequestId(), { [ADMIN_MARK]: '1', 'x-content-type-options': 'nosniff' }))
  })
  trackConnections(server)
  return server
}

export interface HealthOptions {
  /** Store reachable and migrations applied; resolves to a reason when not. */
  ready(): Promise<string | undefined>
  metrics(): Promise<{ contentType: string; body: string }>
  isShuttingDown(): boolean
}

export function healthRoutes(options: HealthOptions): AdminRoute[] {
  return [
    { method: 'GET', path: '/healthz', handle: ({ res }) => sendJson(res, 200, { status: 'ok' }) },
    {
      method: 'GET',
      path: '/readyz',
      handle: async ({ res }) => {
        if (options.isShuttingDown()) return sendJson(res, 503, { status: 'unavailable', reason: 'shutting down' })
        const reason = await options.ready()
        sendJson(res, reason ? 503 : 200, reason ? { status: 'unavailable', reason } : { status: 'ready' })
      },
    },
    {
      method: 'GET',
      path: '/metrics',
      handle: async ({ res }) => {
        const m = await options.metrics()
        res.writeHead(200, { 'content-type': m.contentType, 'content-length': Buffer.byteLength(m.body), 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' })
        res.end(m.body)
      },
    },
  ]
}
