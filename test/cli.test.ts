// The `keygate` command as a real process: usage errors, the key lifecycle on the embedded store
// and on PostgreSQL, and afterwards no plaintext key in the database or in any captured log.
import t, { type Test } from 'tap'
import { mkdtempSync, statSync, writeFileSync, existsSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomUUID, hash } from 'node:crypto'
import { runCli, capturedStderr, folderBytes } from './helpers/cli.ts'
import { freshDatabase } from './helpers/stores.ts'
import { openDb } from '../core/db.ts'

const ENCRYPTION_KEY = Buffer.alloc(32, 7).toString('base64')
const plaintexts: string[] = []

function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'keygate-cli-'))
}

/** Environment that isolates a run from the machine's own keygate settings. */
function isolated(extra: Record<string, string | undefined>): Record<string, string | undefined> {
  return { DATABASE_URL: undefined, KEYGATE_CONFIG: undefined, KEYGATE_ENCRYPTION_KEY: undefined, LOG_LEVEL: 'debug', ...extra }
}

t.test('usage errors exit 2 with the reason on stderr and touch no store', async (t) => {
  const dir = tempDir()
  const dataDir = join(dir, 'store')
  const env = isolated({ KEYGATE_DATA_DIR: dataDir })
  const cases: Array<[string[], RegExp]> = [
    [[], /usage: keygate <command>/],
    [['frobnicate'], /unknown command "frobnicate"/],
    [['api-key'], /usage: keygate api-key <command>/],
    [['api-key', 'frobnicate'], /unknown api-key command "frobnicate"/],
    [['api-key', 'list', '--colour'], /Unknown option '--colour'/],
    [['api-key', 'list', 'extra'], /unexpected argument "extra"/],
    [['api-key', 'get'], /missing argument/],
    [['api-key', 'get', 'a', 'b'], /unexpected argument "b"/],
    [['api-key', 'revoke'], /missing argument\nusage: keygate api-key revoke/],
    [['api-key', 'rotate'], /missing argument/],
    [['api-key', 'validate'], /missing argument/],
    [['api-key', 'import'], /missing argument/],
    [['api-key', 'update', 'abc'], /nothing to change/],
    [['api-key', 'create', '--type', 'service'], /--name is required/],
    [['api-key', 'create', '--name', 'x'], /--type is required/],
    [['api-key', 'create', '--name'], /argument missing|Option '--name <value>' argument missing/],
    [['api-key', 'create', '--name', 'x', '--type', 'user', '--rate-limit', 'lots'], /--rate-limit: "lots" is not allowed/],
    [['api-key', 'create', '--name', 'x', '--type', 'user', '--expires-in', 'soon'], /--expires-in: "soon" is not a duration/],
    [['api-key', 'create', '--name', 'x', '--type', 'user', '--metadata', '{nope'], /--metadata: is not JSON/],
    [['api-key', 'create', '--name', 'x', '--type', 'user', '--metadata', '[1]'], /--metadata: expected a JSON object/],
    [['api-key', 'create', '--name', 'x', '--type', 'user', '--expires-in', '1d', '--expires-at', '2031-01-01T00:00:00Z'], /exclude each other/],
    [['api-key', 'create', '--name', 'x', '--type', 'user', '--rotate-every', 'often'], /--rotate-every: "often" is not a duration/],
    [['api-key', 'list', '--limit', '0'], /--limit: "0" is not allowed; expected an integer from 1 to 500/],
    [['api-key', 'list', '--limit', 'ten'], /--limit: "ten" is not allowed/],
    [['api-key', 'list', '--all', '--cursor', 'abc'], /--all and --cursor exclude each other/],
    [['api-key', 'rotate', 'abc', '--force=yes'], /--force/],
    [['config'], /usage: keygate config check/],
    [['config', 'check'], /give the file to check/],
    [['config', 'check', 'a.yaml', 'b.yaml'], /unexpected argument "b.yaml"/],
    [['migrate', 'now'], /unexpected argument "now"/],
  ]
  for (const [args, pattern] of cases) {
    const r = await runCli(args, { env, cwd: dir })
    t.equal(r.code, 2, `keygate ${args.join(' ')} exits 2`)
    t.match(r.stderr, pattern, `keygate ${args.join(' ')} says why`)
    t.notMatch(r.stderr, /\n\s+at .+:\d+:\d+/, 'no stack trace')
  }
  t.notOk(existsSync(dataDir), 'no store was created by a usage error')

  const json = await runCli(['api-key', 'create', '--type', 'user', '--json'], { env, cwd: dir })
  t.equal(json.code, 2)
  t.same(json.json().error.code, 'usage_error', '--json puts the error object on stdout')
})

t.test('help and version', async (t) => {
  const help = await runCli(['--help'])
  t.equal(help.code, 0)
  t.match(help.stdout, /api-key <command>/)
  const sub = await runCli(['api-key', 'create', '--help'])
  t.equal(sub.code, 0)
  t.match(sub.stdout, /--name NAME --type/)
  const version = await runCli(['--version'])
  t.match(version.stdout, /^\d+\.\d+\.\d+\n$/)
})

t.test('config check', async (t) => {
  const dir = tempDir()
  const good = join(dir, 'good.yaml')
  writeFileSync(good, 'routes:\n  - { name: api, path: /api, upstream: "http://127.0.0.1:3000" }\nlockout: { max_attempts: 3 }\n')
  const ok = await runCli(['config', 'check', good])
  t.equal(ok.code, 0)
  t.match(ok.stdout, /valid \(1 route\)/)

  const bad = join(dir, 'bad.yaml')
  writeFileSync(bad, 'gateway:\n  listen: "nowhere"\n  colour: blue\ncache: { ttl_s: 0 }\n')
  const r = await runCli(['config', 'check', bad, '--json'], { env: { CACHE_TTL_SECONDS: 'abc' } })
  t.equal(r.code, 1, 'an invalid file is refused with exit 1')
  t.match(r.stderr, /gateway\.listen: "nowhere" is not allowed; expected host:port/)
  t.match(r.stderr, /gateway\.colour: unknown key/)
  t.match(r.stderr, /cache\.ttl_s: 0 is not allowed; expected an integer from 1 to 86400/)
  t.notMatch(r.stderr, /CACHE_TTL_SECONDS/, 'check looks at the file alone, not the environment')
  t.same(r.json().error.details.problems.length, 3, 'every problem at once')

  const missing = await runCli(['config', 'check', join(dir, 'nope.yaml')])
  t.equal(missing.code, 1)
  t.match(missing.stderr, /nope\.yaml: cannot be read \(ENOENT\)/)

  const docs = await runCli(['config', 'docs'])
  t.equal(docs.code, 0)
  t.match(docs.stdout, /\| `cache\.ttl_s` \| `300` \| `CACHE_TTL_SECONDS`/)
})

interface Lifecycle {
  env: Record<string, string | undefined>
  cwd: string
}

async function lifecycle(t: Test, { env, cwd }: Lifecycle): Promise<void> {
  const run = (args: string[], input?: string) => runCli(args, { env, cwd, ...(input !== undefined ? { input } : {}) })

  const created = await run(['api-key', 'create', '--type', 'service', '--name', 'demo', '--scopes', 'orders:read,admin', '--owner', 'billing', '--json'])
  t.equal(created.code, 0, created.stderr)
  const c = created.json()
  plaintexts.push(c.key)
  t.match(c, { name: 'demo', type: 'service', status: 'active', scopes: ['orders:read', 'admin'], owner: 'billing' })
  t.notOk('key_hash' in c, 'the hash is not shown')

  const valid = await run(['api-key', 'validate', c.key])
  t.equal(valid.code, 0, 'a new key validates')
  t.match(valid.stdout, `valid: ${c.id}`)
  const viaStdin = await run(['api-key', 'validate', '-', '--json'], c.key + '\n')
  t.equal(viaStdin.code, 0, 'validate reads the key from stdin')
  t.equal(viaStdin.json().key.id, c.id)

  const bound = await run(['api-key', 'create', '--type', 'user', '--name', 'bound', '--cidrs', '10.0.0.0/8', '--rate-limit', '50/1m', '--expires-in', '30d', '--json'])
  t.equal(bound.code, 0, bound.stderr)
  plaintexts.push(bound.json().key)
  t.same(bound.json().rate_limit, { limit: 50, window_s: 60 })
  t.equal((await run(['api-key', 'validate', bound.json().key, '--address', '10.1.2.3'])).code, 0)
  const outside = await run(['api-key', 'validate', bound.json().key, '--address', '192.0.2.1'])
  t.equal(outside.code, 1)
  t.match(outside.stderr, /ip_blocked/)

  const list = await run(['api-key', 'list', '--json', '--type', 'service'])
  t.equal(list.code, 0)
  t.same(list.json().items.map((k: { id: string }) => k.id), [c.id])
  const table = await run(['api-key', 'list'])
  t.match(table.stdout, /^ID\s+NAME\s+TYPE\s+STATUS/)
  t.match(table.stdout, c.id)

  const updated = await run(['api-key', 'update', c.id, '--name', 'demo-renamed', '--json'])
  t.equal(updated.code, 0, updated.stderr)
  t.equal(updated.json().name, 'demo-renamed')

  const rotated = await run(['api-key', 'rotate', c.id, '--json'])
  t.equal(rotated.code, 0, rotated.stderr)
  const r = rotated.json()
  plaintexts.push(r.key)
  t.equal(r.previous.status, 'rotating')
  t.equal(r.rotated_from, c.id)
  t.equal((await run(['api-key', 'validate', c.key])).code, 0, 'the old key works during its grace period')
  t.equal((await run(['api-key', 'validate', r.key])).code, 0, 'the new key works')
  const again = await run(['api-key', 'rotate', c.id])
  t.equal(again.code, 1, 'a rotating key cannot be rotated again')
  t.match(again.stderr, `replaced by ${r.id}`)

  const forced = await run(['api-key', 'rotate', r.id, '--force', '--json'])
  t.equal(forced.code, 0)
  plaintexts.push(forced.json().key)
  t.equal((await run(['api-key', 'validate', r.key])).code, 1, 'a forced rotation ends the old key at once')

  const revoked = await run(['api-key', 'revoke', c.id, '--reason', 'test', '--json'])
  t.equal(revoked.code, 0, revoked.stderr)
  const refused = await run(['api-key', 'validate', c.key, '--json'])
  t.equal(refused.code, 1, 'a revoked key is refused')
  t.match(refused.json(), { valid: false, code: 'key_revoked' })
  t.match(refused.stderr, /key refused: key_revoked/)
  const twice = await run(['api-key', 'revoke', c.id])
  t.equal(twice.code, 1)
  t.match(twice.stderr, /already revoked/)

  const unknown = await run(['api-key', 'get', 'AAAAAAAAAAAA', '--json'])
  t.equal(unknown.code, 1)
  t.equal(unknown.json().error.code, 'key_not_found')
  const garbage = await run(['api-key', 'validate', 'kg_not-a-key'])
  t.equal(garbage.code, 1)
  t.match(garbage.stderr, /key_invalid \(malformed\)/)
  const invalid = await run(['api-key', 'create', '--type', 'root', '--name', 'x', '--json'])
  t.equal(invalid.code, 1, 'an invalid field is a refused operation')
  t.equal(invalid.json().error.details.fields[0].field, 'type')

  const legacy = [randomUUID(), randomUUID()]
  plaintexts.push(...legacy)
  const file = join(cwd, 'legacy.jsonl')
  writeFileSync(file, legacy.map((u, i) => JSON.stringify({ key_hash: hash('sha256', u, 'hex'), name: `legacy-${i}`, scopes: ['orders:read'] })).join('\n') + '\n')
  const imported = await run(['api-key', 'import', file, '--type', 'integration', '--json'])
  t.equal(imported.code, 0, imported.stderr)
  t.equal(imported.json().imported, 2)
  t.equal((await run(['api-key', 'validate', legacy[0] as string])).code, 0, 'an imported legacy key validates')
  const dup = await run(['api-key', 'import', file])
  t.equal(dup.code, 1, 'importing the same hashes again is refused')
  t.match(dup.stderr, /row 1: key_hash is already in the store/)
  t.match(dup.stderr, /row 2: key_hash is already in the store/)
  const badFile = join(cwd, 'bad.json')
  writeFileSync(badFile, JSON.stringify([{ key_hash: 'xyz', name: 'a' }, { name: '' }]))
  const bad = await run(['api-key', 'import', badFile])
  t.equal(bad.code, 1)
  t.match(bad.stderr, /row 1: key_hash/)
  t.match(bad.stderr, /row 2: /)

  const stats = await run(['api-key', 'stats', '--json'])
  t.equal(stats.code, 0)
  t.match(stats.json(), { total: 6, legacy: 2, by_type: { service: 3, user: 1, integration: 2 }, by_status: { active: 4, revoked: 2 } })
}

t.test('key lifecycle on the embedded store', async (t) => {
  const cwd = tempDir()
  const dataDir = join(cwd, 'store')
  await lifecycle(t, { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.ok(statSync(join(dataDir, 'encryption.key')).mode & 0o600, 'an encryption key was generated into the data folder')
  t.equal(statSync(join(dataDir, 'encryption.key')).mode & 0o077, 0, 'readable by its owner only')
  t.notOk(existsSync(join(dataDir, 'keygate.lock')), 'the store lock is released on exit')

  const everything = folderBytes(dataDir)
  t.ok(everything.includes(Buffer.from('demo-renamed')), 'the data files hold the stored text (the scan below can see strings)')
  for (const p of plaintexts) t.notOk(everything.includes(Buffer.from(p)), 'no plaintext key in the embedded store files')
})

t.test('the embedded store is refused while another process holds it', async (t) => {
  const cwd = tempDir()
  const dataDir = join(cwd, 'store')
  const held = await openDb({ dataDir })
  t.teardown(() => held.close())
  const r = await runCli(['api-key', 'list', '--json'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.equal(r.code, 1)
  t.equal(r.json().error.code, 'store_locked')
  t.match(r.stderr, new RegExp(`in use by process ${process.pid}`))
  t.match(r.stderr, /KEYGATE_ADMIN_URL/)
})

t.test('key lifecycle on PostgreSQL', async (t) => {
  const url = await freshDatabase(t)
  const cwd = tempDir()
  const missing = await runCli(['api-key', 'list'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.equal(missing.code, 1, 'PostgreSQL without an encryption key is refused')
  t.match(missing.stderr, /KEYGATE_ENCRYPTION_KEY is required with DATABASE_URL/)

  const migrated = await runCli(['migrate', '--json'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.equal(migrated.code, 0, migrated.stderr)
  t.same(migrated.json().store, 'postgres')
  const again = await runCli(['migrate'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.match(again.stdout, /nothing to apply/)

  await lifecycle(t, { cwd, env: isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY }) })

  const dump = execFileSync('pg_dump', ['--data-only', url], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 })
  t.match(dump, /demo-renamed/, 'the dump holds the stored rows')
  for (const p of plaintexts) t.notOk(dump.includes(p), 'no plaintext key in the PostgreSQL dump')

  const down = await runCli(['api-key', 'list'], { cwd, env: isolated({ DATABASE_URL: 'postgres://postgres@127.0.0.1:1/none', KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY }) })
  t.equal(down.code, 1)
  t.match(down.stderr, /cannot reach PostgreSQL at 127\.0\.0\.1:1/)
})

t.test('no captured log or error output holds a plaintext key', async (t) => {
  t.ok(plaintexts.length >= 10, 'the tests above created keys')
  t.ok(capturedStderr.some((s) => s.includes('"level":"debug"') || s.includes('"level":"info"')), 'logs were captured at debug level')
  const all = capturedStderr.join('\n')
  for (const p of plaintexts) t.notOk(all.includes(p), 'plaintext absent from stderr')
})
