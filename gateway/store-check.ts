// The store check: the backstop of cross-instance invalidation. Redis pub/sub carries a change
// to every gateway within milliseconds, but a message can be lost in ways no subscriber can see
// (a `keygate api-key` run that could not reach Redis in time, a publish on a connection that
// died silently, Redis flushed with the counter). So every `cache.store_check_s` each gateway
// asks the store for the keys changed since its last read (every change of a key sets
// api_keys.updated_at: create, import, update, revoke, rotate, expire; migration 0008 indexes
// it) and drops exactly those from its cache, by id and by hash (the hash drops a key cached as
// unknown before it was imported). "Since" is judged by the store's clock: the query asks for rows
// changed after `now()` less the time elapsed (by this process's monotonic clock) since the
// previous read was sent, less an overlap, so a transaction that committed after that read but
// stamped updated_at before it, or a clock a little off, is not missed. Rows already applied
// with the same updated_at are not applied again. With nothing changed it is one indexed query.
import type { Db } from '../core/db.ts'
import type { Logger } from '../core/log.ts'

/** Rows changed this long before the previous read are read again. */
export const STORE_CHECK_OVERLAP_MS = 30_000
/** More changed rows than this in one read: the whole cache is dropped instead. */
const MAX_ROWS = 10_000

export interface ChangedKey {
  id: string
  /** The stored SHA-256 hex of the key. */
  keyHash: string
}

export interface StoreCheckOptions {
  db: Db
  intervalMs: number
  log: Logger
  onChanged: (keys: readonly ChangedKey[]) => void
  onOverflow: () => void
  overlapMs?: number
}

export interface StoreCheck {
  /** One read now (the timer's; concurrent calls share nothing and return at once). */
  check(): Promise<void>
  stop(): void
}

export function startStoreCheck(o: StoreCheckOptions): StoreCheck {
  const overlapMs = o.overlapMs ?? STORE_CHECK_OVERLAP_MS
  // Monotonic time the last successful read was sent; the start counts as one (the cache is empty then).
  let lastSent = performance.now()
  let seen = new Map<string, number>()
  let running = false
  let stopped = false
  let failing = false
  // After a read found more changed keys than it takes one by one (the whole cache dropped), the
  // reads that follow skip what that drop covered: the store's time of that read. Without it the
  // overlap read the same bulk change again for 30 s, and dropped the whole cache at every check.
  let coveredUntil: Date | null = null
  const check = async (): Promise<void> => {
    if (running || stopped) return
    running = true
    const sent = performance.now()
    try {
      const back = sent - lastSent + overlapMs
      const rows = await o.db.query<{ id: string | null; key_hash: string | null; updated_at: Date | string | null; read_at: Date | string }>(
        `SELECT k.id, k.key_hash, k.updated_at, n.read_at FROM (
             SELECT greatest(now() - ($1::double precision * interval '1 millisecond'), $2::timestamptz) AS since, now() AS read_at
           ) n
           LEFT JOIN api_keys k ON k.updated_at > n.since LIMIT ${MAX_ROWS + 1}`,
        [back, coveredUntil],
      )
      lastSent = sent
      if (failing) o.log.info('the store check reads the store again')
      failing = false
      if (stopped) return
      const changed = rows.filter((r): r is { id: string; key_hash: string; updated_at: Date | string; read_at: Date | string } => r.id !== null && r.key_hash !== null && r.updated_at !== null)
      if (changed.length > MAX_ROWS) {
        seen = new Map()
        coveredUntil = new Date(rows[0]?.read_at ?? Date.now())
        o.log.debug('the store check found more changed keys than it reads one by one; dropped the whole cache', { max: MAX_ROWS })
        o.onOverflow()
        return
      }
      const next = new Map<string, number>()
      const fresh: ChangedKey[] = []
      for (const r of changed) {
        const at = new Date(r.updated_at).getTime()
        next.set(r.id, at)
        if (seen.get(r.id) !== at) fresh.push({ id: r.id, keyHash: r.key_hash })
      }
      seen = next
      if (fresh.length > 0) {
        o.log.debug('the store check dropped changed keys from the cache', { keys: fresh.length })
        o.onChanged(fresh)
      }
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
