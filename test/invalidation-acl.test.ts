// A Redis user without the invalidation channel: Redis 7 gives a new ACL user no channels
// (acl-pubsub-default resetchannels), so `ACL SETUSER keygate on >pw ~keygate:* +@all` takes
// keygate's keys and commands and refuses its SUBSCRIBE. Before (found by a review), a gateway
// said so at debug only and never asked again while its connection stayed up: keygate_redis_up
// read 1, and every change from another instance waited for the store check (or the cache TTL)
// without a word. Now the refusal is a warning, and the subscription is asked again until
// Redis takes it.
import t from 'tap'
import { Redis } from 'ioredis'
import { INVALIDATION_CHANNEL, publishInvalidation } from '../core/invalidation.ts'
import { KeyService } from '../core/keys/service.ts'
import { createLogger } from '../core/log.ts'
import { connectRedis } from '../core/redis.ts'
import { keyServiceOptions } from '../core/runtime.ts'
import { ACTOR, bearer, openStore, makeConfig, startGateway, until } from './helpers/gateway.ts'
import { startRedisServer } from './helpers/redis-server.ts'
import type { LogLine } from './helpers/serve.ts'

t.test('a subscription the Redis ACL refuses is warned of, and asked again until Redis takes it', async (t) => {
  const server = await startRedisServer(t)
  const root = new Redis(server.url, { maxRetriesPerRequest: 1 })
  t.teardown(() => root.disconnect())
  await root.call('ACL', 'SETUSER', 'keygate', 'on', '>secret', '~keygate:*', '+@all', 'resetchannels')
  const logs: LogLine[] = []
  const log = createLogger({ level: 'debug', write: (line) => logs.push(JSON.parse(line) as LogLine) })
  const redis = connectRedis(`redis://keygate:secret@127.0.0.1:${server.port}`, log)
  t.teardown(() => redis.disconnect())
  const config = { cache: { ttl_s: 3600, store_check_s: 0 } }
  const store = await openStore(t, makeConfig({ ...config, routes: [] }))
  const gateway = await startGateway(t, { config, store, redis, log })
  const subscribers = async () => Number(((await root.pubsub('NUMSUB', INVALIDATION_CHANNEL)) as [string, number])[1])

  await until(t, 'the refusal is warned of, naming the channel', () =>
    logs.some((l) => l.level === 'warn' && l.message.includes('refused the subscription') && l.message.includes(INVALIDATION_CHANNEL)),
  )
  t.equal(await subscribers(), 0, 'not subscribed')

  // The operator grants the channel; the gateway's connection stays as it is.
  await root.call('ACL', 'SETUSER', 'keygate', `&${INVALIDATION_CHANNEL}`)
  await until(t, 'the gateway subscribes without a reconnection', async () => (await subscribers()) >= 1)
  await until(t, 'and says so', () => logs.some((l) => l.level === 'info' && l.message.includes('invalidations flow again')))
  t.equal(logs.filter((l) => l.message.includes('refused the subscription')).length, 1, 'one warning for the whole refusal, however many times it was asked again')

  // A change elsewhere reaches it by its message (the cache TTL is an hour, the store check off).
  const elsewhere = new KeyService({ db: store.db, audit: store.audit, ...keyServiceOptions(gateway.config) })
  const { key, record } = await elsewhere.create({ name: 'acl', type: 'user' }, ACTOR)
  t.equal((await gateway.get('/', bearer(key))).status, 200, 'the key works and is cached')
  await elsewhere.revoke(record.id, undefined, ACTOR)
  t.equal((await gateway.get('/', bearer(key))).status, 200, 'revoked silently: still served from the cache')
  await publishInvalidation(root, `key:${record.id}`)
  await until(t, 'the revocation published elsewhere is applied', async () => (await gateway.get('/', bearer(key))).status === 401)
})
