// Two `keygate serve` instances (gateway and admin each) on one PostgreSQL database and one Redis,
// and one on the embedded store: two admins racing on one key, both requests at once, round after
// round. After each: one winner or both applied, 409 for the loser, one successor at most, one
// audit row per change in the order the changes took effect, and both gateways agreeing.
import t, { type Test } from 'tap'
import { createHash, randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { request } from 'undici'
import { trailIs } from './helpers/audit.ts'
import { answerOf, freshAddress, startUpstream, until, type Answer } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import { serve, type Served } from './helpers/serve.ts'
import { freshDatabase } from './helpers/stores.ts'
import { seedDataDir } from './helpers/pglite-template.ts'

const TOKEN = 'races-admin-token-0123456789abcdef'
const ROUNDS = Number(process.env.RACE_ROUNDS ?? 20)

interface Pair {
  instances: Served[]
  call(i: number, method: string, path: string, body?: unknown): Promise<Answer>
  through(i: number, key: string): Promise<number>
}

async function startPair(t: Test, embedded: boolean): Promise<Pair> {
  const [redis, databaseUrl, upstream] = await Promise.all([startRedisServer(t), freshDatabase(t), startUpstream(t)])
  const dataDir = mkdtempSync(join(tmpdir(), 'kg-races-'))
  t.teardown(() => rmSync(dataDir, { recursive: true, force: true }))
  // The embedded store from a migrated copy, not made from nothing (PGlite's initdb: some 6 s of CPU).
  if (embedded) await seedDataDir(dataDir, { migrated: true })
  const env = {
    DATABASE_URL: embedded ? undefined : databaseUrl,
    KEYGATE_DATA_DIR: dataDir,
    REDIS_URL: embedded ? undefined : redis.url,
    KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'),
    KEYGATE_ADMIN_TOKEN: TOKEN,
    KEYGATE_UPSTREAM: upstream.url,
    KEYGATE_TRUSTED_PROXIES: '127.0.0.1',
    KEYGATE_CONFIG: undefined,
    KEYGATE_ADMIN_URL: undefined,
    CACHE_TTL_SECONDS: '3600',
  }
  const first = await serve(t, { env })
  const second = embedded ? first : await serve(t, { env })
  const instances = [first, second]

  return {
    instances,
    async call(i, method, path, body) {
      const headers: Record<string, string> = { authorization: `Bearer ${TOKEN}` }
      if (body !== undefined) headers['content-type'] = 'application/json'
      return answerOf(await request((instances[i] as Served).admin + path, { method: method as 'GET', headers, ...(body !== undefined ? { body: JSON.stringify(body) } : {}) }))
    },
    async through(i, key) {
      const r = await request(`${(instances[i] as Served).gateway}/orders`, { headers: { authorization: `Bearer ${key}`, 'x-forwarded-for': freshAddress() } })
      await r.body.dump()
      return r.statusCode
    },
  }
}

async function created(p: Pair, body: Record<string, unknown> = {}): Promise<{ id: string; key: string }> {
  const r = await p.call(0, 'POST', '/v1/keys', { name: `race ${randomUUID().slice(0, 8)}`, type: 'service', ...body })
  if (r.status !== 201) throw new Error(`create: ${r.status} ${r.text}`)
  return { id: r.json.id as string, key: r.json.key as string }
}

async function actions(p: Pair, id: string): Promise<string[]> {
  const r = await p.call(0, 'GET', `/v1/keys/${id}/audit?limit=100`)
  return (r.json.items as Array<{ action: string }>).map((i) => i.action).sort()
}

/** The keys named `ids` and every key rotated from one of them, as the admin API gives them (found by name: a rotation keeps it). */
async function rows(p: Pair, ids: string[]): Promise<any[]> {
  const out = new Map<string, any>()
  for (const id of ids) {
    const k = await p.call(1, 'GET', `/v1/keys/${id}`)
    out.set(id, k.json)
    const same = await p.call(0, 'GET', `/v1/keys?limit=500&name=${encodeURIComponent(k.json.name)}`)
    for (const x of same.json.items) if (ids.includes(x.rotated_from)) out.set(x.id, x)
  }
  return [...out.values()]
}

/** Both gateways answer `status` for `key` (within the propagation time, with Redis about a second). */
async function agree(t: Test, p: Pair, key: string, status: number, what: string) {
  for (const i of [0, 1]) {
    let last = 0
    await until({ pass: () => {}, fail: (m) => t.fail(`${m} (last ${last})`) }, `gateway ${i}: ${what} is ${status}`, async () => (last = await p.through(i, key)) === status, 5000)
  }
}

/** Every row consistent with itself. */
async function consistent(t: Test, p: Pair, ids: string[], round: number) {
  for (const r of await rows(p, ids)) {
    if ((r.status === 'revoked') !== (r.revoked_at !== null)) t.fail(`round ${round}: ${r.id} ${r.status} with revoked_at ${r.revoked_at}`)
    if (r.status === 'active' && r.replaced_by !== null) t.fail(`round ${round}: ${r.id} active and replaced`)
  }
  for (const id of ids) {
    const n = (await rows(p, [id])).filter((r) => r.rotated_from === id).length
    if (n > 1) t.fail(`round ${round}: ${id} has ${n} successors`)
  }
}

const zRow0 = (all: any[], id: string) => all.find((r) => r.id === id)
const code = (a: Answer) => (a.status < 300 ? String(a.status) : `${a.status} ${a.json?.error?.code}`)

for (const embedded of [false, true]) t.test(`races on one key through ${embedded ? 'one instance, embedded store' : 'two instances, PostgreSQL'}`, async (t) => {
  const p = await startPair(t, embedded)
  const tally = new Map<string, number>()
  const seen = (race: string, outcome: string) => tally.set(`${race}: ${outcome}`, (tally.get(`${race}: ${outcome}`) ?? 0) + 1)
  t.teardown(() => t.comment([...tally].map(([k, v]) => `${k} x${v}`).join('\n')))

  await t.test('rotate + rotate', async (t) => {
    for (let round = 0; round < ROUNDS; round++) {
      const k = await created(p)
      const [a, b] = await Promise.all([p.call(0, 'POST', `/v1/keys/${k.id}/rotate`), p.call(1, 'POST', `/v1/keys/${k.id}/rotate`)])
      seen('rotate+rotate', [code(a), code(b)].sort().join(' / '))
      const wins = [a, b].filter((x) => x.status === 200)
      if (wins.length !== 1) t.fail(`round ${round}: ${code(a)} / ${code(b)}`)
      if ([a, b].some((x) => x.status !== 200 && x.status !== 409)) t.fail(`round ${round}: ${code(a)} / ${code(b)}`)
      await consistent(t, p, [k.id], round)
      t.same(await actions(p, k.id), ['key.created', 'key.rotated'], `round ${round}: audit`)
      const fresh = wins[0]?.json.key as string
      await agree(t, p, k.key, 200, 'old key in grace')
      await agree(t, p, fresh, 200, 'new key')
    }
  })

  await t.test('rotate + revoke', async (t) => {
    for (let round = 0; round < ROUNDS; round++) {
      const k = await created(p)
      const [a, b] = await Promise.all([p.call(round % 2, 'POST', `/v1/keys/${k.id}/rotate`), p.call(1 - (round % 2), 'POST', `/v1/keys/${k.id}/revoke`, { reason: 'leak' })])
      seen('rotate+revoke', `${code(a)} / ${code(b)}`)
      await consistent(t, p, [k.id], round)
      if (b.status !== 200) t.fail(`round ${round}: revoke ${code(b)}`)
      const acts = await actions(p, k.id)
      const want = a.status === 200 ? ['key.created', 'key.revoked', 'key.rotated'] : ['key.created', 'key.revoked']
      t.same(acts, want, `round ${round}: audit (${code(a)})`)
      const trail = ((await p.call(0, 'GET', `/v1/keys/${k.id}/audit?limit=100`)).json.items as Array<{ action: string }>).map((x) => x.action)
      if (a.status === 200) t.same(trail, ['key.revoked', 'key.rotated', 'key.created'], `round ${round}: newest first, the revocation (made after the rotation) on top`)
      await agree(t, p, k.key, 401, 'revoked key')
      if (a.status === 200) await agree(t, p, a.json.key as string, 200, 'successor')
      else if (a.status !== 409) t.fail(`round ${round}: rotate ${code(a)}`)
    }
  })

  await t.test('revoke + PATCH', async (t) => {
    for (let round = 0; round < ROUNDS; round++) {
      const k = await created(p)
      const [a, b] = await Promise.all([p.call(round % 2, 'POST', `/v1/keys/${k.id}/revoke`), p.call(1 - (round % 2), 'PATCH', `/v1/keys/${k.id}`, { name: `patched ${round}` })])
      seen('revoke+patch', `${code(a)} / ${code(b)}`)
      await consistent(t, p, [k.id], round)
      if (a.status !== 200) t.fail(`round ${round}: revoke ${code(a)}`)
      if (b.status !== 200 && !(b.status === 409 && b.json.error.code === 'key_not_active')) t.fail(`round ${round}: patch ${code(b)}`)
      const want = b.status === 200 ? ['key.created', 'key.revoked', 'key.updated'] : ['key.created', 'key.revoked']
      t.same(await actions(p, k.id), want, `round ${round}: audit`)
      const row = (await rows(p, [k.id]))[0]
      if (b.status === 200) t.equal(row.name, `patched ${round}`, `round ${round}: name`)
      else t.match(row.name, /^race /, `round ${round}: name`)
      await agree(t, p, k.key, 401, 'revoked key')
    }
  })

  await t.test('revoke + revoke, PATCH + PATCH of one field, with gateway traffic during the race', async (t) => {
    for (let round = 0; round < ROUNDS; round++) {
      const k = await created(p)
      await agree(t, p, k.key, 200, 'new key')
      const traffic = Promise.all([0, 1, 0, 1].map((i) => p.through(i, k.key)))
      const [a, b] = await Promise.all([p.call(0, 'POST', `/v1/keys/${k.id}/revoke`, { reason: 'a' }), p.call(1, 'POST', `/v1/keys/${k.id}/revoke`, { reason: 'b' })])
      await traffic
      seen('revoke+revoke', [code(a), code(b)].sort().join(' / '))
      t.same([a, b].map((x) => x.status).sort(), [200, 409], `round ${round}: one revocation`)
      t.same(await actions(p, k.id), ['key.created', 'key.revoked'], `round ${round}: audit`)
      const row = (await rows(p, [k.id]))[0]
      t.equal(row.revoked_reason, (a.status === 200 ? a : b).json.revoked_reason, `round ${round}: the winner's reason`)
      await agree(t, p, k.key, 401, 'revoked key')

      const m = await created(p)
      const [c, d] = await Promise.all([p.call(0, 'PATCH', `/v1/keys/${m.id}`, { owner: 'first' }), p.call(1, 'PATCH', `/v1/keys/${m.id}`, { owner: 'second' })])
      seen('patch+patch(one field)', `${code(c)} / ${code(d)}`)
      const acts = await p.call(0, 'GET', `/v1/keys/${m.id}/audit?limit=100`)
      const final = (await p.call(1, 'GET', `/v1/keys/${m.id}`)).json.owner
      // The whole trail, newest first: each change audited once, the newest the value kept (a
      // count of the key.updated rows passed a creation audited twice, found by a review).
      trailIs(t, acts.json.items as Array<{ action: string }>, [
        { action: 'key.updated', details: { changed: ['owner'], owner: final } },
        { action: 'key.updated', details: { changed: ['owner'], owner: final === 'first' ? 'second' : 'first' } },
        { action: 'key.created' },
      ], `round ${round}: two updates audited, the newest the value kept`)
    }
  })

  await t.test('PATCH + PATCH of different fields', async (t) => {
    for (let round = 0; round < ROUNDS; round++) {
      const k = await created(p, { scopes: ['a'] })
      const [a, b] = await Promise.all([p.call(0, 'PATCH', `/v1/keys/${k.id}`, { name: `n${round}` }), p.call(1, 'PATCH', `/v1/keys/${k.id}`, { owner: `o${round}`, scopes: ['a', 'b'] })])
      seen('patch+patch', `${code(a)} / ${code(b)}`)
      const row = (await rows(p, [k.id]))[0]
      t.same([row.name, row.owner, row.scopes], [`n${round}`, `o${round}`, ['a', 'b']], `round ${round}: both applied`)
      t.same(await actions(p, k.id), ['key.created', 'key.updated', 'key.updated'], `round ${round}: audit`)
      const got = await Promise.all([p.call(0, 'GET', `/v1/keys/${k.id}`), p.call(1, 'GET', `/v1/keys/${k.id}`)])
      for (const g of got) t.same([g.json.name, g.json.owner], [`n${round}`, `o${round}`])
    }
  })

  await t.test('rotations of a key whose predecessor is in grace, against other changes', async (t) => {
    for (let round = 0; round < ROUNDS; round++) {
      const z = await created(p)
      const r1 = await p.call(0, 'POST', `/v1/keys/${z.id}/rotate`)
      const b = { id: r1.json.id as string, key: r1.json.key as string }
      const variant = round % 4
      const other =
        variant === 0 ? p.call(1, 'POST', `/v1/keys/${b.id}/rotate`) :
        variant === 1 ? p.call(1, 'POST', `/v1/keys/${z.id}/revoke`) :
        variant === 2 ? p.call(1, 'PATCH', `/v1/keys/${b.id}`, { scopes: ['x'] }) :
        p.call(1, 'POST', `/v1/keys/${b.id}/rotate`, { force: true })
      const [a, o] = await Promise.all([p.call(0, 'POST', `/v1/keys/${b.id}/rotate`, round % 8 < 4 ? {} : { force: true }), other])
      seen(`rotate(B${round % 8 < 4 ? '' : ',force'}) + ${['rotate(B)', 'revoke(Z)', 'patch(B)', 'rotate(B,force)'][variant]}`, `${code(a)} / ${code(o)}`)
      await consistent(t, p, [z.id, b.id], round)
      const all = await rows(p, [z.id, b.id])
      const succ = all.filter((r) => r.rotated_from === b.id)
      if (succ.length !== [a, variant === 0 || variant === 3 ? o : undefined].filter((x) => x?.status === 200).length) t.fail(`round ${round}: ${succ.length} successors for ${code(a)} / ${code(o)}`)
      if (variant === 2 && o.status === 200) {
        const zr = all.find((r) => r.id === z.id)
        // Z in grace takes B's change; if B was rotated first, the PATCH was refused.
        if (zr.status === 'rotating') t.same(zr.scopes, ['x'], `round ${round}: Z took the change`)
        for (const s of succ) t.same(s.scopes, ['x'], `round ${round}: the successor made after the change keeps it`)
      }
      const zActs = await actions(p, z.id)
      const zRevoked = zActs.filter((x) => x === 'key.revoked').length
      if (zRevoked !== (zRow0(all, z.id).status === 'revoked' ? 1 : 0)) t.fail(`round ${round}: Z has ${zRevoked} key.revoked rows, status ${zRow0(all, z.id).status}`)
      const zUpdated = zActs.filter((x) => x === 'key.updated').length
      if (zUpdated > 1) t.fail(`round ${round}: Z updated ${zUpdated} times`)
      const bActs = await actions(p, b.id)
      const rotated = bActs.filter((x) => x === 'key.rotated').length
      if (rotated !== succ.length) t.fail(`round ${round}: B has ${rotated} key.rotated rows for ${succ.length} successors`)
      for (const s of succ) await agree(t, p, (a.json.id === s.id ? a : o).json.key as string, 200, 'successor')
      const bRow = all.find((r) => r.id === b.id)
      await agree(t, p, b.key, bRow.status === 'rotating' || bRow.status === 'active' ? 200 : 401, `B (${bRow.status})`)
      const zRow = all.find((r) => r.id === z.id)
      await agree(t, p, z.key, zRow.status === 'rotating' ? 200 : 401, `Z (${zRow.status})`)
    }
  })

  await t.test('import of a hash twice at once, and of a revoked key\'s hash', async (t) => {
    for (let round = 0; round < ROUNDS; round++) {
      const uuid = randomUUID()
      const hash = createHash('sha256').update(uuid).digest('hex')
      const [a, b] = await Promise.all([0, 1].map((i) => p.call(i, 'POST', '/v1/keys/import', { rows: [{ key_hash: hash, name: `imp ${i}` }] })))
      seen('import+import', [code(a as Answer), code(b as Answer)].sort().join(' / '))
      const won = [a, b].filter((x) => x?.status === 201) as Answer[]
      t.equal(won.length, 1, `round ${round}: one import`)
      const id = won[0]?.json.keys?.[0]?.id ?? won[0]?.json.items?.[0]?.id ?? won[0]?.json[0]?.id
      if (!id) t.fail(JSON.stringify(won[0]?.json))
      t.same(await actions(p, id), ['key.imported'])
      // Revoke it and import it again at once.
      const [rv, imp] = await Promise.all([p.call(round % 2, 'POST', `/v1/keys/${id}/revoke`), p.call(1 - (round % 2), 'POST', '/v1/keys/import', { rows: [{ key_hash: hash, name: 'again' }] })])
      seen('revoke+import', `${code(rv)} / ${code(imp)}`)
      t.equal(rv.status, 200)
      t.equal(imp.status, 400, `round ${round}: the hash is in the store`)
      await agree(t, p, uuid, 401, 'revoked legacy key')
    }
  })
})
