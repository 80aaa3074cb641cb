// A fake Gitea for the tests: the token, user and version operations of the swagger excerpt in
// test/fixtures/gitea-tokens.swagger.json, behaving as shared/integrations/GITEA.md describes
// (HTTP Basic only on the token routes, 400 on a duplicate name or unknown scope, 422 on a
// missing name, `limit` capped at 50 with X-Total-Count, delete by id then by name), and where
// GITEA.md says no more, as Gitea 1.22's source does: a create's body bound by Content-Type and Go's
// encoding/json (bindCreateOption), the sign-in of its API auth group (a token
// header only as `token` or any case of `bearer`; a token as the Basic password or user name signs
// in as its owner, whatever the name; a failed sign-in is 401 on every route, /version too), the
// scopes written back in Gitea's order, and `page`/`limit` read as Go's strconv.Atoi reads them (a
// page below 1 lists every token). Every answer is recorded, so the tests can validate each one
// against the excerpt's schemas.
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
  /** Gitea's user visibility (public, limited, private); see `hidePrivateUsers`. */
  visibility: 'public' | 'limited' | 'private'
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

/**
 * What Gitea's API auth group made of a request (services/auth/group.go, as apiAuth in
 * routers/api/v1/api.go calls it before any route): a doer, with the token it signed in with (its
 * scopes are then checked) and whether Gitea's Basic method signed it in (IsBasicAuth, which the
 * token routes require); the error of a method that failed, which apiAuth answers with 401; or
 * nobody (no credentials any method takes).
 */
type SignIn = { user: FakeUser; token: StoredToken | undefined; basic: boolean } | { error: string } | undefined

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

/**
 * Gitea's normalisation (AccessTokenScope.Normalize in models/auth/access_token_scope.go, through a
 * bitmap): duplicates dropped, write implies read, and the scopes written back in Gitea's own fixed
 * order whatever the order asked for: `public-only` first, then each category in CATEGORIES' order
 * (Gitea's), its write scope or else its read scope. A write scope of every category (`all` among
 * them) is written `all`, after `public-only`. Before, the fake sorted them alphabetically.
 */
function normalise(scopes: string[]): string[] {
  const set = new Set(scopes)
  const level = (c: string): string | undefined => (set.has('all') || set.has(`write:${c}`) ? 'write' : set.has(`read:${c}`) ? 'read' : undefined)
  const head = set.has('public-only') ? ['public-only'] : []
  if (CATEGORIES.every((c) => level(c) === 'write')) return [...head, 'all']
  return [...head, ...CATEGORIES.flatMap((c) => {
    const l = level(c)
    return l === undefined ? [] : [`${l}:${c}`]
  })]
}

/** Whether `scopes` grant `need` (`read:user` is granted by `write:user` and `all`). */
function grants(scopes: string[], need: string): boolean {
  const [level, cat] = need.split(':')
  return scopes.includes('all') || scopes.includes(`write:${cat}`) || (level === 'read' && scopes.includes(`read:${cat}`))
}

/**
 * The 403 of Gitea's tokenRequiresScopes when a token signed the request in without `need` (nor
 * the write scope or `all` that grant it), its scopes as Gitea stores them; null otherwise.
 */
function scopeRefusal(signed: SignIn, need: string): string | null {
  const token = signed !== undefined && 'token' in signed ? signed.token : undefined
  if (token === undefined || grants(token.scopes, need)) return null
  return `token does not have at least one of required scope(s), required=[${need}], token scope=${token.scopes.join(',')}`
}

export interface FakeGiteaOptions {
  version?: string
  /** [service] REGISTER_EMAIL_CONFIRM: an inactive user is "not activated" rather than "prohibited". */
  registerEmailConfirm?: boolean
  /**
   * Gitea 1.23 on: the API's `/users/{username}` group, the token routes in it, runs
   * individualPermsChecker after UserAssignmentAPI, so a private user is a 404 ("Visit Project",
   * `errors` null) to anyone but the user and site admins, before reqSelfOrAdmin's 403. A limited
   * user is hidden only from nobody signed in, which never reaches the token routes. Gitea 1.22
   * (GITEA.md, the default here) has no such check on these routes.
   */
  hidePrivateUsers?: boolean
}

/**
 * Go's strconv.ParseInt(s, base, 64) with its error ignored, for base 0 (Gitea's DeleteAccessToken)
 * and base 10 (strconv.Atoi, through Gitea's ctx.FormInt). A sign, then the digits; with base 0,
 * 0x/0o/0b or a leading 0 (octal) picks the base and `_` may separate digits. A syntax error
 * (spaces, a trailing letter: "1abc") is 0, a value out of range is the int64 bound (as Go
 * returns it beside the error, which both callers ignore).
 */
export function goParseInt(s: string, givenBase: 0 | 10 = 0): bigint {
  const m = /^([+-]?)(.*)$/s.exec(s) as RegExpExecArray
  const [, sign, rest = ''] = m
  let base = 10
  let digits = rest
  const prefix = givenBase === 0 ? /^0([xXoObB])/.exec(rest) : null
  if (prefix) {
    base = { x: 16, o: 8, b: 2 }[(prefix[1] as string).toLowerCase() as 'x' | 'o' | 'b']
    digits = rest.slice(2)
  } else if (givenBase === 0 && rest.length > 1 && rest.startsWith('0')) {
    base = 8
    digits = rest.slice(1)
  }
  // Digit by digit, as strconv.ParseUint reads them: a character that is no digit of the base is a
  // syntax error (0), unless the digits before it already overflowed 64 bits, where Go stops with
  // the bound before reading further ("99999999999999999999x" is the bound, "1abc" is 0).
  // Underscores are skipped with base 0 only, and judged after the digits as Go's integer literals
  // take them (strconv's underscoreOK): each after a digit, a base prefix or an octal literal's
  // leading 0 ("1_000", "0x_1", "0_7"), and before a digit.
  if (digits === '') return 0n
  const bound = sign === '-' ? -(1n << 63n) : (1n << 63n) - 1n
  const big = BigInt(base)
  let n = 0n
  for (const c of digits.toLowerCase()) {
    if (c === '_' && givenBase === 0) continue
    const d = '0123456789abcdefghijklmnopqrstuvwxyz'.indexOf(c)
    if (d < 0 || d >= base) return 0n
    n = n * big + BigInt(d)
    if (n >= 1n << 64n) return bound
  }
  if (givenBase === 0 && digits.includes('_')) {
    const afterLead = prefix !== null || base === 8
    if (digits.endsWith('_') || digits.includes('__') || (digits.startsWith('_') && !afterLead)) return 0n
  }
  // In int64's range, or its bound on that side.
  return n > (sign === '-' ? 1n << 63n : (1n << 63n) - 1n) ? bound : sign === '-' ? -n : n
}

/** Go's unicode.IsSpace, as strings.Fields and strings.TrimSpace apply it (not JavaScript's \s: U+0085 in, U+FEFF out). */
const GO_SPACE = '\\t\\n\\v\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000'
const GO_FIELD_SEPARATOR = new RegExp(`[${GO_SPACE}]+`, 'u')
const GO_TRIM = new RegExp(`^[${GO_SPACE}]+|[${GO_SPACE}]+$`, 'gu')

/**
 * A header value as Gitea's string functions see it: Node hands the header's bytes over as latin1,
 * Go decodes them as UTF-8 (a stray byte is U+FFFD, never a space).
 */
function goHeader(value: string | undefined): string {
  return Buffer.from(value ?? '', 'latin1').toString('utf8')
}

/**
 * The token of a token header, as Gitea's oauth2 method reads it (parseToken in
 * services/auth/oauth2.go): the header split as Go's strings.Fields splits (runs of white space,
 * none kept at either end) must give exactly two fields, the first `token` in lower case exactly or
 * `bearer` in any case. `Token x` is not a token header (before, the fake took any case of both).
 */
function tokenOfHeader(header: string | undefined): string | undefined {
  const fields = goHeader(header).split(GO_FIELD_SEPARATOR).filter((f) => f !== '')
  const [scheme, token] = fields
  if (fields.length !== 2 || scheme === undefined || token === undefined) return undefined
  return scheme === 'token' || scheme.toLowerCase() === 'bearer' ? token : undefined
}

/**
 * The user name and password of a Basic header as Gitea's Basic method reads them: the header cut
 * at its first space, the scheme `basic` in any case, the rest decoded as Go's
 * base64.StdEncoding.DecodeString does (padding required) and cut at its first colon
 * (base.BasicAuthDecode). A value that does not decode, or has no colon, is an empty name and
 * password, which Gitea goes on with (it ignores the error). Undefined: not a Basic header.
 */
function basicOfHeader(header: string): { name: string; password: string } | undefined {
  const space = header.indexOf(' ')
  if (space < 0 || header.slice(0, space).toLowerCase() !== 'basic') return undefined
  const encoded = header.slice(space + 1)
  if (!/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/.test(encoded)) return { name: '', password: '' }
  const text = Buffer.from(encoded, 'base64').toString('utf8')
  const colon = text.indexOf(':')
  return colon < 0 ? { name: '', password: '' } : { name: text.slice(0, colon), password: text.slice(colon + 1) }
}

/**
 * A path parameter as Gitea's ctx.Params gives it (url.PathUnescape): the escapes decoded to bytes,
 * whatever they spell (`%FF` is no UTF-8, and matches no user or token name; decodeURIComponent
 * threw on it, ending the fake's process).
 */
function pathParam(raw: string): string {
  return Buffer.from(raw.replace(/%([0-9a-fA-F]{2})|[^%]+/g, (part, hex: string | undefined) => (hex === undefined ? Buffer.from(part).toString('latin1') : String.fromCharCode(parseInt(hex, 16)))), 'latin1').toString('utf8')
}

/** The kind Go's encoding/json names a JSON value by in its UnmarshalTypeError. */
function goJsonKind(v: unknown): string {
  if (Array.isArray(v)) return 'array'
  if (typeof v === 'boolean') return 'bool'
  return typeof v === 'object' ? 'object' : typeof v
}

/**
 * A create's body as Gitea binds it (routers/api/v1/api.go's bind(): gitea.com/go-chi/binding's
 * Bind into CreateAccessTokenOption), or the message of its 422 ("<field names>: <error>", the
 * first error). The reader is picked by Content-Type: a form (by the fields' names, `name` and
 * `scopes`), JSON (Go's encoding/json: a key matched in any case, unknown keys ignored, null
 * leaving a field as it is, a value of the wrong type refused), no Content-Type ("Empty
 * Content-Type") or another ("Unsupported Content-Type"); then the `Required` name. Not modelled:
 * multipart bodies (a 500 saying so) and what follows a complete JSON value (Go ignores it; here it
 * is invalid JSON).
 */
function bindCreateOption(contentType: string | undefined, raw: string): { name: string; scopes: string[] } | { error: string; status: 422 | 500 } {
  const type = contentType ?? ''
  let name = ''
  let scopes: string[] = []
  if (type.includes('form-urlencoded')) {
    const form = new URLSearchParams(raw)
    name = form.get('name') ?? ''
    scopes = form.getAll('scopes')
  } else if (type.includes('multipart/form-data')) {
    return { status: 500, error: 'the fake Gitea does not read multipart bodies' }
  } else if (type.includes('json')) {
    const struct = 'Go struct field CreateAccessTokenOption'
    if (raw.trim() !== '') {
      let v: unknown
      try {
        v = JSON.parse(raw)
      } catch (err) {
        return { status: 422, error: `[]: ${(err as Error).message}` }
      }
      if (v !== null && (typeof v !== 'object' || Array.isArray(v))) return { status: 422, error: `[]: json: cannot unmarshal ${goJsonKind(v)} into Go value of type structs.CreateAccessTokenOption` }
      let typeError: string | undefined
      for (const [key, value] of Object.entries((v ?? {}) as Record<string, unknown>)) {
        const field = key.toLowerCase()
        if (value === null || (field !== 'name' && field !== 'scopes')) continue
        if (field === 'name') {
          if (typeof value === 'string') name = value
          else typeError ??= `json: cannot unmarshal ${goJsonKind(value)} into ${struct}.name of type string`
        } else if (!Array.isArray(value)) {
          typeError ??= `json: cannot unmarshal ${goJsonKind(value)} into ${struct}.scopes of type []string`
        } else {
          const bad = value.find((s) => s !== null && typeof s !== 'string')
          if (bad !== undefined) typeError ??= `json: cannot unmarshal ${goJsonKind(bad)} into ${struct}.scopes of type string`
          else scopes = value.map((s) => (s === null ? '' : (s as string)))
        }
      }
      if (typeError !== undefined) return { status: 422, error: `[]: ${typeError}` }
    }
  } else {
    return { status: 422, error: type === '' ? '[]: Empty Content-Type' : '[]: Unsupported Content-Type' }
  }
  return name === '' ? { status: 422, error: '[Name]: Required' } : { name, scopes }
}

/** Gitea's ErrUserNotExist message (models/user/error.go, 1.22: no key id any more). */
const userNotExist = (uid: number, name: string): string => `user does not exist [uid: ${uid}, name: ${name}]`

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
  /**
   * An older Gitea: its create handler answers the 201 without the scopes, as `null` (the stored
   * variant GITEA.md names) or without the field at all; the token is stored with them all the same.
   */
  createScopes: 'null' | 'absent' | undefined
  /** A Gitea before scoped tokens (1.19): the list names no scopes, and a token may do anything. */
  listScopes = true
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

  addUser(login: string, password: string, options: { is_admin?: boolean; active?: boolean; prohibit_login?: boolean; must_change_password?: boolean; visibility?: FakeUser['visibility'] } = {}): FakeUser {
    const user = {
      id: this.users.size + 1,
      login,
      password,
      email: `${login}@example.test`,
      is_admin: options.is_admin === true,
      active: options.active !== false,
      prohibit_login: options.prohibit_login === true,
      must_change_password: options.must_change_password === true,
      visibility: options.visibility ?? 'public',
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
   * Gitea's oauth2 method (services/auth/oauth2.go) on the Authorization header: a token header
   * (see tokenOfHeader) signs in as its token's owner, with the token's scopes; a token Gitea does
   * not know fails with ErrUserNotExist, no uid nor name. Undefined: not a token header.
   */
  #tokenMethod(header: string | undefined): SignIn {
    const secret = tokenOfHeader(header)
    if (secret === undefined) return undefined
    const token = this.tokens.find((t) => t.sha1 === secret)
    const user = token ? this.user(token.owner) : undefined
    return token && user ? { user, token, basic: false } : { error: userNotExist(0, '') }
  }

  /**
   * Gitea's Basic method (Basic.Verify in services/auth/basic.go). The token is the password, or
   * the user name when the password is empty or `x-oauth-basic`, and it is looked up by itself: a
   * token Gitea knows signs in as ITS OWNER, whatever user name the header gives (before, the
   * fake required the name to be the owner's). Otherwise the name and password sign in (signIn).
   */
  #basicMethod(header: string | undefined): SignIn {
    const basic = basicOfHeader(goHeader(header))
    if (basic === undefined) return undefined
    const secret = basic.password === '' || basic.password === 'x-oauth-basic' ? basic.name : basic.password
    const token = this.tokens.find((t) => t.sha1 === secret)
    const owner = token ? this.user(token.owner) : undefined
    if (token && owner) return { user: owner, token, basic: true }
    return this.#signIn(basic.name, basic.password)
  }

  /**
   * Gitea's UserSignIn (services/auth/signin.go) with the local password: a name with `@` is an
   * e-mail address (trimmed, any case; the fake's users have one each, activated), else a login
   * name (trimmed, any case). Its errors are the 401 messages: an unknown name or address, a wrong
   * or empty password (the user's id and name), a suspended user's right password.
   */
  #signIn(name: string, password: string): SignIn {
    const wanted = name.replace(GO_TRIM, '').toLowerCase()
    const byEmail = name.includes('@')
    const user = byEmail ? [...this.users.values()].find((u) => u.email.toLowerCase() === wanted) : wanted === '' ? undefined : this.user(wanted)
    if (!user) return { error: byEmail ? `Email address does not exist [email: ${name}]` : userNotExist(0, name) }
    // ErrUserPasswordInvalid since Gitea 1.20 (before, a wrong password read as an unknown user).
    if (password !== user.password) return { error: `user's password is invalid [uid: ${user.id}, name: ${user.login}]` }
    if (user.prohibit_login) return { error: `user is not allowed login [uid: ${user.id}, name: ${user.login}]` }
    return { user, token: undefined, basic: true }
  }

  /**
   * Who a request is signed in as, as Gitea's API auth group decides before any route (the oauth2
   * method, then Basic; not modelled, as keygate sends none of them: a token in the query string
   * (`?token=`, `?access_token=`, still read by 1.22), HTTP signatures, reverse-proxy auth, Actions
   * task tokens, OAuth2 JWTs and 2FA codes): the first method
   * that gives a user wins, else the first method's error, else nobody.
   */
  #authenticate(header: string | undefined): SignIn {
    let failed: SignIn
    for (const method of [this.#tokenMethod, this.#basicMethod]) {
      const signed = method.call(this, header)
      if (signed !== undefined && 'error' in signed) failed ??= signed
      else if (signed !== undefined) return signed
    }
    return failed
  }

  /**
   * What Gitea's API router (chi, routers/api/v1/api.go) answers itself, after the API's
   * middleware (the sign-in above) and before any route's handlers: a path it has no route for
   * is chi's default, Go's http.NotFound (`404 page not found`, plain text; the API router sets
   * no NotFound handler of its own, nor does the root router it is mounted on); a method the
   * path does not take is chi's methodNotAllowedHandler, 405 with no body, and an `Allow` line for
   * each method the route takes (chi 5.0.11 on). Neither is Gitea's JSON error; before, the fake
   * answered both as one (`{"message":"Not Found"}`, `{"message":"Method Not Allowed"}`), and
   * answered POST /version or /user 404. Not operations of the excerpt: not in `responses`.
   */
  #routerAnswer(res: http.ServerResponse, status: 404 | 405, allow: string[] = []): void {
    const headers = { 'x-content-type-options': 'nosniff' }
    if (status === 404) return void res.writeHead(404, { ...headers, 'content-type': 'text/plain; charset=utf-8' }).end('404 page not found\n')
    res.setHeader('allow', allow)
    res.writeHead(405, { ...headers, 'content-length': 0 }).end()
  }

  /**
   * A path outside the API: Gitea's web router, whose not-found handler renders its 404 page
   * (routers/web/web.go, ctx.NotFound): HTML, not JSON. Before, the fake answered it as an API
   * error. A short page of that shape; not an operation of the excerpt, not in `responses`.
   */
  #webNotFound(res: http.ServerResponse): void {
    res.writeHead(404, { 'content-type': 'text/html; charset=utf-8' }).end('<!DOCTYPE html>\n<html lang="en-US">\n<head><title>Page Not Found - Gitea: Git with a cup of tea</title></head>\n<body><div class="page-content status-page-404"><p>The page you are trying to reach either does not exist or you are not authorized to view it.</p></div></body>\n</html>\n')
  }

  #sendBarred(req: http.IncomingMessage, res: http.ServerResponse, operation: string, message: string): void {
    // The middleware writes ctx.JSON(403, {"message": ...}): no `url`.
    this.#send(req, res, operation, 403, { message })
  }

  async #handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = []
    for await (const c of req) chunks.push(c as Buffer)
    const raw = Buffer.concat(chunks).toString('utf8')
    // Go's HTTP server answers a request URI url.ParseRequestURI cannot read (a malformed escape)
    // itself, before Gitea: before, the fake's decodeURIComponent threw, ending its process.
    if (/%(?![0-9a-fA-F]{2})/.test((req.url ?? '/').split('?')[0] as string)) {
      res.writeHead(400, { 'content-type': 'text/plain; charset=utf-8', connection: 'close' })
      return void res.end('400 Bad Request')
    }
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
    if (!url.pathname.startsWith('/api/v1/')) return this.#webNotFound(res)
    // Gitea's API middleware, before every route (/version and unknown routes too): a method of
    // the auth group that failed, when none signed in, is 401 with its error (apiAuth); before
    // (found by a review), the fake let an unknown token or a wrong password through to /version
    // (200) and gave the token routes and /user messages of its own. Then a signed-in user barred
    // from signing in gets 403 (verifyAuthWithOptions).
    const signed = this.#authenticate(req.headers.authorization)
    if (signed !== undefined && 'error' in signed) return this.#error(req, res, operation, 401, signed.error)
    if (signed !== undefined) {
      const barred = this.#barred(signed.user)
      if (barred !== null) return this.#sendBarred(req, res, operation, barred)
    }

    const allowed = path === '/version' || path === '/user' ? ['GET'] : m ? (m[2] === undefined ? ['GET', 'POST'] : ['DELETE']) : undefined
    if (allowed === undefined) return this.#routerAnswer(res, 404)
    if (!allowed.includes(method)) return this.#routerAnswer(res, 405, allowed)
    if (path === '/version') return this.#send(req, res, '/version', 200, { version: this.#options.version ?? '1.22.6' })
    if (path === '/user' || !m) return this.#currentUser(req, res, signed)

    // Gitea 1.22's chain for the token routes (routers/api/v1/api.go), in its order, after the
    // sign-in above: the user scope of a token used to sign in (tokenRequiresScopes, 403), the user
    // of the path (UserAssignmentAPI, 404; from 1.23 on, also a private user hidden from the caller,
    // see `hidePrivateUsers`), the caller being that user or a site admin
    // (reqSelfOrAdmin, 403), and only then Basic (or reverse-proxy) auth (reqBasicOrRevProxyAuth,
    // 401): a token header alone is not enough.
    const refused = scopeRefusal(signed, method === 'GET' ? 'read:user' : 'write:user')
    if (refused !== null) return this.#error(req, res, operation, 403, refused)
    const name = pathParam(m[1] as string)
    const target = this.user(name)
    // UserAssignmentAPI answers with ctx.Error (1.24: ctx.APIError), no `errors`, and as the message
    // the error of the redirect it then looked for (services/context/user.go: the `err` of its
    // `if redirectUserID, err := LookupUserRedirect(...)`), which lower-cases the name: not
    // GetUserByName's "user does not exist [uid: 0, ...]", as the fake said before (found by a review).
    if (!target) return this.#send(req, res, operation, 404, { message: `user redirect does not exist [name: ${name.toLowerCase()}]`, url: `${this.url}/api/swagger` })
    // individualPermsChecker (Gitea 1.23 on): ctx.NotFound("Visit Project", nil).
    const hidden = this.#options.hidePrivateUsers === true && target.visibility === 'private'
    if (hidden && (!signed || (signed.user.login !== target.login && !signed.user.is_admin))) return this.#error(req, res, operation, 404, 'Visit Project')
    if (!signed || (signed.user.login !== target.login && !signed.user.is_admin)) {
      return this.#error(req, res, operation, 403, 'doer should be the site admin or be same as the contextUser')
    }
    if (!signed.basic) return this.#error(req, res, operation, 401, 'auth required')

    if (method === 'GET') return this.#list(req, res, operation, target, url)
    if (method === 'POST') return this.#create(req, res, operation, target, raw)
    return this.#delete(req, res, operation, target, pathParam(m[2] as string))
  }

  /** GET /user: the user scope of a token used to sign in (403), then a doer at all (reqToken, 401). */
  #currentUser(req: http.IncomingMessage, res: http.ServerResponse, signed: SignIn): void {
    const refused = scopeRefusal(signed, 'read:user')
    if (refused !== null) return this.#error(req, res, '/user', 403, refused)
    if (signed === undefined || 'error' in signed) return this.#error(req, res, '/user', 401, 'token is required')
    const { user } = signed
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
      visibility: user.visibility,
      followers_count: 0,
      following_count: 0,
      starred_repos_count: 0,
    })
  }

  #list(req: http.IncomingMessage, res: http.ServerResponse, operation: string, user: FakeUser, url: URL): void {
    // Gitea's utils.GetListOptions: `page` and `limit` through ctx.FormInt, Go's strconv.Atoi with
    // its error ignored ("1abc", " 5", "0x10" are 0; "+5" and "05" are 5; beyond int64, the bound),
    // and the limit through convert.ToCorrectPageSize: 0 or below is DEFAULT_PAGING_NUM, above
    // MAX_RESPONSE_ITEMS is that. Before, the fake used parseInt ("1abc" was 1).
    const page = goParseInt(url.searchParams.get('page') ?? '', 10)
    let limit = goParseInt(url.searchParams.get('limit') ?? '', 10)
    if (limit <= 0n) limit = BigInt(DEFAULT_PAGING)
    else if (limit > BigInt(MAX_RESPONSE_ITEMS)) limit = BigInt(MAX_RESPONSE_ITEMS)
    // db.FindAndCount (models/db/list.go) pages only from page 1 on: page 0 (absent, or not a
    // number) or below lists every token, whatever the limit. Its offset is Go's int product, which
    // wraps past int64, and xorm writes OFFSET only when it is positive.
    let offset = 0
    let bound = Number.POSITIVE_INFINITY
    if (page >= 1n) {
      const skip = BigInt.asIntN(64, (page - 1n) * limit)
      offset = skip > 0n ? Number(skip) : 0
      bound = offset + Number(limit)
    }
    // Newest first, as Gitea lists them (ListAccessTokensOptions.ToOrders: `created_unix DESC`),
    // and nothing more: ties in PostgreSQL's order for this page's bound (see tieRank; without a
    // LIMIT, one full sort).
    const own = this.tokens.filter((t) => t.owner === user.login)
    const rank = (t: StoredToken) => tieRank(t.id, bound, own.length)
    own.sort((a, b) => b.created_unix - a.created_unix || rank(a) - rank(b))
    const items = own.slice(offset, bound).map((t) => ({ id: t.id, name: t.name, sha1: '', token_last_eight: t.sha1.slice(-8), ...(this.listScopes ? { scopes: t.scopes } : {}) }))
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
    const body = bindCreateOption(req.headers['content-type'], raw)
    if ('error' in body) return this.#error(req, res, operation, body.status, body.error)
    const name = body.name
    if (this.tokens.some((t) => t.owner === user.login && t.name === name)) return this.#error(req, res, operation, 400, 'access token name has been used already')
    if (this.nameCheckRace) await this.#awaitAnotherCreate()
    // Gitea joins the scopes with commas and splits them again, skipping empty ones; nothing is
    // trimmed (" read:user" is not a scope).
    const scopes = body.scopes.flatMap((s) => s.split(',')).filter(Boolean)
    const unknown = scopes.find((s) => !KNOWN.has(s))
    if (unknown !== undefined) return this.#error(req, res, operation, 400, `invalid access token scope provided: invalid access token scope: ${unknown}`)
    if (scopes.length === 0) return this.#error(req, res, operation, 400, 'access token must have a scope')
    const t = this.#insert(user.login, name, scopes)
    const answered = this.createScopes === undefined ? { scopes: t.scopes } : this.createScopes === 'null' ? { scopes: null } : {}
    this.#send(req, res, operation, 201, { id: t.id, name: t.name, sha1: t.sha1, token_last_eight: t.sha1.slice(-8), ...answered })
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
    // ctx.NotFound() with nothing to add: the locale's not-found text, `errors` null.
    if (!found) return this.#error(req, res, operation, 404, "The target couldn't be found.")
    this.removeToken(found.id)
    this.#send(req, res, operation, 204)
  }
}
