// Answer schemas shared by the admin operations (request schemas of keys live in
// core/keys/schemas.ts, shared with the CLI), and the JSON forms they describe.
import { Type, type TSchema } from '@sinclair/typebox'
import { ANOMALY_ID_PATTERN, ANOMALY_TYPES } from '../core/anomalies.ts'
import { auditJson, type AuditFilter } from '../core/audit.ts'
import { CURSOR_PATTERN } from '../core/cursor.ts'
import type { AdminServices } from './operation.ts'
import { fieldInvalid } from '../core/errors.ts'
import ipaddr from 'ipaddr.js'
import { isCidrOrAddress, isLockoutAddress } from '../core/formats.ts'
import { normalAddress, parseRange } from '../core/keys/evaluate.ts'
import { KeyStatusSchema, KeyTypeSchema } from '../core/keys/schemas.ts'
import { EVENT_TYPES } from '../core/events.ts'
import { KEY_ID_PATTERN } from '../core/keys/format.ts'
import { DELIVERY_ID_PATTERN, WEBHOOK_ID_PATTERN } from '../core/webhooks.ts'
import { firstCharacters, NO_KEY_IN, PRINTABLE, URL_AS_WRITTEN } from '../core/validate.ts'

const Nullable = <T extends TSchema>(s: T, description?: string) => Type.Union([s, Type.Null()], description ? { description } : {})
const DateTime = (description?: string) => Type.String({ format: 'date-time', ...(description ? { description } : {}) })

// The path parameters naming what the admin API keeps (Operation.ids): what each is, and the form
// of the ids keygate makes, which the `id` of its answers carries too.
export const KeyIdParam = Type.String({ pattern: KEY_ID_PATTERN, description: "The key's `id`: the 12 letters and digits after the key's prefix (`3hF9aK2LmQxZ` in `kg_3hF9aK2LmQxZ_…`), not the key itself." })
// No pattern: the deny list is also written by hand (psql), and such an entry keeps the id it was given.
export const DenyEntryIdParam = Type.String({ minLength: 1, description: "The entry's `id`, as `GET /v1/deny-list` lists it: 16 letters and digits for an entry added through keygate." })
export const WebhookIdParam = Type.String({ pattern: WEBHOOK_ID_PATTERN, description: "The webhook's `id` (`wh_` and 16 letters, digits, `-` or `_`), as its registration and `GET /v1/webhooks` give it." })
export const DeliveryIdParam = Type.String({ pattern: DELIVERY_ID_PATTERN, description: "The delivery's `id` in the webhook's delivery log (`msg_` and 32 hex digits): the `webhook-id` header the receiver got." })
export const AnomalyIdParam = Type.String({ pattern: ANOMALY_ID_PATTERN, description: "The anomaly's `id`, a decimal number, as `GET /v1/anomalies` lists it and the stream's events carry it." })
export const GiteaTokenRefParam = Type.String({
  minLength: 1,
  maxLength: 255,
  description: "Gitea's id of the token (`remote_id`) or the token's name. A number is an id first: it is taken for a name only when neither a token of the user nor keygate's record of one has that id. A token named `verify` is deleted by its id: `/v1/gitea/tokens/verify` is the verify operation's path (any other method there is 405).",
})
export const N8nKeyRefParam = Type.String({ minLength: 1, description: "n8n's id of the key (`remote_id`) or its label; when several keys have the label, delete by id. A key labelled `verify` is deleted by its id: `/v1/n8n/keys/verify` is the verify operation's path (any other method there is 405)." })

export const KeySchema = Type.Object(
  {
    id: Type.String({ pattern: KEY_ID_PATTERN, description: 'Public key id (the 12 characters after the prefix).' }),
    name: Type.String(),
    type: KeyTypeSchema,
    status: KeyStatusSchema,
    scopes: Type.Array(Type.String()),
    owner: Nullable(Type.String()),
    metadata: Type.Record(Type.String(), Type.Unknown()),
    allowed_cidrs: Type.Array(Type.String()),
    rate_limit: Nullable(Type.Object({ limit: Type.Integer(), window_s: Type.Integer() })),
    rotation_interval_s: Nullable(Type.Integer()),
    rotated_from: Nullable(Type.String()),
    replaced_by: Nullable(Type.String()),
    grace_until: Nullable(DateTime(), 'The end of a rotating key\'s grace period, as the rotation set it. The key is accepted until then or until its expires_at, whichever comes first.'),
    legacy: Type.Boolean({ description: 'Imported from the replaced system (a UUID v4 key).' }),
    created_at: DateTime(),
    updated_at: DateTime(),
    expires_at: Nullable(DateTime()),
    last_used_at: Nullable(DateTime(), 'Last request through the gateway (as of the last usage flush).'),
    revoked_at: Nullable(DateTime()),
    revoked_reason: Nullable(Type.String()),
    valid_until: Nullable(
      DateTime(),
      "When the key stops (or stopped) being accepted: the earliest of its expires_at, its grace_until (a key a rotation replaced) and, revoked, when it was revoked; an expired key with neither date, ended for its rotation deadline, when it was ended. null for none of these. What the gateway judges by, so a script need not work it out; an active key's announced rotation deadline, at which the scheduler expires it, is left out (GET /v1/reports/expiring lists it).",
    ),
  },
  { description: 'A key, without its secret.' },
)

/** The key a rotation replaced, as the rotation answers it. */
export const ReplacedKeySchema = Type.Object(
  {
    ...KeySchema.properties,
    valid_until: DateTime(
      'When this key stops being accepted: the earlier of its expires_at and grace_until, or, when the rotation revoked it (forced, or a grace period of 0), the rotation\'s time.',
    ),
  },
  { description: 'The key the rotation replaced.' },
)

export const Plaintext = Type.String({ description: 'The key itself. Shown in this answer only: store it now.' })

export const KeyWithSecret = Type.Composite([KeySchema, Type.Object({ key: Plaintext })], { description: 'A new key and its plaintext, shown once.' })

/** A rotation's answer: the new key, its plaintext, and the key it replaced. */
export const RotatedKeySchema = Type.Composite([KeyWithSecret, Type.Object({ previous: ReplacedKeySchema })], { description: 'The new key, its plaintext shown once, and the key it replaced.' })

export const AUDIT_ACTIONS =
  'key.created, key.updated, key.rotated, key.revoked, key.imported, key.expired, key.expiring, deny_list.added, deny_list.updated, deny_list.removed, lockout.lifted, anomaly.acknowledged, webhook.created, webhook.updated, webhook.deleted, webhook.secret_rotated, webhook.tested, webhook.deliveries_retried, gitea.token.created, gitea.token.deleted, n8n.key.created, n8n.key.deleted'

export const AuditSchema = Type.Object({
  id: Type.String(),
  key_id: Nullable(Type.String(), 'The key, Gitea token or n8n key record the action concerns; null for one about none (a deny list change).'),
  action: Type.String({ description: AUDIT_ACTIONS }),
  actor: Type.String({ description: '`key:<id>` for an admin key, `token` for the bootstrap token, `cli:<user>` (`cli:<uid>` for a uid no user is named by), or `system`.' }),
  address: Nullable(Type.String()),
  details: Nullable(Type.Record(Type.String(), Type.Unknown()), 'What changed; null when the row did not open (see integrity).'),
  integrity: Type.Union([Type.Literal('verified'), Type.Literal('key_missing'), Type.Literal('failed')], {
    description:
      '`verified`: the details were decrypted and nothing in the row was changed. `key_missing`: it was sealed with an encryption key that is not configured (add it to KEYGATE_PREVIOUS_ENCRYPTION_KEYS). `failed`: the row was altered or damaged in the store. The row is listed either way.',
  }),
  sealed_with: Nullable(Type.String(), 'For a `key_missing` row, the id of the encryption key it was sealed with (a fingerprint of it: the key to add to KEYGATE_PREVIOUS_ENCRYPTION_KEYS to read the row); null otherwise.'),
  created_at: DateTime(),
})

export const DenyEntrySchema = Type.Object({
  id: Type.String(),
  cidr: Type.String({ description: 'Normalised address or CIDR range.' }),
  reason: Nullable(Type.String()),
  created_by: Type.String({ description: 'The actor who added it.' }),
  created_at: DateTime(),
  expires_at: Nullable(DateTime(), 'It stops applying then; null for never.'),
})

/** What adding an entry answers: the entry, and what it denies that may be a slip (core/deny-list.ts denyEntryWarnings). */
export const AddedDenyEntrySchema = Type.Composite(
  [
    DenyEntrySchema,
    Type.Object({
      warnings: Type.Array(Type.String(), {
        description:
          'Empty unless the range denies every client (`::/0`) or every IPv4 client (`0.0.0.0/0`, or an IPv6 range holding the IPv4-mapped block `::ffff:0:0/96`, such as `::/64`): the entry is taken, and this says so, in words. The admin listener does not check the deny list.',
      }),
    }),
  ],
  { description: 'A deny list entry as added or updated, with warnings of what it denies.' },
)

export { denyJson } from '../core/deny-list.ts'

export const LockoutSchema = Type.Object({
  address_key: Type.String({ description: 'What the lockout counts: an address, or an IPv6 network (`rate_limits.ipv6_prefix_bits`).' }),
  locked_until: DateTime(),
  retry_after_s: Type.Integer({ minimum: 1, description: "Seconds left, as the gateway's `Retry-After` says them." }),
})

/**
 * What a lockout route names, and what the lockout counts it under (`keyOf`, the server's
 * addressKeyer): one address (no range), normalised; or an IPv6 network of the size the lockouts
 * count by, as `GET /v1/lockouts` lists it (`2001:db8:1:2::/64`). Before (found by a review), only
 * an address was taken: the network the list showed, and `keygate lockouts list` printed, was
 * refused by `lockouts lift` and `DELETE /v1/lockouts/{address}`. Else the `field`'s 400.
 */
export function lockoutAddress(given: string, field: string, keyOf: (address: string) => string): { address: string; addressKey: string } {
  const refused = (why = '') => fieldInvalid(field, `${JSON.stringify(firstCharacters(given, 80))} is not allowed; expected an IPv4 or IPv6 address such as 192.0.2.7 or 2001:db8::7, or an IPv6 network as the lockouts list it${why}`)
  if (!given.includes('/')) {
    const address = isCidrOrAddress(given) ? normalAddress(given) : undefined
    if (address === undefined) throw refused()
    return { address, addressKey: keyOf(address) }
  }
  const range = isLockoutAddress(given) ? parseRange(given) : undefined
  if (range === undefined) throw refused()
  const [net, bits] = range
  const network = ipaddr.IPv6.networkAddressFromCIDR(`${net.toString()}/${bits}`).toString()
  const addressKey = keyOf(network)
  // Only the network a lockout is counted in names one: a wider or narrower one holds none.
  if (addressKey !== `${network}/${bits}`) {
    const counted = /\/(\d+)$/.exec(keyOf('2001:db8::'))?.[1]
    throw refused(counted !== undefined ? ` (an IPv6 network of /${counted}, as the lockouts count them)` : ' (the lockouts count each IPv6 address alone: rate_limits.ipv6_prefix_bits is 128)')
  }
  return { address: addressKey, addressKey }
}

export const Cursor = Type.String({ pattern: CURSOR_PATTERN, description: 'next_cursor of the previous page.' })
export const NextCursor = Nullable(Type.String(), 'Pass as `cursor` for the next page; null on the last page.')

export const AuditPageSchema = Type.Object({ items: Type.Array(AuditSchema), next_cursor: NextCursor })

/**
 * One page of the audit log for a route: the cursor read, the rows opened, and each altered row
 * (`failed`) logged as a warning (it is listed, and also said out loud), by its key, action and
 * time. Rows sealed with a key that is not configured (`key_missing`: an old key dropped after a
 * rotation, as the README allows) are one warning for the page, with their count, keys and
 * encryption keys: before (found by a review), a page of 500 of them logged 500 warnings at every view.
 */
export async function auditPage(
  services: Pick<AdminServices, 'audit' | 'db' | 'log'>,
  filter: Omit<AuditFilter, 'before'>,
  query: { limit?: number | undefined; cursor?: string | undefined },
) {
  const page = await services.audit.pageAt(services.db, filter, query)
  // The row's id is a UUID, which every log line scrubs (legacy keys have that shape): it is
  // logged without its hyphens (audit_row), which the scrubber leaves, so a row about no key
  // can be found too (found by a review).
  const missing = page.items.filter((r) => r.integrity === 'key_missing')
  for (const r of page.items) {
    if (r.integrity === 'failed') services.log.warn('an audit row did not open', { audit_row: r.id.replaceAll('-', ''), key_id: r.keyId, action: r.action, created_at: r.createdAt.toISOString(), integrity: r.integrity, problem: r.problem })
  }
  if (missing.length > 0) {
    services.log.warn('audit rows sealed with an encryption key that is not configured did not open', {
      rows: missing.length,
      encryption_keys: [...new Set(missing.map((r) => r.sealedWith))],
      key_ids: [...new Set(missing.map((r) => r.keyId))],
      newest: missing[0]?.createdAt.toISOString(),
      oldest: missing.at(-1)?.createdAt.toISOString(),
      hint: 'add the key to KEYGATE_PREVIOUS_ENCRYPTION_KEYS to read them',
    })
  }
  return { items: page.items.map(auditJson), next_cursor: page.nextCursor }
}

/** What resolveRange refuses in `from`, for the document of each `from` it reads. */
export const RANGE_RULE = 'It must be before `to`, at most 366 days before it (else 400 `validation_failed`).'

/** Time-range query parameters of the reports. */
export const RangeQuery = {
  from: Type.Optional(DateTime(`Start of the range (default: 24 hours before \`to\`). Counts are hourly: the hour holding \`from\` is included. ${RANGE_RULE}`)),
  to: Type.Optional(DateTime('End of the range, exclusive (default: now).')),
}

const MAX_RANGE_MS = 366 * 86_400_000

/** The report range from `from`/`to` (default: the last 24 hours), checked. */
export function resolveRange(query: { from?: string; to?: string }, now: Date): { from: Date; to: Date } {
  const to = query.to ? new Date(query.to) : now
  const from = query.from ? new Date(query.from) : new Date(to.getTime() - 86_400_000)
  const bad = (message: string) => fieldInvalid('from', message)
  if (from >= to) throw bad('must be before to')
  if (to.getTime() - from.getTime() > MAX_RANGE_MS) throw bad('the range may span at most 366 days')
  return { from, to }
}

export const RangeSchema = {
  from: DateTime('Start of the range.'),
  to: DateTime('End of the range (exclusive).'),
}

export const AnomalySchema = Type.Object({
  id: Type.String({ pattern: ANOMALY_ID_PATTERN, description: 'Increasing number; the SSE event id.' }),
  key_id: Type.String(),
  type: Type.Union(ANOMALY_TYPES.map((t) => Type.Literal(t))),
  details: Type.Record(Type.String(), Type.Unknown(), { description: 'What was measured against which threshold.' }),
  window_start: DateTime('Start of the dedupe window: one anomaly per key and type within it.'),
  detected_at: DateTime(),
  acknowledged_at: Nullable(DateTime()),
  acknowledged_by: Nullable(Type.String()),
})

/** The fields a webhook is registered and changed with (POST and PATCH /v1/webhooks). */
export const WebhookFields = {
  url: Type.String({ minLength: 1, maxLength: 2048, pattern: URL_AS_WRITTEN, description: `http or https URL of the receiver, as it is requested: no spaces, line breaks, backslashes or control characters (percent-encode them). ${NO_KEY_IN}` }),
  // At most one of each (a longer list has a repeat): bounded, so a body of thousands is refused at the count.
  events: Type.Array(Type.Union(EVENT_TYPES.map((e) => Type.Literal(e))), { minItems: 1, maxItems: EVENT_TYPES.length, uniqueItems: true, description: 'The events it receives.' }),
  description: Type.Union([Type.String({ minLength: 1, maxLength: 500, pattern: PRINTABLE }), Type.Null()], { description: `A note on the webhook (no control or invisible format characters); null for none. ${NO_KEY_IN}` }),
}

export const WebhookSchema = Type.Object({
  id: Type.String({ pattern: WEBHOOK_ID_PATTERN }),
  url: Type.String(),
  events: Type.Array(Type.String()),
  description: Nullable(Type.String()),
  enabled: Type.Boolean(),
  created_by: Type.String(),
  created_at: DateTime(),
  updated_at: DateTime(),
  previous_secret_until: Nullable(DateTime(), 'After a secret rotation: until then the previous secret signs too (a second signature).'),
  previous_secrets_until: Type.Array(DateTime(), {
    description:
      'Every secret rotated out that still signs, by when it stops, the most recently rotated first (the first is previous_secret_until): a rotation within the grace of another ends neither grace early, and each such secret adds a signature.',
  }),
})

export const WebhookWithSecret = Type.Composite([WebhookSchema, Type.Object({ secret: Type.String({ description: 'whsec_<base64>: verify deliveries with it. Shown in this answer only.' }) })])

export const DeliverySchema = Type.Object({
  id: Type.String({ pattern: DELIVERY_ID_PATTERN, description: 'The webhook-id header; the same on every attempt.' }),
  webhook_id: Type.String({ pattern: WEBHOOK_ID_PATTERN }),
  event_type: Type.String(),
  status: Type.Union([Type.Literal('pending'), Type.Literal('delivered'), Type.Literal('failed')]),
  attempts: Type.Integer(),
  next_attempt_at: Nullable(DateTime(), 'When pending: the next attempt.'),
  last_status: Nullable(Type.Integer(), 'HTTP status of the last attempt.'),
  last_error: Nullable(Type.String()),
  created_at: DateTime(),
  last_attempt_at: Nullable(DateTime()),
  delivered_at: Nullable(DateTime()),
  payload: Type.Unknown({ description: 'The body sent: {type, timestamp, data}.' }),
})
