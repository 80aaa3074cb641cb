// A Redis that answers PING but refuses writes (found by a review): over maxmemory with
// noeviction (OOM), turned into a replica (READONLY), or an ACL that lets keygate write its health
// key and nothing else. Before, a PING took the limits back to Redis every 250 ms and the next
// call failed again: a stream of switches and log lines, keygate_redis_up 1 once traffic stopped
// while nothing was shared, and a lockout decided meanwhile never reached the other instances.
// Now keygate stays on its insurance (one switch, one warning) until Redis takes a write again; a
// switch back that fails at once is probed less and less often. Each test runs its own
// redis-server and changes its settings; events are counted, not timed.
import t, { type Test } from 'tap'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { INVALIDATION_CHANNEL, subscribeInvalidations } from '../core/invalidation.ts'
import { createLimiter } from '../core/limiters.ts'
import { createLockout } from '../core/lockout.ts'
import { createLogger } from '../core/log.ts'
import { connectRedis, redisHealth, writeHealthKey } from '../core/redis.ts'
import { call, freshAddress, makeConfig, metric, openStore, sleep, startGateway, until } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import { isolatedEnv, serve, type LogLine } from './helpers/serve.ts'
import { seedDataDir } from './helpers/pglite-template.ts'

function logger(): { log: ReturnType<typeof createLogger>; logs: LogLine[]; said: (level: string, start: string) => number } {
  const logs: LogLine[] = []
  const log = createLogger({ level: 'debug', write: (line) => logs.push(JSON.parse(line) as LogLine) })
  return { log, logs, said: (level, start) => logs.filter((l) => l.level === level && l.message.startsWith(start)).length }
}

/**
 * A Redis of the test's own, a client of it whose ACL lets it write keygate's health key and no
 * other (the probe's write is taken, the limits' and lockouts' are refused: NOPERM), with a
 * RedisHealth probing every 50 ms, and `grant` to let it write every key.
 */
async function narrowRedis(t: Test) {
  const server = await startRedisServer(t)
  const admin = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => admin.disconnect())
  await admin.acl('SETUSER', 'narrow', 'on', '>secret', '~keygate:health', '+@all')
  const redis = new Redis(`redis://narrow:secret@127.0.0.1:${server.port}`, { enableOfflineQueue: false, maxRetriesPerRequest: 1 })
  t.teardown(() => redis.disconnect())
  await until(t, 'connected', () => redis.status === 'ready')
  const logged = logger()
  const health = redisHealth(redis, { log: logged.log, probeMs: 50 })
  return { redis, health, ...logged, grant: () => admin.acl('SETUSER', 'narrow', 'allkeys') }
}

/** Ways to make a Redis refuse writes while it answers PING, and to undo them. */
const refusals: Array<{ name: string; refuse: (admin: Redis) => Promise<unknown>; accept: (admin: Redis) => Promise<unknown> }> = [
  {
    name: 'maxmemory below used memory, noeviction (OOM)',
    refuse: async (admin) => {
      await admin.config('SET', 'maxmemory-policy', 'noeviction')
      await admin.config('SET', 'maxmemory', '1')
    },
    accept: (admin) => admin.config('SET', 'maxmemory', '0'),
  },
  {
    // A primary demoted to a replica of a server that is not there: it stays a read-only replica.
    name: 'a replica (READONLY)',
    refuse: (admin) => admin.replicaof('127.0.0.1', 1),
    accept: (admin) => admin.replicaof('NO', 'ONE'),
  },
]

for (const { name, refuse, accept } of refusals) {
  t.test(`a gateway on a Redis that answers PING but refuses writes stays on its insurance, with one switch and one warning, until writes are taken again: ${name}`, async (t) => {
    const server = await startRedisServer(t)
    const { log, said } = logger()
    // Bounded at 1 s, not the default 200 ms: refusals are answered at once, and a command slowed
    // past 200 ms by the suite's load would add a switch the test counts (found by a flake hunt).
    const redis = connectRedis(server.url, log, { commandTimeoutMs: 1000 })
    const admin = new Redis(server.url, { maxRetriesPerRequest: 1 })
    t.teardown(() => {
      redis.disconnect()
      admin.disconnect()
    })
    const config = { cache: { ttl_s: 3600, store_check_s: 0 }, rate_limits: { per_address: { limit: 1000, window_s: 3600 } }, redis: { invalidation_check_ms: 0 } }
    const store = await openStore(t, makeConfig({ ...config, routes: [] }))
    const gateway = await startGateway(t, { config, store, redis, log })
    const registry = gateway.metrics.registry
    t.equal((await gateway.get('/')).status, 401, 'counted in Redis')
    t.equal(await metric(registry, 'keygate_redis_up'), 1)

    await refuse(admin)
    t.equal(await admin.ping(), 'PONG', 'Redis still answers PING')
    // Requests a probe interval (250 ms) apart or more: before, each found the limits back on
    // Redis (a PING had answered) and switched them away again.
    const statuses: number[] = []
    for (let i = 0; i < 12; i++) {
      statuses.push((await gateway.get('/')).status)
      await sleep(300)
    }
    t.same([...new Set(statuses)], [401], 'every request is answered (by the insurance)')
    t.equal(await metric(registry, 'keygate_redis_up'), 0, 'keygate_redis_up says the limits are not shared')
    t.equal(await metric(registry, 'keygate_redis_fallback_total'), 1, 'one switch for the outage, however many probes and requests')
    t.equal(said('warn', 'Redis is not answering'), 1, 'one warning')
    t.equal(said('info', 'Redis answers again'), 0, 'and no return while it refuses')

    await accept(admin)
    await until(t, 'Redis is used again once it takes writes', async () => (await metric(registry, 'keygate_redis_up')) === 1)
    t.equal((await gateway.get('/')).status, 401, 'a request counted in Redis again')
    t.equal(await metric(registry, 'keygate_redis_up'), 1, 'and it stays there')
    t.equal(said('info', 'Redis answers again'), 1, 'the return is logged once')
    t.equal(await metric(registry, 'keygate_redis_fallback_total'), 1, 'with no further switch')
  })
}

t.test('a lockout decided while Redis refuses writes reaches the other instance once Redis takes them again', async (t) => {
  const server = await startRedisServer(t)
  const { log } = logger()
  // Bounded at 1 s, as above: refusals are answered at once.
  const a = connectRedis(server.url, log, { commandTimeoutMs: 1000 })
  const b = connectRedis(server.url, log, { commandTimeoutMs: 1000 })
  const admin = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => {
    a.disconnect()
    b.disconnect()
    admin.disconnect()
  })
  await until(t, 'connected', () => a.status === 'ready' && b.status === 'ready')
  const la = createLockout({ maxAttempts: 2, windowS: 60, log, redis: a })
  const lb = createLockout({ maxAttempts: 2, windowS: 60, log, redis: b })
  const close = await subscribeInvalidations(b, { handler: (m) => {
      if (m.startsWith('lock:')) lb.applyMessage(m)
    }, onFlush: () => void lb.reload(), checkIntervalMs: 100 })
  t.teardown(close)
  await until(t, 'subscribed', async () => Number(((await admin.pubsub('NUMSUB', INVALIDATION_CHANNEL)) as [string, number])[1]) >= 1)

  await admin.config('SET', 'maxmemory-policy', 'noeviction')
  await admin.config('SET', 'maxmemory', '1')
  const address = freshAddress()
  await la.recordFailure(address)
  await la.recordFailure(address)
  t.equal(la.lockedFor(address), 60, 'locked out on the instance that saw the failures (on its insurance)')
  t.notOk(redisHealth(a).up, 'which Redis refused')
  // Probes come and go meanwhile; before, one switched back, the restore failed, and nothing tried again.
  await sleep(1000)
  t.notOk(redisHealth(a).up, 'still on the insurance')
  t.equal(lb.lockedFor(address), undefined, 'the other instance has not heard of it yet')

  await admin.config('SET', 'maxmemory', '0')
  await until(t, 'the lockout reaches the other instance', () => lb.lockedFor(address) !== undefined)
  t.ok(redisHealth(a).up, 'the instance is back on Redis')
})

t.test('a switch back that fails at once (an ACL lets the probe write, not the limits) is probed less and less often, and said once', async (t) => {
  const { redis, health, said, grant } = await narrowRedis(t)
  let switches = 0
  health.onChange((up) => !up && switches++)
  const limiter = createLimiter({ points: 1000, durationS: 60, keyPrefix: 'keygate:rl:test', redis })
  // A call at least a probe interval after the last: before, each found the limits back on Redis
  // and failed there (about one switch a call).
  const calls = 40
  for (let i = 0; i < calls; i++) {
    await limiter.consume('k')
    await sleep(60)
  }
  t.ok(switches >= 2, `the probe's write is taken, and the switch back fails at once (${switches} switches)`)
  t.ok(switches <= 10, `probed less often after each: ${switches} switches for ${calls} calls`)
  t.equal(said('warn', 'Redis is not answering'), 1, 'one warning for the outage')
  t.equal(said('info', 'Redis refused a call right after it answered again'), 1, 'the first failed switch back is said once')
  t.equal(said('info', 'Redis answers again'), 1, 'the first switch back is said, the later ones are not')

  await grant()
  await until(t, 'a switch back holds once the limits may write', async () => {
    await limiter.consume('k')
    return said('info', 'Redis answers again') === 2
  })
  t.ok(health.up, 'on Redis')
})

t.test('the health probe is refused by an ACL that refuses transactions, which the limits use, and not by one that refuses only EVALSHA', async (t) => {
  // rate-limiter-flexible reads and blocks a limit in a MULTI/EXEC (the lockout's check). Before,
  // an ACL refusing MULTI or EXEC passed the probe (a script alone), and every switch back failed
  // at the limits' first such call.
  const server = await startRedisServer(t)
  const admin = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => admin.disconnect())
  const client = async (user: string, ...rules: string[]) => {
    await admin.acl('SETUSER', user, 'on', '>secret', '~*', '&*', '+@all', ...rules)
    const redis = new Redis(`redis://${user}:secret@127.0.0.1:${server.port}`, { enableOfflineQueue: false, maxRetriesPerRequest: 1 })
    t.teardown(() => redis.disconnect())
    await until(t, `${user} connected`, () => redis.status === 'ready')
    return redis
  }
  await t.resolves(writeHealthKey(await client('everything')), 'every command: taken')
  await t.resolves(writeHealthKey(await client('noevalsha', '-evalsha')), 'EVALSHA refused: taken (ioredis runs a refused script with EVAL, as the limits do)')
  await t.rejects(writeHealthKey(await client('nomulti', '-multi')), /EXEC without MULTI/, 'MULTI refused: refused')
  await t.rejects(writeHealthKey(await client('noexec', '-exec')), /NOPERM/, 'EXEC refused: refused')

  // A process whose limits went to the insurance stays there on such a Redis.
  const redis = await client('nomulti2', '-multi')
  const { log, said } = logger()
  const health = redisHealth(redis, { log, probeMs: 50 })
  health.down('error')
  await until(t, 'a probe refused', () => said('debug', "Redis answers but refuses the health probe's write") === 1)
  t.notOk(health.up, 'the limits stay on the insurance')
  await admin.acl('SETUSER', 'nomulti2', '+multi')
  await until(t, 'back on Redis once it takes transactions', () => health.up)
})

t.test("a restore of the lockouts that Redis refuses after a switch back takes the limits away from it again, and warns once", async (t) => {
  // The health key may be written, the lockouts (keygate:lockout:…) may not.
  const { redis, health, log, said, logs } = await narrowRedis(t)
  let ups = 0
  let downs = 0
  health.onChange((up) => (up ? ups++ : downs++))
  const lockout = createLockout({ maxAttempts: 2, windowS: 60, log, redis })
  const address = freshAddress()
  await lockout.recordFailure(address)
  await lockout.recordFailure(address)
  t.equal(lockout.lockedFor(address), 60, 'locked out, on the insurance (Redis refused the count)')
  // No limiter call from here on: only the restore at a switch back can find the refusal.
  await until(t, 'a probe switches back (its write is taken)', () => ups >= 1)
  // Before, the limits stayed on Redis after the failed restore, the lockout written nowhere.
  await until(t, 'the refused restore takes the limits away from Redis again', () => downs >= 2)
  await until(t, 'and again at a later switch back', () => downs >= 3)
  const failed = logs.filter((l) => l.message.startsWith('could not write the lockouts in force'))
  t.ok(failed.length >= 2, `each switch back tried the restore (${failed.length})`)
  t.equal(failed.filter((l) => l.level === 'warn').length, 1, 'one warning for them')
  t.equal(said('warn', 'Redis is not answering'), 1, 'and one for the outage')
})

t.test('an outage right after the first connection is warned as an outage, not logged as a switch back that failed', async (t) => {
  // Found when the tests' stores began to open at once: a gateway's Redis frozen within a second
  // of its first connection was said to have 'refused a call right after it answered again', at
  // info, and no warning was given for the outage.
  const server = await startRedisServer(t)
  const redis = new Redis(server.url, { enableOfflineQueue: false, maxRetriesPerRequest: 1, lazyConnect: true })
  t.teardown(() => redis.disconnect())
  const { log, said } = logger()
  const health = redisHealth(redis, { log, probeMs: 1000 })
  t.teardown(() => health.close())
  await redis.connect()
  await until(t, 'the first connection is used', () => health.up)
  health.down('unreachable')
  t.equal(said('warn', 'Redis is not answering'), 1, 'the outage is warned')
  t.equal(said('info', 'Redis refused a call right after it answered again'), 0, 'not taken for a failed switch back')
  await until(t, 'Redis is used again', () => health.up)
  t.equal(said('info', 'Redis answers again'), 1)
  health.down('unreachable')
  t.equal(said('info', 'Redis refused a call right after it answered again'), 1, 'a switch back that fails at once still is one')
  t.equal(said('warn', 'Redis is not answering'), 1, 'within the same outage')
})

t.test("an --only admin process's keygate_redis_up is 0 while Redis answers PING but refuses writes", async (t) => {
  // Found by a review: it was a PING at each scrape, 1 while the admin lockout's writes and the
  // invalidations the process publishes were refused (OOM, READONLY).
  const server = await startRedisServer(t)
  const admin = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => admin.disconnect())
  const cwd = mkdtempSync(join(tmpdir(), 'keygate-admin-redis-'))
  t.teardown(() => rmSync(cwd, { recursive: true, force: true }))
  const env = isolatedEnv({ KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store'), { migrated: true }), REDIS_URL: server.url, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const served = await serve(t, { env, cwd, args: ['--only', 'admin'], waitFor: { gateway: false } })
  const up = async () => Number(/^keygate_redis_up (\S+)$/m.exec((await call(`${served.admin}/metrics`)).text)?.[1])
  t.equal(await up(), 1, 'Redis takes writes')
  const [refusal] = refusals as [(typeof refusals)[number]]
  await refusal.refuse(admin)
  t.equal(await admin.ping(), 'PONG', 'Redis still answers PING')
  t.equal(await up(), 0, `refusing them (${refusal.name})`)
  await refusal.accept(admin)
  t.equal(await up(), 1, 'taking them again')
  t.equal(await served.stop(), 0)
})


// Before (found by a review): ioredis reports a SELECT the server refuses and goes on in database
// 0, so keygate ran there without a word but a subscriber's warning, sharing database 0's limits,
// lockouts and invalidation counters with whatever else used it.
t.test('a Redis URL naming a database the server has not: the connection is closed, said once, and nothing is written in database 0', async (t) => {
  const server = await startRedisServer(t)
  const { log, said } = logger()
  const redis = connectRedis(`${server.url}/99`, log, { keyPrefix: 'db99:' })
  t.teardown(() => redis.disconnect())
  await until(t, 'closed for good', () => redis.status === 'end')
  t.equal(said('error', 'Redis has no database 99 (redis.url)'), 1, 'said once')
  await sleep(300)
  t.equal(redis.status, 'end', 'not made again')
  const admin = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => admin.disconnect())
  t.same(await admin.keys('db99:*'), [], 'nothing written in database 0')
  t.equal(redisHealth(redis).up, false, 'keygate_redis_up reads 0')
})
