// gateway.max_connections: the cap on the gateway's client connections, derived from the
// process's open-file limit by default. Before (found by a review), under `ulimit -n 300`, 400
// requests to an upstream that never answered took every file descriptor (a client socket and an
// upstream one each), and the admin listener's /healthz, /readyz and /metrics, the gateway's
// /healthz, and new connections to the store and Redis failed until the route's timeout.
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { allowedConnections, connectionCap, openFileLimit } from '../gateway/connection-cap.ts'
import { call, startUpstream } from './helpers/gateway.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { scratchDir } from './helpers/scratch.ts'
import { isolatedEnv, rawClient, serve, type RawClient } from './helpers/serve.ts'

const LIMITS = `Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
`

t.test('the open-file limit is the soft one of /proc/self/limits; none where it is unlimited or unreadable', async (t) => {
  t.equal(openFileLimit(() => LIMITS), 1024)
  t.equal(openFileLimit(() => LIMITS.replace('1024 ', 'unlimited ')), undefined, 'unlimited: no cap')
  t.equal(openFileLimit(() => 'Limit Soft Limit\n'), undefined, 'no such line')
  t.equal(
    openFileLimit(() => {
      throw Object.assign(new Error('no such file'), { code: 'ENOENT' })
    }),
    undefined,
    'not Linux',
  )
  t.type(openFileLimit(), 'number', "this machine's own")
})

t.test('0 derives the cap from the limit, a reserve of 256 left and two files a connection; a configured one is taken as given', async (t) => {
  t.equal(allowedConnections(1024), 384)
  t.equal(allowedConnections(320), 32)
  t.equal(allowedConnections(300), 22)
  t.equal(allowedConnections(257), 1, 'at least 1')
  t.equal(allowedConnections(100), 1, 'at least 1, below the reserve too')
  t.same(connectionCap(0, 1024), { max: 384, allowed: 384, over: false })
  t.same(connectionCap(0, undefined), { max: undefined, allowed: undefined, over: false }, 'no limit: no cap')
  t.same(connectionCap(100, 1024), { max: 100, allowed: 384, over: false })
  t.same(connectionCap(1000, 1024), { max: 1000, allowed: 384, over: true }, 'above what the limit allows: as given, warned of')
  t.same(connectionCap(1000, undefined), { max: 1000, allowed: undefined, over: false })
})

/** Waits for `ok()`, polling; a hang guard, not a latency bound. */
async function until(ok: () => boolean | Promise<boolean>, what: string, timeoutMs = 60_000): Promise<void> {
  const start = Date.now()
  while (!(await ok())) {
    if (Date.now() - start > timeoutMs) throw new Error(`not within ${timeoutMs} ms: ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

const metric = (text: string, name: string): number | undefined => {
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text)
  return m ? Number(m[1]) : undefined
}

t.test('at an open-file limit of 320, connections past the derived cap of 32 are closed, counted and warned of once, and health, metrics and the gateway go on', async (t) => {
  // An upstream that never answers: each request forwarded holds its client's connection and one to the upstream.
  let arrived = 0
  const upstream = await startUpstream(t, () => void arrived++)
  const dir = scratchDir('keygate-connection-cap-')
  const config = join(dir, 'keygate.yaml')
  // Every request passes the rate limits: only the cap may refuse one.
  writeFileSync(config, 'rate_limits:\n  per_address: { limit: 1000000, window_s: 1 }\n  per_key:\n    default: { limit: 1000000, window_s: 1 }\n')
  const s = await serve(t, { env: isolatedEnv({ KEYGATE_DATA_DIR: await seedDataDir(join(dir, 'store')), KEYGATE_UPSTREAM: upstream.url, KEYGATE_CONFIG: config }), openFiles: 320 })
  const key = /kg_[0-9A-Za-z]{12}_[0-9A-Za-z]{28}/.exec(s.stderr())?.[0] as string
  t.ok(key, 'the first admin key')
  t.match(s.logs.find((l) => l.message === 'gateway listening'), { max_connections: 32 }, '(320 - 256) / 2')

  const head = `GET /slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\n\r\n`
  const clients: RawClient[] = []
  t.teardown(() => {
    for (const c of clients) c.socket.destroy()
  })
  // The cap's worth, each request held by the upstream.
  for (let i = 0; i < 32; i++) clients.push(rawClient(s.gateway, head))
  await until(() => arrived === 32, `32 requests at the upstream (${arrived})`)
  // Ten times as many again, as the review's 400 requests: without a cap, 330 client sockets and
  // as many upstream ones as fit took every file descriptor of the 320.
  const more: RawClient[] = []
  for (let i = 0; i < 300; i++) more.push(rawClient(s.gateway, head))
  clients.push(...more)
  let ended = 0
  for (const c of more) void c.closed.then(() => ended++)
  // Settled: each of them closed, or (without a cap) forwarded; a hang guard, not asserted on.
  await until(() => ended + arrived - 32 >= 300, `the 300 closed or forwarded (${ended} closed, ${arrived - 32} forwarded)`, 30_000).catch(() => {})

  const health = await call(`${s.admin}/healthz`).catch((err: Error) => ({ status: 0, text: String(err), json: {} }))
  t.equal(health.status, 200, `the admin listener's /healthz answers: ${health.text}`)
  t.equal((await call(`${s.admin}/readyz`)).status, 200, "and its /readyz: the store's pool gets its connections")
  t.equal(arrived, 32, 'no request past the cap reached the upstream')
  t.equal(ended, 300, 'each connection past the cap was closed')
  t.same(
    more.map((c) => c.received()).filter((r) => r !== ''),
    [],
    'unanswered',
  )
  const metrics = (await call(`${s.admin}/metrics`)).text
  t.equal(metric(metrics, 'keygate_gateway_connections_refused_total'), 300, 'each counted')
  t.equal(metric(metrics, 'keygate_gateway_connections'), 32, 'the connections held')
  t.equal(metric(metrics, 'keygate_gateway_connections_max'), 32, 'the cap')
  const warned = s.logs.filter((l) => l.message.startsWith('gateway connections at the cap'))
  t.equal(warned.length, 1, 'warned of once, not once a connection')
  t.match(warned[0], { level: 'warn', max_connections: 32, refused: 1 })

  // The connections held end: a new connection is served again, the gateway's /healthz first.
  for (const c of clients.slice(0, 32)) c.socket.destroy()
  await until(async () => (await call(`${s.gateway}/healthz`).catch(() => ({ status: 0 }))).status === 200, "the gateway's /healthz on a new connection")
  t.equal(await s.stop(), 0, 'SIGTERM: exit 0')
})

t.test('a configured cap above what the limit allows is taken as given, and warned of at start', async (t) => {
  const dir = scratchDir('keygate-connection-cap-')
  const s = await serve(t, { env: isolatedEnv({ KEYGATE_DATA_DIR: await seedDataDir(join(dir, 'store')), KEYGATE_MAX_CONNECTIONS: '100' }), openFiles: 320 })
  t.match(s.logs.find((l) => l.message === 'gateway listening'), { max_connections: 100 })
  const warned = () => s.logs.filter((l) => l.message.startsWith('gateway.max_connections is 100'))
  t.match(warned(), [{ level: 'warn', max_connections: 100, open_file_limit: 320, allowed: 32 }])
  t.equal(metric((await call(`${s.admin}/metrics`)).text, 'keygate_gateway_connections_max'), 100)
  t.equal(await s.stop(), 0)
  // Counted once its log is read whole: t.match takes an array as the items it starts with (found by a review).
  t.equal(warned().length, 1, 'warned of once')
})
