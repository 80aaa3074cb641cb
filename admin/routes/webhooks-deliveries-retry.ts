// POST /v1/webhooks/{id}/deliveries/retry: send again every failed delivery queued in a time range,
// what a receiver missed in an outage longer than the retries.
import { Type } from '@sinclair/typebox'
import { defineOperation } from '../operation.ts'
import { RANGE_RULE, resolveRange, WebhookIdParam } from '../schemas.ts'

export default defineOperation({
  id: 'retryFailedWebhookDeliveries',
  method: 'POST',
  path: '/v1/webhooks/{id}/deliveries/retry',
  ids: { id: WebhookIdParam },
  tag: 'webhooks',
  summary: 'Send failed deliveries again',
  description:
    'Every `failed` delivery of the webhook queued from `from` (default: 24 hours before `to`) until `to` (default: now), at most 366 days, becomes `pending` and due now, each with `webhooks.max_attempts` more attempts (its `attempts` count goes on) and its payload and `webhook-id` unchanged (a receiver that took one after all drops it as a repeat); pending and delivered ones are left as they are, and so are those of an event the webhook no longer takes. They are sent oldest first (their `next_attempt_at` is when each was queued), a few at a time to one webhook, as any due deliveries are. Failed deliveries stay in the log for `scheduler.webhook_delivery_retention_days`. Audited as `webhook.deliveries_retried`, with the range and the count.',
  // Every field has its default: no body is the last 24 hours (before, found by a review: a body was required).
  bodyRequired: false,
  body: Type.Object(
    {
      from: Type.Optional(Type.String({ format: 'date-time', description: `Deliveries queued from this time on (default: 24 hours before \`to\`). ${RANGE_RULE}` })),
      to: Type.Optional(Type.String({ format: 'date-time', description: 'Deliveries queued before this time (default: now).' })),
    },
    { additionalProperties: false },
  ),
  bodyExample: {},
  response: {
    status: 200,
    description: 'How many deliveries were queued again.',
    schema: Type.Object({ from: Type.String({ format: 'date-time' }), to: Type.String({ format: 'date-time' }), retried: Type.Integer({ minimum: 0 }) }),
  },
  errors: ['validation_failed', 'webhook_not_found'],
  async handle({ params, body, actor, services }) {
    const range = resolveRange(body, services.now())
    const retried = await services.webhooks.retryFailed(params.id as string, range, actor)
    return { from: range.from.toISOString(), to: range.to.toISOString(), retried }
  },
})
