// Whether a stored key may be used now, from this address. Pure: the gateway calls it on every
// request with a cached record, the CLI and admin API with a fresh one.
import ipaddr from 'ipaddr.js'
import QuickLRU from 'quick-lru'
import type { ErrorCode } from '../errors.ts'
import type { KeyRecord } from './types.ts'

export type Verdict = { ok: true } | { ok: false; code: ErrorCode; reason: string }

const OK: Verdict = Object.freeze({ ok: true })

type Range = [ipaddr.IPv4 | ipaddr.IPv6, number]

// The gateway parses the client address (and X-Forwarded-For hops) of every request, mostly the
// same few addresses again: parsed addresses are kept, boundedly (ipaddr.js parsing is several µs).
const parsedAddresses = new QuickLRU<string, ipaddr.IPv4 | ipaddr.IPv6 | null>({ maxSize: 10_000 })

/** Parses an address, turning IPv4-mapped IPv6 (::ffff:192.0.2.1) into IPv4. The result is shared: do not mutate it. */
export function parseAddress(address: string): ipaddr.IPv4 | ipaddr.IPv6 | undefined {
  const known = parsedAddresses.get(address)
  if (known !== undefined) return known ?? undefined
  let parsed: ipaddr.IPv4 | ipaddr.IPv6 | null
  try {
    const a = ipaddr.parse(address)
    parsed = a.kind() === 'ipv6' && (a as ipaddr.IPv6).isIPv4MappedAddress() ? (a as ipaddr.IPv6).toIPv4Address() : a
  } catch {
    parsed = null
  }
  if (address.length <= 64) parsedAddresses.set(address, parsed)
  return parsed ?? undefined
}

const normalAddresses = new QuickLRU<string, string | null>({ maxSize: 10_000 })

/** The address in its canonical text (IPv4-mapped IPv6 as IPv4, IPv6 compressed), or undefined when it is none; memoised like parseAddress. */
export function normalAddress(address: string): string | undefined {
  const known = normalAddresses.get(address)
  if (known !== undefined) return known ?? undefined
  const text = parseAddress(address)?.toString() ?? null
  if (address.length <= 64) normalAddresses.set(address, text)
  return text ?? undefined
}

export function parseRange(cidr: string): Range | undefined {
  try {
    if (cidr.includes('/')) {
      const [addr, bits] = ipaddr.parseCIDR(cidr)
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
