// Several instances on one PostgreSQL, without Redis: an admin's anomaly stream carries every
// instance's findings live, read from `api_key_anomalies` while a stream is open (core/anomalies.ts,
// AnomalyFeed). Before, a stream sent only its own process's findings: another instance's reached
// the client only after a reconnect with Last-Event-ID, and a resume could skip it for good. The
// instance's own findings are read from the table too, when their event comes: in id order with
// the others', none lost to a failed read or to a stream that was opening.
import t, { type Test } from 'tap'
import { AnomalyFeed, AnomalyLog, anomalyHistory, anomalyJson, type Anomaly, type AnomalyJson } from '../core/anomalies.ts'
import { openDb, type Queryable } from '../core/db.ts'
import { EventBus } from '../core/events.ts'
import { silentLogger } from '../core/log.ts'
import { migrate } from '../core/migrate.ts'
import { nextWithin, startAdmin } from './helpers/admin.ts'
import { sleep } from './helpers/gateway.ts'
import { memoryDb, openStore, watchedDb } from './helpers/stores.ts'

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

t.test("an instance's own finding does not overtake another instance's lower id: the stream is in id order, and a resume between the two skips nothing", async (t) => {
  // Instance C reads the table on its own only once a minute: what its stream gets within the
  // test comes from the read its own finding starts.
  const c = await startAdmin(t, store.db, { config: { admin: { stream_poll_ms: 60_000 } } })
  const s = await c.stream('/v1/anomalies/stream')
  t.teardown(() => s.close())
  t.equal(s.status, 200)
  const key = await b.keys.create({ name: 'both', type: 'service', scopes: [] }, { actor: 'test' })
  // B takes the lower id in an insert it has not committed yet...
  let commit: () => void = () => {}
  const committed = new Promise<void>((resolve) => (commit = resolve))
  let lowerId = ''
  const late = dbB.transaction(async (tx) => {
    lowerId = (await tx.query<{ id: string }>(`INSERT INTO api_key_anomalies (key_id, type, window_start) VALUES ($1, 'error_rate', now()) RETURNING id::text AS id`, [key.record.id]))[0]?.id as string
    await committed
  })
  while (lowerId === '') await sleep(5)
  // ...C records its own, with the higher id, as its detector does (the row, then the event on
  // its bus), and B's commits in between.
  const own = (await new AnomalyLog(c.db).insert({ keyId: key.record.id, type: 'request_rate', windowStart: new Date(), details: {}, detectedAt: new Date() })) as Anomaly
  t.ok(BigInt(own.id) > BigInt(lowerId), 'the own finding has the higher id')
  commit()
  await late
  c.events.emit('anomaly.detected', anomalyJson(own))
  const first = await nextWithin(s, 10_000)
  const second = await nextWithin(s, 10_000)
  // Before, the own one was sent at once and B's at C's next poll: 1216, then 1215.
  t.same([first?.id, second?.id], [lowerId, own.id], 'in id order')
  // A client that got the first and reconnects with its id gets the second (before, one that
  // got the own one first and resumed from it never got B's).
  s.close()
  const resumed = await c.stream('/v1/anomalies/stream', { headers: { 'last-event-id': first?.id ?? '0' } })
  t.teardown(() => resumed.close())
  t.same([first?.id, (await nextWithin(resumed, 10_000))?.id], [lowerId, own.id], 'the resume gets the other one')
  await sleep(500)
  t.same(resumed.buffered(), [], 'and nothing more')
})

/**
 * A feed without Redis over an embedded store, as an admin instance's: its history reads through
 * `reads` (watchedDb), the detector's rows are written directly. Until `ready()` is called, no
 * stream is open.
 */
async function feedWithoutRedis(t: Test) {
  const db = await memoryDb({ migrated: true })
  t.teardown(() => db.close())
  await migrate(db)
  const { w: reads, wrap } = watchedDb()
  const events = new EventBus()
  // Reads of its own every 100 ms (the least admin.stream_poll_ms allows): the next after a failed one.
  const feed = new AnomalyFeed({ channel: '', events, log: silentLogger, history: anomalyHistory(new AnomalyLog(wrap(db))), pollMs: 100 })
  t.teardown(() => feed.close())
  const got: AnomalyJson[] = []
  const log = new AnomalyLog(db)
  let n = 0
  /** Recorded as the detector records: the row (committed), then its event on the bus. */
  const record = async (emit = true) => {
    const row = (await log.insert({ keyId: `k_${++n}`, type: 'request_rate', windowStart: new Date(0), details: { n }, detectedAt: new Date() })) as Anomaly
    if (emit) events.emit('anomaly.detected', anomalyJson(row))
    return anomalyJson(row)
  }
  const until = async (what: string, ok: () => boolean) => {
    for (let i = 0; i < 500 && !ok(); i++) await sleep(20)
    t.ok(ok(), what)
  }
  return { feed, events, got, reads, record, until }
}

t.test('without Redis, a finding of this instance is streamed from the table: a read that fails leaves it to the next, and a burst of them is one read at a time, in id order', async (t) => {
  const { feed, events, got, reads, record, until } = await feedWithoutRedis(t)
  await feed.ready()
  feed.on((a) => got.push(a))
  // An event whose anomaly has no row names nothing recorded: not streamed (its id, as clients'
  // Last-Event-ID, would hide the lower ids recorded after it).
  const before = reads.reads
  events.emit('anomaly.detected', { id: '999999', key_id: 'K', type: 'request_rate', details: {} })
  await until('the event had the table read', () => reads.reads > before && reads.inFlight === 0)
  t.same(got, [], 'an event with no row is not streamed')
  const first = await record()
  await until('a recorded one arrives', () => got.length > 0)
  t.same(got, [first], 'the row, as the table has it')

  reads.down = true
  const failed = reads.reads
  const second = await record()
  await until('the read it started failed', () => reads.reads > failed)
  t.same(got, [first], 'not streamed while the table cannot be read')
  reads.down = false
  await until('read by a later poll', () => got.length > 1)
  t.same(got, [first, second], 'then read, once')

  const rows = []
  for (let i = 0; i < 50; i++) rows.push(await record(false))
  reads.most = 0
  for (const row of rows) events.emit('anomaly.detected', row)
  await until('all of the burst arrives', () => got.length === 52)
  t.same(got.slice(2), rows, 'in id order, each once')
  t.equal(reads.most, 1, 'one read at a time')
})

t.test('without Redis, a finding recorded while a stream begins (the feed still reading where the table is) arrives once', async (t) => {
  const { feed, got, reads, record, until } = await feedWithoutRedis(t)
  // Where the table is, read before the finding commits, answers only after its event came.
  let answer: () => void = () => {}
  reads.held = new Promise<void>((resolve) => (answer = resolve))
  const started = reads.reads
  const ready = feed.ready()
  await until('the feed reads where the table is', () => reads.reads > started)
  const own = await record()
  answer()
  // A stream listens once ready() has settled (admin/routes/anomalies-stream.ts). Before, the
  // event, delivered from the bus to no listener yet, was marked as sent, and the table's read
  // then skipped the row: the stream never got it.
  await ready
  feed.on((a) => got.push(a))
  await until('it arrives', () => got.length > 0)
  await sleep(500)
  t.same(got, [own], 'once')
})
