// POST /v1/webhooks/{id}/rotate-secret: a new signing secret; the previous one keeps signing
// (a second signature) for webhooks.secret_grace_hours, so the receiver can switch without a gap.
import { webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookWithSecret } from '../schemas.ts'

export default defineOperation({
  id: 'rotateWebhookSecret',
  method: 'POST',
  path: '/v1/webhooks/{id}/rotate-secret',
  tag: 'webhooks',
  summary: "Rotate a webhook's secret",
  description: 'Until `previous_secret_until`, deliveries carry two signatures in `webhook-signature`: one with the new secret, one with the previous.',
  response: { status: 200, description: 'The webhook and its new secret, shown once.', schema: WebhookWithSecret },
  errors: ['webhook_not_found'],
  async handle({ params, actor, services }) {
    const { webhook, secret } = await services.webhooks.rotateSecret(params.id as string, actor)
    return { ...webhookJson(webhook), secret }
  },
})
