// The IP deny list as the request path sees it: config entries plus stored ones, parsed once,
// indexed by prefix, with answers memoised per address (cleared whenever the list changes). A
// stored entry stops matching at its expiry: the entries that expire are held soonest first, and
// taken out as their expiries pass. An entry added, changed, removed or expired changes the index
// by itself alone; a reload that reads the entries already held parses none of them again and
// keeps the index and the memo; a reload that finds the store's change mark unchanged reads none
// (gateway/index.ts).
import QuickLRU from 'quick-lru'
import ipaddr from 'ipaddr.js'
import { deniesEvery, type DenyChange, type DenyRange } from '../core/deny-list.ts'
import { parseAddress, parseRange } from '../core/keys/evaluate.ts'
import { otherWork, SLICE_MS } from '../core/slices.ts'
import type { RequestState, Stage } from './state.ts'

const MEMO_SIZE = 4096

/** A range reduced to what a lookup needs: its family, its length, and its network's leading `bits` bits. */
interface Prefix {
  v6: boolean
  bits: number
  /** The network's first `bits` bits as an integer (the rest of the written address is ignored, as ipaddr.js's match does). */
  head: number | bigint
  /** An IPv6 range holding the IPv4-mapped block (core/deny-list.ts deniesEvery; see DenyMatcher.denied). */
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
  return { v6: true, bits, head: v6Head(v6Value(net as ipaddr.IPv6), bits), holdsIpv4: deniesEvery(range) !== undefined }
}

/**
 * The entries in force, per family one map per prefix length present, of the heads of that
 * length (each with how many entries in force have it): a lookup costs one probe per distinct
 * length, not one comparison per entry (a review found the linear scan took 0.3 to 0.6 ms of CPU
 * per new client address with 20,000 entries, and the memo holds only 4096 answers). An entry
 * comes and goes on its own: overlapping and duplicate entries are counted, so removing one
 * leaves the others.
 */
class PrefixIndex {
  readonly #v4 = new Map<number, Map<number, number>>()
  readonly #v6 = new Map<number, Map<bigint, number>>()
  #v4Lengths: number[] = []
  #v6Lengths: number[] = []
  /** IPv6 entries holding the IPv4-mapped block (see DenyMatcher.denied). */
  everyIpv4 = 0

  add(p: Prefix): void {
    if (p.holdsIpv4) this.everyIpv4++
    const byLength = (p.v6 ? this.#v6 : this.#v4) as Map<number, Map<number | bigint, number>>
    let heads = byLength.get(p.bits)
    if (!heads) {
      byLength.set(p.bits, (heads = new Map()))
      this.#lengths()
    }
    heads.set(p.head, (heads.get(p.head) ?? 0) + 1)
  }

  remove(p: Prefix): void {
    if (p.holdsIpv4) this.everyIpv4--
    const byLength = (p.v6 ? this.#v6 : this.#v4) as Map<number, Map<number | bigint, number>>
    const heads = byLength.get(p.bits) as Map<number | bigint, number>
    const count = (heads.get(p.head) as number) - 1
    if (count > 0) heads.set(p.head, count)
    else heads.delete(p.head)
    if (heads.size === 0) {
      byLength.delete(p.bits)
      this.#lengths()
    }
  }

  #lengths(): void {
    this.#v4Lengths = [...this.#v4.keys()]
    this.#v6Lengths = [...this.#v6.keys()]
  }

  has(a: ipaddr.IPv4 | ipaddr.IPv6): boolean {
    if (a.kind() === 'ipv4') {
      if (this.#v4Lengths.length === 0) return false
      const value = v4Value(a as ipaddr.IPv4)
      for (const bits of this.#v4Lengths) if ((this.#v4.get(bits) as Map<number, number>).has(v4Head(value, bits))) return true
      return false
    }
    if (this.#v6Lengths.length === 0) return false
    const value = v6Value(a as ipaddr.IPv6)
    for (const bits of this.#v6Lengths) if ((this.#v6.get(bits) as Map<bigint, number>).has(v6Head(value, bits))) return true
    return false
  }
}

/** A stored entry as read, with its range parsed (undefined if it is not one: such an entry matches nothing). */
interface Stored {
  cidr: string
  prefix: Prefix | undefined
  expiresAt: number
  /** In the index now. */
  indexed: boolean
}

/**
 * What a reload read, compared with the entries held (DenyMatcher.compare): the entries by id,
 * those held as they are kept, and the ids of those new or changed. `version` is the matcher's when
 * it was compared: a change applied since makes it stale.
 */
export interface DenyReading {
  readonly version: number
  readonly next: Map<string, Stored>
  readonly fresh: Set<string>
  /** The ids held that the reload did not read. */
  readonly gone: string[]
  /** Read twice under one id (the store's primary key allows none): counted as a change, not trusted. */
  readonly twice: boolean
}

/** Entries compared between two looks at the clock (compareInSlices). */
const STEP = 1000

const sameEntry = (s: Stored, cidr: string, expiresAt: number): boolean => s.cidr === cidr && s.expiresAt === expiresAt

/**
 * The stored entries in the index that expire, soonest first (a binary heap on expiresAt), so that
 * an expiry takes out the entries that expired and looks at no other. An entry taken out of the
 * index otherwise (removed, replaced, judged again) stays here until its time comes or the heap is
 * made again from the index (Expiries.keep), and is then passed over.
 */
class Expiries {
  #heap: Stored[] = []

  get length(): number {
    return this.#heap.length
  }

  /** The soonest expiry held (of an entry that may have left the index since), Infinity for none. */
  get next(): number {
    return this.#heap[0]?.expiresAt ?? Infinity
  }

  push(s: Stored): void {
    const h = this.#heap
    let i = h.push(s) - 1
    while (i > 0) {
      const parent = (i - 1) >> 1
      if ((h[parent] as Stored).expiresAt <= s.expiresAt) break
      h[i] = h[parent] as Stored
      i = parent
    }
    h[i] = s
  }

  /** Takes out the soonest when it expires at or before `nowMs`. */
  popDue(nowMs: number): Stored | undefined {
    const h = this.#heap
    const top = h[0]
    if (top === undefined || top.expiresAt > nowMs) return undefined
    const last = h.pop() as Stored
    if (h.length > 0) this.#sinkFrom(0, last)
    return top
  }

  /** Makes the heap again of `entries` alone (those that expire), in one pass. */
  keep(entries: Iterable<Stored>): void {
    const h: Stored[] = []
    for (const s of entries) if (s.expiresAt !== Infinity) h.push(s)
    this.#heap = h
    for (let i = (h.length >> 1) - 1; i >= 0; i--) this.#sinkFrom(i, h[i] as Stored)
  }

  #sinkFrom(start: number, s: Stored): void {
    const h = this.#heap
    let i = start
    for (;;) {
      let child = 2 * i + 1
      if (child >= h.length) break
      if (child + 1 < h.length && (h[child + 1] as Stored).expiresAt < (h[child] as Stored).expiresAt) child++
      if ((h[child] as Stored).expiresAt >= s.expiresAt) break
      h[i] = h[child] as Stored
      i = child
    }
    h[i] = s
  }
}

export class DenyMatcher {
  /** By id. */
  #stored = new Map<string, Stored>()
  readonly #fixed: number
  /** Stored entries in the index. */
  #indexedStored = 0
  #parsed = 0
  #indexWrites = 0
  readonly #index = new PrefixIndex()
  /** The indexed entries that expire, soonest first. */
  readonly #expiries = new Expiries()
  /** No indexed entry expires before then (one may have been removed since: then it is early, which costs a look at it, nothing more). */
  #nextExpiry = Infinity
  /** Entries an expiry looked at, so far (tests count them). */
  #expiryLooks = 0
  /** Every entry held was judged in force or expired as of then: a clock set back before it judges them again. */
  #judgedAtMs = -Infinity
  /** Counts the changes of the entries held (apply, commit): a reading compared before one is stale. */
  #version = 0
  // quick-lru holds up to twice maxSize.
  readonly #memo = new QuickLRU<string, boolean>({ maxSize: MEMO_SIZE / 2 })

  constructor(configured: readonly string[]) {
    const fixed = configured.map(toPrefix).filter((p): p is Prefix => p !== undefined)
    for (const p of fixed) this.#index.add(p)
    this.#fixed = fixed.length
  }

  /** Entries in force. */
  get size(): number {
    return this.#fixed + this.#indexedStored
  }

  /** Stored entries parsed so far (a reload parses only the entries it had not seen: tests and bench/deny-list.ts count them). */
  get parsedEntries(): number {
    return this.#parsed
  }

  /** Stored entries an expiry looked at so far (the expired ones, not the list: tests count them). */
  get expiryLooks(): number {
    return this.#expiryLooks
  }

  /** Stored entries put into or taken out of the index so far (a change costs its own entries, not the list's: tests count them). */
  get indexWrites(): number {
    return this.#indexWrites
  }

  /** An entry as held, not yet in the index; its range parsed, unless `old` (the entry of its id held before) had the same one. */
  #entry(old: Stored | undefined, cidr: string, expiresAt: number): Stored {
    if (old !== undefined && old.cidr === cidr) return { cidr, prefix: old.prefix, expiresAt, indexed: false }
    this.#parsed++
    return { cidr, prefix: toPrefix(cidr), expiresAt, indexed: false }
  }

  #index1(s: Stored, nowMs: number): boolean {
    const want = s.prefix !== undefined && s.expiresAt > nowMs
    if (want === s.indexed) return false
    s.indexed = want
    this.#indexWrites++
    if (want) {
      this.#index.add(s.prefix as Prefix)
      this.#indexedStored++
      if (s.expiresAt !== Infinity) this.#expiries.push(s)
      if (s.expiresAt < this.#nextExpiry) this.#nextExpiry = s.expiresAt
    } else {
      this.#index.remove(s.prefix as Prefix)
      this.#indexedStored--
    }
    return true
  }

  #unindex(s: Stored): boolean {
    return this.#index1(s, Infinity)
  }

  *#indexedEntries(): Generator<Stored> {
    for (const s of this.#stored.values()) if (s.indexed) yield s
  }

  /**
   * Every entry held judged again as of `nowMs` (the clock was set back): a pass over the entries
   * that changes in the index only those whose state changed. Returns whether any did.
   */
  #settle(nowMs: number): boolean {
    let changed = false
    for (const s of this.#stored.values()) if (this.#index1(s, nowMs)) changed = true
    this.#expiries.keep(this.#indexedEntries())
    this.#nextExpiry = this.#expiries.next
    this.#judgedAtMs = nowMs
    return changed
  }

  /**
   * Takes out of the index the entries that have expired by `nowMs`, looking at those alone.
   * Before (found by a review of costs that grow with the list), each expiry judged every entry
   * held again: with one expiring each millisecond, 9 µs a lookup at 1,000 entries, 321 µs at
   * 50,000.
   */
  #expireDue(nowMs: number): boolean {
    let changed = false
    for (let s = this.#expiries.popDue(nowMs); s !== undefined; s = this.#expiries.popDue(nowMs)) {
      this.#expiryLooks++
      // One that left the index since it was put here is passed over.
      if (s.indexed && this.#index1(s, nowMs)) changed = true
    }
    this.#nextExpiry = this.#expiries.next
    this.#judgedAtMs = nowMs
    return changed
  }

  /** Judges the entries again when an expiry has passed or the clock went back; returns whether the entries in force changed. */
  #judge(nowMs: number): boolean {
    return nowMs < this.#judgedAtMs ? this.#settle(nowMs) : this.#expireDue(nowMs)
  }

  /**
   * Judges when an expiry has passed or the clock went back, else notes the time; returns whether
   * the entries in force changed. Called once the entries held are the ones just read or changed
   * (commit, apply, expire): the expiries are made again from the index here when most of what they
   * hold has left it (entries removed or replaced before their expiry), so they stay within twice
   * the index.
   */
  #catchUp(nowMs: number): boolean {
    if (this.#expiries.length >= 2 * this.#indexedStored + 1024) {
      this.#expiries.keep(this.#indexedEntries())
      this.#nextExpiry = this.#expiries.next
    }
    if (nowMs >= this.#nextExpiry || nowMs < this.#judgedAtMs) return this.#judge(nowMs)
    this.#judgedAtMs = nowMs
    return false
  }

  #changed(changed: boolean): boolean {
    if (changed) this.#memo.clear()
    return changed
  }

  /** The steps of compare: yields every STEP entries (compareInSlices lets other work run there). */
  *#compareSteps(entries: readonly DenyRange[]): Generator<void, DenyReading> {
    const held = this.#stored
    const version = this.#version
    const next = new Map<string, Stored>()
    const fresh = new Set<string>()
    let twice = false
    for (let i = 0; i < entries.length; i++) {
      if (i % STEP === STEP - 1) yield
      const e = entries[i] as DenyRange
      const expiresAt = e.expiresAt ? e.expiresAt.getTime() : Infinity
      const old = held.get(e.id)
      if (next.has(e.id)) twice = true
      if (old !== undefined && sameEntry(old, e.cidr, expiresAt)) {
        next.set(e.id, old)
        fresh.delete(e.id)
      } else {
        next.set(e.id, this.#entry(old, e.cidr, expiresAt))
        fresh.add(e.id)
      }
    }
    const gone: string[] = []
    let i = 0
    for (const id of held.keys()) {
      if (++i % STEP === 0) yield
      if (!next.has(id)) gone.push(id)
    }
    return { version, next, fresh, gone, twice }
  }

  /** What a reload read, compared with the entries held, without changing them (commit does). */
  compare(entries: readonly DenyRange[]): DenyReading {
    const steps = this.#compareSteps(entries)
    for (;;) {
      const step = steps.next()
      if (step.done) return step.value
    }
  }

  /**
   * compare, letting other work (requests) run every SLICE_MS: a reload of 20,000 entries
   * compared them in one piece, several tens of ms of a stalled event loop on a loaded machine.
   */
  async compareInSlices(entries: readonly DenyRange[]): Promise<DenyReading> {
    const steps = this.#compareSteps(entries)
    let start = performance.now()
    for (;;) {
      const step = steps.next()
      if (step.done) return step.value
      if (performance.now() - start >= SLICE_MS) {
        await otherWork()
        start = performance.now()
      }
    }
  }

  /**
   * Makes a reading the entries held: only the entries new, changed or gone change the index,
   * and the memo is cleared only when the entries in force changed. Returns whether they did, or
   * undefined for a reading compared before a change since (apply, another commit): it is not
   * used, and the caller reads again.
   */
  commit(reading: DenyReading, nowMs: number): boolean | undefined {
    if (reading.version !== this.#version) return undefined
    this.#version++
    const held = this.#stored
    let changed = reading.twice
    for (const id of reading.gone) if (this.#unindex(held.get(id) as Stored)) changed = true
    for (const id of reading.fresh) {
      const old = held.get(id)
      if (old !== undefined && this.#unindex(old)) changed = true
      if (this.#index1(reading.next.get(id) as Stored, nowMs)) changed = true
    }
    this.#stored = reading.next
    if (this.#catchUp(nowMs)) changed = true
    return this.#changed(changed)
  }

  /**
   * Replaces the stored entries (after a reload). An entry already held with the same id and
   * range keeps its parsed range, and only the entries that changed change the index: a review
   * found that each reload (every `deny_list_refresh_s`, 5 s by default) parsed all 20,000
   * entries of a list again and rebuilt its index, 0.1 to 1.4 s of CPU per gateway process, with
   * nothing changed; a later one that one change among 20,000 rebuilt the whole index, twice in
   * the process that made it. Returns whether the entries in force changed.
   */
  setStored(entries: readonly DenyRange[], nowMs: number): boolean {
    return this.commit(this.compare(entries), nowMs) as boolean
  }

  /**
   * What a reload that read nothing (the store's change mark unchanged) does: takes out the
   * entries that have expired since, and puts back those a clock set back brings back into force
   * (a step forward past an expiry, then back: found by a review, the entry stayed off until the
   * next change of the list). Returns whether the entries in force changed.
   */
  expire(nowMs: number): boolean {
    return this.#changed(this.#catchUp(nowMs))
  }

  /** Applies one change made in this process at once, before the reload that follows it: that entry alone. */
  apply(change: DenyChange, nowMs: number): void {
    const { id, cidr, expiresAt } = change.entry
    this.#version++
    let changed = false
    const old = this.#stored.get(id)
    if (old !== undefined) {
      changed = this.#unindex(old)
      this.#stored.delete(id)
    }
    if (change.action === 'added') {
      const s = this.#entry(old, cidr, expiresAt ? expiresAt.getTime() : Infinity)
      this.#stored.set(id, s)
      if (this.#index1(s, nowMs)) changed = true
    }
    if (this.#catchUp(nowMs)) changed = true
    this.#changed(changed)
  }

  denied(address: string, nowMs: number): boolean {
    // Judged again when an expiry has passed, or when the clock is before the last judgement (set
    // back: an entry judged expired may be in force again; before, found by a review, it stayed
    // off until the next reload). Unlike #catchUp, no write per lookup: the judgement's time moves
    // at a settle or a reload only, so a step back costs one pass, the lookups after it none.
    if (nowMs >= this.#nextExpiry || nowMs < this.#judgedAtMs) this.#changed(this.#judge(nowMs))
    let hit = this.#memo.get(address)
    if (hit === undefined) {
      const a = parseAddress(address)
      // An IPv6 range wider than /96 that holds the IPv4-mapped block (`::/0`, `::/80`,
      // `::fffe:0:0/95`) holds every IPv4 address as `::ffff:a.b.c.d`, the form keygate reads as
      // IPv4: a deny list reads it so, the stricter way (a key's bindings and trusted_proxies,
      // lists of what is allowed, read such a range as IPv6 only, also the stricter way).
      hit = a !== undefined && ((a.kind() === 'ipv4' && this.#index.everyIpv4 > 0) || this.#index.has(a))
      this.#memo.set(address, hit)
    }
    return hit
  }
}

export function createDenyListStage(matcher: DenyMatcher, now: () => number): Stage {
  return (s: RequestState) => (matcher.denied(s.address, now()) ? 'ip_blocked' : undefined)
}
