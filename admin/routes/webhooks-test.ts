// POST /v1/webhooks/{id}/test: send a signed `webhook.test` event now and answer how it went.
import { deliveryJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { DeliverySchema, WebhookIdParam } from '../schemas.ts'

export default defineOperation({
  id: 'testWebhook',
  method: 'POST',
  path: '/v1/webhooks/{id}/test',
  ids: { id: WebhookIdParam },
  tag: 'webhooks',
  summary: 'Send a test event',
  description: 'One attempt now, recorded in the delivery log; when it fails it is retried like any delivery. The answer is 200 either way: see `status`, `last_status` and `last_error`.',
  response: { status: 200, description: 'The delivery after its first attempt.', schema: DeliverySchema },
  errors: ['webhook_not_found'],
  async handle({ params, services, actor }) {
    return deliveryJson(await services.webhooks.testFire(params.id as string, actor))
  },
})
