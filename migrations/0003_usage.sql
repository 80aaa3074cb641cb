-- Gateway usage for the admin API's reports, written by each instance's UsageRecorder
-- (core/usage.ts), which counts in memory and adds its counts here every usage.flush_interval_s.
-- Buckets are hours (UTC); several instances add to the same rows.

CREATE TABLE api_key_usage (
  key_id    text NOT NULL,                     -- the key that authenticated the requests
  bucket    timestamptz NOT NULL,              -- start of the hour
  requests  bigint NOT NULL DEFAULT 0,         -- requests that authenticated with the key
  rejected  bigint NOT NULL DEFAULT 0,         -- of those, answered with an error (rate limit, scope, upstream)
  PRIMARY KEY (key_id, bucket)
);
CREATE INDEX api_key_usage_bucket ON api_key_usage (bucket);

CREATE TABLE api_key_rejections (
  bucket    timestamptz NOT NULL,              -- start of the hour
  reason    text NOT NULL,                     -- the error code the gateway answered with
  count     bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (bucket, reason)
);
