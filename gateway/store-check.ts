// The store check: the backstop of cross-instance invalidation. Redis pub/sub carries a change
// to every gateway within milliseconds, but a message can be lost in ways no subscriber can see
// (a `keygate api-key` run that could not reach Redis in time, a publish on a connection that
// died silently, Redis flushed with the counter, a change made by hand in SQL). So every
// `cache.store_check_s` each gateway asks the store for the keys changed since its last read and
// drops exactly those from its cache, by id and by hash (the hash drops a key cached as unknown
// before it was imported).
//
// "Since" is judged by the store's transactions, not by any clock: every change of a row stamps
// api_keys.change_xid with the id of the transaction that made it (a trigger, migration 0009;
// a use alone, last_used_at, does not), and each read keeps its own snapshot. The next read asks
// for the rows whose transaction that snapshot could not see: committed after it, or still in
// progress then. A writer's clock, a commit long after the row was written, or an UPDATE that
// leaves updated_at alone cannot hide a change, and no row is read twice. The index on
// change_xid bounds the scan from the snapshot's oldest open transaction; with nothing changed it
// is one indexed query.
//
// The first read has no snapshot before it: it drops the whole cache (at start it holds next to
// nothing) and keeps its snapshot. Transaction ids count in one cluster only: a row restored
// from another cluster, or a store swapped for another under a running gateway, is handled below.
// A hot standby's snapshot does not list the primary's open transactions, so the store must be
// the primary (keygate writes to it anyway). A key row deleted by hand is not seen (keygate
// never deletes one: revoke it). A read with more changed rows than it takes one by one drops
// the whole cache too; its snapshot covers the whole change, so the reads after it do not see it
// again. A read that fails changes nothing: the next one asks from the last snapshot read.
import type { Db } from '../core/db.ts'
import { xidNumber } from '../core/keys/service.ts'
import type { Logger } from '../core/log.ts'

/** More changed rows than this in one read: the whole cache is dropped instead. */
const MAX_ROWS = 10_000

export interface ChangedKey {
  id: string
  /** The stored SHA-256 hex of the key. */
  keyHash: string
  /** The transaction of the row's last change (xidNumber). */
  changeXid: number
}

/** A row of a read: a changed key (null columns on the one row of a read that found none), and the read's snapshot and store. */
type ReadRow = { id: string | null; key_hash: string | null; change_xid: string | null; snapshot: string; behind: boolean | null; store: string }
type ChangedRow = { id: string; key_hash: string }

export interface StoreCheckOptions {
  db: Db
  intervalMs: number
  log: Logger
  onChanged: (keys: readonly ChangedKey[]) => void
  /** Drop every cached key: the first read, or more changed keys than a read takes one by one. */
  onOverflow: () => void
}

export interface StoreCheck {
  /** One read now (the timer's; concurrent calls share nothing and return at once). */
  check(): Promise<void>
  stop(): void
}

export function startStoreCheck(o: StoreCheckOptions): StoreCheck {
  // The snapshot of the last read that succeeded (pg_snapshot's text form), null before the first.
  let since: string | null = null
  // Which store `since` is of (the query's `store`: the server's start, its statistics' reset,
  // the database's and the table's oids, the table's file).
  let storeSeen: string | null = null
  let running = false
  let stopped = false
  let failing = false
  const check = async (): Promise<void> => {
    if (running || stopped) return
    running = true
    try {
      // One statement: the snapshot it reads the rows with is the one it returns. A row stamped
      // at or past that snapshot's xmax comes from another cluster's counter (a pg_dump restored
      // here: pg_restore loads rows before it makes triggers): it is no change this store can
      // order, and would otherwise be read at every check; it is read once the counter passes it.
      // A snapshot behind the last one (`behind`) is another cluster's too: the store was swapped
      // under the gateway (a restore, DNS pointed elsewhere), and the last snapshot says nothing
      // about what changed in this one.
      // `store` names the server's run, the database and the table: a restart, or a crash the
      // server recovered from without one (a backend killed by the OOM killer: the start time
      // stays, the shared statistics are reset), may hand out again transaction ids that never
      // reached the WAL (reviews reproduced a revocation missed so, both ways); another database
      // (renamed into place, restored beside it) or the table made anew (pg_restore --clean) show
      // another too, and so does the table's file (TRUNCATE, before a data-only restore whose
      // rows keep their old ids with triggers disabled; also VACUUM FULL, once), and the last
      // snapshot then says nothing. Times as epoch seconds: their text would follow each
      // connection's TimeZone and DateStyle.
      const rows = await o.db.query<ReadRow>(
        `SELECT k.id, k.key_hash, k.change_xid::text AS change_xid, n.snapshot::text AS snapshot, n.store,
                pg_snapshot_xmax(n.snapshot) < pg_snapshot_xmax($1::pg_snapshot) AS behind
           FROM (SELECT pg_current_snapshot() AS snapshot,
                        concat_ws(' ', extract(epoch FROM pg_postmaster_start_time()), (SELECT extract(epoch FROM stats_reset) FROM pg_stat_bgwriter),
                          (SELECT oid FROM pg_database WHERE datname = current_database()), 'api_keys'::regclass::oid,
                          pg_relation_filenode('api_keys'::regclass)) AS store) n
           LEFT JOIN api_keys k ON $1::pg_snapshot IS NOT NULL
             AND pg_snapshot_xmax(n.snapshot) >= pg_snapshot_xmax($1::pg_snapshot)
             AND n.store = $2
             AND k.change_xid >= pg_snapshot_xmin($1::pg_snapshot)
             AND k.change_xid < pg_snapshot_xmax(n.snapshot)
             AND NOT pg_visible_in_snapshot(k.change_xid, $1::pg_snapshot)
           LIMIT ${MAX_ROWS + 1}`,
        [since, storeSeen],
      )
      if (failing) o.log.info('the store check reads the store again')
      failing = false
      if (stopped) return
      const first = since === null
      const elsewhere = rows[0]?.behind === true || (!first && rows[0]?.store !== storeSeen)
      since = rows[0]?.snapshot ?? since
      storeSeen = rows[0]?.store ?? storeSeen
      const changed = rows.filter((r): r is ReadRow & ChangedRow => r.id !== null && r.key_hash !== null)
      if (first || elsewhere || changed.length > MAX_ROWS) {
        if (elsewhere) o.log.warn('the store is not the one the store check read last (restarted, restored, or another database); dropped the whole cache')
        else if (first) o.log.debug('the store check took its first snapshot; dropped the whole cache')
        else o.log.debug('the store check found more changed keys than it reads one by one; dropped the whole cache', { max: MAX_ROWS })
        o.onOverflow()
        return
      }
      if (changed.length > 0) o.onChanged(changed.map((r) => ({ id: r.id, keyHash: r.key_hash, changeXid: xidNumber(r.change_xid) })))
    } catch (err) {
      // Tried again next time, from the last read that succeeded: nothing is skipped.
      if (!failing) o.log.warn('the store check could not read the changed keys; it tries again', { err: err as Error })
      failing = true
    } finally {
      running = false
    }
  }
  const timer = o.intervalMs > 0 ? setInterval(() => void check(), o.intervalMs) : undefined
  timer?.unref()
  return {
    check,
    stop() {
      stopped = true
      clearInterval(timer)
    },
  }
}
