-- Semantic search for BI tools, which only see tables and views.
--
-- An analyst (or a BI tool's "custom SQL"/data-entry feature) INSERTs a row
-- into omop_emb.search_request; the view omop_emb.search_result shows the k
-- nearest concepts of every request, one row per (request, concept), ready to
-- be joined to the CDM (e.g. condition_occurrence.condition_concept_id).
--
-- Cost: the view calls nearest() once per request row each time it is read.
-- The query embedding is computed once (then read from omop_emb.query_cache,
-- shared by all sessions), so a repeated read costs one index scan per request,
-- a few milliseconds, and no embedding request. A filter on request_id or
-- label is applied to search_request before nearest() runs, so a dashboard
-- filtered to one request searches once. For large request lists read often,
-- snapshot the view: CREATE MATERIALIZED VIEW ... AS SELECT * FROM
-- omop_emb.search_result; REFRESH MATERIALIZED VIEW on a schedule.
--
-- A request that fails (unknown model, embedding service down on a cache
-- miss, ...) does not break the view for everybody: it yields one row with
-- rank NULL and the error in column error.

-- nearest() for one request, errors turned into a row (so that one bad request
-- does not make the whole view fail).
CREATE OR REPLACE FUNCTION omop_emb.search_request_results(
    query text, k integer, domain_ids text[] DEFAULT NULL, vocabulary_ids text[] DEFAULT NULL,
    model text DEFAULT NULL)
RETURNS TABLE (rank integer, concept_id integer, concept_name text, domain_id text,
               vocabulary_id text, concept_class_id text, standard_concept text,
               similarity double precision, matched_text text, match_kind text,
               exact_match boolean, error text, confidence double precision)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    RETURN QUERY
        SELECT n.rank, n.concept_id, n.concept_name, n.domain_id, n.vocabulary_id,
               n.concept_class_id, n.standard_concept, n.similarity, n.matched_text,
               n.match_kind, n.exact_match, NULL::text, n.confidence
        FROM omop_emb.nearest(search_request_results.query, k => search_request_results.k,
                              domain_ids => search_request_results.domain_ids,
                              vocabulary_ids => search_request_results.vocabulary_ids,
                              model => search_request_results.model) n;
EXCEPTION WHEN OTHERS THEN
    RETURN QUERY SELECT NULL::integer, NULL::integer, NULL::text, NULL::text, NULL::text,
                        NULL::text, NULL::text, NULL::double precision, NULL::text, NULL::text,
                        NULL::boolean,
                        pg_catalog.regexp_replace(SQLERRM, '^(plpy\.Error|omop_emb): ', '') || ' (SQLSTATE ' || SQLSTATE || ')',
                        NULL::double precision;
END
$fn$;
COMMENT ON FUNCTION omop_emb.search_request_results(text, integer, text[], text[], text) IS
'nearest() for one row of omop_emb.search_request (standard, valid concepts): the k nearest concepts, or on failure one row with rank NULL and the error message in column error. Used by the view omop_emb.search_result.';

CREATE OR REPLACE VIEW omop_emb.search_result WITH (security_invoker = true) AS
SELECT r.request_id, r.label, r.query, r.created_by, r.created_at,
       s.rank, s.concept_id, s.concept_name, s.domain_id, s.vocabulary_id,
       s.concept_class_id, s.standard_concept, s.similarity, s.matched_text,
       s.match_kind, s.exact_match, s.error, s.confidence
FROM omop_emb.search_request r
CROSS JOIN LATERAL omop_emb.search_request_results(r.query, r.k, r.domain_ids,
                                                    r.vocabulary_ids, r.model) s;
COMMENT ON VIEW omop_emb.search_result IS
'omop_emb: the k nearest standard concepts of every row of omop_emb.search_request, one row per (request, concept), best first (rank). Computed when read: filter on request_id or label so that only those requests are searched. Query embeddings are cached, so re-reading costs one index scan per request and no embedding request. A failed request shows one row with rank NULL and the message in error.';
COMMENT ON COLUMN omop_emb.search_result.request_id IS 'The request (omop_emb.search_request.request_id)';
COMMENT ON COLUMN omop_emb.search_result.label IS 'The request''s label';
COMMENT ON COLUMN omop_emb.search_result.query IS 'The request''s query text';
COMMENT ON COLUMN omop_emb.search_result.created_by IS 'Role that made the request';
COMMENT ON COLUMN omop_emb.search_result.created_at IS 'When the request was made';
COMMENT ON COLUMN omop_emb.search_result.rank IS '1 = best match; NULL on the error row of a failed request';
COMMENT ON COLUMN omop_emb.search_result.concept_id IS 'The matched standard concept (join to the CDM, e.g. condition_occurrence.condition_concept_id)';
COMMENT ON COLUMN omop_emb.search_result.concept_name IS 'Name of the concept';
COMMENT ON COLUMN omop_emb.search_result.domain_id IS 'Domain of the concept';
COMMENT ON COLUMN omop_emb.search_result.vocabulary_id IS 'Vocabulary of the concept';
COMMENT ON COLUMN omop_emb.search_result.concept_class_id IS 'Concept class of the concept';
COMMENT ON COLUMN omop_emb.search_result.standard_concept IS 'S (standard) or C (classification)';
COMMENT ON COLUMN omop_emb.search_result.similarity IS 'Similarity of query and concept (cosine for cosine models; higher is closer)';
COMMENT ON COLUMN omop_emb.search_result.matched_text IS 'The concept text that matched (name, synonym or mapped source name)';
COMMENT ON COLUMN omop_emb.search_result.match_kind IS 'name, synonym or mapped';
COMMENT ON COLUMN omop_emb.search_result.exact_match IS 'The query equals the concept''s name, synonym or code (case and spaces folded)';
COMMENT ON COLUMN omop_emb.search_result.confidence IS 'Estimated probability (0..1) that the concept is a right match for the query (mode fused, the default; calibrated on labelled data, see the README): filter on it (e.g. confidence >= 0.5) rather than on similarity. NULL when the search mode in force is not fused';
COMMENT ON COLUMN omop_emb.search_result.error IS 'Why the request failed (then the other result columns are NULL); NULL on result rows';

-- Privileges (99_security.sql only revokes from PUBLIC; these grants stand).
GRANT SELECT, INSERT, DELETE ON omop_emb.search_request TO omop_emb_reader;
GRANT UPDATE (query, k, domain_ids, vocabulary_ids, model, label) ON omop_emb.search_request TO omop_emb_reader;
GRANT USAGE ON SEQUENCE omop_emb.search_request_request_id_seq TO omop_emb_reader;
GRANT SELECT ON omop_emb.search_result TO omop_emb_reader;
GRANT EXECUTE ON FUNCTION omop_emb.search_request_results(text, integer, text[], text[], text) TO omop_emb_reader;
