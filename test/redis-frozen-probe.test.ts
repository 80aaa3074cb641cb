// The health probe of a Redis that is frozen (SIGSTOP) while its connection stays up: no reconnect
// comes to end the probe's unanswered commands, so each probe must not add more.
import t from 'tap'
import { connectRedis, redisHealth, redisReady } from '../core/redis.ts'
import { createLogger } from '../core/log.ts'
import { until } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import { gateInFront } from './helpers/tcp-gate.ts'

t.test('a frozen Redis whose connection stays up holds one health probe unanswered, not one more every probe interval, and is used again once it thaws (found by a review)', async (t) => {
  // Before: a probe every 250 ms sent its script and transaction again while the last ones went
  // unanswered; ioredis holds each command until its answer or the connection's end, and with the
  // invalidation check off (redis.invalidation_check_ms: 0) nothing ends the connection, so a
  // process held some 16 more commands a second for as long as Redis stayed frozen.
  const server = await startRedisServer(t)
  // Only to count what the client sends: bytes pass both ways.
  const { gate, url } = await gateInFront(t, server.url)
  const redis = connectRedis(url, createLogger({ level: 'error', write: () => {} }), { commandTimeoutMs: 100 })
  t.teardown(() => redis.disconnect())
  t.ok(await redisReady(redis, 10_000), 'connected')
  const health = redisHealth(redis, { probeMs: 20 })
  server.pause()
  t.teardown(() => server.resume())
  const mark = gate.sent().length
  const probes = () => gate.sent().slice(mark).split('keygate:health').length - 1
  health.down('timeout')
  // Many probe intervals (20 ms each) go by while Redis says nothing.
  await until(t, 'the first probe is sent', () => probes() > 0)
  for (let i = 0; i < 3; i++) await new Promise((r) => setTimeout(r, 500))
  t.equal(redis.status, 'ready', 'the connection stays up')
  // The probe's script names the key (its transaction waits for the script's answer).
  t.equal(probes(), 1, 'one probe is out, unanswered; none is sent beside it')
  t.notOk(health.up)
  server.resume()
  await until(t, 'Redis is used again once it answers', () => health.up)
})
