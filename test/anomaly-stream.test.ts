// The anomaly stream's catch-up and its bound (admin/routes/anomalies-stream.ts), on both stores:
// a client resuming from far back gets every anomaly it missed, in order, page after page (not
// the first 10,000), then the live ones; a client that stops reading is cut off once its unsent
// data passes the bound, instead of the server buffering without end.
import t from 'tap'
import net from 'node:net'
import { MAX_UNSENT_BYTES, RESUME_PAGE } from '../admin/routes/anomalies-stream.ts'
import { startAdmin } from './helpers/admin.ts'
import { forEachStore } from './helpers/stores.ts'

await forEachStore(t, async (t, store) => {
  const h = await startAdmin(t, store.db)
  const key = await h.keys.create({ name: 'watched', type: 'service', scopes: [] }, { actor: 'test' })

  await t.test('a resume from far back gets every missed anomaly, across pages, then the live ones', async (t) => {
    // More than the 10,000 a resume used to stop at, and across a change in the ids' digit count
    // (the table's ids were once sorted as text: '10' before '9').
    const count = 10_037
    const ids = (
      await h.db.query<{ id: string }>(
        `INSERT INTO api_key_anomalies (key_id, type, window_start, details)
         SELECT $1, 'request_rate', to_timestamp(g * 60), jsonb_build_object('n', g) FROM generate_series(1, $2::int) AS g
         RETURNING id::text AS id`,
        [key.record.id, count + 1],
      )
    ).map((r) => r.id)
    const [resumeFrom, ...missed] = ids as [string, ...string[]]
    const s = await h.stream('/v1/anomalies/stream', { headers: { 'last-event-id': resumeFrom } })
    t.teardown(() => s.close())
    t.equal(s.status, 200)
    const got: string[] = []
    for (let i = 0; i < missed.length; i++) got.push((await s.next()).id as string)
    t.equal(got.length, count, `all ${count} missed anomalies (${Math.ceil(count / RESUME_PAGE)} pages of ${RESUME_PAGE})`)
    t.same(got, missed, 'in order, none twice')

    const live = String(BigInt(missed.at(-1) as string) + 1000n)
    h.events.emit('anomaly.detected', { id: live, key_id: key.record.id, type: 'request_rate', details: {} })
    t.equal((await s.next()).id, live, 'then the live ones')
  })

  await t.test('a client that stops reading is cut off once its unsent data passes the bound', async (t) => {
    const { port } = new URL(h.url)
    const socket = net.connect(Number(port), '127.0.0.1')
    t.teardown(() => socket.destroy())
    await new Promise((resolve) => socket.once('connect', resolve))
    socket.write(`GET /v1/anomalies/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${h.adminKey}\r\n\r\n`)
    socket.pause()
    let closed = false
    socket.once('close', () => (closed = true))
    socket.on('error', () => {})
    // Let the stream start, then send live anomalies the client does not read: 64 times the bound.
    await new Promise((resolve) => setTimeout(resolve, 200))
    const pad = 'x'.repeat(16 * 1024)
    const events = (64 * MAX_UNSENT_BYTES) / pad.length
    for (let i = 0; i < events; i++) {
      h.events.emit('anomaly.detected', { id: String(9_000_000 + i), key_id: key.record.id, type: 'request_rate', details: { pad } })
      if (i % 64 === 0) await new Promise((resolve) => setImmediate(resolve))
    }
    // Now read what reached the client: the stream must have been ended by the server.
    let received = 0
    socket.on('data', (d: Buffer) => (received += d.length))
    socket.resume()
    const deadline = Date.now() + 5000
    while (!closed && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
    t.ok(closed, 'the server ended the stream')
    t.ok(received < events * pad.length, `the client got part of it (${received} bytes of ${events * pad.length}) and resumes with Last-Event-ID`)
  })
})
