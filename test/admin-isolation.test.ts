// No admin route is reachable through the gateway port: admin paths, dot segments (plain,
// percent-encoded, backslashed), absolute-form targets and Host headers naming the admin
// listener, CONNECT. Each is refused by the gateway or forwarded to the gateway's own upstream;
// the admin listener receives nothing, and no answer carries admin data.
import t from 'tap'
import net from 'node:net'
import { silentLogger } from '../core/log.ts'
import { createGatewayMetrics, createMetricsRegistry } from '../core/metrics.ts'
import { createGateway } from '../gateway/index.ts'
import { startAdmin } from './helpers/admin.ts'
import { listen, makeConfig } from './helpers/gateway.ts'
import { openStore } from './helpers/stores.ts'

function send(port: number, text: string): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(text))
    let out = ''
    socket.setEncoding('latin1')
    socket.on('data', (d: string) => (out += d))
    socket.on('close', () => resolve(out))
    socket.on('error', () => {})
    socket.setTimeout(3000, () => socket.destroy())
  })
}

t.test('admin routes are not reachable through the gateway', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db, { gateway: true })
  const gw = h.gateway!
  const admin = `127.0.0.1:${h.port}`
  const auth = `Authorization: Bearer ${h.adminKey}\r\n`
  const targets: Array<[string, string]> = [
    ['admin path', `GET /v1/keys HTTP/1.1\r\nHost: 127.0.0.1:${gw.port}\r\n`],
    ['admin path, POST', `POST /v1/keys HTTP/1.1\r\nHost: 127.0.0.1:${gw.port}\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n{"name":"x","type":"system"}\n`],
    ['OpenAPI document', `GET /openapi.json HTTP/1.1\r\nHost: a\r\n`],
    ['docs', `GET /docs HTTP/1.1\r\nHost: a\r\n`],
    ['readiness', `GET /readyz HTTP/1.1\r\nHost: a\r\n`],
    ['metrics', `GET /metrics HTTP/1.1\r\nHost: a\r\n`],
    ['dot segments', `GET /admin/../v1/keys HTTP/1.1\r\nHost: a\r\n`],
    ['encoded slash after dots', `GET /api/..%2fv1/keys HTTP/1.1\r\nHost: a\r\n`],
    ['encoded dots', `GET /api/%2e%2e/v1/keys HTTP/1.1\r\nHost: a\r\n`],
    ['encoded dots and slash', `GET /api/%2e%2e%2fv1/keys HTTP/1.1\r\nHost: a\r\n`],
    ['backslash dots', `GET /api\\..\\v1/keys HTTP/1.1\r\nHost: a\r\n`],
    ['double slash authority', `GET //${admin}/v1/keys HTTP/1.1\r\nHost: a\r\n`],
    ['absolute-form to the admin listener', `GET http://${admin}/v1/keys HTTP/1.1\r\nHost: 127.0.0.1:${gw.port}\r\n`],
    ['absolute-form and Host both naming the admin listener', `GET http://${admin}/v1/keys HTTP/1.1\r\nHost: ${admin}\r\n`],
    ['Host naming the admin listener', `GET /v1/keys HTTP/1.1\r\nHost: ${admin}\r\n`],
    ['X-Forwarded-Host naming the admin listener', `GET /v1/keys HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: ${admin}\r\n`],
    ['two Host headers', `GET /v1/keys HTTP/1.1\r\nHost: a\r\nHost: ${admin}\r\n`],
    ['CONNECT to the admin listener', `CONNECT ${admin} HTTP/1.1\r\nHost: ${admin}\r\n`],
    ['WebSocket upgrade to an admin path', `GET /v1/keys HTTP/1.1\r\nHost: ${admin}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n`],
  ]
  for (const [name, head] of targets) {
    const request = head.includes('\r\n\r\n') ? head.replace('\r\n\r\n', `\r\n${auth}Connection: close\r\n\r\n`) : `${head}${auth}Connection: close\r\n\r\n`
    const out = await send(gw.port, request)
    const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(out)?.[1])
    const body = out.slice(out.indexOf('\r\n\r\n') + 4)
    const fromUpstream = /"bodyBytes":\d+/.test(body)
    t.ok((status >= 400 && /"error":\{"code":"[a-z_]+"/.test(body)) || (status !== 101 && fromUpstream), `${name}: refused by the gateway or answered by its upstream (${status})`)
    t.notMatch(body, /"next_cursor"|"openapi"|swagger-ui|keygate_gateway_requests_total|"status":"ready"/, `${name}: no admin answer`)
  }
  t.same(h.requests, [], 'the admin listener received nothing')
  t.ok(gw.upstream.received.every((r) => !r.headers.authorization), 'the admin credential was never passed upstream')
  t.equal((await h.call('GET', '/v1/stats')).status, 200, 'the admin listener itself answers')
})

t.test('a gateway without a route to forward to answers route_not_found for admin paths', async (t) => {
  const store = await openStore(t, 'embedded')
  const plain = await startAdmin(t, store.db)
  // The admin API's own services, and a gateway with no routes at all.
  const config = makeConfig({ routes: [] })
  const gateway = await createGateway({ config, keys: plain.keys, db: store.db, log: silentLogger, metrics: createGatewayMetrics(createMetricsRegistry({ defaultMetrics: false }), []), denyList: plain.denyList, lockout: plain.lockout })
  const port = await listen(gateway.server)
  t.teardown(() => gateway.shutdown(500))
  for (const path of ['/v1/keys', '/v1/stats', '/openapi.json', '/docs']) {
    const out = await send(port, `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1:${plain.port}\r\nAuthorization: Bearer ${plain.adminKey}\r\nConnection: close\r\n\r\n`)
    t.match(out, /^HTTP\/1\.1 404/, `${path}: 404`)
    t.match(out, /"code":"route_not_found"/)
  }
  t.same(plain.requests, [], 'the admin listener received nothing')
})
