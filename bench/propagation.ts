// node bench/propagation.ts [--rounds N]
// Revocation propagation across processes: one `keygate serve --only admin` and two
// `keygate serve --only gateway` on one PostgreSQL (a fresh database on DATABASE_URL) and one
// Redis (a redis-server of its own). Each round creates a key, has both gateways cache it, then
// revokes it through the admin API while each gateway is asked with it again and again; the
// latency of a gateway is from the revoke request being sent to the first refusal it answers;
// also from the moment the invalidation reached a subscriber of the benchmark's own (the publish,
// within a fraction of a millisecond), which leaves out the admin's own database transaction.
// Prints a markdown table of percentiles over all rounds and both gateways.
import { randomInt } from 'node:crypto'
import { constants } from 'node:os'
import { Redis } from 'ioredis'
import { Agent, request } from 'undici'
import { INVALIDATION_CHANNEL } from '../core/invalidation.ts'
import { startDeployment } from '../test/helpers/deployment.ts'

const arg = process.argv.indexOf('--rounds')
const ROUNDS = arg > 0 ? Number(process.argv[arg + 1]) : 200
if (!Number.isInteger(ROUNDS) || ROUNDS <= 0) {
  process.stderr.write('--rounds takes a whole number above 0\n')
  process.exit(2)
}

const teardowns: Array<() => unknown> = []
const t = { teardown: (fn: () => unknown) => void teardowns.push(fn) }
const tearDown = async (): Promise<void> => {
  for (const fn of teardowns.splice(0).reverse()) await fn()
}
// Stopped by a signal, it tears its deployment down too (what the run was doing then fails as
// its processes go, and waits for the teardown): before, a `kill` of the run left its
// redis-server and keygate processes running and its database in place.
let stopping: Promise<void> | undefined
process.on('unhandledRejection', (err) => {
  if (!stopping) throw err
})
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.once(signal, () => void (stopping ??= tearDown()).finally(() => process.exit(128 + constants.signals[signal])))

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] as number
}

const fmt = (ms: number) => ms.toFixed(2)

async function main(): Promise<void> {
  const d = await startDeployment(t, { gateways: 2 })
  const agent = new Agent({ keepAliveTimeout: 10_000, connections: 4 })
  teardowns.push(() => agent.close())
  // A fresh client address per request: the refusals of one round must not lock anyone out.
  const ask = async (gateway: string, key: string): Promise<number> => {
    const r = await request(`${gateway}/orders`, { headers: { authorization: `Bearer ${key}`, 'x-forwarded-for': `10.${randomInt(256)}.${randomInt(256)}.${randomInt(1, 255)}` }, dispatcher: agent })
    await r.body.dump()
    return r.statusCode
  }
  // When the revocation's `key:<id>` message was published, as seen by a subscriber here (the
  // key's creation published one too, long before: only a message after the revoke counts).
  let awaited: string | undefined
  let publishedAt: number | undefined
  const sub = new Redis(d.redis.url)
  teardowns.push(() => sub.disconnect())
  sub.on('message', (_channel: string, message: string) => {
    const m = /^\d+\|key:(.+)$/.exec(message)
    if (m && m[1] === awaited && publishedAt === undefined) publishedAt = performance.now()
  })
  await sub.subscribe(INVALIDATION_CHANNEL)
  const fromPublish: number[] = []
  const fromSent: number[] = []
  const fromAnswer: number[] = []
  const revokeAnswer: number[] = []
  for (let round = 0; round < ROUNDS; round++) {
    const created = await d.call('POST', '/v1/keys', { name: `propagation ${round}`, type: 'service' })
    if (created.status !== 201) throw new Error(`create: ${created.status} ${created.text}`)
    const { id, key } = created.json as { id: string; key: string }
    for (const g of d.gateways) if ((await ask(g.gateway, key)) !== 200) throw new Error('a fresh key was refused')
    let answeredAt = 0
    awaited = id
    publishedAt = undefined
    const sent = performance.now()
    const pollers = d.gateways.map(async (g) => {
      for (;;) {
        const status = await ask(g.gateway, key)
        if (status === 401) return performance.now()
        if (status !== 200) throw new Error(`unexpected ${status}`)
        if (performance.now() - sent > 10_000) throw new Error('not refused within 10 s')
      }
    })
    const revoked = await d.call('POST', `/v1/keys/${id}/revoke`, {})
    answeredAt = performance.now()
    if (revoked.status !== 200) throw new Error(`revoke: ${revoked.status}`)
    revokeAnswer.push(answeredAt - sent)
    const refusedAt = await Promise.all(pollers)
    // A gateway may refuse before this process's own subscriber has the message.
    for (let i = 0; i < 1000 && publishedAt === undefined; i++) await new Promise((r) => setTimeout(r, 1))
    const at0 = publishedAt
    for (const at of refusedAt) {
      if (at0 !== undefined) fromPublish.push(Math.max(0, at - at0))
      fromSent.push(at - sent)
      fromAnswer.push(Math.max(0, at - answeredAt))
    }
  }
  if (fromPublish.length !== fromSent.length) throw new Error('a revocation was never published on Redis')
  const rows: Array<[string, number[]]> = [
    ['refused by a gateway, from the invalidation being published', fromPublish],
    ['refused by a gateway, from the revoke request being sent', fromSent],
    ['refused by a gateway, after the admin API answered the revoke', fromAnswer],
    ['the admin API answering the revoke', revokeAnswer],
  ]
  const lines = [
    `Revocation propagation: 1 admin + 2 gateway processes, PostgreSQL, Redis pub/sub; ${ROUNDS} rounds (node ${process.version}, ${new Date().toISOString().slice(0, 10)})`,
    '',
    '| measure | n | p50 ms | p90 ms | p99 ms | max ms |',
    '| --- | --- | --- | --- | --- | --- |',
  ]
  for (const [name, values] of rows) {
    const s = [...values].sort((a, b) => a - b)
    lines.push(`| ${name} | ${s.length} | ${fmt(percentile(s, 50))} | ${fmt(percentile(s, 90))} | ${fmt(percentile(s, 99))} | ${fmt(s[s.length - 1] as number)} |`)
  }
  console.log(lines.join('\n'))
}

try {
  await main()
} catch (err) {
  if (stopping) await new Promise(() => {})
  throw err
} finally {
  await tearDown()
}
