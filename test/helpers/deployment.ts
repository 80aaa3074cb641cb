// A multi-instance deployment as real processes: one `keygate serve --only admin` and N
// `keygate serve --only gateway` on one fresh PostgreSQL database and one Redis server of their
// own (so it can be stopped, restarted and have its subscribers killed), in front of one echo
// upstream. Used by test/multi-instance.test.ts and bench/propagation.ts; all of it is stopped
// with `t`.
import { request } from 'undici'
import { answerOf, startUpstream, type Answer, type Tap, type Upstream } from './gateway.ts'
import { startRedisServer, type RedisServer } from './redis-server.ts'
import { serve, type Served } from './serve.ts'
import { freshDatabase } from './stores.ts'

export const DEPLOYMENT_TOKEN = 'deployment-admin-token-0123456789'

export interface Deployment {
  redis: RedisServer
  databaseUrl: string
  upstream: Upstream
  admin: Served
  gateways: Served[]
  /** The environment every process got (for the CLI). */
  env: Record<string, string | undefined>
  /** An admin API call with the bootstrap token. */
  call(method: string, path: string, body?: unknown): Promise<Answer>
  /** A gateway request with `key`, from client address `from` (the gateways trust 127.0.0.1's X-Forwarded-For). */
  through(gateway: number, key: string, from: string): Promise<Answer>
}

export interface DeploymentOptions {
  gateways?: number
  env?: Record<string, string | undefined>
  /** Another deployment's Redis server, shared (not stopped with this deployment). */
  redis?: RedisServer
}

export async function startDeployment(t: Tap, options: DeploymentOptions = {}): Promise<Deployment> {
  const [redis, databaseUrl, upstream] = await Promise.all([options.redis ?? startRedisServer(t), freshDatabase(t), startUpstream(t)])
  const env: Record<string, string | undefined> = {
    DATABASE_URL: databaseUrl,
    REDIS_URL: redis.url,
    KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 5).toString('base64'),
    KEYGATE_ADMIN_TOKEN: DEPLOYMENT_TOKEN,
    KEYGATE_UPSTREAM: upstream.url,
    KEYGATE_TRUSTED_PROXIES: '127.0.0.1',
    KEYGATE_CONFIG: undefined,
    KEYGATE_ADMIN_URL: undefined,
    // An hour: whatever reaches a gateway sooner came through Redis.
    CACHE_TTL_SECONDS: '3600',
    ...options.env,
  }
  // The admin process applies the migrations before the gateways start.
  const admin = await serve(t, { env, args: ['--only', 'admin'], waitFor: { gateway: false } })
  const gateways = await Promise.all(Array.from({ length: options.gateways ?? 2 }, () => serve(t, { env, args: ['--only', 'gateway'] })))
  return {
    redis,
    databaseUrl,
    upstream,
    admin,
    gateways,
    env,
    async call(method, path, body) {
      const headers: Record<string, string> = { authorization: `Bearer ${DEPLOYMENT_TOKEN}` }
      if (body !== undefined) headers['content-type'] = 'application/json'
      return answerOf(await request(admin.admin + path, { method: method as 'GET', headers, ...(body !== undefined ? { body: JSON.stringify(body) } : {}) }))
    },
    async through(gateway, key, from) {
      const g = gateways[gateway]
      if (!g) throw new Error(`no gateway ${gateway}`)
      return answerOf(await request(`${g.gateway}/orders`, { headers: { authorization: `Bearer ${key}`, 'x-forwarded-for': from } }))
    },
  }
}
