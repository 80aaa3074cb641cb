// GET /v1/anomalies/stream: every anomaly as it is recorded, by any instance, as Server-Sent
// Events (`id` is the anomaly id, `event: anomaly.detected`, `data` its JSON). A client
// reconnecting with `Last-Event-ID` (or `?last_event_id=`; the header wins) first gets what it
// missed from the table, then the live ones, none twice. A stream opened without one begins with
// an `id:` alone, the newest anomaly then, so a reconnection before the first event resumes too.
// Without Redis (and with Redis while the instance's subscription to the anomaly channel is down)
// the live ones are read from the table too, in id order: every `admin.stream_poll_ms` (1 s) while
// a stream is open (the other instances'), and at once when this process records one. A comment
// line every `admin.stream_heartbeat_s` (15 s) keeps proxies from closing an idle stream. A
// stream opened with an admin key ends when that key stops being an admin key. A client that
// stops reading is cut off once 1 MiB waits for it (it
// resumes with Last-Event-ID, as browsers do on their own); the catch-up is read in pages, each
// written as the client takes it, so a resume from far back is neither cut short nor held in
// memory. One credential holds at most `admin.max_streams_per_credential` streams open on an
// instance (429 too_many_streams). With Redis each event is the table's row, read when the channel
// announces it (core/anomalies.ts, AnomalyFeed): a message naming no row never becomes an `id:`.
import { once } from 'node:events'
import type { ServerResponse } from 'node:http'
import { Type } from '@sinclair/typebox'
import { ANOMALY_ID_PATTERN, anomalyJson, isAnomalyId, LATE_WINDOW, type AnomalyJson } from '../../core/anomalies.ts'
import { fieldInvalid, isKeygateError, KeygateError } from '../../core/errors.ts'
import { evaluateKey, validUntilOf } from '../../core/keys/evaluate.ts'
import type { KeyRecord } from '../../core/keys/types.ts'
import { ADMIN_SCOPE } from '../auth.ts'
import { defineOperation } from '../operation.ts'
import { AnomalySchema } from '../schemas.ts'

/** Anomalies read from the table per page of a catch-up. */
export const RESUME_PAGE = 500
/** What may wait for a client that does not read (live events, heartbeats) before the stream is cut. */
export const MAX_UNSENT_BYTES = 1024 * 1024
/** The longest delay setTimeout takes (a longer one fires at once). */
const MAX_TIMER_MS = 2 ** 31 - 1

const frame = (a: AnomalyJson) => `id: ${a.id}\nevent: anomaly.detected\ndata: ${JSON.stringify(a)}\n\n`

export default defineOperation({
  id: 'streamAnomalies',
  method: 'GET',
  path: '/v1/anomalies/stream',
  tag: 'anomalies',
  summary: 'Follow anomalies live (Server-Sent Events)',
  description:
    'Each event: `id` (the anomaly id), `event: anomaly.detected`, `data` (the anomaly as JSON). The stream opens with an `id:` alone (no event): the newest anomaly when it opened, so a client that reconnects before its first event still resumes from there. Send `Last-Event-ID` (EventSource clients do on reconnect) or `last_event_id` to receive the anomalies recorded after that one first; the header wins when both are given (an EventSource keeps its URL, and sends the newest id it received in the header).',
  stream: true,
  query: Type.Object(
    { last_event_id: Type.Optional(Type.String({ pattern: ANOMALY_ID_PATTERN, description: 'Resume after this anomaly id (as the Last-Event-ID header).' })) },
    { additionalProperties: false },
  ),
  headers: Type.Object({
    'Last-Event-ID': Type.Optional(Type.String({ pattern: ANOMALY_ID_PATTERN, description: 'Resume after this anomaly id: the `id` of the last event received (EventSource clients send it when they reconnect). It wins over `last_event_id` when both are given; empty is none.' })),
  }),
  response: { status: 200, description: 'The event stream; the data of each event is an anomaly.', schema: AnomalySchema },
  errors: ['validation_failed', 'too_many_streams'],
  // Its HEAD asks nothing of the store, and its GET opens on a store that cannot be read.
  storeBacked: false,
  async handle({ query, req, res, requestId, services, actor }) {
    // The header first: an EventSource opened with ?last_event_id= keeps that URL, and sends the
    // newest id it received in the header when it reconnects (before, found by a review, the
    // query won, and every reconnection replayed everything since the URL's id).
    const header = req.headers['last-event-id']
    const resume = (typeof header === 'string' && header !== '' ? header : undefined) ?? query.last_event_id
    if (resume !== undefined && !isAnomalyId(resume)) {
      throw fieldInvalid('Last-Event-ID', 'must be an anomaly id')
    }
    // The client may have gone while it was authenticated: its 'close' came before there was
    // anyone to hear it, and a stream begun now would hold its listeners and heartbeat for ever.
    if (req.socket.destroyed || res.destroyed) return
    const head = { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', 'x-content-type-options': 'nosniff', 'x-request-id': requestId, 'x-accel-buffering': 'no' }
    // HEAD: what a GET would answer, without a stream (before: no answer at all, and a stream
    // slot held for as long as the client kept the connection). With every slot of the
    // credential taken that is the refusal (before, found by a review: 200 and the stream's head).
    if (req.method === 'HEAD') {
      if (services.streams.full(actor.actor)) throw tooManyStreams(services.streams.max)
      res.writeHead(200, head).end()
      return
    }
    // Where a client that did not ask to resume resumes from, should it reconnect before its first
    // event: the newest anomaly before the feed starts, so what is recorded after it is either
    // streamed live or caught up on the resume. (Before, found by a review, the stream gave no id
    // until its first event: a client that reconnected before one, past a restart of this
    // instance, had none to send, and never got what was recorded while it was away.)
    // A store that cannot be read now gives no id line (the stream opens all the same, as before).
    const from = resume === undefined ? await services.anomalies.newestIds(1).then((ids) => ids[0] ?? '0', () => undefined) : undefined
    // What the stream reads from the table before it goes live: what the client missed, or what was
    // recorded between the read of `from` and the listener below (before, found by a read-back, an
    // anomaly the feed delivered in that gap never reached this stream, and once a later event had
    // moved the client's last id past it, no resume brought it either).
    const catchUpFrom = resume ?? from
    // Without Redis (or while its subscription is down), the feed reads the table for other
    // instances' findings while a stream is open: from where the table is before this stream
    // begins, or where the open streams are, so none recorded after is missed.
    await services.anomalyFeed.ready()
    if (req.socket.destroyed || res.destroyed) return
    const release = services.streams.take(actor.actor)
    if (!release) throw tooManyStreams(services.streams.max)
    res.writeHead(200, head)
    // An id alone is no event: it sets the client's Last-Event-ID (WHATWG HTML, "dispatch the event").
    res.write(`: keygate anomaly stream\nretry: 2000\n${from !== undefined ? `id: ${from}\n` : ''}\n`)
    // Live ones are held back while the missed ones are read, so none comes twice or out of turn.
    let held: AnomalyJson[] | undefined = catchUpFrom !== undefined ? [] : undefined
    let heldBytes = 0
    // After the catch-up, the ids it sent, until the feed is past them: the feed may deliver one
    // of them later (its read of the table had not reached it yet, or Redis's announcement came
    // after the catch-up read it). Before, found by a review, such an id was sent twice.
    let caughtUp: { sent: IdRuns; top: bigint } | undefined
    const off = services.anomalyFeed.on(
      (a) => {
        const text = frame(a)
        if (caughtUp) {
          const id = BigInt(a.id)
          // The feed delivers in id order but for late commits, at most LATE_WINDOW below the newest it delivered.
          if (id > caughtUp.top + BigInt(LATE_WINDOW)) caughtUp = undefined
          else if (caughtUp.sent.has(id)) return
        }
        if (!held) return send(res, text)
        held.push(a)
        heldBytes += text.length
        if (heldBytes > MAX_UNSENT_BYTES) res.destroy()
      },
      () => finish(),
    )
    const feedAt = services.anomalyFeed.position()
    // A stream opened with an admin key ends once that key stops being one: at its expiry (or grace
    // end), at once when it is revoked, loses the admin scope or its bindings stop holding the
    // stream's address through this instance, else at the next heartbeat (a change made through
    // another instance).
    const keyId = actor.actor.startsWith('key:') ? actor.actor.slice(4) : undefined
    // From the stream's own address: a key whose CIDR bindings no longer hold it is no admin key here.
    const stillAdmin = (k: KeyRecord) => evaluateKey(k, services.now(), actor.address ?? undefined).ok && k.scopes.includes(ADMIN_SCOPE)
    // The key's own end (its expiry, or a rotating key's grace end) is known ahead: the stream ends
    // then. Armed from the key as read when the stream opens, at each heartbeat and at each change
    // of it here. Before (found by a review), an expiry ended the stream only at the next
    // heartbeat, up to admin.stream_heartbeat_s (300 s at most) after it.
    let ending: ReturnType<typeof setTimeout> | undefined
    const endAt = (k: KeyRecord) => {
      clearTimeout(ending)
      const wait = validUntilOf(k) - services.now().getTime()
      // Ended already (a read that came back late); Infinity (no end), or past what a timer holds: a later heartbeat arms it.
      if (!open(res) || !(wait <= MAX_TIMER_MS)) return
      // Judged again when it fires: a timer may fire a little before the clock reaches its mark
      // (libuv counts whole milliseconds of a clock of its own, and the wall clock may be stepped
      // back), and a key still valid then is armed again for what is left. Before (found by CI), it
      // was left to the next heartbeat.
      ending = setTimeout(() => judge(k), Math.max(0, wait))
      ending.unref()
    }
    // The key read again: the stream ends when it is no admin key any more, else is armed for its end.
    const judge = (k: KeyRecord) => (stillAdmin(k) ? endAt(k) : finish())
    const offKeys =
      keyId === undefined
        ? () => {}
        : services.keys.onChange((c) => {
            if (c.key.id === keyId) judge(c.key)
            else if (c.previous?.id === keyId) judge(c.previous)
          })
    const reread = () => {
      if (keyId === undefined) return
      services.keys.get(keyId).then(judge, (err: unknown) => {
        if (isKeygateError(err) && err.code === 'key_not_found') finish()
      })
    }
    reread()
    const heartbeat = setInterval(() => {
      send(res, ': ping\n\n')
      reread()
    }, services.streamHeartbeatMs)
    heartbeat.unref()
    const done = () => {
      clearInterval(heartbeat)
      clearTimeout(ending)
      off()
      offKeys()
      release()
    }
    // Ended: nothing more is written (a client that has not read everything keeps the response
    // open, and a write after its end would be an uncaught error, the process's end).
    function finish(): void {
      done()
      res.end()
    }
    res.once('close', done)
    if (catchUpFrom !== undefined) {
      try {
        // The ids the pages sent, as runs of consecutive ids (a gap only where an id was skipped,
        // rolled back or not yet committed): a held live one is sent unless a page sent it, also
        // one committed late with an id the pages had already passed. Only those the feed may
        // still deliver are kept: above where it was when this stream began listening, less
        // LATE_WINDOW (before, found by a read-back, every id a resume from far back sent was
        // kept for the stream's life, tens of MB for a million rows with gaps).
        const sent = new IdRuns()
        const floor = feedAt === undefined ? undefined : feedAt - BigInt(LATE_WINDOW)
        let last = catchUpFrom
        for (;;) {
          const page = await services.anomalies.after(last, RESUME_PAGE)
          for (const a of page) {
            if (!open(res)) return undefined
            if (!res.write(frame(anomalyJson(a)))) await drained(res)
            if (floor === undefined || BigInt(a.id) > floor) sent.add(BigInt(a.id))
            last = a.id
          }
          if (page.length < RESUME_PAGE) break
        }
        for (const a of held ?? []) if (!sent.has(BigInt(a.id))) send(res, frame(a))
        if (sent.top !== undefined) caughtUp = { sent, top: sent.top }
      } finally {
        held = undefined
      }
    }
    return undefined
  },
})

/** The refusal of one more stream to a credential that holds `max` open. */
const tooManyStreams = (max: number) =>
  new KeygateError('too_many_streams', `this credential already holds ${max} open anomaly streams on this instance (admin.max_streams_per_credential); close one first`)

/** Neither ended nor destroyed: it may still be written to. */
const open = (res: ServerResponse) => !res.writableEnded && !res.destroyed

/** Writes to the stream, or cuts it off when too much already waits for the client. */
function send(res: ServerResponse, text: string): void {
  if (!open(res)) return
  res.write(text)
  if (res.writableLength > MAX_UNSENT_BYTES) res.destroy()
}

/** Ascending ids as runs of consecutive ones: memory grows with the gaps, not with the ids. */
class IdRuns {
  readonly #starts: bigint[] = []
  readonly #ends: bigint[] = []

  /** The highest id added. */
  get top(): bigint | undefined {
    return this.#ends.at(-1)
  }

  /** `id` above every id added before. */
  add(id: bigint): void {
    const n = this.#ends.length
    if (n > 0 && this.#ends[n - 1] === id - 1n) this.#ends[n - 1] = id
    else {
      this.#starts.push(id)
      this.#ends.push(id)
    }
  }

  has(id: bigint): boolean {
    let lo = 0
    let hi = this.#starts.length - 1
    while (lo <= hi) {
      const mid = (lo + hi) >> 1
      if (id < (this.#starts[mid] as bigint)) hi = mid - 1
      else if (id > (this.#ends[mid] as bigint)) lo = mid + 1
      else return true
    }
    return false
  }
}

/** Until the client has taken what waits for it, or has gone. */
async function drained(res: ServerResponse): Promise<void> {
  if (!open(res)) return
  const ac = new AbortController()
  await Promise.race([once(res, 'drain', { signal: ac.signal }), once(res, 'close', { signal: ac.signal })]).catch(() => {})
  ac.abort()
}
