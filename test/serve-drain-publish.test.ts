// One `serve` running the gateway and the admin API, on PostgreSQL and Redis, told to stop while
// an admin change is still in flight: the change must still reach the other instances over Redis.
// Before (found by a review), the process's publisher was the gateway's, and it stopped with the
// gateway's drain, which ends at once when no gateway request is open, while the admin API's
// drain went on: a key revoked then was told to no other instance, which served it from its
// cache until its store check (cache.store_check_s), not within the second SPEC §3 promises.
import t from 'tap'
import pg from 'pg'
import { Redis } from 'ioredis'
import { request } from 'undici'
import { answerOf, until } from './helpers/gateway.ts'
import { isolatedEnv, serve } from './helpers/serve.ts'
import { freshDatabase } from './helpers/stores.ts'

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const TOKEN = 'drain-publish-admin-token-0123456789'

t.test('a key revoked through the admin API while serve drains is still published on Redis', async (t) => {
  const databaseUrl = await freshDatabase(t)
  const prefix = `drain-${process.pid}-${Date.now()}:`
  const channel = `${prefix}keygate:invalidate`
  const served = await serve(t, {
    env: isolatedEnv({
      DATABASE_URL: databaseUrl,
      REDIS_URL,
      KEYGATE_REDIS_KEY_PREFIX: prefix,
      KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'),
      KEYGATE_ADMIN_TOKEN: TOKEN,
    }),
  })
  const call = async (method: string, path: string, body?: unknown) =>
    answerOf(await request(`${served.admin}${path}`, { method: method as 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body) }))
  const created = await call('POST', '/v1/keys', { name: 'drained', type: 'service' })
  t.equal(created.status, 201, created.status === 201 ? 'created' : created.text)
  const id = created.json.id as string

  // What another instance would hear.
  const listener = new Redis(REDIS_URL, { maxRetriesPerRequest: 1 })
  t.teardown(() => listener.disconnect())
  const heard: string[] = []
  listener.on('message', (_c: string, m: string) => heard.push(m))
  await listener.subscribe(channel)
  const others = async () => Number(((await listener.pubsub('NUMSUB', channel)) as [string, number])[1])
  await until(t, "the serve's gateway is subscribed", async () => (await others()) >= 2)

  // The key's row held, so that the revocation waits in the store.
  const holder = new pg.Client({ connectionString: databaseUrl })
  await holder.connect()
  t.teardown(() => holder.end())
  await holder.query('BEGIN')
  await holder.query('SELECT id FROM api_keys WHERE id = $1 FOR UPDATE', [id])
  const revoking = call('POST', `/v1/keys/${id}/revoke`, { reason: 'leaked' })
  await until(t, 'the revocation waits for the row', async () => {
    const [row] = (await holder.query(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`)).rows as Array<{ n: number }>
    return (row?.n ?? 0) > 0
  })

  served.child.kill('SIGTERM')
  // The gateway's drain ends at once (nothing in flight there): its subscription goes with it.
  await until(t, "the gateway's drain is over (its subscription gone)", async () => (await others()) === 1)
  await holder.query('ROLLBACK')
  const revoked = await revoking
  t.equal(revoked.status, 200, 'the revocation in flight is answered')
  await until(t, 'and published for the other instances', () => heard.some((m) => m.endsWith(`key:${id}`)))
  t.equal(await served.exited, 0, 'exit 0')
})
