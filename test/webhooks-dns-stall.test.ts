// A webhook receiver whose DNS stops answering (found by a review): each delivery's connection
// called dns.lookup, i.e. getaddrinfo on libuv's threadpool (4 threads), and one receiver has up
// to 5 attempts in flight, so its hanging look-ups filled the pool and every other look-up in the
// process (other receivers, the gateway's upstream, PostgreSQL's host) queued behind them; the
// other webhook's deliveries timed out. The machine's DNS cannot be broken here, so the look-up
// is a model of getaddrinfo on the threadpool: 4 threads, calls beyond them queued, and a name
// marked stuck never answers (until the test ends). It is given to the service (its `lookup`
// option), or put in place of dns.lookup for the default the servers use; the receivers, the
// connections and the store are real.
import t from 'tap'
import dns from 'node:dns'
import { syncBuiltinESMExports } from 'node:module'
import { AuditCipher } from '../core/audit.ts'
import { silentLogger } from '../core/log.ts'
import { migrate } from '../core/migrate.ts'
import type { LookupFunction } from '../core/ssrf.ts'
import { WebhookService, type Delivery } from '../core/webhooks.ts'
import type { Test } from 'tap'
import { startReceiver } from './helpers/webhooks.ts'
import { DEFAULT_CONFIG, TEST_ENCRYPTION_KEY, memoryDb, rejection } from './helpers/stores.ts'

/** getaddrinfo as libuv runs it: `size` threads, the calls beyond them queued in order. */
function threadpool(size = 4) {
  const stuck = new Set<string>()
  const hung: Array<() => void> = []
  const queue: Array<() => void> = []
  let busy = 0
  const stats = { calls: new Map<string, number>(), inFlight: 0, peak: 0 }
  const lookup: LookupFunction = (host, _options, cb) => {
    stats.calls.set(host, (stats.calls.get(host) ?? 0) + 1)
    stats.inFlight++
    stats.peak = Math.max(stats.peak, stats.inFlight)
    const run = () => {
      busy++
      const answer = (err: NodeJS.ErrnoException | null) => {
        busy--
        stats.inFlight--
        cb(err, err ? [] : [{ address: '127.0.0.1', family: 4 }])
        queue.shift()?.()
      }
      if (stuck.has(host)) hung.push(() => answer(Object.assign(new Error(`getaddrinfo EAI_AGAIN ${host}`), { code: 'EAI_AGAIN' })))
      else setImmediate(() => answer(null))
    }
    if (busy < size) run()
    else queue.push(run)
  }
  /** Answers the stuck look-ups (EAI_AGAIN), as getaddrinfo does in the end. */
  const release = () => {
    stuck.clear()
    for (const h of hung.splice(0)) h()
  }
  return { lookup, stats, stuck, release }
}

const db = await memoryDb({ migrated: true })
t.teardown(() => db.close())
await migrate(db)

const cipher = new AuditCipher(TEST_ENCRYPTION_KEY)
const config = { ...DEFAULT_CONFIG.webhooks, allow_private: ['127.0.0.1/32'], timeout_ms: 1000, retry_base_ms: 50, max_attempts: 2, poll_interval_ms: 50 }
const actor = { actor: 'test' }
/** Webhook look-ups in flight at most in a process (core/ssrf.ts LOOKUP_SLOTS), well below 4. */
const CAP = 2

async function until(what: () => Promise<boolean>): Promise<void> {
  while (!(await what())) await new Promise((resolve) => setTimeout(resolve, 50))
}

/**
 * Two webhooks, one whose name hangs, 5 events each, the other's queued once the stuck one's
 * attempts are under way: the other's are delivered at their first attempt, the stuck one's fail
 * as timeouts and are retried, its name is looked up once, and no more than CAP look-ups are
 * ever in flight.
 */
async function stuckReceiver(t: Test, pool: ReturnType<typeof threadpool>, tag: string, lookup?: LookupFunction): Promise<void> {
  const receiver = await startReceiver(t)
  const s = new WebhookService({ db, cipher, config, log: silentLogger, ...(lookup ? { lookup } : {}) })
  t.teardown(async () => {
    pool.release()
    await s.close()
  })
  const slowName = `slow-${tag}.keygate.test`
  const fastName = `fast-${tag}.keygate.test`
  const { webhook: slow } = await s.create({ url: `http://${slowName}:${receiver.port}/slow`, events: ['key.created'] }, actor)
  const { webhook: fast } = await s.create({ url: `http://${fastName}:${receiver.port}/fast`, events: ['key.revoked'] }, actor)
  const registered = pool.stats.calls.get(slowName) ?? 0
  pool.stuck.add(slowName)

  for (let i = 0; i < 5; i++) await s.enqueue({ type: 'key.created', at: new Date(), data: { i, tag } })
  await until(async () => (await s.deliveries(slow.id, { limit: 10 })).items.every((d) => d.attempts === 1) && (pool.stats.calls.get(slowName) ?? 0) > registered)
  await new Promise((resolve) => setTimeout(resolve, 100)) // the 5 attempts' connections are looking the name up
  for (let i = 0; i < 5; i++) await s.enqueue({ type: 'key.revoked', at: new Date(), data: { i, tag } })
  s.start()
  const settled = (ds: Delivery[]) => ds.length === 5 && ds.every((d) => d.status !== 'pending')
  await until(async () => settled((await s.deliveries(slow.id, { limit: 10 })).items) && settled((await s.deliveries(fast.id, { limit: 10 })).items))

  const fastOnes = (await s.deliveries(fast.id, { limit: 10 })).items
  t.same(
    fastOnes.map((d) => [d.status, d.attempts, d.lastError]),
    Array.from({ length: 5 }, () => ['delivered', 1, null]),
    'the other webhook: every delivery delivered at its first attempt, not delayed behind the stuck name',
  )
  t.equal(receiver.received.filter((h) => h.path === '/fast').length, 5, 'its receiver got all 5')

  const slowOnes = (await s.deliveries(slow.id, { limit: 10 })).items
  for (const d of slowOnes) {
    t.equal(d.attempts, config.max_attempts, 'the stuck receiver: each delivery retried after its first attempt failed')
    t.match(d.lastError, /timeout/i, `failed as a timeout (${d.lastError})`)
  }
  t.equal(receiver.received.filter((h) => h.path === '/slow').length, 0, 'nothing reached it')

  t.equal((pool.stats.calls.get(slowName) ?? 0) - registered, 1, 'its 10 attempts, 5 at a time, made one look-up (still hanging)')
  t.ok(pool.stats.peak <= CAP, `at most ${CAP} look-ups in flight at once (${pool.stats.peak})`)
}

t.test('a receiver whose DNS hangs does not hold up another (a lookup given to the service)', async (t) => {
  const pool = threadpool()
  await stuckReceiver(t, pool, 'given', pool.lookup)
})

t.test('the same with the default: dns.lookup, through the look-ups the process shares', async (t) => {
  const pool = threadpool()
  const original = dns.lookup
  ;(dns as { lookup: unknown }).lookup = pool.lookup
  syncBuiltinESMExports()
  t.teardown(() => {
    ;(dns as { lookup: unknown }).lookup = original
    syncBuiltinESMExports()
  })
  await stuckReceiver(t, pool, 'default')
})

t.test('registration: a name that does not answer is refused after webhooks.timeout_ms', async (t) => {
  const pool = threadpool()
  const s = new WebhookService({ db, cipher, config: { ...config, timeout_ms: 300 }, log: silentLogger, deliver: false, lookup: pool.lookup })
  t.teardown(async () => {
    pool.release()
    await s.close()
  })
  pool.stuck.add('hang-1.keygate.test')
  pool.stuck.add('hang-2.keygate.test')
  for (const name of ['hang-1', 'hang-2']) {
    const err = await rejection(s.create({ url: `http://${name}.keygate.test/hook`, events: ['key.created'] }, actor))
    t.equal(err.code, 'webhook_url_refused')
    t.match(err.message, new RegExp(`${name}\\.keygate\\.test reached its timeout \\(300 ms\\) without an answer`), err.message)
  }
  // Both slots are held by the look-ups still hanging: a third name waits for one, and no longer
  // than the timeout.
  const err = await rejection(s.create({ url: 'http://fine.keygate.test/hook', events: ['key.created'] }, actor))
  t.match(err.message, /fine\.keygate\.test reached its timeout \(300 ms\) waiting for one of the 2 webhook look-ups/, err.message)
  t.equal(pool.stats.calls.get('fine.keygate.test'), undefined, 'a look-up nobody waits for any more is not made')
  t.equal(pool.stats.peak, CAP, 'the hanging look-ups hold the slots, no more')

  pool.release()
  const { webhook } = await s.create({ url: 'http://fine.keygate.test/hook', events: ['key.created'] }, actor)
  t.equal(webhook.url, 'http://fine.keygate.test/hook', 'registered once a slot is free')
})
