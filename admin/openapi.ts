// The OpenAPI 3.1 document, made from the operation table: the same TypeBox schemas that
// validate requests (JSON Schema 2020-12, which OpenAPI 3.1 uses as is). Error answers are
// grouped by HTTP status, each listing the codes of the one catalogue it can carry. Every answer
// lists the headers the listener sends with it (test/admin-openapi.test.ts fails on one it sends
// and the document leaves out).
import type { TSchema } from '@sinclair/typebox'
import { ERRORS, type ErrorCode } from '../core/errors.ts'
import { formatDescription } from '../core/formats.ts'
import { MAX_JSON_DEPTH, MAX_JSON_MEMBERS } from '../core/validate.ts'
import { KeyStatusSchema, KeyTypeSchema } from '../core/keys/schemas.ts'
import { GiteaTokenSchema, N8nKeySchema } from '../core/integrations/schemas.ts'
import { COMMON_ERRORS, type Operation } from './operation.ts'
import { AddedDenyEntrySchema, AnomalySchema, AuditPageSchema, AuditSchema, DeliverySchema, DenyEntrySchema, KeySchema, KeyWithSecret, LockoutSchema, ReplacedKeySchema, RotatedKeySchema, WebhookSchema, WebhookWithSecret } from './schemas.ts'

/**
 * The schemas the document names under `components.schemas` and refers to (`$ref`) wherever an
 * operation uses them: the things a client holds (a key, a webhook, a delivery), and the key's
 * type and status, which code generators then make one named type each, not an anonymous one
 * per use (found by a review; with every error answer written out in each operation too, the
 * document was 0.9 MB).
 * Found by the schema object the operations use, or by a copy of it written out alike, as
 * TypeBox's Optional and Composite make them (found by a review: a new key's type and status,
 * the rotation's `previous` and validate's `key` were written out again).
 */
const NAMED: ReadonlyMap<object, string> = new Map<TSchema, string>([
  [KeySchema, 'Key'],
  [KeyWithSecret, 'KeyWithSecret'],
  [RotatedKeySchema, 'RotatedKey'],
  [ReplacedKeySchema, 'ReplacedKey'],
  [KeyTypeSchema, 'KeyType'],
  [KeyStatusSchema, 'KeyStatus'],
  [AuditSchema, 'AuditRecord'],
  [AuditPageSchema, 'AuditPage'],
  [DenyEntrySchema, 'DenyEntry'],
  [AddedDenyEntrySchema, 'AddedDenyEntry'],
  [LockoutSchema, 'Lockout'],
  [AnomalySchema, 'Anomaly'],
  [WebhookSchema, 'Webhook'],
  [WebhookWithSecret, 'WebhookWithSecret'],
  [DeliverySchema, 'Delivery'],
  [GiteaTokenSchema, 'GiteaToken'],
  [N8nKeySchema, 'N8nKey'],
])

const schemaRef = (name: string) => ({ $ref: `#/components/schemas/${name}` })

/**
 * A plain JSON Schema: TypeBox's symbol-keyed bookkeeping dropped, and each string of a keygate
 * format (`cidr`, `ip`, ...; `date-time` for its range) told what it allows, which a client
 * reading only the format's name could not know. Written out whole (what `documented` gives
 * once its references are followed).
 */
export function plain(schema: TSchema): Record<string, unknown> {
  return reshaped(JSON.stringify(schema))
}

/** NAMED by each schema's JSON, for the copies: a node is compared only where its description is one of theirs. */
const NAMED_JSON = new Map([...NAMED].map(([schema, name]) => [JSON.stringify(schema), name]))
const NAMED_DESCRIPTIONS = new Set([...NAMED.keys()].map((schema) => (schema as TSchema).description as unknown))

/** The NAMED schema `node` is, or is a copy of. */
function nameOf(node: object): string | undefined {
  const name = NAMED.get(node)
  if (name !== undefined || !NAMED_DESCRIPTIONS.has((node as { description?: unknown }).description)) return name
  return NAMED_JSON.get(JSON.stringify(node))
}

/** `schema` as the document holds it: as `plain`, with every NAMED schema in it but `self` a reference to its component. */
function documented(schema: TSchema, self?: TSchema): Record<string, unknown> {
  return reshaped(
    JSON.stringify(schema, (_key, value: unknown) => {
      const name = value !== self && typeof value === 'object' && value !== null && !Array.isArray(value) ? nameOf(value) : undefined
      return name === undefined ? value : schemaRef(name)
    }),
  )
}

function reshaped(json: string): Record<string, unknown> {
  return JSON.parse(json, (_key, value: unknown) => {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return value
    const node = asEnum(value as Record<string, unknown>)
    const words = typeof node.format === 'string' ? formatDescription(node.format) : undefined
    if (words === undefined) return node
    return { ...node, description: typeof node.description === 'string' ? `${node.description} ${words}` : words }
  }) as Record<string, unknown>
}

/**
 * A choice of string constants (TypeBox's union of literals, `anyOf` of `const`s) as one `enum`,
 * which code generators turn into an enum type (found by a review: an anonymous union per use).
 */
function asEnum(node: Record<string, unknown>): Record<string, unknown> {
  const choices = node.anyOf
  if (!Array.isArray(choices) || choices.length === 0) return node
  const consts: string[] = []
  for (const c of choices as Array<Record<string, unknown>>) {
    if (typeof c !== 'object' || c === null || typeof c.const !== 'string' || Object.keys(c).some((k) => k !== 'const' && k !== 'type')) return node
    consts.push(c.const)
  }
  const { anyOf: _, ...rest } = node
  return { ...rest, type: 'string', enum: consts }
}

/** The response headers the listener sends (admin/server.ts, api.ts, auth.ts, the stream), under components.headers. */
const HEADERS = {
  'X-Request-Id': { description: "The request's id: the error body's `request_id`, and in the log lines about the request.", required: true, schema: { type: 'string' } },
  'X-Keygate-Admin': { description: "Always `1`: the answer is the admin API's (the CLI takes no other server's JSON for one).", required: true, schema: { type: 'string', const: '1' } },
  'Cache-Control': { description: 'Answers are not stored by caches.', required: true, schema: { type: 'string', const: 'no-store' } },
  'X-Content-Type-Options': { required: true, schema: { type: 'string', const: 'nosniff' } },
  'X-Accel-Buffering': { description: 'Asks a proxy in front (nginx) not to hold events back.', required: true, schema: { type: 'string', const: 'no' } },
  'Retry-After': { description: 'With `ip_locked_out`: the seconds until the address may try again.', schema: { type: 'integer', minimum: 0 } },
  'WWW-Authenticate': { description: 'With `unauthorized`: the Bearer challenge (`error="invalid_token"` for a credential that is not valid).', schema: { type: 'string' } },
  'Accept-Encoding': { description: 'With a refused `Content-Encoding`: the one coding taken.', schema: { type: 'string', const: 'identity' } },
  Location: { description: 'With a 201: the path of what was made, where GET reads it (`/v1/keys/{id}`).', required: true, schema: { type: 'string' } },
} as const
type HeaderName = keyof typeof HEADERS

/** Every answer's headers (sendJson, sendError, the stream's head, rawError). */
const EVERY_ANSWER: readonly HeaderName[] = ['X-Request-Id', 'X-Keygate-Admin', 'Cache-Control', 'X-Content-Type-Options']
/** The headers an error code is answered with besides those (AdminError's headers). */
const ERROR_HEADERS: Partial<Record<ErrorCode, readonly HeaderName[]>> = {
  ip_locked_out: ['Retry-After'],
  unauthorized: ['WWW-Authenticate'],
  unsupported_media_type: ['Accept-Encoding'],
}

function headerRefs(names: readonly HeaderName[]): Record<string, { $ref: string }> {
  return Object.fromEntries(names.map((n) => [n, { $ref: `#/components/headers/${n}` }]))
}

/** Every error code `op` can answer with. */
export function operationErrors(op: Operation): ErrorCode[] {
  return [...new Set([...COMMON_ERRORS, ...op.errors])]
}

function errorResponse(codes: ErrorCode[]) {
  return {
    description: codes.map((c) => `\`${c}\`: ${ERRORS[c].message}`).join(' '),
    headers: headerRefs([...new Set([...EVERY_ANSWER, ...codes.flatMap((c) => ERROR_HEADERS[c] ?? [])])]),
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
                details: schemaRef('ErrorDetails'),
              },
            },
          },
        },
      },
    },
  }
}

/** A parameter; its description is the schema's, also where the schema is a reference (a key's `type`). */
function parameter(name: string, where: 'path' | 'query' | 'header', required: boolean, schema: TSchema) {
  const { description } = plain(schema)
  return { name, in: where, required, ...(typeof description === 'string' ? { description } : {}), schema: documented(schema) }
}

function parameters(op: Operation) {
  const out: Array<Record<string, unknown>> = []
  for (const m of op.path.matchAll(/\{(\w+)\}/g)) {
    const name = m[1] as string
    const schema = op.params?.[name] ?? op.ids?.[name]
    if (!schema) throw new Error(`${op.id}: the path parameter ${name} has no schema (params or ids)`)
    out.push(parameter(name, 'path', true, schema))
  }
  if (op.query) {
    const required = new Set((op.query.required as string[] | undefined) ?? [])
    for (const [name, schema] of Object.entries(op.query.properties as Record<string, TSchema>)) out.push(parameter(name, 'query', required.has(name), schema))
  }
  for (const [name, schema] of Object.entries((op.headers?.properties ?? {}) as Record<string, TSchema>)) out.push(parameter(name, 'header', false, schema))
  return out
}

/** An error's `details`, one component: its words were written out in every error answer of every operation (two thirds of the document). */
const ERROR_DETAILS = {
  type: 'object',
  // Typed members, and room for more: a bare `type: object` was read by generators as an object
  // with no members (openapi-typescript's Record<string, never>), `fields` unreadable without a cast.
  properties: {
    fields: { type: 'array', items: { type: 'object', required: ['field', 'message'], properties: { field: { type: 'string' }, message: { type: 'string' } } } },
    more: { type: 'boolean' },
    problems: { type: 'array', items: { type: 'string' } },
    cidr: { type: 'string' },
    allowed: { type: 'array', items: { type: 'string' } },
    unknown: { type: 'array', items: { type: 'string' } },
    status: { type: 'integer' },
    unconfirmed: { type: 'boolean' },
    integrity: { type: 'string', enum: ['key_missing', 'failed'] },
    sqlstate: { type: 'string', pattern: '^[0-9A-Z]{5}$' },
  },
  additionalProperties: true,
  description:
    'What a code has more to say, as members a client may read: for validation_failed (and webhook_url_refused), `fields`, each bad field with what is allowed (the first 20; `more` is true when the check stopped there); for import_invalid, `problems`, the lines of the message; for conflict on the deny list, `cidr`; for gitea_scope_unknown, `allowed` (and `unknown`, the scopes refused); for gitea_error and n8n_error, `status`, the HTTP status the service answered, where it did; for store_unavailable, `sqlstate`, the SQLSTATE PostgreSQL answered with, where it did (55P03 a lock_timeout set on the role or database, 57014 a statement cancelled, 53xxx the store out of resources, 25006 a read-only store, 40P01 a deadlock PostgreSQL broke: try again), and `unconfirmed` for a lockout lift Redis did not confirm; for audit_decrypt_failed, `integrity`. Members may be added: ignore those not known.',
}

/** What every request body must be, or be refused: 415 unsupported_media_type, or 400 for what no body may hold (admin/api.ts, core/validate.ts). */
const REQUEST_BODY = 'JSON in UTF-8 (a `charset` other than UTF-8 is refused; so are the patch documents `application/merge-patch+json` and `application/json-patch+json`: a PATCH body names the fields to set, each replaced whole), sent as is: a `Content-Encoding` other than `identity` is refused `415 unsupported_media_type`, with `Accept-Encoding: identity`.' +
  ` Whatever the schema, a body that nests deeper than ${MAX_JSON_DEPTH} levels or holds a NUL character (\`\\u0000\`) is refused \`400 bad_request\`; one that holds a lone UTF-16 surrogate, a member named twice in one object, an object of more than ${MAX_JSON_MEMBERS} members or a number beyond the range of a number (about ±1.8e308), \`400 validation_failed\`, naming where.`

/**
 * The name of the error answer carrying `codes` under components.responses: the codes in
 * PascalCase, joined by `Or` (`BadRequestOrValidationFailed`). Each operation's error answer for a
 * status refers to the one for its codes: written out in every operation, they were most of the
 * document, the same nine answers 41 times over.
 */
function errorResponseName(codes: readonly ErrorCode[]): string {
  return codes.map((c) => c.replace(/(?:^|_)([a-z0-9])/g, (_m, l: string) => l.toUpperCase())).join('Or')
}

export function openApiDocument(operations: readonly Operation[], info: { version: string }) {
  const paths: Record<string, Record<string, unknown>> = {}
  const errorResponses: Record<string, unknown> = {}
  for (const op of operations) {
    const responses: Record<string, unknown> = {
      [op.response.status]: {
        description: op.response.description,
        headers: headerRefs([...EVERY_ANSWER, ...(op.stream ? (['X-Accel-Buffering'] as const) : []), ...(op.created !== undefined ? (['Location'] as const) : [])]),
        content: op.stream
          ? { 'text/event-stream': { schema: { type: 'string', description: 'Server-Sent Events; the data of each event is JSON described by x-event-data.' }, 'x-event-data': documented(op.response.schema) } }
          : { 'application/json': { schema: documented(op.response.schema) } },
      },
    }
    if (op.otherStatus) responses[op.otherStatus.status] = { description: op.otherStatus.description, headers: headerRefs(EVERY_ANSWER), content: { 'application/json': { schema: documented(op.response.schema) } } }
    const byStatus = new Map<number, ErrorCode[]>()
    for (const code of operationErrors(op)) byStatus.set(ERRORS[code].status, [...(byStatus.get(ERRORS[code].status) ?? []), code])
    for (const [status, codes] of [...byStatus].sort((a, b) => a[0] - b[0])) {
      const name = errorResponseName(codes)
      errorResponses[name] ??= errorResponse(codes)
      responses[status] = { $ref: `#/components/responses/${name}` }
    }
    const params = parameters(op)
    ;(paths[op.path] ??= {})[op.method.toLowerCase()] = {
      operationId: op.id,
      tags: [op.tag],
      summary: op.summary,
      ...(op.description ? { description: op.description } : {}),
      ...(params.length > 0 ? { parameters: params } : {}),
      ...(op.body ? { requestBody: { required: op.bodyRequired !== false, description: REQUEST_BODY, content: { 'application/json': { schema: documented(op.documentedBody ?? op.body), ...(op.bodyExample ? { example: op.bodyExample } : {}) } } } } : {}),
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
      headers: HEADERS,
      responses: Object.fromEntries(Object.entries(errorResponses).sort(([a], [b]) => a.localeCompare(b))),
      schemas: { ...Object.fromEntries([...NAMED].map(([schema, name]) => [name, documented(schema as TSchema, schema as TSchema)])), ErrorDetails: ERROR_DETAILS },
    },
    tags: [
      { name: 'keys', description: 'Key lifecycle.' },
      { name: 'reports', description: 'Counts, usage and rejections.' },
      { name: 'deny list', description: 'Addresses and ranges the gateway refuses.' },
      { name: 'lockouts', description: 'Addresses locked out after failed key attempts.' },
      { name: 'anomalies', description: 'Unusual key traffic found by the gateways: list, acknowledge, follow live.' },
      { name: 'webhooks', description: 'Signed event deliveries to receivers.' },
      { name: 'audit', description: 'The audit log of every admin action.' },
      { name: 'gitea', description: 'Gitea access tokens of the configured Gitea user, made and revoked through keygate.' },
      { name: 'n8n', description: 'n8n API keys, made and revoked through keygate.' },
    ],
    paths,
  }
}
