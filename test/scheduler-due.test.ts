// The scheduler's selection of the keys a round may change (core/scheduler.ts LOCK_DUE) reads its
// candidates from indexes (migration 0022), and that rewriting must not change what it selects:
// over random keys and notices on both stores, with the clock and the end of the notice period
// among their deadlines (ties included), it selects what the statement it replaced selects, in
// the same order and batch. And with many keys and none due, it reads next to none of them
// (found by a review: it read every key every round, 230 to 275 ms for 100,000 on the embedded
// store, which answers nothing else meanwhile), nor, where every key rotates, the rotation
// notices of the keys that ended (found by a review: kept for the audit retention, they were read
// every round): those notices go when their key stops being active (migration 0024), and the
// selection with them gone is the selection with them kept. The notices prune finds the old
// notices from their index too, with statistics or none (the embedded store keeps none).
import t from 'tap'
import { cpSync, mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Db } from '../core/db.ts'
import { KEY_ENDS_FROM } from '../core/keys/ends.ts'
import { KEY_STATUSES } from '../core/keys/types.ts'
import { silentLogger } from '../core/log.ts'
import { migrate, MIGRATIONS_DIR } from '../core/migrate.ts'
import { defaultPruneRules, LOCK_DUE, Scheduler } from '../core/scheduler.ts'
import { seededRandom as random } from './helpers/random.ts'
import { forEachStore, planNodes, recordingDb, testClock, testServices } from './helpers/stores.ts'

/** The statement LOCK_DUE replaced, as it was: every key judged. */
const BEFORE = `SELECT k.id FROM ${KEY_ENDS_FROM}
  WHERE e.ends_at <= $1
     OR ((k.status = 'active' AND k.rotation_interval_s IS NOT NULL AND k.created_at + k.rotation_interval_s * interval '1 second' <= $2) AND n.key_id IS NULL)
     OR ((k.status = 'active' AND k.expires_at > $1 AND k.expires_at <= $2) AND NOT EXISTS (SELECT 1 FROM api_key_notices xn WHERE xn.key_id = k.id AND xn.kind = 'expiry' AND xn.deadline = k.expires_at))
  ORDER BY k.id LIMIT $3 FOR UPDATE OF k`

const T0 = new Date('2026-06-01T12:00:00Z')
const HOUR = 3_600_000

/** Inserts keys given as rows of api_keys' columns (id, status, created_at, ..., replaced_by when given: a key of the same rows too), with a valid hash and name. */
async function insertKeys(db: { query: (sql: string, params?: unknown[]) => Promise<unknown> }, keys: object[]): Promise<void> {
  await db.query(
    `INSERT INTO api_keys (id, key_hash, name, type, status, rotation_interval_s, created_at, expires_at, grace_until, revoked_at, replaced_by)
     SELECT k.id, encode(sha256(k.id::bytea), 'hex'), k.id, 'service', k.status, k.rotation_interval_s, k.created_at, k.expires_at, k.grace_until,
            CASE WHEN k.status = 'revoked' THEN k.created_at END, k.replaced_by
     FROM json_to_recordset($1::json) AS k(id text, status text, rotation_interval_s integer, created_at timestamptz, expires_at timestamptz, grace_until timestamptz, replaced_by text)`,
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
    const notices = keys.flatMap((k) => [
      ...(rnd() < 0.5 ? [{ key_id: k.id, kind: 'rotation', deadline: around() }] : []),
      ...(rnd() < 0.5 ? [{ key_id: k.id, kind: 'expiry', deadline: k.expires_at !== null && rnd() < 0.6 ? k.expires_at : around() }] : []),
    ])
    const clocks = Array.from({ length: 80 }, () => {
      const now = around()
      return { now, notice: new Date(now.getTime() + pick([0, 1, 24, 72, 200]) * HOUR) }
    })
    const select = async (sql: string) => {
      await store.db.query('ANALYZE api_keys, api_key_notices')
      const out: string[] = []
      for (const { now, notice } of clocks) {
        for (const limit of [1000, 7]) {
          const rows = await store.db.transaction((tx) => tx.query<{ id: string; picked?: boolean }>(sql, [now, notice, limit]))
          // Past a batch's limit LOCK_DUE also locks the keys its overdue ones replaced (picked
          // false), which the statement before did not: compared are the keys picked. With no
          // limit reached, every row.
          const compared = limit === 1000 ? rows : rows.filter((r) => r.picked !== false)
          out.push(`now ${now.toISOString()}, notice ${notice.toISOString()}, limit ${limit}: ${compared.map((r) => r.id).join(' ')}`)
        }
      }
      return out
    }
    /** The selections of `got` that differ from `want`'s (each line names its clock and limit). */
    const differ = (got: string[], want: string[]) => got.filter((g, i) => g !== want[i])

    // Every key announced while active, then given its status as the key service and the
    // scheduler give it (migration 0024 drops the rotation notices of those no longer active).
    // Most rotating keys (and a few others) were replaced by a later key, some by a rotating
    // one: lineages, whose rotating keys end with their newest key's announced deadline.
    await insertKeys(store.db, keys.map((k) => ({ ...k, status: 'active' })))
    const later = (i: number, status: string) => keys.slice(i + 1).filter((k) => k.status === status && (status !== 'active' || k.rotation_interval_s !== null))
    const replacedBy = keys.flatMap((k, i) => {
      const by = k.status !== 'rotating' ? (rnd() < 0.1 ? later(i, 'active') : []) : rnd() < 0.25 ? later(i, 'rotating') : later(i, 'active')
      return by.length > 0 ? [{ id: k.id, by: pick(by).id }] : []
    })
    await store.db.query(`UPDATE api_keys k SET replaced_by = r.by FROM json_to_recordset($1::json) AS r(id text, by text) WHERE k.id = r.id`, [JSON.stringify(replacedBy)])
    await insertNotices(store.db, notices)
    await store.db.query(
      `UPDATE api_keys k SET status = s.status, revoked_at = CASE WHEN s.status = 'revoked' THEN k.created_at END
       FROM json_to_recordset($1::json) AS s(id text, status text) WHERE k.id = s.id AND s.status <> 'active'`,
      [JSON.stringify(keys)],
    )
    const [lineage] = await store.db.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${KEY_ENDS_FROM} WHERE k.status = 'rotating' AND e.end_reason = 'rotation_overdue'`)
    t.ok((lineage?.n ?? 0) > 20, `${lineage?.n} rotating keys end by their lineage's announced rotation deadline`)
    const [kept] = await store.db.query<{ n: number }>(`SELECT count(*)::int AS n FROM api_key_notices n JOIN api_keys k ON k.id = n.key_id WHERE n.kind = 'rotation' AND k.status <> 'active'`)
    t.equal(kept?.n, 0, 'the rotation notices of the keys no longer active are gone')
    const now = await select(LOCK_DUE)
    // Then as before migration 0024, every notice kept (a store written so before it ran).
    await store.db.query(
      `INSERT INTO api_key_notices (key_id, kind, deadline, notified_at)
       SELECT n.key_id, n.kind, n.deadline, n.deadline FROM json_to_recordset($1::json) AS n(key_id text, kind text, deadline timestamptz)
       ON CONFLICT (key_id, kind) DO NOTHING`,
      [JSON.stringify(notices)],
    )
    const before = await select(BEFORE)
    t.same(differ(now, before), [], 'with the notices of keys no longer active dropped, it selects what the statement before selected with them kept')
    t.same(differ(await select(LOCK_DUE), before), [], 'and with them kept, the same')
    const selected = before.reduce((n, line) => n + (line.split(': ')[1] ? line.split(': ')[1]!.split(' ').length : 0), 0)
    t.ok(selected > before.length, `${before.length} selections agree (${selected} keys selected in all)`)
  })
})

/** Rows each scan of `tables` found or read and dropped, over all its loops, when LOCK_DUE runs with `params`. */
async function rowsRead(db: Db, params: unknown[], tables: readonly string[]): Promise<number> {
  const [plan] = await db.transaction((tx) => tx.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (ANALYZE, FORMAT JSON) ${LOCK_DUE}`, params))
  const raw = plan?.['QUERY PLAN']
  return planNodes(typeof raw === 'string' ? JSON.parse(raw) : raw)
    .filter((n) => tables.includes(n['Relation Name'] ?? ''))
    .reduce((sum, n) => sum + (n['Actual Rows']! + (n['Rows Removed by Filter'] ?? 0)) * n['Actual Loops']!, 0)
}

t.test('with many keys and none due, the selection reads next to none of them', async (t) => {
  await forEachStore(t, async (t, store) => {
    const KEYS = 5000
    const DAY = 24 * HOUR
    // Keys that end, or are to be announced, months from now, one in 50 with a rotation
    // interval; and rotation notices of keys ended long ago, their deadlines passed, as a store
    // written around migration 0024's trigger may hold. Those two are read, whichever the fewer
    // (an announced deadline passed is one of an active key with an interval).
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

    const read = await rowsRead(store.db, params, ['api_keys'])
    t.ok(read <= 150, `${read} key rows read of ${KEYS}, of which 50 have passed rotation notices and 100 (active) an interval (before: every key)`)

    // Each rotating key replaced by the key after it, and one key due: the lineages walked are
    // those of the candidates alone, not of the 500 rotating keys (the expiring report's walk),
    // nor of every key ever replaced (the replaced_by index, which PostgreSQL read in full to find
    // the candidates' when they were joined to it).
    await store.db.query(`UPDATE api_keys SET replaced_by = 'k' || lpad((substr(id, 2)::int + 1)::text, 5, '0') WHERE status = 'rotating'`)
    await insertKeys(store.db, [{ id: 'k-due', status: 'active', created_at: T0, rotation_interval_s: null, expires_at: new Date(T0.getTime() - HOUR), grace_until: null }])
    await store.db.query('ANALYZE api_keys')
    t.same(await store.db.query<{ id: string }>(LOCK_DUE, params), [{ id: 'k-due', picked: true }], 'one key is due')
    const readDue = await rowsRead(store.db, params, ['api_keys'])
    t.ok(readDue <= 160, `with one key due, ${readDue} key rows read (its lineage walked alone, not every replaced key's)`)
  })
})

t.test('on a rotation-heavy store, the rotation notices of keys no longer active are not read', async (t) => {
  await forEachStore(t, async (t, store) => {
    const KEYS = 5000
    const DAY = 24 * HOUR
    // Every key with a rotation interval, none due; half were announced and then stopped being
    // active (rotated, revoked, ended) with their deadline passed. Before (found by a review), a
    // round read the fewer of the active keys with an interval and those notices, 2,500 each
    // here, and the notices grew with every rotation announced, kept for the audit retention.
    const keys = Array.from({ length: KEYS }, (_, i) => ({
      id: `r${String(i).padStart(5, '0')}`,
      status: 'active',
      created_at: new Date(T0.getTime() - (i % 50) * DAY),
      rotation_interval_s: 365 * 86_400,
      expires_at: null,
      grace_until: new Date(T0.getTime() + 100 * DAY),
    }))
    await insertKeys(store.db, keys)
    await insertNotices(
      store.db,
      keys.filter((_, i) => i % 2 === 1).map((k) => ({ key_id: k.id, kind: 'rotation', deadline: new Date(T0.getTime() - 5 * DAY) })),
    )
    // As the key service and the scheduler end them: rotated (grace to come), revoked, expired.
    await store.db.query(
      `UPDATE api_keys SET status = (ARRAY['rotating', 'revoked', 'expired'])[substr(id, 2)::int % 3 + 1],
         revoked_at = CASE WHEN substr(id, 2)::int % 3 = 1 THEN $1::timestamptz END
       WHERE substr(id, 2)::int % 2 = 1`,
      [new Date(T0.getTime() - 10 * DAY)],
    )
    const params = [T0, new Date(T0.getTime() + 3 * DAY), 1000]
    // With no statistics (the embedded store has no autovacuum, and keygate runs no ANALYZE), then with them.
    for (const analyzed of [false, true]) {
      if (analyzed) await store.db.query('ANALYZE api_keys, api_key_notices')
      t.same(await store.db.query(LOCK_DUE, params), [], 'nothing is due')
      const read = await rowsRead(store.db, params, ['api_keys', 'api_key_notices'])
      t.ok(read <= 50, `${analyzed ? 'with' : 'without'} statistics: ${read} key and notice rows read, of ${KEYS} keys and ${KEYS / 2} rotation notices passed`)
    }
  })
})

t.test('a rotation notice goes when its key stops being active, whichever way; what users see stays', async (t) => {
  await forEachStore(t, async (t, store) => {
    const DAY = 24 * HOUR
    const clock = testClock(T0)
    const s = testServices(store.db, { clock })
    const scheduler = new Scheduler({ db: store.db, keys: s.keys, audit: s.audit, log: silentLogger, now: clock.now, intervalS: 60, noticeMs: 3 * DAY, pruneRules: [] })
    const actor = { actor: 'test' }
    const made = await Promise.all(['rotated', 'forced', 'revoked', 'overdue', 'kept'].map((name) => s.keys.create({ name, type: 'service', rotation_interval_s: 10 * 86_400 }, actor)))
    const [rotated, forced, revoked, overdue, kept] = made.map((m) => m.record.id) as [string, string, string, string, string]
    clock.set(new Date(T0.getTime() + 8 * DAY))
    t.same((await scheduler.runOnce())?.announced.map((a) => a.keyId).sort(), [rotated, forced, revoked, overdue, kept].sort(), 'each is announced')
    const notices = async () => (await store.db.query<{ key_id: string }>(`SELECT key_id FROM api_key_notices WHERE kind = 'rotation' ORDER BY key_id`)).map((r) => r.key_id)
    t.same(await notices(), [rotated, forced, revoked, overdue, kept].sort(), 'and its notice recorded')
    // kept's deadline moved past overdue's, so only overdue's passes below.
    await store.db.query(`UPDATE api_key_notices SET deadline = deadline + interval '5 days' WHERE key_id = $1`, [kept])

    await s.keys.rotate(rotated, {}, actor)
    await s.keys.rotate(forced, { force: true }, actor)
    await s.keys.revoke(revoked, 'test', actor)
    clock.set(new Date(T0.getTime() + 11 * DAY + 1000))
    t.same((await scheduler.runOnce())?.rotationOverdue, [overdue], 'the deadline announced is enforced')
    t.same(await notices(), [kept], 'only the notice of the key still active is left')
    t.same(
      (await s.keys.expiring(30 * DAY)).items.map((e) => [e.key.id, e.reason, e.endsAt.toISOString()]),
      [[kept, 'rotation_overdue', new Date(T0.getTime() + 16 * DAY).toISOString()]],
      'the expiring report still gives the deadline announced for the key still active (the successor is not announced yet)',
    )
    // Whole: some() found a key.expiring row among any others, and a second went unseen (found by a review).
    const trails = async (ids: readonly string[]) => Promise.all(ids.map(async (id) => (await s.audit.list(store.db, { keyId: id })).map((r) => r.action)))
    t.same(
      await trails([rotated, forced, revoked, overdue]),
      [
        ['key.expired', 'key.rotated', 'key.expiring', 'key.created'],
        ['key.rotated', 'key.expiring', 'key.created'],
        ['key.revoked', 'key.expiring', 'key.created'],
        ['key.expired', 'key.expiring', 'key.created'],
      ],
      'the key.expiring audit row of each stays, one, under how it ended (the rotated key at the end of its grace)',
    )
  })
})

t.test('a batch that ends a key for its missed rotation locks and ends the keys it replaced with it, wherever their ids fall', async (t) => {
  await forEachStore(t, async (t, store) => {
    // A batch of one key: the newest of each lineage has the smallest id of it, so the keys it
    // replaced fall outside the batch's limit. Ended alone, its announced deadline (the notice
    // goes with it, migration 0024) no longer ended them in the next batch: they must be locked
    // and ended beside it.
    const keys = [
      { id: 'a-newest', status: 'active', created_at: new Date(T0.getTime() - 20 * HOUR), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: null },
      { id: 'b-middle', status: 'rotating', created_at: new Date(T0.getTime() - 30 * HOUR), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: new Date(T0.getTime() + 28 * HOUR), replaced_by: 'a-newest' },
      { id: 'c-oldest', status: 'rotating', created_at: new Date(T0.getTime() - 40 * HOUR), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: new Date(T0.getTime() + 18 * HOUR), replaced_by: 'b-middle' },
      { id: 'd-alone', status: 'active', created_at: new Date(T0.getTime() - 20 * HOUR), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: null },
    ]
    await insertKeys(store.db, keys)
    await insertNotices(store.db, ['a-newest', 'd-alone'].map((id) => ({ key_id: id, kind: 'rotation', deadline: new Date(T0.getTime() - HOUR) })))
    const s = testServices(store.db)
    const scheduler = new Scheduler({ db: store.db, keys: s.keys, audit: s.audit, log: silentLogger, now: () => T0, intervalS: 60, noticeMs: 0, batchSize: 1, pruneRules: [] })
    t.same((await scheduler.runOnce())?.rotationOverdue.sort(), ['a-newest', 'b-middle', 'c-oldest', 'd-alone'], 'every key of the lineage ends in the round')
    t.same(await store.db.query(`SELECT id, status FROM api_keys ORDER BY id`), keys.map((k) => ({ id: k.id, status: 'expired' })), 'and is marked expired')
  })
})

t.test('a batch that ends a replaced key for its successor\'s missed rotation locks and ends the keys before it too', async (t) => {
  await forEachStore(t, async (t, store) => {
    // Batches of one key, a lineage's middle key first by id: it ends by its successor's
    // deadline in a batch of its own. Before (found by a review), the keys it had replaced were
    // locked beside the newest key alone, so they were judged in a later batch, with the middle
    // key expired: their lineage no longer led to the deadline, and the oldest key of the first
    // lineage, whose grace has not ended, went on working; that of the second, whose grace ended
    // after the deadline, was ended for its grace, where the expiring report had said
    // rotation_overdue.
    const at = (hours: number) => new Date(T0.getTime() + hours * HOUR)
    const keys = [
      { id: 'a-middle', status: 'rotating', created_at: at(-30), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: at(28), replaced_by: 'b-newest' },
      { id: 'b-newest', status: 'active', created_at: at(-20), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: null },
      { id: 'c-oldest', status: 'rotating', created_at: at(-40), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: at(18), replaced_by: 'a-middle' },
      { id: 'd-middle', status: 'rotating', created_at: at(-30), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: at(28), replaced_by: 'e-newest' },
      { id: 'e-newest', status: 'active', created_at: at(-20), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: null },
      { id: 'f-oldest', status: 'rotating', created_at: at(-40), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: at(-0.5), replaced_by: 'd-middle' },
    ]
    await insertKeys(store.db, keys)
    await insertNotices(store.db, ['b-newest', 'e-newest'].map((id) => ({ key_id: id, kind: 'rotation', deadline: at(-1) })))
    const s = testServices(store.db)
    const due = await store.db.query<{ id: string; reason: string }>(`SELECT k.id, e.end_reason AS reason FROM ${KEY_ENDS_FROM} WHERE e.ends_at <= $1 ORDER BY k.id`, [T0])
    t.same(due, keys.map((k) => ({ id: k.id, reason: 'rotation_overdue' })), 'every key is due by the expiring report\'s reckoning, for its lineage\'s missed rotation')
    const scheduler = new Scheduler({ db: store.db, keys: s.keys, audit: s.audit, log: silentLogger, now: () => T0, intervalS: 60, noticeMs: 0, batchSize: 1, pruneRules: [] })
    const run = await scheduler.runOnce()
    t.same(run?.rotationOverdue.sort(), keys.map((k) => k.id), 'the round ends them all for it')
    t.same(await store.db.query(`SELECT id, status FROM api_keys ORDER BY id`), keys.map((k) => ({ id: k.id, status: 'expired' })), 'and marks them expired')
  })
})

t.test("a lineage's key ended by its own grace before the newest key's deadline: the keys before it still end with that deadline", async (t) => {
  await forEachStore(t, async (t, store) => {
    // Graces of different lengths in one lineage (a type's grace shortened in the configuration
    // between two rotations): the middle key's grace ends first, at 5 h, the newest key's
    // announced deadline is at 10 h, the oldest key's grace at 30 h. Before (found by a review),
    // the lineage walks stopped at the middle key once it had ended: the expiring report said the
    // oldest ended at 10 h, and the round at 10 h ended the newest key alone, the oldest working
    // on to 30 h.
    const at = (hours: number) => new Date(T0.getTime() + hours * HOUR)
    const keys = [
      { id: 'g-oldest', status: 'rotating', created_at: at(-40), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: at(30), replaced_by: 'h-middle' },
      { id: 'h-middle', status: 'rotating', created_at: at(-30), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: at(5), replaced_by: 'i-newest' },
      { id: 'i-newest', status: 'active', created_at: at(-20), rotation_interval_s: 10 * 3600, expires_at: null, grace_until: null },
    ]
    await insertKeys(store.db, keys)
    await insertNotices(store.db, [{ key_id: 'i-newest', kind: 'rotation', deadline: at(10) }])
    const s = testServices(store.db)
    let now = at(0)
    const scheduler = new Scheduler({ db: store.db, keys: s.keys, audit: s.audit, log: silentLogger, now: () => now, intervalS: 60, noticeMs: 0, pruneRules: [] })
    const ends = async () => store.db.query<{ id: string; reason: string }>(`SELECT k.id, e.end_reason AS reason, e.ends_at FROM ${KEY_ENDS_FROM} WHERE e.ends_at IS NOT NULL ORDER BY k.id`)
    t.same(await ends(), [
      { id: 'g-oldest', reason: 'rotation_overdue', ends_at: at(10) },
      { id: 'h-middle', reason: 'grace_ended', ends_at: at(5) },
      { id: 'i-newest', reason: 'rotation_overdue', ends_at: at(10) },
    ], 'the report: the middle key ends with its grace, the others at the deadline')
    now = at(5)
    t.same((await scheduler.runOnce())?.graceEnded, ['h-middle'], 'the round at 5 h ends the middle key for its grace')
    t.same(await ends(), [
      { id: 'g-oldest', reason: 'rotation_overdue', ends_at: at(10) },
      { id: 'i-newest', reason: 'rotation_overdue', ends_at: at(10) },
    ], 'and the report still gives the oldest the deadline, through the ended key')
    now = at(10)
    t.same((await scheduler.runOnce())?.rotationOverdue.sort(), ['g-oldest', 'i-newest'], 'the round at the deadline ends the oldest key with the newest')
  })
})

t.test('migration 0024 drops the rotation notices of the keys that stopped being active before it', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-migrations-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  for (const f of readdirSync(MIGRATIONS_DIR).filter((f) => f.endsWith('.sql') && f < '0024')) cpSync(join(MIGRATIONS_DIR, f), join(dir, f))
  await forEachStore(
    t,
    async (t, store) => {
      await migrate(store.db, dir)
      const keys = KEY_STATUSES.map((status) => ({ id: `m-${status}`, status, created_at: T0, rotation_interval_s: 86_400, expires_at: null, grace_until: T0 }))
      await insertKeys(store.db, keys)
      await insertNotices(store.db, keys.flatMap((k) => ['rotation', 'expiry'].map((kind) => ({ key_id: k.id, kind, deadline: T0 }))))
      t.same(await migrate(store.db), ['0024_rotation_notices_of_active_keys.sql'], 'applies 0024')
      t.same(
        await store.db.query(`SELECT key_id, kind FROM api_key_notices ORDER BY key_id, kind`),
        [
          { key_id: 'm-active', kind: 'expiry' },
          { key_id: 'm-active', kind: 'rotation' },
          { key_id: 'm-expired', kind: 'expiry' },
          { key_id: 'm-revoked', kind: 'expiry' },
          { key_id: 'm-rotating', kind: 'expiry' },
        ],
        'the active key keeps both; the others their expiry notices only',
      )
    },
    { migrated: false },
  )
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
