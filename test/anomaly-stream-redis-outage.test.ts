// With Redis, an admin instance's anomaly stream while its subscription to the anomaly channel is
// down: the findings are still recorded, and the stream reads them from api_key_anomalies as an
// instance without Redis does (core/anomalies.ts, AnomalyFeed); once the subscription is back the
// channel carries them again, with none lost or sent twice across either switch. Before (found by
// a review), the stream went quiet for the whole outage and got them only once Redis was back.
// A Redis server of the test's own, stopped and started; PostgreSQL, so an insert can stay open.
import t from 'tap'
import { Redis } from 'ioredis'
import { AnomalyLog, anomalyJson, type Anomaly } from '../core/anomalies.ts'
import { openDb } from '../core/db.ts'
import { silentLogger } from '../core/log.ts'
import { connectRedis } from '../core/redis.ts'
import { nextWithin, startAdmin, type SseEvent, type SseStream } from './helpers/admin.ts'
import { sleep } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import { openStore, watchedDb } from './helpers/stores.ts'

const store = await openStore(t, 'postgres')
const server = await startRedisServer(t)
const channel = `keygate:anomaly:alerts:outage-${process.pid}`

/** keygate's own connection (as serve makes it: no offline queue, reconnecting in the background). */
function keygateRedis() {
  const redis = connectRedis(server.url, silentLogger)
  t.teardown(() => redis.disconnect())
  return redis
}

/** Another instance's publisher, as its detector publishes: the row's JSON once it is committed. */
const publisher = new Redis(server.url, { maxRetriesPerRequest: 1, enableOfflineQueue: false, retryStrategy: () => 100 })
publisher.on('error', () => {})
t.teardown(() => publisher.disconnect())
/** Published once the publisher's connection takes it (a Redis just started takes a moment to reach). */
async function publish(message: object): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (await publisher.publish(channel, JSON.stringify(message)).then(() => true, () => false)) return
    await sleep(20)
  }
}

const log = new AnomalyLog(store.db)
let n = 0
/** A finding as another instance records it: the row, committed. */
const record = async () => anomalyJson((await log.insert({ keyId: `k_outage_${++n}`, type: 'request_rate', windowStart: new Date(0), details: { n }, detectedAt: new Date() })) as Anomaly)
/** `id` published until the stream's next event comes (a Redis just started takes a moment to reach): that event. */
async function announced(s: SseStream, id: string): Promise<SseEvent | undefined> {
  let got: SseEvent | undefined
  void s.next().then((e) => (got = e))
  for (let i = 0; i < 500 && got === undefined; i++) {
    await publisher.publish(channel, JSON.stringify({ id })).catch(() => {})
    await sleep(20)
  }
  return got
}
/** Until the instance's subscriber is on the channel again (this process's other clients are not). */
async function subscribedAgain(): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const numsub = (await publisher.pubsub('NUMSUB', channel).catch(() => [channel, 0])) as [string, number]
    if (Number(numsub[1]) > 0) break
    await sleep(20)
  }
  // Its SUBSCRIBE's answer is on its way to it.
  await sleep(100)
}
/** The reads of the anomaly table among `statements` (the feed's: nothing else reads it here). */
const tableReads = (statements: string[]) => statements.filter((q) => q.includes('api_key_anomalies')).length

t.test('while Redis is down a stream gets new anomalies from the table; once it is back, from the channel, each once and in id order', async (t) => {
  const { w: reads, wrap } = watchedDb()
  const h = await startAdmin(t, wrap(store.db), { redis: keygateRedis(), config: { redis: { anomaly_channel: channel }, admin: { stream_poll_ms: 100 } } })
  const s = await h.stream('/v1/anomalies/stream')
  t.teardown(() => s.close())
  const other = await h.stream('/v1/anomalies/stream')
  t.teardown(() => other.close())
  const before = await record()
  t.equal((await announced(s, before.id))?.id, before.id, 'live through Redis')

  await server.stop()
  const down = [await record(), await record()]
  const during = [await nextWithin(s, 5000), await nextWithin(s, 5000)]
  // Before: nothing until Redis was back.
  t.same(
    during.map((e) => e?.id),
    down.map((a) => a.id),
    'recorded while Redis is down: streamed from the table, in id order',
  )
  t.same(JSON.parse(during[0]?.data ?? '{}'), down[0], 'the stored row')
  // One read of the table a poll for the process, however many streams are open.
  const at = tableReads(reads.statements)
  await sleep(1000)
  const polls = tableReads(reads.statements) - at
  t.ok(polls > 0 && polls <= 12, `one read (a page, no gap to look up) per 100 ms poll, for both streams: ${polls} in 1 s`)

  await server.start()
  await subscribedAgain()
  // Once the subscription is back, the channel carries them again: this one is announced only there.
  const back = await record()
  const rest = [await announced(s, back.id)]
  // The instances that recorded them while Redis was down publish them again at their next check.
  for (const a of down) await publish(a)
  const after = await record()
  await publish(after)
  rest.push(await nextWithin(s, 5000))
  t.same(
    rest.map((e) => e?.id),
    [back.id, after.id],
    'then from the channel, the ones streamed from the table not again',
  )
  // The table is read only when the channel announces something again.
  const quiet = tableReads(reads.statements)
  await sleep(500)
  t.equal(tableReads(reads.statements), quiet, 'no poll once the subscription is back')
  t.same(s.buffered(), [], 'nothing more on the stream')
  const others = [...during, ...rest].map((e) => e?.id)
  const got: string[] = []
  for (let i = 0; i < others.length + 1; i++) got.push((await nextWithin(other, 5000))?.id ?? 'none')
  t.same(got, [before.id, ...others], 'the other stream got the same, from the same reads')
})

t.test('an anomaly committed late, below one the table gave while Redis was down, is streamed across the switch back to the channel', async (t) => {
  // The table is read once a minute here: what the stream gets within the test comes from the
  // read the instance's own finding starts (its event), and from the channel.
  const h = await startAdmin(t, store.db, { redis: keygateRedis(), config: { redis: { anomaly_channel: channel }, admin: { stream_poll_ms: 60_000 } } })
  const s = await h.stream('/v1/anomalies/stream')
  t.teardown(() => s.close())
  const probe = await record()
  t.equal((await announced(s, probe.id))?.id, probe.id, 'subscribed')

  await server.stop()
  // Another instance takes an id in an insert it has not committed yet...
  const dbB = await openDb({ databaseUrl: store.url as string })
  t.teardown(() => dbB.close())
  let commit: () => void = () => {}
  const committed = new Promise<void>((resolve) => (commit = resolve))
  let lateId = ''
  const late = dbB.transaction(async (tx) => {
    lateId = (await tx.query<{ id: string }>(`INSERT INTO api_key_anomalies (key_id, type, window_start) VALUES ('k_late', 'error_rate', now()) RETURNING id::text AS id`))[0]?.id as string
    await committed
  })
  while (lateId === '') await sleep(5)
  // ...while this instance records a higher one: its event has the table read at once.
  const own = await record()
  h.events.emit('anomaly.detected', own)
  t.equal((await nextWithin(s, 5000))?.id, own.id, 'the own finding, from the table while Redis is down')
  // The lower one commits; its instance's announcement never reaches this one (it went out
  // before the subscription was back, or its instance stopped before Redis did).
  commit()
  await late
  await server.start()
  const back = await record()
  const got = [await announced(s, back.id), await nextWithin(s, 5000)]
  // Without the ids the table reads had passed carried across the switch, the late one was in
  // no read and no message: never streamed.
  t.same(
    got.map((e) => e?.id),
    [lateId, back.id],
    'the late one, then the next announced',
  )
  await sleep(300)
  t.same(s.buffered(), [], 'each once')
})
