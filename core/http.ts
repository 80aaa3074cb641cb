// Small facts about HTTP/1.1 messages that the gateway and the admin listener both read (the two
// import nothing of each other).
import type http from 'node:http'
import type { IncomingHttpHeaders, IncomingMessage, OutgoingHttpHeaders, Server, ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import { ERRORS, errorBody, type ErrorCode } from './errors.ts'

/**
 * The slashes that end a path (a base URL's), matched from the start of their run only: `/\/+$/`
 * tried from each slash of a run that something else ends, a time growing with its square (found
 * by a review).
 */
export const TRAILING_SLASHES = /(?<!\/)\/+$/

/**
 * A list member (an X-Forwarded-For entry) without the white space around it: HTTP's, a space or a
 * tab. Before (found by a fuzzing review), trim() took a no-break space (byte A0) off too, and the
 * gateway judged an entry as an address the upstream, given the byte, does not read. A loop, not
 * /^[ \t]+|[ \t]+$/g, which backtracks over every run of white space in the entry: 390 ms for a
 * letter, 16,000 spaces and a letter (bench/patterns.ts).
 */
export function withoutOws(entry: string): string {
  let start = 0
  let end = entry.length
  while (start < end && (entry.charCodeAt(start) === 32 || entry.charCodeAt(start) === 9)) start++
  while (end > start && (entry.charCodeAt(end - 1) === 32 || entry.charCodeAt(end - 1) === 9)) end--
  return start === 0 && end === entry.length ? entry : entry.slice(start, end)
}

/** The header every answer of the admin listener carries (the CLI takes no other server's JSON for the admin API's). */
export const ADMIN_MARK = 'x-keygate-admin'

/** Transport failures that prove no request reached the server: no connection was ever made. */
const NOT_CONNECTED_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_CONNECT_TIMEOUT', 'EPROTO'])
/**
 * TLS handshake and certificate failures (Node's ERR_TLS_*, OpenSSL's ERR_SSL_*, the certificate
 * verification codes): the handshake comes before the request, so none was sent. Before (found
 * by a review), an https URL with a self-signed certificate, or pointing at a plain-HTTP port,
 * was told as a connection lost after the request was sent, and a create looked for an orphan.
 */
const TLS_FAILURE = /^(ERR_TLS_|ERR_SSL_|UNABLE_TO_)|CERT/

/**
 * Whether a client's transport error `code` proves its request was never sent (the integrations'
 * calls, the CLI's admin API calls): any other, a reset or a connection closed before the answer,
 * leaves open that the server received the request and acted on it.
 */
export function neverConnected(code: string): boolean {
  return NOT_CONNECTED_CODES.has(code) || TLS_FAILURE.test(code)
}

/**
 * Bad gateway, unavailable, gateway timeout: what a proxy or gateway in front of a server answers
 * when it lost the server's answer (or the server, overloaded, answers itself). Not a refusal:
 * the server may have carried the request out all the same. Before (found by a review), a
 * proxy's 504 page to a Gitea create was "refused to create", and the token it made went unrecorded.
 */
export function fromGateway(status: number): boolean {
  return status === 502 || status === 503 || status === 504
}

/** Header-name characters (RFC 9110 tokens) other than letters, digits and `-`. */
const NOT_A_DASH = /[!#$%&'*+.^_`|~]/
const NOT_A_DASH_ALL = /[!#$%&'*+.^_`|~]/g

/**
 * A header name (lower case, as Node gives it) as the upstreams that read names into variables
 * read it: every character but a letter or a digit as `-`. CGI and WSGI read `-` as `_`, and
 * lighttpd's CGI and FastCGI environments every other one too (PHP's server reads `.` so), so
 * `X.Keygate.Key.Id` and `X~Keygate~Scopes` reach them as `HTTP_X_KEYGATE_KEY_ID` and
 * `HTTP_X_KEYGATE_SCOPES`, as `X_Keygate_Key_Id` does. The gateway compares the names it removes
 * in this reading (found by a review: only `_` was read so, and a lighttpd CGI application read
 * the client's `X.Keygate.Key.Id` and `X~Keygate~Scopes` as the identity, and lighttpd kept the
 * first copy, the client's).
 */
export function headerReading(name: string): string {
  return NOT_A_DASH.test(name) ? name.replace(NOT_A_DASH_ALL, '-') : name
}

/** Whether a request announces a body (Content-Length other than 0, or Transfer-Encoding). */
export function hasBody(h: IncomingHttpHeaders): boolean {
  return (h['content-length'] !== undefined && h['content-length'] !== '0') || h['transfer-encoding'] !== undefined
}

/**
 * Whether a request waits for a `100 Continue` before it sends its body (`Expect: 100-continue`,
 * which Node hands to a server's 'checkContinue' listener). HTTP/1.1 only: an HTTP/1.0 request's
 * 100-continue must be ignored (RFC 9110 §10.1.1). Node sends HTTP/1.1 requests with an Expect
 * through 'checkContinue' (100-continue) or 'checkExpectation' (refused), but an HTTP/1.0 one with
 * any Expect arrives as a plain request, and was sent a 100 too.
 */
export function expectsContinue(req: IncomingMessage): boolean {
  return req.headers.expect !== undefined && req.httpVersionMajor === 1 && req.httpVersionMinor === 1
}

// `.` or `..` as a whole segment, also percent-encoded, and backslashes some servers read as `/`;
// also followed by `;` parameters, which Tomcat and Spring drop (`/..;/`).
const DOT_SEGMENT = /(?:^|\/|%2f|\\|%5c)(?:\.|%2e){1,2}(?:$|\/|%2f|\\|%5c|\?|#|;|%3b)/i

/**
 * Whether the path of a request target (what comes before its `?`) has dot segments: a target
 * that a URL parser, or a server behind, resolves into another path than the one a path filter in
 * front saw (`/healthz/../v1/keys` is `/v1/keys`).
 */
export function hasDotSegments(target: string): boolean {
  if (!target.includes('.') && !target.includes('%') && !target.includes('\\')) return false
  const q = target.indexOf('?')
  return DOT_SEGMENT.test(q === -1 ? target : target.slice(0, q))
}

/**
 * Whether a path whose escapes are decoded (`bytes`, from decodeEscapes) has dot segments: what
 * `%252e%252e` is to an upstream that decodes twice, then resolves the path. On every route: a
 * path that leaves its route's prefix so reaches resources the route's scopes do not cover.
 */
export function decodedHasDotSegments(bytes: string): boolean {
  return bytes.includes('.') && DOT_SEGMENT.test(bytes)
}

/**
 * Calls `then` once every response of `socket` begun or queued so far has been written, or the
 * socket closed: the moment for an answer written on the socket itself (a switch to a WebSocket
 * tunnel, the refusal of an upgrade, a parser error's 400), which written earlier lands before or
 * inside the answers to the requests pipelined ahead of it, and reads as theirs. Node writes the
 * responses of a connection one at a time, in order, and hands the socket to the next one queued
 * as each finishes: the wait follows them one by one (`socket._httpMessage` is the one written
 * now, as Node's own clientError handler reads it; its 'finish', or 'close' when cut short). The
 * wait ends early at a response `stopAt` accepts (one that will never finish), handed to `then`.
 */
export function afterResponses(socket: Duplex, then: (pending: ServerResponse | undefined) => void, stopAt?: (res: ServerResponse) => boolean): void {
  const res = answerOn(socket)
  if (res === undefined || socket.destroyed || stopAt?.(res) === true) {
    then(res)
    return
  }
  const next = (): void => {
    res.off('finish', next).off('close', next)
    afterResponses(socket, then, stopAt)
  }
  res.once('finish', next).once('close', next)
}

/** How long a connection closed after an answer goes on reading what its client still sends. */
const LINGER_MS = 2000

/**
 * Closes the connection of `req` after its response in stages, as RFC 9112 §9.6 has a server
 * close while its client may still be sending: the FIN after the response, then what the client
 * sends is read and dropped until it closes its side or `LINGER_MS` has passed, and only then is
 * the socket closed. Closed at once with bytes still coming, the kernel answers them with a reset
 * (RST), which may cost the client the answer. The response must say `Connection: close`: Node
 * then calls the socket's `destroySoon()` once the response is written, which this replaces for
 * this one socket (Node's ends and closes at once). The rest of the body is dropped as Node drops
 * a body nobody read (`_dump`): whoever read `req` has let it go, and the parser would otherwise
 * stop the socket at the first chunk it could not hand over.
 */
export function closeWhenAnswered(req: IncomingMessage): void {
  const socket = req.socket as Socket & { destroySoon?: () => void }
  socket.destroySoon = () => {
    ;(req as IncomingMessage & { _dump?: () => void })._dump?.()
    endLingering(socket)
  }
}

/**
 * Ends `socket` (after `last`), then reads and drops what its client still sends until it closes
 * its side, for `LINGER_MS` at most, and closes it (closeWhenAnswered). Also for an answer written
 * on the socket itself: before (found by a review), such an answer only ended the gateway's side,
 * and a client that kept its own open held the connection for as long as it liked.
 */
export function endLingering(socket: Duplex, last?: string): void {
  if (last === undefined) socket.end()
  else socket.end(last)
  lingerClose(socket)
}

/** endLingering's close, for a socket already ended: what its client still sends is read and dropped, and it is closed within `LINGER_MS`. */
export function lingerClose(socket: Duplex): void {
  socket.resume()
  const timer = setTimeout(() => socket.destroy(), LINGER_MS)
  socket.once('close', () => clearTimeout(timer))
}

const answering = new WeakSet<Duplex>()

/**
 * Answers a connection the HTTP parser gave up on: `answer` writes the refusal on the socket
 * once the responses to the requests before the one that did not parse are written. A request
 * whose body the parser gave up on never finishes: the refusal is its answer, or the connection
 * is closed when its own answer has begun. `answer` is given that request's response, when the
 * failure is in its body. Node reports the failure again as more bytes arrive: only the first is
 * answered.
 */
export function answerClientError(socket: Duplex, answer: (pending: ServerResponse | undefined) => void): void {
  if (answering.has(socket)) return
  answering.add(socket)
  afterResponses(
    socket,
    (pending) => {
      if (!socket.writable || pending?.headersSent === true) socket.destroy()
      else answer(pending)
    },
    (res) => !res.req.complete,
  )
}

/**
 * Node's http module, taken where it is used rather than imported: importing node:http as a
 * module reads every one of its exports, and reading `WebSocket` loads Node's own undici, about
 * 80 ms of CPU in each process that imported it (every CLI command, each serve). Only types are
 * imported from node:http in keygate's code.
 */
export const nodeHttp = (): typeof http => process.getBuiltinModule('node:http')

/**
 * A listener's header timeout, with the interval Node checks it on (its own default is 30 s): a
 * client silent or slow with its request head is cut within a second of the timeout, rather than
 * up to 30 s after it (before, found by a review, the admin listener's 10 s cut such a client
 * 10 to 40 s after it connected).
 */
export function headersTimeoutOptions(headersTimeoutMs: number): Pick<http.ServerOptions, 'headersTimeout' | 'connectionsCheckingInterval'> {
  return { headersTimeout: headersTimeoutMs, connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(headersTimeoutMs / 4))) }
}

/**
 * The response Node is writing on `socket` now (its `_httpMessage`, as Node's own clientError
 * handler reads it): set from a request's parsed head until its answer ends, so a request in flight.
 */
function answerOn(socket: Duplex): ServerResponse | undefined {
  return (socket as Duplex & { _httpMessage?: ServerResponse | null })._httpMessage ?? undefined
}

/** Writes a whole HTTP/1.1 response on a socket and ends it (upgrades, parser errors). */
export function writeRaw(socket: Duplex, status: number, headers: OutgoingHttpHeaders, body: string): void {
  if (!socket.writable) {
    socket.destroy()
    return
  }
  let head = `HTTP/1.1 ${status} ${nodeHttp().STATUS_CODES[status] ?? ''}\r\n`
  for (const name in headers) head += `${name}: ${String(headers[name])}\r\n`
  endLingering(socket, head + '\r\n' + body)
}

/**
 * The JSON error of a request with no request state (the parser gave up, or Node answers before
 * any stage), closing the connection; `extra` adds headers (the admin listener's mark).
 */
export function closingError(code: ErrorCode, requestId: string, extra: OutgoingHttpHeaders = {}): { status: number; headers: OutgoingHttpHeaders; body: string } {
  const body = errorBody(code, requestId)
  const headers = { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), 'cache-control': 'no-store', 'x-request-id': requestId, ...extra, connection: 'close' }
  return { status: ERRORS[code].status, headers, body }
}

/** `closingError` written straight on a socket (a connection the HTTP parser gave up on). */
export function rawError(socket: Duplex, code: ErrorCode, requestId: string, extra: OutgoingHttpHeaders = {}): void {
  const e = closingError(code, requestId, extra)
  writeRaw(socket, e.status, e.headers, e.body)
}

/**
 * The metrics' route label of a request that matched no route: no route may take the name (their
 * series would be one). Here, not in config/, for core/metrics.ts: core/ takes only types from config/.
 */
export const NO_ROUTE = 'none'

/** The answer to a request the HTTP parser gave up on: headers past the limit, a request not received within requestTimeout, or anything else malformed. */
export function clientErrorCode(err: NodeJS.ErrnoException): 'headers_too_large' | 'request_timeout' | 'bad_request' {
  return err.code === 'HPE_HEADER_OVERFLOW' ? 'headers_too_large' : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 'request_timeout' : 'bad_request'
}

/**
 * `text` with its `%XX` escapes decoded, one byte to one character, and again for readers that
 * decode twice (up to three rounds). Unlike decodeURIComponent it never throws: a malformed
 * escape (`%zz`, a lone `%`) stays as it is.
 */
export function decodeEscapes(text: string): string {
  let p = text
  for (let round = 0; round < 3 && p.includes('%'); round++) p = p.replace(/%[0-9a-f]{2}/gi, (e) => String.fromCharCode(parseInt(e.slice(1), 16)))
  return p
}

/**
 * `text`, whose characters are bytes (decodeEscapes), read as UTF-8 and in NFKC, as upstreams read
 * a path's characters: read byte by byte, `/donn%C3%A9es` was never `/données`, nor `/DONN%C3%89ES`
 * it in lower case, and a route of that path never under any reading (found by a review); in NFC
 * only, `/app/%EF%BD%81dmin` (fullwidth a) was not `/app/admin` to a server that folds it (found by
 * another). Bytes that are not UTF-8 stay as they are.
 */
export function asUtf8(text: string): string {
  if (!/[\x80-\xff]/.test(text) || /[^\x00-\xff]/.test(text)) return text
  try {
    return UTF8.decode(Buffer.from(text, 'latin1')).normalize('NFKC')
  } catch {
    return text
  }
}

const UTF8 = new TextDecoder('utf-8', { fatal: true })

/** A Host value without its port (`[::1]:8080` is `[::1]`, `a:80` is `a`). */
export function hostName(host: string): string {
  const colon = host.lastIndexOf(':')
  return colon > host.lastIndexOf(']') ? host.slice(0, colon) : host
}

/** The raw connections of each tracked server, each with the socket HTTP is spoken on (the TLS one over it, once its handshake is done). */
const tracked = new WeakMap<Server, Map<Socket, Duplex>>()
/** Sockets handed to a server's 'upgrade' or 'connect' listener: no longer HTTP's (a WebSocket tunnel). */
const taken = new WeakSet<Duplex>()

/**
 * How long a connection without a whole request head (or TLS handshake) at a shutdown has to
 * finish it, within the shutdown's deadline: a head arrives within a round trip or two, and one
 * finished in time is a request like any other. Then the connection is closed (`closeWaiting`).
 */
const HEAD_GRACE_MS = 1000

/**
 * Keeps the raw connections of `server`, from their first byte: `closeAllConnections` reaches
 * only those the HTTP layer has taken over, so a TLS connection still in its handshake (a client
 * that connected and sent nothing) would hold a shutdown open for as long as the client liked.
 * Called once the server's own listeners are on: the connections handed to its 'upgrade' and
 * 'connect' listeners are noted through those events, if it listens to them (a listener added
 * where it had none would change what Node does with such a request).
 */
export function trackConnections(server: Server): void {
  if (tracked.has(server)) return
  const connections = new Map<Socket, Duplex>()
  tracked.set(server, connections)
  server.on('connection', (socket: Socket) => {
    connections.set(socket, socket)
    socket.once('close', () => connections.delete(socket))
  })
  // A TLS connection's HTTP socket is made by Node over the TCP one, which it keeps as `_parent`.
  // Before (found by a review), the two were paired by the client's address and port, which two
  // connections share when they reach two addresses of one listener (a client or a NAT may reuse
  // a port so): one's TLS socket was paired with the other's TCP one, and a request in flight on
  // the first was cut at a shutdown as a connection still in its handshake.
  if (typeof (server as Server & { setSecureContext?: unknown }).setSecureContext === 'function') {
    server.on('secureConnection', (socket: Duplex) => {
      const raw = (socket as Duplex & { _parent?: unknown })._parent as Socket | undefined
      if (raw !== undefined && connections.has(raw)) connections.set(raw, socket)
    })
  }
  for (const event of ['upgrade', 'connect'] as const) if (server.listenerCount(event) > 0) server.on(event, (req: IncomingMessage) => taken.add(req.socket))
}

/**
 * At a shutdown, once `server` no longer accepts: ends its connections that hold no request. One
 * whose client has sent nothing yet, or is part-way through a request head or a TLS handshake, is
 * given HEAD_GRACE_MS (at most `deadlineMs`, the shutdown's) to finish a head, and ended then if
 * it has not (one answered and closing on its own is left to end). One that has sent nothing is
 * not ended at once, as an idle keep-alive one is: a client that connected just before the signal may have sent its request already, its
 * bytes still on their way or not yet read, and a client retries a request on a keep-alive
 * connection closed under it, not its first one on a new connection. Returns what stops the wait.
 */
export function closeWaiting(server: Server, deadlineMs: number): () => void {
  const connections = tracked.get(server)
  if (connections === undefined) return () => {}
  const timer = setTimeout(() => {
    for (const http of connections.values()) {
      if (answerOn(http) === undefined && !taken.has(http) && !http.writableEnded) http.destroy()
    }
  }, Math.min(HEAD_GRACE_MS, deadlineMs))
  return () => clearTimeout(timer)
}

/**
 * At a shutdown, once `server` no longer accepts: the answers to requests in flight that have not
 * begun say Connection: close, and Node closes each connection after its answer. Before (found
 * by a review), the admin listener said close only to requests that began after the signal: one
 * in flight at it and answered after HEAD_GRACE_MS was offered a keep-alive, and its connection,
 * idle, held the stop for Node's keep-alive timeout (5 s and its 1 s margin).
 */
export function closeAfterAnswers(server: Server): void {
  for (const http of tracked.get(server)?.values() ?? []) {
    const res = answerOn(http)
    if (res && !res.headersSent) res.shouldKeepAlive = false
  }
}

/** Ends every connection of `server` now: the HTTP ones, and (when tracked) those still in their TLS handshake. */
export function destroyConnections(server: Server): void {
  server.closeAllConnections()
  for (const socket of tracked.get(server)?.keys() ?? []) socket.destroy()
}

/**
 * Whether a `clientError` is the TLS layer's (a handshake that timed out or failed, plain HTTP
 * sent to a TLS port): https servers report those as `clientError` too, and no HTTP answer can
 * be written on a connection without a handshake (one queued there waits for ever).
 */
export function isTlsFailure(err: NodeJS.ErrnoException): boolean {
  return typeof err.code === 'string' && /^ERR_(SSL|TLS)_/.test(err.code)
}
