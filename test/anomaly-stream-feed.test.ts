// Several instances on one PostgreSQL, without Redis: an admin's anomaly stream carries every
// instance's findings live, read from `api_key_anomalies` while a stream is open (core/anomalies.ts,
// AnomalyFeed). Before, a stream sent only its own process's findings: another instance's reached
// the client only after a reconnect with Last-Event-ID, and a resume could skip it for good.
import t from 'tap'
import { openDb, type Queryable } from '../core/db.ts'
import { startAdmin, type SseEvent, type SseStream } from './helpers/admin.ts'
import { sleep } from './helpers/gateway.ts'
import { openStore } from './helpers/stores.ts'

/** The stream's next event, or undefined when none comes within `ms` (the test fails rather than hangs). */
async function nextWithin(s: SseStream, ms: number): Promise<SseEvent | undefined> {
  let timer: NodeJS.Timeout | undefined
  const none = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), ms)))
  try {
    return await Promise.race([s.next(), none])
  } finally {
    clearTimeout(timer)
  }
}

const store = await openStore(t, 'postgres')
// Instance A serves the admin API and its stream; instance B a gateway with its detector, over a
// connection pool of its own. Neither has Redis.
const a = await startAdmin(t, store.db)
const dbB = await openDb({ databaseUrl: store.url as string })
t.teardown(() => dbB.close())
const b = await startAdmin(t, dbB, {
  gateway: true,
  config: { gateway: { trusted_proxies: ['127.0.0.1/32'] }, anomalies: { check_interval_ms: 100, distinct_addresses_per_hour: 2 } },
})

t.test("another instance's finding arrives on an open stream, once, without a reconnect", async (t) => {
  const s = await a.stream('/v1/anomalies/stream')
  t.teardown(() => s.close())
  t.equal(s.status, 200)
  const key = await b.keys.create({ name: 'seen by b', type: 'service', scopes: [] }, { actor: 'test' })
  for (const address of ['198.51.100.1', '198.51.100.2', '198.51.100.3']) {
    const r = await b.through('/x', { authorization: `Bearer ${key.key}`, 'x-forwarded-for': address })
    t.equal(r.status, 200, `a request from ${address} through B`)
  }
  const event = await nextWithin(s, 10_000)
  t.ok(event, "B's finding reached the stream open on A (before, it never did without a reconnect)")
  const data = JSON.parse(event?.data ?? '{}')
  t.match(data, { key_id: key.record.id, type: 'distinct_addresses', details: { addresses: 3 } })
  const [row] = (await a.call('GET', `/v1/anomalies?key_id=${key.record.id}`)).json.items
  t.same(data, row, 'the stored row, as the list gives it')
  t.equal(event?.id, row.id)
  // Several reads of the table later: it was sent once.
  await sleep(2500)
  t.same(s.buffered(), [], 'once')
})

t.test("another instance's finding committed after a higher id the stream sent is still sent, once", async (t) => {
  const s = await a.stream('/v1/anomalies/stream')
  t.teardown(() => s.close())
  const key = await b.keys.create({ name: 'late', type: 'service', scopes: [] }, { actor: 'test' })
  const insert = (db: Queryable, type: string) =>
    db.query<{ id: string }>(`INSERT INTO api_key_anomalies (key_id, type, window_start) VALUES ($1, $2, now()) RETURNING id::text AS id`, [key.record.id, type])
  // B takes an id in an insert it has not committed yet...
  let commit: () => void = () => {}
  const committed = new Promise<void>((resolve) => (commit = resolve))
  let lateId = ''
  const late = dbB.transaction(async (tx) => {
    lateId = (await insert(tx, 'error_rate'))[0]?.id as string
    await committed
  })
  while (lateId === '') await sleep(5)
  // ...while another instance's higher one is committed and streamed.
  const [after] = await insert(store.db, 'request_rate')
  const first = await nextWithin(s, 10_000)
  t.equal(first?.id, after?.id, 'the higher one first')
  commit()
  await late
  const second = await nextWithin(s, 10_000)
  t.equal(second?.id, lateId, 'then the one committed late')
  await sleep(2500)
  t.same(s.buffered(), [], 'each once')
})
