-- Keys, their audit trail and the deny list. Timestamps are UTC; plaintext keys are never stored.

CREATE TABLE api_keys (
  id                  text PRIMARY KEY,                       -- public key id (12 base62 characters)
  key_hash            text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),  -- SHA-256 hex of the whole key
  name                text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  type                text NOT NULL CHECK (type IN ('system', 'user', 'service', 'integration', 'emergency')),
  status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'rotating', 'revoked', 'expired')),
  scopes              text[] NOT NULL DEFAULT '{}',
  owner               text,
  metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
  allowed_cidrs       text[] NOT NULL DEFAULT '{}',           -- empty: usable from any address
  rate_limit          integer CHECK (rate_limit > 0),         -- per-key override of its type's limit ...
  rate_limit_window_s integer CHECK (rate_limit_window_s > 0),-- ... over this window
  rotation_interval_s integer CHECK (rotation_interval_s > 0),-- scheduled rotation policy
  rotated_from        text REFERENCES api_keys (id),          -- the key this one replaced
  replaced_by         text REFERENCES api_keys (id),          -- the key that replaced this one
  grace_until         timestamptz,                            -- a rotating key is valid until then
  legacy              boolean NOT NULL DEFAULT false,         -- imported UUID v4 key of the replaced system
  created_at          timestamptz NOT NULL DEFAULT now(),
  updated_at          timestamptz NOT NULL DEFAULT now(),
  expires_at          timestamptz,
  last_used_at        timestamptz,
  revoked_at          timestamptz,
  revoked_reason      text,
  CHECK ((rate_limit IS NULL) = (rate_limit_window_s IS NULL)),
  CHECK (status <> 'rotating' OR grace_until IS NOT NULL)
);
CREATE INDEX api_keys_created ON api_keys (created_at, id);
CREATE INDEX api_keys_status_type ON api_keys (status, type);
CREATE INDEX api_keys_owner ON api_keys (owner) WHERE owner IS NOT NULL;
CREATE INDEX api_keys_expires ON api_keys (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX api_keys_grace ON api_keys (grace_until) WHERE grace_until IS NOT NULL;

CREATE TABLE api_key_audit_log (
  id          text PRIMARY KEY,                  -- random UUID, also bound into the ciphertext
  key_id      text,                              -- the key acted on, if any (kept after the key is gone)
  action      text NOT NULL,                     -- key.created, key.rotated, key.revoked, ...
  actor       text NOT NULL,                     -- admin key id, "token", "cli:<user>", "system"
  address     text,                              -- client address of the actor, when known
  enc_key_id  text NOT NULL,                     -- which encryption key sealed details
  nonce       bytea NOT NULL,                    -- 96-bit AES-GCM nonce, random per row
  details     bytea NOT NULL,                    -- AES-256-GCM ciphertext and tag of the JSON details
  created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_key_audit_log_key ON api_key_audit_log (key_id, created_at);
CREATE INDEX api_key_audit_log_created ON api_key_audit_log (created_at);

CREATE TABLE deny_list (
  id          text PRIMARY KEY,
  cidr        text NOT NULL UNIQUE,              -- normalised address or CIDR range
  reason      text,
  created_by  text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  expires_at  timestamptz
);
