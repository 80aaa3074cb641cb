// The invalidation publisher (core/invalidation.ts, Publisher) keeps what Redis did not take and
// sends it later: also when Redis refused a write on a connection that stayed up (no 'ready'
// follows), and an `all` that replaced a full queue while a resend was under way is sent too.
import t from 'tap'
import { Redis } from 'ioredis'
import { INVALIDATION_CHANNEL, INVALIDATION_VERSION_KEY, publishInvalidation, subscribeInvalidations } from '../core/invalidation.ts'
import { createLogger } from '../core/log.ts'
import { connectRedis } from '../core/redis.ts'
import { until } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'

const quiet = createLogger({ write: () => {} })

t.test('a publish refused by Redis on a live connection is sent again, and later ones are not stuck behind it', async (t) => {
  const server = await startRedisServer(t)
  const publisher = connectRedis(server.url, quiet)
  const admin = new Redis(server.url, { maxRetriesPerRequest: 1 })
  const listener = connectRedis(server.url, quiet)
  t.teardown(() => {
    publisher.disconnect()
    admin.disconnect()
    listener.disconnect()
  })
  await until(t, 'connected', () => publisher.status === 'ready' && listener.status === 'ready')
  const seen: string[] = []
  const close = await subscribeInvalidations(listener, { handler: (m) => seen.push(m), onFlush: () => {}, checkIntervalMs: 100 })
  t.teardown(close)
  await until(t, 'subscribed', async () => Number(((await admin.pubsub('NUMSUB', INVALIDATION_CHANNEL)) as [string, number])[1]) >= 1)
  await publishInvalidation(publisher, 'key:first')
  await until(t, 'first delivered', () => seen.includes('key:first'))
  // A transient write refusal on a healthy connection (OOM / MISCONF / NOREPLICAS / READONLY...).
  await admin.config('SET', 'min-replicas-to-write', '1')
  await publishInvalidation(publisher, 'key:refused')
  await admin.config('SET', 'min-replicas-to-write', '0')
  await publishInvalidation(publisher, 'key:revoked-later') // Redis accepts writes again
  // Resent by the 1 s retry timer: waited for, not slept on (1.5 s left a loaded machine 0.5 s).
  await until(t, 'a revocation published after Redis took writes again reaches the other instance', () => seen.includes('key:revoked-later'), 10_000)
})

t.test("the 'all' that replaces 1000 kept messages during a resend is sent", async (t) => {
  const server = await startRedisServer(t)
  const publisher = connectRedis(server.url, quiet)
  t.teardown(() => publisher.disconnect())
  await until(t, 'connected', () => publisher.status === 'ready')
  await server.stop()
  await until(t, 'down', () => publisher.status !== 'ready')
  for (let i = 0; i < 1000; i++) await publishInvalidation(publisher, `key:k${i}`) // e.g. a bulk import during the outage
  // One more change made just as Redis comes back (after the resend has taken pending[0]).
  publisher.on('ready', () => void publishInvalidation(publisher, 'key:late'))
  await server.start()
  const listener = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => listener.disconnect())
  await until(t, 'back', () => publisher.status === 'ready')
  await until(t, "the kept changes go out (k0 then 'all')", async () => Number((await listener.get(INVALIDATION_VERSION_KEY)) ?? 0) >= 2, 10_000)
})
