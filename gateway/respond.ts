// Every answer the gateway itself gives: the JSON error of SPEC §3 (on a response, or written
// raw on a socket for upgrades and parser errors), metrics and the access log line.
import type { OutgoingHttpHeaders } from 'node:http'
import { ERRORS, errorBody } from '../core/errors.ts'
import { closeWhenAnswered, hasBody, writeRaw } from '../core/http.ts'
import type { GatewayOutcome, RouteMetrics } from '../core/metrics.ts'
import { NO_ROUTE } from '../core/metrics.ts'
import type { Logger } from '../core/log.ts'
import { normalise } from './client-address.ts'
import { GATEWAY_ALLOW } from './request-check.ts'
import { pathOf, type GatewayContext, type RequestState, type Verdict } from './state.ts'

/**
 * The WWW-Authenticate of a 401 (RFC 9110 §11.6.1 requires one): a Bearer challenge where the
 * Authorization header is a key source, else one of keygate's own `ApiKey` scheme (before, found
 * by a review: Bearer, where a client following it sent the key where it was not taken). The
 * invalid one is identical for every kind of bad key, so the headers never tell which one it was.
 */
export function keyChallenges(sources: readonly string[]): { missing: string; invalid: string } {
  const scheme = sources.includes('authorization') ? 'Bearer' : 'ApiKey'
  return { missing: `${scheme} realm="keygate"`, invalid: `${scheme} realm="keygate", error="invalid_token"` }
}

/** The access log's status of a request whose client went away before its answer (nginx's). */
export const CLIENT_CLOSED_STATUS = 499

/** The access log's status of a request whose connection the gateway ended unanswered at the shutdown deadline (nginx's 444, a connection closed without a response). */
export const CUT_STATUS = 444

/**
 * Counts the request and observes its latency, when the response head is written or the client
 * is found gone; a request already recorded is not counted again.
 */
export function record(ctx: GatewayContext, s: RequestState, outcome: GatewayOutcome, status: number): void {
  if (s.recorded) return
  s.recorded = true
  // Denied before routing: counted under the route it would have gone to.
  const route = s.route ?? ctx.router.match(s.headers.host, s.target)
  const label = route !== undefined ? route.name : NO_ROUTE
  const m = route !== undefined ? (ctx.routeMetrics[route.index] as RouteMetrics) : ctx.metrics.route(NO_ROUTE)
  m.requests[outcome].inc()
  // A client that went away used its key (the request passed every check and went upstream, or
  // would have): counted as a request of the key, but neither as a refusal nor as an error
  // answer (no answer was given, and a slow upstream is not the key's doing).
  if (outcome === 'client_closed' || outcome === 'cut_at_shutdown') ctx.usage.count(s.key?.id, 'forwarded', ctx.now(), s.address)
  else ctx.usage.count(s.key?.id, outcome, ctx.now(), s.address, status, s.refusedKeyId)
  const ms = performance.now() - s.start
  m.duration.observe(ms / 1000)
  // A request answered before the client address stage (the request check's 400, 405, 501 and
  // 505) by its socket's address, as the answers given before any request state log it (no
  // X-Forwarded-For is read). Before (found by a review), such lines had an empty address.
  if (ctx.accessLog) logAccess(ctx.log, { id: s.id, method: s.req.method, path: loggedPath(s.target), status, outcome, route: label, address: s.address !== '' ? s.address : socketAddress(s.req.socket), keyId: s.key?.id ?? null, ms })
}

/** A socket's peer address as every access-log line gives it (`::ffff:127.0.0.1` is `127.0.0.1`), or null. */
export function socketAddress(socket: { remoteAddress?: string | undefined }): string | null {
  const peer = socket.remoteAddress
  return normalise(peer) ?? peer ?? null
}

/**
 * The path an access-log line gives of a request target: an origin-form one without its query; of
 * an absolute-form one, its URL's path alone (its user:password@ and query are never logged); of
 * anything else (CONNECT's authority, a target no URL parser reads), null. An absolute-form target
 * the request check refused (user information, another host than Host) is still absolute-form at
 * its answer: before (found by a review), its line gave it up to its query, password and all.
 */
export function loggedPath(target: string): string | null {
  if (target.startsWith('/')) return pathOf(target)
  return URL.canParse(target) ? new URL(target).pathname : null
}

/**
 * The access log's line of one request (`log.access_log`), for every request the gateway answers,
 * those answered before one is read whole (malformed, CONNECT, a bad Expect) included: one shape.
 */
export function logAccess(
  log: Logger,
  r: { id: string; method: string | null | undefined; path: string | null; status: number; outcome: string; route: string; address: string | null; keyId: string | null; ms: number },
): void {
  log.info('request', {
    request_id: r.id,
    method: r.method ?? null,
    path: r.path,
    status: r.status,
    outcome: r.outcome,
    route: r.route,
    address: r.address,
    key_id: r.keyId,
    duration_ms: Math.round(r.ms * 1000) / 1000,
  })
}

/**
 * Records a request whose connection closed before it was answered (once, as every request): its
 * client went away, or, past the shutdown deadline, the gateway ended it (before, found by a
 * review, those too were logged 499 client_closed, blaming the client for a cut a deploy made).
 */
export function recordClientClosed(ctx: GatewayContext, s: RequestState): void {
  if (ctx.cut) record(ctx, s, 'cut_at_shutdown', CUT_STATUS)
  else record(ctx, s, 'client_closed', CLIENT_CLOSED_STATUS)
}

function errorHeaders(ctx: GatewayContext, s: RequestState, code: Verdict, status: number, length: number): OutgoingHttpHeaders {
  const headers: OutgoingHttpHeaders = {
    'content-type': 'application/json; charset=utf-8',
    'content-length': length,
    'cache-control': 'no-store',
    'x-request-id': s.id,
  }
  if (status === 401) headers['www-authenticate'] = code === 'key_missing' ? ctx.challenges.missing : ctx.challenges.invalid
  if (s.rlLimit >= 0) {
    headers['ratelimit-limit'] = String(s.rlLimit)
    headers['ratelimit-remaining'] = String(s.rlRemaining)
    headers['ratelimit-reset'] = String(s.rlResetS)
  }
  if (status === 429) headers['retry-after'] = String(s.retryAfterS)
  if (status === 405) headers.allow = GATEWAY_ALLOW
  // An unread request body is not drained for a refused request: the connection closes instead.
  // Only a request that has a body: `complete` is false until the parser has seen the end of a
  // request, even one without a body, so a verdict reached at once (a missing key, a scope) closed
  // the connection at random, and the headers of two refusals differed. A bad key with a body
  // closes it always: one answered from the cache (a key once valid) is refused before its body
  // is read, one looked up in the store after, and the framing told them apart (found by a review).
  // A client of another HTTP version is not read further (what it sends next is not HTTP/1 framing).
  if (ctx.closing || code === 'version_not_supported' || (hasBody(s.headers) && (code === 'key_invalid' || !s.req.complete))) headers.connection = 'close'
  return headers
}

/** Answers a request with the JSON error for `code`. */
export function sendError(ctx: GatewayContext, s: RequestState, code: Verdict): void {
  const status = ERRORS[code].status
  const body = errorBody(code, s.id, s.message)
  const headers = errorHeaders(ctx, s, code, status, Buffer.byteLength(body))
  record(ctx, s, code, status)
  const res = s.res
  if (res) {
    if (res.headersSent) {
      res.destroy()
      return
    }
    // A body still coming is read and dropped for a while after the answer, which then closes
    // cleanly (closeWhenAnswered). Before (found by a review), the socket closed at once, the
    // bytes the client was still sending met a reset, and it could lose the refusal.
    if (headers.connection === 'close' && !s.req.complete && hasBody(s.headers)) closeWhenAnswered(s.req)
    res.writeHead(status, headers)
    res.end(body)
  } else if (s.socket) {
    headers.connection = 'close'
    writeRaw(s.socket, status, headers, body)
  }
}
