-- The indexes GET /v1/keys reads a page by, newest first (created_at, id descending), when it is
-- filtered by type, by owner or by a status a key has as stored (revoked, active, rotating: the
-- list adds `status = ` that status to the status it judges at the time). Before, found by a
-- review, such a page walked the keys by created_at from the newest and dropped the others, so
-- its cost grew with the keys above the page's: with 1,000,000 keys, one type's, owner's or the
-- revoked ones, older than most, took 190 to 225 ms a page (0.2 ms with 10,000). Now each reads
-- the page's keys and one more from its index (bench/RESULTS.md). `?status=expired` (keys past
-- their end that no sweep marked yet count), `?scope` and `?name` still walk the keys.
--
-- Each is built in the migrations' transaction, and key changes wait while they build: with
-- millions of keys, build them first by hand with `CREATE INDEX CONCURRENTLY IF NOT EXISTS` and
-- these same names and definitions (README, Storage).
CREATE INDEX IF NOT EXISTS api_keys_type_created_idx ON api_keys (type, created_at, id);
CREATE INDEX IF NOT EXISTS api_keys_status_created_idx ON api_keys (status, created_at, id);
CREATE INDEX IF NOT EXISTS api_keys_owner_created_idx ON api_keys (owner, created_at, id) WHERE owner IS NOT NULL;
