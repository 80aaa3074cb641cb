// Request bodies of the integration operations, shared by the CLI and the admin API (whose
// OpenAPI document is generated from them). Scope names are checked by the services against
// what Gitea knows and what the n8n instance allows, so an unknown scope gets its own error code.
import { Type, type Static, type TSchema } from '@sinclair/typebox'
import '../formats.ts'
import { fieldWithKey, NAME_TEXT, NAME_TEXT_NO_MARKUP, NO_KEY_IN, NOT_DOT_SEGMENT, NOT_PAST } from '../validate.ts'

const CATEGORIES = ['activitypub', 'admin', 'misc', 'notification', 'organization', 'package', 'issue', 'repository', 'user'] as const
/** Every scope name Gitea accepts (models/auth/access_token_scope.go). */
export const GITEA_SCOPES: readonly string[] = ['all', 'public-only', ...CATEGORIES.flatMap((c) => [`read:${c}`, `write:${c}`])]

/** The scopes Gitea does not know, and the words for them (the service's refusal and the CLI's usage error alike); undefined when there are none. */
export function unknownGiteaScopes(scopes: readonly string[]): { unknown: string[]; message: string } | undefined {
  const unknown = scopes.filter((s) => !GITEA_SCOPES.includes(s))
  if (unknown.length === 0) return undefined
  return { unknown, message: `${unknown.map((s) => JSON.stringify(s)).join(', ')} ${unknown.length === 1 ? 'is not a Gitea scope' : 'are not Gitea scopes'}; expected ${GITEA_SCOPES.join(', ')}` }
}

/** The longest label n8n takes, in UTF-16 units. */
const N8N_LABEL_UNITS = 50

/**
 * What makes n8n's key label one keygate refuses though the schema takes it, in words for the
 * service's refusal and the CLI's usage error alike (before, found by a review, `keygate n8n
 * create` made a new store first, then exited 1); undefined when none. n8n bounds a label in
 * UTF-16 units, as JavaScript counts (its request check is zod's `max(50)`), where keygate's
 * schemas count characters: a label of 26 emoji is refused here, not by n8n as an n8n_error.
 */
export function n8nLabelProblem(label: string): string | undefined {
  const key = fieldWithKey({ label })?.problem
  if (key !== undefined) return key
  if (label.length > N8N_LABEL_UNITS) return `is ${label.length} UTF-16 units long; n8n takes at most ${N8N_LABEL_UNITS} (a character outside the Basic Multilingual Plane, such as an emoji, counts as two)`
  return undefined
}

const ScopeName = Type.String({ minLength: 1, maxLength: 100, pattern: '^[a-z0-9][a-z0-9:._-]*$' })
/**
 * A Gitea user name as it goes into `/api/v1/users/{user}/tokens`: never `.` or `..`, which
 * encodeURIComponent leaves as they are, so the path would resolve to another endpoint (called
 * with keygate's own Basic credentials). Gitea itself takes no such name.
 */
const GITEA_USER = NOT_DOT_SEGMENT

export const CreateGiteaTokenBody = Type.Object(
  {
    name: Type.String({ minLength: 1, maxLength: 255, pattern: NAME_TEXT, description: `Token name, unique per Gitea user (something visible, not only spaces; no control or invisible format characters). ${NO_KEY_IN}` }),
    scopes: Type.Array(ScopeName, {
      minItems: 1,
      maxItems: 50,
      uniqueItems: true,
      description: 'Gitea scopes such as `read:repository` or `write:issue` (`all`, `public-only`, `read:`/`write:` of each category).',
    }),
    user: Type.Optional(Type.String({ minLength: 1, maxLength: 255, pattern: GITEA_USER, description: 'The Gitea user the token is for (default GITEA_USERNAME; another user needs a site admin).' })),
  },
  { additionalProperties: false },
)
export type CreateGiteaTokenInput = Static<typeof CreateGiteaTokenBody>

export const DeleteGiteaTokenQuery = Type.Object(
  {
    user: Type.Optional(Type.String({ minLength: 1, maxLength: 255, pattern: GITEA_USER, description: 'The Gitea user owning the token (default GITEA_USERNAME).' })),
    forget: Type.Optional(
      Type.Boolean({
        default: false,
        description:
          "Close keygate's live record only (by the Gitea id it holds, else by name), audited with `forgotten: true`, without calling Gitea: for the records of a user whose tokens Gitea will not list (`unreadable`). The token itself, if still there, is not deleted.",
      }),
    ),
  },
  { additionalProperties: false },
)
export type DeleteGiteaTokenInput = Static<typeof DeleteGiteaTokenQuery>

export const CreateN8nKeyBody = Type.Object(
  {
    label: Type.String({ minLength: 1, maxLength: 50, pattern: NAME_TEXT_NO_MARKUP, description: `Label of the key (n8n allows 50 UTF-16 units: an emoji counts as two; no control or invisible format characters), unique among the instance's keys. ${NO_KEY_IN}` }),
    scopes: Type.Array(ScopeName, { minItems: 1, maxItems: 100, uniqueItems: true, description: "Scopes from the instance's allowed list, such as `workflow:list`." }),
    expires_at: Type.Optional(Type.Union([Type.String({ format: 'date-time' }), Type.Null()], { description: `When the key stops working (RFC 3339); null or absent for never. ${NOT_PAST}` })),
  },
  { additionalProperties: false },
)
export type CreateN8nKeyInput = Static<typeof CreateN8nKeyBody>

/**
 * The secret to verify (a body, so it stays out of URLs and access logs). No length bounds: an
 * empty secret, or one too long to be one, is a verdict (`malformed`), as `keygate gitea|n8n
 * verify` on the store answers; admin.max_body_bytes bounds it.
 */
export const VerifySecretBody = Type.Object(
  { secret: Type.String({ description: 'The token or key to check.' }) },
  { additionalProperties: false },
)
export type VerifySecretInput = Static<typeof VerifySecretBody>

// Answers of the admin API's integration operations (the OpenAPI document is generated from
// these; test/admin-integrations.test.ts checks real answers against them).
const Nullable = <T extends TSchema>(s: T) => Type.Union([s, Type.Null()])
const DateTime = Type.String({ format: 'date-time' })
const TRACK_STATES = ['in_sync', 'deleted_remotely', 'not_recorded'] as const
const TrackStateSchema = Type.Union(TRACK_STATES.map((s) => Type.Literal(s)), { description: 'in_sync: in both; deleted_remotely: only the local record (deleted in the service by hand); not_recorded: only in the service.' })
const DriftSummary = Type.Object(Object.fromEntries(TRACK_STATES.map((s) => [s, Type.Integer({ minimum: 0 })])))
const GITEA_TRACK_STATES = [...TRACK_STATES, 'unreadable'] as const
const GiteaTrackStateSchema = Type.Union(GITEA_TRACK_STATES.map((s) => Type.Literal(s)), {
  description: `${TrackStateSchema.description} unreadable: only the local record, of a user other than GITEA_USERNAME whose tokens Gitea would not list (403: GITEA_USERNAME is not a site admin; a redirect: the user was renamed), so whether the token is still there is not known; \`reason\` says what Gitea answered.`,
})
const GiteaDriftSummary = Type.Object(Object.fromEntries(GITEA_TRACK_STATES.map((s) => [s, Type.Integer({ minimum: 0 })])))

export const GiteaTokenSchema = Type.Object({
  id: Type.String({ description: "keygate's record id." }),
  remote_id: Type.Integer({ description: "Gitea's token id." }),
  name: Type.String(),
  user: Type.String(),
  scopes: Type.Union([Type.Array(Type.String()), Type.Null()], {
    description: 'As Gitea stored them (normalised); null when Gitea did not say: an older Gitea answers the create without them, and then lists none either only before scoped tokens (1.19), when a token may do anything.',
  }),
  token_last_eight: Type.String(),
  base_url: Type.String(),
  created_at: DateTime,
  created_by: Type.String(),
  deleted_at: Nullable(DateTime),
  deleted_by: Nullable(Type.String()),
})
export const GiteaTokenCreatedSchema = Type.Composite([GiteaTokenSchema, Type.Object({ token: Type.String({ description: 'The token, in this answer only.' }) })])
export const GiteaTokenListSchema = Type.Object({
  base_url: Type.String(),
  users: Type.Array(Type.String()),
  items: Type.Array(
    Type.Object({
      remote_id: Type.Integer(),
      name: Type.String(),
      user: Type.String(),
      state: GiteaTrackStateSchema,
      reason: Type.Optional(Type.String({ description: 'With `unreadable` only: what Gitea answered for the user\'s tokens (`403 ...`, `307 to the user ...`).' })),
      remote: Nullable(Type.Object({ id: Type.Integer(), name: Type.String(), scopes: Nullable(Type.Array(Type.String())), token_last_eight: Type.String() })),
      local: Nullable(GiteaTokenSchema),
    }),
  ),
  summary: GiteaDriftSummary,
})
export const GiteaTokenDeletedSchema = Type.Object({
  deleted: Type.Literal(true),
  remote_id: Type.Integer(),
  name: Type.String(),
  user: Type.String(),
  remote_missing: Type.Boolean({ description: 'The token was already gone from Gitea; only the record was closed.' }),
  forgotten: Type.Boolean({ description: '`forget`: only the record was closed; Gitea was not called.' }),
  record: Nullable(GiteaTokenSchema),
})
export const GiteaVerificationSchema = Type.Object({
  valid: Type.Boolean(),
  user: Type.Optional(Nullable(Type.Object({ id: Type.Integer(), login: Type.String(), email: Nullable(Type.String()), is_admin: Type.Boolean() }))),
  note: Type.Optional(Type.String()),
  reason: Type.Optional(Type.Union([Type.Literal('malformed'), Type.Literal('refused'), Type.Literal('account_barred'), Type.Literal('forbidden')])),
  message: Type.Optional(Type.String({ description: "Gitea's message, for a 403 other than the scope check (account_barred: the owner may not sign in)." })),
  record: Nullable(GiteaTokenSchema),
})

export const N8nKeySchema = Type.Object({
  id: Type.String({ description: "keygate's record id." }),
  remote_id: Type.String({ description: "n8n's key id." }),
  label: Type.String(),
  owner_email: Type.String(),
  scopes: Type.Array(Type.String()),
  scopes_enforced: Nullable(
    Type.Boolean({
      description:
        "Whether n8n enforced the scopes when the key was made: n8n checks them on its public API only when its licence has API key scopes (its settings' `enterprise.apiKeyScopes`); without, the key may do whatever its user's role may. null: keygate could not tell (the settings could not be read, or held no such flag), or the key was recorded before keygate asked.",
    }),
  ),
  key_last_eight: Type.String(),
  expires_at: Nullable(DateTime),
  base_url: Type.String(),
  created_at: DateTime,
  created_by: Type.String(),
  deleted_at: Nullable(DateTime),
  deleted_by: Nullable(Type.String()),
})
export const N8nKeyCreatedSchema = Type.Composite([
  N8nKeySchema,
  Type.Object({
    key: Type.String({ description: 'The API key, in this answer only.' }),
    warning: Type.Optional(
      Type.String({
        description:
          "Present when the scopes do not bind the key (`scopes_enforced` false: this n8n's licence lacks API key scopes, so the key can do whatever its user's role may), or may not (`scopes_enforced` null: keygate could not tell, and says why). The key was made all the same.",
      }),
    ),
  }),
])
export const N8nKeyListSchema = Type.Object({
  base_url: Type.String(),
  items: Type.Array(
    Type.Object({
      remote_id: Type.String(),
      label: Type.String(),
      state: TrackStateSchema,
      remote: Nullable(
        Type.Object({
          id: Type.String(),
          label: Type.String(),
          scopes: Type.Array(Type.String()),
          masked: Type.String({ description: "n8n's masked form of the key." }),
          expires_at: Nullable(Type.String()),
          created_at: Nullable(Type.String({ description: "n8n's own creation time." })),
        }),
      ),
      local: Nullable(N8nKeySchema),
    }),
  ),
  summary: DriftSummary,
})
export const N8nKeyDeletedSchema = Type.Object({
  deleted: Type.Literal(true),
  remote_id: Type.String(),
  label: Type.String(),
  remote_missing: Type.Boolean({ description: 'The key was already gone from n8n; only the record was closed.' }),
  record: Nullable(N8nKeySchema),
})
export const N8nVerificationSchema = Type.Object({
  valid: Type.Boolean(),
  note: Type.Optional(Type.String()),
  reason: Type.Optional(Type.Union([Type.Literal('malformed'), Type.Literal('refused')])),
  record: Nullable(N8nKeySchema),
})
