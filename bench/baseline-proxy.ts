// The baseline: a bare reverse proxy on undici with no checks at all — what keygate costs is
// measured against this, in the same run. It forwards as keygate's gateway/forward.ts does, with
// `pool.dispatch` and a handler writing the upstream's chunks straight into the response, and
// the same Pool settings: keygate's checks are measured, not its forwarding technique. (Before,
// it used `pool.request` and piped the body, which costs per request what keygate's forwarder
// was written to avoid, and flattered keygate's ratios by some 12 to 16 % of CPU per request;
// found by a review.) With --contract-headers it also sets the headers SPEC §3 has keygate set
// (X-Forwarded-Proto/-Host, the four X-Keygate-* identity headers and X-Request-Id upstream;
// X-Request-Id and RateLimit-* to the client), with values of keygate's lengths, so
// bench/instructions.ts can tell what the contract's headers cost from what keygate's checks cost.
import http from 'node:http'
import { Pool, type Dispatcher } from 'undici'

const upstream = process.argv[2] as string
const contractHeaders = process.argv.includes('--contract-headers')
const pool = new Pool(upstream, { connections: 128, pipelining: 1, keepAliveTimeout: 60_000 })
let n = 0

class Exchange implements Dispatcher.DispatchHandler {
  readonly #res: http.ServerResponse
  readonly #id: string
  #controller: Dispatcher.DispatchController | undefined

  constructor(res: http.ServerResponse, id: string) {
    this.#res = res
    this.#id = id
    // A client gone before the end (the load generator closes its connections at the end of each
    // slice) aborts the upstream request: paused on a 'drain' that never comes, it would hold its
    // pool connection for ever, and after a few slices the pool would have none left.
    res.once('close', () => {
      if (!res.writableFinished) this.#controller?.abort(new Error('the client went away'))
    })
  }

  onRequestStart(c: Dispatcher.DispatchController): void {
    this.#controller = c
  }

  onResponseStart(_c: Dispatcher.DispatchController, status: number, headers: Record<string, string | string[] | undefined>): void {
    const out = contractHeaders ? { ...headers, 'x-request-id': this.#id, 'ratelimit-limit': '1000000000', 'ratelimit-remaining': '999999999', 'ratelimit-reset': '1' } : headers
    this.#res.writeHead(status, out as http.OutgoingHttpHeaders)
  }

  onResponseData(c: Dispatcher.DispatchController, chunk: Buffer): void {
    if (!this.#res.write(chunk)) {
      c.pause()
      this.#res.once('drain', () => c.resume())
    }
  }

  onResponseEnd(): void {
    this.#res.end()
  }

  onResponseError(): void {
    if (!this.#res.headersSent) this.#res.writeHead(502)
    this.#res.end()
  }
}

const server = http.createServer((req, res) => {
  const id = contractHeaders ? `Xq3vK9pA-${(++n).toString(36)}` : ''
  const headers = contractHeaders
    ? { ...req.headers, 'x-forwarded-proto': 'http', 'x-forwarded-host': req.headers.host ?? '', 'x-keygate-key-id': 'AbCdEfGhIjKl', 'x-keygate-key-name': 'bench', 'x-keygate-key-type': 'service', 'x-keygate-scopes': 'bench', 'x-request-id': id }
    : req.headers
  pool.dispatch(
    { method: req.method as Dispatcher.HttpMethod, path: req.url ?? '/', headers: headers as Record<string, string>, body: req.method === 'GET' || req.method === 'HEAD' ? null : req },
    new Exchange(res, id),
  )
})
server.keepAliveTimeout = 60_000
server.listen(0, '127.0.0.1', () => {
  const a = server.address() as import('node:net').AddressInfo
  process.send?.({ port: a.port })
})
process.on('SIGTERM', () => process.exit(0))
