// Webhooks end to end: registration, listing, deletion and test-fire through the admin API;
// key events and a debounced rate_limit.exceeded from real traffic through a real gateway;
// every delivery checked by the test's own Standard Webhooks verifier, two signatures after a
// secret rotation (three after a second within the grace); SSRF refusals at registration and
// at delivery (an IP literal and a DNS name that resolves to loopback); redirects refused;
// retries with exponential backoff on a controllable clock; deliveries queued in the store
// surviving a restart and claimed once by several services at the same time, on both stores.
import t from 'tap'
import { randomUUID } from 'node:crypto'
import { hostname } from 'node:os'
import pg from 'pg'
import { AuditCipher } from '../core/audit.ts'
import { EventBus, type EventType } from '../core/events.ts'
import { createLogger, silentLogger } from '../core/log.ts'
import { WebhookService, webhookJson } from '../core/webhooks.ts'
import { generateKey } from '../core/keys/format.ts'
import { startAdmin } from './helpers/admin.ts'
import { bearer, sleep } from './helpers/gateway.ts'
import { DEFAULT_CONFIG, TEST_ENCRYPTION_KEY, endConnections, forEachStore, freshDatabase, openStore, planNodes, recordingDb, testClock } from './helpers/stores.ts'
import { runCli } from './helpers/cli.ts'
import { openDb } from '../core/db.ts'
import { startReceiver, verifiedBy, type Hook, type Receiver } from './helpers/webhooks.ts'
import { gateInFront } from './helpers/tcp-gate.ts'

const ACTOR = { actor: 'test' }
const CIPHER = new AuditCipher(TEST_ENCRYPTION_KEY)
const DEFAULTS = DEFAULT_CONFIG.webhooks

async function until(check: () => boolean | Promise<boolean>): Promise<void> {
  while (!(await check())) await sleep(10)
}

t.test('through the admin API and a gateway', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, {
    gateway: true,
    config: {
      webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 50, retry_base_ms: 20 },
      rate_limits: { per_key: { default: { limit: 2, window_s: 3600 } } },
    },
  })
  const receiver = await startReceiver(t)
  const created = await h.call('POST', '/v1/webhooks', {
    body: { url: `${receiver.url}/keys`, events: ['key.created', 'key.rotated', 'key.revoked', 'rate_limit.exceeded'], description: 'audit sink' },
  })
  t.equal(created.status, 201)
  t.match(created.json, { url: `${receiver.url}/keys`, enabled: true, created_by: `key:${h.adminKeyId}`, description: 'audit sink' })
  t.match(created.json.secret, /^whsec_[A-Za-z0-9+/]{43}=$/, 'a whsec_ secret of 32 bytes')
  const hookId = created.json.id as string
  let secret = created.json.secret as string
  const listed = await h.call('GET', '/v1/webhooks')
  t.same(listed.json.items.map((w: any) => w.id), [hookId])
  t.notOk('secret' in listed.json.items[0], 'the secret is not listed')
  t.notOk(listed.text.includes(secret.slice(6)), 'nor anywhere in the list')
  const ofType = (type: string, match: (d: any) => boolean = () => true) => (hk: Hook) => hk.json?.type === type && match(hk.json.data)

  await t.test('key events, signed, without key material', async (t) => {
    const made = await h.call('POST', '/v1/keys', { body: { name: 'hooked', type: 'user' } })
    const createdHook = await receiver.waitFor(ofType('key.created', (d) => d.key.id === made.json.id))
    t.match(made.json.key, /^kg_/, 'the key made, to look for')
    t.same(verifiedBy(createdHook, [secret]), [secret], 'signature verified')
    t.notOk(createdHook.body.includes(made.json.key), 'no plaintext key')
    t.notOk(/key_hash|keyHash/.test(createdHook.body), 'no key hash')
    t.equal(createdHook.headers['content-type'], 'application/json')
    t.match(createdHook.json, { type: 'key.created', timestamp: String, data: { key: { id: made.json.id, name: 'hooked', status: 'active' } } })
    const rotated = await h.call('POST', `/v1/keys/${made.json.id}/rotate`)
    const rotatedHook = await receiver.waitFor(ofType('key.rotated', (d) => d.previous?.id === made.json.id))
    t.equal(rotatedHook.json.data.key.id, rotated.json.id, 'the new key and the one it replaced')
    t.match(rotated.json.key, /^kg_/, 'the new key, to look for')
    // Before (found by a review): the rotation's answer said until when the old key works, its event did not.
    t.equal(rotatedHook.json.data.previous.valid_until, rotated.json.previous.valid_until, "the replaced key's valid_until, as in the rotation's answer")
    t.equal(rotatedHook.json.data.previous.valid_until, rotatedHook.json.data.previous.grace_until, 'the end of its grace')
    t.notOk(rotatedHook.body.includes(rotated.json.key), 'no plaintext key')
    await h.call('POST', `/v1/keys/${rotated.json.id}/revoke`, { body: { reason: 'done' } })
    const revokedHook = await receiver.waitFor(ofType('key.revoked', (d) => d.key.id === rotated.json.id))
    t.equal(revokedHook.json.data.key.status, 'revoked')
    t.same(verifiedBy(revokedHook, [secret]), [secret])
  })

  await t.test('rate_limit.exceeded once per key within the debounce window', async (t) => {
    const k = await h.keys.create({ name: 'limited', type: 'user' }, ACTOR)
    const statuses: number[] = []
    for (let i = 0; i < 8; i++) statuses.push((await h.through('/x', bearer(k.key))).status)
    t.same(statuses, [200, 200, 429, 429, 429, 429, 429, 429])
    const hook = await receiver.waitFor(ofType('rate_limit.exceeded', (d) => d.key_id === k.record.id))
    t.match(hook.json.data, { key_id: k.record.id, key_type: 'user', limit: 2, address: '127.0.0.1' })
    t.same(verifiedBy(hook, [secret]), [secret])
    await h.webhooks.idle()
    const rows = await h.db.query<{ n: number }>(`SELECT count(*)::int AS n FROM webhook_deliveries WHERE event_type = 'rate_limit.exceeded'`)
    t.equal(rows[0]?.n, 1, 'six refusals, one delivery')
    t.equal(receiver.received.filter(ofType('rate_limit.exceeded')).length, 1)
  })

  await t.test('test-fire, secret rotation with two signatures, the delivery log', async (t) => {
    const fired = await h.call('POST', `/v1/webhooks/${hookId}/test`)
    t.equal(fired.status, 200)
    t.matchStrict(fired.json, { webhook_id: hookId, event_type: 'webhook.test', status: 'delivered', attempts: 1, last_status: 204, last_error: null })
    const testHook = await receiver.waitFor((hk) => hk.id === fired.json.id)
    t.same(verifiedBy(testHook, [secret]), [secret])
    t.equal(testHook.signature.split(' ').length, 1, 'one signature before a rotation')

    const old = secret
    const rotated = await h.call('POST', `/v1/webhooks/${hookId}/rotate-secret`)
    t.equal(rotated.status, 200)
    secret = rotated.json.secret
    t.not(secret, old)
    t.ok(new Date(rotated.json.previous_secret_until).getTime() > Date.now(), 'the previous secret stays valid for a while')
    const again = await h.call('POST', `/v1/webhooks/${hookId}/test`)
    const twice = await receiver.waitFor((hk) => hk.id === again.json.id)
    t.equal(twice.signature.split(' ').length, 2, 'two signatures')
    t.same(verifiedBy(twice, [secret, old]), [secret, old], 'valid with the new secret and with the previous one')
    t.same(verifiedBy(twice, ['whsec_' + Buffer.alloc(32, 1).toString('base64')]), [], 'not with another')

    const log = await h.call('GET', `/v1/webhooks/${hookId}/deliveries`)
    t.equal(log.status, 200)
    t.equal(log.json.items[0].id, again.json.id, 'newest first')
    t.ok(log.json.items.every((d: any) => d.status === 'delivered' && d.attempts === 1 && d.last_status === 204))
    t.ok(log.json.items.some((d: any) => d.event_type === 'key.created'))
    const failed = await h.call('GET', `/v1/webhooks/${hookId}/deliveries?status=failed`)
    t.same(failed.json.items, [])
    const audit = await h.db.query<{ action: string }>(`SELECT action FROM api_key_audit_log WHERE action LIKE 'webhook.%' ORDER BY created_at`)
    // A test event is an admin action that makes keygate send a request: audited too.
    t.same(audit.map((r) => r.action), ['webhook.created', 'webhook.tested', 'webhook.secret_rotated', 'webhook.tested'])

    // A rotation retried (its answer lost): the original secret still signs until the first answer's end.
    const retried = await h.call('POST', `/v1/webhooks/${hookId}/rotate-secret`)
    t.equal(retried.status, 200)
    t.same(retried.json.previous_secrets_until, [retried.json.previous_secret_until, rotated.json.previous_secret_until], 'each rotated-out secret with the end its rotation answered')
    const listedAfter = await h.call('GET', '/v1/webhooks')
    t.same(listedAfter.json.items.find((w: any) => w.id === hookId).previous_secrets_until, retried.json.previous_secrets_until, 'listed too')
    const third = await h.call('POST', `/v1/webhooks/${hookId}/test`)
    const thrice = await receiver.waitFor((hk) => hk.id === third.json.id)
    t.same(verifiedBy(thrice, [retried.json.secret, secret, old]), [retried.json.secret, secret, old], 'three signatures: the new secret, the one it replaced and the original')
    secret = retried.json.secret
  })

  await t.test('SSRF: refused at registration', async (t) => {
    const strict = await startAdmin(t, store.db)
    const refused = [
      'http://127.0.0.1/',
      'http://127.0.0.1:8081/v1/keys',
      'http://[::1]/',
      'http://[::ffff:127.0.0.1]/',
      'http://[::ffff:7f00:1]/',
      'http://169.254.169.254/latest/meta-data/',
      'http://[::ffff:169.254.169.254]/',
      'http://2130706433/',
      'http://0x7f000001/',
      'http://0x7f.0.0.1/',
      'http://0177.0.0.1/',
      'http://127.1/',
      'http://10.0.0.1/',
      'http://172.16.5.4/',
      'http://192.168.1.1/',
      'http://100.64.0.1/',
      'http://0.0.0.0/',
      'http://[fe80::1]/',
      'http://[fd00:ec2::254]/',
      'http://[64:ff9b::7f00:1]/',
      'http://[::127.0.0.1]/', // IPv4-compatible (::/96): the URL parser makes it ::7f00:1
      'http://[::a9fe:a9fe]/',
      'http://224.0.0.1/',
      'http://localhost/',
      'http://localhost.:8080/',
      'ftp://example.com/',
      'file:///etc/passwd',
      'http://user:pw@203.0.113.9/',
      'not-a-url',
    ]
    for (const url of refused) {
      const a = await strict.call('POST', '/v1/webhooks', { body: { url, events: ['key.created'] } })
      t.equal(a.status, 400, url)
      t.equal(a.json?.error?.code, 'webhook_url_refused', url)
      const field = a.json?.error?.details?.fields?.[0]
      t.equal(field?.field, 'url', `${url}: the field named`)
      t.equal(`url: ${field?.message}`, a.json?.error?.message, `${url}: the field's message without its name, as validation_failed's`)
    }
    // A name is told by what it resolves to, in a sentence: before (found by a docs walk), "url:
    // localhost resolves to 127.0.0.1 is a loopback address".
    const byName = await strict.call('POST', '/v1/webhooks', { body: { url: 'http://localhost/', events: ['key.created'] } })
    t.match(byName.json?.error?.message, /^url: localhost resolves to a refused address \((127\.0\.0\.1|::1) is a loopback address\); add it to webhooks\.allow_private to allow an internal receiver$/)
    const allowed = await h.call('POST', '/v1/webhooks', { body: { url: 'http://127.0.0.1:9/allow-listed', events: ['key.expiring'] } })
    t.equal(allowed.status, 201, 'an address in webhooks.allow_private is accepted')
    t.equal(allowed.json.enabled, true, 'enabled by default')
    // Registered paused in one call (before, found by a review: a create, then a PATCH).
    const paused = await h.call('POST', '/v1/webhooks', { body: { url: 'http://127.0.0.1:9/paused', events: ['key.expiring'], enabled: false } })
    t.equal(paused.status, 201, paused.text)
    t.equal(paused.json.enabled, false)
    t.equal((await h.call('GET', `/v1/webhooks/${paused.json.id}`)).json.enabled, false, 'stored paused')
    // Port 0 reaches no server (before, found by a review: taken, and never deliverable).
    for (const url of ['http://127.0.0.1:0/d', 'https://93.184.215.14:0/d']) {
      const zero = await h.call('POST', '/v1/webhooks', { body: { url, events: ['key.expiring'] } })
      t.equal(zero.json?.error?.code, 'webhook_url_refused', `${url}: refused`)
      t.match(zero.json?.error?.message, /port 0/)
    }
    const bad = await strict.call('POST', '/v1/webhooks', { body: { url: 'http://93.184.215.14/', events: ['key.deleted'] } })
    t.equal(bad.json.error.code, 'validation_failed', 'unknown event type')
  })

  await t.test('a key split by a character the URL parser drops is refused as written', async (t) => {
    // Before (found by a review): `?api_key=<half>\t<half>` passed the key check, which read the
    // text as written; the URL parser then dropped the tab, and the working key was stored,
    // listed, audited and requested with every delivery.
    const { key } = await h.keys.create({ name: 'split-in-url', type: 'user' }, ACTOR)
    const [head, tail] = [key.slice(0, 10), key.slice(10)]
    for (const [what, url] of [
      ['a tab', `${receiver.url}/split?api_key=${head}\t${tail}`],
      ['a line feed', `${receiver.url}/split?api_key=${head}\n${tail}`],
      ['a carriage return', `${receiver.url}/split/${head}\r${tail}`],
      ['a space at the end', `${receiver.url}/split `],
      ['a backslash', `${receiver.url}\\split`],
      ['a bidi mark', `${receiver.url}/split\u200e`],
    ] as const) {
      const a = await h.call('POST', '/v1/webhooks', { body: { url, events: ['key.revoked'] } })
      t.equal(a.status, 400, what)
      t.equal(a.json?.error?.code, 'validation_failed', `${what}: validation_failed`)
      t.match(a.json?.error?.message, /^url: .*without spaces, line breaks, backslashes, control characters or invisible format characters/, `${what}: names url and what it may not hold`)
      t.notOk(a.text.includes(key), `${what}: the key is not quoted whole`)
      // Nor its halves either side of the character (found by a docs walk): the message quoted
      // the URL, `…?api_key=kg_…\t…`, the key whole to anyone reading it but for the tab.
      t.notOk(a.text.includes(key.slice(16, 24)), `${what}: no part of the key's secret is quoted`)
    }
    t.notOk((await h.call('GET', '/v1/webhooks')).json.items.some((w: any) => w.url.includes('/split')), 'none was registered')
    const audit = await h.call('GET', '/v1/audit?action=webhook.created&limit=100')
    t.equal(audit.status, 200)
    t.notOk(audit.text.includes(key), 'nor audited')
  })

  await t.test('a failed delivery sent again through the admin API, one or a range; audited', async (t) => {
    // Failed for good, as after a receiver's outage longer than the retries.
    const payloads = [0, 1, 2].map((n) => JSON.stringify({ type: 'key.revoked', timestamp: new Date().toISOString(), data: { key: { id: `gone${n}` } } }))
    const failedIds = ['msg_again1', 'msg_again2', 'msg_again3']
    for (const [i, id] of failedIds.entries()) {
      await h.db.query(
        `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, last_status, last_error, created_at)
         VALUES ($1, $2, 'key.revoked', $3, 'failed', 8, 503, 'the receiver answered 503', now() - interval '1 hour' + $4 * interval '1 second')`,
        [id, hookId, payloads[i], i],
      )
    }
    const one = await h.call('POST', `/v1/webhooks/${hookId}/deliveries/msg_again1/retry`)
    t.equal(one.status, 200, one.text)
    t.match(one.json, { id: 'msg_again1', status: 'pending', attempts: 8, last_status: 503 })
    const sent = await receiver.waitFor((hk) => hk.id === 'msg_again1')
    t.same(verifiedBy(sent, [secret]), [secret], 'signed, under its webhook-id')
    t.equal(sent.body, payloads[0], 'its payload as queued')
    await until(async () => (await h.call('GET', `/v1/webhooks/${hookId}/deliveries?status=failed`)).json.items.length === 2)
    const again = await h.call('POST', `/v1/webhooks/${hookId}/deliveries/msg_again1/retry`)
    t.equal(again.status, 409)
    t.equal(again.json.error.code, 'conflict')
    t.match(again.json.error.message, /was delivered at/)
    const unknown = await h.call('POST', `/v1/webhooks/${hookId}/deliveries/msg_nope/retry`)
    t.equal(unknown.status, 404)
    t.equal(unknown.json.error.code, 'delivery_not_found')
    t.equal((await h.call('POST', `/v1/webhooks/wh_nope/deliveries/msg_again2/retry`)).json.error.code, 'webhook_not_found')

    const bad = await h.call('POST', `/v1/webhooks/${hookId}/deliveries/retry`, { body: { from: 'yesterday' } })
    t.equal(bad.status, 400)
    t.match(bad.json.error, { code: 'validation_failed', message: /from/ })
    const backwards = await h.call('POST', `/v1/webhooks/${hookId}/deliveries/retry`, { body: { from: new Date().toISOString(), to: new Date(Date.now() - 60_000).toISOString() } })
    t.equal(backwards.status, 400, 'from after to')
    const all = await h.call('POST', `/v1/webhooks/${hookId}/deliveries/retry`, { body: {} })
    t.equal(all.status, 200, all.text)
    t.equal(all.json.retried, 2, 'the two still failed, over the last 24 hours')
    for (const id of failedIds.slice(1)) await receiver.waitFor((hk) => hk.id === id)
    const audit = await h.db.query<{ action: string }>(`SELECT action FROM api_key_audit_log WHERE action = 'webhook.deliveries_retried'`)
    t.equal(audit.length, 2, 'each an audited admin action')
    const listed = await h.call('GET', '/v1/audit?action=webhook.deliveries_retried')
    t.same(listed.json.items.map((a: any) => a.details.retried).sort(), [1, 2], 'with how many')
    // Every field has its default, so no body is the last 24 hours (before, found by a review: 400).
    const bodiless = await h.call('POST', `/v1/webhooks/${hookId}/deliveries/retry`)
    t.equal(bodiless.status, 200, bodiless.text)
    t.equal(bodiless.json.retried, 0, 'none failed since')
  })

  await t.test('delete', async (t) => {
    const gone = await h.call('DELETE', `/v1/webhooks/${hookId}`)
    t.equal(gone.status, 200)
    t.equal(gone.json.id, hookId)
    t.equal((await h.call('DELETE', `/v1/webhooks/${hookId}`)).json.error.code, 'webhook_not_found')
    t.equal((await h.call('GET', `/v1/webhooks/${hookId}/deliveries`)).json.error.code, 'webhook_not_found')
    t.equal((await h.call('POST', `/v1/webhooks/${hookId}/test`)).json.error.code, 'webhook_not_found')
    await h.webhooks.purgeDeleted()
    const rows = await h.db.query<{ n: number }>('SELECT count(*)::int AS n FROM webhook_deliveries WHERE webhook_id = $1', [hookId])
    t.equal(rows[0]?.n, 0, 'its deliveries went once the purge ran')
  })
})

await forEachStore(t, async (t, store) => {
  const clock = testClock()
  const nowS = () => Math.floor(clock.now().getTime() / 1000)
  const config = (over: Record<string, unknown> = {}) => ({ ...DEFAULTS, allow_private: ['127.0.0.1/32', '::1/128'], retry_base_ms: 1000, max_attempts: 3, ...over })
  // The test's clock is the instances' own and the store's: time passes when the test moves it.
  const service = (over: Record<string, unknown> = {}, deliver = true, cipher = CIPHER) => {
    const s = new WebhookService({ db: store.db, cipher, config: config(over), log: silentLogger, now: clock.now, storeNow: clock.now, deliver })
    t.teardown(() => s.close())
    return s
  }
  const run = async (s: WebhookService) => {
    s.kick()
    await s.idle()
  }
  const bus = new EventBus({ now: clock.now })
  // Each subtest listens for its own event type: the store is shared by them.
  const event = (type: EventType, data: Record<string, unknown>) => {
    let captured: any
    const off = bus.on((e) => (captured = e))
    bus.emit(type, data)
    off()
    return captured
  }
  const deliveriesOf = (webhookId: string) => store.db.query<any>('SELECT * FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY created_at, id', [webhookId])

  await t.test('a URL already registered for an event is refused for that event, also when two registrations race', async (t) => {
    // Before (found by a review): two registrations at once both succeeded, and every event was
    // delivered twice to the receiver, under two webhook ids that no deduplication could match.
    const s = service()
    const url = 'http://127.0.0.1:9/twice'
    const both = await Promise.allSettled([s.create({ url, events: ['key.revoked', 'key.created'] }, ACTOR), s.create({ url, events: ['key.revoked'] }, ACTOR)])
    t.equal(both.filter((r) => r.status === 'fulfilled').length, 1, 'one of two at once is registered')
    const refused = both.find((r) => r.status === 'rejected')?.reason
    t.match(refused, { code: 'conflict', message: /already sends key\.revoked to http:\/\/127\.0\.0\.1:9\/twice/ }, 'the other is a conflict naming the event')
    // key.revoked is the event both of the racing two had: either may have won (a loaded machine
    // let the second win, and key.created then overlapped nothing).
    await t.rejects(s.create({ url, events: ['key.expiring', 'key.revoked'] }, ACTOR), { code: 'conflict' }, 'an overlap of one event is enough')
    // A fragment is never sent and an empty query is none: the same receiver (found by a review).
    await t.rejects(s.create({ url: `${url}#again`, events: ['key.revoked'] }, ACTOR), { code: 'conflict' }, 'the URL with a fragment is the same receiver')
    await t.rejects(s.create({ url: `${url}?`, events: ['key.revoked'] }, ACTOR), { code: 'conflict' }, 'and with an empty query')
    const other = await s.create({ url: `${url}?#x`, events: ['anomaly.detected'] }, ACTOR)
    t.same(other.webhook.events, ['anomaly.detected'], 'other events to the same URL are a webhook of their own')
    t.equal(other.webhook.url, url, 'stored without the fragment and the empty query')
    const rows = await store.db.query<{ id: string }>('SELECT id FROM webhooks WHERE url = $1', [url])
    t.equal(rows.length, 2)
    // The store is shared with the subtests below, which count deliveries of these events.
    for (const r of rows) await s.remove(r.id, ACTOR)
  })

  await t.test('a key in the URL is refused also when percent-encoded, and a malformed escape is no error', async (t) => {
    // Before (found by a review): `?api_key=kg%5F...` passed the check, which looked for a literal
    // `_`, and was stored, listed, audited and requested with every delivery; the receiver decodes it
    // to a working key. (No deliveries: a delivering service left running takes later subtests' deliveries.)
    const s = service({}, false)
    const { key } = generateKey('kg_')
    const encoded = key.replaceAll('_', '%5F')
    for (const url of [
      `http://127.0.0.1:9/in?api_key=${encoded}`,
      `http://127.0.0.1:9/in?x=%zz&api_key=${key.replaceAll('_', '%5f')}&y=%`,
      `http://127.0.0.1:9/in/${encoded}`,
      `http://127.0.0.1:9/in?api_key=${key.replaceAll('_', '%255F')}`,
      `http://user:${encoded}@127.0.0.1:9/in`,
    ]) {
      const err = await s.create({ url, events: ['key.created'] }, ACTOR).then(() => undefined, (e: Error) => e)
      t.match(err, { code: 'validation_failed', message: /^url: holds what looks like a keygate API key/ }, url.replace(/kg.*?(&|@|$)/, 'KEY$1'))
      t.notOk(err?.message.includes(encoded) || err?.message.includes(key), 'not quoted')
    }
    t.equal((await store.db.query('SELECT id FROM webhooks WHERE url LIKE $1', ['%127.0.0.1:9/in%'])).length, 0, 'none was stored')
    const fine = await s.create({ url: 'http://127.0.0.1:9/in?q=%zz%&n=100%25', events: ['key.created'] }, ACTOR)
    t.equal(fine.webhook.url, 'http://127.0.0.1:9/in?q=%zz%&n=100%25', 'a URL with malformed escapes and no key is registered as before')
    await s.remove(fine.webhook.id, ACTOR)
  })

  await t.test('a key split by a character the URL parser drops is refused in the URL as parsed', async (t) => {
    // The service itself (the API's schema aside) checks the URL it stores and requests: the
    // parser's reading of what was written (before, found by a review, only the text as written).
    const s = service({}, false)
    const { key } = generateKey('kg_')
    const [head, tail] = [key.slice(0, 10), key.slice(10)]
    for (const url of [
      `http://127.0.0.1:9/split?api_key=${head}\t${tail}`,
      `http://127.0.0.1:9/split/${head}\n${tail}`,
      `\thttp://127.0.0.1:9/split?api_key=${head}\r\n${tail}`,
      // The host's IDNA mapping drops a soft hyphen (and lowercases, which the check still finds).
      `http://${head}\u00ad${tail}.example/split`,
    ]) {
      const err = await s.create({ url, events: ['key.revoked'] }, ACTOR).then(() => undefined, (e: Error) => e)
      t.match(err, { code: 'validation_failed', message: /^url: holds what looks like a keygate API key/ }, JSON.stringify(url.replace(head, 'HEAD').replace(tail, 'TAIL')))
      t.notOk(err?.message.includes(tail), 'not quoted')
    }
    t.equal((await store.db.query('SELECT id FROM webhooks WHERE url LIKE $1', ['%/split%'])).length, 0, 'none was stored')
    const fine = await s.create({ url: 'http://127.0.0.1:9/split?q=a%09b', events: ['key.revoked'] }, ACTOR)
    t.equal(fine.webhook.url, 'http://127.0.0.1:9/split?q=a%09b', 'a percent-encoded tab is kept, as written')
    await s.remove(fine.webhook.id, ACTOR)
  })

  await t.test('enqueueMany: each event for every webhook taking it, in statements of at most 1,000 deliveries; a dedupe key repeated in one call is queued once, the first', async (t) => {
    const s = service({}, false)
    const tag = randomUUID()
    const a = (await s.create({ url: `http://127.0.0.1:9/many-a/${tag}`, events: ['anomaly.detected'] }, ACTOR)).webhook
    const b = (await s.create({ url: `http://127.0.0.1:9/many-b/${tag}`, events: ['anomaly.detected', 'rate_limit.exceeded'] }, ACTOR)).webhook
    const events = [
      event('anomaly.detected', { id: `an_${tag}_1`, note: 'first' }),
      event('rate_limit.exceeded', { key_id: `k_${tag}`, window_start: 1 }),
      event('anomaly.detected', { id: `an_${tag}_1`, note: 'second' }),
      ...Array.from({ length: 1200 }, (_, i) => event('anomaly.detected', { id: `an_${tag}_x${i}` })),
    ]
    t.equal(await s.enqueueMany(events), 2 + 1 + 2 * 1200, 'the deliveries queued')
    const ofA = await deliveriesOf(a.id)
    const ofB = await deliveriesOf(b.id)
    t.equal(ofA.length, 1201)
    t.equal(ofB.length, 1202, 'and the rate limit event for the webhook that takes it')
    for (const rows of [ofA, ofB]) {
      const first = rows.filter((d: { dedupe_key: string }) => d.dedupe_key === `anomaly:an_${tag}_1`)
      t.equal(first.length, 1, 'the repeated dedupe key once')
      t.match(JSON.parse(first[0]?.payload ?? '{}'), { data: { note: 'first' } }, 'the first of the two')
    }
    t.equal(await s.enqueueMany(events.slice(3, 10)), 0, 'queued again: nothing, each dedupe key is queued already')
    // The store is shared: later subtests count the webhooks of anomaly.detected.
    for (const w of [a, b]) await s.remove(w.id, ACTOR)
  })

  await t.test('retries with exponential backoff, then delivered; failed after max_attempts', async (t) => {
    let answers = [500, 503, 204]
    const receiver = await startReceiver(t, (_h, res) => res.writeHead(answers.shift() ?? 500).end())
    const s = service()
    const { webhook, secret } = await s.create({ url: `${receiver.url}/retry`, events: ['key.revoked'] }, ACTOR)
    await s.enqueue(event('key.revoked', { key: { id: 'k1' } }))
    await s.idle()
    let [d] = await deliveriesOf(webhook.id)
    t.match(d, { status: 'pending', attempts: 1, last_status: 500 })
    t.equal(new Date(d.next_attempt_at).getTime() - clock.now().getTime(), 1000, 'first wait: retry_base_ms')
    await run(s)
    t.equal((await deliveriesOf(webhook.id))[0].attempts, 1, 'not before it is due')
    clock.advance(1000)
    await run(s)
    ;[d] = await deliveriesOf(webhook.id)
    t.match(d, { status: 'pending', attempts: 2, last_status: 503 })
    t.equal(new Date(d.next_attempt_at).getTime() - clock.now().getTime(), 2000, 'then twice as long')
    clock.advance(2000)
    await run(s)
    ;[d] = await deliveriesOf(webhook.id)
    t.matchStrict(d, { status: 'delivered', attempts: 3, last_status: 204, last_error: null })
    t.equal(receiver.received.length, 3)
    t.equal(new Set(receiver.received.map((r) => r.id)).size, 1, 'the same webhook-id on every attempt')
    t.ok(receiver.received.every((r) => verifiedBy(r, [secret], 300, nowS()).length === 1))

    answers = []
    await s.enqueue(event('key.revoked', { key: { id: 'k2' } }))
    await s.idle()
    for (let i = 0; i < 3; i++) {
      clock.advance(10_000)
      await run(s)
    }
    const last = (await deliveriesOf(webhook.id))[1]
    t.match(last, { status: 'failed', attempts: 3, last_status: 500, last_error: 'the receiver answered 500' })
    // Its receiver closes with this subtest: left registered, the webhook took the next subtest's
    // key.revoked too, and that delivery's refused attempt, ending late on a loaded machine, woke
    // the 'frozen' instance there, which took the delivery over itself (seen in two CI runs).
    await s.remove(webhook.id, ACTOR)
  })

  await t.test("a failed attempt is recorded with one read of its webhook's row (found by a review)", async (t) => {
    const receiver = await startReceiver(t, (_h, res) => res.writeHead(500).end())
    const seen: Array<{ sql: string; params: unknown[] }> = []
    const s = new WebhookService({ db: recordingDb(store.db, seen), cipher: CIPHER, config: config(), log: silentLogger, now: clock.now, storeNow: clock.now })
    t.teardown(() => s.close())
    const { webhook } = await s.create({ url: `${receiver.url}/once`, events: ['key.revoked'] }, ACTOR)
    await s.enqueue(event('key.revoked', { key: { id: 'k-once' } }))
    await s.idle()
    t.match((await deliveriesOf(webhook.id))[0], { status: 'pending', attempts: 1, last_status: 500, last_error: 'the receiver answered 500' })
    const recorded = seen.filter((q) => q.sql.startsWith('UPDATE webhook_deliveries') && q.sql.includes('last_error = $6'))
    t.equal(recorded.length, 1, 'the failure recorded by one statement')
    for (const q of recorded) {
      const [plan] = await store.db.query<{ 'QUERY PLAN': unknown }>(`EXPLAIN (FORMAT JSON) ${q.sql}`, q.params)
      // Before: three, the status's EXISTS and the two columns of RETURNING each a subquery of its own.
      t.equal(planNodes(plan?.['QUERY PLAN']).filter((n) => n['Relation Name'] === 'webhooks').length, 1, "the webhook's row read once")
    }
    await s.remove(webhook.id, ACTOR)
  })

  await t.test('failed deliveries sent again: one by id, or those queued in a range, each with max_attempts more attempts and its webhook-id kept', async (t) => {
    // Before (found by a review): a delivery that failed for good could only be read in the log.
    let status = 500
    const receiver = await startReceiver(t, (_h, res) => res.writeHead(status).end())
    const s = service()
    // Asks to send again without sending (it kicks its own round): \`s\` sends when the test runs it.
    const quiet = service({}, false)
    const { webhook } = await s.create({ url: `${receiver.url}/again`, events: ['key.expiring'] }, ACTOR)
    const queuedAt: Date[] = []
    for (const id of ['a1', 'a2', 'a3']) {
      queuedAt.push(clock.now())
      await s.enqueue(event('key.expiring', { key: { id } }))
      clock.advance(1000)
    }
    for (let i = 0; i < 4; i++) {
      clock.advance(10_000)
      await run(s)
    }
    const failed = await deliveriesOf(webhook.id)
    t.same(failed.map((d) => [d.status, d.attempts]), [['failed', 3], ['failed', 3], ['failed', 3]], 'all three failed after max_attempts')
    const [first, second, third] = failed
    const before = receiver.received.length

    status = 204
    const retried = await quiet.retryDelivery(webhook.id, second.id, ACTOR)
    t.match(retried, { id: second.id, status: 'pending', attempts: 3, lastStatus: 500 }, 'pending again, its attempt count going on, its last answer kept until the next')
    t.equal(retried.nextAttemptAt.getTime(), clock.now().getTime(), 'due now')
    await run(s)
    t.match((await deliveriesOf(webhook.id))[1], { status: 'delivered', attempts: 4, retry_base: 3, last_status: 204 })
    t.same(receiver.received.slice(before).map((r) => r.id), [second.id], 'sent once, under its webhook-id')

    const refused = async (p: Promise<unknown>) => p.then(() => undefined, (err: { code: string; message: string }) => err)
    t.match(await refused(quiet.retryDelivery(webhook.id, second.id, ACTOR)), { code: 'conflict', message: /^delivery msg_\w+ was delivered at .*; only a failed delivery is sent again$/ })
    t.match(await refused(quiet.retryDelivery(webhook.id, 'msg_none', ACTOR)), { code: 'delivery_not_found' })
    t.match(await refused(quiet.retryDelivery('wh_none', second.id, ACTOR)), { code: 'webhook_not_found' })

    // The range picks by when each was queued: [first's time, third's) holds the first alone.
    t.equal(await quiet.retryFailed(webhook.id, { from: queuedAt[0] as Date, to: queuedAt[2] as Date }, ACTOR), 1, 'the failed one in the range; the delivered one in it is left')
    const [d1, , d3] = await deliveriesOf(webhook.id)
    t.match(d1, { status: 'pending', attempts: 3, retry_base: 3 })
    t.equal(new Date(d1.next_attempt_at).getTime(), new Date(d1.created_at).getTime(), 'due since it was queued: sent oldest first')
    t.match(d3, { status: 'failed' }, 'the one after the range is left')
    t.equal(await quiet.retryFailed(webhook.id, { from: queuedAt[0] as Date, to: clock.now() }, ACTOR), 1, 'the third; the first is pending already')
    t.match(await refused(quiet.retryDelivery(webhook.id, first.id, ACTOR)), { code: 'conflict', message: /is pending: its next attempt is at / })
    await run(s)
    t.same((await deliveriesOf(webhook.id)).map((d) => d.status), ['delivered', 'delivered', 'delivered'])
    t.same(new Set(receiver.received.slice(before).map((r) => r.id)), new Set([first.id, second.id, third.id]), 'each sent again once')
    t.equal(await quiet.retryFailed(webhook.id, { from: queuedAt[0] as Date, to: clock.now() }, ACTOR), 0, 'nothing failed is left')

    // Sent again, it gets max_attempts (3) more, with the backoff from its first wait; the count
    // only grows, so a stale attempt's outcome (written only while the count is its claim's)
    // can never be taken for a later one's.
    status = 500
    await s.enqueue(event('key.expiring', { key: { id: 'a4' } }))
    for (let i = 0; i < 4; i++) {
      clock.advance(10_000)
      await run(s)
    }
    const fourth = (await deliveriesOf(webhook.id))[3]
    t.match(fourth, { status: 'failed', attempts: 3 })
    await quiet.retryDelivery(webhook.id, fourth.id, ACTOR)
    await run(s)
    let again = (await deliveriesOf(webhook.id))[3]
    t.match(again, { status: 'pending', attempts: 4 })
    t.equal(new Date(again.next_attempt_at).getTime() - clock.now().getTime(), 1000, 'first wait again: retry_base_ms')
    clock.advance(1000)
    await run(s)
    t.match((await deliveriesOf(webhook.id))[3], { status: 'pending', attempts: 5 })
    clock.advance(2000)
    await run(s)
    again = (await deliveriesOf(webhook.id))[3]
    t.match(again, { status: 'failed', attempts: 6, retry_base: 3 }, 'failed for good after three more')
    await s.remove(webhook.id, ACTOR)
  })

  await t.test('an attempt that outlives its lease does not undo the delivery another process made meanwhile', async (t) => {
    let release: (() => void) | undefined
    let answered = 0
    const receiver = await startReceiver(t, (_h, res) => {
      // The first attempt hangs until the test lets it fail; later ones succeed.
      if (++answered === 1) release = () => res.writeHead(500).end()
      else res.writeHead(204).end()
    })
    const a = service({ timeout_ms: 90_000 })
    const b = service({ timeout_ms: 90_000 })
    const { webhook } = await a.create({ url: `${receiver.url}/lease`, events: ['key.revoked'] }, ACTOR)
    t.equal(await a.enqueue(event('key.revoked', { key: { id: 'k-lease' } })), 1, 'one delivery: no other webhook takes the event')
    a.kick()
    await receiver.waitFor((h) => h.path === '/lease')
    let [d] = await deliveriesOf(webhook.id)
    t.ok(new Date(d.next_attempt_at).getTime() >= clock.now().getTime() + 90_000, "the claim's lease outlasts the attempt's timeout")
    // `a` is frozen past its lease: 200 s pass on the store's clock (past the timeout and the
    // margin) while its attempt hangs, and `b` takes the delivery over. (Before, `b`'s own clock
    // ran 200 s ahead to see the lease run out: the very skew a review found sending deliveries
    // twice; deadlines are now the store's. `a` is not kicked: it too may take over an ended lease.)
    clock.advance(200_000)
    await run(b)
    ;[d] = await deliveriesOf(webhook.id)
    t.equal(d.status, 'delivered', 'delivered by the other process')
    ;(release as () => void)()
    await a.idle()
    ;[d] = await deliveriesOf(webhook.id)
    t.equal(d.status, 'delivered', "the first attempt's late failure does not set it back to pending")
    t.equal(d.attempts, 2, 'two attempts, no third')
    t.equal(d.last_status, 204)
  })

  await t.test('queued deliveries survive a restart and are sent once by several services at once', async (t) => {
    const receiver = await startReceiver(t)
    const before = service({}, false)
    const { webhook, secret } = await before.create({ url: `${receiver.url}/queued`, events: ['key.created'] }, ACTOR)
    for (let i = 0; i < 30; i++) t.equal(await before.enqueue(event('key.created', { key: { id: `q${i}` } })), 1, 'queued in the store')
    t.equal(receiver.received.length, 0, 'nothing sent by a service that only queues')
    const instances = [service(), service(), service()]
    for (const s of instances) s.start()
    await until(() => receiver.received.length >= 30)
    await Promise.all(instances.map((s) => s.idle()))
    t.equal(receiver.received.length, 30, 'each delivery sent once')
    t.equal(new Set(receiver.received.map((r) => r.id)).size, 30)
    t.ok(receiver.received.every((r) => verifiedBy(r, [secret], 300, nowS()).length === 1))
    const rows = await deliveriesOf(webhook.id)
    t.equal(rows.length, 30, 'thirty deliveries in the log')
    t.ok(rows.every((r) => r.status === 'delivered' && r.attempts === 1))
    // Polling on, they claimed later subtests' deliveries too (the hanging receiver then got
    // 12 attempts, not the 5 of one service).
    await Promise.all(instances.map((s) => s.close()))
  })

  await t.test('SSRF at delivery: an IP literal and a name resolving to loopback, with no allow-list', async (t) => {
    const receiver = await startReceiver(t)
    const lenient = service({}, false)
    const strict = service({ allow_private: [] })
    const byIp = await lenient.create({ url: `http://127.0.0.1:${receiver.port}/ip`, events: ['key.rotated'] }, ACTOR)
    const byName = await lenient.create({ url: `http://localhost:${receiver.port}/name`, events: ['key.rotated'] }, ACTOR)
    await lenient.enqueue(event('key.rotated', { key: { id: 'ssrf' } }))
    await run(strict)
    t.equal(receiver.received.length, 0, 'nothing reached the receiver')
    const [ip] = await deliveriesOf(byIp.webhook.id)
    const [name] = await deliveriesOf(byName.webhook.id)
    t.matchStrict(ip, { status: 'pending', attempts: 1, last_status: null, last_error: /127\.0\.0\.1 is a loopback address/ })
    t.matchStrict(name, { status: 'pending', attempts: 1, last_status: null, last_error: /localhost resolves to .* is a loopback address/ })
    // Registered through a process that allows the address, refused by one that does not: the
    // log names the process whose webhooks.allow_private differs. Before (found by a review), it
    // did not say which of the processes sharing the store refused, nor that each checks its own.
    const refusedBy = `(refused by the keygate process on ${hostname()}, pid ${process.pid}: each process that delivers checks the address against its own webhooks.allow_private)`
    for (const d of [ip, name]) t.ok(String(d.last_error).endsWith(refusedBy), `names the process that refused: ${d.last_error}`)
  })

  await t.test('redirects are not followed', async (t) => {
    const elsewhere = await startReceiver(t)
    const receiver = await startReceiver(t, (_h, res) => res.writeHead(307, { location: `${elsewhere.url}/stolen` }).end())
    const s = service()
    const { webhook } = await s.create({ url: `${receiver.url}/moved`, events: ['key.expiring'] }, ACTOR)
    await s.enqueue(event('key.expiring', { key: { id: 'r' } }))
    await s.idle()
    const [d] = await deliveriesOf(webhook.id)
    t.match(d, { status: 'pending', last_status: 307, last_error: /redirects are not followed/ })
    t.equal(elsewhere.received.length, 0, 'the redirect target got nothing')
  })

  // Before (found by a docs walk): the delivery log and the warning said only "The operation was
  // aborted due to timeout", the abort signal's words, naming neither the wait nor the setting.
  await t.test('a receiver that does not answer in time: the attempt fails naming the wait and webhooks.timeout_ms', async (t) => {
    const hanging = await startReceiver(t, () => {})
    const s = service({ timeout_ms: 300 })
    const { webhook } = await s.create({ url: `${hanging.url}/slow`, events: ['key.expiring'] }, ACTOR)
    await s.enqueue(event('key.expiring', { key: { id: 'slow' } }))
    await s.idle()
    const [d] = await deliveriesOf(webhook.id)
    t.match(d, { status: 'pending', attempts: 1, last_status: null, last_error: 'the receiver did not answer within 300 ms (webhooks.timeout_ms)' })
    await s.remove(webhook.id, ACTOR)
  })

  await t.test('a receiver that never answers does not hold up the deliveries to another', async (t) => {
    // It reads the request and holds the socket: each attempt to it lasts until timeout_ms.
    const held: Array<() => void> = []
    const hanging = await startReceiver(t, (_h, res) => held.push(() => res.writeHead(500).end()))
    const healthy = await startReceiver(t)
    const s = service({ timeout_ms: 3000 })
    const slow = await s.create({ url: `${hanging.url}/hangs`, events: ['anomaly.detected'] }, ACTOR)
    const fast = await s.create({ url: `${healthy.url}/answers`, events: ['anomaly.detected'] }, ACTOR)
    for (let i = 0; i < 40; i++) t.equal(await s.enqueue(event('anomaly.detected', { id: `an_hang${i}` })), 2)
    await until(() => healthy.received.length >= 40)
    const slowRows = await deliveriesOf(slow.webhook.id)
    t.ok(
      slowRows.every((d) => d.last_status === null && d.last_error === null),
      'all 40 arrived at the healthy receiver before any attempt to the hanging one ended (its timeout)',
    )
    t.ok(hanging.received.length >= 1 && hanging.received.length <= 5, `the hanging receiver holds at most a quarter of the slots (${hanging.received.length} attempts)`)
    // Each is recorded once its answer is in (the receiver may have all 40 a moment before).
    const delivered = async () => (await deliveriesOf(fast.webhook.id)).every((d) => d.status === 'delivered' && d.attempts === 1)
    await until(delivered)
    t.ok(await delivered(), 'each delivered at its first attempt')
    // close() stops claiming and waits for the attempts in flight: answered now, they fail.
    const closing = s.close()
    for (const answer of held) answer()
    await closing
    const after = await deliveriesOf(slow.webhook.id)
    t.equal(after.filter((d) => d.last_status === 500).length, hanging.received.length, 'the attempts in flight were recorded on close')
    t.equal(after.filter((d) => d.attempts > 0).length, hanging.received.length, 'and no more were claimed')
    for (const w of [slow, fast]) await s.remove(w.webhook.id, ACTOR)
  })

  await t.test('receivers that never answer, enough to take every slot, do not hold up the deliveries to another', async (t) => {
    // Six receivers that hold each request (a firewall dropping the packets, a receiver decommissioned
    // behind a load balancer that never answers): more than the pool's 20 slots at 5 a webhook.
    // Before, found by a review, four of them took all 20 and a healthy receiver got about one
    // delivery each time a timeout freed a slot: 99 revocations took a minute to reach it.
    const held: Array<() => void> = []
    const hanging = await Promise.all(Array.from({ length: 6 }, () => startReceiver(t, (_h, res) => held.push(() => res.writeHead(500).end()))))
    const healthy = await startReceiver(t)
    const s = service({ timeout_ms: 10_000 })
    const tag = randomUUID()
    const slow = await Promise.all(hanging.map((r, i) => s.create({ url: `${r.url}/hangs-${i}/${tag}`, events: ['anomaly.detected'] }, ACTOR)))
    const fast = await s.create({ url: `${healthy.url}/answers/${tag}`, events: ['anomaly.detected'] }, ACTOR)
    // (The webhooks an earlier subtest left take them too: at least these seven.)
    for (let i = 0; i < 40; i++) t.ok((await s.enqueue(event('anomaly.detected', { id: `an_${tag}_${i}` }))) >= 7)
    const ended = async () => {
      for (const w of slow) if ((await deliveriesOf(w.webhook.id)).some((d) => d.last_error !== null)) return true
      return false
    }
    // Counted by this subtest's paths: a receiver may be given the port of an earlier subtest's,
    // whose webhooks, still registered, then send to it too (seen: 7 attempts on one receiver,
    // 5 of its own webhook and 2 of one left before).
    const ours = (r: Receiver, path: string) => r.received.filter((h) => h.path === path).length
    const toHealthy = () => ours(healthy, `/answers/${tag}`)
    // Until the healthy receiver has them all, or the first attempt to a hanging one ends (its timeout).
    await until(async () => toHealthy() >= 40 || (await ended()))
    t.equal(toHealthy(), 40, 'all 40 arrived at the healthy receiver before any attempt to a hanging one ended')
    t.notOk(await ended(), 'no attempt to a hanging receiver had ended')
    for (const [i, r] of hanging.entries()) {
      const attempts = ours(r, `/hangs-${i}/${tag}`)
      t.ok(attempts >= 1 && attempts <= 5, `hanging receiver ${i} holds at most 5 attempts (${attempts})`)
    }
    const closing = s.close()
    for (const answer of held) answer()
    await closing
    for (const w of [...slow, fast]) await s.remove(w.webhook.id, ACTOR)
  })

  // The secrets subtests start from an empty registry: events of other subtests' webhooks would
  // queue deliveries to receivers that are gone.
  const rowOf = async (id: string) => (await store.db.query<any>('SELECT * FROM webhooks WHERE id = $1', [id]))[0]
  const SEALED = /^[0-9a-f]{16}\.[A-Za-z0-9_-]{60,}$/
  const bytesOf = (secret: string) => secret.slice('whsec_'.length)

  await t.test('secrets at rest: sealed, never in the row; the previous one dropped once its grace ends', async (t) => {
    await store.db.query('DELETE FROM webhooks')
    const receiver = await startReceiver(t)
    const s = service()
    const { webhook, secret } = await s.create({ url: `${receiver.url}/sealed`, events: ['key.created'] }, ACTOR)
    let row = await rowOf(webhook.id)
    t.matchStrict(row, { secret: null, previous_secret: null, sealed_previous_secret: null, sealed_secret: SEALED }, 'sealed, no plaintext column set')
    t.ok(row.sealed_secret.startsWith(`${CIPHER.currentKeyId}.`), 'under the current encryption key, which it names')
    t.notOk(JSON.stringify(row).includes(bytesOf(secret)), 'the secret is nowhere in its row')
    await s.enqueue(event('key.created', { key: { id: 'sealed-1' } }))
    await s.idle()
    t.same(verifiedBy(receiver.received[0] as Hook, [secret], 300, nowS()), [secret], 'deliveries are signed with it')

    const { secret: next } = await s.rotateSecret(webhook.id, ACTOR)
    row = await rowOf(webhook.id)
    t.matchStrict(row, { secret: null, previous_secret: null, sealed_secret: SEALED, sealed_previous_secret: SEALED }, 'after a rotation both are sealed')
    t.notOk(JSON.stringify(row).includes(bytesOf(next)) || JSON.stringify(row).includes(bytesOf(secret)), 'neither secret is in the row')
    await s.enqueue(event('key.created', { key: { id: 'sealed-2' } }))
    await s.idle()
    t.same(verifiedBy(receiver.received[1] as Hook, [next, secret], 300, nowS()), [next, secret], 'two signatures within the grace')

    t.equal(await s.tidySecrets(clock.now()), 0, 'within the grace the job changes nothing')
    clock.advance(DEFAULTS.secret_grace_hours * 3_600_000)
    t.equal(await s.tidySecrets(clock.now()), 1, 'at its end the previous secret is dropped')
    t.matchStrict(await rowOf(webhook.id), { previous_secret_until: null, sealed_previous_secret: null, previous_secret: null, sealed_secret: row.sealed_secret })
    t.equal((await s.get(webhook.id)).previousSecretUntil, null, 'and the API no longer shows a grace')
    await s.enqueue(event('key.created', { key: { id: 'sealed-3' } }))
    await s.idle()
    const last = receiver.received[2] as Hook
    t.equal(last.signature.split(' ').length, 1, 'one signature again')
    t.same(verifiedBy(last, [next], 300, nowS()), [next])
  })

  await t.test('a second rotation within the grace of the first ends neither grace early; at most four rotated-out secrets sign', async (t) => {
    // Before (found by a review): one slot for the previous secret, which a second rotation moved
    // on, so the original stopped signing at once, before the previous_secret_until the first
    // answer gave: a rotation retried after its answer was lost cut off the receiver still on it.
    // Signatures are checked by the test's own Standard Webhooks verifier (helpers/webhooks.ts).
    await store.db.query('DELETE FROM webhooks')
    const receiver = await startReceiver(t)
    const s = service()
    const grace = DEFAULTS.secret_grace_hours * 3_600_000
    let sent = 0
    const deliver = async () => {
      await s.enqueue(event('key.created', { key: { id: `regrace-${++sent}` } }))
      await s.idle()
      return receiver.received.find((h) => h.json?.data?.key?.id === `regrace-${sent}`) as Hook
    }
    const { webhook, secret: s0 } = await s.create({ url: `${receiver.url}/regrace`, events: ['key.created'] }, ACTOR)
    const first = await s.rotateSecret(webhook.id, ACTOR)
    const t0 = new Date(clock.now().getTime() + grace)
    t.same(first.webhook.previousSecretUntil, t0, 'the first answer: s0 signs until t0')
    clock.advance(3_600_000)
    const second = await s.rotateSecret(webhook.id, ACTOR)
    const t1 = new Date(clock.now().getTime() + grace)
    t.same(second.webhook.previousSecretsUntil, [t1, t0], 'the second: s1 until t1, and s0 still until t0')
    t.same(webhookJson(second.webhook).previous_secrets_until, [t1.toISOString(), t0.toISOString()])
    const row = await rowOf(webhook.id)
    t.equal(row.sealed_earlier_secrets.length, 1, 'one earlier secret: s0 (s1 is the previous one)')
    t.match(row.sealed_earlier_secrets, [{ sealed: SEALED, until: t0.toISOString() }], 's0 sealed, with the end of its grace')
    t.notOk([s0, first.secret, second.secret].some((x) => JSON.stringify(row).includes(bytesOf(x))), 'no secret in the row')
    const three = await deliver()
    t.equal(three.signature.split(' ').length, 3, 'three signatures')
    t.same(verifiedBy(three, [second.secret, first.secret, s0], 300, nowS()), [second.secret, first.secret, s0], 'the new secret, s1 and s0 each verify')

    clock.set(t0)
    t.equal(await s.tidySecrets(clock.now()), 1, "at t0 the job drops s0 (s1's grace goes on)")
    t.same((await s.get(webhook.id)).previousSecretsUntil, [t1])
    const two = await deliver()
    t.same(verifiedBy(two, [second.secret, first.secret, s0], 300, nowS()), [second.secret, first.secret], 's0 no longer signs, s1 still does')

    // Three more within s1's grace: four rotated out sign beside the current one, then a conflict.
    const more = []
    for (let i = 0; i < 3; i++) {
      clock.advance(60_000)
      more.push((await s.rotateSecret(webhook.id, ACTOR)).secret)
    }
    const five = await deliver()
    const all = [...more.reverse(), second.secret, first.secret]
    t.equal(five.signature.split(' ').length, 5)
    t.same(verifiedBy(five, all, 300, nowS()), all, 'five signatures, each verifying')
    const refused = await s.rotateSecret(webhook.id, ACTOR).then(() => undefined, (e: Error) => e)
    t.match(refused, { code: 'conflict', message: `webhook ${webhook.id} already has 4 previous secrets signing within the grace their rotations promised, the most it keeps; another rotation would end one early: rotate again after ${t1.toISOString()}, when the first of them ends` })
    t.same(verifiedBy(await deliver(), all, 300, nowS()), all, 'and changed nothing')
    clock.set(t1)
    const after = await s.rotateSecret(webhook.id, ACTOR)
    t.equal(after.webhook.previousSecretsUntil.length, 4, 'once the first has ended, a rotation is taken again')

    // A plaintext previous secret (a row from before migration 0007) is sealed as it moves on.
    const legacy = `whsec_${Buffer.alloc(32, 5).toString('base64')}`
    const other = await s.create({ url: `${receiver.url}/regrace-legacy`, events: ['key.revoked'] }, ACTOR)
    await store.db.query('UPDATE webhooks SET previous_secret = $2, previous_secret_until = $3 WHERE id = $1', [other.webhook.id, legacy, new Date(clock.now().getTime() + 60_000)])
    const next = await s.rotateSecret(other.webhook.id, ACTOR)
    const legacyRow = await rowOf(other.webhook.id)
    t.matchStrict(legacyRow, { previous_secret: null, sealed_earlier_secrets: [{ sealed: SEALED }] })
    t.equal(legacyRow.sealed_earlier_secrets.length, 1, 'one earlier secret: the pattern checks only the items it starts with')
    t.notOk(JSON.stringify(legacyRow).includes(bytesOf(legacy)), 'the plaintext is gone')
    await s.enqueue(event('key.revoked', { key: { id: 'regrace-legacy' } }))
    await s.idle()
    const hook = receiver.received.find((h) => h.path === '/regrace-legacy') as Hook
    t.same(verifiedBy(hook, [next.secret, other.secret, legacy], 300, nowS()), [next.secret, other.secret, legacy], 'and still signs until its end')
  })

  await t.test('a sealed secret copied onto another webhook does not open; a plaintext one from before migration 0007 signs, then is sealed', async (t) => {
    await store.db.query('DELETE FROM webhooks')
    const receiver = await startReceiver(t)
    const s = service()
    const a = await s.create({ url: `${receiver.url}/a`, events: ['key.created'] }, ACTOR)
    const b = await s.create({ url: `${receiver.url}/b`, events: ['key.created'] }, ACTOR)
    await store.db.query('UPDATE webhooks SET sealed_secret = (SELECT sealed_secret FROM webhooks WHERE id = $1) WHERE id = $2', [a.webhook.id, b.webhook.id])
    await s.enqueue(event('key.created', { key: { id: 'copied' } }))
    await s.idle()
    t.same(receiver.received.map((h) => h.path), ['/a'], "b's delivery is not sent, signed with a's secret")
    const [failed] = await deliveriesOf(b.webhook.id)
    t.matchStrict(failed, { status: 'pending', attempts: 1, last_status: null, last_error: `the secret of webhook ${b.webhook.id} failed authentication: it was altered or does not belong here` })

    // As a row written before migration 0007 (or by an instance not yet upgraded) holds it.
    const legacy = `whsec_${Buffer.alloc(32, 9).toString('base64')}`
    await store.db.query('UPDATE webhooks SET secret = $2, sealed_secret = NULL WHERE id = $1', [b.webhook.id, legacy])
    clock.advance(1000)
    await run(s)
    t.match((await deliveriesOf(b.webhook.id))[0], { status: 'delivered', attempts: 2 })
    t.same(verifiedBy(receiver.received[1] as Hook, [legacy], 300, nowS()), [legacy], 'the plaintext secret signs while it is there')
    t.equal(await s.tidySecrets(clock.now()), 1, 'the job seals it')
    const row = await rowOf(b.webhook.id)
    t.matchStrict(row, { secret: null, sealed_secret: SEALED })
    t.notOk(JSON.stringify(row).includes(bytesOf(legacy)), 'and the plaintext is gone')
    t.equal(await s.tidySecrets(clock.now()), 0, 'once')
    await s.enqueue(event('key.created', { key: { id: 'legacy' } }))
    await s.idle()
    const hook = receiver.received.find((h) => h.path === '/b' && h.json?.data?.key?.id === 'legacy') as Hook
    t.same(verifiedBy(hook, [legacy], 300, nowS()), [legacy], 'the same secret, now sealed')
  })

  await t.test('a new encryption key: the previous one still opens secrets; the job re-seals them under the new one', async (t) => {
    await store.db.query('DELETE FROM webhooks')
    const receiver = await startReceiver(t)
    const NEW_KEY = Buffer.alloc(32, 7)
    const old = service()
    const { webhook, secret } = await old.create({ url: `${receiver.url}/rekeyed`, events: ['key.created'] }, ACTOR)
    const newOnly = new AuditCipher(NEW_KEY)
    const withoutOld = service({}, true, newOnly)
    await withoutOld.enqueue(event('key.created', { key: { id: 'rekey-1' } }))
    await withoutOld.idle()
    t.equal(receiver.received.length, 0, 'not sent by an instance without the key that sealed it')
    t.match((await deliveriesOf(webhook.id))[0], {
      status: 'pending',
      last_error: `the secret of webhook ${webhook.id} was sealed with encryption key ${CIPHER.currentKeyId}, which is not configured (add it to KEYGATE_PREVIOUS_ENCRYPTION_KEYS)`,
    })
    t.equal(await withoutOld.tidySecrets(clock.now()), 0, 'nor re-sealed by it')

    const rotated = service({}, true, new AuditCipher(NEW_KEY, [TEST_ENCRYPTION_KEY]))
    clock.advance(1000)
    await run(rotated)
    t.same(verifiedBy(receiver.received[0] as Hook, [secret], 300, nowS()), [secret], 'an instance with it as a previous key delivers')
    t.equal(await rotated.tidySecrets(clock.now()), 1, 'and re-seals it')
    t.ok((await rowOf(webhook.id)).sealed_secret.startsWith(`${newOnly.currentKeyId}.`), 'under the new key')
    await withoutOld.enqueue(event('key.created', { key: { id: 'rekey-2' } }))
    await withoutOld.idle()
    t.same(verifiedBy(receiver.received[1] as Hook, [secret], 300, nowS()), [secret], 'so the old key can be retired')
  })
})

t.test('instances whose clocks differ: one delivery is sent once, and a backoff is judged by the store clock', async (t) => {
  // Before (found by a review): when a delivery was due, its lease and its backoff were each
  // instance's own clock. Two instances 120 s apart (more than timeout_ms + 60 s): `ahead` saw the
  // lease `behind` had just written as already ended and sent the delivery again while the first
  // attempt was still waiting for the receiver (one msg id twice, `attempts: 2`); a backoff
  // written by `behind` was already past, and `ahead` retried at once; a delivery queued by
  // `ahead` waited until `behind`'s clock caught up. No clock is injected for the store here: its own.
  await forEachStore(t, async (t, store) => {
    const config = { ...DEFAULTS, allow_private: ['127.0.0.1/32'], timeout_ms: 5000, retry_base_ms: 60_000 }
    const instance = (skewMs: number, deliver = true) => {
      const s = new WebhookService({ db: store.db, cipher: CIPHER, config, log: silentLogger, now: () => new Date(Date.now() + skewMs), deliver })
      t.teardown(() => s.close())
      return s
    }
    const behind = instance(-60_000)
    const ahead = instance(60_000)
    const storeNow = async () => new Date((await store.db.query<{ at: Date }>('SELECT now() AS at'))[0]!.at).getTime()
    const held: Array<() => void> = []
    const receiver = await startReceiver(t, (hook, res) => {
      const id = hook.json?.data?.key?.id
      if (id === 'slow' && held.length === 0) held.push(() => res.writeHead(204).end())
      else res.writeHead(id === 'failing' ? 500 : 204).end()
    })
    const { webhook } = await behind.create({ url: `${receiver.url}/skew`, events: ['key.created'] }, ACTOR)
    const bus = new EventBus()
    const event = (id: string) => {
      let captured: any
      const off = bus.on((e) => (captured = e))
      bus.emit('key.created', { key: { id } })
      off()
      return captured
    }
    const rowOf = async (id: string) => (await store.db.query<any>(`SELECT * FROM webhook_deliveries WHERE webhook_id = $1 AND payload::jsonb -> 'data' -> 'key' ->> 'id' = $2`, [webhook.id, id]))[0]
    const sentOf = (id: string) => receiver.received.filter((h) => h.json?.data?.key?.id === id)

    // The receiver holds its answer to `behind`'s attempt; `ahead` looks for due deliveries meanwhile.
    await behind.enqueue(event('slow'))
    await receiver.waitFor((h) => h.json?.data?.key?.id === 'slow')
    ahead.kick()
    await ahead.idle()
    t.equal(sentOf('slow').length, 1, "the other instance does not send it while the first attempt's lease holds")
    held.shift()!()
    await behind.idle()
    t.match(await rowOf('slow'), { status: 'delivered', attempts: 1, last_status: 204 }, 'delivered once, one attempt')
    t.equal(new Set(sentOf('slow').map((h) => h.id)).size, 1)

    const before = await storeNow()
    await behind.enqueue(event('failing'))
    await behind.idle()
    const after = await storeNow()
    const failed = await rowOf('failing')
    t.match(failed, { status: 'pending', attempts: 1, last_status: 500 })
    const next = new Date(failed.next_attempt_at).getTime()
    t.ok(next >= before + 60_000 && next <= after + 60_000, 'the backoff (retry_base_ms) is counted from the store clock, not the lagging instance clock')
    ahead.kick()
    await ahead.idle()
    t.equal((await rowOf('failing')).attempts, 1, 'and not retried early by the instance whose clock runs ahead')
    t.equal(sentOf('failing').length, 1)

    // Queued by a process whose clock runs ahead (one that only queues, like the CLI).
    await instance(60_000, false).enqueue(event('queued-ahead'))
    behind.kick()
    await behind.idle()
    t.match(await rowOf('queued-ahead'), { status: 'delivered', attempts: 1 }, 'due at once for the instance whose clock lags')
    t.equal(sentOf('queued-ahead').length, 1)
  })
})

t.test('a delivery queued is claimed by the round its queuing starts, also within the millisecond of the probe', async (t) => {
  // Before (found when the test above failed now and then on PostgreSQL): the probe's store time
  // went back to the claim as a JS Date, cut to the millisecond, so a delivery queued in the same
  // millisecond (due by the probe's microseconds) was not due by the claim's, and waited a poll.
  await forEachStore(t, async (t, store) => {
    const config = { ...DEFAULTS, allow_private: ['127.0.0.1/32'], poll_interval_ms: 60_000 }
    const s = new WebhookService({ db: store.db, cipher: CIPHER, config, log: silentLogger })
    t.teardown(() => s.close())
    const receiver = await startReceiver(t)
    const { webhook } = await s.create({ url: `${receiver.url}/ms`, events: ['key.created'] }, ACTOR)
    const bus = new EventBus()
    let late = 0
    for (let i = 0; i < 150; i++) {
      let captured: any
      const off = bus.on((e) => (captured = e))
      bus.emit('key.created', { key: { id: `ms-${i}` } })
      off()
      await s.enqueue(captured)
      await s.idle()
      const [row] = await store.db.query<{ attempts: number }>(`SELECT attempts FROM webhook_deliveries WHERE webhook_id = $1 AND payload::jsonb -> 'data' -> 'key' ->> 'id' = $2`, [webhook.id, `ms-${i}`])
      if (row?.attempts !== 1) late++
    }
    t.equal(late, 0, 'each of 150 deliveries was claimed at once')
  })
})

t.test('a key changed by the CLI on the store queues its event for the servers to deliver', async (t) => {
  const url = await freshDatabase(t)
  const env = { DATABASE_URL: url, REDIS_URL: undefined, KEYGATE_CONFIG: undefined, KEYGATE_ADMIN_URL: undefined, KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 3).toString('base64') }
  const migrated = await runCli(['migrate'], { env })
  t.equal(migrated.code, 0, migrated.stderr)
  const db = await openDb({ databaseUrl: url, poolMax: 2 })
  t.teardown(() => db.close())
  const receiver = await startReceiver(t)
  const config = { ...DEFAULTS, allow_private: ['127.0.0.1/32'] }
  const queueOnly = new WebhookService({ db, cipher: new AuditCipher(Buffer.alloc(32, 3)), config, log: silentLogger, deliver: false })
  const { webhook, secret } = await queueOnly.create({ url: `${receiver.url}/cli`, events: ['key.created', 'key.revoked'] }, ACTOR)
  const made = await runCli(['api-key', 'create', '--name', 'from-cli', '--type', 'user', '--json'], { env })
  t.equal(made.code, 0, made.stderr)
  const id = made.json().id as string
  const queued = await db.query<{ event_type: string; status: string; payload: string }>('SELECT event_type, status, payload FROM webhook_deliveries WHERE webhook_id = $1', [webhook.id])
  t.equal(queued.length, 1, 'one delivery')
  t.match(queued, [{ event_type: 'key.created', status: 'pending' }], 'queued by the CLI, not sent by it')
  t.match(made.json().key, /^kg_/, 'the key made, to look for')
  t.notOk(queued[0]?.payload.includes(made.json().key), 'without the key')
  t.equal(receiver.received.length, 0)
  const server = new WebhookService({ db, cipher: new AuditCipher(Buffer.alloc(32, 3)), config, log: silentLogger })
  t.teardown(() => server.close())
  server.start()
  const hook = await receiver.waitFor((hk) => hk.json?.data?.key?.id === id)
  t.same(verifiedBy(hook, [secret]), [secret], 'a server delivered it, signed')
})

t.test('a webhook being deleted while an event is queued: the event reaches the others, the change goes through', async (t) => {
  // Before (found by a review): the queuing INSERT ... SELECT still saw a webhook another
  // transaction was deleting; its delivery's foreign key failed once the delete committed, and
  // the statement with it: a revocation queuing key.revoked was answered 500 with the key still
  // active, the event was lost for every other webhook, and a test send answered 500, not 404.
  // (PostgreSQL only: the embedded store runs one transaction at a time.)
  const store = await openStore(t, 'postgres')
  const h = await startAdmin(t, store.db, { config: { webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 60_000 } } })
  const hook = async (path: string) => (await h.call('POST', '/v1/webhooks', { body: { url: `http://127.0.0.1:9/${path}`, events: ['key.revoked'] } })).json.id as string
  const [doomed, kept] = [await hook('doomed'), await hook('kept')]
  const key = (await h.call('POST', '/v1/keys', { body: { name: 'revoked while a webhook goes', type: 'user' } })).json.id as string
  const deleting = new pg.Client({ connectionString: store.url })
  await deleting.connect()
  t.teardown(() => deleting.end())
  const [{ pid }] = (await deleting.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows as [{ pid: number }]
  await deleting.query('BEGIN')
  await deleting.query('DELETE FROM webhooks WHERE id = $1', [doomed])
  const revoking = h.call('POST', `/v1/keys/${key}/revoke`, { body: { reason: 'test' } })
  const testing = h.call('POST', `/v1/webhooks/${doomed}/test`)
  // Both wait on the delete's lock of the webhook's row before it commits, however late a loaded
  // machine brings them there (a fixed 300 ms let them come after the commit, and race nothing).
  const waiting = async () => (await store.db.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))', [pid]))[0]?.n
  await until(async () => ((await waiting()) ?? 0) >= 2)
  await deleting.query('COMMIT')
  const [revoked, tested] = await Promise.all([revoking, testing])
  t.equal(revoked.status, 200, "the revocation goes through")
  t.equal((await h.call('GET', `/v1/keys/${key}`)).json.status, 'revoked')
  t.equal(tested.status, 404, 'a test send to the deleted webhook: not found')
  t.equal(tested.json.error.code, 'webhook_not_found')
  const queued = await store.db.query<{ webhook_id: string; event_type: string }>("SELECT webhook_id, event_type FROM webhook_deliveries WHERE event_type = 'key.revoked'")
  t.same(queued, [{ webhook_id: kept, event_type: 'key.revoked' }], 'key.revoked queued for the webhook that stays')
})

t.test('a test send whose webhook is deleted while the receiver answers reports what the receiver did', async (t) => {
  // Before (found by a review): the delivery row went with the webhook, and the answer said
  // "failed" with last_status 200 and no error, though the receiver had the event.
  await forEachStore(t, async (t, store) => {
    const h = await startAdmin(t, store.db, { config: { webhooks: { allow_private: ['127.0.0.1/32'], poll_interval_ms: 60_000 } } })
    const held: Array<(status: number) => void> = []
    const receiver = await startReceiver(t, (_hook, res) => held.push((status) => res.writeHead(status).end()))
    for (const [answer, expected] of [[200, { status: 'delivered', last_status: 200, last_error: null, delivered_at: String }], [500, { status: 'failed', last_status: 500, last_error: 'the receiver answered 500', delivered_at: null }]] as const) {
      const id = (await h.call('POST', '/v1/webhooks', { body: { url: `${receiver.url}/${answer}`, events: ['key.revoked'] } })).json.id as string
      const testing = h.call('POST', `/v1/webhooks/${id}/test`)
      await receiver.waitFor((hk) => hk.path === `/${answer}`)
      t.equal((await h.call('DELETE', `/v1/webhooks/${id}`)).status, 200, 'deleted while the receiver holds its answer')
      held.shift()!(answer)
      const tested = await testing
      t.equal(tested.status, 200)
      t.match(tested.json, { ...expected, webhook_id: id, event_type: 'webhook.test', attempts: 1 }, `the receiver answered ${answer}`)
      if (answer === 200) t.ok(Date.parse(tested.json.delivered_at) >= Date.parse(tested.json.created_at), 'delivered_at after the send began')
    }
  })
})

t.test('a store out of reach: a failing delivery round is logged once at warn, then at debug, and once when a round succeeds again', async (t) => {
  // Before (found by a review): a warn line every poll_interval_ms for the whole outage, some
  // 3,600 an hour in every process, where the other periodic readers of the store warn once.
  const url = await freshDatabase(t)
  t.equal((await runCli(['migrate'], { env: { DATABASE_URL: url, REDIS_URL: undefined, KEYGATE_CONFIG: undefined } })).code, 0)
  const { gate, url: through } = await gateInFront(t, url)
  const db = await openDb({ databaseUrl: through, poolMax: 2 })
  t.teardown(() => db.close())
  const lines: Array<{ level: string; message: string }> = []
  const log = createLogger({ level: 'debug', write: (line) => void lines.push(JSON.parse(line)) })
  const s = new WebhookService({ db, cipher: new AuditCipher(Buffer.alloc(32, 3)), config: { ...DEFAULTS, poll_interval_ms: 60_000 }, log })
  t.teardown(() => s.close())
  const round = async () => {
    s.kick()
    await s.idle()
  }
  await round()
  // Down: the pooled connections end, and a new one is dropped at once.
  gate.set('shut')
  await endConnections(url)
  for (let i = 0; i < 4; i++) await round()
  const failed = lines.filter((l) => l.message.startsWith('webhook delivery round failed'))
  t.same(failed.map((l) => l.level), ['warn', 'debug', 'debug', 'debug'], 'four rounds failed: one warn line')
  gate.set('open')
  await round()
  await round()
  t.same(lines.filter((l) => l.level !== 'debug').map((l) => l.message.slice(0, 30)), ['webhook delivery round failed;', 'webhook delivery rounds reach '], 'one line when rounds succeed again, and none after')
})
