// The admin listener: a table of routes matched by method and path, JSON errors from the one
// catalogue, never a stack trace. Health, readiness and metrics need no credential; the admin
// API routes (their own files) are added to the same table.
import http from 'node:http'
import { randomBytes } from 'node:crypto'
import { ERRORS, errorBody, isKeygateError, KeygateError, type ErrorCode } from '../core/errors.ts'
import type { Logger } from '../core/log.ts'

/** A refusal that carries response headers (WWW-Authenticate, Retry-After, Connection). */
export class AdminError extends KeygateError {
  readonly headers: http.OutgoingHttpHeaders

  constructor(code: ErrorCode, message?: string, headers: http.OutgoingHttpHeaders = {}, details?: Record<string, unknown>) {
    super(code, message, details)
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
}

interface Compiled {
  route: AdminRoute
  pattern: RegExp
  names: string[]
}

function compile(route: AdminRoute): Compiled {
  const names: string[] = []
  const source = route.path.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\\?\{(\w+)\\?\}|\{(\w+)\}/g, (_m, a: string, b: string) => {
    names.push(a ?? b)
    return '([^/]+)'
  })
  return { route, pattern: new RegExp(`^${source}$`), names }
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown, headers: http.OutgoingHttpHeaders = {}): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store', ...headers })
  res.end(text)
}

export function sendError(res: http.ServerResponse, code: ErrorCode, requestId: string, message?: string, details?: Record<string, unknown>, headers: http.OutgoingHttpHeaders = {}): void {
  if (res.headersSent) {
    res.destroy()
    return
  }
  const body = errorBody(code, requestId, message, details)
  res.writeHead(ERRORS[code].status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
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
  /** A server to attach to (https for TLS); a plain http server otherwise. */
  server?: http.Server
}

export const ADMIN_SERVER_OPTIONS: http.ServerOptions = { maxHeaderSize: 16_384, requestTimeout: 60_000, headersTimeout: 10_000 }

export function createAdminServer(options: AdminServerOptions): http.Server {
  const table = options.routes.map(compile)
  const log = options.log
  const server = options.server ?? http.createServer(ADMIN_SERVER_OPTIONS)
  server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const requestId = newRequestId()
    let url: URL
    try {
      url = new URL(req.url ?? '/', 'http://admin.invalid')
    } catch {
      sendError(res, 'bad_request', requestId, 'the request target is not a valid path')
      return
    }
    if (!(req.url ?? '').startsWith('/')) {
      sendError(res, 'bad_request', requestId, 'the request target must be a path')
      return
    }
    let pathMatched = false
    for (const c of table) {
      const m = c.pattern.exec(url.pathname)
      if (!m) continue
      pathMatched = true
      if (c.route.method !== req.method && !(req.method === 'HEAD' && c.route.method === 'GET')) continue
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
        sendError(res, 'bad_request', requestId, 'the path is not validly encoded')
        return
      }
      if (Object.values(params).some((v) => v.includes('\u0000'))) {
        sendError(res, 'bad_request', requestId, 'the path holds a NUL character')
        return
      }
      Promise.resolve()
        .then(() => c.route.handle({ req, res, requestId, params, url }))
        .catch((err: unknown) => {
          if (isKeygateError(err)) {
            sendError(res, err.code, requestId, err.message, err.details as Record<string, unknown> | undefined, err instanceof AdminError ? err.headers : {})
            return
          }
          log.error('admin request failed', { request_id: requestId, method: req.method, path: url.pathname, err: err as Error })
          sendError(res, 'internal_error', requestId)
        })
      return
    }
    if (pathMatched) {
      const allowed = table.filter((c) => c.pattern.test(url.pathname)).map((c) => c.route.method)
      sendError(res, 'method_not_allowed', requestId, `${req.method} is not allowed here; allowed: ${allowed.join(', ')}`, undefined, { allow: allowed.join(', ') })
      return
    }
    sendError(res, 'not_found', requestId, `no admin route ${url.pathname}`)
  })
  server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
    // A response under way on this connection (an event stream, with a pipelined request that
    // does not parse): an answer written now would land inside it.
    if (!socket.writable || (socket as typeof socket & { _httpMessage?: { headersSent?: boolean } | null })._httpMessage?.headersSent === true) {
      socket.destroy()
      return
    }
    const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400
    socket.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n`)
  })
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
        res.writeHead(200, { 'content-type': m.contentType, 'content-length': Buffer.byteLength(m.body) })
        res.end(m.body)
      },
    },
  ]
}
