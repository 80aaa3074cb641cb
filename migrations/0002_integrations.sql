-- Downstream credentials keygate created for its users: Gitea personal access tokens and n8n API
-- keys. Only the last eight characters and the SHA-256 of each secret are kept, never the secret.
-- A row stays after its credential is deleted (deleted_at, deleted_by), as the record of who
-- made and removed it.

CREATE TABLE gitea_tokens (
  id                text PRIMARY KEY,                      -- keygate's id of the record (gt_ + 12 base62)
  base_url          text NOT NULL,                         -- the Gitea server (origin and path, no credentials)
  remote_id         bigint NOT NULL,                       -- Gitea's token id
  name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
  username          text NOT NULL,                         -- the Gitea user owning the token
  scopes            text[] NOT NULL DEFAULT '{}',          -- as Gitea stored them (normalised)
  token_last_eight  text NOT NULL CHECK (length(token_last_eight) = 8),
  token_hash        text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),  -- SHA-256 hex of the token
  created_at        timestamptz NOT NULL DEFAULT now(),
  created_by        text NOT NULL,                         -- keygate actor
  deleted_at        timestamptz,
  deleted_by        text,
  UNIQUE (base_url, username, remote_id)
);
CREATE INDEX gitea_tokens_live ON gitea_tokens (base_url, username) WHERE deleted_at IS NULL;

CREATE TABLE n8n_api_keys (
  id                text PRIMARY KEY,                      -- keygate's id of the record (nk_ + 12 base62)
  base_url          text NOT NULL,                         -- the n8n instance
  remote_id         text NOT NULL,                         -- n8n's API key id
  label             text NOT NULL CHECK (length(label) BETWEEN 1 AND 255),
  owner_email       text NOT NULL,                         -- the n8n user whose session created it
  scopes            text[] NOT NULL DEFAULT '{}',
  key_last_eight    text NOT NULL CHECK (length(key_last_eight) = 8),
  key_hash          text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),  -- SHA-256 hex of the key
  expires_at        timestamptz,
  created_at        timestamptz NOT NULL DEFAULT now(),
  created_by        text NOT NULL,
  deleted_at        timestamptz,
  deleted_by        text,
  UNIQUE (base_url, remote_id)
);
CREATE INDEX n8n_api_keys_live ON n8n_api_keys (base_url) WHERE deleted_at IS NULL;
