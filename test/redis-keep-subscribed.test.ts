// keepSubscribed (core/redis.ts): the callbacks its SUBSCRIBE's answer runs. A callback that threw
// or rejected (onSubscribed is async in core/invalidation.ts) was an unhandled rejection, which
// ends a Node 24 process; and a SUBSCRIBE answered after the subscription was stopped still ran
// onSubscribed, so a closed gateway flushed its cache once more (found by a review).
import t from 'tap'
import { setImmediate as tick } from 'node:timers/promises'
import type { Redis } from 'ioredis'
import { createLogger } from '../core/log.ts'
import { connectRedis, keepSubscribed, subscriberConnection } from '../core/redis.ts'
import { until, type Tap } from './helpers/gateway.ts'
import { startRedisServer, type RedisServer } from './helpers/redis-server.ts'
import type { LogLine } from './helpers/serve.ts'

const CHANNEL = 'keygate:keep-subscribed-test'

/** Rejections nothing handled while the test runs (Node's default ends the process on the first). */
function collectUnhandled(t: Tap): unknown[] {
  const unhandled: unknown[] = []
  const collect = (err: unknown) => void unhandled.push(err)
  process.on('unhandledRejection', collect)
  t.teardown(() => void process.off('unhandledRejection', collect))
  return unhandled
}

async function subscriber(t: Tap): Promise<{ sub: Redis; logs: LogLine[]; log: ReturnType<typeof createLogger>; server: RedisServer }> {
  const server = await startRedisServer(t)
  const logs: LogLine[] = []
  const log = createLogger({ level: 'debug', write: (line) => logs.push(JSON.parse(line) as LogLine) })
  const redis = connectRedis(server.url, log)
  const sub = subscriberConnection(redis)
  t.teardown(() => {
    sub.disconnect()
    redis.disconnect()
  })
  return { sub, logs, log, server }
}

t.test('an onSubscribed that throws or rejects is logged, not left unhandled', async (t) => {
  const unhandled = collectUnhandled(t)
  for (const how of ['throws', 'rejects'] as const) {
    await t.test(how, async (t) => {
      const { sub, logs, log } = await subscriber(t)
      let called = 0
      const stop = keepSubscribed(sub, CHANNEL, {
        log,
        meanwhile: 'nothing',
        flowing: 'test messages',
        onSubscribed: how === 'throws'
          ? () => {
              called++
              throw new Error(`onSubscribed ${how}`)
            }
          : async () => {
              called++
              await tick()
              throw new Error(`onSubscribed ${how}`)
            },
      })
      t.teardown(stop)
      await until(t, 'subscribed', () => called === 1)
      await until(t, 'the failure is warned of', () => logs.some((l) => l.level === 'warn' && JSON.stringify(l).includes(`onSubscribed ${how}`)))
    })
  }
  // Node reports an unhandled rejection after the microtasks of the turn it happened in.
  await tick()
  t.same(unhandled, [], 'no rejection went unhandled')
})

t.test('an onFailed that throws is logged, not left unhandled', async (t) => {
  const unhandled = collectUnhandled(t)
  const { sub, logs, log, server } = await subscriber(t)
  let failed = 0
  // Redis frozen as the connection is ready, before keepSubscribed's SUBSCRIBE goes out (this
  // listener comes first), and the connection closed just after it (the listener below comes
  // after keepSubscribed's): the SUBSCRIBE, never answered, fails with the connection, not by a
  // refusal of Redis's.
  sub.once('ready', () => server.pause())
  t.teardown(() => server.resume())
  const stop = keepSubscribed(sub, CHANNEL, {
    log,
    meanwhile: 'nothing',
    flowing: 'test messages',
    onSubscribed: () => {},
    onFailed: () => {
      failed++
      throw new Error('onFailed throws')
    },
  })
  t.teardown(stop)
  sub.once('ready', () => sub.disconnect())
  await until(t, 'onFailed was called', () => failed === 1)
  await until(t, 'the failure is warned of', () => logs.some((l) => l.level === 'warn' && JSON.stringify(l).includes('onFailed throws')))
  await tick()
  t.same(unhandled, [], 'no rejection went unhandled')
})

t.test('a SUBSCRIBE answered after the subscription was stopped runs no onSubscribed', async (t) => {
  const { sub, log } = await subscriber(t)
  let called = 0
  const stop = keepSubscribed(sub, CHANNEL, { log, meanwhile: 'nothing', flowing: 'test messages', onSubscribed: () => void called++ })
  t.teardown(stop)
  // Stopped just after keepSubscribed sent its SUBSCRIBE on 'ready' (its listener came first).
  const stopped = new Promise<void>((resolve) =>
    sub.once('ready', () => {
      stop()
      resolve()
    }),
  )
  await stopped
  // Answered in order on the one connection: once the PING is, the SUBSCRIBE was too.
  await sub.ping()
  await tick()
  t.equal(called, 0, 'onSubscribed was not called')
})
