-- A key's rotation notice (api_key_notices, kind 'rotation') goes when the key stops being active:
-- rotated (rotating, or revoked by a forced rotation), revoked, or ended by the scheduler. It is
-- read only for an active key with a rotation interval (core/keys/ends.ts KEY_ENDS_FROM: the
-- deadline the scheduler enforces, the expiring report, stats), and only an active key is
-- announced, so once the key is not active it is never read again: no status leads back to
-- active. Kept, found by a review, it stayed for the audit retention (a year by default), and the
-- scheduler's selection of the keys due (core/scheduler.ts DUE_CANDIDATES) read every such notice
-- with its deadline passed, or every active key with an interval if fewer, each round: on a store
-- where every key rotates, 50,000 of either among 100,000 keys, 45 to 78 ms a round, and 213 to
-- 375 ms on the embedded store, which keeps no statistics (bench/scheduler-idle.ts). Now the
-- notices whose deadline passed are those of the keys due to end this round. The announcement
-- itself stays where users see it: the key.expiring audit row and event.
--
-- A trigger, so every writer drops it: keygate of any version (the release before this one, still
-- running during a rolling upgrade, ends keys without a word of it), or an operator in psql.
CREATE FUNCTION keygate_api_keys_drop_rotation_notice() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
  DELETE FROM api_key_notices WHERE key_id = NEW.id AND kind = 'rotation';
  RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_drop_rotation_notice AFTER UPDATE OF status ON api_keys
  FOR EACH ROW WHEN (OLD.status = 'active' AND NEW.status <> 'active')
  EXECUTE FUNCTION keygate_api_keys_drop_rotation_notice();

-- The notices of keys that stopped being active before this migration.
DELETE FROM api_key_notices n USING api_keys k
  WHERE n.kind = 'rotation' AND k.id = n.key_id AND k.status <> 'active';
