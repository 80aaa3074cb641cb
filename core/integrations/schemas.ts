// Request bodies of the integration operations, shared by the CLI and the admin API (whose
// OpenAPI document is generated from them). Scope names are checked by the services against
// what Gitea knows and what the n8n instance allows, so an unknown scope gets its own error code.
import { Type, type Static } from '@sinclair/typebox'
import '../formats.ts'

const ScopeName = Type.String({ minLength: 1, maxLength: 100, pattern: '^[a-z0-9][a-z0-9:._-]*$' })

export const CreateGiteaTokenBody = Type.Object(
  {
    name: Type.String({ minLength: 1, maxLength: 255, description: 'Token name, unique per Gitea user.' }),
    scopes: Type.Array(ScopeName, {
      minItems: 1,
      maxItems: 50,
      uniqueItems: true,
      description: 'Gitea scopes such as `read:repository` or `write:issue` (`all`, `public-only`, `read:`/`write:` of each category).',
    }),
    user: Type.Optional(Type.String({ minLength: 1, maxLength: 255, description: 'The Gitea user the token is for (default GITEA_USERNAME; another user needs a site admin).' })),
  },
  { additionalProperties: false },
)
export type CreateGiteaTokenInput = Static<typeof CreateGiteaTokenBody>

export const DeleteGiteaTokenQuery = Type.Object(
  { user: Type.Optional(Type.String({ minLength: 1, maxLength: 255, description: 'The Gitea user owning the token (default GITEA_USERNAME).' })) },
  { additionalProperties: false },
)
export type DeleteGiteaTokenInput = Static<typeof DeleteGiteaTokenQuery>

export const CreateN8nKeyBody = Type.Object(
  {
    label: Type.String({ minLength: 1, maxLength: 50, pattern: '^[^<>&"]+$', description: "Label of the key (n8n allows 50 characters), unique among the instance's keys." }),
    scopes: Type.Array(ScopeName, { minItems: 1, maxItems: 100, uniqueItems: true, description: "Scopes from the instance's allowed list, such as `workflow:list`." }),
    expires_at: Type.Optional(Type.Union([Type.String({ format: 'date-time' }), Type.Null()], { description: 'When the key stops working (RFC 3339); null or absent for never.' })),
  },
  { additionalProperties: false },
)
export type CreateN8nKeyInput = Static<typeof CreateN8nKeyBody>

/** The secret to verify (a body, so it stays out of URLs and access logs). */
export const VerifySecretBody = Type.Object(
  { secret: Type.String({ minLength: 1, maxLength: 4096, description: 'The token or key to check.' }) },
  { additionalProperties: false },
)
export type VerifySecretInput = Static<typeof VerifySecretBody>
