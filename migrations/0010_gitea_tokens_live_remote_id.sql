-- Gitea may hand out a token id again: restored from an earlier backup, reinstalled at the same
-- URL, or on MySQL before 8, whose AUTO_INCREMENT restarts after the newest row was deleted. The
-- record of the earlier token (often closed long ago) then held UNIQUE (base_url, username,
-- remote_id), so recording the new token failed: the valid token was deleted again and the
-- create answered store_unavailable. Only a live record now holds its id; a create whose id a
-- live record still holds closes that record first, since Gitea has no other token of that id.
ALTER TABLE gitea_tokens DROP CONSTRAINT gitea_tokens_base_url_username_remote_id_key;
CREATE UNIQUE INDEX gitea_tokens_live_remote_id ON gitea_tokens (base_url, username, remote_id) WHERE deleted_at IS NULL;
