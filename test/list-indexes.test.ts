// The admin listener's filtered list pages read their rows from an index in the page's order: a
// page reads the rows it lists and the one after, however many rows of other keys, types or
// states the table holds above them (found by a review: a filtered page walked the whole table).
// Checked on PostgreSQL (and, for the expired keys' pages, on the embedded store too) by
// the rows the statement's plan reads (EXPLAIN ANALYZE), not by time.
import t, { type Test } from 'tap'
import { AnomalyLog } from '../core/anomalies.ts'
import { AuditCipher, AuditLog } from '../core/audit.ts'
import { openDb, type Db } from '../core/db.ts'
import { migrate } from '../core/migrate.ts'
import { forEachStore, freshDatabase, testServices } from './helpers/stores.ts'

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

/** A fresh PostgreSQL database, migrated, `table` filled by `insert` with ROWS rows ($1) and analyzed. */
async function filled(t: Test, table: string, insert: string): Promise<Db> {
  const db = await openDb({ databaseUrl: await freshDatabase(t) })
  t.teardown(() => db.close())
  await migrate(db)
  await db.query(insert, [ROWS])
  await db.query(`ANALYZE ${table}`)
  return db
}

/** One filter's first two pages: the ids listed, and the rows of `table` each statement read (at most `bound`). */
async function checkPages<F>(
  t: Test,
  o: { db: Db; table: string; filter: F; pages: (filter: F) => Promise<Array<string | number>>; expected: Array<string | number>; statements: () => Array<{ sql: string; params: readonly unknown[] }>; bound: number },
): Promise<void> {
  const name = JSON.stringify(o.filter)
  t.same(await o.pages(o.filter), o.expected, `${name}: the newest rows of the filter, in order`)
  // At least a statement a page seen, or the bound below checks nothing (a page read in a
  // transaction, say, goes past the wrapped query).
  const made = o.statements()
  t.ok(made.length >= 2, `${name}: the two pages' statements are seen (${made.length})`)
  for (const statement of made) {
    const read = await readBy(o.db, statement, o.table)
    t.ok(read <= o.bound, `${name}: the page read ${read} rows of ${ROWS} (at most ${o.bound})`)
  }
}

t.test('anomaly list pages by key, type and acknowledgement read one page of rows', async (t) => {
  // The first 1% of rows: one key's, one type's, and the acknowledged ones; the rest above them.
  const db = await filled(
    t,
    'api_key_anomalies',
    `INSERT INTO api_key_anomalies (key_id, type, window_start, details, detected_at, acknowledged_at, acknowledged_by)
     SELECT CASE WHEN i <= $1 / 100 THEN 'old_key' ELSE 'key_' || (i % 1000) END,
            CASE WHEN i <= $1 / 100 THEN 'unusual_hour' ELSE (ARRAY['request_rate', 'error_rate', 'distinct_addresses'])[1 + i % 3] END,
            timestamptz '2026-01-01' + i * interval '1 second', '{}', timestamptz '2026-01-01' + i * interval '1 second',
            CASE WHEN i <= $1 / 100 THEN timestamptz '2026-02-01' END, CASE WHEN i <= $1 / 100 THEN 'admin' END
     FROM generate_series(1, $1::int) i`,
  )
  const { wrapped, take } = capturing(db)
  const log = new AnomalyLog(wrapped)
  // The filter's 200 rows are the table's first 200 ids.
  const lowest = Number((await db.query<{ id: string }>('SELECT min(id)::text AS id FROM api_key_anomalies'))[0]!.id)
  const expected = Array.from({ length: 2 * LIMIT + 1 }, (_, i) => lowest + ROWS / 100 - 1 - i)
  const pages = async (filter: Omit<Parameters<AnomalyLog['list']>[0], 'limit'>) => {
    const first = await log.list({ ...filter, limit: LIMIT + 1 })
    const next = await log.list({ ...filter, limit: LIMIT + 1, before: first[LIMIT - 1]!.id })
    return [...first.slice(0, LIMIT), ...next].map((a) => Number(a.id))
  }
  for (const filter of [{ keyId: 'old_key' }, { type: 'unusual_hour' as const }, { acknowledged: true }]) {
    await checkPages(t, { db, table: 'api_key_anomalies', filter, pages, expected, statements: take, bound: LIMIT + 1 })
  }
})

t.test('audit pages by action and by actor read one page of rows', async (t) => {
  // The first 1% of rows: one action's and one actor's; the rest after them.
  const db = await filled(
    t,
    'api_key_audit_log',
    `INSERT INTO api_key_audit_log (id, key_id, action, actor, enc_key_id, nonce, details, created_at)
     SELECT 'aud_' || lpad(i::text, 6, '0'), 'key_' || (i % 1000), CASE WHEN i <= $1 / 100 THEN 'deny_list.added' ELSE 'key.updated' END,
            CASE WHEN i <= $1 / 100 THEN 'alice' ELSE 'provisioner' END, 'k', '\\x00', '\\x00', timestamptz '2026-01-01' + i * interval '1 second'
     FROM generate_series(1, $1::int) i`,
  )
  const { wrapped, take } = capturing(db)
  const log = new AuditLog(new AuditCipher(Buffer.alloc(32, 1)))
  const pages = async (filter: { action?: string; actor?: string }) => {
    const first = await log.pageAt(wrapped, filter, { limit: LIMIT })
    const next = await log.pageAt(wrapped, filter, { limit: LIMIT, cursor: first.nextCursor ?? undefined })
    return [...first.items, ...next.items].map((r) => r.id)
  }
  const expected = Array.from({ length: 2 * LIMIT }, (_, i) => `aud_${String(ROWS / 100 - i).padStart(6, '0')}`)
  for (const filter of [{ action: 'deny_list.added' }, { actor: 'alice' }]) {
    await checkPages(t, { db, table: 'api_key_audit_log', filter, pages, expected, statements: take, bound: LIMIT + 1 })
  }
})

/** The key service over `db`, the statements it made since the last `take()`, and a filter's first two pages (the ids). */
function keyPages(db: Db) {
  const { wrapped, take } = capturing(db)
  const { keys } = testServices(wrapped)
  const pages = async (filter: Record<string, string>) => {
    const first = await keys.list({ limit: LIMIT, ...filter })
    const next = await keys.list({ limit: LIMIT, ...filter, cursor: first.nextCursor ?? undefined })
    return [...first.items, ...next.items].map((k) => k.id)
  }
  return { keys, take, pages }
}

t.test('key pages by type, owner and status read one page of rows', async (t) => {
  // The first 1% of keys: one type's, one owner's and the revoked ones; the rest after them.
  const db = await filled(
    t,
    'api_keys',
    `INSERT INTO api_keys (id, key_hash, name, type, status, owner, created_at, revoked_at)
     SELECT 'key_' || lpad(i::text, 6, '0'), encode(sha256(i::text::bytea), 'hex'), 'key ' || i,
            CASE WHEN i <= $1 / 100 THEN 'emergency' ELSE 'service' END, CASE WHEN i <= $1 / 100 THEN 'revoked' ELSE 'active' END,
            CASE WHEN i <= $1 / 100 THEN 'alice' ELSE 'team_' || (i % 100) END, timestamptz '2026-01-01' + i * interval '1 second',
            CASE WHEN i <= $1 / 100 THEN timestamptz '2026-02-01' END
     FROM generate_series(1, $1::int) i`,
  )
  const { keys, take, pages } = keyPages(db)
  const expected = Array.from({ length: 2 * LIMIT }, (_, i) => `key_${String(ROWS / 100 - i).padStart(6, '0')}`)
  // The planner may read the filter's 200 keys and sort them rather than walk an index (at this
  // size; with 1,000,000 keys it walks it): what is checked is that no other key is read.
  const filters: Array<Record<string, string>> = [{ type: 'emergency' }, { owner: 'alice' }, { status: 'revoked' }]
  for (const filter of filters) {
    await checkPages(t, { db, table: 'api_keys', filter, pages, expected, statements: take, bound: ROWS / 100 })
  }
  // Judged at the time, as before: a key past its end that no sweep marked is expired, not active.
  await db.query(`UPDATE api_keys SET expires_at = timestamptz '2026-01-02' WHERE id = 'key_019999'`)
  const active = await keys.list({ limit: 2, status: 'active' })
  t.same(active.items.map((k) => k.id), ['key_020000', 'key_019998'], 'a key past its expiry is not listed as active')
  t.ok((await keys.list({ limit: 500, status: 'expired' })).items.some((k) => k.id === 'key_019999'), 'it is listed as expired')
})

t.test('key pages of the expired keys read a page of those marked so and those past their end', async (t) => {
  // On both stores: their planners are of different PostgreSQL versions (the embedded store's
  // newer), and each must find the indexes in these statements.
  await forEachStore(t, async (t, { db }) => {
    // The first 1% of keys are expired: most marked so, one in ten still active or rotating past
    // its expiry or grace (until the scheduler's next round). A third of the rest have an expiry
    // to come.
    await db.query(
      `INSERT INTO api_keys (id, key_hash, name, type, status, created_at, expires_at, grace_until)
       SELECT 'key_' || lpad(i::text, 6, '0'), encode(sha256(i::text::bytea), 'hex'), 'key ' || i, 'service',
              CASE WHEN old AND i % 10 = 0 THEN 'active' WHEN old AND i % 10 = 5 THEN 'rotating' WHEN old THEN 'expired' ELSE 'active' END,
              timestamptz '2026-01-01' + i * interval '1 second',
              CASE WHEN old AND i % 10 <> 5 THEN timestamptz '2026-01-02' WHEN NOT old AND i % 3 = 0 THEN timestamptz '2100-01-01' END,
              CASE WHEN old AND i % 10 = 5 THEN timestamptz '2026-01-02' END
       FROM generate_series(1, $1::int) i, LATERAL (SELECT i <= $1 / 100 AS old) o`,
      [ROWS],
    )
    await db.query('ANALYZE api_keys')
    const { take, pages } = keyPages(db)
    const expected = Array.from({ length: 2 * LIMIT }, (_, i) => `key_${String(ROWS / 100 - i).padStart(6, '0')}`)
    // A page of those marked so from their index, and all those past their end (ROWS / 500); at
    // this size the planner may read all the marked ones and sort them (as for the revoked ones
    // above): what is checked is that no key that is not expired is read.
    await checkPages(t, { db, table: 'api_keys', filter: { status: 'expired' }, pages, expected, statements: take, bound: ROWS / 100 })
  })
})
