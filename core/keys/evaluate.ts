// Whether a stored key may be used now, from this address. Pure: the gateway calls it on every
// request with a cached record, the CLI and admin API with a fresh one.
import ipaddr from 'ipaddr.js'
import QuickLRU from 'quick-lru'
import type { ErrorCode } from '../errors.ts'
import type { KeyRecord, KeyStatus } from './types.ts'

export type Verdict = { ok: true } | { ok: false; code: ErrorCode; reason: string }

const OK: Verdict = Object.freeze({ ok: true })

export type Range = [ipaddr.IPv4 | ipaddr.IPv6, number]

// The gateway parses the client address (and X-Forwarded-For hops) of every request, mostly the
// same few addresses again: parsed addresses, and their canonical text once asked for, are kept,
// boundedly (ipaddr.js parsing and printing take several µs).
interface Parsed {
  ip: ipaddr.IPv4 | ipaddr.IPv6 | null
  text?: string | null
}
const parsedAddresses = new QuickLRU<string, Parsed>({ maxSize: 10_000 })

/**
 * An IP address as people and proxies write one: IPv4 in four decimal parts, or IPv6. ipaddr.js
 * alone also reads the classful, integer, octal and hex IPv4 forms (`10.1` is 10.0.0.1,
 * `2130706433` is 127.0.0.1, `010.0.0.1` is 8.0.0.1), which name another address than the one
 * a reader of the config or the deny list would see; here they are not addresses. Throws when invalid.
 */
function parseIp(text: string): ipaddr.IPv4 | ipaddr.IPv6 {
  if (isFourPartDecimal(text)) return ipaddr.IPv4.parse(text)
  // A zone id (`fe80::1%eth0`) names the interface, not another address: one address, one spelling.
  let address = text.split('%')[0] as string
  if (address.includes('.')) {
    // IPv6 with an IPv4 tail (`::ffff:192.0.2.7`): the tail in four decimal parts too, since the
    // IPv6 parser takes `::ffff:0x0a.0.0.1` and `::ffff:010.0.0.1`. The tail is read as the two
    // groups it stands for: ipaddr.js reads the IPv4-compatible `::192.0.2.7` as the mapped
    // `::ffff:192.0.2.7`, which is another address (IPv4's 192.0.2.7).
    const colon = address.lastIndexOf(':')
    const tail = address.slice(colon + 1)
    if (!isFourPartDecimal(tail)) throw new Error('not an address')
    const [a, b, c, d] = ipaddr.IPv4.parse(tail).octets as [number, number, number, number]
    address = `${address.slice(0, colon + 1)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`
  }
  return ipaddr.IPv6.parse(address)
}

/**
 * ipaddr.IPv4.isValidFourPartDecimal, its pattern first: ipaddr.js tries any text as IPv4 before
 * its pattern, and for IPv6 text that try throws an error it catches itself, which was most of the
 * time taken to read an IPv6 address or range (42 µs against 2.8 µs for IPv4, found by a review;
 * a deny list's IPv6 ranges, a new IPv6 client).
 */
const FOUR_PART_DECIMAL = /^(0|[1-9]\d*)(\.(0|[1-9]\d*)){3}$/
const isFourPartDecimal = (text: string) => FOUR_PART_DECIMAL.test(text) && ipaddr.IPv4.isValid(text)

/** Prefix lengths as written in a CIDR: decimal, no sign or leading zeros. */
const PREFIX_BITS = /^(?:0|[1-9]\d?|1[01]\d|12[0-8])$/

function parsed(address: string): Parsed {
  let p = parsedAddresses.get(address)
  if (p !== undefined) return p
  let ip: Parsed['ip']
  try {
    const a = parseIp(address)
    ip = a.kind() === 'ipv6' && (a as ipaddr.IPv6).isIPv4MappedAddress() ? (a as ipaddr.IPv6).toIPv4Address() : a
  } catch {
    ip = null
  }
  p = { ip }
  if (address.length <= 64) parsedAddresses.set(address, p)
  return p
}

/** Parses an address, turning IPv4-mapped IPv6 (::ffff:192.0.2.1) into IPv4. The result is shared: do not mutate it. */
export function parseAddress(address: string): ipaddr.IPv4 | ipaddr.IPv6 | undefined {
  return parsed(address).ip ?? undefined
}

/**
 * The address in its canonical text (IPv4-mapped IPv6 as IPv4, IPv6 compressed, without a zone
 * id), or undefined when it is none. The zone (`fe80::1%eth0`) names a link of the host that
 * wrote it, not another client: kept, each spelling of one address (`%a`, `%b`, …) was an
 * address of its own to the lockout and the rate limits.
 */
export function normalAddress(address: string): string | undefined {
  const p = parsed(address)
  if (p.text === undefined) {
    const text = p.ip?.toString()
    p.text = text === undefined ? null : (text.split('%')[0] as string)
  }
  return p.text ?? undefined
}

export function parseRange(cidr: string): Range | undefined {
  try {
    const slash = cidr.indexOf('/')
    if (slash !== -1) {
      const bitsText = cidr.slice(slash + 1)
      if (!PREFIX_BITS.test(bitsText)) return undefined
      const addr = parseIp(cidr.slice(0, slash))
      const bits = Number(bitsText)
      if (bits > (addr.kind() === 'ipv4' ? 32 : 128)) return undefined
      if (addr.kind() === 'ipv6' && (addr as ipaddr.IPv6).isIPv4MappedAddress() && bits >= 96) return [(addr as ipaddr.IPv6).toIPv4Address(), bits - 96]
      return [addr, bits]
    }
    const a = parseAddress(cidr)
    return a ? [a, a.kind() === 'ipv4' ? 32 : 128] : undefined
  } catch {
    return undefined
  }
}

/** A matcher for a list of CIDRs, parsed once. */
export function rangeMatcher(cidrs: readonly string[]): (address: string) => boolean {
  const ranges = cidrs.map(parseRange).filter((r): r is Range => r !== undefined)
  return (address) => {
    const a = parseAddress(address)
    if (!a) return false
    for (const [net, bits] of ranges) if (a.kind() === net.kind() && a.match(net, bits)) return true
    return false
  }
}

/**
 * Epoch ms from which a key that evaluateKey accepts now is refused (Infinity for never): its
 * expiry, or for a rotating key the end of its grace when that comes first. The gateway arms its
 * cache entries and tunnels by it; the rotate answer and the CLI tell people by it.
 */
export function validUntilOf(record: KeyRecord): number {
  const expiry = record.expiresAt ? record.expiresAt.getTime() : Infinity
  if (record.status !== 'rotating') return expiry
  return Math.min(expiry, record.graceUntil ? record.graceUntil.getTime() : 0)
}

export function evaluateKey(key: KeyRecord, now: Date, address?: string, allowedFrom?: (address: string) => boolean): Verdict {
  switch (key.status) {
    case 'revoked':
      return { ok: false, code: 'key_revoked', reason: 'revoked' }
    case 'expired':
      return { ok: false, code: 'key_expired', reason: 'expired' }
    case 'rotating':
      if (!key.graceUntil || key.graceUntil <= now) return { ok: false, code: 'key_expired', reason: 'grace_ended' }
      break
    case 'active':
      break
  }
  if (key.expiresAt && key.expiresAt <= now) return { ok: false, code: 'key_expired', reason: 'expired' }
  if (address !== undefined && key.allowedCidrs.length > 0) {
    const match = allowedFrom ?? rangeMatcher(key.allowedCidrs)
    if (!match(address)) return { ok: false, code: 'ip_blocked', reason: 'address_not_bound' }
  }
  return OK
}

/**
 * The status `key` has at `now`, as evaluateKey judges it: an active or rotating key past its
 * expiry, or a rotating key past its grace, is expired, though its row says otherwise until the
 * scheduler's next round. (A key past an announced rotation deadline still works until that
 * round ends it, and so is still active.) core/keys/ends.ts statusAtSql is the same in SQL.
 */
export function statusAt(key: KeyRecord, now: Date): KeyStatus {
  const verdict = evaluateKey(key, now)
  if (verdict.ok) return key.status
  return verdict.code === 'key_revoked' ? 'revoked' : 'expired'
}
