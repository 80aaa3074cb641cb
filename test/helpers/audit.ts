// Audit trails in tests: a subject's rows (a key's, a token's, a webhook's), newest first,
// compared whole.
import type { Test } from 'tap'
import type { Queryable } from '../../core/db.ts'

/**
 * Checks a whole audit trail, newest first: a row for each pattern, matching it (t.match), and
 * no row more. t.match alone takes a list that starts with the patterns, and the newest row
 * ([0]) is that row alone: a row written twice, or one more, passed (found by a review).
 */
export function trailIs<R extends { action: string }>(t: Test, trail: readonly R[], rows: ReadonlyArray<{ action: string } & Record<string, unknown>>, what = 'audit'): readonly R[] {
  t.match(trail, rows, what)
  t.same(trail.map((a) => a.action), rows.map((r) => r.action), `${what}: these rows, no more`)
  return trail
}

/** How many rows the audit log holds, every subject's. */
export async function auditRows(db: Queryable): Promise<number> {
  const rows = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM api_key_audit_log')
  return rows[0]?.n ?? -1
}
