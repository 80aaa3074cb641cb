// DATABASE_URL=postgres://... node bench/unusual-hours.ts [--keys 1000,5000] [--rounds 3] [--baseline DIR]: in a
// fresh database on that server, dropped at the end (before, in the database the URL named, whose
// keys, usage and anomalies it deleted: a deployment's, in a shell set up beside one).
// node bench/unusual-hours.ts --embedded [...]: the same on the embedded store (PGlite), in a new
// data folder of its own, removed at the end.
// --baseline DIR: also times the detector of another keygate checkout (`git worktree add DIR
// <commit>`, with node_modules linked in), in the same rounds, each round the baseline first:
// a before/after in one run; with --baseline-upto N, only where at most N keys are active (a
// baseline that reads the usage table for each key takes minutes a round at 5,000).
// What the anomaly detector's check at the turn of an hour costs when `keys` keys are active: the
// first check of an hour reads each active key's usage history for the unusual-hour check. The
// store is filled (its tables are made and emptied) with `keys` active keys, each with 14 days of
// hourly usage rows, 12 hours a day (a fifth of them rotated: their predecessor, through
// replaced_by, holds the first 10 days; one in a hundred never used the hour judged, an
// `unusual_hour` finding). Each round, a new detector counts one request of every key in the hour
// judged, and its check() is timed (median ms of `rounds`), with the queries it sent to the store
// (through a wrapper of the db that counts them) and the findings it recorded.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { AnomalyDetector } from '../core/anomalies.ts'
import { openDb, type Db } from '../core/db.ts'
import { createLogger } from '../core/log.ts'
import { migrate } from '../core/migrate.ts'
import { loadConfig } from '../config/load.ts'
import { countArg, countsArg, freshStores, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('keys', 'rounds', 'baseline', 'baseline-upto', 'embedded')

const embedded = process.argv.includes('--embedded')
const url = process.env.DATABASE_URL
if (!embedded && !url) {
  process.stderr.write('DATABASE_URL must name a PostgreSQL server, where the bench makes a database of its own (or --embedded)\n')
  process.exit(2)
}
const rounds = countArg('rounds', 3)
const b = process.argv.indexOf('--baseline')
const baselineDir = b === -1 ? undefined : process.argv[b + 1]
if (b !== -1 && !baselineDir) {
  process.stderr.write('--baseline takes the folder of a keygate checkout\n')
  process.exit(2)
}
const upto = process.argv.includes('--baseline-upto') ? countArg('baseline-upto', 1) : Infinity
type Detector = typeof AnomalyDetector
const codes: Array<[string, Detector]> = [['this checkout', AnomalyDetector]]
if (baselineDir) {
  const old = (await import(pathToFileURL(resolve(baselineDir, 'core/anomalies.ts')).href)) as { AnomalyDetector: Detector }
  codes.unshift([`baseline (${baselineDir})`, old.AnomalyDetector])
}
const sizes = countsArg('keys', [1000, 5000])

const H = 3_600_000
/** The hour judged: 10:00 UTC, one the keys' histories use (but for one key in a hundred). */
const HOUR = Date.UTC(2026, 10, 30, 10)

/** `keys` keys k1..kN, every fifth (i % 5 = 0) with its predecessor p<i>; their usage rows. */
async function fill(db: Db, keys: number): Promise<void> {
  await db.query('TRUNCATE api_key_usage, api_key_anomalies')
  await db.query('DELETE FROM api_keys')
  const key = (id: string, replacedBy: string, where = '') => `INSERT INTO api_keys (id, key_hash, name, type, status, replaced_by)
     SELECT ${id}, md5(${id}) || md5(${id} || '.'), 'bench', 'service', ${replacedBy === 'NULL' ? "'active'" : "'revoked'"}, ${replacedBy}
     FROM generate_series(1, $1::int) i ${where}`
  // The successors first: replaced_by names a key that exists.
  await db.query(key("'k' || i", 'NULL'), [keys])
  await db.query(key("'p' || i", "'k' || i", 'WHERE i % 5 = 0'), [keys])
  // 14 days back from the hour judged, 12 hours a day: 06:00 to 17:00 UTC, or 11:00 to 22:00 for
  // one key in a hundred (10:00 is then unusual). A rotated key's first 10 days are its predecessor's.
  await db.query(
    `INSERT INTO api_key_usage (key_id, bucket, requests)
     SELECT CASE WHEN i % 5 = 0 AND d > 4 THEN 'p' ELSE 'k' END || i, $2::timestamptz - d * interval '1 day' + h * interval '1 hour', 10
     FROM generate_series(1, $1::int) i, generate_series(1, 14) d, generate_series(0, 11) x,
          LATERAL (SELECT CASE WHEN i % 100 = 0 THEN 11 + x ELSE 6 + x END - 10 AS h) hh`,
    [keys, new Date(HOUR)],
  )
  await db.query('ANALYZE api_keys')
  await db.query('ANALYZE api_key_usage')
}

/** The db, with the statements sent through it counted. */
function counted(db: Db): { db: Db; queries: () => number } {
  let n = 0
  const wrapped = new Proxy(db, {
    get(target, prop) {
      if (prop === 'query') {
        return (text: string, params?: readonly unknown[]) => {
          n++
          return target.query(text, params)
        }
      }
      if (prop === 'transaction') {
        return (fn: Parameters<Db['transaction']>[0], o?: Parameters<Db['transaction']>[1]) => {
          n++
          return target.transaction(fn, o)
        }
      }
      const v = Reflect.get(target, prop) as unknown
      return typeof v === 'function' ? v.bind(target) : v
    },
  })
  return { db: wrapped, queries: () => n }
}

const thresholds = loadConfig({ env: {}, onlyFile: true }).anomalies
const log = createLogger({ write: () => {} })
const work = mkdtempSync(join(tmpdir(), 'keygate-unusual-hours-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const opened = await freshStores(work).find((s) => s.name === (embedded ? 'embedded' : 'postgres'))!.open()
const store = await openDb(embedded ? { dataDir: opened.env.KEYGATE_DATA_DIR } : { databaseUrl: opened.env.DATABASE_URL })
await migrate(store)

const rows: string[] = []
for (const keys of sizes) {
  await fill(store, keys)
  const ms = new Map<string, number[]>(codes.map(([name]) => [name, []]))
  const queries = new Map<string, number>()
  const findings = new Map<string, number>()
  for (let r = 0; r <= rounds; r++) {
    for (const [name, Code] of codes) {
      if (Code !== AnomalyDetector && keys > upto) continue
      await store.query('TRUNCATE api_key_anomalies')
      const { db, queries: sent } = counted(store)
      const detector = new Code({ db, thresholds, channel: 'unused', log, checkIntervalMs: 0, ipv6PrefixBits: 64 })
      for (let i = 1; i <= keys; i++) detector.count(`k${i}`, 'forwarded', HOUR + 1000 + (i % 50_000), '203.0.113.1', 200)
      const start = process.hrtime.bigint()
      await detector.check()
      const took = Number(process.hrtime.bigint() - start) / 1e6
      // The first round warms the store's caches (and the plans): not counted.
      if (r > 0) ms.get(name)?.push(took)
      process.stderr.write(`${keys} keys, round ${r}, ${name}: ${took.toFixed(1)} ms\n`)
      queries.set(name, sent())
      findings.set(name, Number((await store.query<{ n: number }>('SELECT count(*)::int AS n FROM api_key_anomalies'))[0]?.n))
      await detector.close()
    }
  }
  const first = median(ms.get(codes[0]![0])!)
  for (const [name] of codes) {
    if (ms.get(name)!.length === 0) continue
    const m = median(ms.get(name)!)
    const ratio = codes.length > 1 ? (Number.isNaN(first) ? ' |' : ` ${(m / first).toFixed(4)} |`) : ''
    rows.push(`| ${embedded ? 'embedded (PGlite)' : 'PostgreSQL'} | ${name} | ${keys.toLocaleString('en')} | ${m.toFixed(1)} | ${(m / keys).toFixed(3)} | ${queries.get(name)} | ${findings.get(name)} |${ratio}`)
  }
}
const vs = codes.length > 1 ? ' vs baseline |' : ''
console.log(`| store | code | active keys | check at the hour's turn, ms (median) | ms per key | queries | unusual_hour findings |${vs}`)
console.log(`| --- | --- | --- | --- | --- | --- | --- |${codes.length > 1 ? ' --- |' : ''}`)
for (const r of rows) console.log(r)
await store.close()
await opened.drop()
