// A burst of admin requests from one address while the PostgreSQL behind `keygate serve` hangs:
// the attempts beyond lockout.max_attempts wait for a place (core/lockout.ts), and are answered
// once the store failed those ahead of them, as the gateway's are (test/store-hung-burst.test.ts).
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { openDb } from '../core/db.ts'
import { createLogger, STORE_QUIET_MS } from '../core/log.ts'
import { BOOTSTRAP_TOKEN, startAdmin } from './helpers/admin.ts'
import { call } from './helpers/gateway.ts'
import { serveBehindGate } from './helpers/serve-gated.ts'
import { holdTable, migratedDatabase, setOnDatabase } from './helpers/stores.ts'

const TOKEN = 'an-admin-token-of-32-characters!'
const SECRETS = { KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'), KEYGATE_ADMIN_TOKEN: TOKEN }

t.test('admin credentials from one address on a hung store: those that waited for a place are answered 503 once the store failed those ahead, without asking it each in turn (found by a review)', async (t) => {
  // Before: let in max_attempts at a time, each group waiting out the store's 5 s to connect
  // again: 30 requests were answered 5 every 5 s, the last after 30 s.
  const { gate, serve } = await serveBehindGate(t, 'admin-hung-burst', 'lockout:\n  max_attempts: 5\nwebhooks:\n  poll_interval_ms: 600000\nusage:\n  flush_interval_s: 3600\nscheduler:\n  interval_s: 86400\n', SECRETS)
  gate.set('silent')
  const burst = 30
  // Legacy keys (UUID v4): each is a look-up in the store. The bootstrap token among them needs no
  // store, and GET /v1/lockouts asks none.
  // A malformed credential asks none either, and is answered 401 as ever (before, found by a
  // review, 503 behind the failures).
  const credentials = Array.from({ length: burst }, (_, i) => (i === 20 ? TOKEN : i === 25 ? 'not-a-key' : randomUUID()))
  const answers = await Promise.all(credentials.map((token) => call(`${serve.admin}/v1/lockouts`, { token })))
  t.equal(answers[20]?.status, 200, `the token is still compared: ${answers[20]?.text}`)
  t.equal(answers[25]?.status, 401, `a malformed credential is refused as ever: ${answers[25]?.text}`)
  const others = answers.filter((_, i) => i !== 20 && i !== 25)
  t.same(others.map((a) => `${a.status} ${a.json?.error?.code}`), Array(burst - 2).fill('503 store_unavailable'), 'every key is answered 503 store_unavailable')
  const asked = others.filter((a) => !/while this one waited its turn/.test(a.json?.error?.message))
  // The first max_attempts, and one let in after the first of them failed (a single failure answers no waiting attempt 503).
  t.ok(asked.length >= 5 && asked.length <= 6, `the store was asked for the first max_attempts and at most one more (${asked.length}): ${[...new Set(asked.map((a) => a.json?.error?.message))].join('; ')}`)
  gate.set('open')
  const after = await call(`${serve.admin}/v1/lockouts`, { token: randomUUID() })
  t.equal(after.status, 401, `the store is asked again once it answers: ${after.text}`)
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
})

t.test('admin credentials from one address while look-ups fail with an error of PostgreSQL that is no outage: those that waited are answered 503 once the store failed those ahead, as at the gateway (found by a review)', async (t) => {
  // The key table held by another session (a migration, a VACUUM FULL) past the role's
  // lock_timeout: each look-up fails after it with SQLSTATE 55P03, which is not store_unavailable.
  // The gateway counts any failed look-up (gateway/validate.ts storeDown); before, the admin API
  // counted store_unavailable alone, and let these in max_attempts at a time, each group waiting
  // out the lock_timeout again.
  const { url } = await migratedDatabase(t)
  await setOnDatabase(url, 'lock_timeout', '300ms')
  const db = await openDb({ databaseUrl: url })
  t.teardown(() => db.close())
  const h = await startAdmin(t, db, { config: { lockout: { max_attempts: 5 } } })
  const held = await holdTable(t, url, 'api_keys')
  const answers = await Promise.all(Array.from({ length: 30 }, () => h.call('GET', '/v1/lockouts', { auth: randomUUID() })))
  await held.release()
  const asked = answers.filter((a) => !/while this one waited its turn/.test(a.json?.error?.message))
  t.ok(asked.length >= 5 && asked.length <= 6, `the store was asked for the first max_attempts and at most one more (${asked.length}): ${[...new Set(asked.map((a) => `${a.status} ${a.json?.error?.code}`))].join('; ')}`)
  // Those that asked too, as at the gateway: before (found by a review), 500 internal_error.
  t.same(asked.map((a) => `${a.status} ${a.json?.error?.code}`), Array(asked.length).fill('503 store_unavailable'), 'those that asked it are answered 503 store_unavailable')
  t.same(
    answers.filter((a) => !asked.includes(a)).map((a) => `${a.status} ${a.json?.error?.code}`),
    Array(30 - asked.length).fill('503 store_unavailable'),
    'the others are answered 503 store_unavailable without asking it',
  )
  const after = await h.call('GET', '/v1/lockouts', { auth: randomUUID() })
  t.equal(after.status, 401, `the store is asked again once it answers: ${JSON.stringify(after.json)}`)
})

t.test('an admin credential whose look-up fails with an error of PostgreSQL keygate does not name (the key table gone: 42P01) is answered 503 store_unavailable, as at the gateway, and the error logged with it (found by a review)', async (t) => {
  // Before: rethrown, and answered 500 internal_error, where the gateway answers any failed
  // look-up 503 store_unavailable (gateway/validate.ts storeDown).
  const { url, direct } = await migratedDatabase(t)
  const db = await openDb({ databaseUrl: url })
  t.teardown(() => db.close())
  const lines: string[] = []
  const h = await startAdmin(t, db, { log: createLogger({ level: 'debug', write: (line) => void lines.push(line) }) })
  await direct.exec('ALTER TABLE api_keys RENAME TO api_keys_away')
  const ids: unknown[] = []
  for (const [what, credential, method, body] of [
    ['an unknown key', randomUUID(), 'GET', undefined],
    ['the admin key', h.adminKey, 'GET', undefined],
    ['the admin key, with a body', h.adminKey, 'POST', { name: 'never', type: 'service' }],
  ] as const) {
    const a = await h.call(method, method === 'GET' ? '/v1/lockouts' : '/v1/keys', { auth: credential, ...(body ? { body } : {}) })
    t.equal(`${a.status} ${a.json?.error?.code}`, '503 store_unavailable', `${what}: ${JSON.stringify(a.json)}`)
    ids.push(a.json?.error?.request_id)
    const message = String(a.json?.error?.message)
    t.match(message, /^the key store failed the credential look-up \(SQLSTATE 42P01\)/, `${what}: says what failed`)
    // Where the error is: an outage's first at warn, the others at debug (before, "the error is in
    // keygate's log", which a log at info showed for the first alone).
    t.match(message, /keygate's log has the error: at warn with an outage's first 503, at debug with each after it\)$/, `${what}: says where it is logged`)
    t.notMatch(message, /api_keys|SELECT|\n\s+at /, `${what}: neither SQL, nor the driver's words, nor a stack trace`)
  }
  // The error with each answer (admin/server.ts): once at warn, then at debug, as every 503
  // store_unavailable. Before (found by a review), at error for each request, a line a request
  // for as long as the table was missing.
  const logged = lines.map((l) => JSON.parse(l) as { level: string; request_id?: string; route?: string; cause?: { code?: string; message?: string } })
  t.same(
    logged.map((l) => [l.level, l.cause?.code, l.request_id, l.route]),
    [
      ['warn', '42P01', ids[0], '/v1/lockouts'],
      ['debug', '42P01', ids[1], '/v1/lockouts'],
      ['debug', '42P01', ids[2], '/v1/keys'],
    ],
    `logged with the error and the request's id: ${lines.join('')}`,
  )
  t.match(logged[0]?.cause?.message, /relation "api_keys" does not exist/)
  await direct.exec('ALTER TABLE api_keys_away RENAME TO api_keys')
  t.equal((await h.call('GET', '/v1/lockouts')).status, 200, 'the store is asked again once it answers')
})

t.test('a 503 store_unavailable of an admin route is logged: at warn once an outage, with the request id, the route and the cause, each after it at debug, and its end at info (found by a review)', async (t) => {
  // Before: admin/server.ts answered every KeygateError without a log line, and GET /v1/keys
  // while api_keys was held past a database lock_timeout was a 503 with nothing in keygate's log.
  const { url } = await migratedDatabase(t)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const db = await openDb({ databaseUrl: url })
  t.teardown(() => db.close())
  const lines: string[] = []
  let clock = Date.now()
  const h = await startAdmin(t, db, { log: createLogger({ level: 'debug', write: (line) => void lines.push(line) }), now: () => new Date(clock) })
  type Line = { level: string; message: string; request_id?: string; method?: string; route?: string; failed?: number; err?: { code?: string; message?: string }; cause?: { code?: string; message?: string } }
  const logged = () => lines.map((l) => JSON.parse(l) as Line)
  const held = await holdTable(t, url, 'api_keys')
  const ids: string[] = []
  for (let i = 0; i < 3; i++) {
    const a = await h.call('GET', '/v1/keys', { auth: BOOTSTRAP_TOKEN })
    t.equal(`${a.status} ${a.json?.error?.code}`, '503 store_unavailable', `GET /v1/keys while api_keys is held: ${JSON.stringify(a.json)}`)
    ids.push(String(a.json?.error?.request_id))
  }
  t.same(
    logged().map((l) => [l.level, l.request_id, l.method, l.route, l.err?.code, l.cause?.code]),
    [
      ['warn', ids[0], 'GET', '/v1/keys', 'store_unavailable', '55P03'],
      ['debug', ids[1], 'GET', '/v1/keys', 'store_unavailable', '55P03'],
      ['debug', ids[2], 'GET', '/v1/keys', 'store_unavailable', '55P03'],
    ],
    `one warning for the outage, each answer after it at debug: ${lines.join('')}`,
  )
  const [first] = logged()
  t.match(first?.message, /503 store_unavailable.*logged once until/)
  t.match(first?.err?.message, /could not take a lock the statement needs \(SQLSTATE 55P03, lock_timeout\)/, 'the error says what failed')
  t.match(first?.cause?.message, /lock timeout/, "and its cause is PostgreSQL's own")
  // Answers that do not ask the store say nothing of it. Before (found by a read-back), a probe's
  // GET of a route without the store 10 s after the last 503 logged the outage's end while the
  // store was still held, and so did a 401 of a request without a credential.
  clock += STORE_QUIET_MS
  lines.length = 0
  t.equal((await h.call('GET', '/openapi.json', { auth: null })).status, 200)
  t.equal((await h.call('GET', '/v1/keys', { auth: null })).status, 401)
  // Nor does an admin API operation that the bootstrap token (checked without the store) reaches
  // and that asks the lockouts held in memory alone. Before (found by a review), every operation
  // of the admin API counted as the store's, so GET /v1/lockouts ended the outage.
  t.equal((await h.call('GET', '/v1/lockouts', { auth: BOOTSTRAP_TOKEN })).status, 200)
  // Nor the anomaly stream's HEAD, which asks nothing of the store (and whose GET opens the stream
  // on a store that cannot be read all the same).
  t.equal((await h.call('HEAD', '/v1/anomalies/stream', { auth: BOOTSTRAP_TOKEN })).status, 200)
  t.same(logged(), [], `answers without the store do not end the outage: ${lines.join('')}`)
  clock -= STORE_QUIET_MS
  await held.release()
  lines.length = 0
  t.equal((await h.call('GET', '/v1/keys', { auth: BOOTSTRAP_TOKEN })).status, 200)
  t.same(logged(), [], 'an answer right after the outage says nothing yet')
  clock += STORE_QUIET_MS
  t.equal((await h.call('GET', '/v1/keys', { auth: BOOTSTRAP_TOKEN })).status, 200)
  t.same(logged().map((l) => [l.level, l.failed]), [['info', 3]], `its end is said once, ${STORE_QUIET_MS / 1000} s after the last 503: ${lines.join('')}`)
  lines.length = 0
  t.equal((await h.call('GET', '/v1/keys', { auth: BOOTSTRAP_TOKEN })).status, 200)
  const again = await holdTable(t, url, 'api_keys')
  t.equal((await h.call('GET', '/v1/keys', { auth: BOOTSTRAP_TOKEN })).status, 503)
  await again.release()
  t.same(logged().map((l) => l.level), ['warn'], 'a new outage is warned of again')
})
