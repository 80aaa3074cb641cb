// POST /v1/webhooks/{id}/deliveries/{delivery_id}/retry: send a failed delivery again.
import { deliveryJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { DeliveryIdParam, DeliverySchema, WebhookIdParam } from '../schemas.ts'

export default defineOperation({
  id: 'retryWebhookDelivery',
  method: 'POST',
  path: '/v1/webhooks/{id}/deliveries/{delivery_id}/retry',
  ids: { id: WebhookIdParam, delivery_id: DeliveryIdParam },
  tag: 'webhooks',
  summary: 'Send a failed delivery again',
  description:
    'The delivery becomes `pending`, due now, with `webhooks.max_attempts` more attempts and the same backoff (its `attempts` count goes on from where it stopped) and its payload and `webhook-id` unchanged, so a receiver that took it after all drops it as a repeat. Only a `failed` delivery of an event the webhook takes is sent again: a pending or delivered one, or one of an event the webhook no longer takes (removed from its `events`), is a 409 `conflict`. A paused webhook holds it until it is enabled. Audited as `webhook.deliveries_retried`.',
  response: { status: 200, description: 'The delivery, pending again (its first new attempt follows at once).', schema: DeliverySchema },
  errors: ['webhook_not_found', 'delivery_not_found', 'conflict'],
  async handle({ params, actor, services }) {
    return deliveryJson(await services.webhooks.retryDelivery(params.id as string, params.delivery_id as string, actor))
  },
})
