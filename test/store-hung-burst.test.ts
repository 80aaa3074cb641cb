// A burst of keys not in the cache from one address while the PostgreSQL behind `keygate serve`
// hangs: the attempts beyond lockout.max_attempts wait for a place (core/lockout.ts), and are
// answered once those ahead of them have met the store's failure, not each given its own wait.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { call } from './helpers/gateway.ts'
import { serveBehindGate } from './helpers/serve-gated.ts'

const SECRETS = { KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'), KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' }

t.test('a burst from one address on a hung store: the attempts that waited for a place are answered 503 once the store failed those ahead, without asking it each in turn (found by a review)', async (t) => {
  // Before: the waiting attempts were let in max_attempts at a time, each group waiting out the
  // store's timeouts (the pool's 5 s to connect, or store.query_timeout_ms) again: 300 keys from
  // one address took 300 s to be answered, 5 every 5 s, the client's connections held meanwhile.
  const { gate, serve } = await serveBehindGate(t, 'hung-burst', 'lockout:\n  max_attempts: 5\nwebhooks:\n  poll_interval_ms: 600000\nusage:\n  flush_interval_s: 3600\nscheduler:\n  interval_s: 86400\n', SECRETS)
  const lookupErrors = async () => Number(/^keygate_store_errors_total\{operation="key_lookup"\} (\d+)$/m.exec((await call(`${serve.admin}/metrics`)).text)?.[1])
  t.equal(await lookupErrors(), 0)
  gate.set('silent')
  const burst = 30
  // Legacy keys (UUID v4), of the right shape and in no cache: each is a look-up in the store.
  const answers = await Promise.all(Array.from({ length: burst }, () => call(`${serve.gateway}/x`, { headers: { 'x-api-key': randomUUID() } })))
  t.same(answers.map((a) => `${a.status} ${a.json?.error?.code}`), Array(burst).fill('503 store_unavailable'), 'every one is answered 503 store_unavailable')
  // The first max_attempts, and one let in after the first of them failed (a single failure answers no waiting attempt 503).
  const asked = await lookupErrors()
  t.ok(asked >= 5 && asked <= 6, `the store was asked for the first max_attempts and at most one more (${asked}); the others were answered once two in a row had failed`)
  gate.set('open')
  const after = await call(`${serve.gateway}/x`, { headers: { 'x-api-key': randomUUID() } })
  t.equal(after.status, 401, `the store is asked again once it answers: ${after.text}`)
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
})
