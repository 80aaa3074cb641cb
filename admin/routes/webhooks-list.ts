// GET /v1/webhooks: the registered receivers (without their secrets).
import { Type } from '@sinclair/typebox'
import { webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookSchema } from '../schemas.ts'

export default defineOperation({
  id: 'listWebhooks',
  method: 'GET',
  path: '/v1/webhooks',
  tag: 'webhooks',
  summary: 'List webhooks',
  response: { status: 200, description: 'Every webhook, oldest first.', schema: Type.Object({ items: Type.Array(WebhookSchema) }) },
  errors: [],
  async handle({ services }) {
    return { items: (await services.webhooks.list()).map(webhookJson) }
  },
})
