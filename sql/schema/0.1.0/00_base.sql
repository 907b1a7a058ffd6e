-- omop_emb 0.1.0: the tables (run once, at install of 0.1.0 or later; never
-- re-run by an upgrade). Tables are owned by the extension owner; analysts
-- reach them only through the SECURITY DEFINER functions and the views.

CREATE TABLE omop_emb.model (
    model_id          serial PRIMARY KEY,
    name              text NOT NULL UNIQUE,
    provider          text NOT NULL CHECK (provider IN ('openai', 'ollama')),
    endpoint          text NOT NULL CHECK (endpoint ~ '^https?://'),
    remote_model      text NOT NULL,
    dimensions        integer NOT NULL CHECK (dimensions BETWEEN 1 AND 4000),
    storage           text NOT NULL CHECK (storage IN ('vector', 'halfvec')),
    metric            text NOT NULL DEFAULT 'cosine' CHECK (metric IN ('cosine', 'l2', 'ip')),
    document_prefix   text NOT NULL DEFAULT '',
    query_prefix      text NOT NULL DEFAULT '',
    api_key_ref       text CHECK (api_key_ref ~ '^(env|secret):[A-Za-z_][A-Za-z0-9_]*$'),
    batch_size        integer NOT NULL DEFAULT 64 CHECK (batch_size BETWEEN 1 AND 4096),
    max_input_chars   integer NOT NULL DEFAULT 8192 CHECK (max_input_chars > 0),
    connect_timeout_s double precision NOT NULL DEFAULT 5 CHECK (connect_timeout_s > 0),
    read_timeout_s    double precision NOT NULL DEFAULT 60 CHECK (read_timeout_s > 0),
    max_retries       integer NOT NULL DEFAULT 3 CHECK (max_retries BETWEEN 0 AND 10),
    index_method      text NOT NULL DEFAULT 'none' CHECK (index_method IN ('hnsw', 'none')),
    index_params      jsonb NOT NULL DEFAULT '{}',
    vocabulary_schema text,
    vocabulary_version text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    indexed_at        timestamptz
);
COMMENT ON TABLE omop_emb.model IS 'omop_emb: the model registry. Change it with register_model(), alter_model() and drop_model().';
COMMENT ON COLUMN omop_emb.model.document_prefix IS 'Document prefix recorded for the model: given at registration, then the one in force at the last index_concepts()';
COMMENT ON COLUMN omop_emb.model.query_prefix IS 'Query prefix recorded for the model: given at registration, then the one in force at the last index_concepts()';
COMMENT ON COLUMN omop_emb.model.api_key_ref IS 'Where the API key lives: env:VARIABLE (server process environment) or secret:NAME (omop_emb.secret). Never the key itself.';

-- API keys. Only the extension owner can read this table; set_secret() writes it.
CREATE TABLE omop_emb.secret (
    name       text PRIMARY KEY CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE omop_emb.secret IS 'omop_emb: API keys, readable by the extension owner only. Written with omop_emb.set_secret().';

-- Query embeddings shared by all sessions, keyed by model, role and the hash of
-- the exact text sent (prefix included). A logged table, so that hot standbys
-- can read it.
CREATE TABLE omop_emb.query_cache (
    model_id   integer NOT NULL REFERENCES omop_emb.model ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('document', 'query')),
    text_hash  bytea NOT NULL,
    text       text NOT NULL,
    embedding  vector NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, role, text_hash)
);
COMMENT ON TABLE omop_emb.query_cache IS 'omop_emb: query-embedding cache shared by all sessions (model, role, sha256 of prefix || text)';

-- Cache hit/miss counts, appended (never updated) so that sessions do not queue
-- on one row.
CREATE TABLE omop_emb.cache_stats (
    model_id    integer NOT NULL REFERENCES omop_emb.model ON DELETE CASCADE,
    hits        bigint NOT NULL,
    misses      bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON omop_emb.cache_stats (model_id);
COMMENT ON TABLE omop_emb.cache_stats IS 'omop_emb: query-cache hit and miss counts, appended by sessions on each miss';

-- Concept texts waiting to be embedded. index_concepts() fills it and drains it
-- batch by batch; a failed batch rolls back into it.
CREATE TABLE omop_emb.index_queue (
    model_id          integer NOT NULL REFERENCES omop_emb.model ON DELETE CASCADE,
    concept_id        integer NOT NULL,
    text_kind         text NOT NULL,
    text              text NOT NULL,
    text_hash         bytea NOT NULL,
    source_concept_id integer NOT NULL,
    source_code       text,
    concept_name      text NOT NULL,
    domain_id         text,
    vocabulary_id     text,
    concept_class_id  text,
    standard_concept  text,
    invalid_reason    text,
    PRIMARY KEY (model_id, concept_id, text_kind, text)
);
COMMENT ON TABLE omop_emb.index_queue IS 'omop_emb: concept texts waiting to be embedded by index_concepts()';

CREATE TABLE omop_emb.index_progress (
    model_id   integer NOT NULL REFERENCES omop_emb.model ON DELETE CASCADE,
    pid        integer NOT NULL,
    done       bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,
    PRIMARY KEY (model_id, pid)
);
COMMENT ON TABLE omop_emb.index_progress IS 'omop_emb: texts embedded by each session running index_concepts()';

-- pg_dump keeps the registry, keys and cache of an extension install. (The
-- script install path has no extension to mark: nothing to do there.)
DO $dump$
BEGIN
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.model', '');
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.model_model_id_seq', '');
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.secret', '');
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.query_cache', '');
EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$dump$;
