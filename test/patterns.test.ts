// Patterns that text from a client or an admin reaches, rewritten so that their time grows with
// the text, not its square (found by a review; bench/patterns.ts measures the time): what they
// find and drop is what the patterns before them did. Each is checked on the cases that tell.
import t from 'tap'
import { lenientReading } from '../config/routes.ts'
import { TRAILING_SLASHES, withoutOws } from '../core/http.ts'
import { postgresLogLine } from '../core/errors.ts'
import { displayUrl } from '../core/integrations/http.ts'
import { refuseChangedNumbers, showValue, URL_QUERY } from '../core/validate.ts'
import { outerPrefix } from '../gateway/forward.ts'

t.test("a lenient reading of a path drops each segment's trailing dots and spaces, from a run's start", async (t) => {
  const cases: Array<[string, string]> = [
    ['/a/b../c', '/a/b/c'],
    ['/a/b. ./c', '/a/b/c'],
    ['/a/b..', '/a/b'],
    ['/a/b.  ', '/a/b'],
    ['/a. /b .c', '/a/b '],
    ['/a/..x/y', '/a/..x/y'],
    [`/x/${'.'.repeat(20)}a`, '/x/.'],
    ['/api./v1.json', '/api/v1'],
  ]
  for (const [path, read] of cases) t.equal(lenientReading(path), read, path)
})

t.test('a number with a long run of zeros: trailing zeros are no digits, inner ones are', async (t) => {
  const accepted = ['{"n":1.5' + '0'.repeat(30) + '}', '{"n":100000000000000000000}', '{"n":0.' + '0'.repeat(30) + '15}']
  for (const text of accepted) t.doesNotThrow(() => refuseChangedNumbers(text, JSON.parse(text)), text.slice(0, 30))
  const inner = '{"n":1' + '0'.repeat(30) + '1}'
  t.throws(() => refuseChangedNumbers(inner, JSON.parse(inner)), { message: /^n: 1(0){30}1 has more digits than a number holds/ })
})

t.test('digits in a string are no number: the text is read again only for a number that may have changed', async (t) => {
  // A legacy key's SHA-256 hex often holds 16 digits in a row: before (found by a review), every
  // import of more than a few rows was parsed a second time, ten times slower, for nothing.
  const parse = JSON.parse
  let revived = 0
  JSON.parse = ((text: string, reviver?: Parameters<typeof JSON.parse>[1]) => {
    if (reviver !== undefined) revived++
    return parse(text, reviver)
  }) as typeof JSON.parse
  t.teardown(() => void (JSON.parse = parse))
  const strings = `{"rows":[{"key_hash":"${'1234567890'.repeat(6)}abcd","e":"2.5e-7","z":0,"q":"\\"${'9'.repeat(20)}\\\\","n":1.5}]}`
  t.doesNotThrow(() => refuseChangedNumbers(strings, parse(strings)))
  t.equal(revived, 0, 'digit runs and exponents in strings alone: read once')
  // After strings that end in an escaped quote or backslash, a number is still found.
  for (const [number, message] of [
    [`1${'0'.repeat(20)}1`, /^rows\[0\]\.n: 1(0){20}1 has more digits than a number holds/],
    ['1e-400', /^rows\[0\]\.n: 1e-400 is too close to zero/],
  ] as const) {
    const text = strings.replace('"n":1.5', `"n":${number}`)
    t.throws(() => refuseChangedNumbers(text, parse(text)), { message }, number)
  }
  t.equal(revived, 2, 'read again for those')
})

t.test("trailing slashes: the last run only, from its start", async (t) => {
  t.equal(displayUrl(new URL('http://h/a///')), 'http://h/a')
  t.equal(displayUrl(new URL('http://h/a//b')), 'http://h/a//b')
  t.equal(displayUrl(new URL('http://h/')), 'http://h')
  t.equal('/a//b//'.replace(TRAILING_SLASHES, ''), '/a//b')
  t.equal(`${'/'.repeat(50)}x`.replace(TRAILING_SLASHES, ''), `${'/'.repeat(50)}x`)
})

t.test("a trusted proxy's X-Forwarded-Prefix: without its trailing slashes, the last run only, from its start", async (t) => {
  const cases: Array<[string | string[] | undefined, string]> = [
    ['/outer//', '/outer'],
    ['/outer', '/outer'],
    ['/', ''],
    ['///', ''],
    ['/a//b/', '/a//b'],
    [`${'/'.repeat(50)}x`, `${'/'.repeat(50)}x`],
    ['/a,/b', ''],
    [['/a', '/b'], ''],
    ['outer/', ''],
    [undefined, ''],
  ]
  for (const [value, prefix] of cases) t.equal(outerPrefix(value), prefix, JSON.stringify(value))
})

t.test("an X-Forwarded-For entry: without the spaces and tabs around it, and nothing else", async (t) => {
  const cases: Array<[string, string]> = [
    [' \t198.51.100.7 \t', '198.51.100.7'],
    ['198.51.100.7', '198.51.100.7'],
    ['', ''],
    [' \t ', ''],
    ['198.51.100.7 x', '198.51.100.7 x'],
    [`x${' '.repeat(50)}x`, `x${' '.repeat(50)}x`],
    ['\u00a0198.51.100.7\u00a0', '\u00a0198.51.100.7\u00a0'],
    ['198.51.100.7\r', '198.51.100.7\r'],
  ]
  for (const [entry, plain] of cases) t.equal(withoutOws(entry), plain, JSON.stringify(entry))
})

t.test("a URL's query in a value shown: the same pieces found, from the first `//` of a run only", async (t) => {
  // The pattern before (found by a review): tried from every `//` of a run that no `?` ends.
  const before = /(\/\/[^\s"?#]*\?)([^\s"#]+)/g
  const marked = (_: string, head: string, query: string) => `<${head}|${query}>`
  // Each character of another role (`"`, `#` and white space end both parts, `?` the first).
  const alphabet = ['/', '?', 'a', '"', '#', ' ']
  let texts = ['']
  for (let length = 1; length <= 7; length++) {
    texts = texts.flatMap((text) => (text.length === length - 1 ? alphabet.map((c) => text + c) : [])).concat(texts)
  }
  let differing = 0
  for (const text of texts) if (text.replace(URL_QUERY, marked) !== text.replace(before, marked)) differing++
  t.equal(differing, 0, `every text of up to 7 of ${JSON.stringify(alphabet.join(''))}: ${texts.length}`)
  for (const text of ['http://h/x?a=1&b=2', 'https://u:p@h//x?t=s#f', '///a?q', 'a//b//c?x=1 //d?y', `${'/'.repeat(50)}x?a=1`, `${'/'.repeat(50)}x`]) {
    t.equal(text.replace(URL_QUERY, marked), text.replace(before, marked), text)
  }
  t.equal(showValue('https://h/hook?token=abc&x'), '"https://h/hook?token=<hidden>&<hidden>"')
  t.equal(showValue(`${'/'.repeat(50)}x`), JSON.stringify(`${'/'.repeat(50)}x`))
})

t.test("a line of PostgreSQL's log: its level and message, read to the end of the line or a carriage return in it", async (t) => {
  t.same(postgresLogLine('2026-12-06 00:28:42.962 UTC [42] PANIC:  could not read file "global/pg_control": read 0 of 8192'), { level: 'PANIC', message: 'could not read file "global/pg_control": read 0 of 8192' })
  t.same(postgresLogLine('FATAL:  terminating connection due to idle-session timeout\n'), { level: 'FATAL', message: 'terminating connection due to idle-session timeout' }, 'trimmed')
  t.same(postgresLogLine('DETAIL:  The data directory was initialized by PostgreSQL version 99'), { level: 'DETAIL', message: 'The data directory was initialized by PostgreSQL version 99' })
  t.equal(postgresLogLine('HINT:  It looks like you need to initdb.'), undefined, 'a HINT is no line it reads')
  t.equal(postgresLogLine('PGlite failed to initialize properly'), undefined)
  t.equal(postgresLogLine('LOG:no space'), undefined, 'white space after the level, as PostgreSQL writes it')
  // Before (found by a review of the patterns): a carriage return in the message made the line no
  // log line (a FATAL unseen), found so by backtracking (445 ms for 32,000 spaces before it).
  t.same(postgresLogLine('FATAL:  invalid value "a\rb"'), { level: 'FATAL', message: 'invalid value "a' }, 'a FATAL with a carriage return in it is one')
  t.same(postgresLogLine(`LOG:${' '.repeat(32_000)}x\ry`), { level: 'LOG', message: 'x' })
})
