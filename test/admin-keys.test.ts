// The key operations of the admin API on both stores: what each answers, what it refuses, and
// the one audit row (or, for a rotation, one per key) each change writes, naming the admin key
// or the bootstrap token as the actor and the caller's address.
import { remoteOperations } from '../cli/remote-operations.ts'
import { remoteDenyOperations } from '../cli/deny-list.ts'
import t from 'tap'
import type { Test } from 'tap'
import { createHash, randomBytes, randomUUID } from 'node:crypto'
import http from 'node:http'
import https from 'node:https'
import { execFileSync, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import net, { type AddressInfo } from 'node:net'
import { Value } from '@sinclair/typebox/value'
import { OPERATIONS } from '../admin/routes/index.ts'
import { IMPORT_MAX_ROWS, ImportRow } from '../core/keys/schemas.ts'
import { BOOTSTRAP_TOKEN, MAX_BODY_BYTES, startAdmin, type AdminHarness } from './helpers/admin.ts'
import { trailIs } from './helpers/audit.ts'
import { forEachStore } from './helpers/stores.ts'
import { createLogger } from '../core/log.ts'
import { AuditCipher, AuditLog, encryptionKeyId } from '../core/audit.ts'
import { keyJson, keyValidUntil, type KeyRecord } from '../core/keys/types.ts'

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex')

/** The body limit of POST /v1/keys/import (0 where it has none of its own). */
const IMPORT_BODY_LIMIT = OPERATIONS.find((o) => o.id === 'importKeys')?.maxBodyBytes ?? 0

async function auditOf(h: AdminHarness, keyId: string) {
  return (await h.call('GET', `/v1/keys/${keyId}/audit`)).json.items as Array<{ action: string; actor: string; address: string; details: Record<string, unknown> }>
}

/** Checks a key's whole audit trail, newest first (see trailIs). */
async function keyTrailIs(t: Test, h: AdminHarness, keyId: string, rows: ReadonlyArray<{ action: string } & Record<string, unknown>>, what = 'audit') {
  return trailIs(t, await auditOf(h, keyId), rows, what)
}

/** Runs `fn` and checks it wrote exactly `n` audit rows. */
async function writes<T>(t: Test, h: AdminHarness, n: number, what: string, fn: () => Promise<T>): Promise<T> {
  const before = await h.auditRows()
  const out = await fn()
  t.equal((await h.auditRows()) - before, n, `${what}: ${n} audit row${n === 1 ? '' : 's'}`)
  return out
}

await forEachStore(t, async (t, store) => {
  // The admin API's log, for the warnings it writes.
  const logLines: string[] = []
  const h = await startAdmin(t, store.db, { log: createLogger({ level: 'warn', write: (line) => logLines.push(line) }) })
  const actor = `key:${h.adminKeyId}`

  await t.test('create', async (t) => {
    const a = await writes(t, h, 1, 'create', () =>
      h.call('POST', '/v1/keys', { body: { name: 'billing', type: 'service', scopes: ['orders:read'], owner: 'team-a', metadata: { ticket: 7 }, allowed_cidrs: ['10.0.0.0/8'], rate_limit: { limit: 5, window_s: 1 } } }),
    )
    t.equal(a.status, 201)
    t.match(a.json, { name: 'billing', type: 'service', status: 'active', owner: 'team-a' })
    // Compared whole: t.match took a key with a scope, a metadata key or a range more (found by a review).
    t.same([a.json.scopes, a.json.metadata, a.json.allowed_cidrs, a.json.rate_limit], [['orders:read'], { ticket: 7 }, ['10.0.0.0/8'], { limit: 5, window_s: 1 }], 'what was given, no more')
    t.match(a.json.key, new RegExp(`^kg_${a.json.id}_`), 'the plaintext key, once')
    t.notOk('key_hash' in a.json, 'no hash in the answer')
    const v = await h.keys.validate(a.json.key, { address: '10.1.2.3' })
    t.ok(v.valid, 'the returned key works')
    const rows = await auditOf(h, a.json.id)
    t.match(rows, [{ action: 'key.created', actor, address: '127.0.0.1' }], 'audit: the admin key is the actor')
    t.equal(rows.length, 1, 'one audit row')
    t.notOk(JSON.stringify(rows).includes(a.json.key), 'the plaintext is not in the audit trail')
    const again = await h.call('GET', `/v1/keys/${a.json.id}`)
    t.notOk('key' in again.json, 'the plaintext is never shown again')

    const tokenMade = await h.call('POST', '/v1/keys', { auth: BOOTSTRAP_TOKEN, body: { name: 'by token', type: 'user' } })
    t.equal(tokenMade.status, 201)
    await keyTrailIs(t, h, tokenMade.json.id, [{ action: 'key.created', actor: 'token' }], 'audit: the bootstrap token is the actor')

    const bad = await writes(t, h, 0, 'refused create', () => h.call('POST', '/v1/keys', { body: { name: '', type: 'robot', scopes: 'x', extra: 1, allowed_cidrs: ['nope'] } }))
    t.equal(bad.status, 400)
    t.equal(bad.json.error.code, 'validation_failed')
    const fields = bad.json.error.details.fields.map((f: { field: string }) => f.field).sort()
    t.same(fields, ['allowed_cidrs[0]', 'extra', 'name', 'scopes', 'type'], 'every bad field is named')
    const missing = await h.call('POST', '/v1/keys', { body: {} })
    t.same(missing.json.error.details.fields.map((f: { field: string }) => f.field).sort(), ['name', 'type'])
    const none = await h.call('POST', '/v1/keys')
    t.equal(none.status, 400, 'a body is required')
    t.equal(none.json.error.code, 'validation_failed')
    t.same(none.json.error.details.fields, [{ field: 'body', message: 'is required; expected a JSON object' }], 'the field says what the message says')
    const past = await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', expires_at: '2001-01-01T00:00:00Z' } })
    t.equal(past.json.error.details.fields[0].field, 'expires_at')
    const array = await h.call('POST', '/v1/keys', { body: [1, 2] })
    t.equal(array.status, 400)
  })

  await t.test('list: filters and cursor pagination', async (t) => {
    const owner = `owner-${randomUUID().slice(0, 8)}`
    const made: string[] = []
    for (let i = 0; i < 5; i++) made.push((await h.call('POST', '/v1/keys', { body: { name: `page ${i}`, type: i % 2 ? 'user' : 'integration', owner, scopes: i === 0 ? ['special'] : [] } })).json.id)
    const seen: string[] = []
    let cursor: string | null = null
    do {
      const a = await writes(t, h, 0, 'list', () => h.call('GET', `/v1/keys?owner=${owner}&limit=2${cursor ? `&cursor=${cursor}` : ''}`))
      t.equal(a.status, 200)
      t.ok(a.json.items.length <= 2)
      seen.push(...a.json.items.map((k: { id: string }) => k.id))
      cursor = a.json.next_cursor
    } while (cursor)
    t.same(seen, [...made].reverse(), 'every key once, newest first')
    t.same((await h.call('GET', `/v1/keys?owner=${owner}&type=user`)).json.items.map((k: { id: string }) => k.id), [made[3], made[1]])
    t.same((await h.call('GET', `/v1/keys?owner=${owner}&scope=special`)).json.items.map((k: { id: string }) => k.id), [made[0]])
    t.equal((await h.call('GET', `/v1/keys?owner=${owner}&name=PAGE%203`)).json.items[0].id, made[3])
    const bad = await h.call('GET', '/v1/keys?limit=0&type=robot&colour=red')
    t.equal(bad.status, 400)
    t.same(bad.json.error.details.fields.map((f: { field: string }) => f.field).sort(), ['colour', 'limit', 'type'])
    const twice = await h.call('GET', '/v1/keys?limit=1&limit=2')
    t.equal(twice.json.error.details.fields[0].field, 'limit')
    const cur = await h.call('GET', '/v1/keys?cursor=bm90LWEtY3Vyc29y')
    t.equal(cur.json.error.code, 'validation_failed')
  })

  await t.test('get, update', async (t) => {
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'edit me', type: 'user' } })).json
    t.equal((await h.call('GET', `/v1/keys/${k.id}`)).json.name, 'edit me')
    const missing = await h.call('GET', '/v1/keys/nosuchkey123')
    t.equal(missing.status, 404)
    t.equal(missing.json.error.code, 'key_not_found')
    // A whole key given where its id belongs (`api-key revoke <the leaked key>`): before, the 404 echoed it.
    const created = (await h.call('POST', '/v1/keys', { body: { name: 'given by mistake', type: 'user' } })).json
    for (const [method, path] of [['GET', ''], ['PATCH', ''], ['POST', '/revoke'], ['POST', '/rotate'], ['GET', '/audit']] as const) {
      const wrong = await h.call(method, `/v1/keys/${created.key}${path}`, method === 'GET' ? {} : { body: method === 'PATCH' ? { name: 'x' } : {} })
      t.equal(wrong.status, 404, `${method} /v1/keys/<key>${path}`)
      t.notMatch(wrong.text, created.key.slice(-28), 'the key is not in the answer')
      t.match(wrong.json.error.message, 'no key has the id "[redacted]": that is shaped like an API key itself')
    }
    t.equal(missing.json.error.message, 'no key has the id "nosuchkey123"', 'no such hint for an id')
    const secret = await h.call('GET', `/v1/keys/whsec_${'A'.repeat(30)}`)
    t.equal(secret.json.error.message, 'no key has the id "[redacted]"', 'nor for another secret the scrubber hides')
    // Every error answer, whatever echoed the key (before: a route that does not exist, a query
    // value and an anomaly id answered with the whole key in the message).
    for (const [method, path] of [['GET', `/v1/nokeys/${created.key}`], ['GET', `/v1/keys?limit=${created.key}`], ['POST', `/v1/anomalies/${created.key}/ack`]] as const) {
      const echoed = await h.call(method, path)
      t.ok(echoed.status >= 400, `${method} ${path.replace(created.key, '<key>')}: refused`)
      t.notMatch(echoed.text, created.key.slice(-28), 'the key is not in the answer')
      t.match(echoed.text, '[redacted]')
    }
    const u = await writes(t, h, 1, 'update', () => h.call('PATCH', `/v1/keys/${k.id}`, { body: { name: 'edited', scopes: ['a', 'b'], rate_limit: null } }))
    t.equal(u.status, 200)
    t.match(u.json, { name: 'edited' })
    t.same(u.json.scopes, ['a', 'b'])
    const trail = await keyTrailIs(t, h, k.id, [{ action: 'key.updated', actor }, { action: 'key.created' }])
    // rate_limit: null restates the key's (it had none): not a change.
    t.same(trail[0]?.details.changed, ['name', 'scopes'], 'what changed, and nothing else')
    const empty = (await h.call('PATCH', `/v1/keys/${k.id}`, { body: {} })).json.error
    t.equal(empty.code, 'validation_failed', 'an empty change is refused')
    // Told that one key at least is needed (before, found by a review: "{} is not allowed; expected
    // an object with the keys ...", of an object).
    t.match(empty.message, /^body: \{\} is not allowed; expected an object with at least one of the keys name, /)
    t.equal((await h.call('PATCH', `/v1/keys/${k.id}`, { body: { type: 'system' } })).json.error.details.fields[0].field, 'type', 'the type cannot change')
    t.equal((await h.call('PATCH', '/v1/keys/nosuchkey123', { body: { name: 'x' } })).status, 404)
  })

  await t.test('a PATCH that changes nothing answers the key as it is and writes nothing (found by a review)', async (t) => {
    const body = { name: 'noop', scopes: ['a'], metadata: { b: 1, a: [true] }, rate_limit: { limit: 9, window_s: 1 }, expires_at: '2099-01-01T00:00:00Z' }
    const k = (await h.call('POST', '/v1/keys', { body: { ...body, type: 'service' } })).json
    const row = async () => (await store.db.query<{ j: string }>('SELECT row_to_json(k)::text AS j FROM api_keys k WHERE id = $1', [k.id]))[0]?.j
    const before = await row()
    const heard: string[] = []
    t.teardown(h.keys.onChange((c) => heard.push(c.key.id)))
    const as = (await h.call('GET', `/v1/keys/${k.id}`)).json
    const same = await writes(t, h, 0, 'the same values', () =>
      h.call('PATCH', `/v1/keys/${k.id}`, { body: { ...body, metadata: { a: [true], b: 1 }, expires_at: '2099-01-01T01:00:00.000+01:00', owner: null } }),
    )
    t.equal(same.status, 200)
    t.same(same.json, as, 'the key as it is')
    t.equal(await row(), before, 'the row is not touched (updated_at, change_xid)')
    t.same(heard, [], 'no change event')
    await writes(t, h, 1, 'a name among the same values', () => h.call('PATCH', `/v1/keys/${k.id}`, { body: { ...body, name: 'noop 2' } }))
    t.same((await auditOf(h, k.id))[0]?.details, { changed: ['name'], name: 'noop 2' }, 'only the name is the change')
    t.same(heard, [k.id])
    // Before (found by a review): the audit row held the date as sent.
    await writes(t, h, 1, 'a new expiry written otherwise', () => h.call('PATCH', `/v1/keys/${k.id}`, { body: { expires_at: '2099-07-01t02:00:00.5+02:00' } }))
    t.same((await auditOf(h, k.id))[0]?.details, { changed: ['expires_at'], expires_at: '2099-07-01T00:00:00.500Z' }, 'the audit row holds the date as answers give it')
  })

  await t.test("allowed_cidrs are kept and answered as the ranges they match, in the deny list's spelling, and a range with host bits is refused: create, update, import, the CLI through the API (found by a review)", async (t) => {
    // Before: kept as written, so `2001:DB8::/32` and `2001:db8::/32` were two bindings, and a key
    // answered `10.1.2.3/8` where the gateway let in all of 10.0.0.0/8.
    const written = ['10.0.0.0/8', '::ffff:10.0.0.0/104', '2001:DB8:0:0::/32', 'fe80::%eth0/64', '192.0.2.7/32', '::1/128']
    const kept = ['10.0.0.0/8', '2001:db8::/32', 'fe80::/64', '192.0.2.7', '::1']
    const made = (await h.call('POST', '/v1/keys', { body: { name: 'bound', type: 'service', allowed_cidrs: written } })).json
    t.same(made.allowed_cidrs, kept, 'created: each as its range, once (10.0.0.0/8 and ::ffff:10.0.0.0/104 are one)')
    t.same((await h.call('GET', `/v1/keys/${made.id}`)).json.allowed_cidrs, kept, 'read back so')
    t.same((await auditOf(h, made.id))[0]?.details?.allowed_cidrs, kept, 'and audited so')
    t.ok((await h.keys.validate(made.key, { address: '10.200.0.1' })).valid, 'what the gateway matches is unchanged: all of 10.0.0.0/8')
    t.notOk((await h.keys.validate(made.key, { address: '11.0.0.1' })).valid)

    await writes(t, h, 0, 'the same ranges written otherwise', () => h.call('PATCH', `/v1/keys/${made.id}`, { body: { allowed_cidrs: written } }))
    const updated = await writes(t, h, 1, 'update', () => h.call('PATCH', `/v1/keys/${made.id}`, { body: { allowed_cidrs: ['2001:DB8::/120', '198.51.100.0/24'] } }))
    t.same(updated.json.allowed_cidrs, ['2001:db8::/120', '198.51.100.0/24'], 'updated')
    t.same((await auditOf(h, made.id))[0]?.details, { changed: ['allowed_cidrs'], allowed_cidrs: ['2001:db8::/120', '198.51.100.0/24'] }, 'and audited so')

    const remote = remoteOperations(h.url, h.adminKey)
    t.same((await remote.create({ name: 'bound by the CLI', type: 'user', allowed_cidrs: ['172.16.0.0/12'] })).record.allowedCidrs, ['172.16.0.0/12'], 'keygate api-key create through the API')
    const [imported] = await remote.importLegacy([{ key_hash: sha256(randomUUID()), name: 'legacy bound', allowed_cidrs: ['192.0.2.0/24', '::ffff:192.0.2.0/120'] }], undefined)
    t.same(imported?.allowedCidrs, ['192.0.2.0/24'], 'imported')

    // Host bits: the whole network would be let in where one address may have been meant.
    const hostBits = /^"10\.1\.2\.3\/8" has host bits set: as a range it covers the whole network 10\.0\.0\.0\/8; write 10\.0\.0\.0\/8 for that network, or 10\.1\.2\.3 alone for the one address/
    const refused = await writes(t, h, 0, 'a create with host bits', () => h.call('POST', '/v1/keys', { body: { name: 'host bits', type: 'user', allowed_cidrs: ['192.0.2.7', '10.1.2.3/8'] } }))
    t.equal(refused.status, 400)
    t.match(refused.json.error.details.fields, [{ field: 'allowed_cidrs[1]', message: hostBits }], 'refused, naming the network and the item')
    t.equal(refused.json.error.details.fields.length, 1, 'one field named')
    const patched = await writes(t, h, 0, 'an update with host bits', () => h.call('PATCH', `/v1/keys/${made.id}`, { body: { allowed_cidrs: ['10.1.2.3/8'] } }))
    t.match(patched.json.error.details.fields, [{ field: 'allowed_cidrs[0]', message: hostBits }], 'an update too')
    t.equal(patched.json.error.details.fields.length, 1, 'one field named')
    t.same((await h.call('GET', `/v1/keys/${made.id}`)).json.allowed_cidrs, ['2001:db8::/120', '198.51.100.0/24'], 'the key keeps its bindings')

    const octal = await h.call('POST', '/v1/keys', { body: { name: 'octal', type: 'user', allowed_cidrs: ['010.0.0.1'] } })
    t.match(octal.json.error.details.fields, [{ field: 'allowed_cidrs[0]', message: /^"010\.0\.0\.1" is not allowed; expected an IPv4 or IPv6 address/ }], 'a form other readers take for another address is still refused, and named')
    t.equal(octal.json.error.details.fields.length, 1, 'one field named')
  })

  await t.test('revoke', async (t) => {
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'revoke me', type: 'user' } })).json
    const r = await writes(t, h, 1, 'revoke', () => h.call('POST', `/v1/keys/${k.id}/revoke`, { body: { reason: 'leaked' } }))
    t.equal(r.status, 200)
    t.match(r.json, { status: 'revoked', revoked_reason: 'leaked' })
    t.equal(k.valid_until, null, 'valid_until: null for a key without an expiry')
    t.equal(r.json.valid_until, r.json.revoked_at, 'and, revoked, when it was revoked')
    await keyTrailIs(t, h, k.id, [{ action: 'key.revoked', actor, details: { reason: 'leaked' } }, { action: 'key.created' }])
    const again = await writes(t, h, 0, 'revoke again', () => h.call('POST', `/v1/keys/${k.id}/revoke`))
    t.equal(again.status, 409)
    t.equal(again.json.error.code, 'key_not_active')
    const noBody = (await h.call('POST', '/v1/keys', { body: { name: 'no body', type: 'user' } })).json
    t.equal((await h.call('POST', `/v1/keys/${noBody.id}/revoke`)).status, 200, 'the body is optional')
    t.equal((await h.call('POST', '/v1/keys/nosuchkey123/revoke')).status, 404)
    t.equal((await h.call('POST', `/v1/keys/${k.id}/revoke`, { body: { reason: 7 } })).json.error.details.fields[0].field, 'reason')

    // An id longer than the admin listener takes in a URL (16 KiB of head), given to the CLI
    // through the admin API: the store's answer, as on the store (before, found by a review: 431
    // headers_too_large, "The request headers are too large.").
    const long = 'x'.repeat(20_000)
    const failure = (p: Promise<unknown>) => p.then(() => ({ code: 'none' }), (err: { code?: string; message?: string }) => err)
    const remote = remoteOperations(h.url, h.adminKey)
    for (const [what, call] of [['get', () => remote.get(long)], ['revoke', () => remote.revoke(long, undefined)], ['rotate', () => remote.rotate(long, false)], ['update', () => remote.update(long, { name: 'x' })], ['audit', () => remote.audit(long, {})]] as const) {
      t.match(await failure(call()), { code: 'key_not_found', message: /^no key has the id "x{197}\.\.\."$/ }, `api-key ${what} of a 20,000-character id: key_not_found, the id cut (test/unknown-id-clipped.test.ts)`)
    }
    t.match(await failure(remoteDenyOperations(h.url, h.adminKey).remove(long)), { code: 'deny_entry_not_found', message: /^no deny list entry has the id "x{197}\.\.\."$/ }, 'deny-list remove too')
    // An id with a control character (`"$ID"` read with its line break), which no URL path
    // carries: the store's answer, as on the store (before, found by a review: 400 bad_request,
    // "The request path has a percent-encoded control character.").
    for (const id of [`${long.slice(0, 12)}\n`, 'a\tb', '\u007f']) {
      for (const [what, call] of [['get', () => remote.get(id)], ['revoke', () => remote.revoke(id, undefined)], ['rotate', () => remote.rotate(id, false)], ['update', () => remote.update(id, { name: 'x' })], ['audit', () => remote.audit(id, {})]] as const) {
        t.match(await failure(call()), { code: 'key_not_found', message: /^no key has the id "/ }, `api-key ${what} of ${JSON.stringify(id)}: key_not_found`)
      }
      t.match(await failure(remoteDenyOperations(h.url, h.adminKey).remove(id)), { code: 'deny_entry_not_found', message: /^no deny list entry has the id "/ }, `deny-list remove of ${JSON.stringify(id)} too`)
    }
  })

  await t.test("a made key's audit row holds everything it was given: created, rotated in, imported (found by a review)", async (t) => {
    const given = {
      name: 'granted',
      type: 'user',
      scopes: ['orders:read'],
      owner: 'bob',
      // As they are kept (`::1/128` is kept as `::1`: see the allowed_cidrs test).
      allowed_cidrs: ['10.0.0.0/8', '::1'],
      rate_limit: { limit: 5, window_s: 60 },
      rotation_interval_s: 7_776_000,
      expires_at: new Date(Date.now() + 86_400_000).toISOString(),
      metadata: { team: 'payments' },
    }
    const k = (await h.call('POST', '/v1/keys', { body: given })).json
    t.same((await auditOf(h, k.id))[0]?.details, given, 'created')
    const r = (await h.call('POST', `/v1/keys/${k.id}/rotate`)).json
    t.same((await auditOf(h, r.id))[0]?.details, { rotated_from: k.id, ...given }, 'rotated in: the same, carried over')
    // `keygate api-key audit` through the admin API reads the same trail, a page at a time.
    const remote = remoteOperations(h.url, h.adminKey)
    const page = await remote.audit(k.id, { limit: 1 })
    t.match(page.items, [{ action: 'key.rotated', keyId: k.id, integrity: 'verified', createdAt: Date }])
    t.equal(page.items.length, 1, 'a page of one row')
    const last = await remote.audit(k.id, { cursor: page.nextCursor as string })
    t.match(last.items, [{ action: 'key.created', details: given }])
    t.same([last.items.length, last.nextCursor], [1, null], 'the next page: that row alone, and the last')
    await t.rejects(remote.audit('AAAAAAAAAAAA', {}), { code: 'key_not_found' })
    const legacy = randomUUID()
    const row = { key_hash: sha256(legacy), name: 'legacy granted', scopes: ['orders:read'], owner: 'carol', metadata: { from: 'old' }, created_at: '2024-01-02T03:04:05.000Z', expires_at: given.expires_at }
    const imported = (await h.call('POST', '/v1/keys/import', { body: { rows: [row], type: 'service' } })).json.items[0]
    t.same((await auditOf(h, imported.id))[0]?.details, {
      name: 'legacy granted', type: 'service', scopes: ['orders:read'], owner: 'carol', allowed_cidrs: [], rate_limit: null, rotation_interval_s: null,
      expires_at: given.expires_at, metadata: { from: 'old' }, created_at: '2024-01-02T03:04:05.000Z',
    }, 'imported')
    // A migration's imported keys, apart (before, found by a migration review, a list had no such filter).
    const legacyOnly = await h.call('GET', '/v1/keys?legacy=true&limit=500')
    t.equal(legacyOnly.status, 200, legacyOnly.text)
    t.ok(legacyOnly.json.items.some((x: any) => x.id === imported.id), 'legacy=true lists the imported key')
    t.ok(legacyOnly.json.items.every((x: any) => x.legacy === true), 'and imported keys only')
    const own = await h.call('GET', '/v1/keys?legacy=false&limit=500')
    t.ok(own.json.items.some((x: any) => x.id === k.id), "legacy=false lists keygate's own")
    t.ok(own.json.items.every((x: any) => x.legacy === false), 'and those only')
    t.equal((await h.call('GET', '/v1/keys?legacy=maybe')).json.error.code, 'validation_failed')
    t.same((await remote.list({ legacy: true, limit: 500 })).items.map((x) => x.id), legacyOnly.json.items.map((x: any) => x.id), 'the CLI through the admin API asks the same')
  })

  await t.test('rotate, with and without force', async (t) => {
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'rotate me', type: 'service' } })).json
    const r = await writes(t, h, 2, 'rotate (one row per key)', () => h.call('POST', `/v1/keys/${k.id}/rotate`))
    t.equal(r.status, 200)
    t.not(r.json.id, k.id)
    t.match(r.json.key, new RegExp(`^kg_${r.json.id}_`))
    t.match(r.json.previous, { id: k.id, status: 'rotating', replaced_by: r.json.id })
    t.ok((await h.keys.validate(k.key)).valid, 'the old key lives through its grace period')
    await keyTrailIs(t, h, k.id, [{ action: 'key.rotated', actor, details: { replaced_by: r.json.id, force: false } }, { action: 'key.created' }])
    await keyTrailIs(t, h, r.json.id, [{ action: 'key.created', actor, details: { rotated_from: k.id } }])
    const again = await h.call('POST', `/v1/keys/${k.id}/rotate`)
    t.equal(again.status, 409, 'a rotating key cannot be rotated again')
    t.match(again.json.error.message, r.json.id, 'the refusal names the successor')

    const f = await h.call('POST', `/v1/keys/${r.json.id}/rotate`, { body: { force: true } })
    t.equal(f.status, 200)
    t.equal(f.json.previous.status, 'revoked')
    t.notOk((await h.keys.validate(r.json.key)).valid, 'a forced rotation ends the old key now')
    t.ok((await h.keys.validate(f.json.key)).valid)
    t.equal((await h.call('POST', `/v1/keys/${f.json.id}/rotate`, { body: { force: 'yes' } })).json.error.details.fields[0].field, 'force')
    t.equal((await h.call('POST', '/v1/keys/nosuchkey123/rotate')).status, 404)
  })

  await t.test('rotate: when the old key stops, and the new key keeps its expiry', async (t) => {
    // A system key (72 h of grace) that expires in 2 h: the old key stops at its expiry.
    const expiresAt = new Date(Date.now() + 2 * 3_600_000).toISOString()
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'expiring soon', type: 'system', expires_at: expiresAt } })).json
    const r = await h.call('POST', `/v1/keys/${k.id}/rotate`)
    t.equal(r.status, 200)
    t.equal(r.json.expires_at, expiresAt, 'the new key keeps the old expiry')
    t.equal(r.json.previous.expires_at, expiresAt)
    t.ok(Date.parse(r.json.previous.grace_until) > Date.parse(expiresAt) + 70 * 3_600_000, 'grace_until stays the grace deadline, 72 h on')
    t.equal(r.json.previous.valid_until, expiresAt, 'valid_until is the expiry, which comes first')
    // Every key's JSON carries it now (before, found by a review: only the replaced key's).
    t.equal(r.json.valid_until, expiresAt, "the new key's: its expiry, carried over")

    // Without an expiry it is the grace deadline; a forced rotation ends the key at once.
    const plain = (await h.call('POST', '/v1/keys', { body: { name: 'no expiry', type: 'user' } })).json
    const p = await h.call('POST', `/v1/keys/${plain.id}/rotate`)
    t.equal(p.json.previous.valid_until, p.json.previous.grace_until)
    t.equal(p.json.expires_at, null)
    const f = await h.call('POST', `/v1/keys/${p.json.id}/rotate`, { body: { force: true } })
    t.equal(f.json.previous.valid_until, f.json.previous.revoked_at, 'a forced rotation: valid until the rotation')
  })

  await t.test('valid_until of a key that has ended, before the scheduler marks its row', async (t) => {
    // A key past its expiry, and a rotated key past its grace, read `expired` at once, while their
    // rows say active and rotating until the scheduler's next round (none runs here, as none runs
    // for the CLI on the embedded store). Their valid_until is when they stopped: the expiry, the
    // end of the grace. Before (found by a review), it was the row's last change, its creation or
    // its rotation, as for a key the scheduler ended for a missed rotation deadline.
    const made = (await h.call('POST', '/v1/keys', { body: { name: 'ended unmarked', type: 'user', expires_at: new Date(Date.now() + 3_600_000).toISOString() } })).json
    const rotated = (await h.call('POST', '/v1/keys', { body: { name: 'grace ended unmarked', type: 'user' } })).json
    const successor = (await h.call('POST', `/v1/keys/${rotated.id}/rotate`)).json
    // Two hours on: made and rotated two hours ago, expired and out of its grace an hour ago.
    const [ended] = await h.db.query<{ expires_at: Date }>(
      `UPDATE api_keys SET created_at = created_at - interval '2 hours', updated_at = updated_at - interval '2 hours', expires_at = now() - interval '1 hour' WHERE id = $1 RETURNING expires_at`,
      [made.id],
    )
    const [graced] = await h.db.query<{ grace_until: Date }>(
      `UPDATE api_keys SET created_at = created_at - interval '2 hours', updated_at = updated_at - interval '2 hours', grace_until = now() - interval '1 hour' WHERE id = $1 RETURNING grace_until`,
      [rotated.id],
    )
    const expiresAt = (ended as { expires_at: Date }).expires_at.toISOString()
    const graceUntil = (graced as { grace_until: Date }).grace_until.toISOString()
    const [row] = await h.db.query<{ status: string }>('SELECT status FROM api_keys WHERE id = $1', [made.id])
    t.equal(row?.status, 'active', 'its row is not marked yet')
    const got = (await h.call('GET', `/v1/keys/${made.id}`)).json
    t.match(got, { status: 'expired', valid_until: expiresAt }, 'GET: expired, valid until its expiry')
    t.match((await h.call('GET', `/v1/keys/${rotated.id}`)).json, { status: 'expired', valid_until: graceUntil }, 'GET: a rotated key, valid until the end of its grace')
    const listed = (await h.call('GET', '/v1/keys?status=expired&limit=500')).json.items as Array<{ id: string; valid_until: string }>
    t.equal(listed.find((k) => k.id === made.id)?.valid_until, expiresAt, 'the list: the same')
    t.equal(listed.find((k) => k.id === rotated.id)?.valid_until, graceUntil)
    t.equal((await h.call('GET', `/v1/keys/${successor.id}`)).json.valid_until, null, 'the successor works on')
    // The CLI through the admin API shows the server's valid_until (its VALID UNTIL column, `get`).
    const remote = remoteOperations(h.url, h.adminKey)
    t.equal(keyValidUntil(await remote.get(made.id))?.toISOString(), expiresAt, 'the CLI through the API: its expiry')
    t.equal(keyJson(await remote.get(rotated.id)).valid_until, graceUntil, 'and the end of the grace')
    const page = await remote.list({ status: 'expired', limit: 500 })
    t.equal(keyValidUntil(page.items.find((k) => k.id === made.id) as KeyRecord)?.toISOString(), expiresAt)
    // A row the scheduler marked keeps the rule for a missed rotation deadline: ended at that round.
    await h.db.query(`UPDATE api_keys SET status = 'expired', updated_at = now() - interval '30 minutes', expires_at = now() + interval '1 hour' WHERE id = $1`, [made.id])
    const [marked] = await h.db.query<{ updated_at: Date }>('SELECT updated_at FROM api_keys WHERE id = $1', [made.id])
    const round = (marked as { updated_at: Date }).updated_at.toISOString()
    t.match((await h.call('GET', `/v1/keys/${made.id}`)).json, { status: 'expired', valid_until: round }, 'a key ended for its rotation deadline: the round that ended it')
    t.equal(keyValidUntil(await remote.get(made.id))?.toISOString(), round, 'through the API too')
  })

  await t.test('a rotate refusal names the key of the lineage that can be rotated', async (t) => {
    // a → b → c, then c rotated with force to d: a, b and c are revoked.
    const a = (await h.call('POST', '/v1/keys', { body: { name: 'lineage', type: 'service' } })).json
    const b = (await h.call('POST', `/v1/keys/${a.id}/rotate`)).json
    const c = (await h.call('POST', `/v1/keys/${b.id}/rotate`)).json
    const d = (await h.call('POST', `/v1/keys/${c.id}/rotate`, { body: { force: true } })).json
    t.equal((await h.call('GET', `/v1/keys/${b.id}`)).json.status, 'revoked')
    const fromA = await h.call('POST', `/v1/keys/${a.id}/rotate`)
    t.equal(fromA.status, 409)
    t.equal(fromA.json.error.code, 'key_not_active')
    t.equal(fromA.json.error.message, `key ${a.id} is revoked and cannot be rotated; it was replaced by ${b.id}; the active key of its lineage is ${d.id}, rotate that key instead`)
    t.equal((await h.call('POST', `/v1/keys/${c.id}/rotate`)).json.error.message, `key ${c.id} is revoked and cannot be rotated; it was replaced by ${d.id}, rotate that key instead`)

    // With the end of the lineage revoked too, no key of it can be rotated: none is named.
    await h.call('POST', `/v1/keys/${d.id}/revoke`)
    t.equal(
      (await h.call('POST', `/v1/keys/${a.id}/rotate`)).json.error.message,
      `key ${a.id} is revoked and cannot be rotated; it was replaced by ${b.id}, and no key of its lineage can be rotated (the last, ${d.id}, is revoked): create a new key`,
    )
  })

  await t.test('audit trail pages', async (t) => {
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'busy', type: 'user' } })).json
    for (let i = 0; i < 4; i++) await h.call('PATCH', `/v1/keys/${k.id}`, { body: { name: `busy ${i}` } })
    const first = await h.call('GET', `/v1/keys/${k.id}/audit?limit=3`)
    t.equal(first.json.items.length, 3)
    const second = await h.call('GET', `/v1/keys/${k.id}/audit?limit=3&cursor=${first.json.next_cursor}`)
    t.equal(second.json.items.length, 2)
    t.equal(second.json.next_cursor, null)
    t.equal(second.json.items[1].action, 'key.created')
    t.equal((await h.call('GET', '/v1/keys/nosuchkey123/audit')).status, 404)
    t.equal((await h.call('GET', `/v1/keys/${k.id}/audit?limit=9999`)).status, 400)
  })

  await t.test('an audit row altered in the store is listed as failed; the rows around it are read, on every page', async (t) => {
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'tampered', type: 'user' } })).json
    for (let i = 0; i < 5; i++) await h.call('PATCH', `/v1/keys/${k.id}`, { body: { name: `tampered ${i}` } })
    const all = (await h.call('GET', `/v1/keys/${k.id}/audit`)).json.items as Array<{ id: string; integrity: string }>
    t.equal(all.length, 6)
    t.ok(all.every((r) => r.integrity === 'verified'), 'every row verified')
    // The third newest: before, it failed the page it was on with a 500, the page before it too
    // (its look-ahead row), and no row older than it could be read.
    const altered = all[2] as { id: string }
    await h.db.query('UPDATE api_key_audit_log SET actor = $2 WHERE id = $1', [altered.id, 'key:someoneelse'])
    const seen: Array<{ id: string; integrity: string; details: unknown; actor: string }> = []
    let cursor = ''
    for (let page = 0; page < 10; page++) {
      const a = await h.call('GET', `/v1/keys/${k.id}/audit?limit=2${cursor}`)
      t.equal(a.status, 200, `page ${page + 1}`)
      seen.push(...a.json.items)
      if (a.json.next_cursor === null) break
      cursor = `&cursor=${a.json.next_cursor}`
    }
    t.same(seen.map((r) => r.id), all.map((r) => r.id), 'every row is listed, in order')
    t.same(seen.map((r) => r.integrity), ['verified', 'verified', 'failed', 'verified', 'verified', 'verified'])
    t.matchStrict(seen[2], { details: null, actor: 'key:someoneelse' }, 'the altered row: what the store says, and no details')
    t.equal(seen[5]?.details !== null && (seen[5] as { details: { name?: string } }).details.name, 'tampered', 'the oldest row (key.created) is read')
    const warned = logLines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((l) => l.message === 'an audit row did not open')
    t.ok(warned.length >= 1, 'and logged as a warning')
    // Its id is a UUID, which the log scrubs: named without the hyphens (before, only by key,
    // action and time, which names no row about no key).
    t.match(warned[0], { level: 'warn', audit_row: altered.id.replaceAll('-', ''), key_id: k.id, action: 'key.updated', created_at: (seen[2] as unknown as { created_at: string }).created_at, integrity: 'failed' })
  })

  await t.test("rows sealed with a key no longer configured: one warning a page, naming the key and the count, not one a row", async (t) => {
    // Before (left open by the last note): a page of up to 500 such rows (an old key dropped
    // after a rotation, as the README's rotation allows) logged 500 warnings each time it was viewed.
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'old-key rows', type: 'user' } })).json
    const dropped = randomBytes(32)
    const old = new AuditLog(new AuditCipher(dropped))
    for (let i = 0; i < 7; i++) await h.db.transaction((tx) => old.write(tx, { actor: 'admin:old' }, { keyId: k.id, action: 'key.updated', details: { i } }))
    // And the key's first row (sealed with the configured key) altered.
    await h.db.query("UPDATE api_key_audit_log SET actor = 'key:someoneelse' WHERE key_id = $1 AND action = 'key.created'", [k.id])
    logLines.length = 0
    const page = (await h.call('GET', `/v1/keys/${k.id}/audit`)).json.items as Array<{ integrity: string }>
    t.same(page.map((r) => r.integrity), [...Array(7).fill('key_missing'), 'failed'], 'the rows are listed as before')
    t.same(page.map((r) => (r as { sealed_with?: unknown }).sealed_with), [...Array(7).fill(encryptionKeyId(dropped)), null], 'each key_missing row names the key it was sealed with')
    const warned = logLines.map((l) => JSON.parse(l) as Record<string, unknown>)
    t.equal(warned.filter((l) => l.message === 'an audit row did not open').length, 1, 'an altered row is still said out loud, row by row')
    const missing = warned.filter((l) => l.message === 'audit rows sealed with an encryption key that is not configured did not open')
    t.equal(missing.length, 1, 'one warning for the page')
    t.match(missing[0], { level: 'warn', rows: 7, encryption_keys: [encryptionKeyId(dropped)], key_ids: [k.id], hint: /KEYGATE_PREVIOUS_ENCRYPTION_KEYS/ })
    t.equal(warned.length, 2, 'and nothing else')
  })

  await t.test('GET /v1/audit: every admin action, by key, action or actor', async (t) => {
    const deny = (await h.call('POST', '/v1/deny-list', { body: { cidr: '198.51.100.0/24', reason: 'audit test' } })).json
    await h.call('DELETE', `/v1/deny-list/${deny.id}`)
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'audited', type: 'user' } })).json
    const denyRows = (await h.call('GET', '/v1/audit?action=deny_list.added')).json.items
    t.ok(denyRows.length >= 1, 'a deny list change, which concerns no key (before, no route could read it)')
    t.matchStrict(denyRows[0], { key_id: null, action: 'deny_list.added', integrity: 'verified', details: { cidr: '198.51.100.0/24' } })
    t.matchStrict((await h.call('GET', '/v1/audit?action=deny_list.removed&limit=1')).json.items[0], { action: 'deny_list.removed', key_id: null })
    const byKey = (await h.call('GET', `/v1/audit?key_id=${k.id}`)).json.items
    t.same(byKey.map((r: { action: string }) => r.action), ['key.created'], 'by key')
    const byActor = (await h.call('GET', `/v1/audit?actor=${encodeURIComponent(byKey[0].actor)}&limit=500`)).json.items as Array<{ actor: string }>
    t.ok(byActor.length >= 3 && byActor.every((r) => r.actor === byKey[0].actor), 'by actor')
    const newest = (await h.call('GET', '/v1/audit?limit=2')).json
    t.equal(newest.items[0].id, byKey[0].id, 'newest first, whatever it concerns')
    t.type(newest.next_cursor, 'string')
    const next = (await h.call('GET', `/v1/audit?limit=2&cursor=${newest.next_cursor}`)).json
    t.notOk(next.items.some((r: { id: string }) => newest.items.some((n: { id: string }) => n.id === r.id)), 'the next page goes on from there')
    for (const query of ['action=DROP%20TABLE', 'key_id=', 'limit=0', 'colour=blue', 'actor=']) {
      const a = await h.call('GET', `/v1/audit?${query}`)
      t.equal(a.status, 400, query)
      t.equal(a.json.error.code, 'validation_failed', query)
    }
  })

  await t.test('validate and import (the CLI through the API)', async (t) => {
    const k = (await h.call('POST', '/v1/keys', { body: { name: 'check me', type: 'user', allowed_cidrs: ['192.0.2.0/24'] } })).json
    const ok = await writes(t, h, 0, 'validate', () => h.call('POST', '/v1/keys/validate', { body: { key: k.key, address: '192.0.2.9' } }))
    t.match(ok.json, { valid: true, key: { id: k.id } })
    t.match((await h.call('POST', '/v1/keys/validate', { body: { key: k.key, address: '203.0.113.1' } })).json, { valid: false, code: 'ip_blocked', key_id: k.id })
    t.match((await h.call('POST', '/v1/keys/validate', { body: { key: 'kg_nonsense' } })).json, { valid: false, code: 'key_invalid', reason: 'malformed' })
    // An empty key is a verdict too, as on the store (before: 400 validation_failed).
    t.match((await h.call('POST', '/v1/keys/validate', { body: { key: '' } })).json, { valid: false, code: 'key_invalid', reason: 'malformed' })
    t.equal((await h.call('POST', '/v1/keys/validate', { body: {} })).json.error.details.fields[0].field, 'key')
    // The CLI through the API gives the store's verdicts for strings that cannot be keys (before:
    // validation_failed for '' and bad_request for a NUL, where `api-key validate` on the store says malformed).
    const remote = remoteOperations(h.url, h.adminKey)
    for (const key of ['', 'kg_a\u0000b']) t.same(await remote.validate(key), { valid: false, code: 'key_invalid', reason: 'malformed' }, JSON.stringify(key))
    // More rows than one import takes: the store's import_invalid, not the API schema's validation_failed.
    const tooMany = await remote.importLegacy(Array.from({ length: 10_001 }, () => ({})), undefined).catch((err: { code?: string; message?: string }) => err)
    t.match(tooMany, { code: 'import_invalid', message: /holds 10001 rows; one import takes at most 10000/ })
    // No rows: the store's import_invalid too (before: the API schema's validation_failed).
    t.match(await remote.importLegacy([], undefined).catch((err: unknown) => err), { code: 'import_invalid', message: /^the import holds no rows/ })

    const legacy = [randomUUID(), randomUUID()]
    const rows = legacy.map((u, i) => ({ key_hash: sha256(u), name: `legacy ${i}` }))
    const imp = await writes(t, h, 2, 'import (one row per key)', () => h.call('POST', '/v1/keys/import', { body: { rows, type: 'integration' } }))
    t.equal(imp.status, 201)
    t.equal(imp.json.imported, 2)
    t.match(imp.json.items, [{ legacy: true, type: 'integration' }, { legacy: true }])
    t.equal(imp.json.items.length, 2, 'an item per key')
    t.ok((await h.keys.validate(legacy[0] as string)).valid, 'an imported key works')
    const dup = await writes(t, h, 0, 'refused import', () => h.call('POST', '/v1/keys/import', { body: { rows } }))
    t.equal(dup.status, 400)
    t.equal(dup.json.error.code, 'import_invalid')
    t.match(dup.json.error.message, /row 1: key_hash is already in the store/)
    const none = (await h.call('POST', '/v1/keys/import', { body: { rows: [] } })).json.error
    t.equal(none.code, 'validation_failed')
    // Before (found by a review): "expected a list of valid value (at least 1, at most 10000)".
    t.match(none.details.fields, [{ field: 'rows', message: '[] is not allowed; expected a list (at least 1, at most 10000 items)' }])
    t.equal(none.details.fields.length, 1, 'one field named')
  })

  await t.test("import: null in an optional field is not given (an SQL export's empty column), in a required one refused, and nothing written then (found by a review)", async (t) => {
    const empty = { type: null, scopes: null, owner: null, metadata: null, allowed_cidrs: null, rate_limit: null, created_at: null, expires_at: null }
    const rows = [
      { key_hash: sha256(randomUUID()), name: 'all empty', ...empty },
      { key_hash: sha256(randomUUID()), name: 'some given', ...empty, scopes: ['orders:read'], allowed_cidrs: ['192.0.2.0/24'] },
    ]
    const bad = await writes(t, h, 0, 'refused import', () => h.call('POST', '/v1/keys/import', { body: { rows: [...rows, { ...rows[0], key_hash: sha256(randomUUID()), name: null }], type: 'user' } }))
    t.equal(bad.status, 400)
    t.same(bad.json.error.details.problems, [
      'row 3: name: null is not allowed; expected a non-empty string of at most 200 characters with something visible (not only spaces), without control characters or invisible format characters (bidi overrides, zero-width characters)',
    ], 'the one problem: null in a required field')
    const listed = async () => (await h.call('GET', '/v1/keys?legacy=true&limit=500')).json.items.map((k: { name: string }) => k.name) as string[]
    t.notOk((await listed()).includes('all empty'), 'the rows before it were not written')
    const imp = await writes(t, h, 2, 'import', () => h.call('POST', '/v1/keys/import', { body: { rows, type: 'user' } }))
    t.equal(imp.status, 201)
    // t.match takes [] and {} for any array and object, and an array as the items it starts with: t.same for those (found by a review).
    t.equal(imp.json.items.length, 2, 'two keys')
    t.match(imp.json.items, [
      { name: 'all empty', type: 'user', owner: null, rate_limit: null, expires_at: null, status: 'active' },
      { name: 'some given', type: 'user' },
    ], 'null as if not given: the body\'s type, no owner or own limit, never expiring')
    const [allEmpty, someGiven] = imp.json.items as Array<{ scopes: string[]; metadata: object; allowed_cidrs: string[] }>
    t.same([allEmpty?.scopes, allEmpty?.metadata, allEmpty?.allowed_cidrs], [[], {}, []], 'and no scopes, metadata or binding')
    t.same([someGiven?.scopes, someGiven?.allowed_cidrs], [['orders:read'], ['192.0.2.0/24']], 'the values given beside them are kept')
    // The CLI through the API sends the rows as its file holds them.
    const remote = remoteOperations(h.url, h.adminKey)
    const [viaCli] = await remote.importLegacy([{ key_hash: sha256(randomUUID()), name: 'through the CLI', ...empty }], 'integration')
    t.match(viaCli, { name: 'through the CLI', type: 'integration', rateLimit: null, expiresAt: null })
    t.same([viaCli?.scopes, viaCli?.metadata, viaCli?.allowedCidrs], [[], {}, []], 'through the CLI: no scopes, metadata or binding')
  })

  await t.test('import of 10,000 rows through the API: above admin.max_body_bytes, within the import\'s own limit', async (t) => {
    // Before: refused with 413 above admin.max_body_bytes (1 MiB by default), so `api-key import`
    // with KEYGATE_ADMIN_URL of 10,000 ordinary rows (1.9 MB) failed where the store took them.
    // The limit is the admin API's, whatever the store: the import itself on PostgreSQL only (the
    // embedded store takes some 18 s to write 10,000 keys).
    if (store.kind === 'postgres') await importsAll(t)
    // A body over the import's own limit is still 413, told by its Content-Length, nothing written.
    const before = await h.auditRows()
    const big = await h.declared('POST', '/v1/keys/import', IMPORT_BODY_LIMIT + 1)
    t.equal(big.status, 413)
    t.equal(big.json?.error?.code, 'payload_too_large')
    t.match(big.json?.error?.message, new RegExp(`larger than ${IMPORT_BODY_LIMIT} bytes`))
    t.equal(big.headers.connection, 'close', 'not drained: past 16 MiB')
    t.equal(await h.auditRows(), before, 'nothing written')
    // Other operations keep admin.max_body_bytes.
    const other = await h.declared('POST', '/v1/keys/validate', MAX_BODY_BYTES + 1)
    t.equal(other.status, 413)
    t.match(other.json?.error?.message, /admin\.max_body_bytes/)
  })

  async function importsAll(t: Test): Promise<void> {
    const rows = Array.from({ length: IMPORT_MAX_ROWS }, (_, i) => ({
      key_hash: sha256(randomUUID()),
      name: `bulk legacy ${i}`,
      type: 'service',
      scopes: ['orders:read', 'orders:write'],
      owner: 'team-bulk',
      metadata: { source: 'legacy-db', row: i },
    }))
    const body = JSON.stringify({ rows })
    t.ok(Buffer.byteLength(body) > 1024 * 1024, `the body (${Buffer.byteLength(body)} bytes) is over 1 MiB`)
    t.ok(Buffer.byteLength(body) > MAX_BODY_BYTES, 'and over this listener\'s admin.max_body_bytes')
    const a = await h.call('POST', '/v1/keys/import', { raw: body, headers: { 'content-type': 'application/json' } })
    t.equal(a.status, 201, a.status === 201 ? 'imported' : a.text.slice(0, 300))
    t.equal(a.json?.imported, IMPORT_MAX_ROWS)
  }

  await t.test('unknown paths and methods', async (t) => {
    const a = await h.call('GET', '/v1/nothing')
    t.equal(a.status, 404)
    t.equal(a.json.error.code, 'not_found')
    t.equal(a.json.error.message, 'no admin route /v1/nothing')
    // A long path is named cut (before, found by a review: whole, up to gateway.max_header_bytes).
    const long = await h.call('GET', `/v1/${'eyJ'.repeat(3000)}`)
    t.equal(long.status, 404)
    t.equal(long.json.error.message, `no admin route /v1/${'eyJ'.repeat(3000)}`.slice(0, 'no admin route '.length + 197) + '...')
    const m = await h.call('PUT', '/v1/keys')
    t.equal(m.status, 405)
    t.match(m.headers.allow, /GET/)
    // HEAD is served where GET is, so Allow names it (before, it did not).
    t.same(String(m.headers.allow).split(', ').sort(), ['GET', 'HEAD', 'POST'])
    t.equal((await h.call('PATCH', '/v1/keys/abcdefghijkl/revoke')).headers.allow, 'POST', 'a path without GET does not name HEAD')
  })
})

t.test('the CLI through the admin API: answers that are not keygate\'s, redirects and timeouts are said as such', async (t) => {
  // Servers that stand where the admin API should be: a proxy's own error, a JSON null, a
  // redirect, one that never answers.
  const answers: Record<string, (res: http.ServerResponse) => void> = {
    '/proxy': (res) => res.writeHead(503, { 'content-type': 'application/json' }).end('{"message":"upstream connect error"}'),
    '/null': (res) => res.writeHead(200, { 'content-type': 'application/json', 'x-keygate-admin': '1' }).end('null'),
    '/upstream': (res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"total":1}'),
    '/moved': (res) => res.writeHead(301, { location: 'https://elsewhere.example/v1' }).end(),
    '/silent': () => {},
    // A server killed, or a listener stopping, once the request was read: the answer never comes.
    '/cut': (res) => res.socket?.destroy(),
    // A proxy in front of the admin API that lost its answer.
    '/lost': (res) => res.writeHead(504, { 'content-type': 'text/html' }).end('<html><body>504 Gateway Time-out</body></html>'),
    '/inherited': (res) => res.writeHead(500, { 'content-type': 'application/json', 'x-keygate-admin': '1' }).end('{"error":{"code":"constructor","message":"proxy says no"}}'),
  }
  let seen: Array<{ method: string | undefined; url: string | undefined }> = []
  const server = http.createServer((req, res) => {
    seen.push({ method: req.method, url: req.url })
    const prefix = Object.keys(answers).find((p) => req.url?.startsWith(p + '/'))
    if (prefix) (answers[prefix] as (res: http.ServerResponse) => void)(res)
    else res.writeHead(404).end()
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => server.close())
  server.closeAllConnections && t.teardown(() => server.closeAllConnections())
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  const failure = (p: Promise<unknown>) => p.then(() => ({ code: 'none', message: 'it succeeded' }), (err: { code?: string; message?: string }) => err)

  // Before: internal_error "HTTP 503", and a TypeError reading null.
  t.match(await failure(remoteOperations(`${base}/proxy`, 'token').stats()), { code: 'admin_unavailable', message: /answered 503 without a keygate error; is the admin URL \(KEYGATE_ADMIN_URL or --admin-url\) the admin listener\?/ })
  t.match(await failure(remoteOperations(`${base}/null`, 'token').stats()), { code: 'admin_unavailable', message: /answered 200 with null, not an object/ })
  // JSON of another server, as the gateway's upstream answers a call sent to the gateway's port.
  t.match(await failure(remoteOperations(`${base}/upstream`, 'token').stats()), { code: 'admin_unavailable', message: /answered 200 but is not keygate's admin API \(no x-keygate-admin header/ })
  // Before: followed, the credential dropped on the new origin and a POST turned into a GET.
  seen = []
  t.match(await failure(remoteOperations(`${base}/moved`, 'token').revoke('AAAAAAAAAAAA', undefined)), { code: 'admin_unavailable', message: /answered 301, a redirect to https:\/\/elsewhere\.example\/v1 \(not followed\)/ })
  t.same(seen.map((r) => r.method), ['POST'], 'one request, not followed')
  // A change sent and not answered may have been made (before: "cannot reach", while the server
  // had rotated the key); a read that times out is one that did not get through.
  const slow = remoteOperations(`${base}/silent`, 'token', { timeoutMs: 300 })
  t.match(await failure(slow.rotate('AAAAAAAAAAAA', false)), { code: 'admin_unavailable', message: /did not answer within 0\.3 s; the change may or may not have been made: check with `keygate api-key get`/ })
  t.match(await failure(slow.get('AAAAAAAAAAAA')), { code: 'admin_unavailable', message: /^cannot reach the admin API/ })
  t.match(await failure(slow.validate('kg_x')), { code: 'admin_unavailable', message: /^cannot reach the admin API/ }, 'a validate (a POST) changes nothing')
  // The same for a change whose connection was cut, or whose answer a proxy lost, after it was
  // sent (before: "cannot reach the admin API ...; if the admin listener serves TLS", or "is the
  // admin URL the admin listener?", while an import cut at the server's stop had been committed).
  t.match(await failure(remoteOperations(`${base}/cut`, 'token').rotate('AAAAAAAAAAAA', false)), {
    code: 'admin_unavailable',
    message: /^the admin API at http:\/\/127\.0\.0\.1:\d+\/cut closed the connection before answering \(ECONNRESET\); the change may or may not have been made: check with `keygate api-key get` \(or list\) before you try again; if the admin listener serves TLS, the URL is https:\/\/$/,
  })
  t.match(await failure(remoteOperations(`${base}/cut`, 'token').get('AAAAAAAAAAAA')), { code: 'admin_unavailable', message: /^cannot reach the admin API at .*: ECONNRESET/ }, 'a read changed nothing')
  t.match(await failure(remoteOperations(`${base}/lost`, 'token').revoke('AAAAAAAAAAAA', undefined)), {
    code: 'admin_unavailable',
    message: /^the admin API at http:\/\/127\.0\.0\.1:\d+\/lost answered 504 without JSON, as a proxy in front of it does when it lost the answer; the change may or may not have been made: check with `keygate api-key get` \(or list\) before you try again$/,
  })
  t.match(await failure(remoteOperations(`${base}/proxy`, 'token').create({ name: 'n', type: 'user' })), {
    code: 'admin_unavailable',
    message: /answered 503 without a keygate error, as a proxy in front of it does when it lost the answer; the change may or may not have been made/,
  })
  t.match(await failure(remoteOperations(`${base}/lost`, 'token').stats()), { code: 'admin_unavailable', message: /answered 504 without JSON; is the admin URL \(KEYGATE_ADMIN_URL or --admin-url\) the admin listener\?$/ }, 'a read is told as before')
  // A code every object inherits is no keygate error.
  t.match(await failure(remoteOperations(`${base}/inherited`, 'token').stats()), { code: 'admin_unavailable', message: /answered 500 without a keygate error/ })
  // A query or fragment would stand in front of every operation's path (before: "no admin route /").
  for (const url of [`${base}/?x=1`, `${base}#top`, `${base}/?`, `${base}/#`]) t.throws(() => remoteOperations(url, 'token'), { code: 'config_invalid', message: /must not have a query or fragment/ }, url)
  // An admin listener over TLS with a certificate the machine does not trust (before: "cannot
  // reach", with OpenSSL's code alone), and plain HTTP sent to it.
  const dir = mkdtempSync(join(tmpdir(), 'keygate-admin-tls-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=keygate test', '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' })
  const tlsServer = https.createServer({ cert: readFileSync(join(dir, 'cert.pem')), key: readFileSync(join(dir, 'key.pem')) }, (_req, res) => res.writeHead(404).end())
  await new Promise<void>((resolve) => tlsServer.listen(0, '127.0.0.1', resolve))
  t.teardown(() => tlsServer.close())
  const tlsPort = (tlsServer.address() as AddressInfo).port
  t.match(await failure(remoteOperations(`https://127.0.0.1:${tlsPort}`, 'token').stats()), { code: 'admin_unavailable', message: /showed a certificate this machine does not trust \(DEPTH_ZERO_SELF_SIGNED_CERT\); for a self-signed certificate or a private CA, give its PEM file in NODE_EXTRA_CA_CERTS/ })
  t.match(await failure(remoteOperations(`http://127.0.0.1:${tlsPort}`, 'token').stats()), { code: 'admin_unavailable', message: /^cannot reach the admin API at http:\/\/127\.0\.0\.1:\d+ .*; if the admin listener serves TLS, the URL is https:\/\/$/ })
  // And TLS sent to a plain listener (before, found by a review: ERR_SSL_WRONG_VERSION_NUMBER alone).
  const plainServer = http.createServer((_req, res) => res.writeHead(404).end())
  await new Promise<void>((resolve) => plainServer.listen(0, '127.0.0.1', resolve))
  t.teardown(() => plainServer.close())
  const plainPort = (plainServer.address() as AddressInfo).port
  t.match(await failure(remoteOperations(`https://127.0.0.1:${plainPort}`, 'token').stats()), { code: 'admin_unavailable', message: /^cannot reach the admin API at https:\/\/127\.0\.0\.1:\d+ .*ERR_SSL_WRONG_VERSION_NUMBER; the server there does not speak TLS: if the admin listener serves plain HTTP \(no admin\.tls\), the URL is http:\/\/$/ })
  // A user:password@ in the URL is never shown (the configuration refuses one: see config.test.ts).
  for (const url of ['http://bob:hunter2pw@127.0.0.1:1', 'http://bob:hunter2@pw@127.0.0.1:1', 'http://bob:hunter2 pw@127.0.0.1:1']) {
    const hidden = await failure(remoteOperations(url, 'token').stats())
    t.equal(hidden.code, 'admin_unavailable')
    t.notMatch(hidden.message, /hunter2|pw@/, url)
  }
})

t.test('the CLI through the admin API: a change whose connection was never made is told it could not reach the server, not that it may have been made', async (t) => {
  // A listener whose accept queue is full (backlog 1, its connections waiting, its process blocked)
  // takes no further connection: the next one stays in its handshake, and nothing is sent.
  // undici failed such a connection in 10 s as UND_ERR_CONNECT_TIMEOUT, "cannot reach"; the
  // deadline of a request with node:http covers the connection too, and told it as a change sent
  // and not answered (found by a review of the change to node:http).
  const holder = spawn(process.execPath, ['-e', "const s = require('net').createServer().listen({ port: 0, host: '127.0.0.1', backlog: 1 }, () => { process.stdout.write(s.address().port + '\\n', () => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0)) })"], { stdio: ['ignore', 'pipe', 'inherit'] })
  t.teardown(() => holder.kill('SIGKILL'))
  const port = await new Promise<number>((resolve) => holder.stdout.once('data', (b: Buffer) => resolve(Number(b.toString().trim()))))
  // Connections until one is not taken within 200 ms: the queue is full (Linux keeps backlog + 1).
  for (let i = 0; i < 10; i++) {
    const filler = net.connect(port, '127.0.0.1')
    filler.on('error', () => {})
    t.teardown(() => filler.destroy())
    if (!(await new Promise<boolean>((resolve) => (filler.once('connect', () => resolve(true)), setTimeout(() => resolve(false), 200))))) break
  }
  const failure = (p: Promise<unknown>) => p.then(() => ({ code: 'none', message: 'it succeeded' }), (err: { code?: string; message?: string }) => err)
  const ops = remoteOperations(`http://127.0.0.1:${port}`, 'token', { timeoutMs: 300 })
  t.match(await failure(ops.rotate('AAAAAAAAAAAA', false)), { code: 'admin_unavailable', message: /^cannot reach the admin API at http:\/\/127\.0\.0\.1:\d+ \(KEYGATE_ADMIN_URL or --admin-url\): no connection within 0\.3 s$/ })
  t.match(await failure(ops.get('AAAAAAAAAAAA')), { code: 'admin_unavailable', message: /^cannot reach the admin API at .*: no connection within 0\.3 s$/ }, 'a read the same')
})

t.test('the import\'s body limit holds 10,000 rows of 3 KiB each', async (t) => {
  // Rows far larger than a legacy key's usual 200 bytes: 1.7 KiB of metadata, 10 scopes, name and
  // owner at their bounds, date-times with nanoseconds, as the CLI sends them.
  const row = {
    key_hash: 'a'.repeat(64),
    name: 'n'.repeat(200),
    type: 'integration',
    scopes: Array.from({ length: 10 }, (_, i) => String(i).padStart(3, '0') + 'a'.repeat(61)),
    owner: 'o'.repeat(200),
    metadata: { notes: 'x'.repeat(1748) },
    created_at: '2020-01-01T00:00:00.123456789+00:00',
    expires_at: '2999-01-01T00:00:00.123456789+00:00',
  }
  t.same([...Value.Errors(ImportRow, row)].map((e) => `${e.path} ${e.message}`), [], 'the row is valid')
  const each = Buffer.byteLength(JSON.stringify(row))
  t.ok(each >= 3072, `a row of ${each} bytes`)
  const body = Buffer.byteLength(JSON.stringify({ rows: [row], type: 'integration' })) + (IMPORT_MAX_ROWS - 1) * (each + 1)
  t.ok(body <= IMPORT_BODY_LIMIT, `10,000 such rows (${body} bytes) fit the import's limit (${IMPORT_BODY_LIMIT} bytes)`)
})

t.test('the CLI through the admin API: a 101 answered to a request that asked for no upgrade is an answer that is not keygate\'s, not a call left unsettled (found by a review)', async (t) => {
  // node:http hands a 101 to the request's `upgrade` listeners and, with none, destroys the
  // socket and emits no error: before, the call never settled, the deadline's destroy of a request
  // already destroyed did nothing, and the command ended in 30 s with Node's "unsettled top-level
  // await", exit 13, no word of keygate's (fetch had said "cannot reach ...: UND_ERR_SOCKET").
  const server = http.createServer((_req, res) => res.writeHead(101, { connection: 'upgrade', upgrade: 'other' }).end())
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => (server.close(), server.closeAllConnections()))
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  const failure = (p: Promise<unknown>) =>
    Promise.race([
      p.then(() => ({ code: 'none', message: 'it succeeded' }), (err: { code?: string; message?: string }) => err),
      new Promise<{ code: string; message: string }>((resolve) => setTimeout(() => resolve({ code: 'none', message: 'unsettled 3 s after its 0.3 s deadline' }), 3300).unref()),
    ])
  const ops = remoteOperations(base, 'token', { timeoutMs: 300 })
  t.match(await failure(ops.stats()), { code: 'admin_unavailable', message: /^the admin API at http:\/\/127\.0\.0\.1:\d+ answered 101 without JSON; is the admin URL \(KEYGATE_ADMIN_URL or --admin-url\) the admin listener\?$/ })
  t.match(await failure(ops.rotate('AAAAAAAAAAAA', false)), { code: 'admin_unavailable', message: /answered 101 without JSON; is the admin URL/ }, 'a change the same')
})

t.test('the CLI through the admin API: a request node:http refuses to make (a credential it cannot put in a header) fails at once, leaving no deadline to fire (found by a review)', async (t) => {
  // The configuration refuses such a token; the client is used without it too. Before, the
  // deadline was armed before the request was made, and the request's throw left it running: it
  // fired 30 s later on a request never made, a ReferenceError that ended the process.
  const timers = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length
  const before = timers()
  const uncaught: unknown[] = []
  const onUncaught = (err: unknown) => uncaught.push(err)
  process.on('uncaughtException', onUncaught)
  t.teardown(() => process.off('uncaughtException', onUncaught))
  const started = performance.now()
  const err = await remoteOperations('http://127.0.0.1:1', 'token-\u20ac-0123456789', { timeoutMs: 300 }).stats().then(() => undefined, (e: unknown) => e as { code?: string; message?: string })
  t.match(err, { code: 'admin_unavailable', message: /ERR_INVALID_CHAR/ })
  t.notMatch(String(err?.message), /token-/, 'the credential is not shown')
  t.ok(performance.now() - started < 300, 'at once, not at the deadline')
  t.equal(timers(), before, 'no deadline left running')
  await new Promise((resolve) => setTimeout(resolve, 600))
  t.same(uncaught.map(String), [], 'nothing thrown later')
})

t.test('the CLI through the admin API: an answer cut in the middle of its body is said as such, without the hint for a TLS listener that an HTTP answer rules out (found by a review)', async (t) => {
  // Before: "closed the connection before answering (ECONNRESET) ...; if the admin listener serves
  // TLS, the URL is https://", for a server that had answered 200 over plain HTTP.
  const server = http.createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': '100', 'x-keygate-admin': '1' }).write('{"items":[')
    setTimeout(() => res.socket?.destroy(), 20)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => (server.close(), server.closeAllConnections()))
  const ops = remoteOperations(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, 'token')
  const failure = (p: Promise<unknown>) => p.then(() => ({ code: 'none', message: 'it succeeded' }), (err: { code?: string; message?: string }) => err)
  const change = await failure(ops.rotate('AAAAAAAAAAAA', false))
  t.match(change, { code: 'admin_unavailable', message: /^the admin API at http:\/\/127\.0\.0\.1:\d+ closed the connection in the middle of its answer \(200\); the change may or may not have been made: check with `keygate api-key get` \(or list\) before you try again$/ })
  const read = await failure(ops.get('AAAAAAAAAAAA'))
  t.match(read, { code: 'admin_unavailable', message: /^the admin API at http:\/\/127\.0\.0\.1:\d+ closed the connection in the middle of its answer \(200\)$/ })
})
