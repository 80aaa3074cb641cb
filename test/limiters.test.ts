// The request path's rate limits (LeasedLimit): points reserved from the store a few at a time
// and used from memory. A limit is never exceeded, in one process or across processes sharing a
// Redis; near its limit a key is counted one point at a time, so RateLimit-Remaining stays exact
// in one process; a lease ends with its window; concurrent requests share one reservation; with
// a high limit the store is asked once per many requests, a busy key's next lease is asked for
// before the last runs out, and a slow key is counted one point at a time.
import t, { type Test as Tap } from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { createLimiter, LeasedLimit, MAX_LEASE, RateLimiterRes, type RateLimit } from '../core/limiters.ts'
import { sleep } from './helpers/gateway.ts'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

/** A connected Redis client (before it connects the insurance limiter answers) and a fresh key prefix, both cleaned up. */
async function redisFor(t: Tap): Promise<{ redis: Redis; prefix: string }> {
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: 1 })
  const prefix = `keygate:test:lease:${randomUUID()}`
  t.teardown(async () => {
    await redis.del(`${prefix}:k`)
    redis.disconnect()
  })
  t.equal(await redis.ping(), 'PONG')
  return { redis, prefix }
}

/** One point for `key`: the remaining points, or 'refused'. */
async function one(l: RateLimit, key: string): Promise<number | 'refused'> {
  if (l.take(key)) return l.remaining
  try {
    return (await l.consume(key)).remainingPoints
  } catch (err) {
    if (err instanceof RateLimiterRes) return 'refused'
    throw err
  }
}

t.test('in memory: exactly the limit, with exact remaining points', async (t) => {
  const l = new LeasedLimit(createLimiter({ points: 100, durationS: 60, keyPrefix: 'test' }), 100)
  const seen: Array<number | 'refused'> = []
  for (let i = 0; i < 102; i++) seen.push(await one(l, 'a'))
  t.same(seen.slice(0, 100), Array.from({ length: 100 }, (_, i) => 99 - i), 'remaining counts down by one')
  t.same(seen.slice(100), ['refused', 'refused'], 'then refused')
  t.equal(await one(l, 'b'), 99, 'another key has its own points')
})

t.test('a burst of concurrent requests for one key never exceeds the limit, and what it leaves leased is used next', async (t) => {
  const l = new LeasedLimit(createLimiter({ points: 20, durationS: 60, keyPrefix: 'test' }), 20)
  const burst = await Promise.all(Array.from({ length: 50 }, () => one(l, 'k')))
  const allowed = burst.filter((a) => a !== 'refused').length
  t.ok(allowed <= 20 && allowed >= 15, `${allowed} of 50 allowed in the burst`)
  let after = 0
  while ((await one(l, 'k')) !== 'refused') after++
  t.equal(allowed + after, 20, 'exactly the limit in all')
})

t.test('a lease ends with its window', async (t) => {
  const l = new LeasedLimit(createLimiter({ points: 16, durationS: 1, keyPrefix: 'test' }), 16)
  for (let i = 0; i < 16; i++) t.not(await one(l, 'w'), 'refused')
  t.equal(await one(l, 'w'), 'refused')
  await sleep(1100)
  t.equal(await one(l, 'w'), 15, 'a new window, a new lease')
})

t.test('Redis: two processes never exceed one shared limit, and use every point between them', async (t) => {
  const { redis: ra, prefix } = await redisFor(t)
  const rb = new Redis(REDIS_URL, { maxRetriesPerRequest: 1 })
  t.teardown(() => rb.disconnect())
  t.equal(await rb.ping(), 'PONG')
  const a = new LeasedLimit(createLimiter({ points: 200, durationS: 60, keyPrefix: prefix, redis: ra }), 200)
  const b = new LeasedLimit(createLimiter({ points: 200, durationS: 60, keyPrefix: prefix, redis: rb }), 200)
  let allowed = 0
  let aDone = false
  let bDone = false
  // Uneven traffic: three requests on a for one on b, until both are refused.
  for (let i = 0; !(aDone && bDone) && i < 1000; i++) {
    const on = i % 4 === 3 ? b : a
    const answer = await one(on, 'k')
    if (answer === 'refused') {
      if (on === a) aDone = true
      else bDone = true
    } else allowed++
  }
  t.equal(allowed, 200, 'exactly the limit across both')
  t.equal(Number(await ra.get(`${prefix}:k`)) >= 200, true, 'the store counted every point')
})

t.test('Redis: with a high limit the store is asked once per many requests', async (t) => {
  const { redis, prefix } = await redisFor(t)
  const l = new LeasedLimit(createLimiter({ points: 1_000_000, durationS: 60, keyPrefix: prefix, redis }), 1_000_000)
  let fromMemory = 0
  for (let i = 0; i < 1000; i++) {
    if (l.take('k')) fromMemory++
    else await l.consume('k')
  }
  const counted = Number(await redis.get(`${prefix}:k`))
  // What was used, plus at most a lease and the quarter of the previous one it was asked beside.
  t.ok(counted >= 1000 && counted <= 1000 + MAX_LEASE + MAX_LEASE / 4, `the store holds what was used plus at most one lease and a quarter (${counted})`)
  t.ok(fromMemory >= 990, `${fromMemory} of 1000 answered from the lease without a promise`)
})

t.test('Redis: a busy key renews its lease ahead, so its requests do not wait for the store', async (t) => {
  const { redis, prefix } = await redisFor(t)
  const l = new LeasedLimit(createLimiter({ points: 1_000_000, durationS: 60, keyPrefix: prefix, redis }), 1_000_000)
  let waited = 0
  // At most a thousand requests a second (a request, then at least 1 ms): a lease of about 100
  // ms holds at most 100 points, and its last quarter (~25 ms) is far longer than a round trip
  // to Redis on loopback.
  for (let i = 0; i < 500; i++) {
    if (!l.take('k')) {
      waited++
      await l.consume('k')
    }
    await sleep(1)
  }
  // The first two reservations are asked when needed (one point for a key not seen lately, then
  // a lease sized to the rate); without renewing ahead every later lease would add one more (~8).
  t.ok(waited <= 3, `${waited} of 500 requests waited for the store`)
  const counted = Number(await redis.get(`${prefix}:k`))
  t.ok(counted >= 500 && counted <= 500 + 100 + 25, `the store holds what was used plus at most one lease and a quarter (${counted})`)
})

t.test('Redis: when its window ends, a busy key waits for one reservation sized by its rate', async (t) => {
  const { redis, prefix } = await redisFor(t)
  const l = new LeasedLimit(createLimiter({ points: 1_000_000, durationS: 1, keyPrefix: prefix, redis }), 1_000_000)
  let waited = 0
  let windowEnds = 0
  let firstOfWindow = 0
  let lastReset = Infinity
  // About a thousand requests a second across the end of the 1 s window.
  for (let i = 0; i < 1400; i++) {
    const fromLease = l.take('k')
    if (!fromLease) waited++
    const reset = fromLease ? l.msBeforeNext : (await l.consume('k')).msBeforeNext
    if (reset > lastReset + 100) {
      // The first lease of a new window, waited for: the store has counted nothing else of it yet.
      if (windowEnds === 0 && !fromLease) firstOfWindow = Number(await redis.get(`${prefix}:k`))
      windowEnds++
    }
    lastReset = reset
    await sleep(1)
  }
  t.ok(windowEnds >= 1, `the requests went on across ${windowEnds} window end(s)`)
  t.ok(firstOfWindow > 1, `the new window's first lease was sized by the key's rate (${firstOfWindow} points), not one point`)
  // Two at the start (one point for a key not seen, then a lease sized to the rate), then one
  // per window end; a one-point first lease in each new window would add another per window end.
  t.ok(waited <= 2 + windowEnds, `${waited} of 1400 requests waited for the store, over ${windowEnds} window end(s)`)
})

t.test('Redis: a key used slowly is counted one point at a time', async (t) => {
  const { redis, prefix } = await redisFor(t)
  const l = new LeasedLimit(createLimiter({ points: 1000, durationS: 60, keyPrefix: prefix, redis }), 1000)
  for (let i = 0; i < 5; i++) {
    t.equal(await one(l, 'k'), 999 - i)
    await sleep(150)
  }
  t.equal(Number(await redis.get(`${prefix}:k`)), 5, 'nothing reserved beyond what was used')
})
