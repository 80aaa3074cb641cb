// One load run in its own process, so the load generator never shares an event loop with the
// server it measures. autocannon drives the load; latencies are taken from its per-response
// event (float milliseconds, every status) rather than its own histogram, which has 1 ms
// resolution and counts 2xx answers only. Prints one JSON line.
import autocannon from 'autocannon'

interface Args {
  url: string
  seconds: number
  connections: number
  headers: Record<string, string>
  /** Requests per second across all connections; 0 for as fast as the server answers. */
  rate: number
}

const args = JSON.parse(process.argv[2] ?? '{}') as Args
const samples = new Float64Array(4_000_000)
let n = 0
const statuses: Record<string, number> = {}

// From here on (start-up and module loading are not the load's).
const cpuAtStart = process.cpuUsage()
const instance = (autocannon as unknown as (o: autocannon.Options) => Promise<autocannon.Result> & NodeJS.EventEmitter)({
  url: args.url,
  duration: args.seconds,
  connections: args.connections,
  pipelining: 1,
  headers: args.headers,
  ...(args.rate > 0 ? { overallRate: args.rate } : {}),
})
instance.on('response', (_client: unknown, statusCode: number, _bytes: number, responseTime: number) => {
  if (n < samples.length) samples[n++] = responseTime
  statuses[statusCode] = (statuses[statusCode] ?? 0) + 1
})
const result = await instance
const sorted = samples.subarray(0, n).sort()
const pct = (p: number) => (n === 0 ? NaN : (sorted[Math.min(n - 1, Math.floor((p / 100) * n))] as number))
process.stdout.write(
  JSON.stringify({
    rps: result.requests.average,
    total: result.requests.total,
    p50: pct(50),
    p99: pct(99),
    errors: result.errors,
    timeouts: result.timeouts,
    statuses,
    // The load generator's own CPU (seconds): on a machine it shares, it is part of what req/s measures.
    cpu: ((u) => (u.user + u.system) / 1e6)(process.cpuUsage(cpuAtStart)),
  }) + '\n',
)
