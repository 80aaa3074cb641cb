// Regression: a literal admin path beside a templated one (`/v1/keys/validate` beside
// `/v1/keys/{id}`) is that path's alone, as OpenAPI 3.1 matches concrete paths before templated
// ones: any other method there is 405 with the literal route's Allow. Before (found by a review),
// `GET /v1/keys/validate` was the look-up of the key "validate" (404), and `DELETE
// /v1/gitea/tokens/verify` the deletion of a token named "verify".
import t from 'tap'
import { openApiDocument } from '../admin/openapi.ts'
import { OPERATIONS } from '../admin/routes/index.ts'
import { remoteGitea, remoteN8n } from '../cli/remote-integrations.ts'
import { remoteOperations } from '../cli/remote-operations.ts'
import { startAdmin } from './helpers/admin.ts'
import { openStore } from './helpers/stores.ts'

const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'] as const

/** Whether templated `template` matches the literal path `path` (one segment per `{name}`). */
function matches(template: string, path: string): boolean {
  const a = template.split('/')
  const b = path.split('/')
  return a.length === b.length && a.every((s, i) => /^\{\w+\}$/.test(s) || s === b[i])
}

const literal = [...new Set(OPERATIONS.map((op) => op.path).filter((p) => !p.includes('{')))]
const templated = [...new Set(OPERATIONS.map((op) => op.path).filter((p) => p.includes('{')))]
const pairs = literal.flatMap((path) => templated.filter((tp) => matches(tp, path)).map((tp) => [path, tp] as const))

t.test('the route table has the literal paths beside templated ones that this test covers', async (t) => {
  t.same(
    pairs.map(([p]) => p).sort(),
    ['/v1/gitea/tokens/verify', '/v1/keys/import', '/v1/keys/validate', '/v1/n8n/keys/verify'],
    'every literal path a templated one also matches',
  )
})

t.test('every other method on a literal path beside a templated one is 405 with the literal path\'s Allow', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const doc = openApiDocument(OPERATIONS, { version: 'test' }) as { paths: Record<string, Record<string, unknown>> }
  for (const [path, template] of pairs) {
    const own = OPERATIONS.filter((op) => op.path === path).map((op) => op.method)
    const allow = own.flatMap((m) => (m === 'GET' ? ['GET', 'HEAD'] : [m]))
    t.same(Object.keys(doc.paths[path] ?? {}).map((m) => m.toUpperCase()).sort(), [...own].sort(), `${path}: the document lists its own methods alone`)
    for (const method of METHODS.filter((m) => !allow.includes(m))) {
      const a = await h.call(method, path)
      t.equal(a.status, 405, `${method} ${path} (beside ${template}): 405`)
      if (method !== 'HEAD') t.equal(a.json?.error?.code, 'method_not_allowed', `${method} ${path}: method_not_allowed`)
      t.equal(a.headers.allow, allow.join(', '), `${method} ${path}: Allow names ${allow.join(', ')}`)
    }
  }
})

t.test('the templated routes still serve their own ids', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  const k = await h.keys.create({ name: 'beside', type: 'user' }, { actor: 'test' })
  const got = await h.call('GET', `/v1/keys/${k.record.id}`)
  t.equal(got.status, 200, 'GET /v1/keys/{id}')
  t.equal(got.json?.id, k.record.id)
  // Not configured here: its own refusal, not a 405.
  const gone = await h.call('DELETE', '/v1/gitea/tokens/verifier')
  t.equal(gone.json?.error?.code, 'gitea_not_configured', 'DELETE /v1/gitea/tokens/{ref} of another name reaches its operation')
  const n8n = await h.call('DELETE', '/v1/n8n/keys/verify2')
  t.equal(n8n.json?.error?.code, 'n8n_not_configured', 'DELETE /v1/n8n/keys/{ref} of another name reaches its operation')
  // A path the literal route does not match is the template's (the key "validatex" is unknown).
  const unknown = await h.call('GET', '/v1/keys/validatex')
  t.equal(unknown.json?.error?.code, 'key_not_found', 'GET /v1/keys/validatex is a look-up')
})

t.test('the CLI through the admin API names no key, token or n8n key by an operation\'s path', async (t) => {
  const store = await openStore(t, 'embedded')
  const h = await startAdmin(t, store.db)
  // (A name no URL can carry is refused as the call is made, before any promise.)
  const failure = (run: () => Promise<unknown>) => Promise.resolve().then(run).then((): { code?: string; message?: string } => ({ code: 'none' }), (err: { code?: string; message?: string }) => err)
  const keys = remoteOperations(h.url, h.adminKey)
  const before = h.requests.length
  for (const word of ['validate', 'import']) {
    // As on the store, which has no key of that id (ids are 12 letters and digits).
    t.match(await failure(() => keys.get(word)), { code: 'key_not_found', message: `no key has the id "${word}"` }, `api-key get ${word}: key_not_found`)
    t.match(await failure(() => keys.update(word, { name: 'x' })), { code: 'key_not_found' }, `api-key update ${word}: key_not_found`)
  }
  for (const [what, remote, path] of [
    ['token', remoteGitea(h.url, h.adminKey), '/v1/gitea/tokens'],
    ['key', remoteN8n(h.url, h.adminKey), '/v1/n8n/keys'],
  ] as const) {
    const refused = await failure(() => remote.delete('verify', { actor: 'test' }))
    t.equal(refused.code, 'usage_error', `delete verify (${path}): a usage error`)
    t.equal(refused.message, `"verify" cannot be named through the admin API (${path}/verify is the verify operation's path): give the ${what}'s id`)
  }
  t.equal(h.requests.length, before, 'none of them called the admin API')
})
