// node bench/deny-expiry.ts [--entries 1000,10000,50000] [--lookups 5000]
// The deny list's matcher (gateway/deny-list.ts) alone, in this process, when its entries expire
// one a millisecond: `entries` stored entries, each expiring 1 ms after the one before, then
// `lookups` lookups of one address, the clock 1 ms on at each, so that every lookup finds one
// expired. Prints the µs a lookup for each size, and its ratio to the same lookups against as
// many entries that never expire, measured in the same run, one after the other.
import type { DenyEntry } from '../core/deny-list.ts'
import { DenyMatcher } from '../gateway/deny-list.ts'
import { countArg, countsArg, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('entries', 'lookups')

const sizes = countsArg('entries', [1000, 10_000, 50_000])
const lookups = countArg('lookups', 5000)
if (sizes.some((n) => n <= lookups)) {
  process.stderr.write(`--entries takes whole numbers above --lookups (${lookups})\n`)
  process.exit(2)
}

function perLookup(n: number, expiring = true): number {
  const now = Date.now()
  const entries: DenyEntry[] = Array.from({ length: n }, (_, i) => ({ id: `e${i}`, cidr: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}/32`, reason: null, createdBy: 'bench', createdAt: new Date(now), expiresAt: expiring ? new Date(now + 1 + i) : null }))
  const m = new DenyMatcher([])
  m.setStored(entries, now)
  const start = performance.now()
  for (let i = 1; i <= lookups; i++) m.denied('192.0.2.1', now + i)
  return ((performance.now() - start) * 1000) / lookups
}

perLookup(lookups + 100) // warm-up
const rows = sizes.map((n) => {
  const plain = perLookup(n, false)
  const expiring = perLookup(n)
  return { entries: n, us_never_expiring: Math.round(plain * 100) / 100, us_expiring: Math.round(expiring * 100) / 100, ratio: Math.round((expiring / plain) * 10) / 10 }
})
console.log(JSON.stringify({ lookups, rows }))
