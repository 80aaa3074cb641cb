// Admin credentials: `Authorization: Bearer <credential>`, where the credential is a key holding
// the `admin` scope or the bootstrap token (`admin.token`, KEYGATE_ADMIN_TOKEN). The token is
// compared as SHA-256 digests with timingSafeEqual, so neither its length nor its content leaks
// through timing, and only once it holds a place among the address's attempts in doubt, as a key
// does. Every presented credential that fails counts toward the address lockout the gateway
// uses; a request without one does not (as at the gateway), nor does one with more than one:
// repeated Authorization lines arrive joined with ", " (the listener runs with
// joinDuplicateHeaders), and a value with a comma that is not one `Bearer <credential>` is a 400,
// whichever credential comes first (the gateway answers two keys 400 before counting, too). Even
// the same credential twice is refused here: no admin client sends it. A comma inside the one
// credential (a bootstrap token may hold one; keys never do) is not two.
import { createHash, timingSafeEqual } from 'node:crypto'
import type { Actor } from '../core/audit.ts'
import { normalAddress } from '../core/keys/evaluate.ts'
import type { KeyService } from '../core/keys/service.ts'
import { sqlState } from '../core/db.ts'
import { isKeygateError, KeygateError } from '../core/errors.ts'
import { createLookupFailures, lockedOutMessage, type Lockout } from '../core/lockout.ts'
import type { Logger } from '../core/log.ts'
import { AdminError } from './server.ts'

export const ADMIN_SCOPE = 'admin'

export interface AdminAuthOptions {
  keys: KeyService
  lockout: Lockout
  /** The string the lockout counts an address under (IPv6 per network). */
  addressKey: (address: string) => string
  token?: string | undefined
  log: Logger
  /** Counts a request answered ip_locked_out. */
  onLockedOut?: () => void
}

export type Authenticate = (authorization: string | undefined, remoteAddress: string | undefined) => Promise<Actor>

const digest = (s: string) => createHash('sha256').update(s).digest()

const CHALLENGE = 'Bearer realm="keygate-admin"'

export function createAuthenticator(options: AdminAuthOptions): Authenticate {
  const { keys, lockout, addressKey, log } = options
  const token = options.token ? digest(options.token) : undefined
  const lookups = createLookupFailures()
  const lockedOut = (retryAfterS: number): AdminError => {
    options.onLockedOut?.()
    return new AdminError('ip_locked_out', lockedOutMessage(retryAfterS), { 'retry-after': String(retryAfterS) })
  }
  return async (authorization, remoteAddress) => {
    const address = normalAddress(remoteAddress ?? '') ?? remoteAddress ?? 'unknown'
    const counted = addressKey(address)
    const retryAfterS = await lockout.lockedFor(counted)
    if (retryAfterS !== undefined) throw lockedOut(retryAfterS)
    const m = /^Bearer +(\S+) *$/i.exec(authorization ?? '')
    if (!m && authorization?.includes(',')) throw new AdminError('bad_request', 'the request carries more than one Authorization credential; send one Authorization: Bearer <credential>')
    if (!m) throw new AdminError('unauthorized', 'send an admin key or the bootstrap token as Authorization: Bearer <credential>', { 'www-authenticate': CHALLENGE })
    const presented = m[1] as string
    // A place among the address's attempts in doubt (core/lockout.ts): a burst of bad
    // credentials gets no more of them checked than the lockout allows. The bootstrap token too
    // waits for its place: compared before, it was answered 200 in a burst whose first failures
    // had already locked the address out (found by a review: the right token at #250 of 300).
    const place = lockout.attempt(counted)
    const waited = place === undefined ? undefined : lookups.mark()
    const lockedS = place === undefined ? undefined : await place
    if (lockedS !== undefined) throw lockedOut(lockedS)
    if (token && timingSafeEqual(digest(presented), token)) {
      void lockout.finish(counted, false)
      return { actor: 'token', address }
    }
    // As at the gateway: a key that waited for its place while the store failed the look-ups
    // ahead of it is not looked up in turn (before, found by a review, 30 admin requests from one
    // address on a hung store were answered 5 every 5 s). A malformed one, which asks no store,
    // is refused as ever (before, found by a review, 503).
    const asksStore = keys.wellFormed(presented)
    if (waited !== undefined && asksStore && lookups.failedSince(waited)) {
      void lockout.finish(counted, false)
      throw new KeygateError('store_unavailable', 'the key store is not available: it failed the credential checks made while this one waited its turn; try again')
    }
    let result: Awaited<ReturnType<KeyService['validate']>>
    try {
      result = await keys.validate(presented, { address })
      // Only an answer of the store says it answers again.
      if (asksStore) lookups.answered()
    } catch (err) {
      // Any error of the look-up, as at the gateway (gateway/validate.ts storeDown): one that is
      // not store_unavailable (an error of PostgreSQL's that core/db.ts does not map, a table
      // missing, a right revoked) is the store failing the look-ups too, and those waiting would
      // meet it in turn. Before (found by a review), only store_unavailable was counted, and a burst
      // on such a store was let in max_attempts at a time, each group failing again.
      if (asksStore) lookups.failed()
      void lockout.finish(counted, false)
      if (isKeygateError(err)) throw err
      // Answered as the gateway answers it, 503 store_unavailable (retry), not 500 internal_error,
      // with the error as its cause (the answer says neither its words nor its SQL), which
      // admin/server.ts logs as it logs every 503 store_unavailable: once an outage at warn, each
      // after at debug (before, found by a review, here at error for each request, a line a request
      // for as long as a table was missing). Before (found by a review), rethrown: a 500, while the
      // attempts that waited behind it, and the gateway, answered 503.
      const code = sqlState(err)
      throw new KeygateError('store_unavailable', `the key store failed the credential look-up${code ? ` (SQLSTATE ${code})` : ''}; try again (keygate's log has the error: at warn with an outage's first 503, at debug with each after it)`, undefined, { cause: err })
    }
    const fail = async (err: AdminError): Promise<never> => {
      try {
        await lockout.finish(counted, true)
      } catch (e) {
        log.warn('could not record a failed admin attempt', { err: e as Error })
      }
      throw err
    }
    if (!result.valid) return fail(new AdminError('unauthorized', 'the admin credential is not valid', { 'www-authenticate': `${CHALLENGE}, error="invalid_token"` }))
    if (!result.key.scopes.includes(ADMIN_SCOPE)) return fail(new AdminError('forbidden', `key ${result.key.id} does not hold the admin scope`))
    void lockout.finish(counted, false)
    return { actor: `key:${result.key.id}`, address }
  }
}
