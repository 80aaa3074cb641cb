// keygate serve: the gateway and admin listeners, in one process or, with --workers N, as N
// gateway processes sharing one port (node:cluster) beside a primary that owns the admin
// listener. SIGTERM/SIGINT: readiness fails, listeners stop accepting, in-flight requests finish
// within the deadline, idle keep-alive connections close, pending writes flush, exit 0.
import cluster from 'node:cluster'
import type http from 'node:http'
import https from 'node:https'
import { readFileSync, writeSync } from 'node:fs'
import net, { type AddressInfo } from 'node:net'
import { join } from 'node:path'
import { createSecureContext } from 'node:tls'
import { deepFreeze, hideConfigSecrets, loadConfig, unknownEnvNames } from '../config/load.ts'
import type { Config } from '../config/schema.ts'
import { parseListen } from '../core/formats.ts'
import { isKeygateError, KeygateError, systemErrorWords } from '../core/errors.ts'
import { closeWaiting, destroyConnections, closeAfterAnswers, nodeHttp } from '../core/http.ts'
import { createLogger, shareStdout, type Level, type Logger } from '../core/log.ts'
import { OneOut, TimedOut, answersWithin, within } from '../core/deadline.ts'
import { takeEarlyStop } from '../core/early-stop.ts'
import { PACKAGE_ROOT } from '../core/package.ts'
import { ClusterMetrics, createGatewayMetrics, createHealthMetrics, createLockoutMetrics, createMetricsRegistry, createWebhookMetrics, createWorkerRestartMetrics, createWorkerStateMetrics, type MetricsJson, type WebhookAttemptOutcome, workerMetrics } from '../core/metrics.ts'
import { bindInvalidationPublisher, bindInvalidations, subscribeInvalidations } from '../core/invalidation.ts'
import { DenyListService, denyListWarnings, type DenyChange, type DenyEntry } from '../core/deny-list.ts'
import { createLockout, LOCKOUT_KEY_PREFIX, type Lockout } from '../core/lockout.ts'
import { teeUsage, UsageRecorder } from '../core/usage.ts'
import { AnomalyDetector, AnomalyFeed, AnomalyLog, anomalyHistory, ClusterWindows, MemoryWindows, answerWindows, type AnomalyJson, type AnomalyType, type SharedWindows, type WindowsAnswer, type WindowsRequest } from '../core/anomalies.ts'
import { EventBus } from '../core/events.ts'
import { bindKeyEvents, WebhookService } from '../core/webhooks.ts'
import { pendingMigrations, readMigrations, RecordsLocked } from '../core/migrate.ts'
import { connectRedis, redisHealth, redisReady, writeHealthKey } from '../core/redis.ts'
import { clusterLimitsPrimary } from '../core/limiters.ts'
import { defaultPruneRules, Scheduler } from '../core/scheduler.ts'
import { openRuntime, type Runtime } from '../core/runtime.ts'
import { adminServerOptions, createAdminServer, handlersEnded, healthRoutes, type AdminRoute } from '../admin/server.ts'
import { createAdminApi } from '../admin/index.ts'
import { GiteaTokenService } from '../core/integrations/gitea.ts'
import { N8nKeyService } from '../core/integrations/n8n.ts'
import { plainRemote } from '../core/integrations/http.ts'
import type { Redis } from 'ioredis'
import { createGateway, type Gateway } from '../gateway/index.ts'
import { exposureWarning, Router, shortcutWarning } from '../gateway/route.ts'
import { EXIT_OK, EXIT_REFUSED, UsageError, parse, parseIntFlag, refuseFlags, type Io } from './io.ts'

/** How often the `--workers` primary reads its workers' counters between scrapes: what a killed worker counted since is lost. */
const METRICS_REFRESH_MS = 5000
/**
 * The refreshes in a row a `--workers` worker may leave unanswered (each within 5 s) before the
 * primary kills it: one frozen (SIGSTOP, a stuck event loop) keeps being handed its share of new
 * connections by the kernel (SO_REUSEPORT), which hang. A worker runs the gateway alone, whose
 * request path does nothing synchronous for long (the admin API, imports included, is the
 * primary's), so 15 s and more without an answer is a stuck worker, not a busy one.
 */
const LIVENESS_MISSES = 3
const USAGE = 'keygate serve [--only gateway|admin] [--workers N] [--listen HOST:PORT] [--admin-listen HOST:PORT] [--upstream URL] [--config FILE]'

const OPTIONS = {
  only: { type: 'string' },
  workers: { type: 'string' },
  listen: { type: 'string' },
  'admin-listen': { type: 'string' },
  upstream: { type: 'string' },
} as const

type Role = { gateway: boolean; admin: boolean }

/** How long a `--workers` worker waits for its primary to hand it the configuration. */
const CONFIG_FROM_PRIMARY_MS = 10_000
/** What each `--workers` worker loads before anything else: bin/worker-preload.cjs says why. */
const WORKER_PRELOAD = join(PACKAGE_ROOT, 'bin', 'worker-preload.cjs')

/** Why the log could not be written, once it could not (watchLog). */
let logLost: Error | undefined
/** What a stop waiting for it does when the log cannot be written (stopSignal). */
let onLogLost: (() => void) | undefined

/**
 * The log's stream failing (stdout a pipe whose reader is gone, `keygate serve | head -1` or a
 * log shipper that died, or a full disk) is said once on stderr, and serve stops as on SIGTERM
 * and exits 1, for the service manager to start it again with a log it can write. Before (found
 * by a review), the failed write was an 'error' event nothing handled: serve ended at once with
 * a stack trace, its requests in flight cut and its usage counts unwritten.
 */
function watchLog(): void {
  process.stdout.on('error', (err) => {
    if (logLost !== undefined) return
    logLost = err
    try {
      writeSync(2, `keygate: the log cannot be written (stdout: ${systemErrorWords(err)}); stopping\n`)
    } catch {}
    onLogLost?.()
  })
}

export async function runServe(argv: string[], io: Io): Promise<number> {
  watchLog()
  const p = parse(argv, OPTIONS, { min: 0, max: 0 }, USAGE)
  if (p.values.help) {
    io.out(`start the gateway and admin listeners\nusage: ${USAGE}\n`)
    return EXIT_OK
  }
  // The address the api-key, gitea and n8n commands call, not one serve listens on (before: taken and ignored).
  refuseFlags(p, ['admin-url'], 'serve does not use it: it is the admin API the api-key, gitea and n8n commands go through; the admin listener\'s address is --admin-listen (admin.listen)')
  // SPEC §1: serve's output is its log, JSON lines on stdout; there is no other format to switch
  // to (before, found by a review: taken and ignored). The first admin key stays on stderr, out
  // of the log's stream, where a log collector would keep it.
  refuseFlags(p, ['json'], "serve's output is its log, one JSON object per line on stdout, with or without it (the first admin key alone is printed on stderr, once); leave it out")
  // A start that fails is said in the log too, as a JSON line on stdout where the rest of serve's
  // log goes, beside the command's `keygate: …` on stderr (before, found by a deployment review, a
  // pipeline that reads the JSON log never saw why a pod kept restarting). Usage errors stay
  // the command line's alone.
  try {
    return await startServe(p, io)
  } catch (err) {
    // A usage error by its code: the configuration's loader names a flag's refused value as one too.
    if (!isKeygateError(err, 'usage_error') && !cluster.isWorker) {
      createLogger({ level: 'error' }).error('serve failed', { err: err instanceof Error ? err : new Error(String(err)) })
    }
    throw err
  }
}

async function startServe(p: ReturnType<typeof parse>, io: Io): Promise<number> {
  const only = p.values.only as string | undefined
  if (only !== undefined && only !== 'gateway' && only !== 'admin') throw new UsageError(`--only: ${JSON.stringify(only)} is not allowed; expected gateway or admin\nusage: ${USAGE}`)
  const workers = parseIntFlag('workers', p.values.workers as string | undefined, 1, 256) ?? 1
  if (workers > 1 && only === 'admin') throw new UsageError('--workers runs several gateway processes; it does not go with --only admin')
  // A worker runs what its primary checked at start, the gateway's certificate included: one
  // started later (to replace one that died) reading the files itself ran whatever they held by
  // then, a config edited since or a half-renewed certificate pair, beside siblings that ran the old.
  if (cluster.isWorker) {
    // Its log goes to the stdout of the primary and of its siblings: whole lines only (shareStdout).
    shareStdout()
    const given = await fromPrimary()
    hideConfigSecrets(given.config)
    const log = createLogger({ level: given.config.log.level as Level, fields: { worker: cluster.worker?.id } })
    return serveInstance(given.config, log, io, { gateway: true, admin: false }, { worker: true, gatewayTls: given.tls })
  }
  const config = loadConfig({
    file: p.values.config as string | undefined,
    env: io.env,
    flags: {
      listen: p.values.listen as string | undefined,
      'admin-listen': p.values['admin-listen'] as string | undefined,
      upstream: p.values.upstream as string | undefined,
      'data-dir': p.values['data-dir'] as string | undefined,
      'database-url': p.values['database-url'] as string | undefined,
    },
    // An admin-only process listens on one of the two addresses.
    bothListeners: only !== 'admin',
  })
  hideConfigSecrets(config)
  if (workers > 1 && !config.store.database_url) {
    throw new KeygateError('config_invalid', '--workers above 1 needs DATABASE_URL: the embedded store belongs to one process')
  }
  const log = createLogger({ level: config.log.level as Level })
  const unknown = unknownEnvNames(io.env)
  if (unknown.length > 0) log.warn('environment variables keygate does not read, ignored', { variables: unknown })
  // Said once at start, not refused: a Gitea or n8n on a private network may have no TLS (found by a security review).
  for (const [setting, url] of [['integrations.gitea.url (GITEA_URL)', config.integrations.gitea.url], ['integrations.n8n.url (N8N_URL)', config.integrations.n8n.url]] as const) {
    if (url !== undefined && plainRemote(url)) log.warn('an integration is reached over plain http: its credentials and the tokens it makes cross the network unencrypted; use https', { setting, url })
  }
  const role: Role = { gateway: only !== 'admin', admin: only !== 'gateway' }
  // Said once at start: PostgreSQL is how instances share a store, and without Redis each counts
  // apart (the README says so; a start said nothing before, found by a review of the anomalies).
  // An admin process alone (--only admin) is one of several by design: its lockouts are its own,
  // so a lift there reaches no gateway (before, found by a review, it said nothing).
  if (config.store.database_url && !config.redis.url) {
    log.info(
      role.gateway
        ? 'no Redis (REDIS_URL): rate limits, lockouts and anomaly thresholds count in this instance alone (under --workers, in its primary); another instance on the same database counts its own, and hears of a revocation at its store check (cache.store_check_s) and of a deny list change at its reload (gateway.deny_list_refresh_s)'
        : "no Redis (REDIS_URL): the lockouts this admin API lists and lifts (/v1/lockouts) are this process's alone, not the gateways' on the same database, which a lift here does not reach; they hear of a key change made here at their store check (cache.store_check_s) and of a deny list change at their reload (gateway.deny_list_refresh_s)",
    )
  }
  // Said once at start, not refused (a gateway of keys that never change may be meant): the
  // embedded store is this process's alone, so nothing manages keys while it runs (before, found
  // by a docs walk, a start said nothing, and the CLI was refused until it stopped).
  if (!config.store.database_url && !role.admin) {
    log.warn(
      '--only gateway on the embedded store: no admin API runs, and no keygate command can open the store while this process holds it, so keys, the deny list and webhooks can be changed only once it stops; to manage them while gateways run, use PostgreSQL (DATABASE_URL) with a keygate serve --only admin beside them',
      { data_dir: config.store.data_dir },
    )
  }
  if (workers > 1) return servePrimary(config, log, io, role, workers)
  return serveInstance(config, log, io, role, { worker: false })
}

/** A listener's certificate chain and private key, as the TLS context takes them. */
interface TlsPair {
  cert: Buffer
  key: Buffer
}

/**
 * Where a listener's certificate comes from and where its renewals are told: its files, read
 * again on SIGHUP (`tlsFiles`); or, in a `--workers` worker, the primary, which reads and checks
 * the gateway's files for all its workers (`fromPrimary`).
 */
interface TlsSource {
  readonly pair: TlsPair
  onRenewal(apply: (pair: TlsPair) => void): void
}

/** A `TlsSource` holding `first` until `renew` hands it the next pair, which every listener then takes. */
function renewable(first: TlsPair): { source: TlsSource; renew(pair: TlsPair): void } {
  let pair = first
  const renewals: ((pair: TlsPair) => void)[] = []
  return {
    source: {
      get pair() {
        return pair
      },
      onRenewal: (apply) => void renewals.push(apply),
    },
    renew(next) {
      pair = next
      for (const apply of renewals) apply(next)
    },
  }
}

/**
 * The certificate files of `tls`, read now and on every SIGHUP. A renewal is applied only once
 * the two files make a usable pair: one read half-way through a renewal (the new certificate
 * beside the old key) keeps the pair in use, and says so.
 */
function tlsFiles(tls: { cert: string; key: string }, log: Logger, listener: 'gateway' | 'admin'): TlsSource {
  const read = (): TlsPair => ({ cert: readFileSync(tls.cert), key: readFileSync(tls.key) })
  let current: ReturnType<typeof renewable>
  try {
    current = renewable(read())
  } catch (err) {
    throw new KeygateError('config_invalid', `the ${listener} listener's TLS certificate ${tls.cert} or its key cannot be read: ${systemErrorWords(err)}`, undefined, { cause: err })
  }
  process.on('SIGHUP', () => {
    try {
      const renewed = read()
      createSecureContext(renewed)
      current.renew(renewed)
      log.info('reloaded TLS certificate', { listener, cert: tls.cert })
    } catch (err) {
      // Which listener, as both may name files (found by a review of operations).
      log.error('could not reload TLS certificate; keeping the old one', { listener, cert: tls.cert, err: err as Error })
    }
  })
  return current.source
}

function createServer(tls: TlsSource | undefined, options: http.ServerOptions): http.Server {
  if (!tls) return nodeHttp().createServer(options)
  // The handshake has the time the headers have: a client that connects and sends nothing is cut
  // then, as on plain HTTP (Node's own 120 s did not end such a connection here).
  const server = https.createServer({ ...options, handshakeTimeout: options.headersTimeout ?? 10_000, ...tls.pair })
  tls.onRenewal((pair) => server.setSecureContext(pair))
  return server as unknown as http.Server
}

/** A certificate pair as it crosses the cluster's IPC channel (JSON: a Buffer would become an array of numbers). */
interface WireTls {
  cert: string
  key: string
}

function toWire(pair: TlsPair): WireTls {
  return { cert: pair.cert.toString('base64'), key: pair.key.toString('base64') }
}

function fromWire(wire: WireTls): TlsPair {
  return { cert: Buffer.from(wire.cert, 'base64'), key: Buffer.from(wire.key, 'base64') }
}

/**
 * What a `--workers` worker runs: the configuration its primary checked at start (with the
 * gateway address it reserved), and the gateway's certificate as the primary last read it; the
 * primary's later renewals reach `tls` on the same channel. The listener for them stays for the
 * worker's life; a worker ends by disconnecting its channel.
 */
function fromPrimary(): Promise<{ config: Config; tls: TlsSource | undefined }> {
  return new Promise((resolve, reject) => {
    let current: ReturnType<typeof renewable> | undefined
    const onMessage = (m: WorkerMessage) => {
      if (m?.keygate === 'tls') {
        current?.renew(fromWire(m.tls))
      } else if (m?.keygate === 'config') {
        clearTimeout(timer)
        current = m.tls ? renewable(fromWire(m.tls)) : undefined
        resolve({ config: deepFreeze(m.config), tls: current?.source })
      }
    }
    const timer = setTimeout(() => {
      process.off('message', onMessage)
      reject(new KeygateError('internal_error', `the primary did not hand this gateway worker its configuration within ${CONFIG_FROM_PRIMARY_MS / 1000} s`))
    }, CONFIG_FROM_PRIMARY_MS)
    process.on('message', onMessage)
    process.send?.({ keygate: 'config' } satisfies FromWorker)
  })
}

/**
 * `shared`: a `--workers` worker listens on its own socket beside its siblings' (SO_REUSEPORT,
 * the kernel spreads the connections). Node's default in a cluster, the primary accepting each
 * connection and handing it over, left a connection open for ever when its worker was killed
 * between the hand-over and its acknowledgement.
 */
function listen(server: net.Server, address: string, setting: 'gateway.listen' | 'admin.listen', options: { shared?: boolean } = {}): Promise<AddressInfo> {
  const where = parseListen(address)
  if (!where) throw new KeygateError('config_invalid', `cannot listen on ${address} (${setting})`)
  return new Promise((resolve, reject) => {
    // Not config_invalid (found by a deployment review): a valid configuration whose port another
    // process holds sent its reader to check the configuration. The setting named: the two
    // listeners' addresses may be one written two ways (a host name and its address), which the
    // configuration's own check cannot see (before, found by a review, neither was named).
    const failed = (err: Error) => reject(new KeygateError('listen_failed', `cannot listen on ${address} (${setting}): ${systemErrorWords(err)}`))
    server.once('error', failed)
    server.listen({ port: where.port, host: where.host, ...(options.shared ? { exclusive: true, reusePort: true } : {}) }, () => {
      server.off('error', failed)
      resolve(server.address() as AddressInfo)
    })
  })
}

/**
 * The `--workers` gateway address, bound by the primary without SO_REUSEPORT and closed again
 * before the workers listen: an address in use (by another keygate's workers too, which would
 * otherwise be joined silently) ends the start here, and port 0 becomes the one port of all.
 */
async function reserveGatewayAddress(address: string): Promise<string> {
  const probe = net.createServer()
  const at = await listen(probe, address, 'gateway.listen')
  await new Promise((resolve) => probe.close(resolve))
  const host = parseListen(address)?.host ?? ''
  return host.includes(':') ? `[${host}]:${at.port}` : `${host}:${at.port}`
}

function shown(a: AddressInfo): string {
  return a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`
}

/** A stop signal this soon after the first (ms) is the same stop, not a second one. */
const REPEAT_MS = 1000

/**
 * `stopped` resolves with the signal name on the first SIGTERM/SIGINT; `dispose` removes the
 * handlers (a start that failed must not swallow the signal that ends it). A second signal, a
 * second or more after the first (REPEAT_MS), ends the process at once, except in a `--workers`
 * worker: a signal to the process group (systemd's stop, Ctrl-C) reaches it beside the primary's
 * own SIGTERM, and its drain must go on; the primary's second signal still ends everything.
 * SIGHUP never ends the process (Node's default):
 * it reloads TLS certificates where there are any (`systemctl reload`); a worker's come from its
 * primary, so a SIGHUP to the whole group is only the primary's.
 */
function stopSignal(log: Logger, options: { worker: boolean; onHangup?: () => void } = { worker: false }): { stopped: Promise<string>; dispose(): void } {
  let first: number | undefined
  let resolve!: (signal: string) => void
  const stopped = new Promise<string>((r) => (resolve = r))
  const on = (signal: string) => {
    if (first !== undefined) {
      if (options.worker) return
      // Within a second of the first, the same stop told twice: Ctrl-C on `npm start` signals the
      // terminal's whole process group, npm and keygate, and npm passes its own on (before, that
      // second one cut the drain short and the requests in flight with it; found by a newcomer's
      // walk through the README). A human's second Ctrl-C, meant to hurry the stop, comes later.
      if (performance.now() - first < REPEAT_MS) {
        log.debug('the stop signalled again at once: taken as the same stop', { signal })
        return
      }
      log.warn('second signal: exiting without waiting', { signal })
      process.exit(1)
    }
    first = performance.now()
    resolve(signal)
  }
  const hangup = () => {
    if (options.worker) return
    log.info('SIGHUP: reloading TLS certificates, if any are configured')
    options.onHangup?.()
  }
  process.on('SIGTERM', on)
  process.on('SIGINT', on)
  // Kept to the end, through the last of a shutdown (dispose runs before the store closes).
  process.on('SIGHUP', hangup)
  // One that came while the modules loaded: the stop begins now.
  const early = takeEarlyStop()
  if (early) on(early)
  // The log that cannot be written stops serve as SIGTERM does (watchLog), failed already or later;
  // during a stop under way it changes only the exit code, not being a second signal (before,
  // found by a review, a log lost a second or more into a drain ended the process at once).
  const lost = () => {
    if (first === undefined) on('log_lost')
  }
  onLogLost = lost
  if (logLost !== undefined) lost()
  return {
    stopped,
    dispose() {
      process.off('SIGTERM', on)
      process.off('SIGINT', on)
      onLogLost = undefined
    },
  }
}

/**
 * What `serve` refused with store_locked is told: the owner is most often a CLI command, which
 * ends by itself (before: the CLI's advice, to point the CLI at the admin API, which serve is).
 */
const SERVE_LOCKED_HINT = 'wait for it to end (a keygate command ends by itself), or stop it; several servers need a shared store (DATABASE_URL)'

/** What `serve` is told when another `serve` holds the store: a server never ends by itself (before, found by a docs walk, it was told to wait for it). */
const SERVE_HELD_BY_SERVER_HINT = 'stop that server first: the embedded store serves one process, and several servers need a shared store (DATABASE_URL)'

/**
 * The store opened (and migrated), unless a stop signal comes first: then the process exits 0
 * at once. Nothing is served yet, so nothing is drained; what the start had begun in the store
 * rolls back with its connection. Before (found by a review), a start waiting on the store (another
 * instance's migration holding its lock) swallowed SIGTERM, and went on to serve once the lock
 * was free; `systemctl stop` ended in SIGKILL.
 */
async function openUnlessStopped(config: Config, log: Logger, stopping: { stopped: Promise<string> }): Promise<Runtime> {
  const opening = openRuntime(config, log, { lockedHint: SERVE_LOCKED_HINT, serverHeldHint: SERVE_HELD_BY_SERVER_HINT, waitForStore: true })
  const first = await Promise.race([opening.then((runtime) => ({ runtime })), stopping.stopped.then((signal) => ({ signal }))])
  if ('runtime' in first) return first.runtime
  log.info('stopped during start-up, before serving', { signal: first.signal })
  process.exit(logLost === undefined ? EXIT_OK : EXIT_REFUSED)
}

/** The innermost system or SQLSTATE code (ECONNREFUSED, 28P01) in an error's chain of causes. */
function systemCode(err: unknown): string | undefined {
  let found: string | undefined
  for (let e = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code
    if (typeof code === 'string' && /^[A-Z0-9_]{1,40}$/.test(code)) found = code
  }
  return found
}

/** How long a health gauge's probe waits for the store or Redis at a scrape, and `/readyz` for the store. */
const PROBE_MS = 2000

/**
 * Whether Redis takes the health write within PROBE_MS, at a scrape; false without sending another
 * while the last is unanswered (OneOut). Before (found by a review), a frozen Redis that kept its
 * connection held one more write for every scrape, for as long as it stayed frozen.
 */
function redisTakesWrites(redis: Redis): () => Promise<boolean> {
  const writing = new OneOut()
  return () =>
    answersWithin(() => {
      if (writing.out) throw new Error('Redis has not answered the last scrape\'s write')
      return writing.send(writeHealthKey(redis))
    }, PROBE_MS)
}

/**
 * What a look at the store found: the migrations not applied of those this process runs on (or,
 * a string, why they cannot be compared: an applied file changed), and whether it refuses writes
 * (a standby, default_transaction_read_only).
 */
interface StoreState {
  pending: string[] | string
  readOnly: boolean
}

/**
 * The store as `/readyz` and `keygate_store_up` see it, asked one look at a time in a process:
 * a probe or scrape that comes while one is under way waits for its answer (within its own
 * PROBE_MS), and each statement of it is cancelled by PostgreSQL at PROBE_MS, its connection
 * dropped a second later if nothing answers at all, whatever store.query_timeout_ms says (Db's
 * probing). So the probes hold one connection at most, their own outside the pool, for 2 to 3 s a
 * statement (and a new connection's start-up, bounded by PROBE_MS too), and the admin API and the
 * gateway have the whole pool.
 * Before (found by a review), each scrape asked the store itself and /readyz every 2 s, and each
 * question held its connection for the store's timeouts (5 to 6 s, for good with no query
 * timeout): on a hung store a probe and a scrape a second held 8 to 9 of the 10 connections
 * within 4 s, and admin calls and key lookups waited for a connection rather than the store.
 *
 * The migrations are those this process runs on, read once, as it starts (it has just checked
 * the store against them): files unpacked since, by an upgrade before the restart that applies
 * them, are the next process's. Before (found by a review), each probe read the folder again: a
 * newer version's file made a running serve not ready ("migrations not applied"), and the folder
 * replaced whole "store unreachable (ENOENT)", logged as a store outage.
 */
function storeProbe(runtime: Runtime, log: Logger): () => Promise<StoreState> {
  const files = readMigrations()
  const store = runtime.db.probing(PROBE_MS)
  // What the last read of keygate_migrations found: at first, what the start found (nothing
  // pending, or it would not serve).
  let last: string[] | string = []
  let locked = false
  const look = async (): Promise<StoreState> => {
    let pending: string[] | string
    // Whether this read found the table locked; any other answer read it, so a lock is over (before,
    // found by a review, a read that found a changed migration file left the next lock unsaid).
    let lockedNow = false
    try {
      pending = await pendingMigrations(store, files)
    } catch (err) {
      if (err instanceof RecordsLocked) {
        // An operator's LOCK TABLE or VACUUM FULL of keygate_migrations: the store answered, so
        // it is up, judged by the migrations last read (the probe waits for the lock a quarter of
        // its 2 s: Db.probing). Before (found by a review), /readyz answered 503 "store not
        // answering" (or "store unreachable (55P03)"), logged the store as unreachable, and
        // keygate_store_up read 0, for as long as the lock lasted, on every instance at once.
        if (!locked) log.info("keygate_migrations, the table of applied migrations, is locked by another session (most likely an operator's LOCK TABLE or VACUUM FULL): the store answered, so /readyz and keygate_store_up count it as up, judged by the migrations read before, until the table can be read again", { table: 'keygate_migrations', holder: err.holder })
        lockedNow = true
        pending = last
      } else if (isKeygateError(err, 'migration_modified')) {
        // A changed or missing migration file is not an outage.
        pending = err.message
      } else {
        throw err
      }
    }
    locked = lockedNow
    last = pending
    const [mode] = await store.query<{ read_only: string }>(`SELECT current_setting('transaction_read_only') AS read_only`)
    return { pending, readOnly: mode?.read_only !== 'off' }
  }
  let looking: Promise<StoreState> | undefined
  return () =>
    (looking ??= look().finally(() => {
      looking = undefined
    }))
}

/**
 * The store answers within PROBE_MS and takes writes: `keygate_store_up`, in every serve process.
 * A read-only one (a standby after a failover, default_transaction_read_only) answered `SELECT 1`
 * and read 1 while every write failed and /readyz said it was read-only (found by a failure
 * review), as keygate_redis_up reads 0 for a Redis that answers but refuses writes.
 */
function storeAnswers(probe: () => Promise<StoreState>): () => Promise<boolean> {
  return () =>
    answersWithin(async () => {
      if ((await probe()).readOnly) throw new Error('the store is read-only')
    }, PROBE_MS)
}

/**
 * How long `/readyz` waits for the store, as the health gauges do (PROBE_MS). Before (found by a review), it
 * waited `store.query_timeout_ms` (5 s by default, up to 10 minutes): a probe with a shorter
 * timeout (Kubernetes' default is 1 s) failed without a reason, and a person's curl hung.
 */
const READY_STORE_WAIT_MS = PROBE_MS

/**
 * `/readyz`'s reason when not ready. It answers without a credential, on a listener a load
 * balancer or orchestrator reaches: a store that cannot be reached is named by its error code
 * only (the driver's message names the database's host and port), and the whole error is logged,
 * once per change.
 */
function readiness(probe: () => Promise<StoreState>, log: Logger): () => Promise<string | undefined> {
  let lastLogged = ''
  return async () => {
    try {
      const { pending, readOnly } = await within(probe(), READY_STORE_WAIT_MS, 'the store')
      lastLogged = ''
      if (typeof pending === 'string') return pending
      if (pending.length > 0) return `migrations not applied: ${pending.join(', ')}`
      // A store that takes no writes serves no admin change, usage count or lockout: not ready
      // (before, found by a failure review, ready while every write failed).
      return readOnly ? 'store is read-only (a standby, or default_transaction_read_only on): DATABASE_URL must name the primary' : undefined
    } catch (err) {
      const message = (err as Error).message
      if (message !== lastLogged) {
        lastLogged = message
        log.warn('not ready: the store cannot be reached', { err })
      }
      if (err instanceof TimedOut) return `store not answering (no answer within ${READY_STORE_WAIT_MS / 1000} s)`
      const code = systemCode(err)
      return code === undefined ? 'store unreachable' : `store unreachable (${code})`
    }
  }
}

/** The 404 of `/v1` on the health listener of `serve --only gateway`, a `--workers` primary's too. */
const NO_ADMIN_API = 'this process serves the gateway only (serve --only gateway): the admin API is served by a keygate serve --only admin, or one without --only'

/**
 * The admin listener of a process, a `--workers` primary's too, serving `routes`. Without the
 * admin API (`--only gateway`) its `/v1` says why (before, found by a review, a `--workers`
 * primary's said "no admin route /v1/keys", as though the path were wrong).
 */
function adminServer(config: Config, role: Role, routes: readonly AdminRoute[], log: Logger): http.Server {
  return createAdminServer({
    routes,
    log,
    server: createServer(config.admin.tls && tlsFiles(config.admin.tls, log, 'admin'), adminServerOptions(config.admin)),
    allowedHosts: config.admin.allowed_hosts,
    ...(role.admin ? {} : { noApi: NO_ADMIN_API }),
  })
}

/**
 * What the first admin key's start says when the store failed once the key was shown: at the
 * commit, which may have been made though its answer never came (the connection dropped
 * between). So the store is asked whether the key's row is there. Before (found by a review),
 * every such failure said "NOT kept": an operator threw away a key that existed, and the next
 * start, finding an admin key, made none. A row not found is still only most likely not kept:
 * with synchronous replication a commit whose connection was lost while it waited for the
 * standby is committed, and shows to others once acknowledged; the next start tells.
 */
async function afterShownKeyFailed(runtime: Pick<Runtime, 'keys'>, id: string, err: Error): Promise<string> {
  const head = `the first admin key printed above (id ${id})`
  let kept: boolean
  try {
    kept = (await within(runtime.keys.getMany([id]), 10_000, 'the store')).has(id)
  } catch (asking) {
    return `${head} may not have been kept: ${err.message}; and the store could not be asked whether it was (${(asking as Error).message}). Start again: if that start prints no new first admin key, this one was kept and is valid; if it prints one, use that one (or set admin.token, KEYGATE_ADMIN_TOKEN)`
  }
  return kept
    ? `${head} was kept, and is valid: the store failed after committing it (${err.message}); start again (no new key is made)`
    : `${head} was NOT kept: ${err.message}; start again to make another, or set admin.token (KEYGATE_ADMIN_TOKEN). (Should that start print no new first admin key, this one was kept after all: a commit still waiting on a synchronous standby shows only once it is acknowledged.)`
}

async function bootstrapAdmin(runtime: Runtime, config: Config, io: Io, log: Logger): Promise<void> {
  if (config.admin.token) return
  // Printed before the key is committed: a key that could not be printed is not kept, so the
  // next start makes one again (before, it was kept, and no start printed one again).
  let created
  let shown: string | undefined
  try {
    created = await runtime.keys.ensureAdminKey({ actor: 'system' }, ({ key, record }) => {
      io.err(`\nkeygate: created the first admin key (id ${record.id}). It is shown once; store it now:\n${key}\n\n`)
      shown = record.id
    })
  } catch (err) {
    if (shown !== undefined) {
      const message = await afterShownKeyFailed(runtime, shown, err as Error)
      log.error(message, { err: err as Error })
      try {
        io.err(`keygate: ${message}\n`)
      } catch {}
      throw err
    }
    if (!isKeygateError(err) || err.code !== 'output_failed') throw err
    const message = `no admin credential is configured, and the first admin key could not be printed (${err.message}): none was kept; start again with stderr writable, or set admin.token (KEYGATE_ADMIN_TOKEN)`
    log.error(message)
    throw new KeygateError('output_failed', message)
  }
  if (created) log.warn('no admin credential was configured: created the first admin key and printed it on stderr once', { key_id: created.record.id })
}

/**
 * What a process does with domain events: its event bus; the webhook queue fed from it and the
 * deliverer polling the store; key events when it runs the admin API; the anomaly detector
 * beside a gateway; the live anomaly feed of the SSE stream beside the admin API.
 */
interface ProcessEvents {
  events: EventBus
  webhooks: WebhookService
  detector: AnomalyDetector | undefined
  feed: AnomalyFeed | undefined
  close(): Promise<void>
}

function processEvents(
  config: Config,
  runtime: Runtime,
  redis: Redis | undefined,
  log: Logger,
  role: Role,
  onAnomaly?: (type: AnomalyType) => void,
  windows?: SharedWindows,
  onWebhookAttempt?: (outcome: WebhookAttemptOutcome, ended: boolean) => void,
): ProcessEvents {
  // The runtime's bus: the scheduler's key.expiring reaches webhooks the same way.
  const events = runtime.events
  const webhooks = new WebhookService({ db: runtime.db, cipher: runtime.cipher, audit: runtime.audit, config: config.webhooks, log, ...(onWebhookAttempt ? { onAttempt: onWebhookAttempt } : {}) })
  const offs = [webhooks.bind(events)]
  if (role.admin) offs.push(bindKeyEvents(runtime.keys, events))
  webhooks.start()
  const a = config.anomalies
  // Under the key prefix, as every other name keygate uses in Redis (ioredis prefixes keys only).
  const channel = config.redis.key_prefix + config.redis.anomaly_channel
  const detector =
    role.gateway && a.enabled
      ? new AnomalyDetector({ db: runtime.db, thresholds: a, redis, windows, channel, events, log, checkIntervalMs: a.check_interval_ms, ipv6PrefixBits: config.rate_limits.ipv6_prefix_bits, ...(onAnomaly ? { onAnomaly } : {}) })
      : undefined
  const feed = role.admin ? new AnomalyFeed({ redis, channel, events, log, history: anomalyHistory(new AnomalyLog(runtime.db)), pollMs: config.admin.stream_poll_ms }) : undefined
  return {
    events,
    webhooks,
    detector,
    feed,
    async close() {
      feed?.close()
      await detector?.close()
      for (const off of offs) off()
      await webhooks.close()
    },
  }
}

/** The admin API's routes, and the closer of the Gitea and n8n clients behind them. */
function adminApi(config: Config, runtime: Runtime, denyList: DenyListService, lockout: Lockout, log: Logger, ev: ProcessEvents, usage?: UsageRecorder, onLockedOut?: () => void): { routes: AdminRoute[]; close(): Promise<void> } {
  const integrationDeps = { db: runtime.db, audit: runtime.audit, log, config }
  const gitea = new GiteaTokenService(integrationDeps)
  const n8n = new N8nKeyService(integrationDeps)
  const routes = createAdminApi({
    webhooks: ev.webhooks,
    ...(ev.feed ? { anomalyFeed: ev.feed } : {}),
    db: runtime.db,
    keys: runtime.keys,
    audit: runtime.audit,
    denyList,
    lockout,
    log,
    token: config.admin.token,
    maxBodyBytes: config.admin.max_body_bytes,
    maxStreamsPerCredential: config.admin.max_streams_per_credential,
    streamHeartbeatMs: config.admin.stream_heartbeat_s * 1000,
    ipv6PrefixBits: config.rate_limits.ipv6_prefix_bits,
    gitea,
    n8n,
    ...(usage ? { flushUsage: () => usage.flush() } : {}),
    ...(onLockedOut ? { onLockedOut } : {}),
  })
  return { routes, close: async () => void (await Promise.all([gitea.close(), n8n.close()])) }
}

/**
 * A process whose lockout no gateway of its own keeps current (`--only admin`, the `--workers`
 * primary) follows the lockouts and lifts the other instances publish; when messages may have
 * been missed, it reads those in force again. Before (found by a review), such a process never
 * heard of a lift made elsewhere: its admin API kept the address out, and its restore wrote the
 * lockout back into Redis at its next reconnection. Resolves with the closer.
 */
function followLockouts(redis: Redis, lockout: Lockout, config: Config, log: Logger): Promise<() => Promise<void>> {
  return subscribeInvalidations(redis, {
    // The lockout's own messages; it ignores the others (key and deny list changes).
    handler: (message) => lockout.applyMessage(message),
    onFlush: () => void lockout.reload(),
    // It holds no key cache: before (found by a review), its lines said it flushed one.
    flushes: { done: 'read the lockouts in force again', doing: 'reading the lockouts in force again' },
    checkIntervalMs: config.redis.invalidation_check_ms,
    log,
  })
}

/**
 * One lockout per process, shared by the gateway and the admin API (and across processes with
 * Redis). A worker counts in the primary's memory and tells the primary of each lockout, which
 * tells the other workers (so one machine locks an address out once, Redis or not).
 */
function processLockout(
  config: Config,
  redis: Redis | undefined,
  log: Logger,
  options: { onLockout?: () => void; onForgotten?: () => void; worker?: boolean; tell?: (message: string) => void; forgetShared?: (addressKey: string) => Promise<void> } = {},
): Lockout {
  return createLockout({
    maxAttempts: config.lockout.max_attempts,
    windowS: config.lockout.window_s,
    redis,
    log,
    ...(options.onLockout ? { onLockout: options.onLockout } : {}),
    ...(options.onForgotten ? { onForgotten: options.onForgotten } : {}),
    ...(options.worker ? { cluster: true, announce: (message: string) => process.send?.({ keygate: 'lock', message } satisfies FromWorker) } : {}),
    ...(options.tell ? { announce: options.tell } : {}),
    ...(options.forgetShared ? { forgetShared: options.forgetShared } : {}),
  })
}

function redisOf(config: Config, log: Logger): Redis | undefined {
  return config.redis.url ? connectRedis(config.redis.url, log, { commandTimeoutMs: config.redis.command_timeout_ms, keyPrefix: config.redis.key_prefix }) : undefined
}

/** The rotation scheduler and cleanup jobs, in a process that serves the admin API (one instance at a time does the work). */
function startScheduler(config: Config, runtime: Runtime, log: Logger, webhooks: WebhookService): Scheduler | undefined {
  if (!config.scheduler.enabled) return undefined
  const s = config.scheduler
  const scheduler = new Scheduler({
    db: runtime.db,
    keys: runtime.keys,
    audit: runtime.audit,
    events: runtime.events,
    log,
    intervalS: s.interval_s,
    noticeMs: s.rotation_notice_hours * 3_600_000,
    pruneRules: defaultPruneRules({ auditDays: config.audit.retention_days, anomalyDays: s.anomaly_retention_days, webhookDeliveryDays: s.webhook_delivery_retention_days, usageDays: s.usage_retention_days }),
    jobs: [
      { name: 'webhook-secrets', run: (now) => webhooks.tidySecrets(now) },
      { name: 'webhook-purge', run: (_now, stopping) => webhooks.purgeDeleted(stopping) },
    ],
  })
  scheduler.start()
  return scheduler
}

/** With the store's query timeout off, what the stop gives the store once the drain is over. */
const STOP_STORE_MS = 10_000

/** What a stop gives the store once the drain is over (see armStopBackstop). */
function storeStopMs(config: Config): number {
  return config.store.query_timeout_ms > 0 ? config.store.query_timeout_ms + 2000 : STOP_STORE_MS
}

/**
 * Once the drain is over, what is left to write (usage counts, the anomaly detector's last check,
 * webhook attempts in flight) and the store's connections to close get store.query_timeout_ms
 * and two seconds more, all of them together (a statement may take the timeout and a second, and
 * the usage counts it could not write are then logged): then the process exits with `code()`
 * whatever it still waits for, and says so. Before, each waited out its own timeouts one after
 * the other, and a new webhook round started meanwhile: with a store that stopped answering,
 * `serve` took 11 s to exit after a drain of none; and a webhook receiver that did not answer
 * held the exit for up to webhooks.timeout_ms (120 s allowed) after the drain, past a service
 * manager's stop timeout (found by reviews). A webhook attempt cut so is not lost: its lease
 * ends, and it is sent again. Returns the disarm.
 *
 * Armed first when the stop begins, with `drainMs` (the drain's deadline) more: what the drain
 * waits for beside the listeners, a scheduler round on a statement in flight, is bounded so too
 * (before, found by a review: with store.query_timeout_ms 0 and a store gone silent, the stop
 * waited for that statement for ever), then again, tighter, once the drain is over.
 */
function armStopBackstop(config: Config, log: Logger, code: () => number, usage: UsageRecorder | undefined, drainMs = 0): () => void {
  const ms = drainMs + storeStopMs(config)
  const timer = setTimeout(() => {
    const lost = usage?.unwritten()
    log.error('stopping takes too long: exiting without waiting any longer for the store or webhook receivers (usage counts not yet written are lost; webhook attempts in flight are sent again once their lease ends)', { waited_ms: ms, ...(lost ? { usage_lost: lost } : {}) })
    process.exit(code())
  }, ms)
  timer.unref()
  return () => clearTimeout(timer)
}

/** How long the process may stay after `stopped` before logStopped's timer ends it. */
const HELD_AFTER_STOP_MS = 1000

/**
 * Logs `stopped`, the last line of a stop, once everything was waited for: what still keeps the
 * process alive a second later is a handle nothing will close. A connection to a frozen PostgreSQL (SIGSTOP, a partition),
 * ended on keygate's side but never acknowledged by the server's, kept the process for as long as
 * the store stayed frozen, `stopped` logged, until the service manager's SIGKILL (found by a
 * failure review). The process then exits with the code `serve` returned (bin/keygate.ts sets it).
 */
function logStopped(log: Logger): void {
  log.info('stopped')
  const timer = setTimeout(() => {
    log.warn('stopped, but a connection (to the store, most likely) has not closed: exiting without it', { waited_ms: HELD_AFTER_STOP_MS })
    process.exit()
  }, HELD_AFTER_STOP_MS)
  timer.unref()
}

/**
 * Once the drain is over, the admin handlers still running (their connections cut at its deadline)
 * are waited for, up to the store's query timeout, before anything closes the store under them;
 * within what the stop gives the store (armStopBackstop), so a stop takes no longer than before.
 */
async function adminHandlersEnded(admin: http.Server | undefined, config: Config): Promise<void> {
  if (admin) await handlersEnded(admin, config.store.query_timeout_ms > 0 ? config.store.query_timeout_ms : STOP_STORE_MS)
}

/**
 * Stops a listener: no new connections, idle ones closed, as are those without a whole request
 * head (see closeWaiting), requests in flight given until `timeoutMs` and answered with Connection:
 * close (closeAfterAnswers), then every connection still open is ended (TLS ones still in their
 * handshake too).
 */
async function closeServer(server: http.Server | undefined, timeoutMs: number): Promise<void> {
  if (!server?.listening) return
  let deadline: NodeJS.Timeout | undefined
  let stopClosing = () => {}
  await new Promise<void>((resolve) => {
    server.close(() => resolve())
    server.closeIdleConnections()
    stopClosing = closeWaiting(server, timeoutMs)
    closeAfterAnswers(server)
    deadline = setTimeout(() => destroyConnections(server), timeoutMs)
  })
  clearTimeout(deadline)
  stopClosing()
}

/** `gatewayTls`: a worker's certificate, from its primary (otherwise the gateway's files are read). */
async function serveInstance(config: Config, log: Logger, io: Io, role: Role, mode: { worker: boolean; gatewayTls?: TlsSource | undefined }): Promise<number> {
  const stopping = stopSignal(log, { worker: mode.worker })
  const runtime = await openUnlessStopped(config, log, stopping)
  // The embedded store's thread gone for good (found by a review): every call failed from then
  // on while /healthz answered alive, and no service manager restarted keygate. It stops as on
  // SIGTERM and exits 1, so that Restart=on-failure (or a container's policy) starts it again.
  let storeLost: Error | undefined
  const lost = new Promise<string>((resolve) =>
    runtime.db.onLost((err) => {
      storeLost = err
      log.error('the embedded store stopped; keygate stops so that it is started again', { err })
      resolve('store_lost')
    }),
  )
  let shuttingDown = false
  let disarm: (() => void) | undefined
  let gateway: Gateway | undefined
  let admin: http.Server | undefined
  let api: ReturnType<typeof adminApi> | undefined
  let scheduler: Scheduler | undefined
  const redis = redisOf(config, log)
  // The admin API writes through this one; the gateway reads it, so a change applies to the next request.
  const denyList = new DenyListService({ db: runtime.db, audit: runtime.audit })
  // Key and deny list changes made here reach the other instances: published by this process
  // where it runs the admin API, until its very end, not by its gateway, whose drain may end
  // before the admin API's (before, found by a review, a revocation answered during the admin
  // API's drain was told to no other instance).
  const stopPublishing = redis && role.admin ? bindInvalidationPublisher({ redis, keys: runtime.keys, denyList, log }) : undefined
  const usage = role.gateway ? new UsageRecorder({ db: runtime.db, log, flushIntervalS: config.usage.flush_interval_s }) : undefined
  let metrics: ReturnType<typeof createGatewayMetrics> | undefined
  // The gateway's metrics hold the lockout's counters; an admin API alone makes them itself.
  let lockoutMetrics: ReturnType<typeof createLockoutMetrics> | undefined
  const lockout = processLockout(config, redis, log, {
    onLockout: () => lockoutMetrics?.lockouts.inc(),
    onForgotten: () => lockoutMetrics?.lockoutsForgotten.inc(),
    worker: mode.worker,
  })
  // Without Redis, a worker's counts are judged in the primary's windows, with its siblings'.
  const windows = mode.worker && !redis ? new ClusterWindows((m) => process.send?.(m satisfies FromWorker)) : undefined
  // Made with the registry below; every process delivers webhooks, a worker too.
  let webhookAttempt: ((outcome: WebhookAttemptOutcome, ended: boolean) => void) | undefined
  const ev = processEvents(config, runtime, redis, log, { gateway: role.gateway, admin: role.admin && !mode.worker }, (type) => metrics?.anomalies[type].inc(), windows, (outcome, ended) => webhookAttempt?.(outcome, ended))
  // Without Redis, a worker's anomalies reach the primary's SSE stream over cluster IPC.
  const offForward = mode.worker && !redis ? ev.events.on((e) => e.type === 'anomaly.detected' && process.send?.({ keygate: 'anomaly', anomaly: e.data as AnomalyJson } satisfies FromWorker)) : undefined
  let answerMetrics: ((m: WorkerMessage) => void) | undefined
  /** A worker's counts as it stops, told to the primary as its last message (see lastCountsTold). */
  let lastCounts: (() => Promise<MetricsJson>) | undefined
  const onPrimaryMessage = (m: WorkerMessage) => {
    if (m?.keygate === 'invalidate') gateway?.applyInvalidation(m.message)
    else if (m?.keygate === 'deny') gateway?.applyDenyChange(denyChangeFrom(m))
    else if (m?.keygate === 'windows-totals') windows?.receive(m)
  }
  let stopFollowing: (() => Promise<void>) | undefined
  try {
    // Logged once as the switch to in-process limits it is (`Redis answers again` follows).
    if (redis && !(await redisReady(redis, 3000))) redisHealth(redis).startedWithout()
    // A gateway follows them itself (gateway/index.ts).
    if (redis && !role.gateway) stopFollowing = await followLockouts(redis, lockout, config, log)
    if (role.admin) await bootstrapAdmin(runtime, config, io, log)
    const registry = createMetricsRegistry()
    webhookAttempt = createWebhookMetrics(registry)
    const probe = storeProbe(runtime, log)
    createHealthMetrics(registry, {
      store: storeAnswers(probe),
      // A gateway's own keygate_redis_up says whether its limits are shared; an admin-only
      // process's, whether Redis takes its writes (the admin lockout's, the invalidations it
      // publishes): a PING answered by a Redis that refused every write (OOM, READONLY) read 1.
      redis: redis && !role.gateway ? redisTakesWrites(redis) : undefined,
    })
    // The primary asks for this worker's metrics from the moment it listens (this comes first).
    if (mode.worker) {
      answerMetrics = (m: WorkerMessage) => {
        if (m?.keygate !== 'metrics') return
        void workerMetrics(registry, m.countsOnly).then(
          (metrics) => process.connected && process.send?.({ keygate: 'metrics', request: m.request, metrics } satisfies FromWorker),
          (err: unknown) => log.error('metrics for the primary failed', { err }),
        )
      }
      process.on('message', answerMetrics)
      lastCounts = () => workerMetrics(registry, true)
    }
    if (role.gateway) {
      metrics = createGatewayMetrics(registry, config.routes.map((r) => r.name))
      lockoutMetrics = metrics
      gateway = await createGateway({
        config,
        keys: runtime.keys,
        db: runtime.db,
        log,
        metrics,
        denyList,
        lockout,
        clusterLimits: mode.worker,
        usage: teeUsage(usage, ev.detector),
        events: ev.events,
        ...(redis ? { redis } : {}),
        publishChanges: !role.admin,
        createServer: (options) => createServer(mode.gatewayTls ?? (config.gateway.tls && tlsFiles(config.gateway.tls, log, 'gateway')), options),
      })
      if (mode.worker) {
        // What the primary's admin API changes reaches this worker from here on; and the lockouts
        // in force come first: the kernel sends this socket connections as soon as it listens,
        // and a worker that replaced one that died would let a locked-out address try again.
        process.on('message', onPrimaryMessage)
        await lockoutsInForce(log)
      }
      const at = await listen(gateway.server, config.gateway.listen, 'gateway.listen', { shared: mode.worker })
      log.info('gateway listening', { address: shown(at), routes: config.routes.map((r) => r.name), tls: Boolean(config.gateway.tls), max_connections: gateway.server.maxConnections ?? null })
      if (config.routes.length === 0) log.warn('no routes are configured: no request reaches an upstream; one that passes the checks (a valid key) is answered route_not_found (set KEYGATE_UPSTREAM or routes)')
      if (!mode.worker) warnOfConfig(config, log)
    }
    if (!mode.worker) {
      const routes: AdminRoute[] = healthRoutes({
        ready: readiness(probe, log),
        metrics: async () => ({ contentType: registry.contentType, body: await registry.metrics() }),
        isShuttingDown: () => shuttingDown,
      })
      if (role.admin) {
        lockoutMetrics ??= createLockoutMetrics(registry)
        api = adminApi(config, runtime, denyList, lockout, log, ev, usage, () => lockoutMetrics?.lockedOutRequests.inc())
        routes.push(...api.routes)
        scheduler = startScheduler(config, runtime, log, ev.webhooks)
      }
      admin = adminServer(config, role, routes, log)
      const at = await listen(admin, config.admin.listen, 'admin.listen')
      log.info(role.admin ? 'admin listening' : 'health and metrics listening', { address: shown(at), tls: Boolean(config.admin.tls) })
    }
    if (mode.worker) process.send?.({ keygate: 'ready' })
    const signal = await Promise.race([stopping.stopped, lost])
    shuttingDown = true
    log.info('shutting down', { signal, deadline_ms: config.gateway.shutdown_timeout_ms })
    // Open anomaly streams end first: the admin server closes only once its connections do.
    ev.feed?.close()
    ev.webhooks.stopPolling()
    const code = () => (storeLost || logLost ? EXIT_REFUSED : EXIT_OK)
    disarm = armStopBackstop(config, log, code, usage, config.gateway.shutdown_timeout_ms)
    await Promise.all([gateway?.shutdown(config.gateway.shutdown_timeout_ms), closeServer(admin, config.gateway.shutdown_timeout_ms), scheduler?.stop()])
    disarm()
    disarm = armStopBackstop(config, log, code, usage)
    await adminHandlersEnded(admin, config)
    await api?.close()
    await usage?.close()
    return code()
  } catch (err) {
    // A start that failed part-way (the admin address in use, say) stops what it had started,
    // so the process exits instead of serving without a store.
    await Promise.allSettled([gateway?.shutdown(0), closeServer(admin, 0), scheduler?.stop(), api?.close(), usage?.close()])
    throw err
  } finally {
    stopping.dispose()
    try {
      // The detector's last check runs while the IPC channel is still open: without Redis it
      // pools its counts in the primary and sends what it finds there.
      await ev.close()
      stopPublishing?.()
      await stopFollowing?.()
      redis?.disconnect()
      await runtime.close()
    } finally {
      process.off('message', onPrimaryMessage)
      if (answerMetrics) process.off('message', answerMetrics)
      offForward?.()
      if (mode.worker && lastCounts) await lastCountsTold(lastCounts, log)
      // Once everything has been waited for (before, it was logged before the store's
      // connections and webhook attempts were, and the process went on for seconds after).
      if (disarm) {
        disarm()
        logStopped(log)
      }
      // A worker's IPC channel, which would keep it alive now, is closed by bin/keygate.ts once
      // its exit code is known (Node's cluster ends a disconnected worker with process.exit(0)).
    }
  }
}

/**
 * A worker's last message to its primary, once its gateway has drained and its last anomaly check
 * ran: its counters and histograms as they end, which the primary keeps in place of those it last
 * read (at a scrape, or every 5 s). Before (found by a review), a worker stopped on its own
 * (SIGTERM to its pid) took what it counted since that read with it: 51 requests of 102 went
 * missing from /metrics once it was replaced. Resolved once the message is written to the channel
 * (the disconnect that follows would drop a write still pending) or could not be.
 */
async function lastCountsTold(counts: () => Promise<MetricsJson>, log: Logger): Promise<void> {
  if (!process.connected) return
  try {
    const metrics = await counts()
    // Its callback comes once the message is written, or with the channel's failure (false is
    // only the channel's backlog: the message is sent all the same).
    await new Promise<void>((resolve) => {
      if (!process.connected || !process.send) return resolve()
      process.send({ keygate: 'last-metrics', metrics } satisfies FromWorker, undefined, undefined, () => resolve())
    })
  } catch (err) {
    log.error("could not tell the primary this worker's last counts", { err: err as Error })
  }
}

/** What a worker tells its primary (rate-limiter-flexible's cluster messages are told apart by their `channel`). */
type FromWorker =
  | { keygate: 'config' }
  | { keygate: 'ready' }
  | { keygate: 'lockouts' }
  | { keygate: 'lock'; message: string }
  | { keygate: 'anomaly'; anomaly: AnomalyJson }
  | { keygate: 'metrics'; request: number; metrics: MetricsJson }
  | { keygate: 'last-metrics'; metrics: MetricsJson }
  | WindowsRequest

/** What the primary sends its gateway workers: their configuration and certificate, what its admin API changed, and the anomaly windows' totals. */
type WorkerMessage =
  | { keygate: 'config'; config: Config; tls: WireTls | null }
  | { keygate: 'tls'; tls: WireTls }
  | { keygate: 'invalidate'; message: string }
  | { keygate: 'lockouts-told' }
  | { keygate: 'deny'; action: DenyChange['action']; entry: Omit<DenyEntry, 'createdAt' | 'expiresAt'> & { createdAt: string; expiresAt: string | null } }
  | { keygate: 'metrics'; request: number; countsOnly: boolean }
  | WindowsAnswer

function denyChangeFrom(m: Extract<WorkerMessage, { keygate: 'deny' }>): DenyChange {
  return { action: m.action, entry: { ...m.entry, createdAt: new Date(m.entry.createdAt), expiresAt: m.entry.expiresAt === null ? null : new Date(m.entry.expiresAt) } }
}

/**
 * Asks the primary for the lockouts in force and waits until they are applied: the primary sends
 * each as an `invalidate` message, then `lockouts-told` (IPC keeps their order). Without an answer
 * in 5 s the worker starts anyway, and says so.
 */
function lockoutsInForce(log: Logger): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer)
      process.off('message', told)
      resolve()
    }
    const told = (m: WorkerMessage) => m?.keygate === 'lockouts-told' && done()
    const timer = setTimeout(() => {
      log.warn('the primary did not tell the lockouts in force within 5 s; listening without them')
      done()
    }, 5000)
    process.on('message', told)
    process.send?.({ keygate: 'lockouts' } satisfies FromWorker)
  })
}

/**
 * Sends to a worker that may have just died: `isConnected()` stays true for a SIGKILLed worker
 * until its channel is read to its end, and a send without a callback then raises EPIPE as an
 * 'error' on the Worker. The failure is dropped here: the worker's 'exit' follows, and replaces it.
 */
function sendTo(w: import('node:cluster').Worker, message: WorkerMessage): void {
  if (w.isConnected()) w.send(message, undefined, undefined, () => {})
}

function tellWorkers(workers: Iterable<import('node:cluster').Worker>, message: WorkerMessage): void {
  for (const w of workers) sendTo(w, message)
}

/**
 * Logs what `config check` warns of, once per start: each route whose scopes another route goes
 * around (Router.exposures), the upstream shortcut beside scoped routes, and each deny_list entry
 * that denies every client; by the gateway's process, or the primary of `--workers`.
 */
function warnOfConfig(config: Config, log: Logger): void {
  for (const e of new Router(config.routes).exposures()) log.warn(exposureWarning(e), { route: e.route, by: e.by, upstream_path: e.upstreamPath })
  const shortcut = shortcutWarning(config)
  if (shortcut !== undefined) log.warn(shortcut)
  for (const w of denyListWarnings(config.deny_list)) log.warn(w)
}

async function servePrimary(config: Config, log: Logger, io: Io, role: Role, workers: number): Promise<number> {
  // Its workers write to the same stdout: whole lines only (shareStdout).
  shareStdout()
  // The workers, which serve the gateway, do not tell it: each would.
  warnOfConfig(config, log)
  const live = new Set<import('node:cluster').Worker>()
  const listening = new Set<import('node:cluster').Worker>()
  const stopping = stopSignal(log, { worker: false })
  // The gateway's certificate is read and checked here, for every worker; a renewal (SIGHUP)
  // reaches them all, and a worker started later gets the pair in use.
  const gatewayTls = config.gateway.tls ? tlsFiles(config.gateway.tls, log, 'gateway') : undefined
  gatewayTls?.onRenewal((pair) => tellWorkers(live, { keygate: 'tls', tls: toWire(pair) }))
  const runtime = await openUnlessStopped(config, log, stopping)
  // However the primary ends (its stop's backstop, a second signal, a failure), no worker outlives
  // it: a frozen one (SIGSTOP, a hung event loop) ignores the disconnect that ends the others, and
  // stayed, orphaned, holding its share of the gateway's port (found by a failure review).
  process.on('exit', () => {
    for (const w of live) w.process.kill('SIGKILL')
  })
  let shuttingDown = false
  let disarm: (() => void) | undefined
  const redis = redisOf(config, log)
  const denyList = new DenyListService({ db: runtime.db, audit: runtime.audit })
  const stopPublishing = redis ? bindInvalidationPublisher({ redis, keys: runtime.keys, denyList, log }) : undefined
  // The primary delivers webhooks too: counted in its own registry (made below).
  let webhookAttempt: ((outcome: WebhookAttemptOutcome, ended: boolean) => void) | undefined
  const ev = processEvents(config, runtime, redis, log, { gateway: false, admin: role.admin }, undefined, undefined, (outcome, ended) => webhookAttempt?.(outcome, ended))
  // Without Redis: the workers' anomalies reach this admin API's stream, and their counts are
  // pooled here for the anomaly thresholds.
  const anomalyWindows = new MemoryWindows(config.anomalies.error_rate_window_s, config.anomalies.check_interval_ms)
  const onWorkerMessage = (w: import('node:cluster').Worker, m: FromWorker) => {
    if (m?.keygate === 'anomaly') ev.events.emit('anomaly.detected', m.anomaly)
    else if (m?.keygate === 'windows') {
      void answerWindows(anomalyWindows, m).then((answer) => sendTo(w, answer))
    }
  }
  if (!redis) cluster.on('message', onWorkerMessage)
  let stopFollowing: (() => Promise<void>) | undefined
  try {
    if (role.admin) await bootstrapAdmin(runtime, config, io, log)
    // The workers' metrics, with the counts of those that died (see ClusterMetrics).
    const clusterMetrics = new ClusterMetrics()
    let metricsRequests = 0
    const askingMetrics = new Map<number, { worker: import('node:cluster').Worker; answered: (metrics: MetricsJson | undefined) => void }>()
    // A worker's metrics, or undefined when it is ending; rejected when it does not answer in 5 s.
    const askMetrics = (w: import('node:cluster').Worker, countsOnly: boolean) =>
      new Promise<MetricsJson | undefined>((resolve, reject) => {
        if (!w.isConnected()) return resolve(undefined)
        const request = ++metricsRequests
        const timer = setTimeout(() => {
          askingMetrics.delete(request)
          reject(new Error(`gateway worker ${w.id} did not answer the metrics request within 5 s`))
        }, 5000)
        askingMetrics.set(request, {
          worker: w,
          answered: (metrics) => {
            clearTimeout(timer)
            askingMetrics.delete(request)
            resolve(metrics)
          },
        })
        w.send({ keygate: 'metrics', request, countsOnly } satisfies WorkerMessage, undefined, undefined, (err) => err && askingMetrics.get(request)?.answered(undefined))
      })
    /** Refreshes each worker left unanswered in a row; any answer, even a late one, clears its count. */
    const missed = new Map<import('node:cluster').Worker, number>()
    /** The workers the primary killed for not answering, counted as such when they exit. */
    const killed = new WeakSet<import('node:cluster').Worker>()
    const unanswered = (w: import('node:cluster').Worker, err: unknown) => {
      if (!listening.has(w)) return
      const misses = (missed.get(w) ?? 0) + 1
      missed.set(w, misses)
      if (misses < LIVENESS_MISSES) return void log.warn('a gateway worker did not report its metrics', { worker: w.id, misses, err })
      // SIGKILL ends a stopped process too; its exit starts the replacement as for any death.
      log.error('a gateway worker stopped answering; killing it so that another replaces it', { worker: w.id, misses, waited_s: (misses * METRICS_REFRESH_MS) / 1000 })
      killed.add(w)
      w.process.kill('SIGKILL')
    }
    // The workers' limits and lockout counts, when Redis is absent or down: one per machine.
    const forgetInWorkersMemory = clusterLimitsPrimary()
    // The primary's own metrics, added to the workers' in /metrics: its process's (before, left
    // out), its admin API's lockouts and ip_locked_out answers (before, a lockout begun by failed
    // admin credentials was not counted), and the workers it replaced.
    const own = createMetricsRegistry()
    webhookAttempt = createWebhookMetrics(own)
    const restarts = createWorkerRestartMetrics(own)
    // A registry of their own, read once the workers have answered (own's is read meanwhile: its
    // store probe takes up to 2 s, run beside the workers' answers, not after them).
    const stateRegistry = createMetricsRegistry({ defaultMetrics: false })
    const workerStates = createWorkerStateMetrics(stateRegistry, workers)
    // The primary's own store answers the admin API: its keygate_store_up joins the workers' (the
    // lowest is shown), and is there when no worker is live.
    const probe = storeProbe(runtime, log)
    createHealthMetrics(own, { store: storeAnswers(probe) })
    const ownLockout = role.admin ? createLockoutMetrics(own) : undefined
    // Failed admin credentials lock the address out of the workers' gateways too.
    const lockout = processLockout(config, redis, log, {
      tell: (message) => tellWorkers(live, { keygate: 'invalidate', message }),
      // A lift through this admin API: the workers' counts kept here go too.
      forgetShared: (addressKey) => forgetInWorkersMemory(LOCKOUT_KEY_PREFIX, addressKey),
      ...(ownLockout ? { onLockout: () => ownLockout.lockouts.inc(), onForgotten: () => ownLockout.lockoutsForgotten.inc() } : {}),
    })
    if (redis) stopFollowing = await followLockouts(redis, lockout, config, log)
    // A worker that ends before any has listened (its address in use, its store out of reach)
    // ends the start, with exit 1, as a single process would: restarting it could only fail again.
    let anyListened = false
    /** Workers in a row that ended before they listened, since one last did. */
    let failedStarts = 0
    let startFailed!: (why: string) => void
    const failedStart = new Promise<string>((r) => (startFailed = r))
    /** Replacements waiting to be started (a second after a worker died). */
    const replacing = new Set<NodeJS.Timeout>()
    const fork = () => {
      // Never once the shutdown began: a worker that died just before the signal was replaced
      // after the others had stopped, and served the gateway with the primary's store closed, and
      // the process never exited (found by a review).
      if (shuttingDown) return
      const w = cluster.fork()
      live.add(w)
      // What is sent without a callback (rate-limiter-flexible's answers to a worker's limiter
      // calls) to a worker that has just died fails as an 'error' on the Worker: unheard, it
      // ended the primary, and every worker with it (found by a review). The 'exit' replaces it.
      w.once('error', (err: Error) => {
        log.warn('could not send to a gateway worker; it is ending', { worker: w.id, err })
        w.on('error', () => {})
      })
      // A worker listens on its own socket (see listen), so the cluster's 'listening' is not sent.
      const onWorker = (m: FromWorker) => {
        if (m?.keygate === 'config') {
          sendTo(w, { keygate: 'config', config: workerConfig, tls: gatewayTls ? toWire(gatewayTls.pair) : null })
          return
        }
        if (m?.keygate === 'lockouts') {
          // Asked before it listens: a worker started after lockouts began (one that replaced a
          // worker that died) holds none of them, and nothing else would tell it until the
          // address failed there again. Those that begin later reach it as they reach all.
          for (const message of lockout.inForce()) sendTo(w, { keygate: 'invalidate', message })
          sendTo(w, { keygate: 'lockouts-told' })
          return
        }
        if (m?.keygate !== 'ready') return
        w.off('message', onWorker)
        anyListened = true
        failedStarts = 0
        listening.add(w)
      }
      w.on('message', onWorker)
      // Its counts join the departed total once nothing more can come from it: when it has both
      // exited and closed its channel, whichever the primary sees last. Its last message (its
      // counts as it stopped; see lastCountsTold) is read before the channel's end, but its exit
      // may be seen before either.
      let ends = 0
      const ended = () => void (++ends === 2 && clusterMetrics.depart(w.id))
      w.once('disconnect', ended)
      w.on('exit', (code, signal) => {
        ended()
        live.delete(w)
        const listened = listening.delete(w)
        missed.delete(w)
        for (const asking of askingMetrics.values()) if (asking.worker === w) asking.answered(undefined)
        if (shuttingDown) return
        if (!anyListened) {
          log.error('a gateway worker ended before any listened; stopping', { worker: w.id, code, signal })
          startFailed('start-up failed')
          return
        }
        // One that never listened (its configuration invalid since, say) would fail again at once:
        // each such start in a row waits twice as long, up to 30 s.
        if (!listened) failedStarts++
        const delayMs = Math.min(1000 * 2 ** failedStarts, 30_000)
        log.error('gateway worker died; starting another', { worker: w.id, code, signal, in_ms: delayMs })
        restarts[killed.has(w) ? 'unresponsive' : 'exited'].inc()
        const timer = setTimeout(() => {
          replacing.delete(timer)
          fork()
        }, delayMs)
        timer.unref()
        replacing.add(timer)
      })
    }
    // Changes made through this admin API reach the workers at once over cluster IPC: key
    // changes as invalidations, deny list changes whole, so no worker waits for a reload.
    const stopTelling = bindInvalidations({ keys: runtime.keys, publish: (message) => tellWorkers(live, { keygate: 'invalidate', message }) })
    // A worker's lockout reaches its siblings (and this admin API) at once.
    const onWorkerMessage = (from: import('node:cluster').Worker, m: FromWorker) => {
      if (m?.keygate === 'metrics') {
        missed.delete(from)
        const asking = askingMetrics.get(m.request)
        if (asking?.worker !== from) return
        clusterMetrics.keep(from.id, m.request, m.metrics)
        asking.answered(m.metrics)
        return
      }
      if (m?.keygate === 'last-metrics') return void clusterMetrics.last(from.id, m.metrics)
      if (m?.keygate !== 'lock') return
      lockout.applyMessage(m.message)
      tellWorkers([...live].filter((w) => w !== from), { keygate: 'invalidate', message: m.message })
    }
    cluster.on('message', onWorkerMessage)
    const stopDeny = denyList.onChange(({ action, entry }) =>
      tellWorkers(live, { keygate: 'deny', action, entry: { ...entry, createdAt: entry.createdAt.toISOString(), expiresAt: entry.expiresAt?.toISOString() ?? null } }),
    )
    const storeReady = readiness(probe, log)
    const routes = healthRoutes({
      // Ready once every worker listens (a forked one may still be loading).
      ready: async () => {
        if (listening.size < workers) return `${listening.size} of ${workers} gateway workers listening`
        const unanswering = [...listening].filter((w) => (missed.get(w) ?? 0) > 0).length
        return unanswering > 0 ? `${workers - unanswering} of ${workers} gateway workers answering` : storeReady()
      },
      metrics: async () => {
        // Every listening worker is asked; one that does not answer within 5 s (stuck, until the
        // liveness check kills it) is counted `unanswering` and its last counts stand in for it.
        // (Before, found by a review, it failed the whole scrape with a 500 for the 15 to 20 s the
        // worker took to be killed: every other worker's series went missing with it.) A worker
        // still starting has no listener for the request yet, and is left out (it has counted
        // nothing). Only while none listens (the start, or every worker being replaced at once)
        // does a scrape wait for them, 8 s at most. (Before, also found by a review, it waited for
        // any worker starting: a replacement waiting for the store, as long as
        // store.start_wait_s, made every scrape take 8 s for the whole of a store outage, past
        // Prometheus's usual scrape timeout.)
        // A replacement waiting to be forked (a second or more after its worker died) is starting
        // too: before, found by a review, it was in no state, and a scrape while every worker waited
        // so answered at once with none starting, answering or unanswering.
        const waiting = () => live.size + replacing.size
        for (let waited = 0; waited < 8000 && listening.size === 0 && waiting() > 0; waited += 50) await new Promise((r) => setTimeout(r, 50))
        const answers = new Map<number, MetricsJson>()
        const starting = waiting() - listening.size
        // One the liveness check already found unanswering is not waited for again (each scrape
        // took 5 s while a worker was frozen, then the primary's own probe): its last counts stand in.
        const asked = [...listening].filter((w) => (missed.get(w) ?? 0) === 0)
        let unanswering = listening.size - asked.length
        const [ownMetrics] = await Promise.all([
          own.getMetricsAsJSON() as unknown as Promise<MetricsJson>,
          ...asked.map(async (w) => {
            const metrics = await askMetrics(w, false).catch((err: unknown) => {
              unanswering++
              log.warn('a gateway worker did not answer the scrape; its last counts stand in', { worker: w.id, err })
              return undefined
            })
            if (metrics) answers.set(w.id, metrics)
          }),
        ])
        // A worker that ended meanwhile answers nothing and is neither: it is gone (its
        // replacement counts as starting at the next scrape).
        workerStates({ starting, answering: answers.size, unanswering })
        const sum = clusterMetrics.sum(answers, [...ownMetrics, ...((await stateRegistry.getMetricsAsJSON()) as unknown as MetricsJson)])
        return { contentType: sum.contentType, body: await sum.metrics() }
      },
      isShuttingDown: () => shuttingDown,
    })
    const api = role.admin ? adminApi(config, runtime, denyList, lockout, log, ev, undefined, () => ownLockout?.lockedOutRequests.inc()) : undefined
    if (api) routes.push(...api.routes)
    const admin = adminServer(config, role, routes, log)
    // Bound before any worker starts: a start that fails here (the address in use) leaves no
    // gateway serving without its primary.
    const bound = async () => ({ at: await listen(admin, config.admin.listen, 'admin.listen'), gateway: await reserveGatewayAddress(config.gateway.listen) })
    const { at, gateway } = await bound().catch(async (err: unknown) => {
      await closeServer(admin, 0)
      await api?.close()
      stopTelling()
      stopDeny()
      cluster.off('message', onWorkerMessage)
      throw err
    })
    log.info(role.admin ? 'admin listening' : 'health and metrics listening', { address: shown(at), workers })
    // What every worker runs: this configuration, on the gateway address reserved above.
    const workerConfig: Config = { ...config, gateway: { ...config.gateway, listen: gateway } }
    const scheduler = role.admin ? startScheduler(config, runtime, log, ev.webhooks) : undefined
    // WORKER_PRELOAD: a send to this primary once it is gone does not end a worker with a stack trace.
    cluster.setupPrimary({ exec: process.argv[1] as string, args: process.argv.slice(2), execArgv: [...process.execArgv, '--require', WORKER_PRELOAD], silent: false })
    for (let i = 0; i < workers; i++) fork()
    // The last counts of a worker that is killed are those of the last scrape or of this refresh,
    // which is also the workers' liveness check (see LIVENESS_MISSES).
    const refreshMetrics = setInterval(() => {
      for (const w of listening) {
        const asked = new Date()
        askMetrics(w, true)
          .then(
            // When it was asked: what the worker counted before then is in what was kept.
            (read) => void (read && log.debug("kept a gateway worker's counts", { worker: w.id, asked_at: asked.toISOString() })),
            (err: unknown) => unanswered(w, err),
          )
          .catch(() => {})
      }
    }, METRICS_REFRESH_MS)
    refreshMetrics.unref()
    let failed = false
    const signal = await Promise.race([stopping.stopped, failedStart.then((why) => ((failed = true), why))])
    shuttingDown = true
    clearInterval(refreshMetrics)
    for (const timer of replacing) clearTimeout(timer)
    replacing.clear()
    log.info('shutting down workers', { signal })
    const exited = [...live].map((w) => new Promise<void>((resolve) => w.once('exit', () => resolve())))
    for (const w of live) w.process.kill('SIGTERM')
    ev.feed?.close()
    ev.webhooks.stopPolling()
    const code = () => (failed || logLost ? EXIT_REFUSED : EXIT_OK)
    // The workers drain as one would, and then have their own bound (the drain, the store's, the
    // second a held process is given, and one more): a worker still there after it does not run
    // (frozen: SIGSTOP, a hung event loop) and is killed, so that the primary's stop goes on.
    // Before, the primary's backstop ended it, about 28 s on, and left the frozen worker behind.
    const workerBoundMs = config.gateway.shutdown_timeout_ms + storeStopMs(config) + HELD_AFTER_STOP_MS + 1000
    const stuck = setTimeout(() => {
      for (const w of live) {
        log.error('a gateway worker did not stop within its bound; killing it', { worker: w.id, waited_ms: workerBoundMs })
        w.process.kill('SIGKILL')
      }
    }, workerBoundMs)
    stuck.unref()
    disarm = armStopBackstop(config, log, code, undefined, workerBoundMs + 1000)
    await Promise.all([...exited, closeServer(admin, config.gateway.shutdown_timeout_ms), scheduler?.stop()])
    clearTimeout(stuck)
    disarm()
    disarm = armStopBackstop(config, log, code, undefined)
    await adminHandlersEnded(admin, config)
    await api?.close()
    stopTelling()
    stopDeny()
    cluster.off('message', onWorkerMessage)
    return code()
  } finally {
    stopping.dispose()
    cluster.off('message', onWorkerMessage)
    await ev.close()
    stopPublishing?.()
    await stopFollowing?.()
    redis?.disconnect()
    await runtime.close()
    if (disarm) {
      disarm()
      logStopped(log)
    }
  }
}
