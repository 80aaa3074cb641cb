// Cross-instance invalidation over Redis pub/sub: whoever changes a key or the deny list
// publishes, every gateway listening drops what it cached (SPEC §3: a revoked key stops
// working on every instance within 1 s with Redis). Messages: `key:<id>`, `hash:<sha256>`,
// `deny`, `all`, `lock:<until>:<address>` (an address locked out by a gateway until <until>,
// epoch ms), and `keys:<id>,<id>,…` and `hashes:<sha256>,…`: the keys of one operation (an
// import, a scheduler round) past SINGLE_MAX messages, at most BATCH_MAX_CHARS each. One message
// per key was thousands for an import, and every gateway went through its whole cache for each
// (a review measured 5.7-8.6 s of a stalled event loop for 10,000 keys).
//
// Pub/sub is at-most-once, so a subscriber must notice what it missed:
// - each publish INCRs a counter and carries its value (`<version>|<message>`, one Lua script,
//   so the order of versions is the order of delivery); a version that skips ahead is a gap;
// - every `checkIntervalMs` the subscriber reads the counter, then PINGs its own connection:
//   the PONG comes after every message published before the read, so a counter above the last
//   version seen means messages were lost;
// - every (re)subscription may have missed messages while the connection was down, and so may
//   a first subscription made after the gateway began serving (Redis was down at its start).
// - the counter going back (deleted: FLUSHDB, eviction, an operator clearing `keygate:*`) is a
//   reset: a delivered version at or below the last delivered one, or a read below the last
//   read. Versions below the last one seen would otherwise hide every later gap and miss until
//   the counter climbed back past it.
// - a check whose reads (the counter, the PING) are not answered within its timeout may have
//   missed anything, and its connection may be dead without having been closed (half-open: a
//   proxy or NAT dropped it): the check flushes (`missed`) and reconnects the connection that did
//   not answer. (Before, such a check waited for ever and no check ran again.)
// Each of these flushes the whole cache (`onFlush`). A publish that fails, or is not answered
// within PUBLISH_TIMEOUT_MS (its connection is then reconnected), is kept and sent again once the
// connection is back. The store check (gateway/store-check.ts) bounds whatever is lost anyway.
// A batch message (`keys:`, `hashes:`) takes two versions (INCRBY 2): a keygate from before
// batches, which ignores them, sees a version skipped and flushes (a `gap`), so it never keeps a
// key a batch changed; this one expects the skip and takes no gap from it.
import type { Redis } from 'ioredis'
import { TimedOut, within } from './deadline.ts'
import type { DenyListService } from './deny-list.ts'
import type { KeyChange, KeyService } from './keys/service.ts'
import type { Logger } from './log.ts'
import { keepSubscribed, subscriberConnection } from './redis.ts'

export const INVALIDATION_CHANNEL = 'keygate:invalidate'
export const INVALIDATION_VERSION_KEY = 'keygate:invalidate:version'

export type InvalidationMessage = `key:${string}` | `hash:${string}` | `keys:${string}` | `hashes:${string}` | `lock:${number}:${string}` | `unlock:${number}:${string}` | 'deny' | 'all'

/** Why a subscriber flushed everything it cached. */
export type FlushReason = 'reconnect' | 'gap' | 'missed' | 'reset'

const PUBLISH_SCRIPT = "local v = redis.call('INCRBY', KEYS[1], ARGV[3]) redis.call('PUBLISH', ARGV[1], v .. '|' .. ARGV[2]) return v"
/** Failed publishes kept for the reconnection; past this many, or PENDING_MAX_CHARS, one `all` replaces them. */
const PENDING_MAX = 1000
const PENDING_MAX_CHARS = 2 * 1024 * 1024
/** The messages of an operation with at most this many are sent one by one, as every keygate reads them (a revocation, a rotation). */
const SINGLE_MAX = 8
/** Most characters in a batch message (ids and hashes are ASCII): a Redis message or an IPC one stays small. */
export const BATCH_MAX_CHARS = 64 * 1024
/** How long a starting gateway waits for its first subscription while Redis is up or connecting. */
const FIRST_SUBSCRIPTION_WAIT_MS = 2000
/** Kept publishes are also tried again this often: Redis may refuse a write on a connection that stays up (OOM, MISCONF, READONLY), and then no 'ready' comes. */
const RETRY_MS = 1000
/** A publish not answered within this is kept for resending, and its connection reconnected (it may be half-open). */
export const PUBLISH_TIMEOUT_MS = 1000
/** The missed-message check's reads time out after its interval, but never sooner than this. */
const CHECK_TIMEOUT_MIN_MS = 1000


class Publisher {
  readonly #redis: Redis
  #pending: string[] = []
  #pendingChars = 0
  #resending = false
  #retry: NodeJS.Timeout | undefined
  // Warned of this spell of failures: one line for it, however many publishes fail (a revocation
  // publishes two messages at once, and both failed with a line each before).
  #warned = false
  log: Logger | undefined

  constructor(redis: Redis) {
    this.#redis = redis
    redis.on('ready', () => void this.#resend())
  }

  async publish(message: string): Promise<void> {
    // Keep the order: while earlier messages wait, later ones wait behind them.
    if (this.#pending.length > 0) {
      this.#keep(message)
      return
    }
    try {
      await this.#send(message)
    } catch (err) {
      if (!this.#warned) this.log?.warn('could not publish an invalidation; it is sent again every second until Redis takes it (the error says why: Redis down, or refusing it, as an ACL without the channel does)', { err: err as Error })
      this.#warned = true
      this.#keep(message)
    }
  }

  async #send(message: string): Promise<unknown> {
    try {
      const sent = await sendInvalidation(this.#redis, message, PUBLISH_TIMEOUT_MS)
      this.#warned = false
      return sent
    } catch (err) {
      // Perhaps a connection that died without being closed: a new one, whose 'ready' resends.
      if (err instanceof TimedOut) this.#redis.disconnect(true)
      throw err
    }
  }

  #keep(message: string): void {
    if (this.#pending.length >= PENDING_MAX || this.#pendingChars + message.length > PENDING_MAX_CHARS) {
      this.#pending = ['all']
      this.#pendingChars = 3
    } else {
      this.#pending.push(message)
      this.#pendingChars += message.length
    }
    this.#retryLater()
  }

  #retryLater(): void {
    if (this.#retry !== undefined) return
    this.#retry = setTimeout(() => {
      this.#retry = undefined
      void this.#resend()
    }, RETRY_MS)
    this.#retry.unref()
  }

  /** Sends the kept messages in order; one resend at a time (the timer and 'ready' may both call it). */
  async #resend(): Promise<void> {
    if (this.#resending) return
    this.#resending = true
    let sent = 0
    try {
      while (this.#pending.length > 0) {
        const queue = this.#pending
        try {
          await this.#send(queue[0] as string)
        } catch {
          this.#retryLater()
          return
        }
        // Not when `all` replaced the queue meanwhile: that `all` is still to be sent.
        if (this.#pending === queue) this.#pendingChars -= (queue.shift() as string).length
        sent++
      }
      if (sent > 0) this.log?.info('published the invalidations kept while Redis was away', { messages: sent })
    } finally {
      this.#resending = false
    }
  }
}

/** One versioned publish; rejects when Redis does not take it, or does not answer within `timeoutMs` (nothing is kept for later). */
export function sendInvalidation(redis: Redis, message: string, timeoutMs = PUBLISH_TIMEOUT_MS): Promise<unknown> {
  return within(redis.eval(PUBLISH_SCRIPT, 1, INVALIDATION_VERSION_KEY, channelOf(redis, INVALIDATION_CHANNEL), message, versionsOf(message)), timeoutMs, 'Redis: invalidation publish')
}

/** How many versions of the counter a message takes: two for a batch (see the top of this file). */
function versionsOf(message: string): number {
  return message.startsWith('keys:') || message.startsWith('hashes:') ? 2 : 1
}

/**
 * A change whose key is new (made, imported, or made by a rotation): no gateway has it cached
 * under its id, only perhaps its hash as unknown, so its id is not sent, only its hash (each id
 * sent is a mark on every gateway, which each cached key in use then looks at once).
 */
const NEW_KEY: ReadonlySet<KeyChange['action']> = new Set(['created', 'imported', 'rotated'])

/** The key ids and stored hashes a batch of changes touches: each key but a new one, the key each one replaced, and the hash of each. */
export function changedKeys(changes: readonly KeyChange[]): { ids: Set<string>; hashes: Set<string> } {
  const ids = new Set<string>()
  const hashes = new Set<string>()
  for (const change of changes) {
    if (!NEW_KEY.has(change.action)) ids.add(change.key.id)
    hashes.add(change.key.keyHash)
    if (change.previous) ids.add(change.previous.id)
  }
  return { ids, hashes }
}

/** The messages of one operation's changes: one per key id and hash, or, past SINGLE_MAX, batches. */
export function changeMessages(changes: readonly KeyChange[]): InvalidationMessage[] {
  const { ids, hashes } = changedKeys(changes)
  if (ids.size + hashes.size <= SINGLE_MAX) return [...[...ids].map((id) => `key:${id}` as const), ...[...hashes].map((h) => `hash:${h}` as const)]
  return [...batches('keys:', ids), ...batches('hashes:', hashes)]
}

function batches<P extends 'keys:' | 'hashes:'>(prefix: P, items: Iterable<string>): Array<`${P}${string}`> {
  const out: Array<`${P}${string}`> = []
  let batch: string[] = []
  let chars = prefix.length
  for (const item of items) {
    if (batch.length > 0 && chars + 1 + item.length > BATCH_MAX_CHARS) {
      out.push(`${prefix}${batch.join(',')}`)
      batch = []
      chars = prefix.length
    }
    batch.push(item)
    chars += item.length + 1
  }
  if (batch.length > 0) out.push(`${prefix}${batch.join(',')}`)
  return out
}

/** The ids or hashes a batch message (`keys:`, `hashes:`) names. */
export function batchItems(message: string): string[] {
  return message
    .slice(message.indexOf(':') + 1)
    .split(',')
    .filter((item) => item !== '')
}

const publishers = new WeakMap<Redis, Publisher>()

function publisherOf(redis: Redis, log?: Logger): Publisher {
  let p = publishers.get(redis)
  if (!p) {
    p = new Publisher(redis)
    publishers.set(redis, p)
  }
  p.log ??= log
  return p
}

/** Resolves once Redis has taken the message or it is queued for the reconnection; never rejects. */
export function publishInvalidation(redis: Redis, message: InvalidationMessage, log?: Logger): Promise<void> {
  return publisherOf(redis, log).publish(message)
}

/**
 * Calls `publish` with the invalidation messages of every committed change of `keys` (and
 * `denyList`); returns the unsubscriber. Redis pub/sub is one carrier, cluster IPC another.
 */
export function bindInvalidations(options: { keys?: KeyService; denyList?: DenyListService; publish: (message: InvalidationMessage) => void }): () => void {
  const { publish } = options
  const offs: Array<() => void> = []
  if (options.keys) {
    offs.push(
      options.keys.onChanges((changes) => {
        for (const message of changeMessages(changes)) publish(message)
      }),
    )
  }
  if (options.denyList) offs.push(options.denyList.onChange(() => publish('deny')))
  return () => {
    for (const off of offs) off()
  }
}

/** Publishes every committed change of `keys` (and `denyList`) on Redis; returns the unsubscriber. */
export function bindInvalidationPublisher(options: { redis: Redis; keys?: KeyService; denyList?: DenyListService; log?: Logger }): () => void {
  const { redis, log } = options
  return bindInvalidations({
    ...(options.keys ? { keys: options.keys } : {}),
    ...(options.denyList ? { denyList: options.denyList } : {}),
    publish: (message) => void publishInvalidation(redis, message, log),
  })
}

export interface SubscribeOptions {
  /** Called with each message (without its version). */
  handler: (message: string) => void
  /** Called when messages may have been missed: drop everything cached. */
  onFlush: (reason: FlushReason) => void
  /** How often the version counter is compared with the last version seen (0: never). */
  checkIntervalMs?: number
  /**
   * What `onFlush` does, as the log lines say it, done and doing: a gateway's default drops its key
   * cache; a process without one (`--only admin`, a `--workers` primary) reads the lockouts again.
   */
  flushes?: { done: string; doing: string }
  log?: Logger
}

const KEY_CACHE_FLUSH = { done: 'flushed the key cache', doing: 'flushing the key cache' }

/** The pub/sub channel `name` on `redis`: under its key prefix (redis.key_prefix), which ioredis puts before keys only. */
function channelOf(redis: Redis, name: string): string {
  return (redis.options.keyPrefix ?? '') + name
}

/** Listens on a dedicated connection (a subscribed Redis connection can do nothing else); resolves with the closer. */
export async function subscribeInvalidations(redis: Redis, options: SubscribeOptions): Promise<() => Promise<void>> {
  const { handler, onFlush, log, flushes = KEY_CACHE_FLUSH } = options
  const sub = subscriberConnection(redis)
  const channelName = channelOf(redis, INVALIDATION_CHANNEL)
  const readVersion = async () => Number((await redis.get(INVALIDATION_VERSION_KEY)) ?? 0)
  let last: number | undefined
  // Delivered versions alone, and counter reads alone: each only grows, unless the counter is
  // reset. (`last` mixes the two, and a read may run ahead of messages still in flight.)
  let lastDelivered: number | undefined
  let lastRead: number | undefined
  let subscribedOnce = false
  // Set once this function has returned: the gateway serves, and caches, from then on.
  let serving = false
  let closed = false
  const first = Promise.withResolvers<void>()
  const flush = (reason: FlushReason) => {
    log?.info(`${flushes.done}: invalidations may have been missed`, { reason })
    onFlush(reason)
  }
  sub.on('error', (err: Error) => log?.debug('invalidation subscriber error', { err }))
  sub.on('message', (channel: string, raw: string) => {
    if (channel !== channelName) return
    const bar = raw.indexOf('|')
    const version = bar > 0 ? Number(raw.slice(0, bar)) : NaN
    if (!Number.isSafeInteger(version)) {
      handler(raw)
      return
    }
    const message = raw.slice(bar + 1)
    if (lastDelivered !== undefined && version <= lastDelivered) {
      // The counter was reset: what was published around it may be lost, and `last` is stale.
      flush('reset')
      last = version
      lastRead = undefined
    } else if (last !== undefined && version > last + versionsOf(message)) flush('gap')
    lastDelivered = version
    if (last === undefined || version > last) last = version
    handler(message)
  })
  // Subscribed on each 'ready', the first connection's and each after a reconnection (ioredis's own
  // resubscription is off: subscriberConnection); its answer tells when messages flow again. Whatever was published before that is
  // covered by the flush, which comes after it. Redis being down must not stop a gateway from
  // starting: the first subscription happens whenever Redis is there, and when that is after
  // the gateway began serving it flushes too (what was cached meanwhile may have been revoked
  // by a message this gateway never got).
  // A subscription Redis refuses (an ACL without the channel) is warned of and asked again until
  // it is taken (keepSubscribed). Before (found by a review), it was logged at debug and never
  // asked again while the connection stayed up, and every change from another instance waited
  // for the store check. Lockouts are in no store: other instances' lockouts and lifts come by the
  // channel alone (and by the read of those in force on the flush its subscription brings), as
  // the warning says.
  const unsubscribe = keepSubscribed(sub, channelName, {
    log,
    meanwhile:
      'key and deny-list changes made by other instances reach this process only through the store (cache.store_check_s, gateway.deny_list_refresh_s), and the lockouts other instances decide, and their lifts, not until then (this process locks an address out on a failure counted here)',
    flowing: 'invalidations',
    onSubscribed: async () => {
      last = undefined
      lastDelivered = undefined
      if (subscribedOnce || serving) flush('reconnect')
      subscribedOnce = true
      // From here on a counter above the last version seen means a lost message.
      const version = await readVersion().catch(() => undefined)
      if (version !== undefined) lastRead = version
      if (version !== undefined && (last === undefined || version > last)) last = version
      first.resolve()
    },
    onFailed: (err) => log?.debug('could not subscribe to invalidations; trying again when Redis is ready', { err: err as Error }),
  })

  const interval = options.checkIntervalMs ?? 1000
  const checkTimeoutMs = Math.max(interval, CHECK_TIMEOUT_MIN_MS)
  let checking = false
  const check = async (): Promise<void> => {
    if (checking || closed || sub.status !== 'ready' || redis.status !== 'ready' || !subscribedOnce) return
    checking = true
    let step: 'counter' | 'ping' = 'counter'
    try {
      const readFrom = lastRead
      const version = await within(readVersion(), checkTimeoutMs, 'Redis: invalidation counter read')
      step = 'ping'
      await within(sub.ping(), checkTimeoutMs, 'Redis: invalidation subscriber PING')
      // A (re)subscription read the counter meanwhile: its reading is the newer one.
      if (lastRead !== readFrom) return
      if (lastRead !== undefined && version < lastRead) {
        flush('reset')
        last = version
        lastRead = version
        lastDelivered = undefined
        return
      }
      lastRead = version
      if (last !== undefined && version > last) flush('missed')
      if (last === undefined || version > last) last = version
    } catch (err) {
      // Redis is failing: the reconnection flushes. Unless the connection died without closing
      // (no error, no answer, for good): then nothing would, so this check does, and reconnects it.
      if (err instanceof TimedOut && !closed) {
        log?.warn(`Redis did not answer the invalidation check in time: ${flushes.doing} and reconnecting`, {
          connection: step === 'ping' ? 'subscriber' : 'commands',
          timeout_ms: checkTimeoutMs,
        })
        flush('missed')
        if (step === 'ping') sub.disconnect(true)
        else redis.disconnect(true)
      }
    } finally {
      checking = false
    }
  }
  const timer = interval > 0 ? setInterval(() => void check(), interval) : undefined
  timer?.unref()
  // While Redis is up (or still connecting), the first subscription is waited for, a moment at
  // most, so that it comes before the first request; when Redis is known to be down, not at all.
  if (redis.status === 'ready' || redis.status === 'connecting' || redis.status === 'connect') {
    let bound: NodeJS.Timeout | undefined
    await Promise.race([first.promise, new Promise<void>((resolve) => (bound = setTimeout(resolve, FIRST_SUBSCRIPTION_WAIT_MS)))])
    clearTimeout(bound)
  }
  serving = true
  return async () => {
    closed = true
    clearInterval(timer)
    unsubscribe()
    sub.disconnect()
  }
}
