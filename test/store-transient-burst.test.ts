// A burst of keys not in the cache from one address while look-ups fail on the store: one failure
// answers only itself 503, and the keys that never ask the store are answered as ever.
import t from 'tap'
import { KeyService } from '../core/keys/service.ts'
import { createLockout, type Lockout } from '../core/lockout.ts'
import { silentLogger } from '../core/log.ts'
import { keyServiceOptions } from '../core/runtime.ts'
import { bearer, makeConfig, metric, openStore, startGateway, until, type Tap } from './helpers/gateway.ts'

/**
 * A gateway whose key look-ups wait, while `holding`, until the test answers or fails each
 * (`held`, in the order they came), and whose lockout counts the attempts that waited for a place.
 */
async function gatewayWithHeldLookups(t: Tap, options: { maxAttempts: number; cache?: Record<string, unknown> }) {
  const settings = { lockout: { max_attempts: options.maxAttempts, window_s: 60 }, ...(options.cache ? { cache: options.cache } : {}) }
  const base = await openStore(t, makeConfig({ ...settings, routes: [] }))
  const real = new KeyService({ db: base.db, audit: base.audit, ...keyServiceOptions(makeConfig({ ...settings, routes: [] })) })
  const state = { holding: true, waiting: 0 }
  const held: Array<{ presented: string; go: () => void; fail: () => void }> = []
  let arrived: () => void = () => {}
  const keys = new Proxy(real, {
    get(target, name) {
      if (name === 'lookup') {
        return (presented: string) => {
          if (!state.holding) return target.lookup(presented)
          return new Promise((resolve, reject) => {
            held.push({ presented, go: () => resolve(target.lookup(presented)), fail: () => reject(new Error('terminating connection due to administrator command')) })
            arrived()
          })
        }
      }
      const value = Reflect.get(target, name, target) as unknown
      return typeof value === 'function' ? value.bind(target) : value
    },
  })
  const own = createLockout({ maxAttempts: options.maxAttempts, windowS: 60, log: silentLogger })
  const lockout: Lockout = new Proxy(own, {
    get(target, name) {
      if (name === 'attempt') {
        return (addressKey: string) => {
          const place = target.attempt(addressKey)
          if (place !== undefined) state.waiting++
          return place
        }
      }
      return Reflect.get(target, name, target) as unknown
    },
  })
  const h = await startGateway(t, { config: settings, store: { ...base, keys }, lockout })
  return {
    h,
    real,
    state,
    held,
    /** Resolves once `n` look-ups have come. */
    lookups: async (n: number) => {
      while (held.length < n) await new Promise<void>((resolve) => (arrived = resolve))
    },
    /** Resolves once `n` attempts have waited for a place. */
    waitingFor: async (n: number) => {
      while (state.waiting < n) await new Promise((resolve) => setTimeout(resolve, 10))
    },
  }
}

t.test('one look-up that fails (a transient store error) in a burst from one address answers that one 503, not every attempt waiting behind it (found by a review)', async (t) => {
  // Before: an attempt let in after any look-up had failed while it waited, none succeeding since,
  // was answered 503 store_unavailable without asking the store, and its place went to the next,
  // answered the same way: one failure answered the address's whole queue 503.
  const { h, real, held, lookups, waitingFor } = await gatewayWithHeldLookups(t, { maxAttempts: 2 })
  const made = await Promise.all(Array.from({ length: 6 }, () => real.create({ name: 'burst', type: 'user' }, { actor: 'test' })))
  // All but the one whose look-up is held till the end answered: no later look-up will come.
  let answered = 0
  let othersAnswered: () => void = () => {}
  const others = new Promise<false>((resolve) => (othersAnswered = () => resolve(false)))
  const answers = made.map(({ key }) => h.get('/x', bearer(key)).finally(() => ++answered === made.length - 1 && othersAnswered()))
  // Two look-ups at once (max_attempts 2); the other four wait for a place. The first fails while
  // the second is still out: the place it gives back goes to one that waited.
  await lookups(2)
  await waitingFor(4)
  held[0]?.fail()
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

t.test('on a failing store, a malformed key or one known unknown that waited for its place is answered 401 as ever, not 503: neither asks the store (found by a review)', async (t) => {
  // Before: the shortcut that answers a waiting attempt 503 after look-ups failed (core/lockout.ts,
  // createLookupFailures) came before the key's own checks, so keys that never need the store were
  // answered store_unavailable during an outage, where the same key alone got 401.
  const { h, state, held, lookups, waitingFor } = await gatewayWithHeldLookups(t, { maxAttempts: 8, cache: { negative_ttl_s: 600 } })
  // Legacy keys (UUID v4) of the right shape, in no store; one asked until it is remembered as
  // unknown (an answer that comes as the cache is flushed, as at the start, is not kept), each
  // asking a failure counted.
  const shaped = () => ({ 'x-api-key': crypto.randomUUID() })
  const unknown = shaped()
  state.holding = false
  let failures = 0
  await until(t, 'an unknown key is remembered as unknown', async () => {
    failures++
    return (await h.get('/x', unknown)).status === 401 && (await metric(h.metrics.registry, 'keygate_key_cache_entries', { cache: 'unknown' })) === 1
  })
  state.holding = true
  // Two look-ups fail in a row: the store is out.
  const first = [h.get('/x', shaped()), h.get('/x', shaped())]
  await lookups(2)
  for (const l of held) l.fail()
  t.same((await Promise.all(first)).map((a) => a.status), [503, 503], 'the store out: 503')
  // Look-ups hold the places left (max_attempts, less the failures counted); the two behind them wait.
  const places = 8 - failures
  t.ok(places >= 3, `places left: ${places}`)
  const third = Array.from({ length: places }, () => h.get('/x', shaped()))
  await lookups(2 + places)
  const before = state.waiting
  const malformed = h.get('/x', { 'x-api-key': 'not-a-key-of-any-shape' })
  await waitingFor(before + 1)
  const known = h.get('/x', unknown)
  await waitingFor(before + 2)
  for (const l of held.slice(2)) l.fail()
  t.same((await Promise.all(third)).map((a) => a.status), Array(places).fill(503), 'the look-ups that failed: 503')
  const [m, k] = await Promise.all([malformed, known])
  t.equal(m.status, 401, `a malformed key is answered as ever (${m.text})`)
  t.equal(k.status, 401, `a key known unknown is answered from the cache as ever (${k.text})`)
  t.equal(held.length, 2 + places, 'neither asked the store')
})

t.test('one look-up that fails, shared by the attempts of a burst of one key, answers those 503, not every attempt waiting behind them (found by a review)', async (t) => {
  // The requests of one key not in the cache share its look-up (the key cache's one promise for
  // every caller asking meanwhile): its one failure was counted once for each of them, so two
  // attempts sharing it made the "two failures in a row" that answer the address's whole queue
  // 503 without asking the store, which would have answered them.
  const { h, real, state, held, lookups, waitingFor } = await gatewayWithHeldLookups(t, { maxAttempts: 2 })
  const { key } = await real.create({ name: 'burst', type: 'user' }, { actor: 'test' })
  const answers = Array.from({ length: 6 }, () => h.get('/x', bearer(key)))
  // Two attempts hold the places and share one look-up; the other four wait for a place.
  await lookups(1)
  await waitingFor(4)
  held[0]?.fail()
  // The store is asked again (by the attempts let in next) and answers.
  const asked = await Promise.race([lookups(2).then(() => true), Promise.all(answers).then(() => false)])
  state.holding = false
  for (const l of held.slice(1)) l.go()
  const codes = (await Promise.all(answers)).map((a) => a.status)
  t.ok(asked, 'the attempts let in after the one failure ask the store again')
  t.same(codes.filter((c) => c === 503).length, 2, `only the attempts that shared the failed look-up are answered 503 (${codes.join(' ')})`)
  t.same(codes.filter((c) => c === 200).length, 4, 'the others are looked up and authenticated')
})

t.test('on a failing store, an attempt that waited for its place while another attempt of its key put it in the cache is answered from the cache, not 503 and not by another look-up (found by a review)', async (t) => {
  // Before: the cache was looked at as the request came, not again as its place came: the key,
  // cached meanwhile, was looked up again (a query per group of max_attempts in a burst of one
  // key), and once look-ups had failed in a row it was answered 503 without one.
  const { h, real, held, lookups, waitingFor } = await gatewayWithHeldLookups(t, { maxAttempts: 3 })
  const [x1, x2, x3, k] = await Promise.all(Array.from({ length: 4 }, () => real.create({ name: 'burst', type: 'user' }, { actor: 'test' })))
  const lookupsOf = (g: { key: string }) => held.filter((l) => l.presented === g.key)
  // x1, x2 and k hold the places; then come k again (w1), x3 and k once more (w2), in that order.
  const a1 = h.get('/x', bearer(x1!.key))
  const a2 = h.get('/x', bearer(x2!.key))
  const a3 = h.get('/x', bearer(k!.key))
  await lookups(3)
  const w1 = h.get('/x', bearer(k!.key))
  await waitingFor(1)
  const y = h.get('/x', bearer(x3!.key))
  await waitingFor(2)
  const w2 = h.get('/x', bearer(k!.key))
  await waitingFor(3)
  // k is found and cached; its place goes to w1.
  lookupsOf(k!)[0]?.go()
  t.equal((await a3).status, 200, 'k is authenticated')
  // x1's look-up fails; its place goes to x3's attempt, which asks the store (one failure).
  lookupsOf(x1!)[0]?.fail()
  t.equal((await a1).status, 503, 'the look-up that failed: 503')
  await lookups(lookupsOf(k!).length + 3)
  // x2's fails too (two in a row); its place goes to w2.
  lookupsOf(x2!)[0]?.fail()
  t.equal((await a2).status, 503, 'the look-up that failed: 503')
  // Whatever asks the store from here is answered.
  const settled = Promise.all([w1, w2, y])
  const released = new Set<unknown>()
  while (!(await Promise.race([settled.then(() => true), new Promise<false>((resolve) => setTimeout(() => resolve(false), 50))]))) {
    for (const l of held.filter((l) => !released.has(l))) {
      released.add(l)
      l.go()
    }
  }
  const [r1, r2] = await Promise.all([w1, w2])
  t.equal(r2.status, 200, `the attempt let in after two failures in a row is answered from the cache (${r2.status === 200 ? 'authenticated' : r2.text})`)
  t.equal(r1.status, 200, 'the one let in before them too')
  t.equal(lookupsOf(k!).length, 1, 'k was looked up once')
})
