// The embedded store's files and folders, from a review of them against real processes: who may
// open a data folder, and a file of its own user it may not read and write. The files that must
// appear whole, and how a file-system error reads, are test/store-files-damage.test.ts (apart so
// that the two run side by side: together they came near tap's 300 s for a file on a loaded machine).
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { chmodSync, chownSync, mkdirSync, readdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { openDb } from '../core/db.ts'
import { asNobody, NOBODY } from './helpers/as-nobody.ts'
import { trailIs } from './helpers/audit.ts'
import { runCli } from './helpers/cli.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { rejection } from './helpers/stores.ts'
import { embeddedEnv, tempDir } from './helpers/store-files.ts'

const AS_ROOT = process.getuid?.() === 0 ? false : 'the tests do not run as root'
const nobody = asNobody(t)
const AS_NOBODY = typeof nobody === 'string' ? nobody : false

t.test("a data folder of another user is refused before anything is written, naming its owner", { skip: AS_ROOT }, async (t) => {
  const dir = tempDir(t)
  const theirs = join(dir, 'theirs')
  mkdirSync(theirs, { mode: 0o700 })
  chownSync(theirs, NOBODY, NOBODY)
  const err = await rejection(openDb({ dataDir: theirs }))
  t.equal(err.code, 'store_unavailable')
  t.match(err.message, `the embedded store's folder ${theirs} belongs to uid ${NOBODY} (nobody), not to this process's user (uid 0)`)
  t.match(err.message, 'run keygate as that user, such as `sudo -u nobody keygate …`')
  t.same(readdirSync(theirs), [], 'nothing is written there: no lock, no pgdata/')

  // A uid no user has is named by number, as sudo takes it.
  const nameless = join(dir, 'nameless')
  mkdirSync(nameless, { mode: 0o700 })
  chownSync(nameless, 54321, 54321)
  t.match((await rejection(openDb({ dataDir: nameless }))).message, `belongs to uid 54321, not to this process's user (uid 0): files written there as this user can be unreadable to their owner, whose store then fails to start; run keygate as that user, such as \`sudo -u '#54321' keygate …\``)

  // The data folder root's, PGlite's folder in it another user's (the user whose store it is).
  const mixed = await seedDataDir(join(dir, 'mixed'))
  chownSync(join(mixed, 'pgdata'), NOBODY, NOBODY)
  const refused = await rejection(openDb({ dataDir: mixed }))
  t.match(refused.message, `the embedded store's folder ${join(mixed, 'pgdata')} belongs to uid ${NOBODY} (nobody)`)
  t.same(readdirSync(mixed), ['pgdata'], 'no lock was taken')

  // The real command, as root on the folder of a service that runs as its own user.
  const service = await seedDataDir(join(dir, 'service'))
  spawnSync('chown', ['-R', `${NOBODY}:${NOBODY}`, service])
  const created = await runCli(['api-key', 'create', '--type', 'user', '--name', 'as root', '--json'], { env: embeddedEnv(service) })
  t.equal(created.code, 1)
  t.equal(created.json().error.code, 'store_unavailable')
  t.match(created.json().error.message, /belongs to uid 65534 \(nobody\).*sudo -u nobody keygate/)
  const rootsFiles = spawnSync('find', [service, '-uid', '0'], { encoding: 'utf8' }).stdout
  t.equal(rootsFiles, '', 'no file of root is left in it')

  // The folder of this process's own user opens, as before.
  const mine = await seedDataDir(join(dir, 'mine'))
  const db = await openDb({ dataDir: mine, shortLived: true })
  t.same(await db.query('SELECT 1 AS one'), [{ one: 1 }])
  await db.close()
})

t.test('a folder another user shares through its group (a volume under an arbitrary uid) opens, as before', { skip: AS_NOBODY }, async (t) => {
  if (typeof nobody === 'string') return
  const dir = tempDir(t)
  chmodSync(dir, 0o755)
  // The volume: root's, writable by nobody's group; PGlite's folder in it nobody's own.
  const volume = await seedDataDir(join(dir, 'volume'), { migrated: true })
  spawnSync('chown', ['-R', `${NOBODY}:${NOBODY}`, join(volume, 'pgdata')])
  chownSync(volume, 0, NOBODY)
  chmodSync(volume, 0o2770)
  const listed = await nobody.run(['api-key', 'list', '--json'], embeddedEnv(volume))
  t.equal(listed.code, 0, listed.stderr)
  t.same(listed.json().items, [], 'and lists its keys')
})

t.test('a folder open to every user (an emptyDir) is refused with the advice to use a folder inside it, which then opens', { skip: AS_NOBODY }, async (t) => {
  // Before (found by a deployment review): the advice was to run as its owner, `sudo -u root
  // keygate …`, in a pod that runs as a user of its own.
  if (typeof nobody === 'string') return
  const dir = tempDir(t)
  chmodSync(dir, 0o755)
  const volume = join(dir, 'volume')
  mkdirSync(volume)
  chmodSync(volume, 0o777)
  const refused = await nobody.run(['api-key', 'create', '--type', 'user', '--name', 'pod', '--json'], embeddedEnv(volume))
  t.equal(refused.code, 1, refused.stderr)
  t.match(refused.json().error.message, `the embedded store's folder ${volume} belongs to uid 0 (root)`)
  t.match(refused.json().error.message, 'it is open to every user (a shared volume, such as a Kubernetes emptyDir): point KEYGATE_DATA_DIR (store.data_dir) at a folder inside it')
  t.notMatch(refused.json().error.message, /sudo -u root/)
  const inside = await nobody.run(['api-key', 'create', '--type', 'user', '--name', 'pod', '--json'], embeddedEnv(join(volume, 'keygate')))
  t.equal(inside.code, 0, inside.stderr)
  t.equal(statSync(join(volume, 'keygate')).uid, NOBODY, "the folder inside is made as the user's own")
})

// A uid no user is named by, as a container's runAsUser (deploy/kubernetes/sidecar.yaml's 10001).
const NAMELESS = [10001, 10002, 10003, 20001, 30001].find((uid) => spawnSync('getent', ['passwd', String(uid)]).status === 2) ?? 10001
const nameless = asNobody(t, NAMELESS)

t.test('a command run under a uid that names no user (a container\'s runAsUser) is audited as cli:<uid>', { skip: typeof nameless === 'string' ? nameless : false }, async (t) => {
  // Before (found by a docs review): os.userInfo() throws for such a uid, and the actor was `cli`
  // alone, where README promises `cli:<user>`: every change made with the CLI in the Kubernetes
  // sidecar's pod was audited as no one in particular.
  if (typeof nameless === 'string') return
  const dir = tempDir(t)
  chmodSync(dir, 0o755)
  // A store of the uid's own, from the tests' migrated folder: what is audited is this test's
  // subject, not the making of a store (PGlite's initdb, some 6 s of CPU), which the test above
  // runs as nobody.
  const volume = await seedDataDir(join(dir, 'volume'), { migrated: true })
  spawnSync('chown', ['-R', `${NAMELESS}:${NAMELESS}`, volume])
  const made = await nameless.run(['api-key', 'create', '--type', 'user', '--name', 'pod', '--json'], embeddedEnv(volume))
  t.equal(made.code, 0, made.stderr)
  const trail = await nameless.run(['api-key', 'audit', made.json().id, '--json'], embeddedEnv(volume))
  t.equal(trail.code, 0, trail.stderr)
  // The whole trail (its one row written twice passed a check of items[0] alone, found by a review).
  trailIs(t, trail.json().items, [{ action: 'key.created', actor: `cli:${NAMELESS}` }], 'the actor names the uid, as ls and ps do for a uid without a name')
})

t.test('a uid that names no user, without HOME (env -i, a bare exec), runs its command with no compile cache', { skip: typeof nameless === 'string' ? nameless : false }, async (t) => {
  // Before (found by a deployment review): bin/keygate.js asked os.homedir() for the compile
  // cache's folder outside the guard that leaves the cache off, and for such a uid it throws
  // (uv_os_homedir ENOENT): every command, `serve` and `config check` too, ended at its first
  // line with a stack trace, where a cache that cannot be had is to cost only the start's speed.
  if (typeof nameless === 'string') return
  const bare = { HOME: undefined, XDG_CACHE_HOME: undefined, NODE_COMPILE_CACHE: undefined, NODE_DISABLE_COMPILE_CACHE: undefined }
  const version = await nameless.run(['--version'], bare)
  t.equal(version.code, 0, version.stderr)
  t.match(version.stdout, /^\d+\.\d+\.\d+/)
  const checked = await nameless.run(['config', 'check', new URL('../deploy/keygate.example.yaml', import.meta.url).pathname], bare)
  t.equal(checked.code, 0, checked.stderr)
  t.match(checked.stdout, /valid \(2 routes\)/)
  t.notMatch(`${version.stderr}${checked.stderr}`, /uv_os_homedir|SystemError/, 'no stack trace')
})

t.test("a file of another user inside the store (left by an older keygate run as root): its user's command names it", { skip: AS_NOBODY }, async (t) => {
  if (typeof nobody === 'string') return
  const dir = tempDir(t)
  chmodSync(dir, 0o755)
  const store = await seedDataDir(join(dir, 'store'))
  spawnSync('chown', ['-R', `${NOBODY}:${NOBODY}`, store])
  // What root's command wrote into it before the folders' owner was looked at: a file of PGlite's, 0600.
  const rootsFile = join(store, 'pgdata', 'global', 'pg_control')
  chownSync(rootsFile, 0, 0)
  chmodSync(rootsFile, 0o600)
  const listed = await nobody.run(['api-key', 'list', '--json', '--data-dir', store], embeddedEnv(store))
  t.equal(listed.code, 1, listed.stderr)
  const { error } = listed.json()
  t.equal(error.code, 'store_unavailable')
  t.match(error.message, `${rootsFile} belongs to uid 0 (root), not to this process's user (uid ${NOBODY})`)
  t.match(error.message, `as root: chown -R ${NOBODY}:${NOBODY} ${store}`, 'and says how to give the files back')
  t.notMatch(error.message, /Aborted\(\)|ASSERTIONS/, "not PGlite's abort")

  // In a folder shared through its group (pgdata another user's, as a platform running under an
  // arbitrary uid has it), the file's owner may be the store's: run as that user, no chown.
  const shared = await seedDataDir(join(dir, 'shared'))
  spawnSync('chown', ['-R', `0:${NOBODY}`, shared])
  spawnSync('chmod', ['-R', 'g+rwX', shared])
  chmodSync(join(shared, 'pgdata', 'global', 'pg_control'), 0o600)
  const sharedList = await nobody.run(['api-key', 'list', '--json', '--data-dir', shared], embeddedEnv(shared))
  t.equal(sharedList.code, 1, sharedList.stderr)
  t.match(sharedList.json().error.message, `${join(shared, 'pgdata', 'global', 'pg_control')} belongs to uid 0 (root)`)
  t.match(sharedList.json().error.message, 'run keygate as that user, such as `sudo -u root keygate …`', 'run as the owner of the store')
  t.notMatch(sharedList.json().error.message, /chown/, 'not told to take the store from its user')
})

t.test('a command that only reads, on a folder this user cannot read, says so and names its owner; not "no store"', { skip: AS_NOBODY }, async (t) => {
  if (typeof nobody === 'string') return
  const dir = tempDir(t)
  chmodSync(dir, 0o755)
  const closed = await seedDataDir(join(dir, 'closed'))
  chmodSync(closed, 0o700)
  const listed = await nobody.run(['api-key', 'list', '--json', '--data-dir', closed], embeddedEnv(closed))
  t.equal(listed.code, 1)
  const { error } = listed.json()
  t.equal(error.code, 'store_unavailable')
  t.match(error.message, `cannot read the embedded store in ${closed}: permission denied (${join(closed, 'pgdata', 'PG_VERSION')}); ${closed} belongs to uid 0 (root): run keygate as that user, such as \`sudo -u root keygate …\``)
  t.notMatch(error.message, /no embedded store|keygate migrate/, 'no advice to make a store there')
  // A folder without a store is still said to be one.
  const empty = join(dir, 'empty')
  mkdirSync(empty, { mode: 0o777 })
  chmodSync(empty, 0o777)
  const none = await nobody.run(['api-key', 'list', '--json', '--data-dir', empty], embeddedEnv(empty))
  t.match(none.json().error.message, `no embedded store in ${empty}`)
})


// Before (found by a review of migrations and the stores): a store of this user's own whose files
// this user may not write (restored from a read-only snapshot, or a `chmod` gone wrong) failed
// with PGlite's "PGlite failed to initialize properly" or "Aborted(). Build with -sASSERTIONS
// for more info.", naming nothing.
t.test("a file of the store's own user that it may not read and write: its command names it, and how to mend it", { skip: AS_NOBODY }, async (t) => {
  if (typeof nobody === 'string') return
  const dir = tempDir(t)
  chmodSync(dir, 0o755)
  for (const [what, damage] of [
    ['a catalog file made read-only', (pgdata: string) => chmodSync(join(pgdata, 'global', 'pg_control'), 0o400)],
    ["a database's folder made read-only", (pgdata: string) => spawnSync('chmod', ['-R', 'a-w', join(pgdata, 'base')])],
  ] as const) {
    const store = await seedDataDir(join(dir, what.replaceAll(' ', '-').replaceAll("'", '')), { migrated: true })
    spawnSync('chown', ['-R', `${NOBODY}:${NOBODY}`, store])
    const pgdata = join(store, 'pgdata')
    damage(pgdata)
    for (const args of [['api-key', 'list', '--json'], ['api-key', 'create', '--type', 'user', '--name', 'x', '--json']]) {
      const result = await nobody.run([...args, '--data-dir', store], embeddedEnv(store))
      t.equal(result.code, 1, `${what}, ${args[1]}: refused`)
      const { error } = result.json()
      t.equal(error.code, 'store_unavailable')
      t.match(error.message, new RegExp(`^cannot open the embedded store in ${store}: ${pgdata}/\\S+ \\(mode 0[0-7]{3}\\) is not both readable and writable by its owner, this process's user \\(uid ${NOBODY}\\): give the store's files back their owner's rights: chmod -R u\\+rwX ${pgdata}$`), `${what}, ${args[1]}: names the file and the mend`)
      t.notMatch(error.message, /Aborted\(\)|ASSERTIONS|failed to initialize/, "not PGlite's words")
    }
    spawnSync('chmod', ['-R', 'u+rwX', pgdata])
    const mended = await nobody.run(['api-key', 'list', '--json', '--data-dir', store], embeddedEnv(store))
    t.equal(mended.code, 0, `${what}: mended as told, the store opens: ${mended.stderr}`)
  }
})
