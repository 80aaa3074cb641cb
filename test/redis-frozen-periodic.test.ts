// The periodic users of a Redis that is frozen (SIGSTOP) while its connection stays up: with the
// invalidation check off (redis.invalidation_check_ms: 0) nothing reconnects, ioredis holds each
// command sent until its answer, and each must not send more beside what is still unanswered
// (test/redis-frozen-probe.test.ts is the health probe's). What the client sends is counted
// through a gate whose bytes pass both ways.
import t, { type Test } from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { AnomalyDetector } from '../core/anomalies.ts'
import { connectRedis, redisReady } from '../core/redis.ts'
import { silentLogger } from '../core/log.ts'
import { call, until } from './helpers/gateway.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { scratchDir } from './helpers/scratch.ts'
import { isolatedEnv, serve } from './helpers/serve.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import { DEFAULT_CONFIG, memoryDb } from './helpers/stores.ts'
import { gateInFront } from './helpers/tcp-gate.ts'

/** keygate's Redis connection, through a gate, to a redis-server of the test's own. */
async function frozenRedis(t: Test) {
  const server = await startRedisServer(t)
  const { gate, url } = await gateInFront(t, server.url)
  const redis = connectRedis(url, silentLogger, { commandTimeoutMs: 100 })
  t.teardown(() => redis.disconnect())
  t.ok(await redisReady(redis, 10_000), 'connected')
  return { server, gate, redis }
}

t.test("a frozen Redis holds one anomaly check's counts unanswered, not one more pipeline every check; the counts go to Redis again once it thaws (found by a review)", async (t) => {
  // Before: each check sent a script per active key again while the last ones went unanswered
  // (each check waited its 1 s and judged its own counts): 5 checks of 3 keys held 15 scripts,
  // some keys × 1 a second for as long as Redis stayed frozen.
  const { server, gate, redis } = await frozenRedis(t)
  const db = await memoryDb({ migrated: true })
  t.teardown(() => db.close())
  const detector = new AnomalyDetector({ db, thresholds: DEFAULT_CONFIG.anomalies, redis, channel: 'test-frozen-alerts', log: silentLogger, checkIntervalMs: 0, ipv6PrefixBits: 64 })
  t.teardown(() => detector.close())
  const check = async () => {
    for (const k of ['k_a', 'k_b', 'k_c']) detector.count(k, 'forwarded', Date.now(), '192.0.2.1', 200)
    await detector.check()
  }
  await check()
  server.pause()
  t.teardown(() => server.resume())
  const mark = gate.sent().length
  // One script per key and check, each naming the key's per-minute window (`...:{k_a}:r:<minute>`).
  const sent = () => gate.sent().slice(mark).split('}:r:').length - 1
  for (let i = 0; i < 5; i++) await check()
  t.equal(redis.status, 'ready', 'the connection stays up')
  t.equal(sent(), 3, "one check's scripts are out, unanswered; no other check sent beside them")
  server.resume()
  await until(t, "the counts go to Redis again once it answers", async () => {
    await check()
    return sent() > 3
  })
})

t.test("a frozen Redis holds one of an --only admin process's keygate_redis_up writes unanswered, not one more every scrape (found by a review)", async (t) => {
  // Before: each scrape sent the health write again (its script; the transaction waits for the
  // script's answer) beside those unanswered: one more held command a scrape for as long as Redis
  // stayed frozen.
  const server = await startRedisServer(t)
  const { gate, url } = await gateInFront(t, server.url)
  const cwd = scratchDir('keygate-frozen-scrape-')
  writeFileSync(join(cwd, 'keygate.yaml'), 'redis:\n  invalidation_check_ms: 0\n')
  const env = isolatedEnv({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store'), { migrated: true }), KEYGATE_CONFIG: join(cwd, 'keygate.yaml'), REDIS_URL: url, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const served = await serve(t, { env, cwd, args: ['--only', 'admin'], waitFor: { gateway: false } })
  const redisUp = async () => /^keygate_redis_up (\S+)$/m.exec((await call(`${served.admin}/metrics`)).text)?.[1]
  t.equal(await redisUp(), '1', 'Redis takes the write')
  server.pause()
  t.teardown(() => server.resume())
  const mark = gate.sent().length
  // The health write's script names its key; nothing else of an idle admin process does.
  const writes = () => gate.sent().slice(mark).split('keygate:health').length - 1
  for (let i = 0; i < 5; i++) t.equal(await redisUp(), '0', `scrape ${i + 1}: Redis does not answer`)
  t.equal(writes(), 1, 'one write is out, unanswered; no scrape sent another beside it')
  server.resume()
  await until(t, 'keygate_redis_up reads 1 again once Redis answers', async () => (await redisUp()) === '1')
  t.equal(await served.stop(), 0, 'SIGTERM: exit 0')
})

t.test("a frozen Redis holds one anomaly alert's PUBLISH unanswered, not one more for every finding; each alert reaches the channel once it thaws (found by a review)", async (t) => {
  // Before: each finding sent its PUBLISH beside those unanswered, and waited its 1 s for it: 5
  // findings held 5 publishes (one more per finding, for as long as Redis stayed frozen).
  const { server, gate, redis } = await frozenRedis(t)
  const db = await memoryDb({ migrated: true })
  t.teardown(() => db.close())
  const channel = 'test-frozen-publish-alerts'
  const heard: string[] = []
  const listener = connectRedis(server.url, silentLogger)
  t.teardown(() => listener.disconnect())
  listener.on('message', (_c: string, m: string) => heard.push((JSON.parse(m) as { key_id: string }).key_id))
  t.ok(await redisReady(listener, 10_000), 'a listener on the channel')
  await listener.subscribe(channel)
  const thresholds = { ...DEFAULT_CONFIG.anomalies, request_rate_per_min: 1 }
  const detector = new AnomalyDetector({ db, thresholds, redis, channel, log: silentLogger, checkIntervalMs: 0, ipv6PrefixBits: 64 })
  t.teardown(() => detector.close())
  const keys = ['k_a', 'k_b', 'k_c', 'k_d', 'k_e']
  server.pause()
  t.teardown(() => server.resume())
  const mark = gate.sent().length
  const publishes = () => gate.sent().slice(mark).split(channel).length - 1
  // Two requests a key, over the rate of 1 a minute: five findings, judged from this process's counts.
  for (const k of keys) for (let i = 0; i < 2; i++) detector.count(k, 'forwarded', Date.now(), '192.0.2.1', 200)
  await detector.check()
  const rows = await db.query<{ key_id: string }>(`SELECT key_id FROM api_key_anomalies ORDER BY key_id`)
  t.same(rows.map((r) => r.key_id), keys, 'the five findings are recorded')
  for (let i = 0; i < 3; i++) await detector.check()
  t.equal(redis.status, 'ready', 'the connection stays up')
  t.equal(publishes(), 1, "one alert's PUBLISH is out, unanswered; none is sent beside it")
  server.resume()
  await until(t, 'every alert reaches the channel once Redis answers', async () => {
    await detector.check()
    return new Set(heard).size === keys.length
  })
  await detector.check()
  // Its answer follows every message Redis sent the listener before it: those of the check above.
  await listener.ping()
  t.same(heard.sort(), keys, 'each alert once')
})
