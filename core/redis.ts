// The Redis connection of a keygate process. Commands fail at once while it is down (no offline
// queue), so the rate limiters' in-memory insurance takes over instead of requests waiting;
// reconnection goes on in the background with a capped backoff.
//
// RedisHealth says whether the shared limits are in use. It turns `down` on the first sign of
// trouble (the connection drops, or a limiter call fails or is slower than the command
// timeout); from then on limiter calls go straight to the insurance limiter without trying Redis
// (so a paused Redis costs one timeout, not one per request), and a PING every `probeMs` brings
// the shared limits back once Redis answers in time. Each switch is logged once.
import { Redis } from 'ioredis'
import { answersWithin } from './deadline.ts'
import type { Logger } from './log.ts'

export function connectRedis(url: string, log: Logger, options: { commandTimeoutMs?: number } = {}): Redis {
  const redis = new Redis(url, {
    enableOfflineQueue: false,
    // No auto-pipelining: with rate-limit leases (core/limiters.ts) a request rarely issues a
    // command, and wrapping each in a pipeline cost more than it saved.
    maxRetriesPerRequest: 1,
    connectTimeout: 2000,
    // TCP keepalive: a connection that a proxy or NAT dropped without closing is found (by the
    // kernel, within minutes) even when nothing is sent on it, as on a subscriber connection.
    keepAlive: 10_000,
    // Reconnects within half a second at most, about the health PING's pace: at 2 s, limits
    // stayed on the insurance for up to 2 s after a restarted Redis answered (found by a review).
    retryStrategy: (times) => Math.min(100 * 2 ** Math.min(times, 5), 500),
  })
  redisHealth(redis, { log, ...(options.commandTimeoutMs ? { timeoutMs: options.commandTimeoutMs } : {}) })
  return redis
}

export type DownReason = 'unreachable' | 'timeout' | 'error'

export interface RedisHealthOptions {
  log?: Logger
  /** A limiter call slower than this is answered by the insurance limiter. */
  timeoutMs?: number
  /** How often a PING checks whether Redis is back, while it is down. */
  probeMs?: number
}

export class RedisHealth {
  readonly #redis: Redis
  readonly timeoutMs: number
  readonly #probeMs: number
  #log: Logger | undefined
  #up: boolean
  #probe: NodeJS.Timeout | undefined
  #probing = false
  #warned = false
  readonly #listeners = new Set<(up: boolean, reason?: DownReason) => void>()

  constructor(redis: Redis, options: RedisHealthOptions = {}) {
    this.#redis = redis
    this.#log = options.log
    this.timeoutMs = options.timeoutMs ?? 200
    this.#probeMs = options.probeMs ?? 250
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
    this.#warned = true
    this.#log?.warn('Redis is not answering: rate limits and lockouts fall back to this process until it does', { reason, ...(err ? { err } : {}) })
    for (const l of this.#listeners) l(false, reason)
    this.#startProbe()
  }

  /**
   * A process that starts to use its limits without Redis (not connected yet, or not at all)
   * starts on the insurance: a switch like any other, logged once, and `Redis answers again`
   * follows when it comes. True when it is so (the caller counts the switch); false when Redis is
   * connected (the PING that switches to it may still be out).
   */
  startedWithout(): boolean {
    if (this.#up || this.#redis.status === 'ready' || this.#redis.status === 'end') return false
    if (!this.#warned) {
      this.#warned = true
      this.#log?.warn('Redis is not answering: rate limits and lockouts fall back to this process until it does', { reason: 'unreachable', at: 'start-up' })
    }
    return true
  }

  #startProbe(): void {
    if (this.#probe) return
    this.#probe = setInterval(() => void this.#check(), this.#probeMs)
    this.#probe.unref()
  }

  async #check(): Promise<void> {
    if (this.#up || this.#probing || this.#redis.status !== 'ready') return
    this.#probing = true
    try {
      if (!(await answersWithin(() => this.#redis.ping(), this.timeoutMs)) || this.#up) return
      this.#up = true
      clearInterval(this.#probe)
      this.#probe = undefined
      if (this.#warned) this.#log?.info('Redis answers again: rate limits and lockouts are shared across instances again')
      for (const l of this.#listeners) l(true)
    } catch {
      // A listener failed; the switch back stands (answersWithin itself does not throw).
    } finally {
      this.#probing = false
    }
  }

  close(): void {
    clearInterval(this.#probe)
    this.#probe = undefined
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

/** Waits up to `ms` for the first connection; start-up goes on without Redis if it does not come. */
export function redisReady(redis: Redis, ms: number): Promise<boolean> {
  if (redis.status === 'ready') return Promise.resolve(true)
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      redis.off('ready', onReady)
      resolve(false)
    }, ms)
    const onReady = () => {
      clearTimeout(timer)
      resolve(true)
    }
    redis.once('ready', onReady)
  })
}
