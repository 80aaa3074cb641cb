// The baseline: a bare reverse proxy on undici with no checks at all — what keygate costs is
// measured against this, in the same run.
import http from 'node:http'
import { Pool } from 'undici'

const upstream = process.argv[2] as string
const pool = new Pool(upstream, { connections: 128, pipelining: 1, keepAliveTimeout: 60_000 })

const server = http.createServer((req, res) => {
  pool.request({ method: req.method as 'GET', path: req.url ?? '/', headers: req.headers as Record<string, string>, body: req.method === 'GET' || req.method === 'HEAD' ? null : req }).then(
    (up) => {
      res.writeHead(up.statusCode, up.headers as http.OutgoingHttpHeaders)
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
