// GET /v1/keys lists, for every combination of its filters, the keys a plain filter over them
// finds, newest first, page after page: the list's statements are written for the indexes they
// read by (migration 0020: the expired keys as two parts, a scope by containment), and that
// rewriting must not change what they find. Random keys on both stores, with the clock among
// their expiries and graces, created_at ties, and names holding ILIKE's special characters.
import t from 'tap'
import { statusAt } from '../core/keys/evaluate.ts'
import { KEY_STATUSES, KEY_TYPES, type KeyRecord } from '../core/keys/types.ts'
import { seededRandom as random } from './helpers/random.ts'
import { forEachStore, testClock, testServices } from './helpers/stores.ts'

const KEYS = 400
const T0 = new Date('2026-06-01T12:00:00Z')
const HOUR = 3_600_000
const NAMES = ['Billing Prod', 'billing_test', 'billing-test', '50% off', 'back\\slash', 'ci bot', 'CI_BOT', 'orders reader', 'Ünïcode key', 'x']
const SCOPES = ['admin', 'keys:read', 'keys:write', 'orders:read', 'billing:write']
const OWNERS = ['alice', 'bob', 'carol']

type Key = Pick<KeyRecord, 'id' | 'name' | 'type' | 'status' | 'scopes' | 'owner' | 'legacy' | 'createdAt' | 'expiresAt' | 'graceUntil'>

t.test('every filter combination lists what a plain filter over the keys finds', async (t) => {
  await forEachStore(t, async (t, store) => {
    const rnd = random(20_261_206)
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)] as T
    // An hour away from the clock, either side, or none.
    const around = () => (rnd() < 0.4 ? null : new Date(T0.getTime() + Math.round((rnd() - 0.5) * 48) * HOUR))
    const keys: Key[] = []
    for (let i = 0; i < KEYS; i++) {
      const status = pick(KEY_STATUSES)
      keys.push({
        // Digits after one letter: the same order under any collation the database has.
        id: `k${String(i).padStart(4, '0')}`,
        name: pick(NAMES),
        type: pick(KEY_TYPES),
        status,
        scopes: SCOPES.filter(() => rnd() < 0.3),
        owner: rnd() < 0.2 ? null : pick(OWNERS),
        legacy: rnd() < 0.2,
        // 60 instants for 400 keys: many created_at ties, broken by id.
        createdAt: new Date(T0.getTime() - Math.floor(rnd() * 60) * HOUR),
        expiresAt: around(),
        // Set on some keys that are not rotating too, where it must not count.
        graceUntil: status === 'rotating' ? (around() ?? new Date(T0.getTime() + HOUR)) : rnd() < 0.3 ? around() : null,
      })
    }
    const ids = new Set(keys.map((k) => k.id))
    t.equal(ids.size, KEYS, 'the keys have distinct ids')
    await store.db.query(
      `INSERT INTO api_keys (id, key_hash, name, type, status, scopes, owner, legacy, created_at, expires_at, grace_until, revoked_at)
       SELECT k.id, encode(sha256(k.id::bytea), 'hex'), k.name, k.type, k.status, k.scopes, k.owner, k.legacy, k.created_at, k.expires_at, k.grace_until,
              CASE WHEN k.status = 'revoked' THEN k.created_at END
       FROM json_to_recordset($1::json) AS k(id text, name text, type text, status text, scopes text[], owner text, legacy boolean, created_at timestamptz, expires_at timestamptz, grace_until timestamptz)`,
      [JSON.stringify(keys.map((k) => ({ id: k.id, name: k.name, type: k.type, status: k.status, scopes: k.scopes, owner: k.owner, legacy: k.legacy, created_at: k.createdAt, expires_at: k.expiresAt, grace_until: k.graceUntil })))],
    )
    await store.db.query('ANALYZE api_keys')
    const { keys: service } = testServices(store.db, { clock: testClock(T0) })
    const newestFirst = (a: Key, b: Key) => b.createdAt.getTime() - a.createdAt.getTime() || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0)
    const statusNow = (k: Key) => statusAt(k as KeyRecord, T0)
    t.ok(
      keys.some((k) => statusNow(k) === 'expired' && k.status !== 'expired') && keys.some((k) => k.status === 'active' && k.graceUntil !== null && k.graceUntil <= T0),
      'some keys are expired by their end alone, and some active ones have a grace that has passed',
    )

    // Every subset of the filters, each with values drawn twice; the status with each of its four.
    const kinds = ['status', 'type', 'owner', 'scope', 'name', 'legacy'] as const
    const draw: Record<(typeof kinds)[number], () => string | boolean> = {
      status: () => pick(KEY_STATUSES),
      type: () => pick(KEY_TYPES),
      owner: () => pick(OWNERS),
      scope: () => pick(SCOPES),
      name: () => pick(['bill', 'BILLING_', '_', '%', '\\', '-', 'nïc', 'bot', 'x']),
      legacy: () => rnd() < 0.5,
    }
    let combinations = 0
    let listed = 0
    for (let subset = 0; subset < 1 << kinds.length; subset++) {
      const chosen = kinds.filter((_, i) => subset & (1 << i))
      for (let round = 0; round < (chosen.includes('status') ? 4 : 2); round++) {
        const filter: Record<string, string | boolean> = {}
        for (const kind of chosen) filter[kind] = kind === 'status' ? KEY_STATUSES[round]! : draw[kind]()
        const expected = keys
          .filter((k) => (filter.status === undefined || statusNow(k) === filter.status) && (filter.type === undefined || k.type === filter.type) && (filter.owner === undefined || k.owner === filter.owner))
          .filter((k) => (filter.scope === undefined || k.scopes.includes(filter.scope as string)) && (filter.legacy === undefined || k.legacy === filter.legacy))
          .filter((k) => filter.name === undefined || k.name.toLowerCase().includes((filter.name as string).toLowerCase()))
          .sort(newestFirst)
          .map((k) => k.id)
        const got: string[] = []
        let cursor: string | undefined
        do {
          const page = await service.list({ ...filter, limit: 9, ...(cursor ? { cursor } : {}) })
          got.push(...page.items.map((k) => k.id))
          if (filter.status !== undefined) for (const k of page.items) if (k.status !== filter.status) t.fail(`${JSON.stringify(filter)}: ${k.id} is listed ${k.status}`)
          cursor = page.nextCursor ?? undefined
        } while (cursor !== undefined && got.length <= KEYS)
        if (JSON.stringify(got) !== JSON.stringify(expected)) t.same(got, expected, `${JSON.stringify(filter)}: the keys found, in order`)
        combinations++
        listed += got.length
      }
    }
    t.pass(`${combinations} filter combinations listed as filtered in memory (${listed} keys listed)`)
  })
})
