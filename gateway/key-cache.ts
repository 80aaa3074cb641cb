// The validation cache. Keyed by the SHA-256 hex of the presented key (never the key), bounded:
// quick-lru keeps up to twice its maxSize, so maxSize is half the configured capacity. Unknown
// keys and wrong secrets go to a separate small cache with a short TTL, so random keys cannot
// grow memory and a burst of one bad key costs one store query. Concurrent misses for one key
// share one store query. A generation counter keeps a query that was in flight during an
// invalidation from putting the stale answer back.
import QuickLRU from 'quick-lru'
import type { KeyService } from '../core/keys/service.ts'
import type { KeyRecord } from '../core/keys/types.ts'
import type { GatewayMetrics } from '../core/metrics.ts'
import { rangeMatcher } from '../core/keys/evaluate.ts'
import type { SizedLimiter } from './rate-limit.ts'

export type Miss = 'unknown' | 'wrong_secret'

export interface CachedKey {
  readonly record: KeyRecord
  /** Refused whatever the time: the status when it was loaded. */
  readonly refused: 'revoked' | 'expired' | undefined
  /** Epoch ms from which it is refused (expiry, or the end of a rotation grace). */
  readonly validUntil: number
  readonly allowedFrom: ((address: string) => boolean) | undefined
  /** One-entry memo of the CIDR binding check: keep-alive clients repeat their address. */
  lastAddress: string
  lastAllowed: boolean
  readonly limit: SizedLimiter
  /** Identity header values, computed once. */
  readonly name: string
  readonly scopes: string
  /** Per route index: 0 not yet known, 1 granted, 2 denied. */
  readonly routeGrant: Uint8Array
}

// Header values must be visible ASCII; other names are sent percent-encoded.
const PLAIN = /^[\x20-\x7e]*$/

export function toCachedKey(record: KeyRecord, limit: SizedLimiter, routeCount: number): CachedKey {
  let validUntil = record.expiresAt ? record.expiresAt.getTime() : Infinity
  if (record.status === 'rotating') validUntil = Math.min(validUntil, record.graceUntil ? record.graceUntil.getTime() : 0)
  return {
    record,
    refused: record.status === 'revoked' || record.status === 'expired' ? record.status : undefined,
    validUntil,
    allowedFrom: record.allowedCidrs.length > 0 ? rangeMatcher(record.allowedCidrs) : undefined,
    lastAddress: '',
    lastAllowed: false,
    limit,
    name: PLAIN.test(record.name) ? record.name : encodeURIComponent(record.name),
    scopes: record.scopes.join(','),
    routeGrant: new Uint8Array(routeCount),
  }
}

export interface KeyCacheOptions {
  keys: KeyService
  ttlS: number
  capacity: number
  negativeTtlS: number
  negativeMax: number
  metrics: GatewayMetrics
  build: (record: KeyRecord) => CachedKey
}

export class KeyCache {
  readonly #keys: KeyService
  readonly #positive: QuickLRU<string, CachedKey>
  readonly #negative: QuickLRU<string, Miss> | undefined
  readonly #inflight = new Map<string, Promise<CachedKey | Miss>>()
  readonly #build: (record: KeyRecord) => CachedKey
  readonly #metrics: GatewayMetrics['cache']
  #generation = 0

  constructor(o: KeyCacheOptions) {
    this.#keys = o.keys
    this.#build = o.build
    this.#metrics = o.metrics.cache
    this.#positive = new QuickLRU({ maxSize: Math.max(1, Math.floor(o.capacity / 2)), maxAge: o.ttlS * 1000 })
    this.#negative =
      o.negativeTtlS > 0 && o.negativeMax > 0 ? new QuickLRU({ maxSize: Math.max(1, Math.floor(o.negativeMax / 2)), maxAge: o.negativeTtlS * 1000 }) : undefined
  }

  /** Entries held (both caches). */
  get size(): { positive: number; negative: number } {
    return { positive: this.#positive.size, negative: this.#negative?.size ?? 0 }
  }

  /** The cached answer, or a promise of the store's; rejects when the store fails. */
  lookup(hash: string, presented: string): CachedKey | Miss | Promise<CachedKey | Miss> {
    const hit = this.#positive.get(hash)
    if (hit !== undefined) {
      this.#metrics.hit.inc()
      return hit
    }
    const miss = this.#negative?.get(hash)
    if (miss !== undefined) {
      this.#metrics.negativeHit.inc()
      return miss
    }
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
    try {
      const found = await this.#keys.lookup(presented)
      const answer: CachedKey | Miss = found.key ? this.#build(found.key) : found.reason === 'wrong_secret' ? 'wrong_secret' : 'unknown'
      if (generation === this.#generation) {
        if (typeof answer === 'string') this.#negative?.set(hash, answer)
        else this.#positive.set(hash, answer)
      }
      return answer
    } finally {
      this.#inflight.delete(hash)
    }
  }

  /** Forgets everything cached about a key id (any of its hashes). */
  invalidateKey(id: string): void {
    this.#generation++
    this.#inflight.clear()
    const stale: string[] = []
    for (const [hash, entry] of this.#positive) if (entry.record.id === id) stale.push(hash)
    for (const hash of stale) this.#positive.delete(hash)
  }

  /** Forgets one presented key's answers (a newly created or imported key may have been cached as unknown). */
  invalidateHash(hash: string): void {
    this.#generation++
    this.#inflight.delete(hash)
    this.#positive.delete(hash)
    this.#negative?.delete(hash)
  }

  invalidateAll(): void {
    this.#generation++
    this.#inflight.clear()
    this.#positive.clear()
    this.#negative?.clear()
  }
}
