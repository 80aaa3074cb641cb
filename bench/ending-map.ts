// node bench/ending-map.ts [--keys 400000]
// What a memory limiter's count costs once it holds its cap (MEMORY_MAX_KEYS), against the same
// limiter below it, in one run: a limiter of the lockout's shape (5 points, 900 s) is given one
// penalty point for each of `keys` distinct keys, as a flood of bad keys from distinct addresses
// gives the lockout's and the per-address limit's counts. Prints the mean microseconds a call
// for the first MEMORY_MAX_KEYS (below the cap) and for the rest (at the cap, each new count
// dropping the oldest), and their ratio. The same is printed for the EndingMap alone.
import { EndingMap, MEMORY_MAX_KEYS, createLimiter } from '../core/limiters.ts'
import { countArg, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('keys')

const keys = countArg('keys', 4 * MEMORY_MAX_KEYS)
if (keys <= MEMORY_MAX_KEYS) {
  process.stderr.write(`--keys must be more than ${MEMORY_MAX_KEYS} (the limiter's cap)\n`)
  process.exit(2)
}

async function timed(from: number, to: number, step: (i: number) => unknown): Promise<number> {
  const start = performance.now()
  for (let i = from; i < to; i++) await step(i)
  return ((performance.now() - start) * 1000) / (to - from)
}

const limiter = createLimiter({ points: 5, durationS: 900, keyPrefix: 'bench' })
const below = await timed(0, MEMORY_MAX_KEYS, (i) => limiter.penalty(`10.${i}`, 1))
const atCap = await timed(MEMORY_MAX_KEYS, keys, (i) => limiter.penalty(`10.${i}`, 1))

const map = new EndingMap<{ until: number }>(MEMORY_MAX_KEYS, (v) => v.until)
const until = Date.now() + 900_000
const mapBelow = await timed(0, MEMORY_MAX_KEYS, (i) => map.begin(`10.${i}`, { until }))
const mapAtCap = await timed(MEMORY_MAX_KEYS, keys, (i) => map.begin(`10.${i}`, { until }))

const us = (n: number) => Math.round(n * 100) / 100
console.log(
  JSON.stringify({
    keys,
    cap: MEMORY_MAX_KEYS,
    limiter_us_below_cap: us(below),
    limiter_us_at_cap: us(atCap),
    limiter_ratio: us(atCap / below),
    map_us_below_cap: us(mapBelow),
    map_us_at_cap: us(mapAtCap),
    map_ratio: us(mapAtCap / mapBelow),
  }),
)
