// GET /v1/keys: keys newest first, filtered, one page at a time.
import { Type } from '@sinclair/typebox'
import { ListKeysQuery } from '../../core/keys/schemas.ts'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeySchema, NextCursor } from '../schemas.ts'

export default defineOperation({
  id: 'listKeys',
  method: 'GET',
  path: '/v1/keys',
  tag: 'keys',
  summary: 'List keys',
  description: 'Newest first. Filters combine with AND; follow `next_cursor` for the next page.',
  query: ListKeysQuery,
  response: { status: 200, description: 'One page of keys.', schema: Type.Object({ items: Type.Array(KeySchema), next_cursor: NextCursor }) },
  errors: ['validation_failed'],
  async handle({ query, services }) {
    const page = await services.keys.list(query)
    return { items: page.items.map(keyJson), next_cursor: page.nextCursor }
  },
})
