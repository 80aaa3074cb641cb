// fitLine (core/log.ts): what `serve --workers` writes to its shared stdout, a line of at most
// LOG_LINE_MAX_BYTES that stays one JSON object, whatever the line it is given.
import t from 'tap'
import { createLogger, fitLine, LOG_LINE_MAX_BYTES } from '../core/log.ts'
import { generateKey } from '../core/keys/format.ts'

/** What the logger writes for these arguments (scrubbed), without writing it anywhere. */
function logged(message: string, fields: Record<string, unknown>): string {
  let line = ''
  createLogger({ write: (l) => (line = l) }).warn(message, fields)
  return line
}

t.test('a long line that is not JSON comes back as one JSON object that fits, never an exception (found by a review)', async (t) => {
  // The scrubber left such lines once (`\[redacted]` for a key just after a newline: now it keeps
  // the escape, test/format.test.ts); whatever gives fitLine one, its JSON.parse threw, out of the
  // log call, into whatever logged (a request's handler, a stop).
  const { key } = generateKey('kg_')
  const json = logged('could not read the import', { detail: `${'row '.repeat(1500)}\n${key} is not a valid row` })
  t.doesNotThrow(() => JSON.parse(json), 'the scrubber leaves JSON')
  t.notOk(json.includes(key), 'and no key')
  const line = json.replace('\\n[redacted]', '\\[redacted]')
  t.throws(() => JSON.parse(line), 'a line that is not JSON (what this test is about)')
  t.ok(Buffer.byteLength(line) > LOG_LINE_MAX_BYTES, 'and longer than a shared stdout takes whole')
  let fitted = ''
  t.doesNotThrow(() => (fitted = fitLine(line)))
  t.ok(Buffer.byteLength(fitted) <= LOG_LINE_MAX_BYTES, 'fits')
  t.equal(fitted.indexOf('\n'), fitted.length - 1, 'one line')
  const record = JSON.parse(fitted) as Record<string, unknown>
  t.match(record, { level: 'warn', truncated: true })
  t.notOk(fitted.includes(key), 'the key is still not shown')
})

t.test('a long line of many long strings is fitted in a few passes, not one per string (found by a review)', async (t) => {
  // Before: each pass cut the one longest string and wrote the whole record again, passes as many
  // as the strings: 2000 strings of 100 characters held the event loop 6 s here.
  const line = logged('many', { items: Array.from({ length: 2000 }, (_, i) => `${i}-${'y'.repeat(100)}`) })
  const items = Array.from({ length: 40 }, (_, i) => `${i}-${'z'.repeat(500)}`)
  const fewer = logged('fewer', { items })
  const stringify = JSON.stringify
  let passes = 0
  t.teardown(() => void (JSON.stringify = stringify))
  JSON.stringify = ((...args: Parameters<typeof stringify>) => (passes++, stringify(...args))) as typeof stringify
  const fitted = [fitLine(line), fitLine(fewer)]
  JSON.stringify = stringify
  t.ok(passes <= 2 * 2 * 16, `a few passes each (${passes} in all)`)
  t.ok(fitted.every((l) => Buffer.byteLength(l) <= LOG_LINE_MAX_BYTES), 'each fits')
  const kept = JSON.parse(fitted[1] as string) as { items: string[]; truncated: boolean }
  t.equal(kept.items.length, 40, 'what fits is kept: every item, each cut')
  t.ok(kept.items.every((item, i) => item.endsWith('…') && (items[i] as string).startsWith(item.slice(0, -1))), 'each a start of the item')
})

t.test('a cut never splits a character outside the Basic Multilingual Plane (found by a review)', async (t) => {
  // Before: cut between the two halves of a surrogate pair, the line ended the string in a lone
  // `\ud83d`, which JSON readers take as an error or a replacement character.
  // Cut as long as a string of three-byte characters beside it allows, a byte more or less (`pad`): half a pair, at times.
  const fitted = Array.from({ length: 30 }, (_, pad) => fitLine(logged('emoji', { pad: 'p'.repeat(pad), path: '中'.repeat(3000), text: '😀'.repeat(3000) })))
  t.ok(fitted.every((l) => Buffer.byteLength(l) <= LOG_LINE_MAX_BYTES), 'each fits')
  t.same(fitted.filter((l) => /\\ud[89a-f]/i.test(l)), [], 'no lone surrogate')
})
