// A change of many keys at once (an import, a scheduler round) reaches another gateway as a few
// batch messages, not one per key (before, 2 per key: an import of 10,000 rows sent 20,000, and
// each gateway went through its whole cache for each, seconds of a stalled event loop). Counted
// on a subscriber of the test's own, on a redis-server of the test's own. The other gateway,
// its cache full of keys, takes every change (an imported key it had cached as unknown works,
// an expired one it had cached is refused), keeps serving the keys that did not change from its
// cache, and sees no gap in the versions, though each batch takes two (see core/invalidation.ts).
// The WebSocket tunnels of many changed keys are read again in a store query per 500 keys, not
// one per key.
import { createHash, randomUUID } from 'node:crypto'
import t from 'tap'
import { Redis } from 'ioredis'
import { INVALIDATION_CHANNEL, INVALIDATION_VERSION_KEY } from '../core/invalidation.ts'
import { KeyService } from '../core/keys/service.ts'
import { silentLogger } from '../core/log.ts'
import { connectRedis } from '../core/redis.ts'
import { keyServiceOptions } from '../core/runtime.ts'
import { Scheduler } from '../core/scheduler.ts'
import { ACTOR, makeConfig, metric, openStore, startGateway, until, type Harness } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import { Router } from '../gateway/route.ts'
import { TunnelGuard } from '../gateway/tunnels.ts'

const DAY = 24 * 3600 * 1000
/** A message's most characters: Redis and IPC messages stay well under a megabyte. */
const MESSAGE_MAX = 64 * 1024

const rows = (uuids: readonly string[], extra: Record<string, unknown> = {}) =>
  uuids.map((u, i) => ({ key_hash: createHash('sha256').update(u).digest('hex'), name: `bulk ${i}`, ...extra }))

/** Each key's answer on `gateway`, 50 requests at a time. */
async function statuses(gateway: Harness, uuids: readonly string[]): Promise<number[]> {
  const out: number[] = []
  for (let i = 0; i < uuids.length; i += 50) {
    const answers = await Promise.all(uuids.slice(i, i + 50).map((u) => gateway.get('/', { 'x-api-key': u })))
    out.push(...answers.map((a) => a.status))
  }
  return out
}

const count = (list: readonly number[], status: number) => list.filter((s) => s === status).length

t.test('an import and a scheduler round reach another gateway as a few bounded messages', async (t) => {
  const server = await startRedisServer(t)
  const config = {
    // Redis alone carries the changes: no store check, cached answers good for an hour.
    cache: { ttl_s: 3600, store_check_s: 0, negative_ttl_s: 3600, max_capacity: 20_000, negative_max: 20_000 },
    redis: { invalidation_check_ms: 0 },
    rate_limits: { per_address: { limit: 1_000_000, window_s: 1 } },
    lockout: { max_attempts: 1_000_000 },
  }
  const redisA = connectRedis(server.url, silentLogger)
  const redisB = connectRedis(server.url, silentLogger)
  const listener = new Redis(server.url)
  t.teardown(() => {
    redisA.disconnect()
    redisB.disconnect()
    listener.disconnect()
  })
  const store = await openStore(t, makeConfig({ ...config, routes: [] }))
  const a = await startGateway(t, { config, store, redis: redisA })
  // B has a KeyService of its own: A's changes reach it only through Redis.
  const keysB = new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(a.config) })
  const b = await startGateway(t, { config, store: { ...store, keys: keysB }, redis: redisB })

  const received: Array<{ version: number; message: string }> = []
  listener.on('message', (_channel: string, raw: string) => {
    const bar = raw.indexOf('|')
    received.push({ version: Number(raw.slice(0, bar)), message: raw.slice(bar + 1) })
  })
  await listener.subscribe(INVALIDATION_CHANNEL)
  /** The messages A published since the last call, once the last has arrived. */
  const published = async () => {
    // Read on A's connection: Redis answers it after every publish A made before.
    const version = Number(await redisA.get(INVALIDATION_VERSION_KEY))
    await until(t, `message ${version} arrived`, () => received.some((r) => r.version === version))
    return received.splice(0)
  }

  // Each key B is asked for that it does not hold is a store query on PGlite's thread, a few ms of
  // CPU: 100 keys that do not change and 100 that expire show what 600 and 300 did (before, 2
  // messages a key; a batch past 8), and the import stays 1200, whose hashes take more than one
  // message of 64 KiB. With 600 and 300 the test took 16 s alone, over 30 s in a loaded full run.
  const unchanged = Array.from({ length: 100 }, () => randomUUID())
  const expiring = Array.from({ length: 100 }, () => randomUUID())
  await a.keys.importLegacy(rows(unchanged), ACTOR)
  await a.keys.importLegacy(rows(expiring, { expires_at: new Date(Date.now() + DAY).toISOString() }), ACTOR)
  await published()
  // B's cache: every key of both, and the keys about to be imported as unknown.
  const imported = Array.from({ length: 1200 }, () => randomUUID())
  t.equal(count(await statuses(b, [...unchanged, ...expiring]), 200), 200, 'B serves and caches the keys')
  t.equal(count(await statuses(b, imported), 401), 1200, 'B caches the keys not yet imported as unknown')
  const hits = () => metric(b.metrics.registry, 'keygate_key_cache_total', { result: 'hit' })
  const misses = () => metric(b.metrics.registry, 'keygate_key_cache_total', { result: 'miss' })
  const gaps = () => metric(b.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'gap' })
  const gapsBefore = await gaps()

  const checkMessages = (what: string, messages: Array<{ version: number; message: string }>, keys: number) => {
    // 1200 ids (12 characters) and hashes (64) fit in 2 messages of 64 KiB; before, 2 a key.
    t.ok(messages.length <= 4, `${what}: ${messages.length} messages for ${keys} keys`)
    t.ok(
      messages.every((m) => m.message.length <= MESSAGE_MAX),
      `${what}: each message is at most ${MESSAGE_MAX} characters`,
    )
    t.ok(
      messages.every((m) => /^(keys|hashes):/.test(m.message)),
      `${what}: batch messages`,
    )
    // So a keygate from before batches, which ignores them, sees a version skipped and flushes.
    t.ok(
      messages.every((m, i) => i === 0 || m.version === (messages[i - 1] as { version: number }).version + 2),
      `${what}: each batch takes two versions`,
    )
  }

  await a.keys.importLegacy(rows(imported), ACTOR)
  const importMessages = await published()
  checkMessages('an import of 1200 rows', importMessages, 1200)
  t.ok(importMessages.filter((m) => m.message.startsWith('hashes:')).length >= 2, 'the hashes take more than one message of 64 KiB: a batch is split')
  t.equal(count(await statuses(b, imported), 200), 1200, 'every imported key works on B, though B had it cached as unknown')

  const clock = Date.now() + 2 * DAY
  const scheduler = new Scheduler({ db: store.db, keys: a.keys, audit: store.audit, log: silentLogger, now: () => new Date(clock), intervalS: 60, noticeMs: DAY, pruneRules: [] })
  const run = await scheduler.runOnce()
  t.equal(run?.expired.length, 100, 'the round expired the 100 keys')
  checkMessages('a scheduler round expiring 100 keys', await published(), 100)
  // B's cached entries hold these keys valid until tomorrow by its clock: only the messages end them.
  t.equal(count(await statuses(b, expiring), 401), 100, 'every expired key is refused on B')

  const [hitsBefore, missesBefore] = [await hits(), await misses()]
  t.equal(count(await statuses(b, unchanged), 200), 100, 'the keys that did not change still work on B')
  t.equal((await hits()) - hitsBefore, 100, 'from its cache')
  t.equal((await misses()) - missesBefore, 0, 'without asking the store')
  t.equal((await gaps()) - gapsBefore, 0, 'the two versions of each batch are no gap to B')
})

t.test('the tunnels of many changed keys are read again in one store query per 500 keys', async (t) => {
  const config = makeConfig({ routes: [{ name: 'api', path: '/', upstream: 'http://127.0.0.1:9' }] })
  const store = await openStore(t, config)
  const route = new Router(config.routes).routes[0]!
  const reads: number[] = []
  const guard = new TunnelGuard({
    // The store's own KeyService; the test only counts its reads.
    keys: { getMany: (ids) => (reads.push(ids.length), store.keys.getMany(ids)) },
    now: Date.now,
    log: silentLogger,
    recheckMs: 3_600_000,
    denied: () => false,
  })
  t.teardown(() => guard.stop())
  const records = await store.keys.importLegacy(rows(Array.from({ length: 600 }, () => randomUUID())), ACTOR)
  const closed = new Set<string>()
  for (const r of records) guard.opened({ keyId: r.id, address: '127.0.0.1', route, requestId: r.id, close: () => closed.add(r.id) }, Infinity, guard.changes)
  // Revoked where no one hears it; then the change arrives, all at once (a batch, or a burst of messages).
  await store.db.query(`UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE legacy`)
  guard.keysChanged(records.map((r) => r.id))
  await until(t, 'every tunnel closed', () => closed.size === 600)
  t.same(reads, [500, 100], 'two store reads for 600 keys')
})
