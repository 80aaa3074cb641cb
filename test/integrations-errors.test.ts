// Fast error paths of the integrations, against small scripted HTTP servers: the shared client's
// timeouts, size bound and redaction, and the n8n session handling (refused, rate-limited, no
// cookie, expired session, public API disabled) without starting n8n.
import t, { type Test } from 'tap'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { IntegrationHttp } from '../core/integrations/http.ts'
import { N8nKeyService } from '../core/integrations/n8n.ts'
import { createOrReport } from '../core/integrations/track.ts'
import { migrate } from '../core/migrate.ts'
import { capturedLogs, freePort, integrationDeps, noSecrets } from './helpers/integrations.ts'
import { unlessHung } from './helpers/gateway.ts'
import { memoryDb, rejection } from './helpers/stores.ts'
import { runCli } from './helpers/cli.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

type Handler = (req: http.IncomingMessage, res: http.ServerResponse, body: string) => void

async function scripted(t: Test, handler: Handler): Promise<string> {
  const server = http.createServer(async (req, res) => {
    let body = ''
    for await (const c of req) body += c
    handler(req, res, body)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  t.teardown(() => {
    server.closeAllConnections()
    return new Promise<void>((r) => server.close(() => r()))
  })
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`
}

function json(res: http.ServerResponse, status: number, body: unknown, headers: http.OutgoingHttpHeaders = {}): void {
  res.writeHead(status, { 'content-type': 'application/json', ...headers })
  res.end(JSON.stringify(body))
}

const db = await memoryDb()
t.teardown(() => db.close())
await migrate(db)
const PASSWORD = 'n8n-Owner-pass-1'
const COOKIE = 'eyJhbGciOiJIUzI1NiJ9.session-cookie-value.signature'

function n8nAt(t: Test, url: string, extra: Record<string, string> = {}): N8nKeyService {
  const service = new N8nKeyService(integrationDeps(db, { N8N_URL: url, N8N_EMAIL: 'owner@example.test', N8N_PASSWORD: PASSWORD, ...extra }))
  t.teardown(() => service.close())
  return service
}

t.test('the shared client', async (t) => {
  t.throws(() => new IntegrationHttp({ service: 'gitea', url: 'http://user:pw@127.0.0.1:1', timeoutMs: 100 }), { code: 'gitea_not_configured', message: /must not carry credentials/ })

  let stall: 'headers' | 'body' | 'big' | 'badjson' = 'headers'
  const url = await scripted(t, (_req, res) => {
    if (stall === 'headers') return // never answers
    if (stall === 'body') {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.write('[')
      return
    }
    if (stall === 'big') {
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.end(Buffer.alloc(5 * 1024 * 1024, 0x61))
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end('{not json')
  })
  const client = new IntegrationHttp({ service: 'n8n', url: `${url}/base/`, timeoutMs: 300 })
  t.teardown(() => client.close())
  t.equal(client.baseUrl, `${url}/base`, 'shown without the trailing slash')
  // Without the timeout these wait for ever (the hang guard says so).
  t.match(await unlessHung(rejection(client.call('GET', '/x'))), { code: 'n8n_timeout', status: 504, message: /did not answer within 300 ms/ }, 'no headers in time')
  stall = 'body'
  t.match(await unlessHung(rejection(client.call('GET', '/x'))), { code: 'n8n_timeout' }, 'a body that stops')
  stall = 'big'
  t.match(await rejection(client.call('GET', '/x')), { code: 'n8n_error', message: /more than 4194304 bytes/ })
  stall = 'badjson'
  t.match(await rejection(client.call('GET', '/x')), { code: 'n8n_error', message: /invalid JSON/ })

  client.secret('hunter2-secret')
  t.equal(client.redact('the password hunter2-secret was\nwrong'), 'the password [redacted] was wrong')
  t.equal(client.redact('x'.repeat(400)).length, 300)
  for (let i = 0; i < 40; i++) client.secret(`verified-token-${i}`, { transient: true })
  t.equal(client.redact('verified-token-39 hunter2-secret'), '[redacted] [redacted]', 'the latest passing secrets and the own credentials are cut')
  t.equal(client.redact('verified-token-0'), 'verified-token-0', 'passing secrets are not kept without bound')
})

t.test('a create whose connection is lost after the request was sent is looked for; one that never connected is not', async (t) => {
  // The service made the key, but the connection dropped before its answer reached keygate (a
  // proxy restarting, a load balancer cutting it, a reset). Before, only a timeout was looked
  // into: this was n8n_unreachable alone, the key left unrecorded and its label taken.
  let received = 0
  const url = await scripted(t, (req) => {
    received++
    req.socket.destroy()
  })
  const deps = integrationDeps(db, { N8N_URL: url })
  const client = new IntegrationHttp({ service: 'n8n', url, timeoutMs: 2000 })
  t.teardown(() => client.close())
  const looked: string[] = []
  const create = (http: IntegrationHttp) =>
    createOrReport({
      service: 'n8n',
      deps,
      what: 'API key "ci"',
      lookAgain: 'if `keygate n8n list` shows one as not recorded, delete it',
      deleteCommand: (id) => `keygate n8n delete ${id}`,
      send: () => http.call('POST', '/rest/api-keys', { json: { label: 'ci' } }),
      find: async () => {
        looked.push(http.baseUrl)
        return 'k-made-1'
      },
    })
  const lost = await rejection(create(client))
  t.equal(received, 1, 'the request reached the service')
  t.same(looked, [url], 'the key was looked for')
  t.match(lost, {
    code: 'n8n_unreachable',
    status: 502,
    message: /^n8n at http:\/\/127\.0\.0\.1:\d+: the connection was lost after the request was sent \([^)]+\): the request to create API key "ci" may have been carried out; n8n now holds one of that name that keygate has no record of \(id k-made-1\): .*delete it with `keygate n8n delete k-made-1`/,
  })

  const down = new IntegrationHttp({ service: 'n8n', url: `http://127.0.0.1:${await freePort()}`, timeoutMs: 2000 })
  t.teardown(() => down.close())
  const refused = await rejection(create(down))
  t.match(refused, { code: 'n8n_unreachable', message: /could not be reached \(ECONNREFUSED\)$/ }, 'a refused connection is passed on as it is')
  t.equal(looked.length, 1, 'and nothing is looked for: no request reached the service')

  // An https URL at a plain-HTTP port: the TLS handshake fails before any request is sent.
  const plain = new IntegrationHttp({ service: 'n8n', url: url.replace('http:', 'https:'), timeoutMs: 2000 })
  t.teardown(() => plain.close())
  const before = received
  const tls = await rejection(create(plain))
  t.match(tls, { code: 'n8n_unreachable', message: /could not be reached \((ERR_SSL_|EPROTO)[A-Z_]*\)$/ }, 'a failed TLS handshake is passed on as it is')
  t.equal(looked.length, 1, 'and nothing is looked for')
  t.equal(received, before, 'no request reached the server')
})

t.test('n8n: refused, rate-limited and odd logins', async (t) => {
  let answer: (res: http.ServerResponse) => void = (res) => json(res, 401, { code: 401, message: 'Wrong username or password. Do you have caps lock on?' })
  const url = await scripted(t, (req, res, body) => {
    if (req.url === '/rest/login') {
      t.same(JSON.parse(body), { emailOrLdapLoginId: 'owner@example.test', password: PASSWORD }, 'the login body')
      return answer(res)
    }
    json(res, 404, { message: 'not found' })
  })
  const keys = n8nAt(t, url)
  t.match(await rejection(keys.list()), { code: 'n8n_auth_failed', status: 502, message: /refused the login of "owner@example\.test" \(N8N_EMAIL\/N8N_PASSWORD\): 401 Wrong username or password/ })
  answer = (res) => json(res, 429, { message: 'Too many requests' })
  t.match(await rejection(keys.list()), { code: 'n8n_error', message: /too many attempts \(429\)/ })
  answer = (res) => json(res, 200, { data: { id: 'u1' } })
  t.match(await rejection(keys.list()), { code: 'n8n_error', message: /set no n8n-auth session cookie/ })
  answer = (res) => json(res, 500, { message: `database said ${PASSWORD} is odd` })
  const odd = await rejection(keys.list())
  t.match(odd, { code: 'n8n_error', message: /refused to log in "owner@example\.test": 500 database said \[redacted\] is odd/ })
  t.notMatch(odd.message, PASSWORD, "a password echoed in the service's message is cut out")
  t.match(await rejection(n8nAt(t, url, { N8N_PASSWORD: '' }).list()), { code: 'n8n_not_configured', message: /set N8N_PASSWORD/ })
})

t.test('n8n: an expired session logs in again once; a disabled public API is named', async (t) => {
  let logins = 0
  let sessionValid = true
  let publicApi = true
  const url = await scripted(t, (req, res) => {
    if (req.url === '/rest/login') {
      logins++
      sessionValid = true
      return json(res, 200, { data: {} }, { 'set-cookie': `n8n-auth=${COOKIE}; Path=/; HttpOnly; SameSite=Lax` })
    }
    if (req.url?.startsWith('/rest/')) {
      if (req.headers.cookie !== `n8n-auth=${COOKIE}` || !sessionValid) return json(res, 401, { status: 'error', message: 'Unauthorized' })
      if (!publicApi) return res.writeHead(404).end()
      return json(res, 200, { data: [] })
    }
    if (req.url?.startsWith('/api/v1/workflows')) {
      const key = req.headers['x-n8n-api-key']
      if (key === 'scope-less-key') return json(res, 403, { message: 'Forbidden' })
      if (!publicApi) return res.writeHead(404).end()
      return json(res, key === 'good-key' ? 200 : 401, key === 'good-key' ? { data: [], nextCursor: null } : { message: 'unauthorized' })
    }
  })
  const keys = n8nAt(t, url)
  t.match(await keys.list(), { items: [] })
  t.equal(logins, 1)
  t.match(await keys.list(), { items: [] })
  t.equal(logins, 1, 'the session is reused')
  sessionValid = false
  t.match(await keys.list(), { items: [] })
  t.equal(logins, 2, 'a refused session means one fresh login')

  t.match(await keys.verify('good-key'), { valid: true })
  t.match(await keys.verify('bad-key'), { valid: false, reason: 'refused' })
  t.match(await keys.verify('scope-less-key'), { valid: true, note: /lacks the workflow:list scope/ })
  publicApi = false
  t.match(await rejection(keys.list()), { code: 'n8n_error', message: /public API is disabled/ })
  t.match(await rejection(keys.verify('good-key')), { code: 'n8n_error', message: /no public API/ })
})

t.test('n8n verify: a 200 that is not n8n\'s workflow list is an n8n_error naming what came back, not "valid"', async (t) => {
  const KEY = 'eyJhbGciOiJIUzI1NiJ9.verify-me-key.signature'
  let answer: (res: http.ServerResponse) => void = (res) => json(res, 200, { data: [], nextCursor: null })
  const url = await scripted(t, (req, res) => {
    if (req.url?.startsWith('/api/v1/workflows') && req.headers['x-n8n-api-key'] === KEY) return answer(res)
    res.writeHead(404).end()
  })
  const keys = n8nAt(t, url)
  t.match(await keys.verify(KEY), { valid: true }, "n8n's own list: valid")
  answer = (res) => json(res, 200, { data: [{ id: 'w1' }], nextCursor: 'MTIz' })
  t.match(await keys.verify(KEY), { valid: true }, 'with a next page too')
  // Before, each of these was reported as a valid key.
  const cases: Array<[string, (res: http.ServerResponse) => void, RegExp]> = [
    ['plain text', (res) => res.writeHead(200, { 'content-type': 'text/plain' }).end('OK'), /answered GET \/api\/v1\/workflows with text \(text\/plain\): "OK", not n8n's workflow list: is N8N_URL n8n's address\?$/],
    ['a page', (res) => res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end('<html><body>Welcome</body></html>'), /with a page of markup \(text\/html\)/],
    ['an empty body', (res) => res.writeHead(200).end(), /with an empty body \(no content type\)/],
    ['other JSON', (res) => json(res, 200, { status: 'ok', items: [] }), /with a JSON object with status, items, not n8n's workflow list/],
    ['a bare list', (res) => json(res, 200, []), /with a JSON list of 0/],
    ['data without nextCursor', (res) => json(res, 200, { data: [] }), /with a JSON object with data, not n8n's workflow list/],
    ['the key echoed', (res) => res.writeHead(200, { 'content-type': 'text/plain' }).end(`hello ${KEY}`), /with text \(text\/plain\): "hello \[redacted\]"/],
  ]
  for (const [what, handler, message] of cases) {
    answer = handler
    const err = await rejection(keys.verify(KEY))
    t.match(err, { code: 'n8n_error', message }, `${what}: refused, named`)
    t.notMatch(err.message, KEY, `${what}: the key is not in the message`)
  }

  // n8n's own 401 and 403 (JSON with a message) are a refused key and a key without the scope; another
  // server's 401 or 403 page says nothing of the key (before, any 403 reported it valid).
  answer = (res) => json(res, 401, { message: 'unauthorized' })
  t.match(await keys.verify(KEY), { valid: false, reason: 'refused' }, "n8n's 401: refused")
  answer = (res) => json(res, 403, { message: 'Forbidden' })
  t.match(await keys.verify(KEY), { valid: true, note: /lacks the workflow:list scope/ }, "n8n's 403: valid, without the scope")
  for (const status of [401, 403]) {
    answer = (res) => res.writeHead(status, { 'content-type': 'text/html' }).end(`<h1>${status}</h1>`)
    t.match(await rejection(keys.verify(KEY)), { code: 'n8n_error', message: new RegExp(`answered GET /api/v1/workflows ${status} with a page of markup \\(text/html\\), not n8n's answer`) }, `a ${status} page: an n8n_error`)
  }

  // The real command: exit 1 with the reason, not exit 0 and "valid".
  answer = (res) => res.writeHead(200, { 'content-type': 'text/plain' }).end('OK')
  const dataDir = await seedDataDir(join(mkdtempSync(join(tmpdir(), 'keygate-n8n-verify-')), 'store'))
  const r = await runCli(['n8n', 'verify', '-', '--json'], { input: `${KEY}\n`, env: { KEYGATE_DATA_DIR: dataDir, DATABASE_URL: undefined, KEYGATE_CONFIG: undefined, KEYGATE_ENCRYPTION_KEY: undefined, KEYGATE_ADMIN_URL: undefined, N8N_URL: url } })
  t.equal(r.code, 1, r.stdout + r.stderr)
  t.match(r.json().error, { code: 'n8n_error', message: /answered GET \/api\/v1\/workflows with text \(text\/plain\): "OK"/ })
  t.notMatch(r.stdout + r.stderr, KEY)
})

t.test('no password or cookie in the logs', async (t) => {
  noSecrets(t, capturedLogs.join('\n'), [PASSWORD, COOKIE], 'captured logs')
})
