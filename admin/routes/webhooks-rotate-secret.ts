// POST /v1/webhooks/{id}/rotate-secret: a new signing secret; the previous one keeps signing
// (a second signature) for webhooks.secret_grace_hours, so the receiver can switch without a gap,
// and so do the ones earlier rotations left in their grace, each until its own end.
import { MAX_PREVIOUS_SECRETS, webhookJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { WebhookIdParam, WebhookWithSecret } from '../schemas.ts'

export default defineOperation({
  id: 'rotateWebhookSecret',
  method: 'POST',
  path: '/v1/webhooks/{id}/rotate-secret',
  ids: { id: WebhookIdParam },
  tag: 'webhooks',
  summary: "Rotate a webhook's secret",
  description:
    `Until \`previous_secret_until\`, deliveries carry two signatures in \`webhook-signature\`: one with the new secret, one with the previous. A rotation within the grace of an earlier one ends no grace early: every secret rotated out keeps signing until the end its own rotation answered (\`previous_secrets_until\` lists them), one more signature each. With ${MAX_PREVIOUS_SECRETS} of them still signing, another rotation is a 409 \`conflict\` naming when the first of them ends.`,
  response: { status: 200, description: 'The webhook and its new secret, shown once.', schema: WebhookWithSecret },
  errors: ['webhook_not_found', 'conflict'],
  async handle({ params, actor, services }) {
    const { webhook, secret } = await services.webhooks.rotateSecret(params.id as string, actor)
    return { ...webhookJson(webhook), secret }
  },
})
