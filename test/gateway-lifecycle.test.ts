// WebSocket upgrades after the same checks, /healthz, and graceful shutdown with requests in
// flight.
import t from 'tap'
import { createHash } from 'node:crypto'
import http from 'node:http'
import net from 'node:net'
import type { Duplex } from 'node:stream'
import { Agent, request, WebSocket } from 'undici'
import { bearer, listen, sleep, startGateway } from './helpers/gateway.ts'

/** A WebSocket echo for small text frames: enough of RFC 6455 to test a proxy with. */
function acceptWebSocket(req: http.IncomingMessage, socket: Duplex, seen: http.IncomingHttpHeaders[]): void {
  seen.push(req.headers)
  const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`)
  let buf = Buffer.alloc(0)
  socket.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d])
    while (buf.length >= 6) {
      const opcode = (buf[0] as number) & 0x0f
      const len = (buf[1] as number) & 0x7f
      if (len > 125 || buf.length < 6 + len) return
      const mask = buf.subarray(2, 6)
      const payload = Buffer.from(buf.subarray(6, 6 + len).map((b, i) => b ^ (mask[i % 4] as number)))
      buf = buf.subarray(6 + len)
      if (opcode === 0x8) {
        socket.end(Buffer.from([0x88, 0]))
        return
      }
      if (opcode === 0x1) socket.write(Buffer.concat([Buffer.from([0x81, payload.length]), payload]))
    }
  })
  socket.on('error', () => {})
}

t.test('WebSocket with and without a key', async (t) => {
  const seen: http.IncomingHttpHeaders[] = []
  const h = await startGateway(t)
  h.upstream.server.on('upgrade', (req, socket, _head) => acceptWebSocket(req, socket, seen))
  const k = await h.key({ name: 'ws key' })
  const wsUrl = `ws://127.0.0.1:${h.port}/socket`

  const ws = new WebSocket(wsUrl, { headers: { ...bearer(k.key), 'x-keygate-key-id': 'forged' } } as never)
  await new Promise((resolve, reject) => {
    ws.onopen = resolve
    ws.onerror = reject
  })
  const echoed = new Promise<string>((resolve) => (ws.onmessage = (e) => resolve(String(e.data))))
  ws.send('hello through keygate')
  t.equal(await echoed, 'hello through keygate')
  ws.close()
  t.equal(seen.length, 1)
  t.equal(seen[0]?.['x-keygate-key-id'], k.id, 'identity headers on the upgrade')
  t.notOk(seen[0]?.authorization, 'credential removed')
  t.equal(seen[0]?.upgrade, 'websocket')

  // The 101 carries the rate-limit headers, as every forwarded answer does.
  const head = await new Promise<string>((resolve, reject) => {
    const s = net.connect(h.port, '127.0.0.1', () =>
      s.write(`GET /socket HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ${k.key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`),
    )
    let out = ''
    s.on('error', reject)
    s.on('data', (d) => {
      if (out.includes('\r\n\r\n')) return
      out += d
      // Then a close frame (masked, empty), which the echo answers and ends the tunnel with.
      if (out.includes('\r\n\r\n')) s.write(Buffer.from([0x88, 0x80, 0, 0, 0, 0]))
    })
    s.on('close', () => resolve(out.slice(0, out.indexOf('\r\n\r\n'))))
  })
  t.match(head, /^HTTP\/1.1 101 /)
  for (const name of ['ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset', 'x-request-id']) t.match(head, new RegExp(`\r\n${name}: \\S+`), `${name} on the 101`)
  seen.length = 1

  const refused = new WebSocket(wsUrl)
  const failed = await new Promise<boolean>((resolve) => {
    refused.onopen = () => resolve(false)
    refused.onerror = () => resolve(true)
  })
  t.ok(failed, 'no key: the upgrade is refused')
  const raw = await new Promise<string>((resolve) => {
    const s = net.connect(h.port, '127.0.0.1', () =>
      s.write('GET /socket HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n'),
    )
    let out = ''
    s.on('data', (d) => (out += d))
    s.on('close', () => resolve(out))
  })
  t.match(raw, /^HTTP\/1.1 401 /)
  t.match(raw, /"code":"key_missing"/)
  t.equal(seen.length, 1, 'nothing reached the upstream')
})

t.test('graceful shutdown: in-flight requests finish, new ones are refused', async (t) => {
  const h = await startGateway(t, {
    upstream: (req, res) => {
      if (req.url === '/healthz') return void res.end('upstream')
      setTimeout(() => res.end(`done ${req.url}`), 400)
    },
  })
  const k = await h.key()
  t.same((await h.get('/healthz')).json, { status: 'ok' }, '/healthz needs no key')
  const idle = new Agent({ keepAliveTimeout: 60_000 })
  t.teardown(() => idle.close())
  await (await request(`${h.url}/warm`, { headers: bearer(k.key), dispatcher: idle })).body.text()

  const inflight = Array.from({ length: 8 }, (_, i) =>
    request(`${h.url}/slow/${i}`, { headers: bearer(k.key), dispatcher: new Agent() }).then(async (r) => ({ status: r.statusCode, text: await r.body.text() })),
  )
  await sleep(100)
  const started = Date.now()
  const stopped = h.gateway.shutdown(5000)
  await sleep(50)
  const refused = await new Promise<string>((resolve) => {
    const s = net.connect(h.port, '127.0.0.1')
    s.on('connect', () => (s.destroy(), resolve('connected')))
    s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'))
  })
  t.equal(refused, 'ECONNREFUSED', 'no new connections once shutting down')
  const results = await Promise.all(inflight)
  for (const [i, r] of results.entries()) {
    t.equal(r.status, 200, `in-flight request ${i} finished`)
    t.equal(r.text, `done /slow/${i}`)
  }
  await stopped
  t.ok(Date.now() - started < 2000, 'shutdown did not wait for idle keep-alive connections or the deadline')
})

t.test('graceful shutdown: the deadline force-closes what is left', async (t) => {
  const h = await startGateway(t, { upstream: () => {} })
  const k = await h.key()
  const hanging = request(`${h.url}/never`, { headers: bearer(k.key), dispatcher: new Agent() }).then(
    () => 'answered',
    () => 'closed',
  )
  await sleep(100)
  const started = Date.now()
  await h.gateway.shutdown(300)
  t.ok(Date.now() - started < 1500, 'shutdown returned at its deadline')
  t.equal(await hanging, 'closed')
})

t.test('IPv6 listener and clients', async (t) => {
  const probe = http.createServer()
  const ok = await listen(probe, '::1').then(
    () => true,
    () => false,
  )
  probe.close()
  t.ok(ok, 'IPv6 loopback available')
  const h = await startGateway(t, { host: '::1', config: { deny_list: ['::2'] } })
  const k = await h.key({ allowed_cidrs: ['::1/128'] })
  const r = await h.get('/', bearer(k.key))
  t.equal(r.status, 200)
  t.equal(r.json.headers['x-forwarded-for'], '::1')
})
