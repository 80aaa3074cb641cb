-- The store's encryption key check (core/audit.ts, checkStoreKey): one value sealed with the
-- encryption key (KEYGATE_ENCRYPTION_KEY, or the embedded store's generated one) the store's
-- instances use, as `<key id>.<base64url>` text, as webhook secrets are sealed. Every start
-- refuses a process whose keys do not include the key it names (`encryption_key_missing`).
-- Before (found by a review), a start only read the newest audit row: on a store with no rows
-- (a new one, one whose only start wrote none since KEYGATE_ADMIN_TOKEN was set, or one whose log
-- retention pruned every row) any key passed, and two instances with different keys each sealed
-- rows the other lists as key_missing.
-- The value cannot be made here (a migration has no key): the first start that can seal makes it
-- (INSERT … ON CONFLICT DO NOTHING, so of instances starting together one wins and the others are
-- checked against its key), from what the store holds on a store that already holds rows. A
-- start whose current key is not the one the value names, but which holds that one among its
-- previous keys (a rotation), seals it anew under its current key. The release before this one
-- ignores the table.
CREATE TABLE encryption_key_check (
  one       boolean PRIMARY KEY DEFAULT true CHECK (one),   -- the one row
  sealed    text NOT NULL,
  sealed_at timestamptz NOT NULL DEFAULT now()
);
