// Gitea personal access tokens (SPEC §6): create for a user with a name and scopes, list every
// page, delete by id or name, verify a token and say whose it is. The token routes take only
// HTTP Basic credentials (GITEA_USERNAME/GITEA_PASSWORD); verification uses the token itself.
// Facts about the API: shared/integrations/GITEA.md and the swagger excerpt beside it.
import type { Actor } from '../audit.ts'
import { isKeygateError, KeygateError } from '../errors.ts'
import { assertValid, refuseKeyIn, shownInput } from '../validate.ts'
import { IntegrationHttp, type HttpResponse } from './http.ts'
import { KeyedQueue } from '../keyed-queue.ts'
import { CreateGiteaTokenBody, DeleteGiteaTokenQuery, GITEA_SCOPES, unknownGiteaScopes, type CreateGiteaTokenInput } from './schemas.ts'
import { configuredClient, createOrReport, driftSummary, iso, lastEight, nameTaken, recordDelete, recordId, recordRemoteCreate, secretHash, trackState, type IntegrationDeps, type TrackState } from './track.ts'

/** Gitea caps `limit` at MAX_RESPONSE_ITEMS (50 by default). */
const PAGE_SIZE = 50
const MAX_PAGES = 1000
/** The page sizes of the walks that look again for tokens tied in one second (see #tiedWalks). */
const TIED_PAGE_SIZES = [37, 29, 23, 19, 13]

/** One walk over a user's tokens (see #walkTokens). */
interface Walk {
  tokens: GiteaRemoteToken[]
  /** X-Total-Count, when Gitea sent it. */
  total: number | undefined
  /** Nothing said the tokens changed during the walk. */
  steady: boolean
  /** Steady, and every token counted was read. */
  complete: boolean
  /** The ids on page 1, as first read. */
  firstPage: string
  /** How many tokens a page holds: the limit asked for, or less when the server caps it. */
  pageSize: number
}

export interface GiteaToken {
  id: string
  remote_id: number
  name: string
  user: string
  /** As Gitea stored them (normalised); null when Gitea did not say (see #storedScopes). */
  scopes: string[] | null
  token_last_eight: string
  base_url: string
  created_at: string
  created_by: string
  deleted_at: string | null
  deleted_by: string | null
}

export type GiteaTokenCreated = GiteaToken & { token: string }

export interface GiteaRemoteToken {
  id: number
  name: string
  /** Null when Gitea's answer has none (an older Gitea's create; a Gitea before scoped tokens). */
  scopes: string[] | null
  token_last_eight: string
}

/**
 * The drift states both services share, and Gitea's own `unreadable`: a record of a user other
 * than GITEA_USERNAME whose tokens Gitea would not list (403: GITEA_USERNAME is not a site admin;
 * a redirect: the user was renamed), so whether its token is still there cannot be told.
 */
export type GiteaTrackState = TrackState | 'unreadable'

export interface GiteaListItem {
  remote_id: number
  name: string
  user: string
  state: GiteaTrackState
  /** With `unreadable` only: what Gitea answered for the user's tokens. */
  reason?: string
  remote: GiteaRemoteToken | null
  local: GiteaToken | null
}

export interface GiteaTokenList {
  base_url: string
  users: string[]
  items: GiteaListItem[]
  summary: Record<GiteaTrackState, number>
}

export interface GiteaTokenDeleted {
  deleted: true
  remote_id: number
  name: string
  user: string
  /** The token was already gone from Gitea (deleted there by hand); only the record was closed. */
  remote_missing: boolean
  /** `forget`: only keygate's record was closed, and Gitea was not called. */
  forgotten: boolean
  record: GiteaToken | null
}

export interface GiteaUser {
  id: number
  login: string
  email: string | null
  is_admin: boolean
}

export type GiteaVerification =
  | { valid: true; user: GiteaUser | null; note?: string; record: GiteaToken | null }
  | { valid: false; reason: 'malformed' | 'refused'; record: GiteaToken | null }
  /** 403 other than the scope check: `account_barred` when Gitea says the owner may not sign in, else `forbidden`; `message` is Gitea's. */
  | { valid: false; reason: 'account_barred' | 'forbidden'; message: string; record: GiteaToken | null }

interface Row {
  id: string
  base_url: string
  remote_id: string | number
  name: string
  username: string
  scopes: string[] | null
  token_last_eight: string
  created_at: Date
  created_by: string
  deleted_at: Date | null
  deleted_by: string | null
}

const COLUMNS = 'id, base_url, remote_id, name, username, scopes, token_last_eight, created_at, created_by, deleted_at, deleted_by'

function toJson(r: Row): GiteaToken {
  return {
    id: r.id,
    remote_id: Number(r.remote_id),
    name: r.name,
    user: r.username,
    scopes: r.scopes,
    token_last_eight: r.token_last_eight,
    base_url: r.base_url,
    created_at: r.created_at.toISOString(),
    created_by: r.created_by,
    deleted_at: iso(r.deleted_at),
    deleted_by: r.deleted_by,
  }
}

function remoteToken(value: unknown): GiteaRemoteToken | null {
  const v = value as Partial<Record<keyof GiteaRemoteToken | 'sha1', unknown>> | null
  if (!v || typeof v !== 'object' || !Number.isSafeInteger(v.id) || typeof v.name !== 'string') return null
  return {
    id: v.id as number,
    name: v.name,
    scopes: Array.isArray(v.scopes) ? v.scopes.filter((s): s is string => typeof s === 'string') : null,
    token_last_eight: typeof v.token_last_eight === 'string' ? v.token_last_eight : '',
  }
}

const idsOf = (items: unknown[]): string => items.map((item) => remoteToken(item)?.id).join(',')

/**
 * The token a create's 201 made: its id, name and secret, and the scopes when Gitea gave them (null:
 * an older Gitea answers `scopes: null`, or none), else a `gitea_error`.
 */
function madeToken(http: IntegrationHttp, res: HttpResponse): { created: GiteaRemoteToken; token: string } {
  const created = remoteToken(res.body)
  const token = (res.body as { sha1?: unknown } | null)?.sha1
  if (!created || typeof token !== 'string' || token === '') {
    throw new KeygateError('gitea_error', `Gitea at ${http.baseUrl} answered the token creation without a token id and secret`)
  }
  http.secret(token, { transient: true })
  return { created, token }
}

/** Gitea's scope check (routers/api/v1/api.go): the only 403 that means the token lacks a scope. */
const SCOPE_MESSAGE = /^token does not have at least one of required scope/i
/**
 * The 403s Gitea's API middleware (verifyAuthWithOptions, routers/api/shared/middleware.go)
 * answers to every call authenticated as a user barred from signing in: inactive, prohibited
 * from login, or made to change the password. The credential is fine; its owner is not.
 */
const ACCOUNT_MESSAGE = /^(This account is not activated|This account is prohibited from signing in|You must change your password)/i

/**
 * Whether a record is of this token in Gitea. The id alone does not say: Gitea may hand an id out
 * again (restored from an earlier backup, reinstalled at the same URL, MySQL before 8 restarting
 * AUTO_INCREMENT), and a stale record was then shown in sync with an unrelated token, and deleting
 * the record deleted that token. Gitea lists the last eight characters of every token; a token
 * listed without them (an older Gitea) is matched by id alone.
 */
function sameToken(r: Row, t: GiteaRemoteToken): boolean {
  return Number(r.remote_id) === t.id && (t.token_last_eight === '' || t.token_last_eight === r.token_last_eight)
}

/**
 * A 404 that says what it concerns is gone: Gitea's own JSON error (the token, or its user, not
 * found). Gitea's router answers a path it has no route for with plain text, and a proxy with its
 * own page: those say nothing of the token, and before (found by a review), a delete answered so
 * closed the record as `remote_missing`, the token still working.
 */
const gone = (http: IntegrationHttp, res: HttpResponse): boolean => res.status === 404 && http.ownError(res)

/**
 * The statuses Gitea answers with its own JSON error (an object with a `message`) and something
 * else may answer too: another server's page (an SSO proxy's 401, a WAF's 403), or Gitea's
 * router's plain `404 page not found` and empty 405 for a path it has no route for (GITEA_URL
 * ending in /api/v1, say). Told by `IntegrationHttp.foreignError` on every call keygate makes.
 */
const OWN_ERROR_STATUSES: ReadonlySet<number> = new Set([401, 403, 404, 405])

/**
 * The message of Gitea's 404 for a user that does not exist on the `/users/{username}` routes:
 * ErrUserRedirectNotExist's "user redirect does not exist [name: ...]" (models/user/redirect.go),
 * as UserAssignmentAPI answers with the error of the redirect it looked for after the user (1.22
 * to 1.24 alike, and before). ErrUserNotExist's "user does not exist [" (models/user/error.go)
 * says the same, and is taken too. Before (found by a review), only the latter was looked for,
 * and every user deleted in Gitea was taken for one Gitea hides (`#hiddenUser`).
 */
const USER_NOT_EXIST = /^user (redirect )?does not exist \[/

/** Gitea matches user names ignoring case (it looks them up by `lower_name`). */
const sameUser = (a: string, b: string): boolean => a.toLowerCase() === b.toLowerCase()

/** The flag a delete command needs for a token of `user`, another than the configured one (`username`). */
const userFlag = (user: string, username: string): string => (sameUser(user, username) ? '' : ` --user ${user}`)

/**
 * Gitea would not list the tokens of a user other than GITEA_USERNAME: 403 (GITEA_USERNAME is not
 * a site admin) or a redirect (Gitea answers a renamed user's old name with 307 to the new one;
 * keygate does not follow it with its credentials, and the records name the old user). `list`
 * shows that user's records as `unreadable` and goes on; `delete` fails with it, as before.
 */
class UnreadableUser extends KeygateError {
  /** What Gitea answered, in a few words, for the list item. */
  readonly reason: string
  constructor(code: 'gitea_auth_failed' | 'gitea_error', message: string, reason: string, details?: Record<string, unknown>) {
    super(code, message, details)
    this.reason = reason
  }
}

/** A token can only travel in a header as visible ASCII; anything else is not a Gitea token. */
const TOKEN_SHAPE = /^[\x21-\x7e]{1,512}$/

export class GiteaTokenService {
  readonly #deps: IntegrationDeps
  #http: IntegrationHttp | undefined
  /** The creates under way in this service, by user (any case) and name: a second one waits for the first. */
  readonly #creating = new KeyedQueue()

  constructor(deps: IntegrationDeps) {
    this.#deps = deps
  }

  /** The client; `credentials` also requires GITEA_USERNAME and GITEA_PASSWORD. */
  #client(credentials: boolean): { http: IntegrationHttp; username: string; authorization: string } {
    const c = this.#deps.config.integrations.gitea
    this.#http = configuredClient('gitea', this.#http, this.#deps.config, credentials, this.#deps.flags === true)
    const username = c.username ?? ''
    const authorization = credentials ? `Basic ${Buffer.from(`${username}:${c.password}`).toString('base64')}` : ''
    this.#http.secret(authorization.slice(6))
    return { http: this.#http, username, authorization }
  }

  /** The error of a failed call on the token routes, by status and Gitea's message. */
  #tokenRouteError(http: IntegrationHttp, res: HttpResponse, username: string, user: string, what: string): KeygateError {
    const message = http.messageOf(res)
    // Gitea's own 401 and 403 are JSON with a message. Another server's (an SSO proxy's sign-in
    // page, a WAF's 403 in front of Gitea) says nothing of GITEA_USERNAME's credentials: before
    // (found by a review), it was "refused the credentials ... 401 no message", as verify once was.
    // So for 404 and 405: the token routes take these methods, and Gitea's own 404 is JSON; its
    // router's plain `404 page not found` or empty 405, or a proxy's page, says the address leads
    // elsewhere (GITEA_URL ending in /api/v1, say).
    const foreign = OWN_ERROR_STATUSES.has(res.status) ? http.foreignError(res, `the request to ${what}`) : undefined
    if (foreign !== undefined) return foreign
    if (res.status === 401) {
      return new KeygateError('gitea_auth_failed', `Gitea at ${http.baseUrl} refused the credentials of ${JSON.stringify(username)} (GITEA_USERNAME/GITEA_PASSWORD): 401 ${message}`)
    }
    // Gitea's own "user (redirect) does not exist": a --user Gitea has no account of (a typo), not a
    // fault of Gitea's (before, found by a review, gitea_error, 502).
    if (res.status === 404 && USER_NOT_EXIST.test(message)) {
      // GITEA_USERNAME itself: Gitea signs an e-mail address in, but its token paths take the login name only.
      const login = sameUser(user, username) ? '; GITEA_USERNAME must be the login name, not an e-mail address' : ''
      return new KeygateError('gitea_user_not_found', `Gitea at ${http.baseUrl} has no user ${JSON.stringify(user)}: 404 ${message}${login}`)
    }
    if (res.status === 403 && ACCOUNT_MESSAGE.test(message)) {
      return new KeygateError('gitea_auth_failed', `Gitea at ${http.baseUrl} refuses every call of ${JSON.stringify(username)} (GITEA_USERNAME): the account may not sign in: 403 ${message}`)
    }
    if (res.status === 403 && SCOPE_MESSAGE.test(message)) {
      // Gitea's Basic method takes a token as the password and checks its scopes before anything
      // else on these routes; told before (found by a review) as reqSelfOrAdmin's 403 below.
      return new KeygateError(
        'gitea_auth_failed',
        `Gitea at ${http.baseUrl} took GITEA_PASSWORD for a token (Gitea accepts one as the Basic password), and it lacks the scope this call needs (read:user to list tokens, write:user to create or delete them): 403 ${message}; set GITEA_PASSWORD to the password of ${JSON.stringify(username)}, or to a token with write:user`,
      )
    }
    if (res.status === 403) {
      return new KeygateError('gitea_auth_failed', `Gitea at ${http.baseUrl} does not let ${JSON.stringify(username)} manage the tokens of ${JSON.stringify(user)} (only the user or a site admin may): 403 ${message}`)
    }
    if (res.status === 400 && /name has been used already/i.test(message)) {
      return new KeygateError('gitea_token_exists', `Gitea user ${JSON.stringify(user)} already has a token named so: ${message}`)
    }
    if (res.status === 400 && /scope/i.test(message)) {
      return new KeygateError('gitea_scope_unknown', `Gitea at ${http.baseUrl} refused the scopes: ${message}`, { allowed: GITEA_SCOPES })
    }
    return http.failure(what, res)
  }

  async #rows(where: string, params: unknown[]): Promise<Row[]> {
    return this.#deps.db.query<Row>(`SELECT ${COLUMNS} FROM gitea_tokens WHERE ${where} ORDER BY created_at, id`, params)
  }

  async create(body: unknown, actor: Actor): Promise<GiteaTokenCreated> {
    const input = assertValid<CreateGiteaTokenInput>(CreateGiteaTokenBody, body)
    refuseKeyIn({ name: input.name })
    const unknown = unknownGiteaScopes(input.scopes)
    if (unknown) throw new KeygateError('gitea_scope_unknown', `scopes: ${unknown.message}`, { unknown: unknown.unknown, allowed: GITEA_SCOPES })
    const user = input.user ?? this.#client(true).username
    // Gitea checks the name (AccessTokenByNameExists) and inserts apart, with no transaction and
    // no unique index: two creates of one name at once both made a token, and `delete NAME` then
    // deleted one of them silently (found by a review). Here they run one after the other, and
    // Gitea refuses the second's name; creates from elsewhere are left to `delete`'s conflict.
    return this.#creating.run(`${user.toLowerCase()}\n${input.name}`, () => this.#create(input, user, actor))
  }

  async #create(input: CreateGiteaTokenInput, user: string, actor: Actor): Promise<GiteaTokenCreated> {
    const { http, username, authorization } = this.#client(true)
    const path = `/api/v1/users/${encodeURIComponent(user)}/tokens`
    const otherUser = userFlag(user, username)
    const deleteCommand = (id: number | string): string => `keygate gitea delete ${id}${otherUser}`
    // The id of the token of this name keygate holds no record of, if there is one.
    const unrecorded = async (): Promise<string | undefined> => {
      const made = (await this.#remoteTokens(user)).find((t) => t.name === input.name)
      if (!made) return undefined
      const records = await this.#rows('base_url = $1 AND remote_id = $2 AND deleted_at IS NULL', [http.baseUrl, made.id])
      return records.some((r) => sameToken(r, made)) ? undefined : String(made.id)
    }
    const { created, token } = await createOrReport({
      http,
      deps: this.#deps,
      what: `token ${JSON.stringify(input.name)} of ${JSON.stringify(user)}`,
      // `list` covers the configured user and the users keygate holds records for.
      lookAgain: otherUser === ''
        ? 'if `keygate gitea list` shows one as not recorded, delete it'
        : `look among the tokens of ${JSON.stringify(user)} in Gitea, and delete one of that name with \`keygate gitea delete ID${otherUser}\``,
      deleteCommand,
      send: () => http.call('POST', path, { headers: { authorization }, json: { name: input.name, scopes: input.scopes } }),
      use: (res) => {
        if (res.status !== 201) throw this.#tokenRouteError(http, res, username, user, `create a token for ${JSON.stringify(user)}`)
        return madeToken(http, res)
      },
      find: unrecorded,
    }).catch(async (err: unknown) => {
      throw isKeygateError(err, 'gitea_token_exists') ? await nameTaken(err, { deps: this.#deps, find: unrecorded, deleteCommand }) : err
    })
    const scopes = created.scopes ?? (await this.#storedScopes(user, created, token))
    const row: Row = {
      id: recordId('gt'),
      base_url: http.baseUrl,
      remote_id: created.id,
      name: created.name,
      username: user,
      scopes,
      token_last_eight: created.token_last_eight.length === 8 ? created.token_last_eight : lastEight(token),
      created_at: new Date(),
      created_by: actor.actor,
      deleted_at: null,
      deleted_by: null,
    }
    const details = { remote_id: created.id, name: row.name, user, scopes: row.scopes, token_last_eight: row.token_last_eight, base_url: row.base_url }
    await recordRemoteCreate({
      service: 'gitea',
      deps: this.#deps,
      what: `token ${created.id} (${JSON.stringify(row.name)} of ${JSON.stringify(user)})`,
      record: { table: 'gitea_tokens', id: row.id },
      deleteCommand: deleteCommand(created.id),
      write: async (tx) => {
        // Gitea just gave this id to the new token, so no other token there has it: a live record
        // holding it is of an earlier token (Gitea handed the id out again) and is closed, where
        // before the insert failed and the new, valid token was deleted again (store_unavailable).
        const stale = await tx.query<{ id: string; name: string; username: string }>(
          `UPDATE gitea_tokens SET deleted_at = now(), deleted_by = $3 WHERE base_url = $1 AND remote_id = $2 AND deleted_at IS NULL RETURNING id, name, username`,
          [row.base_url, created.id, actor.actor],
        )
        for (const s of stale) {
          this.#deps.log.warn('Gitea gave a new token the id of a recorded one; closing the earlier record', { record: s.id, remote_id: created.id, name: s.name, user: s.username })
          await this.#deps.audit.write(tx, actor, {
            keyId: s.id,
            action: 'gitea.token.deleted',
            details: { remote_id: created.id, name: s.name, user: s.username, remote_missing: true, recorded: true, remote_id_reused: true, base_url: row.base_url },
          })
        }
        const [stored] = await tx.query<{ created_at: Date }>(
          `INSERT INTO gitea_tokens (id, base_url, remote_id, name, username, scopes, token_last_eight, token_hash, created_by)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING created_at`,
          [row.id, row.base_url, created.id, row.name, user, row.scopes, row.token_last_eight, secretHash(token), actor.actor],
        )
        if (stored) row.created_at = stored.created_at
        await this.#deps.audit.write(tx, actor, { keyId: row.id, action: 'gitea.token.created', details })
      },
      undo: async () => {
        const undo = await http.call('DELETE', `${path}/${created.id}`, { headers: { authorization } })
        if (undo.status !== 204 && !gone(http, undo)) throw this.#tokenRouteError(http, undo, username, user, `delete token ${created.id}`)
      },
    })
    this.#deps.log.info('created a Gitea token', { record: row.id, remote_id: created.id, name: row.name, user, actor: actor.actor })
    return { ...toJson(row), token }
  }

  /**
   * The scopes Gitea stored for a token it made without naming them in its answer (an older
   * Gitea's create answers `scopes: null`, or none): as its list gives them, else null, unknown.
   * Gitea stores them normalised (write implies read, every write scope is `all`), and a Gitea
   * before scoped tokens (1.19) ignores them, its tokens able to do anything: before (found by a
   * review), the record held the scopes asked for, which said neither. The token is made, its
   * secret in hand: a list that fails leaves them unknown rather than failing the create.
   */
  async #storedScopes(user: string, created: GiteaRemoteToken, token: string): Promise<string[] | null> {
    try {
      const listed = (await this.#remoteTokens(user)).find((t) => t.id === created.id && (t.token_last_eight === '' || t.token_last_eight === lastEight(token)))
      return listed?.scopes ?? null
    } catch (err) {
      this.#deps.log.warn('could not read the scopes Gitea stored for a token it made; recording them as unknown', { remote_id: created.id, user, err: err as Error })
      return null
    }
  }

  /**
   * Every token of `user` in Gitea, all pages, each once. Gitea lists them newest first
   * (`created_unix DESC`), so a token made or deleted by anyone between two pages moves every
   * later one: one made listed a token twice (and left the new one out), one deleted left a
   * token out. A walk whose X-Total-Count changed, or whose distinct tokens do not make it up, is
   * read again once; a second one like it is an error rather than a wrong list, which `delete`
   * would act on.
   */
  async #remoteTokens(user: string): Promise<GiteaRemoteToken[]> {
    const first = await this.#tiedWalks(user)
    if (first.complete) return first.tokens
    const second = await this.#tiedWalks(user)
    if (second.complete) return second.tokens
    const { http } = this.#client(true)
    if (second.steady) {
      throw new KeygateError(
        'gitea_error',
        `Gitea at ${http.baseUrl} listed ${second.tokens.length} distinct of the ${second.total} tokens of ${JSON.stringify(user)} (X-Total-Count) on every walk, with pages of other sizes as well: its database orders tokens made in the same second differently from page to page; see them in Gitea's own settings`,
      )
    }
    throw new KeygateError(
      'gitea_error',
      `the tokens of ${JSON.stringify(user)} in Gitea at ${http.baseUrl} changed while they were being listed, on two walks in a row (${second.tokens.length} distinct of X-Total-Count ${second.total}): try again`,
    )
  }

  /**
   * A walk, and when it is steady but short, more walks with other page sizes, merged. Gitea orders
   * the tokens by `created_unix` alone, so tokens made in the same second are tied, and PostgreSQL
   * orders ties by how it sorts, which depends on `limit` and `offset` (a top-N heap for the early
   * pages, a full sort for the later ones): a tie straddling a page boundary is listed on both pages
   * and another on neither, the same on every walk, and the list failed for good (found by a
   * review). Pages of another size split the ties elsewhere. Measured on PostgreSQL 15 with Gitea's
   * table, sizes well apart (37, 29...) recovered far more often than 49, 47... did. The merge
   * counts only when every walk had the same X-Total-Count and a page 1 that stayed as it was, and
   * page 1 of the first walk is read once more at the end: a token made between two walks (and one
   * deleted, the count unchanged) would be first there.
   */
  async #tiedWalks(user: string): Promise<Walk> {
    const first = await this.#walkTokens(user, PAGE_SIZE)
    const total = first.total
    if (total === undefined || !first.steady || first.tokens.length >= total) return first
    const byId = new Map(first.tokens.map((t) => [t.id, t]))
    for (const limit of TIED_PAGE_SIZES.filter((l) => l < first.pageSize)) {
      const walk = await this.#walkTokens(user, limit)
      if (!walk.steady || walk.total !== total) return { ...walk, steady: false, complete: false }
      for (const t of walk.tokens) if (!byId.has(t.id)) byId.set(t.id, t)
      if (byId.size >= total) break
    }
    const tokens = [...byId.values()]
    if (tokens.length !== total) return { ...first, tokens, complete: false }
    const again = await this.#tokenPage(user, 1, PAGE_SIZE)
    const steady = again !== undefined && again.total === total && idsOf(again.items) === first.firstPage
    return { ...first, tokens, steady, complete: steady }
  }

  /**
   * One page of `user`'s tokens, with X-Total-Count. A user other than the configured one that
   * Gitea answers 404 for no longer exists there, and neither do its tokens (Gitea deletes them
   * with the user): undefined. Before, such a user made every list fail, and its records could not
   * be closed. The 404 is believed only once the same server has answered `GET /user` as the
   * configured user: a server that answers 404 to everything (a wrong path behind a proxy, a
   * maintenance page) must not make keygate close records of tokens that still exist.
   */
  async #tokenPage(user: string, page: number, limit: number): Promise<{ items: unknown[]; total: number | undefined } | undefined> {
    const { http, username, authorization } = this.#client(true)
    const res = await http.call('GET', `/api/v1/users/${encodeURIComponent(user)}/tokens`, { headers: { authorization }, query: { page, limit } })
    if (gone(http, res) && page === 1 && !sameUser(user, username) && (await this.#answersAsConfiguredUser())) {
      // Only Gitea's "user redirect does not exist" says the user is gone. From 1.23 on, Gitea
      // answers the token routes of a private user to anyone but the user and site admins with
      // another 404 (individualPermsChecker: "Visit Project", later "not found"): before (found by a review),
      // that was taken for the user deleted, its records listed as deleted remotely, and a delete
      // closed the record of a token that still worked.
      if (USER_NOT_EXIST.test(http.messageOf(res))) return undefined
      throw this.#hiddenUser(http, res, username, user)
    }
    if (page === 1 && !sameUser(user, username)) {
      const unreadable = this.#unreadable(http, res, username, user)
      if (unreadable) throw unreadable
    }
    if (res.status !== 200) throw this.#tokenRouteError(http, res, username, user, `list the tokens of ${JSON.stringify(user)}`)
    if (!Array.isArray(res.body)) throw new KeygateError('gitea_error', `Gitea at ${http.baseUrl} answered the token list with something other than a list`)
    const total = Number(res.headers['x-total-count'])
    return { items: res.body as unknown[], total: Number.isFinite(total) ? total : undefined }
  }

  /**
   * One walk over the pages of `user`'s tokens, `limit` a page. Steady: X-Total-Count the same on
   * every page, and page 1 read again at the end the same; complete: steady, and the distinct
   * tokens read make up X-Total-Count (without the header, nothing says otherwise).
   */
  async #walkTokens(user: string, limit: number): Promise<Walk> {
    const byId = new Map<number, GiteaRemoteToken>()
    const totals = new Set<number>()
    let firstPage = ''
    let firstItems: unknown[] = []
    let pageSize = limit
    let pages = 0
    let pagingChecked = false
    for (let page = 1; page <= MAX_PAGES; page++) {
      const read = await this.#tokenPage(user, page, limit)
      if (read === undefined) return { tokens: [], total: undefined, steady: true, complete: true, firstPage: '', pageSize: limit }
      const { items, total } = read
      if (total !== undefined) totals.add(total)
      pages = page
      if (page === 1) {
        firstItems = items
        firstPage = idsOf(items)
        // A server may cap `limit` lower (MAX_RESPONSE_ITEMS): a full first page says by how much.
        if (items.length > 0 && items.length < limit && total !== undefined && items.length < total) pageSize = items.length
      }
      const before = byId.size
      for (const item of items) {
        const t = remoteToken(item)
        if (t && !byId.has(t.id)) byId.set(t.id, t)
      }
      // A short page is the last; X-Total-Count, when sent, ends the walk as soon as it is reached
      // (a server may cap pages below the limit, so a short page alone does not end it then).
      if (items.length === 0 || (total !== undefined ? byId.size >= total : items.length < limit)) break
      // A later page that adds no token: ties in one second can do that (see #tiedWalks), and so
      // does a server that ignores `page` and answers page 1 every time, which before (found by a
      // review) made every walk read 1000 pages (12,012 requests for one list) and then blamed
      // the ties, or without X-Total-Count took page 1 for the whole list.
      if (page > 1 && byId.size === before && !pagingChecked) {
        pagingChecked = true
        await this.#assertPaged(user, { page, limit, pageSize, total, firstItems })
      }
    }
    // A token made and one deleted between two pages leave the count as it was, and the later
    // pages where they were: the walk read the deleted one and missed the new one (a carried-over
    // finding of an earlier review). The new one is first in the list (newest first), so the first
    // page read again tells: the same tokens, or the walk is read again.
    const firstAgain = pages > 1 ? await this.#tokenPage(user, 1, limit) : undefined
    if (firstAgain?.total !== undefined) totals.add(firstAgain.total)
    const tokens = [...byId.values()]
    const [total] = totals
    const steady = totals.size <= 1 && (pages === 1 || (firstAgain !== undefined && idsOf(firstAgain.items) === firstPage))
    return { tokens, total, steady, complete: steady && (total === undefined || tokens.length === total), firstPage, pageSize }
  }

  /**
   * Throws when the server ignores `page`: asked for a page past the last one (by X-Total-Count,
   * else past the pages a walk reads), Gitea answers an empty list, and the tokens of page 1 again
   * say every page is page 1. Anything else leaves the walk to go on: a page that added no token
   * was the ties of one second, listed on an earlier page too.
   */
  async #assertPaged(user: string, walk: { page: number; limit: number; pageSize: number; total: number | undefined; firstItems: unknown[] }): Promise<void> {
    const { page, limit, pageSize, total, firstItems } = walk
    const past = total === undefined ? MAX_PAGES + 1 : Math.ceil(total / pageSize) + 1
    const probe = await this.#tokenPage(user, past, limit)
    const first = new Set(firstItems.map((item) => remoteToken(item)?.id))
    const again = probe?.items.map((item) => remoteToken(item)?.id) ?? []
    if (again.length === 0 || again.length !== first.size || !again.every((id) => first.has(id))) return
    const { http } = this.#client(true)
    const where = total === undefined ? `past the ${MAX_PAGES} pages a list reads` : `past the last of X-Total-Count ${total}`
    throw new KeygateError(
      'gitea_error',
      `Gitea at ${http.baseUrl} answered page ${page} of the tokens of ${JSON.stringify(user)}, and page ${past} (${where}), with the same tokens as page 1: the server at GITEA_URL ignores the \`page\` query parameter (a proxy in front of Gitea that drops the query string?), so no token past page 1 can be read; is GITEA_URL Gitea's own address?`,
    )
  }

  /**
   * The refusal of another user's token list that leaves the rest of the list readable (see
   * UnreadableUser), else undefined. A 403 saying GITEA_USERNAME may not sign in is not one: it
   * refuses every call. Before (found by a review), one such user failed every list, hiding the
   * configured user's own tokens too, and its records could not be closed.
   */
  #unreadable(http: IntegrationHttp, res: HttpResponse, username: string, user: string): UnreadableUser | undefined {
    const forget = this.#forgetHint(user)
    // A barred account or a token's missing scope is the credential's, not this user's: told by
    // #tokenRouteError without the hint to close the record unasked (the scope's, before, found by
    // a review, with it).
    const message = http.messageOf(res)
    if (res.status === 403 && !ACCOUNT_MESSAGE.test(message) && !SCOPE_MESSAGE.test(message)) {
      const refused = this.#tokenRouteError(http, res, username, user, `list the tokens of ${JSON.stringify(user)}`)
      const code = refused.code === 'gitea_error' ? 'gitea_error' : 'gitea_auth_failed'
      return new UnreadableUser(code, refused.message + forget, `403 ${message}`, refused.details === undefined ? undefined : { ...refused.details })
    }
    if (res.status >= 300 && res.status < 400) {
      const location = res.headers.location
      const to = typeof location === 'string' ? /\/users\/([^/?#]+)\/tokens(?:[?#]|$)/.exec(location)?.[1] : undefined
      let renamed: string | undefined
      try {
        renamed = to === undefined ? undefined : decodeURIComponent(to)
      } catch {
        renamed = undefined
      }
      const where = renamed !== undefined ? `to the user ${JSON.stringify(renamed)} (Gitea redirects a renamed user's old name)` : typeof location === 'string' ? `to ${JSON.stringify(http.redact(location.slice(0, 200)))}` : 'without a Location'
      const reason = `${res.status} ${where}`
      return new UnreadableUser('gitea_error', `Gitea at ${http.baseUrl} did not list the tokens of ${JSON.stringify(user)}: ${reason}${forget}`, reason, { status: res.status })
    }
    return undefined
  }

  /** Another user's token list answered 404 other than "user (redirect) does not exist": Gitea hides a private user from GITEA_USERNAME (see #tokenPage). */
  #hiddenUser(http: IntegrationHttp, res: HttpResponse, username: string, user: string): UnreadableUser {
    const reason = `404 ${http.messageOf(res)}`
    return new UnreadableUser(
      'gitea_auth_failed',
      `Gitea at ${http.baseUrl} does not show the user ${JSON.stringify(user)} to ${JSON.stringify(username)} (${reason}: Gitea hides a private user from all but the user and site admins, who alone may manage its tokens)${this.#forgetHint(user)}`,
      reason,
      { status: 404 },
    )
  }

  /** How to close a record of `user`'s token without asking Gitea, for the message of an unreadable user. */
  #forgetHint(user: string): string {
    return `; to close keygate's record of a token of ${JSON.stringify(user)} without asking Gitea: \`keygate gitea delete ID|NAME --user ${user} --forget\``
  }

  /** Whether the server answers `GET /user` with the configured credential as the configured user (Gitea logins ignore case). */
  async #answersAsConfiguredUser(): Promise<boolean> {
    const { http, username, authorization } = this.#client(true)
    const res = await http.call('GET', '/api/v1/user', { headers: { authorization } })
    const login = (res.body as { login?: unknown } | null)?.login
    return res.status === 200 && typeof login === 'string' && login.toLowerCase() === username.toLowerCase()
  }

  /**
   * Gitea's tokens beside keygate's records, for the configured user and every user keygate holds
   * live records for on this server; `state` marks drift either way.
   */
  async list(): Promise<GiteaTokenList> {
    const { http, username } = this.#client(true)
    const live = await this.#rows('base_url = $1 AND deleted_at IS NULL', [http.baseUrl])
    // One entry per Gitea user whatever the case a record was made with (`Alice` is `alice`):
    // the first spelling seen names it, GITEA_USERNAME's first.
    const users: string[] = []
    for (const name of [username, ...live.map((r) => r.username)]) if (!users.some((u) => sameUser(u, name))) users.push(name)
    const items: GiteaListItem[] = []
    for (const user of users) {
      const local = live.filter((r) => sameUser(r.username, user))
      let remote: GiteaRemoteToken[]
      try {
        remote = await this.#remoteTokens(user)
      } catch (err) {
        if (!(err instanceof UnreadableUser)) throw err
        for (const r of local) items.push({ remote_id: Number(r.remote_id), name: r.name, user, state: 'unreadable', reason: err.reason, remote: null, local: toJson(r) })
        continue
      }
      for (const t of remote) {
        const mine = local.find((r) => sameToken(r, t))
        items.push({ remote_id: t.id, name: t.name, user, state: trackState(t, mine), remote: t, local: mine ? toJson(mine) : null })
      }
      for (const r of local) {
        if (remote.some((t) => sameToken(r, t))) continue
        items.push({ remote_id: Number(r.remote_id), name: r.name, user, state: 'deleted_remotely', remote: null, local: toJson(r) })
      }
    }
    const drift = items.filter((i): i is GiteaListItem & { state: TrackState } => i.state !== 'unreadable')
    return { base_url: http.baseUrl, users, items, summary: { ...driftSummary(drift), unreadable: items.length - drift.length } }
  }

  /**
   * Deletes by Gitea token id, else by the id a record holds, else by name, and closes the record.
   * `forget`: closes a live record only (see #forget), without calling Gitea.
   */
  async delete(ref: string, actor: Actor, options: { user?: string | undefined; forget?: boolean | undefined } = {}): Promise<GiteaTokenDeleted> {
    if (options.user !== undefined) assertValid(DeleteGiteaTokenQuery, { user: options.user })
    const { http, username, authorization } = this.#client(true)
    const user = options.user ?? username
    if (options.forget === true) return this.#forget(http, ref, user, actor)
    const byId = /^\d{1,18}$/.test(ref) && Number(ref) > 0 ? Number(ref) : null
    const remote = await this.#remoteTokens(user)
    // Case-insensitive, as Gitea matches user names: a record made for `Alice` is `alice`'s. The
    // live-records index (base_url, username) still narrows it by server.
    const live = await this.#rows('base_url = $1 AND lower(username) = lower($2) AND deleted_at IS NULL', [http.baseUrl, user])
    const recordOf = (t: GiteaRemoteToken): Row | undefined => live.find((r) => sameToken(r, t))
    // A number is Gitea's id of a listed token, else the id a record holds, and a name only when
    // neither has it: with keygate's token 1 deleted in Gitea by hand and a token named "1" made
    // there, `delete 1` deleted that other token, found by name before the record by id.
    let target = remote.find((t) => t.id === byId)
    let local = target ? recordOf(target) : live.find((r) => Number(r.remote_id) === byId)
    // The id is both a token keygate has no record of and a record of an earlier token Gitea
    // gave that id (handed out again): which one is meant cannot be told, and guessing deleted
    // the unrelated, perhaps working, token and left the stale record open (found by a review).
    const stale = target && !local ? live.find((r) => Number(r.remote_id) === byId) : undefined
    if (target && stale) {
      throw new KeygateError(
        'conflict',
        `id ${byId} is both Gitea token ${JSON.stringify(target.name)} of ${JSON.stringify(user)}, which keygate has no record of, and keygate's record of an earlier token of that id, ${JSON.stringify(stale.name)} (Gitea gave the id out again): delete by name, ${JSON.stringify(stale.name)} to close the record or ${JSON.stringify(target.name)} to delete the token`,
        { remote_id: byId, token: target.name, record: stale.name },
      )
    }
    if (!target && !local) {
      // Gitea keeps no name unique (two creates at once both pass its name check): which of
      // several is meant cannot be told, and taking the first deleted one silently (found by a
      // review). Gitea's own delete by name answers 422 then.
      const named = remote.filter((t) => t.name === ref)
      if (named.length > 1) {
        throw new KeygateError('conflict', `Gitea user ${JSON.stringify(user)} has ${named.length} tokens named ${JSON.stringify(shownInput(ref))}; delete by id: ${named.map((t) => t.id).join(', ')}`)
      }
      target = named[0]
      local = target ? recordOf(target) : live.find((r) => r.name === ref)
    }
    if (!target && !local) {
      throw new KeygateError('gitea_token_not_found', `Gitea user ${JSON.stringify(user)} has no token with the id or name ${JSON.stringify(shownInput(ref))}`)
    }
    const remoteId = target ? target.id : Number((local as Row).remote_id)
    const name = target ? target.name : (local as Row).name
    // Only the record names it, and Gitea lists another token under its id (one handed out
    // again): the recorded token is gone, and a DELETE by that id would remove the other one.
    const reused = !target && remote.some((t) => t.id === remoteId && !sameToken(local as Row, t))
    let remoteMissing = true
    if (!reused) {
      // Also when only the record names it: a token the list walk missed (another admin deleting
      // one on an earlier page shifts the later pages) must not keep working with its record closed.
      // Gitea answers 404 for a token that is gone.
      const res = await http.call('DELETE', `/api/v1/users/${encodeURIComponent(user)}/tokens/${remoteId}`, { headers: { authorization } })
      if (res.status !== 204 && !gone(http, res)) throw this.#tokenRouteError(http, res, username, user, `delete token ${remoteId}`)
      remoteMissing = res.status === 404
      // Listed a moment ago, gone now: another delete at the same time (of this keygate or
      // another) deleted it, and closes the record with the audit row saying so. Before (found by
      // a review), this one could close it first, audited `remote_missing: true` as if deleted in
      // Gitea by hand, and the delete that did delete it was answered "not found".
      if (remoteMissing && target) {
        throw new KeygateError(
          'gitea_token_not_found',
          `Gitea user ${JSON.stringify(user)} has no token ${JSON.stringify(name)} (id ${remoteId}) any more: it was deleted while this delete ran (by another delete at the same time, which closes its record, or in Gitea); nothing was changed`,
        )
      }
    }
    const closed = await recordDelete(this.#deps.db, this.#deps.audit, actor, 'gitea_tokens', local?.id ?? null, 'gitea.token.deleted', {
      remote_id: remoteId,
      name,
      user,
      remote_missing: remoteMissing,
      recorded: local !== undefined,
      ...(reused ? { remote_id_reused: true } : {}),
      base_url: http.baseUrl,
    }, remoteMissing ? undefined : { service: 'gitea', what: `token ${remoteId} (${JSON.stringify(name)} of ${JSON.stringify(user)})`, deleteCommand: `keygate gitea delete ${remoteId}${userFlag(user, username)}` })
    // As for a delete after it: the token is no longer there to delete.
    if (!closed) throw new KeygateError('gitea_token_not_found', `Gitea user ${JSON.stringify(user)} has no token ${JSON.stringify(name)} (id ${remoteId}) any more: another delete closed its record at the same time`)
    this.#deps.log.info('deleted a Gitea token', { record: local?.id ?? null, remote_id: remoteId, name, user, remote_missing: remoteMissing, actor: actor.actor })
    const [after] = local ? await this.#rows('id = $1', [local.id]) : []
    return { deleted: true, remote_id: remoteId, name, user, remote_missing: remoteMissing, forgotten: false, record: after ? toJson(after) : null }
  }

  /**
   * Closes keygate's live record of a token of `user` (by the Gitea id it holds, else by name)
   * and audits it with `forgotten: true`, with no call to Gitea: the token itself, if it is still
   * there, is left as it is. For the records of a user whose tokens Gitea will not list to
   * GITEA_USERNAME (`unreadable`: not a site admin, or the user was renamed), which a delete
   * cannot close; before (found by a review), they stayed open, and listed, for good.
   */
  async #forget(http: IntegrationHttp, ref: string, user: string, actor: Actor): Promise<GiteaTokenDeleted> {
    const live = await this.#rows('base_url = $1 AND lower(username) = lower($2) AND deleted_at IS NULL', [http.baseUrl, user])
    const byId = /^\d{1,18}$/.test(ref) && Number(ref) > 0 ? Number(ref) : null
    let matches = live.filter((r) => Number(r.remote_id) === byId)
    if (matches.length === 0) matches = live.filter((r) => r.name === ref)
    if (matches.length > 1) {
      throw new KeygateError('conflict', `keygate holds ${matches.length} live records of tokens of ${JSON.stringify(user)} named ${JSON.stringify(shownInput(ref))}; forget by id: ${matches.map((r) => r.remote_id).join(', ')}`)
    }
    const [local] = matches
    if (!local) throw new KeygateError('gitea_token_not_found', `keygate holds no live record of a token of ${JSON.stringify(user)} with the id or name ${JSON.stringify(shownInput(ref))}`)
    const remoteId = Number(local.remote_id)
    const closed = await recordDelete(this.#deps.db, this.#deps.audit, actor, 'gitea_tokens', local.id, 'gitea.token.deleted', {
      remote_id: remoteId,
      name: local.name,
      user,
      remote_missing: false,
      recorded: true,
      forgotten: true,
      base_url: http.baseUrl,
    })
    if (!closed) throw new KeygateError('gitea_token_not_found', `keygate's record of Gitea token ${remoteId} (${JSON.stringify(local.name)} of ${JSON.stringify(user)}) was closed by another delete at the same time`)
    this.#deps.log.info("closed keygate's record of a Gitea token without calling Gitea", { record: local.id, remote_id: remoteId, name: local.name, user, actor: actor.actor })
    const [after] = await this.#rows('id = $1', [local.id])
    return { deleted: true, remote_id: remoteId, name: local.name, user, remote_missing: false, forgotten: true, record: after ? toJson(after) : null }
  }

  /** Asks Gitea whose token this is (`GET /user`); a refused token is a result, not an error. */
  async verify(secret: string): Promise<GiteaVerification> {
    const { http } = this.#client(false)
    const [row] = await this.#rows('token_hash = $1', [secretHash(secret)])
    const record = row ? toJson(row) : null
    if (!TOKEN_SHAPE.test(secret)) return { valid: false, reason: 'malformed', record }
    http.secret(secret, { transient: true })
    const res = await http.call('GET', '/api/v1/user', { headers: { authorization: `token ${secret}` } })
    // Gitea's own 401 and 403 are JSON with a message; another server's (an SSO proxy's sign-in
    // page in front of Gitea) says nothing of the token: before, any 401 reported it refused. Nor
    // does its router's 404 or 405: before (found by a review), GITEA_URL ending in /api/v1 was
    // "refused to check the token: 404 404 page not found".
    if (OWN_ERROR_STATUSES.has(res.status)) http.assertOwnError(res, 'GET /api/v1/user')
    if (res.status === 401) return { valid: false, reason: 'refused', record }
    if (res.status === 403) {
      // Only the scope check's 403 means an accepted token; the same status also says the owner
      // is barred from signing in (suspended, not activated, must change the password), and then
      // Gitea refuses every call the token makes.
      const message = http.messageOf(res)
      if (SCOPE_MESSAGE.test(message)) {
        return { valid: true, user: null, note: 'Gitea accepted the token but it lacks the read:user scope, so Gitea does not say whose it is', record }
      }
      return { valid: false, reason: ACCOUNT_MESSAGE.test(message) ? 'account_barred' : 'forbidden', message, record }
    }
    if (res.status !== 200) throw http.failure('check the token', res)
    const u = res.body as { id?: unknown; login?: unknown; email?: unknown; is_admin?: unknown }
    if (typeof u?.login !== 'string') throw new KeygateError('gitea_error', `Gitea at ${http.baseUrl} answered GET /user without a login`)
    return {
      valid: true,
      user: { id: Number(u.id), login: u.login, email: typeof u.email === 'string' && u.email !== '' ? u.email : null, is_admin: u.is_admin === true },
      record,
    }
  }

  async close(): Promise<void> {
    await this.#http?.close()
  }
}
