// The admin listener's filtered list pages read their rows from an index in the page's order: a
// page reads the rows it lists and the one after, however many rows of other keys, types or
// states the table holds above them (found by a review: a filtered page walked the whole table).
// Checked on PostgreSQL by the rows the statement's plan reads (EXPLAIN ANALYZE), not by time.
import t from 'tap'
import { AnomalyLog } from '../core/anomalies.ts'
import { AuditCipher, AuditLog } from '../core/audit.ts'
import { openDb, type Db } from '../core/db.ts'
import { migrate } from '../core/migrate.ts'
import { freshDatabase } from './helpers/stores.ts'

interface PlanNode {
  'Node Type': string
  'Relation Name'?: string
  'Actual Rows': number
  'Actual Loops': number
  'Rows Removed by Filter'?: number
  'Rows Removed by Index Recheck'?: number
  Plans?: PlanNode[]
}

/** The rows of `table` the plan's scans read (listed or dropped by a filter). */
function rowsRead(node: PlanNode, table: string): number {
  const own = node['Relation Name'] === table ? (node['Actual Rows'] + (node['Rows Removed by Filter'] ?? 0) + (node['Rows Removed by Index Recheck'] ?? 0)) * node['Actual Loops'] : 0
  return own + (node.Plans ?? []).reduce((n, p) => n + rowsRead(p, table), 0)
}

/** `db`, and the statements (with their parameters) made through it since the last `take()`. */
function capturing(db: Db) {
  let made: Array<{ sql: string; params: readonly unknown[] }> = []
  const wrapped = new Proxy(db, {
    get(target, prop) {
      if (prop === 'query') {
        return (sql: string, params: readonly unknown[] = []) => {
          made.push({ sql, params })
          return target.query(sql, params)
        }
      }
      const v = Reflect.get(target, prop) as unknown
      return typeof v === 'function' ? v.bind(target) : v
    },
  })
  const take = () => {
    const out = made
    made = []
    return out
  }
  return { wrapped, take }
}

async function readBy(db: Db, statement: { sql: string; params: readonly unknown[] }, table: string): Promise<number> {
  const [row] = await db.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(`EXPLAIN (ANALYZE, FORMAT JSON) ${statement.sql}`, statement.params)
  return rowsRead((row as { 'QUERY PLAN': Array<{ Plan: PlanNode }> })['QUERY PLAN'][0]!.Plan, table)
}

const ROWS = 20_000
const LIMIT = 50

t.test('anomaly list pages by key, type and acknowledgement read one page of rows', async (t) => {
  const db = await openDb({ databaseUrl: await freshDatabase(t) })
  t.teardown(() => db.close())
  await migrate(db)
  // The first 1% of rows: one key's, one type's, and the acknowledged ones; the rest above them.
  await db.query(
    `INSERT INTO api_key_anomalies (key_id, type, window_start, details, detected_at, acknowledged_at, acknowledged_by)
     SELECT CASE WHEN i <= $1 / 100 THEN 'old_key' ELSE 'key_' || (i % 1000) END,
            CASE WHEN i <= $1 / 100 THEN 'unusual_hour' ELSE (ARRAY['request_rate', 'error_rate', 'distinct_addresses'])[1 + i % 3] END,
            timestamptz '2026-01-01' + i * interval '1 second', '{}', timestamptz '2026-01-01' + i * interval '1 second',
            CASE WHEN i <= $1 / 100 THEN timestamptz '2026-02-01' END, CASE WHEN i <= $1 / 100 THEN 'admin' END
     FROM generate_series(1, $1::int) i`,
    [ROWS],
  )
  await db.query('ANALYZE api_key_anomalies')
  const { wrapped, take } = capturing(db)
  const log = new AnomalyLog(wrapped)
  const filters = [{ keyId: 'old_key' }, { type: 'unusual_hour' as const }, { acknowledged: true }]
  for (const filter of filters) {
    const first = await log.list({ limit: LIMIT + 1, ...filter })
    const next = await log.list({ limit: LIMIT + 1, ...filter, before: first[LIMIT - 1]!.id })
    // The right rows, newest first: the filter's 200 rows are ids 1..200 of the table.
    const ids = [...first.slice(0, LIMIT), ...next].map((a) => Number(a.id))
    const lowest = Number((await db.query<{ id: string }>('SELECT min(id)::text AS id FROM api_key_anomalies'))[0]!.id)
    t.same(
      ids,
      Array.from({ length: 2 * LIMIT + 1 }, (_, i) => lowest + ROWS / 100 - 1 - i),
      `${JSON.stringify(filter)}: the newest rows of the filter, in order`,
    )
    for (const statement of take()) {
      const read = await readBy(db, statement, 'api_key_anomalies')
      t.ok(read <= LIMIT + 1, `${JSON.stringify(filter)}: the page read ${read} rows of ${ROWS} (at most ${LIMIT + 1})`)
    }
  }
})

t.test('audit pages by action and by actor read one page of rows', async (t) => {
  const db = await openDb({ databaseUrl: await freshDatabase(t) })
  t.teardown(() => db.close())
  await migrate(db)
  // The first 1% of rows: one action's and one actor's; the rest after them.
  await db.query(
    `INSERT INTO api_key_audit_log (id, key_id, action, actor, enc_key_id, nonce, details, created_at)
     SELECT 'aud_' || lpad(i::text, 6, '0'), 'key_' || (i % 1000), CASE WHEN i <= $1 / 100 THEN 'deny_list.added' ELSE 'key.updated' END,
            CASE WHEN i <= $1 / 100 THEN 'alice' ELSE 'provisioner' END, 'k', '\\x00', '\\x00', timestamptz '2026-01-01' + i * interval '1 second'
     FROM generate_series(1, $1::int) i`,
    [ROWS],
  )
  await db.query('ANALYZE api_key_audit_log')
  const { wrapped, take } = capturing(db)
  const log = new AuditLog(new AuditCipher(Buffer.alloc(32, 1)))
  for (const filter of [{ action: 'deny_list.added' }, { actor: 'alice' }]) {
    const first = await log.pageAt(wrapped, filter, { limit: LIMIT })
    const next = await log.pageAt(wrapped, filter, { limit: LIMIT, cursor: first.nextCursor ?? undefined })
    const ids = [...first.items, ...next.items].map((r) => r.id)
    t.same(
      ids,
      Array.from({ length: 2 * LIMIT }, (_, i) => `aud_${String(ROWS / 100 - i).padStart(6, '0')}`),
      `${JSON.stringify(filter)}: the newest rows of the filter, in order`,
    )
    for (const statement of take()) {
      const read = await readBy(db, statement, 'api_key_audit_log')
      t.ok(read <= LIMIT + 1, `${JSON.stringify(filter)}: the page read ${read} rows of ${ROWS} (at most ${LIMIT + 1})`)
    }
  }
})
