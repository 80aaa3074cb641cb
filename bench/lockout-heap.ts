// Heap held by the lockout's memory of lockouts in force and of lifts: N `lock:` messages for
// distinct addresses, then N `unlock:` messages for N others, applied to one Lockout as another
// instance's would be, with forced garbage collections before and after. Run with --expose-gc;
// prints one JSON line. Each map holds 100,000 at most (MIRROR_MAX): 199,999 is the worst case
// of the quick-lru maps before (two generations of 100,000, less one).
import { createLockout } from '../core/lockout.ts'

const count = Number(process.argv[2] ?? 199_999)
if (!Number.isInteger(count) || count <= 0) {
  process.stderr.write('usage: node --expose-gc bench/lockout-heap.ts [N], N a whole number above 0\n')
  process.exit(2)
}
const gc = (globalThis as { gc?: () => void }).gc
if (!gc) throw new Error('run with node --expose-gc')
const address = (first: number, i: number) => `${first}.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`

gc()
const before = process.memoryUsage().heapUsed
const lockout = createLockout({ maxAttempts: 5, windowS: 900 })
const until = Date.now() + 900_000
for (let i = 0; i < count; i++) lockout.applyMessage(`lock:${until}:${address(10, i)}`)
for (let i = 0; i < count; i++) lockout.applyMessage(`unlock:${Date.now()}:${address(11, i)}`)
// The lifts' forgetting of counts is asynchronous (nothing to forget here): let it settle.
await new Promise((resolve) => setTimeout(resolve, 100))
gc()
const after = process.memoryUsage().heapUsed
console.log(JSON.stringify({ count, held: lockout.held().length, heap_mib: +((after - before) / 2 ** 20).toFixed(1) }))
