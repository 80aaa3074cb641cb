// The fake Gitea itself, driven directly over HTTP: the behaviours GITEA.md describes that
// keygate's own calls never provoke (a missing name, several tokens sharing a name, a token
// header on the token routes, paging limits), and every answer checked against the excerpt.
import t from 'tap'
import { FakeGitea, goParseInt } from './helpers/fake-gitea.ts'
import { checkAgainstSwagger } from './helpers/gitea-swagger.ts'

const fake = new FakeGitea()
await fake.start()
t.teardown(() => fake.stop())
fake.addUser('alice', 'alice-pw')
fake.addUser('bob', 'bob-pw')
const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`
const alice = basic('alice', 'alice-pw')

async function call(method: string, path: string, authorization?: string, body?: unknown) {
  const res = await fetch(`${fake.url}/api/v1${path}`, {
    method,
    headers: { ...(authorization ? { authorization } : {}), ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  })
  const text = await res.text()
  return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : undefined }
}

t.test('version and the current user', async (t) => {
  t.match(await call('GET', '/version'), { status: 200, body: { version: /^\d+\.\d+\.\d+$/ } })
  t.match(await call('GET', '/user', alice), { status: 200, body: { login: 'alice', is_admin: false } })
  t.match(await call('GET', '/user'), { status: 401 })
  t.match(await call('GET', '/user', 'token 0000000000000000000000000000000000000000'), { status: 401 })
})

t.test('token routes: Basic auth only, the user itself', async (t) => {
  const made = await call('POST', '/users/alice/tokens', alice, { name: 'first', scopes: ['write:user'] })
  t.equal(made.status, 201)
  t.same(made.body.scopes, ['write:user'])
  t.match(await call('GET', '/users/alice/tokens', `token ${made.body.sha1}`), { status: 401, body: { message: 'auth required' } }, 'a token header alone is not enough')
  t.match(await call('GET', '/users/alice/tokens', basic('alice', made.body.sha1)), { status: 200 }, 'a token as the Basic password, with a user scope')
  const narrow = await call('POST', '/users/alice/tokens', alice, { name: 'narrow', scopes: ['read:repository'] })
  t.match(await call('GET', '/users/alice/tokens', basic('alice', narrow.body.sha1)), { status: 403 }, "then checked against that token's scopes")
  t.match(await call('GET', '/user', basic('alice', narrow.body.sha1)), { status: 403, body: { message: /required=\[read:user\]/ } }, 'on /user too (before: 200)')
  t.match(await call('GET', '/user', `token ${narrow.body.sha1}`), { status: 403 }, 'as with the token header')
  t.match(await call('GET', '/users/alice/tokens', basic('alice', 'wrong')), { status: 401 })
  t.match(await call('GET', '/users/bob/tokens', alice), { status: 403, body: { message: 'doer should be the site admin or be same as the contextUser' } }, "another user's tokens")
  t.match(await call('GET', '/users/nobody/tokens', alice), { status: 404 })
})

t.test('token routes: a token header with a token Gitea does not know is 401, before the user or the doer is looked at', async (t) => {
  // GITEA.md: a token header alone gets 401 on the token routes, and a wrong token 401 on /user.
  // Before (found by a review), the fake answered 403 (no doer) or 404 (no such user).
  const unknown = 'token 0123456789012345678901234567890123456789'
  for (const [method, path] of [['GET', '/users/alice/tokens'], ['POST', '/users/alice/tokens'], ['DELETE', '/users/alice/tokens/1'], ['GET', '/users/bob/tokens'], ['GET', '/users/nobody/tokens']] as const) {
    t.match(await call(method, path, unknown, method === 'POST' ? { name: 'x', scopes: ['read:user'] } : undefined), { status: 401 }, `${method} ${path}`)
  }
  t.match(await call('GET', '/users/alice/tokens', 'bearer 0123456789012345678901234567890123456789'), { status: 401 }, 'as a bearer token too')
  t.notOk(fake.tokens.some((x) => x.name === 'x'), 'nothing was made')
})

t.test("token routes: checked in Gitea's order, the user (404), self or admin (403), then Basic auth (401)", async (t) => {
  // routers/api/v1/api.go: UserAssignmentAPI, then reqSelfOrAdmin, then reqBasicOrRevProxyAuth.
  // Before, the fake asked for Basic auth first: 401 to each of these.
  const own = await call('POST', '/users/alice/tokens', alice, { name: 'order', scopes: ['write:user'] })
  const selfOrAdmin = { status: 403, body: { message: 'doer should be the site admin or be same as the contextUser' } }
  t.match(await call('GET', '/users/alice/tokens'), selfOrAdmin, 'no credentials: no doer')
  t.match(await call('GET', '/users/bob/tokens', `token ${own.body.sha1}`), selfOrAdmin, "alice's token header on bob's tokens")
  t.match(await call('DELETE', '/users/bob/tokens/1', `token ${own.body.sha1}`), selfOrAdmin, 'on delete too')
  t.match(await call('GET', '/users/nobody/tokens'), { status: 404 }, 'no credentials, no such user')
  t.match(await call('GET', '/users/nobody/tokens', `token ${own.body.sha1}`), { status: 404 }, 'a token header, no such user')
  t.match(await call('GET', '/users/alice/tokens', `token ${own.body.sha1}`), { status: 401, body: { message: 'auth required' } }, 'the user itself by token header: Basic is asked for last')
  fake.addUser('root', 'root-pw', { is_admin: true })
  const admin = await call('POST', '/users/root/tokens', basic('root', 'root-pw'), { name: 'admin', scopes: ['write:user'] })
  t.match(await call('GET', '/users/bob/tokens', `token ${admin.body.sha1}`), { status: 401, body: { message: 'auth required' } }, "a site admin's token header on another user's tokens")
  const narrow = await call('POST', '/users/alice/tokens', alice, { name: 'order-narrow', scopes: ['read:repository'] })
  t.match(await call('GET', '/users/nobody/tokens', `token ${narrow.body.sha1}`), { status: 403, body: { message: /required=\[read:user\]/ } }, 'the scope check comes first of all')
  t.match(await call('GET', '/users/nobody/tokens', basic('alice', 'wrong')), { status: 401 }, 'a wrong password fails at sign-in, before the user')
  for (const id of [own.body.id, narrow.body.id]) t.equal((await call('DELETE', `/users/alice/tokens/${id}`, alice)).status, 204)
  t.equal((await call('DELETE', `/users/root/tokens/${admin.body.id}`, basic('root', 'root-pw'))).status, 204)
})

t.test('create: 422 without a name, 400 on a duplicate, an unknown or no scope; normalised scopes', async (t) => {
  t.match(await call('POST', '/users/alice/tokens', alice, { scopes: ['read:user'] }), { status: 422, body: { message: '[Name]: Required' } })
  t.match(await call('POST', '/users/alice/tokens', alice, { name: 'first', scopes: ['read:user'] }), { status: 400, body: { message: 'access token name has been used already' } })
  t.match(await call('POST', '/users/alice/tokens', alice, { name: 'x', scopes: ['read:everything'] }), { status: 400, body: { message: 'invalid access token scope provided: invalid access token scope: read:everything' } })
  t.match(await call('POST', '/users/alice/tokens', alice, { name: 'x', scopes: [] }), { status: 400, body: { message: 'access token must have a scope' } })
  const norm = await call('POST', '/users/alice/tokens', alice, { name: 'norm', scopes: ['read:issue', 'write:issue', 'read:issue'] })
  t.same(norm.body.scopes, ['write:issue'], 'write implies read; duplicates dropped')
  const every = ['activitypub', 'admin', 'misc', 'notification', 'organization', 'package', 'issue', 'repository', 'user'].map((c) => `write:${c}`)
  t.same((await call('POST', '/users/alice/tokens', alice, { name: 'every', scopes: every })).body.scopes, ['all'], 'every write:* is all')
})

t.test('list: limit capped at 50, X-Total-Count, no secret', async (t) => {
  for (let i = 0; i < 60; i++) fake.addToken('bob', `bulk-${i}`, ['read:user'])
  const bob = basic('bob', 'bob-pw')
  const first = await call('GET', '/users/bob/tokens?limit=100', bob)
  t.equal(first.body.length, 50, 'limit is capped at 50')
  t.equal(first.headers.get('x-total-count'), '60')
  t.match(first.headers.get('access-control-expose-headers'), /X-Total-Count/)
  t.equal((await call('GET', '/users/bob/tokens', bob)).body.length, 30, 'default page size 30')
  t.equal((await call('GET', '/users/bob/tokens?page=2&limit=50', bob)).body.length, 10)
  t.ok(first.body.every((x: { sha1: string }) => x.sha1 === ''), 'sha1 is empty in lists')
  t.same(first.body.slice(0, 2).map((x: { name: string }) => x.name), ['bulk-59', 'bulk-58'], 'newest first, as Gitea orders them (created_unix DESC)')
})

t.test('list: tokens made in the same second are ordered as PostgreSQL leaves ties, so pages can overlap', async (t) => {
  // As PostgreSQL pages Gitea's access_token table: 130 tokens at 40 a second, read in pages of
  // 50, gave 130 rows with fewer distinct ids, the same on every walk.
  fake.addUser('carol', 'carol-pw')
  const carol = basic('carol', 'carol-pw')
  fake.tokensPerSecond = 40
  fake.nextSecond()
  t.teardown(() => {
    fake.tokensPerSecond = 1
  })
  const fillers = Array.from({ length: 15 }, (_, i) => fake.addToken('bob', `filler-${i}`, ['read:user']).id) // carol's seconds begin mid-page
  const made = Array.from({ length: 130 }, (_, i) => fake.addToken('carol', `tied-${i}`, ['read:user']).id)
  const walk = async (limit: number) => {
    const ids: number[] = []
    for (let page = 1; (page - 1) * limit < 130; page++) {
      const res = await call('GET', `/users/carol/tokens?page=${page}&limit=${limit}`, carol)
      t.equal(res.headers.get('x-total-count'), '130')
      ids.push(...res.body.map((x: { id: number }) => x.id))
    }
    return ids
  }
  const fifty = await walk(50)
  t.equal(fifty.length, 130, 'every row is read')
  t.ok(new Set(fifty).size < 130, `but a tie is listed twice and another not at all (${new Set(fifty).size} distinct)`)
  t.same(await walk(50), fifty, 'the same on every walk')
  t.same(fifty.slice(0, 25).sort((a, b) => a - b), made.slice(105), 'the newest second first, whatever the order within it')
  const merged = new Set([...fifty, ...(await walk(37))])
  t.ok(merged.size > new Set(fifty).size, 'pages of another size split the ties elsewhere: two walks together list more')
  for (const id of [...made, ...fillers]) fake.removeToken(id)
})

t.test('delete: by id, then by name; 404 and 422 as Gitea answers', async (t) => {
  const one = fake.addToken('alice', 'twin', ['read:user'])
  fake.addToken('alice', 'twin', ['read:user'])
  t.match(await call('DELETE', '/users/alice/tokens/twin', alice), { status: 422, body: { message: "multiple matches for token name 'twin'" } })
  t.match(await call('DELETE', `/users/alice/tokens/${one.id}`, alice), { status: 204, body: undefined })
  t.match(await call('DELETE', '/users/alice/tokens/twin', alice), { status: 204 }, 'one match left: deleted by name')
  t.match(await call('DELETE', '/users/alice/tokens/twin', alice), { status: 404 })
  t.match(await call('DELETE', '/users/alice/tokens/999999', alice), { status: 404 })
  const bobs = fake.tokens.find((x) => x.owner === 'bob') as { id: number }
  t.match(await call('DELETE', `/users/alice/tokens/${bobs.id}`, alice), { status: 404 }, "another user's token id")
})

t.test('user names ignore case, in Basic auth and in the path (Gitea looks up lower_name)', async (t) => {
  t.match(await call('GET', '/user', basic('ALICE', 'alice-pw')), { status: 200, body: { login: 'alice' } })
  t.match(await call('GET', '/users/Alice/tokens', alice), { status: 200 })
  t.match(await call('GET', '/users/alice/tokens', basic('Alice', 'alice-pw')), { status: 200 }, 'the caller is the user itself whatever the case')
  const made = await call('POST', '/users/ALICE/tokens', basic('aLiCe', 'alice-pw'), { name: 'cased', scopes: ['read:user'] })
  t.equal(made.status, 201)
  t.match(await call('DELETE', `/users/Alice/tokens/${made.body.id}`, alice), { status: 204 })
})

t.test('a user barred from signing in: 403 with the account state on every call', async (t) => {
  const prohibited = 'This account is prohibited from signing in, please contact your site administrator.'
  const eve = fake.addUser('eve', 'eve-pw', { prohibit_login: true })
  const tok = fake.addToken('eve', 'eves', ['write:user'])
  const narrow = fake.addToken('eve', 'narrow', ['read:repository'])
  t.match(await call('GET', '/user', `token ${tok.sha1}`), { status: 403, body: { message: prohibited } })
  t.match(await call('GET', '/user', `token ${narrow.sha1}`), { status: 403, body: { message: prohibited } }, 'before the scope check')
  t.match(await call('GET', '/users/eve/tokens', basic('eve', tok.sha1)), { status: 403, body: { message: prohibited } }, 'a token as the Basic password')
  t.match(await call('GET', '/version', `token ${tok.sha1}`), { status: 403 }, 'any API call')
  t.match(await call('GET', '/user', basic('eve', 'eve-pw')), { status: 401, body: { message: /^user is not allowed login/ } }, "a suspended user's password fails the sign-in itself")
  eve.prohibit_login = false
  eve.active = false
  t.match(await call('GET', '/users/eve/tokens', basic('eve', 'eve-pw')), { status: 403, body: { message: prohibited } }, 'inactive: prohibited')
  eve.active = true
  eve.must_change_password = true
  t.match(await call('GET', '/user', basic('eve', 'eve-pw')), { status: 403, body: { message: `You must change your password. Change it at: ${fake.url}/user/change_password` } })
  eve.must_change_password = false
  t.match(await call('GET', '/user', `token ${tok.sha1}`), { status: 200, body: { login: 'eve', active: true, prohibit_login: false } })

  const confirming = new FakeGitea({ registerEmailConfirm: true })
  await confirming.start()
  t.teardown(() => confirming.stop())
  confirming.addUser('new', 'new-pw', { active: false })
  const r = await fetch(`${confirming.url}/api/v1/user`, { headers: { authorization: basic('new', 'new-pw') } })
  t.same({ status: r.status, body: await r.json() }, { status: 403, body: { message: 'This account is not activated.' } }, 'with REGISTER_EMAIL_CONFIRM: not activated')
  checkAgainstSwagger(t, confirming.responses)
})

t.test("delete: the reference is parsed as Go's strconv.ParseInt(ref, 0, 64)", async (t) => {
  t.equal(goParseInt('12'), 12n)
  t.equal(goParseInt('010'), 8n, 'a leading 0 is octal')
  t.equal(goParseInt('0x1f'), 31n)
  t.equal(goParseInt('0X1F'), 31n)
  t.equal(goParseInt('0o17'), 15n)
  t.equal(goParseInt('0b101'), 5n)
  t.equal(goParseInt('+7'), 7n)
  t.equal(goParseInt('-7'), -7n)
  t.equal(goParseInt('0x_1_0'), 16n, 'underscores after a prefix')
  t.equal(goParseInt('1_000'), 1000n, 'and between decimal digits')
  t.equal(goParseInt('0_7'), 7n, "and after an octal literal's leading 0")
  for (const bad of ['', '0', '_1', '1__0', '08', '0x', '1e3', 'abc', '0x1__0', '0x10_', ' 1']) t.equal(goParseInt(bad), 0n, JSON.stringify(bad))
  t.equal(goParseInt('99999999999999999999'), (1n << 63n) - 1n, 'out of range: the bound (its error ignored)')
  const a = fake.addToken('alice', 'hex', ['read:user'])
  t.match(await call('DELETE', `/users/alice/tokens/0x${a.id.toString(16)}`, alice), { status: 204 }, 'hex id')
  const b = fake.addToken('alice', 'octal', ['read:user'])
  t.match(await call('DELETE', `/users/alice/tokens/0${b.id.toString(8)}`, alice), { status: 204 }, 'octal id')
  t.notOk(fake.tokens.some((x) => x.id === a.id || x.id === b.id))
  fake.addToken('alice', '1__0', ['read:user'])
  t.match(await call('DELETE', '/users/alice/tokens/1__0', alice), { status: 204 }, 'not a number to Go: by name')
  t.match(await call('DELETE', '/users/alice/tokens/99999999999999999999', alice), { status: 404 })
})

t.test('every answer matches the swagger excerpt', async (t) => {
  checkAgainstSwagger(t, fake.responses)
})
