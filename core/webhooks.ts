// Webhooks (SPEC §5): registered receivers of the domain events, signed per the Standard
// Webhooks convention. An event becomes one row per matching webhook in `webhook_deliveries`
// (so deliveries survive a restart); every process polls for due rows and claims them with
// `FOR UPDATE SKIP LOCKED`, moving `next_attempt_at` forward by a lease as it claims, so several
// instances never send one delivery twice and a process that dies mid-send leaves the row to be
// retried once its lease ends. A process keeps a pool of attempts in flight, claiming more as they
// end, with a few slots at most per webhook (a hanging receiver holds up no other). Failures are
// retried with exponential backoff up to `max_attempts`; every delivery keeps its attempts, last
// status and error (the delivery log). When a delivery is due, its lease and its backoff are
// read from and written by the store's clock (see storeClock), never by an instance's own.
//
// Signature: `webhook-signature: v1,<base64 HMAC-SHA256 of "<webhook-id>.<webhook-timestamp>.<body>">`
// with the key decoded from `whsec_<base64>`; after a secret rotation the previous secret signs
// too (a second `v1,` entry) for `secret_grace_hours`, so receivers can switch without a gap. A
// rotation within that grace keeps the secrets it has not ended signing too, each until the end
// its own rotation promised (at most MAX_PREVIOUS_SECRETS of them: one more is refused).
//
// Secrets at rest: sealed with the store's encryption keys (AuditCipher.sealSecret), bound to
// the webhook's id, in `sealed_secret` / `sealed_previous_secret` / `sealed_earlier_secrets` (the
// ones rotated out before the previous, still in their grace). A plaintext `secret` /
// `previous_secret` (a row from before migration 0007, or written by an instance not yet
// upgraded) is used while it is there; the scheduler's `webhook-secrets` job (tidySecrets) seals
// it, re-seals a secret sealed with a previous encryption key under the current one, and drops a
// previous secret once its grace has ended.
import { createHmac, randomBytes } from 'node:crypto'
import { hostname } from 'node:os'
import type { Agent } from 'undici'
import type { Config } from '../config/schema.ts'
import type { Actor, AuditCipher, AuditLog } from './audit.ts'
import { decodeCursor, pageOf, type Page } from './cursor.ts'
import { rowsOf, statementBatches, type Db, type Queryable } from './db.ts'
import { KeygateError } from './errors.ts'
import { refuseKeyIn, shownInput } from './validate.ts'
import type { EventBus, EventType, KeygateEvent } from './events.ts'
import type { KeyChange, KeyService } from './keys/service.ts'
import { keyJson } from './keys/types.ts'
import type { Logger } from './log.ts'
import { pruneBatch } from './scheduler.ts'
import { allowList, checkDeliveryUrl, checkTarget, pinnedAgent, refusedForAddress, webhookNames, WebhookNames, type AllowList, type LookupFunction } from './ssrf.ts'

export const TEST_EVENT = 'webhook.test'

/** What a webhook's id is (`wh_` and 12 random bytes in base64url, as create makes one), for the schemas that name one. */
export const WEBHOOK_ID_PATTERN = '^wh_[A-Za-z0-9_-]{16}$'
/** What a delivery's id is (`msg_` and a random UUID's 32 hex digits, as the inserts make one): the webhook-id header. */
export const DELIVERY_ID_PATTERN = '^msg_[0-9a-f]{32}$'

export interface Webhook {
  id: string
  url: string
  events: string[]
  description: string | null
  enabled: boolean
  createdBy: string
  createdAt: Date
  updatedAt: Date
  previousSecretUntil: Date | null
  /** When each secret rotated out and still kept stops signing, the most recently rotated first. */
  previousSecretsUntil: Date[]
}

export interface Delivery {
  id: string
  webhookId: string
  eventType: string
  payload: string
  status: 'pending' | 'delivered' | 'failed'
  attempts: number
  nextAttemptAt: Date
  lastStatus: number | null
  lastError: string | null
  createdAt: Date
  lastAttemptAt: Date | null
  deliveredAt: Date | null
}

export function webhookJson(w: Webhook) {
  return {
    id: w.id,
    url: w.url,
    events: w.events,
    description: w.description,
    enabled: w.enabled,
    created_by: w.createdBy,
    created_at: w.createdAt.toISOString(),
    updated_at: w.updatedAt.toISOString(),
    previous_secret_until: w.previousSecretUntil?.toISOString() ?? null,
    previous_secrets_until: w.previousSecretsUntil.map((d) => d.toISOString()),
  }
}

export function deliveryJson(d: Delivery) {
  return {
    id: d.id,
    webhook_id: d.webhookId,
    event_type: d.eventType,
    status: d.status,
    attempts: d.attempts,
    next_attempt_at: d.status === 'pending' ? d.nextAttemptAt.toISOString() : null,
    last_status: d.lastStatus,
    last_error: d.lastError,
    created_at: d.createdAt.toISOString(),
    last_attempt_at: d.lastAttemptAt?.toISOString() ?? null,
    delivered_at: d.deliveredAt?.toISOString() ?? null,
    payload: JSON.parse(d.payload) as unknown,
  }
}

/** A new signing secret: `whsec_` and 32 random bytes in base64. */
export function newSecret(): string {
  return `whsec_${randomBytes(32).toString('base64')}`
}

/** `v1,<signature>` of one message with one secret. */
export function sign(secret: string, id: string, timestamp: number, body: string): string {
  const key = Buffer.from(secret.slice('whsec_'.length), 'base64')
  return `v1,${createHmac('sha256', key).update(`${id}.${timestamp}.${body}`).digest('base64')}`
}

interface WebhookRow {
  id: string
  url: string
  events: string[]
  description: string | null
  enabled: boolean
  created_by: string
  created_at: Date
  updated_at: Date
  previous_secret_until: Date | null
  earlier_secrets_until: string[]
}

const W_COLUMNS = `id, url, events, description, enabled, created_by, created_at, updated_at, previous_secret_until,
  jsonb_path_query_array(sealed_earlier_secrets, '$[*].until') AS earlier_secrets_until`

const toWebhook = (r: WebhookRow): Webhook => ({
  id: r.id,
  url: r.url,
  events: r.events,
  description: r.description,
  enabled: r.enabled,
  createdBy: r.created_by,
  createdAt: new Date(r.created_at),
  updatedAt: new Date(r.updated_at),
  previousSecretUntil: r.previous_secret_until === null ? null : new Date(r.previous_secret_until),
  previousSecretsUntil: [...(r.previous_secret_until === null ? [] : [new Date(r.previous_secret_until)]), ...r.earlier_secrets_until.map((at) => new Date(at))],
})

interface DeliveryRow {
  id: string
  webhook_id: string
  event_type: string
  payload: string
  status: Delivery['status']
  attempts: number
  /** The attempts it had when it was last sent again (migration 0015): it gets max_attempts from there. */
  retry_base: number
  next_attempt_at: Date
  last_status: number | null
  last_error: string | null
  created_at: Date
  last_attempt_at: Date | null
  delivered_at: Date | null
}

const D_COLUMNS = 'id, webhook_id, event_type, payload, status, attempts, retry_base, next_attempt_at, last_status, last_error, created_at, last_attempt_at, delivered_at'
/** D_COLUMNS of the delivery as `d`, in a statement that reads another table beside it. */
const D_COLUMNS_OF_D = D_COLUMNS.split(', ').map((c) => `d.${c}`).join(', ')
/**
 * A delivery's created_at as the delivery log orders and pages it (see deliveries()): cut to the
 * milliseconds a cursor holds, in UTC so that the expression is immutable and migration 0013's
 * indexes on it serve the order.
 */
const CREATED_MS = "date_trunc('milliseconds', created_at AT TIME ZONE 'UTC')"
/** A time parameter compared with CREATED_MS. */
const createdMs = (n: number) => `($${n}::timestamptz AT TIME ZONE 'UTC')`
/** A webhook not deleted (a deleted one waits for its log to be removed: see purgeDeleted). */
const LIVE = 'deleted_at IS NULL'
/** A webhook, as `w`, whose deliveries are sent: enabled and not deleted. */
const SENDING = 'w.enabled AND w.deleted_at IS NULL'
/**
 * A delivery, as `d`, of an event its webhook, as `w`, takes (a test event always is): only such
 * a delivery is attempted. One of an event a PATCH removed from `events` is ended instead (see
 * notTaken).
 */
const taken = (events: string) => `(d.event_type = ANY (${events}) OR d.event_type = '${TEST_EVENT}')`
const TAKEN = taken('w.events')
/** The delivery log's error of a delivery ended because its webhook, as `w`, no longer takes its event, as `d`. */
const NOT_TAKEN_ERROR = `'webhook ' || w.id || ' no longer takes ' || d.event_type || ' (its events changed at ' || to_char(w.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') || '): no further attempt'`

const toDelivery = (r: DeliveryRow): Delivery => ({
  id: r.id,
  webhookId: r.webhook_id,
  eventType: r.event_type,
  payload: r.payload,
  status: r.status,
  attempts: r.attempts,
  nextAttemptAt: new Date(r.next_attempt_at),
  lastStatus: r.last_status,
  lastError: r.last_error,
  createdAt: new Date(r.created_at),
  lastAttemptAt: r.last_attempt_at === null ? null : new Date(r.last_attempt_at),
  deliveredAt: r.delivered_at === null ? null : new Date(r.delivered_at),
})

/** Why an attempt's outcome was not recorded: what the delivery, `now`, became since its claim `c`. */
function unrecorded(c: DeliveryRow, now: DeliveryRow | undefined): string {
  if (now === undefined) return 'the delivery was deleted with its webhook'
  if (now.retry_base !== c.retry_base) return 'the delivery was sent again meanwhile'
  if (now.attempts !== c.attempts) return 'another attempt took the delivery over (this one outlasted its lease)'
  return `the delivery is ${now.status} already`
}

/** A claimed delivery with what sending it needs. */
interface Claimed extends DeliveryRow, SecretColumns {
  url: string
  /** false: not to be sent, ended by the claim as its webhook no longer takes its event. */
  sends?: boolean
}

/** A webhook's secrets as stored: plaintext (before migration 0007) or sealed. */
interface SecretColumns {
  secret: string | null
  sealed_secret: string | null
  previous_secret: string | null
  sealed_previous_secret: string | null
  previous_secret_until: Date | null
  sealed_earlier_secrets: EarlierSecret[]
}

/** A secret rotated out before the previous one, sealed, and the end of its grace (RFC 3339). */
interface EarlierSecret {
  sealed: string
  until: string
}

const SECRET_COLUMNS = 'w.secret, w.sealed_secret, w.previous_secret, w.sealed_previous_secret, w.previous_secret_until, w.sealed_earlier_secrets'

/**
 * The most secrets rotated out that sign at once beside the current one: each rotation within
 * the grace of another adds one (a retried rotation whose answer was lost), and every one is an
 * HMAC of every delivery and an entry in its `webhook-signature`.
 */
export const MAX_PREVIOUS_SECRETS = 4

/** The same occurrence seen by several instances is one delivery per webhook. */
function dedupeKey(e: KeygateEvent): string | null {
  const d = e.data as Record<string, unknown>
  if (e.type === 'anomaly.detected') return `anomaly:${String(d.id)}`
  if (e.type === 'rate_limit.exceeded') return `rate_limit:${String(d.key_id)}:${String(d.window_start)}`
  return null
}

/**
 * How long a claimed delivery is left to its claimer beyond the attempt's own timeout (a claimer
 * that dies mid-attempt leaves it to another process after this). The lease always outlasts the
 * attempt: before, a timeout above 60 s let a second process send the same delivery again.
 */
const LEASE_MARGIN_MS = 60_000
/** Attempts a process keeps in flight: as one ends, another due delivery is claimed. */
const SLOTS = 20
/**
 * Of those, at most this many to one webhook: a receiver that hangs until `timeout_ms` holds
 * these and no more, and the others' deliveries go on through the rest.
 */
const PER_WEBHOOK = SLOTS / 4
/**
 * Beyond the pool, a webhook with no attempt in flight may start one when the pool is full, up to
 * this many such attempts at once: a webhook is never kept waiting by the others' slow receivers.
 * Before, found by a review, four receivers that never answer held all SLOTS (PER_WEBHOOK each)
 * until their timeouts, again and again while they had deliveries due, and every other webhook
 * got about one delivery each time a timeout freed a slot (99 revocations took a minute to reach a
 * healthy receiver with timeout_ms at 3 s; some 17 minutes with the default 10 s). Receivers that
 * never answer take one of these each beyond the four in the pool, so it takes SLOTS / PER_WEBHOOK +
 * EXTRA_SLOTS of them hanging at once to hold up the rest again.
 */
const EXTRA_SLOTS = 100

/**
 * The store's time in a statement, `$n` standing in for it when not null (a test's clock). A
 * delivery's times (queued, due, leased until, retried after, delivered) are all read and written
 * by this one clock, as the scheduler does with its deadlines. Before (found by a review), each
 * instance used its own: with clocks more than `timeout_ms` + 60 s apart, one instance saw
 * another's lease as already ended and sent the same delivery again while the first attempt was
 * still in flight (a receiver got one message id twice), an instance whose clock lagged wrote
 * leases and backoffs already past for everyone, and one whose clock ran ahead retried early and
 * queued deliveries that the others took only once their own clocks caught up.
 */
const storeClock = (n: number) => `coalesce($${n}::timestamptz, now())`

/** What a delivery refused for its address by this process's webhooks.allow_private adds to its error. */
const REFUSED_BY = `(refused by the keygate process on ${hostname()}, pid ${process.pid}: each process that delivers checks the address against its own webhooks.allow_private)`

/** An event's characters in a statement of enqueueMany besides its body (its type, dedupe key). */
const EVENT_ROW_CHARS = 100

export interface WebhookServiceOptions {
  db: Db
  /** Seals and opens the signing secrets (the runtime's encryption keys). */
  cipher: AuditCipher
  /** Registry changes write audit rows (the admin API's instance). */
  audit?: AuditLog
  config: Config['webhooks']
  log: Logger
  /**
   * This instance's own clock: the `webhook-timestamp` it signs, the times it stamps on webhooks
   * and their secrets' grace. When a delivery is due is never judged by it (see storeClock).
   */
  now?: () => Date
  /** Stands in for the store's clock, shared by every instance (tests move time with it). */
  storeNow?: () => Date
  /** false: only queue (a CLI process); the running servers deliver. */
  deliver?: boolean
  /**
   * Tests only: the name look-up (dns.lookup's shape), with slots of its own. By default the
   * process's shared, bounded look-ups of dns.lookup (webhookNames).
   */
  lookup?: LookupFunction
  /**
   * Told of each attempt once its outcome is known: delivered (2xx) or failed, and whether the
   * delivery ended failed with it (no further attempt). The process's metrics.
   */
  onAttempt?: (outcome: 'delivered' | 'failed', ended: boolean) => void
}

export class WebhookService {
  readonly #db: Db
  readonly #cipher: AuditCipher
  readonly #audit: AuditLog | undefined
  readonly #c: Config['webhooks']
  readonly #log: Logger
  readonly #now: () => Date
  /** The store's clock as a statement parameter: null is the store's own (storeClock). */
  readonly #storeNow: () => Date | null
  readonly #allowed: AllowList
  readonly #names: WebhookNames
  readonly #onAttempt: (outcome: 'delivered' | 'failed', ended: boolean) => void
  /** The HTTP client of the deliveries, made at the first: a process that only queues (the CLI's) never loads undici. */
  #client: Promise<{ request: typeof import('undici').request; agent: Agent }> | undefined
  #timer: NodeJS.Timeout | undefined
  #running: Promise<void> | undefined
  /** Something may have become claimable (a kick, an attempt ended) since the last claim. */
  #again = false
  /** Wakes the delivery loop while it waits for one of those. */
  #wake: (() => void) | undefined
  #closed = false
  /** The last round failed (the store out of reach): later failures are logged at debug only. */
  #failing = false

  constructor(options: WebhookServiceOptions) {
    this.#db = options.db
    this.#cipher = options.cipher
    this.#audit = options.audit
    this.#c = options.config
    this.#log = options.log
    this.#now = options.now ?? (() => new Date())
    this.#storeNow = options.storeNow ?? (() => null)
    this.#closed = options.deliver === false
    this.#allowed = allowList(options.config.allow_private)
    this.#names = options.lookup ? new WebhookNames(options.lookup) : webhookNames
    this.#onAttempt = options.onAttempt ?? (() => {})
  }

  // Registry

  /** Runs `fn` on webhook `id` and writes its audit row in one transaction; `fn` finding no webhook is webhook_not_found naming `id`. */
  async #audited<T extends WebhookRow | undefined>(id: string, actor: Actor, action: string, fn: (tx: Queryable) => Promise<T>, details: (row: WebhookRow) => Record<string, unknown>): Promise<Webhook> {
    const row = await this.#db.transaction(async (tx) => {
      const r = await fn(tx)
      if (r && this.#audit) await this.#audit.write(tx, actor, { action, details: details(r) })
      return r
    })
    // Named, as every other webhook operation names it (before, found by a review, DELETE and
    // rotate-secret said "no webhook has this id").
    if (!row) throw notFound(id)
    return toWebhook(row)
  }

  /**
   * What a registration or a change asks for, checked: no keygate key in the URL or the
   * description (the URL too: it is listed, audited and requested with every delivery; a receiver
   * knows keygate by its signature, not by a keygate key in its URL), and a URL that may be
   * reached (see checkTarget), as stored. The URL is checked as written and as the URL parser
   * reads it, which is what is stored and requested: it drops tabs and line breaks, so a key split
   * by one passed the first check, then was stored whole (found by a review). Both before the
   * name is looked up, which would send a key in the host name to DNS.
   */
  async #checked(input: { url?: string | undefined; description?: string | null | undefined }): Promise<string | undefined> {
    refuseKeyIn({ url: input.url, description: input.description })
    if (input.url === undefined) return undefined
    const parsed = URL.parse(input.url)
    if (parsed) refuseKeyIn({ url: parsed.href })
    return receiverUrl(await checkTarget(input.url, this.#allowed, this.#names, this.#c.timeout_ms))
  }

  /**
   * Refuses to have two live webhooks send one event to one URL (each delivery would be sent
   * twice). Registrations and changes of URL or events take a lock first, one at a time
   * (instances too), so that two at once cannot both miss the other.
   */
  async #refuseTwin(tx: Queryable, url: string, events: string[], self: string | null): Promise<void> {
    await tx.query('SELECT pg_advisory_xact_lock($1)', [WEBHOOK_CREATE_LOCK])
    const [twin] = await tx.query<{ id: string; events: string[] }>(
      `SELECT id, events FROM webhooks WHERE url = $1 AND events && $2 AND ${LIVE} AND id IS DISTINCT FROM $3 ORDER BY created_at, id LIMIT 1`,
      [url, events, self],
    )
    if (twin) {
      const both = twin.events.filter((e) => events.includes(e))
      throw new KeygateError('conflict', `webhook ${twin.id} already sends ${both.join(', ')} to ${url}: each event would be delivered twice; delete it first, or register the other events alone`)
    }
  }

  /** `enabled: false` registers it paused (before, found by a review: a create, then a PATCH). */
  async create(input: { url: string; events: string[]; description?: string | null; enabled?: boolean }, actor: Actor): Promise<{ webhook: Webhook; secret: string }> {
    const url = (await this.#checked(input)) as string
    const secret = newSecret()
    const id = `wh_${randomBytes(12).toString('base64url')}`
    const now = this.#now()
    const events = [...new Set(input.events)]
    const webhook = await this.#audited(
      id,
      actor,
      'webhook.created',
      async (tx) => {
        await this.#refuseTwin(tx, url, events, null)
        return (
          await tx.query<WebhookRow>(
            `INSERT INTO webhooks (id, url, events, description, sealed_secret, created_by, created_at, updated_at, enabled) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8) RETURNING ${W_COLUMNS}`,
            [id, url, events, input.description ?? null, this.#seal(id, secret), actor.actor, now, input.enabled ?? true],
          )
        )[0]
      },
      (r) => ({ id: r.id, url: r.url, events: r.events, ...(r.enabled ? {} : { enabled: false }) }),
    )
    return { webhook, secret }
  }

  async list(): Promise<Webhook[]> {
    return (await this.#db.query<WebhookRow>(`SELECT ${W_COLUMNS} FROM webhooks WHERE ${LIVE} ORDER BY created_at, id`)).map(toWebhook)
  }

  async get(id: string): Promise<Webhook> {
    const rows = await this.#db.query<WebhookRow>(`SELECT ${W_COLUMNS} FROM webhooks WHERE id = $1 AND ${LIVE}`, [id])
    if (!rows[0]) throw notFound(id)
    return toWebhook(rows[0])
  }

  /**
   * Changes the fields given. Only those whose value differs are a change: a body that restates
   * the webhook as it is answers it unchanged, with no audit row and no new updated_at. A URL
   * goes through the checks of a registration; a paused webhook (`enabled: false`) queues no new
   * deliveries and holds its pending ones, which are sent when it is enabled again.
   */
  async update(id: string, input: { url?: string; events?: string[]; enabled?: boolean; description?: string | null }, actor: Actor): Promise<Webhook> {
    const url = await this.#checked(input)
    const events = input.events === undefined ? undefined : [...new Set(input.events)]
    const now = this.#now()
    const { row, changed } = await this.#db.transaction(async (tx) => {
      // FOR NO KEY UPDATE: a key change queuing an event for this webhook (enqueue's FOR KEY
      // SHARE) does not wait for it.
      const [old] = await tx.query<WebhookRow>(`SELECT ${W_COLUMNS} FROM webhooks WHERE id = $1 AND ${LIVE} FOR NO KEY UPDATE`, [id])
      if (!old) throw notFound(id)
      const changes: Partial<Record<'url' | 'events' | 'enabled' | 'description', unknown>> = {}
      if (url !== undefined && url !== old.url) changes.url = url
      if (events !== undefined && (events.length !== old.events.length || events.some((e) => !old.events.includes(e)))) changes.events = events
      if (input.enabled !== undefined && input.enabled !== old.enabled) changes.enabled = input.enabled
      if (input.description !== undefined && input.description !== old.description) changes.description = input.description
      const fields = Object.keys(changes) as Array<keyof typeof changes>
      if (fields.length === 0) return { row: old, changed: fields }
      if (changes.url !== undefined || changes.events !== undefined) await this.#refuseTwin(tx, url ?? old.url, events ?? old.events, id)
      const params: unknown[] = [id, now]
      const sets = ['updated_at = $2']
      for (const f of fields) {
        params.push(changes[f])
        sets.push(`${f} = $${params.length}`)
      }
      const [row] = await tx.query<WebhookRow>(`UPDATE webhooks SET ${sets.join(', ')} WHERE id = $1 RETURNING ${W_COLUMNS}`, params)
      // The pending deliveries of the events it no longer takes are ended now, so that the log
      // says so at once (a paused webhook's too); one a transaction that read the webhook before
      // this commits queues meanwhile is ended by the claim that finds it due (see #claim).
      const ended = changes.events === undefined ? [] : await tx.query(
        `UPDATE webhook_deliveries d SET status = 'failed', last_error = ${NOT_TAKEN_ERROR}
         FROM webhooks w WHERE w.id = $1 AND d.webhook_id = w.id AND d.status = 'pending' AND NOT ${TAKEN} RETURNING d.id`,
        [id],
      )
      const endedNote = ended.length > 0 ? { deliveries_ended: ended.length } : {}
      if (this.#audit) await this.#audit.write(tx, actor, { action: 'webhook.updated', details: { id, changed: fields, ...changes, ...endedNote } })
      return { row: row as WebhookRow, changed: fields }
    })
    // Enabled again: what it held is due.
    if (changed.includes('enabled') && row.enabled) this.kick()
    return toWebhook(row)
  }

  /**
   * Deletes the webhook: one small statement marks it, and from its commit on the webhook is not
   * listed or found, queues nothing, and nothing of it is claimed or sent (its pending deliveries
   * are dropped). Its delivery log is removed afterwards, in batches, by purgeDeleted (the
   * scheduler), however long it is. Before, found by a review, one DELETE cascaded through the
   * whole log: with 2,000,000 rows it ran past store.query_timeout_ms on every try and was rolled
   * back, and each try held the webhook's row lock, which enqueue's FOR KEY SHARE waits for, so
   * a key revocation whose event the webhook takes waited 4.6 s behind it. The mark changes no
   * column a foreign key uses: enqueue neither waits for it nor holds it up. `enabled` goes false
   * too, so instances of the release before this one, which know no deleted_at, queue nothing more.
   */
  async remove(id: string, actor: Actor): Promise<Webhook> {
    return this.#audited(
      id,
      actor,
      'webhook.deleted',
      async (tx) => (await tx.query<WebhookRow>(`UPDATE webhooks SET deleted_at = now(), enabled = false, updated_at = $2 WHERE id = $1 AND ${LIVE} RETURNING ${W_COLUMNS}`, [id, this.#now()]))[0],
      (r) => ({ id: r.id, url: r.url }),
    )
  }

  /**
   * Removes what deleted webhooks left (a scheduler job): their deliveries, pruneBatch to a
   * statement, each its own transaction as the scheduler's prunes are (each well within
   * store.query_timeout_ms, none holding a lock for long), then the webhook's row, whose cascade
   * takes the few a key change queued while the webhook was being deleted. Ends after the
   * statement it is on once `stopping` says so; the next round goes on from there, after a
   * restart too. Returns the rows removed.
   */
  async purgeDeleted(stopping: () => boolean = () => false): Promise<number> {
    const deleted = await this.#db.query<{ id: string }>('SELECT id FROM webhooks WHERE deleted_at IS NOT NULL ORDER BY deleted_at, id')
    const batch = pruneBatch(this.#db.kind)
    let total = 0
    for (const { id } of deleted) {
      for (;;) {
        if (stopping()) return total
        const [gone] = await this.#db.query<{ n: number }>(
          `WITH gone AS (DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries WHERE webhook_id = $1 LIMIT $2) RETURNING 1) SELECT count(*)::int AS n FROM gone`,
          [id, batch],
        )
        const n = gone?.n ?? 0
        total += n
        if (n < batch) break
      }
      total += (await this.#db.query('DELETE FROM webhooks WHERE id = $1 AND deleted_at IS NOT NULL RETURNING 1', [id])).length
    }
    return total
  }

  /**
   * A new secret; the current one keeps signing (a second signature) for `secret_grace_hours`.
   * The secrets earlier rotations put in their grace keep signing until the end each answer gave:
   * before (found by a review), the one slot for a previous secret was moved on, and a rotation
   * retried after a lost answer cut off at once the receiver still on the original. More than
   * MAX_PREVIOUS_SECRETS in their grace is a conflict, not a promise broken.
   */
  async rotateSecret(id: string, actor: Actor): Promise<{ webhook: Webhook; secret: string }> {
    const secret = newSecret()
    const now = this.#now()
    const until = new Date(now.getTime() + this.#c.secret_grace_hours * 3_600_000)
    const webhook = await this.#audited(
      id,
      actor,
      'webhook.secret_rotated',
      async (tx) => {
        const [row] = await tx.query<SecretColumns>(`SELECT ${SECRET_COLUMNS} FROM webhooks w WHERE w.id = $1 AND w.${LIVE} FOR UPDATE`, [id])
        if (!row) return undefined
        const kept = this.#stillSigning(id, row, now)
        if (kept.length >= MAX_PREVIOUS_SECRETS) {
          const first = kept.map((e) => e.until).sort()[0] as string
          throw new KeygateError(
            'conflict',
            `webhook ${id} already has ${kept.length} previous secrets signing within the grace their rotations promised, the most it keeps; another rotation would end one early: rotate again after ${first}, when the first of them ends`,
          )
        }
        return (
          await tx.query<WebhookRow>(
            `UPDATE webhooks SET previous_secret = secret, sealed_previous_secret = sealed_secret, previous_secret_until = $3,
               secret = NULL, sealed_secret = $2, sealed_earlier_secrets = $5::jsonb, updated_at = $4 WHERE id = $1 AND ${LIVE} RETURNING ${W_COLUMNS}`,
            [id, this.#seal(id, secret), until, now, JSON.stringify(kept)],
          )
        )[0]
      },
      (r) => ({ id: r.id, previous_secret_until: until.toISOString(), previous_secrets_until: webhookJson(toWebhook(r)).previous_secrets_until }),
    )
    return { webhook, secret }
  }

  /** The previous and earlier secrets of a webhook still in their grace at `now`, sealed, the most recently rotated first. */
  #stillSigning(webhookId: string, row: SecretColumns, now: Date): EarlierSecret[] {
    const kept: EarlierSecret[] = []
    if (row.previous_secret_until !== null && new Date(row.previous_secret_until) > now) {
      const sealed = row.previous_secret !== null ? this.#seal(webhookId, row.previous_secret) : row.sealed_previous_secret
      if (sealed !== null) kept.push({ sealed, until: new Date(row.previous_secret_until).toISOString() })
    }
    return [...kept, ...row.sealed_earlier_secrets.filter((e) => new Date(e.until) > now)]
  }

  #seal(webhookId: string, secret: string): string {
    return this.#cipher.sealSecret(secretContext(webhookId), secret)
  }

  #open(webhookId: string, sealed: string, which: 'secret' | 'previous secret'): string {
    return this.#cipher.openSecret(secretContext(webhookId), sealed, `the ${which} of webhook ${webhookId}`)
  }

  /** The secrets that sign a delivery now: the current one, and the previous and earlier ones within their grace. */
  #signingSecrets(c: Claimed, now: Date): string[] {
    const current = c.secret ?? this.#open(c.webhook_id, c.sealed_secret as string, 'secret')
    const inGrace = c.previous_secret_until !== null && new Date(c.previous_secret_until) > now
    const previous = !inGrace ? null : (c.previous_secret ?? (c.sealed_previous_secret === null ? null : this.#open(c.webhook_id, c.sealed_previous_secret, 'previous secret')))
    const earlier = c.sealed_earlier_secrets.filter((e) => new Date(e.until) > now).map((e) => this.#open(c.webhook_id, e.sealed, 'previous secret'))
    return [current, ...(previous === null ? [] : [previous]), ...earlier]
  }

  /**
   * Upkeep of the stored secrets (a scheduler job): drops each previous (and earlier) secret whose
   * grace has ended, seals what is still plaintext, and re-seals what a previous encryption key sealed
   * under the current one (so that key can be retired). Each row is written only if it has not
   * changed since it was read (a rotation meanwhile wins). Returns the rows changed.
   */
  async tidySecrets(now: Date): Promise<number> {
    const cleared = await this.#db.query<{ id: string }>(
      `UPDATE webhooks SET previous_secret = NULL, sealed_previous_secret = NULL, previous_secret_until = NULL
       WHERE previous_secret_until <= $1 RETURNING id`,
      [now],
    )
    const current = this.#cipher.currentKeyId
    const rows = await this.#db.query<SecretColumns & { id: string }>(
      `SELECT w.id, ${SECRET_COLUMNS} FROM webhooks w
       WHERE w.secret IS NOT NULL OR w.previous_secret IS NOT NULL
          OR split_part(w.sealed_secret, '.', 1) <> $1 OR split_part(w.sealed_previous_secret, '.', 1) <> $1
          OR EXISTS (SELECT 1 FROM jsonb_array_elements(w.sealed_earlier_secrets) e WHERE (e->>'until')::timestamptz <= $2 OR split_part(e->>'sealed', '.', 1) <> $1)`,
      [current, now],
    )
    const changed = new Set(cleared.map((r) => r.id))
    const unreadable: string[] = []
    for (const r of rows) {
      const reseal = (plain: string | null, sealed: string | null, which: 'secret' | 'previous secret'): string | null => {
        if (plain !== null) return this.#seal(r.id, plain)
        if (sealed === null || sealed.startsWith(`${current}.`)) return sealed
        return this.#seal(r.id, this.#open(r.id, sealed, which))
      }
      let next: [string | null, string | null, string]
      try {
        // An earlier secret whose grace has ended is dropped unopened.
        const earlier = r.sealed_earlier_secrets.filter((e) => new Date(e.until) > now).map((e) => ({ sealed: reseal(null, e.sealed, 'previous secret') as string, until: e.until }))
        next = [reseal(r.secret, r.sealed_secret, 'secret'), reseal(r.previous_secret, r.sealed_previous_secret, 'previous secret'), JSON.stringify(earlier)]
      } catch (err) {
        unreadable.push(`${r.id}: ${(err as Error).message}`)
        continue
      }
      const updated = await this.#db.query<{ id: string }>(
        `UPDATE webhooks SET secret = NULL, previous_secret = NULL, sealed_secret = $2, sealed_previous_secret = $3, sealed_earlier_secrets = $4::jsonb
         WHERE id = $1 AND secret IS NOT DISTINCT FROM $5 AND previous_secret IS NOT DISTINCT FROM $6
           AND sealed_secret IS NOT DISTINCT FROM $7 AND sealed_previous_secret IS NOT DISTINCT FROM $8 AND sealed_earlier_secrets = $9::jsonb RETURNING id`,
        [r.id, ...next, r.secret, r.previous_secret, r.sealed_secret, r.sealed_previous_secret, JSON.stringify(r.sealed_earlier_secrets)],
      )
      for (const u of updated) changed.add(u.id)
    }
    if (unreadable.length > 0) this.#log.warn('webhook secrets that cannot be opened stay as they are; their deliveries fail until the key is configured', { webhooks: unreadable })
    return changed.size
  }

  /**
   * The delivery log of a webhook, newest first, one page at a time (`cursor`: the previous
   * page's next cursor). By created_at cut to milliseconds, then id: created_at is the store's
   * now(), in microseconds, and a cursor holds a JS time: walked by the full value, the rows in
   * the cursor's millisecond would be listed again or skipped. Migration 0013's indexes serve
   * this order, with and without a status: before, a page sorted the webhook's whole log, and
   * `status=failed` on a log of 2,000,000 rows took 3.7 s or ran past store.query_timeout_ms.
   */
  async deliveries(id: string, options: { limit: number; status?: Delivery['status']; cursor?: string }): Promise<Page<Delivery>> {
    await this.get(id)
    const params: unknown[] = [id, options.limit + 1]
    const where = ['webhook_id = $1']
    if (options.status) {
      params.push(options.status)
      where.push(`status = $${params.length}`)
    }
    if (options.cursor !== undefined) {
      const { at, id: after } = decodeCursor('deliveries', options.cursor)
      params.push(at, after)
      where.push(`(${CREATED_MS}, id) < (${createdMs(params.length - 1)}, $${params.length})`)
    }
    const rows = await this.#db.query<DeliveryRow>(
      `SELECT ${D_COLUMNS} FROM webhook_deliveries WHERE ${where.join(' AND ')} ORDER BY ${CREATED_MS} DESC, id DESC LIMIT $2`,
      params,
    )
    return pageOf('deliveries', rows.map(toDelivery), options.limit, (d) => ({ at: d.createdAt, id: d.id }))
  }

  /**
   * Sends one failed delivery again: it becomes pending, due now, with `max_attempts` more
   * attempts (counted from retry_base; `attempts` only grows) and its webhook-id kept, so a receiver that did take it after all
   * drops it as a repeat (Standard Webhooks). 404 `delivery_not_found` when the webhook has no such
   * delivery; 409 `conflict` when it is pending or was delivered. A paused webhook holds it until
   * enabled. An admin action: audited as `webhook.deliveries_retried`.
   */
  async retryDelivery(id: string, deliveryId: string, actor: Actor): Promise<Delivery> {
    // The delivery sent again, or, when it was not failed, what it is now.
    const attempt = async () => {
      const [retried] = await this.#requeue<DeliveryRow>(id, actor, 'id = $3', [deliveryId], { due: storeClock(2), returning: D_COLUMNS }, { delivery_id: deliveryId })
      return retried ? { retried } : { current: (await this.#db.query<DeliveryRow>(`SELECT ${D_COLUMNS} FROM webhook_deliveries WHERE id = $1 AND webhook_id = $2`, [deliveryId, id]))[0] }
    }
    let outcome = await attempt()
    // Pending on its last attempt when asked, failed by the time it was read: asked once more.
    if (outcome.current?.status === 'failed') outcome = await attempt()
    if (outcome.retried) return toDelivery(outcome.retried)
    const current = outcome.current
    if (!current) throw new KeygateError('delivery_not_found', `webhook ${id} has no delivery with the id ${JSON.stringify(shownInput(deliveryId))}`)
    const d = toDelivery(current)
    throw new KeygateError(
      'conflict',
      d.status === 'pending'
        ? `delivery ${d.id} is pending: its next attempt is at ${d.nextAttemptAt.toISOString()}; only a failed delivery is sent again`
        : d.status === 'failed'
          ? `delivery ${d.id} is of ${d.eventType}, which webhook ${id} no longer takes; add the event to its events to send it again`
          : `delivery ${d.id} was delivered at ${d.deliveredAt?.toISOString() ?? 'an unknown time'}; only a failed delivery is sent again`,
    )
  }

  /**
   * Sends again, as retryDelivery does, every failed delivery the webhook queued in [from, to):
   * what a receiver missed in an outage longer than the retries. Returns how many.
   */
  async retryFailed(id: string, range: { from: Date; to: Date }, actor: Actor): Promise<number> {
    // Due since they were made: sent oldest first (the claim takes the earliest due), where the
    // store's now for all of them would send them in the order of their random ids.
    // By the millisecond, as migration 0013's index on (webhook_id, status, that) has it: the same
    // rows as created_at itself for the millisecond bounds a JS time gives.
    const retried = await this.#requeue<{ id: string }>(id, actor, `${CREATED_MS} >= ${createdMs(3)} AND ${CREATED_MS} < ${createdMs(4)}`, [range.from, range.to], { due: `least(created_at, ${storeClock(2)})`, returning: 'id' }, {
      from: range.from.toISOString(),
      to: range.to.toISOString(),
    })
    return retried.length
  }

  /**
   * The failed deliveries of a live webhook that `where` picks, of the events it takes, pending
   * again and due (at `sql.due`, now or before), with their audit row; sending starts at once.
   */
  async #requeue<R>(id: string, actor: Actor, where: string, params: unknown[], sql: { due: string; returning: string }, details: Record<string, unknown>): Promise<R[]> {
    const rows = await this.#db.transaction(async (tx) => {
      // FOR SHARE: a deletion waits for this (FOR KEY SHARE would not hold its UPDATE back), so no
      // delivery is made pending for a webhook deleted meanwhile, nor for an event removed meanwhile.
      const [live] = await tx.query<{ events: string[] }>(`SELECT events FROM webhooks WHERE id = $1 AND ${LIVE} FOR SHARE`, [id])
      if (!live) throw notFound(id)
      const out = await tx.query<R>(
        `UPDATE webhook_deliveries d SET status = 'pending', retry_base = attempts, next_attempt_at = ${sql.due}
         WHERE webhook_id = $1 AND status = 'failed' AND ${taken(`$${params.length + 3}::text[]`)} AND ${where} RETURNING ${sql.returning}`,
        [id, this.#storeNow(), ...params, live.events],
      )
      if (out.length > 0 && this.#audit) await this.#audit.write(tx, actor, { action: 'webhook.deliveries_retried', details: { id, ...details, retried: out.length } })
      return out
    })
    if (rows.length > 0) this.kick()
    return rows
  }

  // Queue

  /**
   * One delivery per enabled (and not deleted) webhook that takes `event.type`, written with `q`: the store, where
   * sending starts at once, or the transaction of the change the event tells of (see
   * EventBus.stage), whose rows are sent once it has committed and the event is published. The
   * webhooks are locked against deletion (FOR KEY SHARE) while the rows are written: without it,
   * a webhook being deleted by another transaction was still seen, its delivery's foreign key
   * then failed when the delete committed, and the statement with it: the event was lost for
   * every webhook, and a key change queuing it failed (a revocation answered 500, the key still
   * active). Now the insert waits for the delete and skips the webhook it removed.
   */
  async enqueue(event: KeygateEvent, q?: Queryable): Promise<number> {
    return this.enqueueMany([event], q)
  }

  /**
   * Queues the deliveries of `events` for every sending webhook that takes them, in statements of
   * at most STATEMENT_MAX_ROWS deliveries (statementBatches, each event weighed by the webhooks
   * that take its type: a statement of 1,000 events for 40 webhooks took 2.3 s on the embedded
   * store, found by a review); gives the deliveries queued. Events of one call that share a
   * dedupe key are queued once, the first of them (as one call an event used to be). Without `q`,
   * all or none are queued.
   */
  async enqueueMany(events: readonly KeygateEvent[], q?: Queryable): Promise<number> {
    const seen = new Set<string>()
    const rows: Array<{ type: EventType; body: string; dedupe: string | null }> = []
    for (const e of events) {
      const dedupe = dedupeKey(e)
      if (dedupe !== null) {
        if (seen.has(dedupe)) continue
        seen.add(dedupe)
      }
      rows.push({ type: e.type, body: JSON.stringify({ type: e.type, timestamp: e.at.toISOString(), data: e.data }), dedupe })
    }
    if (rows.length === 0) return 0
    const write = async (tx: Queryable): Promise<number> => {
      // How many sending webhooks take each type, to weigh the events by: one event is one
      // statement whatever it is, and needs no look-up.
      const takers = new Map<string, number>()
      if (rows.length > 1) {
        for (const w of await tx.query<{ events: string[] }>(`SELECT w.events FROM webhooks w WHERE ${SENDING}`)) {
          for (const type of new Set(w.events)) takers.set(type, (takers.get(type) ?? 0) + 1)
        }
      }
      const fanOut = (r: (typeof rows)[number]) => Math.max(1, takers.get(r.type) ?? 0)
      let queued = 0
      for (const batch of statementBatches(rows, (r) => (r.body.length + EVENT_ROW_CHARS) * fanOut(r), fanOut)) {
        const batchRows = rowsOf([['type', 'text', batch.map((r) => r.type)], ['payload', 'text', batch.map((r) => r.body)], ['dedupe', 'text', batch.map((r) => r.dedupe)]])
        const made = await tx.query<{ id: string }>(
          `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, dedupe_key, next_attempt_at, created_at)
           SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), w.id, e.type, e.payload, e.dedupe, ${storeClock(4)}, ${storeClock(4)}
           FROM ${batchRows.as('e')} JOIN webhooks w ON e.type = ANY (w.events)
           WHERE ${SENDING}
           FOR KEY SHARE OF w
           ON CONFLICT (webhook_id, dedupe_key) DO NOTHING RETURNING id`,
          [...batchRows.params, this.#storeNow()],
        )
        queued += made.length
      }
      return queued
    }
    if (q !== undefined) return write(q)
    const queued = rows.length === 1 ? await write(this.#db) : await this.#db.transaction(write)
    if (queued > 0) this.kick()
    return queued
  }

  /**
   * Queues every event of `events` (returns the unsubscriber): a staged event in the transaction
   * of its change, the others as they are emitted (never on the request path: the gateway's emit
   * is a synchronous call whose insert runs afterwards). `queued` gets each insert of the latter
   * (a short-lived process waits for them before it exits).
   */
  bind(events: EventBus, queued?: (insert: Promise<unknown>) => void): () => void {
    const offStage = events.onStage(async (q, staged) => {
      await this.enqueueMany(staged, q)
    })
    const off = events.on((e) => {
      if (e.staged) return this.kick()
      const insert = this.enqueue(e).catch((err: unknown) => this.#log.error('could not queue webhook deliveries; the event is lost for webhooks', { event: e.type, err: err as Error }))
      queued?.(insert)
    })
    return () => {
      offStage()
      off()
    }
  }

  // Delivery

  /** Polls for due deliveries every `poll_interval_ms`. */
  start(): void {
    if (this.#timer || this.#closed) return
    this.#timer = setInterval(() => this.kick(), this.#c.poll_interval_ms)
    this.#timer.unref()
    this.kick()
  }

  /** Sends what is due now (the running round claims again, when one is running). */
  kick(): void {
    if (this.#closed) return
    if (this.#running) {
      this.#again = true
      this.#wake?.()
      return
    }
    this.#running = this.#drain()
      .then(() => {
        if (this.#failing) this.#log.info('webhook delivery rounds reach the store again')
        this.#failing = false
      })
      .catch((err: unknown) => {
        // Once per outage at warn (before, found by a review: a line every poll_interval_ms, some
        // 3,600 an hour of a store outage in every process), as the store check logs its own.
        if (this.#failing) this.#log.debug('webhook delivery round failed', { err: err as Error })
        else this.#log.warn('webhook delivery round failed; rounds go on every poll_interval_ms, and the log says when one succeeds again', { err: err as Error })
        this.#failing = true
      })
      .finally(() => {
        this.#running = undefined
        if (this.#again) {
          this.#again = false
          this.kick()
        }
      })
  }

  /** Resolves once no round is running (tests, shutdown). */
  async idle(): Promise<void> {
    while (this.#running) await this.#running
  }

  /**
   * A round: a pool of up to SLOTS attempts, PER_WEBHOOK of them to one webhook, and, while the
   * pool is full, up to EXTRA_SLOTS more, one to each webhook with nothing in flight. It claims as
   * slots free (each attempt starts as soon as it is claimed, so its lease covers it) and ends
   * when nothing is in flight and nothing more could be claimed; once closed, it only waits for
   * the attempts in flight.
   */
  async #drain(): Promise<void> {
    const perWebhook = new Map<string, number>()
    let pooled = 0
    let extra = 0
    let failure: unknown
    for (;;) {
      this.#again = false
      const inPool = pooled < SLOTS
      if (!this.#closed && failure === undefined && (inPool || extra < EXTRA_SLOTS)) {
        let claimed: Claimed[] = []
        try {
          // The pool while it has room; else one attempt to each webhook that has none in flight.
          claimed = inPool ? await this.#claim(SLOTS - pooled, perWebhook, PER_WEBHOOK) : await this.#claim(EXTRA_SLOTS - extra, perWebhook, 1)
        } catch (err) {
          failure = err // no more claims this round; the attempts in flight are still waited for
        }
        for (const c of claimed) {
          if (c.sends === false) continue
          if (inPool) pooled++
          else extra++
          perWebhook.set(c.webhook_id, (perWebhook.get(c.webhook_id) ?? 0) + 1)
          void this.#attempt(c)
            .catch((err: unknown) => this.#log.warn('could not record a webhook delivery attempt; it is retried when its lease ends', { delivery_id: c.id, err: err as Error }))
            .finally(() => {
              if (inPool) pooled--
              else extra--
              const left = (perWebhook.get(c.webhook_id) ?? 1) - 1
              if (left === 0) perWebhook.delete(c.webhook_id)
              else perWebhook.set(c.webhook_id, left)
              this.#again = true
              this.#wake?.()
            })
        }
        // More may be due than one claim took (it takes at most PER_WEBHOOK of a webhook's), or,
        // the pool now full, for a webhook with nothing in flight.
        if (claimed.length > 0) continue
      }
      if (pooled + extra === 0 && (this.#closed || failure !== undefined || !this.#again)) break
      if (!this.#again) {
        await new Promise<void>((resolve) => (this.#wake = resolve))
        this.#wake = undefined
      }
    }
    if (failure !== undefined) throw failure
  }

  /**
   * Claims up to `slots` due deliveries, oldest due first, at most `cap` less its attempts
   * in flight (`perWebhook`) of one webhook. The fair share is picked from the due rows first
   * (a window function cannot be used with FOR UPDATE), then locked; a row another process
   * claimed meanwhile is skipped or, already moved past `now`, no longer matches. `now` is the
   * store's time, read once with the look-up for due rows (see storeClock). Due rows are looked
   * up webhook by webhook, of the enabled ones that are not deleted (an index on a webhook's
   * pending rows, migration 0013): a paused webhook holds its pending deliveries, a deleted one
   * waits for purgeDeleted, and neither's rows are read at every poll. A due row of an event its
   * webhook no longer takes (queued by a transaction that read the webhook before a PATCH of its
   * events committed) is not claimed but ended, failed with the reason and its attempts as they
   * were, and returned with `sends: false`.
   */
  async #claim(slots: number, perWebhook: ReadonlyMap<string, number>, cap: number): Promise<Claimed[]> {
    const full = [...perWebhook].filter(([, n]) => n >= cap).map(([id]) => id)
    // Most polls find nothing due: a plain index look-up answers that far more cheaply than the
    // claiming statement (which matters on the embedded store, where every statement is costly).
    // The store's time goes back to the claim as the store wrote it (text, to the microsecond):
    // as a JS Date it was cut to the millisecond, so a delivery queued within the probe's
    // millisecond was due by the probe and not by the claim, and waited a poll (found when a test
    // claiming right after queuing failed now and then).
    const [probe] = await this.#db.query<{ now: string; due: boolean }>(
      `SELECT ${storeClock(1)}::text AS now, EXISTS (
         SELECT 1 FROM webhooks w WHERE ${SENDING} AND w.id <> ALL ($2::text[]) AND EXISTS (
           SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'pending' AND d.next_attempt_at <= ${storeClock(1)})
       ) AS due`,
      [this.#storeNow(), full],
    )
    if (!probe?.due) return []
    return this.#db.query<Claimed>(
      `WITH busy (webhook_id, n) AS (
         SELECT * FROM unnest($4::text[], $5::int[])
       ), candidates AS (
         SELECT d.id, d.webhook_id, d.next_attempt_at FROM webhooks w CROSS JOIN LATERAL (
           SELECT id, webhook_id, next_attempt_at FROM webhook_deliveries
           WHERE webhook_id = w.id AND status = 'pending' AND next_attempt_at <= $1::timestamptz
           ORDER BY next_attempt_at LIMIT $7
         ) d
         WHERE ${SENDING} AND w.id <> ALL ($6::text[])
         ORDER BY d.next_attempt_at LIMIT $3
       ), fair AS (
         SELECT r.id FROM (
           SELECT id, webhook_id, row_number() OVER (PARTITION BY webhook_id ORDER BY next_attempt_at, id) AS rank FROM candidates
         ) r LEFT JOIN busy b ON b.webhook_id = r.webhook_id
         WHERE r.rank <= $7 - coalesce(b.n, 0)
       ), due AS (
         SELECT d.id, ${TAKEN} AS taken, ${NOT_TAKEN_ERROR} AS not_taken FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
         WHERE d.id IN (SELECT id FROM fair) AND d.status = 'pending' AND d.next_attempt_at <= $1::timestamptz
         FOR UPDATE OF d SKIP LOCKED
       ), claimed AS (
         UPDATE webhook_deliveries d SET next_attempt_at = $1::timestamptz + $2::float8 * interval '1 millisecond', attempts = d.attempts + 1, last_attempt_at = $1::timestamptz
         FROM due WHERE d.id = due.id AND due.taken RETURNING d.*, true AS sends
       ), ended AS (
         UPDATE webhook_deliveries d SET status = 'failed', last_error = due.not_taken
         FROM due WHERE d.id = due.id AND NOT due.taken RETURNING d.*, false AS sends
       )
       SELECT c.*, w.url, ${SECRET_COLUMNS} FROM (SELECT * FROM claimed UNION ALL SELECT * FROM ended) c JOIN webhooks w ON w.id = c.webhook_id`,
      [probe.now, this.#leaseMs, slots, [...perWebhook.keys()], [...perWebhook.values()], full, cap],
    )
  }

  /** How long a claimed delivery is its claimer's: past the attempt's own timeout. */
  get #leaseMs(): number {
    return this.#c.timeout_ms + LEASE_MARGIN_MS
  }

  /** One attempt; records its outcome and, on failure, when to try again. */
  async #attempt(c: Claimed): Promise<Delivery> {
    const began = performance.now()
    const now = this.#now()
    const timestamp = Math.floor(now.getTime() / 1000)
    let status: number | null = null
    let error: string | null = null
    // What a 429 or 503 asked for (Retry-After), in ms: the retry waits at least that long.
    let asked = 0
    // Started as the request is made, as it was (not before the first attempt loads undici).
    let deadline: AbortSignal | undefined
    try {
      const signatures = this.#signingSecrets(c, now).map((secret) => sign(secret, c.id, timestamp, c.payload))
      checkDeliveryUrl(c.url, this.#allowed)
      const { request, agent } = await (this.#client ??= Promise.all([import('undici'), pinnedAgent(this.#allowed, this.#c.timeout_ms, this.#names)]).then(([{ request }, agent]) => ({ request, agent })))
      deadline = AbortSignal.timeout(this.#c.timeout_ms)
      const res = await request(c.url, {
        method: 'POST',
        dispatcher: agent,
        headers: {
          'content-type': 'application/json',
          'user-agent': 'keygate-webhooks',
          'webhook-id': c.id,
          'webhook-timestamp': String(timestamp),
          'webhook-signature': signatures.join(' '),
        },
        body: c.payload,
        signal: deadline,
      })
      status = res.statusCode
      await res.body.dump()
      if (status >= 300 && status < 400) error = `the receiver answered ${status}; redirects are not followed`
      else if (status < 200 || status >= 300) {
        asked = status === 429 || status === 503 ? retryAfterMs(res.headers['retry-after'], this.#now()) : 0
        error = `the receiver answered ${status}${asked > 0 ? ` (Retry-After: ${Math.ceil(asked / 1000)} s)` : ''}`
      }
    } catch (err) {
      const e = err as NodeJS.ErrnoException & { cause?: NodeJS.ErrnoException }
      // The wait in keygate's words: the abort's own were "The operation was aborted due to
      // timeout", naming neither the wait nor the setting (found by a docs walk).
      error = deadline?.aborted ? `the receiver did not answer within ${this.#c.timeout_ms} ms (webhooks.timeout_ms)` : (e.cause?.message ?? e.message).slice(0, 500)
      // The allow-list is each process's own: the log says which process refused, so that one
      // whose list differs from the others' is found (see README, Many instances).
      if (refusedForAddress(err)) error += ` ${REFUSED_BY}`
    }
    const done = this.#storeNow()
    // Only while this attempt is still the delivery's latest (its claim's attempt count, not
    // delivered): an outcome that arrives after another process took the delivery over (this
    // process was frozen past the lease) must not undo that process's. Failed with the attempt
    // count of its claim, it was ended by a PATCH of its webhook's events while in flight: the
    // outcome is still this attempt's, and a receiver that took it got it.
    const mine = "d.id = $1 AND d.attempts = $2 AND d.status <> 'delivered'"
    const fields = { delivery_id: c.id, webhook_id: c.webhook_id, attempt: c.attempts, error }
    let rows: (DeliveryRow & { ended?: string | null; paused?: boolean | null })[]
    try {
      if (error === null) {
        rows = await this.#db.query<DeliveryRow>(
          `UPDATE webhook_deliveries d SET status = 'delivered', delivered_at = ${storeClock(3)}, last_status = $4, last_error = NULL WHERE ${mine} RETURNING ${D_COLUMNS}`,
          [c.id, c.attempts, done, status],
        )
      } else {
        // Counted since the delivery was last sent again (0 for one never sent again).
        const made = c.attempts - c.retry_base
        const failed = made >= this.#c.max_attempts
        // The backoff, or longer when the receiver asked for longer (Retry-After), never past
        // retry_max_ms. Before (found by a review), Retry-After was not read: a receiver that
        // answered `429` with `Retry-After: 120` got the next attempts 5, 10, 20 and 40 s later.
        const wait = Math.min(Math.max(this.#c.retry_base_ms * 2 ** (made - 1), asked), this.#c.retry_max_ms)
        // Its webhook deleted meanwhile, or no longer taking its event: failed, as nothing will try it
        // again. Ended meanwhile (failed), it stays so, though its event be taken again before the
        // answer: before (found by a review), the event removed and added back while the receiver
        // answered, it was made pending and retried, where the others the PATCH ended were not.
        // Sent again since (retry_base moved), the failure is not this attempt's to record: it
        // undid the resend (failed on what was the last attempt, else due later).
        // `ended` says why a row ended failed other than by its attempts, for the log.
        // The webhook's row read once, joined (a delivery's row always has one: its foreign key
        // cascades a webhook's removal to its deliveries). Before (found by a review), three
        // subqueries read it, for the status and for each of `ended` and `paused`.
        rows = await this.#db.query<DeliveryRow & { ended: string | null; paused: boolean | null }>(
          `UPDATE webhook_deliveries d SET next_attempt_at = ${storeClock(7)} + $4::float8 * interval '1 millisecond', last_status = $5, last_error = $6,
             status = CASE WHEN d.status = 'pending' AND w.${LIVE} AND ${TAKEN} THEN $3 ELSE 'failed' END
           FROM webhooks w
           WHERE w.id = d.webhook_id AND ${mine} AND d.retry_base = $8
           RETURNING ${D_COLUMNS_OF_D}, CASE WHEN NOT w.${LIVE} THEN 'its webhook was deleted' WHEN NOT ${TAKEN} THEN 'its webhook no longer takes ' || d.event_type END AS ended,
             NOT w.enabled AS paused`,
          [c.id, c.attempts, failed ? 'failed' : 'pending', wait, status, error, done, c.retry_base],
        )
        const row = rows[0]
        // Paused (by a PATCH while in flight, or a test send to it), its webhook holds the retry until
        // it is enabled again: before (found by a review), the line gave a time that was not kept.
        const held = row?.paused === true ? { held: 'webhook paused: retried once it is enabled again, not before' } : {}
        if (row?.status === 'pending') this.#log.warn('webhook delivery failed; will retry', { ...fields, next_attempt_at: new Date(row.next_attempt_at).toISOString(), ...held })
        else if (row && !row.ended && failed) this.#log.warn('webhook delivery failed for good', { ...fields, reason: `its ${this.#c.max_attempts} attempts (max_attempts) are made` })
        // Its webhook taking the event still, and attempts left: a PATCH ended it while in flight.
        else if (row) this.#log.warn('webhook delivery failed; no further attempt', { ...fields, reason: row.ended ?? 'it was ended while in flight, its event removed from its webhook' })
      }
    } catch (err) {
      // The attempt was made, though its outcome could not be recorded (retried when its lease
      // ends): counted all the same. Before (found by a review), it was not, and
      // keygate_webhook_attempts_total said fewer attempts than receivers had been sent.
      this.#onAttempt(error === null ? 'delivered' : 'failed', false)
      throw err
    }
    this.#onAttempt(error === null ? 'delivered' : 'failed', error !== null && rows[0]?.status === 'failed')
    if (rows[0]) return toDelivery(rows[0])
    // Taken over (or deleted with its webhook): what the delivery is now. Deleted, it is what this
    // attempt made of it: delivered when the receiver took it (a test send answered `failed` with
    // last_status 200 when the webhook was deleted while the receiver answered), else failed, as
    // nothing will try it again.
    const current = await this.#db.query<DeliveryRow>(`SELECT ${D_COLUMNS} FROM webhook_deliveries WHERE id = $1`, [c.id])
    if (error !== null) this.#log.warn('webhook delivery failed; the outcome is not recorded', { ...fields, reason: unrecorded(c, current[0]) })
    if (current[0]) return toDelivery(current[0])
    const delivered = error === null
    // On the store's clock too: the claim's time there and how long the attempt took.
    const deliveredAt = done ?? new Date(new Date(c.last_attempt_at as Date).getTime() + Math.round(performance.now() - began))
    return toDelivery({ ...c, status: delivered ? 'delivered' : 'failed', delivered_at: delivered ? deliveredAt : null, last_status: status, last_error: error })
  }

  /**
   * Sends a `webhook.test` event to the webhook now (one attempt, in the delivery log; retried like
   * any other when it fails). An admin action: audited as `webhook.tested`, with the delivery's id.
   */
  async testFire(id: string, actor: Actor): Promise<Delivery> {
    const webhook = await this.get(id)
    const now = this.#now()
    const body = JSON.stringify({ type: TEST_EVENT, timestamp: now.toISOString(), data: { webhook_id: webhook.id } })
    const claimed = await this.#db.transaction(async (tx) => {
      // The webhook held until the insert commits (see enqueue), or gone: not found.
      const [held] = await tx.query(`SELECT 1 FROM webhooks WHERE id = $1 AND ${LIVE} FOR KEY SHARE`, [webhook.id])
      if (!held) throw notFound(id)
      const rows = await tx.query<Claimed>(
        `WITH d AS (
           INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, attempts, next_attempt_at, created_at, last_attempt_at)
           VALUES ('msg_' || replace(gen_random_uuid()::text, '-', ''), $1, $2, $3, 1, ${storeClock(4)} + $5::float8 * interval '1 millisecond', ${storeClock(4)}, ${storeClock(4)}) RETURNING *
         )
         SELECT d.*, w.url, ${SECRET_COLUMNS} FROM d JOIN webhooks w ON w.id = d.webhook_id`,
        [webhook.id, TEST_EVENT, body, this.#storeNow(), this.#leaseMs],
      )
      const d = rows[0]
      // Deleted meanwhile: the join found no webhook, and the insert is rolled back with this.
      if (!d) throw notFound(id)
      if (this.#audit) await this.#audit.write(tx, actor, { action: 'webhook.tested', details: { id: webhook.id, delivery_id: d.id } })
      return d
    })
    return this.#attempt(claimed)
  }

  /**
   * Stops polling: no round starts from now on, and the one in flight claims nothing more (it
   * waits for its attempts). What is due meanwhile is another instance's, or sent after the next
   * start. `serve` calls this when a stop begins, so that no round starts while it drains.
   */
  stopPolling(): void {
    this.#closed = true
    clearInterval(this.#timer)
    this.#wake?.()
  }

  /** Stops polling and waits for the round in flight; what is left is sent after the next start. */
  async close(): Promise<void> {
    this.stopPolling()
    await this.idle()
    const agent = this.#client && (await this.#client).agent
    if (agent && !agent.closed && !agent.destroyed) await agent.close()
  }
}

/**
 * A receiver's URL as stored and compared: without a fragment (never sent) or an empty `?`, so
 * `/hook#x` and `/hook?` are the `/hook` they reach (a review registered all three for one event
 * and got each delivery three times).
 */
function receiverUrl(url: URL): string {
  const u = new URL(url)
  u.hash = ''
  if (u.search === '') u.search = ''
  return u.toString()
}

/**
 * A Retry-After header's wait in ms (RFC 9110: delay-seconds, or an HTTP-date, read against
 * `now`, this instance's clock); 0 when absent, malformed or already past.
 */
export function retryAfterMs(header: string | string[] | undefined, now: Date): number {
  const value = (Array.isArray(header) ? header[0] : header)?.trim()
  if (!value) return 0
  if (/^\d+$/.test(value)) return Math.min(Number(value), 2 ** 31) * 1000
  const at = Date.parse(value)
  return Number.isNaN(at) ? 0 : Math.max(0, at - now.getTime())
}

function notFound(id: string): KeygateError {
  return new KeygateError('webhook_not_found', `no webhook has the id ${JSON.stringify(shownInput(id))}`)
}

/** Serialises webhook registrations and changes of URL or events (pg_advisory_xact_lock): "kgwh". */
const WEBHOOK_CREATE_LOCK = 0x6b67_7768

/** What a webhook's sealed secrets are bound to: its id (sealed text copied to another webhook fails to open). */
function secretContext(webhookId: string): string {
  return JSON.stringify(['webhook-secret', webhookId])
}

/**
 * The key events of SPEC §5 for the changes of `keys`: staged in each change's transaction (so
 * the webhook queue holds them when it commits), published once it has (returns the unsubscriber).
 */
export function bindKeyEvents(keys: KeyService, events: EventBus): () => void {
  const staged = new WeakMap<KeyChange, KeygateEvent>()
  const offStage = keys.onCommitting(async (tx, change) => {
    const event = keyEvent(change)
    if (event) staged.set(change, await events.stage(tx, event.type, event.data))
  })
  const offChange = keys.onChange((change) => {
    const event = staged.get(change)
    if (event) events.publish(event)
  })
  return () => {
    offStage()
    offChange()
  }
}

function keyEvent(change: KeyChange): { type: EventType; data: Record<string, unknown> } | undefined {
  if (change.action === 'created') return { type: 'key.created', data: { key: keyJson(change.key) } }
  if (change.action === 'revoked') return { type: 'key.revoked', data: { key: keyJson(change.key) } }
  if (change.action === 'rotated') return { type: 'key.rotated', data: { key: keyJson(change.key), ...(change.previous ? { previous: keyJson(change.previous) } : {}) } }
  return undefined
}
