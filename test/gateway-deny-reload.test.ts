// The deny list while a reload is slow (gateway/index.ts, refreshDenyList): a change applied on
// this instance (or announced by another) during a reload is not undone by the reload's older answer, and the deny stage
// is in the request path whenever the list has entries, whatever order reloads and changes land in.
import t from 'tap'
import { DenyListService, type DenyRange } from '../core/deny-list.ts'
import { ACTOR, bearer, makeConfig, openStore, startGateway, until, type Tap } from './helpers/gateway.ts'

/** A DenyListService whose ranges() (the gateway's read) can be held (a slow SELECT: its snapshot is taken, the answer is late). */
class SlowList extends DenyListService {
  #hold: Promise<void> | undefined
  override async ranges(): Promise<DenyRange[]> {
    const rows = await super.ranges()
    if (this.#hold) await this.#hold
    return rows
  }

  /** Holds the answers of the reads from now on; the function returned lets them (and later ones) go. */
  holdReads(): () => void {
    let release!: () => void
    this.#hold = new Promise((r) => (release = r))
    return () => {
      this.#hold = undefined
      release()
    }
  }
}

/**
 * A gateway on a SlowList, with no periodic reload in the way, a key, and `elsewhere`: another
 * instance's admin API on the same store, whose changes are not emitted to this gateway.
 */
async function slowGateway(t: Tap) {
  const config = { gateway: { deny_list_refresh_s: 3600 } }
  const store = await openStore(t, makeConfig({ ...config, routes: [] }))
  const slow = new SlowList({ db: store.db, audit: store.audit })
  const h = await startGateway(t, { config, store: { ...store, denyList: slow } })
  const elsewhere = new DenyListService({ db: store.db, audit: store.audit })
  return { slow, h, elsewhere, k: await h.key() }
}

t.test('a reload in flight does not undo a deny entry added meanwhile', async (t) => {
  const { slow, h, k } = await slowGateway(t)
  t.equal((await h.get('/', bearer(k.key))).status, 200)
  const release = slow.holdReads()
  const refresh = h.gateway.refreshDenyList() // a periodic reload: reads the empty list, answers late
  await new Promise((r) => setTimeout(r, 50))
  await slow.add({ cidr: '127.0.0.1', reason: 'attack' }, ACTOR) // an admin adds a block through this instance
  t.equal((await h.get('/', bearer(k.key))).status, 403, 'applies at once')
  release()
  await refresh
  t.equal((await h.get('/', bearer(k.key))).status, 403, 'still blocked once the older reload has answered')
})

t.test("a change another instance announces during a reload in flight is read, not joined to that reload's older answer", async (t) => {
  const { slow, h, elsewhere, k } = await slowGateway(t)
  const release = slow.holdReads()
  const refresh = h.gateway.refreshDenyList() // a periodic reload: reads the empty list, answers late
  await new Promise((r) => setTimeout(r, 50))
  await elsewhere.add({ cidr: '127.0.0.1', reason: 'attack' }, ACTOR) // added through another instance...
  h.gateway.applyInvalidation('deny') // ...which announces it over Redis
  release()
  await refresh
  // The reload the announcement asked for takes two reads of the store; waited for, not slept
  // for (50 ms was short under the suite's load). There is no periodic reload here to do it instead.
  await until(t, 'applied once the reload has read again (before: only at the next periodic reload)', async () => (await h.get('/', bearer(k.key))).status === 403, 10_000)
})

t.test('the deny check stays on while entries are in force, after a removal during a reload', async (t) => {
  const { slow, h, elsewhere, k } = await slowGateway(t)
  const e1 = await slow.add({ cidr: '192.0.2.1' }, ACTOR)
  const release = slow.holdReads()
  const refresh = h.gateway.refreshDenyList() // reads the list with e1
  await new Promise((r) => setTimeout(r, 50))
  await slow.remove(e1.id, ACTOR) // removed here: the list is empty, the deny stage leaves the path
  release()
  await refresh // the older answer (with e1) is not used
  await elsewhere.add({ cidr: '127.0.0.1', reason: 'attack' }, ACTOR) // added through another instance
  await h.gateway.refreshDenyList() 
  await h.gateway.refreshDenyList()
  t.match(await h.metrics.registry.metrics(), /keygate_deny_list_entries 1/, 'the matcher holds one entry in force')
  t.equal((await h.get('/', bearer(k.key))).status, 403, '127.0.0.1 is on the deny list in the store and in the matcher')
})
