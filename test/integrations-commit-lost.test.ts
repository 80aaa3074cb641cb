// The connection to PostgreSQL lost at the COMMIT of a Gitea token's or n8n API key's record,
// made just after the service created the credential: the commit may have been made, its answer
// lost. Before (found by a review), keygate took any failure of that transaction for "not
// recorded" and deleted the credential again, saying so: with the commit made, the record and its
// `created` audit row stayed, of a credential deleted, and the secret was never shown. Against the
// fake Gitea and the real n8n, through a TCP gate in front of PostgreSQL that cuts the connection.
import t, { type Test } from 'tap'
import { openDb, type Db } from '../core/db.ts'
import { GiteaTokenService } from '../core/integrations/gitea.ts'
import { N8nKeyService } from '../core/integrations/n8n.ts'
import { FakeGitea } from './helpers/fake-gitea.ts'
import { integrationDeps } from './helpers/integrations.ts'
import { startN8n } from './helpers/n8n.ts'
import { migratedDatabase, rejection } from './helpers/stores.ts'
import { gateInFront } from './helpers/tcp-gate.ts'

const actor = { actor: 'cli:tester' }

/** What a case needs of a service: a create through the gated store, and the same service on the store reached directly. */
interface Subject {
  table: 'gitea_tokens' | 'n8n_api_keys'
  create(db: Db, name: string): Promise<{ id: string; remote_id: string; secret: string }>
  /** The remote ids of the credentials named `name` in the service. */
  remote(name: string): Promise<string[]>
  /** The service on the store reached directly. */
  direct: { list(): Promise<{ items: Array<{ state: string; name?: string; label?: string }> }>; delete(ref: string, a: typeof actor): Promise<{ remote_missing: boolean }> }
  /** The service's name, as the commands have it. */
  label: 'gitea' | 'n8n'
}

/** `service`, closed when `t` ends. */
function closing<S extends { close(): Promise<void> }>(t: Test, service: S): S {
  t.teardown(() => service.close())
  return service
}

async function cases(t: Test, url: string, direct: Db, s: Subject): Promise<void> {
  /** A store through a new gate that cuts the connection of the record's INSERT at its COMMIT. */
  const gated = async (t: Test, when: 'before' | 'after', next?: 'refused') => {
    const { gate, url: through } = await gateInFront(t, url)
    const db = await openDb({ databaseUrl: through })
    t.teardown(() => db.close())
    const cut = gate.cutOn(`INSERT INTO ${s.table}`, 'COMMIT\u0000', when, next)
    return { db, cut }
  }
  const rows = (name: string) => direct.query<{ id: string; remote_id: string; deleted_at: Date | null }>(`SELECT id, remote_id::text, deleted_at FROM ${s.table} WHERE ${s.table === 'gitea_tokens' ? 'name' : 'label'} = $1`, [name])
  const state = async (name: string) => (await s.direct.list()).items.find((i) => (i.name ?? i.label) === name)?.state
  const audit = (id: string) => direct.query<{ action: string }>('SELECT action FROM api_key_audit_log WHERE key_id = $1', [id])

  await t.test('the commit made, its answer lost: the create succeeds, the credential kept and recorded', async (t) => {
    const { db, cut } = await gated(t, 'after')
    const name = `${s.label}-kept`
    const made = await s.create(db, name)
    await cut
    t.ok(made.secret, 'the secret is handed out')
    t.same(await s.remote(name), [made.remote_id], `${s.table}: the credential is still in the service`)
    const recorded = await rows(name)
    t.equal(recorded.length, 1, 'one record')
    t.match(recorded, [{ id: made.id, deleted_at: null }], 'and recorded')
    t.same((await audit(made.id)).map((a) => a.action), [s.table === 'gitea_tokens' ? 'gitea.token.created' : 'n8n.key.created'], 'with its audit row')
    t.equal(await state(name), 'in_sync')
  })

  await t.test('the commit not made: deleted again, as ever', async (t) => {
    const { db, cut } = await gated(t, 'before')
    const name = `${s.label}-rolled-back`
    const err = await rejection(s.create(db, name))
    await cut
    t.match(err, { code: 'store_unavailable', message: /could not be recorded .*; it was deleted from (Gitea|n8n) again$/ })
    t.same(await s.remote(name), [], 'the credential is gone')
    t.same(await rows(name), [], 'no record')
  })

  await t.test('the answer lost and the store gone: deleted again, and the message says how to close a record that was kept', async (t) => {
    const { db, cut } = await gated(t, 'after', 'refused')
    const name = `${s.label}-unknown`
    const err = await rejection(s.create(db, name))
    await cut
    t.same(await s.remote(name), [], 'the credential is deleted')
    const [row] = await rows(name)
    t.ok(row && row.deleted_at === null, 'the commit was made: the record is live')
    const remoteId = row?.remote_id ?? ''
    t.match(err, { code: 'store_unavailable', message: /whether the record was kept could not be asked/ })
    t.ok(err.message.includes(`\`${`keygate ${s.label} delete ${remoteId}`}\``), `names the command that closes it: ${err.message}`)
    t.equal(await state(name), 'deleted_remotely', 'listed as deleted remotely, as the message says')
    t.match(await s.direct.delete(remoteId, actor), { remote_missing: true }, 'the command named closes it')
    const closed = await rows(name)
    t.equal(closed.length, 1, 'one record')
    t.match(closed, [{ deleted_at: /./ }])
  })
}

t.test('Gitea', async (t) => {
  const { url, direct } = await migratedDatabase(t)
  const fake = new FakeGitea()
  await fake.start()
  fake.addUser('alice', 'alice-Secret-pw-1')
  t.teardown(() => fake.stop())
  const env = { GITEA_URL: fake.url, GITEA_USERNAME: 'alice', GITEA_PASSWORD: 'alice-Secret-pw-1' }
  const service = (db: Db) => closing(t, new GiteaTokenService(integrationDeps(db, env)))
  await cases(t, url, direct, {
    direct: service(direct),
    table: 'gitea_tokens',
    label: 'gitea',
    create: async (db, name) => {
      const made = await service(db).create({ name, scopes: ['read:user'] }, actor)
      return { id: made.id, remote_id: String(made.remote_id), secret: made.token }
    },
    remote: async (name) => fake.tokens.filter((x) => x.name === name).map((x) => String(x.id)),
  })
})

t.test('n8n', async (t) => {
  const { url, direct } = await migratedDatabase(t)
  const n8n = await startN8n(t)
  const env = { N8N_URL: n8n.url, N8N_EMAIL: n8n.email, N8N_PASSWORD: n8n.password }
  const service = (db: Db) => closing(t, new N8nKeyService(integrationDeps(db, env)))
  const direct$ = service(direct)
  await cases(t, url, direct, {
    direct: direct$,
    table: 'n8n_api_keys',
    label: 'n8n',
    create: async (db, name) => {
      const made = await service(db).create({ label: name, scopes: ['workflow:list'] }, actor)
      return { id: made.id, remote_id: made.remote_id, secret: made.key }
    },
    remote: async (name) => (await direct$.list()).items.filter((i) => i.label === name && i.remote).map((i) => i.remote_id),
  })
})
