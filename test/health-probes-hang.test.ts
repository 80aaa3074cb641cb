// /readyz and /metrics (keygate_store_up) probed and scraped at a Kubernetes and Prometheus rate
// while the PostgreSQL behind `keygate serve` hangs: what the probes take from the store's pool.
import t from 'tap'
import { call } from './helpers/gateway.ts'
import { serveBehindGate } from './helpers/serve-gated.ts'

const SECRETS = { KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'), KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' }
const token = SECRETS.KEYGATE_ADMIN_TOKEN
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
// Little else asks the store on its own meanwhile: no webhook poll, usage flush or scheduler round but the first.
const QUIET = 'webhooks:\n  poll_interval_ms: 600000\nusage:\n  flush_interval_s: 3600\nscheduler:\n  interval_s: 86400\n'

t.test('probes of a hung store hold one connection at a time, their own: an admin call still gets one of the pool, and all is well once the store answers again', async (t) => {
  // Before: each scrape sent the store a query of its own, and /readyz one every 2 s, each
  // holding its connection until the pool's own timeouts (5 to 6 s): at one probe and one scrape
  // a second the probes held the whole pool (10 of 10 by default) within 4 s of the hang, and an
  // admin call or a key lookup waited for a connection ("timeout exceeded when trying to connect"),
  // not for the store, and went on waiting for the probes' dead connections once it answered.
  const { gate, serve } = await serveBehindGate(t, 'probes-hang', QUIET, SECRETS)
  const keys: string[] = []
  for (const name of ['first', 'second']) keys.push((await call(`${serve.admin}/v1/keys`, { method: 'POST', token, body: { name, type: 'user' } })).json.key as string)
  let probing = true
  const answers: string[] = []
  // A readiness probe and two Prometheus servers, each every second.
  const probes = ['/readyz', '/metrics', '/metrics'].map(async (path) => {
    while (probing) {
      void call(`${serve.admin}${path}`).then((a) => answers.push(`${path} ${a.status} ${/^keygate_store_up (\d)$/m.exec(a.text)?.[1] ?? ''}`))
      await sleep(1000)
    }
  })
  // Bytes wait in the gate from here on: a connection that has sent a probe's statement since
  // holds it unanswered, taken from the pool. (One still starting up is not counted: the
  // scheduler's first round, at the start, may be making one too.)
  const before = new Map(gate.open().map((c) => [c, c.sent().length]))
  const holdingProbes = () => gate.open().filter((c) => /transaction_read_only|keygate_migrations/.test(c.sent().slice(before.get(c) ?? 0))).length
  gate.set('paused')
  const held: number[] = []
  // Long enough for the probes of before to fill the pool (within 4 s).
  for (let i = 0; i < 6; i++) {
    await sleep(1000)
    held.push(holdingProbes())
  }
  t.ok(Math.max(...held) <= 1, `at most one connection holds a probe's statement at a time (each second: ${held.join(', ')})`)
  const listed = await call(`${serve.admin}/v1/keys`, { token })
  t.equal(listed.status, 503, listed.text)
  t.notMatch(listed.json.error.message, /timeout exceeded when trying to connect/, 'it got a connection, past the probes')
  t.ok(answers.includes('/readyz 503 '), 'not ready meanwhile')
  t.ok(answers.includes('/metrics 200 0'), 'keygate_store_up 0 meanwhile')
  gate.set('open')
  // The key was never looked up: the gateway asks the store for it.
  const through = await call(`${serve.gateway}/x`, { headers: { authorization: `Bearer ${keys[0]}` } })
  t.equal(through.status, 200, `a key looked up in the store once it answers: ${through.text}`)
  probing = false
  await Promise.all(probes)
  t.equal((await call(`${serve.admin}/readyz`)).status, 200, 'ready')
  t.match((await call(`${serve.admin}/metrics`)).text, /^keygate_store_up 1$/m)
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
})
