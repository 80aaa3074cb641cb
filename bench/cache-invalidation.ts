// node bench/cache-invalidation.ts [--sizes 10000,100000] [--drops 200]
// What dropping one changed key costs the gateway's key cache as it holds more keys: a
// `key:<id>` message (a revocation on another instance, cache.invalidateKeys) and the store
// check's changed keys (cache.dropChanged), each for one key, `drops` times, µs a call (the
// keys are marked; past a 16th of the cache's keys a walk applies the marks, so drops above that
// include the walks' cost). Then what a cached key's use costs (cache.hit, ns) with no mark held
// and with the marks of those drops held (each a look-up of its id). For each size, that many
// real keys are written to an embedded store and looked up through KeyCache (each a store
// query), so the cache holds them all.
import { AuditCipher, AuditLog } from '../core/audit.ts'
import { openDb } from '../core/db.ts'
import { digestKey, generateKey } from '../core/keys/format.ts'
import { KeyService } from '../core/keys/service.ts'
import { createGatewayMetrics, createMetricsRegistry } from '../core/metrics.ts'
import { migrate } from '../core/migrate.ts'
import { loadConfig } from '../config/load.ts'
import { cachedKeys, KeyCache } from '../gateway/key-cache.ts'
import { createKeyLimiters } from '../gateway/rate-limit.ts'
import { countArg, countsArg, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('sizes', 'drops')

const sizes = countsArg('sizes', [10_000, 100_000])
const drops = countArg('drops', 200)
const config = loadConfig({ env: {}, onlyFile: true })
const metrics = createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), ['api'])
const limiterFor = createKeyLimiters(config.rate_limits.per_key, undefined)

const rows: string[] = []
for (const size of sizes) {
  const db = await openDb({ memory: true })
  await migrate(db)
  const keys = new KeyService({ db, audit: new AuditLog(new AuditCipher(Buffer.alloc(32, 1))), prefix: 'kg_', graceHours: config.keys.grace_hours })
  const made = Array.from({ length: size }, () => generateKey('kg_'))
  for (let start = 0; start < size; start += 5000) {
    const part = made.slice(start, start + 5000)
    await db.query(`INSERT INTO api_keys (id, key_hash, name, type) SELECT i, h, i, 'service' FROM unnest($1::text[], $2::text[]) AS u(i, h)`, [part.map((g) => g.id), part.map((g) => g.hash)])
  }
  const cache = new KeyCache({ keys, ttlS: 3600, capacity: size, negativeTtlS: 0, negativeMax: 0, metrics, build: cachedKeys(1, limiterFor) })
  for (const g of made) await cache.lookup(digestKey(g.key, 'keygate'), g.key)
  if (cache.size.positive !== size) throw new Error(`the cache holds ${cache.size.positive} keys, expected ${size}`)
  const time = (fn: (i: number) => void): number => {
    const start = process.hrtime.bigint()
    for (let i = 0; i < drops; i++) fn(i)
    return Number(process.hrtime.bigint() - start) / 1000 / drops
  }
  // Unchanged keys, used in turn: the request path's look with no mark held, then with the drops' marks.
  const kept = made.slice(2 * drops).map((g) => digestKey(g.key, 'keygate'))
  const uses = Math.max(1_000_000, kept.length)
  const hits = (): number => {
    const start = process.hrtime.bigint()
    for (let i = 0; i < uses; i++) if (cache.hit(kept[i % kept.length] as string) === undefined) throw new Error('an unchanged key was dropped')
    return Number(process.hrtime.bigint() - start) / uses
  }
  hits()
  const unmarked = hits()
  const invalidate = time((i) => cache.invalidateKeys(new Set([(made[i] as { id: string }).id])))
  const changed = time((i) => {
    const g = made[drops + i] as { id: string; hash: string }
    cache.dropChanged([{ id: g.id, keyHash: g.hash, changeXid: -1 }])
  })
  const dropped = made.slice(0, 2 * drops).filter((g) => cache.hit(digestKey(g.key, 'keygate')) !== undefined).length
  if (dropped !== 0) throw new Error(`${dropped} changed keys are still served from the cache`)
  const marked = hits()
  const marks = cache.marksHeld
  rows.push(`| ${size.toLocaleString('en')} | ${drops} | ${invalidate.toFixed(2)} | ${changed.toFixed(2)} | ${marks} | ${unmarked.toFixed(0)} | ${marked.toFixed(0)} |`)
  await db.close()
}
console.log(
  '| keys cached | drops | invalidateKeys, µs a key | dropChanged, µs a key | marks held after | hit, ns: no marks | with the marks |\n| --- | --- | --- | --- | --- | --- | --- |\n' +
    rows.join('\n'),
)
