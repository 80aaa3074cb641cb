-- The indexes GET /v1/anomalies reads a page by, newest first (id descending), for each filter it
-- takes: a key's anomalies, one type's, and the acknowledged ones (the open ones have
-- api_key_anomalies_open since 0004). Before, found by a review, a filtered page walked the table
-- by id from its newest row and dropped the rows of other keys, types or states, so its cost grew
-- with the rows above the page's: with 1,000,000 rows, a key whose anomalies were older than most
-- took 186 ms a page (0.15 ms with 10,000 rows), `acknowledged=true` while most were open
-- 101 ms (1.3 ms), a rare type 5.4 ms (1.1 ms); or read all of a key's rows to sort them. Now each
-- reads the page's rows and one more from its index (bench/RESULTS.md).
--
-- Each is built in the migrations' transaction, and a finding's insert waits while they build: on
-- a table of millions of rows, build them first by hand with `CREATE INDEX CONCURRENTLY IF NOT
-- EXISTS` and these same names and definitions (README, Storage).
CREATE INDEX IF NOT EXISTS api_key_anomalies_key_idx ON api_key_anomalies (key_id, id);
CREATE INDEX IF NOT EXISTS api_key_anomalies_type_idx ON api_key_anomalies (type, id);
CREATE INDEX IF NOT EXISTS api_key_anomalies_acknowledged_idx ON api_key_anomalies (id) WHERE acknowledged_at IS NOT NULL;
