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

t.test('a long line that is not JSON (a key just after a newline, scrubbed with the escape) comes back as one JSON object that fits, never an exception (found by a review)', async (t) => {
  // The scrubber works on the line's JSON text: a key's prefix may start at the `n` of `\n`, and
  // the replacement leaves `\[redacted]`, an escape JSON has not. Before, fitLine's JSON.parse
  // threw, out of the log call, into whatever logged (a request's handler, a stop).
  const { key } = generateKey('kg_')
  const line = logged('could not read the import', { detail: `${'row '.repeat(1500)}\n${key} is not a valid row` })
  t.throws(() => JSON.parse(line), 'the scrubbed line is not JSON (what this test is about)')
  t.ok(Buffer.byteLength(line) > LOG_LINE_MAX_BYTES, 'and longer than a shared stdout takes whole')
  let fitted = ''
  t.doesNotThrow(() => (fitted = fitLine(line)))
  t.ok(Buffer.byteLength(fitted) <= LOG_LINE_MAX_BYTES, 'fits')
  t.equal(fitted.indexOf('\n'), fitted.length - 1, 'one line')
  const record = JSON.parse(fitted) as Record<string, unknown>
  t.match(record, { level: 'warn', truncated: true })
  t.notOk(fitted.includes(key), 'the key is still not shown')
})
