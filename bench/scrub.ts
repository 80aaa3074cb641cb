// node bench/scrub.ts [--rounds 5]
// What the log scrubber (core/log.ts `scrub`, run on every log line and every error message)
// costs on text shaped to make a pattern backtrack, as a ratio to plain text of the same length
// (`x/x/x/...`, the baseline), at 16, 64 and 256 KB: a ratio that stays put as the text grows is
// time linear in it. The shapes: runs of `eyJ` (the start of a JWT) with and without other
// characters, a run of hex, runs of the keygate key and webhook secret prefixes.
import { scrub } from '../core/log.ts'
import { countArg as arg, median } from './servers.ts'

const ROUNDS = arg('rounds', 5)
const SIZES = [16_000, 64_000, 256_000]
const shapes: Array<[string, (n: number) => string]> = [
  ['eyJeyJ...', (n) => 'eyJ'.repeat(n / 3)],
  ['eyJaeyJa...', (n) => 'eyJa'.repeat(n / 4)],
  ['eyJ then a run', (n) => 'eyJ' + 'a'.repeat(n - 3)],
  ['hex run', (n) => 'a'.repeat(n)],
  ['kg_kg_...', (n) => 'kg_'.repeat(n / 3)],
  ['whsec_whsec_...', (n) => 'whsec_'.repeat(n / 6)],
]

/** Milliseconds of one scrub of `text`, the median of ROUNDS. */
function timed(text: string): number {
  const runs: number[] = []
  for (let r = 0; r < ROUNDS; r++) {
    const start = performance.now()
    scrub(text)
    runs.push(performance.now() - start)
  }
  return median(runs)
}

const baseline = new Map(SIZES.map((n) => [n, timed('x/'.repeat(n / 2))]))
process.stdout.write(`| text | ${SIZES.map((n) => `${n / 1000} KB, ms (ratio to plain)`).join(' | ')} |\n| --- |${SIZES.map(() => ' --- |').join('')}\n`)
process.stdout.write(`| plain (x/x/...) | ${SIZES.map((n) => `${(baseline.get(n) as number).toFixed(2)} (1.0)`).join(' | ')} |\n`)
for (const [name, make] of shapes) {
  const cells = SIZES.map((n) => {
    const ms = timed(make(n))
    return `${ms.toFixed(2)} (${(ms / (baseline.get(n) as number)).toFixed(1)})`
  })
  process.stdout.write(`| ${name} | ${cells.join(' | ')} |\n`)
}
