// What ends a key that still works, written once: the scheduler ends keys by it
// (core/scheduler.ts) and the key service reports them by it (the expiring report and
// stats.expiring_soon). Written twice before, the two disagreed once (found by a review: a key
// whose rotation deadline and later expiry both passed by one round was ended "for the expiry"
// where the report had said "rotation overdue").

/** What ends a key that still works, in the words of its key.expired audit row. */
export type KeyEndReason = 'grace_ended' | 'expires_at' | 'rotation_overdue'

/**
 * A FROM clause: every key as `k`, its rotation notice as `n` (NULLs when none), and `e` with
 * - `e.ends_at`: when the key stops working; NULL when nothing ends it or it has ended
 *   (revoked, expired). The earliest of its expiry, a rotating key's grace, and an active key's
 *   announced rotation deadline (only an announced one is enforced; an interval changed or
 *   removed drops the announcement, and a key without an interval ignores a stale one);
 * - `e.end_reason`: which of them it is (a KeyEndReason). A tie goes to the grace, then to the
 *   expiry.
 */
export const KEY_ENDS_FROM = `api_keys k
  LEFT JOIN api_key_notices n ON n.key_id = k.id AND n.kind = 'rotation'
  CROSS JOIN LATERAL (SELECT
      CASE WHEN k.status = 'rotating' THEN k.grace_until END AS grace_end,
      CASE WHEN k.status = 'active' AND k.rotation_interval_s IS NOT NULL THEN n.deadline END AS rotation_end) d
  CROSS JOIN LATERAL (SELECT
      CASE WHEN k.status IN ('active', 'rotating') THEN LEAST(d.grace_end, k.expires_at, d.rotation_end) END AS ends_at) x
  CROSS JOIN LATERAL (SELECT x.ends_at,
      CASE WHEN x.ends_at IS NULL THEN NULL
           WHEN x.ends_at = d.grace_end THEN 'grace_ended'
           WHEN x.ends_at = k.expires_at THEN 'expires_at'
           ELSE 'rotation_overdue' END AS end_reason) e`

/**
 * When key `k` (a table or alias) stops working by its expiry or, rotating, its grace: the
 * earlier of them; NULL when neither is set. Only of an active or rotating key's row (the
 * scheduler's announced rotation deadline aside, which it enforces itself). Spelled exactly as
 * migration 0020's api_keys_live_end_idx, whose expression it must match for PostgreSQL to read
 * the keys past it (`?status=expired`) from that index.
 */
export function liveEndSql(k: string): string {
  return `LEAST(${k}.expires_at, CASE WHEN ${k}.status = 'rotating' THEN ${k}.grace_until END)`
}

/**
 * The status key `k` (a table or alias) has at `now` (a statement parameter such as `$1`):
 * core/keys/evaluate.ts statusAt in SQL, for filtering and counting by it. Its row's status
 * until the scheduler ends it: past its expiry (or, rotating, its grace: never NULL then, by
 * the table's check) it is expired at once.
 */
export function statusAtSql(k: string, now: string): string {
  return `CASE WHEN ${k}.status IN ('active', 'rotating') AND ${liveEndSql(k)} <= ${now} THEN 'expired' ELSE ${k}.status END`
}

/**
 * The keys judged expired at `now` (statusAtSql's 'expired'), as the two parts an index reads
 * each: those whose row says so, from the (status, created_at, id) index in the list's order,
 * and the active or rotating ones past their end (liveEndSql), which the scheduler's next round
 * marks and so are few, from api_keys_live_end_idx. Disjoint (by status), so a UNION ALL of
 * them holds each key once.
 */
export function expiredPartsSql(k: string, now: string): [string, string] {
  return [`${k}.status = 'expired'`, liveEndPassedSql(k, now)]
}

/**
 * The active or rotating keys `k` past their expiry or, rotating, their grace at `now`: a
 * condition PostgreSQL reads from api_keys_live_end_idx (migration 0020).
 */
export function liveEndPassedSql(k: string, now: string): string {
  return `${k}.status IN ('active', 'rotating') AND ${liveEndSql(k)} <= ${now}`
}
