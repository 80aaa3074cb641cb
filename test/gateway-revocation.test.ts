// Changes through the store reach the request path: a revoked key is refused at once on the
// same instance, within the cache TTL elsewhere, long before it with Redis; deny list
// entries from the store apply without restart and stop at their expiry; random keys cannot
// grow the caches.
import t from 'tap'
import { mock } from 'node:test'
import { Redis } from 'ioredis'
import { generateKey } from '../core/keys/format.ts'
import { ACTOR, bearer, freshAddress, makeConfig, openStore, sleep, startGateway, until } from './helpers/gateway.ts'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

t.test('revocation: at once here, within the TTL on another instance', async (t) => {
  // 3 s: the revocation and the next request here must come within it for "still cached
  // elsewhere" to hold (with 1 s the suite's load once left too little of it).
  const config = { cache: { ttl_s: 3 } }
  const store = await openStore(t, makeConfig({ ...config, routes: [] }))
  const here = await startGateway(t, { config, store })
  // Another process: its own KeyService over the same store, so no change events reach it.
  const { KeyService } = await import('../core/keys/service.ts')
  const { keyServiceOptions } = await import('../core/runtime.ts')
  const elsewhereKeys = new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(here.config) })
  const elsewhere = await startGateway(t, { config, store: { ...store, keys: elsewhereKeys } })

  const k = await here.key()
  t.equal((await here.get('/', bearer(k.key))).status, 200)
  t.equal((await elsewhere.get('/', bearer(k.key))).status, 200, 'now cached elsewhere')
  await here.keys.revoke(k.id, 'leaked', ACTOR)
  t.equal((await here.get('/', bearer(k.key))).status, 401, 'refused at once on the instance that revoked it')
  t.equal((await elsewhere.get('/', bearer(k.key))).status, 200, 'still cached elsewhere')
  await until(t, 'refused elsewhere once the TTL passed', async () => (await elsewhere.get('/', bearer(k.key))).status === 401, 10_000)

  const r = await here.key({ type: 'service' })
  t.equal((await here.get('/', bearer(r.key))).status, 200)
  const rotated = await here.keys.rotate(r.id, { force: true }, ACTOR)
  t.equal((await here.get('/', bearer(r.key))).status, 401, 'a forced rotation kills the old key at once')
  t.equal((await here.get('/', bearer(rotated.key))).status, 200)

  // The key a revoked one replaced, still in its grace and cached here, is refused at once too.
  const p = await here.key({ type: 'service' })
  const successor = await here.keys.rotate(p.id, {}, ACTOR)
  t.equal((await here.get('/', bearer(p.key))).status, 200, 'the old key works in its grace')
  await here.keys.revoke(successor.record.id, 'leaked', ACTOR)
  t.equal((await here.get('/', bearer(p.key))).status, 401, "revoking its successor ends it (before: it worked for the rest of its 48 h)")

  const u = await here.key({ scopes: ['a'] })
  t.equal((await here.get('/', bearer(u.key))).json.headers['x-keygate-scopes'], 'a')
  await here.keys.update(u.id, { scopes: ['a', 'b'] }, ACTOR)
  t.equal((await here.get('/', bearer(u.key))).json.headers['x-keygate-scopes'], 'a,b', 'an update applies to the next request')
})

t.test('revocation with Redis: on every instance long before the cache TTL (bench/propagation.ts measures how soon)', async (t) => {
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: 1, connectTimeout: 2000 })
  t.teardown(() => redis.quit())
  t.equal(await redis.ping(), 'PONG', `Redis reachable at ${REDIS_URL}`)
  // Counters in Redis outlive the test: an address this run has not used keeps earlier runs' failed attempts out.
  const config = { cache: { ttl_s: 300 }, gateway: { trusted_proxies: ['127.0.0.1'] } }
  const from = { 'x-forwarded-for': freshAddress() }
  const store = await openStore(t, makeConfig({ ...config, routes: [] }))
  const here = await startGateway(t, { config, store, redis })
  const { KeyService } = await import('../core/keys/service.ts')
  const { keyServiceOptions } = await import('../core/runtime.ts')
  const elsewhere = await startGateway(t, { config, store: { ...store, keys: new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(here.config) }) }, redis })
  await sleep(200)
  const k = await here.key()
  t.equal((await elsewhere.get('/', { ...bearer(k.key), ...from })).status, 200)
  await here.keys.revoke(k.id, undefined, ACTOR)
  // The cache TTL is 300 s: refused within 10 s, only Redis can have told it (how soon is the
  // benchmark's to say, not a test's: a bound of 1 s here was met by a stall of the loaded suite).
  await until(t, 'refused elsewhere well within the TTL', async () => (await elsewhere.get('/', { ...bearer(k.key), ...from })).status === 401, 10_000)
})

t.test('deny list from the store: added, removed, expiring, reloaded by other instances', async (t) => {
  const config = { gateway: { deny_list_refresh_s: 1 } }
  const store = await openStore(t, makeConfig({ ...config, routes: [] }))
  let clock: number | undefined
  const h = await startGateway(t, { config, store, now: () => new Date(clock ?? Date.now()) })
  const other = await startGateway(t, { config, store, shareDenyList: false })
  const k = await h.key()
  t.equal((await h.get('/', bearer(k.key))).status, 200)
  const entry = await h.denyList.add({ cidr: '::ffff:127.0.0.1', reason: 'test' }, ACTOR)
  t.equal(entry.cidr, '127.0.0.1', 'stored normalised')
  const denied = await h.get('/', bearer(k.key))
  t.equal(denied.status, 403, 'applies at once in the process that added it')
  t.equal(denied.json.error.code, 'ip_blocked')
  await until(t, 'another instance picks it up on its next reload', async () => (await other.get('/', bearer(k.key))).status === 403, 10_000)
  await h.denyList.remove(entry.id, ACTOR)
  t.equal((await h.get('/', bearer(k.key))).status, 200, 'removal applies at once')

  // The gateway's clock is moved to an expiry an hour out: before, the entry expired 3 s after it
  // was added, and the add (a write and its audit row) and a request had to come within them (a
  // window a stall of the loaded suite could close).
  const expiresAt = Date.now() + 3_600_000
  await h.denyList.add({ cidr: '127.0.0.0/8', expiresAt: new Date(expiresAt) }, ACTOR)
  t.equal((await h.get('/', bearer(k.key))).status, 403, 'an entry matches')
  clock = expiresAt - 1
  t.equal((await h.get('/', bearer(k.key))).status, 403, 'until its expiry')
  clock = expiresAt
  t.equal((await h.get('/', bearer(k.key))).status, 200, 'an expired entry stops matching at its expiry')
  // A reload reads the entry again (the store's clock has not reached its expiry): the gateway's clock still judges it.
  await h.gateway.refreshDenyList()
  t.equal((await h.get('/', bearer(k.key))).status, 200, 'and a reload does not bring it back')
  await t.rejects(h.denyList.add({ cidr: 'nonsense' }, ACTOR), { code: 'validation_failed' })
  await t.rejects(h.denyList.add({ cidr: '192.0.2.77/24' }, ACTOR), { code: 'validation_failed' }, 'a range with host bits set is refused')
  const first = await h.denyList.save({ cidr: '192.0.2.0/24' }, ACTOR)
  const again = await h.denyList.save({ cidr: '::ffff:192.0.2.0/120' }, ACTOR)
  t.same([again.updated, again.entry.id, again.entry.cidr], [true, first.entry.id, '192.0.2.0/24'], 'one range, one spelling: written otherwise, the same entry')
})

t.test('random keys do not grow the caches; a burst of one unknown key costs one look-up', async (t) => {
  const h = await startGateway(t, { config: { cache: { max_capacity: 10, negative_max: 20 }, lockout: { max_attempts: 100000, window_s: 60 } } })
  for (let i = 0; i < 60; i++) t.equal((await h.get('/', bearer(generateKey('kg_').key))).status, 401)
  for (let i = 0; i < 30; i++) await h.get('/', bearer((await h.key()).key))
  const text = await h.metrics.registry.metrics()
  t.match(text, /keygate_key_cache_total\{result="miss"\} 90/)
  const { KeyCache } = await import('../gateway/key-cache.ts')
  const { createGatewayMetrics, createMetricsRegistry } = await import('../core/metrics.ts')
  // The harness's own KeyService over its store, each look-up that reaches it counted.
  let lookups = 0
  const keys = Object.create(h.keys) as typeof h.keys
  keys.lookup = (presented) => (lookups++, h.keys.lookup(presented))
  const cache = new KeyCache({
    keys,
    ttlS: 60,
    capacity: 10,
    negativeTtlS: 5,
    negativeMax: 20,
    metrics: createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), []),
    build: () => {
      throw new Error('unused')
    },
  })
  for (let i = 0; i < 1000; i++) {
    const g = generateKey('kg_')
    await cache.lookup(g.hash, g.key)
  }
  t.ok(cache.size.negative <= 20, `negative cache holds ${cache.size.negative} ≤ 20`)
  lookups = 0
  const one = generateKey('kg_')
  await Promise.all(Array.from({ length: 50 }, () => cache.lookup(one.hash, one.key)))
  await cache.lookup(one.hash, one.key)
  t.equal(lookups, 1, 'concurrent and repeated look-ups of one unknown key share one store query')
})

t.test('cache.max_capacity keys used in turn are all held, and never more; negative_max unknown keys alike (found by a review)', async (t) => {
  // Before: quick-lru, sized at half the capacity (it may hold twice its size), held as few as
  // half the keys: a capacity of 10 missed 10 times in 30 requests of 6 keys used in turn.
  const h = await startGateway(t, { config: { cache: { max_capacity: 10, negative_max: 20 }, lockout: { max_attempts: 100000, window_s: 60 } } })
  const valid = await Promise.all(Array.from({ length: 10 }, () => h.key()))
  const unknown = Array.from({ length: 20 }, () => generateKey('kg_').key)
  const counts = async () => {
    const text = await h.metrics.registry.metrics()
    const of = (result: string) => Number(new RegExp(`^keygate_key_cache_total\\{result="${result}"\\} (\\d+)$`, 'm').exec(text)?.[1] ?? 0)
    const held = (cache: string) => Number(new RegExp(`^keygate_key_cache_entries\\{cache="${cache}"\\} (\\d+)$`, 'm').exec(text)?.[1] ?? -1)
    return { hit: of('hit'), miss: of('miss'), negative: of('negative_hit'), keys: held('keys'), unknown: held('unknown') }
  }
  const start = await counts()
  for (let round = 0; round < 3; round++) for (const k of valid) t.equal((await h.get('/', bearer(k.key))).status, 200)
  let now = await counts()
  t.equal(now.miss - start.miss, 10, 'each of the 10 keys looked up once')
  t.equal(now.hit - start.hit, 20, 'and then answered from the cache, every time')
  t.equal(now.keys, 10, 'keygate_key_cache_entries says so')
  // An 11th key: the one used longest ago goes, and only it.
  const eleventh = await h.key()
  t.equal((await h.get('/', bearer(eleventh.key))).status, 200)
  const before = await counts()
  t.equal(before.keys, 10, 'never more than the capacity')
  for (const k of valid.slice(1)) await h.get('/', bearer(k.key))
  now = await counts()
  t.equal(now.hit - before.hit, 9, 'the 9 keys used since are held')
  await h.get('/', bearer((valid[0] as { key: string }).key))
  t.equal((await counts()).miss - now.miss, 1, 'the least recently used one was dropped')

  const negativeStart = await counts()
  for (let round = 0; round < 2; round++) for (const k of unknown) t.equal((await h.get('/', bearer(k))).status, 401)
  now = await counts()
  t.equal(now.miss - negativeStart.miss, 20, 'each unknown key looked up once')
  t.equal(now.negative - negativeStart.negative, 20, 'then remembered, all 20')
  t.equal(now.unknown, 20)

  // A flush of everything (the `all` message, a Redis reconnection) empties both, and they fill again.
  h.gateway.applyInvalidation('all')
  const flushed = await counts()
  t.same([flushed.keys, flushed.unknown], [0, 0], 'both empty after a flush')
  await h.get('/', bearer((valid[1] as { key: string }).key))
  await h.get('/', bearer((valid[1] as { key: string }).key))
  const refilled = await counts()
  t.same([refilled.miss - flushed.miss, refilled.hit - flushed.hit, refilled.keys], [1, 1, 1], 'a key is looked up again once, then held')
})

t.test('a revoked or expired key is held in the cache no longer than an unknown one, so the time of the refusal tells none of them apart', async (t) => {
  // Before (found by a review): a refused key's record was held for cache.ttl_s (300 s) and
  // refused from memory in about 0.5 ms, where an unknown key, after cache.negative_ttl_s, was
  // looked up again (about 2 ms): two probes six seconds apart told a key that had worked from
  // one that never did. Look-ups reaching the store are counted, not timed.
  const h = await startGateway(t, {})
  const { KeyCache, cachedKeys } = await import('../gateway/key-cache.ts')
  const { createGatewayMetrics, createMetricsRegistry } = await import('../core/metrics.ts')
  const { createKeyLimiters } = await import('../gateway/rate-limit.ts')
  const { digestKey } = await import('../core/keys/format.ts')
  let lookups = 0
  const keys = Object.create(h.keys) as typeof h.keys
  keys.lookup = (presented) => (lookups++, h.keys.lookup(presented))
  const cacheWith = (negativeTtlS: number) =>
    new KeyCache({
      keys,
      ttlS: 3600,
      capacity: 100,
      negativeTtlS,
      negativeMax: 100,
      metrics: createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), []),
      build: cachedKeys(1, createKeyLimiters(makeConfig({}).rate_limits.per_key, undefined)),
    })
  const cache = cacheWith(1)
  /** The look-ups that reached the store for two look-ups now, then one after the negative TTL. */
  const asked = async (presented: string): Promise<number[]> => {
    const digest = digestKey(presented, 'keygate')
    const counts: number[] = []
    for (const wait of [0, 0, 1200]) {
      await sleep(wait)
      const before = lookups
      await cache.lookup(digest, presented)
      counts.push(lookups - before)
    }
    return counts
  }
  const revoked = await h.key()
  await h.keys.revoke(revoked.id, 'test', ACTOR)
  const valid = await h.key()
  t.same(await asked(generateKey('kg_').key), [1, 0, 1], 'unknown: asked, held for the negative TTL, asked again')
  t.same(await asked(revoked.key), [1, 0, 1], 'revoked: the same')
  t.same(await asked(valid.key), [1, 0, 0], 'a valid key is held for the TTL')
  // Cached while it works, then refused: asked about again once its expiry has passed. The expiry
  // is an hour out and the cache's clock (Date alone; its TTLs and the sleeps run as usual) is
  // moved past it: before, an expiry 1.5 s out had to outlast the key's creation and first look-up,
  // a window a stall of the loaded suite could close.
  const expired = await h.key({ expires_at: new Date(Date.now() + 3_600_000).toISOString() })
  const expiring = digestKey(expired.key, 'keygate')
  await cache.lookup(expiring, expired.key)
  t.equal(cache.hit(expiring)?.id, expired.id, 'cached while it works')
  const fresh = lookups
  mock.timers.enable({ apis: ['Date'], now: Date.now() + 2 * 3_600_000 })
  t.teardown(() => mock.timers.reset())
  await cache.lookup(expiring, expired.key)
  t.equal(lookups - fresh, 1, 'expired while cached: asked about again')
  t.same(await asked(expired.key), [0, 0, 1], 'then held for the negative TTL')
  mock.timers.reset()
  // With no negative cache, none of them is held at all.
  const off = cacheWith(0)
  for (const k of [revoked.key, generateKey('kg_').key]) {
    const before = lookups
    for (let i = 0; i < 3; i++) await off.lookup(digestKey(k, 'keygate'), k)
    t.equal(lookups - before, 3, 'negative cache off: asked each time')
  }
})

t.test('metrics carry no key material, addresses or unbounded labels', async (t) => {
  const h = await startGateway(t, { routes: [{ name: 'api', path: '/api', upstream: '{upstream}' }] })
  const k = await h.key()
  await h.get('/api/x', bearer(k.key))
  await h.get(`/random-${Date.now()}`, bearer(k.key))
  await h.get('/api/x', bearer('kg_' + 'x'.repeat(41)))
  const text = await h.metrics.registry.metrics()
  t.notMatch(text, /kg_/)
  t.notMatch(text, new RegExp(k.id))
  t.notMatch(text, /127\.0\.0\.1/)
  t.notMatch(text, /random-/)
  const routes = new Set([...text.matchAll(/route="([^"]*)"/g)].map((m) => m[1]))
  t.same([...routes].sort(), ['api', 'none'])
  t.match(text, /keygate_gateway_requests_total\{route="none",outcome="route_not_found"\} 1/)
  t.match(text, /keygate_gateway_requests_total\{route="api",outcome="key_invalid"\} 1/, 'refused before routing: counted under the route it would have gone to')
  t.match(text, /keygate_gateway_request_duration_seconds_count\{route="api"\} 2/)
  t.match(text, /keygate_gateway_requests_total\{route="api",outcome="scope_denied"\} 0/, 'children exist from start-up')
})
