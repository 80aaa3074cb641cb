// A webhook with a large delivery log (written directly): deleted at once, its log removed
// afterwards in batches while key changes go on, and its log read page by page through the
// indexes of migration 0013. Before (found by a review): one DELETE cascaded through the whole
// log and, with 2,000,000 rows, ran past store.query_timeout_ms on every try, holding the
// webhook's row lock, which a key revocation queuing an event for it waited behind; and a page
// of the log, `status=failed` above all, sorted the whole log.
import t from 'tap'
import pg from 'pg'
import { openDb, type Db } from '../core/db.ts'
import { silentLogger } from '../core/log.ts'
import { WebhookService } from '../core/webhooks.ts'
import { startAdmin } from './helpers/admin.ts'
import { sleep } from './helpers/gateway.ts'
import { AuditCipher } from '../core/audit.ts'
import { DEFAULT_CONFIG, TEST_ENCRYPTION_KEY, forEachStore, openStore, planNodes, recordingDb, testServices } from './helpers/stores.ts'
import { defaultPruneRules, pruneBatch, Scheduler } from '../core/scheduler.ts'
import { startReceiver } from './helpers/webhooks.ts'

// The log of the delete: four batches of the purge. What makes the cleanup long is a row of it
// held by another transaction, not its length: the statement waiting for that row is under way
// however long the revocation takes. (It was 200,000 rows, 13 of the subtest's 18 s spent
// writing them and 5 purging them, for nothing the test checks.)
const ROWS = 20_000
// The log read page by page: long enough that the planner reads a page of one status through the
// index of a status by a clear margin. At 10,000 rows the whole log's index is a level shallower,
// and the planner read a page after a cursor through it with a filter (as cheap, there, but not
// the index the test names); at 20,000 the status index won by 8.4 to 10.2, at 50,000 by 8.4 to
// 15.5 (EXPLAIN's costs, PostgreSQL 15). It was 200,000 rows, 11 s of the subtest's 15 s.
const PAGED_ROWS = 50_000
const PAYLOAD = JSON.stringify({ type: 'rate_limit.exceeded', timestamp: '2026-12-01T00:00:00Z', data: { key_id: 'abcdefabcdef' } })

/** `n` delivered rows of `webhookId`, one a second back from now, as 30 days of a busy key's log would be. */
async function bigLog(db: Db, webhookId: string, n: number): Promise<void> {
  await db.query(
    `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, created_at, delivered_at, last_status, dedupe_key)
     SELECT 'msg_big_' || g, $1, 'rate_limit.exceeded', $2, 'delivered', 1, now() - g * interval '1 second', now(), 200, 'big:' || g
     FROM generate_series(1, $3::int) g`,
    [webhookId, PAYLOAD, n],
  )
}

t.test('deleted at once however long its log; the log removed in batches afterwards, holding up no key change', async (t) => {
  const store = await openStore(t, 'postgres')
  // A query timeout as serve has (the old cascading delete ran into it); long enough for the test's steps.
  const db = await openDb({ databaseUrl: store.url as string, queryTimeoutMs: 20_000 })
  t.teardown(() => db.close())
  const h = await startAdmin(t, db, { config: { webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 600_000 } } })
  const receiver = await startReceiver(t)
  const id = (await h.call('POST', '/v1/webhooks', { body: { url: `${receiver.url}/big`, events: ['key.revoked', 'rate_limit.exceeded'] } })).json.id as string
  const other = (await h.call('POST', '/v1/webhooks', { body: { url: `${receiver.url}/other`, events: ['key.revoked'] } })).json.id as string
  await bigLog(db, id, ROWS)
  const key = (await h.call('POST', '/v1/keys', { body: { name: 'revoked during the cleanup', type: 'user' } })).json.id as string
  // The round the key's creation kicked ends first: it ran on its own, and one slow to start (a
  // loaded machine) found the rows below due and sent some (a CI run, 9 of the 20).
  await h.webhooks.idle()
  // And some still to be sent, due now (no round before the delete: the loop runs on kicks
  // only, as a key change makes, and the key above was made before these).
  await db.query(
    `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, next_attempt_at) SELECT 'msg_due_' || g, $1, 'rate_limit.exceeded', $2, 'pending', now() FROM generate_series(1, 20) g`,
    [id, PAYLOAD],
  )

  // A row of the log held by another transaction: the cleanup cannot get past it, so it is
  // still under way while the revocation below runs.
  const holder = new pg.Client({ connectionString: store.url })
  await holder.connect()
  t.teardown(() => holder.end())
  const holderPid = (await holder.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid
  await holder.query('BEGIN')
  await holder.query(`SELECT id FROM webhook_deliveries WHERE webhook_id = $1 AND id = $2 FOR UPDATE`, [id, `msg_big_${ROWS / 2}`])

  const deleted = await h.call('DELETE', `/v1/webhooks/${id}`)
  t.equal(deleted.status, 200, 'the delete answers, though a row of its log is locked')
  t.equal(deleted.json.id, id)
  t.equal((await h.call('GET', `/v1/webhooks/${id}`)).status, 404, 'the webhook is gone')
  t.same((await h.call('GET', '/v1/webhooks')).json.items.map((w: any) => w.id), [other], 'and not listed')
  t.equal((await h.call('GET', `/v1/webhooks/${id}/deliveries`)).json.error.code, 'webhook_not_found')
  t.equal((await h.call('PATCH', `/v1/webhooks/${id}`, { body: { enabled: true } })).json.error.code, 'webhook_not_found', 'nor can it be enabled again')
  t.equal((await h.call('POST', `/v1/webhooks/${id}/rotate-secret`)).status, 404)
  t.equal((await h.call('DELETE', `/v1/webhooks/${id}`)).status, 404, 'deleted once')

  // The cleanup, stopped at the held row.
  const blockedBy = async (pid: number) => (await holder.query<{ pid: number }>('SELECT pid FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))', [pid])).rows.map((r) => r.pid)
  const purging = h.webhooks.purgeDeleted()
  let cleaner: number[] = []
  while ((cleaner = await blockedBy(holderPid)).length === 0) await sleep(10)
  t.equal(cleaner.length, 1, 'the cleanup waits for the held row')

  const revoked = await h.call('POST', `/v1/keys/${key}/revoke`, { body: { reason: 'during the cleanup' } })
  t.equal(revoked.status, 200, 'a revocation whose event the webhook took goes through')
  t.same(await blockedBy(holderPid), cleaner, 'while the cleanup is still under way: nothing it holds was waited for')
  t.same(await blockedBy(cleaner[0]!), [], 'and nothing waits for the cleanup')
  const queued = await db.query<{ webhook_id: string }>("SELECT webhook_id FROM webhook_deliveries WHERE event_type = 'key.revoked'")
  t.same(queued.map((r) => r.webhook_id), [other], 'its key.revoked is queued for the webhook that stays only')

  await holder.query('COMMIT')
  const removed = await purging
  t.equal(removed, ROWS + 20 + 1, 'every row of the log, and the webhook')
  t.same(await db.query('SELECT id FROM webhook_deliveries WHERE webhook_id = $1', [id]), [], 'its log is gone')
  t.same(await db.query('SELECT id FROM webhooks WHERE id = $1', [id]), [], 'and so is its row')

  h.webhooks.kick()
  await h.webhooks.idle()
  await receiver.waitFor((hk) => hk.path === '/other')
  t.same(receiver.received.map((hk) => hk.path), ['/other'], 'nothing was sent to the deleted webhook, its pending deliveries included')
})

t.test('a purge stopped midway goes on in the next round (another process: the state is in the store)', async (t) => {
  const store = await openStore(t, 'postgres')
  const h = await startAdmin(t, store.db, { config: { webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 600_000 } } })
  const id = (await h.call('POST', '/v1/webhooks', { body: { url: 'http://127.0.0.1:9/x', events: ['key.revoked'] } })).json.id as string
  await bigLog(store.db, id, 12_000)
  t.equal((await h.call('DELETE', `/v1/webhooks/${id}`)).status, 200)
  let statements = 0
  t.equal(await h.webhooks.purgeDeleted(() => ++statements > 1), 5000, 'a stop ends it after the batch it is on')
  t.equal((await h.call('GET', `/v1/webhooks/${id}`)).status, 404, 'the webhook stays gone meanwhile')
  const later = new WebhookService({ db: store.db, cipher: new AuditCipher(TEST_ENCRYPTION_KEY), config: DEFAULT_CONFIG.webhooks, log: silentLogger, deliver: false })
  t.equal(await later.purgeDeleted(), 7000 + 1, 'another service removes the rest, and the webhook')
  t.same(await store.db.query('SELECT 1 FROM webhook_deliveries'), [])
})

t.test('the delivery log is paged through its indexes, a status too, every row once across a shared millisecond', async (t) => {
  const store = await openStore(t, 'postgres')
  const seen: Array<{ sql: string; params: unknown[] }> = []
  // The service's own statements, recorded to be explained on the same store.
  const recording = recordingDb(store.db, seen)
  const webhooks = new WebhookService({ db: recording, cipher: new AuditCipher(TEST_ENCRYPTION_KEY), config: { ...DEFAULT_CONFIG.webhooks, allow_private: ['127.0.0.1/32'] }, log: silentLogger, deliver: false })
  const { webhook } = await webhooks.create({ url: 'http://127.0.0.1:9/log', events: ['rate_limit.exceeded'] }, { actor: 'test' })
  await bigLog(store.db, webhook.id, PAGED_ROWS)
  // 30 failed ones within one millisecond (microseconds apart, as the store's now() writes them).
  await store.db.query(
    `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, created_at, last_status, last_error)
     SELECT 'msg_failed_' || lpad(g::text, 2, '0'), $1, 'rate_limit.exceeded', $2, 'failed', 8, '2026-11-30T12:00:00.123Z'::timestamptz + g * interval '10 microseconds', 500, 'the receiver answered 500'
     FROM generate_series(1, 30) g`,
    [webhook.id, PAYLOAD],
  )
  await store.db.query('ANALYZE webhook_deliveries')

  const walk = async (status?: 'failed') => {
    const ids: string[] = []
    let cursor: string | undefined
    do {
      const page = await webhooks.deliveries(webhook.id, { limit: 7, ...(status ? { status } : {}), ...(cursor ? { cursor } : {}) })
      ids.push(...page.items.map((d) => d.id))
      cursor = page.nextCursor ?? undefined
    } while (cursor && ids.length < 40)
    return ids
  }
  seen.length = 0
  const failed = await walk('failed')
  t.same(failed, Array.from({ length: 30 }, (_, i) => `msg_failed_${String(30 - i).padStart(2, '0')}`), 'each failed delivery once, newest first (by id within the millisecond)')
  const logQueries = seen.filter((q) => q.sql.includes('FROM webhook_deliveries WHERE webhook_id'))
  t.equal(logQueries.length, 5, 'five pages')
  for (const [i, q] of logQueries.entries()) {
    const [plan] = await store.db.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (FORMAT JSON) ${q.sql}`, q.params)
    const text = JSON.stringify(plan?.['QUERY PLAN'])
    t.match(text, /"Index Name":"webhook_deliveries_log_status_idx"/, `page ${i + 1} of status=failed: read through the index of a status`)
    t.notMatch(text, /"Node Type":"(Sort|Incremental Sort)"/, `page ${i + 1}: in its order, without sorting`)
  }

  seen.length = 0
  const newest = await webhooks.deliveries(webhook.id, { limit: 5 })
  const next = await webhooks.deliveries(webhook.id, { limit: 5, cursor: newest.nextCursor as string })
  t.same([...newest.items, ...next.items].map((d) => d.id), Array.from({ length: 10 }, (_, i) => `msg_big_${i + 1}`), 'the whole log, newest first')
  const wholeLog = seen.filter((q) => q.sql.includes('FROM webhook_deliveries WHERE webhook_id'))
  t.equal(wholeLog.length, 2, 'two pages')
  for (const q of wholeLog) {
    const [plan] = await store.db.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (FORMAT JSON) ${q.sql}`, q.params)
    const text = JSON.stringify(plan?.['QUERY PLAN'])
    t.match(text, /"Index Name":"webhook_deliveries_log_idx"/, 'the whole log: read through its index')
    t.notMatch(text, /"Node Type":"(Sort|Incremental Sort)"/, 'without sorting')
  }
})

t.test('on both stores: a deleted webhook is gone at once, and its log once the purge has run', async (t) => {
  await forEachStore(t, async (t, store) => {
    const h = await startAdmin(t, store.db, { config: { webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 600_000 } } })
    const id = (await h.call('POST', '/v1/webhooks', { body: { url: 'http://127.0.0.1:9/both', events: ['key.revoked'] } })).json.id as string
    await bigLog(store.db, id, 6000)
    t.equal((await h.call('DELETE', `/v1/webhooks/${id}`)).status, 200)
    t.equal((await h.call('GET', `/v1/webhooks/${id}`)).status, 404)
    t.same((await h.call('GET', '/v1/webhooks')).json.items, [])
    const key = (await h.call('POST', '/v1/keys', { body: { name: 'after the delete', type: 'user' } })).json.id as string
    t.equal((await h.call('POST', `/v1/keys/${key}/revoke`, { body: {} })).status, 200)
    t.same(await store.db.query("SELECT 1 FROM webhook_deliveries WHERE event_type = 'key.revoked'"), [], 'no delivery queued for it')
    t.equal(await h.webhooks.purgeDeleted(), 6001)
    t.same(await store.db.query('SELECT 1 FROM webhook_deliveries'), [])
    t.same(await store.db.query('SELECT 1 FROM webhooks'), [])
  })
})

t.test('on both stores: the scheduler prunes the log through its index, webhook by webhook, keeping what is pending', async (t) => {
  // Before (found by a review): the prune looked rows up by created_at, which no index leads
  // with, so every round read the whole log, most often to find nothing to prune.
  await forEachStore(t, async (t, store) => {
    const s = testServices(store.db)
    const statements: Array<{ sql: string; params: unknown[] }> = []
    const recording = recordingDb(store.db, statements)
    const now = new Date()
    const rules = defaultPruneRules({ auditDays: 365, anomalyDays: 90, webhookDeliveryDays: 30, usageDays: 400 }).filter((r) => r.table === 'webhook_deliveries')
    const scheduler = new Scheduler({ db: recording, keys: s.keys, audit: s.audit, log: silentLogger, now: () => now, intervalS: 60, noticeMs: 86_400_000, pruneRules: rules })
    for (const id of ['wh_prune_a', 'wh_prune_b']) {
      await store.db.query(`INSERT INTO webhooks (id, url, events, sealed_secret, created_by) VALUES ($1, 'http://127.0.0.1:9/p', ARRAY['rate_limit.exceeded'], 'x', 'test')`, [id])
      await bigLog(store.db, id, ROWS / 2)
      await store.db.query(`UPDATE webhook_deliveries SET id = id || $1, dedupe_key = dedupe_key || $1 WHERE webhook_id = $2`, [id.slice(-2), id])
    }
    // Of each webhook, its 3,000 newest moved past the retention (more than one batch in all), and one of them still pending.
    await store.db.query(`UPDATE webhook_deliveries SET created_at = created_at - interval '31 days' WHERE split_part(id, '_', 3)::int <= 3000`)
    await store.db.query(`UPDATE webhook_deliveries SET status = 'pending' WHERE id = 'msg_big_1_a'`)
    await store.db.query('ANALYZE webhook_deliveries')
    const run = await scheduler.runOnce()
    t.equal(run?.pruned.webhook_deliveries, 6000 - 1, 'the delivered ones past the retention are pruned')
    t.same(await store.db.query("SELECT id, status FROM webhook_deliveries WHERE created_at < now() - interval '30 days'"), [{ id: 'msg_big_1_a', status: 'pending' }], 'the pending one is kept')
    t.equal((await store.db.query<{ n: number }>('SELECT count(*)::int AS n FROM webhook_deliveries'))[0]?.n, ROWS - 6000 + 1, 'and every newer one')
    const prunes = () => statements.filter((q) => q.sql.includes('DELETE FROM "webhook_deliveries"'))
    // 5,999 rows: on PostgreSQL a batch of 5,000 and one that finds fewer; on the embedded store
    // five of 1,000 and one of 999 (pruneBatch).
    t.equal(prunes().length, Math.floor(5999 / pruneBatch(store.db.kind)) + 1, 'full batches, and one that finds fewer than a batch')
    // What nearly every round finds: nothing to prune. Its statement must not read the whole log.
    await store.db.query('ANALYZE webhook_deliveries')
    statements.length = 0
    t.equal((await scheduler.runOnce())?.pruned.webhook_deliveries, 0, 'a round with nothing to prune')
    t.equal(prunes().length, 1)
    for (const q of prunes()) {
      const [plan] = await store.db.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (FORMAT JSON) ${q.sql}`, q.params)
      const text = JSON.stringify(plan?.['QUERY PLAN'])
      t.match(text, /"Index Name":"webhook_deliveries_log_idx"/, 'read through the log index')
      const scans = planNodes(plan?.['QUERY PLAN']).filter((n) => n['Node Type'] === 'Seq Scan').map((n) => n['Relation Name'])
      t.notOk(scans.includes('webhook_deliveries'), 'not by reading the whole log')
    }
  })
})
