// `keygate serve --workers` as a real process on PostgreSQL: a worker that dies as the primary
// answers it, replacements (the configuration the primary checked, a store that refuses them, a
// scrape meanwhile) and stops (a worker dying just before one, connections without a request
// head, a frozen worker, a worker stopped on its own). Split from test/serve-workers.test.ts, so
// the two halves run side by side (one file took 157 s of tap's 300 s on a loaded machine).
import t from 'tap'
import http from 'node:http'
import { readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs'
import { once } from 'node:events'
import { createServer as netServer, type Socket } from 'node:net'
import { join } from 'node:path'
import { connectionPerWorker, rawClient, serve as startKeygate, type RawClient } from './helpers/serve.ts'
import { answerOf, call, sleep, startUpstream, unlessHung } from './helpers/gateway.ts'
import { adminClient } from './helpers/stores.ts'
import { gateInFront } from './helpers/tcp-gate.ts'
import { childrenOf, processState, value, workersSetUp } from './helpers/workers.ts'

t.test('--workers: the primary survives answering a worker that has just died (EPIPE), and replaces it', async (t) => {
  // Before (found by a review): rate-limiter-flexible's answer to a dead worker's limiter call
  // failed with EPIPE as an 'error' on the Worker that nothing heard; the primary threw, and
  // every worker, and the port, went with it.
  const { cwd, env, upstream } = await workersSetUp(t, 'epipe', 0)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const primary = serve.child.pid as number
  const pids = childrenOf(primary)
  const { port } = new URL(serve.gateway)
  // The primary stopped: each request's limiter calls wait in its IPC channel (the worker answers
  // once they time out). New connections from many source addresses reach both workers.
  process.kill(primary, 'SIGSTOP')
  t.teardown(() => {
    try {
      process.kill(primary, 'SIGCONT')
    } catch {}
  })
  const statuses = await Promise.all(
    Array.from({ length: 40 }, (_, i) =>
      new Promise<number>((resolve, reject) => {
        const req = http.get({ host: '127.0.0.1', port, path: `/from-${i}`, localAddress: `127.0.0.${i + 2}`, agent: false }, (res) => {
          res.resume()
          res.on('end', () => resolve(res.statusCode as number))
        })
        req.on('error', reject)
      }),
    ),
  )
  t.ok(statuses.every((s) => s === 401), 'answered while the primary was stopped')
  // Both workers, each dead (a zombie: its parent, stopped, has not reaped it) before the
  // primary reads its calls. (Whether a send then fails depends on what the primary's event loop
  // sees first, the calls or the worker's end: here it mostly does.)
  for (const pid of pids) process.kill(pid, 'SIGKILL')
  while (pids.some((pid) => processState(pid) !== 'Z')) await new Promise((r) => setTimeout(r, 10))
  process.kill(primary, 'SIGCONT')
  await serve.waitForLog(() => serve.logs.filter((l) => l.message === 'gateway worker died; starting another').length === 2)
  await serve.waitForLog(() => serve.logs.filter((l) => l.message === 'gateway listening' && (l.worker === 3 || l.worker === 4)).length === 2)
  t.equal((await call(`${serve.gateway}/after`)).status, 401, 'the port answers')
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers: a replacement worker runs the configuration the primary checked, not the file as edited since', async (t) => {
  // Before (found by a review): a replacement read keygate.yaml again as it started. Edited to
  // something invalid, it could not start at all; edited to something valid, it ran the edit
  // beside a sibling that ran the old configuration.
  const { cwd, env, upstream } = await workersSetUp(t, 'sameconfig', 0)
  writeFileSync(join(cwd, 'keygate.yaml'), 'log:\n  level: info\n')
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  // The two workers of the start, killed one after the other. Not the lowest pid among the
  // children at each step: pids wrap around (pid_max is 32,768 here), and a CI run once found the
  // first replacement below the second original and killed it instead.
  const originals = childrenOf(serve.child.pid)
  t.equal(originals.length, 2, 'two workers')
  const replace = async (edit: string, replacement: number) => {
    writeFileSync(join(cwd, 'keygate.yaml'), edit)
    process.kill(originals.shift() as number, 'SIGKILL')
    await serve.waitForLog((l) => l.message === 'gateway listening' && l.worker === replacement)
  }
  await replace('no_such_setting: 1\n', 3)
  // Valid, and it would refuse this test's own address.
  await replace('deny_list: ["127.0.0.1"]\n', 4)
  t.notMatch(serve.stderr(), /no_such_setting/, 'the edited file was not read')
  t.notOk(serve.logs.some((l) => l.message === 'gateway worker died; starting another' && l.worker !== 1 && l.worker !== 2), 'each replacement started at the first try')
  // Both workers are replacements now: each new connection reaches one of them.
  for (let i = 0; i < 6; i++) t.equal((await call(`${serve.gateway}/after-edit-${i}`)).status, 401, 'the deny list of the start, not the edit')
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers: a worker that cannot start (its store refusing connections) exits, and the primary starts another with a backoff', async (t) => {
  // Before (found by a review): a replacement that failed at start stayed alive, not listening,
  // kept by its IPC channel; it was never replaced, and /readyz said "1 of 2" for ever.
  const { cwd, env, upstream } = await workersSetUp(t, 'badstart', 0)
  const database = new URL(env.DATABASE_URL as string).pathname.slice(1)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const allow = async (yes: boolean) => {
    const c = await adminClient()
    try {
      await c.query(`ALTER DATABASE ${database} ALLOW_CONNECTIONS ${yes}`)
    } finally {
      await c.end()
    }
  }
  await allow(false)
  t.teardown(() => allow(true))
  const [pid] = childrenOf(serve.child.pid)
  process.kill(pid as number, 'SIGKILL')
  // Worker 3 cannot open the store and ends; worker 4 is started in its place.
  const died = (worker: number) => serve.waitForLog((l) => l.message === 'gateway worker died; starting another' && l.worker === worker)
  const third = await died(3)
  t.match(serve.stderr(), /not currently accepting connections/, 'the replacement said why it could not start')
  // Before (found by a review): code 0, as Node's cluster ends a worker whose channel goes with
  // process.exit(0), whatever exit code the worker had set.
  t.equal(third.code, 1, 'its exit code says it failed')
  // And so does worker 4: each start in a row that fails waits twice as long as the one before.
  const fourth = await died(4)
  t.same([third.in_ms, fourth.in_ms], [2000, 4000], 'retried with a backoff')
  t.equal((await call(`${serve.gateway}/still`)).status, 401, 'the other worker serves on')
  await allow(true)
  await serve.waitForLog((l) => l.message === 'gateway listening' && l.worker === 5)
  t.pass('once the store answers, the next replacement listens')
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers: a replacement that fails after its store opened (its port taken) exits 1, and the next one listens once the port is free (found by a review)', async (t) => {
  // Before: such a worker disconnected its IPC channel in serve's last step, before its exit code
  // was known, and Node's cluster ended it with process.exit(0): the primary logged code 0.
  const { cwd, env, upstream } = await workersSetUp(t, 'lateexit', 0)
  const { gate, url } = await gateInFront(t, env.DATABASE_URL as string)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env: { ...env, DATABASE_URL: url }, cwd, gateways: 2 })
  // Both workers gone, their replacements wait for the store while another program takes the port.
  gate.set('shut')
  const pids = childrenOf(serve.child.pid)
  for (const pid of pids) process.kill(pid, 'SIGKILL')
  await serve.waitForLog((l) => l.worker === 3)
  await serve.waitForLog((l) => l.worker === 4)
  const taker = netServer()
  taker.listen({ host: '127.0.0.1', port: Number(new URL(serve.gateway).port) })
  await once(taker, 'listening')
  gate.set('open')
  const third = await serve.waitForLog((l) => l.message === 'gateway worker died; starting another' && (l.worker === 3 || l.worker === 4))
  t.match(serve.stderr(), /EADDRINUSE|in use/, 'the replacement said why it could not start')
  t.equal(third.code, 1, 'its exit code says it failed')
  taker.close()
  await once(taker, 'close')
  await serve.waitForLog((l) => l.message === 'gateway listening' && typeof l.worker === 'number' && l.worker > 4)
  t.equal((await call(`${serve.gateway}/after`)).status, 401, 'once the port is free, a replacement serves')
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers: a scrape while a replacement waits for the store answers from the workers that listen, without waiting for it (found by a review)', async (t) => {
  // Before: a scrape waited up to 8 s for every worker starting, and a replacement waits for the
  // store as long as store.start_wait_s: during a store outage every scrape took 8 s.
  const { cwd, env, upstream } = await workersSetUp(t, 'scrapewait', 0)
  const { gate, url } = await gateInFront(t, env.DATABASE_URL as string)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env: { ...env, DATABASE_URL: url }, cwd, gateways: 2 })
  // New connections to the store fail (those open stay): the replacement waits for it.
  gate.set('shut')
  const [pid] = childrenOf(serve.child.pid)
  process.kill(pid as number, 'SIGKILL')
  await serve.waitForLog((l) => l.message === 'gateway worker died; starting another')
  await serve.waitForLog((l) => l.worker === 3)
  // The store comes back a while after the scrape is asked: a scrape that waited for the
  // replacement would answer only once it listens, 2.5 s and the replacement's start later (the
  // scrape itself, the workers' answers over IPC, takes milliseconds; 4 s before, waited out).
  const reopen = setTimeout(() => gate.set('open'), 2500)
  t.teardown(() => clearTimeout(reopen))
  const scrape = await call(`${serve.admin}/metrics`)
  const replacementListened = serve.logs.some((l) => l.message === 'gateway listening' && l.worker === 3)
  t.equal(scrape.status, 200)
  t.notOk(replacementListened, 'answered while the replacement was still waiting for the store')
  t.match(scrape.text, /^keygate_key_cache_entries\{cache="keys"\} \d+$/m, "with the listening worker's metrics (the gateway's are the workers')")
  await serve.waitForLog((l) => l.message === 'gateway listening' && l.worker === 3)
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers: a worker that dies just before SIGTERM is not replaced during the shutdown, and keygate exits', async (t) => {
  // Before (found by a review): its replacement, due a second after it died, was started after
  // the others had stopped; it served the gateway with the primary's store closed, and the
  // process never exited.
  const { cwd, env, upstream, slowArrived } = await workersSetUp(t, 'dying', 3000)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const created = await call(`${serve.admin}/v1/keys`, { method: 'POST', token: 'an-admin-token-of-32-characters!', body: { name: 'k', type: 'user' } })
  const [pid] = childrenOf(serve.child.pid)
  process.kill(pid as number, 'SIGKILL')
  await serve.waitForLog((l) => l.message === 'gateway worker died; starting another')
  // A request in flight on the other worker keeps the shutdown going past the second after
  // which the replacement was due.
  const slow = call(`${serve.gateway}/slow`, { headers: { authorization: `Bearer ${created.json.key}` } })
  await slowArrived
  serve.child.kill('SIGTERM')
  t.equal((await slow).text, 'slow done', 'the request in flight is answered')
  const code = await Promise.race([serve.exited, new Promise<string>((r) => setTimeout(() => r('still running after 30 s'), 30_000).unref())])
  t.equal(code, 0, 'exit 0')
  const shutting = serve.logs.findIndex((l) => l.message === 'shutting down workers')
  t.ok(shutting >= 0, 'it shut its workers down')
  t.notOk(serve.logs.slice(shutting).some((l) => l.message === 'gateway listening'), 'and started none after')
})

/**
 * Which of `pids` took `socket`, a connection to 127.0.0.1 that may have sent nothing (nothing
 * answers to tell): the process holding the server's end, as /proc shows it once accepted.
 */
async function holderOf(socket: Socket, pids: number[]): Promise<number> {
  if (socket.connecting) await once(socket, 'connect')
  // /proc/net/tcp's address:port, 127.0.0.1 as a little-endian machine (x86, arm64) prints it.
  const hex = (port: number) => `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`
  const [server, client] = [hex(socket.remotePort as number), hex(socket.localPort as number)]
  const holds = (pid: number, inode: string) =>
    readdirSync(`/proc/${pid}/fd`).some((fd) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${fd}`) === `socket:[${inode}]`
      } catch {
        return false
      }
    })
  // A hang guard: accepted at once.
  for (let tries = 0; tries < 500; tries++) {
    const row = readFileSync('/proc/net/tcp', 'utf8').split('\n').map((line) => line.trim().split(/\s+/)).find((f) => f[1] === server && f[2] === client)
    const inode = row?.[9]
    const holder = inode === undefined || inode === '0' ? undefined : pids.find((pid) => holds(pid, inode))
    if (holder !== undefined) return holder
    await sleep(20)
  }
  throw new Error(`no one of ${pids.join(', ')} took the connection from port ${socket.localPort}`)
}

t.test('--workers: SIGTERM closes the connections without a whole request head, on the workers and the primary, and exits', async (t) => {
  // Before (found by a review): each held the stop until the header timeout or the shutdown
  // deadline (600 s here), as a request in flight would.
  const { cwd, env, upstream } = await workersSetUp(t, 'silent', 0)
  writeFileSync(join(cwd, 'keygate.yaml'), 'gateway:\n  headers_timeout_ms: 600000\n  shutdown_timeout_ms: 600000\n')
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  // Silent ones, and ones part-way through a head, until each worker holds one of each: the kernel
  // spreads new connections over the workers by a hash (SO_REUSEPORT), and 8 silent ones all
  // reached one worker in one run in 128.
  const workers = childrenOf(serve.child.pid)
  const gateway: RawClient[] = []
  for (const first of ['', 'GET / HT']) {
    const holders = new Set<number>()
    while (holders.size < 2) {
      if (gateway.length === 100) throw new Error(`100 connections reached ${holders.size} of the 2 workers`)
      const c = rawClient(serve.gateway, first)
      gateway.push(c)
      holders.add(await holderOf(c.socket, workers))
    }
  }
  const admin = [rawClient(serve.admin), rawClient(serve.admin, 'GET /healthz HT')]
  await sleep(200)
  serve.child.kill('SIGTERM')
  t.equal(await unlessHung(serve.exited), 0, 'exit 0')
  t.same(await Promise.all(gateway.map((c) => unlessHung(c.closed))), gateway.map(() => ''), "the workers closed theirs, unanswered")
  t.same(await Promise.all(admin.map((c) => unlessHung(c.closed))), admin.map(() => ''), "the primary's admin listener too")
})

t.test('--workers: SIGTERM with a worker frozen kills it once past its own bound, and leaves no worker behind', async (t) => {
  // Before (found by a failure review): the frozen worker ignored SIGTERM and the primary's
  // disconnect; the primary's backstop ended the primary about 28 s on with the defaults, and the
  // worker stayed, orphaned, holding its share of the gateway's port.
  const { cwd, env, upstream } = await workersSetUp(t, 'frozenstop', 0)
  // Bounds kept short: the worker's own is the drain (0.2 s), the store's (0.5 s + 2 s), a held
  // second and one more, 4.7 s (with a drain and a query timeout of 1 s each it was 6 s, waited out).
  writeFileSync(join(cwd, 'keygate.yaml'), 'gateway:\n  shutdown_timeout_ms: 200\nstore:\n  query_timeout_ms: 500\n')
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const [frozen, other] = childrenOf(serve.child.pid) as [number, number]
  t.teardown(() => {
    try {
      process.kill(frozen, 'SIGKILL')
    } catch {}
  })
  process.kill(frozen, 'SIGSTOP')
  serve.child.kill('SIGTERM')
  // A hang guard: the bound is 4.7 s here.
  const code = await Promise.race([serve.exited, new Promise<string>((r) => setTimeout(() => r('still running after 60 s'), 60_000).unref())])
  t.equal(code, 0, 'exit 0')
  const killing = serve.logs.find((l) => l.message === 'a gateway worker did not stop within its bound; killing it')
  t.ok(killing, 'it said which worker it killed')
  t.equal(killing?.level, 'error')
  t.notOk(serve.logs.some((l) => l.message.startsWith('stopping takes too long')), "the primary's stop ended in order, not by its backstop")
  // Gone, or a zombie no one reaps yet (this test's process is not its parent): not running, not stopped.
  const state = (pid: number) => {
    try {
      return processState(pid)
    } catch {
      return 'gone'
    }
  }
  t.ok(['gone', 'Z', 'X'].includes(state(frozen) as string), `the frozen worker is not left behind (state ${state(frozen)})`)
  t.ok(['gone', 'Z', 'X'].includes(state(other) as string), 'nor the other')
})

t.test('--workers: a worker stopped on its own with SIGTERM tells the primary its last counts; /metrics keeps every request it counted, once (found by a review)', async (t) => {
  // Before: the primary kept what it had last read of the worker (at a scrape, or every 5 s), and
  // what the worker counted after that, up to its drain's end, went missing from /metrics once it
  // was replaced. Here the primary is stopped (SIGSTOP) from before the worker's last request
  // ends until the worker has exited: it cannot have read that request's count, whatever its
  // 5 s refresh did. Which it then sees first, the worker's exit or its last message, is left to
  // its event loop.
  const { cwd, env } = await workersSetUp(t, 'gracefulcounts', 0)
  const held: Array<() => void> = []
  let bothHeld!: () => void
  const heldTwo = new Promise<void>((r) => (bothHeld = r))
  const upstream = await startUpstream(t, (req, res) => {
    if (req.url !== '/held') return void res.end('ok')
    held.push(() => res.end('released'))
    if (held.length === 2) bothHeld()
  })
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const primary = serve.child.pid as number
  const created = await call(`${serve.admin}/v1/keys`, { method: 'POST', token: 'an-admin-token-of-32-characters!', body: { name: 'k', type: 'service' } })
  const auth = { authorization: `Bearer ${created.json.key}` }
  // A service key: a user key's limit, 100 a second, would refuse the held requests below.
  const connections = await connectionPerWorker(t, serve.gateway, 2)
  for (let i = 0; i < 100; i++) t.equal((await answerOf(await connections[i % 2]!.request({ method: 'GET', path: `/c${i}`, headers: auth }))).status, 200)
  // One request held by the upstream on each worker.
  const answers = connections.map((c) => c.request({ method: 'GET', path: '/held', headers: auth }).then(answerOf))
  await heldTwo
  process.kill(primary, 'SIGSTOP')
  t.teardown(() => {
    try {
      process.kill(primary, 'SIGCONT')
    } catch {}
  })
  const [pid] = childrenOf(primary) as [number]
  process.kill(pid, 'SIGTERM')
  for (const release of held) release()
  t.same((await Promise.all(answers)).map((a) => a.status), [200, 200], 'the requests held are answered, the stopping worker draining its own')
  // A zombie once it has exited: its parent, stopped, has not reaped it.
  while (processState(pid) !== 'Z') await sleep(10)
  process.kill(primary, 'SIGCONT')
  const died = await serve.waitForLog((l) => l.message === 'gateway worker died; starting another')
  t.equal(died.code, 0, 'the worker stopped gracefully')
  await serve.waitForLog((l) => l.message === 'gateway listening' && l.worker === 3)
  const scrape = await call(`${serve.admin}/metrics`)
  t.equal(scrape.status, 200)
  t.equal(value(scrape.text, 'keygate_gateway_requests_total{route="default",outcome="forwarded"}'), 102, 'every forwarded request, counted once')
  t.equal(value(scrape.text, 'keygate_worker_restarts_total{reason="exited"}'), 1)
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers: a replacement whose primary is killed while it starts ends quietly, without an unhandled EPIPE (found by a review)', async (t) => {
  // Before (found by a crash stress): the replacement asked its dead primary for the configuration;
  // the send failed with EPIPE as an 'error' on cluster.worker that nothing heard, and the worker
  // ended with Node's "Unhandled 'error' event" and a stack trace on the service's stderr.
  const { cwd, env, upstream } = await workersSetUp(t, 'orphan', 0)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const primary = serve.child.pid as number
  const children = () => childrenOf(primary)
  const workers = children()
  process.kill(workers[0] as number, 'SIGKILL')
  await serve.waitForLog((l) => l.message === 'gateway worker died; starting another')
  // The replacement, forked a second later: killed with its primary while it still loads.
  let replacement: number | undefined
  while (replacement === undefined) {
    replacement = children().find((pid) => !workers.includes(pid))
    if (replacement === undefined) await sleep(5)
  }
  process.kill(primary, 'SIGKILL')
  // The pipes close once the replacement, which shares them, has ended too.
  await serve.exited
  const ended = (pid: number) => {
    try {
      return processState(pid) === 'Z'
    } catch {
      return true
    }
  }
  // A process closes its files before it is a zombie: the pipes' end can come a moment before
  // (a wait of up to 10 s, a hang guard, not a latency bound).
  for (let i = 0; i < 200 && !ended(replacement); i++) await sleep(50)
  t.ok(ended(replacement), 'the replacement ended')
  t.notMatch(serve.stderr(), /Unhandled 'error' event|EPIPE|ERR_IPC/, 'no unhandled error on stderr')
})
