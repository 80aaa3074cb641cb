// Heap held by N cached keys: N real keys are written to an embedded store, then looked up
// through the gateway's own KeyCache (each lookup a real store query), with forced garbage
// collections before and after. Run with --expose-gc; prints one JSON line. `--expiring` gives
// every key an expiry (the default: none), which each cached key then holds itself.
import { AuditCipher, AuditLog } from '../core/audit.ts'
import { openDb } from '../core/db.ts'
import { digestKey, generateKey } from '../core/keys/format.ts'
import { KeyService } from '../core/keys/service.ts'
import { createGatewayMetrics, createMetricsRegistry } from '../core/metrics.ts'
import { migrate } from '../core/migrate.ts'
import { loadConfig } from '../config/load.ts'
import { cachedKeys, KeyCache } from '../gateway/key-cache.ts'
import { createKeyLimiters } from '../gateway/rate-limit.ts'

const count = Number(process.argv[2] ?? 100_000)
if (!Number.isInteger(count) || count <= 0) {
  process.stderr.write('usage: node --expose-gc bench/cache-heap.ts [N] [--expiring], N a whole number above 0\n')
  process.exit(2)
}
// --expiring: every key has an expiry (a year ahead), so each is an ExpiringKey holding its own.
const expiring = process.argv.includes('--expiring')
const gc = (globalThis as { gc?: () => void }).gc
if (!gc) throw new Error('run with node --expose-gc')

const config = loadConfig({ env: {}, onlyFile: true })
const db = await openDb({ memory: true })
await migrate(db)
const keys = new KeyService({ db, audit: new AuditLog(new AuditCipher(Buffer.alloc(32, 1))), prefix: 'kg_', graceHours: config.keys.grace_hours })

const plaintexts: string[] = []
for (let start = 0; start < count; start += 5000) {
  const ids: string[] = []
  const hs: string[] = []
  const names: string[] = []
  for (let i = start; i < Math.min(count, start + 5000); i++) {
    const g = generateKey('kg_')
    plaintexts.push(g.key)
    ids.push(g.id)
    hs.push(g.hash)
    names.push(`service key ${i}`)
  }
  await db.query(
    `INSERT INTO api_keys (id, key_hash, name, type, scopes, expires_at) SELECT i, h, n, 'service', ARRAY['orders:read'], $4::timestamptz FROM unnest($1::text[], $2::text[], $3::text[]) AS u(i, h, n)`,
    [ids, hs, names, expiring ? new Date(Date.now() + 365 * 86_400_000) : null],
  )
}

const metrics = createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), ['api'])
const limiterFor = createKeyLimiters(config.rate_limits.per_key, undefined)
// The cache as the gateway makes it, holding exactly `count` keys (cache.max_capacity): lru-cache
// takes its slots for them as it is made (about 28 bytes a key), so the cache is made between
// the two readings, and those count too.
const makeCache = (): KeyCache =>
  new KeyCache({
    keys,
    ttlS: 3600,
    capacity: count,
    negativeTtlS: config.cache.negative_ttl_s,
    negativeMax: config.cache.negative_max,
    metrics,
    build: cachedKeys(1, limiterFor),
  })
// What the cache itself holds: the heap with it full less the heap before it was made, both
// read after the same work. (Before, found by a review, the heap was read before the first
// lookups and after them: the presented keys, dead by then, and start-up code V8 flushed
// meanwhile were taken off the cache's figure.) A first cache, filled and dropped, warms the code
// paths up, so what they compile is in both readings.
const fill = async (cache: KeyCache): Promise<void> => {
  for (let i = 0; i < count; i++) {
    // As in the gateway: the cache key is the hash computed from the presented key, a new string.
    const presented = plaintexts[i] as string
    const r = await cache.lookup(digestKey(presented, 'keygate'), presented)
    if (typeof r === 'string') throw new Error(`key ${i} was not found: ${r}`)
  }
  if (cache.size.positive !== count) throw new Error(`the cache holds ${cache.size.positive} keys, expected ${count}`)
}
// The heap and the typed arrays outside it (lru-cache keeps its slots' links there: about 12
// bytes a slot, left out before; found by a read-back).
const settled = (): number => {
  gc()
  gc()
  const m = process.memoryUsage()
  return m.heapUsed + m.arrayBuffers
}
// Each cache is made, filled and read in a function of its own, so that nothing of it outlives
// the call. Before (found by a read-back), the rounds ran in the module's own code, whose
// suspended frame could still hold the previous round's cache (emptied, with the slots of its new
// lru-cache) at the next round's first reading, or not, as V8 compiled it: the figure was 21.02 MiB
// in some runs and 23.34 in others of the same code, the lower one leaving those slots out.
const warmUp = async (): Promise<void> => {
  await fill(makeCache())
}
const heldByOne = async (): Promise<number> => {
  const before = settled()
  const cache = makeCache()
  await fill(cache)
  const held = settled() - before
  // Kept alive to the reading above.
  cache.invalidateAll()
  return held
}
await warmUp()
const held: number[] = []
for (let round = 0; round < 2; round++) held.push(await heldByOne())
// The presented keys stay referenced to the end, so that they are in every reading.
if (plaintexts.length !== count) throw new Error('the presented keys were lost')
const bytes = Math.max(...held)
process.stdout.write(JSON.stringify({ keys: count, expiring, heapMiB: Number((bytes / 1024 / 1024).toFixed(2)), bytesPerKey: Math.round(bytes / count) }) + '\n')
await db.close()
