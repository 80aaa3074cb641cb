// The first few of many items in an order, without sorting them all: a page of a list held in
// memory (GET /v1/lockouts: every lockout in force, of which a page is at most 1,000). Before,
// the whole list was sorted for each page: 100,000 lockouts (addresses of a botnet) took 0.1 to
// 0.6 s of the event loop per request, the gateway's too where one process serves both
// listeners (bench/first.ts).

/**
 * The first `limit` of `items` in `before`'s order, sorted: what
 * `[...items].sort(before).slice(0, limit)` gives, in O(n log limit) time and O(limit) room. `before`
 * must be a total order (no two items equal), as the sort's answer would otherwise depend on the
 * order the items came in, and this one's on more than that.
 */
export function firstInOrder<T>(items: Iterable<T>, limit: number, before: (a: T, b: T) => number): T[] {
  if (!(limit > 0)) return []
  // A heap of the best `limit` seen so far whose root is the last of them in the order: an item
  // that comes before the root takes its place.
  const heap: T[] = []
  const after = (i: number, j: number) => before(heap[i] as T, heap[j] as T) > 0
  const swap = (i: number, j: number) => {
    const x = heap[i] as T
    heap[i] = heap[j] as T
    heap[j] = x
  }
  for (const item of items) {
    if (heap.length < limit) {
      heap.push(item)
      for (let i = heap.length - 1; i > 0; ) {
        const parent = (i - 1) >> 1
        if (!after(i, parent)) break
        swap(i, parent)
        i = parent
      }
    } else if (before(item, heap[0] as T) < 0) {
      heap[0] = item
      for (let i = 0; ; ) {
        const l = 2 * i + 1
        const r = l + 1
        let last = i
        if (l < heap.length && after(l, last)) last = l
        if (r < heap.length && after(r, last)) last = r
        if (last === i) break
        swap(i, last)
        i = last
      }
    }
  }
  return heap.sort(before)
}
