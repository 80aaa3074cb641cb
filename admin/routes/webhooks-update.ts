// PATCH /v1/webhooks/{id}: change a webhook's URL, events, description, or pause it (enabled).
import { Type } from '@sinclair/typebox'
import { webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookFields, WebhookIdParam, WebhookSchema } from '../schemas.ts'

export default defineOperation({
  id: 'updateWebhook',
  method: 'PATCH',
  path: '/v1/webhooks/{id}',
  ids: { id: WebhookIdParam },
  tag: 'webhooks',
  summary: 'Update a webhook',
  description:
    'Changes the fields given; null clears the description. A URL is checked as at registration (a public http(s) address, or one in `webhooks.allow_private`; no API key in it), and a URL and events another webhook already sends are a conflict. `enabled: false` pauses the webhook: it gets no new deliveries, and its pending ones are held, not attempted, until it is enabled again; then those already due are sent at once, their attempts unspent. The secret and the delivery log stay. Events removed from `events` are not sent any more, those pending included: each pending delivery of such an event ends as `failed` in the delivery log, its error saying the webhook no longer takes it (the audit row counts them as `deliveries_ended`); an attempt already in flight ends as it would, and is not retried. A new URL, and a rotated secret, apply to every delivery still pending. Only the fields whose value differs are a change: a body that restates the webhook answers it unchanged, with no audit row and no new updated_at.',
  body: Type.Object(
    {
      url: Type.Optional(WebhookFields.url),
      events: Type.Optional(WebhookFields.events),
      enabled: Type.Optional(Type.Boolean({ description: 'false pauses the webhook; true sends again, held deliveries first.' })),
      description: Type.Optional(WebhookFields.description),
    },
    { additionalProperties: false, minProperties: 1 },
  ),
  bodyExample: { description: 'on-call pager' },
  response: { status: 200, description: 'The webhook as changed.', schema: WebhookSchema },
  errors: ['validation_failed', 'webhook_not_found', 'webhook_url_refused', 'conflict'],
  async handle({ params, body, actor, services }) {
    return webhookJson(await services.webhooks.update(params.id as string, body, actor))
  },
})
