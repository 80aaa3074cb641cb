// Regression (found by a review): with `anomalies.check_interval_ms` above a minute (the schema
// takes up to 10 minutes), a minute or error-rate window whose requests fell in two checks was
// judged in halves. The first check's counts expired (two windows after the window's start, in
// memory; 120 s after they were added, in Redis) before the next check added the rest, so a burst
// over the threshold raised nothing.
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { Redis } from 'ioredis'
import { AnomalyDetector } from '../core/anomalies.ts'
import { silentLogger } from '../core/log.ts'
import { DEFAULT_CONFIG, memoryDb } from './helpers/stores.ts'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const CHECK_INTERVAL_MS = 300_000
const thresholds = { ...DEFAULT_CONFIG.anomalies, check_interval_ms: CHECK_INTERVAL_MS, request_rate_per_min: 20, error_rate_min_requests: 20 }

t.test('in memory: a burst whose minute two checks share is judged whole', async (t) => {
  const db = await memoryDb({ migrated: true })
  t.teardown(() => db.close())
  // The timer is the test's: each check() below is one the interval would have made.
  const detector = new AnomalyDetector({ db, thresholds, channel: 'unused', log: silentLogger, checkIntervalMs: 0, ipv6PrefixBits: 64 })
  t.teardown(() => detector.close())
  const keyId = `split${randomBytes(4).toString('hex')}`
  const minute = Date.now() - (Date.now() % 60_000) - 60 * 60_000
  // The first check, 10 s into the minute: 15 requests, 12 of them refused.
  for (let i = 0; i < 15; i++) detector.count(keyId, i < 12 ? 'scope_denied' : 'forwarded', minute + 10_000, '192.0.2.1', i < 12 ? 403 : 200)
  await detector.check()
  // The next check, CHECK_INTERVAL_MS later, has the minute's other 10 requests (all refused), and
  // what came since (another key's request, 5 minutes on).
  for (let i = 0; i < 10; i++) detector.count(keyId, 'scope_denied', minute + 50_000, '192.0.2.1', 403)
  detector.count(`other${keyId}`, 'forwarded', minute + 10_000 + CHECK_INTERVAL_MS, '192.0.2.2', 200)
  await detector.check()
  const rows = await db.query<{ type: string; details: { requests: number } }>('SELECT type, details FROM api_key_anomalies WHERE key_id = $1 ORDER BY type', [keyId])
  t.same(
    rows.map((r) => [r.type, r.details.requests]),
    [
      ['error_rate', 25],
      ['request_rate', 25],
    ],
    "the minute's 25 requests (22 refused) over both checks: request rate and error rate",
  )
})

t.test("in Redis: a minute's counts outlive the next check", async (t) => {
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: 1, connectTimeout: 2000 })
  t.teardown(() => redis.quit())
  t.equal(await redis.ping(), 'PONG', `Redis reachable at ${REDIS_URL}`)
  const db = await memoryDb({ migrated: true })
  t.teardown(() => db.close())
  const detector = new AnomalyDetector({ db, thresholds, redis, channel: `test-${randomBytes(4).toString('hex')}`, log: silentLogger, checkIntervalMs: 0, ipv6PrefixBits: 64 })
  t.teardown(() => detector.close())
  const keyId = `split${randomBytes(4).toString('hex')}`
  const now = Date.now()
  const minute = now - (now % 60_000)
  const errWindow = now - (now % (thresholds.error_rate_window_s * 1000))
  detector.count(keyId, 'scope_denied', now, '192.0.2.1', 403)
  await detector.check()
  const k = `keygate:anomaly:{${keyId}}`
  const keys = [`${k}:r:${minute}`, `${k}:q:${errWindow}`, `${k}:e:${errWindow}`]
  t.teardown(() => redis.del(...keys, `${k}:a:${now - (now % 3_600_000)}`))
  // Another instance's next check (or this one's) adds to them up to a check interval later: they
  // must still hold this one's counts then (before: kept 120 s, and the rest counted alone).
  for (const key of keys) t.ok((await redis.ttl(key)) > CHECK_INTERVAL_MS / 1000, `${key.slice(k.length + 1)} is kept past the next check`)
})

t.test('error_rate_percent 100 turns the error-rate check off (no share is more than all); 99 flags a key whose every answer is an error', async (t) => {
  const db = await memoryDb({ migrated: true })
  t.teardown(() => db.close())
  const flagged: Record<number, string[]> = {}
  for (const percent of [100, 99]) {
    const detector = new AnomalyDetector({ db, thresholds: { ...DEFAULT_CONFIG.anomalies, error_rate_percent: percent, error_rate_min_requests: 20 }, channel: 'unused', log: silentLogger, checkIntervalMs: 0, ipv6PrefixBits: 64 })
    const keyId = `all-errors-${percent}-${randomBytes(4).toString('hex')}`
    for (let i = 0; i < 25; i++) detector.count(keyId, 'scope_denied', Date.now(), '192.0.2.1', 403)
    await detector.check()
    await detector.close()
    flagged[percent] = (await db.query<{ type: string }>('SELECT type FROM api_key_anomalies WHERE key_id = $1', [keyId])).map((r) => r.type)
  }
  t.same(flagged, { 100: [], 99: ['error_rate'] })
})
