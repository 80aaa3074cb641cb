-- The rotation scheduler (core/scheduler.ts): each key.expiring notice it sent, so a notice goes
-- out once however many instances run, and a scheduled rotation is enforced at the deadline that
-- was announced (never before anyone was told).

CREATE TABLE api_key_notices (
  key_id       text NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
  kind         text NOT NULL CHECK (kind IN ('rotation', 'expiry')),  -- rotation due, or expires_at near
  deadline     timestamptz NOT NULL,             -- when the key stops working, as announced
  notified_at  timestamptz NOT NULL,
  PRIMARY KEY (key_id, kind)
);
CREATE INDEX api_key_notices_deadline ON api_key_notices (kind, deadline);
