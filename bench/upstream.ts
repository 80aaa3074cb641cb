// The benchmark's upstream: a fixed small response, keep-alive, as cheap as node:http allows.
import http from 'node:http'

const body = Buffer.from('{"ok":true}')
const server = http.createServer((req, res) => {
  req.resume()
  res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length })
  res.end(body)
})
server.keepAliveTimeout = 60_000
server.listen(0, '127.0.0.1', () => {
  const a = server.address() as import('node:net').AddressInfo
  process.send?.({ port: a.port })
})
process.on('SIGTERM', () => process.exit(0))
