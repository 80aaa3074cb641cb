// node bench/patterns.ts [--rounds 5] [--largest 256]
// What the patterns that client or admin text reaches cost on text shaped to make them backtrack,
// as a ratio to plain text of the same length (`x/x/x/...`, the baseline, through the same
// function), at 16, 64 and 256 KB: a ratio that stays put as the text grows is time linear in it.
// The log scrubber (core/log.ts `scrub`, every log line and error message): runs of `eyJ` (the
// start of a JWT) with and without other characters, a run of hex, runs of the keygate key and
// webhook secret prefixes. A route's lenient reading of a request path (config/routes.ts): a run
// of dots that no `/` ends. The admin API's check of a number's digits (core/validate.ts
// `refuseChangedNumbers`): a run of zeros inside a number. A base URL's trailing slashes
// (core/http.ts `TRAILING_SLASHES`): a run of slashes that something else ends. A trusted proxy's
// X-Forwarded-Prefix (gateway/forward.ts `outerPrefix`), alike; an X-Forwarded-For entry's white
// space (core/http.ts `withoutOws`): a run of spaces that something else ends. A URL's
// query in a value a message shows (core/validate.ts `URL_QUERY`): a run of slashes that no `?` ends.
// A line of PostgreSQL's log from the embedded store (core/errors.ts `postgresLogLine`): a run of
// white space after the level, then a carriage return.
// (Named bench/scrub.ts, and the scrubber only, until the commit that added the others.)
import { lenientReading } from '../config/routes.ts'
import { TRAILING_SLASHES, withoutOws } from '../core/http.ts'
import { postgresLogLine } from '../core/errors.ts'
import { scrub } from '../core/log.ts'
import { refuseChangedNumbers, URL_QUERY } from '../core/validate.ts'
import { outerPrefix } from '../gateway/forward.ts'
import { countArg as arg, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('rounds', 'largest')

const ROUNDS = arg('rounds', 5)
/** KB of the largest text (16, 64 or 256): code whose time grows with the square takes minutes at 256. */
const SIZES = [16_000, 64_000, 256_000].filter((n) => n <= arg('largest', 256) * 1000)
if (SIZES.length === 0) {
  process.stderr.write('--largest takes 16 or more (KB): the smallest text is 16 KB\n')
  process.exit(2)
}
/** The admin API's check of a body's numbers (it refuses this one, after the time measured). */
const number = (text: string): void => {
  try {
    refuseChangedNumbers(text, JSON.parse(text))
  } catch {
    // refused: "has more digits than a number holds"
  }
}
/** What is timed, the text it is given (n characters), and the plain text of its baseline. */
const shapes: Array<[string, (text: string) => unknown, (n: number) => string, (n: number) => string]> = [
  ['scrub: eyJeyJ...', scrub, (n) => 'eyJ'.repeat(n / 3), (n) => 'x/'.repeat(n / 2)],
  ['scrub: eyJaeyJa...', scrub, (n) => 'eyJa'.repeat(n / 4), (n) => 'x/'.repeat(n / 2)],
  ['scrub: eyJ then a run', scrub, (n) => 'eyJ' + 'a'.repeat(n - 3), (n) => 'x/'.repeat(n / 2)],
  ['scrub: hex run', scrub, (n) => 'a'.repeat(n), (n) => 'x/'.repeat(n / 2)],
  ['scrub: kg_kg_...', scrub, (n) => 'kg_'.repeat(n / 3), (n) => 'x/'.repeat(n / 2)],
  ['scrub: whsec_whsec_...', scrub, (n) => 'whsec_'.repeat(n / 6), (n) => 'x/'.repeat(n / 2)],
  ['path: /x/....a', lenientReading, (n) => `/x/${'.'.repeat(n - 4)}a`, (n) => 'x/'.repeat(n / 2)],
  ['number: 0.1000...0001', number, (n) => `{"n":0.1${'0'.repeat(n - 10)}1}`, (n) => `{"n":"${'x'.repeat(n - 8)}"}`],
  ['base URL: //...//x', (s) => s.replace(TRAILING_SLASHES, ''), (n) => `${'/'.repeat(n - 1)}x`, (n) => 'x/'.repeat(n / 2)],
  ['X-Forwarded-Prefix: //...//x', outerPrefix, (n) => `${'/'.repeat(n - 1)}x`, (n) => '/x'.repeat(n / 2)],
  ['X-Forwarded-For entry: x  ...  x', withoutOws, (n) => `x${' '.repeat(n - 2)}x`, (n) => 'x/'.repeat(n / 2)],
  ['URL query shown: //...//x', (s) => s.replace(URL_QUERY, ''), (n) => `${'/'.repeat(n - 1)}x`, (n) => 'x/'.repeat(n / 2)],
  ['PostgreSQL log line: LOG:   ...   x\\ry', postgresLogLine, (n) => `LOG:${' '.repeat(n - 7)}x\ry`, (n) => `LOG: ${'x '.repeat((n - 5) / 2)}`],
]

/** Milliseconds of one `fn(text)`, the median of ROUNDS. */
function timed(fn: (text: string) => unknown, text: string): number {
  const runs: number[] = []
  for (let r = 0; r < ROUNDS; r++) {
    const start = performance.now()
    fn(text)
    runs.push(performance.now() - start)
  }
  return median(runs)
}

process.stdout.write(`| text | ${SIZES.map((n) => `${n / 1000} KB, ms (ratio to plain)`).join(' | ')} |\n| --- |${SIZES.map(() => ' --- |').join('')}\n`)
for (const [name, fn, make, plain] of shapes) {
  const cells = SIZES.map((n) => {
    const ms = timed(fn, make(n))
    return `${ms.toFixed(2)} (${(ms / timed(fn, plain(n))).toFixed(1)})`
  })
  process.stdout.write(`| ${name} | ${cells.join(' | ')} |\n`)
}
