// Work over many items in one go (an import's 10,000 rows, checked, then sealed for the audit log)
// holds the event loop, and with it the gateway where one process serves both listeners: the loops
// below let other work run between slices of SLICE_MS. Before (found by a review), a 10,000-row
// import held it 1.4 s in one piece, each request through the gateway waiting.
import { setImmediate } from 'node:timers/promises'

/** Lets the event loop run what waits (I/O, timers) before going on: between passes over a large input. */
export function otherWork(): Promise<void> {
  return setImmediate()
}

/** How long a loop over many items runs before it lets the event loop do other work, in ms. */
export const SLICE_MS = 10

/** A slice's clock: true once SLICE_MS have passed since it was made or last said so. */
function sliceClock(): () => boolean {
  let start = performance.now()
  return () => {
    const now = performance.now()
    if (now - start < SLICE_MS) return false
    start = now
    return true
  }
}

/** `items.findIndex(found)`, letting other work run every SLICE_MS. */
export async function findIndexInSlices<T>(items: readonly T[], found: (item: T, index: number) => boolean): Promise<number> {
  const due = sliceClock()
  for (let i = 0; i < items.length; i++) {
    if (found(items[i] as T, i)) return i
    if (due()) await otherWork()
  }
  return -1
}

/** `items.map(f)`, letting other work run every SLICE_MS. */
export async function mapInSlices<T, U>(items: readonly T[], f: (item: T, index: number) => U): Promise<U[]> {
  const due = sliceClock()
  const out: U[] = []
  for (let i = 0; i < items.length; i++) {
    out.push(f(items[i] as T, i))
    if (due()) await otherWork()
  }
  return out
}
