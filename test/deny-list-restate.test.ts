// A deny list add that restates an entry as it is (its range listed, with the same expiry and
// reason) changes nothing, on both stores, through the real admin API and the real CLI (through
// that API, and on the store opened here): answered 200 with the entry as it was, and no audit
// row, no write (the change mark stays) and no gateway told, neither in the process nor on Redis.
// Before (found by a review), it was audited as deny_list.updated, moved the change mark and made
// every gateway read the list again.
import t from 'tap'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { openDb, type Db } from '../core/db.ts'
import type { DenyChange } from '../core/deny-list.ts'
import { INVALIDATION_CHANNEL, INVALIDATION_VERSION_KEY } from '../core/invalidation.ts'
import { BOOTSTRAP_TOKEN, startAdmin } from './helpers/admin.ts'
import { runCli, runCliHere } from './helpers/cli.ts'
import { isolated, tempDir } from './helpers/cli-lifecycle.ts'
import { until } from './helpers/gateway.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { forEachStore, TEST_ENCRYPTION_KEY } from './helpers/stores.ts'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const HOUR = 3_600_000
const later = (ms: number) => new Date(Date.now() + ms).toISOString()

/** What a restatement must leave as it was: the audit log, the change mark and the rows. */
async function stateOf(db: Db) {
  const [audit] = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM api_key_audit_log')
  const [mark] = await db.query<{ mark: string }>('SELECT mark::text AS mark FROM deny_list_changes')
  return { audit: audit?.n, mark: mark?.mark, rows: await db.query('SELECT * FROM deny_list ORDER BY id') }
}

await forEachStore(t, async (t, store) => {
  const h = await startAdmin(t, store.db)
  const told: DenyChange[] = []
  t.teardown(h.denyList.onChange((c) => told.push(c)))

  await t.test('through the admin API: 200 with the entry as it is, nothing audited, written or told', async (t) => {
    const expires_at = later(HOUR)
    const added = await h.call('POST', '/v1/deny-list', { body: { cidr: '192.0.2.0/24', reason: 'scanner', expires_at } })
    t.equal(added.status, 201)
    const forever = await h.call('POST', '/v1/deny-list', { body: { cidr: '2001:db8::/32' } })
    t.equal(forever.status, 201)
    const before = await stateOf(store.db)
    told.length = 0
    for (const [body, entry] of [
      [{ cidr: '192.0.2.0/24', reason: 'scanner', expires_at }, added.json],
      [{ cidr: '::ffff:192.0.2.0/120', expires_at }, added.json], // written otherwise, the reason omitted: kept
      [{ cidr: '2001:db8::/32' }, forever.json],
      [{ cidr: '2001:db8::/32', reason: null, expires_at: null }, forever.json],
    ] as const) {
      const again = await h.call('POST', '/v1/deny-list', { body })
      t.equal(again.status, 200, `${JSON.stringify(body)}: 200, the range listed already`)
      t.same(again.json, entry, 'the entry as it is')
    }
    t.same(await stateOf(store.db), before, 'no audit row, no write: the change mark and the rows as they were')
    t.same(told, [], 'no gateway told')

    // A change is still one: audited, written and told.
    const changed = await h.call('POST', '/v1/deny-list', { body: { cidr: '192.0.2.0/24', expires_at: later(2 * HOUR) } })
    t.equal(changed.status, 200)
    const after = await stateOf(store.db)
    t.equal(after.audit, (before.audit ?? 0) + 1, 'one audit row')
    t.not(after.mark, before.mark, 'the change mark moved')
    // Counted, as the CLI's case below counts it: t.match takes an array as the items it starts with (found by a review).
    t.equal(told.length, 1, 'the gateways told once')
    t.match(told, [{ action: 'added', entry: { id: added.json.id, cidr: '192.0.2.0/24' } }], 'the gateways told')
    for (const e of [added.json, forever.json]) t.equal((await h.call('DELETE', `/v1/deny-list/${e.id}`)).status, 200)
  })

  await t.test('through the CLI, by the admin API and on the store opened here: "updated": true, as the 200 says, and nothing changed', async (t) => {
    const cwd = tempDir()
    // On the store opened here, with Redis: what the CLI tells the gateways is seen on its channel.
    const prefix = `helper11:restate:${store.kind}:${process.pid}:`
    const sub = new Redis(REDIS_URL, { keyPrefix: prefix })
    t.teardown(async () => {
      sub.disconnect()
      // The version counter the CLI's publishes left under the prefix.
      const own = new Redis(REDIS_URL, { keyPrefix: prefix })
      await own.del(INVALIDATION_VERSION_KEY)
      own.disconnect()
    })
    const heard: string[] = []
    sub.on('message', (_channel: string, message: string) => heard.push(message))
    await sub.subscribe(`${prefix}${INVALIDATION_CHANNEL}`)
    const redis = { REDIS_URL, KEYGATE_REDIS_KEY_PREFIX: prefix }
    const dataDir = store.kind === 'embedded' ? await seedDataDir(join(cwd, 'store'), { migrated: true }) : undefined
    const targets = [
      { name: 'by the admin API', env: isolated({ KEYGATE_ADMIN_URL: h.url, KEYGATE_ADMIN_TOKEN: BOOTSTRAP_TOKEN }), cidr: '198.51.100.0/24', state: () => stateOf(store.db) },
      dataDir === undefined
        ? { name: 'on the store opened here', env: isolated({ DATABASE_URL: store.url, KEYGATE_ENCRYPTION_KEY: TEST_ENCRYPTION_KEY.toString('base64'), ...redis }), cidr: '203.0.113.0/24', state: () => stateOf(store.db) }
        : {
            name: 'on the store opened here',
            env: isolated({ KEYGATE_DATA_DIR: dataDir, ...redis }),
            cidr: '203.0.113.0/24',
            // The embedded store is the CLI's alone while it runs: opened between its runs.
            state: async () => {
              const db = await openDb({ dataDir })
              try {
                return await stateOf(db)
              } finally {
                await db.close()
              }
            },
          },
    ]
    for (const { name, env, cidr, state } of targets) {
      // The first add as the real process; the restatements and the change after them through the
      // command line's entry in this process (runCliHere), as each in a process of its own cost 0.5
      // to 1.5 s of CPU.
      const add = async (here: boolean, ...flags: string[]) => {
        const args = ['deny-list', 'add', cidr, ...flags]
        const r = here ? await runCliHere(args, { env }) : await runCli(args, { cwd, env })
        t.equal(r.code, 0, `${name}: ${r.stderr}`)
        return r
      }
      const expires = later(HOUR)
      const first = (await add(false, '--reason', 'crawler', '--expires-at', expires, '--json')).json()
      t.match(first, { cidr, reason: 'crawler', expires_at: expires, updated: false }, `${name}: added`)
      const before = await state()
      told.length = 0
      heard.length = 0
      for (const flags of [['--reason', 'crawler', '--expires-at', expires], ['--expires-at', expires]]) {
        const again = await add(true, ...flags, '--json')
        t.same(again.json(), { ...first, updated: true }, `${name}: ${flags.join(' ')}: the entry as it is, "updated": true (the range was listed already)`)
      }
      t.same(await state(), before, `${name}: no audit row, no write: the change mark and the rows as they were`)
      t.same(told, [], `${name}: no gateway told in the process`)
      // A change after them is told: heard alone, so the restatements before it told nothing.
      await add(true, '--reason', 'crawler, seen again', '--expires-at', expires)
      if (name === 'by the admin API') t.equal(told.length, 1, `${name}: the change told`)
      else {
        await until(t, `${name}: the change heard on Redis`, async () => heard.length > 0)
        t.same(heard.map((m) => m.replace(/^\d+\|/, '')), ['deny'], `${name}: on Redis, the change alone (after its version)`)
      }
      t.not((await state()).mark, before.mark, `${name}: the change moved the mark`)
    }
  })
})
