// The usage recorder on both stores: counts per key and hour, rejections by code, flushes that
// add up across recorders, last_used_at, and a failed flush keeping its counts for the next one;
// on PostgreSQL, a flush larger than one statement's batch.
import t from 'tap'
import { openDb } from '../core/db.ts'
import { silentLogger } from '../core/log.ts'
import { migrate } from '../core/migrate.ts'
import { UsageRecorder, UsageReports, BUCKET_MS, FLUSH_BATCH } from '../core/usage.ts'
import { forEachStore, freshDatabase, testServices, T0 } from './helpers/stores.ts'
import { gateInFront } from './helpers/tcp-gate.ts'

await forEachStore(t, async (t, store) => {
  const { keys } = testServices(store.db)
  const a = await keys.create({ name: 'a', type: 'user' }, { actor: 'test' })
  const b = await keys.create({ name: 'b', type: 'service' }, { actor: 'test' })
  const reports = new UsageReports(store.db)
  const at = T0.getTime() + 10 * BUCKET_MS
  const range = { from: new Date(at), to: new Date(at + 3 * BUCKET_MS) }

  await t.test('counts, flushes, adds up', async (t) => {
    const one = new UsageRecorder({ db: store.db })
    const two = new UsageRecorder({ db: store.db })
    for (let i = 0; i < 3; i++) one.count(a.record.id, 'forwarded', at + 1000 + i)
    one.count(a.record.id, 'rate_limited', at + 2000)
    one.count(a.record.id, 'forwarded', at + BUCKET_MS + 5)
    one.count(undefined, 'key_invalid', at + 10)
    two.count(b.record.id, 'forwarded', at + 50)
    two.count(undefined, 'key_invalid', at + BUCKET_MS)
    two.count(undefined, 'key_missing', at + BUCKET_MS)
    await Promise.all([one.flush(), two.flush()])
    await one.flush()
    t.same(await reports.byKey(range), [
      { keyId: a.record.id, name: 'a', type: 'user', requests: 5, rejected: 1 },
      { keyId: b.record.id, name: 'b', type: 'service', requests: 1, rejected: 0 },
    ])
    t.same((await reports.buckets(a.record.id, range)).map((x) => [x.start.getTime(), x.requests, x.rejected]), [
      [at, 4, 1],
      [at + BUCKET_MS, 1, 0],
    ], 'hourly buckets')
    t.same(await reports.rejections(range), [
      { reason: 'key_invalid', count: 2 },
      { reason: 'key_missing', count: 1 },
      { reason: 'rate_limited', count: 1 },
    ], 'by count, then by code')
    t.equal((await keys.get(a.record.id)).lastUsedAt?.getTime(), at + BUCKET_MS + 5, 'last_used_at is the latest request flushed')
    one.count(a.record.id, 'forwarded', at + 7)
    await one.close()
    t.equal((await reports.byKey(range, { keyId: a.record.id }))[0]?.requests, 6, 'close flushes; counts add to the same rows')
    t.same(await reports.byKey({ from: new Date(at + 2 * BUCKET_MS), to: new Date(at + 3 * BUCKET_MS) }), [], 'nothing outside the range')
    t.equal((await reports.byKey({ from: new Date(at + BUCKET_MS - 1), to: new Date(at + BUCKET_MS + 1) }))[0]?.requests, 6, 'every hour the range touches counts, the one holding from included')
    t.equal((await reports.byKey({ from: new Date(at + 1), to: new Date(at + BUCKET_MS) }))[0]?.requests, 5, 'the hour starting at to is not')
  })

  await t.test('close writes what was counted while a flush was running', async (t) => {
    // A store slow to commit, as a busy one is: the timer's flush is still running at shutdown.
    const slow = new Proxy(store.db, {
      get(target, prop) {
        if (prop === 'transaction') return async (fn: Parameters<typeof target.transaction>[0]) => (await new Promise((r) => setTimeout(r, 200)), target.transaction(fn))
        const v = Reflect.get(target, prop) as unknown
        return typeof v === 'function' ? v.bind(target) : v
      },
    })
    const r = new UsageRecorder({ db: slow })
    const when = at + 30 * BUCKET_MS
    r.count(a.record.id, 'forwarded', when + 1)
    const running = r.flush()
    // A request that finished while the server drained, after the running flush took its counts.
    r.count(a.record.id, 'forwarded', when + 2)
    await r.close()
    await running
    // Before: close shared the running flush, and the second count was never written.
    t.equal((await reports.byKey({ from: new Date(when), to: new Date(when + BUCKET_MS) }))[0]?.requests, 2)
  })

  await t.test('a failed flush keeps its counts', async (t) => {
    const r = new UsageRecorder({ db: store.db })
    const later = at + 20 * BUCKET_MS
    const window = { from: new Date(later), to: new Date(later + BUCKET_MS) }
    r.count(b.record.id, 'forwarded', later)
    await store.db.exec('ALTER TABLE api_key_usage RENAME TO api_key_usage_away')
    await r.flush()
    r.count(b.record.id, 'forwarded', later + 1)
    await store.db.exec('ALTER TABLE api_key_usage_away RENAME TO api_key_usage')
    t.same(await reports.byKey(window), [], 'nothing was written')
    await r.flush()
    t.equal((await reports.byKey(window))[0]?.requests, 2, 'the next flush writes both counts')
  })

  await t.test('counts that cannot be written at close are said to be lost, with how many', async (t) => {
    const errors: Array<{ message: string; fields: unknown }> = []
    const r = new UsageRecorder({ db: store.db, log: { ...silentLogger, error: (message: string, fields?: unknown) => void errors.push({ message, fields }) } })
    const later = at + 30 * BUCKET_MS
    r.count(b.record.id, 'forwarded', later)
    r.count(b.record.id, 'rate_limited', later)
    await store.db.exec('ALTER TABLE api_key_usage RENAME TO api_key_usage_away')
    await r.close()
    await store.db.exec('ALTER TABLE api_key_usage_away RENAME TO api_key_usage')
    // Before: only "keeping them for the next flush", which never came.
    t.equal(errors.length, 1, 'one error')
    t.match(errors, [{ message: /could not write the last usage counts at shutdown: they are lost/, fields: { keys: 1, requests: 2, rejected: 1 } }])
  })
})

t.test('PostgreSQL: a flush of more keys than one statement takes writes them all, FLUSH_BATCH rows to a statement', async (t) => {
  const url = await freshDatabase(t)
  const { gate, url: through } = await gateInFront(t, url)
  const db = await openDb({ databaseUrl: through, poolMax: 1, queryTimeoutMs: 5000 })
  t.teardown(() => db.close())
  await migrate(db)
  // After a long store outage, say: before, all of it went in one statement, which outgrew the
  // query timeout, failed, and grew again at every retry.
  const keysPending = 2 * FLUSH_BATCH + 1
  const recorder = new UsageRecorder({ db })
  const at = T0.getTime()
  for (let i = 0; i < keysPending; i++) recorder.count(`key${i}`, i % 2 ? 'forwarded' : 'rate_limited', at)
  await recorder.flush()
  const [stored] = await db.query<{ rows: number; requests: number; rejected: number }>(`SELECT count(*)::int AS rows, sum(requests)::int AS requests, sum(rejected)::int AS rejected FROM api_key_usage`)
  t.same(stored, { rows: keysPending, requests: keysPending, rejected: FLUSH_BATCH + 1 }, 'every count written once')
  t.equal(gate.sent().split('INSERT INTO api_key_usage').length - 1, 3, `${keysPending} rows in three statements`)
})

t.test('PostgreSQL: two instances flushing the same keys at once, counted in opposite orders, do not deadlock', async (t) => {
  const url = await freshDatabase(t)
  const [one, two] = [await openDb({ databaseUrl: url, poolMax: 1 }), await openDb({ databaseUrl: url, poolMax: 1 })] as const
  t.teardown(() => Promise.all([one.close(), two.close()]))
  await migrate(one)
  const { keys } = testServices(one)
  const real: string[] = []
  for (let i = 0; i < 20; i++) real.push((await keys.create({ name: `used-${i}`, type: 'user' }, { actor: 'test' })).record.id)
  const ids = [...real, ...Array.from({ length: 300 }, (_, i) => `gone-key-${String(i).padStart(4, '0')}`)]
  const failures: string[] = []
  const log = { ...silentLogger, warn: (msg: string) => void failures.push(msg) }
  // Each instance counts the keys in the order its traffic used them: here, opposite orders.
  const [a, b] = [new UsageRecorder({ db: one, log }), new UsageRecorder({ db: two, log })]
  const rounds = 10
  for (let round = 0; round < rounds; round++) {
    const now = T0.getTime() + round * 1000
    for (const id of ids) a.count(id, 'forwarded', now)
    for (const id of [...ids].reverse()) b.count(id, 'rate_limited', now)
    await Promise.all([a.flush(), b.flush()])
  }
  // Before, most rounds ended in "deadlock detected" (40P01) for one of the two.
  t.same(failures, [], 'no flush failed')
  const [stored] = await one.query<{ requests: number; rejected: number }>('SELECT sum(requests)::int AS requests, sum(rejected)::int AS rejected FROM api_key_usage')
  t.same(stored, { requests: 2 * rounds * ids.length, rejected: rounds * ids.length }, 'every count written once')
  const used = await one.query<{ n: number }>('SELECT count(*)::int AS n FROM api_keys WHERE last_used_at IS NOT NULL')
  t.equal(used[0]?.n, real.length, 'last_used_at set on every real key')
})
