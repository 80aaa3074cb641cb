// The gateway: an http.Server whose request path is a list of stages built once from the
// frozen config (a disabled feature is absent from the list, not an `if` per request):
//   request id → request check → client address → deny list → lockout → rate limit per
//   address → key extraction → validation → rate limit per key → route and scope → forward.
// The runner walks the list by index, synchronously until a stage returns a promise, and the
// first verdict (an error code returned, never thrown) ends the request.
import type http from 'node:http'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { Redis } from 'ioredis'
import type { Config } from '../config/schema.ts'
import type { Db } from '../core/db.ts'
import { ERRORS } from '../core/errors.ts'
import type { EventBus } from '../core/events.ts'
import { DenyListService, type DenyChange } from '../core/deny-list.ts'
import { batchItems, bindInvalidationPublisher, changedKeys, subscribeInvalidations } from '../core/invalidation.ts'
import type { KeyService } from '../core/keys/service.ts'
import { keyPrefixes } from '../core/keys/format.ts'
import type { Logger } from '../core/log.ts'
import { createRedisMetrics, NO_ROUTE, type GatewayMetrics } from '../core/metrics.ts'
import { redisHealth } from '../core/redis.ts'
import { NO_USAGE, type UsageSink } from '../core/usage.ts'
import { createClientAddressStage, untrustedProxyWarner } from './client-address.ts'
import { capConnections } from './connection-cap.ts'
import { createDenyListStage, DenyMatcher } from './deny-list.ts'
import { createForwarder } from './forward.ts'
import { cachedKeys, KeyCache } from './key-cache.ts'
import { createKeyExtractStage, keySources } from './key-extract.ts'
import { createLockout, type Lockout } from '../core/lockout.ts'
import { createLockoutStage } from './lockout.ts'
import { createAddressRateLimitStage, createKeyLimiters, createKeyRateLimitStage, rateLimitNotifier } from './rate-limit.ts'
import { createRequestCheckStage, GATEWAY_ALLOW } from './request-check.ts'
import { createRequestIdGenerator, createRequestIdStage } from './request-id.ts'
import { afterResponses, answerClientError, clientErrorCode, closeWaiting, closingError, destroyConnections, hasBody, headersTimeoutOptions, isTlsFailure, nodeHttp, rawError, trackConnections } from '../core/http.ts'
import { keyChallenges, logAccess, loggedPath, record, recordClientClosed, sendError, socketAddress } from './respond.ts'
import { createPreflightStage, createRouteStage, Router } from './route.ts'
import { FORWARD_NOW, RequestState, type GatewayContext, type Stage, type Verdict } from './state.ts'
import { startStoreCheck } from './store-check.ts'
import { TunnelGuard } from './tunnels.ts'
import { createValidateStage } from './validate.ts'

export interface GatewayDeps {
  config: Config
  keys: KeyService
  db: Db
  log: Logger
  metrics: GatewayMetrics
  /** ioredis client: shared rate limits and lockouts, cross-instance invalidation. */
  redis?: Redis
  /** A `serve --workers` worker: limits and lockout counts live in the cluster primary's memory when Redis is not there. */
  clusterLimits?: boolean
  /** How often the invalidation version counter in Redis is checked for missed messages (ms, 0: never). */
  invalidationCheckMs?: number
  /** How often the store is read for keys changed since the last read (ms, 0: never); else `cache.store_check_s`. */
  storeCheckMs?: number
  /** The clock (tests). */
  now?: () => Date
  /** The deny list service the admin API writes through, so its changes apply at once; else a read-only one on `db`. */
  denyList?: DenyListService
  /** The lockout shared with the admin API (`serve` passes one); else the gateway makes its own. */
  lockout?: Lockout
  /** Per-key request counts and rejections for the admin API's reports. */
  usage?: UsageSink
  /**
   * Publish this process's key and deny list changes on Redis for the other instances (default
   * true). `serve` publishes them itself where the process runs the admin API too: a change the
   * admin API makes while it drains, after the gateway's drain has ended, must still go out.
   */
  publishChanges?: boolean
  /** Domain events: `rate_limit.exceeded` (debounced per key) is emitted here. */
  events?: EventBus
  /** Makes the server (an https one for TLS); `http.createServer` otherwise. */
  createServer?: (options: http.ServerOptions) => http.Server
}

export interface Gateway {
  /** Not yet listening: the caller listens. */
  server: http.Server
  /** Stops accepting, lets in-flight requests finish within `timeoutMs`, closes idle keep-alive connections, then force-closes the rest. */
  shutdown(timeoutMs: number): Promise<void>
  invalidateKey(id: string): void
  invalidateAll(): void
  refreshDenyList(): Promise<void>
  /** Applies a deny list change made by another process at once (before the reload it starts). */
  applyDenyChange(change: DenyChange): void
  /** Applies an invalidation message (`key:<id>`, `keys:<id>,…`, `hash:<sha256>`, `hashes:<sha256>,…`, `deny`, `all`, `lock:<until>:<address>`) from another process. */
  applyInvalidation(message: string): void
  /** One store check now, as its timer makes them (gateway/store-check.ts); at once if one is running. */
  checkStore(): Promise<void>
}

const HEALTH_OK = JSON.stringify({ status: 'ok' })
const HEALTH_STOPPING = JSON.stringify({ status: 'stopping' })


/** The path an access-log line gives of a request answered before it was read whole (loggedPath; CONNECT's authority: null). */
function unreadPath(req: http.IncomingMessage | undefined): string | null {
  const target = req?.url
  return target === undefined || req?.method === 'CONNECT' ? null : loggedPath(target)
}

export async function createGateway(deps: GatewayDeps): Promise<Gateway> {
  const { config, keys, log, metrics, redis } = deps
  const g = config.gateway
  const clock = deps.now
  const now: () => number = clock ? () => clock().getTime() : Date.now
  const router = new Router(config.routes)
  const routeMetrics = router.routes.map((r) => metrics.route(r.name))
  const ctx: GatewayContext = { metrics, routeMetrics, log, router, accessLog: config.log.access_log, challenges: keyChallenges(config.gateway.key_sources), usage: deps.usage ?? NO_USAGE, now, closing: false, cut: false }
  const nextId = createRequestIdGenerator()

  const cluster = deps.clusterLimits === true
  const lockout =
    deps.lockout ?? createLockout({ maxAttempts: config.lockout.max_attempts, windowS: config.lockout.window_s, redis, cluster, log, onLockout: () => metrics.lockouts.inc(), onForgotten: () => metrics.lockoutsForgotten.inc() })
  const limiterFor = createKeyLimiters(config.rate_limits.per_key, redis, cluster)
  const cache = new KeyCache({
    keys,
    ttlS: config.cache.ttl_s,
    capacity: config.cache.max_capacity,
    negativeTtlS: config.cache.negative_ttl_s,
    negativeMax: config.cache.negative_max,
    metrics,
    build: cachedKeys(router.routes.length, limiterFor),
  })
  metrics.cacheEntries = () => cache.size

  const denyService = deps.denyList ?? new DenyListService({ db: deps.db, ...(clock ? { now: clock } : {}) })
  const deny = new DenyMatcher(config.deny_list)
  const sources = keySources({ sources: g.key_sources, queryParam: g.query_param, apiKeyHeader: g.api_key_header })

  const fixedHead: Stage[] = [
    createRequestIdStage({ accept: g.accept_request_id, next: nextId }),
    createRequestCheckStage({ maxHeaders: g.max_headers }),
    createClientAddressStage({ trustedProxies: g.trusted_proxies, ipv6PrefixBits: config.rate_limits.ipv6_prefix_bits, onUntrustedProxy: untrustedProxyWarner(log, now) }),
  ]
  const denyStage = createDenyListStage(deny, now)
  const fixedTail: Stage[] = [
    createLockoutStage(lockout, metrics),
    createAddressRateLimitStage({ limit: config.rate_limits.per_address.limit, windowS: config.rate_limits.per_address.window_s, redis, cluster, metrics }),
    // Only where a route forwards CORS preflights: absent otherwise.
    ...(router.routes.some((r) => r.corsPreflight) ? [createPreflightStage(router, sources)] : []),
    createKeyExtractStage(sources),
    createValidateStage({
      cache,
      prefixes: keyPrefixes(config.keys.prefix, config.keys.previous_prefixes),
      acceptLegacy: config.keys.accept_legacy,
      revealKeyStatus: g.reveal_key_status,
      lockout,
      metrics,
      log,
      now,
    }),
    createKeyRateLimitStage({ metrics, onExceeded: deps.events ? rateLimitNotifier(deps.events, config.webhooks.rate_limit_debounce_s * 1000, now) : undefined }),
    createRouteStage(router),
  ]
  // The deny list stage exists only while the list has entries; every change and reload checks
  // the stages against the list as it is then (not as it was before an await).
  let denyOn = false
  const build = (): readonly Stage[] => {
    denyOn = deny.size > 0
    return Object.freeze(denyOn ? [...fixedHead, denyStage, ...fixedTail] : [...fixedHead, ...fixedTail])
  }
  let stages = build()
  const guard = new TunnelGuard({ keys, now, log, recheckMs: config.cache.ttl_s * 1000, denied: (address) => deny.size > 0 && deny.denied(address, now()) })
  // The gauge and the stages follow the size, which an expiry changes between reloads too; open
  // tunnels are checked again only when the entries in force changed (not at every reload).
  const matchDeny = (changed = true): void => {
    metrics.denyListEntries.set(deny.size)
    if (denyOn !== deny.size > 0) stages = build()
    if (changed && deny.size > 0) guard.denyChanged()
  }

  // Changes applied here since a reload began make what it read stale: it reads again instead of
  // putting the old list back (a few tries; the periodic reload catches up after that).
  let denyChanges = 0
  let refreshing: Promise<void> | undefined
  // A reload reads the store's change mark (migration 0014) and reads the rows only when it is not
  // the mark the last full read began with: before, found by a review, every reload read every
  // row, 26 to 156 ms of this process's CPU and some 34 ms of PostgreSQL's with 20,000 entries,
  // every deny_list_refresh_s with nothing changed. Every path that applies a change still reloads:
  // a change made here or announced by another instance has changed the mark by then (it committed
  // first), and an announcement during the mark's read makes it read again (denyChanges). What a
  // read left out as expired comes back only with a read: a clock set back before the last full
  // read's time reads again. No mark (a schema before 0014): every reload reads the rows, as before.
  let readMark: string | undefined
  let readAtMs = -Infinity
  let warnedNoMark = false
  const refreshDenyList = (): Promise<void> => {
    refreshing ??= (async () => {
      try {
        for (let attempt = 0; attempt < 3; attempt++) {
          const seen = denyChanges
          const mark = await denyService.changeMark()
          if (seen !== denyChanges) continue
          const atMs = now()
          if (mark !== undefined && mark === readMark && atMs >= readAtMs) {
            matchDeny(deny.expire(atMs))
            return
          }
          if (mark === undefined && !warnedNoMark) {
            warnedNoMark = true
            log.warn('the store has no deny list change mark (migration 0014); every reload reads the whole deny list')
          }
          const list = await denyService.ranges()
          if (seen !== denyChanges) continue
          // Compared in slices, then only what changed applied (gateway/deny-list.ts): before, found
          // by a review, a change of one entry among 20,000 had every process compare them all and
          // rebuild its whole index in one piece, 45 to 90 ms of a stalled event loop on PostgreSQL.
          const changed = deny.commit(await deny.compareInSlices(list), now())
          if (changed === undefined || seen !== denyChanges) continue
          readMark = mark
          readAtMs = atMs
          matchDeny(changed)
          return
        }
      } catch (err) {
        metrics.storeErrors.denyList.inc()
        log.warn('could not reload the deny list; keeping the previous one', { err: err as Error })
      } finally {
        refreshing = undefined
      }
    })()
    return refreshing
  }
  await refreshDenyList()

  const forwarder = createForwarder({ ctx, router, stripCredential: g.strip_credential, keySources: sources, tunnelIdleMs: g.tunnel_idle_timeout_s * 1000, bodyIdleMs: g.body_idle_timeout_ms, sendIdleMs: g.send_timeout_ms, maxResponseHeaderBytes: g.max_response_header_bytes, guard, setRealIp: g.set_x_real_ip })
  metrics.openTunnels = () => forwarder.tunnels.values()

  const failed = (s: RequestState, err: unknown): void => {
    log.error('gateway stage failed', { request_id: s.id, err: err as Error })
    if (s.id === '') s.id = nextId()
    sendError(ctx, s, 'internal_error')
  }
  // Synchronous while the stages answer synchronously (a cached key, in-memory or leased limits);
  // a stage that has to wait returns a promise, and the walk goes on from the next stage of the
  // same list once it settles (a reload may have built a new list meanwhile).
  const run = (s: RequestState, last: (s: RequestState) => void, list: readonly Stage[] = stages, from = 0): void => {
    try {
      for (let i = from; i < list.length; i++) {
        const verdict = (list[i] as Stage)(s)
        if (verdict === undefined) continue
        if (typeof verdict === 'string') {
          sendError(ctx, s, verdict)
          return
        }
        if (verdict === FORWARD_NOW) break
        // The walk's rest under the same catch as here: a throw in it would otherwise reject the
        // promise then() returns, which nothing handles, and end the process.
        verdict.then(
          (v) => {
            try {
              if (v === undefined) run(s, last, list, i + 1)
              else if (v === FORWARD_NOW) last(s)
              else sendError(ctx, s, v)
            } catch (err) {
              failed(s, err)
            }
          },
          (err: unknown) => failed(s, err),
        )
        return
      }
      last(s)
    } catch (err) {
      failed(s, err)
    }
  }

  const server = (deps.createServer ?? nodeHttp().createServer)({
    maxHeaderSize: g.max_header_bytes,
    ...headersTimeoutOptions(g.headers_timeout_ms),
    // An idle connection's life between requests (Node's own was 5 s, shorter than the idle
    // timeout of the load balancers in front, which then reused connections closed under them).
    keepAliveTimeout: g.keep_alive_timeout_ms,
    // No limit on a whole request: a large upload that keeps moving is not cut (Node's default
    // cut every request at 300 s, body included). A stalled body is the forwarder's to end
    // (gateway.body_idle_timeout_ms).
    requestTimeout: 0,
    joinDuplicateHeaders: true,
    // request-check.ts answers a missing Host with the JSON error instead of Node's bare 400.
    requireHostHeader: false,
    // Only a WebSocket upgrade is taken; any other offer (`Upgrade: h2c` from curl --http2 or
    // Java's HttpClient on http://) is ignored and the request served over HTTP/1.1, as RFC 9110
    // §7.8 allows and nginx and Kong do (before, found by a review: 400 on every such request).
    // The option is Node's from 22.21 and 24.9; an older Node leaves upgradeProblem's 400.
    shouldUpgradeCallback: isWebSocketOffer,
  })
  // One more than allowed, so "too many" can be seen (Node silently drops header lines past this count).
  server.maxHeadersCount = g.max_headers + 1
  capConnections(server, { configured: g.max_connections, log, metrics })

  // The request of each body being read: a parser error inside it (a malformed chunk, the
  // client's end part-way) is that request's, counted and logged once under its route and id.
  const reading = new WeakMap<http.IncomingMessage, RequestState>()

  const forward = forwarder.forward
  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    // An Upgrade offer declined (any but WebSocket's, shouldUpgradeCallback below): Node's parser
    // stops at the end of such a request and drops the rest of what it had read, so a request
    // pipelined behind it was lost, or the later bytes of one (its body) read as a request of their
    // own (found by a review). The answer closes the connection, and any request the parser still
    // finds on it after the offer is neither forwarded nor answered: its response waits behind the
    // offer's, which closes the connection, and it is recorded client_closed then, as a request
    // pipelined behind any answer that closes it (forward.ts). Before (found by a review), such a
    // request destroyed the connection at once, and with it the answer to the offer, which the
    // upstream had been sent.
    const socket = req.socket as Socket & { [DECLINED_UPGRADE]?: true }
    if (socket[DECLINED_UPGRADE]) {
      const dropped = new RequestState(req, res, undefined, undefined, performance.now())
      dropped.id = nextId()
      res.once('close', () => recordClientClosed(ctx, dropped))
      return
    }
    if (req.headers.upgrade !== undefined) {
      socket[DECLINED_UPGRADE] = true
      res.shouldKeepAlive = false
    }
    // Only a probe's GET (or HEAD) is the gateway's own: any other method on /healthz is an
    // application's request, checked and forwarded (before, a POST or DELETE was answered 200 here).
    if (req.url === '/healthz' && (req.method === 'GET' || req.method === 'HEAD') && req.httpVersionMajor === 1) {
      const body = ctx.closing ? HEALTH_STOPPING : HEALTH_OK
      res.writeHead(ctx.closing ? 503 : 200, { 'content-type': 'application/json; charset=utf-8', 'content-length': body.length, 'cache-control': 'no-store', ...(ctx.closing ? { connection: 'close' } : {}) })
      res.end(body)
      return
    }
    const s = new RequestState(req, res, undefined, undefined, performance.now())
    if (hasBody(s.headers)) reading.set(req, s)
    run(s, forward)
  }
  server.on('request', onRequest)
  // Expect: 100-continue is answered only once the request has passed every check.
  server.on('checkContinue', onRequest)

  const upgrade = forwarder.upgrade
  // An upgrade, a CONNECT and a request that does not parse are answered on the socket itself,
  // not through Node's queue of responses: each waits for the responses to the requests pipelined
  // before it (afterResponses), or its answer would land in front of theirs or inside one.
  server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    socket.on('error', () => socket.destroy())
    const start = performance.now()
    afterResponses(socket, () => {
      const s = new RequestState(req, undefined, socket, head, start)
      // An earlier response closed the connection, or the client did: recorded client_closed, as a
      // request pipelined so is (forward.ts; before, found by a review, in no count or log).
      if (!socket.writable) {
        socket.destroy()
        s.id = nextId()
        recordClientClosed(ctx, s)
        return
      }
      // An upgrade whose head ends once the stop has begun: a tunnel opened now would be cut at
      // the deadline, so it is refused as one the client may try again, on another instance
      // (before, found by a review, 400 bad_request, which a client takes for a fault of its own).
      if (ctx.closing) {
        s.id = nextId()
        sendError(ctx, s, 'shutting_down')
        return
      }
      const refusal = upgradeProblem(req)
      if (refusal !== undefined) {
        s.id = nextId()
        s.message = refusal
        sendError(ctx, s, 'bad_request')
        return
      }
      // Key changes counted from here: one made while the upstream answers is checked as the tunnel opens.
      const changes = guard.changes
      run(s, (checked) => upgrade(checked, changes))
    })
  })

  // Answers given before any request state (CONNECT, a bad Expect, a request the parser refused):
  // counted, timed and logged as record() does, under no route, from when Node handed the request
  // (or the parser's error) over to the answer. The access line has the socket's address (no
  // X-Forwarded-For is read) and, of a request the parser refused, no method or path; before, it
  // had no line at all (SPEC §1: one per request).
  const none = metrics.route(NO_ROUTE)
  const countUnrouted = (code: Verdict, start: number, id: string, socket: Duplex, req?: http.IncomingMessage): void => {
    none.requests[code].inc()
    const ms = performance.now() - start
    none.duration.observe(ms / 1000)
    if (config.log.access_log) {
      logAccess(log, { id, method: req?.method, path: unreadPath(req), status: ERRORS[code].status, outcome: code, route: NO_ROUTE, address: socketAddress(socket as Partial<Socket>), keyId: null, ms })
    }
  }

  server.on('connect', (req: http.IncomingMessage, socket: Duplex) => {
    // Node takes its own error listener off a socket it hands to 'connect': without one, a client
    // that resets the connection was an uncaught error, the end of the process.
    socket.on('error', () => socket.destroy())
    const start = performance.now()
    afterResponses(socket, () => {
      const id = nextId()
      countUnrouted('method_not_allowed', start, id, socket, req)
      rawError(socket, 'method_not_allowed', id, { allow: GATEWAY_ALLOW })
    })
  })

  // An Expect other than 100-continue: the JSON error of SPEC §3, counted, where Node would send
  // an empty 417 of its own. Nothing is read of the request or checked.
  server.on('checkExpectation', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const id = nextId()
    countUnrouted('expectation_failed', performance.now(), id, req.socket, req)
    const e = closingError('expectation_failed', id)
    res.writeHead(e.status, e.headers)
    res.end(e.body)
  })

  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    if (err.code === 'ECONNRESET' || isTlsFailure(err)) {
      socket.destroy()
      return
    }
    const start = performance.now()
    answerClientError(socket, (pending) => {
      // The body of a request being answered broke: not a request of its own, without route or
      // method, beside that one's own count (before, found by a review, each such upload was
      // counted twice, logged twice, and answered under an id the upstream never saw).
      const s = pending !== undefined ? reading.get(pending.req) : undefined
      if (s !== undefined) {
        bodyRefused(s, err, socket)
        return
      }
      const code = clientErrorCode(err)
      const id = nextId()
      countUnrouted(code, start, id, socket)
      log.debug('refused a malformed request', { code: err.code ?? null })
      rawError(socket, code, id)
    })
  })

  trackConnections(server)

  /**
   * A request's body the parser gave up on, before its answer began. The client's end part-way
   * through it: the client went away (client_closed, recorded as the request's connection
   * closes). A malformed body: 400 bad_request, as this request, once.
   */
  const bodyRefused = (s: RequestState, err: NodeJS.ErrnoException, socket: Duplex): void => {
    if (err.code === 'HPE_INVALID_EOF_STATE' || s.recorded) {
      socket.destroy()
      return
    }
    record(ctx, s, 'bad_request', ERRORS.bad_request.status)
    log.debug('refused a malformed request body', { request_id: s.id, code: err.code ?? null })
    rawError(socket, 'bad_request', s.id)
  }

  // An open WebSocket tunnel's key is read again whenever the key changes. Many keys at once go
  // in one store read per 500 tunnelled keys (and are marked in the cache together): a pass over
  // the cache per key cost (keys changed) x (keys cached), seconds of a stalled event loop for an
  // import (a review).
  const invalidateKeys = (ids: ReadonlySet<string>) => {
    cache.invalidateKeys(ids)
    guard.keysChanged(ids)
  }
  const invalidateKey = (id: string) => invalidateKeys(new Set([id]))
  const invalidateAll = () => {
    cache.invalidateAll()
    guard.recheckAll()
  }
  const offKeys = keys.onChanges((changes) => {
    const { ids, hashes } = changedKeys(changes)
    for (const hash of hashes) cache.invalidateHash(hash)
    invalidateKeys(ids)
  })
  const applyDenyChange = (change: DenyChange): void => {
    denyChanges++
    deny.apply(change, now())
    matchDeny()
    void refreshDenyList()
  }
  const offDeny = denyService.onChange(applyDenyChange)
  const timer = setInterval(() => void refreshDenyList(), g.deny_list_refresh_s * 1000)
  timer.unref()

  // Another instance changed the list: a reload already in flight may have read it before the
  // change, so it is counted as a change (the reload reads again) rather than joined.
  const denyChangedElsewhere = (): void => {
    denyChanges++
    void refreshDenyList()
  }
  // Messages may have been missed: drop every cached key, re-read the deny list and the lockouts.
  const flushAll = (): void => {
    invalidateAll()
    denyChangedElsewhere()
    void lockout.reload()
  }
  // Key ids from other processes are gathered while a burst of messages is read (what one read
  // of the socket or the IPC channel holds) and dropped together once it is: an older keygate
  // sends one message per key, and so does this one for a few keys. Nothing else runs before
  // the microtask, so no request is answered from an entry a message already dropped.
  let changedElsewhere: Set<string> | undefined
  const keysChangedElsewhere = (ids: Iterable<string>): void => {
    if (changedElsewhere === undefined) {
      const gathered = (changedElsewhere = new Set())
      queueMicrotask(() => {
        changedElsewhere = undefined
        invalidateKeys(gathered)
      })
    }
    for (const id of ids) changedElsewhere.add(id)
  }
  const applyInvalidation = (message: string): void => {
    if (message === 'all') flushAll()
    else if (message === 'deny') denyChangedElsewhere()
    else if (message.startsWith('key:')) keysChangedElsewhere([message.slice(4)])
    else if (message.startsWith('keys:')) keysChangedElsewhere(batchItems(message))
    else if (message.startsWith('hash:')) cache.invalidateHash(message.slice(5))
    else if (message.startsWith('hashes:')) for (const hash of batchItems(message)) cache.invalidateHash(hash)
    // `lock:` and `unlock:` (the lockout ignores whatever else it is given).
    else lockout.applyMessage(message)
  }

  // The backstop for messages lost on the way (gateway/store-check.ts): keys changed in the store
  // since the last read are dropped, whatever happened to Redis.
  const storeCheckMs = deps.storeCheckMs ?? config.cache.store_check_s * 1000
  const storeCheck = startStoreCheck({
    db: deps.db,
    intervalMs: storeCheckMs,
    log,
    // A key cached after its change (loaded from the row as the change left it) is kept: dropped,
    // a key created, rotated or changed just before it was cached was dropped by the next check,
    // and a store outage then refused it 503 where keys cached earlier went on (found by a chaos
    // review). Open tunnels are checked for every changed key all the same.
    onChanged: (changed) => {
      const kept = cache.dropChanged(changed)
      if (kept < changed.length) log.debug('the store check dropped changed keys from the cache', { keys: changed.length - kept, kept })
      guard.keysChanged(new Set(changed.map((k) => k.id)))
    },
    onOverflow: invalidateAll,
  })
  if (storeCheckMs > 0) void storeCheck.check()

  let stopSubscription: (() => Promise<void>) | undefined
  let stopPublishing: (() => void) | undefined
  let stopWatching: (() => void) | undefined
  if (redis) {
    const redisMetrics = createRedisMetrics(metrics.registry)
    const health = redisHealth(redis)
    redisMetrics.up.set(health.up ? 1 : 0)
    // Started without Redis: limits run from memory, counted and logged as a switch.
    if (health.startedWithout()) redisMetrics.fallbacks.inc()
    stopWatching = health.onChange((up) => {
      redisMetrics.up.set(up ? 1 : 0)
      if (!up) redisMetrics.fallbacks.inc()
    })
    if (deps.publishChanges !== false) stopPublishing = bindInvalidationPublisher({ redis, keys, denyList: denyService, log })
    stopSubscription = await subscribeInvalidations(redis, {
      handler: applyInvalidation,
      onFlush: (reason) => {
        redisMetrics.flushes[reason].inc()
        flushAll()
      },
      checkIntervalMs: deps.invalidationCheckMs ?? config.redis.invalidation_check_ms,
      log,
    })
    await lockout.load()
  }

  let stopping: Promise<void> | undefined
  const shutdown = (timeoutMs: number): Promise<void> => {
    stopping ??= (async () => {
      ctx.closing = true
      const closed = new Promise<boolean>((resolve) => server.close(() => resolve(true)))
      server.closeIdleConnections()
      const stopClosing = closeWaiting(server, timeoutMs)
      // Connections become idle as their last response ends; close them as they do.
      const sweep = setInterval(() => server.closeIdleConnections(), 25)
      let deadline: NodeJS.Timeout | undefined
      const timedOut = new Promise<boolean>((resolve) => {
        deadline = setTimeout(() => resolve(false), timeoutMs)
      })
      const clean = await Promise.race([closed, timedOut])
      clearInterval(sweep)
      clearTimeout(deadline)
      stopClosing()
      // Only now: while the others drain, open tunnels are still held to their checks, and those
      // follow key and deny list changes (this process's, Redis's, the store check's). Before
      // (found by a review), these stopped as the drain began, and a key revoked or an address
      // deny-listed during it kept its tunnels until the deadline (up to 600 s).
      clearInterval(timer)
      storeCheck.stop()
      offKeys()
      offDeny()
      stopPublishing?.()
      stopWatching?.()
      await stopSubscription?.()
      guard.stop()
      if (clean) {
        await forwarder.close()
      } else {
        log.warn('shutdown deadline passed; closing the remaining connections', { timeout_ms: timeoutMs })
        // What is still unanswered is cut by the gateway: cut_at_shutdown, not client_closed.
        ctx.cut = true
        destroyConnections(server)
        await forwarder.destroy()
      }
    })()
    return stopping
  }

  return { server, shutdown, invalidateKey, invalidateAll, refreshDenyList, applyInvalidation, applyDenyChange, checkStore: storeCheck.check }
}

/** Marks a connection whose request offered an Upgrade the gateway declined (onRequest). */
const DECLINED_UPGRADE = Symbol('keygate.declinedUpgrade')

/**
 * An upgrade to WebSocket: the one the gateway takes (the hop-by-hop Upgrade of any other is
 * dropped). Not in an HTTP/1.0 request, whose Upgrade a server ignores (RFC 9110 §7.8; WebSocket
 * needs HTTP/1.1, RFC 6455 §4.1): before (found by a review), one went upstream as an HTTP/1.1
 * upgrade, and its client was answered 101, a status HTTP/1.0 has not.
 */
function isWebSocketOffer(req: http.IncomingMessage): boolean {
  return req.httpVersionMinor !== 0 && req.headers.upgrade?.toLowerCase() === 'websocket'
}

/**
 * Why an upgrade request is not proxied, if it is not: only a WebSocket opening handshake is, and
 * that is a GET without a body (RFC 6455 §4.1). Before (found by a review), a `POST` upgrade with
 * `Content-Length: 3` reached the upstream as a request without a body, and its 3 bytes followed
 * the 101 as tunnel data: a request the upstream framed otherwise than the client had.
 */
function upgradeProblem(req: http.IncomingMessage): string | undefined {
  if (!isWebSocketOffer(req)) return 'Only WebSocket upgrades are proxied.'
  if (req.method !== 'GET') return 'A WebSocket upgrade must be a GET (RFC 6455 §4.1).'
  if (hasBody(req.headers)) return 'A WebSocket upgrade must not have a body (RFC 6455 §4.1).'
  // The upstream's 101 must answer it (forward.ts): without one, no answer is a WebSocket server's.
  if (!req.headers['sec-websocket-key']) return 'A WebSocket upgrade must have a Sec-WebSocket-Key (RFC 6455 §4.1).'
  return undefined
}
