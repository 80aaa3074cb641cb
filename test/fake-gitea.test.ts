// The fake Gitea itself, driven directly over HTTP: the behaviours GITEA.md describes that
// keygate's own calls never provoke (a missing name, several tokens sharing a name, a token
// header on the token routes, paging limits), those Gitea's source settles where GITEA.md says no
// more (how a request signs in, the order of the scopes, how `page` and `limit` are read), and
// every answer checked against the excerpt.
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
  // UserAssignmentAPI's ctx.Error: LookupUserRedirect's error (the name lower-cased), and no
  // `errors` (ctx.NotFound's own).
  const nobody = await call('GET', '/users/NoBody/tokens', alice)
  t.same({ status: nobody.status, body: nobody.body }, { status: 404, body: { message: 'user redirect does not exist [name: nobody]', url: `${fake.url}/api/swagger` } })
})

t.test("Basic: a token as the password, or as the user name, signs in as the token's owner, whatever name the header gives", async (t) => {
  // services/auth/basic.go (Basic.Verify): the token is looked up by itself, and only otherwise are
  // the name and password signed in with. Before, the fake required the name to be the owner's.
  const tok = fake.addToken('alice', 'basic-owner', ['write:user'])
  const asAlice = [
    ['bob', tok.sha1, "bob's name, alice's token"],
    ['nobody', tok.sha1, 'a name no user has'],
    [tok.sha1, '', 'the token as the user name, no password'],
    [tok.sha1, 'x-oauth-basic', 'the token as the user name, x-oauth-basic as the password'],
  ] as const
  for (const [name, password, what] of asAlice) t.match(await call('GET', '/user', basic(name, password)), { status: 200, body: { login: 'alice' } }, what)
  t.match(await call('GET', '/users/alice/tokens?page=1', basic('bob', tok.sha1)), { status: 200 }, "alice's tokens: the doer is alice, signed in by Basic")
  t.match(await call('GET', '/users/bob/tokens?page=1', basic('bob', tok.sha1)), { status: 403, body: { message: 'doer should be the site admin or be same as the contextUser' } }, "bob's tokens: the doer is not bob")
  // Otherwise Gitea's UserSignIn: the login name or the e-mail address, trimmed, in any case.
  t.match(await call('GET', '/user', basic('alice@example.test', 'alice-pw')), { status: 200, body: { login: 'alice' } }, 'the e-mail address')
  t.match(await call('GET', '/user', basic(' ALICE@Example.TEST ', 'alice-pw')), { status: 200, body: { login: 'alice' } }, 'the address trimmed, any case')
  t.match(await call('GET', '/user', basic(' alice ', 'alice-pw')), { status: 200, body: { login: 'alice' } }, 'the login name trimmed')
  t.match(await call('GET', '/user', basic('Alice', 'wrong')), { status: 401, body: { message: "user's password is invalid [uid: 1, name: alice]" } }, 'a wrong password (ErrUserPasswordInvalid, Gitea 1.20 on)')
  t.match(await call('GET', '/user', basic('nobody', 'pw')), { status: 401, body: { message: 'user does not exist [uid: 0, name: nobody]' } }, 'an unknown user')
  t.match(await call('GET', '/user', basic('nobody@example.test', 'pw')), { status: 401, body: { message: 'Email address does not exist [email: nobody@example.test]' } }, 'an unknown address')
  const other = `${tok.sha1.slice(0, -1)}${tok.sha1.endsWith('0') ? '1' : '0'}`
  t.match(await call('GET', '/user', basic(other, '')), { status: 401, body: { message: `user does not exist [uid: 0, name: ${other}]` } }, 'an unknown token as the user name is then a user name')
  fake.removeToken(tok.id)
})

t.test('the token header: `token` in lower case only, or `bearer` in any case, fields split as Go splits them', async (t) => {
  // services/auth/oauth2.go (parseToken): strings.Fields, exactly two fields. Before, the fake
  // took any case of `token` too, and JavaScript's white space rather than Go's.
  const tok = fake.addToken('alice', 'header-case', ['read:user'])
  const unknown = '0123456789012345678901234567890123456789'
  for (const scheme of ['token', 'bearer', 'Bearer', 'BEARER']) t.match(await call('GET', '/user', `${scheme} ${tok.sha1}`), { status: 200, body: { login: 'alice' } }, scheme)
  for (const scheme of ['Token', 'TOKEN']) {
    t.match(await call('GET', '/user', `${scheme} ${tok.sha1}`), { status: 401, body: { message: 'token is required' } }, `${scheme}: not a token header, nobody signed in`)
    t.match(await call('GET', '/version', `${scheme} ${unknown}`), { status: 200 }, `${scheme} with an unknown token: not read at all`)
  }
  t.match(await call('GET', '/user', `token\t \t${tok.sha1}`), { status: 200 }, 'any run of white space between the fields')
  t.match(await call('GET', '/user', `token ${tok.sha1} more`), { status: 401, body: { message: 'token is required' } }, 'three fields: not a token header')
  // Header bytes as Go decodes them: UTF-8 C2 A0 is a no-break space, a lone A0 byte is not.
  t.match(await call('GET', '/user', `token \u00c2\u00a0${tok.sha1}`), { status: 200 }, 'a UTF-8 no-break space is white space to Go')
  t.match(await call('GET', '/user', `token\u00a0${tok.sha1}`), { status: 401, body: { message: 'token is required' } }, 'a lone A0 byte is not: one field')
  fake.removeToken(tok.id)
})

t.test("a failed sign-in is 401 on every API route, /version included, with the failing method's error", async (t) => {
  // routers/api/v1/api.go (apiAuth) and services/auth/group.go: the error of the method that failed
  // when none signed in, before any route. Before, the fake answered /version with 200.
  const unknown = 'token 0123456789012345678901234567890123456789'
  const noUser = { status: 401, body: { message: 'user does not exist [uid: 0, name: ]', url: `${fake.url}/api/swagger` } }
  t.match(await call('GET', '/version', unknown), noUser, 'an unknown token')
  t.match(await call('GET', '/version', 'Bearer 0123456789012345678901234567890123456789'), noUser, 'an unknown bearer token')
  t.match(await call('GET', '/version', basic('alice', 'wrong')), { status: 401, body: { message: "user's password is invalid [uid: 1, name: alice]" } }, 'a wrong password (ErrUserPasswordInvalid, Gitea 1.20 on)')
  t.match(await call('GET', '/version', 'Basic !!!'), noUser, 'a Basic value that does not decode: an empty name')
  t.match(await call('GET', '/version'), { status: 200 }, 'no credentials: anyone may ask')
  t.match(await call('GET', '/user', unknown), noUser, 'GET /user: the same error')
  t.match(await call('GET', '/users/nobody/tokens', unknown), noUser, 'the token routes: the same error, before the user is looked up')
  // A route the fake does not know, on a fake of its own (the excerpt has no such operation).
  const other = new FakeGitea()
  await other.start()
  t.teardown(() => other.stop())
  t.equal((await fetch(`${other.url}/api/v1/repos/search`, { headers: { authorization: unknown } })).status, 401, 'an unknown route: the sign-in fails first')
  t.equal((await fetch(`${other.url}/api/v1/repos/search`)).status, 404, 'then it is not found')
})

t.test("what Gitea's routers answer themselves: an unknown API route, a method the route does not take, a path outside the API", async (t) => {
  // chi's defaults under the API's middleware (the API router sets no NotFound or MethodNotAllowed
  // handler): Go's http.NotFound text and a 405 with no body and an Allow line per method; outside
  // /api/v1, the web router's HTML 404 page. Before, the fake answered each with Gitea's JSON error.
  const raw = async (method: string, path: string, authorization?: string) => {
    const res = await fetch(`${fake.url}${path}`, { method, headers: authorization ? { authorization } : {} })
    return { status: res.status, type: res.headers.get('content-type'), allow: res.headers.get('allow'), body: await res.text() }
  }
  const before = fake.responses.length
  t.same(await raw('GET', '/api/v1/repos/search', alice), { status: 404, type: 'text/plain; charset=utf-8', allow: null, body: '404 page not found\n' }, 'an unknown API route')
  t.same(await raw('GET', '/api/v1/users/alice/tokens/1/more', alice), { status: 404, type: 'text/plain; charset=utf-8', allow: null, body: '404 page not found\n' }, 'below a token route')
  for (const [method, path, allow] of [
    ['PUT', '/api/v1/users/alice/tokens', 'GET, POST'],
    ['DELETE', '/api/v1/users/alice/tokens', 'GET, POST'],
    ['GET', '/api/v1/users/alice/tokens/1', 'DELETE'],
    ['POST', '/api/v1/version', 'GET'],
    ['DELETE', '/api/v1/user', 'GET'],
  ] as const) {
    t.same(await raw(method, path, alice), { status: 405, type: null, allow, body: '' }, `${method} ${path}: no body, Allow ${allow}`)
  }
  const page = await raw('GET', '/api/users/alice/tokens')
  t.match(page, { status: 404, type: 'text/html; charset=utf-8', body: /^<!DOCTYPE html>[^]*Page Not Found/ }, 'outside /api/v1: the web 404 page')
  t.equal(fake.responses.length, before, 'none is recorded as an answer of an operation')
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

t.test("create: the body bound as Gitea's binding reads it (Content-Type, then Go's encoding/json): anything else is 422", async (t) => {
  // routers/api/v1/api.go's bind(): binding.Bind picks the reader by Content-Type (a POST without
  // one is "Empty Content-Type", one neither JSON nor a form "Unsupported Content-Type"), and
  // encoding/json refuses a field of the wrong type; either is 422 "<fields>: <error>" before the
  // handler. Before (found by a review of the integrations), the fake took a body of any type as
  // JSON, and made up a name or scopes of the wrong type (a string of scopes was none: 400; a
  // number among them an unknown scope: 400).
  const post = async (body: string | Uint8Array, headers: Record<string, string>) => {
    const res = await fetch(`${fake.url}/api/v1/users/alice/tokens`, { method: 'POST', headers: { authorization: alice, ...headers }, body })
    return { status: res.status, body: (await res.json()) as { message: string; name?: string; scopes?: string[]; id?: number } }
  }
  const bytes = (s: string) => new TextEncoder().encode(s)
  t.same((await post(bytes('{"name":"untyped","scopes":["read:user"]}'), {})).body.message, '[]: Empty Content-Type', 'no Content-Type')
  t.match(await post('{"name":"plain","scopes":["read:user"]}', { 'content-type': 'text/plain' }), { status: 422, body: { message: '[]: Unsupported Content-Type' } }, 'text/plain')
  const cases: Array<[string, string]> = [
    ['{"name":5,"scopes":["read:user"]}', '[]: json: cannot unmarshal number into Go struct field CreateAccessTokenOption.name of type string'],
    ['{"name":"typed","scopes":"read:user"}', '[]: json: cannot unmarshal string into Go struct field CreateAccessTokenOption.scopes of type []string'],
    ['{"name":"typed","scopes":["read:user",7]}', '[]: json: cannot unmarshal number into Go struct field CreateAccessTokenOption.scopes of type string'],
    ['["typed"]', '[]: json: cannot unmarshal array into Go value of type structs.CreateAccessTokenOption'],
  ]
  for (const [body, message] of cases) t.match(await post(body, { 'content-type': 'application/json' }), { status: 422, body: { message } }, body)
  t.match(await post('{"name":', { 'content-type': 'application/json' }), { status: 422, body: { message: /^\[\]: / } }, 'invalid JSON')
  t.match(await post('null', { 'content-type': 'application/json' }), { status: 422, body: { message: '[Name]: Required' } }, 'null: nothing decoded')
  t.notOk(fake.tokens.some((x) => ['untyped', 'plain', 'typed'].includes(x.name)), 'nothing was made')
  // What Go's decoder takes: a field name in any case, a null scope as "", unknown fields ignored;
  // and a form body, which binding.Bind reads by the fields' names.
  const folded = await post('{"NAME":"folded","Scopes":["read:user",null],"extra":1}', { 'content-type': 'application/json; charset=utf-8' })
  t.match(folded, { status: 201, body: { name: 'folded' } }, 'JSON as Go decodes it')
  // t.same: t.match of a list passes one holding more (the null read as a scope "" of its own).
  t.same(folded.body.scopes, ['read:user'], "JSON as Go decodes it: the null, read as \"\", is no scope Gitea's normalisation keeps")
  const form = await post('name=form+made&scopes=read:user&scopes=write:issue', { 'content-type': 'application/x-www-form-urlencoded' })
  t.match(form, { status: 201, body: { name: 'form made' } }, 'a form body')
  t.same(form.body.scopes, ['write:issue', 'read:user'], "a form body: both scopes, in Gitea's order")
  for (const made of [folded, form]) fake.removeToken(made.body.id as number)
})

t.test("a path with a malformed escape is Go's own 400, and the fake goes on", async (t) => {
  // Go's HTTP server refuses a request URI that url.ParseRequestURI cannot read before Gitea sees
  // it. Before, the fake's decodeURIComponent threw in its handler, an unhandled rejection that
  // ended the process running it.
  for (const path of ['/users/alice/tokens/%zz', '/users/%E0%A4%A/tokens']) {
    const res = await fetch(`${fake.url}/api/v1${path}`, { method: path.endsWith('%zz') ? 'DELETE' : 'GET', headers: { authorization: alice } })
    t.same({ status: res.status, type: res.headers.get('content-type'), body: await res.text() }, { status: 400, type: 'text/plain; charset=utf-8', body: '400 Bad Request' }, path)
  }
  // A well-formed escape of bytes that are no UTF-8 reaches Gitea: its name matches nothing.
  t.match(await call('DELETE', '/users/alice/tokens/%FF', alice), { status: 404 }, 'a token name of no UTF-8: not found')
  t.match(await call('GET', '/users/%FF/tokens', alice), { status: 404 }, 'a user name of no UTF-8: not found')
  t.match(await call('GET', '/users/alice/tokens?page=1', alice), { status: 200 }, 'still answering')
})

t.test("scopes: written back in Gitea's order, in the 201 and in the list alike", async (t) => {
  // models/auth/access_token_scope.go: normalised through a bitmap and written back in the order
  // of its list of all scopes. Before, the fake sorted them alphabetically.
  fake.addUser('frank', 'frank-pw')
  const frank = basic('frank', 'frank-pw')
  const cases = [
    [['read:user', 'write:issue', 'read:repository'], ['write:issue', 'read:repository', 'read:user']],
    [['read:user,write:admin', 'read:activitypub'], ['read:activitypub', 'write:admin', 'read:user']],
    [['all', 'public-only'], ['public-only', 'all']],
    [['write:user', 'public-only', 'read:package', 'write:package'], ['public-only', 'write:package', 'write:user']],
  ]
  for (const [i, [asked, stored]] of cases.entries()) {
    const made = await call('POST', '/users/frank/tokens', frank, { name: `order-${i}`, scopes: asked })
    t.same(made.body.scopes, stored, `${asked?.join(' ')}: the 201`)
    const listed = await call('GET', '/users/frank/tokens?page=1', frank)
    t.same(listed.body.find((x: { id: number }) => x.id === made.body.id)?.scopes, stored, `${asked?.join(' ')}: the list`)
  }
  t.match(await call('POST', '/users/frank/tokens', frank, { name: 'spaced', scopes: [' read:user'] }), { status: 400, body: { message: 'invalid access token scope provided: invalid access token scope:  read:user' } }, 'nothing is trimmed')
  const narrow = fake.addToken('frank', 'narrow-order', ['read:repository', 'write:issue'])
  t.match(await call('GET', '/user', `token ${narrow.sha1}`), { status: 403, body: { message: 'token does not have at least one of required scope(s), required=[read:user], token scope=write:issue,read:repository' } }, "the scope check's message in that order too")
})

t.test('list: limit capped at 50, X-Total-Count, no secret', async (t) => {
  for (let i = 0; i < 60; i++) fake.addToken('bob', `bulk-${i}`, ['read:user'])
  const bob = basic('bob', 'bob-pw')
  // A page is always asked for: without one, Gitea lists every token (see the test of page and limit).
  const first = await call('GET', '/users/bob/tokens?page=1&limit=100', bob)
  t.equal(first.body.length, 50, 'limit is capped at 50')
  t.equal(first.headers.get('x-total-count'), '60')
  t.match(first.headers.get('access-control-expose-headers'), /X-Total-Count/)
  t.equal((await call('GET', '/users/bob/tokens?page=1', bob)).body.length, 30, 'default page size 30')
  t.equal((await call('GET', '/users/bob/tokens?page=2&limit=50', bob)).body.length, 10)
  t.ok(first.body.every((x: { sha1: string }) => x.sha1 === ''), 'sha1 is empty in lists')
  t.same(first.body.slice(0, 2).map((x: { name: string }) => x.name), ['bulk-59', 'bulk-58'], 'newest first, as Gitea orders them (created_unix DESC)')
})

t.test("list: page and limit read as Go's strconv.Atoi reads them, and a page below 1 lists every token", async (t) => {
  // routers/api/v1/utils/page.go (ctx.FormInt, its error ignored), services/convert/utils.go
  // (ToCorrectPageSize) and models/db/list.go (FindAndCount pages from page 1 only). Before, the
  // fake read "1abc" as 1 with parseInt, and a missing page as page 1.
  fake.addUser('grace', 'grace-pw')
  const grace = basic('grace', 'grace-pw')
  const made = Array.from({ length: 60 }, (_, i) => fake.addToken('grace', `paged-${i}`, ['read:user']).id)
  const ids = async (query: string) => {
    const res = await call('GET', `/users/grace/tokens?${query}`, grace)
    t.equal(res.headers.get('x-total-count'), '60', `${query}: X-Total-Count`)
    return res.body.map((x: { id: number }) => x.id) as number[]
  }
  const sizes = [
    ['page=1&limit=1abc', 30, 'a limit that is not a number is 0: the default'],
    ['page=1&limit=%205', 30, 'white space is not skipped'],
    ['page=1&limit=0x10', 30, 'no base prefix'],
    ['page=1&limit=1_0', 30, 'no underscores'],
    ['page=1&limit=-5', 30, 'below 1: the default'],
    ['page=1&limit=%2B5', 5, 'a sign'],
    ['page=1&limit=05', 5, 'leading zeros, decimal'],
    ['page=1&limit=99999999999999999999', 50, 'beyond int64: the bound, capped'],
    ['page=2&limit=50', 10, 'the last page'],
    ['', 60, 'no page: every token'],
    ['limit=5', 60, 'no page: every token, whatever the limit'],
    ['page=0&limit=5', 60, 'page 0'],
    ['page=-1&limit=5', 60, 'a page below 0'],
    ['page=1abc&limit=5', 60, 'a page that is not a number is 0'],
  ] as const
  for (const [query, size, what] of sizes) t.equal((await ids(query)).length, size, `${query}: ${what}`)
  // Beyond int64 the page is the bound, and (page - 1) * 50 wraps below 0 in Go's int: no OFFSET.
  t.same(await ids('page=99999999999999999999&limit=50'), await ids('page=1&limit=50'), 'a page beyond int64 is the first page')
  for (const id of made) fake.removeToken(id)
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
  t.matchStrict(await call('DELETE', '/users/alice/tokens/999999', alice), { status: 404, body: { message: "The target couldn't be found.", errors: null } }, "ctx.NotFound()'s answer")
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
  // Go reads digit by digit and stops at the first that overflows 64 bits, before what follows.
  t.equal(goParseInt('99999999999999999999x'), (1n << 63n) - 1n, 'past 64 bits before a bad character: the bound')
  t.equal(goParseInt('-99999999999999999999x'), -(1n << 63n), 'and the negative bound')
  t.equal(goParseInt('99999999999999999999_', 10), (1n << 63n) - 1n, 'with base 10 too')
  t.equal(goParseInt('9223372036854775808x', 10), 0n, 'past int64 but not 64 bits before it: a syntax error, 0')
  t.equal(goParseInt('1abc', 10), 0n)
  const a = fake.addToken('alice', 'hex', ['read:user'])
  t.match(await call('DELETE', `/users/alice/tokens/0x${a.id.toString(16)}`, alice), { status: 204 }, 'hex id')
  const b = fake.addToken('alice', 'octal', ['read:user'])
  t.match(await call('DELETE', `/users/alice/tokens/0${b.id.toString(8)}`, alice), { status: 204 }, 'octal id')
  t.notOk(fake.tokens.some((x) => x.id === a.id || x.id === b.id))
  fake.addToken('alice', '1__0', ['read:user'])
  t.match(await call('DELETE', '/users/alice/tokens/1__0', alice), { status: 204 }, 'not a number to Go: by name')
  t.match(await call('DELETE', '/users/alice/tokens/99999999999999999999', alice), { status: 404 })
  fake.addToken('alice', '99999999999999999999x', ['read:user'])
  t.match(await call('DELETE', '/users/alice/tokens/99999999999999999999x', alice), { status: 404 }, 'an id to Go (the bound), not a name')
})

t.test('every answer matches the swagger excerpt', async (t) => {
  checkAgainstSwagger(t, fake.responses)
})
