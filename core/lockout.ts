// Lockout (SPEC §3): `lockout.max_attempts` failed attempts from one address (its IPv6 network)
// within `lockout.window_s` lock that address out for `lockout.window_s`. One instance per
// process is shared by the gateway (failed key attempts) and the admin API (failed admin
// credentials), so both kinds of failure count toward the same lockout; with Redis the counts
// are shared across instances too.
import type { Redis } from 'ioredis'
import ipaddr from 'ipaddr.js'
import { parseAddress } from './keys/evaluate.ts'
import { createLimiter, secondsFrom, type Limiter } from './limiters.ts'

export interface Lockout {
  /** Seconds until the address may try again, or undefined when it is not locked out. */
  lockedFor(addressKey: string): Promise<number | undefined>
  recordFailure(addressKey: string): Promise<void>
}

export interface LockoutOptions {
  maxAttempts: number
  windowS: number
  redis?: Redis | undefined
  /** Counts addresses that reach the limit. */
  onLockout?: () => void
}

export function createLockout(options: LockoutOptions): Lockout {
  const { maxAttempts, windowS } = options
  const limiter: Limiter = createLimiter({ points: maxAttempts, durationS: windowS, keyPrefix: 'keygate:lockout', redis: options.redis })
  return {
    async lockedFor(addressKey) {
      const r = await limiter.get(addressKey)
      return r !== null && r.consumedPoints >= maxAttempts ? secondsFrom(r.msBeforeNext) : undefined
    },
    async recordFailure(addressKey) {
      const r = await limiter.penalty(addressKey, 1)
      // The attempt that reaches the limit starts a full window of lockout from now.
      if (r.consumedPoints === maxAttempts) {
        await limiter.block(addressKey, windowS)
        options.onLockout?.()
      }
    },
  }
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
