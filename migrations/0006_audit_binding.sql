-- Audit rows sealed from now on bind every stored field into their encryption's associated data
-- (core/audit.ts, format 2): the row id, key id and action as before, and also the actor, the
-- address and created_at, so that none of them can be changed without the row failing to open.
-- Rows written before (and by instances not yet upgraded, which leave the column at its default)
-- are format 1 and open as they always did.

ALTER TABLE api_key_audit_log ADD COLUMN format smallint NOT NULL DEFAULT 1 CHECK (format IN (1, 2));
