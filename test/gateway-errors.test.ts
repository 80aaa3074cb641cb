// Every status and code of SPEC §3 as the gateway answers it, and the rule that a response
// never tells which kind of bad key it was.
import t, { type Test } from 'tap'
import http from 'node:http'
import net from 'node:net'
import { ERRORS } from '../core/errors.ts'
import { generateKey } from '../core/keys/format.ts'
import { createLockout, type Lockout } from '../core/lockout.ts'
import { createLogger, STORE_QUIET_MS } from '../core/log.ts'
import { request } from 'undici'
import { answerOf, bearer, followRaw, listen, makeConfig, openStore, rawExchange, sleep, startGateway, ACTOR, type Answer, type RawOutcome } from './helpers/gateway.ts'
import { KeyService } from '../core/keys/service.ts'
import { keyServiceOptions } from '../core/runtime.ts'
import { watchedDb } from './helpers/stores.ts'
import { switchingHead, WS_OFFER } from './helpers/websocket.ts'

function isError(t: Test, a: Answer, code: keyof typeof ERRORS) {
  t.equal(a.status, ERRORS[code].status, `${code}: status`)
  t.equal(a.json?.error?.code, code, `${code}: code`)
  t.type(a.json?.error?.message, 'string')
  t.match(a.json?.error?.request_id, /^[A-Za-z0-9.:-]+$/)
  t.equal(a.headers['x-request-id'], a.json?.error?.request_id, 'request id header matches the body')
  t.match(a.headers['content-type'], /^application\/json/)
}

t.test('key_missing and every bad key answer alike', async (t) => {
  const h = await startGateway(t, { sharedStore: true, config: { lockout: { max_attempts: 1000, window_s: 60 } } })
  const good = await h.key()
  const revoked = await h.key()
  await h.keys.revoke(revoked.id, 'test', ACTOR)
  const expiring = await h.key({ expires_at: new Date(Date.now() + 1500).toISOString() })
  const wrongSecret = generateKey('kg_', good.id).key

  const missing = await h.get('/x')
  isError(t, missing, 'key_missing')
  t.equal(missing.headers['www-authenticate'], 'Bearer realm="keygate"')
  t.equal(missing.json?.error?.message, 'An API key is required: send it in the Authorization header ("Bearer <key>") or the X-API-Key header.', 'where the key goes')
  // Without Authorization among the sources: no Bearer challenge a client would follow in vain
  // (before, found by a review), and the message names the sources taken.
  const headerOnly = await startGateway(t, { sharedStore: true, config: { gateway: { key_sources: ['x-api-key', 'query'] } } })
  const unkeyed = await headerOnly.get('/x')
  isError(t, unkeyed, 'key_missing')
  t.equal(unkeyed.headers['www-authenticate'], 'ApiKey realm="keygate"')
  t.equal(unkeyed.json?.error?.message, 'An API key is required: send it in the X-API-Key header or the api_key query parameter.')
  const badKey = await headerOnly.get('/x', { 'x-api-key': wrongSecret })
  isError(t, badKey, 'key_invalid')
  t.equal(badKey.headers['www-authenticate'], 'ApiKey realm="keygate", error="invalid_token"')
  // A key sent without "Bearer " (or a Basic credential) is no key, and the answer says how to send one.
  for (const authorization of [good.key, `Basic ${Buffer.from(`u:${good.key}`).toString('base64')}`]) {
    const notBearer = await h.get('/x', { authorization })
    isError(t, notBearer, 'key_missing')
    t.match(notBearer.json?.error?.message, 'send the key as "Authorization: Bearer <key>"')
    t.notMatch(notBearer.text, good.key.slice(3), 'nothing of the header is echoed')
  }

  t.equal((await h.get('/x', bearer(good.key))).status, 200)
  await sleep(1600)
  const answers = {
    unknown: await h.get('/x', bearer(generateKey('kg_').key)),
    wrongSecret: await h.get('/x', bearer(wrongSecret)),
    revoked: await h.get('/x', bearer(revoked.key)),
    malformed: await h.get('/x', bearer('not-a-key')),
    expired: await h.get('/x', bearer(expiring.key)),
    legacyUnknown: await h.get('/x', { 'x-api-key': '3b241101-e2bb-4255-8caf-4136c566a962' }),
  }
  const shape = (a: Answer) => ({
    status: a.status,
    code: a.json?.error?.code,
    message: a.json?.error?.message,
    keys: Object.keys(a.json?.error ?? {}).sort(),
    headerNames: Object.keys(a.headers).filter((n) => n !== 'date').sort(),
    auth: a.headers['www-authenticate'],
    length: a.text.length - String(a.json?.error?.request_id).length,
  })
  const first = shape(answers.unknown)
  t.equal(first.code, 'key_invalid')
  t.equal(first.auth, 'Bearer realm="keygate", error="invalid_token"')
  for (const [kind, a] of Object.entries(answers)) {
    isError(t, a, 'key_invalid')
    t.same(shape(a), first, `${kind} is indistinguishable`)
  }
  // With a body too (found by a review): a key answered from the cache (the expired one) was
  // refused before the body was read, with `connection: close`, and one looked up in the store
  // after, with keep-alive, so a leaked key that had once been valid could be told apart.
  const agent = new http.Agent({ keepAlive: true })
  t.teardown(() => agent.destroy())
  const post = (key: string) =>
    new Promise<{ status: number; headers: http.IncomingHttpHeaders }>((resolve, reject) => {
      const req = http.request(`${h.url}/x`, { method: 'POST', agent, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' } }, (res) => {
        res.resume()
        res.on('end', () => resolve({ status: res.statusCode as number, headers: res.headers }))
      })
      req.on('error', reject)
      req.end('{"some":"body"}')
    })
  const withBody = {
    unknown: await post(generateKey('kg_').key),
    wrongSecret: await post(generateKey('kg_', good.id).key),
    expired: await post(expiring.key),
    malformed: await post('not-a-key'),
  }
  const framing = (a: { headers: http.IncomingHttpHeaders }) => ({ connection: a.headers.connection, keepAlive: a.headers['keep-alive'], names: Object.keys(a.headers).filter((n) => n !== 'date').sort() })
  for (const [kind, a] of Object.entries(withBody)) {
    t.equal(a.status, 401, `${kind} with a body: 401`)
    t.same(framing(a), framing(withBody.unknown), `${kind} with a body: the same framing headers`)
  }

  const text = await h.metrics.registry.metrics()
  t.match(text, /keygate_bad_key_attempts_total\{reason="unknown"\} 3/)
  t.match(text, /keygate_bad_key_attempts_total\{reason="expired"\} 2/)
  t.match(text, /keygate_bad_key_attempts_total\{reason="revoked"\} 1/)
  t.match(text, /keygate_bad_key_attempts_total\{reason="malformed"\} 2/)
  t.match(text, /keygate_bad_key_attempts_total\{reason="wrong_secret"\} 2/)
  t.notMatch(text, /kg_/)
})

t.test('reveal_key_status answers key_revoked and key_expired', async (t) => {
  let clock: number | undefined
  const h = await startGateway(t, { sharedStore: true, config: { gateway: { reveal_key_status: true } }, now: () => new Date(clock ?? Date.now()) })
  const revoked = await h.key()
  await h.keys.revoke(revoked.id, undefined, ACTOR)
  isError(t, await h.get('/', bearer(revoked.key)), 'key_revoked')
  const rotated = await h.key({ type: 'emergency' })
  await h.keys.rotate(rotated.id, {}, ACTOR)
  isError(t, await h.get('/', bearer(rotated.key)), 'key_revoked')
  // The gateway's clock is moved past an expiry an hour out: before, the key expired 3 s after it
  // was made, and its creation and a request had to come within them (a window a stall of the
  // loaded suite could close).
  const expiresAt = Date.now() + 3_600_000
  const soon = await h.key({ expires_at: new Date(expiresAt).toISOString() })
  t.equal((await h.get('/', bearer(soon.key))).status, 200)
  clock = expiresAt - 1
  t.equal((await h.get('/', bearer(soon.key))).status, 200, 'valid until its expiry')
  clock = expiresAt
  isError(t, await h.get('/', bearer(soon.key)), 'key_expired')
  clock = undefined
  isError(t, await h.get('/', bearer('garbage')), 'key_invalid')
})

t.test('ip_blocked, scope_denied, route_not_found, bad_request', async (t) => {
  const h = await startGateway(t, {
    config: { deny_list: ['10.9.0.0/16'] },
    routes: [
      { name: 'orders', path: '/orders', upstream: '{upstream}', scopes: ['orders:read'] },
      { name: 'open', path: '/open', upstream: '{upstream}' },
      { name: 'orders-admin', path: '/orders-admin', upstream: '{upstream}', scopes: ['orders-admin'] },
    ],
  })
  const k = await h.key({ scopes: ['billing'] })
  isError(t, await h.get('/orders/1', bearer(k.key)), 'scope_denied')
  isError(t, await h.get('/nowhere', bearer(k.key)), 'route_not_found')
  t.equal((await h.get('/open/x', bearer(k.key))).status, 200)
  const wild = await h.key({ scopes: ['orders:*'] })
  t.equal((await h.get('/orders/1', bearer(wild.key))).status, 200)
  // orders:* grants the scopes under `orders:`, not every scope that begins with `orders`.
  isError(t, await h.get('/orders-admin/1', bearer(wild.key)), 'scope_denied')

  const other = await h.key()
  const two = await h.get('/open', { ...bearer(k.key), 'x-api-key': other.key })
  isError(t, two, 'bad_request')
  t.match(two.json.error.message, /more than one/)
  t.equal((await h.get('/open', { ...bearer(k.key), 'x-api-key': k.key })).status, 200, 'the same key twice is fine')

  const bound = await h.key({ allowed_cidrs: ['192.0.2.0/24'] })
  isError(t, await h.get('/open', bearer(bound.key)), 'ip_blocked')
  const boundHere = await h.key({ allowed_cidrs: ['127.0.0.0/8'] })
  t.equal((await h.get('/open', bearer(boundHere.key))).status, 200)

  await h.denyList.add({ cidr: '127.0.0.1' }, ACTOR)
  isError(t, await h.get('/open', bearer(k.key)), 'ip_blocked')
})

t.test('a cached key bound to CIDR ranges is judged again for each client address (found by a review)', async (t) => {
  // The binding's answer is remembered for the last address (gateway/validate.ts); nothing failed
  // when it was remembered for every address after the first, so a bound key, once used from an
  // allowed address, went on working from anywhere while cached.
  const h = await startGateway(t, { config: { gateway: { trusted_proxies: ['127.0.0.1'] } } })
  const bound = await h.key({ allowed_cidrs: ['192.0.2.0/24'] })
  const sibling = await h.key({ allowed_cidrs: ['192.0.2.0/24'] })
  const from = (key: string, address: string) => h.get('/x', { ...bearer(key), 'x-forwarded-for': address })
  t.equal((await from(bound.key, '192.0.2.7')).status, 200, 'from inside the range')
  isError(t, await from(bound.key, '198.51.100.7'), 'ip_blocked')
  isError(t, await from(sibling.key, '198.51.100.8'), 'ip_blocked')
  t.equal((await from(bound.key, '192.0.2.8')).status, 200, 'from inside again')
  isError(t, await from(bound.key, '::ffff:198.51.100.7'), 'ip_blocked')
  t.equal((await from(sibling.key, '::ffff:192.0.2.9')).status, 200, 'an IPv4-mapped address inside the range')
  isError(t, await from(sibling.key, '198.51.100.9'), 'ip_blocked')
})

t.test('a WebSocket upgrade from a deny-listed address is refused ip_blocked before the upstream sees it (found by a review)', async (t) => {
  // SPEC §3: upgrades are proxied after the same checks. The upgrade path runs the request stages
  // itself (gateway/index.ts); nothing failed when it ran them without the deny list stage.
  const h = await startGateway(t, { config: { gateway: { trusted_proxies: ['127.0.0.1'] }, deny_list: ['198.51.100.0/24'] } })
  const offered: string[] = []
  h.upstream.server.on('upgrade', (req, socket: net.Socket) => {
    offered.push(String(req.headers['x-forwarded-for']))
    socket.end(switchingHead(req))
  })
  const k = await h.key()
  const offer = (from: string) =>
    rawExchange(h.port, `GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${k.key}\r\nX-Forwarded-For: ${from}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n${WS_OFFER}\r\n`)
  t.match(await offer('192.0.2.7'), /^HTTP\/1\.1 101 /, 'an address outside the deny list is switched')
  const denied = await offer('198.51.100.7')
  t.match(denied, /^HTTP\/1\.1 403 /)
  t.match(denied, /"code":"ip_blocked"/)
  t.same(offered, ['192.0.2.7, 127.0.0.1'], 'only the allowed upgrade reached the upstream')
})

t.test('a second key in a repeated or comma-joined credential line is bad_request', async (t) => {
  // Over a raw socket: the client libraries join or refuse repeated lines themselves.
  const h = await startGateway(t)
  const a = (await h.key()).key
  const b = (await h.key()).key
  const send = async (...lines: string[]) => {
    const raw = await rawExchange(h.port, `GET /x HTTP/1.1\r\nHost: x\r\n${lines.map((l) => `${l}\r\n`).join('')}Connection: close\r\n\r\n`)
    return { status: Number(/^HTTP\/1\.1 (\d{3}) /.exec(raw)?.[1]), code: /"code":"([a-z_]+)"/.exec(raw)?.[1], message: /"message":"([^"]*)"/.exec(raw)?.[1] }
  }
  const twoKeys = {
    'two Authorization lines': [`Authorization: Bearer ${a}`, `Authorization: Bearer ${b}`],
    'two Bearer keys in one Authorization line': [`Authorization: Bearer ${a}, Bearer ${b}`],
    'a second key after a comma, without Bearer': [`Authorization: Bearer ${a}, ${b}`],
    'a second key after an empty element': [`Authorization: Bearer ${a}, , ${b}`],
    'a wrong second key after a comma': [`Authorization: Bearer ${a},nope`],
    'a working key, then one that is not': [`Authorization: Bearer ${a}`, 'Authorization: Bearer nope'],
    'two X-API-Key lines': [`X-API-Key: ${a}`, `X-API-Key: ${b}`],
    'two keys in one X-API-Key line': [`X-API-Key: ${a}, ${b}`],
  }
  for (const [what, lines] of Object.entries(twoKeys)) {
    t.match(await send(...lines), { status: 400, code: 'bad_request', message: /more than one API key/ }, `${what}: 400 bad_request`)
  }
  const sameKey = {
    'two Authorization lines': [`Authorization: Bearer ${a}`, `Authorization: Bearer ${a}`],
    'one Authorization line': [`Authorization: Bearer ${a}, Bearer ${a}`],
    'one Authorization line, the second without Bearer': [`Authorization: Bearer ${a}, ${a}`],
    'a Bearer key and a Basic credential': [`Authorization: Bearer ${a}`, 'Authorization: Basic dXNlcjpwYXNz'],
    'two X-API-Key lines': [`X-API-Key: ${a}`, `X-API-Key: ${a}`],
    'one X-API-Key line': [`X-API-Key: ${a}, ${a}`],
  }
  for (const [what, lines] of Object.entries(sameKey)) t.equal((await send(...lines)).status, 200, `the same key twice, ${what}: 200`)
})

t.test('rate_limited and ip_locked_out', async (t) => {
  const h = await startGateway(t, { sharedStore: true, config: { rate_limits: { per_address: { limit: 3, window_s: 60 } }, lockout: { max_attempts: 2, window_s: 60 } } })
  const k = await h.key()
  for (let i = 0; i < 3; i++) t.equal((await h.get('/', bearer(k.key))).status, 200)
  const limited = await h.get('/', bearer(k.key))
  isError(t, limited, 'rate_limited')
  t.ok(Number(limited.headers['retry-after']) >= 1)

  const h2 = await startGateway(t, { sharedStore: true, config: { lockout: { max_attempts: 2, window_s: 60 } } })
  isError(t, await h2.get('/', bearer('nope')), 'key_invalid')
  isError(t, await h2.get('/', bearer('nope')), 'key_invalid')
  const locked = await h2.get('/', bearer((await h2.key()).key))
  isError(t, locked, 'ip_locked_out')
  t.ok(Number(locked.headers['retry-after']) > 50)
  t.equal(locked.json?.error?.message, `Too many failed attempts from this address; try again in ${locked.headers['retry-after']} s.`, 'the message says how long, as Retry-After does')
})

t.test('upstream_unavailable, upstream_timeout, store_unavailable', async (t) => {
  const closed = http.createServer()
  const deadPort = await listen(closed)
  await new Promise((r) => closed.close(r))
  const h = await startGateway(t, {
    upstream: (req, res) => {
      if (req.url === '/slow') setTimeout(() => res.end('late'), 1500).unref()
      else if (req.url === '/reset') req.socket.destroy()
      else res.end('ok')
    },
    routes: [
      { name: 'dead', path: '/dead', upstream: `http://127.0.0.1:${deadPort}` },
      // The short timeout on the path meant to reach it alone: on a busy machine, an answer of
      // the others could take 300 ms.
      { name: 'slow', path: '/slow', upstream: '{upstream}', timeout_ms: 300 },
      { name: 'live', path: '/', upstream: '{upstream}' },
    ],
  })
  const k = await h.key()
  isError(t, await h.get('/dead', bearer(k.key)), 'upstream_unavailable')
  isError(t, await h.get('/reset', bearer(k.key)), 'upstream_unavailable')
  // The upstream answers 200 at 1.5 s: a route timeout (300 ms) not applied is told by the status.
  isError(t, await h.get('/slow', bearer(k.key)), 'upstream_timeout')
  // With a body: Node has destroyed the request by the time the upstream fails (its body read),
  // and the failure was taken for a client gone: no answer at all, for ever.
  for (const [path, code] of [['/reset', 'upstream_unavailable'], ['/slow', 'upstream_timeout']] as const) {
    for (const method of ['POST', 'PUT'] as const) {
      const res = await request(`${h.url}${path}`, { method, body: 'x=1', headers: { ...bearer(k.key), 'content-type': 'application/x-www-form-urlencoded' }, dispatcher: h.agent, bodyTimeout: 10_000, headersTimeout: 10_000 })
      isError(t, await answerOf(res), code)
    }
  }
  t.equal((await h.get('/fine', bearer(k.key))).status, 200, 'the gateway still works')

  const uncached = await h.key()
  await h.db.close()
  isError(t, await h.get('/fine', bearer(uncached.key)), 'store_unavailable')
  t.equal((await h.get('/fine', bearer(k.key))).status, 200, 'a cached key keeps working while the store is down')
})

t.test('a store outage is one warning while look-ups fail, and one line when they succeed again (found by a chaos review: a warning a request)', async (t) => {
  const lines: string[] = []
  const config = makeConfig({ routes: [{ name: 'api', path: '/', upstream: 'http://127.0.0.1:9' }] })
  const base = await openStore(t, config)
  const { w, wrap } = watchedDb()
  const db = wrap(base.db)
  const keys = new KeyService({ db, audit: base.audit, ...keyServiceOptions(config) })
  let clock = Date.now()
  const h = await startGateway(t, { store: { ...base, db, keys }, now: () => new Date(clock), log: createLogger({ level: 'info', write: (line) => lines.push(line) }) })
  const made = await Promise.all([1, 2, 3, 4, 5, 6, 7, 8].map(() => h.key()))
  const ask = async (i: number) => (await h.get('/x', bearer((made[i] as { key: string }).key))).json?.error?.code
  w.down = true
  for (let i = 0; i < 4; i++) t.equal(await ask(i), 'store_unavailable')
  const said = () => lines.map((l) => JSON.parse(l) as { level: string; message: string }).filter((l) => l.message.startsWith('key store look-up'))
  t.same(said().map((l) => l.level), ['warn'], 'one warning for four failed look-ups')
  t.match(said()[0]?.message, /logged once until look-ups succeed again/)
  // Now and then: one look-up succeeds, the next fails. Still the same outage (found by a
  // read-back: a warning and an info line each time).
  w.down = false
  t.not(await ask(4), 'store_unavailable', 'one look-up succeeds')
  w.down = true
  t.equal(await ask(5), 'store_unavailable', 'the next fails')
  t.same(said().map((l) => l.level), ['warn'], 'still the one warning, and no end said')
  w.down = false
  clock += STORE_QUIET_MS
  t.not(await ask(6), 'store_unavailable', 'the store answers again')
  t.same(said().map((l) => [l.level, l.message]), [['warn', said()[0]?.message], ['info', 'key store look-ups succeed again']], `its end is said once look-ups have gone ${STORE_QUIET_MS / 1000} s without a failure`)
  t.not(await ask(7), 'store_unavailable')
  t.equal(said().length, 2, 'and nothing more')
})

t.test('an upstream response that breaks off after its head: the client connection is closed, and it is logged and counted (found by a review)', async (t) => {
  const lines: string[] = []
  const h = await startGateway(t, {
    log: createLogger({ level: 'warn', write: (line) => lines.push(line) }),
    upstream: (req, res) => {
      res.writeHead(200, { 'content-type': 'text/plain' })
      res.write('part of the answer\n')
      // A reset mid-body, or a pause past the route's timeout between two chunks.
      if (req.url === '/reset') setTimeout(() => req.socket.destroy(), 50)
    },
    // The short timeout on the path meant to reach it alone (as above).
    routes: [
      { name: 'stall', path: '/stall', upstream: '{upstream}', timeout_ms: 300 },
      { name: 'live', path: '/', upstream: '{upstream}' },
    ],
  })
  const k = await h.key()
  for (const path of ['/reset', '/stall']) {
    const res = await request(`${h.url}${path}`, { headers: bearer(k.key), dispatcher: h.agent })
    t.equal(res.statusCode, 200, `${path}: the head was passed on`)
    await t.rejects(res.body.text(), { name: 'SocketError', code: 'UND_ERR_SOCKET' }, `${path}: the body ends short, as the client sees it`)
  }
  const metrics = await h.metrics.registry.metrics()
  for (const route of ['live', 'stall']) {
    t.match(metrics, new RegExp(`keygate_upstream_cut_off_total\\{route="${route}"\\} 1\n`))
    t.match(metrics, new RegExp(`keygate_gateway_requests_total\\{route="${route}",outcome="forwarded"\\} 1\n`), 'counted forwarded at the head, as before')
  }
  const warned = lines.map((l) => JSON.parse(l)).filter((l) => l.message === 'upstream response broke off after its head was passed on; the client connection is closed')
  t.equal(warned.length, 2, 'one warning each')
  t.match(warned[0], { route: 'live', request_id: String })
})

t.test('an upstream answer that breaks off after its head but before any of its body is answered 502 or 504, not a bare close (found by an upstream fuzzing review)', async (t) => {
  // Node holds a response head back until the first byte of its body: before, such an answer
  // reached the client as a closed connection and nothing else, and was counted forwarded with the
  // upstream's status and logged as broken off "after its head was passed on", which it never was.
  const lines: string[] = []
  const h = await startGateway(t, {
    sharedStore: true,
    log: createLogger({ level: 'warn', write: (line) => lines.push(line) }),
    upstream: (req, res) => {
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '10' })
      res.flushHeaders()
      // A reset right after the head, or no body at all within the route's timeout.
      if (req.url === '/reset') setTimeout(() => req.socket.destroy(), 50)
    },
    routes: [
      { name: 'stall', path: '/stall', upstream: '{upstream}', timeout_ms: 300 },
      { name: 'live', path: '/', upstream: '{upstream}' },
    ],
  })
  const k = await h.key()
  for (const [path, status, code] of [['/reset', 502, 'upstream_unavailable'], ['/stall', 504, 'upstream_timeout']] as const) {
    const text = await rawExchange(h.port, `GET ${path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ${k.key}\r\nConnection: close\r\n\r\n`)
    t.match(text, new RegExp(`^HTTP/1\\.1 ${status} `), `${path}: answered ${status}`)
    let body: { error?: { code?: string; request_id?: string } } | undefined
    try {
      body = JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4))
    } catch {}
    t.equal(body?.error?.code, code, `${path}: ${code}`)
    t.match(text, new RegExp(`\r\nx-request-id: ${body?.error?.request_id ?? 'none'}\r\n`, 'i'), 'with its request id')
  }
  const metrics = await h.metrics.registry.metrics()
  t.match(metrics, /keygate_gateway_requests_total\{route="live",outcome="upstream_unavailable"\} 1\n/)
  t.match(metrics, /keygate_gateway_requests_total\{route="stall",outcome="upstream_timeout"\} 1\n/)
  t.match(metrics, /keygate_gateway_requests_total\{route="live",outcome="forwarded"\} 0\n[^]*keygate_gateway_requests_total\{route="stall",outcome="forwarded"\} 0\n|keygate_gateway_requests_total\{route="stall",outcome="forwarded"\} 0\n[^]*keygate_gateway_requests_total\{route="live",outcome="forwarded"\} 0\n/, 'not counted forwarded')
  t.notMatch(metrics, /keygate_upstream_cut_off_total\{route="(live|stall)"\} [1-9]/, 'nor cut off')
  t.match(metrics, /keygate_upstream_responses_total\{route="live",class="2xx"\} 1\n/, 'the upstream did answer')
  t.equal(lines.map((l) => JSON.parse(l)).filter((l) => l.message.startsWith('upstream response broke off')).length, 0, 'no break after a head passed on is logged')
})

t.test("an upstream's answer other than 101 to a WebSocket upgrade that breaks off after its head: the same, within the route's timeout (found by a review)", async (t) => {
  // Before, such a break was neither logged nor counted, and a pause waited for undici's own
  // body timeout of 300 s, not the route's timeout_ms.
  const lines: string[] = []
  const h = await startGateway(t, {
    sharedStore: true,
    log: createLogger({ level: 'warn', write: (line) => lines.push(line) }),
    routes: [
      { name: 'stall', path: '/stall', upstream: '{upstream}', timeout_ms: 300 },
      { name: 'live', path: '/', upstream: '{upstream}' },
    ],
  })
  h.upstream.server.on('upgrade', (req: http.IncomingMessage, socket: net.Socket) => {
    socket.on('error', () => {})
    socket.write('HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\npart of the answer\n')
    if (req.url === '/reset') setTimeout(() => socket.destroy(), 50)
    else t.teardown(() => socket.destroy())
  })
  const k = await h.key()
  for (const path of ['/reset', '/stall']) {
    const out: RawOutcome = { text: '', ended: false, error: undefined }
    const client = net.connect(h.port, '127.0.0.1', () =>
      client.write(`GET ${path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ${k.key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`),
    )
    await followRaw(client, out, () => {})
    t.match(out.text, /^HTTP\/1\.1 403 [^]*\r\n\r\npart of the answer\n$/, `${path}: the head and what came of the body were passed on`)
    t.ok(out.ended || out.error !== undefined, `${path}: the gateway closed the connection (not the test's hang guard)`)
  }
  const metrics = await h.metrics.registry.metrics()
  for (const route of ['live', 'stall']) {
    t.match(metrics, new RegExp(`keygate_upstream_cut_off_total\\{route="${route}"\\} 1\n`))
    t.match(metrics, new RegExp(`keygate_gateway_requests_total\\{route="${route}",outcome="forwarded"\\} 1\n`), 'counted forwarded at the head')
  }
  const warned = lines.map((l) => JSON.parse(l)).filter((l) => l.message === 'upstream response broke off after its head was passed on; the client connection is closed')
  t.equal(warned.length, 2, 'one warning each')
})

t.test("an upstream's answer other than 101 to a WebSocket upgrade that breaks off after its head but before any of its body: 502 or 504, as any answer's (found by a review)", async (t) => {
  // Before, such an answer's head was written on the client's socket as it came, so the client
  // got a 401 head and then a closed connection, counted forwarded and logged as cut off.
  const lines: string[] = []
  const sockets: net.Socket[] = []
  let seen: (sock: net.Socket) => void = () => {}
  const upstream = net.createServer((sock) => {
    sockets.push(sock)
    sock.on('error', () => {})
    let buf = ''
    sock.setEncoding('latin1').on('data', (d: string) => {
      buf += d
      if (!buf.includes('\r\n\r\n')) return
      const path = buf.slice(0, buf.indexOf('\r\n')).split(' ')[1]
      sock.write('HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n', 'latin1')
      if (path === '/gone') seen(sock)
      // A close right after the head, or no body at all within the route's timeout.
      if (path === '/reset') setTimeout(() => sock.destroy(), 50)
    })
  })
  await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const sock of sockets) sock.destroy()
    upstream.close()
  })
  const origin = `http://127.0.0.1:${(upstream.address() as net.AddressInfo).port}`
  const h = await startGateway(t, {
    sharedStore: true,
    log: createLogger({ level: 'warn', write: (line) => lines.push(line) }),
    routes: [
      { name: 'stall', path: '/stall', upstream: origin, timeout_ms: 300 },
      { name: 'live', path: '/', upstream: origin },
    ],
  })
  const k = await h.key()
  for (const [path, status, code, message] of [
    ['/reset', 502, 'upstream_unavailable', "The upstream's answer broke off before any of its body came."],
    ['/stall', 504, 'upstream_timeout', "The upstream's answer brought none of its body in time."],
  ] as const) {
    const text = await rawExchange(h.port, `GET ${path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ${k.key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n${WS_OFFER}\r\n`)
    t.match(text, new RegExp(`^HTTP/1\\.1 ${status} `), `${path}: answered ${status}, not the upstream's 401 head`)
    t.notMatch(text, /HTTP\/1\.1 401 /, `${path}: nothing of the upstream's head`)
    t.match(text, /\r\nconnection: close\r\n/i, `${path}: the connection closed after it`)
    let body: { error?: { code?: string; message?: string; request_id?: string } } | undefined
    try {
      body = JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4))
    } catch {}
    t.equal(body?.error?.code, code, `${path}: ${code}`)
    t.equal(body?.error?.message, message, `${path}: the message of an ordinary answer's`)
  }
  // A client that goes away while the head is held is seen (it is still read until the head is
  // passed on), and the upstream's answer aborted: recorded client_closed, as an ordinary
  // request's client gone before its head.
  const answered = new Promise<net.Socket>((resolve) => (seen = resolve))
  const out: RawOutcome = { text: '', ended: false, error: undefined }
  const client = net.connect(h.port, '127.0.0.1', () =>
    client.write(`GET /gone HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ${k.key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n${WS_OFFER}\r\n`),
  )
  const followed = followRaw(client, out, () => {})
  const upstreamSide = await answered
  // The head has reached the gateway (a moment for it to arrive) when the client leaves.
  await sleep(100)
  client.end()
  await new Promise((resolve) => upstreamSide.once('close', resolve))
  await followed
  t.equal(out.text, '', 'the client got nothing of the held head')
  const metrics = await h.metrics.registry.metrics()
  t.match(metrics, /keygate_gateway_requests_total\{route="live",outcome="client_closed"\} 1\n/, 'a client gone while the head was held: client_closed, the upstream aborted')
  t.match(metrics, /keygate_gateway_requests_total\{route="live",outcome="upstream_unavailable"\} 1\n/)
  t.match(metrics, /keygate_gateway_requests_total\{route="stall",outcome="upstream_timeout"\} 1\n/)
  t.notMatch(metrics, /keygate_gateway_requests_total\{route="(live|stall)",outcome="forwarded"\} [1-9]/, 'not counted forwarded')
  t.notMatch(metrics, /keygate_upstream_cut_off_total\{route="(live|stall)"\} [1-9]/, 'nor cut off')
  t.match(metrics, /keygate_upstream_responses_total\{route="live",class="4xx"\} 2\n/, 'the upstream did answer')
  t.match(metrics, /keygate_upstream_responses_total\{route="stall",class="4xx"\} 1\n/)
  t.equal(lines.map((l) => JSON.parse(l)).filter((l) => l.message.startsWith('upstream response broke off')).length, 0, 'no break after a head passed on is logged')
})

t.test('a stage that throws is answered 500 internal_error, without its detail, and the gateway goes on', async (t) => {
  // A real lockout whose look-up breaks once.
  const real = createLockout({ maxAttempts: 5, windowS: 60 })
  let breakNext = true
  const lockout: Lockout = {
    lockedFor: (k) => {
      if (breakNext) {
        breakNext = false
        throw new Error('lockout table broke')
      }
      return real.lockedFor(k)
    },
    recordFailure: (k) => real.recordFailure(k),
    attempt: (k) => real.attempt(k),
    finish: (k, failed) => real.finish(k, failed),
    applyMessage: (m) => real.applyMessage(m),
    lift: (k) => real.lift(k),
    load: () => real.load(),
    inForce: () => real.inForce(),
    held: () => real.held(),
    counting: () => real.counting(),
    reload: () => real.reload(),
  }
  const h = await startGateway(t, { lockout })
  const k = await h.key()
  const broken = await h.get('/x', bearer(k.key))
  isError(t, broken, 'internal_error')
  t.notMatch(broken.text, /lockout table broke|\n\s+at /, 'no error detail or stack to the client')
  t.equal(h.upstream.received.length, 0, 'nothing forwarded')
  t.equal((await h.get('/x', bearer(k.key))).status, 200, 'the next request is forwarded')
})

t.test('keys made under an earlier keys.prefix: refused once it changes alone, accepted when it is in keys.previous_prefixes; new keys take the new one', async (t) => {
  // Before (found by a review), keys.prefix was the one prefix accepted: changing it refused
  // every key made before, with no way to keep them.
  const store = await openStore(t, makeConfig({ routes: [] }))
  const { key: old } = await store.keys.create({ name: 'made under kg_', type: 'user' }, ACTOR)
  const under = (keys: Record<string, unknown>) => {
    const config = { keys }
    return startGateway(t, { config, store: { ...store, keys: new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(makeConfig({ ...config, routes: [] })) }) } })
  }
  const alone = await under({ prefix: 'acme_' })
  t.equal((await alone.get('/', bearer(old))).status, 401, 'the prefix changed alone: the old key is refused (as documented)')
  const kept = await under({ prefix: 'acme_', previous_prefixes: ['kg_'] })
  t.equal((await kept.get('/', bearer(old))).status, 200, 'listed in previous_prefixes: accepted')
  t.equal((await kept.keys.validate(old)).valid, true, 'by the key service too (the CLI, the admin API)')
  const fresh = await kept.key()
  t.ok(fresh.key.startsWith('acme_'), 'a new key takes the new prefix')
  t.equal((await kept.get('/', bearer(fresh.key))).status, 200)
  t.equal((await kept.get('/', bearer(generateKey('zz_').key))).status, 401, 'a prefix in neither is refused')
  t.equal((await alone.get('/', bearer(fresh.key))).status, 200, 'the new key on the instance with the new prefix alone')
})
