// POST /v1/keys: creates a key; the answer holds its plaintext, once.
import { CreateKeyBody } from '../../core/keys/schemas.ts'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeyWithSecret } from '../schemas.ts'

export default defineOperation({
  id: 'createKey',
  method: 'POST',
  path: '/v1/keys',
  tag: 'keys',
  summary: 'Create a key',
  description: 'The plaintext `key` is in this answer and nowhere else: only its SHA-256 is stored.',
  body: CreateKeyBody,
  bodyExample: { name: 'billing', type: 'service', scopes: ['orders:read'] },
  response: { status: 201, description: 'The key was created.', schema: KeyWithSecret },
  created: '/v1/keys/{id}',
  errors: ['validation_failed'],
  async handle({ body, actor, services }) {
    const { key, record } = await services.keys.create(body, actor)
    return { ...keyJson(record), key }
  },
})
