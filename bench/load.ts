// One load run in its own process (so the load generator never shares an event loop with the
// server measured): autocannon against a URL, results as JSON on stdout.
import autocannon from 'autocannon'

const [url, seconds, connections, headersJson] = process.argv.slice(2)
const result = await autocannon({
  url: url as string,
  duration: Number(seconds),
  connections: Number(connections),
  pipelining: 1,
  headers: JSON.parse(headersJson ?? '{}') as Record<string, string>,
})
process.stdout.write(
  JSON.stringify({
    rps: result.requests.average,
    p50: result.latency.p50,
    p99: result.latency.p99,
    total: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    statusCodes: (result as unknown as { statusCodeStats?: Record<string, { count: number }> }).statusCodeStats ?? {},
  }) + '\n',
)
