// `keygate serve` as a real process. The README walk-through on the embedded store: take the
// printed admin key, open /docs, create a key through the API, use it through the gateway,
// revoke it through the API, and the next gateway request gets a 401 JSON error. CLI parity:
// every api-key command against the running server through its admin API (the store itself is
// locked), and the reasons when that cannot work. Then PostgreSQL going silent under a running
// server: 503s bounded by store.query_timeout_ms, then recovery. (--workers is
// test/serve-workers.test.ts, so the two run side by side.)
import t from 'tap'
import type { Test } from 'tap'
import { createHash, randomBytes, randomUUID } from 'node:crypto'
import http from 'node:http'
import { writeFileSync } from 'node:fs'
import net from 'node:net'
import { join } from 'node:path'
import { request } from 'undici'
import pg from 'pg'
import { MIGRATION_LOCK_ID, readMigrations } from '../core/migrate.ts'
import { runCli, runCliHere } from './helpers/cli.ts'
import { isolatedEnv, serve as startKeygate, type LogLine, type Served } from './helpers/serve.ts'
import { call, startUpstream, uploadWhileAnswered, type Tap } from './helpers/gateway.ts'
import { deadlockingMigrations, freshDatabase, holdMigrationLock, lockTable, migratedBelow, migratedDatabase, ownSession, setOnDatabase } from './helpers/stores.ts'
import { gateInFront } from './helpers/tcp-gate.ts'
import { serveBehindGate as serveGated } from './helpers/serve-gated.ts'
import { scratchDir } from './helpers/scratch.ts'

const ENCRYPTION_KEY = Buffer.alloc(32, 9).toString('base64')
const ADMIN_TOKEN = 'an-admin-token-of-32-characters!'

/** keygate serving an upstream, its PostgreSQL reached through a gate the test can silence, with `yaml` as its configuration file. */
const serveBehindGate = (t: Tap, name: string, yaml: string) => serveGated(t, name, yaml, { KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN })

t.test('the README walk-through and the CLI against a running server (embedded store)', async (t) => {
  const cwd = scratchDir('keygate-serve-')
  // Room for the wrong credentials below (a lockout would refuse the address at the gateway too).
  const env = isolatedEnv({ KEYGATE_DATA_DIR: join(cwd, 'store'), RATE_LIMIT_MAX_ATTEMPTS: '100' })
  const upstream = await startUpstream(t)
  // As the README starts it: V8's default tiering (the tests' other serves run on the baseline compiler).
  const serve = await startKeygate(t, { args: ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', upstream.url], env, cwd, tiering: 'full' })
  const printed = /created the first admin key \(id (\w+)\)[^\n]*\n(kg_\S+)/.exec(serve.stderr())
  t.ok(printed, 'the first admin key is printed once on stderr')
  const [, adminId, adminKey] = printed as unknown as [string, string, string]

  const docs = await call(`${serve.admin}/docs`)
  t.equal(docs.status, 200, '/docs answers')
  t.match(docs.text, /swagger-ui-bundle\.js/)
  t.equal((await call(`${serve.admin}/docs/swagger-ui-bundle.js`)).status, 200, 'with its assets')
  t.equal((await call(`${serve.admin}/openapi.json`)).json.openapi, '3.1.0')

  const created = await call(`${serve.admin}/v1/keys`, { method: 'POST', token: adminKey, body: { name: 'walk-through', type: 'service', scopes: ['demo'] } })
  t.equal(created.status, 201, 'a key is created with the printed admin key')
  const key = created.json.key as string
  const through = await call(`${serve.gateway}/hello`, { headers: { authorization: `Bearer ${key}` } })
  t.equal(through.status, 200, 'the key works through the gateway')
  t.equal(through.json.url, '/hello')
  t.equal(through.json.headers['x-keygate-key-id'], created.json.id, 'the upstream learns whose key it was')
  t.notOk(through.json.headers.authorization, 'the credential is not passed upstream')
  const revoked = await call(`${serve.admin}/v1/keys/${created.json.id}/revoke`, { method: 'POST', token: adminKey, body: { reason: 'walk-through' } })
  t.equal(revoked.status, 200, 'revoked through the API')
  const refused = await call(`${serve.gateway}/hello`, { headers: { authorization: `Bearer ${key}` } })
  t.equal(refused.status, 401, 'the next gateway request is refused')
  t.match(refused.headers['content-type'], /^application\/json/)
  t.equal(refused.json.error.code, 'key_invalid')
  t.ok(refused.json.error.request_id)

  // The CLI beside the server: the store is locked, and the message says what to do.
  const locked = await runCli(['api-key', 'list', '--json'], { asInstalled: true, env, cwd })
  t.equal(locked.code, 1)
  t.equal(locked.json().error.code, 'store_locked')
  t.match(locked.stderr, /KEYGATE_ADMIN_URL and KEYGATE_ADMIN_TOKEN/)

  const remote = isolatedEnv({ KEYGATE_DATA_DIR: join(cwd, 'store'), KEYGATE_ADMIN_URL: serve.admin, KEYGATE_ADMIN_TOKEN: adminKey })
  const cli = (args: string[], input?: string) => runCli(['api-key', ...args], { asInstalled: true, env: remote, cwd, ...(input !== undefined ? { input } : {}) })
  // The same through the command line's entry in this process (runCliHere): for the commands whose
  // answers are what is checked, each as a process of its own cost some 0.5 s of CPU. The first of
  // each kind of answer (a key made, a table, stdin, a refusal of each exit code) is the real process.
  const here = (args: string[]) => runCliHere(['api-key', ...args], { env: remote })
  const made = await cli(['create', '--name', 'from the cli', '--type', 'user', '--scopes', 'demo', '--owner', 'ops', '--json'])
  t.equal(made.code, 0, made.stderr)
  const m = made.json()
  t.match(m, { name: 'from the cli', type: 'user', owner: 'ops' })
  t.same(m.scopes, ['demo'], 'the scope asked for, no more')
  t.match(m.key, /^kg_/)
  t.equal((await call(`${serve.gateway}/x`, { headers: { authorization: `Bearer ${m.key}` } })).status, 200, 'a key made by the remote CLI works at the gateway')
  const human = await cli(['create', '--name', 'human', '--type', 'integration'])
  t.equal(human.code, 0)
  t.match(human.stdout, /Created integration key \w+ \(human\)\. The key is shown once; store it now:\nkg_/)
  const list = await here(['list', '--owner', 'ops', '--json'])
  t.equal(list.code, 0)
  t.same(list.json().items.map((k: { id: string }) => k.id), [m.id])
  const table = await cli(['list', '--limit', '1'])
  t.match(table.stdout, /^ID\s+NAME\s+TYPE/)
  t.match(table.stdout, /more: --cursor \S+/)
  t.equal((await here(['list', '--all', '--json'])).json().items.length, 4, 'every key, page after page')
  t.equal((await here(['get', m.id, '--json'])).json().id, m.id)
  const updated = await here(['update', m.id, '--name', 'renamed', '--rate-limit', '10/1s', '--json'])
  t.match(updated.json(), { name: 'renamed', rate_limit: { limit: 10, window_s: 1 } })
  const valid = await cli(['validate', '-', '--json'], `${m.key}\n`)
  t.equal(valid.code, 0)
  t.equal(valid.json().key.id, m.id)
  const stats = await here(['stats', '--json'])
  t.match(stats.json(), { total: 4, by_status: { active: 3, revoked: 1 } })
  const legacy = randomUUID()
  const file = join(cwd, 'legacy.json')
  writeFileSync(file, JSON.stringify([{ key_hash: createHash('sha256').update(legacy).digest('hex'), name: 'old one' }]))
  const imported = await here(['import', file, '--type', 'service', '--json'])
  t.equal(imported.code, 0, imported.stderr)
  t.equal(imported.json().imported, 1)
  t.equal((await call(`${serve.gateway}/x`, { headers: { 'x-api-key': legacy } })).status, 200, 'an imported legacy key works at the gateway')
  const rotated = await here(['rotate', m.id, '--force', '--json'])
  t.equal(rotated.code, 0)
  t.equal(rotated.json().previous.status, 'revoked')
  t.equal((await call(`${serve.gateway}/x`, { headers: { authorization: `Bearer ${m.key}` } })).status, 401, 'the rotated-out key stops at the gateway at once')
  const revokedByCli = await cli(['revoke', rotated.json().id, '--reason', 'done'])
  t.equal(revokedByCli.code, 0)
  t.match(revokedByCli.stdout, /^Revoked /)
  t.equal((await call(`${serve.gateway}/x`, { headers: { authorization: `Bearer ${rotated.json().key}` } })).status, 401, 'revoked by the remote CLI: refused at once')
  const invalid = await cli(['validate', m.key])
  t.equal(invalid.code, 1, 'a refused key exits 1')
  t.match(invalid.stderr, /key refused: key_revoked/)
  const missing = await here(['get', 'nosuchkey123', '--json'])
  t.equal(missing.code, 1)
  t.equal(missing.json().error.code, 'key_not_found')
  // As on the store: ids no URL carries as a path segment, a key too long to be one, a reason with
  // a control character (which `api-key get` would print).
  for (const args of [['get', '..'], ['revoke', '.'], ['rotate', '..']]) {
    const r = await here([...args, '--json'])
    t.equal(r.code, 1, `api-key ${args.join(' ')} exits 1`)
    t.match(r.json().error, { code: 'key_not_found', message: /no key has the id/ }, `api-key ${args.join(' ')}: key_not_found, not another route's answer`)
  }
  const long = await here(['validate', `kg_${'x'.repeat(300)}`, '--json'])
  t.equal(long.code, 1)
  t.match(long.json(), { valid: false, code: 'key_invalid', reason: 'malformed' }, 'a key too long to be one: the verdict, as on the store')
  const forged = await cli(['revoke', m.id, '--reason', 'x\u001b[31m\nstatus  active', '--json'])
  t.equal(forged.code, 2, 'a reason with control characters is refused before the admin API is asked, as any bad flag')
  t.match(forged.json().error, { code: 'usage_error', message: /^--reason: / })
  const refusedUpdate = await here(['update', m.id, '--name', 'x'])
  t.equal(refusedUpdate.code, 1)
  t.match(refusedUpdate.stderr, /key_not_active|is revoked/)
  const audit = await call(`${serve.admin}/v1/keys/${m.id}/audit`, { token: adminKey })
  const trail = audit.json.items as Array<{ action: string; actor: string }>
  t.same(trail.map((r) => r.action).sort(), ['key.created', 'key.rotated', 'key.updated'], "the remote CLI's changes of the key, each audited")
  t.ok(trail.every((r) => r.actor === `key:${adminId}`), 'the remote CLI acts as the admin key it was given')

  const noToken = await runCli(['api-key', 'list'], { asInstalled: true, env: { ...remote, KEYGATE_ADMIN_TOKEN: undefined }, cwd })
  t.equal(noToken.code, 1)
  t.match(noToken.stderr, /KEYGATE_ADMIN_URL names an admin API, but no admin credential is set: set KEYGATE_ADMIN_TOKEN/)
  const wrong = await runCli(['api-key', 'list', '--json'], { asInstalled: true, env: { ...remote, KEYGATE_ADMIN_TOKEN: 'not-the-admin-token' }, cwd })
  t.equal(wrong.code, 1)
  t.equal(wrong.json().error.code, 'unauthorized')
  // A large import refused for its token while the CLI still sends it: before (found by a review),
  // the listener closed at once, and half the time the CLI said `cannot reach the admin API ... EPIPE`.
  const large = join(cwd, 'large.json')
  writeFileSync(large, JSON.stringify(Array.from({ length: 10_000 }, (_, i) => ({ key_hash: createHash('sha256').update(`large ${i}`).digest('hex'), name: `large ${i}`, metadata: { note: 'x'.repeat(1800) } }))))
  for (let i = 0; i < 4; i++) {
    const refusedImport = await runCli(['api-key', 'import', large, '--json'], { asInstalled: true, env: { ...remote, KEYGATE_ADMIN_TOKEN: 'wrong-token-abcdefgh' }, cwd })
    t.equal(refusedImport.code, 1)
    t.equal(refusedImport.json().error.code, 'unauthorized', `a 19 MB import with a wrong token, run ${i + 1}: told so, not that the admin API cannot be reached`)
  }
  // A body on an open path is not read: the answer, then the connection closes (in stages).
  // Before, GET /healthz with Content-Length: 2 GiB was answered keep-alive and all 2 GiB read.
  for (const path of ['/healthz', '/readyz', '/metrics', '/openapi.json', '/docs']) {
    const got = await uploadWhileAnswered(Number(new URL(serve.admin).port), `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ${2 ** 31}\r\n\r\n`, 1_000_000)
    t.match(got.text, /^HTTP\/1\.1 200 /, `${path} with a body: answered`)
    t.match(got.text, /\r\nconnection: close\r\n/i, `${path}: Connection: close`)
    t.ok(got.ended, `${path}: the listener ended the connection`)
    t.equal(got.error, undefined, `${path}: without a reset`)
  }
  const down = await runCli(['api-key', 'list', '--json'], { asInstalled: true, env: { ...remote, KEYGATE_ADMIN_URL: 'http://127.0.0.1:1' }, cwd })
  t.equal(down.code, 1)
  t.equal(down.json().error.code, 'admin_unavailable')
  t.match(down.stderr, /cannot reach the admin API at http:\/\/127\.0\.0\.1:1/)
  // The gateway's port, given the admin key, passes the call on to its upstream, whose JSON is no
  // admin API's (before: a TypeError, "Cannot convert undefined or null to object", as internal_error).
  for (const args of [['list'], ['stats'], ['get', adminId]]) {
    const options = { env: { ...remote, KEYGATE_ADMIN_URL: serve.gateway } }
    const notAdmin = args[0] === 'list' ? await runCli(['api-key', ...args, '--json'], { ...options, asInstalled: true, cwd }) : await runCliHere(['api-key', ...args, '--json'], options)
    t.equal(notAdmin.code, 1, `api-key ${args[0]}: the gateway port is not the admin API`)
    t.match(notAdmin.json().error, { code: 'admin_unavailable', message: /answered 200 but is not keygate's admin API \(no x-keygate-admin header; the gateway's port, say\)/ })
  }

  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
  const logs = serve.stdout() + serve.stderr()
  for (const plaintext of [key, m.key, rotated.json().key, legacy]) t.notOk(logs.includes(plaintext), 'no plaintext key in the server output')
  t.equal(serve.stderr().split(adminKey).length - 1, 1, 'the admin key is printed exactly once')
})

t.test('a stop signal while the start waits on the store (another instance migrating) ends it at once, exit 0', async (t) => {
  // Before (found by a review): the signal was swallowed; once the other migration was done the
  // process bound its listeners and served, and systemctl stop ended in SIGKILL.
  const url = await freshDatabase(t)
  const migrating = await holdMigrationLock(t, url, 'another-keygate')
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const serve = await startKeygate(t, { args: ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', 'http://127.0.0.1:9'], env, waitFor: { gateway: false, admin: false } })
  // Waiting on the migration lock: seen in PostgreSQL, not guessed from time.
  for (let waiting = false; !waiting; ) {
    const { rows } = await migrating.query(`SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = $1`, [MIGRATION_LOCK_ID])
    waiting = rows.length > 0
    if (!waiting) await new Promise((r) => setTimeout(r, 50))
  }
  await stopsWhileWaiting(t, serve)
})

/** A `serve` started on the database at `url` (auto_migrate on, unless `extra`, more of its environment, says otherwise), returned once it has logged `waits` (a wait for a lock a lock_timeout cut). */
async function serveWaiting(t: Tap, url: string, waits: (l: LogLine) => boolean, extra: Record<string, string> = {}) {
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN, ...extra })
  const serve = await startKeygate(t, { args: ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--upstream', 'http://127.0.0.1:9'], env, waitFor: { gateway: false, admin: false } })
  return { serve, warned: await serve.waitForLog(waits) }
}

/**
 * A `serve` started while another session (another keygate migrating) holds the migration lock,
 * the database's lock_timeout 200 ms: returned once the start has logged that it waits, a wait cut
 * by that lock_timeout already behind it.
 */
async function serveWaitingOnLockTimeout(t: Tap) {
  const url = await freshDatabase(t)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const migrating = await holdMigrationLock(t, url, 'another-keygate')
  const waits = (l: LogLine) => l.level === 'warn' && /migration lock/.test(l.message)
  return { migrating, waits, ...(await serveWaiting(t, url, waits)) }
}

/**
 * A `serve` started on a database an earlier keygate migrated (up to 0022), the database's
 * lock_timeout 200 ms, while another session's open transaction (a keygate not upgraded yet
 * reading keys) holds n8n_api_keys, which migration 0023 alters: returned once the start has
 * logged that it waits, a migration cut by that lock_timeout already behind it. `observer`: a
 * session of the test's, outside that transaction (in which pg_stat_activity stays as first read).
 */
async function serveWaitingOnTableLock(t: Tap) {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const reader = await lockTable(t, url, 'n8n_api_keys', 'ACCESS SHARE', 'keygate-before')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /table lock/.test(l.message)
  return { reader, observer, waits, ...(await serveWaiting(t, url, waits)) }
}

/**
 * The waiting start (serveWaiting) tries again, more than once: `tries` transactions of its own
 * seen waiting in PostgreSQL (`waiting`: their xact_start, as `observer` sees them), each after
 * the first cut (which was before the warning); once `release` frees the lock, it migrates and
 * serves, having said the wait once.
 */
async function waitsThenServes(t: Test, serve: Served, waits: (l: LogLine) => boolean, observer: pg.Client, waiting: pg.QueryConfig, release: () => Promise<unknown>, tries = 3) {
  const seen = new Set<string>()
  // A hang guard, not a latency bound: a serve that stopped trying fails here, not at tap's timeout.
  const giveUp = Date.now() + 60_000
  while (seen.size < tries && serve.child.exitCode === null && Date.now() < giveUp) {
    const { rows } = await observer.query<{ xact_start: string }>(waiting)
    for (const r of rows) seen.add(r.xact_start)
    if (seen.size < tries) await new Promise((r) => setTimeout(r, 50))
  }
  t.equal(seen.size, tries, `${tries} tries seen waiting, each in a transaction of its own`)
  t.equal(serve.child.exitCode, null, 'still running')
  await release()
  const admin = `http://${(await serve.waitForLog((l) => l.message === 'admin listening')).address as string}`
  await serve.waitForLog((l) => l.message === 'gateway listening')
  t.equal((await call(`${admin}/readyz`)).status, 200, 'ready once the lock is free')
  const { rows } = await observer.query<{ n: number }>('SELECT count(*)::int AS n FROM keygate_migrations')
  t.equal(rows[0]?.n, readMigrations().length, 'and migrated')
  t.equal(serve.logs.filter(waits).length, 1, 'the wait is said once')
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
}

/** A stop signal to a start that waits (for the store, a lock) ends it at once, exit 0. */
async function stopsWhileWaiting(t: Test, serve: Served) {
  serve.child.kill('SIGTERM')
  const code = await Promise.race([serve.exited, new Promise<string>((r) => setTimeout(() => r('still running after 30 s'), 30_000).unref())])
  t.equal(code, 0, 'exit 0')
  t.ok(serve.logs.some((l) => l.message === 'stopped during start-up, before serving' && l.signal === 'SIGTERM'), 'says so')
  t.notOk(serve.logs.some((l) => /listening$/.test(l.message)), 'and never listened')
}

// Before (found by a review): with a lock_timeout set on keygate's role or database (common on
// managed PostgreSQL), a `serve` starting while another instance migrated exited 1 once the
// lock_timeout cut its wait for the migration lock: in a rolling start of many instances, all but
// the migrating one, until a service manager restarted them.
t.test("a start whose wait for the migration lock the role's or database's lock_timeout cuts keeps waiting, says so once, and serves once the lock is free", async (t) => {
  const { migrating, serve, waits, warned } = await serveWaitingOnLockTimeout(t)
  t.match(warned.message, /waiting for keygate's migration lock, held by another session/, 'says what it waits for')
  t.match(warned.message, /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/, 'and what cut a wait')
  t.match(warned, { lock_timeout: '200ms', holder: /PostgreSQL pid \d+, application "another-keygate"/ }, 'naming the lock_timeout and the session that holds the lock')
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objid = $1`, values: [MIGRATION_LOCK_ID] }
  await waitsThenServes(t, serve, waits, migrating, waiting, () => migrating.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK_ID]))
})

t.test('a stop signal while the start waits on a migration lock that the lock_timeout keeps cutting ends it at once, exit 0', async (t) => {
  await stopsWhileWaiting(t, (await serveWaitingOnLockTimeout(t)).serve)
})

// Before (found by a review): once the migration lock was taken, a migration's own statement
// whose wait for a table lock the role's or database's lock_timeout cut (during a rolling
// upgrade, an instance not upgraded yet in a transaction on that table) ended the start, exit 1,
// with "migration ... failed: canceling statement due to lock timeout", as for a broken file.
t.test("a start whose migration's wait for a table lock the role's or database's lock_timeout cuts tries the migrations again, says so once, and serves once the table is free", async (t) => {
  const { reader, observer, serve, waits, warned } = await serveWaitingOnTableLock(t)
  t.match(warned.message, /waiting for a table lock that migration 0023_n8n_key_scopes_enforced\.sql needs, held by another session/, 'says what it waits for')
  t.match(warned.message, /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/, 'and what cut a wait')
  t.match(warned, { lock_timeout: '200ms', migration: '0023_n8n_key_scopes_enforced.sql', holder: new RegExp(`ACCESS SHARE on n8n_api_keys \\(PostgreSQL pid ${reader.pid}, application "keygate-before"`) }, 'naming the lock_timeout, the file and the session that holds the table')
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => reader.client.query('ROLLBACK'))
})

t.test("a stop signal while the start's migrations wait on a table lock that the lock_timeout keeps cutting ends it at once, exit 0", async (t) => {
  await stopsWhileWaiting(t, (await serveWaitingOnTableLock(t)).serve)
})

// Before (found by a review): once the migration lock was taken, keygate's read of
// keygate_migrations waited for an operator's lock on it (LOCK TABLE, VACUUM FULL), the
// role's or database's lock_timeout cut the wait, and the start ended, exit 1, with "unexpected
// error: canceling statement due to lock timeout", as for a bug.
t.test("a start whose wait for keygate_migrations, held by an operator, the role's or database's lock_timeout cuts tries the migrations again, says so once, and serves once the table is free", async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const operator = await lockTable(t, url, 'keygate_migrations', 'ACCESS EXCLUSIVE', 'operator')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /keygate_migrations/.test(l.message)
  const { serve, warned } = await serveWaiting(t, url, waits)
  t.match(warned.message, /^waiting for a lock on keygate_migrations, the table of applied migrations, that another session holds or is queued for/, 'says what it waits for')
  t.match(warned.message, /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/, 'and what cut a wait')
  t.match(warned, { lock_timeout: '200ms', table: 'keygate_migrations', holder: new RegExp(`ACCESS EXCLUSIVE on keygate_migrations \\(PostgreSQL pid ${operator.pid}, application "operator"`) }, 'naming the lock_timeout, the table and the session that holds it')
  t.notOk('migration' in warned, 'and no file')
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'keygate_migrations'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => operator.client.query('ROLLBACK'))
})

/**
 * A `serve` started with store.auto_migrate off (store.query_timeout_ms 500) on a migrated
 * database whose keygate_migrations an operator's open transaction holds (ACCESS EXCLUSIVE), with
 * `lockTimeout` on the database if given: returned once the start has logged that its read of the
 * table waits, a cut of that read behind it. `observer`: a session of the test's.
 */
async function serveWaitingOnRecords(t: Tap, lockTimeout?: string) {
  const { url } = await migratedDatabase(t)
  if (lockTimeout) await setOnDatabase(url, 'lock_timeout', lockTimeout)
  const cwd = scratchDir('keygate-records-held-')
  writeFileSync(join(cwd, 'keygate.yaml'), 'store:\n  auto_migrate: false\n  query_timeout_ms: 500\n')
  const operator = await lockTable(t, url, 'keygate_migrations', 'ACCESS EXCLUSIVE', 'operator')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /keygate_migrations/.test(l.message)
  return { operator, observer, waits, ...(await serveWaiting(t, url, waits, { KEYGATE_CONFIG: join(cwd, 'keygate.yaml') })) }
}

// Before (found by a review): with store.auto_migrate off, the start's read of keygate_migrations
// (is every migration applied?) waited for an operator's lock on it like any statement, and the
// start ended, exit 1, once store.query_timeout_ms or a lock_timeout cut the wait ("the store ...
// cancelled the statement", "could not take a lock the statement needs"), naming neither the
// table nor the session holding it.
t.test('store.auto_migrate off: a start whose read of keygate_migrations, held by an operator, store.query_timeout_ms or a lock_timeout cuts reads it again, says so once, and serves once the table is free', async (t) => {
  for (const lockTimeout of [undefined, '200ms']) {
    await t.test(lockTimeout ? `with a lock_timeout of ${lockTimeout} on the database` : 'store.query_timeout_ms, without a lock_timeout', async (t) => {
      const { operator, observer, waits, serve, warned } = await serveWaitingOnRecords(t, lockTimeout)
      t.match(warned.message, /^waiting for a lock on keygate_migrations, the table of applied migrations, that another session holds or is queued for/, `says what it waits for: ${warned.message}`)
      t.match(warned.message, lockTimeout ? /lock_timeout set on keygate's role or database cut a wait for it \(SQLSTATE 55P03\)/ : /cancelled while it waited for it \(SQLSTATE 57014/, 'and what cut a wait')
      t.match(warned.message, /store\.auto_migrate is off/, 'and why it reads the table')
      t.match(warned, { table: 'keygate_migrations', holder: new RegExp(`ACCESS EXCLUSIVE on keygate_migrations \\(PostgreSQL pid ${operator.pid}, application "operator"`) }, 'naming the table and the session that holds it')
      if (lockTimeout) t.match(warned, { lock_timeout: lockTimeout }, 'and the lock_timeout')
      else t.notOk('lock_timeout' in warned, 'without a lock_timeout')
      const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'keygate_migrations'::regclass` }
      await waitsThenServes(t, serve, waits, observer, waiting, () => operator.client.query('ROLLBACK'))
    })
  }
})

// As the waits with store.auto_migrate on: the signal is not held until the table is free.
t.test("store.auto_migrate off: a stop signal while the start's read of keygate_migrations waits for an operator's lock on it ends it at once, exit 0", async (t) => {
  for (const lockTimeout of [undefined, '200ms']) {
    await t.test(lockTimeout ? `with a lock_timeout of ${lockTimeout} on the database` : 'store.query_timeout_ms, without a lock_timeout', async (t) => {
      await stopsWhileWaiting(t, (await serveWaitingOnRecords(t, lockTimeout)).serve)
    })
  }
})

t.test('a start that waited for keygate_migrations, then for a table a migration needs, says each wait once', async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  await setOnDatabase(url, 'lock_timeout', '200ms')
  const reader = await lockTable(t, url, 'n8n_api_keys', 'ACCESS SHARE', 'keygate-before')
  const operator = await lockTable(t, url, 'keygate_migrations', 'ACCESS EXCLUSIVE', 'operator')
  const observer = await ownSession(t, url)
  const onRecords = (l: LogLine) => l.level === 'warn' && /keygate_migrations/.test(l.message)
  const { serve } = await serveWaiting(t, url, onRecords)
  await operator.client.query('ROLLBACK')
  const waits = (l: LogLine) => l.level === 'warn' && /table lock/.test(l.message)
  const warned = await serve.waitForLog(waits)
  t.match(warned, { migration: '0023_n8n_key_scopes_enforced.sql', holder: new RegExp(`ACCESS SHARE on n8n_api_keys \\(PostgreSQL pid ${reader.pid}`) }, "the file's wait is said too")
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => reader.client.query('ROLLBACK'), 1)
  t.equal(serve.logs.filter(onRecords).length, 1, 'the wait for keygate_migrations is said once')
})

// Before (found by a review): a migration's statement that PostgreSQL ended to break a deadlock
// with another session (a keygate not upgraded yet, its transaction writing keys and reading
// n8n_api_keys) ended the start, exit 1, with "migration ... failed: deadlock detected".
t.test("a start whose migration's statement PostgreSQL ends to break a deadlock tries the migrations again, says so once, and serves once the other session ends", async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  const other = await deadlockingMigrations(t, url, 'keygate-before')
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /deadlock/.test(l.message)
  const { serve, warned } = await serveWaiting(t, url, waits)
  await other.read
  t.match(warned.message, /^migration 0024_rotation_notices_of_active_keys\.sql's statement was ended by PostgreSQL to break a deadlock with another session \(SQLSTATE 40P01/, 'says what ended the statement')
  t.notMatch(warned.message, /lock_timeout|55P03/, 'and not a lock_timeout')
  t.match(warned, { migration: '0024_rotation_notices_of_active_keys.sql', holder: new RegExp(`on api_keys[^(]*\\(PostgreSQL pid ${other.pid}, application "keygate-before"`) }, 'naming the file and the other session')
  t.notOk('lock_timeout' in warned, 'without a lock_timeout')
  // Tried again: its next try waits for n8n_api_keys, which the other session read meanwhile.
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => other.client.query('ROLLBACK'), 1)
})

t.test("a start whose statement on keygate_migrations PostgreSQL ends to break a deadlock (an operator's transaction) tries the migrations again, says so once, and serves once the other session ends", async (t) => {
  const url = await freshDatabase(t)
  await migratedBelow(t, url, 23)
  const other = await deadlockingMigrations(t, url, 'operator', { table: 'keygate_migrations', mode: 'SHARE' })
  const observer = await ownSession(t, url)
  const waits = (l: LogLine) => l.level === 'warn' && /deadlock/.test(l.message)
  const { serve, warned } = await serveWaiting(t, url, waits)
  await other.read
  t.match(warned.message, /^keygate's statement on keygate_migrations, the table of applied migrations, was ended by PostgreSQL to break a deadlock with another session \(SQLSTATE 40P01/, 'says what ended the statement')
  t.match(warned, { table: 'keygate_migrations', holder: new RegExp(`SHARE on keygate_migrations \\(PostgreSQL pid ${other.pid}, application "operator"`) }, 'naming the table and the other session')
  t.notOk('migration' in warned || 'lock_timeout' in warned, 'without a file or a lock_timeout')
  // Tried again: its next try waits for n8n_api_keys, which the other session read meanwhile.
  const waiting = { text: `SELECT a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND NOT l.granted AND l.relation = 'n8n_api_keys'::regclass` }
  await waitsThenServes(t, serve, waits, observer, waiting, () => other.client.query('ROLLBACK'), 1)
})

t.test('an admin request the drain cuts is waited for before the store closes: it ends, and `stopped` is the last line (found by a review)', async (t) => {
  const url = await freshDatabase(t)
  const cwd = scratchDir('keygate-stop-handler-')
  writeFileSync(join(cwd, 'keygate.yaml'), 'gateway:\n  shutdown_timeout_ms: 300\n')
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN, KEYGATE_CONFIG: join(cwd, 'keygate.yaml') })
  const serve = await startKeygate(t, { args: ['--upstream', 'http://127.0.0.1:9'], env, cwd })
  t.equal((await call(`${serve.admin}/v1/keys`, { token: ADMIN_TOKEN })).status, 200)
  // Another session holds the keys' table: the import's look-up of the hashes it brings waits for
  // it, past the drain's deadline, and its transaction comes after.
  const holder = new pg.Client({ connectionString: url })
  await holder.connect()
  t.teardown(() => holder.end().catch(() => {}))
  await holder.query('BEGIN')
  await holder.query('LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE')
  const hash = createHash('sha256').update(randomUUID()).digest('hex')
  const renamed = call(`${serve.admin}/v1/keys/import`, { method: 'POST', token: ADMIN_TOKEN, body: { type: 'user', rows: [{ key_hash: hash, name: 'imported' }] } }).then(
    (r) => r.status,
    () => 'cut',
  )
  let waiting = false
  for (let i = 0; i < 400 && !waiting; i++) {
    const { rows } = await holder.query(`SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`)
    waiting = rows.length > 0
    if (!waiting) await new Promise((r) => setTimeout(r, 50))
  }
  t.ok(waiting, 'the import waits for the table')
  serve.child.kill('SIGTERM')
  t.equal(await renamed, 'cut', 'the drain (300 ms) cuts its connection')
  await new Promise((r) => setTimeout(r, 500))
  await holder.query('COMMIT')
  t.equal(await Promise.race([serve.exited, new Promise<string>((r) => setTimeout(() => r('still running after 30 s'), 30_000).unref())]), 0, 'exit 0')
  const after = serve.logs.slice(serve.logs.findIndex((l) => l.message === 'shutting down'))
  t.notOk(after.some((l) => l.level === 'error'), `no error logged (${JSON.stringify(after.filter((l) => l.level === 'error').map((l) => l.message))})`)
  t.equal(after.at(-1)?.message, 'stopped', '`stopped` is the last line')
  const { rows } = await holder.query('SELECT name FROM api_keys WHERE key_hash = $1', [hash])
  t.equal(rows[0]?.name, 'imported', 'the import its client was cut from was made whole (the CLI says it may have been)')
})

t.test('PostgreSQL that stops answering: requests that need it get 503 store_unavailable after store.query_timeout_ms, and all is well once it answers again', async (t) => {
  // One connection: it is open when the gate goes silent, so it is reused after, and on it a
  // statement without a timeout would wait for ever (and the pool with it).
  const { gate, serve, upstream } = await serveBehindGate(t, 'query-timeout', 'store:\n  query_timeout_ms: 300\n  pool_max: 1\n')
  const token = ADMIN_TOKEN
  const created = await call(`${serve.admin}/v1/keys`, { method: 'POST', token, body: { name: 'not yet cached', type: 'user' } })
  t.equal(created.status, 201)
  const auth = { authorization: `Bearer ${created.json.key}` }
  // The bootstrap token and a webhook signing secret sent where event names belong are refused
  // without being sent back (before, the 400's message quoted both).
  const whsec = `whsec_${randomBytes(32).toString('base64')}`
  const pasted = await call(`${serve.admin}/v1/webhooks`, { method: 'POST', token, body: { url: 'https://hooks.example.com/in', events: [token, whsec] } })
  t.equal(pasted.status, 400, pasted.text)
  t.match(pasted.json.error.message, /events\[0\]: "\[redacted\]" is not allowed/)
  t.notOk(pasted.text.includes(token) || pasted.text.includes(whsec.slice(6, 30)), 'neither secret is in the answer', { text: pasted.text })

  // Every connection to PostgreSQL, open or new, goes silent. Before, the one pooled connection
  // stayed held for good: every call needing the store failed, even after PostgreSQL answered again.
  // Both at once: each waits on the pool (its one connection taken, each waiter times out on its
  // own after the pool's 5 s to connect), one after the other they took 10 s.
  gate.set('silent')
  const [refused, listed] = await Promise.all([call(`${serve.gateway}/x`, { headers: auth }), call(`${serve.admin}/v1/keys`, { token })])
  t.equal(refused.status, 503, 'a key not in the cache: 503')
  t.equal(refused.json.error.code, 'store_unavailable', refused.text)
  t.equal(listed.status, 503, 'an admin call: 503')
  t.equal(listed.json.error.code, 'store_unavailable', listed.text)
  // The statement timed out, or the pool's one connection was still held by one that had.
  t.match(listed.json.error.message, /did not answer within store\.query_timeout_ms \(300 ms\)|timeout/)
  t.equal(upstream.received.length, 0, 'nothing forwarded')

  gate.set('open')
  t.equal((await call(`${serve.gateway}/x`, { headers: auth })).status, 200, 'served once PostgreSQL answers again')
  t.equal((await call(`${serve.admin}/v1/keys`, { token })).status, 200)
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
})

t.test('/readyz on a store that stops answering says so within 2 s, not after store.query_timeout_ms, and is ready again once it answers', async (t) => {
  // Before (found by a review): /readyz waited store.query_timeout_ms (here 5 s), past any
  // probe's timeout, and a person's curl hung. (Not longer: the stop at the end waits for the
  // scheduler's statement hung meanwhile, up to that timeout; 10 s before, with the same verdict
  // either way: the probes' reason names their own 2 s.)
  const { gate, serve } = await serveBehindGate(t, 'ready-hung', 'store:\n  query_timeout_ms: 5000\n')
  t.equal((await call(`${serve.admin}/readyz`)).status, 200)
  const mark = gate.sent().length
  gate.set('silent')
  // Three probes at once share one query to the store.
  const probes = await Promise.all([1, 2, 3].map(() => call(`${serve.admin}/readyz`)))
  for (const probe of probes) {
    t.equal(probe.status, 503, probe.text)
    t.equal(probe.json.reason, 'store not answering (no answer within 2 s)')
  }
  t.equal(gate.sent().slice(mark).split("to_regclass('keygate_migrations')").length - 1, 1, 'the store was asked once')
  gate.set('open')
  let ready = await call(`${serve.admin}/readyz`)
  // A hang guard, not a timing: the silent connections end at the pool's own timeouts.
  for (let i = 0; i < 600 && ready.status !== 200; i++) {
    await new Promise((r) => setTimeout(r, 100))
    ready = await call(`${serve.admin}/readyz`)
  }
  t.equal(ready.status, 200, `ready again: ${ready.text}`)
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
})

t.test('a store that stops answering and a webhook receiver that never answers while serve stops: it exits 0 within store.query_timeout_ms and 2 s of the drain, saying what it lost', async (t) => {
  // Before (found by reviews): what is written after the drain (usage counts, the anomaly
  // detector's check, webhook rounds, one more of which started meanwhile) each waited out its
  // own timeouts in turn (6.5 s with this store timeout of 500 ms and no webhook, 11 s with the
  // default 5 s), a webhook attempt in flight held the exit for all of webhooks.timeout_ms (here
  // 60 s), and "stopped" was logged before all that.
  const url = await freshDatabase(t)
  const { gate, url: through } = await gateInFront(t, url)
  const hits: string[] = []
  const receiver = http.createServer((req) => void hits.push(String(req.headers['webhook-id']))) // never answers
  await new Promise<void>((resolve) => receiver.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    receiver.closeAllConnections()
    receiver.close()
  })
  const cwd = scratchDir('keygate-stop-silent-')
  writeFileSync(
    join(cwd, 'keygate.yaml'),
    'store:\n  query_timeout_ms: 500\nusage:\n  flush_interval_s: 3600\nwebhooks:\n  timeout_ms: 60000\n  poll_interval_ms: 50\n  allow_private: ["127.0.0.1/32"]\n',
  )
  const token = 'an-admin-token-of-32-characters!'
  const env = isolatedEnv({ DATABASE_URL: through, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: token, KEYGATE_CONFIG: join(cwd, 'keygate.yaml') })
  const upstream = await startUpstream(t)
  const serve = await startKeygate(t, { args: ['--upstream', upstream.url], env, cwd })
  const port = (receiver.address() as import('node:net').AddressInfo).port
  t.equal((await call(`${serve.admin}/v1/webhooks`, { method: 'POST', token, body: { url: `http://127.0.0.1:${port}/in`, events: ['key.created'] } })).status, 201)
  const created = await call(`${serve.admin}/v1/keys`, { method: 'POST', token, body: { name: 'counted', type: 'service' } })
  t.equal(created.status, 201)
  for (let i = 0; i < 3; i++) t.equal((await call(`${serve.gateway}/x`, { headers: { authorization: `Bearer ${created.json.key}` } })).status, 200)
  for (let i = 0; i < 200 && hits.length === 0; i++) await new Promise((r) => setTimeout(r, 50))
  t.equal(hits.length, 1, 'the key.created delivery is in flight, unanswered')

  gate.set('silent')
  const started = performance.now()
  t.equal(await serve.stop(), 0, 'exit 0')
  const took = performance.now() - started
  // At most the scheduler's statement in flight (1.5 s) and then 2.5 s; the margin is for a
  // loaded machine (a hang guard, not a measure: before, the wait was 60 s).
  t.ok(took < 15_000, `exited ${Math.round(took)} ms after SIGTERM`)
  const after = serve.logs.slice(serve.logs.findIndex((l) => l.message === 'shutting down'))
  const cut = after.find((l) => l.message.startsWith('stopping takes too long'))
  t.match(cut, { level: 'error', waited_ms: 2500 }, 'the cut is logged')
  const lost = after.find((l) => l.message === 'could not write the last usage counts at shutdown: they are lost')
  // Either the flush gave up first and said so, or the cut came first and said what was pending.
  if (lost) t.match(lost, { keys: 1, requests: 3 }, 'the usage counts lost are logged')
  else t.match(cut, { usage_lost: { keys: 1, requests: 3 } }, 'the usage counts lost are logged with the cut')
  t.notOk(after.some((l) => l.message === 'stopped'), '"stopped" is not claimed')
  t.equal(after.at(-1), cut, 'nothing is logged after the cut')
  t.equal(hits.length, 1, 'no second attempt was made during the stop')
})

t.test('SIGTERM with PostgreSQL frozen: serve exits once stopped, though its connections to the store never finish closing', async (t) => {
  // Before (found by a failure review): `stopped` was logged, and the process stayed for as long as
  // PostgreSQL was frozen (a connection ended on keygate's side, never on the server's, kept the
  // event loop alive), until the service manager's SIGKILL.
  const { gate, serve } = await serveBehindGate(t, 'stop-frozen', 'store:\n  query_timeout_ms: 500\n')
  // Idle pooled connections, open when the store freezes.
  for (let i = 0; i < 3; i++) t.equal((await call(`${serve.admin}/v1/keys`, { token: ADMIN_TOKEN })).status, 200)
  gate.set('silent')
  serve.child.kill('SIGTERM')
  const code = await Promise.race([serve.exited, new Promise<string>((r) => setTimeout(() => r('still running after 30 s'), 30_000).unref())])
  t.equal(code, 0, 'exit 0')
  const stopped = serve.logs.findIndex((l) => l.message === 'stopped')
  t.ok(stopped >= 0, 'stopped is logged')
  t.ok(serve.logs.slice(stopped).some((l) => l.level === 'warn' && l.message.startsWith('stopped, but a connection (to the store, most likely) has not closed')), 'then why it exits without waiting: ' + JSON.stringify(serve.logs.slice(stopped)))
})

t.test('a read-only store (a standby after a failover): writes answer 503 store_unavailable saying so, and /readyz is not ready', async (t) => {
  // Before (found by a failure review): every write answered 500 internal_error while /readyz
  // said ready.
  const url = await freshDatabase(t)
  const name = new URL(url).pathname.slice(1)
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN })
  const upstream = await startUpstream(t)
  const serve = await startKeygate(t, { args: ['--upstream', upstream.url], env })
  const admin = new pg.Client({ connectionString: url })
  await admin.connect()
  t.teardown(() => admin.end())
  // Every connection made from now on is read-only; the pool's are ended, and made again.
  const readOnly = async (on: boolean) => {
    await admin.query(on ? `ALTER DATABASE "${name}" SET default_transaction_read_only = on` : `ALTER DATABASE "${name}" RESET default_transaction_read_only`)
    await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [name])
  }
  await readOnly(true)
  const readyReason = async (wanted: (reason: string | undefined) => boolean) => {
    let ready = await call(`${serve.admin}/readyz`)
    // The first calls may meet the ended connections: a hang guard, not a timing.
    for (let i = 0; i < 100 && !wanted(ready.json?.reason); i++) {
      await new Promise((r) => setTimeout(r, 100))
      ready = await call(`${serve.admin}/readyz`)
    }
    return ready
  }
  const notReady = await readyReason((reason) => reason?.startsWith('store is read-only') === true)
  t.equal(notReady.status, 503)
  t.equal(notReady.json.reason, 'store is read-only (a standby, or default_transaction_read_only on): DATABASE_URL must name the primary')
  const refused = await call(`${serve.admin}/v1/keys`, { method: 'POST', token: ADMIN_TOKEN, body: { name: 'on a standby', type: 'user' } })
  t.equal(refused.status, 503, refused.text)
  t.equal(refused.json.error.code, 'store_unavailable')
  t.match(refused.json.error.message, /refuses writes: it is read-only .*DATABASE_URL must name the primary/)
  // Before (found by a failure review): it read 1, the store answering SELECT 1.
  t.match((await call(`${serve.admin}/metrics`)).text, /^keygate_store_up 0$/m, 'keygate_store_up is 0 on a read-only store')
  await readOnly(false)
  t.equal((await readyReason((reason) => reason === undefined)).status, 200, 'ready again on the primary')
  t.match((await call(`${serve.admin}/metrics`)).text, /^keygate_store_up 1$/m, 'and 1 again')
  t.equal((await call(`${serve.admin}/v1/keys`, { method: 'POST', token: ADMIN_TOKEN, body: { name: 'on the primary', type: 'user' } })).status, 201)
  t.equal(await serve.stop(), 0, 'SIGTERM: exit 0')
})

t.test('a store gone silent with store.query_timeout_ms 0 (no timeout): a stop still ends, bounded by the drain and 10 s', async (t) => {
  // Before (found by the review of the change that bounded stops): the bound was armed once the
  // drain was over, and the drain waited for the scheduler's round on its statement, for ever
  // with no query timeout: "shutting down" was the last line, and the process stayed.
  const { gate, serve } = await serveBehindGate(t, 'stop-untimed', 'store:\n  query_timeout_ms: 0\nscheduler:\n  interval_s: 1\ngateway:\n  shutdown_timeout_ms: 500\n')
  const mark = gate.sent().length
  gate.set('silent')
  // A scheduler round starts every second: one is now waiting on its statement, with no timeout.
  // Waited for until the store was asked something in the silence (a statement, or a new
  // connection's start-up: either waits for good), and at least 2.5 s (before: 2.5 s only, which
  // on the loaded suite could pass before a round began).
  const started = Date.now()
  while ((gate.sent().length === mark || Date.now() - started < 2500) && Date.now() - started < 30_000) await new Promise((r) => setTimeout(r, 100))
  t.ok(gate.sent().length > mark, 'the store was asked something in the silence')
  const stopped = await Promise.race([serve.stop(), new Promise<string>((r) => setTimeout(() => r('still running after 40 s'), 40_000))])
  t.equal(stopped, 0, 'exit 0')
  t.match(serve.logs.find((l) => l.message.startsWith('stopping takes too long')), { level: 'error', waited_ms: 10_500 }, 'cut at the drain and 10 s, and said so')
})

t.test('a start waits for a PostgreSQL that is not up yet (store.start_wait_s), gives up after it, and not at all for a wrong database (found by a review)', async (t) => {
  const url = await freshDatabase(t)
  // Every connection dropped at once, as by a proxy or Service with no PostgreSQL behind it yet.
  const { gate, url: through } = await gateInFront(t, url, 'shut')
  const env = isolatedEnv({ DATABASE_URL: through, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const upstream = await startUpstream(t)
  // Opened 1.5 s after serve first tried it (before, 2.5 s after serve was started: on a loaded
  // machine serve had not tried yet, found PostgreSQL there, and said nothing of a wait).
  let openedAt: number | undefined
  const watch = setInterval(() => {
    if (gate.connections() === 0) return
    clearInterval(watch)
    setTimeout(() => {
      gate.set('open')
      openedAt = performance.now()
    }, 1500)
  }, 20)
  t.teardown(() => clearInterval(watch))
  const serve = await startKeygate(t, { args: ['--upstream', upstream.url], env })
  t.ok(openedAt !== undefined && performance.now() >= openedAt, 'it served once PostgreSQL was there')
  t.equal((await call(`${serve.admin}/readyz`)).status, 200)
  t.match(serve.logs.find((l) => l.message === 'PostgreSQL is not up yet; trying again every second'), { level: 'warn', gives_up_after_s: 60, err: { message: /ECONNRESET|Connection terminated/ } }, 'and said why it waited')
  t.match(serve.logs.find((l) => l.message === 'PostgreSQL answers; starting'), { level: 'info', waited_s: Number }, 'and when it was over')

  // Given up after the wait: exit 1, the driver's words (before, at once: a Kubernetes pod
  // started beside its database went into CrashLoopBackOff).
  const cwd = scratchDir('keygate-wait-')
  writeFileSync(join(cwd, 'keygate.yaml'), 'store:\n  start_wait_s: 2\n')
  const closed = net.createServer()
  await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r))
  const port = (closed.address() as net.AddressInfo).port
  await new Promise((r) => closed.close(r))
  const refusedEnv = { ...env, DATABASE_URL: `postgres://postgres@127.0.0.1:${port}/none`, KEYGATE_CONFIG: join(cwd, 'keygate.yaml') }
  let at = performance.now()
  const gaveUp = await runCli(['serve', '--upstream', upstream.url, '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'], { env: refusedEnv })
  const took = performance.now() - at
  t.equal(gaveUp.code, 1)
  // The seconds it tried, rounded: 2, or more when the tries a second apart run late (on a
  // loaded machine, a last try 2.5 s or more after the first is said as 3, where this asked for
  // 2 alone), and no more than the command took.
  const said = new RegExp(`cannot reach PostgreSQL at 127\\.0\\.0\\.1:${port}: connect ECONNREFUSED \\S+ \\(still, after trying for (\\d+) s\\)`).exec(gaveUp.stderr)
  t.ok(said, `the driver's words and how long it tried: ${gaveUp.stderr}`)
  t.ok(Number(said?.[1]) >= 2 && Number(said?.[1]) <= Math.round(took / 1000), `tried for the whole wait, and says how long (${said?.[1]} s, the command took ${Math.round(took)} ms)`)
  t.ok(took >= 2000, 'after trying for the whole wait (before, a second short of it)')

  // A database that does not exist is no outage: the start ends at once.
  at = performance.now()
  const wrong = await runCli(['serve', '--upstream', upstream.url, '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0'], { env: { ...env, DATABASE_URL: url.replace(/\/[^/]*$/, '/keygate_no_such_database') } })
  t.equal(wrong.code, 1)
  t.match(wrong.stderr, /keygate_no_such_database" does not exist/)
  t.ok(performance.now() - at < 20_000, 'without waiting for the 60 s')
})

t.test('/readyz with PostgreSQL gone: 503 naming the error code only; the host and port are in the log, not in the answer', async (t) => {
  const url = await freshDatabase(t)
  const { gate, url: through } = await gateInFront(t, url)
  const env = isolatedEnv({ DATABASE_URL: through, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  const upstream = await startUpstream(t)
  const serve = await startKeygate(t, { args: ['--upstream', upstream.url], env })
  t.equal((await call(`${serve.admin}/readyz`)).status, 200)

  gate.set('refused')
  // The pooled connection's loss may be the first answer; a new connection is then refused.
  let ready = await call(`${serve.admin}/readyz`)
  for (let i = 0; i < 50 && ready.json?.reason !== 'store unreachable (ECONNREFUSED)'; i++) {
    await new Promise((r) => setTimeout(r, 100))
    ready = await call(`${serve.admin}/readyz`)
  }
  t.equal(ready.status, 503)
  // Before: "store unreachable: connect ECONNREFUSED 127.0.0.1:<port>", to anyone who asked.
  t.same(ready.json, { status: 'unavailable', reason: 'store unreachable (ECONNREFUSED)' })
  t.notMatch(ready.text, String(gate.port))
  // Waited for: the log comes on the child's stdout, which may reach the test after its answer.
  const logged = await serve.waitForLog((l) => l.message === 'not ready: the store cannot be reached' && JSON.stringify(l.err).includes(`127.0.0.1:${gate.port}`))
  t.ok(logged, 'the whole error is logged')
  const before = serve.logs.filter((l) => l.message === 'not ready: the store cannot be reached').length
  await call(`${serve.admin}/readyz`)
  await call(`${serve.admin}/readyz`)
  t.equal(serve.logs.filter((l) => l.message === 'not ready: the store cannot be reached').length, before, 'once per change, not per probe')
  t.equal(await serve.stop(), 0)
})

// Before (found by a review): while an operator held keygate_migrations (LOCK TABLE ... ACCESS
// EXCLUSIVE, VACUUM FULL), the probe's read of it waited: /readyz answered 503 "store not
// answering (no answer within 2 s)" (with a lock_timeout on the role or database, "store
// unreachable (55P03)"), logged the store as unreachable, and keygate_store_up read 0, so a load
// balancer took every instance out for as long as the lock lasted, while each served on.
t.test('/readyz and keygate_store_up while an operator holds keygate_migrations: the store answered, so it is up, judged by the migrations last read; said once, naming the session', async (t) => {
  for (const lockTimeout of [undefined, '200ms']) {
    await t.test(lockTimeout ? `with a lock_timeout of ${lockTimeout} on the database` : 'without a lock_timeout', async (t) => {
      const url = await freshDatabase(t)
      if (lockTimeout) await setOnDatabase(url, 'lock_timeout', lockTimeout)
      const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN })
      const upstream = await startUpstream(t)
      const serve = await startKeygate(t, { args: ['--upstream', upstream.url], env })
      t.equal((await call(`${serve.admin}/readyz`)).status, 200)
      const locked = (l: LogLine) => /keygate_migrations/.test(l.message)
      const operator = await lockTable(t, url, 'keygate_migrations', 'ACCESS EXCLUSIVE', 'operator')
      for (let i = 0; i < 3; i++) {
        const ready = await call(`${serve.admin}/readyz`)
        t.equal(ready.status, 200, `ready while the table is held: ${ready.text}`)
        t.same(ready.json, { status: 'ready' })
      }
      t.match((await call(`${serve.admin}/metrics`)).text, /^keygate_store_up 1$/m, 'keygate_store_up is 1')
      const said = await serve.waitForLog(locked)
      t.match(said, { level: 'info', holder: new RegExp(`ACCESS EXCLUSIVE on keygate_migrations \\(PostgreSQL pid ${operator.pid}, application "operator"`) }, `said at info, naming the session: ${JSON.stringify(said)}`)
      await operator.client.query('ROLLBACK')

      // A file made pending (its record gone) is not ready; while the table is held again, the
      // migrations last read decide: still not ready, for that file.
      const observer = await ownSession(t, url, 'operator')
      const [last] = readMigrations().slice(-1)
      await observer.query('DELETE FROM keygate_migrations WHERE version = $1', [last!.version])
      const reason = `migrations not applied: ${last!.name}`
      t.same((await call(`${serve.admin}/readyz`)).json, { status: 'unavailable', reason })
      await observer.query('BEGIN')
      await observer.query('LOCK TABLE keygate_migrations IN ACCESS EXCLUSIVE MODE')
      t.same((await call(`${serve.admin}/readyz`)).json, { status: 'unavailable', reason }, 'the migrations last read, while the table is held')
      t.match(await serve.waitForLog((l) => locked(l) && l !== said), { level: 'info', holder: /application "operator"/ }, 'a new lock is said again')
      await observer.query(`INSERT INTO keygate_migrations (version, name, checksum) VALUES ($1, $2, $3)`, [last!.version, last!.name, last!.checksum])
      await observer.query('COMMIT')
      t.equal((await call(`${serve.admin}/readyz`)).status, 200, 'ready once the record is back and the table free')
      t.equal(await serve.stop(), 0)
      t.equal(serve.logs.filter(locked).length, 2, 'each lock said once, whatever the probes and scrapes')
      t.notOk(serve.logs.some((l) => l.message === 'not ready: the store cannot be reached'), 'the store is never logged as unreachable')
    })
  }
})

// Before (found by a review): a read of keygate_migrations that found a changed record
// (migration_modified) did not end the lock episode, so the next operator's lock on the table was
// never said.
t.test('/readyz: a lock on keygate_migrations after a read that found a changed record is said again', async (t) => {
  const url = await freshDatabase(t)
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN })
  const upstream = await startUpstream(t)
  const serve = await startKeygate(t, { args: ['--upstream', upstream.url], env })
  const locked = (l: LogLine) => /keygate_migrations/.test(l.message)
  const operator = await ownSession(t, url, 'operator')
  await operator.query('BEGIN')
  await operator.query('LOCK TABLE keygate_migrations IN ACCESS EXCLUSIVE MODE')
  t.equal((await call(`${serve.admin}/readyz`)).status, 200, 'ready while the table is held')
  const said = await serve.waitForLog(locked)
  await operator.query('ROLLBACK')
  // Read again, the table free: a record changed, which the probe tells as such.
  const [last] = readMigrations().slice(-1)
  await operator.query(`UPDATE keygate_migrations SET checksum = 'changed' WHERE version = $1`, [last!.version])
  const reason = `migration ${last!.name} was changed after it was applied; restore it and put the change in a new numbered file`
  t.same((await call(`${serve.admin}/readyz`)).json, { status: 'unavailable', reason }, 'the table read: the changed record')
  await operator.query('BEGIN')
  await operator.query('LOCK TABLE keygate_migrations IN ACCESS EXCLUSIVE MODE')
  t.same((await call(`${serve.admin}/readyz`)).json, { status: 'unavailable', reason }, 'held again: the last read decides')
  await operator.query('ROLLBACK')
  // Logged before /readyz answered: all of it is in the output once serve has stopped.
  t.equal(await serve.stop(), 0)
  const again = serve.logs.filter((l) => locked(l) && l !== said)
  t.equal(again.length, 1, 'the new lock is said, once')
  t.match(again[0], { level: 'info', holder: /application "operator"/ }, 'naming the session')
})

t.test('a connection lost at the first admin key\'s commit: serve says whether the key printed was kept, asking the store', async (t) => {
  // Before (found by a review): any failure once the key was shown said "was NOT kept", also when
  // the commit was made and only its answer lost: the operator threw away a working key, and the
  // next start, finding an admin key, printed none.
  const start = async (when: 'before' | 'after', next?: 'refused') => {
    const url = await freshDatabase(t)
    const { gate, url: through } = await gateInFront(t, url)
    const cut = gate.cutOn('INSERT INTO api_keys', 'COMMIT\u0000', when, next)
    const env = isolatedEnv({ DATABASE_URL: through, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_UPSTREAM: 'http://127.0.0.1:9' })
    const first = await startKeygate(t, { env, waitFor: { gateway: false, admin: false } })
    t.equal(await first.exited, 1, `${when} the commit${next ? ', the store then refused' : ''}: exit 1`)
    await cut
    const printed = first.stderr().match(/kg_[0-9A-Za-z]{12}_[0-9A-Za-z]{28}/)?.[0]
    t.ok(printed, 'a first admin key was printed')
    const said = first.logs.find((l) => l.level === 'error' && l.message.startsWith('the first admin key printed above'))?.message ?? ''
    t.ok(first.stderr().includes(`keygate: ${said}`), 'and said on stderr')
    const direct = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_UPSTREAM: 'http://127.0.0.1:9' })
    const again = await startKeygate(t, { env: direct })
    // Through the command line's entry in this process (runCliHere): whether the store holds the key is what is asked, not the command.
    const valid = (await runCliHere(['api-key', 'validate', printed as string], { env: direct })).code
    t.equal(await again.stop(), 0)
    return { said, newKey: /created the first admin key/.test(again.stderr()), valid }
  }

  const lost = await start('before')
  t.match(lost.said, /^the first admin key printed above \(id \w+\) was NOT kept: .*; start again to make another, or set admin\.token/, 'not committed: NOT kept')
  // Only most likely (suspected by a review): a commit waiting for a synchronous standby shows later.
  t.match(lost.said, /Should that start print no new first admin key, this one was kept after all/, 'and how the next start tells otherwise')
  t.ok(lost.newKey, 'and indeed the next start makes one')

  const answerLost = await start('after')
  t.match(answerLost.said, /^the first admin key printed above \(id \w+\) was kept, and is valid: the store failed after committing it \(.*\); start again \(no new key is made\)$/, 'committed, the answer lost: kept')
  t.notOk(answerLost.newKey, 'and indeed the next start makes none')
  t.equal(answerLost.valid, 0, 'the key printed is valid')
  t.equal(lost.valid, 1, 'where not kept, it is not')

  const unasked = await start('after', 'refused')
  t.match(unasked.said, /^the first admin key printed above \(id \w+\) may not have been kept: .*the store could not be asked whether it was \(.*\)\. Start again: if that start prints no new first admin key, this one was kept and is valid; if it prints one, use that one/, 'the store gone: may not have been kept, and how to tell')
  t.notOk(unasked.newKey, 'here the next start prints none: the key was kept, as the message says it can tell')
})
