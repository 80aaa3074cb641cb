// The store check (gateway/store-check.ts) on both stores: what a read reports as changed, judged
// by the store's transactions (api_keys.change_xid, migration 0009) and not by updated_at, which a
// writer stamps from its own clock. Before 0009 a change made by hand in SQL, or by a writer whose
// clock ran behind the store's, was never read (the tests marked so fail on that code).
import t, { type Test } from 'tap'
import pg from 'pg'
import { AuditCipher, AuditLog } from '../core/audit.ts'
import { openDb, type Db } from '../core/db.ts'
import { KeyService } from '../core/keys/service.ts'
import { createLogger } from '../core/log.ts'
import { startStoreCheck } from '../gateway/store-check.ts'
import { forEachStore, openStore, STORE_KINDS, TEST_ENCRYPTION_KEY, type Store } from './helpers/stores.ts'

const GRACE = { system: 24, user: 72, service: 72, integration: 72, emergency: 1 }
const ACTOR = { actor: 'test' }

function checker(t: Test, store: Store) {
  let overflows = 0
  const changed: string[][] = []
  const check = startStoreCheck({
    db: store.db,
    intervalMs: 0,
    log: createLogger({ write: () => {} }),
    onOverflow: () => overflows++,
    onChanged: (keys) => changed.push(keys.map((k) => k.id).sort()),
  })
  t.teardown(() => check.stop())
  return {
    /** One read; what it reported: the ids changed, or 'all' when it dropped the whole cache. */
    async read(): Promise<string[] | 'all'> {
      const before = overflows
      changed.length = 0
      await check.check()
      if (overflows > before) return 'all'
      return changed.flat()
    },
  }
}

/** `base`, its queries sent to the store `pick` names at each one (a store swapped, a pool of mixed connections). */
function routed(base: Store, pick: () => Db): Store {
  return { ...base, db: { ...base.db, query: (sql: string, params?: unknown[]) => pick().query(sql, params) } as Db }
}

function keyService(store: Store, now?: () => Date): KeyService {
  return new KeyService({ db: store.db, audit: new AuditLog(new AuditCipher(TEST_ENCRYPTION_KEY)), prefix: 'kg', graceHours: GRACE, ...(now ? { now } : {}) })
}

t.test('the store check', async (t) => {
  await forEachStore(t, async (t, store) => {
    const keys = keyService(store)

    await t.test('the first read drops the whole cache; then each change is read once, by the read after it', async (t) => {
      const c = checker(t, store)
      t.equal(await c.read(), 'all', 'no read before it: everything cached may be stale')
      t.same(await c.read(), [], 'nothing changed')
      const { record } = await keys.create({ name: 'a', type: 'user' }, ACTOR)
      t.same(await c.read(), [record.id], 'created')
      t.same(await c.read(), [], 'not read again')
      await keys.update(record.id, { name: 'renamed' }, ACTOR)
      await keys.revoke(record.id, undefined, ACTOR)
      t.same(await c.read(), [record.id], 'updated, then revoked: one row')
      const { record: b } = await keys.create({ name: 'b', type: 'user' }, ACTOR)
      const rotated = await keys.rotate(b.id, {}, ACTOR)
      t.same(await c.read(), [b.id, rotated.record.id].sort(), 'a rotation: the key and its successor')
    })

    await t.test('a change made by hand in SQL, updated_at untouched, is read', async (t) => {
      const c = checker(t, store)
      const { record } = await keys.create({ name: 'by hand', type: 'user' }, ACTOR)
      await c.read()
      await store.db.query(`UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE id = $1`, [record.id])
      t.same(await c.read(), [record.id])
    })

    await t.test('a change by a writer whose clock is ten minutes behind the store is read', async (t) => {
      const c = checker(t, store)
      const late = keyService(store, () => new Date(Date.now() - 600_000))
      const { record } = await keys.create({ name: 'late writer', type: 'user' }, ACTOR)
      await c.read()
      await late.revoke(record.id, undefined, ACTOR)
      t.same(await c.read(), [record.id])
    })

    await t.test('recording a use (last_used_at alone) is not a change; a change with it is', async (t) => {
      const c = checker(t, store)
      const { record } = await keys.create({ name: 'busy', type: 'user' }, ACTOR)
      await c.read()
      await store.db.query(`UPDATE api_keys SET last_used_at = now() WHERE id = $1`, [record.id])
      t.same(await c.read(), [], 'a use')
      await store.db.query(`UPDATE api_keys SET last_used_at = now(), scopes = '{read}' WHERE id = $1`, [record.id])
      t.same(await c.read(), [record.id], 'a use and a change')
      await store.db.query(`UPDATE api_keys SET name = name WHERE id = $1`, [record.id])
      t.same(await c.read(), [], 'a write that changes nothing')
    })

    await t.test('a bulk change past what a read takes key by key drops the whole cache once', async (t) => {
      const c = checker(t, store)
      await c.read()
      await store.db.query(
        `INSERT INTO api_keys (id, key_hash, name, type) SELECT 'bulk' || i, lpad(to_hex(i), 64, '0'), 'bulk', 'service' FROM generate_series(1, 10001) AS i`,
      )
      t.equal(await c.read(), 'all', 'the bulk change drops the whole cache')
      t.same(await c.read(), [], 'once: the read after it does not see it again')
      await store.db.query(`UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE id = 'bulk7'`)
      t.same(await c.read(), ['bulk7'], 'a change after it is read key by key')
    })

    await t.test('a change made with session_replication_role = replica (ordinary triggers off) is read', async (t) => {
      const c = checker(t, store)
      const { record } = await keys.create({ name: 'replica role', type: 'user' }, ACTOR)
      await c.read()
      await store.db.transaction(async (tx) => {
        await tx.query('SET LOCAL session_replication_role = replica')
        await tx.query(`UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE id = $1`, [record.id])
      })
      t.same(await c.read(), [record.id])
    })

    await t.test('a row stamped by another cluster (a pg_dump restored here) is not read at every check', async (t) => {
      // pg_restore loads rows before it makes the trigger, so they keep the ids of the cluster
      // they were dumped from, which may lie ahead of this one's (found by a review: read at
      // every check, and past 10,000 rows the whole cache dropped at every check).
      const c = checker(t, store)
      const { record } = await keys.create({ name: 'restored', type: 'user' }, ACTOR)
      await store.db.transaction(async (tx) => {
        await tx.query('ALTER TABLE api_keys DISABLE TRIGGER api_keys_stamp_change')
        await tx.query(`UPDATE api_keys SET change_xid = ((pg_current_xact_id()::text)::bigint + 1000000)::text::xid8 WHERE id = $1`, [record.id])
        await tx.query('ALTER TABLE api_keys ENABLE ALWAYS TRIGGER api_keys_stamp_change')
      })
      await c.read()
      t.same(await c.read(), [], 'not read again')
      t.same(await c.read(), [], 'nor again')
      await keys.revoke(record.id, undefined, ACTOR)
      t.same(await c.read(), [record.id], 'a change to it here is read')
    })

    await t.test('a read that fails skips nothing: the next reads from the last that succeeded', async (t) => {
      const c = checker(t, store)
      await c.read()
      const { record } = await keys.create({ name: 'while failing', type: 'user' }, ACTOR)
      await store.db.query('ALTER TABLE api_keys RENAME COLUMN change_xid TO change_xid_away')
      t.teardown(() => store.db.query('ALTER TABLE api_keys RENAME COLUMN change_xid_away TO change_xid').catch(() => {}))
      t.same(await c.read(), [], 'the read failed: nothing reported')
      await store.db.query('ALTER TABLE api_keys RENAME COLUMN change_xid_away TO change_xid')
      t.same(await c.read(), [record.id], 'read once the store answers')
    })
  })
})

t.test('a transaction in progress during a read is read once it commits, however long after (PostgreSQL)', async (t) => {
  await forEachStore(t, async (t, store) => {
    const keys = keyService(store)
    const c = checker(t, store)
    const { record } = await keys.create({ name: 'slow commit', type: 'user' }, ACTOR)
    await c.read()
    const writer = new pg.Client({ connectionString: store.url })
    await writer.connect()
    t.teardown(() => writer.end())
    await writer.query('BEGIN')
    // Stamped an hour back, as a writer that read the time long before it commits.
    await writer.query(`UPDATE api_keys SET status = 'revoked', revoked_at = now(), updated_at = now() - interval '1 hour' WHERE id = $1`, [record.id])
    t.same(await c.read(), [], 'not committed: nothing to read yet')
    t.same(await c.read(), [])
    await writer.query('COMMIT')
    t.same(await c.read(), [record.id], 'read after the commit')
    t.same(await c.read(), [], 'and only once')
  }, { kinds: ['postgres'] })
})

t.test('a store swapped for another under a running gateway (its transaction ids behind the last read): the whole cache is dropped', async (t) => {
  // Found by a review: the last snapshot, from the first store, took the second store's changes
  // for ones already read, and a revocation made there was never read.
  const stores = await Promise.all(STORE_KINDS.map(async (kind) => {
    const store = await openStore(t, kind)
    await keyService(store).create({ name: 'burn', type: 'user' }, ACTOR)
    const [{ xid }] = (await store.db.query<{ xid: string }>('SELECT pg_current_xact_id()::text AS xid')) as [{ xid: string }]
    return { store, xid: BigInt(xid) }
  }))
  // The first store read is the one whose counter is ahead.
  const [ahead, behind] = stores.sort((a, b) => (a.xid > b.xid ? -1 : 1)) as [(typeof stores)[0], (typeof stores)[0]]
  if (ahead.xid === behind.xid) await ahead.store.db.query('SELECT pg_current_xact_id()')
  let current = ahead.store
  const swapped = routed(ahead.store, () => current.db)
  const c = checker(t, swapped)
  await c.read()
  t.same(await c.read(), [])
  current = behind.store
  const { record } = await keyService(behind.store).create({ name: 'elsewhere', type: 'user' }, ACTOR)
  await keyService(behind.store).revoke(record.id, undefined, ACTOR)
  t.equal(await c.read(), 'all', 'the first read on the other store drops everything')
  t.same(await c.read(), [], 'then reads it as usual')
  const { record: next } = await keyService(behind.store).create({ name: 'next', type: 'user' }, ACTOR)
  t.same(await c.read(), [next.id])
})

t.test('another database of the same cluster, or the table made anew, under a running gateway: the whole cache is dropped (PostgreSQL)', async (t) => {
  // Found by a review: a copy renamed into place, or a pg_restore --clean, shares the cluster's
  // transaction counter; a revocation made in it before the last read looked already read.
  const a = await openStore(t, 'postgres')
  const b = await openStore(t, 'postgres')
  const { record } = await keyService(b).create({ name: 'in the copy', type: 'user' }, ACTOR)
  await keyService(b).revoke(record.id, undefined, ACTOR)
  let current = a
  const swapped = routed(a, () => current.db)
  const c = checker(t, swapped)
  await c.read()
  t.same(await c.read(), [], 'the first database, read after the change in the other')
  current = b
  t.equal(await c.read(), 'all', 'another database: everything dropped')
  t.same(await c.read(), [])
  // A data-only restore over a truncated table, triggers disabled: the rows keep their old ids
  // (found by a review: a revocation restored so was never read). TRUNCATE gives the table a new file.
  const { record: restored } = await keyService(b).create({ name: 'restored', type: 'user' }, ACTOR)
  await c.read()
  await b.db.transaction(async (tx) => {
    await tx.query('CREATE TEMP TABLE saved ON COMMIT DROP AS SELECT * FROM api_keys')
    await tx.query(`UPDATE saved SET status = 'revoked', revoked_at = now() WHERE id = $1`, [restored.id])
    await tx.query('TRUNCATE api_keys CASCADE')
    await tx.query('ALTER TABLE api_keys DISABLE TRIGGER ALL')
    await tx.query('INSERT INTO api_keys SELECT * FROM saved')
    await tx.query('ALTER TABLE api_keys ENABLE TRIGGER ALL')
    await tx.query('ALTER TABLE api_keys ENABLE ALWAYS TRIGGER api_keys_stamp_change')
  })
  t.equal(await c.read(), 'all', 'truncated and loaded with triggers off: everything dropped')
  t.same(await c.read(), [])
  // The table made anew in place, as pg_restore --clean does.
  await b.db.exec('ALTER TABLE api_keys RENAME TO api_keys_before; CREATE TABLE api_keys (LIKE api_keys_before INCLUDING ALL)')
  t.teardown(() => b.db.exec('DROP TABLE api_keys; ALTER TABLE api_keys_before RENAME TO api_keys').catch(() => {}))
  t.equal(await c.read(), 'all', 'the table made anew: everything dropped')
})

t.test('the store named across connections and a crash recovery (PostgreSQL)', async (t) => {
  const store = await openStore(t, 'postgres')
  // Connections of two time zones (a setting changed for the database, a pooler): the same store.
  // Before, the start time was compared as text, which follows the connection's TimeZone, and
  // the whole cache was dropped at every other read (found by a review).
  const tokyo = await openDb({ databaseUrl: `${store.url}?options=${encodeURIComponent('-c TimeZone=Asia/Tokyo -c DateStyle=German')}` })
  t.teardown(() => tokyo.close())
  let turn = 0
  const alternating = routed(store, () => (turn++ % 2 === 0 ? store.db : tokyo))
  const c = checker(t, alternating)
  await c.read()
  for (let i = 0; i < 4; i++) t.same(await c.read(), [], `read ${i + 2}: nothing dropped`)
  // A crash PostgreSQL recovers from without a restart resets its shared statistics (the start
  // time stays), and may hand out transaction ids again: the reset is what the check sees. Reset
  // here by hand, as pg_stat_reset_shared does.
  await store.db.query(`SELECT pg_stat_reset_shared('bgwriter')`)
  t.equal(await c.read(), 'all', 'statistics reset: everything dropped')
  t.same(await c.read(), [])
})
