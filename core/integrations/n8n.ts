// n8n API keys (SPEC §6): n8n manages them only through a logged-in session, so the service logs
// in with N8N_EMAIL/N8N_PASSWORD, keeps the session cookie in memory for its own lifetime (never
// written anywhere), and logs in again once when the session is refused. Verification uses the
// public API with the key itself. Facts about the API: shared/integrations/N8N.md.
import type { Actor } from '../audit.ts'
import { fieldInvalid, KeygateError } from '../errors.ts'
import { assertValid, shownInput } from '../validate.ts'
import { IntegrationHttp, type CallOptions, type HttpResponse } from './http.ts'
import { KeyedQueue } from '../keyed-queue.ts'
import { CreateN8nKeyBody, n8nLabelProblem, type CreateN8nKeyInput } from './schemas.ts'
import { configuredClient, createOrReport, driftSummary, iso, lastEight, nameTaken, recordDelete, recordId, recordRemoteCreate, secretHash, trackState, undoUnrecorded, type IntegrationDeps, type TrackState } from './track.ts'

export interface N8nKey {
  id: string
  remote_id: string
  label: string
  owner_email: string
  scopes: string[]
  /** Whether n8n's licence had API key scopes when the key was made (see scopesEnforced); null when not known. */
  scopes_enforced: boolean | null
  key_last_eight: string
  expires_at: string | null
  base_url: string
  created_at: string
  created_by: string
  deleted_at: string | null
  deleted_by: string | null
}

/** `warning` when the scopes asked for do not bind the key, or may not. */
export type N8nKeyCreated = N8nKey & { key: string; warning?: string }

export interface N8nRemoteKey {
  id: string
  label: string
  scopes: string[]
  /** n8n's masked form: asterisks and the last four characters. */
  masked: string
  expires_at: string | null
  created_at: string | null
}

export interface N8nListItem {
  remote_id: string
  label: string
  state: TrackState
  remote: N8nRemoteKey | null
  local: N8nKey | null
}

export interface N8nKeyList {
  base_url: string
  items: N8nListItem[]
  summary: Record<TrackState, number>
}

export interface N8nKeyDeleted {
  deleted: true
  remote_id: string
  label: string
  /** The key was already gone from n8n; only the record was closed. */
  remote_missing: boolean
  record: N8nKey | null
}

export type N8nVerification =
  | { valid: true; note?: string; record: N8nKey | null }
  | { valid: false; reason: 'malformed' | 'refused'; record: N8nKey | null }

interface Row {
  id: string
  base_url: string
  remote_id: string
  label: string
  owner_email: string
  scopes: string[]
  scopes_enforced: boolean | null
  key_last_eight: string
  expires_at: Date | null
  created_at: Date
  created_by: string
  deleted_at: Date | null
  deleted_by: string | null
}

const COLUMNS = 'id, base_url, remote_id, label, owner_email, scopes, scopes_enforced, key_last_eight, expires_at, created_at, created_by, deleted_at, deleted_by'

function toJson(r: Row): N8nKey {
  return {
    id: r.id,
    remote_id: r.remote_id,
    label: r.label,
    owner_email: r.owner_email,
    scopes: r.scopes,
    scopes_enforced: r.scopes_enforced,
    key_last_eight: r.key_last_eight,
    expires_at: iso(r.expires_at),
    base_url: r.base_url,
    created_at: r.created_at.toISOString(),
    created_by: r.created_by,
    deleted_at: iso(r.deleted_at),
    deleted_by: r.deleted_by,
  }
}

/** n8n gives expiry as Unix seconds (or null); createdAt as an ISO string. */
function secondsToIso(v: unknown): string | null {
  return typeof v === 'number' && Number.isFinite(v) ? new Date(v * 1000).toISOString() : null
}

function remoteKey(value: unknown): N8nRemoteKey | null {
  const v = value as Record<string, unknown> | null
  if (!v || typeof v !== 'object' || typeof v.id !== 'string' || typeof v.label !== 'string') return null
  return {
    id: v.id,
    label: v.label,
    scopes: Array.isArray(v.scopes) ? v.scopes.filter((s): s is string => typeof s === 'string') : [],
    masked: typeof v.apiKey === 'string' ? v.apiKey : '',
    expires_at: secondsToIso(v.expiresAt),
    created_at: typeof v.createdAt === 'string' ? v.createdAt : null,
  }
}

/** The key a create's 200 made (`data` with its id, label and `rawApiKey`), else an `n8n_error`. */
function madeKey(http: IntegrationHttp, res: HttpResponse): { created: N8nRemoteKey; key: string } {
  const data = (res.body as { data?: Record<string, unknown> } | null)?.data
  const created = remoteKey(data)
  const key = data?.rawApiKey
  if (!created || typeof key !== 'string' || key === '') throw new KeygateError('n8n_error', `n8n at ${http.baseUrl} answered the key creation without a key id and key`)
  http.secret(key, { transient: true })
  return { created, key }
}

/**
 * What n8n answers the verify's GET with while its public API is disabled (N8N_PUBLIC_API_DISABLED):
 * no route is mounted there, and Express's last handler answers 404 with its page naming the path,
 * `<pre>Cannot GET /api/v1/workflows</pre>` (checked against n8n 1.123.0). The path is n8n's root
 * one, as n8n sees it at its root or behind a proxy that takes a prefix off.
 */
const PUBLIC_API_OFF = '<pre>Cannot GET /api/v1/workflows</pre>'

/**
 * The `n8n_error` of a 404 to GET /api/v1/workflows: n8n's page for a disabled public API; its
 * public API's own JSON 404 (`{"message": "not found"}`), for a path it has no route for, as with
 * N8N_URL ending in /api/v1; or another server's answer (a proxy's page, a path n8n does not serve).
 */
function notFoundAnswer(http: IntegrationHttp, res: HttpResponse): KeygateError {
  if (typeof res.body === 'string' && res.body.includes(PUBLIC_API_OFF)) {
    return new KeygateError('n8n_error', `n8n at ${http.baseUrl} has no public API (N8N_PUBLIC_API_DISABLED)`, { status: 404 })
  }
  const foreign = http.foreignError(res, 'GET /api/v1/workflows')
  if (foreign !== undefined) return foreign
  return new KeygateError('n8n_error', `n8n at ${http.baseUrl} has no route GET /api/v1/workflows in its public API (404 ${http.messageOf(res)}): is N8N_URL n8n's address, without /api/v1?`, { status: 404 })
}

/** What the create's answer says when the scopes asked for do not bind the key, or may not. */
function scopesWarning(baseUrl: string, email: string, scopes: string[], enforcement: { enforced: boolean | null; why?: string }): string | undefined {
  if (enforcement.enforced === true) return undefined
  const made = scopes.join(', ')
  if (enforcement.enforced === false) return `n8n at ${baseUrl} does not enforce API key scopes (its licence lacks API key scopes): the key was made with ${made}, but it can do whatever the role of ${email} may`
  return `could not tell whether n8n at ${baseUrl} enforces API key scopes (${enforcement.why}): it does only when its licence has API key scopes; without them the key, made with ${made}, can do whatever the role of ${email} may`
}

const KEY_SHAPE = /^[\x21-\x7e]{1,4096}$/
const SESSION_COOKIE = 'n8n-auth'
/** The `code` of n8n's 401 to a login whose user has two-factor authentication on, sent without an MFA code (checked against n8n 1.123.0). */
const MFA_REQUIRED = 998
/** n8n's 403 to a login of a user other than the owner past the licence's user limit (RESPONSE_ERROR_MESSAGES.USERS_QUOTA_REACHED, n8n 1.123.0). */
const USERS_QUOTA = /^Maximum number of users reached/

/** n8n's 401 to a session of a user without MFA where the instance enforces it: `{"message":"Unauthorized","mfaRequired":true}` (n8n 1.123.0's auth middleware). */
const mfaRequired = (res: HttpResponse): boolean => (res.body as { mfaRequired?: unknown } | null)?.mfaRequired === true

export class N8nKeyService {
  readonly #deps: IntegrationDeps
  #http: IntegrationHttp | undefined
  #cookie: string | undefined
  /** The creates under way in this service, by label: a second one with a label waits for the first. */
  readonly #creating = new KeyedQueue()

  constructor(deps: IntegrationDeps) {
    this.#deps = deps
  }

  #client(credentials: boolean): { http: IntegrationHttp; email: string; password: string } {
    const c = this.#deps.config.integrations.n8n
    this.#http = configuredClient('n8n', this.#http, this.#deps.config, credentials, this.#deps.flags === true)
    return { http: this.#http, email: c.email ?? '', password: c.password ?? '' }
  }

  async #login(): Promise<string> {
    const { http, email, password } = this.#client(true)
    const res = await http.call('POST', '/rest/login', { json: { emailOrLdapLoginId: email, password } })
    if (res.status === 401 || res.status === 403) {
      // n8n's own refusal is JSON with a message; another server's page (an SSO proxy's sign-in, a
      // WAF's 403) says nothing of N8N_EMAIL's password: before (found by a review), it was "refused
      // the login ... 401 no message", as verify once was.
      http.assertOwnError(res, 'POST /rest/login')
      // Two-factor authentication on the user: n8n answers a right password sent without an MFA
      // code 401 with code 998 ("MFA Error"; a wrong password is "Wrong username or password"
      // whatever the MFA). keygate logs in with the password alone: before (found by a review),
      // this was "refused the login ... (N8N_EMAIL/N8N_PASSWORD): 401 MFA Error".
      if (res.status === 401 && (res.body as { code?: unknown }).code === MFA_REQUIRED) {
        throw new KeygateError('n8n_auth_failed', `n8n at ${http.baseUrl} took the password of ${JSON.stringify(email)} (N8N_EMAIL/N8N_PASSWORD) but asks for a two-factor authentication (MFA) code, which keygate cannot give: N8N_EMAIL must name an n8n user without two-factor authentication`)
      }
      // Past its licence's user limit n8n signs in its owner only: another user's right password
      // is answered 403 "Maximum number of users reached" (its issueCookie). Before (found by a
      // review), told as the password refused.
      if (res.status === 403 && USERS_QUOTA.test(http.messageOf(res))) {
        throw new KeygateError('n8n_auth_failed', `n8n at ${http.baseUrl} took the password of ${JSON.stringify(email)} (N8N_EMAIL/N8N_PASSWORD) but signs in only its owner: it has more users than its licence allows (403 ${http.messageOf(res)}); set N8N_EMAIL and N8N_PASSWORD to the owner's, or remove users in n8n`)
      }
      throw new KeygateError('n8n_auth_failed', `n8n at ${http.baseUrl} refused the login of ${JSON.stringify(email)} (N8N_EMAIL/N8N_PASSWORD): ${res.status} ${http.messageOf(res)}`)
    }
    if (res.status === 429) throw this.#loginRateLimited(http, res)
    // n8n serves the login at its root whatever its settings: a 404 says N8N_URL leads elsewhere
    // (its public API's JSON 404 behind /api/v1, Express's page behind /rest), not that n8n
    // refused to log in, as it was told before (found by a review).
    if (res.status === 404) {
      const said = http.ownError(res) ? http.messageOf(res) : `with ${http.describe(res)}`
      throw new KeygateError('n8n_error', `n8n at ${http.baseUrl} has no POST /rest/login (404 ${said}): is N8N_URL n8n's address, without /api/v1 or /rest?`, { status: 404 })
    }
    if (res.status !== 200) throw http.failure(`log in ${JSON.stringify(email)}`, res)
    const header = res.headers['set-cookie']
    const cookies = Array.isArray(header) ? header : header ? [header] : []
    const session = cookies.map((c) => c.split(';')[0] ?? '').find((c) => c.startsWith(`${SESSION_COOKIE}=`))
    if (!session) throw new KeygateError('n8n_error', `n8n at ${http.baseUrl} accepted the login but set no ${SESSION_COOKIE} session cookie`)
    http.session(session.slice(SESSION_COOKIE.length + 1))
    this.#cookie = session
    return session
  }

  /**
   * n8n in production allows 5 logins a minute from one address (POST /rest/login), and answers
   * the next 429 with Retry-After. The CLI on the store logs in on every command, so a script's
   * sixth command in a minute failed with "too many attempts" alone (found by a review): the
   * message says why, and, to the CLI, what to do instead.
   */
  #loginRateLimited(http: IntegrationHttp, res: HttpResponse): KeygateError {
    const retry = Number(res.headers['retry-after'])
    const when = Number.isSafeInteger(retry) && retry > 0 ? `in ${retry} s` : 'in a minute'
    const cli = this.#deps.flags === true
      ? '; each `keygate n8n` command on the store logs in anew: run repeated commands through the admin API (KEYGATE_ADMIN_URL), whose server logs in once and keeps its session'
      : ''
    return new KeygateError('n8n_error', `n8n at ${http.baseUrl} refused the login for now: too many login attempts (429: n8n allows 5 logins a minute from one address in production); try again ${when}${cli}`, { status: 429 })
  }

  /** A call on the internal REST API with the session, logging in first or again when refused. */
  async #rest(method: 'GET' | 'POST' | 'DELETE', path: string, options: CallOptions = {}): Promise<HttpResponse> {
    const { http, email } = this.#client(true)
    const call = async (cookie: string) => http.call(method, path, { ...options, headers: { ...options.headers, cookie } })
    // A 401 or 403 page of another server's says nothing of the session: no login again for it.
    const own = (r: HttpResponse) => {
      if (r.status === 401 || r.status === 403) http.assertOwnError(r, `${method} ${path}`)
      return r
    }
    let res = own(await call(this.#cookie ?? (await this.#login())))
    if (res.status === 401 && !mfaRequired(res)) res = own(await call(await this.#login()))
    // MFA enforced on the instance (a licensed setting) and none set up for the user: n8n refuses
    // every session of it so (its auth middleware), a fresh one too. Before (found by a review),
    // told as "refused the session of a fresh login: Unauthorized", after a login for nothing.
    if (res.status === 401 && mfaRequired(res)) {
      throw new KeygateError(
        'n8n_auth_failed',
        `n8n at ${http.baseUrl} enforces two-factor authentication (MFA) for every user, and the N8N_EMAIL user ${JSON.stringify(email)} has none set up: n8n refuses its session (401 ${http.messageOf(res)}, mfaRequired); keygate cannot sign in with an MFA code, so turn the enforcement off in n8n's settings to manage API keys through keygate`,
      )
    }
    if (res.status === 401) throw new KeygateError('n8n_auth_failed', `n8n at ${http.baseUrl} refused the session of a fresh login: ${http.messageOf(res)}`)
    if (res.status === 403) throw new KeygateError('n8n_auth_failed', `n8n at ${http.baseUrl} does not let the N8N_EMAIL user manage API keys: 403 ${http.messageOf(res)}`)
    if (res.status === 404 && path.startsWith('/rest/api-keys')) {
      throw new KeygateError('n8n_error', `n8n at ${http.baseUrl} has no API key routes: its public API is disabled (N8N_PUBLIC_API_DISABLED)`, { status: 404 })
    }
    return res
  }

  /** The `data` of a 200 answer, or the n8n error. */
  async #data(method: 'GET' | 'POST' | 'DELETE', path: string, what: string, options: CallOptions = {}): Promise<unknown> {
    const res = await this.#rest(method, path, options)
    if (res.status !== 200) throw (this.#http as IntegrationHttp).failure(what, res)
    const body = res.body as { data?: unknown } | null
    if (!body || typeof body !== 'object' || !('data' in body)) {
      throw new KeygateError('n8n_error', `n8n at ${(this.#http as IntegrationHttp).baseUrl} answered ${method} ${path} without data`)
    }
    return body.data
  }

  /** The scopes this instance lets the logged-in user put on an API key. */
  async allowedScopes(): Promise<string[]> {
    const data = await this.#data('GET', '/rest/api-keys/scopes', 'list the allowed API key scopes')
    if (!Array.isArray(data)) throw new KeygateError('n8n_error', 'n8n answered the scope list with something other than a list')
    return data.filter((s): s is string => typeof s === 'string')
  }

  /**
   * Whether n8n checks a key's scopes on its public API: n8n 1.123.0 does only when its licence
   * has API key scopes, which its settings say to a signed-in user (`enterprise.apiKeyScopes`;
   * those it gives without a session hold no such flag). Read at each create, never kept: a
   * licence may be activated, renewed or lapse while this service runs. Not knowing (the settings
   * unread, or without the flag) is said as such, with what came back, never taken for an answer.
   */
  async #scopesEnforced(): Promise<{ enforced: boolean } | { enforced: null; why: string }> {
    let data: unknown
    try {
      data = await this.#data('GET', '/rest/settings', 'read its settings')
    } catch (err) {
      if (!(err instanceof KeygateError)) throw err
      return { enforced: null, why: err.message }
    }
    const flag = (data as { enterprise?: { apiKeyScopes?: unknown } | null } | null)?.enterprise?.apiKeyScopes
    return typeof flag === 'boolean' ? { enforced: flag } : { enforced: null, why: 'GET /rest/settings answered without enterprise.apiKeyScopes' }
  }

  async #remoteKeys(): Promise<N8nRemoteKey[]> {
    const data = await this.#data('GET', '/rest/api-keys', 'list the API keys')
    if (!Array.isArray(data)) throw new KeygateError('n8n_error', 'n8n answered the API key list with something other than a list')
    return data.map(remoteKey).filter((k): k is N8nRemoteKey => k !== null)
  }

  async #rows(where: string, params: unknown[]): Promise<Row[]> {
    return this.#deps.db.query<Row>(`SELECT ${COLUMNS} FROM n8n_api_keys WHERE ${where} ORDER BY created_at, id`, params)
  }

  /** Refuses a label one of n8n's keys already has (labels name keys for delete), saying when keygate holds no record of that key (see nameTaken). */
  async #assertLabelFree(label: string): Promise<void> {
    const taken = (await this.#remoteKeys()).find((k) => k.label === label)
    if (!taken) return
    const { baseUrl } = this.#http as IntegrationHttp
    const err = new KeygateError('n8n_key_exists', `n8n at ${baseUrl} already has an API key labelled ${JSON.stringify(label)}; labels name keys for delete, so they are kept unique`)
    throw await nameTaken(err, {
      deps: this.#deps,
      find: async () => ((await this.#rows('base_url = $1 AND remote_id = $2 AND deleted_at IS NULL', [baseUrl, taken.id])).length > 0 ? undefined : taken.id),
      deleteCommand: (id) => `keygate n8n delete ${id}`,
    })
  }

  async create(body: unknown, actor: Actor): Promise<N8nKeyCreated> {
    const input = assertValid<CreateN8nKeyInput>(CreateN8nKeyBody, body)
    const problem = n8nLabelProblem(input.label)
    if (problem !== undefined) throw fieldInvalid('label', problem)
    // Creates with one label run one after the other here, so the second finds the first's key in
    // its label check; creates from another process are caught when n8n refuses the label.
    return this.#creating.run(input.label, () => this.#create(input, actor))
  }

  async #create(input: CreateN8nKeyInput, actor: Actor): Promise<N8nKeyCreated> {
    // To the whole second, as n8n keeps it (its expiresAt is in seconds): before (found by a review),
    // the record and its audit row kept the milliseconds asked, up to a second past n8n's own end.
    const asked = input.expires_at ? new Date(input.expires_at).getTime() : undefined
    const expires = asked === undefined ? null : new Date(Math.floor(asked / 1000) * 1000)
    const now = Date.now()
    if (asked !== undefined && expires && expires.getTime() <= now) {
      // One later in the current second is past once cut so: said as such, not as past itself.
      const cut = asked > now ? ` once cut to the whole second n8n keeps (${expires.toISOString()})` : ''
      throw fieldInvalid('expires_at', `${input.expires_at} is in the past${cut}`)
    }
    const { http, email } = this.#client(true)
    const allowed = await this.allowedScopes()
    const unknown = input.scopes.filter((s) => !allowed.includes(s))
    if (unknown.length > 0) {
      throw new KeygateError('n8n_scope_unknown', `scopes: ${unknown.map((s) => JSON.stringify(s)).join(', ')} ${unknown.length === 1 ? 'is' : 'are'} not allowed by n8n at ${http.baseUrl}; it allows ${allowed.join(', ')}`, {
        unknown,
        allowed,
      })
    }
    // Before (found by a review), an unlicensed n8n's key was recorded and printed with its scopes
    // as if they bound it: the answer now says they do not, or that keygate could not tell.
    const enforcement = await this.#scopesEnforced()
    await this.#assertLabelFree(input.label)
    const { created, key } = await this.#createDistinct(input, expires, allowed)
    const row: Row = {
      id: recordId('nk'),
      base_url: http.baseUrl,
      remote_id: created.id,
      label: created.label,
      owner_email: email,
      scopes: created.scopes.length > 0 ? created.scopes : input.scopes,
      scopes_enforced: enforcement.enforced,
      key_last_eight: lastEight(key),
      expires_at: expires,
      created_at: new Date(),
      created_by: actor.actor,
      deleted_at: null,
      deleted_by: null,
    }
    const details = { remote_id: created.id, label: row.label, owner_email: email, scopes: row.scopes, scopes_enforced: row.scopes_enforced, key_last_eight: row.key_last_eight, expires_at: iso(expires), base_url: row.base_url }
    await recordRemoteCreate({
      service: 'n8n',
      deps: this.#deps,
      what: `API key ${created.id} (${JSON.stringify(row.label)})`,
      record: { table: 'n8n_api_keys', id: row.id },
      deleteCommand: `keygate n8n delete ${created.id}`,
      write: async (tx) => {
        const [stored] = await tx.query<{ created_at: Date }>(
          `INSERT INTO n8n_api_keys (id, base_url, remote_id, label, owner_email, scopes, scopes_enforced, key_last_eight, key_hash, expires_at, created_by)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING created_at`,
          [row.id, row.base_url, row.remote_id, row.label, email, row.scopes, row.scopes_enforced, row.key_last_eight, secretHash(key), expires, actor.actor],
        )
        if (stored) row.created_at = stored.created_at
        await this.#deps.audit.write(tx, actor, { keyId: row.id, action: 'n8n.key.created', details })
      },
      undo: () => this.#deleteKey(created.id),
    })
    this.#deps.log.info('created an n8n API key', { record: row.id, remote_id: created.id, label: row.label, scopes_enforced: row.scopes_enforced, actor: actor.actor })
    const warning = scopesWarning(http.baseUrl, email, row.scopes, enforcement)
    return { ...toJson(row), key, ...(warning !== undefined ? { warning } : {}) }
  }

  /**
   * Creates the key in n8n, making sure it is not the twin of another. n8n signs a key as a JWT of
   * the user, the issuer, the audience and the second it was made (and the expiry), so two keys of
   * one user made in the same second are the same string: n8n refuses the second one ("There is
   * already an entry with this name", 500), and a key deleted earlier in that second would be
   * issued again and work again. Both are detected (the second by the hash keygate kept of the
   * deleted key) and the creation is repeated in the next second. n8n gives the same refusal for a
   * label its user already has (it keeps (user, label) unique), as when another create with this
   * label, from another keygate, passed the label check at the same time: the list tells which.
   */
  async #createDistinct(input: CreateN8nKeyInput, expires: Date | null, allowed: string[]): Promise<{ created: N8nRemoteKey; key: string }> {
    const { http } = this.#client(true)
    const expiresAt = expires ? expires.getTime() / 1000 : null
    for (let attempt = 1; ; attempt++) {
      const again = async (why: string) => {
        if (attempt === 3) throw new KeygateError('n8n_error', `n8n at ${http.baseUrl} issued a key identical to an earlier one three times (${why})`)
        this.#deps.log.info('n8n issued a key identical to an earlier one made in the same second; creating it again', { why })
        await new Promise((r) => setTimeout(r, 1100))
      }
      const made = await createOrReport({
        http,
        deps: this.#deps,
        what: `API key ${JSON.stringify(input.label)}`,
        lookAgain: 'if `keygate n8n list` shows one as not recorded, delete it',
        deleteCommand: (id) => `keygate n8n delete ${id}`,
        send: () => this.#rest('POST', '/rest/api-keys', { json: { label: input.label, scopes: input.scopes, expiresAt } }),
        use: (res) => {
          if (res.status === 400 && /scope/i.test(http.messageOf(res))) {
            throw new KeygateError('n8n_scope_unknown', `n8n at ${http.baseUrl} refused the scopes: ${http.messageOf(res)}`, { allowed })
          }
          // A same-second twin, or the label taken meanwhile (see above): told apart below.
          if (res.status === 500 && /already an entry/i.test(http.messageOf(res))) return undefined
          if (res.status !== 200) throw http.failure(`create the API key ${JSON.stringify(input.label)}`, res)
          return madeKey(http, res)
        },
        find: async () => {
          const found = (await this.#remoteKeys()).find((k) => k.label === input.label)
          if (!found || (await this.#rows('base_url = $1 AND remote_id = $2 AND deleted_at IS NULL', [http.baseUrl, found.id])).length > 0) return undefined
          return found.id
        },
      })
      if (made === undefined) {
        await this.#assertLabelFree(input.label)
        await again('refused as a duplicate')
        continue
      }
      const { created, key } = made
      let twins: Row[]
      try {
        twins = await this.#rows('key_hash = $1', [secretHash(key)])
      } catch (err) {
        // The key exists in n8n now: it must not be left there unrecorded.
        return undoUnrecorded({
          service: 'n8n',
          deps: this.#deps,
          what: `API key ${created.id} (${JSON.stringify(input.label)})`,
          err,
          undo: () => this.#deleteKey(created.id),
        })
      }
      if (twins.length === 0) return { created, key }
      await this.#deleteTwin(created, input.label, twins[0] as Row)
      await again('the same as a key keygate recorded before')
    }
  }

  /**
   * Deletes a key n8n just made that is the same string as the key of `twin` (see #createDistinct):
   * a deleted key working again. When that fails, the error says so and names the command that
   * deletes it; before (found by a review), the create failed with "refused to delete the API key"
   * alone, nothing saying a key had been made, nor that a key deleted earlier worked again.
   */
  async #deleteTwin(created: N8nRemoteKey, label: string, twin: Row): Promise<void> {
    try {
      await this.#deleteKey(created.id)
    } catch (err) {
      if (!(err instanceof KeygateError)) throw err
      const { baseUrl } = this.#http as IntegrationHttp
      this.#deps.log.error('n8n issued a key identical to a recorded one, and it could not be deleted again; delete it', { remote_id: created.id, record: twin.id, err })
      throw new KeygateError(
        err.code,
        `n8n at ${baseUrl} made API key ${created.id} (${JSON.stringify(label)}) in the second an earlier key was made, so it is the same key as keygate's record ${twin.id} (${JSON.stringify(twin.label)}${twin.deleted_at ? ', deleted' : ''}), which works again; deleting it again failed (${err.message}): delete it with \`keygate n8n delete ${created.id}\``,
        err.details,
        { cause: err },
      )
    }
  }

  /** Deletes an API key in n8n by its id. */
  async #deleteKey(id: string): Promise<void> {
    await this.#data('DELETE', `/rest/api-keys/${encodeURIComponent(id)}`, `delete the API key ${id}`)
  }

  /**
   * The open records of keys made as the N8N_EMAIL user on this n8n. n8n lists a user's own keys
   * only: a key made as another user (before N8N_EMAIL changed) is neither listed as deleted nor
   * closed by a delete while it may still work.
   */
  #liveRows(baseUrl: string, email: string): Promise<Row[]> {
    return this.#rows('base_url = $1 AND lower(owner_email) = lower($2) AND deleted_at IS NULL', [baseUrl, email])
  }

  /** n8n's keys of the N8N_EMAIL user beside keygate's records for this instance. */
  async list(): Promise<N8nKeyList> {
    const { http, email } = this.#client(true)
    const remote = await this.#remoteKeys()
    const live = await this.#liveRows(http.baseUrl, email)
    const items: N8nListItem[] = remote.map((k) => {
      const mine = live.find((r) => r.remote_id === k.id)
      return { remote_id: k.id, label: k.label, state: trackState(k, mine), remote: k, local: mine ? toJson(mine) : null }
    })
    for (const r of live) {
      if (!remote.some((k) => k.id === r.remote_id)) items.push({ remote_id: r.remote_id, label: r.label, state: 'deleted_remotely', remote: null, local: toJson(r) })
    }
    return { base_url: http.baseUrl, items, summary: driftSummary(items) }
  }

  /** Deletes by n8n key id or by label, and closes the record. */
  async delete(ref: string, actor: Actor): Promise<N8nKeyDeleted> {
    const { http, email } = this.#client(true)
    const remote = await this.#remoteKeys()
    const byLabel = remote.filter((k) => k.label === ref)
    const target = remote.find((k) => k.id === ref) ?? (byLabel.length === 1 ? byLabel[0] : undefined)
    if (!target && byLabel.length > 1) {
      throw new KeygateError('conflict', `n8n at ${http.baseUrl} has ${byLabel.length} API keys labelled ${JSON.stringify(shownInput(ref))}; delete by id: ${byLabel.map((k) => k.id).join(', ')}`)
    }
    const live = await this.#liveRows(http.baseUrl, email)
    const local = target ? live.find((r) => r.remote_id === target.id) : live.find((r) => r.remote_id === ref) ?? live.find((r) => r.label === ref)
    if (!target && !local) throw new KeygateError('n8n_key_not_found', `n8n at ${http.baseUrl} has no API key with the id or label ${JSON.stringify(shownInput(ref))}`)
    const remoteId = target ? target.id : (local as Row).remote_id
    const label = target ? target.label : (local as Row).label
    if (target) await this.#deleteKey(target.id)
    const closed = await recordDelete(this.#deps.db, this.#deps.audit, actor, 'n8n_api_keys', local?.id ?? null, 'n8n.key.deleted', {
      remote_id: remoteId,
      label,
      remote_missing: !target,
      recorded: local !== undefined,
      base_url: http.baseUrl,
    }, target ? { service: 'n8n', what: `API key ${remoteId} (${JSON.stringify(label)})`, deleteCommand: `keygate n8n delete ${remoteId}` } : undefined)
    // As for a delete after it: the key is no longer there to delete.
    if (!closed) throw new KeygateError('n8n_key_not_found', `n8n at ${http.baseUrl} has no API key ${JSON.stringify(label)} (id ${remoteId}) any more: another delete closed its record at the same time`)
    this.#deps.log.info('deleted an n8n API key', { record: local?.id ?? null, remote_id: remoteId, label, remote_missing: !target, actor: actor.actor })
    const [after] = local ? await this.#rows('id = $1', [local.id]) : []
    return { deleted: true, remote_id: remoteId, label, remote_missing: !target, record: after ? toJson(after) : null }
  }

  /** Asks n8n's public API whether it takes the key; a refused key is a result, not an error. */
  async verify(secret: string): Promise<N8nVerification> {
    const { http } = this.#client(false)
    const [row] = await this.#rows('key_hash = $1', [secretHash(secret)])
    const record = row ? toJson(row) : null
    if (!KEY_SHAPE.test(secret)) return { valid: false, reason: 'malformed', record }
    http.secret(secret, { transient: true })
    const res = await http.call('GET', '/api/v1/workflows', { headers: { 'x-n8n-api-key': secret }, query: { limit: 1 } })
    // n8n's own 401 and 403 are JSON with a message; a page of another server's (a proxy's or a
    // WAF's 403) says nothing of the key (before, any 403 reported the key valid).
    if (res.status === 401 || res.status === 403) {
      http.assertOwnError(res, 'GET /api/v1/workflows')
      if (res.status === 401) return { valid: false, reason: 'refused', record }
      return { valid: true, note: 'n8n accepted the key; it lacks the workflow:list scope the check reads with', record }
    }
    // Only n8n's own 404s say something of its public API (before, found by a review, any 404 was
    // "has no public API", a proxy's page and N8N_URL ending in /api/v1 among them).
    if (res.status === 404) throw notFoundAnswer(http, res)
    if (res.status !== 200) throw http.failure('check the API key', res)
    // Only n8n's own list counts (`{data: [...], nextCursor}`): before, any 200 was "valid", so a
    // key checked against a server that is not n8n (a wrong N8N_URL: a proxy's page, another
    // service) was reported good.
    const list = res.body as { data?: unknown; nextCursor?: unknown } | null
    const isList = typeof list === 'object' && list !== null && Array.isArray(list.data) && (list.nextCursor === null || typeof list.nextCursor === 'string')
    if (!isList) throw new KeygateError('n8n_error', `n8n at ${http.baseUrl} answered GET /api/v1/workflows with ${http.describe(res)}, not n8n's workflow list: is N8N_URL n8n's address?`)
    return { valid: true, record }
  }

  async close(): Promise<void> {
    await this.#http?.close()
  }
}
