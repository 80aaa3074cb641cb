// Input schemas of key operations, shared by the CLI and the admin API (whose OpenAPI document
// is generated from them).
import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { CURSOR_PATTERN } from '../cursor.ts'
import { normaliseCidr } from '../deny-list.ts'
import '../formats.ts'
import { nestsDeeper } from '../depth.ts'
import { fieldInvalid } from '../errors.ts'
import { characterCount, dotted, firstCharacters, LONE_SURROGATE, loneSurrogateAt, MAX_JSON_DEPTH, NAME_TEXT, NO_KEY_IN, NOT_FINITE, NOT_PAST, pathWhere, PRINTABLE } from '../validate.ts'
import { KEY_STATUSES, KEY_TYPES } from './types.ts'

export const Scope = Type.String({ pattern: '^[a-z0-9][a-z0-9:._*-]{0,63}$', description: 'A scope such as `admin` or `orders:read`.' })
/** A scope a route needs: one a key can hold (before, `Orders:Read` or `*` loaded, and no key passed), not a wildcard. */
export const RouteScope = Type.String({ pattern: Scope.pattern, format: 'route-scope' })
export const KeyTypeSchema = Type.Union(KEY_TYPES.map((t) => Type.Literal(t)), { description: 'Key type; sets the grace period and default rate limit.' })
export const KeyStatusSchema = Type.Union(KEY_STATUSES.map((t) => Type.Literal(t)), {
  description:
    'The status the key has now, as the gateway judges it: an `active` or `rotating` key past its `expires_at`, or a `rotating` one past its `grace_until`, is `expired` at once (the scheduler marks its row in its next round).',
})

/** No control characters (C0, DEL, C1) nor invisible format characters (core/validate.ts): PostgreSQL text cannot hold NUL, and the others would rewrite or reorder a terminal showing `api-key list`. */
const Name = Type.String({ minLength: 1, maxLength: 200, pattern: NAME_TEXT, description: `Human name of the key (something visible, not only spaces; no control or invisible format characters). ${NO_KEY_IN}` })
const Scopes = Type.Array(Scope, { uniqueItems: true, maxItems: 100, description: 'Scopes granted to the key.' })
const Owner = Type.Union([Type.String({ minLength: 1, maxLength: 200, pattern: NAME_TEXT }), Type.Null()], { description: `Who the key belongs to. ${NO_KEY_IN}` })
/** Why a key was revoked: shown by `api-key get`, so printable like a name. */
export const RevokeBody = Type.Object(
  { reason: Type.Optional(Type.String({ minLength: 1, maxLength: 500, pattern: PRINTABLE, description: `Why (no control or invisible format characters); kept with the key and in the audit log. ${NO_KEY_IN}` })) },
  { additionalProperties: false },
)
export type RevokeInput = Static<typeof RevokeBody>
/** The longest key of a key's metadata (checked by the key service: a Record's key schema bounds nothing). */
export const METADATA_KEY_MAX = 100
const Metadata = Type.Record(Type.String(), Type.Unknown(), { description: `Free-form JSON attached to the key (at most 8 KiB; keys of at most ${METADATA_KEY_MAX} characters). ${NO_KEY_IN}` })
const Cidrs = Type.Array(Type.String({ format: 'cidr' }), {
  maxItems: 100,
  description:
    'The key is only accepted from these addresses (empty: from anywhere). A range is written as its network (`10.1.2.3/8` is refused, naming 10.0.0.0/8). Kept and answered each once, in the deny list\'s one spelling: `::ffff:10.0.0.0/104` as `10.0.0.0/8`, IPv6 in lower case and compressed, without a zone id, one address without `/32` or `/128`.',
})

/**
 * A body with its allowed_cidrs as the key keeps them (the schema has checked each): in the deny
 * list's one spelling (normaliseCidr), each once, in the order given (the schema refuses host
 * bits). Before (found by a review), kept as written, so `2001:DB8::/32` and `2001:db8::/32` were
 * two bindings.
 */
export function withNormalCidrs<T extends { allowed_cidrs?: string[] }>(body: T): T {
  if (body.allowed_cidrs === undefined) return body
  return { ...body, allowed_cidrs: [...new Set(body.allowed_cidrs.map((c) => normaliseCidr(c) ?? c))] }
}
/** The bounds of a key's own rate limit and of its rotation interval, in seconds (the CLI names them in its own units). */
export const KEY_BOUNDS = {
  rateLimit: { min: 1, max: 1_000_000_000 },
  rateWindowS: { min: 1, max: 86_400 },
  rotationS: { min: 3600, max: 5 * 365 * 86_400 },
} as const
const RateLimitSchema = Type.Union(
  [
    Type.Object(
      {
        limit: Type.Integer({ minimum: KEY_BOUNDS.rateLimit.min, maximum: KEY_BOUNDS.rateLimit.max }),
        window_s: Type.Integer({ minimum: KEY_BOUNDS.rateWindowS.min, maximum: KEY_BOUNDS.rateWindowS.max }),
      },
      { additionalProperties: false },
    ),
    Type.Null(),
  ],
  { description: "Overrides the key type's rate limit; null restores the default." },
)
/** When a key stops working, with what else the field's operation refuses in it (`more`). */
const expires = (more: string) => Type.Union([Type.String({ format: 'date-time' }), Type.Null()], { description: `When the key stops working (RFC 3339); null for never. ${more}` })
const Expires = expires(NOT_PAST)
const RotationInterval = Type.Union([Type.Integer({ minimum: KEY_BOUNDS.rotationS.min, maximum: KEY_BOUNDS.rotationS.max }), Type.Null()], {
  description: 'Scheduled rotation: the key is due this many seconds after it was created.',
})

export const CreateKeyBody = Type.Object(
  {
    name: Name,
    type: KeyTypeSchema,
    scopes: Type.Optional(Scopes),
    owner: Type.Optional(Owner),
    metadata: Type.Optional(Metadata),
    allowed_cidrs: Type.Optional(Cidrs),
    rate_limit: Type.Optional(RateLimitSchema),
    expires_at: Type.Optional(Expires),
    rotation_interval_s: Type.Optional(RotationInterval),
  },
  { additionalProperties: false },
)
export type CreateKeyInput = Static<typeof CreateKeyBody>

export const UpdateKeyBody = Type.Object(
  {
    name: Type.Optional(Name),
    scopes: Type.Optional(Scopes),
    owner: Type.Optional(Owner),
    metadata: Type.Optional(Metadata),
    allowed_cidrs: Type.Optional(Cidrs),
    rate_limit: Type.Optional(RateLimitSchema),
    expires_at: Type.Optional(Expires),
    rotation_interval_s: Type.Optional(RotationInterval),
  },
  { additionalProperties: false, minProperties: 1 },
)
export type UpdateKeyInput = Static<typeof UpdateKeyBody>

/**
 * An import row's optional field, null taken as not given: an export of the replaced system's
 * table (`SELECT json_agg(t) FROM keys t`, `row_to_json`) writes null for every empty column
 * (before, found by a review, refused field by field). checkImportRows drops it before anything
 * reads the row. owner, rate_limit and expires_at take null already, with the meaning of the
 * field left out.
 */
function orNull<T extends TSchema>(schema: T) {
  return Type.Optional(Type.Union([schema, Type.Null()], { description: `${schema.description ?? ''} null: as if not given.`.trimStart() }))
}

export const ImportRow = Type.Object(
  {
    // Either case: the import reads hex case-blind (checkImportRows).
    key_hash: Type.String({ pattern: '^[0-9a-fA-F]{64}$', format: 'sha256-hex', description: 'SHA-256 hex of the legacy UUID v4 key, in either case.' }),
    name: Name,
    type: orNull(KeyTypeSchema),
    scopes: orNull(Scopes),
    owner: Type.Optional(Owner),
    metadata: orNull(Metadata),
    allowed_cidrs: orNull(Cidrs),
    rate_limit: Type.Optional(RateLimitSchema),
    created_at: orNull(Type.String({ format: 'date-time', description: 'When the key was made in the replaced system; without it, at the import (or at its expires_at, when that has passed). Not in the future.' })),
    // An imported key may have ended already (it is imported expired).
    expires_at: Type.Optional(expires('It must be after `created_at`, when that is given.')),
  },
  { additionalProperties: false, description: 'One key. An optional field given as null is taken as not given (an SQL export writes null for an empty column).' },
)
type ImportRowJson = Static<typeof ImportRow>
/** An import row as checked: an optional field given as null dropped (checkImportRows), so null is as if not given. */
export type ImportRowInput = { [K in keyof ImportRowJson]: Exclude<ImportRowJson[K], null> }
/** An import row's fields as the help and the API's description name them: `key_hash, name, type?, ...`, from the schema that checks them. */
export const IMPORT_ROW_FIELDS = Object.keys(ImportRow.properties)
  .map((f) => ((ImportRow.required as readonly string[] | undefined)?.includes(f) ? f : `${f}?`))
  .join(', ')

export const ListKeysQuery = Type.Object(
  {
    type: Type.Optional(KeyTypeSchema),
    status: Type.Optional(KeyStatusSchema),
    owner: Type.Optional(Type.String({ minLength: 1, maxLength: 200 })),
    scope: Type.Optional(Scope),
    name: Type.Optional(Type.String({ minLength: 1, maxLength: 200, description: 'Names containing this text (case-insensitive).' })),
    legacy: Type.Optional(Type.Boolean({ description: "true: only keys imported from the replaced system (validated by their UUID until rotated); false: only keygate's own." })),
    limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 50 })),
    cursor: Type.Optional(Type.String({ pattern: CURSOR_PATTERN, description: 'next_cursor of the previous page.' })),
  },
  { additionalProperties: false },
)
export type ListKeysInput = Static<typeof ListKeysQuery>

/**
 * The most rows one import takes, on the store as through the admin API (which is also bounded by
 * admin.max_body_bytes): a file that imports with one must import with the other.
 */
export const IMPORT_MAX_ROWS = 10_000

/**
 * The import is one body (one transaction), and admin.max_body_bytes (1 MiB by default) held
 * about 5,000 legacy rows of 190 bytes, where an import takes 10,000 on the store. 32 MiB holds
 * 10,000 rows of 3 KiB each (test/admin-keys.test.ts checks it), and bounds what one admin
 * request makes the server read and parse (about four times its size in memory). `keygate
 * api-key import -` reads no more of stdin than this either.
 */
export const IMPORT_MAX_BODY_BYTES = 32 * 1024 * 1024

const METADATA_MAX_BYTES = 8192

/** Whether a JSON value holds a NUL character in any key or string (its depth is bounded before this). */
function holdsNul(value: unknown): boolean {
  if (typeof value === 'string') return value.includes('\u0000')
  if (value === null || typeof value !== 'object') return false
  if (Array.isArray(value)) return value.some(holdsNul)
  return Object.entries(value).some(([k, v]) => k.includes('\u0000') || holdsNul(v))
}

/**
 * What a key's metadata must be beyond its schema: the key service checks it on every write, and
 * the CLI checks --metadata with it before anything is sent (before, found by a review: too deep or
 * too large, a usage error the API refused with exit 1, where the flag's other checks exit 2).
 */
export function checkMetadata(metadata: unknown): void {
  if (metadata === undefined) return
  // The admin API refuses deeper bodies before they get here; the CLI's --metadata and import
  // files did not, and the embedded store's worker thread never answered a query that deep.
  if (nestsDeeper(metadata, MAX_JSON_DEPTH)) throw fieldInvalid('metadata', `nests deeper than ${MAX_JSON_DEPTH} levels`)
  const text = JSON.stringify(metadata)
  // jsonb refuses a NUL in a key or value. Looked for in the strings themselves: the text
  // `\u0000` (a backslash, then u0000) is no NUL, though JSON.stringify writes a NUL that way too.
  if (holdsNul(metadata)) {
    throw fieldInvalid('metadata', 'holds a NUL character')
  }
  // As assertValid refuses one in a body (the CLI's --metadata came to it only at the service).
  const lone = loneSurrogateAt(metadata)
  if (lone !== undefined) throw fieldInvalid(dotted(['metadata', ...lone]), LONE_SURROGATE)
  // JSON writes Infinity as null: the CLI's --metadata and import files read `1e309` as Infinity
  // (the admin API refuses it in the body, with any number that would not be stored as written).
  const infinite = pathWhere(metadata, (v) => typeof v === 'number' && !Number.isFinite(v))
  if (infinite !== undefined) throw fieldInvalid(dotted(['metadata', ...infinite]), NOT_FINITE)
  // JSON Schema cannot bound a record's keys (TypeBox's Record drops the key schema's maxLength).
  const long = Object.keys(metadata as object).find((k) => characterCount(k) > METADATA_KEY_MAX)
  if (long !== undefined) throw fieldInvalid('metadata', `has a key longer than ${METADATA_KEY_MAX} characters (${JSON.stringify(firstCharacters(long, 20))}…)`)
  if (Buffer.byteLength(text) > METADATA_MAX_BYTES) {
    throw fieldInvalid('metadata', `is larger than ${METADATA_MAX_BYTES} bytes`)
  }
}
