// Malformed input to the admin API gets its own 4xx, never 500 internal_error, on both stores:
// ids past the anomaly table's bigint, NUL characters (which PostgreSQL text cannot hold),
// JSON nested past any body an operation takes, days that do not exist, numbers that are not
// whole, `__proto__` as a query parameter; a bad credential's value is not echoed back; a refusal
// before the body is read closes the connection; an anomaly stream ends when its admin key is
// revoked; PostgreSQL out of reach is 503 store_unavailable. None of it writes an audit row.
import t from 'tap'
import net from 'node:net'
import { gzipSync } from 'node:zlib'
import { isDeepStrictEqual } from 'node:util'
import { createHash, randomBytes, randomUUID } from 'node:crypto'
import { startAdmin } from './helpers/admin.ts'
import { forEachStore, openStore } from './helpers/stores.ts'
import { openDb } from '../core/db.ts'
import { AUDIT_ACTIONS } from '../admin/schemas.ts'
import { createLogger } from '../core/log.ts'
import type { Answer } from './helpers/gateway.ts'

/** JSON text nested `levels` objects deep (JSON.stringify of such a value overflows the stack). */
const deep = (levels: number): string => '{"a":'.repeat(levels) + '1' + '}'.repeat(levels)
const json = { 'content-type': 'application/json' }

/**
 * Writes `request` on a new connection and reads what comes back until the server closes it, or
 * (`answered`) until a whole answer has come: `destroyed` says whether the server closed it.
 */
function exchange(port: number, request: string, answered = false): Promise<{ head: string; destroyed: boolean }> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(request))
    let head = ''
    const done = (destroyed: boolean) => {
      resolve({ head, destroyed })
      socket.destroy()
    }
    socket.setEncoding('latin1').on('data', (d: string) => {
      head += d
      if (answered && /\r\n\r\n[^]*\}$/.test(head)) done(false)
    })
    socket.on('close', () => done(true))
    socket.on('error', () => {})
    socket.setTimeout(5000, () => done(false))
  })
}

await forEachStore(t, async (t, store) => {
  const logged: Array<{ level: string; message: string }> = []
  const log = createLogger({ level: 'info', write: (line) => void logged.push(JSON.parse(line) as { level: string; message: string }) })
  const errorLines = () => logged.filter((l) => l.level === 'error').length
  const h = await startAdmin(t, store.db, { config: { admin: { max_body_bytes: 1_000_000 } }, log })
  const before = await h.auditRows()
  const refused = (a: Answer, status: number, code: string, what: string) => {
    t.equal(a.status, status, `${what}: ${status}`)
    t.equal(a.json?.error?.code, code, `${what}: ${code}`)
  }

  const huge = '9999999999999999999' // 19 digits, past bigint
  refused(await h.call('POST', `/v1/anomalies/${huge}/ack`), 404, 'anomaly_not_found', 'an anomaly id past bigint')
  refused(await h.call('GET', `/v1/anomalies?cursor=${huge}`), 400, 'validation_failed', 'a cursor past bigint')
  for (const [what, s] of [
    ['last_event_id past bigint', await h.stream(`/v1/anomalies/stream?last_event_id=${huge}`)],
    ['Last-Event-ID past bigint', await h.stream('/v1/anomalies/stream', { headers: { 'last-event-id': huge } })],
  ] as const) {
    t.equal(s.status, 400, `${what}: refused before the stream starts`)
    t.equal(s.error?.error?.code, 'validation_failed')
  }

  refused(await h.call('GET', '/v1/keys/%00'), 400, 'bad_request', 'NUL in a path parameter')
  refused(await h.call('GET', '/v1/keys?owner=a%00'), 400, 'validation_failed', 'NUL in a query value')
  refused(await h.call('POST', '/v1/keys', { body: { name: 'a\u0000', type: 'user' } }), 400, 'bad_request', 'NUL in a body string')
  refused(await h.call('POST', '/v1/deny-list', { body: { cidr: '198.51.100.1', reason: '\u0000' } }), 400, 'bad_request', 'NUL in a deny-list reason')
  for (const cidr of ['127.0.17', '2130706450', '127.1/8']) {
    refused(await h.call('POST', '/v1/deny-list', { body: { cidr } }), 400, 'validation_failed', `${cidr}: not an address as written (ipaddr.js alone reads it as another)`)
  }
  refused(await h.call('POST', '/v1/keys/validate', { body: { key: 'x', address: '2130706433' } }), 400, 'validation_failed', 'an integer is not an address to validate from')
  refused(await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', metadata: { ['k\u0000']: 1 } } }), 400, 'bad_request', 'NUL in a key name of the body')
  // In JSON's words: an object, not the configuration's "mapping".
  const notObject = await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', rate_limit: 'lots' } })
  refused(notObject, 400, 'validation_failed', 'a rate limit that is no object')
  t.match(notObject.json.error.details.fields, [{ field: 'rate_limit', message: /an object with the keys limit, window_s/ }])
  t.equal(notObject.json.error.details.fields.length, 1, 'one field named')
  t.notMatch(notObject.text, /mapping/)
  let patched: string | undefined
  // An object: what is wrong inside it, by its own field (before, found by a review: each of these
  // was "rate_limit: ... expected an object with the keys limit, window_s or null").
  for (const [rateLimit, field, message] of [
    [{ limit: 0, window_s: 60 }, 'rate_limit.limit', /^0 is not allowed; expected an integer from 1 to/],
    [{ limit: 5 }, 'rate_limit.window_s', /^is required; expected an integer from 1 to 86400/],
    [{ limit: 5, window_s: 100_000 }, 'rate_limit.window_s', /^100000 is not allowed; expected an integer from 1 to 86400/],
    [{ limit: 5, window_s: 60, burst: 1 }, 'rate_limit.burst', /unknown key; allowed here: limit, window_s/],
  ] as const) {
    patched ??= (await h.call('POST', '/v1/keys', { body: { name: 'patched', type: 'user' } })).json.id as string
    for (const [method, path] of [['POST', '/v1/keys'], ['PATCH', `/v1/keys/${patched}`]] as const) {
      const answer = await h.call(method, path, { body: { ...(method === 'POST' ? { name: 'x', type: 'user' } : {}), rate_limit: rateLimit } })
      refused(answer, 400, 'validation_failed', `${method} ${JSON.stringify(rateLimit)}`)
      t.match(answer.json.error.details.fields, [{ field, message }], `${method}: ${field} named`)
      t.equal(answer.json.error.details.fields.length, 1, 'one field named')
    }
  }

  refused(await h.call('POST', '/v1/keys', { raw: `{"name":"deep","type":"user","metadata":${deep(5000)}}`, headers: json }), 400, 'bad_request', 'metadata nested 5000 levels')
  refused(await h.call('POST', '/v1/keys', { raw: `{"name":${deep(5000)},"type":"user"}`, headers: json }), 400, 'bad_request', 'a wrong-typed field nested 5000 levels')
  refused(await h.call('POST', '/v1/keys/validate', { raw: `{"key":${deep(5000)}}`, headers: json }), 400, 'bad_request', 'a key nested 5000 levels')
  const shallow = await h.call('POST', '/v1/keys', { raw: `{"name":"shallow","type":"user","metadata":${deep(20)}}`, headers: json })
  t.equal(shallow.status, 201, 'metadata nested 20 levels is fine')

  refused(await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', expires_at: '2027-02-31T00:00:00Z' } }), 400, 'validation_failed', 'a day that does not exist')
  // Date-times are RFC 3339 as written, as /openapi.json publishes them (before, found by a review:
  // `t`/`z` were refused, and times without seconds taken).
  for (const at of ['2099-06-30t12:00:00z', '2099-06-30T13:00:00.000000001+01:00']) {
    const made = await h.call('POST', '/v1/keys', { body: { name: 'rfc3339', type: 'user', expires_at: at } })
    t.equal(made.status, 201, `${at} is taken`)
    t.equal(made.json?.expires_at, '2099-06-30T12:00:00.000Z', `${at} is the time it writes`)
  }
  t.equal((await h.call('POST', '/v1/deny-list', { body: { cidr: '198.51.100.9', expires_at: '2099-06-30T12:00:00z' } })).status, 201, 'a lowercase z on a deny entry')
  const hourAgo = new Date(Date.now() - 3_600_000).toISOString().replace('T', 't').replace('Z', 'z')
  t.equal((await h.call('GET', `/v1/reports/usage?from=${hourAgo}`)).status, 200, 'a lowercase t and z in a query')
  for (const at of ['2099-06-30T12:00Z', '2099-06-30T12:00+01:00', '2099-06-30 12:00:00Z']) {
    const r = await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', expires_at: at } })
    refused(r, 400, 'validation_failed', `${at}: no RFC 3339 date-time`)
    t.match(r.json?.error?.message, /expected an RFC 3339 date-time with seconds, in the years 1970 to 9999 as UTC/, 'the message says what is, and the range')
  }
  const leap = await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', expires_at: '2099-06-30T23:59:60Z' } })
  refused(leap, 400, 'validation_failed', 'a leap second')
  t.match(leap.json?.error?.details?.fields, [{ field: 'expires_at', message: /^"2099-06-30T23:59:60Z" is a leap second \(:60\), which keygate cannot hold/ }], 'said to be a leap second, not a value that is no RFC 3339')
  t.equal(leap.json?.error?.details?.fields?.length, 1, 'one field named')
  refused(await h.call('GET', '/v1/reports/usage?from=0001-01-01T00:00:00Z'), 400, 'validation_failed', 'a year before 1970')
  // 1970 as written, 1969 as an instant (before, found by a review: an import took it, and a list
  // of keys stopped at that key, its cursor refused as "not a cursor this server returned").
  refused(await h.call('POST', '/v1/keys/import', { body: { type: 'user', rows: [{ key_hash: 'c'.repeat(64), name: 'old', created_at: '1970-01-01T00:30:00+01:00' }] } }), 400, 'import_invalid', 'an instant before 1970 in an import')
  refused(await h.call('GET', '/v1/reports/usage?from=1970-01-01T00:30:00%2B01:00'), 400, 'validation_failed', 'an instant before 1970 in a query')
  // The rows sent as the whole body (not {"rows": [...]}): the message shows the value, but not a
  // row's key_hash, which is never shown (before, found by a migration review, it was).
  const hash = createHash('sha256').update(randomUUID()).digest('hex')
  const bare = await h.call('POST', '/v1/keys/import', { body: [{ key_hash: hash, name: 'old' }] })
  refused(bare, 400, 'validation_failed', 'rows sent as the whole body')
  t.notOk(bare.text.includes(hash), 'the key_hash is not shown')
  t.notOk(bare.text.includes(hash.slice(0, 40)), 'nor a part of it')
  t.match(bare.json?.error?.message, /\[redacted\]/, 'it reads [redacted]')
  // A cursor continues only the list that returned it (before, found by a review: the key list's,
  // given to the audit log, was read as a position there, and listed the rows older than that key).
  const keysCursor = (await h.call('GET', '/v1/keys?limit=1')).json?.next_cursor as string
  t.type(keysCursor, 'string', 'the key list has a next page')
  t.equal((await h.call('GET', `/v1/keys?limit=1&cursor=${keysCursor}`)).status, 200, 'its cursor continues it')
  const crossed = await h.call('GET', `/v1/audit?limit=1&cursor=${keysCursor}`)
  refused(crossed, 400, 'validation_failed', "the key list's cursor given to the audit log")
  t.match(crossed.json?.error?.details?.fields, [{ field: 'cursor', message: /^is a cursor of the key list, not of an audit log: a cursor continues the list that returned it$/ }])
  t.equal(crossed.json?.error?.details?.fields?.length, 1, 'one field named')
  const auditCursor = (await h.call('GET', '/v1/audit?limit=1')).json?.next_cursor as string
  refused(await h.call('GET', `/v1/reports/expiring?cursor=${auditCursor}`), 400, 'validation_failed', "an audit log's cursor given to the expiring report")
  // A cursor written before cursors named their list (during a rolling upgrade) is read as before.
  const unnamed = Buffer.from(JSON.stringify(JSON.parse(Buffer.from(keysCursor, 'base64url').toString()).slice(0, 2))).toString('base64url')
  t.equal((await h.call('GET', `/v1/keys?limit=1&cursor=${unnamed}`)).json?.items?.[0]?.id, (await h.call('GET', `/v1/keys?limit=1&cursor=${keysCursor}`)).json?.items?.[0]?.id, "an older version's cursor continues the list alike")
  // Every action the audit log writes is a filter (before, found by a review: n8n's were refused, the pattern had no digits).
  for (const action of AUDIT_ACTIONS.split(', ')) t.equal((await h.call('GET', `/v1/audit?action=${action}&limit=1`)).status, 200, `audit filter ${action}`)
  for (const limit of ['1e2', '2.9', '0x10', ' 5']) refused(await h.call('GET', `/v1/keys?limit=${encodeURIComponent(limit)}`), 400, 'validation_failed', `limit=${limit}`)
  refused(await h.call('GET', '/v1/keys?__proto__=x'), 400, 'validation_failed', '__proto__ as a query parameter')
  // Booleans as written (before: 1, 0 and TRUE were read as true and false, where the message
  // and the schema say true or false).
  for (const [path, value] of [['/v1/anomalies?acknowledged', '1'], ['/v1/anomalies?acknowledged', 'TRUE'], ['/v1/deny-list?include_expired', '0'], ['/v1/deny-list?include_expired', 'yes']]) {
    const r = await h.call('GET', `${path}=${value}`)
    refused(r, 400, 'validation_failed', `${path}=${value}`)
    t.match(r.json.error.message, /expected true or false/)
  }
  for (const value of ['true', 'false']) t.equal((await h.call('GET', `/v1/deny-list?include_expired=${value}`)).status, 200, `include_expired=${value}`)

  // Lone UTF-16 surrogates (no text a store can hold: jsonb refuses them, text columns would make
  // them U+FFFD without a word), anywhere in a body: refused naming the field.
  for (const [what, path, body, field] of [
    ['in metadata', '/v1/keys', { name: 'x', type: 'user', metadata: { a: 'ok \ud800' } }, 'metadata.a'],
    ['in a name', '/v1/keys', { name: 'k\udfff', type: 'user' }, 'name'],
    ['in an owner', '/v1/keys', { name: 'x', type: 'user', owner: '\ud83d' }, 'owner'],
    ['in a deny-list reason', '/v1/deny-list', { cidr: '198.51.100.2', reason: 'r\ud800' }, 'reason'],
    ['in an import row', '/v1/keys/import', { type: 'user', rows: [{ key_hash: 'a'.repeat(64), name: 'n\ud800' }] }, 'rows[0].name'],
  ] as const) {
    const a = await h.call('POST', path, { body })
    refused(a, 400, 'validation_failed', `a lone surrogate ${what}`)
    t.equal(a.json?.error?.details?.fields?.[0]?.field, field, `named: ${field}`)
  }
  const pair = await h.call('POST', '/v1/keys', { body: { name: 'emoji \ud83d\ude00', type: 'user', metadata: { e: '\ud83d\ude00' } } })
  t.equal(pair.status, 201, 'a surrogate pair (an emoji) is text, and taken')
  t.equal(pair.json?.name, 'emoji \ud83d\ude00', 'and stored as sent')

  // A number that would not be stored as written is refused naming its field, as a lone surrogate
  // is (before: 201, stored as null, rounded, or 0 without a word).
  for (const [what, path, raw, field, shown] of [
    ['a number out of range in metadata', '/v1/keys', '{"name":"m","type":"service","metadata":{"ok":1,"inf":1e309}}', 'metadata.inf', '1e309'],
    ['a whole number past 2^53 in metadata', '/v1/keys', '{"name":"m","type":"service","metadata":{"big":12345678901234567891}}', 'metadata.big', '12345678901234567891'],
    ['the same with a fraction', '/v1/keys', '{"name":"m","type":"service","metadata":{"big":12345678901234567891.0}}', 'metadata.big', '12345678901234567891.0'],
    ['the same with an exponent', '/v1/keys', '{"name":"m","type":"service","metadata":{"big":1.2345678901234567891e19}}', 'metadata.big', '1.2345678901234567891e19'],
    ['a fraction with more digits than a double holds', '/v1/keys', '{"name":"m","type":"service","metadata":{"f":0.1000000000000000000001}}', 'metadata.f', '0.1000000000000000000001'],
    ['a number too close to zero in metadata', '/v1/keys', '{"name":"m","type":"service","metadata":{"zero":0,"tiny":-1e-400}}', 'metadata.tiny', '-1e-400'],
    ['a number out of range in an import row', '/v1/keys/import', `{"type":"user","rows":[{"key_hash":"${'b'.repeat(64)}","name":"n","metadata":{"a":[1,-1e999]}}]}`, 'rows[0].metadata.a[1]', '-1e999'],
    ['a 60-digit whole number in an import row', '/v1/keys/import', `{"type":"user","rows":[{"key_hash":"${'b'.repeat(64)}","name":"n","metadata":{"n":${'9'.repeat(60)}}}]}`, 'rows[0].metadata.n', `${'9'.repeat(37)}... (60 characters)`],
    ['a long number in an import row whose key hash holds a run of digits', '/v1/keys/import', `{"type":"user","rows":[{"key_hash":"${'1'.repeat(64)}","name":"n","metadata":{"n":12345678901234567891}}]}`, 'rows[0].metadata.n', '12345678901234567891'],
    ['a number out of range in a rate limit', '/v1/keys', '{"name":"m","type":"service","rate_limit":{"limit":1e309,"window_s":60}}', 'rate_limit.limit', '1e309'],
  ] as const) {
    const a = await h.call('POST', path, { raw, headers: json })
    refused(a, 400, 'validation_failed', what)
    t.equal(a.json?.error?.details?.fields?.[0]?.field, field, `named: ${field}`)
    t.ok(a.json?.error?.message.startsWith(`${field}: ${shown} `), `shown as written: ${a.json?.error?.message}`)
    t.notMatch(a.json?.error?.message, /\bnull\b.*expected|: null /, 'not echoed as null')
  }
  // Before (found by a review), 100000000000000000000 and 2^53, stored exactly, were refused as rounded.
  const exact = await h.call('POST', '/v1/keys', { raw: '{"name":"exact","type":"service","metadata":{"max":9007199254740991,"min":-9007199254740991,"e":1e20,"e20":100000000000000000000,"p53":9007199254740992,"f":0.1,"z":0,"nz":-0e-500,"small":5e-324,"d":1.5e-7,"one":1.0,"h":1E2,"full":0.30000000000000004}}', headers: json })
  t.equal(exact.status, 201, 'numbers stored as written are taken')
  t.same(exact.json?.metadata, { max: 9007199254740991, min: -9007199254740991, e: 1e20, e20: 1e20, p53: 9007199254740992, f: 0.1, z: 0, nz: 0, small: 5e-324, d: 1.5e-7, one: 1, h: 100, full: 0.30000000000000004 })
  // A body that is not UTF-8 is refused (before: each bad byte became U+FFFD, stored as the name
  // "k\ufffd"), and so is one declared in another charset (before: read as UTF-8 regardless).
  for (const [what, bytes] of [
    ['a byte that is no UTF-8', [0xff]],
    ['a sequence cut short', [0xc3]],
    ['an overlong encoding', [0xc0, 0xaf]],
    ['an encoded surrogate', [0xed, 0xa0, 0x80]],
  ] as const) {
    const a = await h.call('POST', '/v1/keys', { raw: Buffer.concat([Buffer.from('{"name":"k'), Buffer.from(bytes), Buffer.from('","type":"service"}')]), headers: json })
    refused(a, 400, 'bad_request', `${what} in a body`)
    t.equal(a.json?.error?.message, 'the body is not valid UTF-8')
  }
  const latin1 = await h.call('POST', '/v1/keys', { raw: Buffer.from('{"name":"caf\u00e9","type":"service"}', 'latin1'), headers: { 'content-type': 'application/json; charset=ISO-8859-1' } })
  refused(latin1, 415, 'unsupported_media_type', 'a body declared ISO-8859-1')
  t.match(latin1.json?.error?.message, /charset "ISO-8859-1"/, 'the charset is named')
  t.equal(latin1.headers.connection, 'close', 'and the body is not read')
  const hidden = await h.call('POST', '/v1/keys', { raw: Buffer.from('{"name":"caf\u00e9","type":"service"}', 'latin1'), headers: { 'content-type': 'application/json; profile="urn:x;charset=utf-8"; charset=latin1' } })
  refused(hidden, 415, 'unsupported_media_type', 'a body declared latin1 after a quoted ;charset=utf-8')
  // A quoted value holding `;charset=` is no parameter of its own (before, found by a review: the
  // first was read as the charset, and this UTF-8 body refused as UTF-16).
  const quoted = 'application/json; profile="urn:x;charset=utf-16"; charset=utf-8'
  for (const type of ['application/json; charset=utf-8', 'application/json;charset="UTF-8"', 'application/json; charset=utf8', 'application/json; charset=US-ASCII', quoted]) {
    const a = await h.call('POST', '/v1/keys/validate', { raw: Buffer.from('{"key":"caf\u00e9"}'), headers: { 'content-type': type } })
    t.equal(a.status, 200, `${type}: taken`)
  }
  // An empty object is no body (generic clients send one with every POST or DELETE; before, found
  // by a review, a 400); anything more is refused on an operation that takes none.
  t.equal((await h.call('DELETE', '/v1/deny-list/nosuchentry1234', { body: {} })).status, 404, '{} on an operation without a body: as none')
  const more = await h.call('DELETE', '/v1/deny-list/nosuchentry1234', { body: { force: true } })
  refused(more, 400, 'bad_request', 'a body on an operation that takes none')
  t.match(more.json?.error?.message, /takes no body \(or an empty object\)/)
  // A body of JSON `null` is no object, as `[]` or `true` are not: refused naming the body, and the
  // key is left as it was (before, found by a review: read as `{}`, it revoked or rotated the key,
  // and a creation was told its name was missing rather than that its body was no object).
  const nulled = (await h.call('POST', '/v1/keys', { body: { name: 'nulled', type: 'user' } })).json?.id as string
  const auditBefore = await h.auditRows()
  for (const [method, path] of [['POST', `/v1/keys/${nulled}/revoke`], ['POST', `/v1/keys/${nulled}/rotate`], ['POST', '/v1/keys'], ['PATCH', `/v1/keys/${nulled}`]] as const) {
    const a = await h.call(method, path, { raw: 'null', headers: json })
    refused(a, 400, 'validation_failed', `${method} ${path} with a body of null`)
    t.match(a.json?.error?.details?.fields, [{ field: 'body', message: /^null is not allowed; expected an object/ }], `${method} ${path}: the body is named, as no object`)
    t.equal(a.json?.error?.details?.fields?.length, 1, 'one field named')
  }
  const still = await h.call('GET', `/v1/keys/${nulled}`)
  t.equal(still.json?.status, 'active', 'the key is neither revoked nor rotated')
  t.equal(still.json?.replaced_by, null, 'and has no successor')
  t.equal(await h.auditRows(), auditBefore, 'nothing audited')
  t.equal((await h.call('POST', `/v1/keys/${nulled}/revoke`)).status, 200, 'no body at all is still a revocation without a reason')
  // A patch document is not a body of fields (before, found by a review: a merge patch's
  // {"metadata":{"env":null}} was taken, and replaced the metadata with {"env":null}).
  for (const type of ['application/merge-patch+json', 'Application/JSON-Patch+JSON; charset=utf-8']) {
    const a = await h.call('POST', '/v1/keys', { raw: Buffer.from('{"name":"patchy","type":"service"}'), headers: { 'content-type': type } })
    refused(a, 415, 'unsupported_media_type', `${type}: refused`)
    t.match(a.json?.error?.message, /not a patch document/)
  }
  t.equal((await h.call('POST', '/v1/keys/validate', { raw: Buffer.from('{"key":"kg_x"}'), headers: { 'content-type': 'application/vnd.example+json' } })).status, 200, 'another +json type is still JSON')

  // A content-coded body is refused 415 with what is taken (RFC 9110 §15.5.16, §12.5.3). Before
  // (found by a review), Content-Encoding was ignored: plain JSON sent as `br` was taken (201), and
  // a gzipped body refused as not UTF-8 (400).
  const plain = Buffer.from('{"key":"kg_x"}')
  for (const [what, raw, coding] of [
    ['plain JSON said to be br', plain, 'br'],
    ['a gzipped body', gzipSync(plain), 'gzip'],
    ['a list with a coding', plain, 'identity, deflate'],
  ] as const) {
    const a = await h.call('POST', '/v1/keys/validate', { raw, headers: { ...json, 'content-encoding': coding } })
    refused(a, 415, 'unsupported_media_type', what)
    t.match(a.json?.error?.message, /not content-coded \(Content-Encoding: "(br|gzip|deflate)"\)/, `${what}: the coding is named`)
    t.equal(a.headers['accept-encoding'], 'identity', `${what}: Accept-Encoding says what is taken`)
    t.equal(a.headers.connection, 'close', `${what}: the body is not read`)
  }
  for (const coding of ['identity', 'Identity', '']) {
    const a = await h.call('POST', '/v1/keys/validate', { raw: plain, headers: { ...json, 'content-encoding': coding } })
    t.equal(a.status, 200, `Content-Encoding: ${JSON.stringify(coding)}: taken`)
  }

  // The key service refuses Infinity itself (the CLI's --metadata and import files read 1e309 so).
  await t.rejects(h.keys.create({ name: 'inf', type: 'service', metadata: { deep: { inf: Infinity } } }, { actor: 'test' }), { code: 'validation_failed', details: { fields: [{ field: 'metadata.deep.inf' }] } }, 'the key service refuses Infinity in metadata')

  // An audit cursor holds what the server wrote: a time of 1970 to 9999 and an id.
  const cursor = (v: unknown) => Buffer.from(JSON.stringify(v)).toString('base64url')
  for (const [what, c] of [
    ['a time before the store can hold', cursor(['-004714-01-01T00:00:00Z', 'x'])],
    ['a time after it', cursor(['+275760-09-13T00:00:00Z', 'x'])],
    ['a number for the time', cursor([1, 'x'])],
    ['not JSON', 'bm90LWEtY3Vyc29y'],
    // Before, these reached PostgreSQL, which cannot hold such text: 500 and an error log line.
    ['a NUL in the id', cursor(['2026-01-01T00:00:00Z', 'a\u0000b'])],
    ['a lone surrogate in the id', cursor(['2026-01-01T00:00:00Z', 'a\ud800'])],
    ['a list keygate has not', cursor(['2026-01-01T00:00:00Z', 'x', 'nope'])],
  ] as const) {
    refused(await h.call('GET', `/v1/keys/${pair.json?.id}/audit?cursor=${c}`), 400, 'validation_failed', `an audit cursor with ${what}`)
    refused(await h.call('GET', `/v1/keys?cursor=${c}`), 400, 'validation_failed', `a list cursor with ${what}`)
  }
  // A made-up cursor that names the list it is given to is not a cursor of that list "not of" that
  // list (before, found by a review: "is a cursor of the key list, not of the key list").
  for (const [what, list, path] of [
    ['a day that does not exist', 'keys', '/v1/keys'],
    ['a time past what the store holds', 'keys', '/v1/keys'],
    ['a NUL in the id', 'audit', '/v1/audit'],
  ] as const) {
    const c = cursor(what === 'a NUL in the id' ? ['2026-01-01T00:00:00Z', 'a\u0000b', list] : [what === 'a day that does not exist' ? '2026-02-31T00:00:00Z' : '+275760-09-13T00:00:00Z', 'x', list])
    const a = await h.call('GET', `${path}?cursor=${c}`)
    refused(a, 400, 'validation_failed', `a cursor of ${path} (${list}) with ${what}, given back to it`)
    t.match(a.json?.error?.details?.fields, [{ field: 'cursor', message: /^is not a cursor this server returned$/ }], `${what}: not said to be another list's`)
    t.equal(a.json?.error?.details?.fields?.length, 1, 'one field named')
  }

  // A key sent where another shape belongs (the whole body, an import row) is not shown back.
  const pasted = pair.json?.key as string
  const wrapped = await h.call('POST', '/v1/keys/validate', { body: [pasted] })
  refused(wrapped, 400, 'validation_failed', 'a key as the whole body')
  t.notOk(wrapped.text.includes(pasted), 'and not echoed')
  const legacy = '0f8e2b9c-1d2a-4b3c-8d4e-5f6a7b8c9d0e'
  const row = await h.call('POST', '/v1/keys/import', { body: { type: 'user', rows: [legacy] } })
  refused(row, 400, 'import_invalid', 'a legacy key as a whole import row')
  t.notOk(row.text.includes(legacy), 'and not echoed')
  t.notMatch(row.text, /row 1: row 1/, 'the row named once')

  const secret = 'gtp_' + 'S'.repeat(300)
  const echoed = await h.call('POST', '/v1/keys/validate', { body: { key: secret } })
  t.equal(echoed.status, 200, 'a key too long to be one is a verdict, as the CLI on the store gives it')
  t.match(echoed.json, { valid: false, code: 'key_invalid', reason: 'malformed' })
  t.notMatch(echoed.text, /SSSSSSSSSS/, 'and not echoed')
  const notText = await h.call('POST', '/v1/keys/validate', { body: { key: 987654321 } })
  t.equal(notText.status, 400)
  t.notMatch(notText.text, /987654321/, 'a key that is not allowed is named, not shown')
  refused(await h.call('POST', '/v1/keys/validate', { body: { key: 'kg_x', address: '10.0.0.0/8' } }), 400, 'validation_failed', 'a range as the address to check from')

  // A key pasted into other free text that is stored, audited and shown back is refused by field,
  // as in a key's name or a revocation reason (before, found by a review: stored, audited, echoed).
  const denyBefore = (await h.call('GET', '/v1/deny-list')).json?.items.length
  for (const [what, path, body, field] of [
    ['a deny entry reason', '/v1/deny-list', { cidr: '192.0.2.7', reason: `abuse with ${pasted}` }, 'reason'],
    ['a webhook description', '/v1/webhooks', { url: 'https://hooks.example.com/in', events: ['key.created'], description: `for ${pasted}` }, 'description'],
    ['a webhook URL', '/v1/webhooks', { url: `https://hooks.example.com/in?api_key=${pasted}`, events: ['key.created'] }, 'url'],
    ['a Gitea token name', '/v1/gitea/tokens', { name: `ci ${pasted}`, scopes: ['read:repository'] }, 'name'],
    ['an n8n key label', '/v1/n8n/keys', { label: `ci ${pasted}`, scopes: ['workflow:list'] }, 'label'],
  ] as const) {
    const a = await h.call('POST', path, { body })
    refused(a, 400, 'validation_failed', `a key in ${what}`)
    t.match(a.json?.error?.message, new RegExp(`^${field}: holds what looks like a keygate API key`), `${what}: the field is named`)
    t.notOk(a.text.includes(pasted), `${what}: not echoed`)
  }
  t.equal((await h.call('GET', '/v1/deny-list')).json?.items.length, denyBefore, 'no deny entry was added')
  t.equal((await h.call('GET', '/v1/webhooks')).json?.items.length, 0, 'no webhook was registered')

  // Invisible format characters, as control characters, in text shown back in CLI tables (before,
  // found by a review: {"name":"\u202eevil"} was 201 and `api-key list` printed the row reversed
  // on a bidi terminal). Each is named by its escape in the message, never sent raw.
  const keysBefore = (await h.call('GET', '/v1/keys?limit=200')).json?.items.length
  // Also the characters that show nothing and make a name look like another or blank (before, found
  // by a review: `ad\u00admin` was taken): the soft hyphen, the combining grapheme joiner, the
  // Hangul fillers, a Khmer inherent vowel, a deprecated format character, an interlinear
  // annotation mark, and a tag character (plane 14, named by its two UTF-16 halves).
  const invisible = ['\u202e', '\u202a', '\u2066', '\u2069', '\u200b', '\u200e', '\u200f', '\u2028', '\u2029', '\u2060', '\ufeff', '\u061c', '\u180e', '\u0085',
    '\u00ad', '\u034f', '\u115f', '\u3164', '\uffa0', '\u17b4', '\u206a', '\ufff9', '\u{e0041}']
  for (const c of invisible) {
    const hex = c.split('').map((unit) => unit.charCodeAt(0).toString(16).padStart(4, '0')).join('\\u')
    for (const [what, path, body, field] of [
      ['a key name', '/v1/keys', { name: `${c}evil`, type: 'user' }, 'name'],
      ['an owner', '/v1/keys', { name: 'x', type: 'user', owner: `team${c}` }, 'owner'],
      ['a revocation reason', `/v1/keys/${pair.json?.id}/revoke`, { reason: `left${c}` }, 'reason'],
      ['an import row name', '/v1/keys/import', { type: 'user', rows: [{ key_hash: 'b'.repeat(64), name: `n${c}` }] }, 'name'],
      ['a Gitea token name', '/v1/gitea/tokens', { name: `ci${c}`, scopes: ['read:repository'] }, 'name'],
      ['an n8n key label', '/v1/n8n/keys', { label: `ci${c}`, scopes: ['workflow:list'] }, 'label'],
      ['a deny entry reason', '/v1/deny-list', { cidr: '192.0.2.55', reason: `r${c}` }, 'reason'],
      ['a webhook description', '/v1/webhooks', { url: 'https://hooks.example/in', events: ['key.created'], description: `d${c}` }, 'description'],
    ] as const) {
      const a = await h.call('POST', path, { body })
      t.equal(a.status, 400, `U+${hex} in ${what}: 400`)
      t.match(a.json?.error?.code, /^(validation_failed|import_invalid)$/, `U+${hex} in ${what}: refused by validation`)
      t.ok(a.json?.error?.message?.includes(field), `U+${hex} in ${what}: ${field} named`)
      t.ok(a.json?.error?.message?.includes(`\\u${hex}`), `U+${hex} in ${what}: shown escaped`)
      t.notOk(a.json?.error?.message?.includes(c), `U+${hex} in ${what}: not shown raw`)
    }
  }
  // A name of white space alone, or the blank braille pattern, shows nothing either (before, found by
  // a review: taken, and printed as an empty cell in `api-key list`).
  // Nor do joiners, variation selectors, combining marks or the musical format characters alone
  // (found by a second review).
  for (const blank of [' ', '\u00a0', '\u3000\u3000', '\u2800', ' \u2800 ', '\u2003', '\u200c', '\u200d\ufe0f', '\u0300', ' \u20d0', '\u{1d173}', '\u{1d17a}\u200c', '\u180b', '\u{1d167}']) {
    for (const [what, path, body, field] of [
      ['a key name', '/v1/keys', { name: blank, type: 'user' }, 'name'],
      ['an owner', '/v1/keys', { name: 'x', type: 'user', owner: blank }, 'owner'],
      ['an import row name', '/v1/keys/import', { type: 'user', rows: [{ key_hash: 'b'.repeat(64), name: blank }] }, 'name'],
      ['a Gitea token name', '/v1/gitea/tokens', { name: blank, scopes: ['read:repository'] }, 'name'],
      ['an n8n key label', '/v1/n8n/keys', { label: blank, scopes: ['workflow:list'] }, 'label'],
    ] as const) {
      const a = await h.call('POST', path, { body })
      t.equal(a.status, 400, `${JSON.stringify(blank)} as ${what}: 400`)
      t.match(a.json?.error?.message, new RegExp(`${field}[^]*something visible`), `${JSON.stringify(blank)} as ${what}: ${field} named, and why`)
    }
    t.equal((await h.call('PATCH', `/v1/keys/${pair.json?.id}`, { body: { name: blank } })).status, 400, `${JSON.stringify(blank)}: a rename to it too`)
  }
  t.equal((await h.call('GET', `/v1/keys/${pair.json?.id}`)).json?.status, 'active', 'the key was not revoked')
  t.equal((await h.call('GET', '/v1/keys?limit=200')).json?.items.length, keysBefore, 'no key was created or imported')
  for (const name of ['e\u0301', '\u{1f511}', '\u{1d400}', '\u200c\u{1f511}']) t.equal((await h.call('POST', '/v1/keys', { body: { name, type: 'user' } })).status, 201, `${JSON.stringify(name)} shows: taken`)
  const spaced = await h.call('POST', '/v1/keys', { body: { name: ' a\u00a0name\u2800 ', type: 'user' } })
  t.equal(spaced.status, 201, 'spaces and the braille blank beside visible characters are taken')
  t.equal(spaced.json?.name, ' a\u00a0name\u2800 ', 'as sent')
  // Right-to-left letters are text: only the invisible characters that reorder or hide it are refused.
  const rtl = await h.call('POST', '/v1/keys', { body: { name: 'מפתח مفتاح', type: 'user', owner: 'équipe ✓' } })
  t.equal(rtl.status, 201, 'Hebrew and Arabic letters are taken')
  t.equal(rtl.json?.name, 'מפתח مفتاح')
  // The zero-width non-joiner and joiner are text too: Persian words and joined emoji hold them.
  // So are the variation selectors (U+FE0F makes ❤ an emoji) and Hangul.
  const joined = await h.call('POST', '/v1/keys', { body: { name: 'می\u200cخواهم 👨\u200d👩\u200d👧 ❤\ufe0f 열쇠', type: 'user' } })
  t.equal(joined.status, 201, 'U+200C, U+200D, U+FE0F and Hangul letters are taken')

  t.equal(await h.auditRows(), before + 16, 'no refusal wrote an audit row (14 keys and a deny entry were created, one key revoked)')

  // Lengths are characters, as the document's maxLength and the store's length() count them (before,
  // found by a review: TypeBox counted UTF-16 units, and 101 to 200 emoji were refused as a name).
  const emoji = (n: number) => '\u{1f511}'.repeat(n)
  const emojiKey = await h.call('POST', '/v1/keys', { body: { name: emoji(200), owner: emoji(200), type: 'user' } })
  t.equal(emojiKey.status, 201, 'a name and an owner (a string or null) of 200 emoji are taken')
  t.equal((await h.call('GET', `/v1/keys/${emojiKey.json.id}`)).json?.name, emoji(200), 'and stored whole')
  t.equal((await h.call('PATCH', `/v1/keys/${emojiKey.json.id}`, { body: { owner: emoji(199) + 'b' } })).status, 200, 'a patch of 200 characters')
  const over = await h.call('POST', '/v1/keys', { body: { name: emoji(201), type: 'user' } })
  refused(over, 400, 'validation_failed', '201 emoji as a name')
  t.match(over.json?.error?.details?.fields, [{ field: 'name', message: /expected a non-empty string of at most 200 characters/ }])
  t.equal(over.json?.error?.details?.fields?.length, 1, 'one field named')
  const overOwner = await h.call('POST', '/v1/keys', { body: { name: 'x', owner: emoji(201), type: 'user' } })
  t.match(overOwner.json?.error?.details?.fields, [{ field: 'owner' }], '201 emoji as an owner (in a union) is still refused')
  t.equal(overOwner.json?.error?.details?.fields?.length, 1, 'one field named')
  const bad = await h.call('POST', '/v1/keys', { body: { name: emoji(150) + '\u202e', type: 'user' } })
  t.match(bad.json?.error?.details?.fields, [{ field: 'name', message: /without control characters/ }], 'a long name with a bidi override is refused for it')
  t.equal(bad.json?.error?.details?.fields?.length, 1, 'one field named')
  // What a refusal shows is cut between characters, its length told in characters (before, found by
  // a review: half an emoji went out as a lone \ud83d, which strict JSON decoders refuse).
  const wellFormed = (a: Answer) => [a.json?.error?.message, ...(a.json?.error?.details?.fields ?? []).flatMap((f: { field: string; message: string }) => [f.field, f.message])].every((x) => typeof x === 'string' && x.isWellFormed())
  const shortMember = await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', ['ab' + emoji(100)]: 1 } })
  t.match(shortMember.json?.error?.details?.fields, [{ field: 'ab' + emoji(100) }], 'a member name of 102 characters is shown whole (the bound is 120 characters)')
  t.equal(shortMember.json?.error?.details?.fields?.length, 1, 'one field named')
  const longMember = await h.call('POST', '/v1/keys', { body: { name: 'x', type: 'user', ['ab' + emoji(150)]: 1 } })
  refused(longMember, 400, 'validation_failed', 'an unknown member with a long emoji name')
  t.match(longMember.json?.error?.details?.fields, [{ field: `ab${emoji(115)}... (152 characters)` }], 'its name cut between characters, its length in characters')
  t.equal(longMember.json?.error?.details?.fields?.length, 1, 'one field named')
  t.ok(wellFormed(longMember), 'no lone surrogate in the answer')
  t.ok(wellFormed(over), 'nor where a long emoji name is shown')
  t.equal((await h.call('POST', '/v1/deny-list', { body: { cidr: '198.51.100.77', reason: emoji(500) } })).status, 201, 'a deny reason of 500 emoji')
  refused(await h.call('POST', '/v1/deny-list', { body: { cidr: '198.51.100.78', reason: emoji(501) } }), 400, 'validation_failed', 'a deny reason of 501 emoji')

  // A request without a credential and with a large body: answered at once, the connection closed, the body not read.
  const port = Number(new URL(h.url).port)
  const closed = await exchange(port, `POST /v1/keys HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 20000000\r\n\r\n{"name":`)
  t.match(closed.head, /^HTTP\/1.1 401/, 'refused without a credential')
  t.match(closed.head, /\r\nconnection: close\r\n/i, 'with Connection: close')
  t.ok(closed.destroyed, 'and the connection is closed instead of the body being read')
  // So is a request no route reads the body of (before: answered keep-alive, and all of a body of
  // any size read and dropped, unauthenticated).
  for (const [what, head, status] of [
    ['no route', 'POST /v1/nope', 404],
    ['a method not allowed', 'PUT /v1/keys', 405],
    ['a target that is no path', 'POST //x/v1/keys', 400],
    ['a path not validly encoded', 'PATCH /v1/keys/%zz', 400],
  ] as const) {
    const a = await exchange(port, `${head} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 209715200\r\n\r\n${'x'.repeat(65536)}`)
    t.match(a.head, new RegExp(`^HTTP/1.1 ${status} `), `${what} with a body: ${status}`)
    t.match(a.head, /\r\nconnection: close\r\n/i, `${what}: with Connection: close`)
    t.ok(a.destroyed, `${what}: the connection is closed instead of the body being read`)
  }
  const bodiless = await exchange(port, 'GET /v1/nope HTTP/1.1\r\nHost: localhost\r\n\r\n', true)
  t.match(bodiless.head, /^HTTP\/1.1 404 [^]*\r\nconnection: keep-alive\r\n/i, 'no route without a body: the connection is kept')
  t.notOk(bodiless.destroyed)

  // A request the HTTP parser gives up on: the gateway's JSON error and code, marked as the admin
  // API's (before: an empty 400 or 431 without a code).
  for (const [what, request, status, code] of [
    ['a Content-Length that is no number', 'POST /v1/keys HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n', 400, 'bad_request'],
    ['headers past the limit', `GET /v1/keys HTTP/1.1\r\nHost: localhost\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 431, 'headers_too_large'],
  ] as const) {
    const a = await exchange(port, request)
    const [head, body] = a.head.split('\r\n\r\n') as [string, string]
    t.match(head, new RegExp(`^HTTP/1.1 ${status} `), `${what}: ${status}`)
    t.match(head, /\r\ncontent-type: application\/json; charset=utf-8(\r\n|$)/i, `${what}: JSON`)
    t.match(head, /\r\nx-keygate-admin: 1(\r\n|$)/i, `${what}: the admin API's answer`)
    t.match(head, /\r\nconnection: close(\r\n|$)/i, `${what}: Connection: close`)
    t.equal((JSON.parse(body) as { error: { code: string } }).error.code, code, `${what}: ${code}`)
    t.ok(a.destroyed, `${what}: the connection is closed`)
  }

  // A member named twice in its object is refused naming it, wherever it is (before, found by a
  // review: JSON.parse kept the last, and a key was created with the scopes ["admin"] of the second).
  const before2 = await h.auditRows()
  for (const [what, method, path, raw, field] of [
    ['at the top', 'POST', '/v1/keys', '{"name":"dup","type":"user","scopes":["read"],"scopes":["admin"]}', 'scopes'],
    ['in a nested object', 'POST', '/v1/keys', '{"name":"dup","type":"user","rate_limit":{"limit":5,"window_s":1,"limit":500}}', 'rate_limit.limit'],
    ['in metadata, in a list', 'POST', '/v1/keys', '{"name":"dup","type":"user","metadata":{"l":[1,{"a":1},{"a":1,"b":{},"a":2}]}}', 'metadata.l[2].a'],
    ['spelled with an escape', 'POST', '/v1/keys', '{"name":"dup","type":"user","\\u0073copes":["admin"],"scopes":["read"]}', 'scopes'],
    ['holding an escaped quote', 'POST', '/v1/keys', '{"name":"dup","type":"user","metadata":{"a\\"b":1,"a\\u0022b":2}}', 'metadata.a"b'],
    ['in a PATCH', 'PATCH', `/v1/keys/${pair.json.id}`, '{"scopes":["read"],"scopes":["admin"]}', 'scopes'],
    ['in an import row', 'POST', '/v1/keys/import', `{"type":"user","rows":[{"key_hash":"${'d'.repeat(64)}","name":"n"},{"key_hash":"${'e'.repeat(64)}","name":"n","name":"m"}]}`, 'rows[1].name'],
  ] as const) {
    const a = await h.call(method, path, { raw, headers: json })
    refused(a, 400, 'validation_failed', `a member named twice ${what}`)
    t.same(a.json?.error?.details?.fields, [{ field, message: 'is given more than once in its object; send each member once' }], `named: ${field}`)
  }
  t.equal(await h.auditRows(), before2, 'none of them wrote anything')
  t.same((await h.call('GET', `/v1/keys/${pair.json.id}`)).json.scopes, [], 'the PATCH changed nothing')
  // The same names in different objects, and names, braces, quotes and escapes inside strings, are no repeat.
  const tricky = await h.call('POST', '/v1/keys', {
    raw: '{"name":"tricky \\"name\\": {\\"a\\":1,\\"a\\":2} [\\\\]","type":"user","metadata":{"a":{"a":1,"b":"\\\\"},"b":{"a":"\\",\\"a\\":"},"\\\\":["a","a",{"a":"}{"}],"a\\\\":1}}',
    headers: json,
  })
  t.equal(tricky.status, 201, 'a body with braces, quotes and escapes in strings, and names repeated across objects, is taken')
  t.same(tricky.json?.metadata, { a: { a: 1, b: '\\' }, b: { a: '",\"a\":' }, '\\': ['a', 'a', { a: '}{' }], 'a\\': 1 }, 'and stored as sent')
  t.equal(tricky.json?.name, 'tricky "name": {"a":1,"a":2} [\\]')
  // An object of more than 10,000 members is refused before the walks over the parsed body, which
  // took tens of seconds over one of millions (found by a review: a 31 MB import body of 2.5
  // million unknown fields held the process 65 s).
  const wide = (n: number) => Array.from({ length: n }, (_, i) => `"w${i}":1`).join(',')
  for (const [what, path, raw, field] of [
    ['metadata of 10,001 members', '/v1/keys', `{"name":"wide","type":"user","metadata":{${wide(10_001)}}}`, 'metadata'],
    ['a body of 10,001 members', '/v1/keys/import', `{"rows":[{}],${wide(10_000)}}`, 'body'],
    ['an import row of 10,001 members', '/v1/keys/import', `{"rows":[{},{${wide(10_001)}}]}`, 'rows[1]'],
  ] as const) {
    const a = await h.call('POST', path, { raw, headers: json })
    refused(a, 400, 'validation_failed', what)
    t.same(a.json?.error?.details?.fields, [{ field, message: 'has more than 10000 members; no input takes an object that large' }], `named: ${field}`)
  }

  // Many problems: the first 20 are listed and the check stops there (before, found by a review:
  // every one, 22.8 MB for 80,000 unknown fields, 298 MB for a 31 MB import body; an object of
  // more than 10,000 members is refused before, below).
  const members = (n: number, from = 0) => Array.from({ length: n }, (_, i) => `"k${from + i}":1`).join(',')
  const many = await h.call('POST', '/v1/keys', { raw: `{"name":"many","type":"user",${members(9_998)}}`, headers: json })
  refused(many, 400, 'validation_failed', '9,998 unknown fields')
  t.ok(many.text.length < 8_000, `a small answer (${many.text.length} bytes)`)
  t.same(many.json.error.details.fields.map((f: { field: string }) => f.field), Array.from({ length: 20 }, (_, i) => `k${i}`), 'naming the first 20 fields')
  t.equal(many.json.error.details.more, true, 'and saying there are more')
  t.match(many.json.error.message, /^k0: unknown key; allowed here: name, .*; and more \(the first 20 problems are listed\)$/)
  const twenty = await h.call('POST', '/v1/keys', { raw: `{"name":"twenty","type":"user",${members(20)}}`, headers: json })
  t.equal(twenty.json.error.details.fields.length, 20, 'twenty problems: all listed')
  t.equal(twenty.json.error.details.more, undefined, 'and no more said')
  const long = await h.call('POST', '/v1/keys', { raw: `{"name":"long","type":"user","${'n'.repeat(500_000)}":1}`, headers: json })
  refused(long, 400, 'validation_failed', 'an unknown field with a name of 500,000 characters')
  t.ok(long.text.length < 2_000, `a small answer (${long.text.length} bytes)`)
  t.match(long.json.error.details.fields[0].field, /^n{117}\.\.\. \(500000 characters\)$/, 'its name cut, with its length')
  const importBody = await h.call('POST', '/v1/keys/import', { raw: `{"rows":[{}],${members(9_999)}}`, headers: json })
  refused(importBody, 400, 'validation_failed', 'an import body with 9,999 unknown fields')
  t.ok(importBody.text.length < 8_000, `a small answer (${importBody.text.length} bytes)`)
  t.same(importBody.json.error.details.fields.map((f: { field: string }) => f.field), Array.from({ length: 20 }, (_, i) => `k${i}`))
  // An import's rows: the problems of the first rows, up to 20, each row's own list bounded too.
  const badRows = Array.from({ length: 1000 }, (_, i) => `{"key_hash":"${'a'.repeat(64)}","name":"r${i}",${members(100)}}`)
  const rowsAnswer = await h.call('POST', '/v1/keys/import', { raw: `{"type":"user","rows":[${badRows.join(',')}]}`, headers: json })
  refused(rowsAnswer, 400, 'import_invalid', '1,000 rows of 100 unknown fields each')
  t.ok(rowsAnswer.text.length < 100_000, `a bounded answer (${rowsAnswer.text.length} bytes)`)
  const listed: string[] = rowsAnswer.json.error.details.problems
  // Row 1 has one problem (its list), each row after it two (the list, the repeated key_hash):
  // row 11 brings them to 21, and the check stops there.
  t.same(listed.slice(-2), ['and 1 more problem', 'the rows after row 11 were not checked (an import lists at most 20 problems)'], 'twenty problems, a count of the rest, the rows not checked')
  t.equal(listed.length, 22)
  t.match(listed[0], /^row 1: k0: unknown key; .*; k19: unknown key; [^;]*; and more \(the first 20 problems are listed\)$/, "row 1's first 20 problems")
  t.match(listed[1], /^row 2: key_hash repeats row 1$/)

  // A client that goes away mid-body, with a credential: its mistake, not a server failure.
  const errorsBefore = errorLines()
  for (const body of [`Content-Length: 1000\r\n\r\n{"name":`, `Transfer-Encoding: chunked\r\n\r\nzz\r\n`]) {
    await new Promise<void>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => {
        socket.write(`POST /v1/keys HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer ${h.adminKey}\r\nContent-Type: application/json\r\n${body}`)
        setTimeout(() => (socket.destroy(), resolve()), 200)
      })
      socket.on('error', () => {})
    })
  }
  await new Promise((resolve) => setTimeout(resolve, 200))
  t.same(logged.slice(-5).filter((l) => l.level === 'error'), [], 'no error logged for a body cut short')
  t.equal(errorLines(), errorsBefore)

  // An anomaly stream opened with an admin key ends when the key is revoked.
  const admin = await h.keys.create({ name: 'watcher', type: 'system', scopes: ['admin'] }, { actor: 'test' })
  const s = await h.stream('/v1/anomalies/stream', { auth: admin.key })
  t.equal(s.status, 200)
  const ended = s.next().then(
    () => 'an event',
    () => 'ended',
  )
  await h.keys.revoke(admin.record.id, 'left', { actor: 'test' })
  const outcome = await Promise.race([ended, new Promise((r) => setTimeout(() => r('still open after 2 s'), 2000).unref())])
  s.close()
  t.equal(outcome, 'ended', 'the stream of a revoked admin key ends')
})

t.test('a body that is not JSON is named by the line and column where it stops being JSON and why, quoting none of it (found by a review)', async (t) => {
  // Before: the parser's message, which names no position for an unexpected character and quotes
  // some ten characters of the body either side of it: a piece of the key sent to be validated,
  // of a Gitea token to verify, of an import row's key_hash.
  const { db } = await openStore(t, 'embedded')
  const logged: string[] = []
  const h = await startAdmin(t, db, { log: createLogger({ level: 'debug', write: (line) => void logged.push(line) }) })
  const made = await h.call('POST', '/v1/keys', { body: { name: 'to validate', type: 'service' } })
  const key = made.json.key as string
  const token = randomBytes(20).toString('hex')
  const hash = createHash('sha256').update(randomUUID()).digest('hex')
  const legacy = `sk_live_${randomBytes(24).toString('base64url')}`
  const at = (body: string, i: number) => {
    const before = body.slice(0, i).split('\n')
    return `at line ${before.length}, column ${[...(before.at(-1) as string)].length + 1}`
  }
  for (const [what, path, body, where, why, secret] of [
    // Unexpected characters, where the parser quoted the text and named no position.
    ['JavaScript undefined after the key', '/v1/keys/validate', `{"key":"${key}","x":undefined}`, (b: string) => b.indexOf('undefined'), 'Unexpected token', key],
    ['a trailing comma after the key, in a list', '/v1/keys/validate', `["${key}",]`, (b: string) => b.length - 1, 'Unexpected token', key],
    ['the key unquoted', '/v1/keys/validate', `{"key": ${key}}`, (b: string) => b.indexOf(key), 'Unexpected token', key],
    ["a legacy key in single quotes", '/v1/keys/validate', `{"key": '${legacy}'}`, (b: string) => b.indexOf("'"), 'Unexpected token', legacy],
    ['Python None, three lines down', '/v1/keys/validate', `{\n  "key": "${key}",\n  "address": None\n}`, (b: string) => b.indexOf('None'), 'Unexpected token', key],
    ['a Gitea token unquoted', '/v1/gitea/tokens/verify', `{"secret": z${token}}`, (b: string) => b.indexOf('z'), 'Unexpected token', token],
    ['a trailing comma after a row ending in its key_hash', '/v1/keys/import', `{"rows":[{"name":"legacy","type":"service","key_hash":"${hash}"},]}`, (b: string) => b.indexOf(']'), 'Unexpected token', hash],
    ['undefined alone', '/v1/keys/validate', 'undefined', () => 0, 'Unexpected token', 'undefined'],
    // The end of the text, a bad escape, a control character: each in the parser's words.
    ['the body cut short in a literal', '/v1/keys/validate', `{"key":"${key}","address":nul`, (b: string) => b.length, 'Unexpected end of JSON input', key],
    ['a bad escape inside the key', '/v1/keys/validate', `{"key":"${key.slice(0, 20)}\\q${key.slice(20)}"}`, (b: string) => b.indexOf('\\') + 1, 'Bad escaped character', key],
    ['a line break inside a long key', '/v1/keys/validate', `{"key":"${legacy.slice(0, 20)}\n${legacy.slice(20)}"}`, (b: string) => b.indexOf('\n'), 'Bad control character in string literal', legacy],
    ['a character of two UTF-16 units before the fault', '/v1/keys/validate', `{"key":"\u{1F511}${key}" x}`, (b: string) => b.indexOf(' x') + 1, "Expected ',' or '}' after property value", key],
  ] as const) {
    const a = await h.call('POST', path, { raw: body, headers: json })
    t.equal(a.status, 400, `${what}: 400`)
    t.equal(a.json?.error?.code, 'bad_request', `${what}: bad_request`)
    const message = `the body is not valid JSON (${at(body, where(body))}: ${why})`
    t.equal(a.json?.error?.message, message, `${what}: where and why`)
    // Any four characters of the secret (the parser quoted as few as four), but those its words
    // happen to hold.
    const shown = a.text.replace(a.json?.error?.request_id, '')
    const pieces = Array.from({ length: secret.length - 3 }, (_, i) => secret.slice(i, i + 4)).filter((p) => !message.includes(p))
    t.notOk(pieces.some((p) => shown.includes(p)), `${what}: no piece of the secret in the answer`)
  }
  t.notOk(logged.some((line) => line.includes('not valid JSON')), 'nor in the log')
})

t.test('PostgreSQL out of reach: 503 store_unavailable, not 500, and the API answers again once it is back', async (t) => {
  const { url } = await openStore(t, 'postgres')
  const target = new URL(url as string)
  // A TCP relay in front of PostgreSQL, to cut the store off from the admin API and back.
  const open = new Set<net.Socket>()
  let cut = false
  const relay = net.createServer((client) => {
    if (cut) return client.destroy()
    const server = net.connect(Number(target.port || 5432), target.hostname)
    for (const s of [client, server]) {
      open.add(s)
      s.on('close', () => open.delete(s)).on('error', () => {})
    }
    client.pipe(server).pipe(client)
  })
  await new Promise<void>((resolve) => relay.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise((resolve) => relay.close(resolve)))
  const via = new URL(url as string)
  via.host = `127.0.0.1:${(relay.address() as net.AddressInfo).port}`
  const db = await openDb({ databaseUrl: via.toString(), poolMax: 2 })
  t.teardown(() => db.close())
  const h = await startAdmin(t, db)
  t.equal((await h.call('POST', '/v1/keys', { body: { name: 'before', type: 'user' } })).status, 201)

  cut = true
  for (const s of open) s.destroy()
  for (const [method, path, body] of [
    ['GET', '/v1/stats', undefined],
    ['GET', '/v1/keys', undefined],
    ['POST', '/v1/keys', { name: 'during', type: 'user' }],
  ] as const) {
    const a = await h.call(method, path, body ? { body } : {})
    t.equal(a.status, 503, `${method} ${path}: 503`)
    t.equal(a.json?.error?.code, 'store_unavailable')
    t.match(a.json?.error?.message, /cannot be reached/, 'says why')
  }

  cut = false
  const after = await h.call('POST', '/v1/keys', { body: { name: 'after', type: 'user' } })
  t.equal(after.status, 201, 'answers again once the store is back')
  const names = (await h.call('GET', '/v1/keys?limit=10')).json.items.map((k: { name: string }) => k.name)
  t.ok(names.includes('before') && names.includes('after') && !names.includes('during'), 'nothing half-written meanwhile')
})

t.test('an unknown id or ref echoed in a refusal has its invisible format characters escaped, as every refused value is (found by a review)', async (t) => {
  // Before: `no key has the id "\u202ex"` came back with the bidi override itself, which a client
  // printing the message showed reversed, though a refused name is shown `\u202e`.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  for (const [method, path, code] of [
    ['GET', '/v1/keys/%E2%80%AEx', 'key_not_found'],
    ['GET', '/v1/webhooks/%E2%80%AEx', 'webhook_not_found'],
    ['DELETE', '/v1/deny-list/%E2%80%AEx%C2%85', 'deny_entry_not_found'],
    ['POST', '/v1/anomalies/%E2%80%AEx/ack', 'anomaly_not_found'],
  ] as const) {
    const a = await h.call(method, path)
    t.equal(a.json?.error?.code, code, `${method} ${path}: ${code}`)
    t.notMatch(a.text, /[\u202e\u0085]/, `${method} ${path}: no format or C1 character in the answer as sent`)
    t.match(a.json?.error?.message, /\u202e/, `${method} ${path}: the same message once the JSON is read`)
  }
})

t.test('a query value percent-encoding bytes that are not UTF-8 is refused naming its parameter, not searched for as U+FFFD (found by a review)', async (t) => {
  // Before: `name=%ff` was read as "\ufffd" and answered 200 with no keys, `actor=%C0%AE` (an
  // overlong `.`) as "\ufffd\ufffd"; a path holding the same bytes is refused.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  for (const [path, field] of [
    ['/v1/keys?name=%ff', 'name'],
    ['/v1/keys?limit=5&owner=a%C3', 'owner'],
    ['/v1/audit?actor=%C0%AE', 'actor'],
    ['/v1/keys?na%ffme=x', 'na\ufffdme'],
  ] as const) {
    const a = await h.call('GET', path)
    t.equal(a.status, 400, `${path}: 400`)
    t.equal(a.json?.error?.code, 'validation_failed', `${path}: validation_failed`)
    t.match(a.json?.error?.details?.fields, [{ field, message: /not UTF-8/ }], `${path}: ${field} named`)
    t.equal(a.json?.error?.details?.fields?.length, 1, `${path}: one field named`)
  }
  // UTF-8 as it should be, and `+` for a space, are read as before.
  const made = await h.call('POST', '/v1/keys', { body: { name: 'caf\u00e9 au lait', type: 'user' } })
  t.equal(made.status, 201)
  const found = await h.call('GET', '/v1/keys?name=caf%C3%A9+au')
  t.equal(found.status, 200)
  t.same(found.json.items.map((k: { id: string }) => k.id), [made.json.id], 'found by a name in UTF-8')
})

t.test('a refusal names the bad fields of the body and the bad query parameters together, as every bad field is named (found by a review)', async (t) => {
  // Before: the body's problems alone, and the unknown query parameter only once they were
  // corrected, a second round trip for what one answer could have said.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const a = await h.call('POST', '/v1/keys?dry_run=true', { body: { name: 5 } })
  t.equal(a.status, 400)
  t.equal(a.json?.error?.code, 'validation_failed')
  t.same((a.json?.error?.details?.fields as Array<{ field: string }>).map((f) => f.field).sort(), ['dry_run', 'name', 'type'], 'the body fields and the query parameter')
  t.match(a.json?.error?.message, /dry_run: unknown query parameter/)
  const made = await h.call('POST', '/v1/keys', { body: { name: 'one', type: 'user' } })
  const b = await h.call('POST', `/v1/keys/${made.json.id as string}/revoke?limit=abc`, { body: { reason: '' } })
  t.same((b.json?.error?.details?.fields as Array<{ field: string }>).map((f) => f.field), ['reason', 'limit'])
  t.equal((await h.call('GET', `/v1/keys/${made.json.id as string}`)).json.status, 'active', 'nothing revoked')
  // Still at most 20 named, then `more`.
  const many = Object.fromEntries(Array.from({ length: 25 }, (_, i) => [`x${i}`, 1]))
  const c = await h.call('POST', '/v1/keys?y=1', { body: { name: 'n', type: 'user', ...many } })
  t.equal(c.json?.error?.details?.fields.length, 20)
  t.equal(c.json?.error?.details?.more, true)
  t.match(c.json?.error?.message, /and more \(the first 20 problems are listed\)$/)
})

t.test('an unknown query parameter is named as one, whole, with those the operation takes (found by a review)', async (t) => {
  // Before: `foo: unknown key; allowed here: ...`, the configuration file's word, which on
  // /v1/keys reads as an API key; `type[]` was named `type...` "(the rest of the key is not
  // shown)", as a YAML key holding a secret is.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const fieldsOf = async (path: string) => {
    const a = await h.call('GET', path)
    t.equal(a.status, 400, `${path}: 400`)
    t.equal(a.json?.error?.message, (a.json?.error?.details?.fields as Array<{ field: string; message: string }>).map((f) => `${f.field}: ${f.message}`).join('; '), `${path}: the message lists the fields`)
    return a.json?.error?.details?.fields as Array<{ field: string; message: string }>
  }
  const keysQuery = 'unknown query parameter; allowed here: type, status, owner, scope, name, legacy, limit, cursor'
  for (const name of ['foo', 'type[]', '__proto__']) t.same(await fieldsOf(`/v1/keys?${name}=1`), [{ field: name, message: keysQuery }], `${name}: named whole as a query parameter`)
  t.same(await fieldsOf('/v1/webhooks?limit=5'), [{ field: 'limit', message: 'unknown query parameter; this operation takes none' }], 'an operation that takes none says so')
  // With a known parameter's problem, both named.
  t.same((await fieldsOf('/v1/keys?limit=0&sort=name')).map((f) => f.field).sort(), ['limit', 'sort'])
})

t.test('every webhook operation names the unknown id it was given, deleting and rotating a secret too (found by a review)', async (t) => {
  // Before: DELETE and rotate-secret said "no webhook has this id", the others which.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const id = 'wh_AAAAAAAAAAAAAAAA'
  for (const [method, path] of [['GET', ''], ['DELETE', ''], ['POST', '/rotate-secret'], ['POST', '/test'], ['GET', '/deliveries']] as const) {
    const a = await h.call(method, `/v1/webhooks/${id}${path}`)
    t.equal(a.status, 404, `${method} ${path}: 404`)
    t.equal(a.json?.error?.message, `no webhook has the id "${id}"`, `${method} ${path}: names the id`)
  }
})

t.test('a body starting with a byte order mark is refused saying so, not as an unexpected token no one can see (found by a review)', async (t) => {
  // RFC 8259 §8.1: JSON sent over a network has none (Windows PowerShell 5.1 writes one with
  // -Encoding UTF8). Before: "at line 1, column 1: Unexpected token", of a character no editor shows.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const a = await h.call('POST', '/v1/keys', { raw: '\ufeff{"name":"bom","type":"user"}', headers: json })
  t.equal(a.status, 400)
  t.equal(a.json?.error?.code, 'bad_request')
  t.match(a.json?.error?.message, /^the body is not valid JSON \(at line 1, column 1: a byte order mark \(U\+FEFF\)/)
  t.same((await h.call('GET', '/v1/keys?name=bom')).json.items, [], 'nothing made')
})

t.test('a body of a byte order mark or other Unicode space alone is no empty body: refused, the key left as it was (found by a review)', async (t) => {
  // Only JSON's own whitespace (RFC 8259 §2: space, tab, CR, LF) makes a body empty. Before, a
  // body of "\ufeff" or a no-break space was read as none, and the revoke it came with went ahead.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const made = await h.call('POST', '/v1/keys', { body: { name: 'kept', type: 'user' } })
  for (const [what, raw] of [['a byte order mark', '\ufeff'], ['a no-break space', '\u00a0'], ['an ideographic space', '\u3000'], ['a byte order mark amid JSON whitespace', ' \ufeff\n']] as const) {
    const a = await h.call('POST', `/v1/keys/${made.json.id as string}/revoke`, { raw, headers: json })
    t.equal(a.status, 400, `${what}: 400`)
    t.equal(a.json?.error?.code, 'bad_request')
    t.match(a.json?.error?.message, /^the body is not valid JSON/)
  }
  t.equal((await h.call('GET', `/v1/keys/${made.json.id as string}`)).json.status, 'active', 'the key is not revoked')
  const other = await h.call('POST', '/v1/keys', { body: { name: 'revoked', type: 'user' } })
  const empty = await h.call('POST', `/v1/keys/${other.json.id as string}/revoke`, { raw: ' \t\r\n', headers: json })
  t.equal(empty.status, 200, "JSON's own whitespace alone is still no body")
})

t.test('a 201 that made a key or a webhook says where it is (Location), as the document does (found by a review)', async (t) => {
  // RFC 9110 §15.3.2: without Location, a 201 names its target URI (the collection) as what it
  // made. Before: none, and a client composed the key's URL itself.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db, { config: { webhooks: { allow_private: ['127.0.0.1/32'] } } })
  const doc = (await h.call('GET', '/openapi.json')).json
  for (const [path, body] of [
    ['/v1/keys', { name: 'located', type: 'user' }],
    ['/v1/webhooks', { url: 'http://127.0.0.1:9/hook', events: ['key.created'] }],
  ] as const) {
    const made = await h.call('POST', path, { body })
    t.equal(made.status, 201, `${path}: 201`)
    t.equal(made.headers.location, `${path}/${made.json.id as string}`, `${path}: Location names what was made`)
    const there = await h.call('GET', made.headers.location as string)
    t.equal(there.json?.id, made.json.id, `${path}: and GET there reads it`)
    t.ok(doc.paths[path].post.responses['201'].headers.Location, `${path}: the document lists Location on its 201`)
  }
  // Not where nothing addressable was made, nor on the other answers.
  const listed = await h.call('GET', '/v1/keys')
  t.equal(listed.headers.location, undefined, 'no Location on a list')
})

t.test('a query parameter refused for its bytes or for being repeated is named as an unknown one is, cut past 120 characters (found by a review)', async (t) => {
  // Before: named whole, up to the 16 KiB of a request's head, where an unknown name is cut.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const long = 'a'.repeat(200)
  for (const [what, path, message] of [
    ['not UTF-8', `/v1/keys?${long}%ff=1`, /not UTF-8/],
    ['repeated', `/v1/keys?${long}=1&${long}=2`, /given more than once/],
    ['a NUL', `/v1/keys?${long}%00=1`, /NUL/],
  ] as const) {
    const a = await h.call('GET', path)
    t.equal(a.status, 400, `${what}: 400`)
    t.match(a.json?.error?.details?.fields, [{ field: /^a{117}\.\.\. \(20[01] characters\)$/, message }], `${what}: the name cut`)
    t.equal(a.json?.error?.details?.fields?.length, 1, `${what}: one field named`)
  }
})

t.test('every bad query parameter is named in one answer, whatever is wrong with each (found by a review)', async (t) => {
  // Before: a parameter that was no whole number, no true or false, repeated, or not UTF-8 was
  // refused by itself, and the others named only once it was corrected; `limit=0&sort=name`
  // named both, `limit=abc&sort=name` limit alone.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  for (const [path, fields] of [
    ['/v1/keys?limit=abc&sort=name', ['limit', 'sort']],
    ['/v1/keys?legacy=maybe&limit=abc', ['legacy', 'limit']],
    ['/v1/keys?name=%ff&owner=%fe', ['name', 'owner']],
    ['/v1/keys?name=a&name=b&limit=x&status=gone', ['limit', 'name', 'status']],
    ['/v1/deny-list?include_expired=1&x=%00', ['include_expired', 'x']],
  ] as const) {
    const a = await h.call('GET', path)
    t.equal(a.status, 400, `${path}: 400`)
    const named = (a.json?.error?.details?.fields as Array<{ field: string; message: string }> | undefined) ?? []
    t.same(named.map((f) => f.field).sort(), fields, `${path}: each named`)
    t.equal(a.json?.error?.message, named.map((f) => `${f.field}: ${f.message}`).join('; '), `${path}: the message lists them`)
  }
})

t.test('a number that would not be stored as written is named by a field cut past 120 characters, as every field is (found by a review)', async (t) => {
  // Before: the member's name was shown whole, in the message and in details.fields: a nested
  // metadata member of 100,000 characters holding 1e309 was answered with 200 KB.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db, { config: { admin: { max_body_bytes: 1_000_000 } } })
  const long = 'x'.repeat(100_000)
  const json = { 'content-type': 'application/json' }
  for (const [what, path, body, field] of [
    ['in a key\'s metadata', '/v1/keys', `{"name":"n","type":"user","metadata":{"a":{"${long}":1e309}}}`, /^metadata\.a\.x{106}\.\.\. \(100011 characters\)$/],
    ['in an import row', '/v1/keys/import', `{"rows":[{"key_hash":"${'a'.repeat(64)}","name":"n","metadata":{"${long}":12345678901234567891}}]}`, /^rows\[0\]\.metadata\.x{100}\.\.\. \(100017 characters\)$/],
  ] as const) {
    const a = await h.call('POST', path, { raw: body, headers: json })
    t.equal(a.json?.error?.code, 'validation_failed', `${what}: validation_failed`)
    t.match(a.json?.error?.details?.fields, [{ field }], `${what}: the field cut, its length told`)
    t.ok(a.text.length < 2000, `${what}: a short answer (${a.text.length} characters)`)
  }
})

t.test('a member named with a lone surrogate is named well-formed in the refusal, as one holding one is (found by a review)', async (t) => {
  // Before: an unknown or repeated member was named as sent, and the answer's JSON held \ud800,
  // which strict decoders refuse and Python decodes into text it cannot print.
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const json = { 'content-type': 'application/json' }
  for (const [what, path, body, field] of [
    ['an unknown member', '/v1/keys', '{"name":"n","type":"user","\\ud800":1}', '\ufffd'],
    ['a repeated member', '/v1/keys', '{"name":"n","type":"user","metadata":{"a\\udc00":1,"a\\udc00":2}}', 'metadata.a\ufffd'],
    ['an unknown query parameter beside it', '/v1/keys?x=1', '{"name":"n","type":"user","b\\ud83d":1}', 'b\ufffd'],
  ] as const) {
    const a = await h.call('POST', path, { raw: body, headers: json })
    t.equal(a.json?.error?.code, 'validation_failed', `${what}: validation_failed`)
    const fields = (a.json?.error?.details?.fields ?? []) as Array<{ field: string; message: string }>
    t.ok(fields.some((f) => f.field === field), `${what}: named ${JSON.stringify(field)}`)
    t.ok([a.json?.error?.message, ...fields.flatMap((f) => [f.field, f.message])].every((s) => typeof s === 'string' && s.isWellFormed()), `${what}: no lone surrogate in the answer`)
  }
})

t.test('the query is read in one pass: each name once, in the order first given, with all its values in order, as new Set(keys()) and getAll() read it (found by a review)', async (t) => {
  // Before: getAll() per distinct name, a walk of every parameter each, so a query of n distinct
  // names cost n² (bench/admin-query.ts).
  const { parametersByName } = await import('../admin/api.ts')
  const reference = (params: URLSearchParams) => new Map([...new Set(params.keys())].map((name) => [name, params.getAll(name)]))
  const alphabet = ['a', 'b', '=', '&', '%61', '+']
  let texts = ['']
  let checked = 0
  const differ: string[] = []
  for (let length = 1; length <= 5; length++) {
    texts = texts.flatMap((text) => alphabet.map((c) => text + c))
    for (const text of texts) {
      const params = new URLSearchParams(text)
      if (!isDeepStrictEqual([...parametersByName(params)], [...reference(params)])) differ.push(text)
      checked++
    }
  }
  t.same(differ.slice(0, 5), [], 'no query read otherwise')
  t.ok(checked > 5000, `${checked} queries read alike`)
  const params = new URLSearchParams([...Array.from({ length: 3000 }, (_, i) => `x${i}=${i}`), 'x7=again', '__proto__=p', 'constructor=c'].join('&'))
  t.strictSame([...parametersByName(params)], [...reference(params)], 'a long query with a repeated name, __proto__ and constructor')
})

t.test('a query of thousands of unknown parameters is refused naming the first 20, a repeated one first (found by a review)', async (t) => {
  const { db } = await openStore(t, 'embedded')
  const h = await startAdmin(t, db)
  const names = Array.from({ length: 1500 }, (_, i) => `q${i}`)
  const a = await h.call('GET', `/v1/keys?q3=again&${names.map((n) => `${n}=1`).join('&')}`)
  t.equal(a.status, 400)
  const fields = a.json?.error?.details?.fields as Array<{ field: string; message: string }>
  // The repeated one first (found as the names are read), then the unknown ones in the order first given.
  t.same(fields.map((f) => f.field), ['q3', ...names.filter((n) => n !== 'q3').slice(0, 19)], 'the first 20, in the order named')
  t.match(fields[0], { field: 'q3', message: 'is given more than once' })
  t.match(fields[1], { field: 'q0', message: /^unknown query parameter; allowed here: / })
  t.equal(a.json?.error?.details?.more, true)
})
