// What the Gitea and n8n services share about their local records: ids, the stored form of a
// secret (SHA-256 and last eight characters), the one transaction that writes a record with its
// audit row, and never losing track of a credential created remotely when that write fails.
import { hash } from 'node:crypto'
import type { Config } from '../../config/schema.ts'
import type { Actor, AuditLog } from '../audit.ts'
import type { Db, Queryable } from '../db.ts'
import { isKeygateError, KeygateError } from '../errors.ts'
import { fromGateway } from '../http.ts'
import { newKeyId } from '../keys/format.ts'
import type { Logger } from '../log.ts'
import { IntegrationHttp, mayHaveReached, SERVICE_LABEL, succeeded, type HttpResponse, type ServiceName } from './http.ts'

/** What both services are built from; the admin API and the CLI pass their runtime's. */
export interface IntegrationDeps {
  db: Db
  audit: AuditLog
  log: Logger
  config: Config
  /** The CLI on the store: a missing setting may also be given as the command's flag, and the message says so. */
  flags?: boolean
}

/** The settings a call to `service` needs, each with its variable: the URL, and for `credentials` (every call but verify's) the login's. */
function settingsNeeded(service: ServiceName, config: Config, credentials: boolean): Array<readonly [unknown, string]> {
  if (service === 'gitea') {
    const c = config.integrations.gitea
    return [[c.url, 'GITEA_URL'], ...(credentials ? [[c.username, 'GITEA_USERNAME'], [c.password, 'GITEA_PASSWORD']] as const : [])]
  }
  const c = config.integrations.n8n
  return [[c.url, 'N8N_URL'], ...(credentials ? [[c.email, 'N8N_EMAIL'], [c.password, 'N8N_PASSWORD']] as const : [])]
}

/**
 * The service's URL once the settings a call needs are there (`credentials`: every call's but
 * verify's), else `<service>_not_configured` naming each missing variable and, with `flags` (the
 * CLI on the store), its flag. A server's answer names no flag: through the admin API the CLI's
 * flags are refused, and the server's own settings are the ones to set. The CLI asks this before
 * it opens a store: before (found by a docs walk), `gitea create` without the settings made a new
 * store in a data folder that had none, then said Gitea was not configured.
 */
export function assertConfigured(service: ServiceName, config: Config, credentials: boolean, flags = false): string {
  const url = config.integrations[service].url
  const missing = settingsNeeded(service, config, credentials).filter(([value]) => !value).map(([, name]) => name)
  if (missing.length > 0 || !url) {
    const named = flags ? `, or ${missing.map((n) => `--${n.toLowerCase().replace(/_/g, '-')}`).join(', ')}` : ''
    throw new KeygateError(`${service}_not_configured`, `${SERVICE_LABEL[service]} is not configured: set ${missing.join(', ')} (or integrations.${service} in the configuration file${named})`)
  }
  return url
}

/** The client of a service once the settings a call needs are there (assertConfigured), `current` when there is one. */
export function configuredClient(service: ServiceName, current: IntegrationHttp | undefined, config: Config, credentials: boolean, flags = false): IntegrationHttp {
  const url = assertConfigured(service, config, credentials, flags)
  if (current) return current
  const settings = config.integrations[service]
  const http = new IntegrationHttp({ service, url, timeoutMs: settings.timeout_ms })
  http.secret(settings.password)
  return http
}

export function recordId(prefix: 'gt' | 'nk'): string {
  return `${prefix}_${newKeyId()}`
}

export function secretHash(secret: string): string {
  return hash('sha256', secret, 'hex')
}

export function lastEight(secret: string): string {
  return secret.slice(-8)
}

export const iso = (d: Date | null | undefined): string | null => (d ? d.toISOString() : null)

/** Drift of one credential: both sides agree, or one of them is missing. */
export type TrackState = 'in_sync' | 'deleted_remotely' | 'not_recorded'

export function trackState(remote: unknown, local: unknown): TrackState {
  if (remote && local) return 'in_sync'
  return remote ? 'not_recorded' : 'deleted_remotely'
}

export function driftSummary(items: ReadonlyArray<{ state: TrackState }>): Record<TrackState, number> {
  const out: Record<TrackState, number> = { in_sync: 0, deleted_remotely: 0, not_recorded: 0 }
  for (const i of items) out[i.state]++
  return out
}

/**
 * Writes the local record (and its audit row) of a credential just created remotely. When that
 * fails, the remote credential is deleted again; when that fails too, the error names it so an
 * operator can remove it, and `list` shows it as not recorded meanwhile. A failure at the COMMIT
 * may come after the commit was made, only its answer lost (the connection dropped between): the
 * store is asked whether the record is there, and when it is, the create succeeded. Before (found
 * by a review), any failure was taken for "not recorded": the credential was deleted again, the
 * error said so, and the record and its `created` audit row stayed, of a credential gone.
 */
export async function recordRemoteCreate(options: {
  service: ServiceName
  deps: IntegrationDeps
  what: string
  write: (tx: Queryable) => Promise<void>
  undo: () => Promise<void>
  /** The record `write` makes, asked for after a failure at its commit. */
  record: { table: 'gitea_tokens' | 'n8n_api_keys'; id: string }
  /** The command that deletes the credential, and closes its record once the credential is gone. */
  deleteCommand: string
}): Promise<void> {
  const { deps, record } = options
  let committing = false
  try {
    await deps.db.transaction(async (tx) => {
      await options.write(tx)
      committing = true
    })
  } catch (err) {
    if (!committing) return undoUnrecorded({ ...options, err })
    let kept: boolean
    try {
      kept = (await deps.db.query(`SELECT id FROM ${record.table} WHERE id = $1`, [record.id])).length > 0
    } catch (askErr) {
      const label = SERVICE_LABEL[options.service]
      return undoUnrecorded({
        ...options,
        err,
        unknown: {
          why: `whether the record was kept could not be asked (${(askErr as Error).message})`,
          deleted: `if \`keygate ${options.service} list\` shows it as deleted remotely, the record was kept, and \`${options.deleteCommand}\` closes it`,
          kept: `delete it with \`${options.deleteCommand}\` (which closes its record too, if it was kept) or in ${label} by hand`,
        },
      })
    }
    // Not there: most likely not committed. A commit waiting on a synchronous standby when its
    // connection dropped shows only once acknowledged: its record is then listed as deleted remotely.
    if (!kept) return undoUnrecorded({ ...options, err })
    deps.log.warn(`the store failed at the commit of the record of the ${SERVICE_LABEL[options.service]} credential just created, after making it: the credential is kept`, { credential: options.what, record: record.id, err: err as Error })
  }
}

/**
 * A credential was created remotely but cannot be recorded (`err`, from the store): it is
 * deleted again, and the error says whether that worked, naming it so an operator can remove it
 * by hand when it did not. `unknown`: the record may have been kept after all (the store failed at
 * its commit and could not be asked): why, and what to do once the credential was deleted, or
 * when it could not be.
 */
export async function undoUnrecorded(options: {
  service: ServiceName
  deps: IntegrationDeps
  what: string
  err: unknown
  undo: () => Promise<void>
  unknown?: { why: string; deleted: string; kept: string }
}): Promise<never> {
  const { deps, what, err, unknown } = options
  const label = SERVICE_LABEL[options.service]
  const failed = unknown === undefined ? `could not be recorded (${(err as Error).message})` : `the store failed at the commit of its record (${(err as Error).message}), and ${unknown.why}`
  deps.log.error(`could not record the ${label} credential just created; deleting it again`, { credential: what, err: err as Error })
  try {
    await options.undo()
  } catch (undoErr) {
    deps.log.error(`could not delete the unrecorded ${label} credential; delete it by hand`, { credential: what, err: undoErr as Error })
    throw new KeygateError(
      'store_unavailable',
      `${what} was created in ${label} but ${failed}, and deleting it again failed (${(undoErr as Error).message}): ${unknown?.kept ?? `delete it in ${label} by hand`}`,
      undefined,
      { cause: err },
    )
  }
  throw new KeygateError('store_unavailable', `${what} was created in ${label} but ${failed}; it was deleted from ${label} again${unknown ? `: ${unknown.deleted}` : ''}`, undefined, {
    cause: err,
  })
}

/**
 * Marks a live record deleted and writes the audit row, in one transaction. False, with no audit
 * row, when the record was no longer live: another delete closed it meanwhile. Before (found by a
 * review), two admins deleting one token at once both succeeded, and each wrote a closing audit
 * row for the record, though only one closed it. A credential without a record (`localId` null)
 * has its audit row all the same. `removed`: the credential was just deleted in the service, and a
 * store that fails says so, with how the record is closed: before (found by a review), the store's
 * error alone read as if the delete had not been carried out, the credential still working.
 */
export async function recordDelete(
  db: Db,
  audit: AuditLog,
  actor: Actor,
  table: 'gitea_tokens' | 'n8n_api_keys',
  localId: string | null,
  action: string,
  details: Record<string, unknown>,
  removed?: { service: ServiceName; what: string; deleteCommand: string },
): Promise<boolean> {
  try {
    return await db.transaction(async (tx) => {
      if (localId !== null) {
        const closed = await tx.query(`UPDATE ${table} SET deleted_at = now(), deleted_by = $2 WHERE id = $1 AND deleted_at IS NULL RETURNING id`, [localId, actor.actor])
        if (closed.length === 0) return false
      }
      await audit.write(tx, actor, { keyId: localId, action, details })
      return true
    })
  } catch (err) {
    if (removed === undefined) throw err
    const label = SERVICE_LABEL[removed.service]
    const left = localId === null
      ? `the audit row of its delete could not be written (${(err as Error).message})`
      : `its record could not be closed (${(err as Error).message}): \`keygate ${removed.service} list\` shows it as deleted remotely until \`${removed.deleteCommand}\` closes it`
    throw new KeygateError('store_unavailable', `${removed.what} was deleted from ${label}, but ${left}`, undefined, { cause: err })
  }
}

/**
 * The refusal of a create whose name is taken (`err`), saying so when the credential of that name
 * is one keygate holds no record of (`find` gives its id): made by hand, or by a create cut off
 * between the service making it and keygate recording it (the process killed, its machine down),
 * whose secret nobody got. Before (found by a review), the retry of such a create was told only
 * that the name was taken, and a Gitea token of a user other than GITEA_USERNAME, whom `list` does
 * not walk without a record, showed nowhere in keygate. A look that fails leaves `err` as it is.
 */
export async function nameTaken(err: KeygateError, options: { deps: IntegrationDeps; find: () => Promise<string | undefined>; deleteCommand: (remoteId: string) => string }): Promise<KeygateError> {
  let found: string | undefined
  try {
    found = await options.find()
  } catch (checkErr) {
    options.deps.log.warn('could not check whether the credential holding the name of a create is recorded', { err: checkErr as Error })
    return err
  }
  if (found === undefined) return err
  return new KeygateError(
    err.code,
    `${err.message}; keygate holds no record of it (id ${found}): it was made by hand, or by a create cut off before keygate recorded it (its secret never shown); to use the name again, delete it with \`${options.deleteCommand(found)}\``,
    err.details,
    { cause: err },
  )
}

/**
 * Sends a create request (`send`) and reads what it made from the answer (`use`, which throws the
 * error of a refusal). When the service does not answer it in time, the connection is lost after
 * the request was sent (a reset, a proxy restarting or cutting an idle connection), a gateway in
 * front of it answers 502/503/504 (it lost the service's answer), or a success answer cannot be
 * used (invalid JSON, too large, without the secret), it may have made the credential all the
 * same: its secret never reached keygate, so nobody can use it, but it would stay live and
 * unrecorded, its name taken. So the service is asked for a credential of that name keygate holds
 * no record of (`find`), and the error names it, with the command that deletes it, or says none
 * was found, or that it could not be checked. keygate does not delete it itself: the service
 * cannot say who made it, and one of that name made by hand, or by another admin's create at the
 * same moment (whose record is still being written), looks the same (a review saw both deleted
 * when this did).
 */
export async function createOrReport<T>(options: {
  http: IntegrationHttp
  deps: IntegrationDeps
  /** The credential as the messages name it: `token "ci"`, `API key "ci"`. */
  what: string
  /** Where to look for it and what to do then, when it was not found or could not be looked for. */
  lookAgain: string
  /** The command line that deletes the credential of this id. */
  deleteCommand: (remoteId: string) => string
  send: () => Promise<HttpResponse>
  use: (res: HttpResponse) => T
  find: () => Promise<string | undefined>
}): Promise<T> {
  const { http } = options
  let status: number | undefined
  try {
    const res = await options.send()
    status = res.status
    if (fromGateway(res.status)) throw http.gatewayAnswer(res)
    return options.use(res)
  } catch (err) {
    // Only a failure that proves the request never reached the service (refused, DNS, connect
    // timeout), or the service's own refusal, is passed on as it is. Before, only a timeout was
    // looked into, and then only transport errors: a connection lost after Gitea made the token
    // was `gitea_unreachable` alone, and a proxy's 504 page "refused to create", the token
    // unrecorded, its name taken.
    const unusable = status !== undefined && succeeded(status)
    if (!(err instanceof KeygateError) || !(mayHaveReached(err) || unusable)) throw err
    const label = SERVICE_LABEL[http.service]
    const { log } = options.deps
    let outcome: string
    try {
      const found = await options.find()
      if (found === undefined) {
        outcome = `no credential of that name without a record was found afterwards, but it may still be made: ${options.lookAgain}`
      } else {
        log.warn(`${label} holds an unrecorded credential named as the create whose answer never arrived`, { credential: options.what, remote_id: found })
        outcome = `${label} now holds one of that name that keygate has no record of (id ${found}): if this create made it (its secret never arrived), delete it with \`${options.deleteCommand(found)}\`; it may also have been made by hand or by another create at the same moment`
      }
    } catch (checkErr) {
      log.warn(`could not check whether ${label} made the credential whose create it did not answer`, { credential: options.what, err: checkErr as Error })
      outcome = `whether it was made could not be checked (${(checkErr as Error).message}): ${options.lookAgain}`
    }
    const attempt = isKeygateError(err, `${http.service}_timeout`) ? ` to create ${options.what}` : `: the request to create ${options.what} may have been carried out`
    throw new KeygateError(err.code, `${err.message}${attempt}; ${outcome}`, err.details, { cause: err })
  }
}
