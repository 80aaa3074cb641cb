// The baseline: a bare reverse proxy on undici with no checks at all — what keygate costs is
// measured against this, in the same run. With --contract-headers it also sets the headers SPEC
// §3 has keygate set (X-Forwarded-Proto/-Host, the four X-Keygate-* identity headers and
// X-Request-Id upstream; X-Request-Id and RateLimit-* to the client), with values of keygate's
// lengths, so bench/instructions.ts can tell what the contract's headers cost from what
// keygate's checks cost.
import http from 'node:http'
import { Pool } from 'undici'

const upstream = process.argv[2] as string
const contractHeaders = process.argv.includes('--contract-headers')
const pool = new Pool(upstream, { connections: 128, pipelining: 1, keepAliveTimeout: 60_000 })
let n = 0

const server = http.createServer((req, res) => {
  const id = contractHeaders ? `Xq3vK9pA-${(++n).toString(36)}` : ''
  const headers = contractHeaders
    ? { ...req.headers, 'x-forwarded-proto': 'http', 'x-forwarded-host': req.headers.host ?? '', 'x-keygate-key-id': 'AbCdEfGhIjKl', 'x-keygate-key-name': 'bench', 'x-keygate-key-type': 'service', 'x-keygate-scopes': 'bench', 'x-request-id': id }
    : req.headers
  pool.request({ method: req.method as 'GET', path: req.url ?? '/', headers: headers as Record<string, string>, body: req.method === 'GET' || req.method === 'HEAD' ? null : req }).then(
    (up) => {
      const out = contractHeaders ? { ...up.headers, 'x-request-id': id, 'ratelimit-limit': '1000000000', 'ratelimit-remaining': '999999999', 'ratelimit-reset': '1' } : up.headers
      res.writeHead(up.statusCode, out as http.OutgoingHttpHeaders)
      up.body.pipe(res)
    },
    () => {
      res.writeHead(502)
      res.end()
    },
  )
})
server.keepAliveTimeout = 60_000
server.listen(0, '127.0.0.1', () => {
  const a = server.address() as import('node:net').AddressInfo
  process.send?.({ port: a.port })
})
process.on('SIGTERM', () => process.exit(0))
