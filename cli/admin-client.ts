// Calls to a running server's admin API (KEYGATE_ADMIN_URL with KEYGATE_ADMIN_TOKEN), for the
// commands that work through it instead of opening the store (which a running server owns when it
// is the embedded one). The server's error codes come back as the same KeygateErrors, so exit
// codes and messages match the local commands; anything that is not keygate's answer (a proxy's
// 503, a redirect, a page that is not JSON) is `admin_unavailable`.
import { ADMIN_MARK, fromGateway, neverConnected, nodeHttp, TRAILING_SLASHES } from '../core/http.ts'
import { ERRORS, KeygateError, type ErrorCode } from '../core/errors.ts'
import { CONTROL } from '../core/target.ts'
import { escapeUnprintable } from '../core/validate.ts'
import type { IncomingMessage } from 'node:http'
import type { Duplex } from 'node:stream'

/** Methods that change something: a call of one that times out may have been carried out. */
const CHANGES = new Set(['POST', 'PATCH', 'DELETE'])
/** POSTs that change nothing. */
const READS = new Set(['/v1/keys/validate', '/v1/gitea/tokens/verify', '/v1/n8n/keys/verify'])

/**
 * Refusals for a setting the server lacks, which a command's own environment cannot give through
 * an admin API (the server calls Gitea and n8n with its own): the variables named. Before (found
 * by a docs walk), "set GITEA_URL, ..." reached a command that had them set, and left it there.
 */
const SERVER_SETTINGS: Partial<Record<ErrorCode, string>> = { gitea_not_configured: 'GITEA_*', n8n_not_configured: 'N8N_*' }

/** OpenSSL's and Node's codes for a certificate that does not verify (self-signed, unknown issuer, expired, another name). */
const UNTRUSTED = /CERT|SELF_SIGNED|UNABLE_TO_(VERIFY|GET_ISSUER)/

/** An answer of the admin API: its status, one header's value, and its body as text. */
interface Answer {
  status: number
  header(name: string): string | null
  text: string
}

/** The Answer of `res`, whose body was `text`. */
function answerOf(res: IncomingMessage, text: string): Answer {
  const header = (name: string) => {
    const value = res.headers[name.toLowerCase()]
    return value === undefined ? null : Array.isArray(value) ? value.join(', ') : value
  }
  return { status: res.statusCode ?? 0, header, text }
}

/**
 * One request with node:http or node:https, not fetch: fetch refuses the ports the Fetch standard
 * lists as bad (6000, 6665-6669, 10080, 5060, ...), which the admin listener takes, and a command
 * through an admin API listening on one was "cannot reach the admin API ...: bad port" (found by a
 * review). Redirects are not followed (node:http follows none). The whole exchange, the body
 * included, ends within `timeoutMs`: past it, an Error named TimeoutError; a transport failure
 * is Node's own error, with its code (ECONNREFUSED, ECONNRESET, a certificate's).
 */
async function send(url: URL, method: string, headers: Record<string, string>, body: string | undefined, timeoutMs: number): Promise<Answer> {
  // node:http through nodeHttp, as everywhere in keygate: an import of it reads every export, its
  // WebSocket loading Node's own undici (test/layering.test.ts).
  const { request } = url.protocol === 'https:' ? process.getBuiltinModule('node:https') : nodeHttp()
  return new Promise<Answer>((resolve, reject) => {
    // Whether the connection was made (and, over TLS, its handshake done): before, nothing was sent.
    let connected = false
    // The first outcome settles the call: the deadline's, or what the request came to.
    let settled = false
    const done = (err: Error | undefined, answer?: Answer) => {
      if (settled) return
      settled = true
      clearTimeout(timer)
      if (err) reject(err)
      else resolve(answer as Answer)
    }
    const req = request(url, { method, headers: body === undefined ? headers : { ...headers, 'content-length': String(Buffer.byteLength(body)) } }, (res: IncomingMessage) => {
      const chunks: Buffer[] = []
      res.on('data', (chunk: Buffer) => chunks.push(chunk))
      res.on('end', () => done(undefined, answerOf(res, Buffer.concat(chunks).toString('utf8'))))
      // Cut in the middle of the body, by the server or past the deadline: with the status it had
      // answered (`answered`), an HTTP answer begun.
      res.on('error', (err) => done(Object.assign(err, { answered: res.statusCode })))
      res.on('close', () => {
        if (!res.complete) done(Object.assign(new Error('the connection closed in the middle of the answer'), { code: 'ECONNRESET', answered: res.statusCode }))
      })
    })
    // Armed once the request is made: a request node:http refuses to make (a header value it
    // cannot send) throws above, rejecting this promise, with no deadline left to fire on it (before,
    // found by a review, it fired on a request never made, a ReferenceError ending the process).
    // Settled here, before the destroy, whose own errors then come too late to count; and a
    // request destroyed already (a 101's, below) emits none.
    const timer = setTimeout(() => {
      const timeout = Object.assign(new Error(connected ? `no answer within ${timeoutMs / 1000} s` : `no connection within ${timeoutMs / 1000} s`), { name: 'TimeoutError', connected })
      done(timeout)
      req.destroy(timeout)
    }, timeoutMs)
    // A 101 to a request that asked for no upgrade: node:http gives it to `upgrade` listeners and,
    // with none, destroys the socket without a word (before, found by a review, the call never
    // settled: exit 13 and Node's "unsettled top-level await" at the deadline). An answer, and no
    // keygate's: said as such.
    req.on('upgrade', (res: IncomingMessage, socket: Duplex) => {
      socket.destroy()
      done(undefined, answerOf(res, ''))
    })
    req.on('socket', (socket) => {
      if (!socket.connecting) connected = true
      else socket.once(url.protocol === 'https:' ? 'secureConnect' : 'connect', () => (connected = true))
    })
    req.on('error', (err: Error & { code?: string }) => {
      // node:http writes the request before the TLS handshake is done, and an OpenSSL failure
      // then comes as the write's EPROTO; named by OpenSSL's reason, as a TLS socket names it
      // (ERR_SSL_WRONG_VERSION_NUMBER: TLS sent to a plain HTTP listener).
      const reason = err.code === 'EPROTO' ? /:SSL routines:[^:]*:([a-z ]+):/.exec(err.message)?.[1] : undefined
      done(reason === undefined ? err : Object.assign(err, { code: `ERR_SSL_${reason.toUpperCase().replaceAll(' ', '_')}` }))
    })
    req.end(body)
  })
}

export interface AdminClient {
  /**
   * One call; the body, when given, is sent as JSON. Resolves to the answer's JSON object, whose
   * fields named in `lists` are lists.
   */
  call<T>(method: string, path: string, body?: unknown, lists?: readonly string[]): Promise<T>
  /** call, with the answer's status (an add that updated a deny entry is 200, not 201). */
  exchange<T>(method: string, path: string, body?: unknown, lists?: readonly string[]): Promise<{ status: number; json: T }>
  /** An admin_unavailable error: the admin API at its URL `did`, asking whether the admin URL is the admin listener. */
  notAdmin(did: string): KeygateError
}

export interface AdminClientOptions {
  timeoutMs?: number
  /** The command that tells whether a change that timed out was made, for its message: "`keygate api-key get` (or list)". */
  checkWith: string
}

export function adminClient(baseUrl: string, token: string, options: AdminClientOptions): AdminClient {
  // The operations' paths are added to it: a query or fragment would end up in front of them.
  // (Tested on the text: a bare ? or # leaves the URL's search and hash empty.)
  if (/[?#]/.test(baseUrl)) {
    throw new KeygateError('config_invalid', 'the admin URL (KEYGATE_ADMIN_URL or --admin-url) must not have a query or fragment: give the admin listener\'s address, with its path prefix if it has one')
  }
  const base = baseUrl.replace(TRAILING_SLASHES, '')
  // Never with a user:password@ (the configuration refuses one; this is for what is shown, the
  // words of Node's own errors included; node:http sends no Basic credential from it, the
  // Authorization header being set).
  // (Up to the last @ before the host's end: a password may hold @, spaces and quotes.)
  const hide = (text: string) => text.replace(/\/\/[^/?#]*@/g, '//<hidden>@')
  const shown = hide(base)
  const timeoutMs = options.timeoutMs ?? 30_000
  const unavailable = (what: string) => new KeygateError('admin_unavailable', `${what}; is the admin URL (KEYGATE_ADMIN_URL or --admin-url) the admin listener?`)
  const mayHaveBeenMade = `the change may or may not have been made: check with ${options.checkWith} before you try again`
  /**
   * An answer that is not keygate's. A proxy in front of the admin API answers 502, 503 or 504
   * when it lost the answer of a change sent through it, which may have been made all the same.
   */
  const notKeygates = (change: boolean, status: number, what: string) =>
    change && fromGateway(status)
      ? new KeygateError('admin_unavailable', `the admin API at ${shown} answered ${status} ${what}, as a proxy in front of it does when it lost the answer; ${mayHaveBeenMade}`)
      : unavailable(`the admin API at ${shown} answered ${status} ${what}`)
  const exchange = async <T>(method: string, path: string, body?: unknown, lists: readonly string[] = []): Promise<{ status: number; json: T }> => {
    const change = CHANGES.has(method) && !READS.has(path)
    let res: Answer
    try {
      // Not followed: a redirect would drop the credential on another origin and turn a POST into a GET.
      res = await send(
        new URL(base + path),
        method,
        { authorization: `Bearer ${token}`, accept: 'application/json', ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
        body === undefined ? undefined : JSON.stringify(body),
        timeoutMs,
      )
    } catch (err) {
      const failure = err as Error & { code?: string; connected?: boolean; answered?: number }
      if (failure.name === 'TimeoutError' && change && failure.connected === true) {
        // Sent, and no answer: the change may have been made (a rotation's new key then exists,
        // its secret never shown). Said as such, never as "cannot reach".
        throw new KeygateError('admin_unavailable', `the admin API at ${shown} did not answer within ${timeoutMs / 1000} s; ${mayHaveBeenMade}`)
      }
      // No connection within the deadline: nothing was sent (a read's timeout is told so too).
      if (failure.name === 'TimeoutError') throw new KeygateError('admin_unavailable', `cannot reach the admin API at ${shown} (KEYGATE_ADMIN_URL or --admin-url): ${failure.message}`)
      // An answer begun over HTTP, then cut (a server killed as it answered): no hint of TLS, which
      // that answer rules out (before, found by a review, "closed the connection before answering
      // ...; if the admin listener serves TLS, the URL is https://").
      if (failure.answered !== undefined) {
        throw new KeygateError('admin_unavailable', `the admin API at ${shown} closed the connection in the middle of its answer (${failure.answered})${change ? `; ${mayHaveBeenMade}` : ''}`)
      }
      const code = failure.code
      if (code !== undefined && UNTRUSTED.test(code)) {
        throw new KeygateError(
          'admin_unavailable',
          `the admin API at ${shown} showed a certificate this machine does not trust (${code}); for a self-signed certificate or a private CA, give its PEM file in NODE_EXTRA_CA_CERTS`,
        )
      }
      // A TLS listener closes a connection that speaks plain HTTP to it; a plain one answers a TLS
      // hello with HTTP, which OpenSSL reads as a wrong version (before, found by a review, that
      // code was all the message said).
      const tlsHint =
        code === 'ECONNRESET' && base.startsWith('http:')
          ? '; if the admin listener serves TLS, the URL is https://'
          : code === 'ERR_SSL_WRONG_VERSION_NUMBER' && base.startsWith('https:')
            ? '; the server there does not speak TLS: if the admin listener serves plain HTTP (no admin.tls), the URL is http://'
            : ''
      // A connection closed or reset once made: the request may have been read and carried out
      // (a server killed, or one whose stop cut the call at its deadline, an import committed).
      // Before (found by a review), "cannot reach", as if nothing had been sent.
      if (change && (code === undefined || !neverConnected(code))) {
        throw new KeygateError('admin_unavailable', `the admin API at ${shown} closed the connection before answering (${hide(code ?? failure.message)}); ${mayHaveBeenMade}${tlsHint}`)
      }
      throw new KeygateError('admin_unavailable', `cannot reach the admin API at ${shown} (KEYGATE_ADMIN_URL or --admin-url): ${hide(code ?? failure.message)}${tlsHint}`)
    }
    const ok = res.status >= 200 && res.status < 300
    if (res.status >= 300 && res.status < 400) throw unavailable(`the admin API at ${shown} answered ${res.status}, a redirect to ${res.header('location') ?? 'nowhere'} (not followed)`)
    let json: unknown
    try {
      json = JSON.parse(res.text)
    } catch {
      throw notKeygates(change, res.status, 'without JSON')
    }
    const error = (json as { error?: { code?: unknown; message?: unknown; details?: Record<string, unknown> } } | null)?.error
    // JSON of another server (before: the gateway port, given the admin key, passed the call on to
    // its upstream, and the CLI failed on that JSON with a TypeError).
    if (res.header(ADMIN_MARK) === null && (ok || typeof error?.code === 'string')) {
      throw unavailable(`the server at ${shown} answered ${res.status} but is not keygate's admin API (no ${ADMIN_MARK} header; the gateway's port, say)`)
    }
    if (ok) {
      if (json === null || typeof json !== 'object') throw unavailable(`the admin API at ${shown} answered ${res.status} with ${escapeUnprintable(JSON.stringify(json))}, not an object`)
      // A broken server's `items: null` (before: "unexpected error: TypeError").
      const notList = lists.find((field) => !Array.isArray((json as Record<string, unknown>)[field]))
      if (notList !== undefined) {
        const got = escapeUnprintable(JSON.stringify((json as Record<string, unknown>)[notList]) ?? 'nothing').slice(0, 60)
        throw new KeygateError('admin_unavailable', `the admin API at ${shown} answered ${method} ${path} with ${JSON.stringify(notList)}: ${got}, not a list: not what keygate expects`)
      }
      return { status: res.status, json: json as T }
    }
    // keygate's own errors only: another server's answer (a proxy's 503) is no refusal of keygate's.
    if (typeof error?.code !== 'string' || !Object.hasOwn(ERRORS, error.code) || typeof error.message !== 'string') {
      throw notKeygates(change, res.status, 'without a keygate error')
    }
    // keygate's own messages break lines only before an indented one (an import's problems): any
    // other line break is escaped, so a message cannot print a line that looks like keygate's.
    // (Every other control character is escaped where the CLI prints it, io.ts terminalText.)
    const message = error.message.replace(/\r?\n(?! {2}\S)/g, (b) => JSON.stringify(b).slice(1, -1))
    const settings = SERVER_SETTINGS[error.code as ErrorCode]
    const where = settings === undefined ? '' : `: set them on that server; this command's own ${settings} variables are not used through an admin API`
    throw new KeygateError(error.code as ErrorCode, `${message} (admin API at ${shown}${where})`, error.details)
  }
  const call = async <T>(method: string, path: string, body?: unknown, lists: readonly string[] = []): Promise<T> => (await exchange<T>(method, path, body, lists)).json
  return { call, exchange, notAdmin: (did) => unavailable(`the admin API at ${shown} ${did}`) }
}

/**
 * The longest path segment sent, encoded: no id or name comes near it (a Gitea token's name, the
 * longest, is at most 255 characters, 2,295 encoded), and a much longer one passes the admin
 * listener's 16 KiB limit on a request's head, answered 431 "The request headers are too large."
 */
const SEGMENT_MAX = 4096

const NO_SEGMENTS: ReadonlySet<string> = new Set()

/**
 * `value` as one path segment of an admin API URL; '', '.', '..' and a value with a control
 * character (CONTROL, which the admin listener refuses in a path even percent-encoded: before,
 * found by a review, `api-key rotate "$ID"` with a line break read into ID was "The request path
 * has a percent-encoded control character." through the admin API, where the store answers that no
 * key has that id) are no segment a URL can carry (the URL parser resolves dot segments, even
 * escaped), nor one longer than SEGMENT_MAX
 * encoded, nor one of `operations`, the words whose path there is another operation's (the admin
 * API serves `/v1/keys/validate` as the validation, and answers a GET of it 405), so
 * `unreachable` says what the command answers for them instead of calling another route (before,
 * found by a review: `api-key get` of a 20,000-character id was "no key has the id" on the store
 * and "The request headers are too large." through the admin API).
 */
export function pathSegment(value: string, unreachable: () => Error, operations: ReadonlySet<string> = NO_SEGMENTS): string {
  const encoded = encodeURIComponent(value)
  if (value === '' || value === '.' || value === '..' || CONTROL.test(value) || encoded.length > SEGMENT_MAX || operations.has(value)) throw unreachable()
  return encoded
}
