-- A key's lineage (the keys it replaced, each through replaced_by) is read on every update,
-- rotation and revocation, one recursive step per link: without an index each step read the whole
-- api_keys table, so with 500,000 keys a revocation at the head of a chain of six took 0.65 s and
-- grew with every key and link, past store.query_timeout_ms with a few million (found by a
-- review). Only rotated keys have a replacement: the index holds those alone.
CREATE INDEX IF NOT EXISTS api_keys_replaced_by_idx ON api_keys (replaced_by) WHERE replaced_by IS NOT NULL;
