// Invalidation over Redis is at-most-once; these tests lose messages on purpose and watch the
// gateway notice: a version that skips ahead, a counter ahead of the last message, a counter
// reset (deleted behind the gateways' backs), a subscriber
// connection killed (CLIENT KILL TYPE pubsub). Each time a key revoked behind the gateway's back
// (a KeyService that tells no one, with a cache TTL of an hour) stops working. Also: a publish
// made while Redis is down goes out when it is back, a gateway started while Redis is down (to it:
// a TCP gate drops its connections) counts and logs it as a switch to the insurance and flushes at
// its first subscription, and a frozen Redis (SIGSTOP) hands the
// limits to the insurance limiter with a metric and a log line, and takes them back. Each test
// runs its own redis-server.
import t, { type Test } from 'tap'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { bindInvalidationPublisher, INVALIDATION_VERSION_KEY, INVALIDATION_CHANNEL, publishInvalidation } from '../core/invalidation.ts'
import { KeyService } from '../core/keys/service.ts'
import { createLogger } from '../core/log.ts'
import { connectRedis, redisReady } from '../core/redis.ts'
import { keyServiceOptions } from '../core/runtime.ts'
import { ACTOR, bearer, makeConfig, metric, openStore, startGateway, until, type Harness } from './helpers/gateway.ts'
import { startRedisServer, type RedisServer } from './helpers/redis-server.ts'
import { isolatedEnv, serve, type LogLine } from './helpers/serve.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { gateInFront } from './helpers/tcp-gate.ts'

interface Setup {
  server: RedisServer
  redis: Redis
  /** A separate client for the test's own commands. */
  other: Redis
  gateway: Harness
  /** Changes the store without telling anyone. */
  silent: KeyService
  logs: LogLine[]
}

async function setup(t: Test, config: Record<string, unknown>, commandTimeoutMs?: number): Promise<Setup> {
  const server = await startRedisServer(t)
  const logs: LogLine[] = []
  const log = createLogger({ level: 'debug', write: (line) => logs.push(JSON.parse(line) as LogLine) })
  const redis = connectRedis(server.url, log, commandTimeoutMs ? { commandTimeoutMs } : {})
  const other = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => {
    redis.disconnect()
    other.disconnect()
  })
  // The store check off: these tests watch what Redis alone does (test/invalidation-backstop.test.ts watches the check).
  const full = { cache: { ttl_s: 3600, store_check_s: 0 }, ...config }
  const store = await openStore(t, makeConfig({ ...full, routes: [] }))
  const gateway = await startGateway(t, { config: full, store, redis, log })
  const silent = new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(gateway.config) })
  await until(t, 'the gateway subscribed', async () => Number(((await other.pubsub('NUMSUB', INVALIDATION_CHANNEL)) as [string, number])[1]) >= 1)
  return { server, redis, other, gateway, silent, logs }
}

/** A key cached by the gateway, then revoked where the gateway cannot hear it. */
async function staleKey(t: Test, s: Setup): Promise<string> {
  const { key, record } = await s.silent.create({ name: 'stale', type: 'user' }, ACTOR)
  t.equal((await s.gateway.get('/', bearer(key))).status, 200, 'the key works and is cached')
  await s.silent.revoke(record.id, undefined, ACTOR)
  t.equal((await s.gateway.get('/', bearer(key))).status, 200, 'revoked silently: still served from the cache')
  return key
}

t.test('a version that skips ahead flushes the cache', async (t) => {
  const s = await setup(t, { redis: { invalidation_check_ms: 0 } })
  const key = await staleKey(t, s)
  await publishInvalidation(s.other, 'key:nothing00001')
  await s.other.incr(INVALIDATION_VERSION_KEY) // a publish whose message never arrived
  await publishInvalidation(s.other, 'key:nothing00002')
  await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401)
  t.equal(await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'gap' }), 1)
  t.ok(s.logs.some((l) => l.message.startsWith('flushed the key cache') && l.reason === 'gap'), 'logged with its reason')
})

t.test('a counter ahead of the last message seen flushes the cache', async (t) => {
  const s = await setup(t, { redis: { invalidation_check_ms: 100 } })
  const key = await staleKey(t, s)
  await s.other.incr(INVALIDATION_VERSION_KEY) // the last publish was lost: no later message shows the gap
  await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401)
  t.ok((await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'missed' })) >= 1)
})

t.test('a version counter reset (deleted: FLUSHDB, an eviction) flushes the cache, by the check or by the next message', async (t) => {
  // Before, versions below the last one seen were taken as old news: no gap or miss was noticed
  // until the counter climbed back past it.
  await t.test('the check reads a counter below its last read', async (t) => {
    const s = await setup(t, { redis: { invalidation_check_ms: 100 } })
    await s.other.set(INVALIDATION_VERSION_KEY, 50)
    await until(t, 'the check has read 50', async () => (await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'missed' })) >= 1)
    const key = await staleKey(t, s)
    await s.other.del(INVALIDATION_VERSION_KEY)
    await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401)
    t.equal(await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'reset' }), 1)
  })
  await t.test('a message whose version is not above the last one delivered', async (t) => {
    const s = await setup(t, { redis: { invalidation_check_ms: 0 } })
    await publishInvalidation(s.other, 'key:nothing00001')
    await publishInvalidation(s.other, 'key:nothing00002')
    const key = await staleKey(t, s)
    await s.other.del(INVALIDATION_VERSION_KEY)
    await publishInvalidation(s.other, 'key:nothing00003') // version 1 again
    await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401)
    t.equal(await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'reset' }), 1)
    t.ok(s.logs.some((l) => l.message.startsWith('flushed the key cache') && l.reason === 'reset'), 'logged with its reason')
  })
})

t.test('a gateway started while Redis was down flushes the cache when its first subscription comes', async (t) => {
  const server = await startRedisServer(t)
  // The gateway reaches Redis through a gate, shut until the revocation is published: before,
  // Redis itself was stopped and started again, and on a loaded machine the gateway's reconnection
  // could subscribe before the publication, leaving nothing to test.
  const { gate, url: gated } = await gateInFront(t, server.url, 'shut')
  const logs: LogLine[] = []
  const log = createLogger({ level: 'debug', write: (line) => logs.push(JSON.parse(line) as LogLine) })
  const redis = connectRedis(gated, log)
  t.teardown(() => redis.disconnect())
  const config = { cache: { ttl_s: 3600, store_check_s: 0 }, redis: { invalidation_check_ms: 0 } }
  const store = await openStore(t, makeConfig({ ...config, routes: [] }))
  const gateway = await startGateway(t, { config, store, redis, log })
  // Limits from memory from the start: a switch like any other (before, 0 and no log line).
  t.equal(await metric(gateway.metrics.registry, 'keygate_redis_up'), 0)
  t.equal(await metric(gateway.metrics.registry, 'keygate_redis_fallback_total'), 1, 'the start without Redis is counted as a switch')
  t.equal(logs.filter((l) => l.message.startsWith('Redis is not answering')).length, 1, 'and logged')
  // Another instance, which publishes its changes once Redis is there.
  const elsewhere = new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(gateway.config) })
  const { key, record } = await elsewhere.create({ name: 'cached-while-down', type: 'user' }, ACTOR)
  t.equal((await gateway.get('/', bearer(key))).status, 200, 'served (and cached) while Redis is down')
  const other = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => other.disconnect())
  const stopPublishing = bindInvalidationPublisher({ redis: other, keys: elsewhere })
  t.teardown(stopPublishing)
  // Revoked and published before the gateway's first subscription: it never gets the message.
  t.equal(Number(((await other.pubsub('NUMSUB', INVALIDATION_CHANNEL)) as [string, number])[1]), 0, 'the gateway has not subscribed yet')
  await elsewhere.revoke(record.id, undefined, ACTOR)
  await until(t, 'the revocation was published', async () => Number((await other.get(INVALIDATION_VERSION_KEY)) ?? 0) >= 1)
  gate.set('open')
  await until(t, 'the gateway subscribed', async () => Number(((await other.pubsub('NUMSUB', INVALIDATION_CHANNEL)) as [string, number])[1]) >= 1)
  await until(t, 'the revoked key is refused', async () => (await gateway.get('/', bearer(key))).status === 401)
  t.equal(await metric(gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'reconnect' }), 1, 'one flush, at the first subscription')
  await until(t, 'the arrival of Redis is logged', () => logs.some((l) => l.message.startsWith('Redis answers again')))
  t.equal(await metric(gateway.metrics.registry, 'keygate_redis_up'), 1)
})

t.test('a gateway started with Redis up subscribes before it serves, and does not flush for it', async (t) => {
  const s = await setup(t, { redis: { invalidation_check_ms: 0 } })
  t.equal(await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'reconnect' }), 0)
  t.notOk(s.logs.some((l) => l.message.startsWith('flushed the key cache')), 'no flush logged')
})

t.test('a killed subscriber connection flushes the cache when it is back', async (t) => {
  const s = await setup(t, { redis: { invalidation_check_ms: 0 } })
  const key = await staleKey(t, s)
  await s.other.call('CLIENT', 'KILL', 'TYPE', 'pubsub')
  await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401)
  t.equal(await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'reconnect' }), 1)
  // Messages flow again on the new subscription.
  const { key: k2, record } = await s.gateway.keys.create({ name: 'after', type: 'user' }, ACTOR)
  t.equal((await s.gateway.get('/', bearer(k2))).status, 200)
  await s.silent.revoke(record.id, undefined, ACTOR)
  await publishInvalidation(s.other, `key:${record.id}`)
  await until(t, 'a message after the reconnection is applied', async () => (await s.gateway.get('/', bearer(k2))).status === 401)
})

t.test('an invalidation published while Redis is down goes out once it is back', async (t) => {
  const server = await startRedisServer(t)
  const publisher = connectRedis(server.url, createLogger({ write: () => {} }))
  t.teardown(() => publisher.disconnect())
  await until(t, 'connected', () => publisher.status === 'ready')
  await server.stop()
  await until(t, 'the client saw it go', () => publisher.status !== 'ready')
  await publishInvalidation(publisher, 'key:waiting00001')
  t.pass('publishing while Redis is down neither throws nor waits')
  await server.start()
  const check = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => check.disconnect())
  await until(t, 'the kept message was published (the empty server counted it)', async () => (await check.get(INVALIDATION_VERSION_KEY)) === '1')
})

t.test('a frozen Redis hands the limits to the insurance limiter, with a metric and a log line, and takes them back', async (t) => {
  const s = await setup(t, { rate_limits: { per_address: { limit: 3, window_s: 3600 } }, redis: { invalidation_check_ms: 0 } }, 200)
  const registry = s.gateway.metrics.registry
  t.equal(await metric(registry, 'keygate_redis_up'), 1)
  t.equal((await s.gateway.get('/')).status, 401, 'counted in Redis: 1 of 3')
  s.server.pause()
  t.teardown(() => s.server.resume())
  const statuses: number[] = []
  for (let i = 0; i < 5; i++) statuses.push((await s.gateway.get('/')).status)
  // The insurance goes on from Redis's count (before, it started from zero: 3 more, 4 of 3).
  t.same(statuses, [401, 401, 429, 429, 429], 'every request is answered, and the insurance limiter enforces the limit, counting on from Redis')
  t.equal(await metric(registry, 'keygate_redis_up'), 0)
  t.equal(await metric(registry, 'keygate_redis_fallback_total'), 1, 'one switch, however many requests')
  t.equal(s.logs.filter((l) => l.message.startsWith('Redis is not answering')).length, 1, 'logged once')
  s.server.resume()
  await until(t, 'Redis is used again', async () => (await metric(registry, 'keygate_redis_up')) === 1)
  t.equal(s.logs.filter((l) => l.message.startsWith('Redis answers again')).length, 1, 'the return is logged once')
  t.equal((await s.gateway.get('/')).status, 429, 'the refusal holds with Redis back, until its window ends')
})

t.test('Redis down: serve stops without being held by its Redis clients, and a client that gave up is not waited for (found by a review)', async (t) => {
  // Before: ioredis's disconnect() arms a 2 s timer (its disconnectTimeout) on the client's last
  // socket, closed already while Redis is down, and nothing clears it. A serve stopped then was
  // held past `stopped` until its backstop cut it, warning that a connection "to the store, most
  // likely" had not closed; a CLI change waited out its 2 s for a Redis that had refused it, then
  // 2 s more to exit.
  const server = await startRedisServer(t)
  const cwd = mkdtempSync(join(tmpdir(), 'keygate-redis-down-stop-'))
  t.teardown(() => rmSync(cwd, { recursive: true, force: true }))
  const env = isolatedEnv({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store'), { migrated: true }), REDIS_URL: server.url, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const served = await serve(t, { env, cwd, args: ['--only', 'admin'], waitFor: { gateway: false } })
  await server.stop()
  await until(t, 'the process saw Redis go', () => served.logs.some((l) => l.message.startsWith('Redis is not answering')))
  t.equal(await served.stop(), 0)
  const stopped = served.logs.findIndex((l) => l.message === 'stopped')
  t.ok(stopped >= 0, 'stopped is logged')
  t.same(served.logs.slice(stopped + 1), [], 'and nothing after it: nothing held the process')

  // The CLI's client does not retry: once it has given up, it is not ready, and is not waited for.
  const port = server.port
  const gaveUp = new Redis(`redis://127.0.0.1:${port}`, { enableOfflineQueue: false, retryStrategy: () => null })
  gaveUp.on('error', () => {})
  const ended = new Promise((resolve) => gaveUp.once('end', resolve))
  let answer: boolean | undefined
  void redisReady(gaveUp, 600_000).then((ready) => (answer = ready))
  await ended
  await new Promise((resolve) => setImmediate(resolve))
  t.equal(answer, false, 'not ready, told as the client gives up')
  t.equal(await redisReady(gaveUp, 600_000), false, 'and at once when asked after')
})
