// `keygate serve` as a real process wires anomalies and webhooks: a key created through its
// admin API and an address burst through its gateway reach a webhook receiver and the SSE
// stream; the webhook attempts are counted by outcome in /metrics; SIGTERM ends an open stream and exits 0; a delivery queued while the receiver fails
// is sent by the next process started on the same store, whose scheduler seals a webhook secret
// left in plaintext (a row from before migration 0007). With --workers and no Redis, the
// workers' counts are pooled in the primary for the thresholds, a worker's anomaly reaches
// the primary's SSE stream over cluster IPC, and the workers' last check on SIGTERM still does both.
import t, { type Test } from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import pg from 'pg'
import { Agent, request } from 'undici'
import { openDb } from '../core/db.ts'
import { openSse } from './helpers/admin.ts'
import { sleep, startUpstream, until } from './helpers/gateway.ts'
import { connectionPerWorker, serve } from './helpers/serve.ts'
import { freshDatabase } from './helpers/stores.ts'
import { startReceiver, verifiedBy } from './helpers/webhooks.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { scratchDir } from './helpers/scratch.ts'

const TOKEN = 'events-serve-token-0123456789'

t.test('serve: webhooks and the anomaly stream, across a restart', async (t) => {
  const dir = scratchDir('keygate-events-')
  const config = join(dir, 'keygate.yaml')
  writeFileSync(
    config,
    [
      'gateway: { trusted_proxies: ["127.0.0.1/32"] }',
      'anomalies: { check_interval_ms: 100, distinct_addresses_per_hour: 3 }',
      'webhooks: { allow_private: ["127.0.0.1/32"], poll_interval_ms: 100, retry_base_ms: 100 }',
      '',
    ].join('\n'),
  )
  const upstream = await startUpstream(t)
  let failing = true
  const receiver = await startReceiver(t, (hk, res) => res.writeHead(failing && hk.json?.type === 'key.revoked' ? 500 : 204).end())
  const env = {
    DATABASE_URL: undefined,
    REDIS_URL: undefined,
    KEYGATE_ENCRYPTION_KEY: undefined,
    KEYGATE_CONFIG: config,
    KEYGATE_DATA_DIR: await seedDataDir(join(dir, 'store'), { migrated: true }),
    KEYGATE_ADMIN_TOKEN: TOKEN,
    KEYGATE_UPSTREAM: upstream.url,
  }
  const agent = new Agent({ keepAliveTimeout: 1000 })
  t.teardown(() => agent.close())
  const auth = { authorization: `Bearer ${TOKEN}` }
  const call = async (base: string, method: string, path: string, body?: unknown) => {
    const r = await request(base + path, { method: method as 'GET', dispatcher: agent, headers: { ...auth, ...(body ? { 'content-type': 'application/json' } : {}) }, ...(body ? { body: JSON.stringify(body) } : {}) })
    const text = await r.body.text()
    return { status: r.statusCode, json: JSON.parse(text) }
  }

  const first = await serve(t, { env })
  const hook = await call(first.admin, 'POST', '/v1/webhooks', { url: `${receiver.url}/events`, events: ['key.created', 'key.revoked', 'anomaly.detected'] })
  t.equal(hook.status, 201)
  const secret = hook.json.secret as string
  const stream = await openSse(`${first.admin}/v1/anomalies/stream`, auth, agent)
  t.equal(stream.status, 200)

  const key = await call(first.admin, 'POST', '/v1/keys', { name: 'served', type: 'user' })
  const created = await receiver.waitFor((hk) => hk.json?.type === 'key.created' && hk.json.data.key.id === key.json.id)
  t.same(verifiedBy(created, [secret]), [secret], 'key.created, signed')
  t.notOk(created.body.includes(key.json.key), 'without the key')

  for (let i = 1; i <= 5; i++) {
    const r = await request(`${first.gateway}/x`, { dispatcher: agent, headers: { authorization: `Bearer ${key.json.key}`, 'x-forwarded-for': `203.0.113.${i}` } })
    await r.body.dump()
    t.equal(r.statusCode, 200)
  }
  const event = await stream.next()
  const anomaly = JSON.parse(event.data)
  t.match(anomaly, { key_id: key.json.id, type: 'distinct_addresses' }, 'the anomaly on the SSE stream')
  const sent = await receiver.waitFor((hk) => hk.json?.type === 'anomaly.detected')
  t.same(sent.json.data, anomaly, 'and at the webhook')
  const metrics = await (await request(`${first.admin}/metrics`, { dispatcher: agent })).body.text()
  t.match(metrics, /keygate_anomalies_total\{type="distinct_addresses"\} 1\n/, 'counted by type')
  t.match(metrics, /keygate_anomalies_total\{type="request_rate"\} 0\n/)

  // The receiver refuses key.revoked: the delivery stays queued in the store.
  await call(first.admin, 'POST', `/v1/keys/${key.json.id}/revoke`)
  await receiver.waitFor((hk) => hk.json?.type === 'key.revoked')
  // Attempts by outcome (before, found by a review, webhooks had no metric: a receiver failing
  // every delivery showed in the log alone). The refused attempt is counted once it is recorded.
  const attempts = async () => (await (await request(`${first.admin}/metrics`, { dispatcher: agent })).body.text()).match(/^keygate_webhook_attempts_total\{outcome="(delivered|failed)"\} \d+$/gm)?.join('\n') ?? ''
  await until(t, 'the refused attempt counted', async () => /outcome="failed"\} [1-9]/.test(await attempts()), 60_000)
  t.match(await attempts(), /outcome="delivered"\} [2-9]/, 'the attempts delivered (key.created, anomaly.detected) counted')
  t.match(await (await request(`${first.admin}/metrics`, { dispatcher: agent })).body.text(), /^keygate_webhook_deliveries_failed_total 0$/m, 'no delivery given up')
  t.equal(await first.stop('SIGTERM'), 0, 'SIGTERM with a stream open: exit 0')
  await t.rejects(stream.next(), { message: 'the stream ended' }, 'the stream ended')

  // The webhook's row as one written before migration 0007 holds it: the secret in plaintext.
  const store = await openDb({ dataDir: env.KEYGATE_DATA_DIR })
  const [sealed] = await store.query<{ sealed_secret: string }>('SELECT sealed_secret FROM webhooks WHERE id = $1', [hook.json.id])
  t.match(sealed?.sealed_secret, /^[0-9a-f]{16}\./, 'stored sealed by serve')
  await store.query('UPDATE webhooks SET secret = $2, sealed_secret = NULL WHERE id = $1', [hook.json.id, secret])
  await store.close()

  failing = false
  const from = receiver.received.length
  const second = await serve(t, { env })
  // The scheduler's first round, as the admin listener starts, seals it again.
  const round = await second.waitForLog((l) => l.message === 'scheduler run' && (l as any).jobs?.['webhook-secrets'] === 1)
  t.ok(round, "the scheduler's webhook-secrets job sealed the plaintext secret")
  const revoked = await receiver.waitFor((hk) => hk.json?.type === 'key.revoked' && receiver.received.indexOf(hk) >= from)
  t.ok(receiver.received.slice(0, from).some((hk) => hk.id === revoked.id), 'the same delivery the first process tried')
  const delivered = async () => (await call(second.admin, 'GET', `/v1/webhooks/${hook.json.id}/deliveries?status=delivered`)).json.items.find((d: any) => d.id === revoked.id)
  while (!(await delivered())) await sleep(20)
  t.ok((await delivered()).attempts >= 2, 'delivered after the restart, its earlier attempts counted')
  t.same(verifiedBy(revoked, [secret]), [secret], 'signed with the same secret')
  t.equal(await second.stop('SIGTERM'), 0)
  const after = await openDb({ dataDir: env.KEYGATE_DATA_DIR })
  t.matchStrict(await after.query('SELECT secret, sealed_secret FROM webhooks WHERE id = $1', [hook.json.id]), [{ secret: null, sealed_secret: /^[0-9a-f]{16}\./ }], 'no plaintext left')
  await after.close()
})

/** `key` is used through a `--workers 2` gateway from each of `addresses` (one list for each worker). */
async function usedFrom(t: Test, gateway: string, key: string, addresses: [string[], string[]]): Promise<void> {
  const workers = await connectionPerWorker(t, gateway, 2)
  for (const [w, list] of addresses.entries()) {
    for (const address of list) {
      const r = await workers[w]!.request({ method: 'GET', path: '/x', headers: { authorization: `Bearer ${key}`, 'x-forwarded-for': address } })
      await r.body.dump()
      t.equal(r.statusCode, 200)
    }
  }
}

t.test("serve --workers 2 without Redis: the workers' counts are judged together, and the anomaly reaches the primary's stream and webhooks once", async (t) => {
  const dir = scratchDir('keygate-events-')
  const config = join(dir, 'keygate.yaml')
  writeFileSync(config, 'gateway: { trusted_proxies: ["127.0.0.1/32"] }\nanomalies: { check_interval_ms: 100, distinct_addresses_per_hour: 3 }\nwebhooks: { allow_private: ["127.0.0.1/32"], poll_interval_ms: 100 }\n')
  const upstream = await startUpstream(t)
  const receiver = await startReceiver(t)
  const env = {
    DATABASE_URL: await freshDatabase(t),
    REDIS_URL: undefined,
    KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 5).toString('base64'),
    KEYGATE_CONFIG: config,
    KEYGATE_ADMIN_TOKEN: TOKEN,
    KEYGATE_UPSTREAM: upstream.url,
  }
  const agent = new Agent({ keepAliveTimeout: 1000 })
  t.teardown(() => agent.close())
  const auth = { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }
  const served = await serve(t, { env, args: ['--workers', '2'], gateways: 2 })
  const post = async (path: string, body: unknown) => {
    const r = await request(served.admin + path, { method: 'POST', dispatcher: agent, headers: auth, body: JSON.stringify(body) })
    return JSON.parse(await r.body.text())
  }
  await post('/v1/webhooks', { url: `${receiver.url}/w`, events: ['anomaly.detected'] })
  const stream = await openSse(`${served.admin}/v1/anomalies/stream`, { authorization: `Bearer ${TOKEN}` }, agent)
  const key = await post('/v1/keys', { name: 'workers', type: 'user' })
  // Four addresses, two on each worker, under the threshold of three for either alone. The
  // workers' counts are pooled in the primary, so the key's four addresses are one anomaly.
  await usedFrom(t, served.gateway, key.key, [
    ['192.0.2.1', '192.0.2.2'],
    ['192.0.2.3', '192.0.2.4'],
  ])
  const servedBy = new Set(upstream.received.map((r) => r.headers['x-request-id']?.toString().split('-')[0]))
  t.equal(servedBy.size, 2, 'both workers served the key (request ids carry a per-process prefix)')
  const anomaly = JSON.parse((await stream.next()).data)
  t.match(anomaly, { key_id: key.id, type: 'distinct_addresses', details: { addresses: 4 } }, "on the primary's stream, counted over both workers")
  const hook = await receiver.waitFor((hk) => hk.json?.data?.id === anomaly.id)
  t.same(hook.json.data, anomaly)
  t.equal(await served.stop('SIGTERM'), 0)
  t.equal(receiver.received.filter((hk) => hk.json?.data?.key_id === key.id).length, 1, 'one webhook')
  t.same(stream.buffered(), [], 'one SSE event')
})

t.test("serve --workers 2 without Redis: the workers' last check on SIGTERM still pools their counts in the primary and records what it finds", async (t) => {
  const dir = scratchDir('keygate-events-')
  const config = join(dir, 'keygate.yaml')
  // No check before the one at shutdown: the interval is the longest the config allows.
  writeFileSync(config, 'gateway: { trusted_proxies: ["127.0.0.1/32"] }\nanomalies: { check_interval_ms: 600000, distinct_addresses_per_hour: 3 }\n')
  const upstream = await startUpstream(t)
  const databaseUrl = await freshDatabase(t)
  const env = {
    DATABASE_URL: databaseUrl,
    REDIS_URL: undefined,
    KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 6).toString('base64'),
    KEYGATE_CONFIG: config,
    KEYGATE_ADMIN_TOKEN: TOKEN,
    KEYGATE_UPSTREAM: upstream.url,
  }
  const served = await serve(t, { env, args: ['--workers', '2'], gateways: 2 })
  const created = await request(`${served.admin}/v1/keys`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify({ name: 'last-check', type: 'user' }) })
  const key = JSON.parse(await created.body.text())
  // Two IPv4 addresses and two of one IPv6 /64 on each worker: three clients for either alone
  // (the /64 is one client), under the threshold; five over both. Before, each IPv6 address
  // counted on its own, so either worker alone found four, and listed only its own addresses.
  await usedFrom(t, served.gateway, key.key, [
    ['192.0.2.1', '192.0.2.2', '2001:db8:7:7::1', '2001:db8:7:7:8000::2'],
    ['192.0.2.3', '192.0.2.4', '2001:db8:7:7::3', '2001:db8:7:7:ffff::4'],
  ])
  t.equal(new Set(upstream.received.map((r) => r.headers['x-request-id']?.toString().split('-')[0])).size, 2, 'both workers served the key')
  t.equal(await served.stop('SIGTERM'), 0)
  const db = new pg.Client({ connectionString: databaseUrl })
  await db.connect()
  t.teardown(() => db.end())
  const { rows } = await db.query<{ type: string; details: { addresses?: number; seen_here?: string[] } }>('SELECT type, details FROM api_key_anomalies WHERE key_id = $1', [key.id])
  // t.match takes an array as the items it starts with: a second finding (a worker's own) went unseen (found by a review).
  t.equal(rows.length, 1, 'one anomaly')
  t.match(rows, [{ type: 'distinct_addresses', details: { addresses: 5 } }], "judged at shutdown over both workers' counts, the /64 as one client")
  t.same(rows[0]?.details.seen_here?.sort(), ['192.0.2.1', '192.0.2.2', '192.0.2.3', '192.0.2.4', '2001:db8:7:7::/64'], "it lists the clients of both workers, from the primary's window")
})

t.test('serve killed (SIGKILL) in the middle of revocations: every revocation that committed has its key.revoked delivery queued', async (t) => {
  // Before, the delivery was written after the commit, by a listener of the change: a review
  // killed keygate after 20 of 30 concurrent revocations had answered, and found 19 answered
  // revocations in the store with no key.revoked delivery, after a restart too. Now the delivery
  // is written in the revocation's own transaction.
  const stores: Record<string, () => Promise<Record<string, string | undefined>>> = {
    postgres: async () => ({ DATABASE_URL: await freshDatabase(t), KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64') }),
    embedded: async () => ({ DATABASE_URL: undefined, KEYGATE_ENCRYPTION_KEY: undefined, KEYGATE_DATA_DIR: await seedDataDir(join(scratchDir('keygate-crash-'), 'store'), { migrated: true }) }),
  }
  for (const [name, storeEnv] of Object.entries(stores)) {
    await t.test(name, async (t) => {
      const env: Record<string, string | undefined> = { ...(await storeEnv()), REDIS_URL: undefined, KEYGATE_ADMIN_TOKEN: TOKEN, KEYGATE_UPSTREAM: 'http://127.0.0.1:9', KEYGATE_WEBHOOK_ALLOW_PRIVATE: '127.0.0.1/32' }
      const agent = new Agent({ connections: 64 })
      t.teardown(() => agent.close())
      const call = async (base: string, path: string, body?: unknown) => {
        const r = await request(base + path, { method: 'POST', dispatcher: agent, headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify(body ?? {}) })
        return { status: r.statusCode, json: JSON.parse(await r.body.text()) }
      }
      const served = await serve(t, { env })
      // A receiver that is never there: the deliveries stay queued, for the store to show.
      t.equal((await call(served.admin, '/v1/webhooks', { url: 'http://127.0.0.1:9/revoked', events: ['key.revoked'] })).status, 201)
      const ids: string[] = []
      for (let i = 0; i < 30; i++) ids.push((await call(served.admin, '/v1/keys', { name: `crash ${i}`, type: 'service' })).json.id)
      const answered: string[] = []
      let killed = false
      await new Promise<void>((resolve) => {
        for (const id of ids) {
          call(served.admin, `/v1/keys/${id}/revoke`, {}).then(
            (r) => {
              if (r.status === 200 && !killed) answered.push(id)
              if (answered.length >= 10 && !killed) {
                killed = true
                served.child.kill('SIGKILL')
                resolve()
              }
            },
            () => {},
          )
        }
      })
      await served.exited
      const db = await openDb(env.DATABASE_URL ? { databaseUrl: env.DATABASE_URL } : { dataDir: env.KEYGATE_DATA_DIR as string })
      t.teardown(() => db.close())
      const revoked = (await db.query<{ id: string }>(`SELECT id FROM api_keys WHERE status = 'revoked' AND id = ANY($1) ORDER BY id`, [ids])).map((r) => r.id)
      const queued = (await db.query<{ id: string }>(`SELECT payload::json->'data'->'key'->>'id' AS id FROM webhook_deliveries WHERE event_type = 'key.revoked' ORDER BY 1`)).map((r) => r.id)
      t.ok(answered.every((id) => revoked.includes(id)), `every answered revocation (${answered.length}) is in the store (${revoked.length} revoked)`)
      t.same(queued, revoked, 'each revoked key has its key.revoked delivery, and no other key has one')
    })
  }
})
