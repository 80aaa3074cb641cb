// `keygate serve --workers` as a real process on PostgreSQL: one port shared by the workers, the
// primary owning the admin API and summing the metrics, changes reaching every worker at once;
// signals, killed and frozen workers, and the metrics of workers replaced. Replacements that fail
// or wait and stops are in test/serve-workers-replace.test.ts: one file took 157 s on a machine
// loaded by two busy loops, over half of tap's 300 s for a file, which the suite's own load could
// pass. (Split from test/admin-serve.test.ts before, so the two run side by side.)
import t from 'tap'
import http from 'node:http'
import { readFileSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import { join } from 'node:path'
import { runCli } from './helpers/cli.ts'
import { connectionPerWorker, isolatedEnv, serve as startKeygate } from './helpers/serve.ts'
import { answerOf, call, startUpstream } from './helpers/gateway.ts'
import { freshDatabase } from './helpers/stores.ts'
import { childrenOf, ENCRYPTION_KEY, value, workersSetUp } from './helpers/workers.ts'
import { scratchDir } from './helpers/scratch.ts'

t.test('--workers on PostgreSQL: one port, the primary owns the admin API and sums the metrics; changes reach every worker at once', async (t) => {
  const url = await freshDatabase(t)
  const cwd = scratchDir('keygate-workers-')
  // The workers share one lockout (the primary's memory): the eight refused requests below would lock 127.0.0.1 out after five.
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, RATE_LIMIT_MAX_ATTEMPTS: '100' })
  const upstream = await startUpstream(t)
  // /api strips its prefix to the upstream that --upstream's / reaches too: warned of once, by the primary.
  writeFileSync(join(cwd, 'keygate.yaml'), `deny_list: ["192.0.2.0/24"]\nroutes:\n  - { name: api, path: /api, upstream: "${upstream.url}", strip_prefix: true, scopes: [admin] }\n`)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  // Before (found by a read-back): a primary logged none, and its workers were not to.
  t.match(serve.logs.filter((l) => /reaches its upstream paths without them/.test(l.message)), [{ level: 'warn', route: 'api', by: 'default' }])
  t.equal(serve.logs.filter((l) => /reaches its upstream paths without them/.test(l.message)).length, 1, 'the exposure is told once')
  const listening = serve.logs.filter((l) => l.message === 'gateway listening')
  t.equal(new Set(listening.map((l) => l.worker)).size, 2, 'two workers listen')
  t.equal(new Set(listening.map((l) => l.address)).size, 1, 'on one address')
  const printed = /created the first admin key \(id \w+\)[^\n]*\n(kg_\S+)/.exec(serve.stderr())
  t.ok(printed, 'the primary creates the first admin key and prints it')
  // Counted: the match above finds the first of any number, a worker's as well (found by a review).
  t.equal(serve.stderr().match(/kg_[0-9A-Za-z]{12}_[0-9A-Za-z]{28}/g)?.length, 1, 'once')
  const token = (printed as unknown as [string, string])[1]

  // Readiness turns ready once both workers run.
  let ready = await call(`${serve.admin}/readyz`)
  for (let i = 0; i < 50 && ready.status !== 200; i++) {
    await new Promise((r) => setTimeout(r, 100))
    ready = await call(`${serve.admin}/readyz`)
  }
  t.equal(ready.status, 200, ready.text)

  const created = await call(`${serve.admin}/v1/keys`, { method: 'POST', token, body: { name: 'worker key', type: 'user' } })
  t.equal(created.status, 201)
  const auth = { authorization: `Bearer ${created.json.key}` }
  // Four on a connection to each worker; each caches the key.
  const connections = await connectionPerWorker(t, serve.gateway, 2)
  for (let i = 0; i < 8; i++) t.equal((await answerOf(await connections[i % 2]!.request({ method: 'GET', path: `/w${i}`, headers: auth }))).status, 200)
  const workers = new Set(upstream.received.map((r) => r.headers['x-request-id']?.toString().split('-')[0]))
  t.equal(workers.size, 2, 'both workers served the key (request ids carry a per-process prefix)')
  const metrics = await call(`${serve.admin}/metrics`)
  t.equal(metrics.status, 200, serve.stdout())
  t.match(metrics.text, /keygate_gateway_requests_total\{[^}]*outcome="forwarded"[^}]*\} 8/, 'the primary sums the workers')
  // Before: 2, one per worker: a gauge of state is not added up.
  t.match(metrics.text, /\nkeygate_deny_list_entries 1\n/, 'the deny list is counted once')
  // Each process counts the log lines it drops (test/serve-log-output.test.ts stalls a reader): one series, the workers' and the primary's added up.
  t.same(metrics.text.match(/^keygate_log_lines_dropped_total .*$/gm), ['keygate_log_lines_dropped_total 0'], 'the log lines dropped, summed into one series')
  t.equal((await call(`${serve.admin}/v1/keys/${created.json.id}/revoke`, { method: 'POST', token })).status, 200)
  for (let i = 0; i < 8; i++) t.equal((await answerOf(await connections[i % 2]!.request({ method: 'GET', path: `/after${i}`, headers: auth }))).status, 401, 'refused by every worker on the next request')
  const deny = await call(`${serve.admin}/v1/deny-list`, { method: 'POST', token, body: { cidr: '127.0.0.0/8' } })
  t.equal(deny.status, 201)
  for (let i = 0; i < 4; i++) t.equal((await call(`${serve.gateway}/d${i}`)).status, 403, 'a deny entry applies on every worker at once')
  t.equal(await serve.stop(), 0, 'exit 0')
  t.ok(serve.logs.some((l) => l.message === 'stopped' && l.worker === undefined), 'the primary stops after its workers')
})

t.test('--workers and signals: SIGHUP is not an end, a signal to the whole group drains, an address in use ends the start', async (t) => {
  const { cwd, env, upstream, slowArrived } = await workersSetUp(t, 'signals', 1500)
  // The access log on: a worker's line of a path holding the admin token shows whether the worker hid it.
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env: { ...env, KEYGATE_ACCESS_LOG: 'true' }, cwd, waitFor: { gateway: false }, detached: true })
  // A reload while the workers start: before, the primary passed it on, a worker that had no
  // handler yet ended on it, and the start failed with exit 1.
  serve.child.kill('SIGHUP')
  const listening = (l: { message: string }) => l.message === 'gateway listening'
  await serve.waitForLog(() => serve.logs.filter(listening).length >= 2)
  serve.gateway = `http://${serve.logs.find(listening)?.address as string}`
  t.notOk(serve.logs.some((l) => /ended before any listened|worker died/.test(l.message)), 'no worker ended on a SIGHUP during start-up')
  const created = await call(`${serve.admin}/v1/keys`, { method: 'POST', token: 'an-admin-token-of-32-characters!', body: { name: 'k', type: 'user' } })
  const auth = { authorization: `Bearer ${created.json.key}` }

  // A worker hides the secrets of the configuration its primary hands it, as the primary does:
  // the admin token sent in a path to the gateway (a client's mistake) is not in the access log.
  const secretPath = `/oops/${'an-admin-token-of-32-characters!'}`
  t.equal((await call(`${serve.gateway}${secretPath}`, { headers: auth })).status, 200)
  const line = await serve.waitForLog((l) => l.message === 'request' && String(l.path).startsWith('/oops/'))
  t.ok(line.worker !== undefined, 'logged by a worker')
  t.equal(line.path, '/oops/[redacted]', 'with the admin token cut')
  t.notOk(serve.stdout().includes('an-admin-token-of-32-characters'), 'which appears nowhere in the output')

  // systemctl reload (the unit's ExecReload): before, SIGHUP ended a process without TLS, and the primary with its workers.
  const hangups = () => serve.logs.filter((l) => l.message.startsWith('SIGHUP')).length
  serve.child.kill('SIGHUP')
  await serve.waitForLog(() => hangups() >= 2)
  t.equal((await call(`${serve.gateway}/after-hup`, { headers: auth })).status, 200, 'still serving after SIGHUP')
  // A hang-up of the whole group (a terminal closed) reaches the workers too: they go on, and
  // leave the reload to the primary.
  process.kill(-(serve.child.pid as number), 'SIGHUP')
  await serve.waitForLog(() => hangups() >= 3)
  t.equal((await call(`${serve.gateway}/after-group-hup`, { headers: auth })).status, 200, 'still serving after a SIGHUP to the group')
  t.notOk(serve.logs.some((l) => l.message.startsWith('SIGHUP') && l.worker !== undefined), 'only the primary reloads')
  t.notOk(serve.logs.some((l) => /worker died/.test(l.message)), 'no worker ended on it')
  t.equal((await call(`${serve.admin}/healthz`)).status, 200)

  // systemd's stop (KillMode=control-group) and Ctrl-C signal every process of the group: each
  // worker gets the signal and then the primary's SIGTERM, which used to end it at once.
  const slow = call(`${serve.gateway}/slow`, { headers: auth })
  await slowArrived
  process.kill(-(serve.child.pid as number), 'SIGTERM')
  const answer = await slow
  t.equal(answer.status, 200, 'the request in flight is answered')
  t.equal(answer.text, 'slow done')
  t.equal(await serve.exited, 0, 'exit 0')
  t.notOk(serve.logs.some((l) => l.message.startsWith('second signal')), 'no worker gave up its drain')

  // The gateway address in use: before, the primary restarted its workers every second for ever.
  const taken = net.createServer()
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve))
  t.teardown(() => taken.close())
  const port = (taken.address() as net.AddressInfo).port
  const r = await Promise.race([
    runCli(['serve', '--workers', '2', '--listen', `127.0.0.1:${port}`, '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], { env, cwd }),
    new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 60_000).unref()),
  ])
  if (r === undefined) return t.fail('keygate serve --workers 2 did not exit within 60 s')
  t.equal(r.code, 1, 'exit 1')
  t.match(r.stderr, `cannot listen on 127.0.0.1:${port} (gateway.listen): the address is in use`, 'says why')
})

t.test('--workers: a worker killed under a churn of new connections leaves none of them without an answer or a close', async (t) => {
  const url = await freshDatabase(t)
  const cwd = scratchDir('keygate-workers-kill-')
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY })
  const upstream = await startUpstream(t)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const { hostname, port } = new URL(serve.gateway)
  // A bad key is answered at once (401, or 429 once the address is locked out): a connection is
  // a worker's for a moment only, so many are on their way to one when it is killed.
  const agent = new http.Agent({ keepAlive: false })
  const pending = new Set<http.ClientRequest>()
  const once = () =>
    new Promise<void>((resolve) => {
      const req = http.get({ host: hostname, port, path: '/x', agent, headers: { authorization: 'Bearer nope' } }, (res) => {
        res.resume()
        res.on('close', () => (pending.delete(req), resolve()))
      })
      req.on('error', () => (pending.delete(req), resolve()))
      pending.add(req)
    })
  let churning = true
  const loops = Array.from({ length: 64 }, async () => {
    while (churning) await once()
  })
  await new Promise((r) => setTimeout(r, 1500))
  const [pid] = childrenOf(serve.child.pid)
  process.kill(pid as number, 'SIGKILL')
  await new Promise((r) => setTimeout(r, 500))
  churning = false
  // Before, the primary kept a connection it had handed to the killed worker open for ever.
  for (let waited = 0; waited < 5000 && pending.size > 0; waited += 50) await new Promise((r) => setTimeout(r, 50))
  t.equal(pending.size, 0, 'every request was answered or its connection closed within 5 s')
  for (const req of pending) req.destroy()
  await Promise.all(loops)
  await serve.waitForLog((l) => l.message === 'gateway listening' && l.worker === 3)
  const after = (await call(`${serve.gateway}/after`)).status
  // The worker that replaced the killed one was told the lockouts in force before it listened.
  t.equal(after, 429, 'the gateway serves on, the address still locked out by the bad keys')
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers: a frozen worker (SIGSTOP) is reported by /readyz and the scrape, then killed and replaced', async (t) => {
  // Before (found by a review): the kernel kept handing the frozen worker its share of new
  // connections, which hung; /readyz said ready, and the log only that it did not report metrics.
  const url = await freshDatabase(t)
  const cwd = scratchDir('keygate-workers-frozen-')
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const upstream = await startUpstream(t)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  // Each worker answers (401) and counts four requests; the scrape keeps what each counted.
  const connections = await connectionPerWorker(t, serve.gateway, 2)
  for (let i = 0; i < 8; i++) t.equal((await answerOf(await connections[i % 2]!.request({ method: 'GET', path: `/f${i}` }))).status, 401)
  const unauthorized = 'keygate_gateway_requests_total{route="default",outcome="key_missing"}'
  const before = await call(`${serve.admin}/metrics`)
  // connectionPerWorker's own requests are counted too.
  const counted = value(before.text, unauthorized)
  t.ok(counted >= 8, 'both workers counted')
  t.equal(value(before.text, 'keygate_gateway_workers{state="answering"}'), 2)
  t.equal(value(before.text, 'keygate_gateway_workers{state="unanswering"}'), 0)
  t.equal(value(before.text, 'keygate_gateway_workers_wanted'), 2)
  t.equal(value(before.text, 'keygate_store_up'), 1, "the primary's and the workers' store")
  const [pid] = childrenOf(serve.child.pid)
  // A frozen process outlives its parent's SIGKILL: the teardown ends it should the test fail.
  t.teardown(() => {
    try {
      process.kill(pid as number, 'SIGKILL')
    } catch {}
  })
  process.kill(pid as number, 'SIGSTOP')
  // A hang guard, not a timing: the first refresh it leaves unanswered takes 5 to 10 s.
  let ready = await call(`${serve.admin}/readyz`)
  for (let i = 0; i < 300 && ready.status === 200; i++) {
    await new Promise((r) => setTimeout(r, 100))
    ready = await call(`${serve.admin}/readyz`)
  }
  t.equal(ready.status, 503, 'not ready while a worker does not answer')
  t.equal(ready.json.reason, '1 of 2 gateway workers answering')
  // Before (found by a review): the scrape failed with a 500 until the worker was killed, and
  // every series of the answering worker went missing with it.
  const frozen = await call(`${serve.admin}/metrics`)
  t.equal(frozen.status, 200, 'the scrape answers while a worker is frozen')
  t.equal(value(frozen.text, unauthorized), counted, "the frozen worker's last counts stand in for it: the counter does not go down")
  t.equal(value(frozen.text, 'keygate_gateway_workers{state="answering"}'), 1)
  t.equal(value(frozen.text, 'keygate_gateway_workers{state="unanswering"}'), 1, 'the frozen worker is shown')
  const killed = await serve.waitForLog((l) => l.message.startsWith('a gateway worker stopped answering'))
  t.equal(killed.level, 'error')
  const died = await serve.waitForLog((l) => l.message === 'gateway worker died; starting another')
  t.equal(died.signal, 'SIGKILL', 'the primary killed it')
  t.equal(died.worker, killed.worker, 'the worker that did not answer')
  await serve.waitForLog((l) => l.message === 'gateway listening' && l.worker === 3)
  ready = await call(`${serve.admin}/readyz`)
  for (let i = 0; i < 100 && ready.status !== 200; i++) {
    await new Promise((r) => setTimeout(r, 100))
    ready = await call(`${serve.admin}/readyz`)
  }
  t.equal(ready.status, 200, 'ready again once its replacement listens')
  t.match((await call(`${serve.admin}/metrics`)).text, /^keygate_worker_restarts_total\{reason="unresponsive"\} 1$/m, 'counted as a restart of an unresponsive worker')
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers metrics: the file descriptor limit is one process\'s, the start time is shown, and a replaced worker counts as a restart', async (t) => {
  // Before (found by a review): keygate_process_max_fds was the sum of the workers' limits, the
  // start time was left out, and nothing showed that a worker had been restarted.
  const { cwd, env, upstream } = await workersSetUp(t, 'restarts', 0)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const [pid] = childrenOf(serve.child.pid)
  const limit = Number(/^Max open files +(\d+)/m.exec(readFileSync(`/proc/${pid}/limits`, 'utf8'))?.[1])
  const before = await call(`${serve.admin}/metrics`)
  t.equal(before.status, 200)
  t.equal(value(before.text, 'keygate_process_max_fds'), limit, "one worker's limit, not the sum")
  t.ok(value(before.text, 'keygate_process_start_time_seconds') > 0, 'the start time is shown')
  t.equal(value(before.text, 'keygate_worker_restarts_total{reason="exited"}'), 0)
  process.kill(pid as number, 'SIGKILL')
  await serve.waitForLog((l) => l.message === 'gateway listening' && l.worker === 3)
  const after = await call(`${serve.admin}/metrics`)
  t.equal(after.status, 200)
  t.equal(value(after.text, 'keygate_worker_restarts_total{reason="exited"}'), 1, 'the killed worker counts as a restart')
  t.equal(value(after.text, 'keygate_worker_restarts_total{reason="unresponsive"}'), 0)
  t.equal(value(after.text, 'keygate_process_max_fds'), limit)
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers --only gateway: the primary serves health and metrics, and its /v1 404 says why, as a single process does (found by a review)', async (t) => {
  // Before: the primary answered "no admin route /v1/keys", as though the path were wrong, where
  // a single `serve --only gateway` says that this process serves the gateway only.
  const { cwd, env, upstream } = await workersSetUp(t, 'onlygateway', 0)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--only', 'gateway', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  t.ok(serve.logs.some((l) => l.message === 'health and metrics listening'), 'no admin API')
  const noApi = await call(`${serve.admin}/v1/keys`, { token: env.KEYGATE_ADMIN_TOKEN as string })
  t.equal(noApi.status, 404)
  t.match(noApi.json.error.message, 'this process serves the gateway only (serve --only gateway)', 'and it says so')
  t.match((await call(`${serve.admin}/elsewhere`)).json.error.message, 'no admin route /elsewhere', 'another path: no such route')
  t.equal((await call(`${serve.admin}/healthz`)).status, 200)
  t.equal((await call(`${serve.gateway}/`)).status, 401, 'the workers serve the gateway')
  t.equal(await serve.stop(), 0, 'exit 0')
})

t.test('--workers metrics: a scrape while every worker waits to be replaced waits for a replacement, and counts the waiting ones as starting (found by a review)', async (t) => {
  // Before: a replacement is forked a second (or more) after its worker died, and until then it
  // was in no state: a scrape in that second answered at once with 0 workers starting, answering
  // or unanswering, and none of the workers' series, where README says it waits for them.
  const { cwd, env, upstream } = await workersSetUp(t, 'allreplaced', 0)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, gateways: 2 })
  const pids = childrenOf(serve.child.pid)
  t.equal(pids.length, 2, 'two workers')
  for (const pid of pids) process.kill(pid, 'SIGKILL')
  await serve.waitForLog(() => serve.logs.filter((l) => l.message === 'gateway worker died; starting another').length === 2)
  const scrape = await call(`${serve.admin}/metrics`)
  t.equal(scrape.status, 200)
  const states = ['starting', 'answering', 'unanswering'].map((s) => value(scrape.text, `keygate_gateway_workers{state="${s}"}`))
  t.equal(states.reduce((a, b) => a + b, 0), 2, `every wanted worker is in a state (starting, answering, unanswering: ${states.join(', ')})`)
  t.ok((states[1] as number) >= 1, 'the scrape waited for a replacement to listen, as at the start')
  t.match(scrape.text, /^keygate_key_cache_entries\{cache="keys"\} \d+$/m, "with a worker's series")
  t.equal(await serve.stop(), 0, 'exit 0')
})
