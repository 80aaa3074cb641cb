// `keygate serve` whose log cannot be written: stdout a pipe whose reader is gone
// (`keygate serve | head -1`, a log shipper that died) or a full disk. (found by a review)
import t from 'tap'
import { once } from 'node:events'
import { closeSync, openSync } from 'node:fs'
import { Client, request } from 'undici'
import { LOG_BACKLOG_MAX_CHARS } from '../core/log.ts'
import { KEYGATE_BIN, capturedStderr, childEnv, spawnClean } from './helpers/cli.ts'
import { call, echo, startUpstream, until } from './helpers/gateway.ts'
import { isolatedEnv, serve } from './helpers/serve.ts'
import { freshDatabase } from './helpers/stores.ts'
import { tempDir } from './helpers/cli-lifecycle.ts'

t.test('serve whose log cannot be written stops, exit 1, saying why on stderr, with no stack trace', async (t) => {
  // Before: the first log line that could not be written was an 'error' event nothing handled,
  // and serve ended at once with Node's "Unhandled 'error' event" and a stack trace, its requests
  // in flight cut and nothing drained or flushed.
  const full = openSync('/dev/full', 'w')
  t.teardown(() => closeSync(full))
  for (const [how, stdout, why] of [
    ['the reader closed it', 'closed', 'the reader closed it'],
    ['a full disk', full, 'no space left on the device'],
  ] as const) {
    const env = isolatedEnv({ DATABASE_URL: await freshDatabase(t), KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'), KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!', KEYGATE_UPSTREAM: 'http://127.0.0.1:9', KEYGATE_LISTEN: '127.0.0.1:0', KEYGATE_ADMIN_LISTEN: '127.0.0.1:0' })
    const command = spawnClean(process.execPath, [KEYGATE_BIN, 'serve'], { env: childEnv(env), cwd: tempDir(), stdio: ['ignore', stdout === 'closed' ? 'pipe' : stdout, 'pipe'] })
    if (stdout === 'closed') command.stdout!.destroy()
    let stderr = ''
    command.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    let ended: [number | null, NodeJS.Signals | null] | undefined
    command.on('close', (code, signal) => (ended = [code, signal]))
    t.teardown(() => command.kill('SIGKILL'))
    await until(t, `${how}: serve ends`, () => ended !== undefined, 60_000)
    capturedStderr.push(stderr)
    t.same(ended, [1, null], `${how}: exit 1`)
    t.match(stderr, `keygate: the log cannot be written (stdout: ${why}); stopping\n`, `${how}: says why`)
    t.notMatch(stderr, /\n\s+at |Unhandled 'error'/, `${how}: no stack trace`)
  }
})

t.test('serve whose log reader goes away while it serves stops as on SIGTERM, exit 1, saying why', async (t) => {
  const env = isolatedEnv({ DATABASE_URL: await freshDatabase(t), KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'), KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!', KEYGATE_UPSTREAM: 'http://127.0.0.1:9', KEYGATE_LISTEN: '127.0.0.1:0', KEYGATE_ADMIN_LISTEN: '127.0.0.1:0' })
  const command = spawnClean(process.execPath, [KEYGATE_BIN, 'serve'], { env: childEnv(env), cwd: tempDir(), stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  command.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  command.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  let ended: [number | null, NodeJS.Signals | null] | undefined
  command.on('close', (code, signal) => (ended = [code, signal]))
  t.teardown(() => command.kill('SIGKILL'))
  await until(t, 'serve listens', () => stdout.includes('"admin listening"'), 60_000)
  // The reader goes; the next log line (SIGHUP's, about the certificates) cannot be written.
  command.stdout!.destroy()
  command.kill('SIGHUP')
  await until(t, 'serve ends', () => ended !== undefined, 60_000)
  capturedStderr.push(stderr)
  t.same(ended, [1, null], 'exit 1')
  t.match(stderr, 'keygate: the log cannot be written (stdout: the reader closed it); stopping\n', 'says why')
  t.notMatch(stderr, /\n\s+at |Unhandled 'error'/, 'no stack trace')
})

t.test('serve whose log reader stops reading holds a bounded backlog of log lines, and says how many it dropped once the reader reads again (found by a review)', async (t) => {
  // Before: stdout, a pipe, is written asynchronously, and every line the reader had not taken
  // waited in memory: with the access log on, a log shipper that stalled (alive, not reading)
  // grew the heap with every request, 36 to 203 MiB over 400,000 requests, until the OOM killer.
  const env = isolatedEnv({ DATABASE_URL: await freshDatabase(t), KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'), KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!', KEYGATE_UPSTREAM: 'http://127.0.0.1:9', KEYGATE_LISTEN: '127.0.0.1:0', KEYGATE_ADMIN_LISTEN: '127.0.0.1:0', KEYGATE_ACCESS_LOG: 'true' })
  const command = spawnClean(process.execPath, [KEYGATE_BIN, 'serve'], { env: childEnv(env), cwd: tempDir(), stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  command.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d))
  command.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  t.teardown(() => command.kill('SIGKILL'))
  await until(t, 'serve listens', () => stdout.includes('"admin listening"'), 60_000)
  const gateway = /"message":"gateway listening","address":"([^"]+)"/.exec(stdout)?.[1]
  t.ok(gateway, 'the gateway address is logged')
  // The reader stops: what it has not taken stays in the pipe (64 KiB) and then in serve.
  command.stdout!.pause()
  const before = stdout.length
  // Each request's access line holds its path: 8 KiB each, 24 MiB of log in all, past the backlog's bound.
  const requests = 3000
  const path = `/${'p'.repeat(8 * 1024)}`
  const client = new Client(`http://${gateway}`)
  t.teardown(() => client.close())
  for (let i = 0; i < requests; i++) {
    const answer = await client.request({ method: 'GET', path })
    await answer.body.dump()
  }
  // While lines are being dropped, /metrics says so (before, found by a review: nothing did until
  // the reader came back and read the count in the log itself).
  const admin = /"message":"admin listening","address":"([^"]+)"/.exec(stdout)?.[1]
  const droppedMetric = async () => {
    const body = await (await request(`http://${admin}/metrics`)).body.text()
    return Number(/^keygate_log_lines_dropped_total (\d+)$/m.exec(body)?.[1] ?? Number.NaN)
  }
  const stalled = await droppedMetric()
  t.ok(stalled > 0, `keygate_log_lines_dropped_total counts them while the reader stalls (${stalled})`)
  command.stdout!.resume()
  const accessLines = () => stdout.slice(before).split('\n').filter((l) => l.includes('"message":"request"')).length
  const dropped = () => Number(/"message":"log lines dropped[^\n]*"dropped":(\d+)/.exec(stdout)?.[1] ?? 0)
  await until(t, 'every line is either written or counted as dropped', () => accessLines() + dropped() >= requests, 60_000)
  t.ok(dropped() > 0, `lines were dropped (${dropped()}), not held without bound`)
  t.ok(stdout.length - before <= LOG_BACKLOG_MAX_CHARS + 2 * 1024 * 1024, `at most the bound and the pipe's share were kept: ${stdout.length - before} characters of ${requests * path.length}`)
  // Serve writes on: a request after the reader is back is logged.
  const after = await client.request({ method: 'GET', path: '/after-the-drop' })
  await after.body.dump()
  await until(t, 'a later line is written', () => stdout.includes('"path":"/after-the-drop"'), 20_000)
  t.equal(await droppedMetric(), dropped(), 'and holds the count the log gave once the reader was back')
  command.kill('SIGTERM')
  await once(command, 'close')
  capturedStderr.push(stderr)
})

t.test('serve whose log reader goes away during a stop begun a second or more before goes on draining: the log lost is not a second signal (found by a review)', async (t) => {
  // Before: the log lost called the stop's signal handler, which took it, a second after the
  // SIGTERM, for an operator's second signal and exited at once, cutting the requests in flight.
  let arrived!: () => void
  const arrival = new Promise<void>((r) => (arrived = r))
  let release!: () => void
  const released = new Promise<void>((r) => (release = r))
  t.teardown(() => release())
  const upstream = await startUpstream(t, (req, res, received) => {
    arrived()
    void released.then(() => echo(req, res, received))
  })
  const token = 'an-admin-token-of-32-characters!'
  const s = await serve(t, { env: isolatedEnv({ DATABASE_URL: await freshDatabase(t), KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 7).toString('base64'), KEYGATE_ADMIN_TOKEN: token, KEYGATE_UPSTREAM: upstream.url }) })
  const key = (await call(`${s.admin}/v1/keys`, { method: 'POST', token, body: { type: 'service', name: 'in flight' } })).json.key as string
  const answer = request(`${s.gateway}/slow`, { headers: { authorization: `Bearer ${key}` } }).then(
    async (r) => (await r.body.dump(), r.statusCode),
    (err: NodeJS.ErrnoException) => err.code,
  )
  await arrival
  s.child.kill('SIGTERM')
  await s.waitForLog((l) => l.message === 'shutting down')
  // Past the second within which a signal told again is taken for the same stop: at least that
  // long, whatever the machine's load.
  await new Promise((r) => setTimeout(r, 1200))
  // The reader goes; the next log line (SIGHUP's) cannot be written.
  s.child.stdout!.destroy()
  s.child.kill('SIGHUP')
  await until(t, 'the log lost is said', () => s.stderr().includes('keygate: the log cannot be written'), 60_000)
  release()
  t.equal(await answer, 200, 'the request in flight is answered')
  t.equal(await s.exited, 1, 'exit 1, the log lost')
})
