// node bench/prune-batch.ts [--rows 120000] [--rounds 5]
// How long one prune statement holds the embedded store's one thread (every other caller's
// statement, the gateway's key look-ups and the admin API included, waits for it), at the
// scheduler's batch for the embedded store (core/scheduler.ts pruneBatch: 1,000) and at
// PostgreSQL's (5,000): `rows` old rows of api_key_rejections, deleted as the scheduler does,
// a batch a statement; the two sizes alternate, three times each, `rounds` statements a time.
// Prints each statement's time and the time a row, and the ratios of the medians.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openDb } from '../core/db.ts'
import { migrate } from '../core/migrate.ts'
import { PRUNE_BATCH, pruneBatch } from '../core/scheduler.ts'
import { countArg as arg, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('rows', 'rounds')

const ROWS = arg('rows', 120_000)
const ROUNDS = arg('rounds', 5)
const DAY_MS = 86_400_000
const SIZES = [PRUNE_BATCH, pruneBatch('embedded')]
// Every statement must find a whole batch to delete: with fewer rows, the last ones deleted fewer
// (or none), and their times, divided by the batch, were printed all the same.
const NEEDED = 3 * ROUNDS * SIZES.reduce((a, b) => a + b, 0)
if (ROWS < NEEDED) {
  process.stderr.write(`--rows must be at least ${NEEDED} with --rounds ${ROUNDS} (3 passes of ${ROUNDS} statements of ${SIZES.join(' and ')} rows)\n`)
  process.exit(2)
}

const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-prune-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
const db = await openDb({ dataDir: dir, sharedBuffersMb: 128 })
try {
  await migrate(db)
  const hour = (ms: number) => new Date(ms - (ms % 3_600_000))
  await db.query(`INSERT INTO api_key_rejections (bucket, reason, count) SELECT $1, 'r_' || i, 1 FROM generate_series(1, $2::int) AS i`, [hour(Date.now() - 500 * DAY_MS), ROWS])
  const before = new Date(Date.now() - 400 * DAY_MS)
  const times = new Map<number, number[]>(SIZES.map((s) => [s, []]))
  for (let pass = 0; pass < 3; pass++) {
    for (const size of SIZES) {
      const each: number[] = []
      for (let i = 0; i < ROUNDS; i++) {
        const t0 = performance.now()
        await db.query(`WITH gone AS (DELETE FROM api_key_rejections WHERE ctid IN (SELECT ctid FROM api_key_rejections WHERE bucket < $1 LIMIT $2) RETURNING 1) SELECT count(*)::int AS n FROM gone`, [before, size])
        each.push(performance.now() - t0)
      }
      times.get(size)?.push(...each)
      console.log(`batch ${size}: ${each.map((x) => x.toFixed(0)).join(' ')} ms`)
    }
  }
  const [big, small] = SIZES.map((s) => median(times.get(s) ?? [])) as [number, number]
  console.log(`median statement: ${PRUNE_BATCH} rows ${big.toFixed(0)} ms, ${SIZES[1]} rows ${small.toFixed(0)} ms (ratio ${(small / big).toFixed(2)}); a row: ${((big / PRUNE_BATCH) * 1000).toFixed(1)} µs and ${((small / (SIZES[1] as number)) * 1000).toFixed(1)} µs (ratio ${((small / (SIZES[1] as number)) / (big / PRUNE_BATCH)).toFixed(2)})`)
} finally {
  await db.close()
}
