// The embedded store's files and folders, from a review of them against real processes: who may
// open a data folder, files that must appear whole, and how a file-system error reads.
import t from 'tap'
import { spawnSync } from 'node:child_process'
import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { Test } from 'tap'
import { encryptionKeyId, loadAuditCipher } from '../core/audit.ts'
import { createLogger } from '../core/log.ts'
import { openDb } from '../core/db.ts'
import { EMSCRIPTEN_ERRNO, fileSystemErrorWords } from '../core/errors.ts'
import { asNobody, NOBODY } from './helpers/as-nobody.ts'
import { childEnv, KEYGATE_BIN, outcome, runCli, runCliHere, spawnClean, type CliResult } from './helpers/cli.ts'
import { SHORT_COMMAND_V8_FLAGS } from '../bin/v8-flags.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { rejection } from './helpers/stores.ts'

const AS_ROOT = process.getuid?.() === 0 ? false : 'the tests do not run as root'
const nobody = asNobody(t)
const AS_NOBODY = typeof nobody === 'string' ? nobody : false

function tempDir(t: Pick<Test, 'teardown'>): string {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-store-files-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/**
 * Runs `body` in a child process, as an ES module with core/db.ts's `openDb` in scope, from a file
 * in `work` named `name` (not --input-type=module -e: the store's thread would take that flag with
 * no script); `what` names it in a failure. It and the other scripts these tests run in a process
 * of their own start with a short command's V8 flags (SHORT_COMMAND_V8_FLAGS), as each is one:
 * without them a script that opened a store took about 3.3 s of CPU, with them 1.1 s (V8's
 * optimising compiler and its background threads).
 */
function storeScript(work: string, name: string, what: string, body: string): Promise<CliResult> {
  const script = join(work, name)
  writeFileSync(script, `const { openDb } = await import(${JSON.stringify(new URL('../core/db.ts', import.meta.url).href)})\n${body}`)
  return outcome(spawnClean(process.execPath, [...SHORT_COMMAND_V8_FLAGS, script], { env: childEnv() }), [what])
}

/** The environment of a CLI command on the embedded store in `dataDir`, with nothing else configured. */
function embeddedEnv(dataDir: string): Record<string, string | undefined> {
  return { KEYGATE_DATA_DIR: dataDir, DATABASE_URL: undefined, REDIS_URL: undefined, KEYGATE_CONFIG: undefined, KEYGATE_ENCRYPTION_KEY: undefined }
}

/**
 * Runs `script` (an ES module, given core/'s folder as `core`) in a child process whose file
 * size limit is 0 (`ulimit -f 0`): every write to a file fails with EFBIG, as one on a full disk
 * fails with ENOSPC. Its output goes to pipes, which the limit does not cover.
 */
function withNoFileSpace(script: string): Promise<CliResult> {
  const core = fileURLToPath(new URL('../core/', import.meta.url))
  const child = spawnClean('sh', ['-c', `ulimit -f 0 && exec "$0" ${SHORT_COMMAND_V8_FLAGS.join(' ')} --input-type=module -e "$1"`, process.execPath, `const core = ${JSON.stringify(core)};\n${script}`], { env: childEnv() })
  return outcome(child, ['(a script with no file space)'])
}

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
  t.equal(trail.json().items[0]?.actor, `cli:${NAMELESS}`, 'the actor names the uid, as ls and ps do for a uid without a name')
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

t.test('a generated encryption key whose write fails leaves no file, and the next start generates one', async (t) => {
  const dir = tempDir(t)
  const failed = await withNoFileSpace(`
    const { loadAuditCipher } = await import(core + 'audit.ts')
    try {
      loadAuditCipher({ storeKind: 'embedded', dataDir: ${JSON.stringify(dir)} })
      console.log(JSON.stringify({ ok: true }))
    } catch (err) {
      console.log(JSON.stringify({ code: err.code, message: err.message }))
    }`)
  t.equal(failed.code, 0, failed.stderr)
  t.same(JSON.parse(failed.stdout), { code: 'config_invalid', message: `${join(dir, 'encryption.key')} cannot be created: the file size limit was reached` })
  t.same(readdirSync(dir), [], 'no encryption.key, and no file of the attempt, is left')
  // Before, an empty encryption.key was left, and every start failed: "does not hold 32 bytes in base64".
  const cipher = loadAuditCipher({ storeKind: 'embedded', dataDir: dir })
  t.equal(Buffer.from(readFileSync(join(dir, 'encryption.key'), 'utf8').trim(), 'base64').length, 32)
  t.ok(cipher.currentKeyId)
  t.same(readdirSync(dir), ['encryption.key'])

  // Processes creating it at once: of the links into place one wins, and the others read its key.
  const raced = tempDir(t)
  const script = `const { loadAuditCipher } = await import(${JSON.stringify(new URL('../core/audit.ts', import.meta.url).href)}); console.log(loadAuditCipher({ storeKind: 'embedded', dataDir: ${JSON.stringify(raced)} }).currentKeyId)`
  const runs = await Promise.all([0, 1, 2].map(() => outcome(spawnClean(process.execPath, [...SHORT_COMMAND_V8_FLAGS, '--input-type=module', '-e', script], { env: childEnv() }), ['(a script creating the key)'])))
  const ids = runs.map((r) => r.stdout.trim())
  t.same(runs.map((r) => r.code), [0, 0, 0], runs.map((r) => r.stderr).join(''))
  t.equal(new Set(ids).size, 1, 'every process has the same key')
  t.same(readdirSync(raced), ['encryption.key'], 'and no file of theirs is left beside it')
})

t.test('an empty encryption.key (left by an older keygate whose write of it failed) is replaced, unless the store holds something sealed', async (t) => {
  const dir = tempDir(t)
  const file = join(dir, 'encryption.key')
  writeFileSync(file, '', { mode: 0o600 })
  // Not knowing what the store holds, it is not replaced.
  const thrown = (f: () => unknown): unknown => {
    try {
      f()
    } catch (err) {
      return err
    }
    return 'nothing thrown'
  }
  t.match(thrown(() => loadAuditCipher({ storeKind: 'embedded', dataDir: dir })), { code: 'config_invalid', message: `${file} is empty: it holds no key (an older keygate's write of it failed); remove it, and the next start generates one` })
  // The store holds rows sealed with a key: that was the file's, lost; a new key would open none of them.
  t.match(thrown(() => loadAuditCipher({ storeKind: 'embedded', dataDir: dir, sealed: ['k1a2b3c4'] })), {
    code: 'encryption_key_missing',
    message: `${file} is empty, but the store holds audit rows or webhook secrets sealed with encryption key k1a2b3c4: restore the file from its backup (or set KEYGATE_ENCRYPTION_KEY to that key); a new key could open none of them`,
  })
  t.equal(readFileSync(file, 'utf8'), '', 'left as it was')
  // A link to an empty file is not replaced by a file of its own (its target would stay empty).
  const linked = tempDir(t)
  symlinkSync(file, join(linked, 'encryption.key'))
  t.match(thrown(() => loadAuditCipher({ storeKind: 'embedded', dataDir: linked, sealed: [] })), { code: 'config_invalid', message: `${join(linked, 'encryption.key')} is a link to an empty file, which holds no key` })
  t.ok(lstatSync(join(linked, 'encryption.key')).isSymbolicLink(), 'the link stays')
  // Nothing sealed: a new key in its place, said.
  const lines: string[] = []
  const cipher = loadAuditCipher({ storeKind: 'embedded', dataDir: dir, sealed: [], log: createLogger({ level: 'info', write: (line) => void lines.push(line) }) })
  const key = Buffer.from(readFileSync(file, 'utf8').trim(), 'base64')
  t.equal(key.length, 32, 'a key of 32 bytes in its place')
  t.equal(cipher.currentKeyId, encryptionKeyId(key), 'and it is the key in use')
  t.equal(statSync(file).mode & 0o777, 0o600, 'readable by its owner only')
  t.same(readdirSync(dir), ['encryption.key'], 'no file of the replacement is left beside it')
  t.match(lines.join(''), /"level":"warn".*in place of an empty key file/, 'said at warn')

  // Through the CLI: a new store with an empty key file works; once it has sealed audit rows, an
  // emptied file is refused, naming the key they were sealed with. The store's PGlite folder is
  // copied from the tests' initialised one (helpers/pglite-template.ts): PGlite's initdb took 6
  // of the command's 8 s, and the key file is read after it (after the migrations), whichever way
  // the folder came about; migrated already, as the migrations are not what is tested. The
  // commands run in this process (runCliHere): the key file, not the process, is the subject.
  const store = await seedDataDir(tempDir(t), { migrated: true })
  writeFileSync(join(store, 'encryption.key'), '\n')
  const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'after an empty key file', '--json'], { env: embeddedEnv(store) })
  t.equal(created.code, 0, created.stderr)
  const id = encryptionKeyId(Buffer.from(readFileSync(join(store, 'encryption.key'), 'utf8').trim(), 'base64'))
  writeFileSync(join(store, 'encryption.key'), '')
  const listed = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
  t.equal(listed.code, 1, listed.stderr)
  t.match(listed.json().error, { code: 'encryption_key_missing', message: new RegExp(`is empty, but the store holds audit rows or webhook secrets sealed with encryption key ${id}: restore the file`) })
})

t.test("the lock's own file is removed when its write fails", async (t) => {
  const dir = tempDir(t)
  const failed = await withNoFileSpace(`
    const { openDb } = await import(core + 'db.ts')
    try {
      await (await openDb({ dataDir: ${JSON.stringify(dir)} })).close()
      console.log(JSON.stringify({ ok: true }))
    } catch (err) {
      console.log(JSON.stringify({ code: err.code, message: err.message }))
    }`)
  t.equal(failed.code, 0, failed.stderr)
  t.same(JSON.parse(failed.stdout), { code: 'store_unavailable', message: `cannot lock the embedded store in ${dir}: the file size limit was reached` })
  t.same(readdirSync(dir), [], 'no keygate.lock.<pid>.<hex> is left behind')
})

t.test("Emscripten's errno numbers, in words", async (t) => {
  // The table PGlite's file system numbers its errors by (Emscripten's, not Linux's).
  const pglite = readFileSync(new URL('../node_modules/@electric-sql/pglite/dist/pglite.js', import.meta.url), 'utf8')
  const literal = /ERRNO_CODES=\{([^}]*)\}/.exec(pglite)?.[1]
  t.ok(literal, "PGlite's ERRNO_CODES is found")
  const table = new Map((literal ?? '').split(',').map((pair) => pair.split(':') as [string, string]).map(([code, n]) => [code, Number(n)]))
  for (const [errno, code] of Object.entries(EMSCRIPTEN_ERRNO)) t.equal(table.get(code), Number(errno), `${code} is ${errno}`)

  t.equal(fileSystemErrorWords(51), 'file system error ENOSPC (no space left on the device)', 'a full disk, without the hint of a file in the way')
  t.equal(fileSystemErrorWords(2), 'file system error EACCES (permission denied)')
  t.equal(fileSystemErrorWords(69), 'file system error EROFS (the file system is read-only)')
  t.equal(fileSystemErrorWords(44), 'file system error ENOENT (a file or folder is missing)')
  t.equal(fileSystemErrorWords(54), 'file system error ENOTDIR (a file is in the way; is something in the data folder not what the store expects, such as a file where a folder should be?)')
  t.equal(fileSystemErrorWords(31), 'file system error EISDIR (it is a folder; is something in the data folder not what the store expects, such as a file where a folder should be?)')
  t.equal(fileSystemErrorWords(1), "file system error errno 1 (in Emscripten's numbering)", 'a number not in the table stays a number')
})

t.test('a file where PGlite makes a folder, in a new store: ENOTDIR in words, with the hint', async (t) => {
  // initdb runs here (some 6 s of CPU): what PGlite throws as a bare {errno} comes from its file
  // system while it makes a store.
  const dir = tempDir(t)
  mkdirSync(join(dir, 'pgdata'), { mode: 0o700 })
  writeFileSync(join(dir, 'pgdata', 'global'), 'not a folder')
  const err = await rejection(openDb({ dataDir: dir }))
  t.equal(err.code, 'store_unavailable')
  t.equal(err.message, `cannot open the embedded store in ${dir}: file system error ENOTDIR (a file is in the way; is something in the data folder not what the store expects, such as a file where a folder should be?)`)
  t.notOk(existsSync(join(dir, 'keygate.lock')), 'the lock is released')
})

// Before (found by a review of migrations and the stores): PGlite makes a store (initdb) wherever
// pgdata/ has no PG_VERSION, whatever else is there. A store whose PG_VERSION was lost (a restore
// or copy that missed it, a damaged file system) was made anew over its files by the next
// `serve`, `migrate` or `api-key create`: its keys, audit rows and webhooks were gone, and a read
// command's advice ("make the store there with `keygate migrate`") led there too.
t.test('a store that lost PG_VERSION is refused, not made anew over its keys', async (t) => {
  // The commands run in this process (runCliHere), as a process of their own cost about a second
  // of CPU more each: what they find in the folder is the subject, not the process.
  const store = await seedDataDir(join(tempDir(t), 'data'), { migrated: true })
  const env = embeddedEnv(store)
  const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'kept', '--json'], { env })
  t.equal(created.code, 0, created.stderr)
  const mark = join(store, 'pgdata', 'PG_VERSION')
  const version = readFileSync(mark, 'utf8')
  rmSync(mark)

  // `serve` opens the store as these do (openDb); a command that only reads says the same, not
  // that there is no store (before, found by a review, it advised making one there).
  for (const args of [['migrate'], ['api-key', 'create', '--type', 'user', '--name', 'after'], ['api-key', 'list']]) {
    const refused = await runCliHere(args, { env })
    t.equal(refused.code, 1, `${args.join(' ')}: refused`)
    t.match(refused.stderr, `the embedded store in ${store} has lost ${mark}, PostgreSQL's mark of a data folder, but still holds a database's files: keygate makes no new store over them, which would lose every key in it`, `${args.join(' ')}: says why`)
    t.notOk(existsSync(mark), `${args.join(' ')}: no new store was made`)
  }
  t.notOk(existsSync(join(store, 'keygate.lock')), 'the lock is given back')

  writeFileSync(mark, version)
  const listed = await runCliHere(['api-key', 'list', '--json'], { env })
  t.equal(listed.code, 0, listed.stderr)
  t.same(listed.json().items.map((k: { name: string }) => k.name), ['kept'], 'with PG_VERSION put back, the key is there')
})

// Before: a first start cut short while PGlite made the store (a full disk, a file size limit)
// left a partial store with PG_VERSION in it, which every later start failed to open, with
// PGlite's "Aborted(). Build with -sASSERTIONS for more info."
t.test('a store whose making fails leaves nothing behind, and the next start makes it', async (t) => {
  const store = join(tempDir(t), 'data')
  // A file size limit of 64 KiB: the lock's files are written, PGlite's initdb is not.
  const child = spawnClean('sh', ['-c', 'ulimit -f 64 && exec "$0" "$@"', process.execPath, KEYGATE_BIN, 'migrate'], { env: childEnv(embeddedEnv(store)) })
  const cut = await outcome(child, ['migrate (with a file size limit)'])
  t.equal(cut.code, 1, cut.stderr)
  t.match(cut.stderr, `cannot open the embedded store in ${store}`)
  t.same(readdirSync(join(store, 'pgdata')), [], 'nothing of the store that failed is left in pgdata/')
  t.notOk(existsSync(join(store, 'keygate.making')), 'nor the mark of its making')

  const again = await runCli(['migrate', '--json'], { env: embeddedEnv(store) })
  t.equal(again.code, 0, again.stderr)
  t.equal(again.json().applied.length, readdirSync(new URL('../migrations/', import.meta.url)).filter((f) => f.endsWith('.sql')).length, 'the store is made, and migrated')
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

// Before (found by a review of migrations and the stores): PGlite's own words were all a command
// said of a store PostgreSQL could not start on: "Aborted(). Build with -sASSERTIONS for more
// info." for a pg_control or WAL cut short, "PGlite failed to initialize properly" for files of
// another PostgreSQL version. PostgreSQL's log lines say which file and why (its HINT, "It looks
// like you need to initdb", is left out: that would make a new store over the old).
t.test("a store PostgreSQL cannot start on: the command gives PostgreSQL's words, not PGlite's", async (t) => {
  const dir = tempDir(t)
  for (const [what, damage, said] of [
    ['pg_control cut short', (pgdata: string) => writeFileSync(join(pgdata, 'global', 'pg_control'), ''), 'PANIC: could not read file "global/pg_control": read 0 of '],
    ['the WAL gone', (pgdata: string) => { for (const f of readdirSync(join(pgdata, 'pg_wal'))) if (/^[0-9A-F]{24}$/.test(f)) rmSync(join(pgdata, 'pg_wal', f)) }, 'PANIC: could not locate a valid checkpoint record'],
    ['another PostgreSQL version', (pgdata: string) => writeFileSync(join(pgdata, 'PG_VERSION'), '99\n'), 'FATAL: database files are incompatible with server; DETAIL: The data directory was initialized by PostgreSQL version 99'],
  ] as const) {
    const store = await seedDataDir(join(dir, what.replaceAll(' ', '-')))
    damage(join(store, 'pgdata'))
    // In this process (runCliHere): PostgreSQL's start fails on the store's thread, which the
    // command's process, whichever it is, outlives.
    const listed = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
    t.equal(listed.code, 1, `${what}: refused`)
    const { error } = listed.json()
    t.equal(error.code, 'store_unavailable')
    t.match(error.message, `cannot open the embedded store in ${store}: PostgreSQL could not start on its files: `)
    t.match(error.message, said, `${what}: PostgreSQL's words`)
    t.match(error.message, 'restore the data folder from a backup; keygate makes no new store over them')
    t.notMatch(error.message, /Aborted\(\)|ASSERTIONS|failed to initialize|initdb/, `${what}: not PGlite's words, nor PostgreSQL's hint to make a new store`)
  }
})

// A first start killed while PGlite makes the store (a pod killed during its slow first start, a
// SIGKILL) leaves a partial pgdata/, with or without PG_VERSION: `keygate.making` beside it says
// that it never held anything, and the next start makes the store anew, where a pgdata/ without
// that mark and without PG_VERSION is refused (above).
t.test('a making killed part way: the next start makes the store anew', async (t) => {
  const store = join(tempDir(t), 'data')
  const child = spawnClean(process.execPath, [KEYGATE_BIN, 'migrate'], { env: childEnv(embeddedEnv(store)), stdio: 'ignore' })
  const ended = new Promise((resolve) => child.once('exit', resolve))
  const pgdata = join(store, 'pgdata')
  // Once PGlite has begun writing a database's files (base/), which a store that lost PG_VERSION holds too.
  while (!existsSync(join(pgdata, 'base'))) await new Promise((resolve) => setTimeout(resolve, 5))
  child.kill('SIGKILL')
  await ended
  t.ok(existsSync(join(store, 'keygate.making')), 'the mark of the making is left, with part of a store')

  const again = await runCli(['api-key', 'create', '--type', 'user', '--name', 'after', '--json'], { env: embeddedEnv(store) })
  t.equal(again.code, 0, again.stderr)
  t.notOk(existsSync(join(store, 'keygate.making')), 'made: the mark is gone')
  // Read back in this process (runCliHere): the store made anew by the real command above is the subject.
  const listed = await runCliHere(['api-key', 'list', '--json'], { env: embeddedEnv(store) })
  t.same(listed.json().items.map((k: { name: string }) => k.name), ['after'])
})

t.test('a PANIC of PostgreSQL (a WAL write that failed) ends the embedded store: told as lost, every later call refused; a start still short of room is told to make room; one with room recovers it', async (t) => {
  // Before (found by a review, serve on a tmpfs that filled up): PGlite, which cannot end as
  // PostgreSQL does on a PANIC, was left broken: every later call failed with "cannot drop active
  // portal", or never came back with its thread spinning a CPU, and serve ran on without a store.
  // A file size limit set just past the WAL's end makes the WAL write fail as a full disk does.
  const work = tempDir(t)
  const dir = await seedDataDir(join(work, 'store'))
  const ran = await storeScript(work, 'panic.mjs', '(a script whose WAL write fails)', `
    const { execFileSync } = await import('node:child_process')
    const db = await openDb({ dataDir: ${JSON.stringify(dir)}, shortLived: true })
    const said = []
    db.onLost((err) => said.push({ lost: err.code, message: err.message }))
    await db.exec('CREATE TABLE filler (pad text)')
    const [{ lsn }] = await db.query('SELECT pg_current_wal_insert_lsn()::text AS lsn')
    const inSegment = parseInt(lsn.split('/')[1], 16) % (16 * 1024 * 1024)
    execFileSync('prlimit', ['--pid', String(process.pid), '--fsize=' + (inSegment + 256 * 1024)])
    const call = (p) => p.then(() => ({ ok: true }), (err) => ({ code: err.code, severity: err.severity, message: err.message }))
    said.push(await call(db.transaction((tx) => tx.query("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)"))))
    said.push(await call(db.query('SELECT 1')))
    said.push(await call(db.transaction((tx) => tx.query('SELECT 1'))))
    await db.close()
    console.log(JSON.stringify(said))
    console.log(inSegment)`)
  t.equal(ran.code, 0, ran.stderr)
  const [outcomes = '', walEnd = ''] = ran.stdout.split('\n')
  const [lost, insert, select, transaction] = JSON.parse(outcomes) as Array<Record<string, string>>
  t.match(insert, { severity: 'PANIC', message: /^could not write to log file .*: File too large$/ }, 'the write that met the PANIC fails with it')
  t.match(lost, { lost: 'store_unavailable', message: /^the embedded store stopped: PostgreSQL stopped on a PANIC \(could not write to log file .*\); the next start recovers its files, as after a crash$/ }, 'the store is told lost, for serve to stop')
  t.same(select, { code: 'store_unavailable', message: lost?.message }, 'a later call is refused at once')
  t.same(transaction, select)
  t.same(readdirSync(dir).sort(), ['pgdata'], 'the lock is given back')

  // A start still short of room (its recovery writes to the WAL) is told to make room, not to
  // restore a backup over files PostgreSQL recovers once it can write. Before, the backup.
  const short = await storeScript(work, 'again.mjs', '(a start still without room)', `
    const { execFileSync } = await import('node:child_process')
    execFileSync('prlimit', ['--pid', String(process.pid), '--fsize=${walEnd}'])
    await openDb({ dataDir: ${JSON.stringify(dir)}, shortLived: true }).then(() => console.log('opened'), (err) => console.log(err.message))`)
  t.equal(short.code, 0, short.stderr)
  t.match(short.stdout, /^cannot open the embedded store in .*: PostgreSQL could not start on its files: .*File too large\. The data folder's file system is full \(or a disk quota, or the file size limit of ulimit -f, was reached\): make room there and start again, and PostgreSQL recovers its files as after a crash; do not restore a backup over them for this\n$/)
  t.notMatch(short.stdout, 'restore the data folder from a backup')

  // Without the limit, the next start recovers the store: the table made before, nothing of the insert.
  const db = await openDb({ dataDir: dir, shortLived: true })
  t.same(await db.query('SELECT count(*)::int AS n FROM filler'), [{ n: 0 }])
  await db.close()
})

t.test('a FATAL error of PostgreSQL (an idle session timeout set on the store) ends the embedded store as a PANIC does: told as lost, every later call refused, and the next start opens it (found by a review)', async (t) => {
  // Before (found by a review, serve on a store whose postgresql.auto.conf set
  // idle_session_timeout): PostgreSQL, which ends its session on a FATAL, shut down inside PGlite,
  // which then logged "terminating connection because protocol synchronization was lost" without
  // end, its thread spinning a CPU; no call came back and nothing was told, serve ran on, /readyz
  // 'store not answering'. PGlite answers nothing on a FATAL: only its log line tells of it.
  const work = tempDir(t)
  const dir = await seedDataDir(join(work, 'store'))
  // Every wait is bounded (a hang guard, not a timing): before, the store was never told lost, and no call came back.
  const ran = await storeScript(work, 'fatal.mjs', '(a session that meets a FATAL)', `
    const db = await openDb({ dataDir: ${JSON.stringify(dir)}, shortLived: true })
    const guard = () => new Promise((resolve) => setTimeout(() => resolve({ hung: true }), 20_000))
    const lost = new Promise((resolve) => db.onLost((err) => resolve({ lost: err.code, message: err.message })))
    const call = (p) => Promise.race([p.then(() => ({ ok: true }), (err) => ({ code: err.code, message: err.message })), guard()])
    await db.exec('CREATE TABLE kept (n int)')
    await db.query('INSERT INTO kept VALUES (1)')
    // The timeout's FATAL comes with the first call after it passed (PostgreSQL acts on it when a
    // command arrives): a call after a pause longer than it, tried again should the pause have
    // been too short for the store's thread to see it pass.
    await db.exec("SET idle_session_timeout = '1ms'")
    let met = { ok: true }
    for (let i = 0; i < 100 && met.ok; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20))
      met = await call(db.query('SELECT 1'))
    }
    const said = [await Promise.race([lost, guard()]), met]
    said.push(await call(db.query('SELECT 1')))
    said.push(await call(db.transaction((tx) => tx.query('SELECT 1'))))
    said.push(await call(db.close()))
    console.log(JSON.stringify(said))
    process.exit(0)`)
  t.equal(ran.code, 0, ran.stderr)
  const [lost, met, select, transaction, closed] = JSON.parse(ran.stdout) as Array<Record<string, unknown>>
  t.match(lost, { lost: 'store_unavailable', message: /^the embedded store stopped: PostgreSQL stopped on a FATAL error \(terminating connection due to idle-session timeout\); the next start opens the store again$/ }, 'the store is told lost, for serve to stop')
  t.same(met, { code: 'store_unavailable', message: lost?.message }, 'the call that met the FATAL fails with it')
  t.same(select, met, 'a later call is refused at once')
  t.same(transaction, select)
  t.same(closed, { ok: true }, 'and the store closes')
  t.same(readdirSync(dir).sort(), ['pgdata'], 'the lock is given back')

  const db = await openDb({ dataDir: dir, shortLived: true })
  t.same(await db.query('SELECT n FROM kept'), [{ n: 1 }], 'the next start opens the store, with what was committed')
  await db.close()
})
