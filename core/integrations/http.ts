// The HTTP client of the integrations: undici with a connect timeout, a header and body timeout
// and an overall deadline per request. Transport failures become the service's own catalogue
// codes (`<service>_unreachable`, `<service>_timeout`); answers are bounded in size; every text
// passed on (transport errors, the service's own messages) has the secrets the client knows
// cut out first, so no password, cookie or token can reach a log line or an error message.
import { Agent, request } from 'undici'
import { KeygateError } from '../errors.ts'
import { fromGateway, neverConnected, TRAILING_SLASHES } from '../http.ts'
import { cutSecrets, secretForms } from '../log.ts'
import { clipped } from '../validate.ts'

export type ServiceName = 'gitea' | 'n8n'
export const SERVICE_LABEL: Record<ServiceName, string> = { gitea: 'Gitea', n8n: 'n8n' }

const MAX_BODY_BYTES = 4 * 1024 * 1024
const MAX_MESSAGE = 300
const MAX_TRANSIENT = 16

export interface HttpResponse {
  status: number
  headers: Record<string, string | string[] | undefined>
  /** Parsed JSON when the answer is JSON, else the text (empty for no body). */
  body: unknown
}

export interface CallOptions {
  headers?: Record<string, string>
  json?: unknown
  query?: Record<string, string | number>
}

const TIMEOUT_CODES = new Set(['UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT'])
/** The errors of requests that may have reached the service (see `mayHaveReached`). */
const MAYBE_REACHED = new WeakSet<KeygateError>()

/**
 * Whether `err`, a failed call, leaves open that the service received the request and acted on
 * it: a timeout or a connection lost after it was made (a reset, a proxy cutting it), a gateway's
 * answer (`fromGateway`), or a success answer whose body could not be read; not one that could not
 * be made at all (refused, DNS, connect timeout).
 */
export function mayHaveReached(err: unknown): err is KeygateError {
  return err instanceof KeygateError && MAYBE_REACHED.has(err)
}

/** A 2xx: the service carried the request out, whatever its body says. */
export function succeeded(status: number): boolean {
  return status >= 200 && status < 300
}

/** `http://host:port/path` without credentials, query or trailing slash: how a URL is shown. */
export function displayUrl(url: URL): string {
  return `${url.protocol}//${url.host}${url.pathname.replace(TRAILING_SLASHES, '')}`
}

/**
 * Whether `url` reaches a host other than this machine over plain http: the integration's
 * credentials (Gitea's Basic password, n8n's login and session) and the tokens it makes would
 * cross the network unencrypted.
 */
export function plainRemote(url: string): boolean {
  const u = URL.parse(url)
  if (u === null || u.protocol !== 'http:') return false
  const host = u.hostname.replace(/^\[|\]$/g, '').toLowerCase()
  return !(host === 'localhost' || host.endsWith('.localhost') || /^127\.\d+\.\d+\.\d+$/.test(host) || host === '::1')
}

export class IntegrationHttp {
  readonly service: ServiceName
  readonly baseUrl: string
  readonly timeoutMs: number
  readonly #base: URL
  readonly #agent: Agent
  /** Credentials of the client itself (password, Basic header, session cookie): kept for its life. */
  readonly #secrets = new Set<string>()
  /** Secrets passing through (tokens created or verified): only the latest few, so the set stays small. */
  #transient: string[] = []
  /** The client's session credential (n8n's cookie) and the one it replaced: see `session`. */
  #sessions: string[] = []
  /** Every form of every secret, longest first: built by `redact` when the secrets changed since. */
  #forms: string[] | undefined

  constructor(options: { service: ServiceName; url: string; timeoutMs: number }) {
    this.service = options.service
    this.timeoutMs = options.timeoutMs
    this.#base = new URL(options.url)
    if (this.#base.username || this.#base.password) {
      throw new KeygateError(`${options.service}_not_configured`, `the ${SERVICE_LABEL[options.service]} URL must not carry credentials; give them in their own settings`)
    }
    this.baseUrl = displayUrl(this.#base)
    this.#agent = new Agent({ connect: { timeout: options.timeoutMs }, keepAliveTimeout: 4_000 })
  }

  /**
   * Remembers a secret, so that `redact` cuts it from any text passed on. A `transient` one (a
   * token on its way to the caller) is kept only among the latest few: a long-running admin
   * process verifying many tokens must not grow this list without bound.
   */
  secret(value: string | undefined, options: { transient?: boolean } = {}): void {
    if (!value || value.length < 4) return
    if (!options.transient) {
      if (this.#secrets.has(value)) return
      this.#secrets.add(value)
    } else {
      if (this.#transient.includes(value)) return
      this.#transient = [value, ...this.#transient].slice(0, MAX_TRANSIENT)
    }
    this.#forms = undefined
  }

  /**
   * Remembers the client's session credential (a cookie a login answered) in place of the one
   * before it but one: each login's was kept for the client's life, one more for every login (n8n
   * allows five a minute), each cut from every message (found by a review of memory). The one it
   * replaced is still cut, as a call made with it may be answered after the login.
   */
  session(value: string | undefined): void {
    if (!value || value.length < 4 || this.#sessions[0] === value) return
    this.#sessions = [value, ...this.#sessions.filter((v) => v !== value)].slice(0, 2)
    this.#forms = undefined
  }

  /** How many secrets `redact` cuts (each in its forms): tests count them. */
  get secretsHeld(): number {
    return this.#secrets.size + this.#sessions.length + this.#transient.length
  }

  /**
   * `text` without any secret this client knows, shortened to one readable line: each as written,
   * JSON-escaped and URL-encoded (secretForms), the forms a service echoing a request body or URL shows it in
   * (before, found by a review, a password holding `"` or `\` was shown JSON-escaped). Longest
   * first, so that a secret inside another leaves no part of it. A secret shorter than 4
   * characters is not remembered (see `secret`): cut from any text, it would mangle the rest.
   */
  redact(text: string): string {
    this.#forms ??= secretForms([...this.#secrets, ...this.#sessions, ...this.#transient])
    const out = cutSecrets(text, this.#forms).replace(/\s+/g, ' ').trim()
    return clipped(out, MAX_MESSAGE)
  }

  /** The service's own message in an error answer (`message`, or `error`), redacted. */
  messageOf(res: HttpResponse): string {
    return this.#ownMessage(res) ?? 'no message'
  }

  #ownMessage(res: HttpResponse): string | undefined {
    const b = res.body
    if (b && typeof b === 'object') {
      const m = (b as { message?: unknown }).message ?? (b as { error?: unknown }).error
      if (typeof m === 'string' && m !== '') return this.redact(m)
    }
    return typeof b === 'string' && b !== '' && !/^\s*</.test(b) ? this.redact(b) : undefined
  }

  /**
   * What an answer of the wrong shape held, in a few words for an error message: its content
   * type and the start of a text body (redacted: a secret the client knows, such as the key
   * being checked, is not echoed), or which JSON came back.
   */
  describe(res: HttpResponse): string {
    const b = res.body
    const type = String(res.headers['content-type'] ?? 'no content type').split(';')[0]
    if (typeof b === 'string') {
      if (b.trim() === '') return `an empty body (${type})`
      if (/^\s*</.test(b)) return `a page of markup (${type})`
      const start = this.redact(b)
      return `text (${type}): ${JSON.stringify(clipped(start, 60))}`
    }
    if (Array.isArray(b)) return `a JSON list of ${b.length}`
    if (b !== null && typeof b === 'object') {
      const keys = Object.keys(b)
      return keys.length === 0 ? 'an empty JSON object' : `a JSON object with ${this.redact(keys.slice(0, 5).join(', '))}${keys.length > 5 ? ', ...' : ''}`
    }
    return `JSON ${JSON.stringify(b)}`
  }

  /**
   * The `<service>_error` of a gateway's answer (`fromGateway`): its status and message, else what
   * it held (a proxy's page has no message), and `what` was asked when given. It may have reached
   * the service (`mayHaveReached`).
   */
  gatewayAnswer(res: HttpResponse, what?: string): KeygateError {
    const own = this.#ownMessage(res)
    const to = what === undefined ? '' : ` to the request to ${what}`
    const said = own === undefined ? ` with ${this.describe(res)}` : `: ${own}`
    return this.#maybeReached(new KeygateError(`${this.service}_error`, `${SERVICE_LABEL[this.service]} at ${this.baseUrl} answered ${res.status}${to}${said}`, { status: res.status }))
  }

  /**
   * Refuses an error answer that is not the service's own JSON error (an object with a string
   * `message`, as Gitea's and n8n's 401 and 403 are) with the `<service>_error` naming what came
   * back: a page of another server's (an SSO proxy's sign-in, a WAF's 403) says nothing of the
   * credential a verify checks. `request` is how the message names it: `GET /api/v1/user`.
   */
  assertOwnError(res: HttpResponse, request: string): void {
    const foreign = this.foreignError(res, request)
    if (foreign !== undefined) throw foreign
  }

  /**
   * Whether `res` is the service's own JSON error, an object with a string `message`: not a page
   * or text of another server's, nor of the service's router (Gitea's `404 page not found` for a
   * path it has no route for, its empty 405 for a method the route does not take).
   */
  ownError(res: HttpResponse): boolean {
    const body = res.body as { message?: unknown } | null
    return typeof body === 'object' && body !== null && typeof body.message === 'string'
  }

  /**
   * The `<service>_error` of `assertOwnError` when `res` is not the service's own JSON error, else
   * undefined. Also for the calls made with keygate's own credentials (Gitea's token routes, n8n's
   * login and session): a page of another server's says nothing of them either.
   */
  foreignError(res: HttpResponse, request: string): KeygateError | undefined {
    if (this.ownError(res)) return undefined
    const label = SERVICE_LABEL[this.service]
    return new KeygateError(
      `${this.service}_error`,
      `${label} at ${this.baseUrl} answered ${request} ${res.status} with ${this.describe(res)}, not ${label}'s answer: is ${this.service.toUpperCase()}_URL ${label}'s address?`,
      { status: res.status },
    )
  }

  /** A `<service>_error` saying what was attempted, the status and the service's message. */
  failure(what: string, res: HttpResponse): KeygateError {
    if (fromGateway(res.status)) return this.gatewayAnswer(res, what)
    // A redirect is not followed (it would carry the credentials or the token elsewhere); a
    // proxy's redirect page has no message, so "refused ...: 301 no message" said nothing of it
    // (found by a review).
    const location = res.headers.location
    if (res.status >= 300 && res.status < 400 && typeof location === 'string' && location !== '') {
      const label = SERVICE_LABEL[this.service]
      return new KeygateError(
        `${this.service}_error`,
        `${label} at ${this.baseUrl} answered ${res.status} redirecting to ${JSON.stringify(this.redact(location.slice(0, 200)))} to the request to ${what}, and keygate does not follow a redirect with its credentials: set ${this.service.toUpperCase()}_URL to the address ${label} answers at (https:// where it redirects there)`,
        { status: res.status },
      )
    }
    return new KeygateError(`${this.service}_error`, `${SERVICE_LABEL[this.service]} at ${this.baseUrl} refused to ${what}: ${res.status} ${this.messageOf(res)}`, {
      status: res.status,
    })
  }

  async call(method: 'GET' | 'POST' | 'DELETE', path: string, options: CallOptions = {}): Promise<HttpResponse> {
    const url = new URL(this.#base.pathname.replace(TRAILING_SLASHES, '') + path, this.#base)
    for (const [k, v] of Object.entries(options.query ?? {})) url.searchParams.set(k, String(v))
    const headers: Record<string, string> = { accept: 'application/json', ...options.headers }
    let body: string | undefined
    if (options.json !== undefined) {
      body = JSON.stringify(options.json)
      headers['content-type'] = 'application/json'
    }
    try {
      const res = await request(url, {
        dispatcher: this.#agent,
        method,
        headers,
        body,
        headersTimeout: this.timeoutMs,
        bodyTimeout: this.timeoutMs,
        signal: AbortSignal.timeout(this.timeoutMs),
      })
      const chunks: Buffer[] = []
      let size = 0
      for await (const chunk of res.body) {
        size += (chunk as Buffer).length
        if (size > MAX_BODY_BYTES) {
          res.body.destroy()
          throw this.#unreadable(res.statusCode, `${SERVICE_LABEL[this.service]} at ${this.baseUrl} answered ${method} ${path} with more than ${MAX_BODY_BYTES} bytes`)
        }
        chunks.push(chunk as Buffer)
      }
      const text = Buffer.concat(chunks).toString('utf8')
      const type = String(res.headers['content-type'] ?? '')
      let parsed: unknown = text
      if (text !== '' && (type.includes('json') || /^\s*[[{]/.test(text))) {
        try {
          parsed = JSON.parse(text)
        } catch {
          if (type.includes('json')) throw this.#unreadable(res.statusCode, `${SERVICE_LABEL[this.service]} at ${this.baseUrl} answered ${method} ${path} with invalid JSON`)
        }
      }
      return { status: res.statusCode, headers: res.headers, body: parsed }
    } catch (err) {
      if (err instanceof KeygateError) throw err
      throw this.#transportError(err as Error & { code?: string })
    }
  }

  /**
   * An answer whose body cannot be read (too large, invalid JSON): of a success or a gateway's
   * status, the request may have been carried out all the same (a create made the credential).
   */
  #unreadable(status: number, message: string): KeygateError {
    const err = new KeygateError(`${this.service}_error`, message, { status })
    return succeeded(status) || fromGateway(status) ? this.#maybeReached(err) : err
  }

  #maybeReached(err: KeygateError): KeygateError {
    MAYBE_REACHED.add(err)
    return err
  }

  #transportError(err: Error & { code?: string; cause?: unknown }): KeygateError {
    const label = SERVICE_LABEL[this.service]
    const code = err.code ?? (err.cause as { code?: string } | undefined)?.code
    const connected = code === undefined || !neverConnected(code)
    let out: KeygateError
    if (err.name === 'TimeoutError' || err.name === 'AbortError' || (code !== undefined && TIMEOUT_CODES.has(code))) {
      out = new KeygateError(`${this.service}_timeout`, `${label} at ${this.baseUrl} did not answer within ${this.timeoutMs} ms`)
    } else if (connected) {
      out = new KeygateError(`${this.service}_unreachable`, `${label} at ${this.baseUrl}: the connection was lost after the request was sent (${this.redact(code ?? err.message)})`)
    } else {
      out = new KeygateError(`${this.service}_unreachable`, `${label} at ${this.baseUrl} could not be reached (${this.redact(code)})`)
    }
    return connected ? this.#maybeReached(out) : out
  }

  async close(): Promise<void> {
    await this.#agent.close()
  }
}
