// What bounds a lost invalidation (found by review): a change whose Redis message never went out
// (a `keygate api-key` run that could not reach Redis within its wait) is read from the store by
// each gateway's store check within cache.store_check_s, a key imported after it was cached as
// unknown too; a subscriber connection that died without closing (half-open: a TCP gate that
// stops forwarding and closes nothing) no longer stops the missed-message check for good; a
// publish on such a connection settles, is kept, and goes out once the connection is back.
// Each test runs its own redis-server.
import t, { type Test } from 'tap'
import { createHash, randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { INVALIDATION_CHANNEL, INVALIDATION_VERSION_KEY, publishInvalidation } from '../core/invalidation.ts'
import { generateKey } from '../core/keys/format.ts'
import { KeyService } from '../core/keys/service.ts'
import { createLogger } from '../core/log.ts'
import { connectRedis, redisReady } from '../core/redis.ts'
import { keyServiceOptions } from '../core/runtime.ts'
import { ACTOR, bearer, makeConfig, metric, openStore, startGateway, until, type Harness } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import type { LogLine } from './helpers/serve.ts'
import { gateInFront } from './helpers/tcp-gate.ts'


async function setup(t: Test, config: Record<string, unknown>, subscriberThroughGate = false) {
  const server = await startRedisServer(t)
  const logs: LogLine[] = []
  const log = createLogger({ level: 'debug', write: (line) => logs.push(JSON.parse(line) as LogLine) })
  // Bounded at 1 s, not the default 200 ms: this Redis is never paused, and a command slowed past
  // 200 ms by the suite's load would mark it down where a test says it stayed up (found by a flake hunt).
  const redis = connectRedis(server.url, log, { commandTimeoutMs: 1000 })
  const other = new Redis(server.url, { maxRetriesPerRequest: 1 })
  const { gate, url: gated } = await gateInFront(t, server.url)
  if (subscriberThroughGate) redis.duplicate = () => new Redis(gated, { maxRetriesPerRequest: 1, connectTimeout: 500 })
  t.teardown(() => {
    redis.disconnect()
    other.disconnect()
  })
  const full = { cache: { ttl_s: 3600, negative_ttl_s: 3600 }, keys: { accept_legacy: true }, ...config }
  const store = await openStore(t, makeConfig({ ...full, routes: [] }))
  const gateway = await startGateway(t, { config: full, store, redis, log })
  const silent = new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(gateway.config) })
  await until(t, 'the gateway subscribed', async () => Number(((await other.pubsub('NUMSUB', INVALIDATION_CHANNEL)) as [string, number])[1]) >= 1)
  // The store check's first read drops the whole cache: one that a loaded machine delayed past a
  // test's first steps read their change as its starting point, and the change was never seen as
  // one (failed once in CI: the imported key worked by the first read's drop, and no check
  // dropped it afterwards).
  if ((full.cache as { store_check_s?: number }).store_check_s !== 0) await until(t, 'the store check took its first snapshot', () => logs.some((l) => l.message === 'the store check took its first snapshot; dropped the whole cache'), 10_000)
  return { server, redis, other, gate, gated, gateway, silent, logs, log }
}

async function staleKey(t: Test, gateway: Harness, silent: KeyService): Promise<string> {
  const { key, record } = await silent.create({ name: 'stale', type: 'user' }, ACTOR)
  t.equal((await gateway.get('/', bearer(key))).status, 200, 'the key works and is cached')
  await silent.revoke(record.id, undefined, ACTOR)
  t.equal((await gateway.get('/', bearer(key))).status, 200, 'revoked where no message tells the gateway: still served from the cache')
  return key
}

t.test('a key revoked with its message never published is refused at the next store check, Redis healthy', async (t) => {
  const s = await setup(t, { cache: { ttl_s: 3600, store_check_s: 1 }, redis: { invalidation_check_ms: 0 } })
  const { key, record } = await s.silent.create({ name: 'stale', type: 'user' }, ACTOR)
  t.equal((await s.gateway.get('/', bearer(key))).status, 200, 'the key works and is cached')
  await s.silent.revoke(record.id, undefined, ACTOR)
  // Nothing else would drop it (the cache's TTL is an hour): refused within the wait is the store check's doing.
  await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401, 5000)
  // No message tells the gateway (the key service publishes nothing): the store check did.
  await until(t, 'the store check read the change', async () => s.logs.some((l) => l.message === 'the store check dropped changed keys from the cache'), 5000)
  t.equal(await metric(s.gateway.metrics.registry, 'keygate_redis_up'), 1, 'Redis stayed up all along')
})

t.test('a key revoked by hand in SQL, updated_at untouched and no message, is refused at the next store check', async (t) => {
  // Before migration 0009 the store check went by updated_at, which such an UPDATE leaves alone.
  const s = await setup(t, { cache: { ttl_s: 3600, store_check_s: 1 }, redis: { invalidation_check_ms: 0 } })
  const { key, record } = await s.silent.create({ name: 'by hand', type: 'user' }, ACTOR)
  t.equal((await s.gateway.get('/', bearer(key))).status, 200, 'the key works and is cached')
  await sleep(2500) // the checks have read the key's creation (and dropped it from the cache)
  t.equal((await s.gateway.get('/', bearer(key))).status, 200, 'cached again')
  await s.gateway.db.query(`UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE id = $1`, [record.id])
  await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401, 5000)
})

t.test('a legacy key cached as unknown, then imported where no message tells the gateway, works at the next store check', async (t) => {
  const s = await setup(t, { cache: { ttl_s: 3600, negative_ttl_s: 3600, store_check_s: 1 }, redis: { invalidation_check_ms: 0 }, lockout: { max_attempts: 1_000_000 } })
  const uuid = randomUUID()
  t.equal((await s.gateway.get('/', bearer(uuid))).status, 401, 'unknown, and cached as unknown')
  await s.silent.importLegacy([{ key_hash: createHash('sha256').update(uuid).digest('hex'), name: 'imported', created_at: '2020-05-01T10:00:00Z' }], ACTOR)
  await until(t, 'the imported key works', async () => (await s.gateway.get('/', bearer(uuid))).status === 200, 5000)
  // No message tells the gateway (the key service publishes nothing): the store check dropped the
  // cached "unknown" (before, the test also asked once in between, which a check could beat).
  await until(t, 'the store check read the change', async () => s.logs.some((l) => l.message === 'the store check dropped changed keys from the cache'), 5000)
})

t.test('the store check keeps a key cached after its change, and drops one cached before it: a store outage then refuses only the stale one', async (t) => {
  // Before (found by a chaos review): every changed key was dropped, also one loaded after the
  // change; a key created, rotated or changed less than store_check_s before it was cached lost
  // its entry, and a store outage then answered it 503 where keys cached earlier went on.
  // The check is made by the test (its timer, hourly, does not come): one read must find the
  // creations after both keys were cached and the rename (with the timer every second, a read
  // between the steps of a loaded machine found a creation before its key was cached, found by
  // a review: it said "dropped" early, and the rename was not read yet when the store closed).
  const s = await setup(t, { cache: { ttl_s: 3600, store_check_s: 3600 }, redis: { invalidation_check_ms: 0 } })
  const fresh = await s.silent.create({ name: 'cached after its creation', type: 'user' }, ACTOR)
  const changed = await s.silent.create({ name: 'cached before its change', type: 'user' }, ACTOR)
  t.equal((await s.gateway.get('/', bearer(fresh.key))).status, 200, 'cached after its creation')
  t.equal((await s.gateway.get('/', bearer(changed.key))).status, 200, 'cached')
  await s.silent.update(changed.record.id, { name: 'renamed' }, ACTOR)
  await s.gateway.gateway.checkStore()
  const dropped = s.logs.filter((l) => l.message === 'the store check dropped changed keys from the cache')
  t.same(dropped.map((l) => [l.keys, l.kept]), [[1, 1]], 'one read: the renamed key dropped, the one cached after its creation kept')
  await s.gateway.db.close()
  t.equal((await s.gateway.get('/', bearer(fresh.key))).status, 200, 'the store down: the key cached after its creation is answered from the cache')
  const stale = await s.gateway.get('/', bearer(changed.key))
  t.equal(stale.json?.error?.code, 'store_unavailable', 'the renamed one was dropped, and is looked up: 503')
})

t.test('a key whose secret was replaced by hand in SQL: the old secret is refused at the next store check, though the new one was cached after the change', async (t) => {
  // Found by a review of the change_xid comparison: the id was kept for its new hash's entry,
  // and the entry under the old hash stayed.
  const s = await setup(t, { cache: { ttl_s: 3600, store_check_s: 1 }, redis: { invalidation_check_ms: 0 } })
  const { key, record } = await s.silent.create({ name: 'by hand', type: 'user' }, ACTOR)
  t.equal((await s.gateway.get('/', bearer(key))).status, 200, 'the old secret works and is cached')
  const replacement = generateKey('kg_', record.id)
  await s.gateway.db.query('UPDATE api_keys SET key_hash = $2 WHERE id = $1', [record.id, replacement.hash])
  t.equal((await s.gateway.get('/', bearer(replacement.key))).status, 200, 'the new secret is cached after the change')
  await until(t, 'the old secret is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401, 5000)
  t.equal((await s.gateway.get('/', bearer(replacement.key))).status, 200, 'the new one still works')
})

t.test('a successor revoked where no message tells the gateway ends its predecessor, kept by the check before, at the next store check', async (t) => {
  // The store check marks each changed id (gateway/key-cache.ts): the predecessor's entry, kept
  // by one check (cached from its row as the rotation left it), is dropped by the next one, which
  // reads the row the successor's revocation changed. The checks are the test's (hourly timer).
  const s = await setup(t, { cache: { ttl_s: 3600, store_check_s: 3600 }, redis: { invalidation_check_ms: 0 } })
  const old = await s.silent.create({ name: 'predecessor', type: 'user' }, ACTOR)
  const successor = await s.silent.rotate(old.record.id, {}, ACTOR)
  t.equal((await s.gateway.get('/', bearer(old.key))).status, 200, 'the predecessor works in its grace, cached after the rotation')
  await s.gateway.gateway.checkStore()
  const reads = () => s.logs.filter((l) => l.message === 'the store check dropped changed keys from the cache').map((l) => [l.keys, l.kept])
  t.same(reads(), [[1, 1]], 'the check kept the predecessor (the successor, never cached, is the one dropped)')
  await s.silent.revoke(successor.record.id, 'leaked', ACTOR)
  t.equal((await s.gateway.get('/', bearer(old.key))).status, 200, 'no message: still served from the cache')
  await s.gateway.gateway.checkStore()
  t.same(reads(), [[1, 1], [2, 0]], 'the next check read both revocations and kept neither')
  t.equal((await s.gateway.get('/', bearer(old.key))).status, 401, 'the predecessor is refused')
})

t.test("a restored row's change_xid from another cluster's counter is never taken for this cluster's: a change stamped with the same xid is seen", async (t) => {
  // Found by a review: a row loaded by pg_restore keeps the source cluster's xid; once this
  // cluster's counter reached it, a revocation stamped with it looked like the cached state.
  const s = await setup(t, { cache: { ttl_s: 3600, store_check_s: 1 }, redis: { invalidation_check_ms: 0 } })
  const { key, record } = await s.silent.create({ name: 'restored', type: 'user' }, ACTOR)
  const db = s.gateway.db
  const [{ xid }] = (await db.query<{ xid: string }>('SELECT pg_current_xact_id()::text AS xid')) as [{ xid: string }]
  const ahead = Number(xid) + 20
  await db.query('ALTER TABLE api_keys DISABLE TRIGGER api_keys_stamp_change')
  await db.query(`UPDATE api_keys SET change_xid = '${ahead}'::xid8 WHERE id = $1`, [record.id])
  await db.query('ALTER TABLE api_keys ENABLE ALWAYS TRIGGER api_keys_stamp_change')
  s.gateway.gateway.invalidateAll()
  t.equal((await s.gateway.get('/', bearer(key))).status, 200, 'cached from the restored row')
  for (let n = Number(xid); n < ahead - 1; n = Number(((await db.query<{ xid: string }>('SELECT pg_current_xact_id()::text AS xid'))[0] as { xid: string }).xid)) {}
  await db.query(`UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE id = $1`, [record.id])
  const [{ stamped }] = (await db.query<{ stamped: string }>('SELECT change_xid::text AS stamped FROM api_keys WHERE id = $1', [record.id])) as [{ stamped: string }]
  t.equal(Number(stamped), ahead, 'the revocation was stamped with the restored xid')
  await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401, 5000)
})

t.test('a half-open subscriber connection: the check times out, flushes and reconnects', async (t) => {
  const s = await setup(t, { cache: { ttl_s: 3600, store_check_s: 0 }, redis: { invalidation_check_ms: 200 } }, true)
  const key = await staleKey(t, s.gateway, s.silent)
  s.gate.set('silent')
  await s.other.incr(INVALIDATION_VERSION_KEY) // a message lost on the dead connection
  await until(t, 'the revoked key is refused', async () => (await s.gateway.get('/', bearer(key))).status === 401, 5000)
  t.ok((await metric(s.gateway.metrics.registry, 'keygate_invalidation_flushes_total', { reason: 'missed' })) >= 1, 'counted as missed')
  t.ok(s.logs.some((l) => l.level === 'warn' && l.message.startsWith('Redis did not answer the invalidation check') && l.connection === 'subscriber'), 'logged')
  // A new subscription through the gate once it forwards again: messages flow again.
  s.gate.set('open')
  const { key: other, record } = await s.gateway.keys.create({ name: 'next', type: 'user' }, ACTOR)
  t.equal((await s.gateway.get('/', bearer(other))).status, 200)
  await until(t, 'resubscribed', async () => s.logs.some((l) => l.reason === 'reconnect'), 10_000)
  await s.silent.revoke(record.id, undefined, ACTOR)
  await publishInvalidation(s.other, `key:${record.id}`)
  await until(t, 'a published revocation reaches the gateway again', async () => (await s.gateway.get('/', bearer(other))).status === 401, 5000)
})

t.test('a publish on a half-open connection settles, is kept, and goes out once the connection is back', async (t) => {
  const s = await setup(t, { cache: { store_check_s: 0 } })
  const pub = connectRedis(s.gated, s.log)
  t.teardown(() => pub.disconnect())
  t.ok(await redisReady(pub, 5000), 'connected through the gate')
  s.gate.set('silent')
  // Two at once, as a revocation publishes its key and its hash: one line for them (there was one each).
  const both = Promise.all([publishInvalidation(pub, 'key:halfopen0001', s.log), publishInvalidation(pub, 'hash:halfopen0001', s.log)])
  const outcome = await Promise.race([both.then(() => 'settled'), sleep(4000).then(() => 'hung')])
  t.equal(outcome, 'settled', 'the publishes do not hang')
  const warned = () => s.logs.filter((l) => l.level === 'warn' && l.message.startsWith('could not publish an invalidation')).length
  t.equal(warned(), 1, 'logged once')
  t.equal(await s.other.get(INVALIDATION_VERSION_KEY), null, 'not published yet')
  s.gate.set('open')
  // At least two: a silent gate that opens again may also hand Redis the first tries.
  const version = async () => Number(await s.other.get(INVALIDATION_VERSION_KEY))
  await until(t, 'sent once the connection is back', async () => (await version()) >= 2, 15_000)
  await until(t, 'said so', () => s.logs.some((l) => l.message === 'published the invalidations kept while Redis was away' && l.messages === 2), 15_000)
  // A later spell of failures is told again.
  await sleep(200)
  const before = await version()
  s.gate.set('silent')
  await publishInvalidation(pub, 'key:halfopen0002', s.log)
  t.equal(warned(), 2, 'a new spell, a new line')
  s.gate.set('open')
  await until(t, 'and sent again', async () => (await version()) > before, 15_000)
})
