// keygate killed (SIGKILL) in the middle of a Gitea or n8n operation, between the service carrying
// it out and keygate recording it: `keygate gitea|n8n create|delete` on PostgreSQL, the service's
// answer held back by a proxy until the command is killed. What is left must be recoverable as
// docs/integrations.md says: a credential made but not recorded is named by the create retried
// (before, found by a review, "already has a token named so" alone, and a token of a user other
// than GITEA_USERNAME showed nowhere in keygate), and a record of a credential deleted is listed
// as deleted remotely and closed by the delete retried.
import t, { type Test } from 'tap'
import { openDb } from '../core/db.ts'
import { N8nKeyService } from '../core/integrations/n8n.ts'
import { childEnv, KEYGATE_BIN, runCli, spawnClean } from './helpers/cli.ts'
import { postgresEnv } from './helpers/cli-lifecycle.ts'
import { FakeGitea } from './helpers/fake-gitea.ts'
import { integrationDeps, proxyTo } from './helpers/integrations.ts'
import { startN8n } from './helpers/n8n.ts'
import { rejection } from './helpers/stores.ts'

/**
 * A proxy in front of `target` whose `hold(route)` keeps back the answer to the next request whose
 * method and path (`POST /rest/api-keys`) start so, once the service has carried it out, and
 * resolves then.
 */
async function holdingProxy(t: Test, target: { url: string }): Promise<{ url: string; hold(route: string): Promise<void> }> {
  let held: { route: string; arrived: () => void } | undefined
  const url = await proxyTo(t, target, {
    answer: (req) => {
      if (held === undefined || !`${req.method} ${req.url}`.startsWith(held.route)) return false
      held.arrived()
      held = undefined
      return true
    },
  })
  return { url, hold: (route) => new Promise<void>((arrived) => void (held = { route, arrived })) }
}

/** Runs `keygate args` and kills it (SIGKILL) once `held` resolves: the service has done the work, keygate has not heard of it. */
async function killedWhen(t: Test, env: Record<string, string | undefined>, args: string[], held: Promise<void>): Promise<void> {
  const child = spawnClean(process.execPath, [KEYGATE_BIN, ...args], { env: childEnv(env), stdio: 'ignore' })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  t.teardown(() => void child.kill('SIGKILL'))
  await held
  child.kill('SIGKILL')
  await exited
}

t.test('Gitea', async (t) => {
  const fake = new FakeGitea()
  await fake.start()
  fake.addUser('root', 'root-Secret-pw-2', { is_admin: true })
  fake.addUser('bob', 'bob-Secret-pw-3')
  t.teardown(() => fake.stop())
  const proxy = await holdingProxy(t, fake)
  const { url: database, env: store } = await postgresEnv(t)
  const env = { ...store, GITEA_URL: proxy.url, GITEA_USERNAME: 'root', GITEA_PASSWORD: 'root-Secret-pw-2' }
  const db = await openDb({ databaseUrl: database })
  t.teardown(() => db.close())
  const live = async (name: string) => (await db.query('SELECT id FROM gitea_tokens WHERE name = $1 AND deleted_at IS NULL', [name])).length

  for (const [user, flag] of [['root', []], ['bob', ['--user', 'bob']]] as const) {
    await t.test(`create killed once Gitea made the token (${user === 'root' ? 'GITEA_USERNAME' : 'another user'}): the retry names it and how to delete it`, async (t) => {
      const name = `cut-${user}`
      await killedWhen(t, env, ['gitea', 'create', '--name', name, '--scopes', 'read:user', ...flag], proxy.hold('POST /api/v1/users/'))
      const made = fake.tokens.filter((x) => x.name === name)
      t.equal(made.length, 1, 'Gitea made the token')
      t.equal(await live(name), 0, 'keygate has no record of it')
      const command = `keygate gitea delete ${made[0]?.id}${user === 'root' ? '' : ' --user bob'}`
      const retry = await runCli(['gitea', 'create', '--name', name, '--scopes', 'read:user', ...flag], { env })
      t.equal(retry.code, 1)
      t.match(retry.stderr, /already has a token named so: .*; keygate holds no record of it \(id \d+\): it was made by hand, or by a create cut off before keygate recorded it \(its secret never shown\)/)
      t.ok(retry.stderr.includes(`delete it with \`${command}\``), `names ${command}`)
      const deleted = await runCli([...command.split(' ').slice(1), '--json'], { env })
      t.equal(deleted.code, 0, 'the command named deletes it')
      t.match(JSON.parse(deleted.stdout), { remote_missing: false, record: null })
      const again = await runCli(['gitea', 'create', '--name', name, '--scopes', 'read:user', '--json', ...flag], { env })
      t.equal(again.code, 0, 'then the name can be used again')
      t.equal(fake.tokens.filter((x) => x.name === name).length, 1, 'one token of that name, recorded')
      t.equal(await live(name), 1)
    })
  }

  await t.test('delete killed once Gitea deleted the token: listed as deleted remotely, closed by the delete retried', async (t) => {
    t.equal((await runCli(['gitea', 'create', '--name', 'cut-delete', '--scopes', 'read:user'], { env })).code, 0)
    await killedWhen(t, env, ['gitea', 'delete', 'cut-delete'], proxy.hold('DELETE /api/v1/users/'))
    t.notOk(fake.tokens.some((x) => x.name === 'cut-delete'), 'Gitea deleted the token')
    t.equal(await live('cut-delete'), 1, 'the record is still open')
    const list = JSON.parse((await runCli(['gitea', 'list', '--json'], { env })).stdout) as { items: Array<{ name: string; state: string }> }
    t.match(list.items.find((i) => i.name === 'cut-delete'), { state: 'deleted_remotely' })
    const again = await runCli(['gitea', 'delete', 'cut-delete', '--json'], { env })
    t.equal(again.code, 0)
    t.match(JSON.parse(again.stdout), { remote_missing: true, record: { deleted_at: /./ } })
    t.equal(await live('cut-delete'), 0, 'closed')
  })
})

t.test('n8n: create killed once n8n made the key: the retry names it and how to delete it', async (t) => {
  const n8n = await startN8n(t)
  const proxy = await holdingProxy(t, n8n)
  const { url: database, env: store } = await postgresEnv(t)
  const env = { ...store, N8N_URL: proxy.url, N8N_EMAIL: n8n.email, N8N_PASSWORD: n8n.password }
  await killedWhen(t, env, ['n8n', 'create', '--label', 'cut', '--scopes', 'workflow:list'], proxy.hold('POST /rest/api-keys'))
  // The retries in this process: n8n allows five logins a minute, and each command logs in.
  const db = await openDb({ databaseUrl: database })
  t.teardown(() => db.close())
  const keys = new N8nKeyService(integrationDeps(db, env as Record<string, string>))
  t.teardown(() => keys.close())
  const made = (await keys.list()).items.filter((i) => i.label === 'cut')
  t.equal(made.length, 1, 'n8n made one key of that label')
  t.match(made[0], { state: 'not_recorded' }, 'keygate has no record of it')
  const err = await rejection(keys.create({ label: 'cut', scopes: ['workflow:list'] }, { actor: 'cli:tester' }))
  t.match(err, { code: 'n8n_key_exists', message: /already has an API key labelled "cut"; .*; keygate holds no record of it \(id \S+\): it was made by hand, or by a create cut off before keygate recorded it/ })
  t.ok(err.message.includes(`delete it with \`keygate n8n delete ${made[0]?.remote_id}\``), 'names the command that deletes it')
  t.match(await keys.delete(String(made[0]?.remote_id), { actor: 'cli:tester' }), { remote_missing: false, record: null })
  t.match(await keys.create({ label: 'cut', scopes: ['workflow:list'] }, { actor: 'cli:tester' }), { label: 'cut' }, 'then the label can be used again')
})
