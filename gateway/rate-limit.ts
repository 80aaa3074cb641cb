// Rate limits per address (before the key is looked at) and per key (type default, or the
// key's own override). Answers carry RateLimit-Limit/-Remaining/-Reset of the limit nearest to
// exhaustion, and Retry-After on 429.
import type { EventBus } from '../core/events.ts'
import type { GatewayMetrics, Increment } from '../core/metrics.ts'
import type { KeyRecord, KeyType } from '../core/keys/types.ts'
import { KEY_TYPES } from '../core/keys/types.ts'
import type { Config } from '../config/schema.ts'
import type { Redis } from 'ioredis'
import { createRateLimit, createRateLimits, RateLimiterRes, secondsFrom, type RateLimit } from '../core/limiters.ts'
import type { RequestState, Stage, StageResult } from './state.ts'

function note(s: RequestState, points: number, remaining: number, msBeforeNext: number): void {
  if (s.rlLimit < 0 || remaining < s.rlRemaining) {
    s.rlLimit = points
    s.rlRemaining = remaining
    s.rlResetS = secondsFrom(msBeforeNext)
  }
}

async function ask(s: RequestState, l: RateLimit, key: string, counter: Increment): Promise<StageResult> {
  try {
    const r = await l.consume(key)
    note(s, l.points, r.remainingPoints, r.msBeforeNext)
    return undefined
  } catch (err) {
    if (!(err instanceof RateLimiterRes)) throw err
    s.rlLimit = l.points
    s.rlRemaining = 0
    s.rlResetS = secondsFrom(err.msBeforeNext)
    s.retryAfterS = s.rlResetS
    counter.inc()
    return 'rate_limited'
  }
}

/** Takes a point for `key`: from this process's lease without a promise when it can (the common case), else from the store. */
function consume(s: RequestState, l: RateLimit, key: string, counter: Increment): StageResult | Promise<StageResult> {
  if (!l.take(key)) return ask(s, l, key, counter)
  note(s, l.points, l.remaining, l.msBeforeNext)
  return undefined
}

export function createAddressRateLimitStage(options: { limit: number; windowS: number; redis?: Redis | undefined; cluster?: boolean; metrics: GatewayMetrics }): Stage {
  const l = createRateLimit({ points: options.limit, durationS: options.windowS, keyPrefix: 'keygate:rl:addr', redis: options.redis, cluster: options.cluster === true })
  const counter = options.metrics.rateLimited.address
  return (s: RequestState) => consume(s, l, s.addressKey, counter)
}

/**
 * Picks the limit of a key: its own override, else its type's, else the default. A key is
 * counted under its id and the window's length, not the limit: a key whose limit is changed
 * within a window keeps its count there and is held to the new limit (before, each limit had a
 * counter of its own, and a key lowered from 50 to 2 after 4 requests was let through 2 more). A
 * change of the window's length starts a count in the new length's windows, which are not the
 * old ones.
 */
export function createKeyLimiters(perKey: Config['rate_limits']['per_key'], redis: Redis | undefined, cluster = false): (record: KeyRecord) => RateLimit {
  const byWindow = new Map<number, (points: number) => RateLimit>()
  const of = (limit: number, windowS: number): RateLimit => {
    let limits = byWindow.get(windowS)
    if (!limits) {
      limits = createRateLimits({ durationS: windowS, keyPrefix: `keygate:rl:key:w${windowS}`, redis, cluster })
      byWindow.set(windowS, limits)
    }
    return limits(limit)
  }
  const byType = {} as Record<KeyType, RateLimit>
  for (const t of KEY_TYPES) {
    const c = perKey[t] ?? perKey.default
    byType[t] = of(c.limit, c.window_s)
  }
  return (record) => (record.rateLimit ? of(record.rateLimit.limit, record.rateLimit.windowS) : byType[record.type])
}

export function createKeyRateLimitStage(options: { metrics: GatewayMetrics; onExceeded?: ((s: RequestState) => void) | undefined }): Stage {
  const counter = options.metrics.rateLimited.key
  const onExceeded = options.onExceeded
  if (!onExceeded) {
    return (s: RequestState) => {
      const k = s.key
      if (k === undefined) return undefined
      return consume(s, k.limit, k.id, counter)
    }
  }
  const notify = (s: RequestState, verdict: StageResult): StageResult => {
    if (verdict !== undefined) onExceeded(s)
    return verdict
  }
  return (s: RequestState) => {
    const k = s.key
    if (k === undefined) return undefined
    const verdict = consume(s, k.limit, k.id, counter)
    // A verdict is only ever refused through the store's answer, a promise.
    return verdict === undefined ? undefined : Promise.resolve(verdict).then((v) => notify(s, v))
  }
}

const MAX_DEBOUNCED = 10_000

/**
 * `rate_limit.exceeded` for a key at most once per `debounceMs` in this process: one Map look-up
 * per refused request. The event names the window it falls in, so deliveries of several
 * instances for the same window are one (the webhook queue's dedupe key).
 */
export function rateLimitNotifier(events: EventBus, debounceMs: number, now: () => number): (s: RequestState) => void {
  const last = new Map<string, number>()
  return (s) => {
    const k = s.key
    if (k === undefined) return
    const t = now()
    const window = t - (t % debounceMs)
    if (last.get(k.id) === window) return
    if (last.size >= MAX_DEBOUNCED) {
      for (const [id, w] of last) if (w !== window) last.delete(id)
      if (last.size >= MAX_DEBOUNCED) last.clear()
    }
    last.set(k.id, window)
    events.emit('rate_limit.exceeded', {
      key_id: k.id,
      key_type: k.type,
      limit: s.rlLimit,
      retry_after_s: s.retryAfterS,
      address: s.address,
      window_start: new Date(window).toISOString(),
    })
  }
}
