// The request path's rate limits (LeasedLimit): points reserved from the store a few at a time
// and used from memory. A limit is never exceeded, in one process or across processes sharing a
// Redis; near its limit a key is counted one point at a time, so RateLimit-Remaining stays exact
// in one process; a lease ends with its window; concurrent requests share one reservation; with
// a high limit the store is asked once per many requests, a busy key's next lease is asked for
// before the last runs out (and its next window's before the window ends), near a window's end a
// lease holds no more than the rest of the window needs, and a slow key is counted one point at a
// time. A reservation the store refuses keeps what the store had left; a Redis answer that comes
// after the switch to the insurance is not used under it, and goes back to Redis. A key's windows follow one another at an offset of its own, each counted under its own
// store key; tests that must stay within one window pin the clock to the start of one. A key
// whose limit changes within a window hands back what the old limit leased and did not use.
import t, { type Test as Tap } from 'tap'
import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import cluster from 'node:cluster'
import { RateLimiterClusterMaster, type RateLimiterMemory } from 'rate-limiter-flexible'
import { clusterLimitsPrimary, createLimiter, EndingMap, LeasedLimit, MAX_LEASE, MEMORY_MAX_KEYS, RateLimiterRes, windowPhase, type RateLimit } from '../core/limiters.ts'
import { redisHealth, type RedisHealthOptions } from '../core/redis.ts'
import { createKeyLimiters } from '../gateway/rate-limit.ts'
import type { KeyRecord } from '../core/keys/types.ts'
import { sleep, until } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

/** A connected Redis client (before it connects the insurance limiter answers) and a fresh key prefix, both cleaned up. */
/**
 * A client of the shared Redis and a prefix of this test's own. Its health gate (made before any
 * limiter, which shares it) takes a call as late only after 5 s: these tests count exactly across
 * processes, and the default 200 ms, met by a stall of the suite's loaded machine, switched a
 * process to its in-memory insurance mid-count. The tests of the switch use Redis servers of their own.
 */
async function redisFor(t: Tap, health: RedisHealthOptions = {}): Promise<{ redis: Redis; prefix: string }> {
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: 1 })
  const prefix = `keygate:test:lease:${randomUUID()}`
  t.teardown(async () => {
    const keys = await redis.keys(`${prefix}:*`)
    if (keys.length > 0) await redis.del(...keys)
    redis.disconnect()
  })
  t.equal(await redis.ping(), 'PONG')
  // Once connected, as a gateway's is made (made before, it starts down and its first switch up
  // is a settling one, which the tests of the switch do not expect).
  redisHealth(redis, { timeoutMs: 5000, ...health })
  return { redis, prefix }
}

/** A LeasedLimit as createRateLimit makes it (the store keeps each window's count two windows), on the clock `now` (rates measured on `ticks`). */
function leased(points: number, durationS: number, keyPrefix: string, redis?: Redis, now?: () => number, ticks?: () => number): LeasedLimit {
  return new LeasedLimit(createLimiter({ points, durationS: durationS * 2, keyPrefix, redis }), points, durationS * 1000, now, ticks)
}

/** A clock standing 1 s after the start of one of `key`'s windows (a test on it never meets a window's end unless it moves the clock). */
function pinned(key: string, durationS: number): { now: () => number; set(ms: number): void; windowStart: number; windowEnd: number } {
  const w = durationS * 1000
  const phase = windowPhase(key, w)
  const windowStart = (Math.floor((Date.now() - phase) / w) + 1) * w + phase
  let at = windowStart + 1000
  return { now: () => at, set: (ms) => (at = ms), windowStart, windowEnd: windowStart + w }
}

/**
 * How many requests before its lease runs out a renewal asked ahead is asked at least: the
 * smallest lease renewed ahead (8 points) is renewed when 2 are left, so the request that finds it
 * used up is the third after the ask.
 */
const AHEAD_MARGIN = 3

/**
 * One request at a time for `key` on `l`, counting those that had to wait for the store: `late`
 * when a reservation asked ahead, at least AHEAD_MARGIN requests before, had not come back yet
 * (the store answering late on a loaded machine, which the timing of a test cannot rule out);
 * `unasked` otherwise: none was on its way, or it was asked too late to come back in time (the
 * counts a lease renewed ahead keeps low). `last` is how the last request was answered, and
 * `request` resolves with its RateLimit-Reset in milliseconds.
 */
function waitCounter(l: LeasedLimit, key: string): { unasked: number; late: number; last: 'lease' | 'unasked' | 'late'; request(): Promise<number> } {
  let index = 0
  let askedAt: number | undefined
  const counts = {
    unasked: 0,
    late: 0,
    last: 'lease' as 'lease' | 'unasked' | 'late',
    async request(): Promise<number> {
      const i = index++
      const inFlight = l.reserving(key)
      if (!inFlight) askedAt = undefined
      if (l.take(key)) {
        if (askedAt === undefined && l.reserving(key)) askedAt = i
        counts.last = 'lease'
        return l.msBeforeNext
      }
      counts.last = inFlight && askedAt !== undefined && i - askedAt >= AHEAD_MARGIN ? 'late' : 'unasked'
      counts[counts.last]++
      return (await l.consume(key)).msBeforeNext
    },
  }
  return counts
}

/** Requests for `key` on `a`, and on `b` where `onB(i)`, until both refuse: how many were allowed. */
async function allowedUntilBothRefused(a: RateLimit, b: RateLimit, onB: (i: number) => boolean, max: number, key = 'k'): Promise<number> {
  let allowed = 0
  let aDone = false
  let bDone = false
  for (let i = 0; !(aDone && bDone) && i < max; i++) {
    const on = onB(i) ? b : a
    const answer = await one(on, key)
    if (answer === 'refused') {
      if (on === a) aDone = true
      else bDone = true
    } else allowed++
  }
  return allowed
}

/** Two processes' limits of `points` a minute on one Redis (a client each), on one clock pinned inside a window of 'k'. */
async function twoProcesses(t: Tap, points: number): Promise<{ a: LeasedLimit; b: LeasedLimit; redis: Redis; prefix: string; clock: ReturnType<typeof pinned> }> {
  const { redis, prefix } = await redisFor(t)
  const rb = new Redis(REDIS_URL, { maxRetriesPerRequest: 1 })
  t.teardown(() => rb.disconnect())
  t.equal(await rb.ping(), 'PONG')
  redisHealth(rb, { timeoutMs: 5000 })
  const clock = pinned('k', 60)
  return { a: leased(points, 60, prefix, redis, clock.now), b: leased(points, 60, prefix, rb, clock.now), redis, prefix, clock }
}

/** `key`'s window (of `durationS`) that holds the moment `at`, as the limiter names it: the key and the window's number. */
function windowOf(key: string, durationS: number, at: number): string {
  const w = durationS * 1000
  return `${key}:${Math.floor((at - windowPhase(key, w)) / w)}`
}

/** The store key of `key`'s window (of `durationS`) that holds the moment `at`. */
function windowKey(prefix: string, key: string, durationS: number, at: number): string {
  return `${prefix}:${windowOf(key, durationS, at)}`
}

/**
 * Limits of any number of points a minute over one limiter, as createRateLimits makes them for a
 * key's limits (the store never refuses; each compares the count with its own points), on the
 * clock `now` and a rate clock standing still (so every lease is as large as the store's count
 * allows), and what the store has counted in a key's window at `now`.
 */
function limitsOver(keyPrefix: string, redis: Redis | undefined, now: () => number): { limit: (points: number) => LeasedLimit; counted: (key: string) => Promise<number> } {
  const limiter = createLimiter({ points: Number.MAX_SAFE_INTEGER, durationS: 120, keyPrefix, redis })
  return {
    limit: (points) => new LeasedLimit(limiter, points, 60_000, now, () => 0),
    counted: async (key) => (await limiter.get(windowOf(key, 60, now())))?.consumedPoints ?? 0,
  }
}

/** Requests for `key` on `l` until it refuses (at most `max`): how many were allowed. */
async function allowedUntilRefused(l: RateLimit, key: string, max = 1000): Promise<number> {
  let allowed = 0
  while (allowed < max && (await one(l, key)) !== 'refused') allowed++
  return allowed
}

/** What the store has counted for `key` over all its windows. */
async function counted(redis: Redis, prefix: string, key: string): Promise<number> {
  const keys = await redis.keys(`${prefix}:${key}:*`)
  const values = keys.length === 0 ? [] : await redis.mget(...keys)
  return values.reduce((sum, v) => sum + Number(v ?? 0), 0)
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

t.test('an EndingMap holds what a plain list of its entries in the order they began holds, through every kind of change', async (t) => {
  // It reads its front through an iterator kept from call to call (a new one at the front of a Map
  // stepped over every deleted place: 70 µs a begin at the cap). Here, against the plainest model
  // of what it promises, over 60,000 random changes: begins of new and held keys, some never
  // ending, deletes (the front's among them), look-ups of ended entries, a raise, a clear, and a
  // cap small enough to drop entries, with the Map growing past the sizes where it is re-read.
  let seed = 7
  const random = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2147483648
    return seed % n
  }
  const SWEEP = 8
  let max = 3000
  const dropped: string[] = []
  const modelDropped: string[] = []
  const map = new EndingMap<{ end: number | null }>(max, (v) => v.end, (k) => dropped.push(k))
  let model: Array<[string, { end: number | null }]> = []
  const modelDelete = (key: string) => {
    const i = model.findIndex(([k]) => k === key)
    if (i === -1) return false
    model.splice(i, 1)
    return true
  }
  const modelBegin = (key: string, value: { end: number | null }, now: number) => {
    modelDelete(key)
    for (let swept = 0; swept < SWEEP && model.length > 0; swept++) {
      const [k, v] = model[0]!
      if (v.end !== null && v.end > now) break
      model.shift()
      if (v.end === null) model.push([k, v])
    }
    model.push([key, value])
    if (model.length > max) modelDropped.push(model.shift()![0])
  }
  let now = 1_000_000
  let mismatches = 0
  for (let step = 0; step < 60_000; step++) {
    now += random(3)
    const op = random(100)
    // Keys from a pool that grows, so that most begins are new and the Map grows past 2,049.
    const key = `k${random(2000 + step)}`
    if (op < 70) {
      const value = { end: random(20) === 0 ? null : now + 2000 + random(8000) }
      map.begin(key, value, now)
      modelBegin(key, value, now)
    } else if (op < 85) {
      const front = model[random(4)]?.[0] ?? key
      if (map.delete(front) !== modelDelete(front)) mismatches++
    } else if (op < 97) {
      const held = model.find(([k]) => k === key)?.[1]
      const live = held !== undefined && (held.end === null || held.end > now) ? held : undefined
      if (live === undefined && held !== undefined) modelDelete(key)
      if (map.live(key, now) !== live) mismatches++
    } else if (op < 99) {
      max += 10
      map.raise(max)
    } else if (step % 20_000 === 19_999 || random(1000) === 0) {
      map.clear()
      model = []
    }
    // The whole of it now and then, and its front after every change there.
    const whole = step % 250 === 0
    const held: Array<[string, { end: number | null }]> = []
    for (const entry of map.entries()) if (held.push(entry) === 8 && !whole) break
    if ((whole && held.length !== model.length) || held.some(([k, v], i) => model[i]?.[0] !== k || model[i]?.[1] !== v)) mismatches++
    if (map.size !== model.length) mismatches++
  }
  t.equal(mismatches, 0, 'the same entries, in the same order, at every check')
  t.same(dropped, modelDropped, 'the same entries dropped past the cap')
  t.ok(dropped.length > 100, `entries were dropped past the cap (${dropped.length})`)
  t.same([...map.entries()], model, 'and the same at the end')
})

t.test('in memory: exactly the limit, with exact remaining points', async (t) => {
  const clock = pinned('a', 60)
  const l = leased(100, 60, 'test', undefined, clock.now)
  const seen: Array<number | 'refused'> = []
  for (let i = 0; i < 102; i++) seen.push(await one(l, 'a'))
  t.same(seen.slice(0, 100), Array.from({ length: 100 }, (_, i) => 99 - i), 'remaining counts down by one')
  t.same(seen.slice(100), ['refused', 'refused'], 'then refused')
  t.equal(await one(l, 'b'), 99, 'another key has its own points')
})

t.test('in memory: a flood of distinct keys leaves the store at its cap, oldest forgotten first, and the limit still holds for recent keys', async (t) => {
  // Before, rate-limiter-flexible's memory store kept every key, with a timer each, for its
  // whole window: bad keys from distinct addresses held ~650 bytes an address for the lockout's
  // 15 minutes (a review measured 378 MB after 220,000 requests).
  const limiter = createLimiter({ points: 2, durationS: 900, keyPrefix: 'flood' })
  const held = () => (limiter as unknown as RateLimiterMemory).dump().storage.length
  const flood = MEMORY_MAX_KEYS * 2.5
  // The count begun MEMORY_MAX_KEYS before the last is the first kept (a review saw one
  // forgotten after 50,001, where 100,000 were promised).
  const edge = `a${MEMORY_MAX_KEYS - 1}`
  for (let i = 0; i < MEMORY_MAX_KEYS * 2 - 1; i++) await limiter.penalty(`a${i}`, 1)
  t.match(await limiter.get(edge), { consumedPoints: 1 }, `a count outlives ${MEMORY_MAX_KEYS - 1} other keys`)
  for (let i = MEMORY_MAX_KEYS * 2 - 1; i < flood - 1; i++) await limiter.penalty(`a${i}`, 1)
  const recent = `a${flood - 1}`
  const firstPointAt = Date.now()
  await limiter.penalty(recent, 1)
  // Before, quick-lru's two generations held up to twice the cap (150,000 here).
  t.equal(held(), MEMORY_MAX_KEYS, `the ${MEMORY_MAX_KEYS} begun last are held after ${flood}, and no more`)
  t.equal(await limiter.get('a0'), null, 'the oldest is forgotten')
  const second = await limiter.consume(recent)
  // Bounded by the time that has passed, not by a fixed second: a loaded machine took longer.
  const since = Date.now() - firstPointAt
  t.ok(second instanceof RateLimiterRes, "answers are rate-limiter-flexible's RateLimiterRes")
  t.match(second, { consumedPoints: 2, remainingPoints: 0 }, 'a recent key keeps its count')
  t.ok(second.msBeforeNext >= 900_000 - since - 5 && second.msBeforeNext <= 900_000, `in the window its first point started (${second.msBeforeNext} ms left, ${since} ms since)`)
  const refused = await limiter.consume(recent).then(
    () => 'admitted',
    (err: unknown) => err,
  )
  t.ok(refused instanceof RateLimiterRes, 'and is refused past the limit')
  t.match(await limiter.block('blocked', 60), { consumedPoints: 3, msBeforeNext: 60_000 }, 'a block counts one past the limit for its duration')
  t.match(await limiter.get('blocked'), { consumedPoints: 3 })
  t.equal(await limiter.delete('blocked'), true)
  t.equal(await limiter.get('blocked'), null, 'and is gone when deleted')
})

t.test("the --workers primary's memory limiters are bounded too", async (t) => {
  // rate-limiter-flexible makes them itself when a worker's RateLimiterCluster names its keyPrefix
  // (its init message, delivered here as cluster IPC would).
  clusterLimitsPrimary()
  const answers: unknown[] = []
  cluster.emit('message', { send: (m: unknown) => answers.push(m) }, { channel: 'rate_limiter_flexible', type: 'init', opts: { points: 2, duration: 900, keyPrefix: 'primary-flood' } })
  t.equal(answers.length, 1, 'the worker is answered')
  const limiter = (new RateLimiterClusterMaster() as unknown as { _rateLimiters: Record<string, RateLimiterMemory> })._rateLimiters['primary-flood'] as RateLimiterMemory
  for (let i = 0; i < MEMORY_MAX_KEYS * 2.5; i++) await limiter.penalty(`a${i}`, 1)
  t.equal(limiter.dump().storage.length, MEMORY_MAX_KEYS, `at most ${MEMORY_MAX_KEYS} keys held`)
})

t.test('in memory: counts that have ended are dropped as new ones begin, not held until the cap pushes them out', async (t) => {
  // The per-address limit's counts end within 2 s (a window of 1 s, kept two): a flood of bad keys
  // from distinct addresses held 200,000 of them, all ended, for as long as it lasted (found by a
  // review of memory under such a flood). One window of the limiter's counts, then another once
  // the first has ended: only the second is held.
  const limiter = createLimiter({ points: 5, durationS: 1, keyPrefix: 'ending' })
  // What the store holds, ended counts too (dump() leaves them out).
  const held = () => (limiter as unknown as { _memoryStorage: { _storage: Map<string, unknown> } })._memoryStorage._storage.size
  for (let i = 0; i < 1000; i++) await limiter.consume(`first${i}`)
  await sleep(1100)
  for (let i = 0; i < 1000; i++) await limiter.consume(`second${i}`)
  t.equal(held(), 1000, 'only the counts that have not ended are held')
  t.ok(
    (limiter as unknown as RateLimiterMemory).dump().storage.every((c) => String(c.key).startsWith('second')),
    'and they are the new ones',
  )
  t.match(await limiter.get('second999'), { consumedPoints: 1 }, 'which count on')
  t.equal(await limiter.get('first999'), null, 'an ended one is not')
})

t.test('a burst of concurrent requests for one key never exceeds the limit, and what it leaves leased is used next', async (t) => {
  const l = leased(20, 60, 'test', undefined, pinned('k', 60).now)
  const burst = await Promise.all(Array.from({ length: 50 }, () => one(l, 'k')))
  const allowed = burst.filter((a) => a !== 'refused').length
  t.ok(allowed <= 20 && allowed >= 15, `${allowed} of 50 allowed in the burst`)
  let after = 0
  while ((await one(l, 'k')) !== 'refused') after++
  t.equal(allowed + after, 20, 'exactly the limit in all')
})

t.test('a lease ends with its window', async (t) => {
  const clock = pinned('w', 60)
  const l = leased(16, 60, 'test', undefined, clock.now)
  for (let i = 0; i < 16; i++) t.not(await one(l, 'w'), 'refused')
  t.equal(await one(l, 'w'), 'refused')
  clock.set(clock.windowEnd - 1)
  t.equal(await one(l, 'w'), 'refused', 'refused until the last millisecond of the window')
  clock.set(clock.windowEnd)
  t.equal(await one(l, 'w'), 15, 'a new window, a new lease')
  t.ok(l.msBeforeNext === 60_000, `RateLimit-Reset counts from the window's start (${l.msBeforeNext} ms)`)
})

t.test("a renewal that comes back after its window ended does not replace the next window's lease", async (t) => {
  const clock = pinned('k', 60)
  // Two requests at once, on a rate clock that stands still (on the real one a loaded machine
  // could put milliseconds between them, and size the second lease too small to reserve ahead):
  // the second lease is sized to a fast rate (about 100 points).
  const l = leased(1_000_000, 60, 'test', undefined, clock.now, () => 0)
  await one(l, 'k')
  await one(l, 'k')
  clock.set(clock.windowEnd - 50)
  t.ok(l.take('k'), 'a request in the last 100 ms of the window')
  await l.reserved()
  // Used up at once: the renewal asked at a quarter left is still out when the window ends.
  while (l.take('k'));
  clock.set(clock.windowEnd + 10)
  t.ok(l.take('k'), "the next window's lease, reserved ahead, answers")
  await l.reserved()
  t.ok(l.take('k'), 'and still does once the renewal for the ended window has come back')
})

t.test("a renewal the store was slow to answer does not make a busy key look slow: its next window's lease is sized to the key's rate", async (t) => {
  const clock = pinned('k', 60)
  let ticks = 0
  const l = leased(1_000_000, 60, 'test', undefined, clock.now, () => ticks)
  const step = () => {
    ticks++
    clock.set(clock.now() + 1)
  }
  // A request a millisecond, each reservation answered at once, until a renewal is asked ahead.
  for (let i = 0; i < 1000 && !l.reserving('k'); i++) {
    if (!l.take('k')) await l.consume('k')
    if (!l.reserving('k')) await l.reserved()
    step()
  }
  t.ok(l.reserving('k'), 'a renewal was asked ahead')
  // That renewal is slow to come back (on the rate's clock, 45 ms): the key goes on using what its
  // lease holds, then one request waits. Meanwhile the windows' clock comes within 100 ms of the end.
  clock.set(clock.windowEnd - 90)
  while (l.take('k')) step()
  ticks += 20
  await l.consume('k')
  step()
  // The next request is in the window's last 100 ms: the next window's first lease is reserved.
  t.ok(l.take('k'), 'a request from the renewed lease')
  await l.reserved()
  clock.set(clock.windowEnd + 1)
  let answered = 0
  for (; answered < 50 && l.take('k'); answered++) {
    await l.reserved()
    step()
  }
  // Before, a lease was timed from when it was asked for, so the renewal looked 46 ms old after one
  // request, the key's rate 1/46 of what it was, and the next window's lease held 2 points.
  t.equal(answered, 50, `the next window's requests were answered from its lease reserved ahead (${answered} of 50 before one had to wait)`)
})

t.test("every process agrees on a key's windows, and keys' windows start at different moments", async (t) => {
  const a = leased(1000, 60, 'test-a')
  const b = leased(1000, 60, 'test-b')
  await one(a, 'same')
  await one(b, 'same')
  // Apart by the time between the two calls only (50 ms was met by a stall under the suite's load); keys' windows are spread over the minute.
  t.ok(Math.abs(a.msBeforeNext - b.msBeforeNext) < 500, `one key, one window end (${a.msBeforeNext} and ${b.msBeforeNext} ms away)`)
  const ends = new Set<number>()
  for (let i = 0; i < 20; i++) {
    await one(a, `key-${i}`)
    ends.add(Math.round(a.msBeforeNext / 1000))
  }
  t.ok(ends.size >= 10, `20 keys' windows end at ${ends.size} different seconds of the minute`)
})

t.test('Redis: two processes never exceed one shared limit, and use every point between them', async (t) => {
  const { a, b, redis: ra, prefix } = await twoProcesses(t, 200)
  // Uneven traffic: three requests on a for one on b, until both are refused.
  t.equal(await allowedUntilBothRefused(a, b, (i) => i % 4 === 3, 1000), 200, 'exactly the limit across both')
  t.equal((await counted(ra, prefix, 'k')) >= 200, true, 'the store counted every point')
})

t.test("Redis: a next window's leases reserved ahead by two processes never exceed its limit", async (t) => {
  const { a, b, redis: ra, prefix, clock } = await twoProcesses(t, 1000)
  // Busy in this window (leases grow to several points), then in its last 100 ms, where each
  // process reserves its first lease of the next window.
  for (let i = 0; i < 300; i++) await one(i % 2 === 0 ? a : b, 'k')
  clock.set(clock.windowEnd - 50)
  for (let i = 0; i < 100; i++) await one(i % 2 === 0 ? a : b, 'k')
  const ahead = await ra.get(windowKey(prefix, 'k', 60, clock.windowEnd))
  t.ok(Number(ahead) > 2, `the next window had ${ahead} points reserved before it began`)
  clock.set(clock.windowEnd + 10)
  t.equal(await allowedUntilBothRefused(a, b, (i) => i % 3 === 2, 5000), 1000, 'exactly the limit in the new window across both')
})

t.test('Redis: with a high limit the store is asked once per many requests', async (t) => {
  const { redis, prefix } = await redisFor(t)
  const l = leased(1_000_000, 60, prefix, redis, pinned('k', 60).now)
  let fromMemory = 0
  for (let i = 0; i < 1000; i++) {
    if (l.take('k')) fromMemory++
    else await l.consume('k')
  }
  const inStore = await counted(redis, prefix, 'k')
  // What was used, plus at most a lease and the quarter of the previous one it was asked beside.
  t.ok(inStore >= 1000 && inStore <= 1000 + MAX_LEASE + MAX_LEASE / 4, `the store holds what was used plus at most one lease and a quarter (${inStore})`)
  t.ok(fromMemory >= 990, `${fromMemory} of 1000 answered from the lease without a promise`)
})

t.test('Redis: a busy key renews its lease ahead, so its requests do not wait for the store', async (t) => {
  const { redis, prefix } = await redisFor(t)
  // A thousand requests a second on the clock of the key's rate, which moves 1 ms per request,
  // while each request also waits at least 1 ms of real time: a lease of about 100 ms holds about
  // 100 points, and its last quarter (25 requests) gives a renewal at least 25 ms of real time,
  // far longer than a round trip to Redis on loopback, however busy the machine (on the real
  // clock a stall of the loaded suite's event loop counted as time the lease should have lasted).
  let ticks = 0
  const l = leased(1_000_000, 60, prefix, redis, pinned('k', 60).now, () => ticks)
  const waits = waitCounter(l, 'k')
  for (let i = 0; i < 500; i++, ticks++) {
    await waits.request()
    await sleep(1)
  }
  // The first two reservations are asked when needed (one point for a key not seen lately, then
  // a lease sized to the rate); without renewing ahead every later lease would add one more (~8).
  t.ok(waits.unasked <= 2, `${waits.unasked} of 500 requests waited for a reservation asked only then (${waits.late} for one asked ahead in time that came back late)`)
  const inStore = await counted(redis, prefix, 'k')
  t.ok(inStore >= 500 && inStore <= 500 + 100 + 25, `the store holds what was used plus at most one lease and a quarter (${inStore})`)
})

t.test("Redis: a busy key's next window is reserved before it starts, so no request waits when a window ends", async (t) => {
  const { redis, prefix } = await redisFor(t)
  // A thousand requests a second across the ends of 1 s windows: the clock (of the windows and
  // of the key's rate) moves 1 ms per request, starting 300 ms before one of k's windows ends,
  // while each request also waits at least 1 ms of real time. So a reservation has at least as
  // much real time to come back as the clock gives it, however busy the machine (on the real
  // clock, a stall of the event loop under a loaded CI moved the windows on, and changed the
  // measured rate, without the store's answers being read meanwhile).
  const phase = windowPhase('k', 1000)
  let at = (Math.floor((Date.now() - phase) / 1000) + 1) * 1000 + phase - 300
  const l = leased(1_000_000, 1, prefix, redis, () => at, () => at)
  const waits = waitCounter(l, 'k')
  let windowEnds = 0
  let endsWaited = 0
  let firstOfWindow = 0
  let lastReset = Infinity
  for (let i = 0; i < 1400; i++, at++) {
    const reset = await waits.request()
    if (reset > lastReset + 100) {
      // The first request of a new window.
      if (waits.last === 'unasked') endsWaited++
      if (windowEnds === 0) firstOfWindow = Number(await redis.get(windowKey(prefix, 'k', 1, at)))
      windowEnds++
    }
    lastReset = reset
    await sleep(1)
  }
  t.ok(windowEnds >= 1, `the requests went on across ${windowEnds} window end(s)`)
  t.equal(endsWaited, 0, 'the first request of every new window found its lease reserved')
  t.ok(firstOfWindow > 1, `the new window's first lease was sized by the key's rate (${firstOfWindow} points), not one point`)
  // Two at the start (one point for a key not seen, then a lease sized to the rate), none after.
  t.ok(waits.unasked <= 2, `${waits.unasked} of 1400 requests waited for a reservation asked only then, over ${windowEnds} window end(s) (${waits.late} for one asked ahead in time that came back late)`)
})

t.test('Redis: a key used slowly is counted one point at a time', async (t) => {
  const { redis, prefix } = await redisFor(t)
  const l = leased(1000, 60, prefix, redis, pinned('k', 60).now)
  for (let i = 0; i < 5; i++) {
    t.equal(await one(l, 'k'), 999 - i)
    await sleep(150)
  }
  t.equal(await counted(redis, prefix, 'k'), 5, 'nothing reserved beyond what was used')
})

t.test("Redis: near a window's end a lease is sized to what the rest of the window needs, so little is lost when it ends", async (t) => {
  const { redis, prefix } = await redisFor(t)
  // Where in a lease's life the window's end comes decides whether a renewal falls in its last
  // 100 ms: five keys, each busy for 20 more requests than the one before, cover one lease's life.
  for (let k = 0; k < 5; k++) {
    const key = `k${k}`
    const clock = pinned(key, 60)
    // A request a millisecond on the clock the key's rate is measured on (each also waits at
    // least 1 ms of real time, so a reservation has as much real time to come back as this
    // clock gives it).
    let ticks = 0
    const l = leased(1_000_000, 60, prefix, redis, clock.now, () => ticks)
    const current = windowKey(prefix, key, 60, clock.windowStart)
    let used = 0
    const waits = waitCounter(l, key)
    const request = async () => {
      await waits.request()
      used++
      ticks++
      await sleep(1)
    }
    // Busy inside the window (leases of about 100 ms of its requests), then through its last
    // 150 ms, the windows' clock moving with the requests.
    for (let i = 0; i < 300 + 20 * k; i++) await request()
    const held = Number(await redis.get(current)) - used
    const waitedBefore = waits.unasked
    for (let at = clock.windowEnd - 150; at < clock.windowEnd; at++) {
      clock.set(at)
      await request()
    }
    clock.set(clock.windowEnd)
    const lost = Number(await redis.get(current)) - used
    // Before, a renewal in the last 100 ms took 100 ms of points (plus the quarter it still
    // held), nearly all lost (67-98 of leases of 64-99). Now only what the rate estimate misses.
    // (The rate was measured on the real clock here before, and missed more on a machine whose
    // load changed in those 100 ms: 38 of 90 once in a full suite run, 56 of 96 with three busy
    // loops on two cores.)
    t.ok(lost >= 0 && lost <= 5, `${key}: ${lost} points counted in the window and never used (the process held ${held} when its last 150 ms began)`)
    t.ok(waits.unasked - waitedBefore <= 1, `${key}: ${waits.unasked - waitedBefore} of 150 requests in the window's last 150 ms waited for a reservation asked only then (${waits.late} in all for one asked ahead in time that came back late)`)
  }
})

t.test("a busy key's renewal is asked while a quarter of its lease is left, however fast the store answers", async (t) => {
  // take() answers without a turn of the event loop, so a renewal asked during a run of takes
  // cannot come back before the run ends: how many requests the lease still serves after the ask
  // is what the lease had left then, whatever the store's speed (the tests above count waits,
  // which a store faster than the requests hides: a renewal asked at the last point was never seen).
  let ticks = 0
  const l = leased(1_000_000, 60, 'test-quarter', undefined, pinned('k', 60).now, () => ticks)
  /** Takes until the lease is used up: how many it served, and how many after a renewal was asked. */
  const run = () => {
    let served = 0
    let afterAsk: number | undefined
    for (; l.take('k'); served++, ticks++) {
      if (afterAsk !== undefined) afterAsk++
      else if (l.reserving('k')) afterAsk = 0
    }
    return { served, afterAsk }
  }
  // Leases sized to the rate of one request a tick (the first reservation is one point).
  for (let round = 0; round < 3; round++) {
    run()
    await l.consume('k')
    ticks++
  }
  const { served, afterAsk } = run()
  // The consume that brought this lease took its first point.
  const size = served + 1
  t.ok(size >= 8, `a lease of ${size} points, sized to the rate (renewed ahead from 8 points)`)
  t.ok(afterAsk !== undefined, 'a renewal was asked before the lease was used up')
  t.ok((afterAsk ?? 0) >= size >> 2, `asked with ${afterAsk} of ${size} points left (a quarter: ${size >> 2})`)
})

t.test("a next window's lease is reserved for the window after the one take() saw, even if the clock moves on meanwhile", async (t) => {
  const clock = pinned('k', 60)
  let jumpTo: number | undefined
  // The clock as take() reads it; the read after it (a window boundary passing between the two) is later.
  const now = () => {
    const at = clock.now()
    if (jumpTo !== undefined) {
      clock.set(jumpTo)
      jumpTo = undefined
    }
    return at
  }
  // The rate clock stands still: two requests at once (see above).
  const l = leased(1_000_000, 60, 'test-clock', undefined, now, () => 0)
  await one(l, 'k')
  await one(l, 'k') // a lease sized to a fast rate (about 100 points)
  clock.set(clock.windowEnd - 50)
  jumpTo = clock.windowEnd + 1
  t.ok(l.take('k'), "a request in the window's last 100 ms, which reserves the next window's first lease")
  await l.reserved()
  t.ok(l.take('k'), "in the next window that lease answers, without waiting for the store")
})

t.test('Redis: a reservation answered by Redis after the gate switched to the insurance is not used under it', async (t) => {
  // The gate goes down by hand here, and stays down for the test (no probe brings it back).
  const { redis, prefix } = await redisFor(t, { probeMs: 600_000 })
  const health = redisHealth(redis)
  const l = leased(1000, 60, prefix, redis, pinned('k', 60).now)
  t.not(await one(l, 'k'), 'refused', 'one point, from Redis')
  const asked = one(l, 'k') // a lease sized to the rate (tens of points), asked of Redis
  health.down('error') // e.g. another call timed out meanwhile
  let allowed = (await asked) === 'refused' ? 0 : 1
  while ((await one(l, 'k')) !== 'refused' && allowed < 5000) allowed++
  // The point Redis counted first is carried into the insurance (before, it counted from zero).
  t.equal(allowed, 999, "after the switch the rest of the limit from the insurance, and not a Redis lease on top of it")
  await sleep(50)
  t.equal(await counted(redis, prefix, 'k'), 1, 'what Redis granted after the switch was given back to it (the first point stays)')
})

t.test('Redis: a reservation the store refuses keeps what the store had left, and gives back only the rest', async (t) => {
  const { a, b, redis, prefix, clock } = await twoProcesses(t, 1000)
  const storeKey = windowKey(prefix, 'k', 60, clock.now())
  t.not(await one(a, 'k'), 'refused')
  t.not(await one(a, 'k'), 'refused') // a lease sized to the rate; a is told what the store has left after it
  const held = Number(await redis.get(storeKey))
  await redis.incrby(storeKey, 990 - held) // b's clients used all but 10 meanwhile (counted as b would)
  let allowed = 2
  let waited = 0
  for (; allowed < 2000; allowed++) {
    if (a.take('k')) continue
    waited++
    try {
      await a.consume('k')
    } catch (err) {
      if (err instanceof RateLimiterRes) break
      throw err
    }
  }
  t.equal(allowed, held + 10, `a admits its lease and the 10 points left, and no more (${held} held at first)`)
  // Before, the refused renewal was given back whole and a was counted one point at a time (one wait per point).
  t.ok(waited <= 3, `${waited} requests waited for the store: the 10 points came with the refused renewal`)
  t.equal(await one(b, 'k'), 'refused', 'the limit is used up for b too')
})

t.test('Redis: a switch to the insurance and back neither drops a refusal nor starts a count afresh', async (t) => {
  const server = await startRedisServer(t)
  const redis = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => redis.disconnect())
  t.equal(await redis.ping(), 'PONG')
  // Made before the limiter, which shares it: a probe every 50 ms brings Redis back soon.
  const health = redisHealth(redis, { probeMs: 50 })
  const l = leased(5, 120, 'test-switch', redis, pinned('k', 120).now)
  for (let i = 0; i < 5; i++) t.not(await one(l, 'full'), 'refused')
  t.equal(await one(l, 'full'), 'refused', 'refused by Redis: 5 of 5')
  t.not(await one(l, 'k'), 'refused')
  t.not(await one(l, 'k'), 'refused', 'another key: 2 of 5 in Redis')
  for (let i = 0; i < 3; i++) t.not(await one(l, 'm'), 'refused')
  server.pause()
  t.teardown(() => server.resume())
  // Before, the refusal was dropped at the switch and the insurance counted from zero: 5 more
  // for 'full' (10 in the window), and 'k' had 5 more under the insurance.
  t.not(await one(l, 'k'), 'refused', 'a request that finds Redis frozen is answered by the insurance')
  t.equal(health.up, false, 'the insurance answers now')
  t.equal(await one(l, 'full'), 'refused', 'a refusal from Redis holds under the insurance')
  t.not(await one(l, 'k'), 'refused', "the insurance carries on from Redis's count: 4 of 5")
  // The request that found Redis frozen was counted by the insurance too: the fifth is the last
  // (before, found by a review, no test held it: a failed call answered "allowed" uncounted passed).
  t.not(await one(l, 'k'), 'refused', '5 of 5')
  t.equal(await one(l, 'k'), 'refused', 'the sixth is refused by the insurance')
  let more = 0
  while ((await one(l, 'm')) !== 'refused' && more < 10) more++
  t.equal(more, 2, `a key with 3 of 5 counted in Redis has 2 more from the insurance (${more})`)
  server.resume()
  await until(t, 'Redis answers again', () => health.up)
  t.equal(await one(l, 'full'), 'refused', 'and once Redis answers again')
  // Before, back in Redis 'k' had 2 more: Redis had counted 3 (the request it answered too late
  // is counted there all the same), and what the insurance counted was not added.
  let allowed = 0
  while ((await one(l, 'k')) !== 'refused' && allowed < 10) allowed++
  t.equal(allowed, 0, `what the insurance counted is carried into Redis, which is at the limit (${allowed} more)`)
})

t.test("a key whose limit is changed within a window keeps its count, in memory and in Redis", async (t) => {
  const server = await startRedisServer(t)
  const redis = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => redis.disconnect())
  for (const [store, r] of [['memory', undefined], ['Redis', redis]] as const) {
    const limiterFor = createKeyLimiters({ default: { limit: 100, window_s: 3600 } } as Parameters<typeof createKeyLimiters>[0], r)
    const id = randomUUID()
    const record = (limit: number) => ({ id, type: 'user', rateLimit: { limit, windowS: 3600 } }) as KeyRecord
    const fifty = limiterFor(record(50))
    for (let i = 0; i < 4; i++) t.not(await one(fifty, id), 'refused')
    // Before, each limit had its own counter: 2 more after the change (6 in the window against 2).
    t.equal(await one(limiterFor(record(2)), id), 'refused', `${store}: lowered to 2 after 4, refused`)
    // Back to 50: the 4 are counted, not the refused request (the points 'fifty' still held were
    // given back by the limit of 2, which found its lease).
    let allowed = 0
    while ((await one(fifty, id)) !== 'refused' && allowed < 100) allowed++
    t.equal(allowed, 46, `${store}: back to 50, the count goes on (${allowed} more)`)
    // Refused at 5, raised to 7: 2 more (before the fix of the review: refused asks stayed counted,
    // and the key was refused at 5 of 7).
    const other = randomUUID()
    const raised = (limit: number) => ({ id: other, type: 'user', rateLimit: { limit, windowS: 3600 } }) as KeyRecord
    const five = limiterFor(raised(5))
    for (let i = 0; i < 5; i++) t.not(await one(five, other), 'refused')
    for (let i = 0; i < 3; i++) t.equal(await one(five, other), 'refused', `${store}: the 6th and later at 5 are refused`)
    const seven = limiterFor(raised(7))
    let more = 0
    while ((await one(seven, other)) !== 'refused' && more < 10) more++
    t.equal(more, 2, `${store}: raised to 7 after 5 admitted, 2 more (${more})`)
  }
})

t.test("a key's limit changed within a window: raised, it admits the new limit less what it used; lowered, it is refused only once what it used reaches the new limit (memory and Redis)", async (t) => {
  // Before, each limit had leases of its own: what the old limit had reserved and not used
  // stayed counted for the rest of the window, and nobody used it. A review raised a key from 200
  // to 250 after 61 requests over three gateways, with 57 points so reserved: 132 more were
  // admitted instead of 189.
  const { redis, prefix } = await redisFor(t)
  for (const [store, r] of [['memory', undefined], ['Redis', redis]] as const) {
    const clock = pinned('k', 60)
    const { limit, counted } = limitsOver(`${prefix}:${store}`, r, clock.now)
    const at200 = limit(200)
    for (const key of ['raised', 'lowered', 'used']) for (let i = 0; i < 61; i++) t.not(await one(at200, key), 'refused')
    const held = (await counted('raised')) - 61
    t.ok(held > 0, `${store}: after 61 requests at 200 the store counts ${held} more, reserved and not used yet`)
    t.equal(await allowedUntilRefused(limit(250), 'raised'), 189, `${store}: raised to 250 after 61, 189 more`)
    t.equal(await allowedUntilRefused(limit(100), 'lowered'), 39, `${store}: lowered to 100 after 61, 39 more`)
    t.equal(await allowedUntilRefused(limit(200), 'lowered'), 100, `${store}: raised back to 200 once refused at 100, 100 more`)
    t.equal(await one(limit(61), 'used'), 'refused', `${store}: lowered to the 61 it used, refused at once`)
    t.equal(await one(limit(50), 'used'), 'refused', `${store}: lowered below what it used, refused`)
    await sleep(50)
    t.equal(await counted('used'), 61, `${store}: the store counts what was used, and nothing reserved for 200 or asked past 61 or 50`)
  }
})

t.test("Redis: a key's limit changed within a window, over two processes: the new limit less what was used between them", async (t) => {
  const { redis, prefix } = await redisFor(t)
  const rb = new Redis(REDIS_URL, { maxRetriesPerRequest: 1 })
  t.teardown(() => rb.disconnect())
  t.equal(await rb.ping(), 'PONG')
  redisHealth(rb, { timeoutMs: 5000 })
  const clock = pinned('k', 60)
  const a = limitsOver(prefix, redis, clock.now)
  const b = limitsOver(prefix, rb, clock.now)
  const a200 = a.limit(200)
  const b200 = b.limit(200)
  for (const key of ['raised', 'lowered']) for (let i = 0; i < 61; i++) t.not(await one(i % 3 === 2 ? b200 : a200, key), 'refused')
  t.ok((await a.counted('raised')) > 61, `both processes hold points reserved at 200 and not used (${await a.counted('raised')} counted for 61 used)`)
  t.equal(await allowedUntilBothRefused(a.limit(250), b.limit(250), (i) => i % 2 === 1, 1000, 'raised'), 189, 'raised to 250 after 61: 189 more between them')
  t.equal(await allowedUntilBothRefused(a.limit(100), b.limit(100), (i) => i % 2 === 1, 1000, 'lowered'), 39, 'lowered to 100 after 61: 39 more between them')
})

t.test("the limits of one window share a lease map as large as the maps they each had: 3,000 keys on each of two limits, all under their limit, none refused", async (t) => {
  // Before (found by a review of the change that made them share it): one map of 5,000 leases for
  // every limit of a window; 6,000 keys evicted each other's leases, whose points are lost for the
  // window, and 14,528 of 600,000 requests under the limit were refused.
  const start = Date.now()
  const { limit } = limitsOver(`keygate:test:shared-${randomUUID()}`, undefined, () => start)
  const limits = [limit(100), limit(101)]
  const keys = Array.from({ length: 6000 }, (_, i) => `k${i}-${randomUUID().slice(0, 8)}`)
  let refused = 0
  // A request its lease answers is taken without a promise, as the gateway's request path takes
  // it (gateway/rate-limit.ts); only the rest wait for the store. Each of the 600,000 requests
  // awaited one() before, about 40% of the test's time (tap's async hooks see every promise); the
  // 183,000 that reach the store are the same either way.
  for (let round = 0; round < 5; round++) {
    for (const [i, key] of keys.entries()) {
      const l = limits[i % 2] as LeasedLimit
      for (let n = 0; n < 20; n++) if (!l.take(key) && (await one(l, key)) === 'refused') refused++
    }
  }
  t.equal(refused, 0, '100 requests a key within limits of 100 and 101: none refused')
})

t.test('the leases a process holds are bounded as documented under a flood of distinct keys, and ended ones are dropped', async (t) => {
  // Before (found by a review of the lease bounds): a quick-lru sized 5,000, grown by 5,000 a
  // limit to 40,000, which holds up to twice that (its two generations), and never drops a lease
  // whose window has ended: 60,000 held here for the documented 40,000, and all of them for as
  // long as no other key pushed them out.
  let at = Date.now()
  const { limit } = limitsOver(`keygate:test:lease-flood-${randomUUID()}`, undefined, () => at)
  const first = limit(10)
  for (let i = 0; i < 25_000; i++) await one(first, `one-${i}`)
  t.equal(first.leasesHeld, 10_000, 'one limit: the 10,000 leases reserved last, no more')
  const limits = [first, ...Array.from({ length: 7 }, (_, i) => limit(11 + i))]
  for (let i = 0; i < 100_000; i++) await one(limits[i % limits.length] as LeasedLimit, `many-${i}`)
  t.equal(first.leasesHeld, 40_000, 'eight limits of one window: 40,000, no more')
  // Two windows later every lease has ended (kept a window past its end, for the key's rate):
  // each lease reserved then drops up to 8 of them.
  at += 3 * 60_000
  for (let i = 0; i < 5_000; i++) await one(first, `later-${i}`)
  t.equal(first.leasesHeld, 5_000, 'once ended, they go as others are reserved')
})
