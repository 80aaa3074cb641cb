// The IP deny list as the request path sees it: config entries plus stored ones, parsed once,
// with answers memoised per address (cleared whenever the list changes). A stored entry stops
// matching at its expiry: the list is recompiled when the earliest expiry passes.
import QuickLRU from 'quick-lru'
import ipaddr from 'ipaddr.js'
import type { DenyChange, DenyEntry } from '../core/deny-list.ts'
import { parseAddress, parseRange } from '../core/keys/evaluate.ts'
import type { RequestState, Stage } from './state.ts'

type Range = [ipaddr.IPv4 | ipaddr.IPv6, number]

const MEMO_SIZE = 4096
/** The IPv4-mapped block's first address. */
const MAPPED = ipaddr.IPv6.parse('::ffff:0:0')

export class DenyMatcher {
  readonly #fixed: Range[]
  #stored: Array<{ id: string; range: Range; expiresAt: number }> = []
  #active: Range[] = []
  #nextExpiry = Infinity
  // quick-lru holds up to twice maxSize.
  readonly #memo = new QuickLRU<string, boolean>({ maxSize: MEMO_SIZE / 2 })

  constructor(configured: readonly string[]) {
    this.#fixed = configured.map(parseRange).filter((r): r is Range => r !== undefined)
    this.#compile(Date.now())
  }

  /** Entries in force (after the last recompilation). */
  get size(): number {
    return this.#active.length
  }

  /** Replaces the stored entries (after a reload). */
  setStored(entries: readonly DenyEntry[], nowMs: number): void {
    this.#stored = []
    for (const e of entries) {
      const range = parseRange(e.cidr)
      if (range) this.#stored.push({ id: e.id, range, expiresAt: e.expiresAt ? e.expiresAt.getTime() : Infinity })
    }
    this.#compile(nowMs)
  }

  /** Applies one change made in this process at once, before the reload that follows it. */
  apply(change: DenyChange, nowMs: number): void {
    this.#stored = this.#stored.filter((e) => e.id !== change.entry.id)
    if (change.action === 'added') {
      const range = parseRange(change.entry.cidr)
      if (range) this.#stored.push({ id: change.entry.id, range, expiresAt: change.entry.expiresAt ? change.entry.expiresAt.getTime() : Infinity })
    }
    this.#compile(nowMs)
  }

  #compile(nowMs: number): void {
    const active = [...this.#fixed]
    let next = Infinity
    for (const e of this.#stored) {
      if (e.expiresAt <= nowMs) continue
      active.push(e.range)
      if (e.expiresAt < next) next = e.expiresAt
    }
    this.#active = active
    this.#everyIpv4 = active.some(([net, bits]) => net.kind() === 'ipv6' && bits < 96 && MAPPED.match(net, bits))
    this.#nextExpiry = next
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
      hit = false
      const a = parseAddress(address)
      if (a && a.kind() === 'ipv4' && this.#everyIpv4) hit = true
      else if (a) {
        const kind = a.kind()
        for (const [net, bits] of this.#active) {
          if (net.kind() === kind && a.match(net, bits)) {
            hit = true
            break
          }
        }
      }
      this.#memo.set(address, hit)
    }
    return hit
  }
}

export function createDenyListStage(matcher: DenyMatcher, now: () => number): Stage {
  return (s: RequestState) => (matcher.denied(s.address, now()) ? 'ip_blocked' : undefined)
}
