// POST /v1/keys/{id}/revoke: the key stops working at once (in this process for the next request).
import { RevokeBody } from '../../core/keys/schemas.ts'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeyIdParam, KeySchema } from '../schemas.ts'

export default defineOperation({
  id: 'revokeKey',
  method: 'POST',
  path: '/v1/keys/{id}/revoke',
  ids: { id: KeyIdParam },
  tag: 'keys',
  summary: 'Revoke a key',
  description: 'Works on any key not already revoked, a rotating one included (its grace period ends). The keys this one replaced that are still in their grace period are revoked with it. The body is optional.',
  body: RevokeBody,
  bodyRequired: false,
  bodyExample: { reason: 'leaked in a build log' },
  response: { status: 200, description: 'The revoked key.', schema: KeySchema },
  errors: ['validation_failed', 'key_not_found', 'key_not_active'],
  async handle({ params, body, actor, services }) {
    return keyJson(await services.keys.revoke(params.id as string, body.reason, actor))
  },
})
