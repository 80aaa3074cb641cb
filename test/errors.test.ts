// The error catalogue in core/errors.ts and the table in README.md list the same codes with the
// same statuses and messages, both ways.
import t from 'tap'
import { readFileSync } from 'node:fs'
import { ERRORS, errorBody, KeygateError } from '../core/errors.ts'

const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
const section = /<!-- errors:start -->([\s\S]*?)<!-- errors:end -->/.exec(readme)?.[1] ?? ''
const documented = new Map<string, { status: number; message: string }>()
for (const m of section.matchAll(/^\| `([a-z0-9_]+)` \| (\d{3}) \| (.+?) \|$/gm)) {
  documented.set(m[1] as string, { status: Number(m[2]), message: m[3] as string })
}

t.ok(documented.size > 0, 'README has an errors table')

t.test('every code in the catalogue is documented with its status and message', async (t) => {
  for (const [code, entry] of Object.entries(ERRORS)) {
    t.same(documented.get(code), { status: entry.status, message: entry.message }, code)
  }
})

t.test('every documented code is in the catalogue', async (t) => {
  for (const code of documented.keys()) t.ok(code in ERRORS, `${code} is in core/errors.ts`)
})

t.test('the JSON error shape', async (t) => {
  t.same(JSON.parse(errorBody('key_missing', 'r1')), { error: { code: 'key_missing', message: ERRORS.key_missing.message, request_id: 'r1' } })
  const e = new KeygateError('key_not_found', 'no key has the id "x"')
  t.equal(e.status, 404)
  t.equal(e.code, 'key_not_found')
})
