// POST /v1/keys/{id}/rotate: a new key replaces this one; the old one lives on for its type's grace period unless forced.
import { Type } from '@sinclair/typebox'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeySchema, KeyWithSecret } from '../schemas.ts'

export default defineOperation({
  id: 'rotateKey',
  method: 'POST',
  path: '/v1/keys/{id}/rotate',
  tag: 'keys',
  summary: 'Rotate a key',
  description: 'Returns the new key (its plaintext once) and the old one. With `{"force": true}` the old key stops working now, and so do the keys before it still in their grace period. The body is optional.',
  body: Type.Object({ force: Type.Optional(Type.Boolean({ description: 'End the old key now instead of after its grace period.' })) }, { additionalProperties: false }),
  bodyRequired: false,
  response: { status: 200, description: 'The new key and the one it replaced.', schema: Type.Composite([KeyWithSecret, Type.Object({ previous: KeySchema })]) },
  errors: ['validation_failed', 'key_not_found', 'key_not_active'],
  async handle({ params, body, actor, services }) {
    const { key, record, previous } = await services.keys.rotate(params.id as string, { force: body.force === true }, actor)
    return { ...keyJson(record), key, previous: keyJson(previous) }
  },
})
