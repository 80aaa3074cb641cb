// Loops over many items that let the event loop run other work between slices (core/slices.ts):
// an import's rows checked, and sealed for the audit log, without holding the gateway that shares
// the process. They answer as findIndex and map do; work that waits runs before they end.
import t from 'tap'
import { findIndexInSlices, mapInSlices, SLICE_MS } from '../core/slices.ts'

/** Holds the thread for `ms`, as a row's checks do. */
function busy(ms: number): void {
  const until = performance.now() + ms
  while (performance.now() < until);
}

t.test('they answer as findIndex and map', async (t) => {
  const items = [3, 1, 4, 1, 5, 9, 2, 6]
  t.equal(await findIndexInSlices(items, (v) => v > 4), items.findIndex((v) => v > 4))
  t.equal(await findIndexInSlices(items, (v) => v > 9), -1)
  t.equal(await findIndexInSlices([], () => true), -1)
  const seen: number[] = []
  await findIndexInSlices(items, (v, i) => (seen.push(i), v === 4))
  t.same(seen, [0, 1, 2], 'and stop at the first found, as findIndex')
  t.same(await mapInSlices(items, (v, i) => v * 10 + i), items.map((v, i) => v * 10 + i))
  t.same(await mapInSlices([], () => 1), [])
})

t.test('work that waits runs between slices, before a long loop ends', async (t) => {
  // 25 items of 2 ms each: five slices or more. A loop that never lets go ends before a
  // setImmediate queued ahead of it has run.
  const items = Array.from({ length: 25 }, (_, i) => i)
  t.ok(items.length * 2 > SLICE_MS * 4, 'the loop is several slices long')
  for (const [name, run] of [
    ['findIndexInSlices', (each: (i: number) => void) => findIndexInSlices(items, (i) => (each(i), false))],
    ['mapInSlices', (each: (i: number) => void) => mapInSlices(items, each)],
  ] as const) {
    let ticks = 0
    const tick = (): void => {
      ticks++
      if (!done) setImmediate(tick)
    }
    let done = false
    setImmediate(tick)
    let ticksAtLast = -1
    await run((i) => {
      busy(2)
      if (i === items.length - 1) ticksAtLast = ticks
    })
    done = true
    t.ok(ticksAtLast >= 3, `${name}: other work ran ${ticksAtLast} times during the loop`)
  }
})
