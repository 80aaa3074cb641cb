-- Whether n8n enforced a key's scopes when keygate made it: n8n 1.123.0 checks them on its public
-- API only when its licence has API key scopes (the signed-in GET /rest/settings says
-- enterprise.apiKeyScopes); without, the key may do whatever its user's role may. true or false as
-- that flag said at the create; null when keygate could not tell (the settings could not be read,
-- or held no such flag) and for keys recorded before this column.
ALTER TABLE n8n_api_keys ADD COLUMN scopes_enforced boolean;
