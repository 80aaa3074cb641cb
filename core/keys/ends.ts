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
 * The status key `k` (a table or alias) has at `now` (a statement parameter such as `$1`):
 * core/keys/evaluate.ts statusAt in SQL, for filtering and counting by it. Its row's status
 * until the scheduler ends it: past its expiry (or, rotating, its grace: never NULL then, by
 * the table's check) it is expired at once.
 */
export function statusAtSql(k: string, now: string): string {
  return `CASE WHEN ${k}.status IN ('active', 'rotating') AND (${k}.expires_at <= ${now} OR (${k}.status = 'rotating' AND ${k}.grace_until <= ${now})) THEN 'expired' ELSE ${k}.status END`
}
