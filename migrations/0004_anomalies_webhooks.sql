-- Anomalies found by the detector (core/anomalies.ts) and webhooks with their delivery queue
-- (core/webhooks.ts). Timestamps are UTC; no plaintext key is stored in either.

CREATE TABLE api_key_anomalies (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- also the SSE event id (Last-Event-ID)
  key_id           text NOT NULL,                     -- the key whose traffic was unusual
  type             text NOT NULL CHECK (type IN ('request_rate', 'error_rate', 'distinct_addresses', 'unusual_hour')),
  window_start     timestamptz NOT NULL,              -- start of the dedupe window it was found in
  details          jsonb NOT NULL DEFAULT '{}'::jsonb,-- what was measured against which threshold
  detected_at      timestamptz NOT NULL DEFAULT now(),
  acknowledged_at  timestamptz,
  acknowledged_by  text,                              -- the admin actor who acknowledged it
  -- One row per key, type and window, however many instances see it: the insert that wins publishes.
  UNIQUE (key_id, type, window_start)
);
CREATE INDEX api_key_anomalies_detected ON api_key_anomalies (detected_at);
CREATE INDEX api_key_anomalies_open ON api_key_anomalies (id) WHERE acknowledged_at IS NULL;

CREATE TABLE webhooks (
  id                       text PRIMARY KEY,
  url                      text NOT NULL,
  events                   text[] NOT NULL,           -- event types it receives
  description              text,
  secret                   text NOT NULL,             -- whsec_<base64>: signs every delivery
  previous_secret          text,                      -- after a rotation, also signs until previous_secret_until
  previous_secret_until    timestamptz,
  enabled                  boolean NOT NULL DEFAULT true,
  created_by               text NOT NULL,
  created_at               timestamptz NOT NULL DEFAULT now(),
  updated_at               timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
  id               text PRIMARY KEY,                  -- msg_...: the webhook-id header, the same on every retry
  webhook_id       text NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
  event_type       text NOT NULL,
  payload          text NOT NULL,                     -- the exact JSON body that is signed and sent
  dedupe_key       text,                              -- one delivery per webhook for the same occurrence
  status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
  attempts         integer NOT NULL DEFAULT 0,
  next_attempt_at  timestamptz NOT NULL DEFAULT now(),-- while one is in flight: the end of its lease
  last_status      integer,                           -- HTTP status of the last attempt
  last_error       text,
  created_at       timestamptz NOT NULL DEFAULT now(),
  last_attempt_at  timestamptz,
  delivered_at     timestamptz,
  UNIQUE (webhook_id, dedupe_key)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, created_at);
