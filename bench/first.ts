// A page of GET /v1/lockouts out of many lockouts in force: sorting every lockout then taking the
// page (the code before, the baseline) against core/first.ts's firstInOrder, in the same run, on
// n lockouts in a random order (latest first, then by address, as the route orders them), for
// pages of 100 (the default) and 1,000 (the largest). Prints the median of `rounds` in ms and the
// ratio of firstInOrder's to the sort's.
// node bench/first.ts [--rounds 7]
import { firstInOrder } from '../core/first.ts'
import { countArg, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('rounds')

const ROUNDS = countArg('rounds', 7)
const latestFirst = (a: readonly [string, number], b: readonly [string, number]) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)
const now = Date.now()

function lockouts(n: number): Array<[string, number]> {
  // Lockouts end within a 15-minute window, many in the same millisecond under a flood.
  return Array.from({ length: n }, (_, i) => [`10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`, now + Math.floor(Math.random() * 900_000)] as [string, number])
}

const rows: string[] = []
for (const n of [10_000, 100_000]) {
  for (const limit of [100, 1000]) {
    const sorted: number[] = []
    const first: number[] = []
    for (let round = 0; round < ROUNDS + 1; round++) {
      const held = lockouts(n)
      // Alternately first, so that neither always runs on a warmer machine.
      const runs: Array<[number[], () => unknown]> = [
        [sorted, () => [...held].sort(latestFirst).slice(0, limit)],
        [first, () => firstInOrder(held, limit, latestFirst)],
      ]
      if (round % 2 === 1) runs.reverse()
      for (const [times, run] of runs) {
        const started = performance.now()
        run()
        if (round > 0) times.push(performance.now() - started)
      }
    }
    const s = median(sorted)
    const f = median(first)
    rows.push(`| ${n.toLocaleString('en')} | ${limit} | ${s.toFixed(2)} | ${f.toFixed(2)} | ${(f / s).toFixed(3)} |`)
  }
}
process.stdout.write(
  [
    `A page of lockouts in order (median of ${ROUNDS} rounds, ms; Node ${process.version}):`,
    '',
    '| lockouts | page | sort all, ms | firstInOrder, ms | ratio |',
    '| --- | --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n'),
)
