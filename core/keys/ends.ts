// What ends a key that still works, written once: the scheduler ends keys by it
// (core/scheduler.ts) and the key service reports them by it (the expiring report and
// stats.expiring_soon). Written twice before, the two disagreed once (found by a review: a key
// whose rotation deadline and later expiry both passed by one round was ended "for the expiry"
// where the report had said "rotation overdue").

/**
 * Lineages are followed this many keys at most (forward from a rotating key, the keys in grace or
 * ended between it and the active key: a few; back from an active key, its history, of which the
 * keys still in grace are the last few). A bound, so that replaced_by edited by hand into a cycle
 * cannot hold a statement to its timeout.
 */
export const LINEAGE_DEPTH = 32

/**
 * A derived table: each rotating key (`id`; of the array `only` alone, when given) that leads,
 * through replaced_by and keys rotating or ended (expired), to an active key with an announced
 * rotation deadline, with that `deadline`. Through ended keys too: a key between them whose own
 * grace ended first (a type's grace shortened between two rotations) does not cut the older keys
 * off the deadline (before, found by a review, they worked on to the end of their grace; a key
 * ended for the lineage's missed rotation leads to no active key, nor does a revoked one, whose
 * revocation took the keys it replaced, still in their grace, with it). A
 * successor expired for a missed rotation takes the keys it replaced, still in their grace, with
 * it: before (found by a review), with a rotation interval and a notice period both shorter than
 * the type's grace, the replaced key went on working to the end of its grace, the lineage's older
 * secret outliving the newer one its owner failed to rotate. Walked forward from the rotating
 * keys, by primary key, once per statement: the rotating keys are those rotated within their
 * type's grace (the scheduler ends the rest), fewer than the keys announced, which a walk back
 * from them read each (a subquery per rotating key, written first, made the expiring report and
 * stats seven times slower with 10,000 keys rotating on PostgreSQL); the key each walk ends on is
 * read by its primary key, in a subquery of its own (joined, even LATERAL, the embedded store,
 * which keeps no statistics, took both sides for a few rows and read one in full for each row of
 * the other: 8 s with 10,000 keys rotating).
 * Grouped, so that replaced_by edited by hand into a cycle gives a key one row still.
 */
function replacedByAnnounced(only: string | undefined): string {
  return `(WITH RECURSIVE forward (id, successor, depth) AS (
      ${
        only === undefined
          ? `SELECT r.id, r.replaced_by, 1 FROM api_keys r WHERE r.status = 'rotating' AND r.replaced_by IS NOT NULL`
          : `SELECT o.id, o.successor, 1 FROM (SELECT o.id, (SELECT r.replaced_by FROM api_keys r WHERE r.id = o.id AND r.status = 'rotating') AS successor
             FROM unnest(${only}) AS o (id)) o WHERE o.successor IS NOT NULL`
      }
      UNION ALL
      SELECT f.id, s.replaced_by, f.depth + 1 FROM forward f JOIN api_keys s ON s.id = f.successor
      WHERE s.status IN ('rotating', 'expired') AND s.replaced_by IS NOT NULL AND f.depth < ${LINEAGE_DEPTH})
    SELECT id, min(deadline) AS deadline FROM (
      SELECT f.id, (SELECT hn.deadline FROM api_keys h JOIN api_key_notices hn ON hn.key_id = h.id AND hn.kind = 'rotation'
                    WHERE h.id = f.successor AND h.status = 'active' AND h.rotation_interval_s IS NOT NULL) AS deadline
      FROM forward f) ended
    WHERE deadline IS NOT NULL GROUP BY id)`
}

/** What ends a key that still works, in the words of its key.expired audit row. */
export type KeyEndReason = 'grace_ended' | 'expires_at' | 'rotation_overdue'

/**
 * A FROM clause: every key as `k`, its rotation notice as `n` (NULLs when none), and `e` with
 * - `e.ends_at`: when the key stops working; NULL when nothing ends it or it has ended
 *   (revoked, expired). The earliest of its expiry, a rotating key's grace, and an active key's
 *   announced rotation deadline (only an announced one is enforced; an interval changed or
 *   removed drops the announcement, and a key without an interval ignores a stale one), which
 *   also ends the rotating keys it replaced (replacedByAnnounced);
 * - `e.end_reason`: which of them it is (a KeyEndReason). A tie goes to the grace, then to the
 *   expiry.
 * `only`, an SQL array of key ids, for a statement that reads no other keys: the rotating keys'
 * lineages are then walked from those alone, each read by its primary key in a subquery of its
 * own (a key outside it reads no rotation end by its lineage): joined, PostgreSQL read every key
 * ever replaced from the replaced_by index to find the few of the array.
 */
export function keyEndsFrom(only?: string): string {
  return `api_keys k
    LEFT JOIN api_key_notices n ON n.key_id = k.id AND n.kind = 'rotation'
    LEFT JOIN ${replacedByAnnounced(only)} l ON l.id = k.id
    CROSS JOIN LATERAL (SELECT
        CASE WHEN k.status = 'rotating' THEN k.grace_until END AS grace_end,
        CASE WHEN k.status = 'active' AND k.rotation_interval_s IS NOT NULL THEN n.deadline
             WHEN k.status = 'rotating' THEN l.deadline END AS rotation_end) d
    CROSS JOIN LATERAL (SELECT
        CASE WHEN k.status IN ('active', 'rotating') THEN LEAST(d.grace_end, k.expires_at, d.rotation_end) END AS ends_at) x
    CROSS JOIN LATERAL (SELECT x.ends_at,
        CASE WHEN x.ends_at IS NULL THEN NULL
             WHEN x.ends_at = d.grace_end THEN 'grace_ended'
             WHEN x.ends_at = k.expires_at THEN 'expires_at'
             ELSE 'rotation_overdue' END AS end_reason) e`
}

/** keyEndsFrom() of every key. */
export const KEY_ENDS_FROM = keyEndsFrom()

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
