// `keygate serve --workers` writes its primary's and its workers' log lines to one stdout: a
// reader that falls behind (a log shipper under load) still reads whole lines, each one JSON
// object (found by a review: one process's line was cut part-way, another's inside it).
import t from 'tap'
import { connectionPerWorker, serve as startKeygate, type LogLine } from './helpers/serve.ts'
import { answerOf } from './helpers/gateway.ts'
import { workersSetUp } from './helpers/workers.ts'

const notJson = (logs: LogLine[]) => logs.filter((l) => l.level === 'raw').map((l) => l.message.slice(0, 100))

t.test('--workers: a log reader that falls behind still gets whole lines, never one process\'s line inside another\'s (found by a review)', async (t) => {
  const { cwd, env, upstream } = await workersSetUp(t, 'log-lines', 0)
  const serve = await startKeygate(t, { args: ['--workers', '2', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env: { ...env, KEYGATE_ACCESS_LOG: 'true' }, cwd, gateways: 2 })
  const connections = await connectionPerWorker(t, serve.gateway, 2)
  const stdout = serve.child.stdout!
  const send = (path: (worker: number, n: number) => string, count: number) =>
    Promise.all(connections.map(async (c, w) => {
      for (let n = 0; n < count; n++) t.equal((await answerOf(await c.request({ method: 'GET', path: path(w, n) }))).status, 401)
    }))

  // Lines longer than a pipe takes whole (9 KiB paths), written while the reader does not read;
  // then it reads them all at once.
  for (let round = 0; round < 4; round++) {
    stdout.pause()
    await send((w, n) => `/long-${w}-${round * 30 + n}-${'a'.repeat(9000)}`, 30)
    stdout.resume()
  }
  // Lines of the usual length, while the reader keeps stopping and starting.
  let paused = false
  const toggling = setInterval(() => ((paused = !paused) ? stdout.pause() : stdout.resume()), 20)
  await send((w, n) => `/short-${w}-${n}-${'b'.repeat(600)}`, 300)
  clearInterval(toggling)
  stdout.resume()
  t.equal(await serve.stop(), 0)

  t.same(notJson(serve.logs), [], 'every line is one JSON object')
  const requests = serve.logs.filter((l) => l.message === 'request')
  const longLines = requests.filter((l) => String(l.path).startsWith('/long-'))
  t.equal(longLines.length, 240, 'every long line is written')
  t.ok(longLines.every((l) => l.truncated === true && /^\/long-\d-\d+-a+…$/.test(String(l.path)) && Buffer.byteLength(JSON.stringify(l)) < 4096), 'shortened to what a pipe takes whole, and says so')
  const shortLines = requests.filter((l) => String(l.path).startsWith('/short-'))
  t.equal(shortLines.length, 600, 'every line of the usual length is written')
  t.ok(shortLines.every((l) => l.truncated === undefined && String(l.path).endsWith('b'.repeat(600))), 'as it was')
})
