// Patterns that text from a client or an admin reaches, rewritten so that their time grows with
// the text, not its square (found by a review; bench/patterns.ts measures the time): what they
// find and drop is what the patterns before them did. Each is checked on the cases that tell.
import t from 'tap'
import { lenientReading } from '../config/routes.ts'
import { TRAILING_SLASHES } from '../core/http.ts'
import { displayUrl } from '../core/integrations/http.ts'
import { refuseChangedNumbers } from '../core/validate.ts'

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

t.test("trailing slashes: the last run only, from its start", async (t) => {
  t.equal(displayUrl(new URL('http://h/a///')), 'http://h/a')
  t.equal(displayUrl(new URL('http://h/a//b')), 'http://h/a//b')
  t.equal(displayUrl(new URL('http://h/')), 'http://h')
  t.equal('/a//b//'.replace(TRAILING_SLASHES, ''), '/a//b')
  t.equal(`${'/'.repeat(50)}x`.replace(TRAILING_SLASHES, ''), `${'/'.repeat(50)}x`)
})
