-- The index the scheduler (core/scheduler.ts, DUE_CANDIDATES) finds the active keys with a
-- rotation interval by, their scheduled deadline first: created_at + rotation_interval_s, in UTC
-- (a timestamptz plus an interval is no index expression, as its time zone may move a day; an
-- interval of seconds moves none, so this is the same instant). Before, found by a review, every
-- round read the whole key table to find the few keys due to end or be announced: with 100,000
-- keys and none due, 230 to 275 ms on the embedded store (which answers nothing else meanwhile)
-- and 150 to 205 ms on PostgreSQL with 300,000. Now it reads only candidates from indexes: this
-- one, 0020's api_keys_live_end_idx (keys past their expiry or grace), 0001's expires_at index
-- (expiries due for notice) and api_key_notices' (kind, deadline) (announced deadlines passed),
-- and judges them as before (bench/scheduler-idle.ts, bench/RESULTS.md). Still read each round:
-- the fewer of the active keys with an interval and the rotation notices passed (kept for the
-- audit retention), as an announced deadline passed is found from either. The release before
-- this one does not read it.
--
-- Built in the migrations' transaction, and key changes wait while it builds: with millions of
-- keys, build it first by hand with `CREATE INDEX CONCURRENTLY IF NOT EXISTS` and this same name
-- and definition (README, Storage).
CREATE INDEX IF NOT EXISTS api_keys_rotation_due_idx ON api_keys (((created_at AT TIME ZONE 'UTC') + rotation_interval_s * interval '1 second'))
  WHERE status = 'active' AND rotation_interval_s IS NOT NULL;
