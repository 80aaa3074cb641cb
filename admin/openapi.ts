// The OpenAPI 3.1 document, made from the operation table: the same TypeBox schemas that
// validate requests (JSON Schema 2020-12, which OpenAPI 3.1 uses as is). Error answers are
// grouped by HTTP status, each listing the codes of the one catalogue it can carry.
import type { TSchema } from '@sinclair/typebox'
import { ERRORS, type ErrorCode } from '../core/errors.ts'
import { COMMON_ERRORS, type Operation } from './operation.ts'

/** A plain JSON Schema: TypeBox's symbol-keyed bookkeeping dropped. */
function plain(schema: TSchema): Record<string, unknown> {
  return JSON.parse(JSON.stringify(schema)) as Record<string, unknown>
}

/** Every error code `op` can answer with. */
export function operationErrors(op: Operation): ErrorCode[] {
  return [...new Set([...COMMON_ERRORS, ...op.errors])]
}

function errorResponse(codes: ErrorCode[]) {
  return {
    description: codes.map((c) => `\`${c}\`: ${ERRORS[c].message}`).join(' '),
    content: {
      'application/json': {
        schema: {
          type: 'object',
          required: ['error'],
          properties: {
            error: {
              type: 'object',
              required: ['code', 'message', 'request_id'],
              properties: {
                code: { type: 'string', enum: codes },
                message: { type: 'string' },
                request_id: { type: 'string' },
                details: { type: 'object', description: 'For validation_failed: `fields`, each bad field with what is allowed (the first 20; `more` is true when the check stopped there). For import_invalid: `problems`, the lines of the message.' },
              },
            },
          },
        },
      },
    },
  }
}

function parameters(op: Operation) {
  const out: Array<Record<string, unknown>> = []
  for (const m of op.path.matchAll(/\{(\w+)\}/g)) {
    out.push({ name: m[1], in: 'path', required: true, schema: { type: 'string', minLength: 1 } })
  }
  if (op.query) {
    const required = new Set((op.query.required as string[] | undefined) ?? [])
    for (const [name, schema] of Object.entries(op.query.properties as Record<string, TSchema>)) {
      const s = plain(schema)
      out.push({ name, in: 'query', required: required.has(name), ...(s.description ? { description: s.description } : {}), schema: s })
    }
  }
  return out
}

/** What every request body must be, or be refused 415 unsupported_media_type (admin/api.ts). */
const REQUEST_BODY = 'JSON in UTF-8 (a `charset` other than UTF-8 is refused), sent as is: a `Content-Encoding` other than `identity` is refused `415 unsupported_media_type`, with `Accept-Encoding: identity`.'

export function openApiDocument(operations: readonly Operation[], info: { version: string }) {
  const paths: Record<string, Record<string, unknown>> = {}
  for (const op of operations) {
    const responses: Record<string, unknown> = {
      [op.response.status]: {
        description: op.response.description,
        content: op.stream
          ? { 'text/event-stream': { schema: { type: 'string', description: 'Server-Sent Events; the data of each event is JSON described by x-event-data.' }, 'x-event-data': plain(op.response.schema) } }
          : { 'application/json': { schema: plain(op.response.schema) } },
      },
    }
    const byStatus = new Map<number, ErrorCode[]>()
    for (const code of operationErrors(op)) byStatus.set(ERRORS[code].status, [...(byStatus.get(ERRORS[code].status) ?? []), code])
    for (const [status, codes] of [...byStatus].sort((a, b) => a[0] - b[0])) responses[status] = errorResponse(codes)
    const params = parameters(op)
    ;(paths[op.path] ??= {})[op.method.toLowerCase()] = {
      operationId: op.id,
      tags: [op.tag],
      summary: op.summary,
      ...(op.description ? { description: op.description } : {}),
      ...(params.length > 0 ? { parameters: params } : {}),
      ...(op.body ? { requestBody: { required: op.bodyRequired !== false, description: REQUEST_BODY, content: { 'application/json': { schema: plain(op.body) } } } } : {}),
      responses,
    }
  }
  return {
    openapi: '3.1.0',
    info: {
      title: 'keygate admin API',
      version: info.version,
      description:
        'Manage keys, the deny list and reports. Every operation needs `Authorization: Bearer <credential>`: a key holding the `admin` scope, or the bootstrap token (`KEYGATE_ADMIN_TOKEN`). Failed credentials count toward the address lockout. Errors are `{"error":{"code","message","request_id"}}`.',
      license: { name: 'Apache-2.0', identifier: 'Apache-2.0' },
    },
    servers: [{ url: '/' }],
    security: [{ bearer: [] }],
    components: {
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'An admin key (scope `admin`) or the bootstrap token.' } },
    },
    tags: [
      { name: 'keys', description: 'Key lifecycle.' },
      { name: 'reports', description: 'Counts, usage and rejections.' },
      { name: 'deny list', description: 'Addresses and ranges the gateway refuses.' },
      { name: 'anomalies', description: 'Unusual key traffic found by the gateways: list, acknowledge, follow live.' },
      { name: 'webhooks', description: 'Signed event deliveries to receivers.' },
      { name: 'audit', description: 'The audit log of every admin action.' },
      { name: 'gitea', description: 'Gitea access tokens of the configured Gitea user, made and revoked through keygate.' },
      { name: 'n8n', description: 'n8n API keys, made and revoked through keygate.' },
    ],
    paths,
  }
}
