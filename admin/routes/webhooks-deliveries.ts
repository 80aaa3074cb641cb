// GET /v1/webhooks/{id}/deliveries: the delivery log, newest first.
import { Type } from '@sinclair/typebox'
import { deliveryJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { DeliverySchema } from '../schemas.ts'

export default defineOperation({
  id: 'listWebhookDeliveries',
  method: 'GET',
  path: '/v1/webhooks/{id}/deliveries',
  tag: 'webhooks',
  summary: "A webhook's delivery log",
  description: 'Each delivery with its attempts, the status the receiver last answered, the last error and when it is tried next.',
  query: Type.Object(
    {
      status: Type.Optional(Type.Union([Type.Literal('pending'), Type.Literal('delivered'), Type.Literal('failed')])),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 100 })),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'The latest deliveries.', schema: Type.Object({ items: Type.Array(DeliverySchema) }) },
  errors: ['validation_failed', 'webhook_not_found'],
  async handle({ params, query, services }) {
    const rows = await services.webhooks.deliveries(params.id as string, { limit: query.limit ?? 100, ...(query.status ? { status: query.status } : {}) })
    return { items: rows.map(deliveryJson) }
  },
})
