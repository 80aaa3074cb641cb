// DELETE /v1/webhooks/{id}: no more deliveries; its pending ones are dropped with it, and its
// delivery log is removed afterwards by the scheduler, however long it is.
import { webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookIdParam, WebhookSchema } from '../schemas.ts'

export default defineOperation({
  id: 'deleteWebhook',
  method: 'DELETE',
  path: '/v1/webhooks/{id}',
  ids: { id: WebhookIdParam },
  tag: 'webhooks',
  summary: 'Delete a webhook',
  description:
    'From this answer on the webhook is not listed or found, gets no deliveries and sends none of those pending. Its delivery log is removed afterwards, in batches, by the scheduler (`scheduler.interval_s`), so a webhook with millions of deliveries is deleted as quickly as any.',
  response: { status: 200, description: 'The webhook removed.', schema: WebhookSchema },
  errors: ['webhook_not_found'],
  async handle({ params, actor, services }) {
    return webhookJson(await services.webhooks.remove(params.id as string, actor))
  },
})
