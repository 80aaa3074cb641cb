// The cached key and its shared profile (gateway/key-cache.ts): keys that agree on type, status,
// scopes, rate limit and CIDR binding, stale at about the same time, share one profile; every
// key still answers with its own record's attributes, whatever it shares.
import t from 'tap'
import { loadConfig } from '../config/load.ts'
import type { KeyRecord } from '../core/keys/types.ts'
import { cachedKeys, ExpiringKey } from '../gateway/key-cache.ts'
import { createKeyLimiters } from '../gateway/rate-limit.ts'

const config = loadConfig({ env: {}, onlyFile: true })
const limitFor = createKeyLimiters(config.rate_limits.per_key, undefined)

let n = 0
function record(over: Partial<KeyRecord> = {}): KeyRecord {
  n++
  const now = new Date()
  return {
    id: `id${String(n).padStart(10, '0')}`,
    keyHash: 'ab'.repeat(32),
    name: `key ${n}`,
    type: 'service',
    status: 'active',
    scopes: ['orders:read'],
    owner: null,
    metadata: {},
    allowedCidrs: [],
    rateLimit: null,
    rotationIntervalS: null,
    rotatedFrom: null,
    replacedBy: null,
    graceUntil: null,
    legacy: false,
    createdAt: now,
    updatedAt: now,
    expiresAt: null,
    lastUsedAt: null,
    revokedAt: null,
    revokedReason: null,
    ...over,
  }
}

const TTL = 3000 // ticks: 300 s

t.test('keys of one kind share a profile; each keeps its own id and name', async (t) => {
  const build = cachedKeys(1, limitFor)
  const a = build(record(), 5000, TTL)
  const b = build(record({ name: 'café ☕' }), 5000, TTL)
  t.equal(a.profile, b.profile, 'one profile')
  t.not(a.id, b.id)
  t.equal(a.name, 'key 1'.replace('1', a.id.slice(-1)))
  t.equal(b.name, encodeURIComponent('café ☕'), 'a name that is not plain is percent-encoded')
  t.equal(a.validUntil, Infinity)
  t.notOk(a instanceof ExpiringKey, 'a key that never expires holds no expiry')
})

t.test('a key differing in any shared attribute answers with its own', async (t) => {
  const build = cachedKeys(2, limitFor)
  const base = build(record(), 5000, TTL)
  const variants: [string, Partial<KeyRecord>, (k: ReturnType<typeof build>) => void][] = [
    ['type', { type: 'emergency' }, (k) => t.equal(k.type, 'emergency')],
    ['status rotating', { status: 'rotating', graceUntil: new Date(Date.now() + 60_000) }, (k) => t.ok(k.rotating)],
    ['status revoked', { status: 'revoked' }, (k) => t.equal(k.refused, 'revoked')],
    ['status expired', { status: 'expired' }, (k) => t.equal(k.refused, 'expired')],
    ['scopes', { scopes: ['billing'] }, (k) => t.strictSame(k.scopes.list, ['billing'])],
    ['no scopes', { scopes: [] }, (k) => t.strictSame(k.scopes.list, [])],
    ['rate limit', { rateLimit: { limit: 7, windowS: 60 } }, (k) => t.equal(k.limit, limitFor(record({ rateLimit: { limit: 7, windowS: 60 } })))],
    ['binding', { allowedCidrs: ['192.0.2.0/24'] }, (k) => t.ok(k.binding?.allowedFrom('192.0.2.9') && !k.binding.allowedFrom('198.51.100.1'))],
  ]
  const seen = new Set([base.profile])
  for (const [what, over, check] of variants) {
    const k = build(record(over), 5000, TTL)
    t.notOk(seen.has(k.profile), `${what}: a profile of its own`)
    seen.add(k.profile)
    check(k)
    // A key of the base kind built after it still answers as the base kind.
    const again = build(record(), 5000, TTL)
    t.equal(again.profile, base.profile, `${what}: the base kind still shares its profile`)
    t.equal(again.type, 'service')
    t.strictSame(again.scopes.list, ['orders:read'])
    t.equal(again.binding, undefined)
    t.equal(again.refused, undefined)
    t.notOk(again.rotating)
    t.equal(again.limit, limitFor(record()))
  }
  const b1 = build(record({ allowedCidrs: ['192.0.2.0/24'] }), 5000, TTL)
  const b2 = build(record({ allowedCidrs: ['198.51.100.0/24'] }), 5000, TTL)
  t.not(b1.profile, b2.profile, 'bindings to other ranges are not shared')
  // One CIDR whose zone id holds a comma against two CIDRs: before, their kinds read alike.
  const two = build(record({ allowedCidrs: ['fe80::1%x', '127.0.0.1/32'] }), 5000, TTL)
  const one = build(record({ allowedCidrs: ['fe80::1%x,127.0.0.1/32'] }), 5000, TTL)
  t.not(one.profile, two.profile, 'a CIDR holding a comma is not two CIDRs')
  t.ok(two.binding?.allowedFrom('127.0.0.1'), 'the key bound to 127.0.0.1/32 is taken from there')
  t.notOk(one.binding?.allowedFrom('127.0.0.1'), 'the key bound to fe80::1/32 is not')
  t.ok(b2.binding?.allowedFrom('198.51.100.1') && !b2.binding.allowedFrom('192.0.2.9'))
})

t.test('stale times: rounded down by at most a 64th of the TTL; later ones get a new profile', async (t) => {
  const build = cachedKeys(1, limitFor)
  const step = Math.floor(TTL / 64)
  for (const staleAt of [5000, 5001, 5000 + step - 1, 5000 + step, 123_457]) {
    const k = build(record(), staleAt, TTL)
    t.ok(k.profile.staleAt <= staleAt && k.profile.staleAt > staleAt - step, `${staleAt} → ${k.profile.staleAt}`)
  }
  const first = build(record(), 10 * step, TTL)
  t.equal(build(record(), 10 * step + step - 1, TTL).profile, first.profile, 'within one step: shared')
  const later = build(record(), 11 * step, TTL)
  t.not(later.profile, first.profile, 'the next step: a profile of its own')
  t.equal(first.profile.staleAt, 10 * step, 'the earlier keys keep their stale time')
  // A short TTL is not rounded at all.
  t.equal(build(record(), 77, 10).profile.staleAt, 77)
})

t.test('expiry and rotation grace', async (t) => {
  const build = cachedKeys(1, limitFor)
  const at = Date.now() + 60_000
  const expiring = build(record({ expiresAt: new Date(at) }), 5000, TTL)
  t.ok(expiring instanceof ExpiringKey)
  t.equal(expiring.validUntil, at)
  const never = build(record(), 5000, TTL)
  t.equal(expiring.profile, never.profile, 'an expiry is the key\'s own: the profile is shared')
  t.equal(never.validUntil, Infinity, 'and does not reach the keys sharing it')
  const grace = Date.now() + 30_000
  t.equal(build(record({ status: 'rotating', graceUntil: new Date(grace), expiresAt: new Date(at) }), 5000, TTL).validUntil, grace, 'the earlier of grace end and expiry')
  t.equal(build(record({ status: 'rotating', graceUntil: null }), 5000, TTL).validUntil, 0, 'rotating without a grace end: refused')
})

t.test('past the kinds shared, keys still answer with their own attributes', async (t) => {
  const build = cachedKeys(1, limitFor)
  for (let i = 0; i < 5000; i++) {
    const k = build(record({ scopes: [`s${i}`] }), 5000, TTL)
    if (k.scopes.list[0] !== `s${i}`) t.fail(`key ${i} has the scopes ${k.scopes.list.join()}`)
  }
  const last = build(record({ scopes: ['s4999'] }), 5000, TTL)
  t.strictSame(last.scopes.list, ['s4999'])
  t.equal(build(record(), 5000, TTL).type, 'service')
})
