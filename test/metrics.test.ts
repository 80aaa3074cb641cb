// The gateway's latency histograms count in typed arrays (core/metrics.ts) but must read exactly
// like prom-client's own Histogram: same series, same cumulative buckets, same boundaries (a
// value equal to a bound falls in that bound's bucket), and summed across workers by the
// cluster aggregator like any histogram. The --workers primary's sum keeps a dead worker's
// counters and histograms, not its gauges.
import t from 'tap'
import { AggregatorRegistry, Histogram, Registry } from 'prom-client'
import { answersWithin } from '../core/deadline.ts'
import { ClusterMetrics, type MetricsJson, createGatewayMetrics, createHealthMetrics, createMetricsRegistry, createRedisMetrics, createWorkerRestartMetrics, workerMetrics } from '../core/metrics.ts'
import { unlessHung } from './helpers/gateway.ts'

const NAME = 'keygate_gateway_request_duration_seconds'
// Below the first bound, exactly on bounds, between bounds, above the last, zero.
const VALUES = [0, 0.0001, 0.0005, 0.0007, 0.001, 0.003, 0.0999, 0.1, 0.25, 7, 30, 31, 1000]

/** The lines of one metric family in an exposition. */
const family = (text: string, name: string) =>
  text
    .split('\n')
    .filter((l) => l.startsWith(name) || l.startsWith(`# HELP ${name} `) || l.startsWith(`# TYPE ${name} `))
    .join('\n')

t.test('a route histogram is exposed exactly as prom-client exposes the same observations', async (t) => {
  const ours = new Registry()
  const m = createGatewayMetrics(ours, ['api', 'other'])
  for (const v of VALUES) m.route('api').duration.observe(v)
  m.route('other').duration.observe(0.002)
  // A request cut at the default route timeout (30 s), counted just above it.
  m.route('other').duration.observe(30.4)

  const theirs = new Registry()
  const reference = new Histogram({
    name: NAME,
    help: 'Time from request arrival to the response head being written, by route.',
    labelNames: ['route'],
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers: [theirs],
  })
  for (const route of ['api', 'other', 'none']) reference.zero({ route })
  for (const v of VALUES) reference.observe({ route: 'api' }, v)
  reference.observe({ route: 'other' }, 0.002)
  reference.observe({ route: 'other' }, 30.4)

  const got = family(await ours.metrics(), NAME)
  t.equal(got, family(await theirs.metrics(), NAME))
  t.match(got, /_bucket\{le="0\.0005",route="api"\} 3\n/, 'a value equal to a bound is counted in that bucket')
  t.match(got, /_bucket\{le="\+Inf",route="api"\} 13\n/)
  t.match(got, /_bucket\{le="30",route="other"\} 1\n[^]*_bucket\{le="60",route="other"\} 2\n/, 'a request timed out at the default 30 s has a bucket of its own below +Inf (before, 30 was the last)')
  t.match(got, /_count\{route="none"\} 0/, 'every route has its series from the start')

  ours.resetMetrics()
  t.match(family(await ours.metrics(), NAME), /_count\{route="api"\} 0\n/, 'reset zeroes the series')
})

t.test('the cluster aggregator sums the histograms of two workers', async (t) => {
  const a = new Registry()
  const b = new Registry()
  const ma = createGatewayMetrics(a, ['api'])
  const mb = createGatewayMetrics(b, ['api'])
  ma.route('api').upstream.observe(0.004)
  mb.route('api').upstream.observe(0.004)
  mb.route('api').upstream.observe(2)
  const merged = AggregatorRegistry.aggregate([await a.getMetricsAsJSON(), await b.getMetricsAsJSON()])
  const text = family(await merged.metrics(), 'keygate_upstream_duration_seconds')
  t.match(text, /_bucket\{le="0\.005",route="api"\} 2\n/)
  t.match(text, /_bucket\{le="2\.5",route="api"\} 3\n/)
  t.match(text, /_sum\{route="api"\} 2\.008\n/)
  t.match(text, /_count\{route="api"\} 3/)
})

t.test('store and Redis health are asked at each scrape; one that does not answer in time is down', async (t) => {
  const registry = new Registry()
  let store: () => Promise<unknown> = async () => [{ '?column?': 1 }]
  createHealthMetrics(registry, { store: () => answersWithin(() => store(), 100), redis: () => answersWithin(() => Promise.reject(new Error('ECONNREFUSED')), 100) })
  t.match(await registry.metrics(), /^keygate_store_up 1$/m)
  t.match(await registry.metrics(), /^keygate_redis_up 0$/m, 'a refusal is down')
  store = () => new Promise(() => {}) // a store that holds the query: the scrape still answers
  // A scrape that waited for the probe would not answer at all (the hang guard says so).
  t.match(await unlessHung(registry.metrics()), /^keygate_store_up 0$/m, 'no answer in time is down, and the scrape does not wait for it')
  store = async () => {
    throw new Error('connection terminated')
  }
  t.match(await registry.metrics(), /^keygate_store_up 0$/m)
  // Over --workers, the primary shows the lowest: one worker without its store is a store down.
  const up = new Registry()
  createHealthMetrics(up, { store: async () => true })
  const down = new Registry()
  createHealthMetrics(down, { store: async () => false })
  const summed = await AggregatorRegistry.aggregate([await up.getMetricsAsJSON(), await down.getMetricsAsJSON()]).metrics()
  t.match(summed, /^keygate_store_up 0$/m)
})

t.test("the --workers primary's sum keeps the counters and histograms of a worker that ended, not its gauges", async (t) => {
  const worker = async (forwarded: number, deny: number) => {
    const registry = new Registry()
    const m = createGatewayMetrics(registry, ['api'])
    for (let i = 0; i < forwarded; i++) {
      m.route('api').requests.forwarded.inc()
      m.route('api').duration.observe(0.003)
    }
    m.denyListEntries.set(deny)
    return registry
  }
  const one = await worker(3, 9)
  const two = await worker(4, 5)
  const sum = new ClusterMetrics()
  sum.keep(1, 1, await workerMetrics(one, false))
  const counts = await workerMetrics(two, true)
  t.notOk(counts.some((m) => m.type === 'gauge'), 'a refresh between scrapes reads no gauge')
  sum.keep(2, 2, counts)
  sum.keep(2, 3, await workerMetrics(two, false))
  const forwarded = /^keygate_gateway_requests_total\{route="api",outcome="forwarded"\} (\d+)$/m
  const served = /^keygate_gateway_request_duration_seconds_count\{route="api"\} (\d+)$/m
  const bucket = /^keygate_gateway_request_duration_seconds_bucket\{le="0\.005",route="api"\} (\d+)$/m
  const read = async (answers: Map<number, MetricsJson>) => {
    const text = await sum.sum(answers).metrics()
    return { forwarded: Number(forwarded.exec(text)?.[1]), served: Number(served.exec(text)?.[1]), bucket: Number(bucket.exec(text)?.[1]), deny: /^keygate_deny_list_entries (\d+)$/m.exec(text)?.[1], help: text.includes('# TYPE keygate_gateway_requests_total counter') }
  }
  t.same(await read(new Map([[1, await workerMetrics(one, false)], [2, await workerMetrics(two, false)]])), { forwarded: 7, served: 7, bucket: 7, deny: '9', help: true })

  // Worker 1 is read again between scrapes (5 by then); an answer to an earlier request arrives
  // after that one; then it is killed.
  sum.keep(1, 5, await workerMetrics(await worker(5, 5), true))
  sum.keep(1, 4, await workerMetrics(await worker(99, 5), true))
  sum.depart(1)
  // Its replacement, worker 3, starts from 0 and holds the deny list too.
  const three = await worker(0, 6)
  sum.keep(3, 6, await workerMetrics(three, false))
  t.same(
    await read(new Map([[2, await workerMetrics(two, false)], [3, await workerMetrics(three, false)]])),
    { forwarded: 9, served: 9, bucket: 9, deny: '6', help: true },
    "the dead worker's last-read counts stay in (an older answer arriving late replaced nothing); its gauge is gone",
  )
  sum.depart(2)
  sum.depart(3)
  t.same(await read(new Map()), { forwarded: 9, served: 9, bucket: 9, deny: undefined, help: true }, 'with every worker gone, the counts are still the sum')

  // Worker 4 stops gracefully: its last message (8, its drain included) stands, an answer to a
  // refresh asked before it and arriving after replaces nothing, and nothing of it is kept again
  // once it has departed (found by a review: the primary dropped that last message).
  sum.keep(4, 7, await workerMetrics(await worker(5, 5), true))
  sum.last(4, await workerMetrics(await worker(8, 5), true))
  sum.keep(4, 8, await workerMetrics(await worker(6, 5), true))
  t.same(await read(new Map()), { forwarded: 17, served: 17, bucket: 17, deny: undefined, help: true }, 'its counts as it stopped')
  sum.depart(4)
  sum.last(4, await workerMetrics(await worker(8, 5), true))
  sum.keep(4, 9, await workerMetrics(await worker(8, 5), true))
  t.same(await read(new Map([[4, await workerMetrics(await worker(8, 5), false)]])), { forwarded: 17, served: 17, bucket: 17, deny: undefined, help: true }, 'counted once')
})

t.test('over --workers, file descriptors and the start time are the highest and the earliest of the processes, not their sum', async (t) => {
  // Before (found by a review): keygate_process_max_fds was summed (80000 for four workers at
  // ulimit 20000), so open_fds / max_fds could never fire, and the start time was left out.
  const one = createMetricsRegistry()
  const read = async (text: string, name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1])
  const alone = await one.metrics()
  const maxFds = await read(alone, 'keygate_process_max_fds')
  t.ok(maxFds > 0, 'a process reports its limit')
  // Three processes' answers, as the primary aggregates them (the same registry read three times).
  const summed = await AggregatorRegistry.aggregate(await Promise.all([one, one, one].map((r) => r.getMetricsAsJSON()))).metrics()
  t.equal(await read(summed, 'keygate_process_max_fds'), maxFds, "one process's limit")
  // The three reads may differ by a descriptor or two; their sum would be three times as many.
  t.ok((await read(summed, 'keygate_process_open_fds')) < 2 * (await read(alone, 'keygate_process_open_fds')), 'the open descriptors of the process nearest its limit, not their sum')
  t.equal(await read(summed, 'keygate_process_start_time_seconds'), await read(alone, 'keygate_process_start_time_seconds'), 'the earliest start time')
})

t.test("names follow Prometheus's conventions: a counter's ends in _total, no other metric's does (promtool check metrics; found by a review)", async (t) => {
  // Every metric family keygate exposes: Node's process metrics, the gateway's, the health gauges,
  // Redis's, the lockout's (an admin API's) and the --workers primary's restarts.
  const registry = createMetricsRegistry()
  createGatewayMetrics(registry, ['api', 'orders'])
  createRedisMetrics(registry)
  createWorkerRestartMetrics(registry)
  createHealthMetrics(registry, { store: async () => true })
  // An --only admin process's keygate_redis_up is the health gauge's (createRedisMetrics' is the gateway's).
  const admin = createMetricsRegistry({ defaultMetrics: false })
  createHealthMetrics(admin, { store: async () => true, redis: async () => true })
  const text = (await registry.metrics()) + (await admin.metrics())
  const types = [...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((m) => ({ name: m[1] as string, type: m[2] as string }))
  t.ok(types.length > 30, `${types.length} families`)
  for (const { name, type } of types) {
    t.ok(name.startsWith('keygate_'), `${name}: keygate's prefix`)
    if (type === 'counter') t.ok(name.endsWith('_total'), `${name}: a counter ends in _total`)
    else t.notOk(name.endsWith('_total'), `${name}: a ${type} does not end in _total`)
  }
  // Node's handle, request and resource counts are still there, by type (their _total gauges were the sums).
  for (const name of ['keygate_nodejs_active_handles', 'keygate_nodejs_active_requests', 'keygate_nodejs_active_resources']) t.ok(types.some((f) => f.name === name), `${name} stays`)
})

t.test('a scrape right after another, with no event-loop delay sampled between, repeats the last delays: no NaN (found by a review)', async (t) => {
  const registry = createMetricsRegistry()
  await new Promise((resolve) => setTimeout(resolve, 50))
  const lag = (text: string) => [...text.matchAll(/^keygate_nodejs_eventloop_lag_(\w+)_seconds (\S+)$/gm)].map((m) => `${m[1]} ${m[2]}`)
  const first = lag(await registry.metrics())
  // Within one turn of the event loop: the 10 ms sampler cannot have run in between.
  const second = lag(await registry.metrics())
  t.equal(first.length, 7, 'min, max, mean, stddev, p50, p90, p99')
  t.ok(first.every((l) => Number.isFinite(Number(l.split(' ')[1]))), `delays sampled: ${first.join(', ')}`)
  t.same(second, first, "before, prom-client's mean and stddev were `Nan`, its min 9223372036")
})
