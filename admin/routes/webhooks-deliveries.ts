// GET /v1/webhooks/{id}/deliveries: the delivery log, newest first, one page at a time.
import { Type } from '@sinclair/typebox'
import { deliveryJson } from '../../core/webhooks.ts'
import { defineOperation } from '../operation.ts'
import { Cursor, DeliverySchema, NextCursor, WebhookIdParam } from '../schemas.ts'

export default defineOperation({
  id: 'listWebhookDeliveries',
  method: 'GET',
  path: '/v1/webhooks/{id}/deliveries',
  ids: { id: WebhookIdParam },
  tag: 'webhooks',
  summary: "A webhook's delivery log",
  description: 'Each delivery with its attempts, the status the receiver last answered, the last error and when it is tried next; newest first. Follow `next_cursor` for the next page.',
  query: Type.Object(
    {
      status: Type.Optional(Type.Union([Type.Literal('pending'), Type.Literal('delivered'), Type.Literal('failed')])),
      limit: Type.Optional(Type.Integer({ minimum: 1, maximum: 500, default: 100 })),
      cursor: Type.Optional(Cursor),
    },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'One page of deliveries, newest first.', schema: Type.Object({ items: Type.Array(DeliverySchema), next_cursor: NextCursor }) },
  errors: ['validation_failed', 'webhook_not_found'],
  async handle({ params, query, services }) {
    const page = await services.webhooks.deliveries(params.id as string, {
      limit: query.limit ?? 100,
      ...(query.status ? { status: query.status } : {}),
      ...(query.cursor !== undefined ? { cursor: query.cursor } : {}),
    })
    return { items: page.items.map(deliveryJson), next_cursor: page.nextCursor }
  },
})
