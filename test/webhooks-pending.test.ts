// What a change of a webhook does to the deliveries it has pending, on both stores, with real
// receivers. An event the webhook no longer takes (a PATCH of `events`) is not sent: its pending
// deliveries end as failed with the reason, in the log, and are not sent again until the event is
// taken again; a delivery its transaction queued while the PATCH committed is ended the same way
// when it comes due. An attempt already in flight ends as it would, and is not retried (its warn
// line says why). A new URL or a rotated secret applies to what is pending. Before (found by a review), a PATCH that
// removed an event left that event's pending deliveries to be sent and retried as before.
import t from 'tap'
import { sleep } from './helpers/gateway.ts'
import { startAdmin } from './helpers/admin.ts'
import { createLogger } from '../core/log.ts'
import { forEachStore } from './helpers/stores.ts'
import { startReceiver, verifiedBy, type Hook } from './helpers/webhooks.ts'
import type http from 'node:http'

const NOT_TAKEN = /^webhook wh_\S+ no longer takes key\.revoked \(its events changed at \S+\): no further attempt$/

await forEachStore(t, async (t, store) => {
  const lines: Record<string, unknown>[] = []
  const webhookLog = createLogger({ level: 'debug', write: (line) => void lines.push(JSON.parse(line)) })
  const h = await startAdmin(t, store.db, { webhookLog, config: { webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 600_000, retry_base_ms: 20 } } })
  // What the service logged of a delivery's attempts: message and reason.
  const said = (id: string) => lines.filter((l) => l.delivery_id === id).map((l) => ({ message: l.message, reason: l.reason }))
  const receiver = await startReceiver(t)
  const register = async (url: string) => {
    const made = await h.call('POST', '/v1/webhooks', { body: { url, events: ['key.revoked', 'key.created'] } })
    t.equal(made.status, 201)
    return { id: made.json.id as string, secret: made.json.secret as string }
  }
  const narrow = async (id: string) => {
    const patched = await h.call('PATCH', `/v1/webhooks/${id}`, { body: { events: ['key.created'] } })
    t.equal(patched.status, 200)
    return patched
  }
  // A delivery due now (`attempts` made before), as the queue holds one.
  const queue = (webhookId: string, id: string, type: string, attempts = 0) =>
    store.db.query(
      `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, attempts, last_status, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, now())`,
      [id, webhookId, type, JSON.stringify({ type, timestamp: new Date().toISOString(), data: { marker: id } }), attempts, attempts > 0 ? 503 : null],
    )
  const logged = async (webhookId: string, id: string) => (await h.call('GET', `/v1/webhooks/${webhookId}/deliveries`)).json.items.find((d: any) => d.id === id)
  const run = async () => {
    h.webhooks.kick()
    await h.webhooks.idle()
  }
  const sent = (receiver: { received: Hook[] }, id: string) => receiver.received.filter((hk) => hk.id === id).length

  await t.test('an event a PATCH removed: its pending deliveries are not sent, but failed with the reason, and sent again only once it is taken again', async (t) => {
    const hook = await register(`${receiver.url}/narrowed`)
    await queue(hook.id, 'msg_narrowrevoked', 'key.revoked', 1)
    await queue(hook.id, 'msg_narrowcreated', 'key.created')
    await narrow(hook.id)
    const [audit] = (await h.call('GET', '/v1/audit?action=webhook.updated')).json.items
    t.same(audit.details, { id: hook.id, changed: ['events'], events: ['key.created'], deliveries_ended: 1 }, 'the audit row says how many pending deliveries it ended')
    await run()
    t.equal(sent(receiver, 'msg_narrowcreated'), 1, 'the event it still takes is sent')
    t.equal(sent(receiver, 'msg_narrowrevoked'), 0, 'the one it no longer takes is not')
    const ended = await logged(hook.id, 'msg_narrowrevoked')
    t.matchStrict(ended, { status: 'failed', attempts: 1, last_status: 503, next_attempt_at: null }, 'in the log: failed, its attempts as they were')
    t.match(ended.last_error, NOT_TAKEN)

    const retry = await h.call('POST', `/v1/webhooks/${hook.id}/deliveries/msg_narrowrevoked/retry`)
    t.equal(retry.status, 409)
    t.match(retry.json.error, { code: 'conflict', message: /^delivery msg_narrowrevoked is of key\.revoked, which webhook \S+ no longer takes; add the event to its events to send it again$/ })
    t.notMatch(retry.text, /at .*\.ts:\d+/, 'no stack trace')
    const range = await h.call('POST', `/v1/webhooks/${hook.id}/deliveries/retry`, { body: {} })
    t.equal(range.json.retried, 0, 'a resend of a time range skips it')
    await run()
    t.equal(sent(receiver, 'msg_narrowrevoked'), 0, 'still not sent')

    t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { events: ['key.created', 'key.revoked'] } })).status, 200)
    t.equal((await h.call('POST', `/v1/webhooks/${hook.id}/deliveries/msg_narrowrevoked/retry`)).status, 200, 'taken again: it may be sent again')
    await receiver.waitFor((hk) => hk.id === 'msg_narrowrevoked')
    await h.webhooks.idle()
    t.match(await logged(hook.id, 'msg_narrowrevoked'), { status: 'delivered', attempts: 2 })
    t.equal((await h.call('DELETE', `/v1/webhooks/${hook.id}`)).status, 200)
  })

  await t.test('a delivery queued by a transaction that read the webhook before the PATCH committed is not sent either', async (t) => {
    const hook = await register(`${receiver.url}/raced`)
    let queued!: () => void
    let release!: () => void
    const inserted = new Promise<void>((r) => (queued = r))
    const gate = new Promise<void>((r) => (release = r))
    // A key change's transaction: its event queued, the change not yet committed.
    const change = store.db.transaction(async (tx) => {
      await h.webhooks.enqueue({ type: 'key.revoked', at: new Date(), data: { marker: 'raced' } }, tx)
      queued()
      await gate
    })
    await inserted
    const patch = narrow(hook.id)
    // PostgreSQL: the PATCH does not wait for the change, which commits after it. The embedded
    // store runs one transaction at a time: the PATCH waits, and sees the row once it has.
    await Promise.race([patch, sleep(300)])
    release()
    await change
    await patch
    const [row] = await store.db.query<{ id: string }>('SELECT id FROM webhook_deliveries WHERE webhook_id = $1', [hook.id])
    t.ok(row, 'the delivery was queued')
    await run()
    t.notOk(receiver.received.some((hk) => hk.json?.data?.marker === 'raced'), 'and not sent')
    const ended = await logged(hook.id, row!.id)
    t.matchStrict(ended, { status: 'failed', attempts: 0, last_status: null, next_attempt_at: null })
    t.match(ended.last_error, NOT_TAKEN)
    t.equal((await h.call('DELETE', `/v1/webhooks/${hook.id}`)).status, 200)
  })

  await t.test('an attempt in flight when its event is removed ends as it would, and is not retried', async (t) => {
    const held = new Map<string, http.ServerResponse>()
    const slow = await startReceiver(t, (hk, res) => held.set(hk.id, res))
    const hook = await register(`${slow.url}/inflight`)
    for (const [id, status] of [['msg_inflighttaken', 200], ['msg_inflightfails', 503]] as const) {
      t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { events: ['key.revoked', 'key.created'] } })).status, 200)
      await queue(hook.id, id, 'key.revoked')
      h.webhooks.kick()
      await slow.waitFor((hk) => hk.id === id)
      await narrow(hook.id)
      held.get(id)?.writeHead(status).end()
      await h.webhooks.idle()
    }
    t.matchStrict(await logged(hook.id, 'msg_inflighttaken'), { status: 'delivered', attempts: 1, last_status: 200, last_error: null }, 'the receiver took it: delivered')
    await sleep(50) // past retry_base_ms
    await run()
    t.match(await logged(hook.id, 'msg_inflightfails'), { status: 'failed', attempts: 1, last_status: 503, last_error: 'the receiver answered 503' }, 'refused: failed, not retried')
    t.equal(sent(slow, 'msg_inflightfails'), 1, 'sent once')
    t.same(said('msg_inflightfails'), [{ message: 'webhook delivery failed; no further attempt', reason: 'its webhook no longer takes key.revoked' }], 'the log says it is not retried, and why')
    t.equal((await h.call('DELETE', `/v1/webhooks/${hook.id}`)).status, 200)
  })

  await t.test('an attempt in flight whose event is removed and taken again stays ended, and a resend meanwhile is not undone by its answer', async (t) => {
    const held = new Map<string, http.ServerResponse>()
    const slow = await startReceiver(t, (hk, res) => {
      if (held.has(hk.id)) res.writeHead(204).end()
      else held.set(hk.id, res)
    })
    const hook = await register(`${slow.url}/backandforth`)
    const widen = async () => t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { events: ['key.revoked', 'key.created'] } })).status, 200)
    // Ended by the PATCH while the receiver holds it, the event taken again before it answers 503.
    await queue(hook.id, 'msg_backforth', 'key.revoked')
    h.webhooks.kick()
    await slow.waitFor((hk) => hk.id === 'msg_backforth')
    await narrow(hook.id)
    await widen()
    held.get('msg_backforth')?.writeHead(503).end()
    await h.webhooks.idle()
    await sleep(50) // past retry_base_ms
    await run()
    t.matchStrict(await logged(hook.id, 'msg_backforth'), { status: 'failed', attempts: 1, last_status: 503, next_attempt_at: null }, 'ended by the PATCH: failed, not made pending again by its answer')
    t.equal(sent(slow, 'msg_backforth'), 1, 'not sent again without a resend')
    t.same(said('msg_backforth'), [{ message: 'webhook delivery failed; no further attempt', reason: 'it was ended while in flight, its event removed from its webhook' }], 'the log says it is not retried, and why')

    // Ended while in flight, on its last attempt (max_attempts 8 since it was last sent again), the
    // webhook paused with it; the event taken again and the delivery resent (it is failed) before
    // the receiver answers 503: the resend stands, and is sent once the webhook is enabled.
    await queue(hook.id, 'msg_resentinflight', 'key.revoked', 9)
    await store.db.query(`UPDATE webhook_deliveries SET retry_base = 2 WHERE id = 'msg_resentinflight'`)
    h.webhooks.kick()
    await slow.waitFor((hk) => hk.id === 'msg_resentinflight')
    t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { events: ['key.created'], enabled: false } })).status, 200)
    await widen()
    const resent = await h.call('POST', `/v1/webhooks/${hook.id}/deliveries/msg_resentinflight/retry`)
    t.equal(resent.status, 200, 'failed and taken: resent')
    held.get('msg_resentinflight')?.writeHead(503).end()
    await h.webhooks.idle()
    t.match(await logged(hook.id, 'msg_resentinflight'), { status: 'pending', attempts: 10 }, 'the answer to the attempt before the resend does not undo it')
    t.same(said('msg_resentinflight'), [{ message: 'webhook delivery failed; the outcome is not recorded', reason: 'the delivery was sent again meanwhile' }], 'and the log says so: not "failed for good"')
    t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { enabled: true } })).status, 200)
    await run()
    t.match(await logged(hook.id, 'msg_resentinflight'), { status: 'delivered', attempts: 11, last_status: 204 }, 'sent once enabled')
    t.equal((await h.call('DELETE', `/v1/webhooks/${hook.id}`)).status, 200)
  })

  await t.test("a failed attempt of a paused webhook: its log line says the retry is held until the webhook is enabled again", async (t) => {
    // Before (found by a review), the line said "will retry" at next_attempt_at alone, a time the
    // paused webhook does not keep.
    const inFlight = new Map<string, http.ServerResponse>()
    const refusing = await startReceiver(t, (hk, res) => (hk.id === 'msg_pausedinflight' && !inFlight.has(hk.id) ? inFlight.set(hk.id, res) : res.writeHead(503).end()))
    const hook = await register(`${refusing.url}/paused`)
    const retryLine = (id: string) => lines.filter((l) => l.delivery_id === id && l.message === 'webhook delivery failed; will retry').map((l) => ({ next: typeof l.next_attempt_at, held: l.held }))
    const HELD = [{ next: 'string', held: 'webhook paused: retried once it is enabled again, not before' }]
    await queue(hook.id, 'msg_enabledrefused', 'key.revoked')
    await run()
    // The first line only: under load, the round may come to its retry (20 ms on) too.
    t.same(retryLine('msg_enabledrefused')[0], { next: 'string', held: undefined }, 'enabled: a retry at next_attempt_at, nothing held')
    // Paused while the receiver holds the attempt, which it then refuses.
    await queue(hook.id, 'msg_pausedinflight', 'key.revoked')
    h.webhooks.kick()
    await refusing.waitFor((hk) => hk.id === 'msg_pausedinflight')
    t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { enabled: false } })).status, 200)
    inFlight.get('msg_pausedinflight')?.writeHead(503).end()
    await h.webhooks.idle()
    t.same(retryLine('msg_pausedinflight'), HELD, 'paused while in flight: the line says the retry is held')
    // A test send to the paused webhook, refused.
    const tested = await h.call('POST', `/v1/webhooks/${hook.id}/test`)
    t.match(tested.json, { status: 'pending', last_status: 503 })
    t.same(retryLine(tested.json.id), HELD, 'a test send to it: the same')
    await sleep(50) // past retry_base_ms
    await run()
    t.equal(sent(refusing, 'msg_pausedinflight'), 1, 'held indeed: not sent again while paused')
    t.equal(sent(refusing, tested.json.id), 1, 'nor the test send')
    t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { enabled: true } })).status, 200)
    await run()
    t.ok(sent(refusing, 'msg_pausedinflight') >= 2, 'enabled again: retried')
    t.equal((await h.call('DELETE', `/v1/webhooks/${hook.id}`)).status, 200)
  })

  await t.test('a new URL and a rotated secret apply to the deliveries pending', async (t) => {
    const hook = await register(`${receiver.url}/before`)
    await queue(hook.id, 'msg_moved', 'key.revoked', 1)
    t.equal((await h.call('PATCH', `/v1/webhooks/${hook.id}`, { body: { url: `${receiver.url}/after` } })).status, 200)
    const rotated = await h.call('POST', `/v1/webhooks/${hook.id}/rotate-secret`)
    await run()
    const got = await receiver.waitFor((hk) => hk.id === 'msg_moved')
    t.equal(got.path, '/after', 'sent to the URL the webhook has when it is attempted')
    t.same(verifiedBy(got, [rotated.json.secret, hook.secret]), [rotated.json.secret, hook.secret], 'signed with the secrets of that moment: the new one and the previous in its grace')
    t.equal((await h.call('DELETE', `/v1/webhooks/${hook.id}`)).status, 200)
  })
})
