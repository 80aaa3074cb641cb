// POST /v1/webhooks: register a receiver. Its URL must be a public http(s) address (or one in
// webhooks.allow_private); the signing secret is in this answer only.
import { Type } from '@sinclair/typebox'
import { webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookFields, WebhookWithSecret } from '../schemas.ts'

export default defineOperation({
  id: 'createWebhook',
  method: 'POST',
  path: '/v1/webhooks',
  tag: 'webhooks',
  summary: 'Register a webhook',
  description:
    'Deliveries are POSTed as `{"type","timestamp","data"}` and signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`). The URL is refused when it is, or resolves to, a loopback, private, link-local or otherwise internal address, unless that address is in `webhooks.allow_private`. A URL already registered for one of the same events is a conflict: each of those events would be delivered twice.',
  body: Type.Object(
    {
      url: WebhookFields.url,
      events: WebhookFields.events,
      description: Type.Optional(WebhookFields.description),
      enabled: Type.Optional(Type.Boolean({ default: true, description: 'false registers it paused: nothing is queued for it until it is enabled (PATCH).' })),
    },
    { additionalProperties: false },
  ),
  bodyExample: { url: 'https://hooks.example.com/keygate', events: ['key.revoked', 'anomaly.detected'], description: 'on-call pager' },
  response: { status: 201, description: 'The webhook and its secret, shown once.', schema: WebhookWithSecret },
  created: '/v1/webhooks/{id}',
  errors: ['validation_failed', 'webhook_url_refused', 'conflict'],
  async handle({ body, actor, services }) {
    const { webhook, secret } = await services.webhooks.create({ url: body.url, events: body.events, description: body.description ?? null, ...(body.enabled === false ? { enabled: false } : {}) }, actor)
    return { ...webhookJson(webhook), secret }
  },
})
