// The IP deny list as the request path sees it: config entries plus stored ones, parsed once,
// indexed by prefix, with answers memoised per address (cleared whenever the list changes). A
// stored entry stops matching at its expiry: the list is recompiled when the earliest expiry passes.
// A reload that reads the entries already held parses none of them again and keeps the index and
// the memo; a reload that finds the store's change mark unchanged reads none (gateway/index.ts).
import QuickLRU from 'quick-lru'
import ipaddr from 'ipaddr.js'
import type { DenyChange, DenyEntry } from '../core/deny-list.ts'
import { parseAddress, parseRange } from '../core/keys/evaluate.ts'
import type { RequestState, Stage } from './state.ts'

const MEMO_SIZE = 4096
/** The IPv4-mapped block's first address. */
const MAPPED = ipaddr.IPv6.parse('::ffff:0:0')

/** A range reduced to what a lookup needs: its family, its length, and its network's leading `bits` bits. */
interface Prefix {
  v6: boolean
  bits: number
  /** The network's first `bits` bits as an integer (the rest of the written address is ignored, as ipaddr.js's match does). */
  head: number | bigint
  /** An IPv6 range wider than /96 holding the IPv4-mapped block (see #everyIpv4). */
  holdsIpv4: boolean
}

/** BigInt(128 - bits), for bits 0 to 128: made once, not per lookup. */
const SHIFT6 = Array.from({ length: 129 }, (_, bits) => BigInt(128 - bits))

const v4Value = (a: ipaddr.IPv4): number => {
  const [b0, b1, b2, b3] = a.octets as [number, number, number, number]
  return ((b0 << 24) | (b1 << 16) | (b2 << 8) | b3) >>> 0
}
const v6Value = (a: ipaddr.IPv6): bigint => {
  let v = 0n
  for (const p of a.parts) v = (v << 16n) | BigInt(p)
  return v
}
// `>>> 32` shifts by nothing in JavaScript: a /0 has no leading bits, every address's head is 0.
const v4Head = (value: number, bits: number): number => (bits === 0 ? 0 : value >>> (32 - bits))
const v6Head = (value: bigint, bits: number): bigint => value >> (SHIFT6[bits] as bigint)

function toPrefix(cidr: string): Prefix | undefined {
  const range = parseRange(cidr)
  if (!range) return undefined
  const [net, bits] = range
  if (net.kind() === 'ipv4') return { v6: false, bits, head: v4Head(v4Value(net as ipaddr.IPv4), bits), holdsIpv4: false }
  return { v6: true, bits, head: v6Head(v6Value(net as ipaddr.IPv6), bits), holdsIpv4: bits < 96 && MAPPED.match(net, bits) }
}

/**
 * The entries in force, per family one set per prefix length present, of the heads of that
 * length: a lookup costs one set probe per distinct length, not one comparison per entry (a
 * review found the linear scan took 0.3 to 0.6 ms of CPU per new client address with 20,000
 * entries, and the memo holds only 4096 answers). Overlapping and duplicate entries need nothing
 * more: the index is rebuilt from the entries in force at every change and expiry.
 */
class PrefixIndex {
  readonly #v4 = new Map<number, Set<number>>()
  readonly #v6 = new Map<number, Set<bigint>>()
  #v4Lengths: number[] = []
  #v6Lengths: number[] = []

  add(p: Prefix): void {
    if (p.v6) {
      let heads = this.#v6.get(p.bits)
      if (!heads) this.#v6.set(p.bits, (heads = new Set()))
      heads.add(p.head as bigint)
    } else {
      let heads = this.#v4.get(p.bits)
      if (!heads) this.#v4.set(p.bits, (heads = new Set()))
      heads.add(p.head as number)
    }
  }

  /** Call once all entries are added. */
  seal(): this {
    this.#v4Lengths = [...this.#v4.keys()]
    this.#v6Lengths = [...this.#v6.keys()]
    return this
  }

  has(a: ipaddr.IPv4 | ipaddr.IPv6): boolean {
    if (a.kind() === 'ipv4') {
      if (this.#v4Lengths.length === 0) return false
      const value = v4Value(a as ipaddr.IPv4)
      for (const bits of this.#v4Lengths) if ((this.#v4.get(bits) as Set<number>).has(v4Head(value, bits))) return true
      return false
    }
    if (this.#v6Lengths.length === 0) return false
    const value = v6Value(a as ipaddr.IPv6)
    for (const bits of this.#v6Lengths) if ((this.#v6.get(bits) as Set<bigint>).has(v6Head(value, bits))) return true
    return false
  }
}

/** A stored entry as read, with its range parsed (undefined if it is not one: such an entry matches nothing). */
interface Stored {
  cidr: string
  prefix: Prefix | undefined
  expiresAt: number
  /** In the index built by the last recompilation. */
  indexed: boolean
}

export class DenyMatcher {
  readonly #fixed: Prefix[]
  /** By id. */
  #stored = new Map<string, Stored>()
  /** Stored entries in the index (those in force at the last recompilation). */
  #indexedStored = 0
  #size = 0
  #parsed = 0
  #index = new PrefixIndex()
  #nextExpiry = Infinity
  /** The time the last recompilation counted expiries at. */
  #compiledAtMs = -Infinity
  // quick-lru holds up to twice maxSize.
  readonly #memo = new QuickLRU<string, boolean>({ maxSize: MEMO_SIZE / 2 })

  constructor(configured: readonly string[]) {
    this.#fixed = configured.map(toPrefix).filter((p): p is Prefix => p !== undefined)
    this.#compile(Date.now())
  }

  /** Entries in force (after the last recompilation). */
  get size(): number {
    return this.#size
  }

  /** Stored entries parsed so far (a reload parses only the entries it had not seen: tests and bench/deny-list.ts count them). */
  get parsedEntries(): number {
    return this.#parsed
  }

  #parse(cidr: string): Prefix | undefined {
    this.#parsed++
    return toPrefix(cidr)
  }

  /**
   * Replaces the stored entries (after a reload). An entry already held with the same id and
   * range keeps its parsed range, and when the entries in force are the ones indexed, the index
   * and the memo stay: a review found that each reload (every `deny_list_refresh_s`, 5 s by
   * default) parsed all 20,000 entries of a list again and rebuilt its index, 0.1 to 1.4 s of CPU
   * per gateway process, with nothing changed. Returns whether the entries in force changed.
   */
  setStored(entries: readonly DenyEntry[], nowMs: number): boolean {
    const held = this.#stored
    const next = new Map<string, Stored>()
    // An expiry passed since the last recompilation: the entries in force are fewer.
    let changed = nowMs >= this.#nextExpiry
    let inForce = 0
    for (const e of entries) {
      const expiresAt = e.expiresAt ? e.expiresAt.getTime() : Infinity
      const old = held.get(e.id)
      const same = old !== undefined && old.cidr === e.cidr
      const s: Stored = same && old.expiresAt === expiresAt ? old : { cidr: e.cidr, prefix: same ? old.prefix : this.#parse(e.cidr), expiresAt, indexed: false }
      const before = next.size
      next.set(e.id, s)
      // An id read twice (the store's primary key allows none): counted as a change, not trusted.
      if (next.size === before) changed = true
      if (s.prefix && expiresAt > nowMs) {
        inForce++
        // In force now and not indexed as it is: new, another range, another expiry, or one the
        // last recompilation left out (a clock set back).
        if (!s.indexed) changed = true
      }
    }
    this.#stored = next
    // Every entry in force is one indexed as it is, and as many as were indexed: the same entries.
    if (!changed && inForce === this.#indexedStored) return false
    this.#compile(nowMs)
    return true
  }

  /**
   * What a reload that read nothing (the store's change mark unchanged) does: recompiles when an
   * entry held has expired since the last recompilation. Returns whether the entries in force changed.
   */
  expire(nowMs: number): boolean {
    // A clock set back before the last recompilation may bring back an entry it left out as
    // expired (a step forward past an expiry, then back): the entries are all held, so a
    // recompilation does, with no read (found by a review: the entry stayed off until the next
    // change of the list).
    if (nowMs < this.#nextExpiry && nowMs >= this.#compiledAtMs) return false
    this.#compile(nowMs)
    return true
  }

  /** Applies one change made in this process at once, before the reload that follows it. */
  apply(change: DenyChange, nowMs: number): void {
    const { id, cidr, expiresAt } = change.entry
    this.#stored.delete(id)
    if (change.action === 'added') this.#stored.set(id, { cidr, prefix: this.#parse(cidr), expiresAt: expiresAt ? expiresAt.getTime() : Infinity, indexed: false })
    this.#compile(nowMs)
  }

  #compile(nowMs: number): void {
    // A new index replaces the old one whole: no lookup sees one half built.
    const index = new PrefixIndex()
    let size = 0
    let everyIpv4 = false
    const take = (p: Prefix): void => {
      index.add(p)
      size++
      if (p.holdsIpv4) everyIpv4 = true
    }
    for (const p of this.#fixed) take(p)
    let next = Infinity
    let indexedStored = 0
    for (const e of this.#stored.values()) {
      e.indexed = e.prefix !== undefined && e.expiresAt > nowMs
      if (!e.indexed) continue
      take(e.prefix as Prefix)
      indexedStored++
      if (e.expiresAt < next) next = e.expiresAt
    }
    this.#index = index.seal()
    this.#size = size
    this.#indexedStored = indexedStored
    this.#everyIpv4 = everyIpv4
    this.#nextExpiry = next
    this.#compiledAtMs = nowMs
    this.#memo.clear()
  }

  /**
   * An IPv6 range wider than /96 that holds the IPv4-mapped block (`::/0`, `::/80`,
   * `::ffff:0:0/95`) holds every IPv4 address as `::ffff:a.b.c.d`, the form keygate reads as IPv4:
   * a deny list reads it so, the stricter way (a key's bindings and trusted_proxies, lists of what
   * is allowed, read such a range as IPv6 only, also the stricter way).
   */
  #everyIpv4 = false

  denied(address: string, nowMs: number): boolean {
    if (nowMs >= this.#nextExpiry) this.#compile(nowMs)
    let hit = this.#memo.get(address)
    if (hit === undefined) {
      const a = parseAddress(address)
      hit = a !== undefined && ((a.kind() === 'ipv4' && this.#everyIpv4) || this.#index.has(a))
      this.#memo.set(address, hit)
    }
    return hit
  }
}

export function createDenyListStage(matcher: DenyMatcher, now: () => number): Stage {
  return (s: RequestState) => (matcher.denied(s.address, now()) ? 'ip_blocked' : undefined)
}
