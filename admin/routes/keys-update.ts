// PATCH /v1/keys/{id}: changes the fields given; null clears owner, rate_limit, expires_at and rotation_interval_s.
import { UpdateKeyBody } from '../../core/keys/schemas.ts'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeyIdParam, KeySchema } from '../schemas.ts'

export default defineOperation({
  id: 'updateKey',
  method: 'PATCH',
  path: '/v1/keys/{id}',
  ids: { id: KeyIdParam },
  tag: 'keys',
  summary: 'Update a key',
  description: 'Only active keys can be changed; a rotated key is changed through its successor, and the change (its rotation interval excepted) reaches the keys that successor replaced that are still in their grace period. Only the fields whose value differs from the key\'s are a change: a body that restates the key as it is answers it unchanged, with no audit row and no new updated_at.',
  body: UpdateKeyBody,
  bodyExample: { scopes: ['orders:read', 'orders:write'] },
  response: { status: 200, description: 'The key as changed.', schema: KeySchema },
  errors: ['validation_failed', 'key_not_found', 'key_not_active'],
  async handle({ params, body, actor, services }) {
    return keyJson(await services.keys.update(params.id as string, body, actor))
  },
})
