// node bench/ends-report.ts [--keys 100000] [--rotating 10000] [--rounds 5]
// What `GET /v1/stats` and a page of `GET /v1/reports/expiring` cost (KeyService.stats and
// .expiring, the code the admin API runs) with `keys` keys, on the embedded store and, with
// DATABASE_URL, on PostgreSQL: first with every key active (a tenth of them with a rotation
// interval, announced), then with `rotating` of those announced keys rotated and the successor
// announced in turn (each replaced key in its grace, ending with its successor's deadline: the
// lineage walk of core/keys/ends.ts). Prints the median of `rounds` calls of each, and the ratio
// of the second to the first, measured in the same run. Run it at two commits to compare
// (bench/RESULTS.md).
import { createHash, randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { loadConfig } from '../config/load.ts'
import { silentLogger } from '../core/log.ts'
import { openRuntime } from '../core/runtime.ts'
import { countArg as arg, freshStores, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('keys', 'rotating', 'rounds')

const KEYS = arg('keys', 100_000)
const ROTATING = arg('rotating', 10_000)
const ROUNDS = arg('rounds', 5)
if (ROTATING * 10 > KEYS) {
  process.stderr.write('--rotating takes at most a tenth of --keys (the keys announced)\n')
  process.exit(2)
}
const DAY = 86_400_000
const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-ends-report-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
const configFile = join(dir, 'keygate.yaml')
writeFileSync(configFile, 'store:\n  query_timeout_ms: 0\n')

process.stdout.write(
  `${KEYS} keys, ${KEYS / 10} announced; ${ROUNDS} calls each, medians\n\n| store | stats, ms | expiring page, ms | with ${ROTATING} of them rotated: stats, ms | expiring page, ms | stats ratio | page ratio |\n| --- | --- | --- | --- | --- | --- | --- |\n`,
)
for (const store of freshStores(dir)) {
  const { env, drop } = await store.open()
  try {
    const rt = await openRuntime(loadConfig({ env, file: configFile }), silentLogger)
    try {
      for (let done = 0; done < KEYS; done += 10_000) {
        const rows = Array.from({ length: Math.min(10_000, KEYS - done) }, (_, i) => ({ key_hash: createHash('sha256').update(randomUUID()).digest('hex'), name: `ends ${done + i}` }))
        await rt.keys.importLegacy(rows, { actor: 'bench' })
      }
      // A tenth of the keys announced for a rotation two days from now.
      await rt.db.query(`UPDATE api_keys SET rotation_interval_s = 30 * 86400 WHERE name LIKE '%0'`)
      await rt.db.query(
        `INSERT INTO api_key_notices (key_id, kind, deadline, notified_at) SELECT id, 'rotation', now() + interval '2 days', now() FROM api_keys WHERE rotation_interval_s IS NOT NULL`,
      )
      await rt.db.query('ANALYZE')
      const measure = async (): Promise<[number, number]> => {
        const stats: number[] = []
        const page: number[] = []
        for (let r = 0; r < ROUNDS; r++) {
          let start = performance.now()
          await rt.keys.stats()
          stats.push(performance.now() - start)
          start = performance.now()
          await rt.keys.expiring(7 * DAY, { limit: 100 })
          page.push(performance.now() - start)
        }
        return [median(stats), median(page)]
      }
      const [stats, page] = await measure()
      // `rotating` of the announced keys rotated: each replaced by a new key announced in its
      // turn, the replaced one in its grace (as KeyService.rotate and a scheduler round leave them).
      await rt.db.query(
        `WITH old AS (SELECT id FROM api_keys WHERE rotation_interval_s IS NOT NULL ORDER BY id LIMIT $1),
         fresh AS (
           INSERT INTO api_keys (id, key_hash, name, type, status, rotation_interval_s, rotated_from, created_at)
           SELECT 'r' || substr(md5(old.id), 1, 11), encode(sha256(old.id::bytea), 'hex'), 'rotated', 'service', 'active', 30 * 86400, old.id, now() FROM old
           RETURNING id, rotated_from)
         UPDATE api_keys k SET status = 'rotating', grace_until = now() + interval '2 days', replaced_by = fresh.id FROM fresh WHERE k.id = fresh.rotated_from`,
        [ROTATING],
      )
      await rt.db.query(
        `INSERT INTO api_key_notices (key_id, kind, deadline, notified_at) SELECT id, 'rotation', now() + interval '1 day', now() FROM api_keys WHERE name = 'rotated'`,
      )
      await rt.db.query('ANALYZE')
      const [rotatedStats, rotatedPage] = await measure()
      process.stdout.write(
        `| ${store.name} | ${stats.toFixed(1)} | ${page.toFixed(1)} | ${rotatedStats.toFixed(1)} | ${rotatedPage.toFixed(1)} | ${(rotatedStats / stats).toFixed(2)} | ${(rotatedPage / page).toFixed(2)} |\n`,
      )
    } finally {
      await rt.close()
    }
  } finally {
    await drop()
  }
}
