// GET /v1/keys/{id}: one key.
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeyIdParam, KeySchema } from '../schemas.ts'

export default defineOperation({
  id: 'getKey',
  method: 'GET',
  path: '/v1/keys/{id}',
  ids: { id: KeyIdParam },
  tag: 'keys',
  summary: 'Get a key',
  response: { status: 200, description: 'The key.', schema: KeySchema },
  errors: ['key_not_found'],
  async handle({ params, services }) {
    return keyJson(await services.keys.get(params.id as string))
  },
})
