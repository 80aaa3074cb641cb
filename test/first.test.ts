// firstInOrder (core/first.ts): the first few of many items in an order, as sorting them all and
// taking the first would give, for every length and limit, ties broken as the order says.
import t from 'tap'
import { firstInOrder } from '../core/first.ts'
import { seededRandom } from './helpers/random.ts'

type Lockout = [string, number]
/** As GET /v1/lockouts orders them: latest first, then by address. */
const latestFirst = (a: Lockout, b: Lockout) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)

t.test('as sorting all and taking the first, for random lists, many ties, every limit', async (t) => {
  const random = seededRandom(20261207)
  let checked = 0
  for (let round = 0; round < 400; round++) {
    const n = Math.floor(random() * 60)
    // Few distinct times: most items tie on the time, and the address decides.
    const times = 1 + Math.floor(random() * 6)
    const items: Lockout[] = Array.from({ length: n }, (_, i) => [`10.0.${i >> 8}.${i & 255}`, Math.floor(random() * times)])
    for (let i = items.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1))
      ;[items[i], items[j]] = [items[j] as Lockout, items[i] as Lockout]
    }
    const sorted = [...items].sort(latestFirst)
    for (const limit of [0, 1, 2, Math.floor(n / 2), n - 1, n, n + 5]) {
      const got = firstInOrder(items, limit, latestFirst)
      if (JSON.stringify(got) !== JSON.stringify(sorted.slice(0, Math.max(limit, 0)))) {
        t.fail(`n ${n}, limit ${limit}: ${JSON.stringify(got)} is not ${JSON.stringify(sorted.slice(0, limit))}`)
        return
      }
      checked++
    }
  }
  t.ok(checked > 2000, `${checked} lists and limits, each as the sort gives`)
})

t.test('sorted and ascending input, an iterable, and a limit of none', async (t) => {
  const numbers = Array.from({ length: 1000 }, (_, i) => i)
  const ascending = (a: number, b: number) => a - b
  t.same(firstInOrder(numbers, 3, ascending), [0, 1, 2], 'input already in order')
  t.same(firstInOrder([...numbers].reverse(), 3, ascending), [0, 1, 2], 'input in the reverse order')
  t.same(firstInOrder(new Set([5, 3, 9, 1]).values(), 2, ascending), [1, 3], 'any iterable')
  t.same(firstInOrder(numbers, 0, ascending), [])
  t.same(firstInOrder(numbers, -1, ascending), [])
  t.same(firstInOrder(numbers, Number.NaN, ascending), [], 'no limit that is not a number above 0')
  t.same(firstInOrder([], 10, ascending), [])
  const items = [3, 1, 2]
  firstInOrder(items, 2, ascending)
  t.same(items, [3, 1, 2], 'the input is left as it was')
})
