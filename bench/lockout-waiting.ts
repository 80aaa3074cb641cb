// What answering the attempts waiting from one address costs once a lockout begins: a memory
// lockout (5 attempts, 900 s) is given N attempts from one address at once (5 in doubt, the rest
// waiting for a place, as a burst of bad keys or admin credentials over many connections gives
// it); the 5 fail, and the last failure answers every one waiting with the lockout. Prints the
// microseconds of that answer per waiting attempt for each N, and its ratio to the smallest N's.
// node bench/lockout-waiting.ts [--lockout other/core/lockout.ts]
import { here, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('lockout')

const i = process.argv.indexOf('--lockout')
const file = i === -1 ? here('../core/lockout.ts') : (process.argv[i + 1] as string)
const { createLockout } = (await import(file)) as typeof import('../core/lockout.ts')

const rows: Array<{ waiting: number; us: number }> = []
for (const n of [8000, 16000, 32000, 64000, 128000]) {
  const lockout = createLockout({ maxAttempts: 5, windowS: 900 })
  const address = `10.0.${rows.length}.1`
  const waits: Array<Promise<number | undefined>> = []
  let placed = 0
  for (let k = 0; k < n; k++) {
    const place = lockout.attempt(address)
    if (place === undefined) placed++
    else waits.push(place)
  }
  for (let k = 0; k < placed - 1; k++) await lockout.finish(address, true)
  const start = performance.now()
  await lockout.finish(address, true)
  const us = ((performance.now() - start) * 1000) / waits.length
  if (!(await Promise.all(waits)).every((s) => s !== undefined)) throw new Error('an attempt was let in after the lockout began')
  rows.push({ waiting: waits.length, us })
}
const base = (rows[0] as { us: number }).us
for (const r of rows) console.log(JSON.stringify({ waiting: r.waiting, us_per_waiting: Math.round(r.us * 100) / 100, ratio_to_first: Math.round((r.us / base) * 100) / 100 }))
