// The Redis connection of a keygate process. Commands fail at once while it is down (no offline
// queue), so the rate limiters' in-memory insurance takes over instead of requests waiting;
// reconnection goes on in the background with a capped backoff.
//
// RedisHealth says whether the shared limits are in use. It turns `down` on the first sign of
// trouble (the connection drops, or a limiter call fails or is slower than the command
// timeout); from then on limiter calls go straight to the insurance limiter without trying Redis
// (so a paused Redis costs one timeout, not one per request), and a probe every `probeMs` brings
// the shared limits back once Redis takes a write by a Lua script in time, as the limiters and the
// lockout's restore need: a PING alone let a Redis that answers but refuses writes (maxmemory
// with noeviction, a demoted replica, an ACL) take them back every 250 ms and fail the next call,
// about four switches and three log lines a second per process, with keygate_redis_up reading 1
// while nothing was shared (found by a review). A switch back that fails again at once (a refusal
// the probe cannot see) doubles the wait before the next probe, up to `maxProbeMs`, and belongs to
// the same outage: one warning for it, and one line when Redis is back for good.
import { createRequire } from 'node:module'
import type { Redis } from 'ioredis'
import { OneOut, TimedOut, within } from './deadline.ts'
import type { Logger } from './log.ts'

// ioredis is loaded as a connection is made: a keygate without Redis (the embedded default, and
// every CLI command) never needs it, and loading it cost about 0.1 s of CPU at each serve start.
const requireHere = createRequire(import.meta.url)

/**
 * How long a client's disconnect() waits for its socket to close before destroying it (ioredis's
 * `disconnectTimeout`, 2 s by default). ioredis arms that timer on the client's last socket even
 * when it has closed already (Redis down: the client is reconnecting, or gave up), and nothing
 * clears it then: a `serve` stopped while Redis was down was held past its stop (logging that a
 * connection "to the store, most likely" had not closed, a second later), and a CLI command 2 s
 * (found by a review). A socket that is open closes within this on any working network; one that
 * does not (a frozen Redis) is destroyed, as it was after 2 s.
 */
export const DISCONNECT_TIMEOUT_MS = 200

/**
 * The Redis connection of `serve`. `keyPrefix` (redis.key_prefix) is put before every key of every
 * command by ioredis itself (scripts' KEYS, transactions and rate-limiter-flexible's commands
 * included); channels and SCAN patterns it leaves alone, so those are prefixed where they are named
 * (core/invalidation.ts, core/lockout.ts, the anomaly channel in cli/serve.ts).
 */
export function connectRedis(url: string, log: Logger, options: { commandTimeoutMs?: number; keyPrefix?: string } = {}): Redis {
  const { Redis: RedisClient } = requireHere('ioredis') as typeof import('ioredis')
  const redis = new RedisClient(url, {
    keyPrefix: options.keyPrefix ?? '',
    enableOfflineQueue: false,
    // No auto-pipelining: with rate-limit leases (core/limiters.ts) a request rarely issues a
    // command, and wrapping each in a pipeline cost more than it saved.
    maxRetriesPerRequest: 1,
    connectTimeout: 2000,
    // TCP keepalive: a connection that a proxy or NAT dropped without closing is found (by the
    // kernel, within minutes) even when nothing is sent on it, as on a subscriber connection.
    keepAlive: 10_000,
    disconnectTimeout: DISCONNECT_TIMEOUT_MS,
    // Reconnects within half a second at most, about the health PING's pace: at 2 s, limits
    // stayed on the insurance for up to 2 s after a restarted Redis answered (found by a review).
    retryStrategy: (times) => Math.min(100 * 2 ** Math.min(times, 5), 500),
  })
  redisHealth(redis, { log, ...(options.commandTimeoutMs ? { timeoutMs: options.commandTimeoutMs } : {}) })
  // A database the server does not have (redis://host/99 where it has 16): ioredis reports the
  // refused SELECT and goes on in database 0, among whatever else is kept there. Before (found by
  // a review), keygate ran on it without a word but a subscriber's warning: two deployments told
  // apart by their database shared their limits, lockouts and invalidation counters. Now the
  // connection is closed for good, said once; limits and lockouts are each instance's own.
  redis.on('error', (err: Error) => {
    if (!/DB index is out of range/.test(err.message) || redis.status === 'end') return
    log.error(`Redis has no database ${redis.options.db ?? 0} (redis.url): keygate does not use it, and limits and lockouts are each instance's own, in memory; name a database the server has, or set redis.key_prefix to share one, and restart`, { err })
    redis.disconnect()
  })
  return redis
}

/** 'refused': Redis answers, but refused the probe's write (OOM, READONLY, NOPERM, a script refused). */
export type DownReason = 'unreachable' | 'timeout' | 'error' | 'refused'

/** The key the probe writes: under keygate's prefix (an ACL that lets keygate write its keys lets it), gone after HEALTH_TTL_MS. */
export const HEALTH_KEY = 'keygate:health'
const HEALTH_TTL_MS = 10_000
/**
 * The probe: a SET with PX, from a Lua script, as the limiters (rate-limiter-flexible's script)
 * and the lockout's restore (core/lockout.ts) write; then a MULTI/EXEC, as the limiters' reads
 * and blocks (rate-limiter-flexible's get and block) run theirs (the anomaly counts run scripts). A Redis
 * over maxmemory with noeviction (OOM), a replica (READONLY) or an ACL that refuses writes,
 * scripts or transactions refuses it, where it answers PING. (An ACL that refuses EVALSHA alone
 * refuses nothing keygate needs: ioredis runs a script it was refused with EVAL.)
 */
const HEALTH_SCRIPT = "return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])"

/** The probe's write and transaction: resolves once Redis took both, rejects with Redis's refusal. */
export async function writeHealthKey(redis: Redis): Promise<void> {
  await redis.eval(HEALTH_SCRIPT, 1, HEALTH_KEY, '1', HEALTH_TTL_MS)
  // Before (found by a review), an ACL that refused MULTI or EXEC passed the probe, and every
  // switch back to Redis failed at its first read of a limit.
  const replies = await redis.multi().pttl(HEALTH_KEY).exec()
  const refused = replies?.find(([err]) => err !== null)?.[0]
  if (replies === null || refused) throw refused ?? new Error('Redis discarded the health probe\'s transaction')
}
/** A switch back is held once no call failed for this many probe intervals after it; a failure sooner is the same outage going on. */
const SETTLE_PROBES = 4
/** The longest wait between probes after switches back that failed at once, in probe intervals (8 s at 250 ms). */
const MAX_PROBE_FACTOR = 32

/** The warning an outage is logged with, once (whichever way it began: a failed call, a refused probe, a start without Redis). */
const NOT_ANSWERING = 'Redis is not answering: rate limits and lockouts fall back to this process until it does'

export interface RedisHealthOptions {
  log?: Logger
  /** A limiter call slower than this is answered by the insurance limiter. */
  timeoutMs?: number
  /** How often a probe checks whether Redis takes keygate's writes again, while it is down. */
  probeMs?: number
  /** The longest wait between probes, reached by doubling after each switch back that failed at once (default 32 probe intervals). */
  maxProbeMs?: number
}

export class RedisHealth {
  readonly #redis: Redis
  readonly timeoutMs: number
  readonly #probeMs: number
  readonly #maxProbeMs: number
  #log: Logger | undefined
  #up: boolean
  #probe: NodeJS.Timeout | undefined
  /** The wait between probes now: probeMs, doubled after each switch back that failed at once. */
  #probeEvery: number
  #probing = false
  #warned = false
  /** Set while a switch back has not yet held for SETTLE_PROBES intervals: a failure now is a relapse. */
  #settling: NodeJS.Timeout | undefined
  /** This outage has had a relapse: `Redis answers again` waits until a switch back holds. */
  #relapsed = false
  /** This outage's probe refusal was logged (once an outage, as the warning). */
  #refusalLogged = false
  /**
   * The probe's write while Redis has not answered it, past its timeout too: no other is sent
   * beside it (OneOut). Before (found by a review), each probe added its script and transaction to
   * those held, some 16 commands a second for as long as Redis stayed frozen where nothing
   * reconnected (the invalidation check off).
   */
  readonly #probeOut = new OneOut()
  readonly #listeners = new Set<(up: boolean, reason?: DownReason) => void>()

  constructor(redis: Redis, options: RedisHealthOptions = {}) {
    this.#redis = redis
    this.#log = options.log
    this.timeoutMs = options.timeoutMs ?? 200
    this.#probeMs = options.probeMs ?? 250
    this.#maxProbeMs = Math.max(this.#probeMs, options.maxProbeMs ?? this.#probeMs * MAX_PROBE_FACTOR)
    this.#probeEvery = this.#probeMs
    this.#up = redis.status === 'ready'
    if (!this.#up) this.#startProbe()
    redis.on('error', () => this.down('unreachable'))
    redis.on('close', () => this.down('unreachable'))
    redis.on('ready', () => void this.#check())
    // Closed for good (shutdown, or no more retries): nothing left to probe.
    redis.on('end', () => this.close())
  }

  set log(log: Logger | undefined) {
    this.#log ??= log
  }

  /** Whether limiter calls go to Redis. */
  get up(): boolean {
    return this.#up
  }

  /** Called with each switch: `false` to the insurance limiter, `true` back to Redis. */
  onChange(listener: (up: boolean, reason?: DownReason) => void): () => void {
    this.#listeners.add(listener)
    return () => this.#listeners.delete(listener)
  }

  down(reason: DownReason, err?: Error): void {
    // 'end': closed on purpose (shutdown).
    if (!this.#up || this.#redis.status === 'end') return
    this.#up = false
    if (this.#settling !== undefined) {
      // The switch back failed at once: Redis answers the probe but refuses what keygate needs
      // (e.g. an ACL on the limiters' keys, a script refused). Probed less often, and the same
      // outage: said once, at info, as `Redis answers again` was; then at debug.
      clearTimeout(this.#settling)
      this.#settling = undefined
      this.#probeEvery = Math.min(this.#probeEvery * 2, this.#maxProbeMs)
      const line = 'Redis refused a call right after it answered again: rate limits and lockouts stay in this process; it is probed less often until a switch back holds (logged once until it is back)'
      if (this.#relapsed) this.#log?.debug(line, { reason, nextProbeMs: this.#probeEvery, ...(err ? { err } : {}) })
      else this.#log?.info(line, { reason, nextProbeMs: this.#probeEvery, ...(err ? { err } : {}) })
      this.#relapsed = true
    } else {
      this.#warned = true
      this.#refusalLogged = false
      this.#log?.warn(NOT_ANSWERING, { reason, ...(err ? { err } : {}) })
    }
    for (const l of this.#listeners) l(false, reason)
    this.#startProbe()
  }

  /**
   * A process that starts to use its limits without Redis (not connected yet, or not at all)
   * starts on the insurance: a switch like any other, logged once, and `Redis answers again`
   * follows when it comes. True when it is so (the caller counts the switch); false when Redis is
   * connected (the probe that switches to it may still be out).
   */
  startedWithout(): boolean {
    if (this.#up || this.#redis.status === 'ready' || this.#redis.status === 'end') return false
    if (!this.#warned) {
      this.#warned = true
      this.#log?.warn(NOT_ANSWERING, { reason: 'unreachable', at: 'start-up' })
    }
    return true
  }

  #startProbe(): void {
    if (this.#probe) return
    this.#probe = setInterval(() => void this.#check(), this.#probeEvery)
    this.#probe.unref()
  }

  async #check(): Promise<void> {
    if (this.#up || this.#probing || this.#probeOut.out || this.#redis.status !== 'ready') return
    this.#probing = true
    try {
      if (!(await this.#takesWrites()) || this.#up) return
      this.#up = true
      clearInterval(this.#probe)
      this.#probe = undefined
      // Only a switch back can fail at once: the first connection of a process that has not yet
      // been without Redis is none, and a failure right after it is an outage like any other
      // (before, it was logged as a relapse, at info, and no warning was ever given).
      if (this.#warned) {
        this.#settling = setTimeout(() => this.#held(), this.#probeMs * SETTLE_PROBES)
        this.#settling.unref()
      }
      // After a relapse, said once the switch back holds (#held).
      if (this.#warned && !this.#relapsed) this.#log?.info('Redis answers again: rate limits and lockouts are shared across instances again')
      for (const l of this.#listeners) l(true)
    } catch {
      // A listener failed; the switch back stands (#takesWrites does not throw).
    } finally {
      this.#probing = false
    }
  }

  /** Whether Redis took the probe's write in time; a refusal is logged (once an outage). */
  async #takesWrites(): Promise<boolean> {
    try {
      await within(this.#probeOut.send(writeHealthKey(this.#redis)), this.timeoutMs, 'Redis health probe')
      return true
    } catch (err) {
      // Not in time, or the connection went meanwhile: as a PING not answered, nothing to say.
      if (err instanceof TimedOut || this.#redis.status !== 'ready') return false
      if (!this.#warned) {
        // Connected to a Redis that refused from the start: no switch was logged yet.
        this.#warned = true
        this.#log?.warn(NOT_ANSWERING, { reason: 'refused' satisfies DownReason, err: err as Error })
      } else if (!this.#refusalLogged) {
        this.#log?.debug('Redis answers but refuses the health probe\'s write; probing again (logged once until it is back)', { err: err as Error })
      }
      this.#refusalLogged = true
      return false
    }
  }

  /** The switch back has held: the outage is over. */
  #held(): void {
    this.#settling = undefined
    this.#probeEvery = this.#probeMs
    this.#refusalLogged = false
    if (this.#relapsed && this.#up) this.#log?.info('Redis answers again: rate limits and lockouts are shared across instances again')
    this.#relapsed = false
  }

  close(): void {
    clearInterval(this.#probe)
    this.#probe = undefined
    clearTimeout(this.#settling)
    this.#settling = undefined
  }
}

const healths = new WeakMap<Redis, RedisHealth>()

/** The one RedisHealth of a connection (made on first use). */
export function redisHealth(redis: Redis, options: RedisHealthOptions = {}): RedisHealth {
  let h = healths.get(redis)
  if (!h) {
    h = new RedisHealth(redis, options)
    healths.set(redis, h)
  } else h.log = options.log
  return h
}

/**
 * Waits up to `ms` for the first connection; start-up goes on without Redis if it does not come.
 * False at once when the client gives up (`end`: a retryStrategy that does not retry, as the CLI's,
 * refused or unreachable), where before it waited out `ms` for a connection that could not come.
 */
export function redisReady(redis: Redis, ms: number): Promise<boolean> {
  if (redis.status === 'ready') return Promise.resolve(true)
  if (redis.status === 'end') return Promise.resolve(false)
  return new Promise((resolve) => {
    const settle = (ready: boolean) => {
      clearTimeout(timer)
      redis.off('ready', onReady)
      redis.off('end', onEnd)
      resolve(ready)
    }
    const timer = setTimeout(() => settle(false), ms)
    const onReady = () => settle(true)
    const onEnd = () => settle(false)
    redis.once('ready', onReady)
    redis.once('end', onEnd)
  })
}

/**
 * A connection of its own for a subscriber (a subscribed Redis connection can do nothing else),
 * which subscribes again itself on each 'ready' (keepSubscribed). Not ioredis's own resubscription
 * on a reconnection: it leaves Redis's answer unhandled, and Redis 7 closes a subscriber's
 * connection as an ACL takes its channel away, so the NOPERM the resubscription then got was an
 * unhandled rejection that ended the process (found by a review).
 */
export function subscriberConnection(redis: Redis): Redis {
  return redis.duplicate({ autoResubscribe: false })
}

/** How often a subscription Redis refused (keepSubscribed) is asked again. */
export const REFUSED_SUBSCRIBE_RETRY_MS = 1000

export interface KeepSubscribedOptions {
  log: Logger | undefined
  /** What the process does while Redis refuses the subscription (the warning says it). */
  meanwhile: string
  /** What flows on the channel (the line that says it flows again names it). */
  flowing: string
  /** Each SUBSCRIBE Redis took: the first connection's and each one's after a reconnection. */
  onSubscribed: () => unknown
  /** A SUBSCRIBE that failed with the connection (asked again at the next 'ready'). */
  onFailed?: (err: unknown) => void
}

/**
 * Subscribes `sub` (a subscriberConnection) to `channel` on each 'ready'; returns what stops it.
 * A subscription Redis answers and refuses (a ReplyError: an ACL user without the channel, Redis
 * 7's default for a new user) brings no 'ready' to ask again on, its connection staying up: it is
 * warned of once, with what the process does meanwhile, asked again every
 * REFUSED_SUBSCRIBE_RETRY_MS until Redis takes it, and said when it does. The invalidations' and
 * the anomaly feed's subscribers share it. Before (found by a review), each was never asked again
 * while the connection stayed up, and nothing said so; then each wrote this loop itself.
 */
export function keepSubscribed(sub: Redis, channel: string, o: KeepSubscribedOptions): () => void {
  let refused = false
  let retry: NodeJS.Timeout | undefined
  let stopped = false
  const cancel = (): void => {
    clearTimeout(retry)
    retry = undefined
  }
  const subscribe = (): void => {
    cancel()
    if (stopped) return
    sub.subscribe(channel).then(
      () => {
        // Answered after the subscription was stopped (its connection closing): nothing follows
        // it. Before (found by a review), a closed gateway flushed its cache once more.
        if (stopped) return
        if (refused) o.log?.info(`${o.flowing} flow again: Redis took the subscription it refused`, { channel })
        refused = false
        return o.onSubscribed()
      },
      (err: unknown) => {
        if (stopped) return
        if ((err as Error | undefined)?.name !== 'ReplyError') return o.onFailed?.(err)
        if (!refused) {
          // An ACL's refusal is NOPERM; anything else (a proxy or a server without SUBSCRIBE, its
          // command renamed away) is no ACL's doing, and its own words say what it is.
          const { message } = err as Error
          const until = /^NOPERM\b/.test(message) ? `: until it is granted (ACL SETUSER <user> &${channel})` : ` (${message.slice(0, 200).trim()}): until it takes it`
          o.log?.warn(`Redis refused the subscription to ${channel}${until}, ${o.meanwhile}; asked again every ${REFUSED_SUBSCRIBE_RETRY_MS / 1000} s`, { err: err as Error })
        }
        refused = true
        if (retry !== undefined) return
        retry = setTimeout(subscribe, REFUSED_SUBSCRIBE_RETRY_MS)
        retry.unref()
      },
    ).catch((err: unknown) => {
      // A callback that threw or rejected (onSubscribed is async in core/invalidation.ts). Before
      // (found by a review), nothing handled it: an unhandled rejection, which ends the process.
      o.log?.warn(`a handler of the subscription to ${channel} failed; the subscription stands`, { err: err as Error })
    })
  }
  sub.on('ready', subscribe)
  return () => {
    stopped = true
    cancel()
    sub.off('ready', subscribe)
  }
}
