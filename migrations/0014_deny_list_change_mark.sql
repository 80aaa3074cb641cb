-- Every gateway re-reads the deny list every gateway.deny_list_refresh_s (5 s by default). Until
-- now each reload read every row: with 20,000 entries 26 to 156 ms of the gateway's CPU and some
-- 34 ms of PostgreSQL's per reload per gateway process, with nothing changed (found by a review).
-- deny_list_changes holds one value, `mark`, which every statement that writes deny_list replaces
-- with a new random one in its own transaction (a trigger, whoever writes: keygate of any version,
-- or an operator in psql). A reload reads the mark first and reads the rows only when the mark is
-- not the one its last full read began with (gateway/index.ts).
--
-- Why that misses no change, with several instances writing at once: the mark is a row, updated in
-- the writer's transaction, so a reader sees a new mark only once that transaction has committed,
-- together with the rows it wrote, never before. Two writers queue on the row's lock, so the
-- committed mark is always the last committed writer's. A reader takes the mark before the rows,
-- so the rows it reads are at least as new as the mark it keeps: a change committed between the
-- two is read now and makes the next reload read once more, which is harmless. A sequence or a
-- counter taken outside the transaction would not do: nextval() is seen by others before its
-- transaction commits, so a reader could keep the new value with rows that lack the change and
-- never read them again. The value is random rather than counted up, since it is compared only
-- for equality: a table made anew (a database re-created and migrated again) starts from no value
-- a gateway has seen, and a restored dump brings back the mark with the rows it went with.
--
-- The trigger runs before each statement, so the mark's lock is taken before any row's, and every
-- statement (a DELETE that finds nothing too) changes the mark. TRUNCATE is a change too. The
-- function keeps the search path of this migration, so a session with another search path finds
-- the table; a mark row deleted by hand is put back by the next write, and until then a reload
-- finds no mark and reads the rows each time, as it does on a schema before this migration.
-- A keygate of the release before this one, still running during a rolling upgrade, writes
-- deny_list as before (the trigger stamps its writes) and reads every row as before.
CREATE TABLE deny_list_changes (
  one   boolean PRIMARY KEY DEFAULT true CHECK (one),   -- the one row
  mark  uuid NOT NULL
);
INSERT INTO deny_list_changes (mark) VALUES (gen_random_uuid());

CREATE FUNCTION keygate_deny_list_mark_change() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
  INSERT INTO deny_list_changes (mark) VALUES (gen_random_uuid())
    ON CONFLICT (one) DO UPDATE SET mark = EXCLUDED.mark;
  RETURN NULL;
END
$$;

CREATE TRIGGER deny_list_mark_change BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON deny_list
  FOR EACH STATEMENT EXECUTE FUNCTION keygate_deny_list_mark_change();
-- Also under session_replication_role = replica: a session that turned ordinary triggers off
-- changes the mark too. A logical-replication subscriber's apply process fires row triggers only,
-- not this statement trigger: a subscriber that gateways read must replicate deny_list_changes
-- with deny_list (docs/gateway.md).
ALTER TABLE deny_list ENABLE ALWAYS TRIGGER deny_list_mark_change;
