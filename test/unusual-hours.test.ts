// The unusual-hour check reads the usage histories of a check's keys in batches (HISTORY_BATCH
// keys a query): its findings are those of a read of each key's own history (the statement it ran
// before, key by key), over varied histories, on both stores; and a check's history reads are
// bounded by its keys' batches, not one query per key (found by a review: at the turn of each
// hour with 1,000 active keys, a check and those queued behind it took seconds).
import t from 'tap'
import { randomBytes } from 'node:crypto'
import { AnomalyDetector, HISTORY_BATCH } from '../core/anomalies.ts'
import { LINEAGE } from '../core/keys/service.ts'
import { silentLogger } from '../core/log.ts'
import type { Db } from '../core/db.ts'
import { DEFAULT_CONFIG, forEachStore, planNodes, recordingDb } from './helpers/stores.ts'

const H = 3_600_000
const DAY = 24 * H
const TODAY = Date.UTC(2026, 10, 30)
/** The hour judged (10:00 UTC); a third of the keys are active in the hour before it too. */
const HOUR = TODAY + 10 * H
const thresholds = DEFAULT_CONFIG.anomalies

/** Rows of usage: `requests` at hours `hours` of each of days `days` back from TODAY. */
const daily = (days: [number, number], hours: [number, number], requests: number): Array<[number, number]> => {
  const out: Array<[number, number]> = []
  for (let d = days[0]; d <= days[1]; d++) for (let h = hours[0]; h <= hours[1]; h++) out.push([TODAY - d * DAY + h * H, requests])
  return out
}

/**
 * A key's history, by kind; `chain`: its lineage, the key first, then the key it replaced and so on,
 * each with its usage rows (bucket ms, requests).
 */
const KINDS: Record<string, Array<Array<[number, number]>>> = {
  usual: [daily([1, 14], [6, 17], 10)],
  // Never at 09:00 or 10:00 within the history; at 10:00 outside it (20 days back, and the hour judged itself).
  unusual: [[...daily([1, 14], [11, 22], 10), [TODAY - 20 * DAY + 10 * H, 1000], [HOUR, 500]]],
  'rotated, unusual': [daily([1, 4], [11, 22], 10), daily([5, 14], [11, 22], 10)],
  // The key alone never used 10:00; its predecessor did.
  'rotated, usual from its predecessor': [daily([1, 4], [11, 22], 10), daily([5, 14], [6, 17], 10)],
  'too few requests': [daily([1, 14], [12, 12], 1)],
  'too young': [daily([1, 1], [11, 22], 25)],
  'new this hour': [[]],
  // Two keys replaced; 10:00 holds exactly max_percent (1 %) of 1,400 requests: unusual.
  'twice rotated, at the bound': [[...daily([1, 4], [11, 21], 9), [TODAY - 3 * DAY + 10 * H, 14]], daily([5, 8], [11, 21], 9), daily([9, 14], [11, 21], 9)],
}
const kinds = Object.keys(KINDS)

/** Fills the store with `n` keys of the kinds in turn; returns each key's id with its lineage (the key first). */
async function fill(db: Db, n: number): Promise<string[][]> {
  const run = randomBytes(3).toString('hex')
  const lineages: string[][] = []
  const usage: { key: string[]; bucket: Date[]; requests: number[] } = { key: [], bucket: [], requests: [] }
  const keys: { id: string[]; replacedBy: Array<string | null> } = { id: [], replacedBy: [] }
  for (let i = 0; i < n; i++) {
    const chain = KINDS[kinds[i % kinds.length] as string] as Array<Array<[number, number]>>
    const ids = chain.map((_, depth) => `uh${run}_${i}_${depth}`)
    lineages.push(ids)
    chain.forEach((rows, depth) => {
      // A key new this hour has no row anywhere yet (the gateway knows it; its usage is not flushed).
      if (chain.length > 1 || rows.length > 0) {
        keys.id.push(ids[depth] as string)
        keys.replacedBy.push(depth === 0 ? null : (ids[depth - 1] as string))
      }
      for (const [bucket, requests] of rows) {
        usage.key.push(ids[depth] as string)
        usage.bucket.push(new Date(bucket))
        usage.requests.push(requests)
      }
    })
  }
  // Successors first: replaced_by names a key that exists.
  await db.query(
    `INSERT INTO api_keys (id, key_hash, name, type, replaced_by, status)
     SELECT id, md5(id) || md5(id || '.'), 'history', 'service', r, CASE WHEN r IS NULL THEN 'active' ELSE 'revoked' END
     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(id, r, o) ORDER BY o`,
    [keys.id, keys.replacedBy],
  )
  await db.query('INSERT INTO api_key_usage (key_id, bucket, requests) SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[])', [usage.key, usage.bucket, usage.requests])
  return lineages
}

interface Judged {
  key_id: string
  details: Record<string, unknown>
}

/**
 * The finding for `keyId` in the hour `hour`, from its own history read alone, with the statement
 * the check ran key by key before it read them in batches, and the rules SPEC §5 gives.
 */
async function alone(db: Db, keyId: string, hour: number): Promise<Judged | undefined> {
  const [r] = await db.query<{ total: number; at_hour: number; first: Date | null }>(
    `${LINEAGE} SELECT coalesce(sum(requests), 0)::float8 AS total,
            coalesce(sum(requests) FILTER (WHERE extract(hour FROM bucket AT TIME ZONE 'UTC') = $4), 0)::float8 AS at_hour,
            min(bucket) AS first
     FROM api_key_usage WHERE key_id IN (SELECT id FROM lineage) AND bucket >= $2 AND bucket < $3`,
    [keyId, new Date(hour - thresholds.unusual_hour_history_days * DAY), new Date(hour), new Date(hour).getUTCHours()],
  )
  const { total, at_hour: atHour, first } = r as { total: number; at_hour: number; first: Date | null }
  if (total < thresholds.unusual_hour_min_requests || !first) return undefined
  if (hour - new Date(first).getTime() < thresholds.unusual_hour_min_days * DAY) return undefined
  if (atHour * 100 > thresholds.unusual_hour_max_percent * total) return undefined
  return {
    key_id: keyId,
    details: {
      hour_utc: new Date(hour).getUTCHours(),
      history_days: thresholds.unusual_hour_history_days,
      history_since: new Date(first).toISOString(),
      history_requests: total,
      history_requests_at_hour: atHour,
      max_percent: thresholds.unusual_hour_max_percent,
    },
  }
}

const byKeyAndHour = (a: Judged, b: Judged) => `${a.key_id} ${a.details.hour_utc}`.localeCompare(`${b.key_id} ${b.details.hour_utc}`)

await forEachStore(t, async (t, store) => {
  // More keys than one batch reads, with their predecessors active as well.
  const lineages = await fill(store.db, HISTORY_BATCH + 2 * kinds.length + 3)
  const active: Array<[string, number]> = []
  lineages.forEach((ids, i) => {
    active.push([ids[0] as string, HOUR + 1000 + i])
    if (i % 3 === 0) active.push([ids[0] as string, HOUR - H + 1000 + i])
    // A predecessor still in use (its grace period): judged on its own lineage.
    if (ids.length > 1 && i % 2 === 0) active.push([ids[1] as string, HOUR + 2000 + i])
  })
  const expected: Judged[] = []
  for (const [keyId, at] of active) {
    const f = await alone(store.db, keyId, at - (at % H))
    if (f) expected.push(f)
  }
  expected.sort(byKeyAndHour)
  const found = async (): Promise<Judged[]> =>
    (await store.db.query<Judged>("SELECT key_id, details FROM api_key_anomalies WHERE type = 'unusual_hour' AND key_id = ANY($1::text[])", [lineages.flat()])).sort(byKeyAndHour)
  const seen: Array<{ sql: string; params: unknown[] }> = []
  const reads = () => seen.filter((q) => q.sql.includes('FROM api_key_usage'))
  const historyReads = () => reads().length
  const detector = new AnomalyDetector({ db: recordingDb(store.db, seen), thresholds, channel: 'unused', log: silentLogger, checkIntervalMs: 0, ipv6PrefixBits: DEFAULT_CONFIG.rate_limits.ipv6_prefix_bits })
  t.teardown(() => detector.close())
  const countAll = () => {
    for (const [keyId, at] of active) detector.count(keyId, 'forwarded', at, '203.0.113.1', 200)
  }
  const keyHours = new Set(active.map(([k, at]) => `${k}|${at - (at % H)}`)).size
  const batches = Math.ceil(keyHours / HISTORY_BATCH)
  t.ok(batches > 1, `${keyHours} keys and hours to judge: more than one batch`)

  // The store fails the first history read: its keys are judged at the next check, the other batches now.
  let failures = 1
  const failing: Db = new Proxy(recordingDb(store.db, seen), {
    get(target, prop) {
      if (prop === 'query') {
        return (q: string, p?: readonly unknown[]) => {
          if (q.includes('FROM api_key_usage') && failures > 0) {
            failures--
            return Promise.reject(new Error('the store is briefly unavailable'))
          }
          return target.query(q, p)
        }
      }
      const v = Reflect.get(target, prop) as unknown
      return typeof v === 'function' ? v.bind(target) : v
    },
  })
  const flaky = new AnomalyDetector({ db: failing, thresholds, channel: 'unused', log: silentLogger, checkIntervalMs: 0, ipv6PrefixBits: DEFAULT_CONFIG.rate_limits.ipv6_prefix_bits })
  t.teardown(() => flaky.close())
  for (const [keyId, at] of active) flaky.count(keyId, 'forwarded', at, '203.0.113.1', 200)
  await flaky.check()
  t.equal(historyReads(), batches - 1, 'the batches after the failed read are read')
  const partial = await found()
  t.ok(partial.length < expected.length && partial.length > 0, "the other batches' findings are recorded")
  t.same(partial, expected.filter((e) => partial.some((p) => p.key_id === e.key_id && p.details.hour_utc === e.details.hour_utc)), 'as judged alone')
  for (const [keyId, at] of active) flaky.count(keyId, 'forwarded', at + 1, '203.0.113.1', 200)
  await flaky.check()
  t.equal(historyReads(), batches, "the failed read's keys are read again at the next check, in one read")
  t.same(await found(), expected, 'and every finding is that of a read of the key alone')

  // Another detector (another instance) judges the same keys, in one check, from scratch.
  await store.db.query('DELETE FROM api_key_anomalies WHERE key_id = ANY($1::text[])', [lineages.flat()])
  seen.length = 0
  countAll()
  await detector.check()
  t.equal(historyReads(), batches, `${keyHours} keys and hours read in ${batches} queries (before: one query per key)`)
  const judged = await found()
  t.same(judged, expected, 'the findings are those of a read of each key alone')
  const kindsFound = new Set(judged.map((j) => kinds[Number(j.key_id.split('_')[1]) % kinds.length]))
  t.same([...kindsFound].sort(), ['rotated, unusual', 'twice rotated, at the bound', 'unusual'], 'of the kinds that are unusual')

  // Each key's rows are read through the table's primary key. Before, the planner took the
  // lineage's CTE for a hundred keys, and read every key's rows of the two weeks (the whole table,
  // or through the index on bucket) for the one key.
  const [read] = reads()
  const [plan] = await store.db.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (FORMAT JSON) ${read?.sql}`, read?.params)
  const nodes = planNodes(plan?.['QUERY PLAN'])
  t.same(nodes.filter((n) => n['Relation Name'] === 'api_key_usage' && n['Node Type'] === 'Seq Scan'), [], 'the history read scans no usage table')
  t.ok(nodes.some((n) => n['Index Name'] === 'api_key_usage_pkey'), 'it takes the rows through the primary key')

  // Judged once a key and hour: the same keys again in the same hours read nothing.
  countAll()
  await detector.check()
  t.equal(historyReads(), batches, 'a key and hour judged is not read again')
})
