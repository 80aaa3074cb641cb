// The admin API's Gitea operations against the fake Gitea, on the embedded store and on
// PostgreSQL: the create/verify/list/delete cycle with its audit rows and admin actor, drift,
// the service's errors as their catalogue codes, and every answer against the operation's
// documented schema. Without the services configured, every integration operation says so.
// (The n8n operations run against the real n8n in test/n8n.test.ts.)
import t from 'tap'
import { GiteaTokenService } from '../core/integrations/gitea.ts'
import { N8nKeyService } from '../core/integrations/n8n.ts'
import { trailIs } from './helpers/audit.ts'
import { documented, startAdmin } from './helpers/admin.ts'
import { freePort, giteaOnFake, integrationDeps, proxyTo } from './helpers/integrations.ts'
import { forEachStore, openStore } from './helpers/stores.ts'


await forEachStore(t, async (t, store) => {
  const { fake, gitea, password } = await giteaOnFake(t, store.db)
  const h = await startAdmin(t, store.db, { gitea })

  await t.test('create, verify, list, delete through the admin API', async (t) => {
    const before = await h.auditRows()
    const created = await h.call('POST', '/v1/gitea/tokens', { body: { name: 'deploy', scopes: ['read:repository', 'read:user'] } })
    await documented(t, h, 'createGiteaToken', created)
    t.match(created.json, { name: 'deploy', user: 'alice', created_by: `key:${h.adminKeyId}` })
    t.same(created.json.scopes, ['read:repository', 'read:user'], 'the scopes asked for, no more')
    t.ok(fake.tokens.some((x) => x.sha1 === created.json.token), 'the token exists in Gitea')
    t.equal(await h.auditRows(), before + 1, 'one audit row for the create')
    // `..` would leave /api/v1/users/ in the path Gitea is called on, with keygate's credentials.
    for (const user of ['..', '.']) {
      const dots = await h.call('POST', '/v1/gitea/tokens', { body: { name: 'dots', scopes: ['read:user'], user } })
      t.equal(dots.status, 400, `user ${user}: refused`)
      t.equal(dots.json?.error?.code, 'validation_failed')
    }

    const verified = await h.call('POST', '/v1/gitea/tokens/verify', { body: { secret: created.json.token } })
    await documented(t, h, 'verifyGiteaToken', verified)
    t.match(verified.json, { valid: true, user: { login: 'alice' }, record: { id: created.json.id } })

    const list = await h.call('GET', '/v1/gitea/tokens')
    await documented(t, h, 'listGiteaTokens', list)
    t.match(list.json.items, [{ name: 'deploy', state: 'in_sync' }])
    t.equal(list.json.items.length, 1, 'the one token, listed once')
    t.notMatch(list.text, created.json.token, 'the list never shows the token')

    const deleted = await h.call('DELETE', '/v1/gitea/tokens/deploy')
    await documented(t, h, 'deleteGiteaToken', deleted)
    t.match(deleted.json, { deleted: true, name: 'deploy', remote_missing: false, record: { deleted_by: `key:${h.adminKeyId}` } })
    t.equal(await h.auditRows(), before + 2, 'one audit row for the delete')

    const after = await h.call('POST', '/v1/gitea/tokens/verify', { body: { secret: created.json.token } })
    await documented(t, h, 'verifyGiteaToken', after)
    t.match(after.json, { valid: false, reason: 'refused' })
  })

  await t.test('errors of the service keep their codes', async (t) => {
    const before = await h.auditRows()
    const unknown = await h.call('POST', '/v1/gitea/tokens', { body: { name: 'x', scopes: ['read:everything'] } })
    t.equal(unknown.status, 400)
    t.equal(unknown.json.error.code, 'gitea_scope_unknown')
    t.equal((await h.call('POST', '/v1/gitea/tokens', { body: { name: 'twice', scopes: ['read:user'] } })).status, 201)
    const twice = await h.call('POST', '/v1/gitea/tokens', { body: { name: 'twice', scopes: ['read:user'] } })
    t.equal(twice.status, 409)
    t.equal(twice.json.error.code, 'gitea_token_exists')
    const missing = await h.call('DELETE', '/v1/gitea/tokens/nothing-like-it')
    t.equal(missing.status, 404)
    t.equal(missing.json.error.code, 'gitea_token_not_found')
    const bad = await h.call('POST', '/v1/gitea/tokens', { body: { scopes: [] } })
    t.equal(bad.status, 400)
    t.equal(bad.json.error.code, 'validation_failed')
    t.match(bad.text, /name/)
    t.equal(await h.auditRows(), before + 1, 'only the one create that succeeded left an audit row')
  })

  await t.test('two deletes of one token at once: the one whose DELETE Gitea carried out closes the record, audited as deleted; the other is 404', async (t) => {
    // Both deletes list the token, then send their DELETE. Gitea carries the first out (204) and
    // answers the second 404; the proxy holds the 204 back until the second delete has answered.
    // Before: the second closed the record first and audited it `remote_missing: true` (as if
    // deleted in Gitea by hand), and the delete that did delete it was told "not found".
    const deletes: Array<() => void> = []
    let release: (() => void) | undefined
    const url = await proxyTo(t, fake, {
      hold: (req, go) => {
        if (req.method !== 'DELETE') return go()
        deletes.push(go)
        if (deletes.length === 2) deletes[0]?.()
      },
      answer: (req, answer, res) => {
        if (req.method !== 'DELETE' || answer.statusCode !== 204) return false
        release = () => res.writeHead(204).end()
        deletes[1]?.()
        return true
      },
    })
    const deps = integrationDeps(store.db, { GITEA_URL: url, GITEA_USERNAME: 'alice', GITEA_PASSWORD: password })
    const proxied = new GiteaTokenService(deps)
    t.teardown(() => proxied.close())
    const admin = await startAdmin(t, store.db, { gitea: proxied })
    const made = await admin.call('POST', '/v1/gitea/tokens', { body: { name: 'at-once', scopes: ['read:user'] } })
    t.equal(made.status, 201, 'the token is made')
    const both = [admin.call('DELETE', '/v1/gitea/tokens/at-once'), admin.call('DELETE', '/v1/gitea/tokens/at-once')]
    const second = await Promise.race(both)
    t.ok(release, "Gitea carried the first DELETE out before the second delete answered")
    release?.()
    const answers = await Promise.all(both)
    const deleted = answers.filter((a) => a.status === 200)
    t.equal(deleted.length, 1, 'one delete succeeds')
    t.not(deleted[0], second, 'the one whose DELETE Gitea carried out')
    t.match(deleted[0]?.json, { deleted: true, name: 'at-once', remote_missing: false, record: { id: made.json.id, deleted_at: /\d/ } }, 'deleted, not found missing')
    if (deleted[0]) await documented(t, admin, 'deleteGiteaToken', deleted[0])
    await documented(t, admin, 'deleteGiteaToken', second, 404)
    t.match(second.json?.error, { code: 'gitea_token_not_found', message: /deleted while this delete ran/ }, 'gitea_token_not_found, saying why')
    // Whole: the gitea.token.deleted rows alone were counted, and a create audited twice went unseen (found by a review).
    const rows = await deps.audit.list(store.db, { keyId: made.json.id })
    trailIs(t, rows, [{ action: 'gitea.token.deleted' }, { action: 'gitea.token.created' }], 'one audit row closes the record')
    t.match(rows[0]?.details, { remote_missing: false, recorded: true }, 'saying it was deleted, not found missing')
  })

  await t.test('drift: a token deleted in Gitea by hand', async (t) => {
    const made = await h.call('POST', '/v1/gitea/tokens', { body: { name: 'by-hand', scopes: ['read:user'] } })
    fake.tokens.splice(fake.tokens.findIndex((x) => x.id === made.json.remote_id), 1)
    const list = await h.call('GET', '/v1/gitea/tokens')
    await documented(t, h, 'listGiteaTokens', list)
    t.matchStrict(list.json.items.find((i: { name: string }) => i.name === 'by-hand'), { state: 'deleted_remotely', remote: null, local: { id: made.json.id } })
  })

  await t.test("another user's tokens GITEA_USERNAME may not list: unreadable in the list, and forget=true closes the record", async (t) => {
    // A record of bob's token, made by a site admin earlier; alice (GITEA_USERNAME) may not list bob's tokens.
    fake.addUser('bob', 'bob-Secret-pw-3')
    const bobs = fake.addToken('bob', 'bobtok', ['read:user'])
    await store.db.query(
      `INSERT INTO gitea_tokens (id, base_url, remote_id, name, username, scopes, token_last_eight, token_hash, created_by) VALUES ($1, $2, $3, 'bobtok', 'bob', $4, $5, $6, 'cli:root')`,
      ['gt_bobsrecord01', fake.url, bobs.id, ['read:user'], bobs.sha1.slice(-8), 'e'.repeat(64)],
    )
    const list = await h.call('GET', '/v1/gitea/tokens')
    t.equal(list.status, 200, 'the list answers (before: 502 gitea_auth_failed)')
    await documented(t, h, 'listGiteaTokens', list)
    t.matchStrict(list.json.items.find((i: { name: string }) => i.name === 'bobtok'), { state: 'unreadable', user: 'bob', reason: /^403 /, remote: null, local: { id: 'gt_bobsrecord01' } })
    t.equal(list.json.summary.unreadable, 1)
    const refused = await h.call('DELETE', '/v1/gitea/tokens/bobtok?user=bob')
    await documented(t, h, 'deleteGiteaToken', refused, 502)
    t.match(refused.json.error, { code: 'gitea_auth_failed', message: /--forget/ })
    const forgotten = await h.call('DELETE', '/v1/gitea/tokens/bobtok?user=bob&forget=true')
    await documented(t, h, 'deleteGiteaToken', forgotten)
    t.match(forgotten.json, { forgotten: true, remote_missing: false, user: 'bob', record: { id: 'gt_bobsrecord01', deleted_by: `key:${h.adminKeyId}` } })
    t.ok(fake.tokens.some((x) => x.id === bobs.id), 'Gitea was not asked to delete it')
  })
})

t.test('not configured, or unreachable: specific codes, nothing written', async (t) => {
  const store = await openStore(t, 'embedded')
  const bare = await startAdmin(t, store.db)
  for (const [id, method, path, body, code] of [
    ['createGiteaToken', 'POST', '/v1/gitea/tokens', { name: 'a', scopes: ['read:user'] }, 'gitea_not_configured'],
    ['listGiteaTokens', 'GET', '/v1/gitea/tokens', undefined, 'gitea_not_configured'],
    ['createN8nKey', 'POST', '/v1/n8n/keys', { label: 'a', scopes: ['workflow:list'] }, 'n8n_not_configured'],
    ['deleteN8nKey', 'DELETE', '/v1/n8n/keys/a', undefined, 'n8n_not_configured'],
  ] as const) {
    const a = await bare.call(method, path, body === undefined ? {} : { body })
    await documented(t, bare, id, a, 503)
    t.equal(a.json.error.code, code)
    // The server's settings are the ones to set: the CLI's flags are refused through the admin API.
    t.match(a.json.error.message, /configuration file\)$/, 'names no CLI flag')
    t.notMatch(a.json.error.message, /--/)
  }

  const port = await freePort()
  const n8n = new N8nKeyService(integrationDeps(store.db, { N8N_URL: `http://127.0.0.1:${port}`, N8N_EMAIL: 'owner@example.test', N8N_PASSWORD: 'Owner-pw-1' }))
  t.teardown(() => n8n.close())
  const down = await startAdmin(t, store.db, { n8n })
  const before = await down.auditRows()
  const a = await down.call('POST', '/v1/n8n/keys', { body: { label: 'a', scopes: ['workflow:list'] } })
  await documented(t, down, 'createN8nKey', a, 502)
  t.equal(a.json.error.code, 'n8n_unreachable')
  t.notMatch(a.text, /Owner-pw-1/, 'no password in the answer')
  t.equal(await down.auditRows(), before, 'no audit row')
})
