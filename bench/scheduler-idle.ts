// node bench/scheduler-idle.ts [--keys 100000] [--rounds 5] [--no-analyze]
// What an idle scheduler round costs (no key due to end or to be announced) with `keys` keys, on
// the embedded store and, with DATABASE_URL, on PostgreSQL: one store each, its keys imported
// once (a third of them with a rotation interval of a year, half expiring in 200 days), then
// `rounds` rounds without prunes or jobs; then again with every key given a rotation interval
// and half of them announced and then ended (as a rotation's grace ends), then with the ended
// keys' rotation notices kept, as before migration 0024. Prints the median round's wall time of
// each. The store is analyzed after each set-up, as PostgreSQL's autovacuum would; with
// --no-analyze it is not, as on the embedded store (no autovacuum; keygate runs no ANALYZE).
// Run it at two commits to compare (bench/RESULTS.md).
import { createHash, randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { loadConfig } from '../config/load.ts'
import { silentLogger } from '../core/log.ts'
import { openRuntime } from '../core/runtime.ts'
import { Scheduler } from '../core/scheduler.ts'
import { countArg as arg, freshStores, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('keys', 'rounds', 'no-analyze')

const KEYS = arg('keys', 100_000)
const ROUNDS = arg('rounds', 5)
const ANALYZE = !process.argv.includes('--no-analyze')
const DAY = 86_400_000
const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-scheduler-idle-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
// The set-up's statements over every key may take longer than a request's, on a busy machine.
const configFile = join(dir, 'keygate.yaml')
writeFileSync(configFile, 'store:\n  query_timeout_ms: 0\n')

process.stdout.write(`${KEYS} keys, none due; ${ROUNDS} rounds, medians; ${ANALYZE ? 'analyzed' : 'not analyzed'}\n\n| store | idle round, ms | every key with a rotation interval, half ended after a notice: idle round, ms | the same, their notices kept | kept / dropped |\n| --- | --- | --- | --- | --- |\n`)
for (const store of freshStores(dir)) {
  const { env, drop } = await store.open()
  try {
    const rt = await openRuntime(loadConfig({ env, file: configFile }), silentLogger)
    try {
      const expires = new Date(Date.now() + 200 * DAY).toISOString()
      for (let done = 0; done < KEYS; done += 10_000) {
        const rows = Array.from({ length: Math.min(10_000, KEYS - done) }, (_, i) => ({ key_hash: createHash('sha256').update(randomUUID()).digest('hex'), name: `idle ${done + i}`, ...(i % 2 === 0 ? { expires_at: expires } : {}) }))
        await rt.keys.importLegacy(rows, { actor: 'bench' })
      }
      await rt.db.query(`UPDATE api_keys SET rotation_interval_s = 365 * 86400 WHERE name LIKE '%3' OR name LIKE '%6' OR name LIKE '%9'`)
      if (ANALYZE) await rt.db.query('ANALYZE')
      const scheduler = new Scheduler({ db: rt.db, keys: rt.keys, audit: rt.audit, log: silentLogger, intervalS: 60, noticeMs: 3 * DAY, pruneRules: [] })
      const idle = async (): Promise<number> => {
        const times: number[] = []
        for (let r = 0; r < ROUNDS; r++) {
          const start = performance.now()
          const run = await scheduler.runOnce()
          times.push(performance.now() - start)
          if (run === null || run.announced.length + run.expired.length + run.graceEnded.length + run.rotationOverdue.length > 0) throw new Error('the round was not idle')
        }
        return median(times)
      }
      const mixed = await idle()
      // Every key with a rotation interval, and half of them announced and ended 10 days after
      // (before migration 0024 their notices were kept for the audit retention, and the selection
      // read the fewer of the active keys with an interval and the rotation notices passed).
      await rt.db.query(`UPDATE api_keys SET rotation_interval_s = 365 * 86400`)
      await rt.db.query(`INSERT INTO api_key_notices (key_id, kind, deadline, notified_at) SELECT id, 'rotation', now() - interval '10 days', now() - interval '13 days' FROM api_keys WHERE name ~ '[02468]$'`)
      await rt.db.query(`UPDATE api_keys SET status = 'expired' WHERE name ~ '[02468]$'`)
      if (ANALYZE) await rt.db.query('ANALYZE')
      const rotating = await idle()
      // The same with the ended keys' notices kept, as before migration 0024 (which drops them as
      // their keys end): the round before it, on the same store in the same run.
      await rt.db.query(`INSERT INTO api_key_notices (key_id, kind, deadline, notified_at) SELECT id, 'rotation', now() - interval '10 days', now() - interval '13 days' FROM api_keys WHERE status = 'expired'`)
      if (ANALYZE) await rt.db.query('ANALYZE')
      const kept = await idle()
      process.stdout.write(`| ${store.name} | ${mixed.toFixed(1)} | ${rotating.toFixed(1)} | ${kept.toFixed(1)} | ${(kept / rotating).toFixed(1)} |\n`)
    } finally {
      await rt.close()
    }
  } finally {
    await drop()
  }
}
