// A key past its expiry (or a rotating key past its grace) is expired for the gateway at once, but
// its row says active (or rotating) until the scheduler's next round marks it. Found by a review:
// GET /v1/keys/{id}, the list's status filter, /v1/stats and the CLI's list and stats said
// "active" for up to scheduler.interval_s while validate and the gateway refused the key. Here no
// scheduler runs; the rows are moved into that window by hand, as a round not yet run leaves them.
import t from 'tap'
import { join } from 'node:path'
import { loadConfig } from '../config/load.ts'
import type { Db } from '../core/db.ts'
import { silentLogger } from '../core/log.ts'
import { openRuntime } from '../core/runtime.ts'
import { startAdmin, type AdminHarness } from './helpers/admin.ts'
import { runCli } from './helpers/cli.ts'
import { isolated, tempDir } from './helpers/cli-lifecycle.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { forEachStore } from './helpers/stores.ts'

/** Moves a key's expiry (or grace) into the past, as the time passing would, without the scheduler. */
async function lapse(db: Db, column: 'expires_at' | 'grace_until', id: string): Promise<void> {
  await db.query(`UPDATE api_keys SET ${column} = now() - interval '1 second' WHERE id = $1`, [id])
}

async function storedStatus(db: Db, id: string): Promise<string | undefined> {
  return (await db.query<{ status: string }>('SELECT status FROM api_keys WHERE id = $1', [id]))[0]?.status
}

async function listed(h: AdminHarness, status: string): Promise<string[]> {
  const ids: string[] = []
  let cursor: string | null = null
  do {
    const page = await h.call('GET', `/v1/keys?status=${status}&limit=2${cursor ? `&cursor=${cursor}` : ''}`)
    ids.push(...(page.json.items as Array<{ id: string; status: string }>).map((k) => (k.status === status ? k.id : `${k.id} (${k.status})`)))
    cursor = page.json.next_cursor
  } while (cursor)
  return ids.sort()
}

await forEachStore(t, async (t, store) => {
  const h = await startAdmin(t, store.db)
  const create = async (name: string, body: Record<string, unknown> = {}) => (await h.call('POST', '/v1/keys', { body: { name, type: 'service', ...body } })).json as { id: string; key: string }
  const soon = new Date(Date.now() + 3_600_000).toISOString()
  const expiring = await create('expiring', { expires_at: soon })
  const plain = await create('plain')
  // Rotated: the old key is in its grace period (service keys: 24 hours by default).
  const graced = await create('graced')
  const gracedNext = (await h.call('POST', `/v1/keys/${graced.id}/rotate`, { body: {} })).json as { id: string }
  // Rotated, with an expiry that comes before the end of its grace.
  const both = await create('both', { expires_at: soon })
  const bothNext = (await h.call('POST', `/v1/keys/${both.id}/rotate`, { body: {} })).json as { id: string }
  t.equal((await h.call('GET', `/v1/keys/${graced.id}`)).json.status, 'rotating')

  await lapse(store.db, 'expires_at', expiring.id)
  await lapse(store.db, 'grace_until', graced.id)
  await lapse(store.db, 'expires_at', both.id)
  const ended = [expiring, graced, both]

  for (const k of ended) {
    t.match((await h.call('POST', '/v1/keys/validate', { body: { key: k.key } })).json, { valid: false, code: 'key_expired' }, 'validate refuses it')
    t.equal((await h.call('GET', `/v1/keys/${k.id}`)).json.status, 'expired', 'GET /v1/keys/{id} says expired, as validate does')
  }
  t.equal((await h.call('GET', `/v1/keys/${plain.id}`)).json.status, 'active', 'a key with no expiry is active')
  t.equal((await h.call('GET', `/v1/keys/${gracedNext.id}`)).json.status, 'active', "the successor of a key whose grace ended is active")

  t.same(await listed(h, 'expired'), ended.map((k) => k.id).sort(), '?status=expired lists the keys past their expiry or grace')
  t.same(await listed(h, 'active'), [h.adminKeyId, plain.id, gracedNext.id, bothNext.id].sort(), '?status=active lists only the keys that work')
  t.same(await listed(h, 'rotating'), [], '?status=rotating lists no key whose grace or expiry has passed')

  const stats = (await h.call('GET', '/v1/stats')).json
  t.same(stats.by_status, { active: 4, rotating: 0, revoked: 0, expired: 3 }, '/v1/stats counts them as expired')
  t.equal(stats.total, 7)

  t.equal(await storedStatus(store.db, expiring.id), 'active', 'the row itself is left for the scheduler to mark')
  t.equal(await storedStatus(store.db, graced.id), 'rotating')
})

t.test('the CLI on the embedded store: get, list --status and stats', async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'), { migrated: true })
  const env = isolated({ KEYGATE_DATA_DIR: dataDir })
  const run = (...args: string[]) => runCli(args, { cwd, env })
  // The two keys are made here, on the store opened as a command opens it (its configuration, its
  // runtime), and the one lapsed in the same opening: what this test checks is what the commands
  // below say of them. Made by two more `keygate api-key create` processes, they took two of the
  // subtest's seven commands (the CLI's create, --expires-in too, is tested in cli-edges.test.ts
  // and helpers/cli-lifecycle.ts).
  const runtime = await openRuntime(loadConfig({ env: { KEYGATE_DATA_DIR: dataDir } }), silentLogger, { shortLived: true })
  let id: string
  try {
    const actor = { actor: 'cli:test' }
    id = (await runtime.keys.create({ name: 'ends', type: 'user', expires_at: new Date(Date.now() + 3_600_000).toISOString() }, actor)).record.id
    await runtime.keys.create({ name: 'stays', type: 'user' }, actor)
    await lapse(runtime.db, 'expires_at', id)
  } finally {
    await runtime.close()
  }

  t.equal((await run('api-key', 'get', id, '--json')).json().status, 'expired')
  const names = async (status: string) => (await run('api-key', 'list', '--status', status, '--json')).json<{ items: Array<{ name: string; status: string }> }>().items.map((k) => `${k.name} ${k.status}`)
  t.same(await names('expired'), ['ends expired'])
  t.same(await names('active'), ['stays active'])
  t.match((await run('api-key', 'list')).stdout, new RegExp(`${id}\\s+ends\\s+user\\s+expired`), 'the table says expired')
  t.same((await run('api-key', 'stats', '--json')).json().by_status, { active: 1, rotating: 0, revoked: 0, expired: 1 })
})
