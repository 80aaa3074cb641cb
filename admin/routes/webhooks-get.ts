// GET /v1/webhooks/{id}: one webhook, as the list shows it (without its secret).
import { webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookIdParam, WebhookSchema } from '../schemas.ts'

export default defineOperation({
  id: 'getWebhook',
  method: 'GET',
  path: '/v1/webhooks/{id}',
  ids: { id: WebhookIdParam },
  tag: 'webhooks',
  summary: 'Get a webhook',
  response: { status: 200, description: 'The webhook.', schema: WebhookSchema },
  errors: ['webhook_not_found'],
  async handle({ params, services }) {
    return webhookJson(await services.webhooks.get(params.id as string))
  },
})
