// POST /v1/keys/{id}/rotate: a new key replaces this one; the old one lives on for its type's grace period (or to its expiry, if sooner) unless forced.
import { Type } from '@sinclair/typebox'
import { rotationJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeyIdParam, RotatedKeySchema } from '../schemas.ts'

export default defineOperation({
  id: 'rotateKey',
  method: 'POST',
  path: '/v1/keys/{id}/rotate',
  ids: { id: KeyIdParam },
  tag: 'keys',
  summary: 'Rotate a key',
  description: 'Returns the new key (its plaintext once) and the old one, with `valid_until`: when the old key stops being accepted (the earlier of its `expires_at` and `grace_until`). The new key keeps the old one\'s `expires_at`. With `{"force": true}` the old key stops working now, and so do the keys before it still in their grace period. The body is optional.',
  body: Type.Object({ force: Type.Optional(Type.Boolean({ description: 'End the old key now instead of after its grace period.' })) }, { additionalProperties: false }),
  bodyRequired: false,
  bodyExample: { force: false },
  response: { status: 200, description: 'The new key and the one it replaced.', schema: RotatedKeySchema },
  errors: ['validation_failed', 'key_not_found', 'key_not_active'],
  async handle({ params, body, actor, services }) {
    const { key, record, previous } = await services.keys.rotate(params.id as string, { force: body.force === true }, actor)
    return rotationJson(key, record, previous)
  },
})
