// The OpenAPI document is valid OpenAPI 3.1 and describes every operation of the table with
// every error it can answer, the request headers it reads and what keygate's string formats
// allow; real answers match the documented schemas, and carry no header their response leaves
// out; /docs serves Swagger UI and its assets from the installed package.
import t, { type Test } from 'tap'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { createHash, randomUUID } from 'node:crypto'
import { gzipSync } from 'node:zlib'
import { Validator } from '@seriousme/openapi-schema-validator'
import { Ajv } from 'ajv'
import { Value } from '@sinclair/typebox/value'
import { operationErrors, plain } from '../admin/openapi.ts'
import { OPERATIONS } from '../admin/routes/index.ts'
import { AnomalyLog } from '../core/anomalies.ts'
import { openDb } from '../core/db.ts'
import { ERRORS } from '../core/errors.ts'
import { ImportRow } from '../core/keys/schemas.ts'
import { FORMAT_WORDS } from '../core/formats.ts'
import { BOOTSTRAP_TOKEN, documentValidator, followRefs, headerProblems, MAX_BODY_BYTES, refFollower, startAdmin } from './helpers/admin.ts'
import { giteaOnFake } from './helpers/integrations.ts'
import { rawAnswer, startUpstream } from './helpers/gateway.ts'
import { holdTable, migratedDatabase, openStore, setOnDatabase } from './helpers/stores.ts'

const DIST = dirname(createRequire(import.meta.url).resolve('swagger-ui-dist/package.json'))

/** Every schema node under `node` that has a `format`. */
function formatted(node: unknown, out: Array<Record<string, unknown>> = []): Array<Record<string, unknown>> {
  if (typeof node !== 'object' || node === null) return out
  if (typeof (node as { format?: unknown }).format === 'string') out.push(node as Record<string, unknown>)
  for (const v of Object.values(node)) formatted(v, out)
  return out
}

/**
 * An admin API over the embedded store, with Gitea on a fake and webhooks taking 127.0.0.1, and
 * the document it serves: as served, with its references followed, and a validator over it.
 */
async function servedWithGitea(t: Test) {
  const store = await openStore(t, 'embedded')
  const { gitea } = await giteaOnFake(t, store.db)
  const h = await startAdmin(t, store.db, { gitea, config: { webhooks: { allow_private: ['127.0.0.1/32'] } } })
  const served = (await h.call('GET', '/openapi.json', { auth: null })).json
  return { store, h, served, doc: followRefs(served), validator: documentValidator(served) }
}

t.test('the OpenAPI document', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const res = await h.call('GET', '/openapi.json', { auth: null })
  t.equal(res.status, 200, 'served without a credential')
  t.match(res.headers['content-type'], /^application\/json/)
  const served = res.json
  const validator = new Validator()
  const result = await validator.validate(served)
  t.same(result.errors, undefined, 'no validation errors')
  t.ok(result.valid, 'valid against the OpenAPI schema')
  t.equal(validator.version, '3.1', 'OpenAPI 3.1')
  t.match(served.components.securitySchemes.bearer, { type: 'http', scheme: 'bearer' })
  // What a client holds is named once and referred to (before, found by a review: every schema
  // and error answer was written out in every operation, 0.9 MB, and code generators made an
  // anonymous type of each use).
  const ref = (name: string) => ({ $ref: `#/components/schemas/${name}` })
  t.same(served.paths['/v1/keys/{id}'].get.responses['200'].content['application/json'].schema, ref('Key'), 'a key answer refers to Key')
  t.same(served.paths['/v1/keys'].get.responses['200'].content['application/json'].schema.properties.items.items, ref('Key'), 'so does a page of keys')
  t.same(served.paths['/v1/keys'].post.requestBody.content['application/json'].schema.properties.type, ref('KeyType'), 'the key type is one named enum')
  t.same(served.components.schemas.Key.properties.status, ref('KeyStatus'))
  t.same(served.paths['/v1/anomalies/stream'].get.responses['200'].content['text/event-stream']['x-event-data'], ref('Anomaly'), "the stream's events are anomalies")
  t.same(served.paths['/v1/keys'].get.responses['401'], { $ref: '#/components/responses/Unauthorized' }, 'an error answer refers to the one for its codes')
  t.same(served.paths['/v1/keys'].post.responses['400'], { $ref: '#/components/responses/BadRequestOrValidationFailed' })
  t.ok(res.text.length < 300_000, `the document is ${res.text.length} bytes, not 0.9 MB`)
  // No component is written out again anywhere, as TypeBox's Optional and Composite copy them
  // (before, found by a review: a new key's type and status, the rotation's answer and validate's key).
  const follow = refFollower(served)
  const components = Object.entries(served.components.schemas as Record<string, unknown>).map(([name, schema]) => [name, JSON.stringify(follow(schema))] as const)
  const copies: string[] = []
  const walk = (node: unknown, at: string, root: boolean) => {
    if (typeof node !== 'object' || node === null) return
    if (!root && !Array.isArray(node) && !('$ref' in node)) {
      const json = JSON.stringify(follow(node))
      for (const [name, c] of components) if (json === c) copies.push(`${at}: ${name}`)
    }
    for (const [k, v] of Object.entries(node)) walk(v, `${at}/${k}`, false)
  }
  walk(served.paths, '#/paths', true)
  for (const [name, schema] of Object.entries(served.components.schemas as Record<string, unknown>)) walk(schema, `#/components/schemas/${name}`, true)
  t.same(copies, [], 'every use of a component refers to it')
  t.same(served.paths['/v1/keys/{id}/rotate'].post.responses['200'].content['application/json'].schema, ref('RotatedKey'), 'a rotation answers a RotatedKey')
  t.same(served.components.schemas.RotatedKey.properties.previous, ref('ReplacedKey'), 'whose previous is a ReplacedKey')
  t.same(served.components.schemas.KeyWithSecret.properties.status, ref('KeyStatus'), "a new key's status is a KeyStatus")
  // An error's details name their members (before: a bare object, which generators read as one without any).
  t.match(served.components.schemas.ErrorDetails.properties.fields.items.properties, { field: { type: 'string' }, message: { type: 'string' } })
  const errorDetails = new Ajv({ strict: false }).compile(served.components.schemas.ErrorDetails)
  const typeParam = served.paths['/v1/keys'].get.parameters.find((p: { name: string }) => p.name === 'type')
  t.same(typeParam.schema, ref('KeyType'), 'the list filter by type refers to KeyType')
  t.match(typeParam.description, /Key type/, 'and keeps its description')
  // Every reference names something (followRefs throws on one that does not), and once followed
  // the document says what it said written out (the checks below read it so).
  const doc = followRefs(served)

  const documented = new Set<string>()
  for (const [path, methods] of Object.entries(doc.paths as Record<string, Record<string, any>>)) {
    for (const method of Object.keys(methods)) documented.add(`${method.toUpperCase()} ${path}`)
  }
  t.same([...documented].sort(), OPERATIONS.map((op) => `${op.method} ${op.path}`).sort(), 'every operation, and nothing else')
  for (const op of OPERATIONS) {
    const o = doc.paths[op.path][op.method.toLowerCase()]
    t.equal(o.operationId, op.id, `${op.id}: operationId`)
    t.ok(o.responses[op.response.status], `${op.id}: its ${op.response.status} answer`)
    for (const code of operationErrors(op)) {
      const r = o.responses[ERRORS[code].status]
      t.ok(r?.content['application/json'].schema.properties.error.properties.code.enum.includes(code), `${op.id}: ${ERRORS[code].status} ${code}`)
      t.match(r.description, code)
    }
    // The validating schema; an import's, with the schema its handler checks each row with.
    if (op.body) t.same(o.requestBody.content['application/json'].schema, plain(op.documentedBody ?? op.body), `${op.id}: the request body is the schema it is checked with`)
    // What is refused 415 besides another media type: a charset, a content coding (admin/api.ts).
    if (op.body) t.match(o.requestBody.description, /UTF-8[^]*Content-Encoding[^]*415 unsupported_media_type/, `${op.id}: the request body says how it must be sent`)
    // Each path parameter says what it names, and its schema is the operation's (before, found by
    // a review: the ids were an undescribed non-empty string, the key id's form nowhere).
    for (const m of op.path.matchAll(/\{(\w+)\}/g)) {
      const name = m[1] as string
      const p = o.parameters.find((p: any) => p.in === 'path' && p.name === name)
      const own = op.params?.[name] ?? op.ids?.[name]
      t.ok(p && own, `${op.id}: path parameter ${name}, with its schema`)
      if (!p || !own) continue
      t.match(p.description, /^\S+ .{40,}/, `${op.id}: path parameter ${name} is described`)
      t.same(p.schema, plain(own), `${op.id}: path parameter ${name} has the schema the operation gives it`)
    }
    for (const name of Object.keys(op.query?.properties ?? {})) t.ok(o.parameters.some((p: any) => p.in === 'query' && p.name === name), `${op.id}: query parameter ${name}`)
    for (const name of Object.keys(op.headers?.properties ?? {})) t.ok(o.parameters.some((p: any) => p.in === 'header' && p.name === name), `${op.id}: header parameter ${name}`)
    for (const [status, r] of Object.entries(o.responses as Record<string, any>)) t.ok(r.headers?.['X-Request-Id'], `${op.id}: ${status} lists X-Request-Id`)
  }
  // The stream's documented way to resume, as browsers send it (before: only the query parameter).
  t.match(doc.paths['/v1/anomalies/stream'].get.parameters.find((p: any) => p.in === 'header'), { name: 'Last-Event-ID', required: false, schema: { pattern: String } })
  t.ok(doc.paths['/v1/keys'].get.responses['429'].headers['Retry-After'], 'the lockout says when to try again')
  t.ok(doc.paths['/v1/keys'].post.responses['415'].headers['Accept-Encoding'], 'a refused content coding names the one taken')
  // keygate's own string formats say what they allow, and date-time its range (before: `cidr`
  // and `ip` were bare names, and the 1970-9999 range was nowhere).
  const nodes = formatted(doc.paths)
  for (const format of ['cidr', 'ip', 'date-time']) t.ok(nodes.some((n) => n.format === format), `the document uses ${format}`)
  for (const n of nodes) {
    const words = FORMAT_WORDS[n.format as string]
    if (words !== undefined) t.ok(String(n.description).toLowerCase().includes(words.toLowerCase()), `format ${n.format as string} says what it allows`)
  }
  const cidr = doc.paths['/v1/deny-list'].post.requestBody.content['application/json'].schema.properties.cidr.description
  t.match(cidr, /four decimal parts[^]*IPv6[^]*0 to 32 bits for IPv4 and 0 to 128 for IPv6/, 'cidr: how addresses and ranges are written')
  t.match(doc.paths['/v1/keys'].post.requestBody.content['application/json'].schema.properties.allowed_cidrs.items.description, /CIDR range/)
  t.match(doc.paths['/v1/keys/validate'].post.requestBody.content['application/json'].schema.properties.address.description, /No range/)
  t.match(doc.paths['/v1/reports/usage'].get.parameters.find((p: any) => p.name === 'from').description, /Start of the range[^]*RFC 3339 date-time with seconds, in the years 1970 to 9999 as UTC[^]*leap second/)
  // The listener's own answers are documented on every operation (before, 421, 431 and 408 were
  // not; nor, found by a review, 501 and 505, which the listener did not answer then).
  for (const [status, code] of [[421, 'host_not_allowed'], [431, 'headers_too_large'], [408, 'request_timeout'], [417, 'expectation_failed'], [501, 'transfer_coding_not_supported'], [505, 'version_not_supported']] as const) {
    t.ok(doc.paths['/v1/keys'].get.responses[status]?.content['application/json'].schema.properties.error.properties.code.enum.includes(code), `GET /v1/keys documents ${status} ${code}`)
  }
  // A choice of constants is one enum, as generators read it (before, found by a review: anyOf of consts).
  const keyType = doc.paths['/v1/keys'].post.requestBody.content['application/json'].schema.properties.type
  t.same(keyType.enum, ['system', 'user', 'service', 'integration', 'emergency'], 'the key type is an enum')
  t.equal(keyType.anyOf, undefined)
  // An import's rows are the schema each row is checked with (before, found by a review: any value).
  const row = doc.paths['/v1/keys/import'].post.requestBody.content['application/json'].schema.properties.rows.items
  t.same(row.required, ['key_hash', 'name'], "the import row's required fields")
  t.equal(row.additionalProperties, false)
  t.same(Object.keys(row.properties), Object.keys(ImportRow.properties), 'every field of the row the import checks')
  // An SQL export writes null for an empty column, taken as not given (before, found by a review:
  // refused in most optional fields). The document says so: null in every optional field, none in a required one.
  const rowProblems = (value: unknown) => documentValidator(served).problems(['paths', '/v1/keys/import', 'post', 'requestBody', 'content', 'application/json', 'schema', 'properties', 'rows', 'items'], value)
  const given = { key_hash: createHash('sha256').update('a-legacy-key').digest('hex'), name: 'old' }
  for (const field of Object.keys(ImportRow.properties)) {
    const nulled = rowProblems({ ...given, [field]: null })
    if (row.required.includes(field)) t.not(nulled.length, 0, `the document refuses null in ${field}, a required field`)
    else t.same(nulled, [], `the document takes null in ${field}, an optional field`)
  }
  t.match(row.description, /optional field given as null is taken as not given/, 'and says what null means')
  // Before: gitea and n8n were used by operations and not declared.
  const declared = new Set((doc.tags as Array<{ name: string }>).map((x) => x.name))
  for (const op of OPERATIONS) t.ok(declared.has(op.tag), `${op.id}: its tag ${op.tag} is declared`)

  // A query parameter an operation does not take is refused with a code its document lists
  // (before: validation_failed, undocumented on the ten operations that take no query).
  for (const op of OPERATIONS) {
    const path = op.path.replace(/\{\w+\}/g, 'abc')
    const r = await h.call(op.method, `${path}?unknown=1`, op.body ? { body: {} } : {})
    t.equal(r.status, 400, `${op.id}: an unknown query parameter is refused`)
    const response = doc.paths[op.path][op.method.toLowerCase()].responses['400']
    t.ok(response.content['application/json'].schema.properties.error.properties.code.enum.includes(r.json.error.code), `${op.id}: its code ${r.json.error.code} is documented`)
    t.same(headerProblems(response, r.headers, doc.components.headers), [], `${op.id}: 400 sends the headers it documents`)
    t.ok(errorDetails(r.json.error.details), `${op.id}: its details are the documented ErrorDetails ${JSON.stringify(errorDetails.errors)}`)
  }
})

// The n8n operations' answers are checked against their schemas in test/n8n.test.ts, which runs
// the real n8n they need; every other operation answers here.
const ANSWERED_ELSEWHERE = new Set(['createN8nKey', 'listN8nKeys', 'verifyN8nKey', 'deleteN8nKey'])

// Each answer is read against the schema the served document gives it, by a standard JSON Schema
// 2020-12 validator (ajv), as a client would: before (found by a review), answers were checked
// against the TypeBox schemas in the code (Value.Errors), which could say otherwise than the
// document made from them, and error answers not at all.
t.test('real answers match the documented schemas', async (t) => {
  const { store, h, served, doc, validator } = await servedWithGitea(t)
  const documented = (op: { path: string; method: string }, status: number) => doc.paths[op.path][op.method.toLowerCase()].responses[status]
  const token = (await h.call('POST', '/v1/gitea/tokens', { body: { name: 'sample', scopes: ['read:user'] } })).json
  const key = (await h.call('POST', '/v1/keys', { body: { name: 'sample', type: 'service', expires_at: new Date(Date.now() + 86_400_000).toISOString() } })).json
  const other = (await h.call('POST', '/v1/keys', { body: { name: 'other', type: 'user' } })).json
  const deny = (await h.call('POST', '/v1/deny-list', { body: { cidr: '192.0.2.0/24' } })).json
  const receiver = await startUpstream(t)
  const anomaly = (await new AnomalyLog(h.db).insert({ keyId: key.id, type: 'error_rate', windowStart: new Date(0), details: { errors: 30 }, detectedAt: new Date() }))!
  const hook = (await h.call('POST', '/v1/webhooks', { body: { url: `http://127.0.0.1:${receiver.port}/hook`, events: ['key.revoked'] } })).json
  const doomed = (await h.call('POST', '/v1/webhooks', { body: { url: `http://127.0.0.1:${receiver.port}/gone`, events: ['key.revoked'] } })).json
  const failedDelivery = async () => {
    const id = `msg_${randomUUID().replaceAll('-', '')}`
    await h.db.query(`INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts) VALUES ($1, $2, 'key.revoked', '{}', 'failed', 8)`, [id, hook.id])
    return id
  }
  h.usage.count(key.id, 'forwarded', Date.now())
  h.usage.count(undefined, 'key_invalid', Date.now())
  const samples: Record<string, () => ReturnType<typeof h.call>> = {
    createKey: () => h.call('POST', '/v1/keys', { body: { name: 'made', type: 'user', scopes: ['a'], rate_limit: { limit: 1, window_s: 1 } } }),
    listKeys: () => h.call('GET', '/v1/keys?limit=2'),
    validateKey: () => h.call('POST', '/v1/keys/validate', { body: { key: key.key } }),
    importKeys: () => h.call('POST', '/v1/keys/import', { body: { rows: [{ key_hash: createHash('sha256').update(randomUUID()).digest('hex'), name: 'old' }] } }),
    getKey: () => h.call('GET', `/v1/keys/${key.id}`),
    updateKey: () => h.call('PATCH', `/v1/keys/${key.id}`, { body: { owner: 'me' } }),
    revokeKey: () => h.call('POST', `/v1/keys/${other.id}/revoke`),
    rotateKey: () => h.call('POST', `/v1/keys/${key.id}/rotate`),
    getKeyAudit: () => h.call('GET', `/v1/keys/${key.id}/audit`),
    listAudit: () => h.call('GET', '/v1/audit?action=deny_list.added'),
    getStats: () => h.call('GET', '/v1/stats'),
    reportUsage: () => h.call('GET', `/v1/reports/usage?key_id=${key.id}`),
    reportTopKeys: () => h.call('GET', '/v1/reports/top-keys'),
    reportRejections: () => h.call('GET', '/v1/reports/rejections'),
    reportExpiring: () => h.call('GET', '/v1/reports/expiring'),
    listDenyList: () => h.call('GET', '/v1/deny-list'),
    addDenyEntry: () => h.call('POST', '/v1/deny-list', { body: { cidr: '2001:db8::/32', reason: 'doc', expires_at: new Date(Date.now() + 60_000).toISOString() } }),
    removeDenyEntry: () => h.call('DELETE', `/v1/deny-list/${deny.id}`),
    listLockouts: () => h.call('GET', '/v1/lockouts'),
    liftLockout: () => h.call('DELETE', '/v1/lockouts/198.51.100.77'),
    createGiteaToken: () => h.call('POST', '/v1/gitea/tokens', { body: { name: 'made', scopes: ['read:repository', 'write:issue'] } }),
    listGiteaTokens: () => h.call('GET', '/v1/gitea/tokens'),
    verifyGiteaToken: () => h.call('POST', '/v1/gitea/tokens/verify', { body: { secret: token.token } }),
    deleteGiteaToken: () => h.call('DELETE', `/v1/gitea/tokens/${token.remote_id}`),
    listAnomalies: () => h.call('GET', '/v1/anomalies'),
    acknowledgeAnomaly: () => h.call('POST', `/v1/anomalies/${anomaly.id}/ack`),
    createWebhook: () => h.call('POST', '/v1/webhooks', { body: { url: `http://127.0.0.1:${receiver.port}/hook`, events: ['key.created'], description: 'doc' } }),
    listWebhooks: () => h.call('GET', '/v1/webhooks'),
    getWebhook: () => h.call('GET', `/v1/webhooks/${hook.id}`),
    updateWebhook: () => h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { description: 'changed' } }),
    testWebhook: () => h.call('POST', `/v1/webhooks/${hook.id}/test`),
    rotateWebhookSecret: () => h.call('POST', `/v1/webhooks/${hook.id}/rotate-secret`),
    listWebhookDeliveries: () => h.call('GET', `/v1/webhooks/${hook.id}/deliveries`),
    retryWebhookDelivery: async () => h.call('POST', `/v1/webhooks/${hook.id}/deliveries/${await failedDelivery()}/retry`),
    retryFailedWebhookDeliveries: async () => (await failedDelivery(), h.call('POST', `/v1/webhooks/${hook.id}/deliveries/retry`, { body: {} })),
    deleteWebhook: () => h.call('DELETE', `/v1/webhooks/${doomed.id}`),
  }
  for (const op of OPERATIONS) {
    if (ANSWERED_ELSEWHERE.has(op.id)) continue
    if (op.stream) {
      const s = await h.stream(op.path, { headers: { 'last-event-id': '0' } })
      t.equal(s.status, op.response.status, `${op.id}: ${op.response.status}`)
      t.same(headerProblems(documented(op, op.response.status), s.headers, doc.components.headers), [], `${op.id}: the headers it documents`)
      const e = await s.next()
      s.close()
      t.equal(e.event, 'anomaly.detected', `${op.id}: an event`)
      const at = ['paths', op.path, 'get', 'responses', String(op.response.status), 'content', 'text/event-stream', 'x-event-data']
      t.same(validator.problems(at, JSON.parse(e.data)), [], `${op.id}: the data of an event matches its documented schema`)
      continue
    }
    const sample = samples[op.id]
    t.ok(sample, `${op.id} has a sample request`)
    if (!sample) continue
    const a = await sample()
    t.equal(a.status, op.response.status, `${op.id}: ${op.response.status}`)
    t.same(validator.answerProblems(op, a.status, a.json), [], `${op.id}: the answer matches its documented schema`)
    t.same(headerProblems(documented(op, op.response.status), a.headers, doc.components.headers), [], `${op.id}: the headers it documents`)
    if (op.id === 'reportUsage') t.ok(a.json.items[0]?.requests >= 1, 'the sample has data')
  }

  // The ids keygate gives are of the form their path parameters document (before, found by a
  // review: the document said nothing of any), read by a standard validator from the served document.
  const pathProblems = (path: string, method: string, name: string, value: string) => {
    const i = (served.paths[path][method].parameters as Array<{ in: string; name: string }>).findIndex((p) => p.in === 'path' && p.name === name)
    return validator.problems(['paths', path, method, 'parameters', i, 'schema'], value)
  }
  const tested = (await h.call('GET', `/v1/webhooks/${hook.id}/deliveries`)).json.items.find((d: { event_type: string }) => d.event_type === 'webhook.test')
  for (const [path, method, name, value] of [
    ['/v1/keys/{id}', 'get', 'id', key.id],
    ['/v1/deny-list/{id}', 'delete', 'id', deny.id],
    ['/v1/anomalies/{id}/ack', 'post', 'id', anomaly.id],
    ['/v1/webhooks/{id}', 'get', 'id', hook.id],
    ['/v1/webhooks/{id}/deliveries/{delivery_id}/retry', 'post', 'delivery_id', tested?.id],
    ['/v1/gitea/tokens/{ref}', 'delete', 'ref', String(token.remote_id)],
    ['/v1/gitea/tokens/{ref}', 'delete', 'ref', token.name],
    ['/v1/lockouts/{address}', 'delete', 'address', '2001:db8:1:2::/64'],
  ] as const) {
    t.same(pathProblems(path, method, name, value), [], `${path} ${name}: ${value} is of the documented form`)
  }
  // t.not compared with a new array, which nothing is (===): it held whatever the document said (found by a review).
  const asKey = pathProblems('/v1/keys/{id}', 'get', 'id', key.key)
  t.ok(asKey.length > 0, `a key is not its id: ${JSON.stringify(asKey)}`)
  // The form is the document's only: an id of another form names nothing, 404 as any unknown id.
  for (const op of OPERATIONS) {
    if (!op.ids || ANSWERED_ELSEWHERE.has(op.id)) continue
    const a = await h.call(op.method, op.path.replace(/\{\w+\}/g, 'no-such-id'), op.bodyExample ? { body: op.bodyExample } : {})
    t.equal(a.status, 404, `${op.id}: an id of another form is not found`)
    t.same(validator.answerProblems(op, a.status, a.json), [], `${op.id}: its 404 ${a.json?.error?.code} is documented`)
  }

  // Refusals: each body as its code's answer documents it (before, found by a review: their bodies
  // were checked against nothing), with the headers of its code: the challenge, the coding taken,
  // the lockout's wait.
  const locking = await startAdmin(t, store.db, { config: { lockout: { max_attempts: 1 } } })
  await locking.call('GET', '/v1/keys', { auth: 'kg_not_a_key_at_all' })
  const op = (id: string) => OPERATIONS.find((o) => o.id === id) as (typeof OPERATIONS)[number]
  const gzipped = { raw: gzipSync('{"name":"x","type":"user"}'), headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' } }
  const hookBody = { url: `http://127.0.0.1:${receiver.port}/hook`, events: ['key.revoked'] }
  // The request head, checked as the gateway checks it (before, found by a review: HTTP/2.0 was
  // answered 200, and a gzip, chunked body read with only its chunking undone, then refused 400).
  const head = (line: string, more = '') => `${line}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${h.adminKey}\r\n${more}\r\n`
  const zipped = gzipSync('{"name":"x","type":"user"}')
  const gzipChunked = Buffer.concat([Buffer.from(head('POST /v1/keys HTTP/1.1', 'Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n') + `${zipped.length.toString(16)}\r\n`), zipped, Buffer.from('\r\n0\r\n\r\n')])
  for (const [what, id, answer, status, code, header] of [
    ['no credential', 'getKey', await h.call('GET', '/v1/keys/abc', { auth: null }), 401, 'unauthorized', 'www-authenticate'],
    ['a credential that is not valid', 'getKey', await h.call('GET', '/v1/keys/abc', { auth: 'kg_not_a_key_at_all' }), 401, 'unauthorized', 'www-authenticate'],
    ['a content-coded body', 'createKey', await h.call('POST', '/v1/keys', gzipped), 415, 'unsupported_media_type', 'accept-encoding'],
    ['a body too large', 'createKey', await h.declared('POST', '/v1/keys', MAX_BODY_BYTES + 1), 413, 'payload_too_large', undefined],
    ['an address locked out', 'getKey', await locking.call('GET', '/v1/keys/abc'), 429, 'ip_locked_out', 'retry-after'],
    ['a key not found', 'getKey', await h.call('GET', '/v1/keys/abc'), 404, 'key_not_found', undefined],
    ['a body not valid', 'createKey', await h.call('POST', '/v1/keys', { body: { name: '' } }), 400, 'validation_failed', undefined],
    ['a body that is not JSON', 'createKey', await h.call('POST', '/v1/keys', { raw: '{', headers: { 'content-type': 'application/json' } }), 400, 'bad_request', undefined],
    ['an import row not valid', 'importKeys', await h.call('POST', '/v1/keys/import', { body: { rows: [{ key_hash: 'x', name: 'old' }] } }), 400, 'import_invalid', undefined],
    ['a key revoked already', 'revokeKey', await h.call('POST', `/v1/keys/${other.id}/revoke`), 409, 'key_not_active', undefined],
    ['a webhook URL of a private address', 'createWebhook', await h.call('POST', '/v1/webhooks', { body: { ...hookBody, url: 'http://10.0.0.1/hook' } }), 400, 'webhook_url_refused', undefined],
    ['a webhook sending an event to a URL twice', 'createWebhook', await h.call('POST', '/v1/webhooks', { body: hookBody }), 409, 'conflict', undefined],
    ['a delivery not failed', 'retryWebhookDelivery', await h.call('POST', `/v1/webhooks/${hook.id}/deliveries/${tested?.id}/retry`), 409, 'conflict', undefined],
    ['a scope Gitea does not know', 'createGiteaToken', await h.call('POST', '/v1/gitea/tokens', { body: { name: 'x', scopes: ['read:nothing'] } }), 400, 'gitea_scope_unknown', undefined],
    ['a Gitea token name taken', 'createGiteaToken', await h.call('POST', '/v1/gitea/tokens', { body: { name: 'made', scopes: ['read:user'] } }), 409, 'gitea_token_exists', undefined],
    ['n8n not configured', 'listN8nKeys', await h.call('GET', '/v1/n8n/keys'), 503, 'n8n_not_configured', undefined],
    ['HTTP/2.0', 'listKeys', await rawAnswer(h.port, head('GET /v1/keys HTTP/2.0')), 505, 'version_not_supported', undefined],
    ['a transfer coding other than chunked', 'createKey', await rawAnswer(h.port, gzipChunked), 501, 'transfer_coding_not_supported', undefined],
    ['a resume id that is none', 'streamAnomalies', await h.stream('/v1/anomalies/stream', { headers: { 'last-event-id': 'x' } }), 400, 'validation_failed', undefined],
  ] as const) {
    const body = 'json' in answer ? answer.json : answer.error
    t.equal(answer.status, status, `${what}: ${status}`)
    t.equal(body?.error?.code, code, `${what}: ${code}`)
    t.same(validator.answerProblems(op(id), answer.status, body), [], `${what}: the body ${status} documents`)
    if (header !== undefined) t.ok(answer.headers[header], `${what}: ${header}`)
    t.same(headerProblems(documented(op(id), status), answer.headers, doc.components.headers), [], `${what}: the headers ${status} documents`)
  }
})

// Swagger UI's "Try it out" fills the body with the document's example, else with one it makes
// from the schema: before (found by a docs review), text drawn from the name patterns
// ("vvzx~v||w}..."), `allowed_cidrs: ["string"]` and a webhook URL of random punctuation, which
// the API refused (400 validation_failed, webhook_url_refused "is not a valid URL").
// Before (found by a review): store_unavailable carried details.sqlstate (core/db.ts: a lock_timeout,
// a cancellation, a store out of resources or read-only), which ErrorDetails did not name.
t.test("a store_unavailable answer's details are members ErrorDetails names: sqlstate", async (t) => {
  const { url } = await migratedDatabase(t)
  await setOnDatabase(url, 'lock_timeout', '100ms')
  const db = await openDb({ databaseUrl: url })
  t.teardown(() => db.close())
  const h = await startAdmin(t, db)
  const details = (await h.call('GET', '/openapi.json', { auth: null })).json.components.schemas.ErrorDetails
  const held = await holdTable(t, url, 'api_keys')
  const r = await h.call('GET', '/v1/keys', { auth: BOOTSTRAP_TOKEN })
  await held.release()
  t.equal(`${r.status} ${r.json?.error?.code}`, '503 store_unavailable', JSON.stringify(r.json))
  t.same(r.json.error.details, { sqlstate: '55P03' })
  for (const member of Object.keys(r.json.error.details)) t.ok(details.properties[member], `details.${member} is named in ErrorDetails`)
  t.match(details.properties.sqlstate, { type: 'string', pattern: '^[0-9A-Z]{5}$' })
  t.match(details.description, /for store_unavailable, `sqlstate`/, 'and said of store_unavailable in its description')
})

t.test('every request body documents an example, and the API takes it', async (t) => {
  const store = await openStore(t, 'embedded')
  const { gitea } = await giteaOnFake(t, store.db)
  const h = await startAdmin(t, store.db, { gitea, config: { webhooks: { allow_private: ['127.0.0.1/32'] } } })
  const doc = (await h.call('GET', '/openapi.json', { auth: null })).json
  const receiver = await startUpstream(t)
  const hook = (await h.call('POST', '/v1/webhooks', { body: { url: `http://127.0.0.1:${receiver.port}/hook`, events: ['key.revoked'] } })).json
  const fresh = async () => (await h.call('POST', '/v1/keys', { body: { name: 'sample', type: 'user' } })).json.id as string
  for (const op of OPERATIONS) {
    if (!op.body) continue
    const example = doc.paths[op.path][op.method.toLowerCase()].requestBody.content['application/json'].example
    t.not(example, undefined, `${op.id}: documents an example body`)
    if (example === undefined) continue
    const errors = [...Value.Errors(op.documentedBody ?? op.body, example)].map((e) => `${e.path} ${e.message}`)
    t.same(errors, [], `${op.id}: its example matches its body schema`)
    const path = op.path.replace('{id}', op.path.startsWith('/v1/webhooks') ? hook.id : await fresh())
    const a = await h.call(op.method, path, { body: example })
    const code = a.json?.error?.code as string | undefined
    // The webhook's example names a host of the documentation's (example.com): refused for not
    // resolving here, a check of the network, after the body was taken.
    const taken = a.status < 400 || !['validation_failed', 'bad_request', 'unsupported_media_type', 'import_invalid', 'webhook_url_refused'].includes(code!) || (code === 'webhook_url_refused' && /does not resolve|reserved address/.test(a.json.error.message))
    t.ok(taken, `${op.id}: its example is taken (${a.status} ${code ?? ''} ${a.json?.error?.message ?? ''})`)
  }
})

t.test('/docs: Swagger UI from the package, no CDN', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const page = await h.call('GET', '/docs', { auth: null })
  t.equal(page.status, 200)
  t.match(page.headers['content-type'], /^text\/html/)
  t.match(page.headers['content-security-policy'], /script-src 'self'/)
  t.match(page.text, /<div id="swagger-ui">/)
  t.notMatch(page.text, /https?:\/\//, 'nothing is loaded from elsewhere')
  t.notMatch(page.text, /<script>/, 'no inline script (the CSP forbids it)')
  const assets = [...page.text.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1] as string)
  t.ok(assets.length >= 4, 'the page names its assets')
  for (const asset of assets) {
    const a = await h.call('GET', asset, { auth: null })
    t.equal(a.status, 200, `${asset} is served`)
    const file = asset.replace(/^\/docs\//, '')
    if (file !== 'init.js') t.equal(a.text, readFileSync(join(DIST, file), 'utf8').toString(), `${asset} is the package's own file`)
  }
  const init = await h.call('GET', '/docs/init.js', { auth: null })
  t.match(init.text, /url: '\/openapi\.json'/)
  // Kept, it stayed in the browser's local storage for the origin http://127.0.0.1:8081 with no
  // end: whatever serves that origin later (another local server on the port once keygate is
  // stopped) reads it, and it outlives the session on disk (found by a review).
  t.match(init.text, /persistAuthorization: false/, 'the credential typed into Authorize is not kept in the browser\'s storage')
  t.equal((await h.call('GET', '/docs/package.json', { auth: null })).status, 404, 'only the listed assets')
  t.equal((await h.call('GET', '/docs/..%2fpackage.json', { auth: null })).status, 400, 'a dot segment is refused, not resolved')
  t.equal((await h.call('HEAD', '/docs', { auth: null })).status, 200)
  const slashed = await h.call('GET', '/docs/', { auth: null })
  t.equal(slashed.status, 200, '/docs/ too')
  t.equal(slashed.text, page.text, 'the same page')
})

// Where a range's `from` is refused for what it is beside `to` (after it, or more than 366 days
// before it), the document says so: before (found by a review of the document against the
// served API), the reports said neither, and the retry of deliveries not the first, so a range
// the document took was refused 400.
t.test("every range the API refuses for its from and to, the document's from refuses in words", async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, { config: { webhooks: { allow_private: ['127.0.0.1/32'] } } })
  const doc = followRefs((await h.call('GET', '/openapi.json', { auth: null })).json)
  const receiver = await startUpstream(t)
  const hook = (await h.call('POST', '/v1/webhooks', { body: { url: `http://127.0.0.1:${receiver.port}/hook`, events: ['key.revoked'] } })).json
  const to = new Date('2027-01-31T12:00:00Z')
  const ranged = OPERATIONS.filter((op) => ['from', 'to'].every((f) => f in (op.query?.properties ?? {}) || f in ((op.body as { properties?: object } | undefined)?.properties ?? {})))
  t.ok(ranged.length >= 4, `the operations with a range: ${ranged.map((op) => op.id).join(', ')}`)
  for (const op of ranged) {
    const o = doc.paths[op.path][op.method.toLowerCase()]
    const inQuery = 'from' in (op.query?.properties ?? {})
    const said: string = inQuery ? o.parameters.find((p: any) => p.in === 'query' && p.name === 'from').description : o.requestBody.content['application/json'].schema.properties.from.description
    for (const [what, from, words] of [
      ['from equal to to', to, /must be before `to`/],
      ['a range of 367 days', new Date(to.getTime() - 367 * 86_400_000), /at most 366 days/],
    ] as const) {
      const range = { from: from.toISOString(), to: to.toISOString() }
      const path = op.path.replace('{id}', hook.id)
      const a = inQuery ? await h.call(op.method, `${path}?${new URLSearchParams(range)}`) : await h.call(op.method, path, { body: range })
      t.equal(`${a.status} ${a.json?.error?.code} ${a.json?.error?.details?.fields?.[0]?.field}`, '400 validation_failed from', `${op.id}: ${what} is refused`)
      t.match(said, words, `${op.id}: and its documented from says so`)
    }
  }
})

// A text field refused for holding what looks like a keygate key (core/validate.ts's refuseKeyIn)
// says so in the document: before (found by a review of the document against the served API),
// the README said it and the document did not, so a name, reason or URL the document took was
// refused 400. Every field of every body is tried with a key in it, in a value its schema takes.
t.test('every body field the API refuses for holding a key, the document says so of', async (t) => {
  const { h, doc, validator } = await servedWithGitea(t)
  const receiver = await startUpstream(t)
  const key = (await h.call('POST', '/v1/keys', { body: { name: 'held', type: 'user' } })).json.key as string
  const hook = (await h.call('POST', '/v1/webhooks', { body: { url: `http://127.0.0.1:${receiver.port}/hook`, events: ['key.revoked'] } })).json
  const withKey = [key, `about ${key}`, { note: key }, `http://127.0.0.1:${receiver.port}/hook?api_key=${key}`]
  const refused: string[] = []
  for (const op of OPERATIONS) {
    if (!op.body) continue
    const method = op.method.toLowerCase()
    const body = doc.paths[op.path][method].requestBody.content['application/json']
    const at = ['paths', op.path, method, 'requestBody', 'content', 'application/json', 'schema']
    // The fields of the body, and of an import's row.
    const rows = body.schema.properties.rows?.items
    const fields: Array<[string, any, (v: unknown) => Record<string, unknown>]> = [
      ...Object.entries(body.schema.properties as Record<string, any>).filter(([name]) => name !== 'rows').map(([name, s]) => [name, s, (v: unknown) => ({ ...body.example, [name]: v })] as [string, any, (v: unknown) => Record<string, unknown>]),
      ...Object.entries((rows?.properties ?? {}) as Record<string, any>).map(([name, s]) => [name, s, (v: unknown) => ({ ...body.example, rows: [{ ...body.example.rows[0], key_hash: createHash('sha256').update(randomUUID()).digest('hex'), [name]: v }] })] as [string, any, (v: unknown) => Record<string, unknown>]),
    ]
    for (const [name, schema, made] of fields) {
      const sent = withKey.map(made).find((b) => validator.problems(at, b).length === 0)
      if (sent === undefined) continue
      const path = op.path.replace('{id}', op.path.startsWith('/v1/webhooks') ? hook.id : (await h.call('POST', '/v1/keys', { body: { name: 'fresh', type: 'user' } })).json.id)
      const a = await h.call(op.method, path, { body: sent })
      if (a.status !== 400 || !JSON.stringify(a.json.error).includes('looks like a keygate')) continue
      refused.push(`${op.id}.${name}`)
      t.match(schema.description, /looks like a keygate API key/, `${op.id}: ${name}, refused with a key in it, says so in the document`)
    }
  }
  // What the README names: a key's name, owner, metadata, a reason, a webhook's URL and description, a Gitea token's name.
  for (const field of ['createKey.name', 'createKey.owner', 'createKey.metadata', 'updateKey.name', 'importKeys.name', 'revokeKey.reason', 'addDenyEntry.reason', 'createWebhook.url', 'createWebhook.description', 'updateWebhook.url', 'createGiteaToken.name']) {
    t.ok(refused.includes(field), `${field} was tried and refused`)
  }
})

// A time the API refuses for when it is (an end in the past; an import's created_at in the
// future, or its expires_at not after it), the document says so of: before (found by a review of
// the document against the served API), it said none of them, so a body it took was refused 400.
// Every date-time field of every body is tried a day back and a day ahead.
t.test('every time a body field refuses for when it is, the document says so of', async (t) => {
  const { h, doc, validator } = await servedWithGitea(t)
  const day = 86_400_000
  const past = new Date(Date.now() - day).toISOString()
  const future = new Date(Date.now() + day).toISOString()
  const refused: string[] = []
  const isDateTime = (s: any): boolean => s?.format === 'date-time' || (s?.anyOf ?? []).some(isDateTime)
  for (const op of OPERATIONS) {
    if (!op.body || op.path.includes('{id}/deliveries')) continue // a range: its own test above
    const method = op.method.toLowerCase()
    const body = doc.paths[op.path][method].requestBody.content['application/json']
    const at = ['paths', op.path, method, 'requestBody', 'content', 'application/json', 'schema']
    const rows = body.schema.properties.rows?.items
    const row = (fields: Record<string, unknown>) => ({ ...body.example, rows: [{ ...body.example.rows[0], key_hash: createHash('sha256').update(randomUUID()).digest('hex'), ...fields }] })
    const cases: Array<[string, any, Record<string, unknown>, RegExp]> = []
    for (const [name, s] of Object.entries((body.schema.properties ?? {}) as Record<string, any>)) {
      if (!isDateTime(s)) continue
      cases.push([name, s, { ...body.example, [name]: past }, /in the past/], [name, s, { ...body.example, [name]: future }, /in the future/])
    }
    for (const [name, s] of Object.entries((rows?.properties ?? {}) as Record<string, any>)) {
      if (!isDateTime(s)) continue
      cases.push([name, s, row({ [name]: past }), /in the past/], [name, s, row({ [name]: future }), /in the future/])
    }
    if (rows?.properties.created_at) cases.push(['expires_at', rows.properties.expires_at, row({ created_at: past, expires_at: new Date(Date.now() - 2 * day).toISOString() }), /after `created_at`/])
    for (const [name, schema, sent, words] of cases) {
      t.same(validator.problems(at, sent), [], `${op.id}: ${JSON.stringify(sent)} is a body the document takes`)
      const path = op.path.replace('{id}', (await h.call('POST', '/v1/keys', { body: { name: 'fresh', type: 'user' } })).json.id)
      const a = await h.call(op.method, path, { body: sent })
      const said = JSON.stringify(a.json?.error ?? '')
      if (a.status !== 400 || !said.includes(name)) continue
      refused.push(`${op.id}.${name} ${words.source}`)
      t.match(schema.description, words, `${op.id}: ${name}, refused (${said.slice(0, 200)}), says so in the document`)
    }
  }
  t.same(refused.sort(), [
    'addDenyEntry.expires_at in the past',
    'createKey.expires_at in the past',
    'createN8nKey.expires_at in the past',
    'importKeys.created_at in the future',
    'importKeys.expires_at after `created_at`',
    'updateKey.expires_at in the past',
  ], 'the times refused')
})

// What no body may hold, whatever its schema (admin/api.ts, core/validate.ts), every request body
// of the document says: before (found by a review of the document against the served API), it
// said none of it, and metadata, free-form JSON in the document, was refused 400 for each.
t.test('what no body may hold, each request body of the document says', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const doc = followRefs((await h.call('GET', '/openapi.json', { auth: null })).json)
  let deep: unknown = 1
  for (let i = 0; i < 33; i++) deep = [deep]
  const key = (metadata: string) => `{"name":"m","type":"user","metadata":${metadata}}`
  for (const [what, raw, words] of [
    ['nesting past 32 levels', key(JSON.stringify({ a: deep })), /nests deeper than 32 levels/],
    ['a NUL character', key('{"a":"x\\u0000y"}'), /NUL character/],
    ['a lone surrogate', key('{"a":"\\ud800"}'), /lone UTF-16 surrogate/],
    ['a member named twice', key('{"a":1,"a":2}'), /member named twice/],
    ['a number beyond a double', key('{"a":1e309}'), /beyond the range of a number/],
  ] as const) {
    const a = await h.call('POST', '/v1/keys', { raw, headers: { 'content-type': 'application/json' } })
    t.equal(a.status, 400, `metadata with ${what} is refused: ${a.json?.error?.message}`)
    for (const op of OPERATIONS) if (op.body) t.match(doc.paths[op.path][op.method.toLowerCase()].requestBody.description, words, `${op.id}: its request body says no body holds ${what}`)
  }
})

// An IPv6 network of another size than the lockouts count by passes the format's shape and names
// no lockout: refused, and the document says so (before, found by a review of the document
// against the served API, it took `2001:db8::/32` in words and form alike).
t.test('a lockout address of a network of another size is refused, as documented', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const doc = followRefs((await h.call('GET', '/openapi.json', { auth: null })).json)
  for (const [path, method, param, call] of [
    ['/v1/lockouts', 'get', (p: any) => p.in === 'query' && p.name === 'address', () => h.call('GET', '/v1/lockouts?address=2001:db8::%2F32')],
    ['/v1/lockouts/{address}', 'delete', (p: any) => p.in === 'path', () => h.call('DELETE', '/v1/lockouts/2001:db8::%2F32')],
  ] as const) {
    const a = await call()
    t.equal(`${a.status} ${a.json?.error?.code}`, '400 validation_failed', `${method} ${path}: a /32 is refused`)
    t.match(doc.paths[path][method].parameters.find(param).description, /network of another size is refused/, `${method} ${path}: as its address says`)
  }
})
