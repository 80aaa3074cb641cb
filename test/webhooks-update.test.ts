// GET and PATCH /v1/webhooks/{id}: one webhook as the list shows it; a change of URL, events,
// description or enabled, checked as a registration is, audited, and a pause that holds the
// pending deliveries until the webhook is enabled again. Before (found by a review): neither
// operation existed (405), `enabled` was true for ever, and the only way to change or pause a
// webhook was to delete it and register it again, losing its log and its secret.
import t from 'tap'
import { generateKey } from '../core/keys/format.ts'
import { startAdmin } from './helpers/admin.ts'
import { trailIs } from './helpers/audit.ts'
import { forEachStore } from './helpers/stores.ts'
import { startReceiver, verifiedBy } from './helpers/webhooks.ts'

await forEachStore(t, async (t, store) => {
  const h = await startAdmin(t, store.db, { config: { webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 600_000 } } })
  const receiver = await startReceiver(t)
  const created = await h.call('POST', '/v1/webhooks', { body: { url: `${receiver.url}/a`, events: ['key.revoked'], description: 'first' } })
  const id = created.json.id as string
  const secret = created.json.secret as string
  const auditOf = async () => (await h.call('GET', '/v1/audit?action=webhook.updated')).json.items.map((r: any) => r.details)
  /** The details of the audit row of the first PATCH below. */
  const firstChange = { id, changed: ['url', 'events', 'description'], url: `${receiver.url}/b`, events: ['key.revoked', 'key.created'], description: null }
  /** The webhook's whole audit trail, newest first: the rows of every action that name it. */
  const trailOf = async (hook: string) => (await h.call('GET', '/v1/audit?limit=500')).json.items.filter((r: any) => r.details?.id === hook) as Array<{ action: string; details: unknown }>

  await t.test('GET one webhook: as listed, without its secret; 404 for an unknown id', async (t) => {
    const one = await h.call('GET', `/v1/webhooks/${id}`)
    t.equal(one.status, 200)
    t.same(one.json, (await h.call('GET', '/v1/webhooks')).json.items[0], 'the same as in the list')
    t.notOk(one.text.includes(secret.slice(6)), 'no secret')
    const unknown = await h.call('GET', '/v1/webhooks/wh_nope')
    t.equal(unknown.status, 404)
    t.equal(unknown.json.error.code, 'webhook_not_found')
  })

  await t.test('PATCH changes the fields given, audited; a restated value is no change', async (t) => {
    const before = (await h.call('GET', `/v1/webhooks/${id}`)).json
    const changed = await h.call('PATCH', `/v1/webhooks/${id}`, { body: { url: `${receiver.url}/b#frag`, events: ['key.revoked', 'key.created'], description: null } })
    t.equal(changed.status, 200)
    t.matchStrict(changed.json, { id, url: `${receiver.url}/b`, description: null, enabled: true, created_at: before.created_at })
    // Whole: an array in a pattern checks only the items it starts with (t.matchStrict's too).
    t.same(changed.json.events, ['key.revoked', 'key.created'], 'the events given, replacing the old')
    t.notOk('secret' in changed.json, 'no secret in the answer')
    t.same((await h.call('GET', `/v1/webhooks/${id}`)).json, changed.json, 'stored as answered')
    t.same(await auditOf(), [firstChange], 'one audit row naming what changed')
    const same = await h.call('PATCH', `/v1/webhooks/${id}`, { body: { url: `${receiver.url}/b`, events: ['key.created', 'key.revoked'], enabled: true } })
    t.equal(same.status, 200)
    t.equal(same.json.updated_at, changed.json.updated_at, 'restated: unchanged')
    t.equal((await auditOf()).length, 1, 'and no audit row')
    const made = await h.call('POST', '/v1/keys', { body: { name: 'after the change', type: 'user' } })
    const hook = await receiver.waitFor((hk) => hk.json?.type === 'key.created' && hk.json.data.key.id === made.json.id)
    t.equal(hook.path, '/b', 'delivered to the new URL, for the event added')
    t.same(verifiedBy(hook, [secret]), [secret], 'signed with the secret it had')
  })

  await t.test('PATCH refuses what a registration refuses, and a body that changes nothing', async (t) => {
    const other = (await h.call('POST', '/v1/webhooks', { body: { url: `${receiver.url}/other`, events: ['anomaly.detected'] } })).json.id as string
    const refused = async (body: unknown, status: number, code: string, message: RegExp) => {
      const r = await h.call('PATCH', `/v1/webhooks/${other}`, { body })
      t.equal(r.status, status, JSON.stringify(body).slice(0, 60))
      t.match(r.json.error, { code, message })
      t.notMatch(r.text, /at .*\.ts:\d+/, 'no stack trace')
    }
    await refused({ url: 'http://10.0.0.1/hook' }, 400, 'webhook_url_refused', /10\.0\.0\.1/)
    await refused({ url: 'ftp://127.0.0.1/hook' }, 400, 'webhook_url_refused', /http/)
    const { key } = generateKey('kg_')
    await refused({ url: `${receiver.url}/x?api_key=${key.replaceAll('_', '%5F')}` }, 400, 'validation_failed', /^url: holds what looks like a keygate API key/)
    await refused({ description: `see ${key}` }, 400, 'validation_failed', /^description: holds what looks like a keygate API key/)
    await refused({ events: [] }, 400, 'validation_failed', /events/)
    await refused({ events: ['key.deleted'] }, 400, 'validation_failed', /events/)
    await refused({ enabled: 'no' }, 400, 'validation_failed', /enabled/)
    await refused({ secret: 'whsec_x' }, 400, 'validation_failed', /secret/)
    await refused({}, 400, 'validation_failed', /^body: \{\} is not allowed; expected an object with at least one of the keys url, events, enabled, description/)
    await refused({ url: `${receiver.url}/b`, events: ['key.created'] }, 409, 'conflict', new RegExp(`webhook ${id} already sends key\\.created`))
    const untouched = (await h.call('GET', `/v1/webhooks/${other}`)).json
    t.matchStrict(untouched, { url: `${receiver.url}/other`, description: null }, 'unchanged by any of them')
    t.same(untouched.events, ['anomaly.detected'], 'its events too')
    t.equal((await h.call('PATCH', '/v1/webhooks/wh_nope', { body: { enabled: false } })).json.error.code, 'webhook_not_found')
    t.equal((await h.call('DELETE', `/v1/webhooks/${other}`)).status, 200)
  })

  await t.test('a paused webhook gets no new deliveries and holds its pending ones until enabled again', async (t) => {
    await store.db.query(
      `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, next_attempt_at) VALUES ('msg_held', $1, 'key.revoked', '{"type":"key.revoked","data":{}}', 'pending', 2, now())`,
      [id],
    )
    const paused = await h.call('PATCH', `/v1/webhooks/${id}`, { body: { enabled: false } })
    t.equal(paused.json.enabled, false)
    // Whole: [0] is the newest row alone, and the pause audited twice went unseen (found by a review).
    t.same(await auditOf(), [{ id, changed: ['enabled'], enabled: false }, firstChange], 'one row more, of the pause')
    t.equal((await h.call('GET', '/v1/webhooks')).json.items.find((w: any) => w.id === id).enabled, false, 'listed as paused')
    const made = await h.call('POST', '/v1/keys', { body: { name: 'while paused', type: 'user' } })
    t.equal(made.status, 201)
    h.webhooks.kick()
    await h.webhooks.idle()
    const mine = () => store.db.query<{ id: string; event_type: string; status: string; attempts: number }>('SELECT id, event_type, status, attempts FROM webhook_deliveries WHERE webhook_id = $1 AND event_type <> $2 ORDER BY id', [id, 'key.created'])
    t.same(await mine(), [{ id: 'msg_held', event_type: 'key.revoked', status: 'pending', attempts: 2 }], 'held, not attempted, its attempts unspent')
    t.same(await store.db.query('SELECT 1 FROM webhook_deliveries WHERE webhook_id = $1 AND payload LIKE $2', [id, `%${made.json.id}%`]), [], 'no delivery queued for the key made meanwhile')
    t.notOk(receiver.received.some((hk) => hk.id === 'msg_held'), 'nothing sent')

    const resumed = await h.call('PATCH', `/v1/webhooks/${id}`, { body: { enabled: true } })
    t.equal(resumed.json.enabled, true)
    const held = await receiver.waitFor((hk) => hk.id === 'msg_held')
    t.same(verifiedBy(held, [secret]), [secret], 'the held delivery is sent once enabled again')
    await h.webhooks.idle()
    t.same(await mine(), [{ id: 'msg_held', event_type: 'key.revoked', status: 'delivered', attempts: 3 }])
    trailIs(t, await trailOf(id), [
      { action: 'webhook.updated', details: { id, changed: ['enabled'], enabled: true } },
      { action: 'webhook.updated', details: { id, changed: ['enabled'], enabled: false } },
      { action: 'webhook.updated', details: firstChange },
      { action: 'webhook.created', details: { id, url: `${receiver.url}/a` } },
    ], "the webhook's trail: registered, changed, paused, enabled again, a row each")
  })
})
