-- An older Gitea answers a token's creation without its scopes (`scopes: null`), and one before
-- scoped tokens (1.19) lists none either: its tokens may do anything. The record then holds null,
-- unknown, where before it held the scopes asked for, which Gitea had normalised or ignored.
ALTER TABLE gitea_tokens ALTER COLUMN scopes DROP NOT NULL;
