// DELETE /v1/webhooks/{id}: no more deliveries; its pending ones are dropped with it.
import { webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookSchema } from '../schemas.ts'

export default defineOperation({
  id: 'deleteWebhook',
  method: 'DELETE',
  path: '/v1/webhooks/{id}',
  tag: 'webhooks',
  summary: 'Delete a webhook',
  response: { status: 200, description: 'The webhook removed.', schema: WebhookSchema },
  errors: ['webhook_not_found'],
  async handle({ params, actor, services }) {
    return webhookJson(await services.webhooks.remove(params.id as string, actor))
  },
})
