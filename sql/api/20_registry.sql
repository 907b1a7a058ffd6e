-- The model registry (administrator only).

CREATE OR REPLACE FUNCTION omop_emb.register_model(
    name text,
    provider text,
    endpoint text,
    dimensions integer DEFAULT NULL,
    metric text DEFAULT NULL,
    document_prefix text DEFAULT NULL,
    query_prefix text DEFAULT NULL,
    remote_model text DEFAULT NULL,
    api_key_ref text DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    read_timeout_s double precision DEFAULT NULL,
    storage text DEFAULT NULL,
    adopt_table boolean DEFAULT NULL
) RETURNS integer
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "register_model", name, provider, endpoint, dimensions, metric,
                 document_prefix, query_prefix, remote_model, api_key_ref, batch_size,
                 read_timeout_s, storage, adopt_table)
$$;
COMMENT ON FUNCTION omop_emb.register_model(text, text, text, integer, text, text, text, text, text, integer, double precision, text, boolean) IS
'Register an embedding model: name, provider (''openai'' = any OpenAI-compatible /v1/embeddings, ''ollama'' = /api/embed), endpoint (base URL), dimensions (NULL: discovered with one probe call), metric (cosine, l2, ip; NULL: the default of column omop_emb.model.metric), document_prefix and query_prefix (NULL: the settings in force, else what the server advertises, else empty), remote_model (name sent to the server; default: name), api_key_ref (env:VAR or secret:NAME, never the key), batch_size and read_timeout_s (NULL: the column defaults of omop_emb.model), storage (''vector'': float32, the default up to 2,000 dimensions; ''halfvec'': float16, half the size, HNSW up to 4,000 dimensions, the default above 2,000). adopt_table: a table of embeddings left by an earlier installation under the id the model would get is never dropped (NULL: an error naming it; true: this model uses it when its shape matches; false: it is left alone and the next id is taken). Returns the model id.';

CREATE OR REPLACE FUNCTION omop_emb.alter_model(
    name text,
    endpoint text DEFAULT NULL,
    provider text DEFAULT NULL,
    remote_model text DEFAULT NULL,
    api_key_ref text DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    connect_timeout_s double precision DEFAULT NULL,
    read_timeout_s double precision DEFAULT NULL,
    max_retries integer DEFAULT NULL,
    max_input_chars integer DEFAULT NULL,
    document_prefix text DEFAULT NULL,
    query_prefix text DEFAULT NULL,
    new_name text DEFAULT NULL,
    storage text DEFAULT NULL
) RETURNS boolean
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "alter_model", name, endpoint, provider, remote_model, api_key_ref,
                 batch_size, connect_timeout_s, read_timeout_s, max_retries, max_input_chars,
                 document_prefix, query_prefix, new_name, storage)
$$;
COMMENT ON FUNCTION omop_emb.alter_model(text, text, text, text, text, integer, double precision, double precision, integer, integer, text, text, text, text) IS
'Change a registered model; only the arguments given change. api_key_ref => '''' removes the key reference. A change of what produces vectors (provider, remote_model; not the endpoint: another server of the same model needs no re-embedding) makes the stored embeddings stale: semantic and hybrid searches are refused (OE005) until CALL omop_emb.index_concepts(model => ...) re-embedded them all, and cached query vectors of the old model are not used. A changed document_prefix makes the next index_concepts() re-embed every text in place while searches go on (the same model: the same vector space). storage => ''halfvec'' or ''vector'' converts the stored embeddings in place (no re-embedding) and rebuilds the HNSW index.';

CREATE OR REPLACE FUNCTION omop_emb.drop_model(name text, if_exists boolean DEFAULT false) RETURNS boolean
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "drop_model", name, if_exists)
$$;
COMMENT ON FUNCTION omop_emb.drop_model(text, boolean) IS 'Drop a model with its embeddings, cached queries and queued work';

CREATE OR REPLACE FUNCTION omop_emb.set_secret(name text, value text) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
AS $$
    INSERT INTO omop_emb.secret (name, value) VALUES (set_secret.name, set_secret.value)
    ON CONFLICT ON CONSTRAINT secret_pkey DO UPDATE SET value = EXCLUDED.value, updated_at = now();
$$;
COMMENT ON FUNCTION omop_emb.set_secret(text, text) IS 'Store an API key under a name, for api_key_ref => ''secret:NAME''. Only the extension owner can read it back.';

CREATE OR REPLACE FUNCTION omop_emb.delete_secret(name text) RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER
AS $$
    WITH d AS (DELETE FROM omop_emb.secret s WHERE s.name = delete_secret.name RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM d);
$$;
COMMENT ON FUNCTION omop_emb.delete_secret(text) IS 'Delete a stored API key';

CREATE OR REPLACE VIEW omop_emb.models AS
SELECT model_id, name, provider, endpoint, remote_model, dimensions, storage, metric,
       document_prefix, query_prefix, api_key_ref, batch_size, max_input_chars,
       connect_timeout_s, read_timeout_s, max_retries, index_method, index_params,
       vocabulary_schema, vocabulary_version, created_at, updated_at, indexed_at,
       vectors_stale, identity_changed_at
FROM omop_emb.model;
COMMENT ON VIEW omop_emb.models IS 'omop_emb: registered embedding models (no secrets: api_key_ref only says where the key lives)';

-- Where API keys may go (superusers only; sql/schema/0.2.0/20_key_references.sql).
-- SECURITY INVOKER: the caller's own role must be a superuser.
CREATE OR REPLACE FUNCTION omop_emb.bind_secret(name text, endpoint text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'omop_emb: only a superuser binds a secret to an endpoint (% is not one)', current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Ask a superuser to run SELECT omop_emb.bind_secret(''' || bind_secret.name || ''', ''<endpoint>'');';
    END IF;
    IF bind_secret.endpoint IS NULL OR bind_secret.endpoint !~ '^https?://' THEN
        RAISE EXCEPTION 'omop_emb: endpoint % is not an http(s) URL', bind_secret.endpoint
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the endpoint of the models that use the secret, e.g. ''https://api.openai.com''.';
    END IF;
    INSERT INTO omop_emb_internal.secret_endpoint (secret_name, endpoint)
    VALUES (bind_secret.name, pg_catalog.rtrim(bind_secret.endpoint, '/'))
    ON CONFLICT DO NOTHING;
    RETURN true;
END
$$;
COMMENT ON FUNCTION omop_emb.bind_secret(text, text) IS
'Superuser only: allow the stored secret NAME to be sent to ENDPOINT (models with api_key_ref => ''secret:NAME'' and that endpoint). A model whose endpoint is not bound gets an error instead of the key. Unbind: DELETE FROM omop_emb_internal.secret_endpoint WHERE secret_name = ... AND endpoint = ...';

CREATE OR REPLACE FUNCTION omop_emb.allow_env_key(variable text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'omop_emb: only a superuser allows an environment variable as an API key (% is not one)', current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Name the variable OMOP_EMB_..., or ask a superuser to run SELECT omop_emb.allow_env_key(''' || allow_env_key.variable || ''');';
    END IF;
    INSERT INTO omop_emb_internal.env_key_allowed (variable) VALUES (allow_env_key.variable)
    ON CONFLICT DO NOTHING;
    RETURN true;
END
$$;
COMMENT ON FUNCTION omop_emb.allow_env_key(text) IS
'Superuser only: let api_key_ref => ''env:VARIABLE'' read this environment variable of the server (variables named OMOP_EMB_* are always allowed). Revoke: DELETE FROM omop_emb_internal.env_key_allowed WHERE variable = ...';
