// A fake Gitea for the tests: the token, user and version operations of the swagger excerpt in
// test/fixtures/gitea-tokens.swagger.json, behaving as shared/integrations/GITEA.md describes
// (HTTP Basic only on the token routes, 400 on a duplicate name or unknown scope, 422 on a
// missing name, `limit` capped at 50 with X-Total-Count, delete by id then by name). Every
// answer is recorded, so the tests can validate each one against the excerpt's schemas.
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { randomBytes } from 'node:crypto'

export interface FakeUser {
  id: number
  login: string
  password: string
  email: string
  is_admin: boolean
  /** `false`: not activated, or disabled by an admin (Gitea's IsActive). */
  active: boolean
  /** Suspended by an admin (Gitea's ProhibitLogin). */
  prohibit_login: boolean
  /** Made to change the password at the next sign-in (Gitea's MustChangePassword). */
  must_change_password: boolean
}

interface StoredToken {
  id: number
  owner: string
  name: string
  sha1: string
  scopes: string[]
  /** Gitea's `created_unix`: whole seconds of the fake's clock. */
  created_unix: number
}

/** A sign-in: the user (and the token, when one stood for the password), a suspended user's password, or none. */
type SignIn = { user: FakeUser; token?: StoredToken } | { prohibited: FakeUser } | 'none' | 'bad'

export interface RecordedResponse {
  method: string
  /** The swagger path the request matched (`/users/{username}/tokens`), or the raw path. */
  operation: string
  status: number
  body: unknown
  headers: http.OutgoingHttpHeaders
}

const CATEGORIES = ['activitypub', 'admin', 'misc', 'notification', 'organization', 'package', 'issue', 'repository', 'user']
const KNOWN = new Set(['all', 'public-only', ...CATEGORIES.flatMap((c) => [`read:${c}`, `write:${c}`])])
const DEFAULT_PAGING = 30
const MAX_RESPONSE_ITEMS = 50

/**
 * The order of tokens made in the same second, in one list request, as PostgreSQL leaves it.
 * Gitea orders by `created_unix DESC` only and pages with LIMIT/OFFSET, so PostgreSQL sorts with
 * the bound offset + limit: above twice the bound in rows, a top-N heap (its sift operations set
 * which tied rows are kept and in what order, so the order depends on the bound), else one full
 * quicksort (the same order whatever the bound). The same request always gives the same order,
 * but a page sorted by the heap and the next one may place a group of ties straddling their
 * boundary otherwise: a tie is listed on both pages and another on neither, on every walk (measured
 * on PostgreSQL 15 with Gitea's access_token table: 130 tokens at 40 a second, read in pages of 50,
 * gave 130 rows of 111 to 130 distinct ids depending on where the seconds began). The model keeps
 * that structure and stands a hash of (id, bound) for the heap's choice, a hash of the id alone for
 * the quicksort's.
 */
function tieRank(id: number, bound: number, rows: number): number {
  let h = Math.imul(id ^ Math.imul(rows > 2 * bound ? bound : 0, 0x9e3779b1), 0x85ebca6b)
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35)
  return (h ^ (h >>> 16)) >>> 0
}

/** Gitea's normalisation: duplicates dropped, write implies read, every write:* together is `all`. */
function normalise(scopes: string[]): string[] {
  const set = new Set(scopes)
  if (set.has('all') || CATEGORIES.every((c) => set.has(`write:${c}`))) return set.has('public-only') ? ['all', 'public-only'] : ['all']
  for (const c of CATEGORIES) if (set.has(`write:${c}`)) set.delete(`read:${c}`)
  return [...set].sort()
}

/** Whether `scopes` grant `need` (`read:user` is granted by `write:user` and `all`). */
function grants(scopes: string[], need: string): boolean {
  const [level, cat] = need.split(':')
  return scopes.includes('all') || scopes.includes(`write:${cat}`) || (level === 'read' && scopes.includes(`read:${cat}`))
}

export interface FakeGiteaOptions {
  version?: string
  /** [service] REGISTER_EMAIL_CONFIRM: an inactive user is "not activated" rather than "prohibited". */
  registerEmailConfirm?: boolean
}

/**
 * Go's strconv.ParseInt(s, 0, 64) as Gitea's DeleteAccessToken ignores its error: a sign, then
 * 0x/0o/0b or a leading 0 (octal) picks the base, `_` may separate digits after a prefix; a
 * syntax error is 0, a value out of range is the int64 bound (never a token id).
 */
export function goParseInt(s: string): bigint {
  const m = /^([+-]?)(.*)$/s.exec(s) as RegExpExecArray
  const [, sign, rest = ''] = m
  let base = 10
  let digits = rest
  const prefix = /^0([xXoObB])/.exec(rest)
  if (prefix) {
    base = { x: 16, o: 8, b: 2 }[(prefix[1] as string).toLowerCase() as 'x' | 'o' | 'b']
    digits = rest.slice(2)
  } else if (rest.length > 1 && rest.startsWith('0')) {
    base = 8
    digits = rest.slice(1)
  }
  // Underscores as Go's integer literals take them (strconv's underscoreOK): each after a digit,
  // a base prefix or an octal literal's leading 0 ("1_000", "0x_1", "0_7"), and before a digit.
  if (digits.includes('_')) {
    const afterLead = prefix !== null || base === 8
    if (digits.endsWith('_') || digits.includes('__') || (digits.startsWith('_') && !afterLead)) return 0n
    digits = digits.replaceAll('_', '')
  }
  const alphabet = '0123456789abcdef'.slice(0, base)
  if (digits === '' || [...digits.toLowerCase()].some((c) => !alphabet.includes(c))) return 0n
  let n = 0n
  for (const c of digits.toLowerCase()) n = n * BigInt(base) + BigInt(alphabet.indexOf(c))
  const value = sign === '-' ? -n : n
  const max = (1n << 63n) - 1n
  if (value > max) return max
  if (value < -max - 1n) return -max - 1n
  return value
}

export class FakeGitea {
  /** By lower-case login: Gitea matches user names ignoring case (`lower_name`). */
  readonly users = new Map<string, FakeUser>()
  readonly tokens: StoredToken[] = []
  readonly responses: RecordedResponse[] = []
  /** Requests seen, method and path (for tests of what the client sends). */
  readonly requests: Array<{ method: string; path: string; authorization: string | undefined }> = []
  url = ''
  /** Called with each request before it is answered (to change the fake's state between two of a client's requests). */
  beforeAnswer: ((method: string, path: string) => void) | undefined
  /** Hold every answer this long (timeout tests). */
  delayMs = 0
  /**
   * Hold the next answer to a request of this method this long, after the request has taken
   * effect: a server that made the change and answers too late (timeout tests).
   */
  lateAnswer: { method: string; ms: number } | undefined
  /**
   * How many tokens the fake's clock makes in one second (`created_unix`). At 1, every token has
   * a second of its own and the list is strictly newest first; above, tokens made together (a
   * script, the tests' bulk tokens) share a second, and their order is PostgreSQL's (`tieRank`).
   */
  tokensPerSecond = 1
  /**
   * Gitea checks a new token's name (AccessTokenByNameExists) and inserts it apart, with no
   * transaction and no unique index: set, a create waits after its check, until another create
   * arrives or some turns of the event loop have passed, so two at once both pass the check.
   */
  nameCheckRace = false
  /** Answer the next requests matching a method with this status and message instead. */
  readonly faults: Array<{ method: string; status: number; message: string }> = []
  readonly #server: http.Server
  readonly #options: FakeGiteaOptions
  #nextId = 1
  #clock = 1_767_225_600
  #madeThisSecond = 0
  /** Bumped by every create request that arrives (for `nameCheckRace`). */
  #createsArrived = 0

  constructor(options: FakeGiteaOptions = {}) {
    this.#options = options
    this.#server = http.createServer((req, res) => void this.#handle(req, res))
  }

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve))
    this.url = `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`
    return this.url
  }

  async stop(): Promise<void> {
    this.#server.closeAllConnections()
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
  }

  addUser(login: string, password: string, options: { is_admin?: boolean; active?: boolean; prohibit_login?: boolean; must_change_password?: boolean } = {}): FakeUser {
    const user = {
      id: this.users.size + 1,
      login,
      password,
      email: `${login}@example.test`,
      is_admin: options.is_admin === true,
      active: options.active !== false,
      prohibit_login: options.prohibit_login === true,
      must_change_password: options.must_change_password === true,
    }
    this.users.set(login.toLowerCase(), user)
    return user
  }

  /** The user of that name, ignoring case as Gitea does. */
  user(name: string): FakeUser | undefined {
    return this.users.get(name.toLowerCase())
  }

  /**
   * The 403 Gitea's API middleware (verifyAuthWithOptions) answers to any call signed in as a
   * user barred from signing in, before the route's own checks; null when the user may.
   */
  #barred(user: FakeUser): string | null {
    if (!user.active && this.#options.registerEmailConfirm === true) return 'This account is not activated.'
    if (!user.active || user.prohibit_login) return 'This account is prohibited from signing in, please contact your site administrator.'
    if (user.must_change_password) return `You must change your password. Change it at: ${this.url}/user/change_password`
    return null
  }

  /** A token made as if through Gitea's own UI (not by keygate); returns its secret. */
  addToken(owner: string, name: string, scopes: string[]): { id: number; sha1: string } {
    const t = this.#insert(this.user(owner)?.login ?? owner, name, scopes)
    return { id: t.id, sha1: t.sha1 }
  }

  /** Moves the clock to the next second: the tokens made from now on start a second of their own. */
  nextSecond(): void {
    this.#clock++
    this.#madeThisSecond = 0
  }

  #insert(owner: string, name: string, scopes: string[]): StoredToken {
    if (this.#madeThisSecond >= this.tokensPerSecond) this.nextSecond()
    this.#madeThisSecond++
    const t = { id: this.#nextId++, owner, name, sha1: randomBytes(20).toString('hex'), scopes: normalise(scopes), created_unix: this.#clock }
    this.tokens.push(t)
    return t
  }

  /**
   * The next token gets the id after the highest one left, as on MySQL before 8, whose
   * AUTO_INCREMENT restarts so after the newest row was deleted (or as after a restore from an
   * earlier backup): Gitea hands out a deleted token's id again.
   */
  restartAutoIncrement(): void {
    this.#nextId = Math.max(0, ...this.tokens.map((t) => t.id)) + 1
  }

  /** Removes a token as a Gitea user would by hand, behind keygate's back. */
  removeToken(id: number): void {
    const i = this.tokens.findIndex((t) => t.id === id)
    if (i >= 0) this.tokens.splice(i, 1)
  }

  #send(req: http.IncomingMessage, res: http.ServerResponse, operation: string, status: number, body?: unknown, headers: http.OutgoingHttpHeaders = {}): void {
    this.responses.push({ method: req.method ?? '', operation, status, body, headers })
    const text = body === undefined ? '' : JSON.stringify(body)
    const write = () => {
      if (res.destroyed) return
      res.writeHead(status, { ...(body === undefined ? {} : { 'content-type': 'application/json;charset=utf-8' }), 'content-length': Buffer.byteLength(text), ...headers })
      res.end(text)
    }
    const late = this.lateAnswer
    if (late !== undefined && late.method === req.method) {
      this.lateAnswer = undefined
      setTimeout(write, late.ms)
    } else {
      write()
    }
  }

  #error(req: http.IncomingMessage, res: http.ServerResponse, operation: string, status: number, message: string): void {
    const body: Record<string, unknown> = { message, url: `${this.url}/api/swagger` }
    if (status === 404) body.errors = null
    this.#send(req, res, operation, status, body)
  }

  /**
   * The user a Basic header names (any case) when its password (or one of the user's tokens)
   * matches. A password sign-in of a suspended user fails in Gitea's UserSignIn (401, 'prohibited');
   * a token as the password signs in, and the middleware then answers 403.
   */
  #basic(header: string | undefined): SignIn {
    const m = /^Basic\s+(\S+)$/i.exec(header ?? '')
    if (!m) return 'none'
    const text = Buffer.from(m[1] as string, 'base64').toString('utf8')
    const colon = text.indexOf(':')
    const user = this.user(text.slice(0, colon))
    const secret = text.slice(colon + 1)
    if (!user || colon < 0) return 'bad'
    if (secret === user.password) return user.prohibit_login ? { prohibited: user } : { user }
    const token = this.tokens.find((t) => t.owner === user.login && t.sha1 === secret)
    return token ? { user, token } : 'bad'
  }

  /** Who a request is signed in as (token header or Basic), as Gitea's API auth group decides before any route. */
  #signedIn(header: string | undefined): SignIn {
    const m = /^(?:token|bearer)\s+(\S+)$/i.exec(header ?? '')
    if (!m) return this.#basic(header)
    const token = this.tokens.find((t) => t.sha1 === m[1])
    const user = token ? this.user(token.owner) : undefined
    return token && user ? { user, token } : 'bad'
  }

  #sendBarred(req: http.IncomingMessage, res: http.ServerResponse, operation: string, message: string): void {
    // The middleware writes ctx.JSON(403, {"message": ...}): no `url`.
    this.#send(req, res, operation, 403, { message })
  }

  async #handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = []
    for await (const c of req) chunks.push(c as Buffer)
    const raw = Buffer.concat(chunks).toString('utf8')
    const url = new URL(req.url ?? '/', 'http://fake')
    const method = req.method ?? 'GET'
    this.requests.push({ method, path: url.pathname, authorization: req.headers.authorization })
    this.beforeAnswer?.(method, url.pathname)
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs))
    if (res.destroyed) return
    const path = url.pathname.replace(/^\/api\/v1/, '')
    const m = /^\/users\/([^/]+)\/tokens(?:\/([^/]+))?$/.exec(path)
    const operation = m ? (m[2] === undefined ? '/users/{username}/tokens' : '/users/{username}/tokens/{token}') : path
    const fault = this.faults.findIndex((f) => f.method === method)
    if (fault >= 0 && url.pathname.startsWith('/api/v1/')) {
      const f = this.faults.splice(fault, 1)[0] as { status: number; message: string }
      return this.#error(req, res, operation, f.status, f.message)
    }
    if (!url.pathname.startsWith('/api/v1/')) return this.#error(req, res, url.pathname, 404, 'Not Found')
    // Gitea's API middleware, before every route: a signed-in user barred from signing in gets 403.
    const signed = this.#signedIn(req.headers.authorization)
    if (typeof signed === 'object' && 'prohibited' in signed) {
      // Gitea's UserSignIn refuses the password of a suspended user; apiAuth answers 401 with its error.
      return this.#error(req, res, operation, 401, `user is not allowed login [uid: ${signed.prohibited.id}, name: ${signed.prohibited.login}]`)
    }
    if (typeof signed === 'object') {
      const barred = this.#barred(signed.user)
      if (barred !== null) return this.#sendBarred(req, res, operation, barred)
    }

    if (path === '/version' && method === 'GET') return this.#send(req, res, '/version', 200, { version: this.#options.version ?? '1.22.6' })
    if (path === '/user' && method === 'GET') return this.#currentUser(req, res)
    if (!m) return this.#error(req, res, path, 404, 'Not Found')
    const allowed = m[2] === undefined ? ['GET', 'POST'] : ['DELETE']
    if (!allowed.includes(method)) return this.#error(req, res, operation, 405, 'Method Not Allowed')

    // Gitea 1.22's chain for the token routes (routers/api/v1/api.go), in its order: the sign-in
    // (a wrong Basic password fails there, 401), the user scope of a token used to sign in
    // (tokenRequiresScopes, 403), the user of the path (UserAssignmentAPI, 404), the caller being
    // that user or a site admin (reqSelfOrAdmin, 403), and only then Basic (or reverse-proxy) auth
    // (reqBasicOrRevProxyAuth, 401): a token header alone is not enough.
    if (signed === 'bad' && this.#basic(req.headers.authorization) === 'bad') return this.#error(req, res, operation, 401, 'user does not exist or the password is invalid')
    // A token header whose token Gitea does not know fails the sign-in too, as on /user: 401
    // (GITEA.md: a token header alone gets 401 on the token routes). Before (found by a review),
    // the fake went on without a doer and answered 403, or 404 for a user that does not exist.
    if (signed === 'bad') return this.#error(req, res, operation, 401, 'user does not exist')
    const doer = typeof signed === 'object' && 'user' in signed ? signed : undefined
    const need = method === 'GET' ? 'read:user' : 'write:user'
    if (doer?.token && !grants(doer.token.scopes, need)) {
      return this.#error(req, res, operation, 403, `token does not have at least one of required scope(s), required=[${need}], token scope=${doer.token.scopes.join(',')}`)
    }
    const target = this.user(decodeURIComponent(m[1] as string))
    if (!target) return this.#error(req, res, operation, 404, 'user does not exist')
    if (!doer || (doer.user.login !== target.login && !doer.user.is_admin)) {
      return this.#error(req, res, operation, 403, 'doer should be the site admin or be same as the contextUser')
    }
    if (this.#basic(req.headers.authorization) === 'none') return this.#error(req, res, operation, 401, 'auth required')

    if (method === 'GET') return this.#list(req, res, operation, target, url)
    if (method === 'POST') return this.#create(req, res, operation, target, raw)
    return this.#delete(req, res, operation, target, decodeURIComponent(m[2] as string))
  }

  #currentUser(req: http.IncomingMessage, res: http.ServerResponse): void {
    const header = req.headers.authorization ?? ''
    const m = /^(?:token|bearer)\s+(\S+)$/i.exec(header)
    let user: FakeUser | undefined
    if (m) {
      const token = this.tokens.find((t) => t.sha1 === m[1])
      if (!token) return this.#error(req, res, '/user', 401, 'user does not exist')
      if (!grants(token.scopes, 'read:user')) {
        return this.#error(req, res, '/user', 403, `token does not have at least one of required scope(s), required=[read:user], token scope=${token.scopes.join(',')}`)
      }
      user = this.user(token.owner)
    } else {
      const auth = this.#basic(header)
      if (typeof auth === 'string' || 'prohibited' in auth) return this.#error(req, res, '/user', 401, 'token is required')
      // A token as the Basic password is checked against its scopes, as in the token header.
      if (auth.token && !grants(auth.token.scopes, 'read:user')) {
        return this.#error(req, res, '/user', 403, `token does not have at least one of required scope(s), required=[read:user], token scope=${auth.token.scopes.join(',')}`)
      }
      user = auth.user
    }
    if (!user) return this.#error(req, res, '/user', 401, 'user does not exist')
    this.#send(req, res, '/user', 200, {
      id: user.id,
      login: user.login,
      login_name: '',
      source_id: 0,
      full_name: '',
      email: user.email,
      avatar_url: `${this.url}/avatars/${user.id}`,
      language: 'en-US',
      is_admin: user.is_admin,
      last_login: '2026-01-01T00:00:00Z',
      created: '2025-01-01T00:00:00Z',
      restricted: false,
      active: user.active,
      prohibit_login: user.prohibit_login,
      location: '',
      website: '',
      description: '',
      visibility: 'public',
      followers_count: 0,
      following_count: 0,
      starred_repos_count: 0,
    })
  }

  #list(req: http.IncomingMessage, res: http.ServerResponse, operation: string, user: FakeUser, url: URL): void {
    const page = Math.max(1, Number.parseInt(url.searchParams.get('page') ?? '1', 10) || 1)
    let limit = Number.parseInt(url.searchParams.get('limit') ?? '', 10)
    if (!(limit > 0)) limit = DEFAULT_PAGING
    limit = Math.min(limit, MAX_RESPONSE_ITEMS)
    // Newest first, as Gitea lists them (ListAccessTokensOptions.ToOrders: `created_unix DESC`),
    // and nothing more: ties in PostgreSQL's order for this page's bound (see tieRank).
    const offset = (page - 1) * limit
    const own = this.tokens.filter((t) => t.owner === user.login)
    const rank = (t: StoredToken) => tieRank(t.id, offset + limit, own.length)
    own.sort((a, b) => b.created_unix - a.created_unix || rank(a) - rank(b))
    const items = own.slice(offset, offset + limit).map((t) => ({ id: t.id, name: t.name, sha1: '', token_last_eight: t.sha1.slice(-8), scopes: t.scopes }))
    this.#send(req, res, operation, 200, items, { 'x-total-count': String(own.length), 'access-control-expose-headers': 'X-Total-Count' })
  }

  /**
   * The gap between Gitea's name check and its insert, held open until another create request
   * arrives (which then passes the same check) or, when none comes, for some turns of the event
   * loop: not a time, only room for a request already on its way.
   */
  async #awaitAnotherCreate(): Promise<void> {
    const seen = this.#createsArrived
    for (let turn = 0; turn < 200 && this.#createsArrived === seen; turn++) await new Promise((r) => setImmediate(r))
  }

  async #create(req: http.IncomingMessage, res: http.ServerResponse, operation: string, user: FakeUser, raw: string): Promise<void> {
    this.#createsArrived++
    let body: { name?: unknown; scopes?: unknown }
    try {
      body = raw === '' ? {} : (JSON.parse(raw) as typeof body)
    } catch {
      return this.#error(req, res, operation, 422, '[]: Deserialization error')
    }
    if (typeof body.name !== 'string' || body.name === '') return this.#error(req, res, operation, 422, '[Name]: Required')
    const name = body.name
    if (this.tokens.some((t) => t.owner === user.login && t.name === name)) return this.#error(req, res, operation, 400, 'access token name has been used already')
    if (this.nameCheckRace) await this.#awaitAnotherCreate()
    const scopes = Array.isArray(body.scopes) ? body.scopes.map(String).flatMap((s) => s.split(',')).map((s) => s.trim()).filter(Boolean) : []
    const unknown = scopes.find((s) => !KNOWN.has(s))
    if (unknown !== undefined) return this.#error(req, res, operation, 400, `invalid access token scope provided: invalid access token scope: ${unknown}`)
    if (scopes.length === 0) return this.#error(req, res, operation, 400, 'access token must have a scope')
    const t = this.#insert(user.login, name, scopes)
    this.#send(req, res, operation, 201, { id: t.id, name: t.name, sha1: t.sha1, token_last_eight: t.sha1.slice(-8), scopes: t.scopes })
  }

  #delete(req: http.IncomingMessage, res: http.ServerResponse, operation: string, user: FakeUser, ref: string): void {
    // Gitea: strconv.ParseInt(ref, 0, 64), its error ignored; only 0 falls back to the name.
    const id = goParseInt(ref)
    let matches: StoredToken[]
    if (id !== 0n) {
      matches = this.tokens.filter((t) => BigInt(t.id) === id && t.owner === user.login)
    } else {
      matches = this.tokens.filter((t) => t.owner === user.login && t.name === ref)
      if (matches.length > 1) return this.#error(req, res, operation, 422, `multiple matches for token name '${ref}'`)
    }
    const found = matches[0]
    if (!found) return this.#error(req, res, operation, 404, 'access token does not exist')
    this.removeToken(found.id)
    this.#send(req, res, operation, 204)
  }
}
