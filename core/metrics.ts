// Prometheus metrics. Every metric and every label child the gateway touches is created here at
// start-up, so the request path only calls inc()/observe() on objects it already holds, and the
// label values are a closed set (route names from the config, outcome and reason words): no key
// material, no addresses, nothing a client can make grow.
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { type Aggregator, AggregatorRegistry, Counter, Gauge, Registry, aggregators, collectDefaultMetrics, type Metric } from 'prom-client'
import { NO_ROUTE } from './http.ts'
import { LOG_BACKLOG_MAX_CHARS, logLinesDropped } from './log.ts'
import { ANOMALY_TYPES, type AnomalyType } from './anomalies.ts'
import type { FlushReason } from './invalidation.ts'

/**
 * What became of a gateway request: forwarded, the error code it was answered with,
 * `client_closed` (the client went away before the answer's head was written: nginx's 499), or
 * `cut_at_shutdown` (the gateway ended its connection unanswered at the shutdown deadline).
 */
export const GATEWAY_OUTCOMES = [
  'forwarded',
  'client_closed',
  'cut_at_shutdown',
  'key_missing',
  'key_invalid',
  'key_expired',
  'key_revoked',
  'ip_blocked',
  'scope_denied',
  'route_not_found',
  'rate_limited',
  'ip_locked_out',
  'upstream_unavailable',
  'upstream_timeout',
  'store_unavailable',
  'shutting_down',
  'bad_request',
  'headers_too_large',
  'method_not_allowed',
  'request_timeout',
  'expectation_failed',
  'transfer_coding_not_supported',
  'version_not_supported',
  'internal_error',
] as const
export type GatewayOutcome = (typeof GATEWAY_OUTCOMES)[number]

/** Why a presented key was refused (for metrics and logs only; never in a response by default). */
export const BAD_KEY_REASONS = ['malformed', 'unknown', 'wrong_secret', 'revoked', 'expired', 'grace_ended', 'address_not_bound'] as const
export type BadKeyReason = (typeof BAD_KEY_REASONS)[number]

/** Label value for requests that never reached a route (no route may be named so: config/load.ts). */
export { NO_ROUTE }

// Past 30 s too (found by an SRE review): a request cut at the default routes[].timeout_ms of 30 s
// lands just above it, and fell in +Inf alone, beside any far longer one.
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

type CounterChild = Counter.Internal

/** What the request path increments. */
export interface Increment {
  inc(): void
}

/** Counts nothing: the place of a status below 100 among the classes. */
const NOTHING: Increment = Object.freeze({ inc() {} })

/**
 * A counter series the request path increments as a plain number; the count is added to its
 * prom-client child when the metrics are collected (a scrape, or a worker's report to the
 * primary), so a request pays a field increment instead of prom-client's label hashing.
 */
class Tally implements Increment {
  n = 0
  readonly #child: CounterChild

  constructor(child: CounterChild) {
    this.#child = zeroed(child)
  }

  inc(): void {
    this.n++
  }

  flush(): void {
    if (this.n === 0) return
    this.#child.inc(this.n)
    this.n = 0
  }
}

/** A Counter whose series are Tallies, folded in by its collect hook. */
function talliedCounter(options: { name: string; help: string; labelNames: string[]; registers: Registry[] }): { tally: (...labels: string[]) => Tally } {
  const tallies: Tally[] = []
  const counter = new Counter({
    ...options,
    collect() {
      for (const t of tallies) t.flush()
    },
  })
  return {
    tally: (...labels) => {
      const t = new Tally(counter.labels(...labels))
      tallies.push(t)
      return t
    },
  }
}

/** What the request path observes a latency (in seconds) into. */
export interface Observe {
  observe(value: number): void
}

/** One series of a RouteHistogram: counts per bucket (the last is +Inf), sum and count, as plain numbers. */
class HistogramSeries implements Observe {
  readonly route: string
  readonly counts: Float64Array
  sum = 0
  count = 0
  readonly #bounds: readonly number[]

  constructor(route: string, bounds: readonly number[]) {
    this.route = route
    this.#bounds = bounds
    this.counts = new Float64Array(bounds.length + 1)
  }

  observe(value: number): void {
    const bounds = this.#bounds
    let i = 0
    while (i < bounds.length && value > (bounds[i] as number)) i++
    this.counts[i] = (this.counts[i] as number) + 1
    this.sum += value
    this.count++
  }
}

/**
 * A histogram labelled by route whose series count in typed arrays, registered in the
 * prom-client registry and exported in the very format of prom-client's Histogram (cumulative
 * `_bucket` series with `le`, `_sum`, `_count`; summed across `--workers` like any histogram).
 * prom-client's own observe() hashes the labels and turns the bucket bound into a property
 * name on every call: two observations per request were about 2% of the gateway's CPU.
 */
class RouteHistogram {
  readonly type = 'histogram'
  readonly aggregator = 'sum'
  readonly name: string
  readonly help: string
  readonly buckets: readonly number[]
  readonly #series: HistogramSeries[] = []

  constructor(name: string, help: string, buckets: readonly number[], registry: Registry) {
    this.name = name
    this.help = help
    this.buckets = buckets
    // The registry reads name, help, type, aggregator, get() and reset(): the metric interface
    // every prom-client metric implements.
    registry.registerMetric(this as unknown as Metric)
  }

  series(route: string): HistogramSeries {
    const s = new HistogramSeries(route, this.buckets)
    this.#series.push(s)
    return s
  }

  async get(): Promise<{ name: string; help: string; type: 'histogram'; aggregator: 'sum'; values: Array<{ labels: Record<string, string | number>; value: number; metricName: string }> }> {
    const values: Array<{ labels: Record<string, string | number>; value: number; metricName: string }> = []
    const bucket = `${this.name}_bucket`
    for (const s of this.#series) {
      let acc = 0
      for (let i = 0; i < this.buckets.length; i++) {
        acc += s.counts[i] as number
        values.push({ labels: { le: this.buckets[i] as number, route: s.route }, value: acc, metricName: bucket })
      }
      values.push({ labels: { le: '+Inf', route: s.route }, value: s.count, metricName: bucket })
      values.push({ labels: { route: s.route }, value: s.sum, metricName: `${this.name}_sum` })
      values.push({ labels: { route: s.route }, value: s.count, metricName: `${this.name}_count` })
    }
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values }
  }

  reset(): void {
    for (const s of this.#series) {
      s.counts.fill(0)
      s.sum = 0
      s.count = 0
    }
  }
}

export interface RouteMetrics {
  requests: Readonly<Record<GatewayOutcome, Increment>>
  /** Request arrival to response head written. */
  duration: Observe
  /** Upstream dispatch to upstream response head. */
  upstream: Observe
  /** Answers whose upstream response broke off after their head was passed on (counted `forwarded` at the head). */
  cutOff: Increment
  /** Requests sent upstream again after their connection closed before any answer (forward.ts, Exchange.onResponseError). */
  retried: Increment
  /** Upstream final response heads (and an upgrade's 101) by status class, at `Math.floor(status / 100)` (1 to 5; a 103 is not counted). */
  upstreamStatus: readonly Increment[]
}

/** The upstream status classes counted, by `Math.floor(status / 100)`. */
const STATUS_CLASSES = ['1xx', '2xx', '3xx', '4xx', '5xx'] as const

export interface GatewayMetrics {
  readonly registry: Registry
  /** Pre-created children of a route (or NO_ROUTE); unknown names get the NO_ROUTE children. */
  route(name: string): RouteMetrics
  readonly cache: { hit: Increment; miss: Increment; negativeHit: Increment }
  readonly rateLimited: { address: Increment; key: Increment }
  /** Requests answered ip_locked_out. */
  readonly lockedOutRequests: Counter
  /** Addresses that reached the failed-attempt limit. */
  readonly lockouts: Counter
  /** Lockouts still in force that the memory mirror dropped for newer ones. */
  readonly lockoutsForgotten: Counter
  readonly badKeys: Readonly<Record<BadKeyReason, Increment>>
  readonly denyListEntries: Gauge
  /** Where `keygate_key_cache_entries` reads the validation cache's sizes at each scrape (the gateway sets it once its cache is made). */
  cacheEntries: (() => { positive: number; negative: number }) | undefined
  readonly storeErrors: { lookup: CounterChild; denyList: CounterChild }
  /** Anomalies this process recorded (the instance whose insert made the row), by type. */
  readonly anomalies: Readonly<Record<AnomalyType, CounterChild>>
  /** Client connections closed as they were accepted, the gateway holding gateway.max_connections. */
  readonly connectionsRefused: Counter
  /** The gateway's cap on client connections (absent while there is none). */
  readonly connectionsMax: Gauge
  /** Where `keygate_gateway_connections` reads the gateway's open client connections at each scrape (the gateway sets it once its server is made). */
  openConnections: (() => Promise<number>) | undefined
  /** Where `keygate_gateway_tunnels` reads the route of each WebSocket tunnel open at a scrape (the gateway sets it). */
  openTunnels: (() => Iterable<string>) | undefined
}

// A series exists (at 0) from start-up, so rates and alerts work before the first event.
function zeroed(child: CounterChild): CounterChild {
  child.inc(0)
  return child
}

export interface RedisMetrics {
  /** 1 while rate limits and lockouts are shared through Redis, 0 while the insurance limiter answers. */
  readonly up: Gauge
  /** Switches to the insurance limiter. */
  readonly fallbacks: Counter
  /** Whole-cache flushes because invalidations may have been missed, by reason. */
  readonly flushes: Readonly<Record<FlushReason, CounterChild>>
}

/** The Redis metrics of a process that has Redis configured. */
export function createRedisMetrics(registry: Registry): RedisMetrics {
  const registers = [registry]
  // Under --workers the primary adds the workers' metrics up; a gauge of state is not a count.
  const up = new Gauge({ name: 'keygate_redis_up', help: '1 while rate limits and lockouts are shared through Redis, 0 while this process counts them itself.', registers, aggregator: 'min' })
  const fallbacks = new Counter({ name: 'keygate_redis_fallback_total', help: 'Switches from Redis to the in-memory insurance limiter.', registers })
  fallbacks.inc(0)
  const flushes = new Counter({
    name: 'keygate_invalidation_flushes_total',
    help: 'Validation cache flushes because invalidation messages may have been missed (subscriber reconnected, version gap, counter ahead, counter reset).',
    labelNames: ['reason'],
    registers,
  })
  return { up, fallbacks, flushes: { reconnect: zeroed(flushes.labels('reconnect')), gap: zeroed(flushes.labels('gap')), missed: zeroed(flushes.labels('missed')), reset: zeroed(flushes.labels('reset')) } }
}

/**
 * Health gauges read at each scrape: `keygate_store_up` in every process, and `keygate_redis_up`
 * where no gateway keeps its own (an `--only admin` process, which publishes invalidations and
 * reads anomaly alerts through Redis). Summed over `--workers` by their minimum: 0 when any
 * worker's store does not answer.
 */
export function createHealthMetrics(registry: Registry, probes: { store: () => Promise<boolean>; redis?: (() => Promise<boolean>) | undefined }): void {
  const registers = [registry]
  new Gauge({
    name: 'keygate_store_up',
    help: '1 when the store answered a query at this scrape (within 2 s) and takes writes, 0 when it did not or is read-only.',
    registers,
    aggregator: 'min',
    async collect() {
      this.set((await probes.store()) ? 1 : 0)
    },
  })
  const redis = probes.redis
  if (redis) {
    new Gauge({
      name: 'keygate_redis_up',
      help: "1 when Redis took keygate's health write at this scrape (within 2 s), 0 when it did not or refused it.",
      registers,
      aggregator: 'min',
      async collect() {
        this.set((await redis()) ? 1 : 0)
      },
    })
  }
}

/**
 * How the `--workers` primary combines Node's process metrics of its processes where prom-client's
 * sum (or omission) misleads. File descriptors are a per-process limit: the sum of the limits
 * (80,000 for four workers at ulimit 20,000) let `open_fds / max_fds` never reach an alert, so
 * both are the highest of any process, and the ratio is that of the process nearest its limit.
 * The start time, which prom-client leaves out, is the earliest: the primary's, the instance's
 * start (worker restarts are `keygate_worker_restarts_total`).
 */
const PROCESS_AGGREGATORS: Readonly<Record<string, Aggregator>> = {
  keygate_process_max_fds: 'max',
  keygate_process_open_fds: 'max',
  keygate_process_start_time_seconds: 'min',
}

const UNCONVENTIONAL_DEFAULTS = ['keygate_nodejs_active_handles_total', 'keygate_nodejs_active_requests_total', 'keygate_nodejs_active_resources_total']

/** The event-loop delay statistics: prom-client's names (after `keygate_nodejs_eventloop_lag_`), help and aggregators. */
const EVENT_LOOP_DELAY = [
  { stat: 'min', help: 'The minimum recorded event loop delay.', aggregator: 'min' },
  { stat: 'max', help: 'The maximum recorded event loop delay.', aggregator: 'max' },
  { stat: 'mean', help: 'The mean of the recorded event loop delays.', aggregator: 'average' },
  { stat: 'stddev', help: 'The standard deviation of the recorded event loop delays.', aggregator: 'average' },
  { stat: 'p50', help: 'The 50th percentile of the recorded event loop delays.', aggregator: 'average' },
  { stat: 'p90', help: 'The 90th percentile of the recorded event loop delays.', aggregator: 'average' },
  { stat: 'p99', help: 'The 99th percentile of the recorded event loop delays.', aggregator: 'average' },
] as const

/**
 * The event-loop delays recorded since the last scrape, as prom-client's default metrics give
 * them, but a scrape that finds none recorded (it came within the 10 ms sampling interval of the
 * last: two Prometheus servers, concurrent scrapes) keeps the last scrape's values. prom-client's
 * set the mean and standard deviation of no delays to NaN, written `Nan` where Prometheus' text
 * format has `NaN`, and the minimum to 9223372036 s (found by a review).
 */
function eventLoopDelayMetrics(registry: Registry): void {
  const sampler = monitorEventLoopDelay({ resolution: 10 })
  sampler.enable()
  const gauges: Gauge[] = []
  // The first gauge's collect sets all seven, as prom-client's does.
  const collect = () => {
    if (sampler.count === 0) return
    const ns = [sampler.min, sampler.max, sampler.mean, sampler.stddev, sampler.percentile(50), sampler.percentile(90), sampler.percentile(99)]
    gauges.forEach((g, i) => g.set((ns[i] as number) / 1e9))
    sampler.reset()
  }
  for (const { stat, help, aggregator } of EVENT_LOOP_DELAY) {
    gauges.push(new Gauge({ name: `keygate_nodejs_eventloop_lag_${stat}_seconds`, help, registers: [registry], aggregator, ...(gauges.length === 0 ? { collect } : {}) }))
  }
}

/**
 * `keygate_log_lines_dropped_total`: the log lines this process dropped, stdout's reader not
 * taking them (core/log.ts), read at each scrape and each worker's report to the `--workers`
 * primary, which adds its workers' up with its own. Before (found by a review), only a log line
 * said so, written once the reader read again: while lines were being dropped, nothing did.
 */
function logMetrics(registry: Registry): void {
  let counted = 0
  new Counter({
    name: 'keygate_log_lines_dropped_total',
    help: `Log lines dropped because stdout's reader did not take them (${LOG_BACKLOG_MAX_CHARS} characters of lines waited for it already).`,
    registers: [registry],
    collect() {
      const n = logLinesDropped()
      this.inc(n - counted)
      counted = n
    },
  }).inc(0)
}

/** A registry for keygate, with Node's process metrics (prefixed keygate_) and the log's dropped lines, unless turned off. */
export function createMetricsRegistry(options: { defaultMetrics?: boolean } = {}): Registry {
  const registry = new Registry()
  if (options.defaultMetrics === false) return registry
  logMetrics(registry)
  // prom-client's event-loop delay statistics are replaced (eventLoopDelayMetrics); its sampler,
  // which only they read, is set to sample once in 24 days rather than every 10 ms beside ours.
  collectDefaultMetrics({ register: registry, prefix: 'keygate_', eventLoopMonitoringPrecision: 2 ** 31 - 1 })
  for (const { stat } of EVENT_LOOP_DELAY) registry.removeSingleMetric(`keygate_nodejs_eventloop_lag_${stat}_seconds`)
  eventLoopDelayMetrics(registry)
  // Gauges whose names end in _total, which Prometheus keeps for counters (`promtool check
  // metrics` failed on them; found by a review). Each is the sum of its own per-type gauge
  // (keygate_nodejs_active_handles{type}...), which stays.
  for (const name of UNCONVENTIONAL_DEFAULTS) registry.removeSingleMetric(name)
  for (const [name, aggregator] of Object.entries(PROCESS_AGGREGATORS)) {
    // prom-client's default metrics take no aggregator option; the metric reads its own field.
    const metric = registry.getSingleMetric(name) as { aggregator: Aggregator } | undefined
    if (metric) metric.aggregator = aggregator
  }
  return registry
}

/** Why a `--workers` worker was replaced: it exited (a crash, the OOM killer), or it stopped answering and the primary killed it. */
export type WorkerRestartReason = 'exited' | 'unresponsive'

/** The `--workers` primary's count of the workers it replaced, by reason (a worker's own metrics start again from 0 in its replacement). */
export function createWorkerRestartMetrics(registry: Registry): Readonly<Record<WorkerRestartReason, CounterChild>> {
  const restarts = new Counter({ name: 'keygate_worker_restarts_total', help: 'Gateway workers that ended and were replaced, by reason (exited, or unresponsive: killed after missing three metrics reads).', labelNames: ['reason'], registers: [registry] })
  return { exited: zeroed(restarts.labels('exited')), unresponsive: zeroed(restarts.labels('unresponsive')) }
}

/** A `--workers` worker's state at a scrape: forked but not yet listening, listening and answering the scrape, or listening and not answering (the scrape within 5 s, or the liveness check's last read). */
export type WorkerState = 'starting' | 'answering' | 'unanswering'

/**
 * The `--workers` primary's view of its workers at each scrape, in its own registry: present
 * whatever the workers' state, so an alert can fire when none answers (the workers' own gauges
 * are then absent from the scrape).
 */
export function createWorkerStateMetrics(registry: Registry, wanted: number): (counts: Readonly<Record<WorkerState, number>>) => void {
  const registers = [registry]
  new Gauge({ name: 'keygate_gateway_workers_wanted', help: 'Gateway workers this instance runs (serve --workers N).', registers }).set(wanted)
  const workers = new Gauge({
    name: 'keygate_gateway_workers',
    help: 'Gateway workers at this scrape, by state: starting (not yet listening), answering, or unanswering (listening, but its metrics did not come within 5 s, at this scrape or the last liveness read: its last counts are in this scrape, its gauges are not).',
    labelNames: ['state'],
    registers,
  })
  const children = { starting: workers.labels('starting'), answering: workers.labels('answering'), unanswering: workers.labels('unanswering') }
  for (const child of Object.values(children)) child.set(0)
  return (counts) => {
    for (const [state, child] of Object.entries(children)) child.set(counts[state as WorkerState])
  }
}

/** What one webhook delivery attempt came to: the receiver took it (2xx), or not. */
export type WebhookAttemptOutcome = 'delivered' | 'failed'

/**
 * Webhook delivery attempts of this process (every `serve` process delivers): by outcome, and the
 * deliveries that ended failed after an attempt of this process (their attempts made, or ended as
 * their webhook no longer takes the event), which no retry will send. Summed over the processes.
 */
export function createWebhookMetrics(registry: Registry): (outcome: WebhookAttemptOutcome, ended: boolean) => void {
  const registers = [registry]
  const attempts = new Counter({ name: 'keygate_webhook_attempts_total', help: 'Webhook delivery attempts by outcome: delivered (the receiver answered 2xx) or failed (another status, a timeout, a refused connection or address).', labelNames: ['outcome'], registers })
  const failed = new Counter({ name: 'keygate_webhook_deliveries_failed_total', help: 'Webhook deliveries that ended failed after an attempt of this process, no further attempt to come (its max_attempts made, or its event no longer taken): sent again only through the retry operations of the admin API.', registers })
  failed.inc(0)
  const children = { delivered: zeroed(attempts.labels('delivered')), failed: zeroed(attempts.labels('failed')) }
  return (outcome, ended) => {
    children[outcome].inc()
    if (ended) failed.inc()
  }
}

/** The lockout's counters: a gateway's metrics hold them, and a process with the admin API alone (`--only admin`) makes them on their own. */
export function createLockoutMetrics(registry: Registry): { lockedOutRequests: Counter; lockouts: Counter; lockoutsForgotten: Counter } {
  const registers = [registry]
  return {
    lockedOutRequests: new Counter({ name: 'keygate_locked_out_requests_total', help: 'Requests answered ip_locked_out (gateway and admin API).', registers }),
    lockouts: new Counter({ name: 'keygate_lockouts_total', help: 'Addresses locked out after too many failed key attempts (gateway and admin API).', registers }),
    lockoutsForgotten: new Counter({
      name: 'keygate_lockouts_forgotten_total',
      help: 'Lockouts still in force dropped from memory for newer ones (past 100,000 locked-out addresses): the address is let in again until it fails again.',
      registers,
    }),
  }
}

export function createGatewayMetrics(registry: Registry, routeNames: readonly string[]): GatewayMetrics {
  const registers = [registry]
  const requests = talliedCounter({
    name: 'keygate_gateway_requests_total',
    help: 'Gateway requests by route and outcome (forwarded, client_closed, cut_at_shutdown, or the error code answered).',
    labelNames: ['route', 'outcome'],
    registers,
  })
  const duration = new RouteHistogram('keygate_gateway_request_duration_seconds', 'Time from request arrival to the response head being written, by route.', LATENCY_BUCKETS, registry)
  const cutOff = talliedCounter({
    name: 'keygate_upstream_cut_off_total',
    help: "Answers cut off after their head was passed on (counted forwarded then), by route: the upstream's response broke off (a reset, or the route's timeout_ms between two chunks), and the client's connection was closed.",
    labelNames: ['route'],
    registers,
  })
  const retried = talliedCounter({
    name: 'keygate_upstream_retries_total',
    help: 'Requests sent upstream a second time, by route: their connection closed within 50 ms of the request, before any answer (an idle keep-alive connection the upstream closed as the request was sent on it); only idempotent requests without a body.',
    labelNames: ['route'],
    registers,
  })
  // An upstream's own errors (its 5xx) are forwarded, and counted so by keygate_gateway_requests_total:
  // this says what the upstream answered (before, found by an SRE review, nothing did, and no
  // upstream error-ratio alert could be built).
  const upstreamStatus = talliedCounter({
    name: 'keygate_upstream_responses_total',
    help: "Upstream response heads by route and status class (1xx to 5xx): what the upstream answered, where keygate_gateway_requests_total counts them all as forwarded.",
    labelNames: ['route', 'class'],
    registers,
  })
  const upstream = new RouteHistogram('keygate_upstream_duration_seconds', 'Time from dispatch to the upstream response head, by route.', LATENCY_BUCKETS, registry)
  const cache = talliedCounter({ name: 'keygate_key_cache_total', help: 'Validation cache look-ups by result.', labelNames: ['result'], registers })
  const limited = talliedCounter({ name: 'keygate_rate_limited_total', help: 'Requests refused by a rate limit, by limit.', labelNames: ['limit'], registers })
  const { lockedOutRequests, lockouts, lockoutsForgotten } = createLockoutMetrics(registry)
  const badKeys = talliedCounter({ name: 'keygate_bad_key_attempts_total', help: 'Presented keys refused, by reason.', labelNames: ['reason'], registers })
  // Every worker holds the same list: under --workers it is shown once, not added up.
  const denyListEntries = new Gauge({ name: 'keygate_deny_list_entries', help: 'Deny list entries in force (config and store).', registers, aggregator: 'max' })
  // Each worker holds its own cache: under --workers they are added up. Read as the scrape asks,
  // so the request path only uses the cache (an operator sizes cache.max_capacity by it).
  const cacheEntries = new Gauge({
    name: 'keygate_key_cache_entries',
    help: 'Entries held by the validation cache: keys (at most cache.max_capacity) and unknown keys (at most cache.negative_max).',
    labelNames: ['cache'],
    registers,
    collect() {
      const sizes = metrics.cacheEntries?.()
      this.set({ cache: 'keys' }, sizes?.positive ?? 0)
      this.set({ cache: 'unknown' }, sizes?.negative ?? 0)
    },
  })
  cacheEntries.set({ cache: 'keys' }, 0)
  cacheEntries.set({ cache: 'unknown' }, 0)
  const storeErrors = new Counter({ name: 'keygate_store_errors_total', help: 'Store failures seen by the gateway, by operation.', labelNames: ['operation'], registers })
  const anomalyCounter = new Counter({ name: 'keygate_anomalies_total', help: 'Anomalies recorded by this process, by type.', labelNames: ['type'], registers })
  // Each process under --workers has its own cap and connections: added up, they are the instance's.
  const connectionsRefused = new Counter({
    name: 'keygate_gateway_connections_refused_total',
    help: 'Client connections the gateway closed as it accepted them, holding gateway.max_connections already.',
    registers,
  })
  connectionsRefused.inc(0)
  const connectionsMax = new Gauge({ name: 'keygate_gateway_connections_max', help: 'Client connections the gateway holds open at most (gateway.max_connections, or what the open-file limit allows); 0 without a cap.', registers })
  new Gauge({
    name: 'keygate_gateway_connections',
    help: 'Client connections the gateway holds open.',
    registers,
    async collect() {
      this.set((await metrics.openConnections?.()) ?? 0)
    },
  })

  // A WebSocket tunnel is a client connection for as long as it lasts, hours or days: these say how
  // many of keygate_gateway_connections are such, and for which route (before, nothing did).
  const tunnelRoutes = [...new Set(routeNames)]
  const tunnels = new Gauge({
    name: 'keygate_gateway_tunnels',
    help: 'WebSocket tunnels the gateway holds open (each one of its client connections), by route.',
    labelNames: ['route'],
    registers,
    collect() {
      const open = new Map<string, number>(tunnelRoutes.map((name) => [name, 0]))
      for (const route of metrics.openTunnels?.() ?? []) open.set(route, (open.get(route) ?? 0) + 1)
      for (const [route, count] of open) this.set({ route }, count)
    },
  })
  for (const route of tunnelRoutes) tunnels.set({ route }, 0)

  const byRoute = new Map<string, RouteMetrics>()
  for (const name of [...new Set([...routeNames, NO_ROUTE])]) {
    const children = {} as Record<GatewayOutcome, Increment>
    for (const outcome of GATEWAY_OUTCOMES) children[outcome] = requests.tally(name, outcome)
    const classes: Increment[] = [NOTHING]
    for (const c of STATUS_CLASSES) classes.push(upstreamStatus.tally(name, c))
    byRoute.set(name, { requests: Object.freeze(children), duration: duration.series(name), upstream: upstream.series(name), cutOff: cutOff.tally(name), retried: retried.tally(name), upstreamStatus: Object.freeze(classes) })
  }
  const none = byRoute.get(NO_ROUTE) as RouteMetrics
  const bad = {} as Record<BadKeyReason, Increment>
  for (const reason of BAD_KEY_REASONS) bad[reason] = badKeys.tally(reason)
  const anomalies = {} as Record<AnomalyType, CounterChild>
  for (const type of ANOMALY_TYPES) anomalies[type] = zeroed(anomalyCounter.labels(type))

  const metrics: GatewayMetrics = {
    registry,
    route: (name) => byRoute.get(name) ?? none,
    cache: { hit: cache.tally('hit'), miss: cache.tally('miss'), negativeHit: cache.tally('negative_hit') },
    rateLimited: { address: limited.tally('address'), key: limited.tally('key') },
    lockedOutRequests,
    lockouts,
    lockoutsForgotten,
    badKeys: Object.freeze(bad),
    denyListEntries,
    cacheEntries: undefined,
    storeErrors: { lookup: zeroed(storeErrors.labels('key_lookup')), denyList: zeroed(storeErrors.labels('deny_list')) },
    anomalies: Object.freeze(anomalies),
    connectionsRefused,
    connectionsMax,
    openConnections: undefined,
    openTunnels: undefined,
  }
  return metrics
}

/** A registry's metrics as `getMetricsAsJSON()` gives them (prom-client types `type` as an enum; it is the word). */
export type MetricsJson = Array<{
  name: string
  help: string
  type: string
  aggregator?: string
  values: Array<{ value: number; labels: Record<string, string | number>; metricName?: string }>
}>

declare module 'prom-client' {
  /** prom-client's aggregation methods (index.js exports them; its typings leave them out). */
  export const aggregators: Record<Aggregator, (metrics: MetricsJson) => MetricsJson[number] | undefined>
}

/** Whether a metric's values outlive the process that counted them: counters and histograms that are summed. */
function isCount(m: MetricsJson[number]): boolean {
  return (m.type === 'counter' || m.type === 'histogram') && (m.aggregator ?? 'sum') === 'sum'
}

/** What a `--workers` worker answers the primary with: every metric, or its counters and histograms alone (no health probe runs for those). */
export async function workerMetrics(registry: Registry, countsOnly: boolean): Promise<MetricsJson> {
  if (!countsOnly) return (await registry.getMetricsAsJSON()) as unknown as MetricsJson
  const counts = (registry.getMetricsAsArray() as unknown as Array<MetricsJson[number] & Pick<Metric, 'get'>>).filter(isCount)
  return (await Promise.all(counts.map((m) => m.get()))) as unknown as MetricsJson
}

/**
 * The `--workers` primary's sum of its workers' metrics. A worker that dies takes its counts with
 * it, and its replacement counts from 0: summed over the live workers alone, every counter and
 * histogram would go down. So the primary keeps each worker's counters and histograms as it last
 * read them (at each scrape, and every few seconds between), and when a worker ends, adds them
 * to the departed workers' total, which every later scrape adds in. A worker that stops gracefully
 * tells its counts as it ends (`last`); what a killed one counted after that last read is lost
 * (SIGKILL leaves no time to report). Gauges are not carried over.
 */
export class ClusterMetrics {
  readonly #last = new Map<number, { request: number; counts: MetricsJson }>()
  #departed: MetricsJson = []
  /** The workers whose counts are in the departed total: nothing of theirs is kept again. */
  readonly #gone = new Set<number>()

  /**
   * A worker's answer to request number `request`. An answer to an earlier request that arrives
   * later (a full scrape waits for the health probes) does not replace the later counts.
   */
  keep(worker: number, request: number, metrics: MetricsJson): void {
    const last = this.#last.get(worker)
    if (this.#gone.has(worker) || (last && last.request > request)) return
    this.#last.set(worker, { request, counts: metrics.filter(isCount).map((m) => ({ ...m, aggregator: 'sum' })) })
  }

  /**
   * A worker's counts as it stopped gracefully, its last message: no answer to a request, even
   * one that arrives after them, replaces them. To be told before `depart`: the primary departs a
   * worker once it has exited and its channel has closed, after its last message.
   */
  last(worker: number, metrics: MetricsJson): void {
    this.keep(worker, Number.POSITIVE_INFINITY, metrics)
  }

  /** The worker ended: its last counts join the departed total (prom-client's own sum). */
  depart(worker: number): void {
    const last = this.#last.get(worker)
    this.#last.delete(worker)
    this.#gone.add(worker)
    if (!last) return
    const byName = new Map<string, MetricsJson>()
    for (const m of [...this.#departed, ...last.counts]) byName.set(m.name, [...(byName.get(m.name) ?? []), m])
    this.#departed = [...byName.values()].map((ms) => aggregators.sum(ms) as MetricsJson[number])
  }

  /**
   * The scrape: the workers' answers (by worker id) summed with the departed workers' counts, each
   * metric by its aggregator. A worker that did not answer (it is ending) adds its last counts; an
   * answer from one that has ended since is in the departed total already. `own`: the primary's
   * own metrics, added in.
   */
  sum(answers: ReadonlyMap<number, MetricsJson>, own: MetricsJson = []): Registry {
    const live = [...this.#last].map(([worker, last]) => answers.get(worker) ?? last.counts)
    return AggregatorRegistry.aggregate([...live, this.#departed, own] as never)
  }
}
