// A proxy left out of gateway.trusted_proxies: every client behind it counts as the proxy, and a
// few bad keys from any of them lock out all. Before, nothing said so; now the gateway warns, at
// most once an hour, of a loopback or private peer whose requests name a client in a proxy's header.
import t from 'tap'
import { Agent, request } from 'undici'
import { createLogger } from '../core/log.ts'
import { createClientAddressStage, untrustedProxyWarner } from '../gateway/client-address.ts'
import type { RequestState } from '../gateway/state.ts'
import { bearer, startGateway } from './helpers/gateway.ts'

interface Line {
  level: string
  message: string
  peer?: string
  header?: string
}

function capture(): { log: ReturnType<typeof createLogger>; warnings: () => Line[] } {
  const lines: Line[] = []
  const log = createLogger({ level: 'debug', write: (l) => lines.push(JSON.parse(l) as Line) })
  return { log, warnings: () => lines.filter((l) => l.level === 'warn' && l.message.includes('trusted_proxies')) }
}

t.test('a loopback peer sending X-Forwarded-For, not in trusted_proxies: warned once an hour, naming it and what to set', async (t) => {
  const { log, warnings } = capture()
  const h = await startGateway(t, { sharedStore: true, log })
  const k = await h.key()
  t.equal((await h.get('/', bearer(k.key))).status, 200, 'a request without a proxy header')
  t.same(warnings(), [], 'no warning without a proxy header')
  // A new connection: the first request of each is looked at.
  const fresh = new Agent({ keepAliveTimeout: 1000 })
  t.teardown(() => fresh.close())
  const res = await request(h.url + '/', { headers: { ...bearer(k.key), 'x-forwarded-for': '198.51.100.7' }, dispatcher: fresh })
  t.equal(res.statusCode, 200, 'the request is served as before: the peer is the client')
  await res.body.dump()
  const [first, ...more] = warnings()
  t.same(more, [], 'one warning')
  t.match(first, { peer: '127.0.0.1', header: 'X-Forwarded-For' })
  t.match(first?.message, /127\.0\.0\.1 is not in gateway\.trusted_proxies.*every client behind it as 127\.0\.0\.1.*KEYGATE_TRUSTED_PROXIES/)
  // More connections and requests within the hour: still one.
  for (let i = 0; i < 3; i++) {
    const other = new Agent({ keepAliveTimeout: 1000 })
    const r = await request(h.url + '/', { headers: { ...bearer(k.key), 'x-forwarded-for': '198.51.100.8' }, dispatcher: other })
    await r.body.dump()
    await other.close()
  }
  t.equal(warnings().length, 1, 'not again within the hour')
})

t.test('a peer in trusted_proxies is not warned of; one outside them is, for Forwarded too', async (t) => {
  const trusted = capture()
  const h = await startGateway(t, { sharedStore: true, log: trusted.log, config: { gateway: { trusted_proxies: ['127.0.0.1'] } } })
  const k = await h.key()
  t.equal((await h.get('/', { ...bearer(k.key), 'x-forwarded-for': '198.51.100.7' })).status, 200)
  t.same(trusted.warnings(), [], 'a trusted proxy: no warning')

  const other = capture()
  const h2 = await startGateway(t, { sharedStore: true, log: other.log, config: { gateway: { trusted_proxies: ['10.0.0.0/8'] } } })
  const k2 = await h2.key()
  t.equal((await h2.get('/', { ...bearer(k2.key), forwarded: 'for=198.51.100.7' })).status, 200)
  t.same(other.warnings().map((l) => [l.peer, l.header]), [['127.0.0.1', 'Forwarded']], 'a proxy outside the listed ranges: warned')
})

t.test('which peers: loopback and private ranges are, a public address is not (a client passing its own hops along)', async (t) => {
  const told: Array<[string, string]> = []
  const stage = createClientAddressStage({ trustedProxies: [], ipv6PrefixBits: 64, onUntrustedProxy: (peer, header) => told.push([peer, header]) })
  const run = (remoteAddress: string, headers: Record<string, string>) => {
    const s = { req: { socket: { remoteAddress }, headers } } as unknown as RequestState
    t.equal(stage(s), undefined, `${remoteAddress}: served`)
    return s
  }
  for (const peer of ['127.0.0.1', '10.1.2.3', '172.16.0.9', '192.168.1.1', '100.64.0.1', '::1', 'fd00::7', 'fe80::1', '::ffff:10.0.0.1']) run(peer, { 'x-real-ip': '198.51.100.7' })
  for (const peer of ['198.51.100.1', '2001:db8::1', '8.8.8.8']) run(peer, { 'x-forwarded-for': '203.0.113.9' })
  t.same(told, [
    ['127.0.0.1', 'X-Real-IP'], ['10.1.2.3', 'X-Real-IP'], ['172.16.0.9', 'X-Real-IP'], ['192.168.1.1', 'X-Real-IP'], ['100.64.0.1', 'X-Real-IP'],
    ['::1', 'X-Real-IP'], ['fd00::7', 'X-Real-IP'], ['fe80::1', 'X-Real-IP'], ['10.0.0.1', 'X-Real-IP'],
  ], 'each private peer told, by its normal spelling; no public one')
  // Once per connection: the socket remembers it was looked at.
  const socket = { remoteAddress: '10.9.9.9' }
  for (let i = 0; i < 3; i++) stage({ req: { socket, headers: { 'x-forwarded-for': '203.0.113.9' } } } as unknown as RequestState)
  t.equal(told.filter(([p]) => p === '10.9.9.9').length, 1, 'a connection is looked at on its first request only')
})

t.test('the warner: once an hour by the clock it is given', async (t) => {
  let now = 0
  const lines: string[] = []
  const warn = untrustedProxyWarner(createLogger({ write: (l) => lines.push(l) }), () => now)
  warn('127.0.0.1', 'X-Forwarded-For')
  now = 3_599_999
  warn('10.0.0.1', 'X-Forwarded-For')
  t.equal(lines.length, 1, 'not within the hour')
  now = 3_600_000
  warn('10.0.0.1', 'Forwarded')
  t.equal(lines.length, 2, 'again after it')
  t.match(JSON.parse(lines[1] as string), { level: 'warn', peer: '10.0.0.1', header: 'Forwarded' })
})
