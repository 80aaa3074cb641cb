-- The gateways' store check (gateway/store-check.ts) reads the keys changed since its last read.
-- Until now it went by updated_at, which the writer stamps from its own clock: a writer whose clock
-- was behind the store's, a transaction that committed long after it stamped the row, or a change
-- made by hand in SQL without touching updated_at could be missed by every gateway. change_xid is
-- stamped by the store itself: the id of the transaction that last changed the row, set by a
-- trigger whoever writes (keygate of any version, or an operator in psql). The check reads the
-- rows whose transaction its previous read could not see (pg_visible_in_snapshot), which no clock
-- and no commit delay can hide. Recording a key's use (last_used_at alone) is not a change, so the
-- usage writer does not make every gateway drop busy keys.
-- updated_at's index (0008) stays: a keygate of the release before this one, still running during
-- a rolling upgrade, reads by it.
ALTER TABLE api_keys ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX api_keys_change_xid_idx ON api_keys (change_xid);

CREATE FUNCTION keygate_api_keys_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  probe api_keys;
BEGIN
  IF TG_OP = 'UPDATE' THEN
    probe := NEW;
    probe.last_used_at := OLD.last_used_at;
    probe.change_xid := OLD.change_xid;
    IF probe IS NOT DISTINCT FROM OLD THEN
      NEW.change_xid := OLD.change_xid;
      RETURN NEW;
    END IF;
  END IF;
  NEW.change_xid := pg_current_xact_id();
  RETURN NEW;
END
$$;

CREATE TRIGGER api_keys_stamp_change BEFORE INSERT OR UPDATE ON api_keys
  FOR EACH ROW EXECUTE FUNCTION keygate_api_keys_stamp_change();
-- Also under session_replication_role = replica: a logical-replication subscriber's applied rows,
-- and a session that turned ordinary triggers off, are stamped with this cluster's ids too.
ALTER TABLE api_keys ENABLE ALWAYS TRIGGER api_keys_stamp_change;
