// Forwarding with undici: one Pool per upstream origin (keep-alive), request and response
// bodies streamed with back-pressure (the request body is the IncomingMessage itself, the
// response is written by a dispatch handler straight into the ServerResponse). Only an idempotent
// request without a body whose connection closed at once, before any answer, is sent again
// (Exchange.onResponseError). Hop-by-hop headers (and those named in Connection) are dropped both
// ways, every client-sent X-Keygate-* header is dropped (in any spelling an upstream reads as it:
// headerReading), and every X-Forwarded-* unless the peer is
// a trusted proxy; then X-Forwarded-For/-Proto/-Host, the identity headers and X-Request-Id set.
import { hash } from 'node:crypto'
import type { IncomingHttpHeaders, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { TLSSocket } from 'node:tls'
import { Pool, errors, type Dispatcher } from 'undici'
import type { Increment, RouteMetrics } from '../core/metrics.ts'
import { type KeySources, SOURCE_AUTHORIZATION, SOURCE_QUERY } from './key-extract.ts'
import { TRAILING_SLASHES, closeWhenAnswered, expectsContinue, hasBody, headerReading, lingerClose, nodeHttp, withoutOws } from '../core/http.ts'
import { record, recordClientClosed, sendError } from './respond.ts'
import { publicLocation, type CompiledRoute, type Router } from './route.ts'
import type { GatewayContext, RequestState, Verdict } from './state.ts'
import type { Tunnel, TunnelGuard } from './tunnels.ts'

/** Node's reason phrase of each status (node:http is not imported: core/http.ts nodeHttp). */
const STATUS_CODES = nodeHttp().STATUS_CODES

/** Never forwarded: hop-by-hop (RFC 9110 §7.6.1 and the usual non-standard ones), and headers the gateway sets itself. */
const REQUEST_DROP = new Set([
  'connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailer', 'transfer-encoding', 'upgrade',
  'http2-settings', 'expect', 'host', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'forwarded', 'x-real-ip', 'x-request-id',
  // Other names for the client's address (those CDNs set, and those libraries such as
  // request-ip read before X-Forwarded-For: a client's own would pass as its address), and the
  // request-URL overrides that IIS and older Symfony or Zend upstreams route by (past the route's scope check).
  'true-client-ip', 'client-ip', 'x-client-ip', 'x-cluster-client-ip', 'cf-connecting-ip', 'cf-connecting-ipv6', 'cf-pseudo-ipv4',
  'fastly-client-ip', 'x-appengine-user-ip', 'forwarded-for', 'x-forwarded', 'x-original-url', 'x-rewrite-url',
])
const RESPONSE_DROP = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'http2-settings'])
/**
 * For a 204 or a 101, which cannot have a body: a Content-Length there is forbidden (RFC 9110
 * §8.6), and an upstream's was passed on (`204 No Content` with `content-length: 5`). A 304's
 * stays: it names the size a 200 would have had, as RFC 9110 allows.
 */
const BODILESS_RESPONSE_DROP = new Set([...RESPONSE_DROP, 'content-length'])
/** The limit headers the gateway sets itself: an upstream's own are dropped where the gateway's go (two of each could not be read). */
const RATE_LIMIT_HEADERS = new Set(['ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset'])
const KEEP_ON_UPGRADE = new Set(['connection', 'upgrade'])
/** A response's Transfer-Encoding the gateway can pass on the body of (startResponse). */
const CHUNKED_ONLY = /^[ \t]*chunked[ \t]*$/i

/**
 * Names listed in a Connection header (other than the connection options themselves), as a Set:
 * every header of the request (or answer) is looked up in it. Before (found by a review of costs
 * a client drives), a list searched per header: a client's Connection naming as many headers as
 * its header block holds, beside as many lines as allowed, cost (names) x (lines) comparisons a
 * request: 20 times a plain request's CPU at the largest limits, now 6 (bench/RESULTS.md).
 */
export function connectionNamed(value: string | string[] | undefined): ReadonlySet<string> | undefined {
  // The usual values, already lower case: no copy made.
  if (value === undefined || value === 'keep-alive' || value === 'close') return undefined
  const v = (typeof value === 'string' ? value : value.join(',')).toLowerCase()
  if (v === 'keep-alive' || v === 'close') return undefined
  const out = new Set<string>()
  for (const part of v.split(',')) {
    // Compared with header names read as CGI reads them (headerReading): `Connection: X_Hop` names `X_Hop`.
    const name = headerReading(part.trim())
    if (name !== '' && name !== 'close' && name !== 'keep-alive') out.add(name)
  }
  return out.size > 0 ? out : undefined
}

/** The name of one `name=value` piece of a query, decoded as URLSearchParams (which found the key) decodes it. */
function paramName(piece: string): string {
  const eq = piece.indexOf('=')
  const raw = eq === -1 ? piece : piece.slice(0, eq)
  if (!raw.includes('%') && !raw.includes('+')) return raw
  // '&' first, or a leading '?' would be dropped as the start of a query.
  return new URLSearchParams('&' + raw).keys().next().value ?? ''
}

/**
 * A query parameter's name as PHP reads it: leading spaces dropped, `.` and space as `_`, and
 * `name[...]` as `name` (an array), cut at a NUL; `api.key`, `api key`, `api_key[]` and
 * `api_key%00x` are all `api_key` there.
 */
function phpParamName(name: string): string {
  let n = name.trimStart()
  // PHP reads a name as a C string: `api_key%00junk` is `api_key` to it (found by an attack review).
  const nul = n.indexOf('\0')
  if (nul !== -1) n = n.slice(0, nul)
  const bracket = n.indexOf('[')
  if (bracket > 0 && n.indexOf(']', bracket) !== -1) n = n.slice(0, bracket)
  return n.replace(/[. []/g, '_')
}

/** The query parameter a key source reads, in the forms upstreams read a name as it (withoutKeyParams). */
interface KeyParam {
  readonly name: string
  /** As PHP reads it (phpParamName). */
  readonly php: string
  /** In upper case, as ASP.NET compares names (OrdinalIgnoreCase: `API_KEY`, `Api_Key`). */
  readonly upper: string
}

/**
 * `query` without the pieces that name the key's parameter (`param`) to some upstream: by name as
 * URLSearchParams decodes it, as PHP reads it (phpParamName), in any letter case as ASP.NET reads
 * it, and also among `;`-separated pieces, which older CGI and servlet parsers split on
 * (`a=1;api_key=...`). The rest is kept byte for byte, `;` and `&` as they were.
 */
function withoutKeyParams(query: string, param: KeyParam): string {
  const named = (piece: string): boolean => {
    const name = paramName(piece)
    return name === param.name || phpParamName(name) === param.php || name.toUpperCase() === param.upper
  }
  const kept: string[] = []
  for (const piece of query.split('&')) {
    if (!piece.includes(';')) {
      if (!named(piece)) kept.push(piece)
      continue
    }
    const rest = piece.split(';').filter((sub) => !named(sub))
    if (rest.length > 0) kept.push(rest.join(';'))
  }
  return kept.join('&')
}

// A reason phrase (RFC 9112 §4: HTAB, SP, VCHAR, obs-text), as the bytes Node writes it in.
const PLAIN_REASON = /^[\t\x20-\x7e]*$/
const REASON = /^[\t\x20-\x7e\x80-\xff]*$/

/**
 * The reason phrase to answer with: the upstream's, or undefined for Node's own for the status
 * (the usual case, the same phrase: no work beyond the comparison). Before, the status's own always
 * went (`299 Custom Thing` reached the client as `299 unknown`; found by a review). undici decodes
 * the phrase as UTF-8 and Node writes it as latin1, one byte a character: a UTF-8 phrase is turned
 * back into its bytes, and one that was not UTF-8 (lost in the decoding), or that holds a control
 * character Node would refuse, gives way to the status's own.
 */
function reasonFor(statusCode: number, message: string | undefined): string | undefined {
  if (message === undefined || message === STATUS_CODES[statusCode]) return undefined
  if (PLAIN_REASON.test(message)) return message
  if (message.includes('\ufffd')) return undefined
  const bytes = Buffer.from(message, 'utf8').toString('latin1')
  return REASON.test(bytes) ? bytes : undefined
}

/**
 * A trusted proxy's X-Forwarded-Prefix as a path to put in front of the route's: '' for none,
 * for several (joined with commas), or for one that is not a plain path; without a trailing slash.
 * (TRAILING_SLASHES: before, found by a review, `/\/+$/` took 485 ms of the event loop for a
 * prefix of 16,000 slashes and a letter (bench/RESULTS.md), which a trusted proxy passing a client's header on lets
 * any client send; bench/patterns.ts.)
 */
export function outerPrefix(value: string | string[] | undefined): string {
  if (typeof value !== 'string' || !/^\/[!-+\--~]*$/.test(value)) return ''
  return value.replace(TRAILING_SLASHES, '')
}

/**
 * A trusted proxy's list header (X-Forwarded-For, -Proto, -Host) without empty members: a repeated
 * header is joined with commas before it is read, so an empty line left an empty member (found by
 * a review: `, 1.2.3.4` went upstream). Undefined when nothing is left. White space is HTTP's, a
 * space or a tab, as the client address's walk reads it (withoutOws): before (found by a
 * read-back), a member of a no-break space alone was dropped here as empty, where the walk took it
 * for an entry naming no address.
 */
function listed(value: string | string[] | undefined): string | undefined {
  if (typeof value !== 'string') return undefined
  if (!EMPTY_MEMBER.test(value)) return value
  const members = value.split(',').map(withoutOws).filter((v) => v !== '')
  return members.length === 0 ? undefined : members.join(', ')
}
/** A list with an empty member: blank, or a comma at either end or after another. */
const EMPTY_MEMBER = /^[ \t]*$|^[ \t]*,|,[ \t]*,|,[ \t]*$/

/** A response head written on a socket itself (an upgrade's answer): the status line and `fields`, a flat [name, value, ...] list. */
function rawHead(statusCode: number, reason: string, fields: readonly string[]): string {
  let head = `HTTP/1.1 ${statusCode} ${reason}\r\n`
  for (let i = 0; i < fields.length; i += 2) head += `${fields[i]}: ${fields[i + 1]}\r\n`
  return `${head}\r\n`
}

/**
 * Adds an upstream's response headers (of its answer, a 1xx or a 101) to `out`, the flat [name,
 * value, ...] list Node's writeHead and writeInformation take (repeated values, such as
 * Set-Cookie, stay separate lines): without those in `drop` and those its Connection names, but
 * for those in `keep` (a 101's Connection and Upgrade), and without its own RateLimit-* ones where
 * the gateway sets its own (`limited`). True when an X-Request-Id passed.
 */
function passHeaders(headers: IncomingHttpHeaders, drop: ReadonlySet<string>, limited: boolean, out: string[], keep?: ReadonlySet<string>): boolean {
  const named = connectionNamed(headers.connection)
  let hasRequestId = false
  for (const name in headers) {
    // Named ones in their reading, as connectionNamed gives them (`Connection: x.hop` names `X.Hop`).
    if ((drop.has(name) || (named !== undefined && named.has(headerReading(name)))) && (keep === undefined || !keep.has(name))) continue
    if (limited && name.charCodeAt(0) === 114 /* r */ && RATE_LIMIT_HEADERS.has(name)) continue
    const v = headers[name]
    if (v === undefined) continue
    if (name === 'x-request-id') hasRequestId = true
    if (typeof v === 'string') out.push(name, v)
    else for (const one of v) out.push(name, one)
  }
  return hasRequestId
}

/**
 * Writes a 103 Early Hints with `fields` (a flat list). Node 24.18 and later write them as they
 * are (`writeInformation`). Before it, `writeEarlyHints` is the only way, and cannot carry every
 * 103 faithfully: without a Link it sends nothing, it refuses a Link line that is not one link of
 * the form it checks (several links on one line, comma-separated, included), and it writes the
 * repeated lines of any other field as one.
 */
function writeEarlyHints(res: ServerResponse, fields: string[]): void {
  const r = res as { writeInformation?: (statusCode: number, headers: readonly string[]) => void }
  if (r.writeInformation !== undefined) return r.writeInformation(103, fields)
  const hints: Record<string, string> & { link?: string[] } = {}
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i] as string
    const value = fields[i + 1] as string
    if (name === 'link') (hints.link ??= []).push(value)
    else hints[name] = hints[name] === undefined ? value : `${hints[name]}, ${value}`
  }
  res.writeEarlyHints(hints)
}

interface ForwardOptions {
  ctx: GatewayContext
  router: Router
  /** With it, a key source's credential is never forwarded: the API key header in any spelling, the query parameter's look-alikes (when a source), and the Authorization header the key came in. */
  stripCredential: boolean
  keySources: KeySources
  /** A tunnel with no traffic either way for this long is closed (0: never). */
  tunnelIdleMs: number
  /** A request body that brings nothing for this long is cut off (0: never). */
  bodyIdleMs: number
  /** An answer the client takes none of for this long is cut off (0: never). */
  sendIdleMs: number
  /** The largest response head taken from an upstream (undici's maxHeaderSize; its default was 16 KiB). */
  maxResponseHeaderBytes: number
  /** Ends tunnels whose key or address the checks no longer allow. */
  guard: TunnelGuard
  /** Send the client's address in X-Real-IP too (gateway.set_x_real_ip). */
  setRealIp?: boolean
}

export interface Forwarder {
  forward(s: RequestState): void
  /** `changesBefore`: the tunnel guard's count of key changes when the upgrade arrived. */
  upgrade(s: RequestState, changesBefore: number): void
  /** Client sockets of upgraded (WebSocket) connections still open, with their route's name. */
  readonly tunnels: Map<Duplex, string>
  close(): Promise<void>
  destroy(): Promise<void>
}

/** The Sec-WebSocket-Accept that answers a WebSocket offer's Sec-WebSocket-Key (RFC 6455 §4.2.2). */
function webSocketAccept(key: string): string {
  return hash('sha1', `${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`, 'base64')
}

function timeoutCode(err: unknown): Verdict {
  const code = (err as { code?: unknown }).code
  // A body timeout here is an answer whose head came but none of its body in time (Exchange.onResponseStart).
  return code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT' ? 'upstream_timeout' : 'upstream_unavailable'
}

/**
 * The failures of a connection that closed under a request: the upstream's end of an idle
 * keep-alive connection closing as the request was sent on it (undici's "other side closed", a
 * reset, a broken pipe).
 */
const CLOSED_UNDER = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE'])
/**
 * How soon after a request was written its connection must have failed for it to be sent again
 * (Exchange.onResponseError): an upstream's close of an idle connection comes back within a round
 * trip; a failure later is an upstream that worked on the request.
 */
const CLOSED_AT_ONCE_MS = 50
/**
 * An Authorization field's parts that could be the key: runs of the characters a key holds
 * (letters, digits, `_` and `-`: every key format's, a legacy UUID's too), around anything else.
 * Before (found by a fuzzing review), only spaces, commas, `=` and quotes parted them, and
 * `Bearer:<key>`, `Bearer.<key>`, `Bearer\xe6<key>` or `Token <key>;` went upstream whole, where a
 * lenient upstream (`value.slice(7)`, a split on `:` or `.`) reads the key; `Token <key>x` is a
 * longer credential, and goes on.
 */
const AUTHORIZATION_PARTS = /[^A-Za-z0-9_-]+/
const BASIC = /^\s*basic\s+([A-Za-z0-9+/=_-]+)\s*$/i

/**
 * Whether an Authorization field the key was not read from carries the same key all the same: as
 * one of its parts after any scheme (`Token <key>`, `ApiKey key=<key>`) or as a Basic credential's
 * user or password. Compared whole, not as a substring, so that a legacy key short enough to occur
 * inside another credential does not take that one away; and in any letter case, as a legacy key
 * is read (core/keys/format.ts), and a kg_ key's secret with its case changed is still most of it.
 */
function carriesKey(value: string | undefined, presented: string): boolean {
  if (value === undefined) return false
  const key = presented.toLowerCase()
  const field = value.toLowerCase()
  // Split only when the key is in it somewhere (most Authorization fields beside a key are not it).
  if (field.includes(key) && field.split(AUTHORIZATION_PARTS).includes(key)) return true
  // Each credential of the field: two Authorization lines arrive joined with ", " (the server runs
  // with joinDuplicateHeaders), and base64 has no comma. Before (found by a fuzzing review), a
  // Basic credential sent twice was no Basic credential here, and went upstream with the key.
  for (const part of value.split(',')) {
    const basic = BASIC.exec(part)?.[1]
    if (basic === undefined) continue
    const pair = Buffer.from(basic, 'base64').toString('latin1').toLowerCase()
    const colon = pair.indexOf(':')
    if (colon === -1 ? pair === key : pair.slice(0, colon) === key || pair.slice(colon + 1) === key) return true
  }
  return false
}

/** The methods RFC 9110 §9.2.2 calls idempotent: a request of one may be sent again. */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE', 'PUT', 'DELETE'])

/** An upstream answer's head as the client gets it, not yet written (Exchange.onResponseStart). */
interface Head {
  statusCode: number
  reason: string | undefined
  fields: string[]
  /** The connection is closed after this answer (its end came before the request body was read): the head says so. */
  closes?: boolean
}

interface ExchangeHooks {
  /** The upstream's answer head, checked and filtered for the client; undefined when the client is gone or the answer was refused (then answered). */
  startResponse(s: RequestState, statusCode: number, headers: IncomingHttpHeaders, statusMessage: string | undefined): Head | undefined
  /** Writes the head startResponse gave, and counts the request forwarded. */
  writeHead(s: RequestState, head: Head): void
  /** Sends the request of `exchange` again, on its route's pool (Exchange.onResponseError). */
  retry(s: RequestState, exchange: Exchange, request: Dispatcher.DispatchOptions): void
  /** The upstream sent 103 Early Hints. */
  earlyHints(s: RequestState, headers: IncomingHttpHeaders): void
  /** `headCame`: the upstream's answer head came, and was not passed on (none of its body came). */
  failed(s: RequestState, err: Error, headCame: boolean): void
  /** The client went away before the answer's head was written. */
  clientClosed(s: RequestState): void
  /** The client's socket was full for the first time in this answer: from now on, it is watched for taking none of it. */
  held(s: RequestState): void
}

/**
 * Calls `idle` once `moved()` has answered false at every check for `idleMs`, checking every
 * quarter of it (50 ms at least): one timer per watch, whatever the traffic. `moved()` says
 * whether anything moved since it was last asked (it keeps its own count). Returns the stop.
 */
function watchIdle(idleMs: number, moved: () => boolean, idle: () => void): () => void {
  const every = Math.max(50, Math.floor(idleMs / 4))
  let last = performance.now()
  let timer: NodeJS.Timeout | undefined
  const tick = () => {
    const now = performance.now()
    if (moved()) last = now
    if (now - last < idleMs) timer = setTimeout(tick, every)
    else idle()
  }
  timer = setTimeout(tick, every)
  return () => clearTimeout(timer)
}

/** What a client may send while the upstream answers its upgrade, kept for the tunnel (more is not read until it opens). */
const EARLY_BYTES = 65_536
const CLIENT_GONE = Object.assign(new Error('the client closed the connection'), { code: 'KEYGATE_CLIENT_GONE' })
const BODY_IDLE = 'KEYGATE_BODY_IDLE'

/**
 * One forwarded request as an undici dispatch handler: the response head is written when the
 * upstream's arrives, body chunks go straight into the ServerResponse (the upstream is paused
 * while the client's socket is full and resumed on 'drain'), and a client that goes away aborts
 * the upstream request (and the request is recorded as client_closed). This is what undici's
 * `stream()` does, without its per-request async resource, promise plumbing and four listeners
 * on the response.
 */
class Exchange implements Dispatcher.DispatchHandler {
  readonly #s: RequestState
  readonly #hooks: ExchangeHooks
  readonly #timeoutMs: number
  #controller: Dispatcher.DispatchController | undefined
  #streaming = false
  /** Whether the answer has waited for the client once (ExchangeHooks.held). */
  #held = false
  #done = false
  #answered = false
  #bodyError: Error | undefined
  /** The answer's head, until the first byte of its body (or its end) is passed on. */
  #head: Head | undefined
  #answerTimer: NodeJS.Timeout | undefined
  /** Whether the upstream sent a response head (a 1xx included). */
  #heard = false
  /** When the request was written, while it may be sent again. */
  #sentAt: number | undefined
  /** The request, while it may still be sent again: idempotent, without a body, not yet sent twice. */
  retryable: Dispatcher.DispatchOptions | undefined

  constructor(s: RequestState, hooks: ExchangeHooks, timeoutMs: number) {
    this.#s = s
    this.#hooks = hooks
    this.#timeoutMs = timeoutMs
  }

  /**
   * For a request with a body, the route's timeout, which undici's headersTimeout cannot give:
   * undici's timer also runs while the body is being written (refreshed only when a write fills
   * the socket), so an upload to an upstream that reads slowly got 504 after timeout_ms although
   * it kept moving. Here it counts from the moment the body has been handed over to the response
   * head; while the body is written, the body watch judges an upstream that stops taking it
   * (`timedOut`). A request without a body keeps undici's timer, which costs no timer of its own.
   */
  onRequestSent(): void {
    if (this.retryable !== undefined) this.#sentAt = performance.now()
    if (this.#timeoutMs === 0 || this.#answered || this.#done) return
    this.#answerTimer = setTimeout(this.timedOut, this.#timeoutMs)
  }

  /** The upstream did not answer (or take the body) in time: 504 upstream_timeout, as undici's own timer answers it. */
  readonly timedOut = (): void => {
    if (!this.#answered && !this.#done) this.#controller?.abort(new errors.HeadersTimeoutError())
  }

  onRequestStart(controller: Dispatcher.DispatchController): void {
    this.#controller = controller
    if (this.#done) controller.abort(CLIENT_GONE)
    else if (this.#bodyError !== undefined) controller.abort(this.#bodyError)
  }

  onResponseStart(controller: Dispatcher.DispatchController, statusCode: number, headers: IncomingHttpHeaders, statusMessage?: string): void {
    // 1xx answers are interim: a 103 is passed on (RFC 9110 §15.2: a proxy forwards them; before,
    // every 1xx was dropped, found by a review); 100-continue was answered by the gateway itself,
    // and undici refuses an upstream's 100 it did not ask for. Other 1xx are not passed on.
    if (this.#done) return
    this.#heard = true
    if (statusCode < 200) {
      if (statusCode === 103) this.#hooks.earlyHints(this.#s, headers)
      return
    }
    this.#answered = true
    clearTimeout(this.#answerTimer)
    const head = this.#hooks.startResponse(this.#s, statusCode, headers, statusMessage)
    if (head === undefined) {
      this.#done = true
      controller.abort(CLIENT_GONE)
      return
    }
    // Written with the first byte of the body, or at its end: Node holds a head back until then
    // anyway, so an answer that breaks off before any of its body came has given the client
    // nothing, and is answered as a failure before the head (502, 504). Before (found by an
    // upstream fuzzing review), it was written here, and such an answer reached the client as a
    // closed connection alone, counted forwarded with the upstream's status.
    this.#head = head
    this.#streaming = true
  }

  /** Writes the answer's head, once. */
  #passHead(): void {
    const head = this.#head
    if (head === undefined) return
    this.#head = undefined
    this.#hooks.writeHead(this.#s, head)
  }

  onResponseData(controller: Dispatcher.DispatchController, chunk: Buffer): void {
    if (!this.#streaming) return
    this.#passHead()
    const res = this.#s.res as NonNullable<RequestState['res']>
    if (!res.write(chunk)) {
      controller.pause()
      res.once('drain', () => controller.resume())
      if (!this.#held) {
        this.#held = true
        this.#hooks.held(this.#s)
      }
    }
  }

  onResponseEnd(): void {
    if (!this.#streaming) return
    this.#streaming = false
    this.#done = true
    const s = this.#s
    const res = s.res as NonNullable<RequestState['res']> & { _last?: boolean }
    // The answer ended before the gateway had read the whole request body (an early 413, a
    // refusal): whoever was reading it (undici) lets it go now, and nothing would read the rest.
    // Before, the connection was kept, paused with the rest unread: the next request on it was
    // never read, and Node's keep-alive timer reset it 6 s later (found by a review). Now it is
    // closed after the answer, in stages (closeWhenAnswered; `_last` is what Node reads to close
    // once the response is written). Judged at the end, not when the head is written: an upstream
    // that answers at once and reads the whole body while it answers (a stream, a progress
    // report) keeps the connection (decided at the head, it lost it: found by a later review). A
    // request without a body is complete by then: one property read.
    if (!s.req.complete && hasBody(s.headers)) {
      res._last = true
      closeWhenAnswered(s.req)
      // A head still held (an answer without a body) says so: before, it said keep-alive, as a
      // head written before the end did (found by a read-back).
      if (this.#head !== undefined) this.#head.closes = true
    }
    this.#passHead()
    res.end()
  }

  onResponseError(_controller: Dispatcher.DispatchController | undefined, err: Error): void {
    clearTimeout(this.#answerTimer)
    if (this.#done) return
    // A connection closed under the request at once, before the upstream answered, which is how an
    // idle keep-alive connection the upstream closes just as a request is sent on it fails: an
    // idempotent request without a body goes again, once, as nginx sends a request again that
    // failed on a cached connection (found by a review: an upstream closing idle connections
    // before keepalive_timeout_ms, every 200 ms there, had 20 of 150 requests answered 502).
    // "At once": within CLOSED_AT_ONCE_MS of being written (or while it was written), the time
    // the upstream's close takes to come back. undici does not say whether the connection was a
    // kept one; a connection that fails later came to an upstream that worked on the request and
    // then died (a crash, a worker killed on its timeout), which must not run it twice (found by a
    // review: retried, it ran twice and its 504 came after twice timeout_ms). undici's
    // RetryHandler is not used: it also retries on status codes and after a backoff, resumes a
    // broken answer by Range, and would wrap every request.
    const request = this.retryable
    if (
      request !== undefined &&
      !this.#heard &&
      CLOSED_UNDER.has((err as { code?: string }).code as string) &&
      (this.#sentAt === undefined || performance.now() - this.#sentAt <= CLOSED_AT_ONCE_MS)
    ) {
      this.retryable = undefined
      this.#controller = undefined
      this.#hooks.retry(this.#s, this, request)
      return
    }
    this.#done = true
    this.#streaming = false
    // A head not written yet was never passed on: failed() answers as before any head.
    const headCame = this.#head !== undefined
    this.#head = undefined
    this.#hooks.failed(this.#s, err, headCame)
  }

  /** The response closed: finished, or the client went away (then the upstream request is aborted). */
  readonly clientClosed = (): void => {
    clearTimeout(this.#answerTimer)
    if (this.#done) return
    this.#done = true
    this.#streaming = false
    this.#controller?.abort(CLIENT_GONE)
    this.#hooks.clientClosed(this.#s)
  }

  /** The request body failed (the client's upload broke off, or stalled); false when the exchange was over already. */
  bodyFailed(err: Error): boolean {
    if (this.#done) return false
    this.#bodyError ??= err
    this.#controller?.abort(err)
    return true
  }
}

/**
 * The client is gone when its response (or the response's socket) is. Not when the request is
 * destroyed: Node destroys a request once its body has been read, so a request with a body whose
 * upstream failed would never be answered, and its client would wait for ever.
 */
function clientGone(s: RequestState): boolean {
  const res = s.res
  return res === undefined || res.destroyed || res.socket?.destroyed === true
}

export function createForwarder(o: ForwardOptions): Forwarder {
  const { ctx, router, stripCredential, keySources: sources, guard, tunnelIdleMs, bodyIdleMs, sendIdleMs, maxResponseHeaderBytes } = o
  /**
   * What a failure of the upstream's answer says, where the status alone does not: a head too large
   * to take, not "could not be reached" (before, found by a review: a 17 KB Set-Cookie was that, at
   * undici's 16 KiB default; and an upgrade's answer, by a later one); an answer whose head came
   * and was not passed on (`headCame`), none of its body having come, or not in time.
   */
  const answerFailure = (err: Error, headCame: boolean): string | undefined => {
    const code = (err as { code?: unknown }).code
    if (code === 'UND_ERR_HEADERS_OVERFLOW') return `The upstream's response head is larger than ${maxResponseHeaderBytes} bytes (gateway.max_response_header_bytes).`
    if (!headCame) return undefined
    return code === 'UND_ERR_BODY_TIMEOUT' ? "The upstream's answer brought none of its body in time." : "The upstream's answer broke off before any of its body came."
  }
  const setRealIp = o.setRealIp === true
  // Every spelling (`X_API_KEY` reaches PHP as the same variable), and also when the request's key
  // came from elsewhere: an X-API-Key there was read as a key, so it is a credential either way.
  // Its own reading (headerReading) as configured: letters, digits and `-` only (the api-key-header format).
  const apiKeyName = stripCredential ? sources.header : undefined
  const queryParam = sources.queryParam
  const dropQueryLookAlikes = stripCredential && sources.query
  const keyParam: KeyParam = { name: queryParam, php: phpParamName(queryParam), upper: queryParam.toUpperCase() }
  // What a query that could name the parameter holds: the name's part before any character PHP
  // reads otherwise (`api` of `api_key`, `k` of `k.v`; before, its first three characters, which
  // missed `k_v` for `k.v`: found by a review), in any letter case (ASP.NET's `API_KEY`; a
  // non-ASCII letter it reads as one, `ı` as `I`, comes percent-encoded), or an escape. Empty (a
  // name that starts so): every query. The hint is letters, digits and `-` (what query_param's
  // pattern leaves before those characters), no regular expression syntax.
  const queryHint = queryParam.split(/[._ []/)[0] as string
  const queryHintAnyCase = new RegExp(queryHint, 'gi')
  const mayNameKeyParam = (target: string, q: number): boolean => {
    queryHintAnyCase.lastIndex = q
    return queryHintAnyCase.test(target) || target.includes('%', q)
  }
  const pools = new Map<string, Pool>()
  const routePool: Pool[] = []
  const routeMetrics = ctx.routeMetrics
  for (const r of router.routes) {
    let pool = pools.get(r.origin)
    if (!pool) {
      const sharing = router.routes.filter((x) => x.origin === r.origin)
      const connectTimeout = Math.min(10_000, ...sharing.map((x) => x.timeoutMs))
      // Routes to one origin share its connections: the shortest idle time any of them allows.
      const keepAliveTimeout = Math.min(...sharing.map((x) => x.keepaliveMs))
      // keepAliveMaxTimeout too: undici follows an upstream's longer `Keep-Alive: timeout=` hint up to
      // it (600 s by default), past the route's setting (found by a review).
      pool = new Pool(r.origin, { connect: { timeout: connectTimeout }, keepAliveTimeout, keepAliveMaxTimeout: keepAliveTimeout, maxHeaderSize: maxResponseHeaderBytes })
      pools.set(r.origin, pool)
    }
    routePool[r.index] = pool
  }
  const tunnels = new Map<Duplex, string>()

  // For upgrades undici writes Connection and Upgrade itself (from `protocol`).
  // A flat [name, value, ...] list: undici takes it as it is, and unlike an object built name by
  // name (and pruned with `delete`) it never changes shape per request.
  const upstreamHeaders = (s: RequestState, route: CompiledRoute): string[] => {
    const h = s.headers
    const out: string[] = []
    const named = connectionNamed(h.connection)
    const dropAuthorization = stripCredential && (s.keySources & SOURCE_AUTHORIZATION) !== 0
    const trusted = s.peerTrusted
    for (const key in h) {
      // CGI, WSGI and PHP read `_` (lighttpd `.`, `~` and the rest too) as `-`: `X_Keygate_Scopes`
      // and `X.Keygate.Scopes` must not pass as the real one (headerReading).
      const name = headerReading(key)
      if (REQUEST_DROP.has(name)) continue
      if (name.charCodeAt(0) === 120 /* x */) {
        if (name.startsWith('x-keygate-')) continue
        // Only a trusted proxy says how the request reached it (X-Forwarded-Port, -Prefix, -Ssl...).
        // X-Script-Name too: the prefix WSGI middleware (werkzeug's ProxyFix, Flask recipes) mounts an
        // application under, as a proxy sets it (found by a review: passed from any client).
        if (!trusted && (name.startsWith('x-forwarded-') || name === 'x-script-name')) continue
        // A route that strips its prefix says which (below), after a trusted proxy's own.
        if (route.forwardedPrefix !== undefined && name === 'x-forwarded-prefix') continue
      }
      // The API key header, in any spelling (gateway.api_key_header need not begin with x): `name`
      // is the header's reading (headerReading), so this is isApiKeyHeader, without a call per header.
      if (name === apiKeyName) continue
      // The key in an Authorization it was not read from (another scheme, a Basic user or
      // password; before, left open by a review, it went upstream), looked at only then.
      if (name === 'authorization' && (dropAuthorization || (stripCredential && s.presented !== undefined && carriesKey(h.authorization, s.presented)))) continue
      if (named !== undefined && named.has(name)) continue
      const v = h[key]
      if (v !== undefined) out.push(key, typeof v === 'string' ? v : v.join(', '))
    }
    if (route.preserveHost && h.host !== undefined) out.push('host', h.host)
    // A trusted proxy's empty header is none (before, found by a review: an empty X-Forwarded-For
    // went upstream as ", 127.0.0.2", with an empty first entry; empty -Proto and -Host as such).
    const xff = trusted ? listed(h['x-forwarded-for']) : undefined
    out.push('x-forwarded-for', xff !== undefined ? `${xff}, ${s.peer}` : s.address)
    // The address the checks judged by (a client's own X-Real-IP is in REQUEST_DROP).
    if (setRealIp) out.push('x-real-ip', s.address)
    const xfp = trusted ? listed(h['x-forwarded-proto']) : undefined
    out.push('x-forwarded-proto', xfp ?? ((s.req.socket as TLSSocket).encrypted ? 'https' : 'http'))
    const xfh = trusted ? listed(h['x-forwarded-host']) : undefined
    const host = xfh ?? h.host
    if (host !== undefined) out.push('x-forwarded-host', host)
    // As Kong sends it: the path the upstream was mounted under, so it can build its own links
    // (before, found by a review: nothing told it the prefix it never saw).
    if (route.forwardedPrefix !== undefined) out.push('x-forwarded-prefix', (trusted ? outerPrefix(h['x-forwarded-prefix']) : '') + route.forwardedPrefix)
    const k = s.key
    if (k !== undefined) out.push('x-keygate-key-id', k.id, 'x-keygate-key-name', k.name, 'x-keygate-key-type', k.type, 'x-keygate-scopes', k.scopes.header)
    out.push('x-request-id', s.id)
    return out
  }

  const targetFor = (s: RequestState, route: CompiledRoute): string => {
    let target = s.target
    // The key's parameter, and whatever PHP or a `;`-splitting parser would read as it, also when
    // the request's key came from elsewhere (as X-API-Key's spellings; before, `api.key=`,
    // `api_key[]=` and `a=1;api_key=` went upstream with a copy of the key; found by a review).
    const q = dropQueryLookAlikes ? target.indexOf('?') : -1
    if (q !== -1 && ((s.keySources & SOURCE_QUERY) !== 0 || mayNameKeyParam(target, q))) {
      // Only the key's parameters go; the others stay byte for byte (re-encoding the query would
      // break signed URLs, and turn `%20` into `+`, which only form decoding reads as a space).
      // The query as key extraction parsed it: URLSearchParams drops one leading `?`.
      const lead = target.charCodeAt(q + 1) === 63 /* ? */ ? 1 : 0
      const rest = withoutKeyParams(target.slice(q + 1 + lead), keyParam)
      target = target.slice(0, q) + (rest === '' ? '' : (lead ? '??' : '?') + rest)
    }
    return router.upstreamPath(route, target)
  }

  /** An upstream answer's header fields as the client gets them: filtered, completed (request id, rate limits), a redirect to the upstream's own address rewritten. */
  const answerFields = (s: RequestState, route: CompiledRoute, statusCode: number, headers: IncomingHttpHeaders, keep?: ReadonlySet<string>): string[] => {
    const out: string[] = []
    if (!passHeaders(headers, statusCode === 204 || statusCode === 101 ? BODILESS_RESPONSE_DROP : RESPONSE_DROP, s.rlLimit >= 0, out, keep)) out.push('x-request-id', s.id)
    // Before (found by a review): an upstream's redirect to its own address reached the client,
    // which cannot reach it, and left the route's prefix out under strip_prefix.
    // Each line, where an upstream sent several; and only into a path that comes back to this
    // route (before, found by a review, `/base/other` on a route `/b` became `/other`, another
    // route's), under a trusted proxy's own prefix.
    if (route.rewriteRedirects && headers.location !== undefined) {
      const outer = s.peerTrusted ? outerPrefix(s.headers['x-forwarded-prefix']) : ''
      for (let i = 0; i < out.length; i += 2) {
        if (out[i] !== 'location') continue
        const rewritten = publicLocation(route, out[i + 1] as string, outer)
        if (rewritten !== undefined && router.match(s.headers.host, rewritten.slice(outer.length)) === route) out[i + 1] = rewritten
      }
    }
    // Strings, not numbers: Node's header checks take a number down a slower, generic path.
    if (s.rlLimit >= 0) out.push('ratelimit-limit', String(s.rlLimit), 'ratelimit-remaining', String(s.rlRemaining), 'ratelimit-reset', String(s.rlResetS))
    return out
  }

  /**
   * Whether an upstream's answer has a transfer coding other than chunked (`gzip, chunked`), which
   * is then logged and said in the request's message: undici takes the chunks off and hands over
   * what they held, still coded, and Transfer-Encoding is hop-by-hop, so the client got gzip bytes
   * with nothing saying so (found by a review). Refused, as nginx refuses an upstream's unknown
   * Transfer-Encoding; a request with one is refused likewise (501). Also an upgrade's answer
   * other than 101, passed on as any answer (before, found by a later review, it was not checked).
   */
  const codedBeyondChunked = (s: RequestState, route: CompiledRoute, headers: IncomingHttpHeaders): boolean => {
    const te = headers['transfer-encoding']
    if (te === undefined || (typeof te === 'string' && CHUNKED_ONLY.test(te))) return false
    ctx.log.warn('upstream answered with a transfer coding other than chunked; not passed on', { request_id: s.id, route: route.name, transfer_encoding: String(te).slice(0, 100) })
    s.message = "The upstream's answer has a transfer coding other than chunked, which cannot be passed on."
    return true
  }

  /** The response head: upstream latency, headers filtered and completed (Exchange writes it with writeHead); undefined when the client is gone or the answer is refused. */
  const startResponse = (s: RequestState, statusCode: number, headers: IncomingHttpHeaders, statusMessage: string | undefined): Head | undefined => {
    const res = s.res as NonNullable<RequestState['res']>
    const route = s.route as CompiledRoute
    const m = routeMetrics[route.index] as RouteMetrics
    m.upstream.observe((performance.now() - s.upstreamStart) / 1000)
    m.upstreamStatus[(statusCode / 100) | 0]?.inc()
    if (res.destroyed) {
      recordClientClosed(ctx, s)
      return undefined
    }
    if (codedBeyondChunked(s, route, headers)) {
      sendError(ctx, s, 'upstream_unavailable')
      return undefined
    }
    return { statusCode, reason: reasonFor(statusCode, statusMessage), fields: answerFields(s, route, statusCode, headers) }
  }

  const writeHead = (s: RequestState, head: Head): void => {
    if (ctx.closing || head.closes === true) head.fields.push('connection', 'close')
    ;(s.res as NonNullable<RequestState['res']>).writeHead(head.statusCode, head.reason, head.fields)
    record(ctx, s, 'forwarded', head.statusCode)
  }

  /** An upstream's 103, passed on to an HTTP/1.1 client (an HTTP/1.0 one cannot take a 1xx: RFC 9110 §15.2), its hop-by-hop fields dropped. */
  const earlyHints = (s: RequestState, headers: IncomingHttpHeaders): void => {
    const req = s.req
    const res = s.res as NonNullable<RequestState['res']>
    if (req.httpVersionMajor !== 1 || req.httpVersionMinor !== 1 || res.headersSent || clientGone(s)) return
    try {
      const fields: string[] = []
      // No Content-Length: RFC 9110 §8.6 forbids one on a 1xx, as on a 204.
      passHeaders(headers, BODILESS_RESPONSE_DROP, s.rlLimit >= 0, fields)
      writeEarlyHints(res, fields)
    } catch (err) {
      // A field Node refuses to write: the hints only help, and the answer goes on without them.
      ctx.log.debug('an upstream 103 was not passed on', { request_id: s.id, err })
    }
  }

  /**
   * An upstream answer that broke off after its head was passed on (a reset, `timeout_ms` between
   * two chunks): counted `forwarded` at its head, with its status, the break is said here (before,
   * it left no trace; found by a review). The caller closes the client's connection.
   */
  const brokeOff = (s: RequestState, err: Error): void => {
    const route = s.route as CompiledRoute
    ;(ctx.routeMetrics[route.index] as RouteMetrics).cutOff.inc()
    ctx.log.warn('upstream response broke off after its head was passed on; the client connection is closed', { request_id: s.id, route: route.name, err })
  }

  const failed = (s: RequestState, err: Error, headCame: boolean): void => {
    const res = s.res as NonNullable<RequestState['res']>
    if (clientGone(s)) {
      recordClientClosed(ctx, s)
      return
    }
    if (res.headersSent) {
      // Not a client body that stalled after an early answer: that is the client's doing, cut as
      // its own (BODY_IDLE).
      if ((err as { code?: string }).code !== BODY_IDLE) brokeOff(s, err)
      res.destroy()
      return
    }
    const code = (err as { code?: string }).code
    if (code === 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH') {
      s.message = 'The request body does not match its Content-Length.'
      sendError(ctx, s, 'bad_request')
      return
    }
    if (code === BODY_IDLE) {
      // The rest of the body will not come: the connection cannot carry another request.
      res.shouldKeepAlive = false
      s.message = `The request body brought nothing for ${bodyIdleMs / 1000} s.`
      sendError(ctx, s, 'request_timeout')
      return
    }
    ctx.log.warn('upstream request failed', { request_id: s.id, route: s.route?.name, err })
    s.message = answerFailure(err, headCame) ?? s.message
    sendError(ctx, s, timeoutCode(err))
  }

  /**
   * An upload may take as long as it takes while it moves (the server has no total request
   * timeout); one that brings nothing for `bodyIdleMs` while the gateway waits for it is cut, as
   * nginx's client_body_timeout does. The watch is this request's own (a socket's idle timer
   * would be shared with the next request pipelined on it) and reads progress from the socket's
   * byte count, never from a 'data' listener (which would start the body flowing before undici
   * takes it). It does not count while the body is paused because the upstream is not taking it:
   * not the client's fault. An upstream that takes none of it for the longer of `bodyIdleMs` and
   * the route's timeout is judged instead (504 upstream_timeout), as nginx's proxy_send_timeout
   * does: the kernel makes room for more in steps of megabytes, so a slow reader can go seconds
   * without taking a byte, and neither the client's idle bound nor the wait for an answer alone
   * is long enough to tell it from one that stopped. Once the body is in, the route's timeout
   * applies to the wait for the answer. A body still stalled after the answer was sent closes the
   * connection.
   */
  const watchBody = (req: RequestState['req'], exchange: Exchange, timeoutMs: number): void => {
    const stuckMs = Math.max(bodyIdleMs, timeoutMs)
    const socket = req.socket
    let seen = socket.bytesRead
    let heldSince: number | undefined
    // With body_idle_timeout_ms 0 a stalled client is never cut, but an upstream that takes
    // nothing still is (before, 0 turned that off too, and such a request waited for ever).
    const stop = watchIdle(
      bodyIdleMs > 0 ? bodyIdleMs : stuckMs,
      () => {
        const held = req.isPaused() || socket.isPaused()
        if (socket.bytesRead === seen && !held) return bodyIdleMs === 0
        if (socket.bytesRead !== seen || !held) heldSince = undefined
        else if (heldSince === undefined) heldSince = performance.now()
        else if (performance.now() - heldSince >= stuckMs) exchange.timedOut()
        seen = socket.bytesRead
        return true
      },
      () => {
        const err = Object.assign(new Error(`the request body brought nothing for ${bodyIdleMs} ms`), { code: BODY_IDLE })
        if (!exchange.bodyFailed(err)) socket.destroy()
      },
    )
    req.once('end', stop).once('close', stop)
  }

  /**
   * An answer the client takes none of for `sendIdleMs` is cut off, as nginx's send_timeout cuts
   * one: its connection is closed, and with it the upstream's response (Exchange.clientClosed).
   * Before (found by a review), a client that read the first bytes of a download and then nothing,
   * without closing, held the upstream's response paused for ever (and a worker of a synchronous
   * upstream server with it). Watched from the first time the client's socket is full (a client
   * that keeps up is never watched) until the answer is handed over whole: what waits to be
   * written on the socket must shrink, or be gone, within each `sendIdleMs`. It shrinks as the
   * kernel takes more, which it does as the client reads, in steps of up to its send buffer.
   * Returns the stop (undefined when nothing is watched), for the caller to call when the answer
   * is handed over or its connection closed.
   */
  const watchSend = (s: RequestState, socket: Socket | null): (() => void) | undefined => {
    if (sendIdleMs === 0 || socket === null) return undefined
    let waiting = -1
    return watchIdle(
      sendIdleMs,
      () => {
        const now = socket.writableLength
        const moved = now === 0 || now !== waiting
        waiting = now
        return moved
      },
      () => {
        ctx.log.info('the client took none of its answer for gateway.send_timeout_ms; its connection is closed', { request_id: s.id, route: s.route?.name, send_timeout_ms: sendIdleMs })
        socket.destroy()
      },
    )
  }

  const dispatch = (route: CompiledRoute, request: Dispatcher.DispatchOptions, exchange: Exchange): void => {
    try {
      ;(routePool[route.index] as Pool).dispatch(request, exchange)
    } catch (err) {
      exchange.onResponseError(undefined, err as Error)
    }
  }
  const retry = (s: RequestState, exchange: Exchange, request: Dispatcher.DispatchOptions): void => {
    const route = s.route as CompiledRoute
    ;(routeMetrics[route.index] as RouteMetrics).retried.inc()
    ctx.log.debug('upstream connection closed before any answer; sending the request again', { request_id: s.id, route: route.name })
    // Within what is left of the route's timeout, counted from the first try.
    const left = Math.max(1, Math.round(route.timeoutMs - (performance.now() - s.upstreamStart)))
    dispatch(route, { ...request, headersTimeout: left }, exchange)
  }
  const held = (s: RequestState): void => {
    const res = s.res as NonNullable<RequestState['res']>
    const stop = watchSend(s, res.socket)
    if (stop !== undefined) res.once('finish', stop).once('close', stop)
  }
  const hooks: ExchangeHooks = { startResponse, writeHead, earlyHints, failed, retry, clientClosed: (s) => recordClientClosed(ctx, s), held }
  const forwarder: Forwarder = {
    tunnels,
    forward(s) {
      const route = s.route as CompiledRoute
      const req = s.req
      // The client went away while the checks ran (a body that broke off, a closed connection):
      // nothing is sent upstream, and nothing is left waiting on a body that will never come.
      if (clientGone(s)) {
        recordClientClosed(ctx, s)
        return
      }
      // A request pipelined behind others goes upstream only once its own response holds the
      // connection, every response before it written, and not at all when one of them closed the
      // connection: a server that sends `Connection: close` must not act on a later request (RFC
      // 9112 §9.6). Node queues a pipelined request's response and hands it the socket as the one
      // before it finishes (none after one that closes, which ends the socket, though it still
      // parses and hands the socket to a request read after that). Before, a request checked at
      // once (a cached key) behind one refused with close after an await (a bad key waits for the
      // lockout) was forwarded, executed upstream and never answered; and one checked at once
      // overtook, on its way upstream, an earlier one still in its checks (found by a review).
      const res = s.res as NonNullable<RequestState['res']>
      // A request dropped so is recorded as client_closed (the connection closed before its
      // answer); before, it was in no count, log or usage (found by a review). A queued response
      // that never gets the socket emits 'close' when the connection closes.
      if (res.socket === null) {
        const dropped = () => {
          res.off('socket', assigned)
          recordClientClosed(ctx, s)
        }
        const assigned = () => {
          res.off('close', dropped)
          forwarder.forward(s)
        }
        res.once('socket', assigned).once('close', dropped)
        return
      }
      if (!res.socket.writable) {
        recordClientClosed(ctx, s)
        return
      }
      const h = s.headers
      const withBody = hasBody(h)
      if (expectsContinue(req)) res.writeContinue()
      s.upstreamStart = performance.now()
      const exchange = new Exchange(s, hooks, withBody ? route.timeoutMs : 0)
      // `on`, not `once`: the response emits 'close' once, and is dropped with its listeners.
      ;(s.res as NonNullable<RequestState['res']>).on('close', exchange.clientClosed)
      if (withBody) {
        req.once('error', (err: Error) => exchange.bodyFailed(err))
        if (!req.complete) watchBody(req, exchange, route.timeoutMs)
      }
      const request: Dispatcher.DispatchOptions = {
        path: targetFor(s, route),
        method: req.method as Dispatcher.HttpMethod,
        headers: upstreamHeaders(s, route),
        body: withBody ? req : null,
        // With a body, none of undici's: the exchange times the wait for the head itself (see Exchange.onRequestSent).
        headersTimeout: withBody ? 0 : route.timeoutMs,
        bodyTimeout: route.timeoutMs,
      }
      // A body is read as it is sent: it cannot be sent again.
      if (!withBody && IDEMPOTENT.has(request.method)) exchange.retryable = request
      dispatch(route, request, exchange)
    },

    upgrade(s, changesBefore) {
      const route = s.route as CompiledRoute
      const client = s.socket as Duplex
      // The client went away while the checks ran: the upstream is not asked for a tunnel nobody
      // would use (before, it was, and the upgrade it granted was then dropped).
      if (client.destroyed) {
        recordClientClosed(ctx, s)
        return
      }
      const headers = upstreamHeaders(s, route)
      s.upstreamStart = performance.now()
      const m = routeMetrics[route.index] as RouteMetrics
      // undici's dispatch with `upgrade`, not its upgrade(): that one fails an answer other than
      // 101 as "bad upgrade", and the upstream's refusal (a 401, 403 or 404 of its own, a
      // redirect) reached the client as 502 upstream_unavailable, uncounted by class (found by
      // reviews). Such an answer is passed on, as nginx does, and the connection closed after it.
      let relaying = false
      // Such an answer's head, until the first byte of its body (or its end) is passed on, as any
      // answer's (Exchange.#passHead): one that breaks off before any of its body came, or brings
      // none within timeout_ms, is answered 502 or 504. Before (found by a review), it was written
      // as it came, and the client got the upstream's head and then a closed connection.
      let held: Head | undefined
      // The client is read from here until the upstream answers, so that its going away (a FIN, a
      // close, a reset) is seen: Node does not read a socket it hands over for an upgrade. Before
      // (found by a review), a client that left while the upstream answered held the upstream's
      // connection until it did (a tunnel to nobody then opened, recorded forwarded 101) or until
      // the route's timeout_ms (recorded 504). What the client sends meanwhile (a WebSocket client
      // sends nothing before the 101, RFC 6455 §4.1) is kept for the tunnel, up to EARLY_BYTES;
      // past that it is no longer read, as before.
      let controller: Dispatcher.DispatchController | undefined
      const early: Buffer[] = []
      let earlyBytes = 0
      const onEarly = (chunk: Buffer) => {
        early.push(chunk)
        earlyBytes += chunk.length
        if (earlyBytes >= EARLY_BYTES) client.pause()
      }
      const stopReading = () => {
        client.off('data', onEarly).off('end', gone).off('close', gone)
        client.pause()
      }
      const gone = () => {
        stopReading()
        client.destroy()
        controller?.abort(CLIENT_GONE)
      }
      client.on('data', onEarly).once('end', gone).once('close', gone)
      /** `headCame`: an answer other than 101 came, and its head was not passed on (none of its body came). */
      const failed = (err: Error, headCame = false) => {
        stopReading()
        if (err === CLIENT_GONE) return recordClientClosed(ctx, s)
        ctx.log.warn('upstream upgrade failed', { request_id: s.id, route: route.name, err })
        if (client.destroyed) return recordClientClosed(ctx, s)
        s.message = answerFailure(err, headCame) ?? s.message
        sendError(ctx, s, timeoutCode(err))
      }
      /** Writes the held head of an answer other than 101, once; from then on the client is no longer read, and is watched for taking the answer. */
      const passHead = () => {
        const head = held
        if (head === undefined) return
        held = undefined
        stopReading()
        // The socket was handed over for the upgrade: it serves no further request (the head says Connection: close).
        client.write(rawHead(head.statusCode, head.reason ?? STATUS_CODES[head.statusCode] ?? 'unknown', head.fields), 'latin1')
        record(ctx, s, 'forwarded', head.statusCode)
        client.once('close', () => controller?.abort(CLIENT_GONE))
        // Watched as any answer is, here from its head to the connection's close (it also
        // bounds the wait for the client to take the answer's end); an answer of this kind is
        // rare, its timer no cost worth saving. Before (found by a review), a client that took
        // none of it held the upstream's response paused for ever.
        const stop = watchSend(s, client as Socket)
        if (stop !== undefined) client.once('close', stop)
      }
      ;(routePool[route.index] as Pool).dispatch(
        {
          path: targetFor(s, route),
          method: s.req.method ?? 'GET',
          headers,
          upgrade: s.headers.upgrade ?? 'websocket',
          // undici's timer for the answer's head; an upgrade has no body. And for the gap between
          // two chunks of an answer other than 101, passed on as any answer (before, found by a
          // review, undici's 300 s).
          headersTimeout: route.timeoutMs,
          bodyTimeout: route.timeoutMs,
        },
        {
          onRequestStart(c) {
            controller = c
            if (client.destroyed) c.abort(CLIENT_GONE)
          },
          onResponseStart(c, statusCode, answer, statusMessage) {
            if (statusCode < 200) return
            relaying = true
            m.upstream.observe((performance.now() - s.upstreamStart) / 1000)
            m.upstreamStatus[(statusCode / 100) | 0]?.inc()
            if (client.destroyed || !client.writable) {
              stopReading()
              recordClientClosed(ctx, s)
              c.abort(CLIENT_GONE)
              return
            }
            if (codedBeyondChunked(s, route, answer)) {
              relaying = false
              stopReading()
              sendError(ctx, s, 'upstream_unavailable')
              // Answered and recorded: the abort's failed() records nothing more (record takes a request once).
              c.abort(CLIENT_GONE)
              return
            }
            // Still read meanwhile, so that a client going away is seen (gone aborts the answer).
            held = { statusCode, reason: reasonFor(statusCode, statusMessage), fields: [...answerFields(s, route, statusCode, answer), 'connection', 'close'] }
          },
          onResponseData(c, chunk) {
            if (!relaying || client.destroyed) return
            passHead()
            if (!client.write(chunk)) {
              c.pause()
              client.once('drain', () => c.resume())
            }
          },
          onResponseEnd() {
            if (!relaying) return
            passHead()
            // Closed within a while once the client has taken the whole answer (the socket's
            // 'finish'), as an answer written on the socket itself is (endLingering): a client slow
            // to read its end keeps it, one that takes none of it is the send watch's to cut.
            client.end()
            client.once('finish', () => lingerClose(client))
          },
          onResponseError(_c, err) {
            // A head still held was never passed on: answered as a failure before any head.
            if (!relaying || held !== undefined) {
              relaying = false
              const headCame = held !== undefined
              held = undefined
              return failed(err, headCame)
            }
            // As any answer's (before, found by a review, a break was neither logged nor counted).
            if (err !== CLIENT_GONE && !client.destroyed) brokeOff(s, err)
            client.destroy()
          },
          onRequestUpgrade(_c, statusCode, answer, socket) {
            const upstream = socket as Duplex
            // A server's 101 only; a CONNECT is never sent.
            if (statusCode !== 101) {
              upstream.destroy()
              return failed(new errors.SocketError('bad upgrade'))
            }
            // The upstream answered, whether or not its 101 opens the tunnel: counted and timed as
            // an answer refused for its transfer coding is (before, found by a docs walk, a 101
            // refused below was in neither, only in the requests' upstream_unavailable).
            m.upstream.observe((performance.now() - s.upstreamStart) / 1000)
            ;(m.upstreamStatus[1] as Increment).inc()
            // Only a WebSocket server's 101: one that answers the offer's key (RFC 6455 §4.2.2), as
            // the client would check it. Before (found by a review), any 101 opened the tunnel: an
            // upstream endpoint that answers 101 without switching (a status passed through from a
            // parameter, say) left the client a raw connection to it, where each request it sent
            // went past the gateway's checks.
            if (answer['sec-websocket-accept'] !== webSocketAccept(s.headers['sec-websocket-key'] as string)) {
              upstream.destroy()
              s.message = "The upstream's 101 did not accept the WebSocket key (Sec-WebSocket-Accept, RFC 6455 §4.2.2)."
              return failed(new errors.SocketError('the upstream answered the WebSocket upgrade 101 without accepting its key'))
            }
            openTunnel(answer, upstream)
          },
        },
      )
      const openTunnel = (answer: IncomingHttpHeaders, upstream: Duplex) => {
        if (client.destroyed || !client.writable) {
          upstream.destroy()
          recordClientClosed(ctx, s)
          return
        }
        // Filtered and completed as every other answer's head, its own Connection and Upgrade kept.
        // latin1, as undici read the upstream's bytes and as Node writes every other head (before,
        // found by a review: UTF-8, so a header byte 0xE9 reached the client as C3 A9).
        client.write(rawHead(101, 'Switching Protocols', answerFields(s, route, 101, answer, KEEP_ON_UPGRADE)), 'latin1')
        record(ctx, s, 'forwarded', 101)
        stopReading()
        if (s.head !== undefined && s.head.length > 0) upstream.write(s.head)
        for (const chunk of early) upstream.write(chunk)
        tunnels.set(client, route.name)
        const key = s.key
        let tunnel: Tunnel | undefined
        const end = () => {
          tunnels.delete(client)
          if (tunnel !== undefined) guard.ended(tunnel)
          client.destroy()
          upstream.destroy()
        }
        if (key !== undefined) {
          tunnel = { keyId: key.id, address: s.address, route, requestId: s.id, close: end }
          guard.opened(tunnel, key.validUntil, changesBefore)
        }
        client.on('error', end).on('close', end)
        upstream.on('error', end).on('close', end)
        // Idle only when neither socket moved a byte for the whole timeout, and nothing is held
        // back: before, the client socket's own idle timer alone judged it, and a client whose
        // writes an upstream read slowly was paused by the pipe, seen idle, and cut mid-flow.
        if (tunnelIdleMs > 0) {
          const c = client as Socket
          const u = upstream as Socket
          let seen = -1
          // Held back: a side paused while it still has data to give a side that still takes it,
          // or data waiting to be written. A side whose end came is paused by the pipe for good,
          // and is no back-pressure (before, a tunnel whose client sent its FIN never went idle).
          const heldBack = (from: Socket, to: Socket) => from.isPaused() && !from.readableEnded && to.writable
          const stop = watchIdle(
            tunnelIdleMs,
            () => {
              const bytes = c.bytesRead + c.bytesWritten + u.bytesRead + u.bytesWritten
              if (bytes === seen && !heldBack(c, u) && !heldBack(u, c) && c.writableLength === 0 && u.writableLength === 0) return false
              seen = bytes
              return true
            },
            end,
          )
          client.once('close', stop)
        }
        upstream.pipe(client)
        client.pipe(upstream)
      }
    },

    async close() {
      await Promise.all([...pools.values()].map((p) => p.close()))
    },

    async destroy() {
      for (const t of tunnels.keys()) t.destroy()
      await Promise.all([...pools.values()].map((p) => p.destroy()))
    },
  }
  return forwarder
}
