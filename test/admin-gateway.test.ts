// The admin API beside a gateway in the same process, sharing the key service, deny list,
// lockout and usage recorder as `keygate serve` does, on both stores: changes apply to the next
// gateway request; the deny list operations; the reports count what went through the gateway;
// failed admin credentials lock the address out of the gateway too.
import t from 'tap'
import { Agent, request } from 'undici'
import { generateKey } from '../core/keys/format.ts'
import { bearer, until } from './helpers/gateway.ts'
import { BOOTSTRAP_TOKEN, documented, startAdmin } from './helpers/admin.ts'
import { forEachStore, openStore } from './helpers/stores.ts'

const HOUR = 3_600_000

await forEachStore(t, async (t, store) => {
  const h = await startAdmin(t, store.db, { gateway: true })
  const create = async (body: Record<string, unknown>) => (await h.call('POST', '/v1/keys', { body: { type: 'user', ...body } })).json

  await t.test('revocation, rotation and updates apply to the next gateway request', async (t) => {
    const k = await create({ name: 'live', scopes: ['a'] })
    t.equal((await h.through('/x', bearer(k.key))).status, 200, 'the new key works at once')
    t.equal((await h.through('/x', bearer(k.key))).status, 200, 'and is now cached')
    await h.call('PATCH', `/v1/keys/${k.id}`, { body: { scopes: ['a', 'b'] } })
    t.equal((await h.through('/x', bearer(k.key))).json.headers['x-keygate-scopes'], 'a,b', 'an update applies to the next request')
    t.equal((await h.call('POST', `/v1/keys/${k.id}/revoke`)).status, 200)
    const after = await h.through('/x', bearer(k.key))
    t.equal(after.status, 401, 'revoked: refused on the next request')
    t.equal(after.json.error.code, 'key_invalid')

    const s = await create({ name: 'rotated', type: 'service' })
    t.equal((await h.through('/x', bearer(s.key))).status, 200)
    const r = (await h.call('POST', `/v1/keys/${s.id}/rotate`, { body: { force: true } })).json
    t.equal((await h.through('/x', bearer(s.key))).status, 401, 'a forced rotation ends the old key on the next request')
    t.equal((await h.through('/x', bearer(r.key))).status, 200, 'the new key works')

    // A change to the successor reaches the predecessor still in grace, cached at the gateway.
    const g = await create({ name: 'graced', type: 'service', scopes: ['a', 'b'] })
    const n = (await h.call('POST', `/v1/keys/${g.id}/rotate`)).json
    t.equal((await h.through('/x', bearer(g.key))).json.headers['x-keygate-scopes'], 'a,b', 'the predecessor works in its grace, and is cached')
    await h.call('PATCH', `/v1/keys/${n.id}`, { body: { scopes: ['a'], allowed_cidrs: ['10.0.0.0/8'] } })
    const narrowed = await h.through('/x', bearer(g.key))
    t.equal(narrowed.status, 403, "the successor's narrowing applies to the predecessor on the next request")
    t.equal(narrowed.json.error.code, 'ip_blocked')
  })

  await t.test('deny list: add, list, conflict, expiry, remove', async (t) => {
    const k = await create({ name: 'from loopback' })
    t.equal((await h.through('/x', bearer(k.key))).status, 200)
    const before = await h.auditRows()
    const added = await h.call('POST', '/v1/deny-list', { body: { cidr: '::ffff:127.0.0.1', reason: 'test' } })
    t.equal(added.status, 201)
    t.matchStrict(added.json, { cidr: '127.0.0.1', reason: 'test', created_by: `key:${h.adminKeyId}`, expires_at: null }, 'stored normalised, with its author')
    t.equal((await h.auditRows()) - before, 1, 'one audit row')
    const blocked = await h.through('/x', bearer(k.key))
    t.equal(blocked.status, 403, 'refused from the next request on')
    t.equal(blocked.json.error.code, 'ip_blocked')
    t.ok((await h.call('GET', '/v1/deny-list')).json.items.some((e: { id: string }) => e.id === added.json.id))
    // The same range again updates its entry (before, found by a review: 409 conflict, and an
    // expiry could be changed only by removing the entry, the address open until it was added again).
    const later = new Date(Date.now() + 3_600_000).toISOString()
    const beforeUpdate = await h.auditRows()
    const again = await h.call('POST', '/v1/deny-list', { body: { cidr: '127.0.0.1/32', expires_at: later } })
    t.equal(again.status, 200, 'answered 200, not 201: updated')
    t.match(again.json, { id: added.json.id, cidr: '127.0.0.1', reason: 'test', created_at: added.json.created_at, expires_at: later }, 'the same entry, its reason kept, the new expiry')
    t.equal((await h.auditRows()) - beforeUpdate, 1, 'one audit row')
    const updatedRow = (await h.call('GET', '/v1/audit?action=deny_list.updated')).json.items[0]
    t.matchStrict(updatedRow, { actor: `key:${h.adminKeyId}`, details: { id: added.json.id, cidr: '127.0.0.1', reason: 'test', expires_at: later, previous: { reason: 'test', expires_at: null } } }, 'audited with the values before')
    t.equal((await h.through('/x', bearer(k.key))).status, 403, 'still refused')
    const forever = await h.call('POST', '/v1/deny-list', { body: { cidr: '127.0.0.1', reason: 'again' } })
    t.equal(forever.status, 200)
    t.matchStrict(forever.json, { id: added.json.id, reason: 'again', expires_at: null }, 'no expiry given: never, as an add; the reason given')
    t.equal((await h.call('GET', '/v1/deny-list')).json.items.filter((e: { cidr: string }) => e.cidr === '127.0.0.1').length, 1, 'one entry for the range')
    // Host bits set: refused, naming the network (before, found by a review: stored as that network without a word).
    const hostBits = await h.call('POST', '/v1/deny-list', { body: { cidr: '127.0.0.1/8' } })
    t.equal(hostBits.status, 400)
    t.match(hostBits.json.error, { code: 'validation_failed', details: { fields: [{ field: 'cidr', message: /has host bits set: as a range it covers the whole network 127\.0\.0\.0\/8; write 127\.0\.0\.0\/8 for that network, or 127\.0\.0\.1 alone/ }] } })
    t.equal(hostBits.json.error.details.fields.length, 1, 'one field named')
    const bad = await h.call('POST', '/v1/deny-list', { body: { cidr: '300.1.1.1', expires_at: 'tomorrow', colour: 1 } })
    t.equal(bad.status, 400)
    t.same(bad.json.error.details.fields.map((f: { field: string }) => f.field).sort(), ['cidr', 'colour', 'expires_at'])
    const past = await h.call('POST', '/v1/deny-list', { body: { cidr: '192.0.2.0/24', expires_at: '2001-01-01T00:00:00Z' } })
    t.equal(past.json.error.details.fields[0].field, 'expires_at')
    const beforeRemove = await h.auditRows()
    const removed = await h.call('DELETE', `/v1/deny-list/${added.json.id}`)
    t.equal(removed.status, 200)
    t.equal((await h.auditRows()) - beforeRemove, 1, 'one audit row')
    const rows = await store.db.query<{ action: string; actor: string; address: string }>(`SELECT action, actor, address FROM api_key_audit_log WHERE action LIKE 'deny_list.%' ORDER BY created_at DESC LIMIT 2`)
    t.same(rows, [
      { action: 'deny_list.removed', actor: `key:${h.adminKeyId}`, address: '127.0.0.1' },
      { action: 'deny_list.updated', actor: `key:${h.adminKeyId}`, address: '127.0.0.1' },
    ], 'the admin key and its address are the actor')
    t.equal((await h.through('/x', bearer(k.key))).status, 200, 'accepted again from the next request on')
    const gone = await h.call('DELETE', `/v1/deny-list/${added.json.id}`)
    t.equal(gone.status, 404)
    t.equal(gone.json.error.code, 'deny_entry_not_found')

    // 3 s: the POST (a write and its audit row) and a request must come within it.
    // Added for an hour, then shortened to 3 s: the gateway follows the new expiry.
    const brief = await h.call('POST', '/v1/deny-list', { body: { cidr: '127.0.0.0/8', expires_at: new Date(Date.now() + 3_600_000).toISOString() } })
    t.equal(brief.status, 201)
    t.equal((await h.through('/x', bearer(k.key))).status, 403, 'a range applies')
    t.equal((await h.call('POST', '/v1/deny-list', { body: { cidr: '127.0.0.0/8', expires_at: new Date(Date.now() + 3000).toISOString() } })).status, 200)
    await until(t, 'an entry stops applying at its expiry, as updated', async () => (await h.through('/x', bearer(k.key))).status === 200, 10_000)
    t.notOk((await h.call('GET', '/v1/deny-list')).json.items.some((e: { id: string }) => e.id === brief.json.id), 'expired entries are not listed')
    t.ok((await h.call('GET', '/v1/deny-list?include_expired=true')).json.items.some((e: { id: string }) => e.id === brief.json.id), 'unless asked for')
    t.equal((await h.call('GET', '/v1/deny-list?include_expired=maybe')).status, 400)
  })

  await t.test('deny list: an entry that denies every client is taken, and the answer says so (found by a review)', async (t) => {
    // Before: taken without a word, as any range.
    const k = await create({ name: 'shut out' })
    const narrow = await h.call('POST', '/v1/deny-list', { body: { cidr: '198.51.100.0/24' } })
    await documented(t, h, 'addDenyEntry', narrow)
    t.same(narrow.json.warnings, [], 'none for a narrower range')
    const all = await h.call('POST', '/v1/deny-list', { body: { cidr: '::/0', reason: 'close the gate' } })
    await documented(t, h, 'addDenyEntry', all)
    t.match(all.json, { cidr: '::/0', reason: 'close the gate', warnings: [/^::\/0 denies every client of the gateway, IPv4 and IPv6 .*; the admin listener does not check the deny list and stays open$/] })
    t.equal(all.json.warnings.length, 1)
    const refused = await h.through('/x', bearer(k.key))
    t.equal(refused.status, 403, 'this IPv4 client is denied, as said')
    t.equal(refused.json.error.code, 'ip_blocked')
    const mapped = await h.call('POST', '/v1/deny-list', { body: { cidr: '::/64' } })
    t.match(mapped.json.warnings, [/^::\/64 denies every IPv4 client of the gateway: it holds ::ffff:0:0\/96/], 'an IPv6 range holding the IPv4-mapped block')
    t.equal(mapped.json.warnings.length, 1)
    const again = await h.call('POST', '/v1/deny-list', { body: { cidr: '0:0::/0', expires_at: new Date(Date.now() + HOUR).toISOString() } })
    await documented(t, h, 'addDenyEntry', again, 200)
    t.match(again.json.warnings, [/^::\/0 denies every client/], 'an update says it too, of the range as stored')
    t.equal(again.json.warnings.length, 1)
    // The admin listener stays open, as the warning says: the entries are removed through it.
    for (const e of [narrow, all, mapped]) t.equal((await h.call('DELETE', `/v1/deny-list/${e.json.id}`)).status, 200)
    t.equal((await h.through('/x', bearer(k.key))).status, 200, 'let in again')
  })

  await t.test('stats and reports', async (t) => {
    const a = await create({ name: 'busy' })
    const b = await create({ name: 'quiet', scopes: ['nothing'] })
    for (let i = 0; i < 5; i++) t.equal((await h.through('/r', bearer(a.key))).status, 200)
    t.equal((await h.through('/r', bearer(b.key))).status, 200)
    for (let i = 0; i < 3; i++) t.equal((await h.through('/r', bearer('kg_wrong'))).status, 401)
    t.equal((await h.through('/r')).status, 401)

    const usage = await h.call('GET', '/v1/reports/usage')
    t.equal(usage.status, 200)
    const byId = new Map(usage.json.items.map((i: { key_id: string }) => [i.key_id, i]))
    t.match(byId.get(a.id), { name: 'busy', type: 'user', requests: 5, rejected: 0 }, 'requests per key, flushed before the report')
    t.match(byId.get(b.id), { requests: 1 })
    const one = await h.call('GET', `/v1/reports/usage?key_id=${a.id}&from=${new Date(Date.now() - HOUR).toISOString()}`)
    t.equal(one.json.items.length, 1)
    t.equal(one.json.items[0].buckets.reduce((n: number, x: { requests: number }) => n + x.requests, 0), 5, 'hourly buckets of one key')
    const later = await h.call('GET', `/v1/reports/usage?from=${new Date(Date.now() + 2 * HOUR).toISOString()}&to=${new Date(Date.now() + 3 * HOUR).toISOString()}`)
    t.same(later.json.items, [], 'nothing outside the range')
    t.ok((await h.call('GET', `/v1/keys/${a.id}`)).json.last_used_at, 'the flush records when the key was last used')

    const top = await h.call('GET', '/v1/reports/top-keys?limit=50')
    const ranked = top.json.items.map((i: { key_id: string }) => i.key_id)
    // Both listed first: indexOf's -1 for a busier key left out ranked it above any (found by a review).
    t.ok(ranked.includes(a.id) && ranked.includes(b.id), `both keys ranked: ${ranked.join(', ')}`)
    t.ok(ranked.indexOf(a.id) < ranked.indexOf(b.id), 'the busier key ranks higher')
    t.ok(top.json.items.every((i: { share: number }) => i.share > 0 && i.share <= 1))

    const rej = await h.call('GET', '/v1/reports/rejections')
    const reasons = Object.fromEntries(rej.json.items.map((i: { reason: string; count: number }) => [i.reason, i.count]))
    t.ok(reasons.key_invalid >= 3, 'bad keys counted by reason')
    t.ok(reasons.key_missing >= 1, 'missing keys counted')
    t.equal(rej.json.total, rej.json.items.reduce((n: number, i: { count: number }) => n + i.count, 0))

    const bad = await h.call('GET', `/v1/reports/usage?from=${new Date().toISOString()}&to=${new Date(Date.now() - HOUR).toISOString()}`)
    t.equal(bad.status, 400)
    t.equal(bad.json.error.details.fields[0].field, 'from')
    t.equal((await h.call('GET', '/v1/reports/rejections?from=yesterday')).json.error.details.fields[0].field, 'from')

    const soon = await create({ name: 'soon', expires_at: new Date(Date.now() + 2 * 86_400_000).toISOString() })
    const svc = await create({ name: 'grace', type: 'service' })
    await h.call('POST', `/v1/keys/${svc.id}/rotate`)
    const exp3 = await h.call('GET', '/v1/reports/expiring?within_days=3')
    const ids = exp3.json.items.map((i: { id: string }) => i.id)
    t.ok(ids.includes(soon.id), 'an active key expiring within the window')
    t.ok(ids.includes(svc.id), 'a rotating key whose grace ends within the window')
    t.notOk((await h.call('GET', '/v1/reports/expiring?within_days=1')).json.items.some((i: { id: string }) => i.id === soon.id))
    // A key the scheduler will expire at its announced rotation deadline (recorded here as its round would).
    const due = await create({ name: 'rotation due', rotation_interval_s: 30 * 86_400 })
    const deadline = new Date(Math.floor(Date.now() / 1000) * 1000 + 12 * HOUR)
    await store.db.query(`INSERT INTO api_key_notices (key_id, kind, deadline, notified_at) VALUES ($1, 'rotation', $2, now())`, [due.id, deadline])
    const exp1 = await h.call('GET', '/v1/reports/expiring?within_days=1')
    t.match(
      exp1.json.items.find((i: { id: string }) => i.id === due.id),
      { ends_at: deadline.toISOString(), end_reason: 'rotation_overdue' },
      'an active key whose announced rotation deadline falls within the window, and why it ends',
    )
    const reasons3 = new Map((await h.call('GET', '/v1/reports/expiring?within_days=3')).json.items.map((i: { id: string; end_reason: string }) => [i.id, i.end_reason]))
    t.same([reasons3.get(soon.id), reasons3.get(svc.id)], ['expires_at', 'grace_ended'], 'an expiry, a grace period')
    t.equal((await h.call('GET', '/v1/stats?expiring_within_days=1')).json.expiring_soon, (await h.keys.stats(1)).expiringSoon)
    t.ok((await h.keys.stats(1)).expiringSoon >= 1, 'and it counts as expiring soon')

    const stats = await h.call('GET', '/v1/stats?expiring_within_days=3')
    const direct = await h.keys.stats(3)
    t.same(stats.json, { total: direct.total, by_type: direct.byType, by_status: direct.byStatus, legacy: direct.legacy, expiring_soon: direct.expiringSoon, expiring_within_days: 3 })
    t.ok(stats.json.by_status.revoked >= 1 && stats.json.by_status.rotating >= 1)
    t.equal((await h.call('GET', '/v1/stats?expiring_within_days=0')).status, 400)
  })

  await t.test('failed admin credentials lock the address out of the admin API and the gateway', async (t) => {
    const locked = await startAdmin(t, store.db, { gateway: true, config: { lockout: { max_attempts: 3, window_s: 60 } } })
    const k = (await locked.call('POST', '/v1/keys', { body: { name: 'innocent', type: 'user' } })).json
    t.equal((await locked.through('/x', bearer(k.key))).status, 200)
    t.equal((await locked.call('GET', '/v1/stats', { auth: null })).status, 401, 'no credential: not a failed attempt')
    for (let i = 0; i < 3; i++) t.equal((await locked.call('GET', '/v1/stats', { auth: `${BOOTSTRAP_TOKEN}-${i}` })).status, 401)
    const admin = await locked.call('GET', '/v1/stats')
    t.equal(admin.status, 429, 'even a valid admin key is refused from a locked-out address')
    t.equal(admin.json.error.code, 'ip_locked_out')
    t.ok(Number(admin.headers['retry-after']) > 0, 'Retry-After')
    const through = await locked.through('/x', bearer(k.key))
    t.equal(through.status, 429, 'the gateway shares the lockout')
    t.equal(through.json.error.code, 'ip_locked_out')
  })

  await t.test('a burst of bad admin credentials at once gets no more of them checked than the lockout allows; good ones at once all pass', async (t) => {
    const h = await startAdmin(t, store.db, { config: { lockout: { max_attempts: 3, window_s: 60 } } })
    const good = await Promise.all(Array.from({ length: 10 }, () => h.call('GET', '/v1/stats')))
    t.same(good.map((a) => a.status), Array(10).fill(200), 'ten valid admin calls at once')
    // 40 connections at once, each with a different well-formed key the store must look up.
    const agent = new Agent({ connections: 40 })
    t.teardown(() => agent.close())
    const answers = await Promise.all(
      Array.from({ length: 40 }, async () => {
        const res = await request(`${h.url}/v1/stats`, { headers: { authorization: `Bearer ${generateKey('kg_').key}`, host: 'localhost' }, dispatcher: agent })
        await res.body.dump()
        return res.statusCode
      }),
    )
    const tally: Record<number, number> = {}
    for (const status of answers) tally[status] = (tally[status] ?? 0) + 1
    // Before: {401: 23, 429: 17}.
    t.same(tally, { 401: 3, 429: 37 }, 'three checked, the rest locked out')
  })

  await t.test('the bootstrap token waits for its place in a burst: after the failures that lock the address out, it is refused 429 (found by a review)', async (t) => {
    const h = await startAdmin(t, store.db, { config: { lockout: { max_attempts: 3, window_s: 60 } } })
    const good = await Promise.all(Array.from({ length: 10 }, () => h.call('GET', '/v1/stats', { auth: BOOTSTRAP_TOKEN })))
    t.same(good.map((a) => a.status), Array(10).fill(200), 'ten token calls at once: each success gives its place back')
    // Three bad keys held in their look-up, so that all three places are in doubt when the token comes.
    let release = () => {}
    const held = new Promise<void>((r) => (release = r))
    let reachedThree = () => {}
    const threeInDoubt = new Promise<void>((r) => (reachedThree = r))
    const validate = h.keys.validate.bind(h.keys)
    let looked = 0
    h.keys.validate = async (...args) => {
      if (++looked === 3) reachedThree()
      await held
      return validate(...args)
    }
    const bad = Array.from({ length: 3 }, () => h.call('GET', '/v1/stats', { auth: generateKey('kg_').key }))
    await threeInDoubt
    // The token's request is in once the lockout is asked about it; everything it does up to the
    // comparison runs before the next turn of the event loop (no I/O between).
    let asked = () => {}
    const tokenAsked = new Promise<void>((r) => (asked = r))
    const lockedFor = h.lockout.lockedFor.bind(h.lockout)
    h.lockout.lockedFor = (k) => {
      asked()
      return lockedFor(k)
    }
    const token = h.call('GET', '/v1/stats', { auth: BOOTSTRAP_TOKEN })
    await Promise.race([token, tokenAsked.then(() => new Promise((r) => setImmediate(r)))])
    release()
    t.same((await Promise.all(bad)).map((a) => a.status), [401, 401, 401], 'the three bad keys are checked and lock the address out')
    const answer = await token
    // Before: 200, compared before it took a place.
    t.equal(answer.status, 429, 'the right token, after them, is refused')
    t.equal(answer.json?.error?.code, 'ip_locked_out')
  })
})

t.test('GET /v1/lockouts lists the lockouts in force; DELETE /v1/lockouts/{address}: the address may try again at once, its failures forgotten; audited; an IPv6 address by its network (found by a review)', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, { gateway: true, config: { lockout: { max_attempts: 3 }, gateway: { trusted_proxies: ['127.0.0.1'] } } })
  const good = (await h.call('POST', '/v1/keys', { body: { name: 'good', type: 'user' } })).json
  const from = (address: string, key: string) => h.through('/x', { ...bearer(key), 'x-forwarded-for': address })
  const lockOut = async (address: string) => {
    for (let i = 0; i < 3; i++) await from(address, generateKey('kg_').key)
    t.equal((await from(address, good.key)).status, 429, `${address} is locked out`)
  }

  await lockOut('198.51.100.9')
  // Listed while in force (GET /v1/lockouts), and found by its address.
  const asked = Date.now()
  const listed = await h.call('GET', '/v1/lockouts')
  const answered = Date.now()
  t.equal(listed.status, 200)
  t.equal(listed.json.total, 1)
  t.match(listed.json.items, [{ address_key: '198.51.100.9', locked_until: String, retry_after_s: Number }])
  const until = Date.parse(listed.json.items[0].locked_until)
  const left = until - answered
  t.ok(left > 0 && left <= 900_000, `it ends within lockout.window_s (${left} ms)`)
  // The seconds left when the list was made, rounded up as Retry-After is, some time between the
  // ask and the answer (before, 899 or 900: a loaded machine's 2 s between the lockout and the
  // list gave 898).
  const retryAfter = listed.json.items[0].retry_after_s
  t.ok(retryAfter >= Math.ceil((until - answered) / 1000) && retryAfter <= Math.ceil((until - asked) / 1000), `retry_after_s as Retry-After says it (${retryAfter} s, ${left} ms left)`)
  t.same((await h.call('GET', '/v1/lockouts?address=198.51.100.9')).json.items.map((i: { address_key: string }) => i.address_key), ['198.51.100.9'])
  t.same((await h.call('GET', '/v1/lockouts?address=198.51.100.10')).json, { items: [], total: 0 }, 'another address has none')
  const before = await h.auditRows()
  const lifted = await h.call('DELETE', '/v1/lockouts/198.51.100.9')
  t.equal(lifted.status, 200)
  t.same(lifted.json, { address: '198.51.100.9', address_key: '198.51.100.9', was_locked_out: true })
  t.equal((await h.auditRows()) - before, 1, 'one audit row')
  const row = (await h.call('GET', '/v1/audit?action=lockout.lifted')).json.items[0]
  t.match(row, { action: 'lockout.lifted', actor: `key:${h.adminKeyId}`, details: { address: '198.51.100.9', address_key: '198.51.100.9' } })
  t.equal((await from('198.51.100.9', good.key)).status, 200, 'a valid key from it is let in at once')
  t.same((await h.call('GET', '/v1/lockouts')).json, { items: [], total: 0 }, 'no longer listed')
  // Its failures were forgotten with the lockout: it has its whole allowance again.
  for (let i = 0; i < 2; i++) t.equal((await from('198.51.100.9', generateKey('kg_').key)).status, 401)
  t.equal((await from('198.51.100.9', good.key)).status, 200, 'two failures after the lift do not lock it out (three were counted before it)')

  // Nothing in force: 200 all the same, saying so. The IPv4-mapped form is the IPv4 address.
  t.same((await h.call('DELETE', '/v1/lockouts/::ffff:203.0.113.5')).json, { address: '203.0.113.5', address_key: '203.0.113.5', was_locked_out: false })

  // An IPv6 address is counted, and so lifted, by its /64 (rate_limits.ipv6_prefix_bits).
  await lockOut('2001:db8:1:2::7')
  t.equal((await from('2001:db8:1:2::8', good.key)).status, 429, 'its network is locked out')
  await lockOut('198.51.100.11')
  const both = (await h.call('GET', '/v1/lockouts')).json
  t.same(both.items.map((i: { address_key: string }) => i.address_key), ['198.51.100.11', '2001:db8:1:2::/64'], 'latest lockout first')
  t.equal(both.total, 2)
  t.same((await h.call('GET', '/v1/lockouts?limit=1')).json.items.map((i: { address_key: string }) => i.address_key), ['198.51.100.11'], 'limit: the first ones')
  t.equal((await h.call('GET', '/v1/lockouts?limit=1')).json.total, 2, 'total counts them all')
  t.same((await h.call('GET', '/v1/lockouts?address=2001:db8:1:2::abcd')).json.items.map((i: { address_key: string }) => i.address_key), ['2001:db8:1:2::/64'], 'an IPv6 address finds its network')
  t.same((await h.call('DELETE', '/v1/lockouts/2001:db8:1:2::99')).json, { address: '2001:db8:1:2::99', address_key: '2001:db8:1:2::/64', was_locked_out: true })
  t.equal((await from('2001:db8:1:2::7', good.key)).status, 200, 'the whole network is let in again')

  for (const bad of ['10.1', 'not-an-address', '10.0.0.0%2F8', '2130706433']) {
    const answer = await h.call('DELETE', `/v1/lockouts/${bad}`)
    t.equal(answer.status, 400, bad)
    t.match(answer.json.error, { code: 'validation_failed', details: { fields: [{ field: 'address', message: /expected an IPv4 or IPv6 address/ }] } })
    t.equal(answer.json.error.details.fields.length, 1, 'one field named')
    const listed = await h.call('GET', `/v1/lockouts?address=${bad}`)
    t.equal(listed.status, 400, `listed: ${bad}`)
    t.match(listed.json.error, { code: 'validation_failed', details: { fields: [{ field: 'address', message: /expected an IPv4 or IPv6 address/ }] } })
    t.equal(listed.json.error.details.fields.length, 1, 'one field named')
  }
  // The document says so (before, found by a review: a plain string in both places).
  const doc = (await h.call('GET', '/openapi.json')).json
  const addressIn = (path: string, method: string) => doc.paths[path][method].parameters.find((p: { name: string }) => p.name === 'address')?.schema
  t.match(addressIn('/v1/lockouts/{address}', 'delete'), { type: 'string', format: 'lockout-address' }, 'the path parameter is an address or the IPv6 network listed')
  t.match(addressIn('/v1/lockouts', 'get'), { type: 'string', format: 'lockout-address' }, 'so is the query parameter')
  for (const bad of ['limit=0', 'limit=1001', 'limit=x', 'cursor=abc']) t.equal((await h.call('GET', `/v1/lockouts?${bad}`)).status, 400, bad)
  t.equal((await h.call('GET', '/v1/lockouts', { auth: null })).status, 401, 'listing needs an admin credential too')
  const unauthenticated = await h.call('DELETE', '/v1/lockouts/198.51.100.9', { auth: null })
  t.equal(unauthenticated.status, 401, 'an admin credential is required')
})

t.test('an admin key is a key at the gateway (README, Decisions): a route without scopes lets it through with X-Keygate-Scopes: admin, a route with scopes it lacks refuses it; the bootstrap token never passes', async (t) => {
  const store = await openStore(t, 'embedded')
  // The scoped route's upstream is never reached: the admin key holds none of its scopes.
  const h = await startAdmin(t, store.db, { gateway: true, config: { routes: [{ name: 'orders', path: '/orders', upstream: 'http://127.0.0.1:1', scopes: ['orders:read'] }] } })
  const upstream = h.gateway!.upstream
  const open = await h.through('/anything', bearer(h.adminKey))
  t.equal(open.status, 200, 'through the route without scopes')
  t.equal(upstream.received.length, 1)
  const got = upstream.received[0]!.headers
  t.equal(got['x-keygate-scopes'], 'admin', 'told to the upstream as the admin key it is')
  t.equal(got['x-keygate-key-id'], h.adminKeyId)
  t.equal(got.authorization, undefined, 'its credential removed as any key\'s')
  const scoped = await h.through('/orders/1', bearer(h.adminKey))
  t.equal(scoped.status, 403, 'a route with scopes: only a key holding one of them')
  t.equal(scoped.json?.error?.code, 'scope_denied')
  const token = await h.through('/anything', bearer(BOOTSTRAP_TOKEN))
  t.equal(token.status, 401, 'the bootstrap token is no key')
  t.equal(token.json?.error?.code, 'key_invalid')
  t.equal((await h.call('GET', '/v1/stats', { auth: BOOTSTRAP_TOKEN })).status, 200, 'though the admin API takes it')
  t.equal(upstream.received.length, 1, 'neither refused request reached an upstream')
})
