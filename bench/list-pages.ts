// DATABASE_URL=postgres://... node bench/list-pages.ts [--rounds 5] [--sizes 10000,1000000] [--cases keys]:
// in a fresh database on that server, dropped at the end (before, in the database the URL named,
// whose tables it emptied and whose indexes it dropped: a deployment's, in a shell set up beside one).
// node bench/list-pages.ts --embedded [...]: the same on the embedded store (PGlite), in a new data
// folder of its own, removed at the end.
// What a filtered page of the admin listener's lists costs as its table grows: for each size, the
// table is filled (its tables are made and emptied) with 1% of its rows, the oldest, matching each
// filter (one key's, one type's, the acknowledged ones; one action's, one actor's; one type's, one
// owner's, the revoked keys; and the next 1% of keys, the expired ones, one scope's and the names
// holding one word, 0.01% another scope's) and the rest above them, then one page of 50 is read
// through the code the admin API runs, `rounds` times (median ms), with the indexes the pages read
// by and with them dropped (as before them), in the same run; of those indexes, the ones the
// migrations made (a run on an older keygate leaves out those it has not). `--cases` runs only the
// cases whose name begins so.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { AnomalyLog, type AnomalyType } from '../core/anomalies.ts'
import { AuditCipher, AuditLog } from '../core/audit.ts'
import { openDb, type Db } from '../core/db.ts'
import { KeyService } from '../core/keys/service.ts'
import { migrate } from '../core/migrate.ts'
import { countArg, countsArg, freshStores, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('rounds', 'sizes', 'cases', 'embedded')

const embedded = process.argv.includes('--embedded')
const url = process.env.DATABASE_URL
if (!embedded && !url) {
  process.stderr.write('DATABASE_URL must name a PostgreSQL server, where the bench makes a database of its own (or --embedded)\n')
  process.exit(2)
}
const only = process.argv.indexOf('--cases')
const prefix = only === -1 ? '' : (process.argv[only + 1] ?? '')
const rounds = countArg('rounds', 5)
const sizes = countsArg('sizes', [10_000, 1_000_000])

interface Case {
  name: string
  fill: (db: Db, rows: number) => Promise<void>
  page: (db: Db) => Promise<unknown>
  indexes: string[]
}

/** Empties `table`, fills it with `insert` for `rows` rows ($1), and has its statistics read. */
const filler = (table: string, insert: string, empty = `TRUNCATE ${table}`) => async (db: Db, rows: number) => {
  await db.query(empty)
  await db.query(insert, [rows])
  await db.query(`ANALYZE ${table}`)
}
const anomalies = (filter: { keyId?: string; type?: AnomalyType; acknowledged?: boolean }) => (db: Db) => new AnomalyLog(db).list({ limit: 51, ...filter })
const fillAnomalies = filler(
  'api_key_anomalies',
  `INSERT INTO api_key_anomalies (key_id, type, window_start, details, detected_at, acknowledged_at, acknowledged_by)
   SELECT CASE WHEN i <= $1 / 100 THEN 'old_key' ELSE 'key_' || (i % 10000) END,
          CASE WHEN i <= $1 / 100 THEN 'unusual_hour' ELSE (ARRAY['request_rate', 'error_rate', 'distinct_addresses'])[1 + i % 3] END,
          timestamptz '2026-01-01' + i * interval '1 second', '{"requests": 1000}', timestamptz '2026-01-01' + i * interval '1 second',
          CASE WHEN i <= $1 / 100 THEN now() END, CASE WHEN i <= $1 / 100 THEN 'admin' END
   FROM generate_series(1, $1::int) i`,
)
const ANOMALY_INDEXES = [
  'api_key_anomalies_key_idx ON api_key_anomalies (key_id, id)',
  'api_key_anomalies_type_idx ON api_key_anomalies (type, id)',
  'api_key_anomalies_acknowledged_idx ON api_key_anomalies (id) WHERE acknowledged_at IS NOT NULL',
]
const audit = (filter: { action?: string; actor?: string }) => (db: Db) => new AuditLog(new AuditCipher(Buffer.alloc(32, 1))).page(db, filter, 50)
const fillAudit = filler(
  'api_key_audit_log',
  `INSERT INTO api_key_audit_log (id, key_id, action, actor, enc_key_id, nonce, details, created_at)
   SELECT 'aud_' || i, 'key_' || (i % 10000), CASE WHEN i <= $1 / 100 THEN 'deny_list.added' ELSE 'key.updated' END,
          CASE WHEN i <= $1 / 100 THEN 'alice' ELSE 'provisioner' END, 'k', '\\x00', '\\x00', timestamptz '2026-01-01' + i * interval '1 second'
   FROM generate_series(1, $1::int) i`,
)
const AUDIT_INDEXES = ['api_key_audit_log_action_idx ON api_key_audit_log (action, created_at, id)', 'api_key_audit_log_actor_idx ON api_key_audit_log (actor, created_at, id)']
const keys = (filter: Record<string, string>) => (db: Db) =>
  new KeyService({ db, audit: new AuditLog(new AuditCipher(Buffer.alloc(32, 1))), prefix: 'kg_', graceHours: { system: 24, user: 24, service: 24, integration: 24, emergency: 24 } }).list({ limit: 50, ...filter })
// The oldest 1% of keys: one type's, one owner's, the revoked ones. The next 1%: the expired
// ones (most marked so, one in ten still active or rotating past its expiry or grace, as a key is
// until the scheduler's next round, or for good on a store no scheduler sweeps), one scope's (one
// in a hundred of them has a rarer one as well), and those whose name holds "legacy". Above them,
// active keys of the common scope, a third of them with an expiry to come.
const fillKeys = filler(
  'api_keys',
  `INSERT INTO api_keys (id, key_hash, name, type, status, scopes, owner, created_at, revoked_at, expires_at, grace_until)
   SELECT 'key_' || i, encode(sha256(i::text::bytea), 'hex'), CASE WHEN old2 THEN 'legacy import ' ELSE 'key ' END || i,
          CASE WHEN old1 THEN 'emergency' ELSE 'service' END,
          CASE WHEN old1 THEN 'revoked' WHEN old2 AND i % 10 = 0 THEN 'active' WHEN old2 AND i % 10 = 5 THEN 'rotating' WHEN old2 THEN 'expired' ELSE 'active' END,
          CASE WHEN old2 AND i % 100 = 1 THEN ARRAY['keys:read', 'billing:write', 'admin'] WHEN old2 THEN ARRAY['keys:read', 'billing:write'] ELSE ARRAY['keys:read'] END,
          CASE WHEN old1 THEN 'alice' ELSE 'team_' || (i % 100) END, timestamptz '2026-01-01' + i * interval '1 second',
          CASE WHEN old1 THEN now() END,
          CASE WHEN old2 AND i % 10 <> 5 THEN timestamptz '2026-01-02' WHEN NOT old1 AND NOT old2 AND i % 3 = 0 THEN timestamptz '2100-01-01' + i * interval '1 second' END,
          CASE WHEN old2 AND i % 10 = 5 THEN timestamptz '2026-01-02' END
   FROM generate_series(1, $1::int) i, LATERAL (SELECT i <= $1 / 100 AS old1, i > $1 / 100 AND i <= $1 / 50 AS old2) o`,
  'TRUNCATE api_keys CASCADE',
)
const KEY_INDEXES = [
  'api_keys_type_created_idx ON api_keys (type, created_at, id)',
  'api_keys_status_created_idx ON api_keys (status, created_at, id)',
  'api_keys_owner_created_idx ON api_keys (owner, created_at, id) WHERE owner IS NOT NULL',
  `api_keys_live_end_idx ON api_keys ((LEAST(expires_at, CASE WHEN status = 'rotating' THEN grace_until END)))
     WHERE status IN ('active', 'rotating') AND LEAST(expires_at, CASE WHEN status = 'rotating' THEN grace_until END) IS NOT NULL`,
]
const allCases: Case[] = [
  { name: 'anomalies ?key_id (an older key)', fill: fillAnomalies, page: anomalies({ keyId: 'old_key' }), indexes: ANOMALY_INDEXES },
  { name: 'anomalies ?type (a rare one)', fill: fillAnomalies, page: anomalies({ type: 'unusual_hour' }), indexes: ANOMALY_INDEXES },
  { name: 'anomalies ?acknowledged=true (most open)', fill: fillAnomalies, page: anomalies({ acknowledged: true }), indexes: ANOMALY_INDEXES },
  { name: 'anomalies, no filter', fill: fillAnomalies, page: anomalies({}), indexes: ANOMALY_INDEXES },
  { name: 'audit ?action (an older one)', fill: fillAudit, page: audit({ action: 'deny_list.added' }), indexes: AUDIT_INDEXES },
  { name: 'audit ?actor (an older one)', fill: fillAudit, page: audit({ actor: 'alice' }), indexes: AUDIT_INDEXES },
  { name: 'audit, no filter', fill: fillAudit, page: audit({}), indexes: AUDIT_INDEXES },
  { name: 'keys ?type (an older one)', fill: fillKeys, page: keys({ type: 'emergency' }), indexes: KEY_INDEXES },
  { name: 'keys ?owner (an older one)', fill: fillKeys, page: keys({ owner: 'alice' }), indexes: KEY_INDEXES },
  { name: 'keys ?status=revoked (older ones)', fill: fillKeys, page: keys({ status: 'revoked' }), indexes: KEY_INDEXES },
  { name: 'keys ?status=expired (older ones)', fill: fillKeys, page: keys({ status: 'expired' }), indexes: KEY_INDEXES },
  { name: 'keys ?scope (1%, older)', fill: fillKeys, page: keys({ scope: 'billing:write' }), indexes: KEY_INDEXES },
  { name: 'keys ?scope (0.01%, older)', fill: fillKeys, page: keys({ scope: 'admin' }), indexes: KEY_INDEXES },
  { name: 'keys ?scope (a common one)', fill: fillKeys, page: keys({ scope: 'keys:read' }), indexes: KEY_INDEXES },
  { name: 'keys ?name (a rare word, older)', fill: fillKeys, page: keys({ name: 'legacy' }), indexes: KEY_INDEXES },
  { name: 'keys, no filter', fill: fillKeys, page: keys({}), indexes: KEY_INDEXES },
]

const cases = allCases.filter((c) => c.name.startsWith(prefix))
const work = mkdtempSync(join(tmpdir(), 'keygate-list-pages-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const store = await freshStores(work).find((s) => s.name === (embedded ? 'embedded' : 'postgres'))!.open()
const db = await openDb(embedded ? { dataDir: store.env.KEYGATE_DATA_DIR } : { databaseUrl: store.env.DATABASE_URL })
await migrate(db)
const made = new Set((await db.query<{ name: string }>('SELECT indexname AS name FROM pg_indexes')).map((r) => r.name))
for (const c of cases) c.indexes = c.indexes.filter((i) => made.has(i.split(' ')[0]!))
const timed = async (c: Case): Promise<number> => {
  const ms: number[] = []
  await c.page(db) // warm
  for (let i = 0; i < rounds; i++) {
    const start = process.hrtime.bigint()
    await c.page(db)
    ms.push(Number(process.hrtime.bigint() - start) / 1e6)
  }
  return median(ms)
}
const results = new Map<string, Map<number, { with: number; without: number }>>()
let filled: Case['fill'] | undefined
for (const size of sizes) {
  filled = undefined
  for (const c of cases) {
    if (filled !== c.fill) {
      await c.fill(db, size)
      filled = c.fill
    }
    const withIndexes = await timed(c)
    const names = c.indexes.map((i) => i.split(' ')[0])
    await db.query(`DROP INDEX ${names.join(', ')}`)
    const without = await timed(c)
    for (const i of c.indexes) await db.query(`CREATE INDEX ${i}`)
    const bySize = results.get(c.name) ?? new Map()
    bySize.set(size, { with: withIndexes, without })
    results.set(c.name, bySize)
  }
}
const f = (n: number) => n.toFixed(2)
const first = sizes[0] as number
const last = sizes.at(-1) as number
console.log(`| page | ${sizes.map((s) => `${s.toLocaleString('en')} rows: without / with`).join(' | ')} | ${last.toLocaleString('en')} / ${first.toLocaleString('en')}: without / with |`)
console.log(`| --- | ${sizes.map(() => '---').join(' | ')} | --- |`)
for (const [name, bySize] of results) {
  const a = bySize.get(first)!
  const b = bySize.get(last)!
  console.log(`| ${name} | ${sizes.map((s) => `${f(bySize.get(s)!.without)} / ${f(bySize.get(s)!.with)}`).join(' | ')} | ${f(b.without / a.without)} / ${f(b.with / a.with)} |`)
}
await db.close()
await store.drop()
