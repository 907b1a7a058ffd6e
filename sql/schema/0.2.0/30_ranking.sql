-- omop_emb 0.2.0: the fused ranking and the reranking stage (run once).
--
-- model.ranking: a ranking model fitted by an administrator for this embedding
-- model (omop_emb.set_ranking(), written by omop-emb-pg fit-ranking); NULL = the
-- one shipped for the model (extension/omop_emb_indb/ranking_weights.py).
ALTER TABLE omop_emb.model ADD COLUMN ranking jsonb;
COMMENT ON COLUMN omop_emb.model.ranking IS 'Ranking model of mode ''fused'' fitted for this model (feature weights and confidence calibration; omop_emb.set_ranking()); NULL: the shipped default';

-- Rerankers: cross-encoders behind a rerank API, called by nearest(..., rerank => true).
CREATE TABLE omop_emb.reranker (
    reranker_id       serial PRIMARY KEY,
    name              text NOT NULL UNIQUE,
    provider          text NOT NULL CHECK (provider IN ('tei', 'cohere')),
    endpoint          text NOT NULL CHECK (endpoint ~ '^https?://'),
    remote_model      text,
    api_key_ref       text CHECK (api_key_ref ~ '^(env|secret):[A-Za-z_][A-Za-z0-9_]*$'),
    top_n             integer NOT NULL DEFAULT @DEFAULT_TOP_N@ CHECK (top_n BETWEEN 2 AND 1000),
    connect_timeout_s double precision NOT NULL DEFAULT 5 CHECK (connect_timeout_s > 0),
    read_timeout_s    double precision NOT NULL DEFAULT 60 CHECK (read_timeout_s > 0),
    max_retries       integer NOT NULL DEFAULT 3 CHECK (max_retries BETWEEN 0 AND 10),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE omop_emb.reranker IS 'omop_emb: registered rerankers (register_reranker(), drop_reranker()); provider tei = POST /rerank (TEI, Infinity), cohere = POST /v1/rerank (vLLM, Jina, Cohere)';

-- Reranker scores shared by all sessions, keyed by reranker and the hash of the
-- query and the candidate texts in order.
CREATE TABLE omop_emb.rerank_cache (
    reranker_id integer NOT NULL REFERENCES omop_emb.reranker ON DELETE CASCADE,
    key_hash    bytea NOT NULL,
    scores      double precision[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reranker_id, key_hash)
);
COMMENT ON TABLE omop_emb.rerank_cache IS 'omop_emb: reranker scores shared by all sessions (reranker, sha256 of the query and the candidate texts)';

DO $dump$
BEGIN
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.reranker', '');
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.reranker_reranker_id_seq', '');
EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$dump$;
