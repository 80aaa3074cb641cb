// Lockout (SPEC §3): `lockout.max_attempts` failed attempts from one address (its IPv6 network)
// within `lockout.window_s` lock that address out for `lockout.window_s`. One instance per
// process is shared by the gateway (failed key attempts) and the admin API (failed admin
// credentials), so both kinds of failure count toward the same lockout; with Redis the counts
// are shared across instances too.
//
// Attempts are counted in the limiter (Redis when configured). The lockouts in force are
// mirrored in memory, so the per-request check is a map look-up and never a Redis round trip:
// the instance that locks an address out publishes `lock:<until>:<address>` (the end of the
// lockout, epoch ms) on the invalidation channel, every instance applies what is left of it,
// and an instance reads the lockouts in force from Redis when it starts and whenever Redis comes
// back. The message names the end, not a duration: one kept while Redis was down and sent when
// it is back must not start a new lockout then (it is ignored if the lockout has ended).
//
// A switch between Redis and its insurance does not start an address's count afresh: a store
// that answers with less than this process last counted in the window (Redis gone, back, or back
// empty) is raised to that count plus the failure (see `count`), and when Redis answers again
// the failures the insurance counted are written into it (see `restore`).
//
// A lockout decided while Redis was not answering was counted in this process alone. When Redis
// answers again, the instance writes every lockout it holds into Redis (as the limiter's own
// keys, so every instance's read finds them) and only then publishes the ones it decided, and
// those Redis did not hold (it came back empty: an instance that read it before knows none): the
// other instances may subscribe again after that message (pub/sub drops it), but the flush that
// follows their resubscription reads Redis, and finds it there. The publish is never awaited on
// the request path: a Redis that stops answering must not hold the failed attempt's answer.
import type { Redis } from 'ioredis'
import ipaddr from 'ipaddr.js'
import { publishInvalidation } from './invalidation.ts'
import { KeyedQueue } from './keyed-queue.ts'
import { TimedOut, within } from './deadline.ts'
import { KeygateError } from './errors.ts'
import { redisHealth } from './redis.ts'
import { parseAddress } from './keys/evaluate.ts'
import { createLimiter, EndingMap, forgetKey, INSURANCE, secondsFrom, type Limiter, type RateLimiterRes } from './limiters.ts'
import type { Logger } from './log.ts'

export const LOCKOUT_KEY_PREFIX = 'keygate:lockout'
/**
 * When an address's lockout was last lifted (epoch ms), for a window: `keygate:lockout-lifted:<address>`
 * (outside the lockouts' own `keygate:lockout:*`). A process that held the lockout and missed the
 * lift's message neither writes it back into Redis (RESTORE_SCRIPT) nor keeps it past its next
 * read of the lockouts in force.
 */
export const LIFTED_KEY_PREFIX = 'keygate:lockout-lifted'
/**
 * Writes a lockout, or failures counted on the insurance, into Redis as the limiter's key
 * (`KEYS[1]`): at least `ARGV[1]` points, for at least `ARGV[2]` ms, never lowering what is there;
 * minus the lift's time, writing nothing, when the address was lifted (`KEYS[2]`) at or after
 * `ARGV[3]`, when the lockout or count began.
 */
const RESTORE_SCRIPT = `local lifted = tonumber(redis.call('GET', KEYS[2]) or '')
if lifted and lifted >= tonumber(ARGV[3]) then return -lifted end
local n = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local ttl = redis.call('PTTL', KEYS[1])
local want, left = tonumber(ARGV[1]), tonumber(ARGV[2])
if n >= want and ttl >= left then return 0 end
redis.call('SET', KEYS[1], math.max(n, want), 'PX', math.max(ttl, left))
return 1`
/** A lift in Redis: the address's count (`KEYS[1]`) goes, and its lift is noted (`KEYS[2]`: `ARGV[1]`, for `ARGV[2]` ms). */
const LIFT_SCRIPT = `redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1`

/** Locked-out addresses held in memory; each took `max_attempts` failures to get there. */
export const MIRROR_MAX = 100_000

/** An address's attempts in doubt here, and those waiting for a place: `waiting` from `first` on, in order (those before are answered). */
interface Doubt {
  n: number
  waiting: Array<((lockedS: number | undefined) => void) | undefined>
  first: number
}

/** An address's failures as the limiter last counted them. */
interface Count {
  count: number
  /** When the limiter's window of them ends (epoch ms). */
  until: number
  /** Counted by Redis's insurance: written into Redis when it is back. */
  insured: boolean
}

export interface Lockout {
  /** Seconds until the address may try again, or undefined when it is not locked out. A memory look-up. */
  lockedFor(addressKey: string): number | undefined
  recordFailure(addressKey: string): Promise<void>
  /**
   * Takes a place for an attempt that may fail (a key or credential not yet judged). Attempts in
   * doubt from one address plus its failures already counted stay below `max_attempts` in this
   * process, so a burst cannot have more keys checked than the lockout allows: past that, an
   * attempt waits for one in doubt to end. Gives undefined when the place is taken at once, else
   * a promise of undefined (taken) or of the seconds of a lockout that began meanwhile (no place
   * taken). End each place taken with `finish`.
   */
  attempt(addressKey: string): Promise<number | undefined> | undefined
  /** Ends an attempt `attempt` let in: a failure is counted first, then its place goes to the next one waiting. */
  finish(addressKey: string, failed: boolean): Promise<void>
  /**
   * Lifts the address's lockout and forgets its failures (an operator's DELETE /v1/lockouts): in
   * Redis first (it rejects, changing nothing here, when Redis does not take it), then here and
   * in a `--workers` primary's memory of its workers' counts, and tells the other processes
   * (`unlock:<time>:<address>`). Whether the address was locked out here.
   */
  lift(addressKey: string): Promise<boolean>
  /**
   * Applies a lockout decided by another instance (the invalidation message
   * `lock:<until>:<address>`, until in epoch ms), or the lift of one (`unlock:<time>:<address>`);
   * any other message is not the lockout's, and changes nothing.
   */
  applyMessage(message: string): void
  /**
   * The lockouts in force, read from Redis once per connection: the lockout reads them itself
   * whenever Redis becomes ready (start, reconnection), and a caller waiting for them at start
   * shares that read.
   */
  load(): Promise<void>
  /** Reads them again now (invalidation messages may have been missed). */
  reload(): Promise<void>
  /** The lockouts in force here, as the messages that apply them elsewhere (for a `--workers` worker that starts after they began). */
  inForce(): Array<`lock:${number}:${string}`>
  /** The lockouts in force here: [address key, end (epoch ms)] (GET /v1/lockouts). */
  held(): Array<[string, number]>
  /** How many addresses' failures this process holds (at most MIRROR_MAX, ended counts included). */
  counting(): number
}

export interface LockoutOptions {
  maxAttempts: number
  windowS: number
  redis?: Redis | undefined
  log?: Logger
  /** A `serve --workers` worker: counts in the cluster primary's memory when Redis is not there. */
  cluster?: boolean
  /** Tells the other processes of a lockout, or of its lift, when Redis cannot (a worker tells its primary, which tells the others). */
  announce?: (message: `lock:${number}:${string}` | `unlock:${number}:${string}`) => void
  /** In the `--workers` primary: deletes an address's count from the workers' shared memory (clusterLimitsPrimary's). */
  forgetShared?: (addressKey: string) => Promise<void>
  /** Counts addresses that reach the limit. */
  onLockout?: () => void
  /** Counts lockouts still in force that the memory mirror dropped for newer ones (past MIRROR_MAX). */
  onForgotten?: () => void
}

export function createLockout(options: LockoutOptions): Lockout {
  const { maxAttempts, windowS, redis, log } = options
  const limiter: Limiter = createLimiter({ points: maxAttempts, durationS: windowS, keyPrefix: LOCKOUT_KEY_PREFIX, redis, cluster: options.cluster === true })
  // The end of each lockout in force, at most MIRROR_MAX, in the order they began (each ends
  // within a window of its start, not always in that order: past the bound the first to begin is
  // dropped, which may be in force still where one begun later has ended; before, found by a
  // review, a quick-lru held up to twice MIRROR_MAX). An address dropped while locked out is let in again (a right key gets
  // through, a failure locks it out again): counted, for an operator to see the bound reached.
  const locked = new EndingMap<number>(MIRROR_MAX, (until) => until, (_address, until) => until > Date.now() && options.onForgotten?.())
  // When each address was last lifted here (told by `unlock:<at>:<address>`, or lifted by this
  // process), for a window: a lockout that began at or before it is one the lift ended, whatever
  // brings it (a `lock:` message sent again after a timeout, or relayed late over cluster IPC).
  // At most MIRROR_MAX, as `locked`.
  const windowMs = windowS * 1000
  const liftedAt = new EndingMap<number>(MIRROR_MAX, (at) => at + windowMs)
  // Never shortens a lockout in force: a message from another instance may name an earlier end
  // (its lockout began first, or its clock is behind) than this instance's own.
  const lockUntil = (addressKey: string, until: number) => {
    if (until <= Date.now()) return
    const lifted = liftedAt.live(addressKey)
    if (lifted !== undefined && until - windowMs <= lifted) return
    const held = locked.get(addressKey)
    if (held !== undefined && held >= until) return
    locked.begin(addressKey, until)
  }
  const lock = (addressKey: string, ms: number) => lockUntil(addressKey, Date.now() + ms)
  const lockedFor = (addressKey: string): number | undefined => {
    const until = locked.live(addressKey)
    if (until === undefined) return undefined
    const left = until - Date.now()
    return left > 0 ? secondsFrom(left) : undefined
  }

  // The failures counted per address (the limiter's answer to the last one, shared through Redis
  // or the cluster primary), kept for as long as the limiter keeps them; and the attempts in
  // doubt here, with those waiting for a place.
  // In the order they were last counted, at most MIRROR_MAX, each dropped when next looked up
  // after its window ends, or by the sweep of a later count: at most one window after its end, as
  // one counted again goes behind those counted since, and those still ahead of it were last
  // counted before it, so end within a window of it (before, found by a review of memory under a
  // flood of bad keys from distinct addresses, a quick-lru held up to twice MIRROR_MAX, each in a
  // wrapper of its own: 165 bytes an address).
  const counted = new EndingMap<Count>(MIRROR_MAX, (c) => c.until)
  // The waiting ones are read from `first` on, not shifted off: a shift of an array past some
  // 16,000 entries (V8's large objects) copies the rest, and a lockout that begins answers every
  // one waiting (before, found by a review of costs a client drives: 64,000 attempts waiting
  // from one address took 3.6 s to answer, 57 µs each where 8,000 took 0.5; bench/RESULTS.md).
  const doubt = new Map<string, Doubt>()
  // With none in doubt one always may: nothing else would ever let a waiting one in (the count
  // may say locked out while the lockout's mirror has dropped it; the limiter then judges).
  const mayStart = (addressKey: string, inDoubt: number) => inDoubt === 0 || inDoubt + (counted.live(addressKey)?.count ?? 0) < maxAttempts

  // The failures of an address are counted one after another: `count` raises the store's count to
  // what this process knows, and a raise judged from an answer given before another's raise had
  // landed would count that one's failures twice.
  const counting = new KeyedQueue()
  /**
   * Counts a failure. The store answering may hold less than this process last counted in the
   * window: Redis went down (the insurance starts from zero), came back (without what the
   * insurance counted), or came back empty. The count is then raised to what was known plus this
   * failure (before, each switch started the address afresh, and up to about twice
   * `max_attempts` failures were checked). Raised to it, not by it: the store may hold some of
   * them already (a slow Redis keeps its count and counts the call that timed out when it wakes;
   * `restore` writes the insurance's), and a failure counted twice locks the address out early.
   */
  const count = async (addressKey: string): Promise<{ r: RateLimiterRes; reached: boolean }> => {
    const known = counted.live(addressKey)?.count ?? 0
    let r = await limiter.penalty(addressKey, 1)
    let reached = crosses(r, 1)
    if (r.consumedPoints <= known) {
      const more = known + 1 - r.consumedPoints
      r = await limiter.penalty(addressKey, more)
      reached ||= crosses(r, more)
    }
    if (r.msBeforeNext > 0) counted.begin(addressKey, { count: r.consumedPoints, until: Date.now() + r.msBeforeNext, insured: limiter.answeredBy?.(r) === INSURANCE })
    return { r, reached }
  }
  // Whether the `added` points of `r` took the count from below the limit to it or past it: a
  // raise adds several, and with another instance's failure counted just before it, it passes the
  // limit without giving it (the failure is still the one that locks the address out).
  const crosses = (r: RateLimiterRes, added: number) => r.consumedPoints >= maxAttempts && r.consumedPoints - added < maxAttempts
  /** Lets in the waiting attempts that may start now, and answers those a lockout has begun for. */
  const pump = (addressKey: string) => {
    const d = doubt.get(addressKey)
    if (d === undefined) return
    while (d.first < d.waiting.length) {
      const lockedS = lockedFor(addressKey)
      if (lockedS === undefined && !mayStart(addressKey, d.n)) break
      if (lockedS === undefined) d.n++
      const next = d.waiting[d.first] as (lockedS: number | undefined) => void
      d.waiting[d.first++] = undefined
      next(lockedS)
    }
    if (d.first === d.waiting.length) {
      d.waiting.length = 0
      d.first = 0
    } else if (d.first >= 1024 && d.first * 2 >= d.waiting.length) {
      // Those answered go in one copy, once they are at least half: each copy costs no more than the entries answered since the last.
      d.waiting.splice(0, d.first)
      d.first = 0
    }
    if (d.n === 0 && d.waiting.length === 0) doubt.delete(addressKey)
  }

  const read = async (): Promise<void> => {
    if (!redis || redis.status !== 'ready') return
    const prefix = redis.options.keyPrefix ?? ''
    try {
      /** The addresses Redis holds a count of (locked out or not). */
      const inRedis = new Set<string>()
      let cursor = '0'
      do {
        // SCAN's pattern and answer carry the key prefix, which ioredis puts before the keys of
        // other commands itself (redis.key_prefix: letters, digits and _ . : -, nothing a glob reads).
        const [next, found] = await redis.scan(cursor, 'MATCH', `${prefix}${LOCKOUT_KEY_PREFIX}:*`, 'COUNT', 1000)
        cursor = next
        const keys = found.map((k) => k.slice(prefix.length))
        for (const k of keys) inRedis.add(k.slice(LOCKOUT_KEY_PREFIX.length + 1))
        if (keys.length === 0) continue
        const pipeline = redis.pipeline()
        for (const k of keys) pipeline.get(k).pttl(k)
        const replies = (await pipeline.exec()) ?? []
        keys.forEach((k, i) => {
          const count = Number(replies[2 * i]?.[1])
          const ttl = Number(replies[2 * i + 1]?.[1])
          if (count >= maxAttempts && ttl > 0) lock(k.slice(LOCKOUT_KEY_PREFIX.length + 1), ttl)
        })
      } while (cursor !== '0')
      // Lifted since it began, and not counted again in Redis: a lift whose message this process
      // missed (its subscription was down); held here, it would be written back by the restore.
      cursor = '0'
      do {
        const [next, found] = await redis.scan(cursor, 'MATCH', `${prefix}${LIFTED_KEY_PREFIX}:*`, 'COUNT', 1000)
        cursor = next
        if (found.length === 0) continue
        const names = found.map((k) => k.slice(prefix.length))
        const at = await redis.mget(...names)
        names.forEach((name, i) => {
          const address = name.slice(LIFTED_KEY_PREFIX.length + 1)
          const until = locked.get(address)
          if (until !== undefined && !inRedis.has(address) && Number(at[i]) >= until - windowMs) void dropLifted(address, Number(at[i])).catch(() => {})
        })
      } while (cursor !== '0')
    } catch (err) {
      log?.warn('could not read the lockouts in force from Redis', { err: err as Error })
    }
  }
  // The read of the current Redis connection; a new connection ('ready') needs its own.
  let connectionRead: Promise<void> | undefined
  const load = (): Promise<void> => (connectionRead ??= read())
  const reload = (): Promise<void> => (connectionRead = read())

  /** Forgets what this process holds of an address: its lockout, its failures and a lockout waiting to be published. */
  const forgetHere = (addressKey: string): void => {
    locked.delete(addressKey)
    counted.delete(addressKey)
    unpublished.delete(addressKey)
  }

  /**
   * Drops what a lift at `at` ended, here: the lockout and counts held, the count of this
   * process's insurance (the shared one is gone already: deleted by the process that lifted it),
   * and in a `--workers` primary the workers' counts it keeps; lockouts that began by then are
   * refused from now on (lockUntil). Resolves once the counts are gone.
   */
  const dropLifted = async (addressKey: string, at: number): Promise<void> => {
    if ((liftedAt.live(addressKey) ?? -Infinity) < at) liftedAt.begin(addressKey, at)
    forgetHere(addressKey)
    await Promise.all([forgetKey(limiter, addressKey), options.forgetShared?.(addressKey)])
  }

  /** The lockouts in force at `now`: [address key, end (epoch ms)]. */
  const inForce = (now: number): Array<[string, number]> => [...locked.entries()].filter(([, until]) => until > now)

  // Lockouts this instance decided while Redis was not answering, to publish once they are written
  // there; past MIRROR_MAX of them, every lockout held here is published instead (the mirror is bounded, this set would not be).
  const unpublished = new Set<string>()
  let publishAll = false
  let restoring: Promise<void> | undefined
  const restore = async (): Promise<void> => {
    if (!redis || redis.status !== 'ready') return
    const now = Date.now()
    const held = inForce(now)
    // The failures the insurance counted: the other instances count on from them at once, not
    // from this instance's next failure of the address.
    const insured = [...counted.entries()].filter(([, c]) => c.insured && c.until > now)
    for (const address of unpublished) if (!((locked.get(address) ?? 0) > now)) unpublished.delete(address)
    if (held.length === 0 && insured.length === 0) {
      publishAll = false
      return
    }
    const pipeline = redis.pipeline()
    // As the limiter's block writes it (one point past the limit), so a read counts it locked.
    const write = (address: string, points: number, until: number) =>
      pipeline.eval(RESTORE_SCRIPT, 2, `${LOCKOUT_KEY_PREFIX}:${address}`, `${LIFTED_KEY_PREFIX}:${address}`, points, until - now, until - windowMs)
    for (const [address, until] of held) write(address, maxAttempts + 1, until)
    for (const [address, c] of insured) write(address, c.count, c.until)
    const heldCount = held.length
    const replies = (await pipeline.exec()) ?? []
    if (replies.some(([err]) => err)) throw replies.find(([err]) => err)?.[0]
    // Lifted since it began (the lift's message missed): a lockout is dropped here too, with what
    // the lift ended; a count of the insurance alone goes, and a lockout of the address that began
    // after the lift stays (before, found by a review, both went).
    // The script's answer for the i-th address written: 1 written, -t lifted at t, else 0.
    const reply = (i: number) => Number(replies[i]?.[1])
    const liftedBy = (i: number) => (reply(i) < 0 ? -reply(i) : undefined)
    // Written (the script's 1): Redis did not hold the lockout, so an instance that read Redis
    // before this write (one started while Redis was down, reading the empty Redis that came
    // back) does not know it either: published too, not only the ones decided during the outage
    // (found by a chaos review: such an instance let the address in until its next failure).
    const wrote = new Set(held.filter((_, i) => reply(i) === 1).map(([address]) => address))
    for (let i = held.length - 1; i >= 0; i--) {
      const at = liftedBy(i)
      if (at === undefined) continue
      void dropLifted((held[i] as [string, number])[0], at).catch(() => {})
      held.splice(i, 1)
    }
    insured.forEach(([address], i) => {
      if (liftedBy(heldCount + i) === undefined) return
      counted.delete(address)
      void forgetKey(limiter, address).catch(() => {})
    })
    const all = publishAll
    publishAll = false
    for (const [address, until] of held) {
      if (!unpublished.delete(address) && !all && !wrote.has(address)) continue
      void publishInvalidation(redis, `lock:${until}:${address}`, log)
    }
  }
  // A restore Redis refuses (OOM, READONLY, NOPERM) means the lockouts are not shared: the limits
  // go back to the insurance with it, which RedisHealth takes for a switch back that failed at
  // once (it probes less often), and the warning is said once until a restore succeeds (before,
  // found by a review: a warning at every switch back, about four a second per process).
  let restoreFailed = false
  const restoreNow = (): void => {
    restoring ??= restore()
      .then(
        () => {
          restoreFailed = false
        },
        (err: unknown) => {
          const line = 'could not write the lockouts in force to Redis; trying again when it is back (logged once until a write succeeds)'
          if (restoreFailed) log?.debug(line, { err: err as Error })
          else log?.warn(line, { err: err as Error })
          restoreFailed = true
          if (redis) redisHealth(redis).down('error', err as Error)
        },
      )
      .finally(() => (restoring = undefined))
  }
  if (redis) {
    // Written first (a pipeline sent at once, before a reconnection's other traffic), then read.
    redis.on('ready', () => {
      restoreNow()
      void reload()
    })
    redisHealth(redis).onChange((up) => up && restoreNow())
    if (redis.status === 'ready') void load()
  }

  const lockout: Lockout = {
    lockedFor,
    attempt(addressKey) {
      const lockedS = lockedFor(addressKey)
      if (lockedS !== undefined) return Promise.resolve(lockedS)
      let d = doubt.get(addressKey)
      if (d === undefined) {
        d = { n: 0, waiting: [], first: 0 }
        doubt.set(addressKey, d)
      }
      if (d.first === d.waiting.length && mayStart(addressKey, d.n)) {
        d.n++
        return undefined
      }
      const w = d.waiting
      return new Promise<number | undefined>((resolve) => w.push(resolve))
    },
    async finish(addressKey, failed) {
      try {
        if (failed) await lockout.recordFailure(addressKey)
      } finally {
        const d = doubt.get(addressKey)
        if (d !== undefined) d.n = Math.max(0, d.n - 1)
        pump(addressKey)
      }
    },
    recordFailure(addressKey) {
      // The lockout it may begin too, in the address's queue: a lift queued behind it comes after
      // its block (before, found by a review, the block could land in Redis after the lift's delete).
      return counting.run(addressKey, async () => {
        const { r, reached } = await count(addressKey)
        if (r.consumedPoints < maxAttempts) return
        if (reached) {
          // The attempt that reaches the limit starts a full window of lockout from now.
          await limiter.block(addressKey, windowS)
          options.onLockout?.()
          const until = Date.now() + windowMs
          lockUntil(addressKey, until)
          const message = `lock:${until}:${addressKey}` as const
          options.announce?.(message)
          if (redis) {
            // Not connected, or not answering: written into Redis first when it is back, then published.
            if (redisHealth(redis).up && redis.status === 'ready') void publishInvalidation(redis, message, log)
            else if (unpublished.size < MIRROR_MAX) unpublished.add(addressKey)
            else publishAll = true
          }
          return
        }
        // Past the limit: locked out already (by another instance whose message is late, or before a restart).
        lock(addressKey, r.msBeforeNext)
      })
    },
    lift(addressKey) {
      // After any failure of the address being counted now (one that had read the count before
      // the lift would raise the fresh count to it, and lock the address out again).
      return counting.run(addressKey, async () => {
        const at = Date.now()
        if (redis) {
          // Refused at once while Redis is down (nothing sent); after its timeout when it does not
          // answer, when the script sent may still run once Redis does (said so: before, found by
          // a review, "nothing was changed", and the lift happened later all the same).
          const health = redisHealth(redis)
          if (!health.up || redis.status !== 'ready') throw new KeygateError('store_unavailable', 'Redis is not answering, so the lift could not be shared; nothing was changed, try again')
          try {
            await within(redis.eval(LIFT_SCRIPT, 2, `${LOCKOUT_KEY_PREFIX}:${addressKey}`, `${LIFTED_KEY_PREFIX}:${addressKey}`, at, windowMs), health.timeoutMs, 'Redis: lockout lift')
          } catch (err) {
            if (err instanceof TimedOut) {
              // As a limiter call slower than the timeout does: limits and lockouts go to the
              // insurance, a gateway's keygate_redis_up says so, a lift meanwhile is refused at
              // once (before, found by a review, each sent its script beside those a frozen Redis
              // held), and the switch back's restore learns whether this lift ran there (the
              // script's -lifted answer drops the lockout here; before, it was held to its end).
              health.down('timeout', err)
              throw new KeygateError('store_unavailable', `Redis did not answer within ${health.timeoutMs} ms: the lift may still take effect there when it does, but this instance still holds the lockout; try again`, { unconfirmed: true }, { cause: err })
            }
            throw new KeygateError('store_unavailable', `Redis refused the lift (${(err as Error).message}); nothing was changed, try again`, undefined, { cause: err })
          }
        }
        // Then what this process holds, and in a `--workers` primary the workers' counts: without
        // Redis, those are the shared counts.
        const was = lockedFor(addressKey) !== undefined
        await dropLifted(addressKey, at)
        const message = `unlock:${at}:${addressKey}` as const
        options.announce?.(message)
        if (redis) void publishInvalidation(redis, message, log)
        return was
      })
    },
    applyMessage(message) {
      const unlock = /^unlock:(\d+):(.+)$/.exec(message)
      if (unlock) {
        void dropLifted(unlock[2] as string, Number(unlock[1])).catch(() => {})
        return
      }
      const m = /^lock:(\d+):(.+)$/.exec(message)
      if (!m) return
      // What is left of it, never more than a window (a sender's clock ahead of ours). A value
      // below 10^12 (before 2001 as a time) is a length: the `lock:<ms>` of earlier builds, still
      // sent during a rolling upgrade by instances not yet upgraded.
      const n = Number(m[1])
      lock(m[2] as string, Math.min(n < 1e12 ? n : n - Date.now(), windowS * 1000))
    },
    load,
    reload,
    inForce() {
      return inForce(Date.now()).map(([address, until]) => `lock:${until}:${address}` as const)
    },
    held() {
      return inForce(Date.now())
    },
    counting() {
      return counted.size
    },
  }
  return lockout
}

/** `address` → the string limits and lockouts count it under (IPv6 per network of `ipv6PrefixBits`). */
export function addressKeyer(ipv6PrefixBits: number): (address: string) => string {
  if (ipv6PrefixBits >= 128) return (a) => a
  return (a) => {
    if (!a.includes(':')) return a
    const parsed = parseAddress(a)
    if (!parsed || parsed.kind() !== 'ipv6') return a
    return `${ipaddr.IPv6.networkAddressFromCIDR(`${a}/${ipv6PrefixBits}`).toString()}/${ipv6PrefixBits}`
  }
}

/** The answer's message: how long, as Retry-After says it, for a reader without the header (found by a newcomer). */
export function lockedOutMessage(retryAfterS: number): string {
  return `Too many failed attempts from this address; try again in ${retryAfterS} s.`
}

/**
 * Look-ups of keys on the store, as the attempts waiting for their places (`Lockout.attempt`) see
 * them: an attempt let in after a look-up failed while it waited, two or more having failed in a
 * row (none answered between), is answered store_unavailable without asking the store. Before (found by a review), each waited out
 * the store's timeouts in turn, max_attempts at a time: on a hung store, 300 keys from one address
 * were answered 5 every 5 s, the last after 300 s. One for each that asks the store (the gateway's
 * validation, the admin API's credential check).
 */
export interface LookupFailures {
  /** Where the look-ups stand, taken as an attempt begins to wait for its place. */
  mark(): number
  /** Whether a look-up failed since `mark`, two or more in a row having failed (none answered between). */
  failedSince(mark: number): boolean
  /** A look-up failed on the store (count it before the attempt's place goes to the next one). */
  failed(): void
  /** A look-up was answered. */
  answered(): void
}

export function createLookupFailures(): LookupFailures {
  let failures = 0
  // Two in a row, not one: a single failure (a connection of the pool reset, one statement timed
  // out) answered the address's whole queue 503 without asking the store, which would have
  // answered them (found by a review).
  let inARow = 0
  return {
    mark: () => failures,
    failedSince: (mark) => inARow >= 2 && failures !== mark,
    failed: () => {
      failures++
      inARow++
    },
    answered: () => {
      inARow = 0
    },
  }
}
