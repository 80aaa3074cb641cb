// A burst of keys not in the cache from one address, while one look-up fails on the store and the
// others succeed: the attempts that waited for a place are looked up, not all answered 503.
import t from 'tap'
import { KeyService } from '../core/keys/service.ts'
import { createLockout, type Lockout } from '../core/lockout.ts'
import { silentLogger } from '../core/log.ts'
import { keyServiceOptions } from '../core/runtime.ts'
import { bearer, makeConfig, openStore, startGateway } from './helpers/gateway.ts'

t.test('one look-up that fails (a transient store error) in a burst from one address answers that one 503, not every attempt waiting behind it (found by a review)', async (t) => {
  // Before: an attempt let in after any look-up had failed while it waited, none succeeding since,
  // was answered 503 store_unavailable without asking the store, and its place went to the next,
  // answered the same way: one failure answered the address's whole queue 503.
  const config = makeConfig({ lockout: { max_attempts: 2, window_s: 60 }, routes: [] })
  const base = await openStore(t, config)
  const real = new KeyService({ db: base.db, audit: base.audit, ...keyServiceOptions(config) })
  // Each look-up waits until the test lets it go, failing or answering.
  const held: Array<{ fail: boolean; go: () => void; failNow: () => void }> = []
  let arrived: () => void = () => {}
  const keys = new Proxy(real, {
    get(target, name) {
      if (name === 'lookup') {
        return (presented: string) =>
          new Promise((resolve, reject) => {
            held.push({ fail: false, go: () => resolve(target.lookup(presented)), failNow: () => reject(new Error('terminating connection due to administrator command')) })
            arrived()
          })
      }
      const value = Reflect.get(target, name, target) as unknown
      return typeof value === 'function' ? value.bind(target) : value
    },
  })
  // The attempts that wait for a place, counted.
  const own = createLockout({ maxAttempts: 2, windowS: 60, log: silentLogger })
  let waiting = 0
  const lockout: Lockout = new Proxy(own, {
    get(target, name) {
      if (name === 'attempt') {
        return (addressKey: string) => {
          const place = target.attempt(addressKey)
          if (place !== undefined) waiting++
          return place
        }
      }
      return Reflect.get(target, name, target) as unknown
    },
  })
  const h = await startGateway(t, { config: { lockout: { max_attempts: 2, window_s: 60 } }, store: { ...base, keys }, lockout })
  const made = await Promise.all(Array.from({ length: 6 }, () => real.create({ name: 'burst', type: 'user' }, { actor: 'test' })))
  const lookups = async (n: number) => {
    while (held.length < n) await new Promise<void>((resolve) => (arrived = resolve))
  }
  // All but the one whose look-up is held till the end answered: no later look-up will come.
  let answered = 0
  let othersAnswered: () => void = () => {}
  const others = new Promise<false>((resolve) => (othersAnswered = () => resolve(false)))
  const answers = made.map(({ key }) => h.get('/x', bearer(key)).finally(() => ++answered === made.length - 1 && othersAnswered()))
  // Two look-ups at once (max_attempts 2); the other four wait for a place. The first fails while
  // the second is still out: the place it gives back goes to one that waited.
  await lookups(2)
  while (waiting < 4) await new Promise((resolve) => setTimeout(resolve, 10))
  held[0]?.failNow()
  // Every later look-up is answered by the store (none comes when the waiting are answered without one).
  for (let n = 3; n <= 6; n++) {
    if ((await Promise.race([lookups(n).then(() => true), others])) === false) break
    held[n - 1]?.go()
  }
  held[1]?.go()
  const codes = (await Promise.all(answers)).map((a) => a.status)
  t.same(codes.filter((c) => c === 503).length, 1, `only the look-up that failed is answered 503 (${codes.join(' ')})`)
  t.same(codes.filter((c) => c === 200).length, 5, 'the others are looked up and authenticated')
})
