-- The gateways' store check (gateway/store-check.ts) reads, every cache.store_check_s, the keys
-- changed since its last read (every status change, update, rotation, expiry and import sets
-- updated_at): an index keeps that one query cheap however many keys there are.
CREATE INDEX IF NOT EXISTS api_keys_updated_at_idx ON api_keys (updated_at);
