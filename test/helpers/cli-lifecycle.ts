// The key lifecycle every CLI suite runs against a store (embedded or PostgreSQL) as real
// processes, and what they share: an isolated environment, temporary folders, and every
// plaintext key they created, for the no-plaintext checks.
import type { Test } from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { randomUUID, hash } from 'node:crypto'
import { runCli, runCliHere, capturedStderr } from './cli.ts'
import { scratchDir } from './scratch.ts'

export const ENCRYPTION_KEY = Buffer.alloc(32, 7).toString('base64')
/** Every plaintext key the lifecycle printed in this process. */
export const plaintexts: string[] = []

export function tempDir(): string {
  return scratchDir('keygate-cli-')
}

/** Environment that isolates a run from the machine's own keygate settings. */
export function isolated(extra: Record<string, string | undefined>): Record<string, string | undefined> {
  return { DATABASE_URL: undefined, KEYGATE_CONFIG: undefined, KEYGATE_ENCRYPTION_KEY: undefined, LOG_LEVEL: 'debug', ...extra }
}

/**
 * A fresh PostgreSQL database (dropped when `t` ends), migrated, and the environment of a command
 * on it: for the CLI tests whose subject is not the embedded store (what a command refuses, what
 * it prints), where a command through runCliHere costs some 0.05 s of CPU and a real process
 * 0.85 s, against 0.8 s and 1.8 s on the embedded store (opening PGlite). (stores.ts is loaded
 * here, not with this file: the suites that use none of it do not load pg and the configuration.)
 */
export async function postgresEnv(t: Pick<Test, 'teardown'>): Promise<{ url: string; env: Record<string, string | undefined> }> {
  const { freshDatabase } = await import('./stores.ts')
  const url = await freshDatabase(t)
  const env = isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY })
  const migrated = await runCliHere(['migrate'], { env })
  if (migrated.code !== 0) throw new Error(`keygate migrate on ${url} failed (exit ${migrated.code}):\n${migrated.stderr}`)
  return { url, env }
}

export interface Lifecycle {
  env: Record<string, string | undefined>
  cwd: string
  /**
   * Each command through the command line's entry in this process (runCliHere), not as a process
   * of its own: for a store other than the one test/cli-embedded.test.ts runs the same commands
   * on as real processes, where what differs is the store, not the process.
   */
  here?: boolean
}

/**
 * Without `here`, the first run of each command (`api-key create`, `api-key validate -`, ...) is a
 * process of its own, as are those asked for with `real` (an exit 1 and an exit 2, and the last,
 * after which the store's lock must be gone); the runs of a command again (some 20 of the 36) go
 * through the command line's entry in this process, on the same embedded store: what they check is
 * the store's answer, which the process does not change, and each as a process cost about 1.5 s
 * of CPU against 0.8 s here (PGlite opened either way).
 */
export async function lifecycle(t: Test, { env, cwd, here = false }: Lifecycle): Promise<void> {
  const processes = new Set<string>()
  const run = (args: string[], input?: string, real = false) => {
    const command = args.slice(0, args[2] === '-' ? 3 : 2).join(' ')
    const asProcess = !here && (real || !processes.has(command))
    processes.add(command)
    return asProcess ? runCli(args, { env, cwd, ...(input !== undefined ? { input } : {}) }) : runCliHere(args, { env, ...(input !== undefined ? { input } : {}) })
  }

  const created = await run(['api-key', 'create', '--type', 'service', '--name', 'demo', '--scopes', 'orders:read,admin', '--owner', 'billing', '--json'])
  t.equal(created.code, 0, created.stderr)
  const c = created.json()
  plaintexts.push(c.key)
  t.match(c, { name: 'demo', type: 'service', status: 'active', owner: 'billing' })
  t.same(c.scopes, ['orders:read', 'admin'], 'the scopes asked for, no more')
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
  const outside = await run(['api-key', 'validate', bound.json().key, '--address', '192.0.2.1'], undefined, true)
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
  const f = forced.json()
  plaintexts.push(f.key)
  t.equal((await run(['api-key', 'validate', r.key])).code, 1, 'a forced rotation ends the old key at once')
  const before = await run(['api-key', 'validate', c.key, '--json'])
  t.match(before.json(), { valid: false, code: 'key_revoked' }, 'and the key before it, still in its grace')
  t.match((await run(['api-key', 'get', c.id, '--json'])).json(), { status: 'revoked', revoked_reason: `successor ${r.id} rotated (forced)` })

  const revoked = await run(['api-key', 'revoke', f.id, '--reason', 'test', '--json'])
  t.equal(revoked.code, 0, revoked.stderr)
  const refused = await run(['api-key', 'validate', f.key, '--json'])
  t.equal(refused.code, 1, 'a revoked key is refused')
  t.match(refused.json(), { valid: false, code: 'key_revoked' })
  t.match(refused.stderr, /key refused: key_revoked/)
  const twice = await run(['api-key', 'revoke', f.id])
  t.equal(twice.code, 1)
  t.match(twice.stderr, /already revoked/)

  // Its audit trail, newest first (before, found by a review, only curl against a running server
  // read it), as a table, as JSON, and a page at a time.
  const trail = await run(['api-key', 'audit', f.id, '--json'])
  t.equal(trail.code, 0, trail.stderr)
  t.matchStrict(trail.json(), { items: [{ action: 'key.revoked', key_id: f.id, details: { reason: 'test' }, integrity: 'verified' }, { action: 'key.created', details: { rotated_from: r.id } }], next_cursor: null })
  // An array in a pattern checks only the items it starts with (t.matchStrict's too): the rows, whole.
  t.same(trail.json().items.map((i: { action: string }) => i.action), ['key.revoked', 'key.created'], 'those two rows, and no other')
  // (A command on the embedded store takes about a second of CPU: two, not five; an unknown id and
  // a page by its cursor are in test/admin-keys.test.ts, through the same operations.)
  const first = await run(['api-key', 'audit', f.id, '--limit', '1'])
  t.match(first.stdout, /^TIME +ACTION +ACTOR +ADDRESS +DETAILS\n\S+Z +key\.revoked +cli:\S+ +- +\{"reason":"test","previous_status":"active"\}\nmore: --cursor \S+\n$/, 'one row, and where the next page starts')
  const all = (await run(['api-key', 'audit', f.id, '--limit', '1', '--all', '--json'])).json()
  t.matchStrict(all, { next_cursor: null }, '--all follows the cursors to the end')
  t.same(all.items.map((i: { id: string }) => i.id), trail.json().items.map((i: { id: string }) => i.id), 'each row once, as one page has them')

  const unknown = await run(['api-key', 'get', 'AAAAAAAAAAAA', '--json'])
  t.equal(unknown.code, 1)
  t.equal(unknown.json().error.code, 'key_not_found')
  const garbage = await run(['api-key', 'validate', 'kg_not-a-key'])
  t.equal(garbage.code, 1)
  t.match(garbage.stderr, /key_invalid \(malformed\)/)
  const badType = await run(['api-key', 'create', '--type', 'root', '--name', 'x', '--json'], undefined, true)
  t.equal(badType.code, 2, 'a value --type never takes is a usage error')
  t.equal(badType.json().error.code, 'usage_error')
  const invalid = await run(['api-key', 'create', '--type', 'user', '--name', 'x', '--scopes', 'no spaces allowed', '--json'])
  t.equal(invalid.code, 2, 'a value the API never takes is a usage error')
  t.match(invalid.json().error, { code: 'usage_error', message: /^--scopes \(scopes\[0\]\): "no spaces allowed" is not allowed/ })
  const past = await run(['api-key', 'create', '--type', 'user', '--name', 'x', '--expires-at', '2020-01-01T00:00:00Z', '--json'])
  t.equal(past.code, 1, 'a time already past is refused by the store, a refused operation')
  t.equal(past.json().error.details.fields[0].field, 'expires_at')

  const legacy = [randomUUID(), randomUUID()]
  plaintexts.push(...legacy)
  const file = join(cwd, 'legacy.jsonl')
  writeFileSync(file, legacy.map((u, i) => JSON.stringify({ key_hash: hash('sha256', u, 'hex'), name: `legacy-${i}`, scopes: ['orders:read'] })).join('\n') + '\n')
  const imported = await run(['api-key', 'import', file, '--type', 'integration', '--json'])
  t.equal(imported.code, 0, imported.stderr)
  t.equal(imported.json().imported, 2)
  t.equal((await run(['api-key', 'validate', legacy[0] as string])).code, 0, 'an imported legacy key validates')
  const legacyListed = await run(['api-key', 'list', '--legacy', '--json'])
  t.same(legacyListed.json().items.map((k: { name: string }) => k.name).sort(), ['legacy-0', 'legacy-1'], 'list --legacy: the imported keys alone')
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
  t.match(stats.json(), { total: 6, legacy: 2, by_type: { service: 3, user: 1, integration: 2 }, by_status: { active: 3, revoked: 3 } })

  // A rotating key stops working when its grace ends, even when its expiry comes later: the
  // list's EXPIRES column shows the earlier of the two.
  const boundRotated = await run(['api-key', 'rotate', bound.json().id, '--json'])
  t.equal(boundRotated.code, 0, boundRotated.stderr)
  plaintexts.push(boundRotated.json().key)
  const previous = boundRotated.json().previous as { grace_until: string; expires_at: string }
  t.ok(Date.parse(previous.grace_until) < Date.parse(previous.expires_at), 'the grace ends before the 30 days')
  const rotating = await run(['api-key', 'list', '--status', 'rotating'], undefined, true)
  const line = rotating.stdout.split('\n').find((l) => l.startsWith(bound.json().id)) ?? ''
  t.match(line, previous.grace_until.replace(/\.\d{3}Z$/, 'Z'), 'the rotating key lists the end of its grace')
  t.notMatch(line, previous.expires_at.replace(/\.\d{3}Z$/, 'Z'), 'not its later expiry')
}

/** No captured stderr of this process's CLI runs holds a plaintext key the lifecycle printed. */
export function noPlaintextInOutput(t: Test, options: { logLines: boolean }): void {
  t.ok(plaintexts.length >= 5, 'the tests above created keys')
  t.ok(plaintexts.every((p) => typeof p === 'string' && p.length >= 32), 'each one looked for is a key (none undefined)')
  if (options.logLines) t.ok(capturedStderr.some((s) => s.includes('"level":"debug"') || s.includes('"level":"info"')), 'log lines were captured at debug level')
  const all = capturedStderr.join('\n')
  for (const p of plaintexts) t.notOk(all.includes(p), 'plaintext absent from stderr')
}
