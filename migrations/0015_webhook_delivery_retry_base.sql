-- A failed delivery sent again (POST /v1/webhooks/{id}/deliveries/.../retry) gets max_attempts
-- more attempts: they are counted from retry_base, the attempts it had when it was sent again.
-- `attempts` itself only ever grows: an attempt's outcome is written only while the delivery's
-- attempts are still those of its claim, so that one that outlived its lease does not undo what
-- the process that took the delivery over did (core/webhooks.ts, #attempt). Set back to 0, a count
-- could come round to a stale attempt's again, and its late outcome would be taken for the
-- current one's (found by a review). A constant default: no table rewrite (PostgreSQL 11+).
-- A keygate of the release before this one, still running during a rolling upgrade, counts from
-- 0: a delivery sent again that it attempts and fails is marked failed after that one attempt.
ALTER TABLE webhook_deliveries ADD COLUMN retry_base integer NOT NULL DEFAULT 0;
