// node bench/delivery-prune.ts [--rows 200000] [--webhooks 20] [--rounds 5] [--inserts 500]
// What the scheduler's prune of the webhook delivery log costs, and what an index on created_at
// would cost each delivery queued, on the embedded store and, with DATABASE_URL, on PostgreSQL
// (a fresh database on that server, dropped at the end). The log: `rows`
// deliveries spread over `webhooks` webhooks, queued in time order over the last 33 days, so
// that a tenth is past the default 30 days' retention; a few pending, a few failed.
// Three ways, each on the same rows (restored between them):
// - scan: the prune as it was, `created_at < before`, which no index leads with (a seq scan);
// - index: the same statement with an index on created_at (what each insert then also writes);
// - per-webhook: the prune webhook by webhook, through migration 0013's log index (webhook_id,
//   created_at to the millisecond, id), which every delivery already writes.
// For each: one prune round with nothing to prune (retention 40 days: what nearly every
// scheduler round finds), one with the tenth to prune, and `inserts` enqueue-shaped statements
// (one delivery per webhook each). Medians of `rounds`, and each as a ratio of scan's.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openDb, type Db } from '../core/db.ts'
import { migrate } from '../core/migrate.ts'
import { countArg as arg, freshStores, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('rows', 'webhooks', 'rounds', 'inserts')

const ROWS = arg('rows', 200_000)
const WEBHOOKS = arg('webhooks', 20)
const ROUNDS = arg('rounds', 5)
const INSERTS = arg('inserts', 500)
const BATCH = 5000
const DAY_MS = 86_400_000

const CREATED_MS = "date_trunc('milliseconds', created_at AT TIME ZONE 'UTC')"
const WAYS = {
  scan: `SELECT ctid FROM webhook_deliveries WHERE created_at < $1 AND NOT (status = 'pending') LIMIT ${BATCH}`,
  index: `SELECT ctid FROM webhook_deliveries WHERE created_at < $1 AND NOT (status = 'pending') LIMIT ${BATCH}`,
  'per-webhook': `SELECT d.ctid FROM webhooks w CROSS JOIN LATERAL (
      SELECT ctid FROM webhook_deliveries WHERE webhook_id = w.id AND ${CREATED_MS} < ($1::timestamptz AT TIME ZONE 'UTC') AND status <> 'pending' LIMIT ${BATCH}
    ) d LIMIT ${BATCH}`,
} as const
type Way = keyof typeof WAYS

async function fill(db: Db): Promise<void> {
  await db.query('DROP TABLE IF EXISTS bench_deliveries')
  await db.query('DROP INDEX IF EXISTS bench_deliveries_created')
  await db.query('DELETE FROM webhook_deliveries')
  await db.query('DELETE FROM webhooks')
  await db.query(
    `INSERT INTO webhooks (id, url, events, sealed_secret, created_by) SELECT 'wh_bench' || i, 'https://example.com/' || i, ARRAY['key.revoked'], 'x', 'bench' FROM generate_series(1, $1) i`,
    [WEBHOOKS],
  )
  const payload = JSON.stringify({ type: 'key.revoked', timestamp: new Date().toISOString(), data: { key: { id: 'Xq3vK9pA2bC7', name: 'a key of the bench', status: 'revoked', type: 'service', scopes: ['a', 'b'], metadata: { team: 'x'.repeat(200) } } } })
  for (let from = 0; from < ROWS; from += 20_000) {
    await db.query(
      `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, created_at, next_attempt_at, last_attempt_at, delivered_at)
       SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), 'wh_bench' || (1 + i % $3), 'key.revoked', $4,
         CASE WHEN i % 500 = 0 THEN 'pending' WHEN i % 100 = 0 THEN 'failed' ELSE 'delivered' END, 1, t, t, t, t
       FROM generate_series($1::int, $2::int) i, LATERAL (SELECT now() - interval '33 days' * (1 - i::float8 / $5) AS t) c`,
      [from, Math.min(ROWS, from + 20_000) - 1, WEBHOOKS, payload, ROWS],
    )
  }
  await db.query('CREATE TABLE bench_deliveries AS SELECT * FROM webhook_deliveries')
  await db.query('ANALYZE webhook_deliveries')
}

async function restore(db: Db): Promise<void> {
  await db.query('DELETE FROM webhook_deliveries')
  await db.query('INSERT INTO webhook_deliveries SELECT * FROM bench_deliveries')
  await db.query('VACUUM ANALYZE webhook_deliveries')
}

/** One prune round as the scheduler makes it: batches until one deletes fewer than BATCH. */
async function prune(db: Db, way: Way, retentionDays: number): Promise<{ ms: number; deleted: number }> {
  const before = new Date(Date.now() - retentionDays * DAY_MS)
  const began = performance.now()
  let deleted = 0
  for (;;) {
    const [gone] = await db.query<{ n: number }>(`WITH gone AS (DELETE FROM webhook_deliveries WHERE ctid IN (${WAYS[way]}) RETURNING 1) SELECT count(*)::int AS n FROM gone`, [before])
    deleted += gone?.n ?? 0
    if ((gone?.n ?? 0) < BATCH) break
  }
  return { ms: performance.now() - began, deleted }
}

/** `INSERTS` statements as enqueue writes them for one event: one delivery per webhook. Mean ms a statement. */
async function inserts(db: Db): Promise<number> {
  const payload = JSON.stringify({ type: 'key.created', data: { key: { id: 'Xq3vK9pA2bC7', metadata: { team: 'x'.repeat(200) } } } })
  const began = performance.now()
  for (let i = 0; i < INSERTS; i++) {
    await db.query(
      `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, next_attempt_at, created_at)
       SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), w.id, 'key.revoked', $1, now(), now() FROM webhooks w`,
      [payload],
    )
  }
  return (performance.now() - began) / INSERTS
}

async function measure(name: string, db: Db): Promise<void> {
  await migrate(db)
  const filled = performance.now()
  await fill(db)
  process.stdout.write(`${name}: ${ROWS} deliveries over ${WEBHOOKS} webhooks made in ${Math.round(performance.now() - filled)} ms\n`)
  const figures: Record<Way, { idle: number[]; backlog: number[]; deleted: number; insert: number[] }> = {
    scan: { idle: [], backlog: [], deleted: 0, insert: [] },
    index: { idle: [], backlog: [], deleted: 0, insert: [] },
    'per-webhook': { idle: [], backlog: [], deleted: 0, insert: [] },
  }
  for (let round = 0; round < ROUNDS; round++) {
    for (const way of Object.keys(WAYS) as Way[]) {
      await restore(db)
      if (way === 'index') await db.query('CREATE INDEX bench_deliveries_created ON webhook_deliveries (created_at)')
      const f = figures[way]
      f.idle.push((await prune(db, way, 40)).ms)
      const backlog = await prune(db, way, 30)
      f.backlog.push(backlog.ms)
      f.deleted = backlog.deleted
      f.insert.push(await inserts(db))
      if (way === 'index') await db.query('DROP INDEX bench_deliveries_created')
    }
  }
  const base = figures.scan
  process.stdout.write(`| way | prune, nothing to prune, ms | ratio | prune of ${figures.scan.deleted} rows, ms | ratio | insert of ${WEBHOOKS} deliveries, ms | ratio |\n| --- | --- | --- | --- | --- | --- | --- |\n`)
  for (const [way, f] of Object.entries(figures)) {
    const cells = [median(f.idle), median(f.backlog), median(f.insert)]
    const ratios = [median(base.idle), median(base.backlog), median(base.insert)].map((b, i) => ((cells[i] as number) / b).toFixed(2))
    process.stdout.write(`| ${way} | ${cells[0]?.toFixed(1)} | ${ratios[0]} | ${cells[1]?.toFixed(1)} | ${ratios[1]} | ${cells[2]?.toFixed(2)} | ${ratios[2]} |\n`)
  }
  for (const way of Object.keys(WAYS) as Way[]) {
    if (way === 'index') await db.query('CREATE INDEX bench_deliveries_created ON webhook_deliveries (created_at)')
    const plan = await db.query<{ 'QUERY PLAN': string }>(`EXPLAIN ${WAYS[way]}`, [new Date(Date.now() - 40 * DAY_MS)])
    process.stdout.write(`plan, ${way}:\n${plan.map((r) => `  ${r['QUERY PLAN']}`).join('\n')}\n`)
    if (way === 'index') await db.query('DROP INDEX bench_deliveries_created')
  }
  await db.query('DROP TABLE bench_deliveries')
}

const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-prune-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
const embedded = await openDb({ dataDir: join(dir, 'store') })
await measure('embedded', embedded)
await embedded.close()
// A database of its own: before, it emptied the webhooks and deliveries of the database that
// DATABASE_URL names, a deployment's in a shell set up beside one.
const fresh = freshStores(dir).find((s) => s.name === 'postgres')
if (fresh) {
  const opened = await fresh.open()
  try {
    const postgres = await openDb({ databaseUrl: opened.env.DATABASE_URL })
    await measure('postgres', postgres)
    await postgres.close()
  } finally {
    await opened.drop()
  }
}
