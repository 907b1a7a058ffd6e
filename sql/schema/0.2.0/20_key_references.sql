-- omop_emb 0.2.0: what an API key reference may reach (issue 12).
--
-- An administrator registers models and chooses their endpoints. Before 0.2.0
-- api_key_ref => 'env:PGDATA' or 'secret:<anyone's key>' with an endpoint of
-- the administrator's choosing sent that value there as a Bearer token. Now:
-- * env:NAME is read only for variables named OMOP_EMB_* or listed here by a
--   superuser (omop_emb.allow_env_key);
-- * a stored secret is sent only to the endpoints a superuser bound it to
--   (omop_emb.bind_secret); a model whose endpoint moves loses its key until a
--   superuser binds the new endpoint.
-- Only superusers write these tables (the functions check it; nobody else has
-- privileges on them).

CREATE TABLE omop_emb_internal.env_key_allowed (
    variable   text PRIMARY KEY CHECK (variable ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    allowed_by name NOT NULL DEFAULT current_user,
    allowed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE omop_emb_internal.env_key_allowed IS 'omop_emb: server environment variables (besides OMOP_EMB_*) that api_key_ref => ''env:NAME'' may read; written by superusers with omop_emb.allow_env_key()';

CREATE TABLE omop_emb_internal.secret_endpoint (
    secret_name text NOT NULL,
    endpoint    text NOT NULL,
    bound_by    name NOT NULL DEFAULT current_user,
    bound_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (secret_name, endpoint)
);
COMMENT ON TABLE omop_emb_internal.secret_endpoint IS 'omop_emb: the endpoints each stored secret may be sent to; written by superusers with omop_emb.bind_secret()';

REVOKE ALL ON omop_emb_internal.env_key_allowed, omop_emb_internal.secret_endpoint FROM PUBLIC;

-- Models registered before 0.2.0 keep working: their key references are
-- allowed as they stand (a superuser should review both tables after the
-- upgrade: an administrator could have set them up).
INSERT INTO omop_emb_internal.env_key_allowed (variable)
SELECT DISTINCT pg_catalog.substr(m.api_key_ref, 5) FROM omop_emb.model m
WHERE m.api_key_ref LIKE 'env:%' AND m.api_key_ref NOT LIKE 'env:OMOP\_EMB\_%'
ON CONFLICT DO NOTHING;
INSERT INTO omop_emb_internal.secret_endpoint (secret_name, endpoint)
SELECT DISTINCT pg_catalog.substr(m.api_key_ref, 8), pg_catalog.rtrim(m.endpoint, '/')
FROM omop_emb.model m WHERE m.api_key_ref LIKE 'secret:%'
ON CONFLICT DO NOTHING;

DO $dump$
BEGIN
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb_internal.env_key_allowed', '');
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb_internal.secret_endpoint', '');
EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$dump$;
