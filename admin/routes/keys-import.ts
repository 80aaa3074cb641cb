// POST /v1/keys/import: legacy keys (SHA-256 hex of UUID v4 strings), all rows or none.
import { Type, type TSchema } from '@sinclair/typebox'
import { IMPORT_MAX_BODY_BYTES, IMPORT_MAX_ROWS, IMPORT_ROW_FIELDS, ImportRow, KeyTypeSchema } from '../../core/keys/schemas.ts'
import { keyJson } from '../../core/keys/types.ts'
import { defineOperation } from '../operation.ts'
import { KeySchema } from '../schemas.ts'

/** The import's body, its rows of `row`. */
function importBody(row: TSchema) {
  return Type.Object(
    {
      rows: Type.Array(row, { minItems: 1, maxItems: IMPORT_MAX_ROWS, description: 'The keys to import.' }),
      type: Type.Optional({ ...KeyTypeSchema, description: 'The type of the rows that name none (default `service`).' }),
    },
    { additionalProperties: false },
  )
}

export default defineOperation({
  id: 'importKeys',
  method: 'POST',
  path: '/v1/keys/import',
  tag: 'keys',
  summary: 'Import legacy keys',
  description:
    `Each row: \`{${IMPORT_ROW_FIELDS}}\` (\`allowed_cidrs\` and \`rate_limit\` as POST /v1/keys takes them; an optional field given as null is taken as not given, as an SQL export of the replaced system's table writes an empty column). Every row is checked first and every problem reported (\`import_invalid\`, up to 20: the check stops at the row that reaches them); then all are written in one transaction. ` +
    `The body may be up to ${IMPORT_MAX_BODY_BYTES} bytes (32 MiB, or admin.max_body_bytes if larger), room for ${IMPORT_MAX_ROWS} rows of 3 KiB each; \`413 payload_too_large\` above (split a file of larger rows).`,
  maxBodyBytes: IMPORT_MAX_BODY_BYTES,
  body: importBody(Type.Unknown()),
  // Each row is checked by the import, which reports every row's problems (import_invalid).
  documentedBody: importBody({ ...ImportRow, description: `${ImportRow.description} A row that does not match is refused with the others, \`400 import_invalid\`.` }),
  bodyExample: { rows: [{ key_hash: '5e8c4a0e1f3b9d27c6a4f0b8e2d1c3a5f7b9e0d2c4a6f8b1d3e5c7a9f0b2d4e6', name: 'billing (imported)', scopes: ['orders:read'] }], type: 'service' },
  response: { status: 201, description: 'The keys imported.', schema: Type.Object({ imported: Type.Integer(), items: Type.Array(KeySchema) }) },
  errors: ['validation_failed', 'import_invalid'],
  async handle({ body, actor, services }) {
    const records = await services.keys.importLegacy(body.rows, actor, body.type === undefined ? {} : { type: body.type })
    return { imported: records.length, items: records.map(keyJson) }
  },
})
