// POST /v1/keys/validate: whether a key would be accepted now (the CLI's `api-key validate` against a server).
import { Type } from '@sinclair/typebox'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeySchema } from '../schemas.ts'

export default defineOperation({
  id: 'validateKey',
  method: 'POST',
  path: '/v1/keys/validate',
  tag: 'keys',
  summary: 'Check a key',
  description: "Answers 200 either way; `valid` is the key's own verdict: its format, status, expiry and grace, and, from `address` when given, its CIDR bindings. The gateway's other checks of a request (the deny list, lockout, rate limits, routes and scopes) are not part of it. Does not count toward any lockout.",
  body: Type.Object(
    {
      // No length bounds: an empty key, or one too long to be one, is a verdict (malformed), as
      // `keygate api-key validate` on the store answers; admin.max_body_bytes bounds it.
      key: Type.String({ description: 'The key to check.' }),
      address: Type.Optional(Type.String({ format: 'ip', description: 'Check it as used from this address (CIDR bindings); an address, not a range.' })),
    },
    { additionalProperties: false },
  ),
  bodyExample: { key: 'kg_3hF9aK2LmQxZ_r4Nd0mS3cr3tCh4r5XyZ12aB3cDe' },
  response: {
    status: 200,
    description: 'The verdict.',
    schema: Type.Object({
      valid: Type.Boolean(),
      key: Type.Optional(KeySchema),
      code: Type.Optional(Type.String({ description: 'Why it is refused: the error code the gateway would answer.' })),
      reason: Type.Optional(Type.String()),
      key_id: Type.Optional(Type.Union([Type.String(), Type.Null()])),
    }),
  },
  errors: ['validation_failed'],
  async handle({ body, services }) {
    const r = await services.keys.validate(body.key, body.address === undefined ? {} : { address: body.address })
    return r.valid ? { valid: true, key: keyJson(r.key) } : { valid: false, code: r.code, reason: r.reason, key_id: r.keyId ?? null }
  },
})
