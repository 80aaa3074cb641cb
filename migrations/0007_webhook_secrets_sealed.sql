-- Webhook signing secrets sealed at rest (core/webhooks.ts): AES-256-GCM under a key derived from
-- KEYGATE_ENCRYPTION_KEY, bound to the webhook's id, as `<key id>.<base64url>` text. A database
-- dump or backup no longer holds what signs deliveries. Rows written before this migration (or by
-- an instance not yet upgraded) keep the plaintext in `secret` / `previous_secret` until the
-- scheduler seals them; a secret is read from the plaintext column when it is set, else from the
-- sealed one.
ALTER TABLE webhooks
  ADD COLUMN sealed_secret text,
  ADD COLUMN sealed_previous_secret text,
  ALTER COLUMN secret DROP NOT NULL,
  ADD CONSTRAINT webhooks_secret_present CHECK (secret IS NOT NULL OR sealed_secret IS NOT NULL);
