// N8nKeyService and `keygate n8n` end to end against a real n8n 1.123.0 (started once for the
// file by .ci/n8n.sh), on the embedded store and on PostgreSQL: the "done when" cycle
// through the real CLI, drift, refused requests, a key created but not recorded, wrong
// credentials, n8n stopped, and no secret in the store, the audit details or the logs.
import t, { type Test } from 'tap'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { createServer, type OutgoingHttpHeaders } from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { request } from 'undici'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { N8nKeyService } from '../core/integrations/n8n.ts'
import { recordId, secretHash } from '../core/integrations/track.ts'
import { migrate } from '../core/migrate.ts'
import { documented, servedValidator, startAdmin } from './helpers/admin.ts'
import { until } from './helpers/gateway.ts'
import { capturedStderr, childEnv, runCli, runCliHere, spawnClean } from './helpers/cli.ts'
import { capturedLogs, dumpStore, failingQueries, failingTransactions, integrationDeps, noSecrets, proxyTo } from './helpers/integrations.ts'
import { ownerSession, startN8n } from './helpers/n8n.ts'
import { forEachStore, freshDatabase, memoryDb, rejection } from './helpers/stores.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { isolatedEnv, serve as startKeygate } from './helpers/serve.ts'

const actor = { actor: 'cli:tester' }
const n8n = await startN8n(t)
const secrets: string[] = [n8n.password]
const env = (extra: Record<string, string> = {}) => ({ N8N_URL: n8n.url, N8N_EMAIL: n8n.email, N8N_PASSWORD: n8n.password, ...extra })
const rest = await ownerSession(n8n)

/** Anything shaped like a JWT (n8n's keys and its session cookie are JWTs). */
const JWT = /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}/

/**
 * An HTTP proxy in front of the real n8n that, while `hold` is set, passes `route` (method and
 * path) on at once but keeps n8n's answer back for `ms`: n8n has made the change, keygate has not
 * heard of it in time.
 */
async function lateAnswers(t: Test, target: string, route: string, ms: number): Promise<{ url: string; hold: boolean }> {
  const state = { url: '', hold: false }
  const server = createServer(async (req, res) => {
    const chunks: Buffer[] = []
    for await (const c of req) chunks.push(c as Buffer)
    const headers = Object.fromEntries(Object.entries(req.headers).filter(([name]) => name !== 'host' && name !== 'connection'))
    const answer = await request(`${target}${req.url}`, { method: req.method as 'GET', headers: headers as Record<string, string>, body: chunks.length > 0 ? Buffer.concat(chunks) : null })
    const body = Buffer.from(await answer.body.arrayBuffer())
    if (state.hold && `${req.method} ${(req.url ?? '').split('?')[0]}` === route) await sleep(ms)
    if (res.destroyed) return
    const out = Object.entries(answer.headers).filter(([name]) => !['connection', 'keep-alive', 'transfer-encoding'].includes(name))
    res.writeHead(answer.statusCode, Object.fromEntries(out) as OutgoingHttpHeaders)
    res.end(body)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  state.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  return state
}

/** A migrated embedded store in memory, closed when `t` ends. */
async function memoryStore(t: Test) {
  const db = await memoryDb()
  t.teardown(() => db.close())
  await migrate(db)
  return db
}

t.test('the scopes the instance allows', async (t) => {
  const keys = new N8nKeyService(integrationDeps(await memoryStore(t), env()))
  t.teardown(() => keys.close())
  const scopes = await keys.allowedScopes()
  t.ok(scopes.includes('workflow:list'))
  t.same(scopes, (await rest('GET', '/rest/api-keys/scopes')).body.data, "the instance's own list")
})

t.test("whether n8n enforces a key's scopes: what its settings say, or that they could not be read", async (t) => {
  // The real n8n cannot be licensed here: a proxy in front of it answers GET /rest/settings in its
  // stead (as a licensed n8n, an older one without the flag, a failure) and passes the rest on.
  let settings: { status: number; body: unknown } = { status: 200, body: {} }
  const url = await proxyTo(t, n8n, {
    instead: (req, res) => {
      if (!req.url?.startsWith('/rest/settings')) return false
      res.writeHead(settings.status, { 'content-type': 'application/json' }).end(JSON.stringify(settings.body))
      return true
    },
  })
  const keys = new N8nKeyService(integrationDeps(await memoryStore(t), env({ N8N_URL: url })))
  t.teardown(() => keys.close())
  const couldNotTell = (why: string) =>
    `could not tell whether n8n at ${url} enforces API key scopes (${why}): it does only when its licence has API key scopes; without them the key, made with workflow:list, can do whatever the role of ${n8n.email} may`
  for (const [name, answer, enforced, warning] of [
    ['licensed', { status: 200, body: { data: { enterprise: { apiKeyScopes: true } } } }, true, undefined],
    ['unlicensed', { status: 200, body: { data: { enterprise: { apiKeyScopes: false } } } }, false, `n8n at ${url} does not enforce API key scopes (its licence lacks API key scopes): the key was made with workflow:list, but it can do whatever the role of ${n8n.email} may`],
    ['no flag (an older n8n)', { status: 200, body: { data: { enterprise: { sharing: false } } } }, null, couldNotTell('GET /rest/settings answered without enterprise.apiKeyScopes')],
    ['a failure', { status: 500, body: { message: 'Internal error' } }, null, couldNotTell('n8n at URL refused to read its settings: 500 Internal error'.replace('URL', url))],
  ] as const) {
    settings = answer
    const label = `enforced-${name.split(' ')[0]}`
    const created = await keys.create({ label, scopes: ['workflow:list'] }, actor)
    secrets.push(created.key)
    t.equal(created.scopes_enforced, enforced, `${name}: recorded`)
    t.equal(created.warning, warning, `${name}: the warning`)
    t.equal((await keys.list()).items.find((i) => i.label === label)?.local?.scopes_enforced, enforced, `${name}: listed`)
    await keys.delete(label, actor)
  }
})

await forEachStore(t, async (t, store) => {
  const deps = integrationDeps(store.db, env())
  const keys = new N8nKeyService(deps)
  t.teardown(() => keys.close())

  await t.test('create, verify, list, delete', async (t) => {
    const created = await keys.create({ label: `svc-${store.kind}`, scopes: ['workflow:list', 'workflow:read'] }, actor)
    secrets.push(created.key)
    t.matchStrict(created, { label: `svc-${store.kind}`, owner_email: n8n.email, expires_at: null, created_by: 'cli:tester', base_url: n8n.url })
    // Whole: an array in a pattern checks only the items it starts with (t.matchStrict's too).
    t.same(created.scopes, ['workflow:list', 'workflow:read'], 'the scopes asked for, and no other')
    t.match(created.id, /^nk_[0-9A-Za-z]{12}$/)
    t.equal(created.key_last_eight, created.key.slice(-8))
    // This n8n has no licence: its signed-in settings say so, and its public API lets any key do
    // what its user may. Before (found by a review), keygate recorded and printed the scopes
    // without a word, as if they bound the key.
    t.equal((await rest('GET', '/rest/settings')).body.data.enterprise.apiKeyScopes, false, "the real n8n's licence lacks API key scopes")
    t.equal(created.scopes_enforced, false, 'recorded as made with scopes n8n does not enforce')
    t.equal(created.warning, `n8n at ${n8n.url} does not enforce API key scopes (its licence lacks API key scopes): the key was made with workflow:list, workflow:read, but it can do whatever the role of ${n8n.email} may`)
    t.match(await keys.verify(created.key), { valid: true, record: { id: created.id, scopes_enforced: false } })

    const list = await keys.list()
    const item = list.items.find((i) => i.remote_id === created.remote_id)
    t.match(item, { state: 'in_sync', label: created.label, remote: { masked: new RegExp(`${created.key.slice(-4)}$`) }, local: { id: created.id, scopes_enforced: false } })
    t.notOk(JSON.stringify(list).includes(created.key), 'the list never holds the key')

    const deleted = await keys.delete(created.label, actor)
    t.match(deleted, { deleted: true, remote_id: created.remote_id, remote_missing: false, record: { id: created.id, deleted_by: 'cli:tester' } })
    t.match(await keys.verify(created.key), { valid: false, reason: 'refused', record: { id: created.id } })
    const audit = await deps.audit.list(store.db, { keyId: created.id })
    t.same(audit.map((a) => a.action), ['n8n.key.deleted', 'n8n.key.created'], 'create and delete each left an audit row')
    t.match(audit[1]?.details, { remote_id: created.remote_id, label: created.label, key_last_eight: created.key_last_eight, scopes_enforced: false })
  })

  await t.test('an expiry, delete by id', async (t) => {
    const at = new Date(Date.now() + 3 * 86_400_000)
    const created = await keys.create({ label: `expiring-${store.kind}`, scopes: ['workflow:list'], expires_at: at.toISOString() }, actor)
    secrets.push(created.key)
    // Asked with milliseconds (none in one run in 1,000: then both ways agree).
    const whole = new Date(Math.floor(at.getTime() / 1000) * 1000).toISOString()
    t.equal(created.expires_at, whole, 'recorded to the whole second, as n8n keeps it (before, found by a review: with the milliseconds asked)')
    const listed = (await keys.list()).items.find((i) => i.remote_id === created.remote_id)
    t.equal(listed?.remote?.expires_at, whole, 'n8n holds the expiry')
    t.equal(listed?.local?.expires_at, whole, "and so does keygate's record in the list")
    t.match(await keys.delete(created.remote_id, actor), { label: created.label })
    t.match(await rejection(keys.create({ label: 'past', scopes: ['workflow:list'], expires_at: '2020-01-01T00:00:00Z' }, actor)), { code: 'validation_failed', message: /in the past/ })
  })

  await t.test('keys made in the same second are distinct (n8n would issue the same JWT twice)', async (t) => {
    const a = await keys.create({ label: `same-second-a-${store.kind}`, scopes: ['workflow:list'] }, actor)
    const b = await keys.create({ label: `same-second-b-${store.kind}`, scopes: ['workflow:list'] }, actor)
    secrets.push(a.key, b.key)
    t.not(a.key, b.key)
    await keys.delete(a.remote_id, actor)
    t.match(await keys.verify(a.key), { valid: false }, 'the deleted key stops working')
    const c = await keys.create({ label: `same-second-c-${store.kind}`, scopes: ['workflow:list'] }, actor)
    secrets.push(c.key)
    t.not(c.key, a.key, 'a new key never revives a deleted one')
    t.match(await keys.verify(a.key), { valid: false })
    t.match(await keys.verify(b.key), { valid: true })
    await keys.delete(b.remote_id, actor)
    await keys.delete(c.remote_id, actor)
  })

  await t.test('refused requests', async (t) => {
    const unknown = await rejection(keys.create({ label: 'x', scopes: ['workflow:list', 'workflow:teleport'] }, actor))
    t.match(unknown, { code: 'n8n_scope_unknown', status: 400, message: /"workflow:teleport" is not allowed by n8n at .*; it allows .*workflow:list/ })
    t.same(unknown.details?.unknown, ['workflow:teleport'], 'the unknown scope, and only it')
    t.match(await rejection(keys.create({ scopes: ['workflow:list'] }, actor)), { code: 'validation_failed', message: /label: is required/ })
    t.match(await rejection(keys.create({ label: 'x'.repeat(51), scopes: ['workflow:list'] }, actor)), { code: 'validation_failed' })
    t.match(await rejection(keys.create({ label: 'a\u001bb', scopes: ['workflow:list'] }, actor)), { code: 'validation_failed', message: /label: "a\\u001bb" is not allowed/ })
    const first = await keys.create({ label: `twice-${store.kind}`, scopes: ['workflow:list'] }, actor)
    secrets.push(first.key)
    t.match(await rejection(keys.create({ label: `twice-${store.kind}`, scopes: ['workflow:list'] }, actor)), { code: 'n8n_key_exists', status: 409 })
    await keys.delete(first.remote_id, actor)
    t.match(await rejection(keys.delete('no-such-key', actor)), { code: 'n8n_key_not_found', status: 404 })
    t.match(await keys.verify('not a key'), { valid: false, reason: 'malformed' })
    t.matchStrict(await keys.verify('garbage'), { valid: false, reason: 'refused', record: null })
  })

  await t.test('two creates with one label at once: one key, the other n8n_key_exists', async (t) => {
    // Before: both passed the label check, n8n refused the second POST with the text it gives a
    // same-second key ("There is already an entry with this name"), and keygate retried it three
    // times, then answered n8n_error 502 "issued a key identical to an earlier one three times".
    const other = new N8nKeyService(integrationDeps(store.db, env()))
    t.teardown(() => other.close())
    await other.allowedScopes() // logged in, as `keys` is, so the two creates keep pace
    for (const [how, second, days] of [['one service', keys, 61], ['two services (two keygate instances)', other, 62]] as const) {
      const label = `race-${second === keys ? 'one' : 'two'}-${store.kind}`
      // An expiry no other key has: no key made in the same second elsewhere is its twin (those
      // are retried rightly), so n8n refuses here for the label only.
      const body = { label, scopes: ['workflow:list'], expires_at: new Date(Date.now() + days * 86_400_000).toISOString() }
      const retries = () => capturedLogs.filter((l) => l.includes('creating it again')).length
      const retriesBefore = retries()
      const results = await Promise.allSettled([keys.create(body, actor), second.create(body, actor)])
      const made = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []))
      const refused = results.flatMap((r) => (r.status === 'rejected' ? [r.reason] : []))
      secrets.push(...made.map((m) => m.key))
      t.equal(made.length, 1, `${how}: one create succeeds`)
      t.equal(refused.length, 1, `${how}: one is refused`)
      t.match(refused[0], { code: 'n8n_key_exists', status: 409, message: new RegExp(`already has an API key labelled "${label}"`) }, `${how}: as a sequential duplicate is`)
      t.equal(retries(), retriesBefore, `${how}: the refusal is not retried`)
      t.equal((await store.db.query('SELECT id FROM n8n_api_keys WHERE label = $1', [label])).length, 1, `${how}: one record`)
      t.equal((await keys.list()).items.filter((i) => i.label === label).length, 1, `${how}: one key in n8n`)
      for (const m of made) await keys.delete(m.remote_id, actor)
    }
  })

  await t.test('drift: deleted in n8n by hand, made in n8n by hand', async (t) => {
    const gone = await keys.create({ label: `gone-${store.kind}`, scopes: ['workflow:list'] }, actor)
    secrets.push(gone.key)
    t.equal((await rest('DELETE', `/rest/api-keys/${gone.remote_id}`)).status, 200)
    const manual = await rest('POST', '/rest/api-keys', { label: `manual-${store.kind}`, scopes: ['workflow:list'], expiresAt: null })
    secrets.push(manual.body.data.rawApiKey)
    const list = await keys.list()
    t.matchStrict(list.items.find((i) => i.remote_id === gone.remote_id), { state: 'deleted_remotely', remote: null, local: { id: gone.id } })
    t.matchStrict(list.items.find((i) => i.remote_id === manual.body.data.id), { state: 'not_recorded', local: null })
    t.match(await keys.delete(`gone-${store.kind}`, actor), { remote_missing: true, record: { id: gone.id } })
    t.matchStrict(await keys.delete(`manual-${store.kind}`, actor), { remote_missing: false, record: null })
  })

  await t.test('a create n8n did not answer in time: the key it made is named, with how to delete it', async (t) => {
    // Before: n8n_timeout alone, and the key stayed in n8n, unrecorded, its label taken.
    // 2 s, not 800 ms: the look-up after the create that timed out has the same timeout, and n8n
    // under the suite's load could miss it too (the message is then another one).
    const late = await lateAnswers(t, n8n.url, 'POST /rest/api-keys', 4000)
    const quick = new N8nKeyService({ ...deps, ...integrationDeps(store.db, env({ N8N_URL: late.url })), config: { ...deps.config, integrations: { ...deps.config.integrations, n8n: { ...deps.config.integrations.n8n, url: late.url, timeout_ms: 2000 } } } })
    t.teardown(() => quick.close())
    late.hold = true
    const label = `late-${store.kind}`
    const err = await rejection(quick.create({ label, scopes: ['workflow:list'] }, actor))
    const made = (await keys.list()).items.find((i) => i.label === label)
    t.match(made, { state: 'not_recorded' }, 'n8n made it; keygate has no record')
    t.match(err, { code: 'n8n_timeout', message: new RegExp(`did not answer within 2000 ms to create API key "${label}"; n8n now holds one of that name that keygate has no record of \\(id ${made?.remote_id}\\): if this create made it \\(its secret never arrived\\), delete it with \`keygate n8n delete ${made?.remote_id}\``) })
    t.matchStrict(await keys.delete(String(made?.remote_id), actor), { remote_missing: false, record: null }, 'the command it names deletes it')
    late.hold = false
    const again = await quick.create({ label, scopes: ['workflow:list'] }, actor)
    secrets.push(again.key)
    t.equal(again.label, label, 'the label is free again')
    await keys.delete(label, actor)
  })

  await t.test('a key created but not recorded is deleted again', async (t) => {
    const broken = new N8nKeyService(integrationDeps(failingTransactions(store.db), env()))
    t.teardown(() => broken.close())
    const err = await rejection(broken.create({ label: `unrecorded-${store.kind}`, scopes: ['workflow:list'] }, actor))
    t.match(err, { code: 'store_unavailable', message: /API key \S+ \("unrecorded-.*"\) was created in n8n but could not be recorded \(the store went away\); it was deleted from n8n again/ })
    t.notOk((await keys.list()).items.some((i) => i.label === `unrecorded-${store.kind}`), 'n8n no longer has it')
  })

  await t.test('a key created while the store fails before it is checked against earlier keys is deleted again', async (t) => {
    // Before: the check's error came back raw (no code), and the key stayed in n8n, unrecorded.
    const broken = new N8nKeyService(integrationDeps(failingQueries(store.db, /key_hash = \$1/), env()))
    t.teardown(() => broken.close())
    const err = await rejection(broken.create({ label: `unchecked-${store.kind}`, scopes: ['workflow:list'] }, actor))
    t.match(err, { code: 'store_unavailable', message: /API key \S+ \("unchecked-.*"\) was created in n8n but could not be recorded \(the store went away\); it was deleted from n8n again/ })
    t.notOk((await keys.list()).items.some((i) => i.label === `unchecked-${store.kind}`), 'n8n no longer has it')
  })

  await t.test('a key deleted in n8n whose record then cannot be closed: the error says so, and how the record is closed', async (t) => {
    // Before (found by a review): the store's error alone, as if the key still worked.
    const made = await keys.create({ label: `unclosed-${store.kind}`, scopes: ['workflow:list'] }, actor)
    secrets.push(made.key)
    const broken = new N8nKeyService(integrationDeps(failingTransactions(store.db), env()))
    t.teardown(() => broken.close())
    const err = await rejection(broken.delete(made.label, actor))
    t.match(err, { code: 'store_unavailable', message: `API key ${made.remote_id} ("${made.label}") was deleted from n8n, but its record could not be closed (the store went away): \`keygate n8n list\` shows it as deleted remotely until \`keygate n8n delete ${made.remote_id}\` closes it` })
    t.match((await keys.list()).items.find((i) => i.label === made.label), { state: 'deleted_remotely' }, 'the key is deleted')
    t.match(await keys.delete(made.remote_id, actor), { remote_missing: true, record: { id: made.id, deleted_at: /\d/ } }, 'the command named closes it')
  })

  await t.test("records of keys made as another n8n user (N8N_EMAIL changed) are neither listed as deleted nor closed", async (t) => {
    // n8n lists the logged-in user's keys only: another user's key may well still work.
    const label = `other-user-${store.kind}`
    await store.db.query(
      `INSERT INTO n8n_api_keys (id, base_url, remote_id, label, owner_email, scopes, key_last_eight, key_hash, expires_at, created_by)
       VALUES ($1, $2, 'another-users-key', $3, 'someone-else@example.test', $4, 'abcdefgh', $5, NULL, 'cli:tester')`,
      [recordId('nk'), n8n.url, label, ['workflow:list'], secretHash(`a key of another user, ${store.kind}`)],
    )
    t.notOk((await keys.list()).items.some((i) => i.remote_id === 'another-users-key'), 'not listed (before: deleted_remotely)')
    t.match(await rejection(keys.delete(label, actor)), { code: 'n8n_key_not_found' }, 'before: its record was closed, remote_missing')
    const [row] = await store.db.query<{ deleted_at: Date | null }>(`SELECT deleted_at FROM n8n_api_keys WHERE remote_id = 'another-users-key'`)
    t.equal(row?.deleted_at, null, 'the record stays open')
  })

  await t.test('no secret in the store or the audit details', async (t) => {
    const all = await deps.audit.list(store.db, { limit: 1000 })
    t.ok(all.length >= 8)
    const audit = JSON.stringify(all)
    noSecrets(t, audit, secrets, 'decrypted audit details')
    t.notMatch(audit, JWT, 'no JWT (key or session cookie) in the audit details')
    const dump = await dumpStore(store)
    t.match(dump, /n8n_api_keys/)
    noSecrets(t, dump, secrets, `${store.kind} dump`)
    t.notMatch(dump, JWT, 'no JWT in the dump')
  })
})

// Real processes on the embedded store; on PostgreSQL, where what differs is the store, not the
// process, the CLI's own entry in this process (runCliHere), as test/gitea-cli.test.ts does.
t.test('keygate n8n create, verify, list, delete: real processes on the embedded store, the same commands on PostgreSQL', async (t) => {
  const cwd = mkdtempSync(join(tmpdir(), 'keygate-n8n-cli-'))
  t.teardown(() => rmSync(cwd, { recursive: true, force: true }))
  const url = await freshDatabase(t)
  for (const [kind, storeEnv] of [
    ['embedded', { KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store')), DATABASE_URL: undefined }],
    ['postgres', { DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: Buffer.alloc(32, 9).toString('base64') }],
  ] as const) {
    await t.test(kind, async (t) => {
      const run = (args: string[], input?: string, extra: Record<string, string> = {}) => {
        const options = { env: { ...env(), ...storeEnv, KEYGATE_CONFIG: undefined, LOG_LEVEL: 'debug', ...extra }, ...(input !== undefined ? { input } : {}) }
        return kind === 'embedded' ? runCli(['n8n', ...args], { cwd, ...options }) : runCliHere(['n8n', ...args], options)
      }
      const created = await run(['create', '--label', 'ci', '--scopes', 'workflow:list', '--json'])
      t.equal(created.code, 0, created.stderr)
      const c = created.json()
      secrets.push(c.key)
      t.match(c, { label: 'ci', key: JWT, scopes_enforced: false, warning: /does not enforce API key scopes/ })
      t.same(c.scopes, ['workflow:list'], 'the scope asked for, no more')
      t.equal(created.stderr.split('\n').filter((l) => l.startsWith('keygate: warning:')).join('\n'), `keygate: warning: ${c.warning}`, 'the warning on stderr too, stdout one JSON document')

      const verified = await run(['verify', c.key, '--json'])
      t.equal(verified.code, 0, 'verify succeeds for the new key')
      t.match(verified.json(), { valid: true, record: { id: c.id } })
      t.equal((await run(['verify', '-'], `${c.key}\n`)).code, 0, 'verify reads the key from stdin')

      const listed = await run(['list', '--json'])
      t.equal(listed.code, 0, listed.stderr)
      t.match(listed.json().items.find((i: { remote_id: string }) => i.remote_id === c.remote_id), { state: 'in_sync', label: 'ci' })
      const table = await run(['list'])
      t.match(table.stdout, /^ID\s+LABEL\s+SCOPES\s+ENFORCED\s+EXPIRES\s+STATE/)
      t.match(table.stdout, new RegExp(`${c.remote_id}\\s+ci\\s+workflow:list\\s+no\\s+-\\s+in sync\\s+${c.id}`), 'the scopes marked as not enforced')

      const deleted = await run(['delete', 'ci', '--json'])
      t.equal(deleted.code, 0, deleted.stderr)
      t.match(deleted.json(), { deleted: true, remote_id: c.remote_id, remote_missing: false })
      const refused = await run(['verify', c.key, '--json'])
      t.equal(refused.code, 1, 'after delete, verify fails')
      t.match(refused.json(), { valid: false, reason: 'refused' })
      t.match(refused.stderr, /key refused: refused \(keygate record nk_\w+, deleted /)
      t.notOk((await run(['list', '--json'])).json().items.some((i: { remote_id: string }) => i.remote_id === c.remote_id), 'no longer listed')

      // What does not depend on the store runs once, on PostgreSQL (each embedded-store process
      // opens PGlite from disk, the slow part of these runs).
      if (kind === 'embedded') return

      const human = await run(['create', '--label', 'human', '--scopes', 'workflow:list', '--expires-in', '7d'])
      t.equal(human.code, 0, human.stderr)
      t.match(human.stderr, `keygate: warning: n8n at ${n8n.url} does not enforce API key scopes (its licence lacks API key scopes): the key was made with workflow:list, but it can do whatever the role of ${n8n.email} may\n`)
      t.match(human.stdout, /Created n8n API key \S+ \(human\) with workflow:list, expires .*\nThe key is shown once; store it now:\n(eyJ\S+)\n$/)
      secrets.push(/\n(eyJ\S+)\n$/.exec(human.stdout)?.[1] as string)
      t.equal((await run(['create', '--label', 'human', '--scopes', 'workflow:list'])).code, 1, 'a duplicate label is refused')
      t.equal((await run(['delete', 'human'])).code, 0)

      const wrong = await run(['list', '--json'], undefined, { N8N_PASSWORD: 'Wrong-password-1' })
      t.equal(wrong.code, 1, 'a wrong password is refused with exit 1')
      t.match(wrong.json().error, { code: 'n8n_auth_failed', message: /refused the login of "owner@keygate\.test" \(N8N_EMAIL\/N8N_PASSWORD\): 401 Wrong username or password/ })
      t.notMatch(wrong.stdout + wrong.stderr, /Wrong-password-1/)
    })
  }
})

t.test('the admin API: /v1/n8n/keys against the real n8n', async (t) => {
  const store = await memoryStore(t)
  const service = new N8nKeyService(integrationDeps(store, env()))
  t.teardown(() => service.close())
  const h = await startAdmin(t, store, { n8n: service })
  const before = await h.auditRows()
  const created = await h.call('POST', '/v1/n8n/keys', { body: { label: 'via-api', scopes: ['workflow:list'] } })
  await documented(t, h, 'createN8nKey', created)
  secrets.push(created.json.key)
  t.match(created.json, { label: 'via-api', key: JWT, created_by: `key:${h.adminKeyId}`, scopes_enforced: false, warning: /does not enforce API key scopes/ })
  t.same(created.json.scopes, ['workflow:list'], 'the scope asked for, no more')
  // Documented as what they are: the answer with either of another type no longer matches.
  const validator = await servedValidator(h)
  for (const [field, value] of [['warning', 5], ['scopes_enforced', 'no']] as const) {
    t.not(validator.answerProblems({ method: 'POST', path: '/v1/n8n/keys' }, 201, { ...created.json, [field]: value }).length, 0, `${field} is documented`)
  }
  t.equal(await h.auditRows(), before + 1, 'one audit row for the create')

  const verified = await h.call('POST', '/v1/n8n/keys/verify', { body: { secret: created.json.key } })
  await documented(t, h, 'verifyN8nKey', verified)
  t.match(verified.json, { valid: true, record: { id: created.json.id } })

  const listed = await h.call('GET', '/v1/n8n/keys')
  await documented(t, h, 'listN8nKeys', listed)
  t.match(listed.json.items.find((i: { remote_id: string }) => i.remote_id === created.json.remote_id), { state: 'in_sync', label: 'via-api' })
  t.notMatch(listed.text, created.json.key, 'the list never shows the key')

  const unknown = await h.call('POST', '/v1/n8n/keys', { body: { label: 'x', scopes: ['workflow:fly'] } })
  await documented(t, h, 'createN8nKey', unknown, 400)
  t.equal(unknown.json.error.code, 'n8n_scope_unknown')
  const twice = await h.call('POST', '/v1/n8n/keys', { body: { label: 'via-api', scopes: ['workflow:list'] } })
  await documented(t, h, 'createN8nKey', twice, 409)
  t.equal(twice.json.error.code, 'n8n_key_exists')

  const deleted = await h.call('DELETE', '/v1/n8n/keys/via-api')
  await documented(t, h, 'deleteN8nKey', deleted)
  t.match(deleted.json, { deleted: true, remote_id: created.json.remote_id, remote_missing: false })
  t.equal(await h.auditRows(), before + 2, 'one audit row for the delete')
  const refused = await h.call('POST', '/v1/n8n/keys/verify', { body: { secret: created.json.key } })
  await documented(t, h, 'verifyN8nKey', refused)
  t.match(refused.json, { valid: false, reason: 'refused' })
  const missing = await h.call('DELETE', '/v1/n8n/keys/via-api')
  await documented(t, h, 'deleteN8nKey', missing, 404)
  t.equal(missing.json.error.code, 'n8n_key_not_found')
})

t.test("keygate n8n through a running server's admin API (KEYGATE_ADMIN_URL), while the server holds the embedded store", async (t) => {
  const cwd = mkdtempSync(join(tmpdir(), 'keygate-n8n-remote-'))
  t.teardown(() => rmSync(cwd, { recursive: true, force: true }))
  const dataDir = await seedDataDir(join(cwd, 'store'))
  const admin = 'remote-n8n-admin-token-0123456789'
  const serve = await startKeygate(t, { args: ['--upstream', 'http://127.0.0.1:9'], env: isolatedEnv({ ...env(), KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKEN: admin }), cwd })
  // The CLI has no n8n settings of its own: the server logs in to n8n with its own.
  const run = (args: string[], input?: string) =>
    runCli(['n8n', ...args], { cwd, env: isolatedEnv({ KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_URL: serve.admin, KEYGATE_ADMIN_TOKEN: admin, LOG_LEVEL: 'debug' }), ...(input !== undefined ? { input } : {}) })

  const created = await run(['create', '--label', 'remote', '--scopes', 'workflow:list', '--expires-in', '7d', '--json'])
  t.equal(created.code, 0, created.stderr)
  const c = created.json()
  secrets.push(c.key)
  t.match(c, { label: 'remote', key: JWT, created_by: 'token', scopes_enforced: false })
  t.same(c.scopes, ['workflow:list'], 'the scope asked for, no more')
  t.match(created.stderr, `keygate: warning: n8n at ${n8n.url} does not enforce API key scopes`, "the server's warning, printed by the CLI")
  const verified = await run(['verify', '-'], `${c.key}\n`)
  t.equal(verified.code, 0, verified.stderr)
  t.equal(verified.stdout, `valid: keygate record ${c.id} (remote, created by token); its scopes were not enforced by n8n when it was made\n`)
  const table = await run(['list'])
  t.equal(table.code, 0, table.stderr)
  t.match(table.stdout, new RegExp(`${c.remote_id}\\s+remote\\s+workflow:list\\s+no\\s+\\S+\\s+in sync\\s+${c.id}`))
  const twice = await run(['create', '--label', 'remote', '--scopes', 'workflow:list', '--json'])
  t.equal(twice.code, 1)
  t.equal(twice.json().error.code, 'n8n_key_exists', "the server's refusal, as on the store")

  const deleted = await run(['delete', 'remote'])
  t.equal(deleted.code, 0, deleted.stderr)
  t.equal(deleted.stdout, `Deleted n8n API key ${c.remote_id} (remote).\n`)
  const refused = await run(['verify', c.key])
  t.equal(refused.code, 1)
  t.match(refused.stderr, /key refused: refused \(keygate record nk_\w+, deleted /)
  const malformed = await run(['verify', '-', '--json'], `${'x'.repeat(5000)}\n`)
  t.equal(malformed.code, 1)
  t.same(malformed.json(), { valid: false, reason: 'malformed', record: null }, 'a key of 5000 characters: the verdict, as on the store (before: validation_failed)')
  // No key at all is the command's usage error, the admin API not asked; the API's own verdict on one is malformed.
  const none = await run(['verify', '-', '--json'], '\n')
  t.equal(none.code, 2)
  t.match(none.json().error, { code: 'usage_error', message: /^no key was read from stdin/ }, 'an empty first line: no key given')
  const empty = await request(`${serve.admin}/v1/n8n/keys/verify`, { method: 'POST', headers: { authorization: `Bearer ${admin}`, 'content-type': 'application/json' }, body: '{"secret":""}' })
  t.equal(empty.statusCode, 200)
  t.same(await empty.body.json(), { valid: false, reason: 'malformed', record: null }, 'a key of 0 characters, asked of the admin API: the verdict (before: validation_failed)')
  const dots = await run(['delete', '.'])
  t.equal(dots.code, 2, 'a label no URL path carries is a usage error')
  t.match(dots.stderr, /"\." cannot be named through the admin API .*give the key's id/)
  const flags = await run(['list', '--n8n-email', 'someone@example.test'])
  t.equal(flags.code, 2, 'n8n flags are refused through the admin API, not ignored')
  t.match(flags.stderr, /--n8n-email: through the admin API \(KEYGATE_ADMIN_URL or --admin-url\) the server calls n8n with its own settings/)
  t.equal(await serve.stop(), 0)
})

t.test('usage errors exit 2 before anything is opened', async (t) => {
  const cwd = mkdtempSync(join(tmpdir(), 'keygate-n8n-usage-'))
  t.teardown(() => rmSync(cwd, { recursive: true, force: true }))
  const store = { ...env(), KEYGATE_DATA_DIR: join(cwd, 'store'), DATABASE_URL: undefined }
  for (const [args, pattern] of [
    [['n8n'], /usage: keygate n8n <command>/],
    [['n8n', 'create', '--scopes', 'workflow:list'], /--label is required/],
    [['n8n', 'create', '--label', 'x'], /--scopes is required/],
    [['n8n', 'create', '--label', 'x', '--scopes', ','], /--scopes: "," has an empty item; expected a comma-separated list without empty items\n/],
    [['n8n', 'create', '--label', 'x', '--scopes', 'workflow:list', '--expires-in', 'soon'], /--expires-in: "soon" is not a duration/],
    // Values the API's schema never takes, named by the flag (before: the store was opened, then exit 1).
    [['n8n', 'create', '--label', 'x', '--scopes', 'workflow:list', '--expires-at', 'soon'], /^keygate: --expires-at: "soon" is not allowed; expected an RFC 3339 date-time/],
    [['n8n', 'create', '--label', 'x', '--scopes', 'BAD SCOPE'], /^keygate: --scopes \(scopes\[0\]\): "BAD SCOPE" is not allowed/],
    [['n8n', 'create', '--label', 'a<b', '--scopes', 'workflow:list'], /^keygate: --label: "a<b" is not allowed/],
    [['n8n', 'create', '--label', 'a\tb', '--scopes', 'workflow:list'], /^keygate: --label: "a\\tb" is not allowed/],
    [['n8n', 'delete'], /missing argument/],
    [['n8n', 'verify', 'a', 'b'], /unexpected argument "b"/],
  ] as const) {
    // Each case in this process through the command line's entry; the first also as the real process.
    for (const r of [await runCliHere([...args], { env: store }), ...(args.length === 1 ? [await runCli([...args])] : [])]) {
      t.equal(r.code, 2, `keygate ${args.join(' ')} exits 2`)
      t.match(r.stderr, pattern)
    }
  }
  t.notOk(existsSync(join(cwd, 'store')), 'no store was made or opened')
})

t.test('n8n stopped: unreachable, from the service and the CLI', async (t) => {
  const keys = new N8nKeyService(integrationDeps(await memoryStore(t), env()))
  t.teardown(() => keys.close())
  await n8n.stop()
  t.match(await rejection(keys.list()), { code: 'n8n_unreachable', status: 502, message: new RegExp(`n8n at ${n8n.url} could not be reached \\(ECONNREFUSED\\)`) })
  t.match(await rejection(keys.verify('abcdef')), { code: 'n8n_unreachable' })
  const cwd = mkdtempSync(join(tmpdir(), 'keygate-n8n-down-'))
  t.teardown(() => rmSync(cwd, { recursive: true, force: true }))
  const r = await runCli(['n8n', 'create', '--label', 'x', '--scopes', 'workflow:list', '--json'], { cwd, env: { ...env(), KEYGATE_DATA_DIR: await seedDataDir(join(cwd, 'store')), DATABASE_URL: undefined } })
  t.equal(r.code, 1)
  t.equal(r.json().error.code, 'n8n_unreachable')
})

/** The processes running with `folder` in their command line or environment: that n8n's, and what started and watches it. */
function processesOf(folder: string): number[] {
  const found: number[] = []
  for (const pid of readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'latin1')
      if (cmdline.includes(folder) || readFileSync(`/proc/${pid}/environ`, 'latin1').includes(`=${folder}\0`)) found.push(Number(pid))
    } catch {
      // Ended meanwhile, or another user's.
    }
  }
  return found
}

// Before (found by a review), n8n was stopped by the teardown or a process exit handler only, and
// tap's kill of a test file at its timeout (SIGALRM, then SIGKILL) runs neither: n8n was left
// running, its parent PID 1, answering on its port.
t.test('a test process killed before its teardown (as tap kills one at its timeout) leaves no n8n behind', async (t) => {
  const held = spawnClean(process.execPath, [fileURLToPath(new URL('./fixtures/n8n-held.ts', import.meta.url))], { env: childEnv(), stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  const started = await new Promise<{ url: string; folder: string } | undefined>((resolve) => {
    held.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d
      const line = /^n8n: (.*)$/m.exec(out)
      if (line) resolve(JSON.parse(line[1] as string))
    })
    held.once('exit', () => resolve(undefined))
  })
  t.teardown(() => {
    held.kill('SIGKILL')
    // What the kill left (before: n8n itself), ended here; and its folder, which no teardown removed.
    if (started === undefined) return
    for (const pid of processesOf(started.folder)) process.kill(pid, 'SIGKILL')
    rmSync(started.folder, { recursive: true, force: true })
  })
  if (started === undefined) throw new Error(`the test process ended before n8n answered:\n${out.slice(-3000)}`)
  t.ok(processesOf(started.folder).length > 0, 'n8n runs for the test process')
  held.kill('SIGKILL')
  await until(t, 'no process of that n8n is left', () => processesOf(started.folder).length === 0, 60_000)
  t.notOk(existsSync(started.folder), 'nor its user folder')
  t.match(await request(`${started.url}/rest/settings`).catch((err: Error & { code?: string }) => err), { code: 'ECONNREFUSED' }, 'nothing answers on its port')
})

t.test('no secret in any captured log or CLI output', async (t) => {
  t.ok(capturedLogs.some((l) => l.includes('created an n8n API key')), 'service logs were captured')
  t.ok(capturedStderr.some((s) => s.includes('"level":"debug"') || s.includes('"level":"info"')), 'CLI logs were captured at debug level')
  const logs = capturedLogs.join('\n') + capturedStderr.join('\n')
  noSecrets(t, logs, secrets, 'captured logs')
  t.notMatch(logs, JWT, 'no JWT in the logs')
  t.notMatch(logs, /n8n-auth=/, 'no session cookie in the logs')
})
