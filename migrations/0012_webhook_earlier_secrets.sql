-- Webhook signing secrets rotated out before the previous one and still within the grace their
-- rotation promised (core/webhooks.ts): before, one previous-secret slot was all there was, and a
-- second rotation within the grace of the first moved it on, so the original secret stopped
-- signing at once, before the `previous_secret_until` the first answer gave (found by a review).
-- A list of {"sealed": "<key id>.<base64url>", "until": "<RFC 3339>"}, the most recently rotated
-- first, each sealed as sealed_previous_secret is. The release before this one ignores the column.
ALTER TABLE webhooks ADD COLUMN sealed_earlier_secrets jsonb NOT NULL DEFAULT '[]'::jsonb;
