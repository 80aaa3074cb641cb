// The scheduler's selection of the keys a round may change (core/scheduler.ts LOCK_DUE) reads its
// candidates from indexes (migration 0022), and that rewriting must not change what it selects:
// over random keys and notices on both stores, with the clock and the end of the notice period
// among their deadlines (ties included), it selects what the statement it replaced selects, in
// the same order and batch. And with many keys and none due, it reads next to none of them
// (found by a review: it read every key every round, 230 to 275 ms for 100,000 on the embedded
// store, which answers nothing else meanwhile). The notices prune finds the old notices from
// their index too, with statistics or none (the embedded store keeps none).
import t from 'tap'
import { KEY_ENDS_FROM } from '../core/keys/ends.ts'
import { KEY_STATUSES } from '../core/keys/types.ts'
import { silentLogger } from '../core/log.ts'
import { defaultPruneRules, LOCK_DUE, Scheduler } from '../core/scheduler.ts'
import { seededRandom as random } from './helpers/random.ts'
import { forEachStore, planNodes, recordingDb, testServices } from './helpers/stores.ts'

/** The statement LOCK_DUE replaced, as it was: every key judged. */
const BEFORE = `SELECT k.id FROM ${KEY_ENDS_FROM}
  WHERE e.ends_at <= $1
     OR ((k.status = 'active' AND k.rotation_interval_s IS NOT NULL AND k.created_at + k.rotation_interval_s * interval '1 second' <= $2) AND n.key_id IS NULL)
     OR ((k.status = 'active' AND k.expires_at > $1 AND k.expires_at <= $2) AND NOT EXISTS (SELECT 1 FROM api_key_notices xn WHERE xn.key_id = k.id AND xn.kind = 'expiry' AND xn.deadline = k.expires_at))
  ORDER BY k.id LIMIT $3 FOR UPDATE OF k`

const T0 = new Date('2026-06-01T12:00:00Z')
const HOUR = 3_600_000

/** Inserts keys given as rows of api_keys' columns (id, status, created_at, ...), with a valid hash and name. */
async function insertKeys(db: { query: (sql: string, params?: unknown[]) => Promise<unknown> }, keys: object[]): Promise<void> {
  await db.query(
    `INSERT INTO api_keys (id, key_hash, name, type, status, rotation_interval_s, created_at, expires_at, grace_until, revoked_at)
     SELECT k.id, encode(sha256(k.id::bytea), 'hex'), k.id, 'service', k.status, k.rotation_interval_s, k.created_at, k.expires_at, k.grace_until,
            CASE WHEN k.status = 'revoked' THEN k.created_at END
     FROM json_to_recordset($1::json) AS k(id text, status text, rotation_interval_s integer, created_at timestamptz, expires_at timestamptz, grace_until timestamptz)`,
    [JSON.stringify(keys)],
  )
}

async function insertNotices(db: { query: (sql: string, params?: unknown[]) => Promise<unknown> }, notices: object[]): Promise<void> {
  await db.query(
    `INSERT INTO api_key_notices (key_id, kind, deadline, notified_at)
     SELECT n.key_id, n.kind, n.deadline, n.deadline FROM json_to_recordset($1::json) AS n(key_id text, kind text, deadline timestamptz)`,
    [JSON.stringify(notices)],
  )
}

t.test('the keys selected are those the statement before selected, over random keys, notices and clocks', async (t) => {
  await forEachStore(t, async (t, store) => {
    const rnd = random(20_261_207)
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)] as T
    // Whole hours within two days of T0, either side: the clocks below fall on them too.
    const around = () => new Date(T0.getTime() + Math.round((rnd() - 0.5) * 96) * HOUR)
    const keys = Array.from({ length: 400 }, (_, i) => {
      const status = pick(KEY_STATUSES)
      const created = new Date(T0.getTime() - Math.floor(rnd() * 10 * 24) * HOUR)
      return {
        id: `k${String(i).padStart(4, '0')}`,
        status,
        created_at: created,
        // None, or one that brings its deadline within a few days of T0 (or long past it).
        rotation_interval_s: rnd() < 0.4 ? null : Math.max(1, Math.round((around().getTime() - created.getTime()) / 1000) + pick([0, 0, 1, -1, 3600])),
        expires_at: rnd() < 0.4 ? null : around(),
        // Set on some keys that are not rotating too, where it must not count.
        grace_until: status === 'rotating' || rnd() < 0.3 ? around() : null,
      }
    })
    await insertKeys(store.db, keys)
    const notices = keys.flatMap((k) => [
      ...(rnd() < 0.5 ? [{ key_id: k.id, kind: 'rotation', deadline: around() }] : []),
      ...(rnd() < 0.5 ? [{ key_id: k.id, kind: 'expiry', deadline: k.expires_at !== null && rnd() < 0.6 ? k.expires_at : around() }] : []),
    ])
    await insertNotices(store.db, notices)
    await store.db.query('ANALYZE api_keys')
    await store.db.query('ANALYZE api_key_notices')

    let selected = 0
    let rounds = 0
    for (let i = 0; i < 80; i++) {
      const now = around()
      const notice = new Date(now.getTime() + pick([0, 1, 24, 72, 200]) * HOUR)
      for (const limit of [1000, 7]) {
        const params = [now, notice, limit]
        const [before, after] = await store.db.transaction(async (tx) => [await tx.query<{ id: string }>(BEFORE, params), await tx.query<{ id: string }>(LOCK_DUE, params)])
        const ids = (rows: Array<{ id: string }>) => rows.map((r) => r.id)
        if (JSON.stringify(ids(after)) !== JSON.stringify(ids(before))) t.same(ids(after), ids(before), `now ${now.toISOString()}, notice ${notice.toISOString()}, limit ${limit}`)
        selected += before.length
        rounds++
      }
    }
    t.ok(selected > rounds, `${rounds} selections agree (${selected} keys selected in all)`)
  })
})

t.test('with many keys and none due, the selection reads next to none of them', async (t) => {
  await forEachStore(t, async (t, store) => {
    const KEYS = 5000
    const DAY = 24 * HOUR
    // Keys that end, or are to be announced, months from now, one in 50 with a rotation
    // interval; and rotation notices of keys ended long ago, their deadlines passed. Those two
    // are read still, whichever the fewer (an announced deadline passed is one of an active
    // key with an interval, and the notices of ended keys are kept for the audit retention).
    const keys = Array.from({ length: KEYS }, (_, i) => ({
      id: `k${String(i).padStart(5, '0')}`,
      status: i % 10 === 0 ? 'expired' : i % 10 === 1 ? 'rotating' : 'active',
      created_at: new Date(T0.getTime() - (i % 50) * DAY),
      rotation_interval_s: i % 50 === 5 ? 365 * 86_400 : null,
      expires_at: i % 2 === 0 ? new Date(T0.getTime() + 200 * DAY) : null,
      grace_until: i % 10 === 1 ? new Date(T0.getTime() + 100 * DAY) : null,
    }))
    await insertKeys(store.db, keys)
    await insertNotices(
      store.db,
      keys.filter((k, i) => k.status === 'expired' && i % 100 === 0).map((k) => ({ key_id: k.id, kind: 'rotation', deadline: new Date(T0.getTime() - 5 * DAY) })),
    )
    await store.db.query('ANALYZE api_keys')
    await store.db.query('ANALYZE api_key_notices')
    const params = [T0, new Date(T0.getTime() + 3 * DAY), 1000]
    t.same(await store.db.query(LOCK_DUE, params), [], 'nothing is due')

    type Node = { 'Node Type': string; 'Relation Name'?: string; 'Actual Rows': number; 'Actual Loops': number; 'Rows Removed by Filter'?: number; Plans?: Node[] }
    const [plan] = await store.db.transaction((tx) => tx.query<{ 'QUERY PLAN': Array<{ Plan: Node }> }>(`EXPLAIN (ANALYZE, FORMAT JSON) ${LOCK_DUE}`, params))
    // Rows each scan of the keys found or read and dropped, over all its loops.
    let read = 0
    const walk = (node: Node) => {
      if (node['Relation Name'] === 'api_keys') read += (node['Actual Rows'] + (node['Rows Removed by Filter'] ?? 0)) * node['Actual Loops']
      for (const p of node.Plans ?? []) walk(p)
    }
    const root = (plan?.['QUERY PLAN'] as unknown as Array<{ Plan: Node }> | string)
    walk((typeof root === 'string' ? (JSON.parse(root) as Array<{ Plan: Node }>) : root)[0]!.Plan)
    t.ok(read <= 150, `${read} key rows read of ${KEYS}, of which 50 have passed rotation notices and 100 (active) an interval (before: every key)`)
  })
})

t.test('the notices prune finds the old notices from their (kind, deadline) index, not by reading them all', async (t) => {
  await forEachStore(t, async (t, store) => {
    const DAY = 24 * HOUR
    const keys = Array.from({ length: 2000 }, (_, i) => ({ id: `p${String(i).padStart(5, '0')}`, status: 'active', created_at: T0, rotation_interval_s: null, expires_at: null, grace_until: null }))
    await insertKeys(store.db, keys)
    await insertNotices(
      store.db,
      keys.flatMap((k) => [
        { key_id: k.id, kind: 'rotation', deadline: new Date(T0.getTime() - 10 * DAY) },
        { key_id: k.id, kind: 'expiry', deadline: new Date(T0.getTime() + 10 * DAY) },
      ]),
    )
    const rule = defaultPruneRules({ auditDays: 365, anomalyDays: 90, webhookDeliveryDays: 30, usageDays: 400 }).find((r) => r.table === 'api_key_notices')!
    const seen: Array<{ sql: string; params: unknown[] }> = []
    const scheduler = new Scheduler({ db: recordingDb(store.db, seen), keys: testServices(store.db).keys, audit: testServices(store.db).audit, log: silentLogger, now: () => T0, intervalS: 60, noticeMs: 0, pruneRules: [rule] })
    // Judged with the statistics PostgreSQL's autovacuum keeps, and with none (the embedded store has no autovacuum).
    for (const analyzed of [false, true]) {
      if (analyzed) await store.db.query('ANALYZE api_key_notices')
      seen.length = 0
      const run = await scheduler.runOnce()
      t.same(run?.pruned, { api_key_notices: 0 }, 'nothing is old enough to go')
      const del = seen.find((s) => s.sql.includes('DELETE FROM "api_key_notices"'))!
      const [plan] = await store.db.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (FORMAT JSON) ${del.sql}`, del.params)
      const raw = plan?.['QUERY PLAN']
      const nodes = planNodes(typeof raw === 'string' ? JSON.parse(raw) : raw)
      t.ok(
        nodes.some((n) => n['Index Name'] === 'api_key_notices_deadline') && !nodes.some((n) => n['Node Type'] === 'Seq Scan'),
        `${analyzed ? 'with' : 'without'} statistics: read from the (kind, deadline) index (${nodes.map((n) => n['Node Type']).join(', ')})`,
      )
    }
  })
})
