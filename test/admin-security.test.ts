// The shared security suite: every operation of the table, on both stores, refuses a missing,
// wrong, non-admin and revoked credential, malformed JSON, an oversized body and a body that is
// not JSON; each refusal is the JSON error of the catalogue, documented for that operation in
// the OpenAPI document, and writes no audit row.
import t from 'tap'
import type { Test } from 'tap'
import { randomUUID } from 'node:crypto'
import { openApiDocument, operationErrors } from '../admin/openapi.ts'
import { OPERATIONS } from '../admin/routes/index.ts'
import { AnomalyLog } from '../core/anomalies.ts'
import { ERRORS } from '../core/errors.ts'
import { BOOTSTRAP_TOKEN, followRefs, headerProblems, MAX_BODY_BYTES, servedValidator, startAdmin, type AdminHarness } from './helpers/admin.ts'
import { converse, rawAnswer, rawExchange, uploadWhileAnswered, type Answer } from './helpers/gateway.ts'
import { forEachStore, openStore } from './helpers/stores.ts'
import { giteaOnFake } from './helpers/integrations.ts'

const DOC = followRefs(openApiDocument(OPERATIONS, { version: 'test' }))

async function documented(t: Test, h: AdminHarness, op: (typeof OPERATIONS)[number], a: Answer, what: string): Promise<void> {
  const code = a.json?.error?.code as keyof typeof ERRORS
  t.ok(operationErrors(op).includes(code), `${what}: ${code} is one of ${op.id}'s errors`)
  const response = (DOC.paths[op.path] as any)[op.method.toLowerCase()].responses[String(a.status)]
  t.ok(response?.content['application/json'].schema.properties.error.properties.code.enum.includes(code), `${what}: ${a.status} ${code} is in the OpenAPI document`)
  t.same(headerProblems(response, a.headers, DOC.components.headers), [], `${what}: the headers ${a.status} documents`)
  t.same((await servedValidator(h)).answerProblems(op, a.status, a.json), [], `${what}: the body ${a.status} documents in /openapi.json`)
}

/**
 * Sends one raw request to the admin listener and to the gateway of `h` (`gateway: true`): the
 * admin listener refuses it with `status` and `code`, saying why (`message`), with the headers of
 * its every answer, and the gateway answers it alike, status, code and message. The admin answer.
 */
async function refusedAlike(t: Test, h: AdminHarness, what: string, request: string, status: number, code: string, message: RegExp): Promise<Answer> {
  const admin = await rawAnswer(h.port, request)
  t.equal(admin.status, status, `${what}: ${status}`)
  t.match(admin.json, { error: { code, message, request_id: String } }, `${what}: ${code}, saying why`)
  t.equal(admin.headers['x-keygate-admin'], '1', `${what}: with the headers of every answer`)
  const gateway = await rawAnswer(h.gateway!.port, request)
  t.same([gateway.status, gateway.json?.error?.code, gateway.json?.error?.message], [admin.status, code, admin.json?.error?.message], `${what}: as the gateway answers it`)
  return admin
}

function refused(t: Test, a: Answer, status: number, code: string, what: string): void {
  t.equal(a.status, status, `${what}: status`)
  t.equal(a.json?.error?.code, code, `${what}: code`)
  t.match(a.headers['content-type'], /^application\/json/, `${what}: JSON`)
  t.equal(a.json?.error?.request_id, a.headers['x-request-id'], `${what}: request id in body and header`)
  t.notMatch(a.text, /\n\s+at |node:internal|\.ts:\d+/, `${what}: no stack trace`)
}

async function pathFor(h: AdminHarness, path: string): Promise<string> {
  if (!path.includes('{id}')) return path
  if (path.startsWith('/v1/webhooks')) {
    // A URL of its own: one already registered for the event is refused.
    const { webhook } = await h.webhooks.create({ url: `http://127.0.0.1:9/never/${randomUUID()}`, events: ['key.expiring'] }, { actor: 'test' })
    return path.replace('{id}', webhook.id)
  }
  if (path.startsWith('/v1/anomalies')) {
    const a = await new AnomalyLog(h.db).insert({ keyId: 'k'.repeat(12), type: 'request_rate', windowStart: new Date(Math.floor(Math.random() * 1e12)), details: {}, detectedAt: new Date() })
    return path.replace('{id}', a!.id)
  }
  if (path.startsWith('/v1/deny-list')) {
    const e = await h.denyList.add({ cidr: `198.51.100.${Math.floor(Math.random() * 250)}/32` }, { actor: 'test' }).catch(async () => (await h.denyList.list())[0]!)
    return path.replace('{id}', e.id)
  }
  const k = await h.keys.create({ name: 'target', type: 'user' }, { actor: 'test' })
  return path.replace('{id}', k.record.id)
}

await forEachStore(t, async (t, store) => {
  // Gitea (the fake) is configured so that its list answers; n8n is not, so its operations show
  // an accepted credential by answering n8n_not_configured (test/n8n.test.ts runs them for real).
  const { gitea } = await giteaOnFake(t, store.db)
  const h = await startAdmin(t, store.db, { gitea, config: { webhooks: { allow_private: ['127.0.0.1/32'] } } })
  const user = await h.keys.create({ name: 'not admin', type: 'user', scopes: ['orders:read', 'orders:*', 'admin:read', 'admins'] }, { actor: 'test' })
  const revoked = await h.keys.create({ name: 'old admin', type: 'system', scopes: ['admin'] }, { actor: 'test' })
  await h.keys.revoke(revoked.record.id, 'left', { actor: 'test' })
  const before = await h.auditRows()
  let setUpRows = 0 // written by pathFor: the key, deny entry or webhook each case acts on

  for (const op of OPERATIONS) {
    await t.test(`${op.method} ${op.path}`, async (t) => {
      const caseStart = await h.auditRows()
      const path = await pathFor(h, op.path)
      const rowsBefore = await h.auditRows()
      setUpRows += rowsBefore - caseStart
      const body = op.body ? { probe: true } : undefined
      const cases: Array<[string, Promise<Answer>, number, string]> = [
        ['no credential', h.call(op.method, path, { auth: null, ...(body ? { body } : {}) }), 401, 'unauthorized'],
        ['wrong token', h.call(op.method, path, { auth: BOOTSTRAP_TOKEN + 'x' }), 401, 'unauthorized'],
        ['malformed credential', h.call(op.method, path, { auth: 'kg_not-a-key' }), 401, 'unauthorized'],
        ['non-admin key', h.call(op.method, path, { auth: user.key }), 403, 'forbidden'],
        ['revoked admin key', h.call(op.method, path, { auth: revoked.key }), 401, 'unauthorized'],
        ['malformed JSON', h.call(op.method, path, { raw: '{"name": ', headers: { 'content-type': 'application/json' } }), 400, 'bad_request'],
        // An operation with its own, larger limit (the import's is too large to send here): told by Content-Length.
        ['oversized body', op.maxBodyBytes === undefined ? h.call(op.method, path, { raw: JSON.stringify('a'.repeat(MAX_BODY_BYTES)), headers: { 'content-type': 'application/json' } }) : h.declared(op.method, path, op.maxBodyBytes + 1), 413, 'payload_too_large'],
        ['wrong content type', h.call(op.method, path, { raw: 'name=x', headers: { 'content-type': 'application/x-www-form-urlencoded' } }), 415, 'unsupported_media_type'],
      ]
      for (const [what, pending, status, code] of cases) {
        const a = await pending
        refused(t, a, status, code, what)
        await documented(t, h, op, a, what)
        if (status === 401) t.match(a.headers['www-authenticate'], /^Bearer realm="keygate-admin"/, `${what}: WWW-Authenticate`)
      }
      const basic = await h.call(op.method, path, { headers: { authorization: `Basic ${Buffer.from('admin:admin').toString('base64')}` }, auth: null })
      refused(t, basic, 401, 'unauthorized', 'Basic credentials')
      t.equal(await h.auditRows(), rowsBefore, 'no refusal wrote an audit row')
      if (op.method === 'GET' && op.stream) {
        for (const [who, auth] of [['the bootstrap token', BOOTSTRAP_TOKEN], ['an admin key', h.adminKey]] as const) {
          const s = await h.stream(path, { auth })
          t.equal(s.status, op.response.status, `${who} is accepted`)
          t.match(s.headers['content-type'], /^text\/event-stream/, `${who}: an event stream`)
          s.close()
        }
      } else if (op.method === 'GET') {
        const expected = op.tag === 'n8n' ? 503 : op.response.status
        const ok = await h.call(op.method, path, { auth: BOOTSTRAP_TOKEN })
        t.equal(ok.status, expected, 'the bootstrap token is accepted')
        const asKey = await h.call(op.method, path)
        t.equal(asKey.status, expected, 'an admin key is accepted')
        t.same((await servedValidator(h)).answerProblems(op, asKey.status, asKey.json), [], `its ${asKey.status} answer is as /openapi.json documents it`)
        if (op.tag === 'n8n') t.equal(asKey.json.error.code, 'n8n_not_configured')
      }
    })
  }
  t.equal(await h.auditRows(), before + setUpRows, 'audit rows only from the set-up of each case: no refused nor accepted read wrote one')
})

t.test('a body too large is read to its end and dropped (up to 16 MiB): its client, still sending, reads the 413, and the connection stays', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const before = await h.auditRows()
  // 4 MB declared, where the listener takes 1 MiB; the body follows once the answer has come.
  // Before: the answer said connection: close and the connection closed at once, so a client
  // still sending failed (EPIPE) before it read the answer (`api-key import` of a large file said
  // the admin API could not be reached).
  const size = 4 * 1024 * 1024
  const port = Number(new URL(h.url).port)
  // (POST /v1/keys: the import has a limit of its own, past 16 MiB.)
  const head = `POST /v1/keys HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${h.adminKey}\r\nContent-Type: application/json\r\nContent-Length: ${size}\r\n\r\n`
  const received = await converse(port, head + ' '.repeat(64 * 1024), [
    { when: (r) => r.includes('"payload_too_large"'), send: ' '.repeat(size - 64 * 1024) + `GET /v1/stats HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${h.adminKey}\r\n\r\n` },
    { when: (r) => r.split('HTTP/1.1 ').length > 2 && r.endsWith('}'), send: null },
  ])
  const answers = received.split(/(?=HTTP\/1\.1 )/)
  t.match(answers[0], /^HTTP\/1\.1 413 /)
  t.match(answers[0], /admin\.max_body_bytes/)
  t.notMatch(answers[0], /connection: close/i)
  t.match(answers[1], /^HTTP\/1\.1 200 /, 'the next request on the connection is answered')
  t.equal(await h.auditRows(), before, 'nothing written')
})

t.test('a refusal given while the client still sends its body is read whole, and the connection then ends without a reset', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const port = Number(new URL(h.url).port)
  const before = await h.auditRows()
  // Past what the kernel's buffers take on loopback (a few MiB), so that the client is still
  // sending when the answer comes.
  const BODY = 16_000_000
  const admin = `Authorization: Bearer ${h.adminKey}\r\n`
  const json = 'Content-Type: application/json\r\n'
  // Before (found by a review): each closed the connection at once, with the body still coming:
  // the kernel answered the bytes the client went on sending with a reset, and the client lost
  // the refusal (`api-key import` with a wrong token said the admin API could not be reached, EPIPE).
  const cases: Array<[string, string, number, string]> = [
    ['no credential', `POST /v1/keys HTTP/1.1\r\n${json}`, 401, 'unauthorized'],
    ['a wrong token', `POST /v1/keys/import HTTP/1.1\r\nAuthorization: Bearer ${BOOTSTRAP_TOKEN}x\r\n${json}`, 401, 'unauthorized'],
    ['no route', 'POST /nope HTTP/1.1\r\n', 404, 'not_found'],
    ['no route under an open path', 'POST /healthz/x HTTP/1.1\r\n', 404, 'not_found'],
    ['a method the path does not take', `DELETE /v1/stats HTTP/1.1\r\n${admin}`, 405, 'method_not_allowed'],
    ['not JSON', `POST /v1/keys HTTP/1.1\r\n${admin}Content-Type: text/plain\r\n`, 415, 'unsupported_media_type'],
    ['declared past 16 MiB', `POST /v1/keys HTTP/1.1\r\n${admin}${json}`, 413, 'payload_too_large'],
    ['counted past the limit while read', `POST /v1/keys HTTP/1.1\r\n${admin}${json}Transfer-Encoding: chunked\r\n`, 413, 'payload_too_large'],
    // A body too large that is drained (up to 16 MiB), from a client that asked to close the
    // connection (Python's urllib always does; HTTP/1.0): before (found by a review), Node closed
    // it as the 413 was sent, with the body still coming, and urllib got a broken pipe, 10 in 10.
    ['too large, the client asking to close', `POST /v1/keys HTTP/1.1\r\n${admin}${json}Connection: close\r\n`, 413, 'payload_too_large'],
    ['too large, over HTTP/1.0', `POST /v1/keys HTTP/1.0\r\n${admin}${json}`, 413, 'payload_too_large'],
  ]
  for (const [what, start, status, code] of cases) {
    const framing = what === 'declared past 16 MiB' ? 'Content-Length: 40000000\r\n\r\n' : what.startsWith('counted') ? `\r\n${BODY.toString(16)}\r\n` : `Content-Length: ${BODY}\r\n\r\n`
    const got = await uploadWhileAnswered(port, `${start}Host: localhost\r\n${framing}`, BODY)
    t.match(got.text, new RegExp(`^HTTP/1\\.1 ${status} `), `${what}: ${status}`)
    t.match(got.text, new RegExp(`\\r\\n\\r\\n\\{"error":\\{"code":"${code}".*\\}\\}$`), `${what}: the whole answer`)
    t.match(got.text, /\r\nconnection: close\r\n/i, `${what}: Connection: close`)
    t.ok(got.ended, `${what}: the listener ended the connection`)
    t.equal(got.error, undefined, `${what}: without a reset`)
  }
  t.equal(await h.auditRows(), before, 'nothing written')
})

t.test('CONNECT is 405 method_not_allowed, after the answers to the requests before it', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const port = Number(new URL(h.url).port)
  const admin = `Authorization: Bearer ${h.adminKey}\r\n`
  // Before (found by a review): the connection closed without a byte, where every other method
  // without a route is answered 405 (docs/admin.md).
  const alone = await converse(port, 'CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n')
  t.match(alone, /^HTTP\/1\.1 405 /, 'alone: 405')
  t.match(alone, /\r\n\r\n\{"error":\{"code":"method_not_allowed".*\}\}$/, 'with the JSON error')
  t.match(alone, /\r\nconnection: close\r\n/i, 'and the connection closes')
  const after = await converse(port, `GET /v1/stats HTTP/1.1\r\nHost: localhost\r\n${admin}\r\nCONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n${admin}\r\n`)
  const answers = after.split(/(?=HTTP\/1\.1 )/)
  t.match(answers[0], /^HTTP\/1\.1 200 /, 'pipelined after a request: its answer first')
  t.match(answers[1], /^HTTP\/1\.1 405 [^]*"method_not_allowed"/, 'then the 405')
  t.equal(answers.length, 2)
})

t.test('Expect: 100-continue: the route, the credential and the headers are checked before the client is told to send its body', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const port = Number(new URL(h.url).port)
  const json = 'Content-Type: application/json\r\n'
  const admin = `Authorization: Bearer ${h.adminKey}\r\n`
  const expect = (start: string, length: number) => `${start}Host: localhost\r\n${json}Expect: 100-continue\r\nContent-Length: ${length}\r\n\r\n`
  // Before: Node answered 100 Continue at once, to any request, and the client sent the body
  // that was then refused unread.
  for (const [what, start, status] of [
    ['no credential', 'POST /v1/keys HTTP/1.1\r\n', 401],
    ['a wrong token', `POST /v1/keys HTTP/1.1\r\nAuthorization: Bearer ${BOOTSTRAP_TOKEN}x\r\n`, 401],
    ['no route', 'POST /nope HTTP/1.1\r\n', 404],
    ['a method the path does not take', `PUT /v1/keys HTTP/1.1\r\n${admin}`, 405],
    ['a body too large', `POST /v1/keys HTTP/1.1\r\n${admin}`, 413],
  ] as const) {
    // The head alone: the client waits for the 100 (or the answer) before it sends the body.
    const r = await converse(port, expect(start, what === 'a body too large' ? MAX_BODY_BYTES * 2 : 20))
    t.match(r, new RegExp(`^HTTP/1\\.1 ${status} `), `${what}: ${status}, and no 100 before it`)
    t.match(r, /\r\nconnection: close\r\n/i, `${what}: the connection closes (the body was never sent)`)
  }
  const body = JSON.stringify({ name: 'continued', type: 'user' })
  const accepted = await converse(port, expect(`POST /v1/keys HTTP/1.1\r\n${admin}`, body.length), [
    { when: (r) => r.endsWith('\r\n\r\n'), send: body },
    { when: (r) => r.endsWith('}'), send: null },
  ])
  t.match(accepted, /^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 201 /, 'an accepted request is told to continue, and its body read')
  // Any other expectation: before (found by a review), Node's bare 417, without a code or the
  // headers of every answer, and before the Host check.
  const other = await converse(port, `GET /v1/keys HTTP/1.1\r\nHost: localhost\r\n${admin}Expect: something-else\r\n\r\n`)
  t.match(other, /^HTTP\/1\.1 417 /, 'another expectation: 417')
  t.match(other, /"error":\{"code":"expectation_failed","message":"The Expect header names an expectation keygate does not meet \(only 100-continue\)\."/)
  t.match(other, /\r\nx-keygate-admin: 1\r\n/i, 'with the headers of every answer')
  t.match(other, /\r\ncache-control: no-store\r\n/i)
  t.match(other, /\r\nx-request-id: /i)
  t.match(await converse(port, `GET /v1/keys HTTP/1.1\r\nHost: evil.example\r\nExpect: something-else\r\n\r\n`), /^HTTP\/1\.1 421 /, 'the Host is checked first')
  t.ok(operationErrors(OPERATIONS[0]!).includes('expectation_failed'), 'every operation documents it')
})

t.test('the request head is checked as the gateway checks it: HTTP version, transfer coding, Expect, Host (found by a review)', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, { gateway: true })
  const gatewayPort = h.gateway!.port
  const auth = `Authorization: Bearer ${h.adminKey}\r\n`
  const json = 'Content-Type: application/json\r\n'
  // (The gateway keeps the connection of a request without a body it refuses for its Host.)
  const close = 'Connection: close\r\n'
  const body = JSON.stringify({ name: 'framed', type: 'user' })
  const chunked = `${body.length.toString(16)}\r\n${body}\r\n0\r\n\r\n`
  const before = await h.auditRows()
  // Before, the admin listener answered each as any request: the versions 200, the bodies read
  // as chunked (a JSON body sent as `gzip, chunked` made a key), no Host Node's bare 400 (no code,
  // no X-Keygate-Admin), a Host that is no host 421 or, as [::1]x, answered.
  for (const [what, request, status, code, message] of [
    ['HTTP/2.0', `GET /v1/keys HTTP/2.0\r\nHost: 127.0.0.1\r\n${auth}\r\n`, 505, 'version_not_supported', /HTTP\/2\.0 is not supported/],
    ['HTTP/0.9', `GET /v1/keys HTTP/0.9\r\nHost: 127.0.0.1\r\n${auth}\r\n`, 505, 'version_not_supported', /HTTP\/0\.9 is not supported/],
    ['a request line without a version', `GET /v1/keys\r\nHost: 127.0.0.1\r\n${auth}\r\n`, 505, 'version_not_supported', /is not supported/],
    ['gzip, chunked', `POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n${auth}${json}Transfer-Encoding: gzip, chunked\r\n\r\n${chunked}`, 501, 'transfer_coding_not_supported', /\(gzip, chunked\) is not supported/],
    ['HTTP/1.0 with Transfer-Encoding', `POST /v1/keys HTTP/1.0\r\nHost: 127.0.0.1\r\n${auth}${json}Transfer-Encoding: chunked\r\n\r\n${chunked}`, 400, 'bad_request', /HTTP\/1\.0 request must not have a Transfer-Encoding/],
    ['Expect: 100-continue among others', `POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n${auth}${json}Expect: 100-continue, foo\r\nContent-Length: ${body.length}\r\n\r\n`, 417, 'expectation_failed', /only 100-continue/],
    ['no Host (HTTP/1.1)', `GET /v1/keys HTTP/1.1\r\n${auth}${close}\r\n`, 400, 'bad_request', /Host is required/],
    ['an empty Host', `GET /v1/keys HTTP/1.1\r\nHost:\r\n${auth}${close}\r\n`, 400, 'bad_request', /Host is empty/],
    ['a Host that is no host', `GET /v1/keys HTTP/1.1\r\nHost: [::1]x\r\n${auth}${close}\r\n`, 400, 'bad_request', /Host is not a valid host name or address/],
    ['a Host with a path', `GET /v1/keys HTTP/1.1\r\nHost: 127.0.0.1/x\r\n${auth}${close}\r\n`, 400, 'bad_request', /Host is not a valid host name or address/],
  ] as const) {
    const admin = await refusedAlike(t, h, what, request, status, code, message)
    t.equal(admin.headers.connection, 'close', `${what}: the connection closes`)
  }
  t.equal(await h.auditRows(), before, 'no key made')
  // What Node's parser refuses itself is refused alike by both.
  for (const [what, request] of [
    ['a repeated Content-Length', `POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n${auth}${json}Content-Length: ${body.length}\r\nContent-Length: ${body.length}\r\n\r\n${body}`],
    ['Content-Length and Transfer-Encoding', `POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n${auth}${json}Content-Length: ${body.length}\r\nTransfer-Encoding: chunked\r\n\r\n${chunked}`],
    ['chunked twice', `POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n${auth}${json}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n${chunked}`],
    ['obsolete line folding', `GET /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer\r\n ${h.adminKey}\r\n\r\n`],
  ] as const) {
    const admin = await rawAnswer(h.port, request)
    t.match([admin.status, admin.json?.error?.code], [400, 'bad_request'], `${what}: 400`)
    t.match([(await rawAnswer(gatewayPort, request)).status], [400], `${what}: as at the gateway`)
  }
  t.equal(await h.auditRows(), before, 'no key made')
  // What the gateway lets pass, the admin listener does too: an HTTP/1.0 request's Expect is
  // ignored (RFC 9110 §10.1.1; before, 417 here), and it needs no Host.
  t.match(await rawExchange(h.port, `GET /v1/keys HTTP/1.0\r\nHost: 127.0.0.1\r\n${auth}Expect: foo\r\n\r\n`), /^HTTP\/1\.1 200 /, "HTTP/1.0's Expect is ignored")
  t.match(await rawExchange(h.port, `GET /v1/keys HTTP/1.0\r\n${auth}\r\n`), /^HTTP\/1\.1 200 /, 'HTTP/1.0 without Host')
  t.match(await rawExchange(h.port, `POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1\r\n${auth}${json}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n${chunked}`), /^HTTP\/1\.1 201 /, 'chunked alone is read')
  for (const code of ['version_not_supported', 'transfer_coding_not_supported', 'expectation_failed', 'bad_request'] as const) {
    t.ok(OPERATIONS.every((op) => operationErrors(op).includes(code)), `every operation documents ${code}`)
  }
})

t.test('the request target is checked as the gateway checks it (found by a review)', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, { gateway: true })
  const upstream = h.gateway!.upstream
  // The admin key is a key the gateway takes too: what passes its checks is forwarded upstream.
  const get = (target: string, host = 'Host: 127.0.0.1\r\n', version = '1.1') => `GET ${target} HTTP/${version}\r\n${host}Authorization: Bearer ${h.adminKey}\r\nConnection: close\r\n\r\n`
  const keys = (await h.call('GET', '/v1/keys')).json

  t.test('a fragment is 400', async (t) => {
    // Before, the admin listener served `/v1/keys#x` as `/v1/keys` (its URL parser dropped the fragment).
    for (const target of ['/v1/keys#x', '/v1/keys?limit=1#x', '/v1/keys/#', '/healthz#x']) {
      await refusedAlike(t, h, target, get(target), 400, 'bad_request', /^The request target has a fragment \(#\)\.$/)
    }
  })

  t.test('a percent-encoded control character in the path is 400', async (t) => {
    // Before, the admin listener decoded `/v1/keys/a%09b` into the id "a\tb" (404 key_not_found)
    // and refused only a NUL, saying so in its own words.
    for (const target of ['/v1/keys/a%09b', '/v1/keys/a%0d%0ab', '/v1/keys/%7F', '/v1/keys/a%2509b', '/v1/keys/%00', '/v1/stats%09']) {
      await refusedAlike(t, h, target, get(target), 400, 'bad_request', /^The request path has a percent-encoded control character\.$/)
    }
  })

  t.test('an absolute-form target is taken as its origin-form, its host checked against Host', async (t) => {
    // Before, the admin listener refused every one 400, "the request target must be a path"
    // (RFC 9112 §3.2.2: a server MUST accept the absolute form).
    for (const [target, path] of [
      ['http://127.0.0.1/v1/keys', '/v1/keys'],
      ['HTTP://127.0.0.1:80/v1/keys?limit=50', '/v1/keys?limit=50'],
      ['https://127.0.0.1:443/v1/keys', '/v1/keys'],
    ] as const) {
      const admin = await rawAnswer(h.port, get(target))
      t.equal(admin.status, 200, `${target}: 200`)
      t.same(admin.json, keys, `${target}: answered as ${path}`)
      const before = upstream.received.length
      t.equal((await rawAnswer(h.gateway!.port, get(target))).status, 200, `${target}: taken by the gateway too`)
      t.equal(upstream.received[before]?.url, path, `${target}: forwarded as ${path}`)
    }
    t.equal((await rawAnswer(h.port, get('http://127.0.0.1'))).json?.error?.message, 'no admin route /', 'an empty path is /')
    // An HTTP/1.0 request without Host has its target's host as Host.
    t.same((await rawAnswer(h.port, get('http://127.0.0.1/v1/keys', '', '1.0'))).json, keys, 'HTTP/1.0 without Host: answered')
    for (const [what, request, message] of [
      ['another host than Host', get('http://evil.example/v1/keys'), /^An absolute request target must name the same host as Host\.$/],
      ['another port than Host', get(`http://127.0.0.1:${h.port}/v1/keys`), /^An absolute request target must name the same host as Host\.$/],
      ['user information', get('http://user@127.0.0.1/v1/keys'), /must not carry user information/],
      ['a scheme other than http(s)', get('ftp://127.0.0.1/v1/keys'), /^The request target is not valid\.$/],
      ['HTTP/1.0 without Host, a target host that is no host', get('http://a,b/v1/keys', '', '1.0'), /^The request target's host is not a valid host name or address\.$/],
    ] as const) {
      await refusedAlike(t, h, what, request, 400, 'bad_request', message)
    }
    // The admin listener's own rules hold for the host and path an absolute-form target names:
    // a host it does not answer to (in an HTTP/1.0 request without Host, where Host is not
    // checked first) is 421, and two leading slashes 400.
    const misdirected = await rawAnswer(h.port, get('http://evil.example/v1/keys', '', '1.0'))
    t.match([misdirected.status, misdirected.json?.error?.code, misdirected.json?.error?.message], [421, 'host_not_allowed', /does not answer to Host "evil\.example"/], 'HTTP/1.0 without Host, a host not allowed: 421')
    const twoSlashes = await rawAnswer(h.port, get('http://127.0.0.1//x/v1/keys'))
    t.match([twoSlashes.status, twoSlashes.json?.error?.code], [400, 'bad_request'], 'two leading slashes after the authority: 400')
  })

  t.test('asterisk-form, and a target that is neither a path nor absolute, are 400', async (t) => {
    // Before, the admin listener refused them in its own words ("must be a path (one leading slash)").
    for (const [what, request] of [
      ['OPTIONS *', `OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`],
      ['GET *', get('*')],
      ['a ws: URL', get('ws://127.0.0.1/v1/keys')],
    ] as const) {
      await refusedAlike(t, h, what, request, 400, 'bad_request', /^The request target is not valid\.$/)
    }
  })

  t.test('dot segments are 400, also percent-encoded more than once or in fullwidth full stops', async (t) => {
    // Before, the admin listener refused those encoded once in its own words, and read the others
    // as ids (`/v1/keys/%252e%252e` as "%2e%2e", 404 key_not_found).
    for (const [target, message] of [
      ['/v1/x/../keys', /^The request path has dot segments\.$/],
      ['/healthz/%2e%2e/v1/stats', /^The request path has dot segments\.$/],
      ['/v1/./stats', /^The request path has dot segments\.$/],
      ['/v1/keys/%252e%252e', /^The request path has dot segments \(percent-encoded more than once\)\.$/],
      ['/v1/keys/%EF%BC%8E%EF%BC%8E', /^The request path has dot segments \(in a compatibility form/],
    ] as const) {
      await refusedAlike(t, h, target, get(target), 400, 'bad_request', message)
    }
  })

  t.test('a %u escape, and percent-encoded bytes that are not UTF-8, are 400', async (t) => {
    // Before, the admin listener said of those in a path parameter "the path is not validly
    // encoded", and answered a path without one 404.
    for (const [target, message] of [
      ['/v1/keys/%u0061', /has a %u escape/],
      ['/v1/keys/%C0%AE', /not UTF-8 \(or an overlong form\)/],
      ['/v1/keys/%E9', /not UTF-8/],
      ['/v1/stats%FF', /not UTF-8/],
    ] as const) {
      await refusedAlike(t, h, target, get(target), 400, 'bad_request', message)
    }
  })

  t.test('what was answered alike still is: authority-form CONNECT, an encoded slash, an overlong target', async (t) => {
    await refusedAlike(t, h, 'CONNECT', `CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n`, 405, 'method_not_allowed', /^This method is not allowed here\.$/)
    const long = `/v1/keys/${'a'.repeat(17_000)}`
    await refusedAlike(t, h, 'a target past the header limit', get(long), 431, 'headers_too_large', /^The request headers are too large\.$/)
    // An encoded slash is a path like another to both: the id "a/b" here, forwarded as sent there.
    const slash = await rawAnswer(h.port, get('/v1/keys/a%2Fb'))
    t.match([slash.status, slash.json?.error?.code, slash.json?.error?.message], [404, 'key_not_found', /"a\/b"/], '%2F in an id: an id like another')
    const before = upstream.received.length
    t.equal((await rawAnswer(h.gateway!.port, get('/v1/keys/a%2Fb'))).status, 200, '%2F: taken by the gateway')
    t.equal(upstream.received[before]?.url, '/v1/keys/a%2Fb', '%2F: forwarded as sent')
  })
})

t.test('DNS rebinding: the admin listener answers only to IP addresses, localhost and admin.allowed_hosts', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, { config: { lockout: { max_attempts: 5 }, admin: { allowed_hosts: ['keygate-admin.internal'] } } })
  const port = Number(new URL(h.url).port)
  const ask = (host: string, path = '/metrics', auth = '') => converse(port, `GET ${path} HTTP/1.1\r\nHost: ${host}\r\n${auth}Connection: close\r\n\r\n`)
  // Before: a page on http://evil.example:8081, its name rebound to 127.0.0.1, read /metrics and
  // sent bad credentials until the browser's address was locked out of the admin API and the gateway.
  for (const host of ['evil.example', `evil.example:${port}`, 'keygate-admin.internal.evil.example', 'localhost.evil.example']) {
    const refused = await ask(host)
    t.match(refused, /^HTTP\/1\.1 421 /, `Host: ${host} refused`)
    t.match(refused, /"code":"host_not_allowed"/)
  }
  const before = await h.auditRows()
  for (let i = 0; i < 6; i++) t.match(await ask('evil.example', '/v1/keys', 'Authorization: Bearer wrong\r\n'), /^HTTP\/1\.1 421 /)
  t.match(await ask('127.0.0.1', '/v1/keys', `Authorization: Bearer ${h.adminKey}\r\n`), /^HTTP\/1\.1 200 /, 'no failed attempt was counted: the operator is not locked out')
  t.equal(await h.auditRows(), before)
  for (const host of [`127.0.0.1:${port}`, `[::1]:${port}`, 'localhost', `localhost:${port}`, 'app.localhost', 'keygate-admin.internal', 'KEYGATE-ADMIN.internal.:8081', '10.0.0.7:8081']) {
    t.match(await ask(host, '/v1/keys', `Authorization: Bearer ${h.adminKey}\r\n`), /^HTTP\/1\.1 200 /, `Host: ${host} answered`)
  }
  const any = await startAdmin(t, store.db, { config: { admin: { allowed_hosts: ['*'] } } })
  t.match(await converse(Number(new URL(any.url).port), `GET /v1/keys HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer ${any.adminKey}\r\nConnection: close\r\n\r\n`), /^HTTP\/1\.1 200 /, '["*"] answers any Host')
})

t.test('a request target with two leading slashes is refused, not routed by what follows the "host"', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const port = Number(new URL(h.url).port)
  // Before: //x/v1/keys reached the API as /v1/keys (and //x/metrics was /metrics), past a path filter in front.
  for (const target of ['//x/v1/keys', '//x/v1/stats', '//evil.example/v1/keys']) {
    const r = await converse(port, `GET ${target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`)
    t.match(r, /^HTTP\/1\.1 400 /, target)
    t.match(r, /x-content-type-options: nosniff/i)
  }
})

t.test('a request path with dot segments or a backslash is refused 400, not resolved into another route', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const port = Number(new URL(h.url).port)
  const ask = (target: string) => converse(port, `GET ${target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${h.adminKey}\r\nConnection: close\r\n\r\n`)
  // Before: each was served as the route the URL parser resolved it to (/v1/stats, /v1/keys),
  // past a path filter in front of the listener that let /healthz and /metrics through.
  for (const [target, why] of [
    ['/healthz/../v1/stats', /dot segments/],
    ['/healthz/%2e%2e/v1/stats', /dot segments/],
    ['/metrics/%2E%2E/v1/keys', /dot segments/],
    ['/v1/./stats', /dot segments/],
    ['/v1/keys/.', /dot segments/],
    ['/healthz\\..\\v1\\stats', /dot segments/],
    ['/v1\\stats', /backslash/],
  ] as const) {
    const r = await ask(target)
    t.match(r, /^HTTP\/1\.1 400 /, target)
    t.match(r, /"code":"bad_request"/, `${target}: bad_request`)
    t.match(r, why, `${target}: says why`)
  }
  // Dots that are not whole segments, and any in the query, are a path like another.
  t.match(await ask('/v1/keys?name=../..'), /^HTTP\/1\.1 200 /, 'dots in the query')
  t.match(await ask('/v1/keys/a..b'), /^HTTP\/1\.1 404 /, 'dots inside a segment: an id like another')
})

t.test('repeated Authorization and Host lines are refused 400 in either order, not answered by the first', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, { config: { lockout: { max_attempts: 3 } } })
  const port = Number(new URL(h.url).port)
  const ask = (lines: string, path = '/v1/keys') => converse(port, `GET ${path} HTTP/1.1\r\n${lines}Connection: close\r\n\r\n`)
  const before = await h.auditRows()
  // Before: Node kept the first line and dropped the rest: the admin key then garbage was 200, the reverse 401.
  for (const pair of [[`Bearer ${h.adminKey}`, 'Bearer garbage'], ['Bearer garbage', `Bearer ${h.adminKey}`], [`Bearer ${h.adminKey}`, `Bearer ${h.adminKey}`]]) {
    for (let i = 0; i < 4; i++) {
      const r = await ask(`Host: 127.0.0.1\r\nAuthorization: ${pair[0]}\r\nAuthorization: ${pair[1]}\r\n`)
      t.match(r, /^HTTP\/1\.1 400 /, `${pair.join(' then ')}: 400`)
      t.match(r, /"code":"bad_request"/)
      t.match(r, /more than one Authorization credential/)
    }
  }
  t.match(await ask(`Host: 127.0.0.1\r\nAuthorization: Bearer ${h.adminKey}, Bearer garbage\r\n`), /^HTTP\/1\.1 400 /, 'a list in one line is two credentials too')
  t.match(await ask(`Host: 127.0.0.1\r\nAuthorization: Bearer ${h.adminKey}\r\n`), /^HTTP\/1\.1 200 /, 'none of the 13 refusals counted toward the lockout (3 attempts)')
  // Before: Host: 127.0.0.1 then evil.example was answered 200, the reverse 421.
  for (const path of ['/metrics', '/v1/keys']) {
    for (const hosts of [['127.0.0.1', 'evil.example'], ['evil.example', '127.0.0.1'], ['localhost', 'localhost']]) {
      const r = await ask(`Host: ${hosts[0]}\r\nHost: ${hosts[1]}\r\nAuthorization: Bearer ${h.adminKey}\r\n`, path)
      t.match(r, /^HTTP\/1\.1 400 /, `${path}, Host ${hosts.join(' then ')}: 400`)
      t.match(r, /"code":"bad_request"/)
      t.match(r, /Host is repeated/)
    }
  }
  t.equal(await h.auditRows(), before, 'nothing written')
})

t.test("an admin key bound to CIDR ranges is refused from an address outside them, as at the gateway (found by a review)", async (t) => {
  // SPEC §2: a key bound to ranges is rejected when used from anywhere else. The admin listener
  // validates its credential with the request's address (admin/auth.ts); nothing failed when it
  // left the address out, so a bound admin key worked from any address.
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const elsewhere = await h.keys.create({ name: 'admin from elsewhere', type: 'system', scopes: ['admin'], allowed_cidrs: ['192.0.2.0/24'] }, { actor: 'test' })
  const here = await h.keys.create({ name: 'admin from here', type: 'system', scopes: ['admin'], allowed_cidrs: ['127.0.0.0/8'] }, { actor: 'test' })
  refused(t, await h.call('GET', '/v1/keys', { auth: elsewhere.key }), 401, 'unauthorized', 'bound elsewhere')
  t.equal((await h.call('GET', '/v1/keys', { auth: here.key })).status, 200, 'bound to the loopback range: accepted')
})
