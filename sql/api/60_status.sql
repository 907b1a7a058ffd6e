-- Status: what is registered, indexed, pending and cached.

CREATE OR REPLACE FUNCTION omop_emb.status()
RETURNS TABLE (model text, provider text, endpoint text, dimensions integer, metric text,
               document_prefix_recorded text, query_prefix_recorded text,
               document_prefix_in_force text, query_prefix_in_force text,
               texts bigint, concepts bigint, pending bigint, index_method text,
               index_params jsonb, index_size text, cache_entries bigint,
               cache_hits bigint, cache_misses bigint, cache_hit_rate double precision,
               vocabulary_version text, indexed_at timestamptz, domains text[],
               vocabulary_version_now text, stale_texts bigint, advice text)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "status")
$$;
COMMENT ON FUNCTION omop_emb.status() IS
'One row per model: recorded prefixes and those in force in this session, embedded texts and concepts, pending texts, vector index and its size, query-cache entries and hit rate, the domains of the embedded concepts (what a search can find); vocabulary drift: vocabulary_version (recorded at indexing) against vocabulary_version_now (the vocabulary table''s), stale_texts (embedded names renamed, removed or invalidated since), and advice (what to run; NULL when nothing drifted).';

CREATE OR REPLACE FUNCTION omop_emb.clear_cache(model text DEFAULT NULL) RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER
AS $$
    WITH d AS (DELETE FROM omop_emb.query_cache c
               WHERE clear_cache.model IS NULL
                  OR c.model_id = (SELECT m.model_id FROM omop_emb.model m WHERE m.name = clear_cache.model)
               RETURNING 1)
    SELECT count(*) FROM d;
$$;
COMMENT ON FUNCTION omop_emb.clear_cache(text) IS 'Empty the shared query-embedding cache (of one model, or all); returns the entries removed';
