-- The indexes GET /v1/audit reads a page by, newest first (created_at, id descending), when it is
-- filtered by action or by actor (a key's rows have api_key_audit_log_key since 0001). Before,
-- found by a review, such a page walked the log by created_at from its newest row and dropped the
-- rows of other actions or actors, so its cost grew with the rows above the page's: with
-- 1,000,000 rows, the `deny_list.added` rows or an admin's, older than most, took 170 ms a page
-- (0.9 ms with 10,000 rows). Now each reads the page's rows and one more from its index
-- (bench/RESULTS.md).
--
-- Each is built in the migrations' transaction, and every audited change waits while they build:
-- on a log of millions of rows, build them first by hand with `CREATE INDEX CONCURRENTLY IF NOT
-- EXISTS` and these same names and definitions (README, Storage).
CREATE INDEX IF NOT EXISTS api_key_audit_log_action_idx ON api_key_audit_log (action, created_at, id);
CREATE INDEX IF NOT EXISTS api_key_audit_log_actor_idx ON api_key_audit_log (actor, created_at, id);
