-- The reranking stage: a cross-encoder behind a rerank API reorders the top
-- candidates of nearest(..., rerank => true) (or SET omop_emb.rerank = on).

CREATE OR REPLACE FUNCTION omop_emb.register_reranker(
    name text,
    provider text,
    endpoint text,
    remote_model text DEFAULT NULL,
    api_key_ref text DEFAULT NULL,
    top_n integer DEFAULT @DEFAULT_TOP_N@,
    read_timeout_s double precision DEFAULT NULL,
    max_retries integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "register_reranker", name, provider, endpoint, remote_model, api_key_ref,
                 top_n, read_timeout_s, max_retries)
$$;
COMMENT ON FUNCTION omop_emb.register_reranker(text, text, text, text, text, integer, double precision, integer) IS
'Register a reranker (administrator): provider ''tei'' posts {query, texts} to <endpoint>/rerank (Hugging Face TEI, Infinity), ''cohere'' posts {model, query, documents, top_n} to <endpoint>/v1/rerank (vLLM, Jina, Cohere); remote_model (sent as model), api_key_ref (env:VAR or secret:NAME), top_n: how many candidates one request reorders (default 50), read_timeout_s (default 60), max_retries (default 3; 429/5xx/connection errors, Retry-After honoured). Returns its id.';

CREATE OR REPLACE FUNCTION omop_emb.drop_reranker(name text, if_exists boolean DEFAULT false) RETURNS boolean
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "drop_reranker", name, if_exists)
$$;
COMMENT ON FUNCTION omop_emb.drop_reranker(text, boolean) IS 'Drop a reranker and its cached scores';

CREATE OR REPLACE VIEW omop_emb.rerankers AS
SELECT reranker_id, name, provider, endpoint, remote_model, api_key_ref, top_n,
       connect_timeout_s, read_timeout_s, max_retries, created_at, updated_at
FROM omop_emb.reranker;
COMMENT ON VIEW omop_emb.rerankers IS 'omop_emb: registered rerankers (no secrets: api_key_ref only says where the key lives)';
