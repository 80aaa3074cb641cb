// The validation cache. Keyed by the SHA-256 of the presented key (never the key) as a 32-character
// binary string (`digestKey`, half the memory of hex), and bounded exactly: lru-cache holds the
// `cache.max_capacity` keys used last, and never more. (quick-lru, used before, holds between
// its maxSize and twice as many; sized at half the capacity to stay within it, it kept as few as
// half the keys asked for, and a capacity of 10 held 6 keys used in turn badly, found by a
// review.) Unknown keys and wrong secrets go to a separate cache with a short TTL, so random keys
// cannot grow memory and a burst of one bad key costs one store query. Concurrent misses for one
// key share one store query. A generation counter keeps a query that was in flight during an
// invalidation from putting the stale answer back.
import { LRUCache } from 'lru-cache'
import { digestFromHex } from '../core/keys/format.ts'
import type { KeyService } from '../core/keys/service.ts'
import { KEY_TYPES, type KeyRecord, type KeyType } from '../core/keys/types.ts'
import type { GatewayMetrics } from '../core/metrics.ts'
import { evaluateKey, rangeMatcher, validUntilOf } from '../core/keys/evaluate.ts'
import type { RateLimit } from '../core/limiters.ts'

export type Miss = 'unknown' | 'wrong_secret'

/**
 * A set of scopes shared by every cached key that holds it: the header value, and per route
 * whether it grants that route (0 not yet known, 1 granted, 2 denied). Keys with the same scopes
 * share one of these, so a key's own entry holds only a pointer.
 */
export class ScopeSet {
  readonly list: readonly string[]
  readonly header: string
  readonly routeGrant: Uint8Array

  constructor(list: readonly string[], routeCount: number) {
    this.list = list
    this.header = list.join(',')
    this.routeGrant = new Uint8Array(routeCount)
  }
}

/** A CIDR binding and the one-entry memo of its last answer (keep-alive clients repeat their address). */
export interface Binding {
  readonly allowedFrom: (address: string) => boolean
  lastAddress: string
  lastAllowed: boolean
}

const STATE_ACTIVE = 0
const STATE_ROTATING = 1
const STATE_REVOKED = 2
const STATE_EXPIRED = 3
const STATES = { active: STATE_ACTIVE, rotating: STATE_ROTATING, revoked: STATE_REVOKED, expired: STATE_EXPIRED } as const

/**
 * What keys with the same type, status, scopes, rate limit and CIDR binding, loaded at about the
 * same time, have in common, down to when the cache asks the store about them again. Such keys
 * share one profile, so a cached key's own entry holds a single pointer for all of it (keys
 * differing in any of them have their own: bench/cache-heap.ts measures it).
 */
export class KeyProfile {
  readonly type: KeyType
  readonly scopes: ScopeSet
  readonly state: number
  readonly binding: Binding | undefined
  readonly limit: RateLimit
  /** On `tick()`'s clock, when the cache asks the store again about the keys holding it. */
  readonly staleAt: number

  constructor(record: KeyRecord, scopes: ScopeSet, limit: RateLimit, staleAt: number) {
    this.type = KEY_TYPES[KEY_TYPES.indexOf(record.type)] as KeyType
    this.scopes = scopes
    this.state = STATES[record.status]
    this.binding = record.allowedCidrs.length > 0 ? { allowedFrom: rangeMatcher(record.allowedCidrs), lastAddress: '', lastAllowed: false } : undefined
    this.limit = limit
    this.staleAt = staleAt
  }
}

/**
 * What the request path needs of a key that never expires, and nothing more: the stored record
 * is not kept, and what keys share is in their profile, so a cached key costs a few hundred
 * bytes (bench/cache-heap.ts measures it). A key with an expiry or a rotation grace is an
 * `ExpiringKey`, one field more.
 */
export class CachedKey {
  readonly id: string
  /** The name as a header value: as it is when PLAIN, else percent-encoded. */
  readonly name: string
  readonly profile: KeyProfile
  /** The transaction that last changed the row it was loaded from (KeyService.lookup); -1 for not known. */
  changeXid = -1
  /**
   * The cache's count of marks (KeyCache#mark) when the store was asked about it, or since which
   * no mark of its id can have made it stale (looked at then): a mark made after it judges it.
   */
  marked = 0

  constructor(record: KeyRecord, profile: KeyProfile) {
    this.id = record.id
    this.name = PLAIN.test(record.name) ? record.name : encodeURIComponent(record.name)
    this.profile = profile
  }

  get type(): KeyType {
    return this.profile.type
  }

  get scopes(): ScopeSet {
    return this.profile.scopes
  }

  get binding(): Binding | undefined {
    return this.profile.binding
  }

  get limit(): RateLimit {
    return this.profile.limit
  }

  /** Epoch ms from which it is refused (expiry, or the end of a rotation grace; Infinity for never). */
  get validUntil(): number {
    return Infinity
  }

  /** Refused whatever the time: the status when it was loaded. */
  get refused(): 'revoked' | 'expired' | undefined {
    const state = this.profile.state
    return state === STATE_REVOKED ? 'revoked' : state === STATE_EXPIRED ? 'expired' : undefined
  }

  get rotating(): boolean {
    return this.profile.state === STATE_ROTATING
  }
}

/** A cached key refused from a given time: its expiry, or the end of its rotation grace. */
export class ExpiringKey extends CachedKey {
  readonly #until: number

  constructor(record: KeyRecord, profile: KeyProfile, until: number) {
    super(record, profile)
    this.#until = until
  }

  override get validUntil(): number {
    return this.#until
  }
}

// Sent as it is: printable ASCII without `%`, and no space at either end (which a header parser
// trims). Other names are percent-encoded, so a value holding `%` is
// always encoded (a name `caf%C3%A9` and a name `café` arrived alike) and an upstream can give
// every value to decodeURIComponent, which leaves a plain one as it is.
const PLAIN = /^(?! )[\x20-\x24\x26-\x7e]*(?<! )$/

/** Most distinct scope sets, and kinds of profile, shared; past this, keys get their own (memory stays bounded by the cache). */
const MAX_SHARED = 4096

export function scopeSets(routeCount: number): (scopes: readonly string[]) => ScopeSet {
  const shared = new Map<string, ScopeSet>()
  return (scopes) => {
    const id = scopes.join('\n')
    let set = shared.get(id)
    if (set === undefined) {
      set = new ScopeSet(Object.freeze([...scopes]), routeCount)
      if (shared.size < MAX_SHARED) shared.set(id, set)
    }
    return set
  }
}

/**
 * The gateway's `build`: a record's cached key, stale at `staleAt`. Its profile is shared with
 * the keys of the same profile stale at the same time; to share more, `staleAt` is rounded down
 * to a 64th of the TTL (`ttl`, in ticks), so a key is asked about again at most that much early.
 */
export function cachedKeys(routeCount: number, limitFor: (record: KeyRecord) => RateLimit): (record: KeyRecord, staleAt: number, ttl: number) => CachedKey {
  const scopeSetOf = scopeSets(routeCount)
  // The newest profile of each kind: older ones live on only in the keys that hold them.
  const newest = new Map<string, KeyProfile>()
  return (record, staleAt, ttl) => {
    const step = Math.max(1, Math.floor(ttl / 64))
    const at = staleAt - (staleAt % step)
    const limit = record.rateLimit
    // JSON, so no two lists read alike: joined by a character, ["fe80::1%x,127.0.0.1/32"] (one
    // CIDR with a zone id holding a comma) was ["fe80::1%x", "127.0.0.1/32"], and the key loaded
    // second ran under the first one's binding (found by a review).
    const kind = JSON.stringify([record.type, record.status, limit ? [limit.limit, limit.windowS] : null, record.allowedCidrs, record.scopes])
    let profile = newest.get(kind)
    if (profile === undefined || profile.staleAt !== at) {
      profile = new KeyProfile(record, scopeSetOf(record.scopes), limitFor(record), at)
      if (newest.size < MAX_SHARED || newest.has(kind)) newest.set(kind, profile)
    }
    const until = validUntilOf(record)
    return until === Infinity ? new CachedKey(record, profile) : new ExpiringKey(record, profile, until)
  }
}

/** The cache's clock: tenths of a second since the process started (monotonic, and a small integer V8 holds without a heap box). */
export function tick(): number {
  return Math.floor(performance.now() / 100)
}

export interface KeyCacheOptions {
  keys: KeyService
  ttlS: number
  capacity: number
  negativeTtlS: number
  negativeMax: number
  metrics: GatewayMetrics
  /** The cached key of a record, stale at `staleAt` (`ttl` ticks after the store was asked). */
  build: (record: KeyRecord, staleAt: number, ttl: number) => CachedKey
}

/** A changed key id's mark (KeyCache#mark): made at `at` (tick), the `count`th. */
interface Mark {
  readonly count: number
  readonly at: number
  readonly keep: string | undefined
  readonly keepXid: number
  readonly from: number
}

/** Most marks held at once: past this, or a 16th of the keys cached, a walk of the cache applies them (#settleMarks). */
const MAX_MARKS = 10_000

export class KeyCache {
  readonly #keys: KeyService
  #positive: LRUCache<string, CachedKey>
  readonly #capacity: number
  #negative: LRUCache<string, Miss> | undefined
  readonly #negativeOptions: LRUCache.Options<string, Miss, unknown> | undefined
  readonly #inflight = new Map<string, Promise<CachedKey | Miss>>()
  readonly #build: KeyCacheOptions['build']
  readonly #metrics: GatewayMetrics['cache']
  /** The TTL in ticks. */
  readonly #ttl: number
  /** The negative TTL in ticks: how long a key refused whatever the request is held too. */
  readonly #refusedTtl: number
  #generation = 0
  /**
   * Changed key ids, oldest first, marked rather than looked for in the cache, which is keyed by
   * hash: a walk of the cache for each changed key (before) cost 1.2 to 1.5 ms at 10,000 keys and
   * 17 to 37 ms at 100,000 (bench/cache-invalidation.ts), for a revocation on another instance or
   * the store check's changed keys. A mark costs a look-up at each use of a cached key while any
   * is held, and is held a TTL at most.
   */
  readonly #marks = new Map<string, Mark>()
  #markCount = 0
  #pruning: NodeJS.Timeout | undefined

  constructor(o: KeyCacheOptions) {
    this.#keys = o.keys
    this.#build = o.build
    this.#metrics = o.metrics.cache
    // The TTL is the `staleAt` of the key's profile, shared by keys loaded about together, not
    // lru-cache's own per entry (two more numbers a key).
    this.#ttl = o.ttlS * 10
    // Its slots taken as it is made (`max`: about 28 bytes each, 12 of them outside the V8 heap):
    // the least memory a key held, for a capacity sized to be used.
    this.#capacity = o.capacity
    this.#positive = new LRUCache({ max: o.capacity })
    // Taken as unknown keys come (`maxSize`, each counting 1: as exact a bound, grown on demand):
    // slots made for a bound that random keys may never reach would cost some 50 bytes each at
    // start, with the TTL's, 500 MB for cache.negative_max's largest setting (found by a read-back).
    this.#negativeOptions = o.negativeTtlS > 0 && o.negativeMax > 0 ? { maxSize: o.negativeMax, sizeCalculation: () => 1, ttl: o.negativeTtlS * 1000 } : undefined
    this.#negative = this.#negativeOptions && new LRUCache(this.#negativeOptions)
    this.#refusedTtl = this.#negative === undefined ? 0 : Math.min(this.#ttl, o.negativeTtlS * 10)
  }

  /** Entries held (both caches). */
  get size(): { positive: number; negative: number } {
    return { positive: this.#positive.size, negative: this.#negative?.size ?? 0 }
  }

  /** The cached answer, or a promise of the store's; rejects when the store fails. */
  lookup(hash: string, presented: string): CachedKey | Miss | Promise<CachedKey | Miss> {
    return this.hit(hash) ?? this.known(hash) ?? this.miss(hash, presented)
  }

  /** The cached key of a hash, if any (the request path's first look). */
  hit(hash: string): CachedKey | undefined {
    const hit = this.#positive.get(hash)
    if (hit === undefined) return undefined
    // Past its expiry or grace, it is held no longer than an unknown key is (#load): kept to the
    // TTL it was loaded with, it was refused from memory there, and the time of the answer told a
    // key that once worked from one that never did (found by a review).
    const until = hit.validUntil
    const now = tick()
    if (
      now >= hit.profile.staleAt ||
      (until !== Infinity && until <= Date.now() && hit.profile.staleAt > now + this.#refusedTtl) ||
      (this.#marks.size !== 0 && hit.marked < this.#markCount && this.#stale(hash, hit))
    ) {
      this.#positive.delete(hash)
      return undefined
    }
    this.#metrics.hit.inc()
    return hit
  }

  /** What the store said of a key not found, while it is remembered (cache.negative_ttl_s): no look-up is needed. */
  known(hash: string): Miss | undefined {
    const miss = this.#negative?.get(hash)
    if (miss !== undefined) this.#metrics.negativeHit.inc()
    return miss
  }

  /** After `hit` and `known` found nothing: a promise of the store's answer (one for every caller asking meanwhile); rejects when the store fails. */
  miss(hash: string, presented: string): Promise<CachedKey | Miss> {
    this.#metrics.miss.inc()
    let pending = this.#inflight.get(hash)
    if (pending === undefined) {
      pending = this.#load(hash, presented)
      this.#inflight.set(hash, pending)
    }
    return pending
  }

  async #load(hash: string, presented: string): Promise<CachedKey | Miss> {
    const generation = this.#generation
    // Stale a TTL after the question, not the answer: what the store said is no newer than that,
    // and than the marks made before it.
    const asked = tick()
    const marked = this.#markCount
    try {
      const found = await this.#keys.lookup(presented)
      // A key refused whatever the request (revoked, expired, past its grace) is held only as long
      // as an unknown key or a wrong secret (cache.negative_ttl_s, none when that cache is off):
      // held for the whole TTL, it was answered from memory where they are asked about again,
      // and the time of the answer told a key that once worked from one that never did (found by
      // a review). The answers themselves are alike (SPEC §3).
      const ttl = found.key !== undefined && !evaluateKey(found.key, new Date()).ok ? this.#refusedTtl : this.#ttl
      let answer: CachedKey | Miss
      if (found.key !== undefined) {
        answer = this.#build(found.key, asked + ttl, ttl)
        answer.changeXid = found.changeXid
        answer.marked = marked
      } else answer = found.reason === 'wrong_secret' ? 'wrong_secret' : 'unknown'
      if (generation === this.#generation) {
        if (typeof answer === 'string') this.#negative?.set(hash, answer)
        else this.#positive.set(hash, answer)
      }
      return answer
    } finally {
      this.#inflight.delete(hash)
    }
  }

  /**
   * Forgets everything cached about these key ids (any of their hashes). The cache is keyed by
   * hash, so the ids are marked (#mark) rather than looked for: give it all the ids of a change at once.
   */
  invalidateKeys(ids: ReadonlySet<string>): void {
    if (ids.size === 0) return
    const count = ++this.#markCount
    for (const id of ids) this.#mark(id, count, undefined, -1)
    this.#settleMarks()
    this.#forgetInflight()
  }

  /** A query in flight now puts no answer back (the generation), and no request joins it. */
  #forgetInflight(): void {
    this.#generation++
    this.#inflight.clear()
  }

  /**
   * The store check's changed keys (`hex`, the stored SHA-256 of each, as the change left it):
   * drops what is cached of them, but for a key cached under that very hash from its row as the
   * change left it (its `changeXid`), which the change cannot have made stale. Any other entry
   * of a changed id goes, such as one under the hash a change by hand in SQL replaced (found by a
   * review: `holdsChange` asked only about the current hash, and the old secret stayed). Returns
   * how many changed keys were kept.
   */
  dropChanged(changed: ReadonlyArray<{ id: string; keyHash: string; changeXid: number }>): number {
    if (changed.length === 0) return 0
    const count = ++this.#markCount
    let kept = 0
    let fresh = false
    for (const k of changed) {
      const digest = digestFromHex(k.keyHash)
      const entry = this.#positive.peek(digest)
      const holds = k.changeXid !== -1 && entry !== undefined && entry.id === k.id && entry.changeXid === k.changeXid
      const from = this.#mark(k.id, count, holds ? digest : undefined, k.changeXid)
      if (holds && entry.marked >= from) kept++
      else {
        fresh = true
        // A key cached as unknown before it was made or imported, under its hash.
        this.#negative?.delete(digest)
      }
    }
    this.#settleMarks()
    if (fresh) this.#forgetInflight()
    return kept
  }

  /**
   * Marks a changed key id: its entries asked about before mark `count` are stale (#stale), but
   * the one under `keep` cached from the row the change left (`keepXid`) and asked about at or
   * after the returned count. A mark held for the id is folded in: an entry one of them makes stale
   * stays stale. (keep is kept only where both keep the same entry; else from the older mark on.)
   */
  #mark(id: string, count: number, keep: string | undefined, keepXid: number): number {
    const held = this.#marks.get(id)
    const from = held === undefined ? 0 : held.keep === keep && held.keepXid === keepXid ? held.from : held.count
    // Deleted first, so that the marks stay in the order they were made (#pruneMarks).
    if (held !== undefined) this.#marks.delete(id)
    this.#marks.set(id, { count, at: tick(), keep, keepXid, from })
    return from
  }

  /**
   * Whether a mark of its id makes this entry stale (see #mark). One that none does is looked at
   * again only after the next mark (its `marked` moved up to now): a key used often pays the
   * look-up of its id once a mark, not once a use (a use cost 40 to 380 ns more while marks were
   * held, bench/cache-invalidation.ts). So is one its mark keeps: it is the row as that change
   * left it, as a key asked about now would be, and a later mark either keeps that same row or
   * makes it stale.
   */
  #stale(hash: string, entry: CachedKey): boolean {
    const mark = this.#marks.get(entry.id)
    const marked = entry.marked
    if (mark !== undefined && marked < mark.count && !(hash === mark.keep && entry.changeXid === mark.keepXid && marked >= mark.from)) return true
    entry.marked = this.#markCount
    return false
  }

  /**
   * Past as many marks as is worth holding, one walk of the cache drops what they make stale and
   * they all go (and a query in flight puts no answer back, which the marks would have judged):
   * the walk's cost, spread over the marks, is small. Else the oldest ones are let go a TTL after
   * they were made, when what they made stale is stale by its age anyway.
   */
  #settleMarks(): void {
    if (this.#marks.size > Math.min(MAX_MARKS, this.#positive.size >> 4)) {
      const stale: string[] = []
      for (const [hash, entry] of this.#positive) if (this.#stale(hash, entry)) stale.push(hash)
      for (const hash of stale) this.#positive.delete(hash)
      this.#marks.clear()
      this.#forgetInflight()
    }
    this.#pruneMarks()
  }

  #pruneMarks(): void {
    const now = tick()
    for (const [id, mark] of this.#marks) {
      if (mark.at + this.#ttl > now) break
      this.#marks.delete(id)
    }
    clearTimeout(this.#pruning)
    this.#pruning = undefined
    const first = this.#marks.values().next()
    if (first.done !== true) {
      this.#pruning = setTimeout(() => this.#pruneMarks(), (first.value.at + this.#ttl - now) * 100 + 1)
      this.#pruning.unref()
    }
  }

  /** Marks held (for tests and the bench). */
  get marksHeld(): number {
    return this.#marks.size
  }

  /** Forgets one presented key's answers (a newly created or imported key may have been cached as unknown); `hex` is the stored SHA-256. */
  invalidateHash(hex: string): void {
    const hash = digestFromHex(hex)
    this.#generation++
    this.#inflight.delete(hash)
    this.#positive.delete(hash)
    this.#negative?.delete(hash)
  }

  invalidateAll(): void {
    this.#forgetInflight()
    this.#marks.clear()
    this.#pruneMarks()
    // A new cache, not clear(): lru-cache's clear() visits every entry through a generator, about
    // 2 s of a blocked event loop for 1,000,000 keys (found by a read-back), where making the
    // slots anew takes a tenth of that.
    this.#positive = new LRUCache({ max: this.#capacity })
    this.#negative = this.#negativeOptions && new LRUCache(this.#negativeOptions)
  }
}
