-- Nearest standard concepts to a text. The query is embedded once (QUERY role,
-- through the cache), then one prepared ORDER BY embedding <op> $1 LIMIT n runs
-- on the HNSW index. hnsw.ef_search is raised to at least the rows fetched and
-- iterative scans (relaxed order, re-sorted) keep filtered searches at k rows;
-- both settings are restored when the function returns.

CREATE OR REPLACE FUNCTION omop_emb.nearest(
    query text,
    k integer DEFAULT @DEFAULT_K@,
    domain_ids text[] DEFAULT NULL,
    vocabulary_ids text[] DEFAULT NULL,
    concept_class_ids text[] DEFAULT NULL,
    standard_only boolean DEFAULT true,
    include_invalid boolean DEFAULT false,
    model text DEFAULT NULL,
    mode text DEFAULT NULL,
    rerank boolean DEFAULT NULL)
RETURNS TABLE (rank integer, concept_id integer, concept_name text, domain_id text,
               vocabulary_id text, concept_class_id text, standard_concept text,
               similarity double precision, distance double precision,
               matched_text text, match_kind text, exact_match boolean,
               score double precision, confidence double precision)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = @DEFAULT_EF_SEARCH@
SET pg_trgm.similarity_threshold = @TRIGRAM_THRESHOLD@
AS $$
return @RT@.call(plpy, "nearest", query, k, domain_ids, vocabulary_ids, concept_class_ids,
                 standard_only, include_invalid, model, mode, rerank)
$$;
COMMENT ON FUNCTION omop_emb.nearest(text, integer, text[], text[], text[], boolean, boolean, text, text, boolean) IS
'The k (1..@MAX_K@) concepts nearest in meaning to a text, one row per concept, best first. A concept whose name, synonym or code equals the query (case and spaces folded) ranks first (exact_match). Filters: domain_ids, vocabulary_ids, concept_class_ids, standard_only (default true), include_invalid (default false), model. similarity: cosine similarity for cosine and ip models, 1/(1+distance) for l2. mode: ''semantic'' (vector ranking), ''lexical'' (full-text: texts sharing a stemmed word with the query, ranked by Dice overlap of stemmed words; embeds nothing, similarity and distance are NULL) or ''hybrid'' (the union of both rankings, filters applied inside both before fusion, ordered by similarity + 0.005 * Dice overlap: the words only decide between concepts the embedding finds nearly equally close); NULL: setting omop_emb.search_mode, default ''semantic''. Columns: similarity and distance are those of matched_text (the concept''s nearest text, also in hybrid; in lexical, its best lexical text); score is what rows are ordered by after exact matches: semantic = similarity, lexical = Dice overlap in [0,1], hybrid = similarity + 0.005 * the concept''s best Dice overlap over its texts (so at most similarity + 0.005). NULL query: no rows; a blank query: no rows and a WARNING that says so. A filter value no indexed concept has is an error (22023) naming the closest indexed values. mode ''fused'': exact matches, the HNSW neighbours, character-trigram matches (pg_trgm; for a query with a word no text of the model holds: a misspelling, a fragment), texts whose word initials spell an abbreviation-like query and texts holding it as a word (a token in at most @COMMON_WORD_ROWS@ texts), each filtered, scored by the model''s fitted ranking model (omop_emb.ranking()); the first k rows (at most 10) hold the concepts mode ''semantic'' returns there, reordered by score, unless a concept of the other sources scores >= -2 (then it displaces the lowest-scored of them), later rows follow the score; score = its log-odds, confidence = the calibrated probability (0..1) that the row is a right concept, never rising down the ranking (NULL in the other modes). rerank => true (NULL: setting omop_emb.rerank): the registered reranker reorders the top top_n rows in one request (exact matches stay first); score = the reranker''s score, confidence = it in [0, 1].';

CREATE OR REPLACE FUNCTION omop_emb.nearest(
    query vector,
    k integer DEFAULT @DEFAULT_K@,
    domain_ids text[] DEFAULT NULL,
    vocabulary_ids text[] DEFAULT NULL,
    concept_class_ids text[] DEFAULT NULL,
    standard_only boolean DEFAULT true,
    include_invalid boolean DEFAULT false,
    model text DEFAULT NULL,
    mode text DEFAULT NULL,
    rerank boolean DEFAULT NULL)
RETURNS TABLE (rank integer, concept_id integer, concept_name text, domain_id text,
               vocabulary_id text, concept_class_id text, standard_concept text,
               similarity double precision, distance double precision,
               matched_text text, match_kind text, exact_match boolean,
               score double precision, confidence double precision)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = @DEFAULT_EF_SEARCH@
SET pg_trgm.similarity_threshold = @TRIGRAM_THRESHOLD@
AS $$
return @RT@.call(plpy, "nearest_vector", query, k, domain_ids, vocabulary_ids,
                 concept_class_ids, standard_only, include_invalid, model, mode, rerank)
$$;
COMMENT ON FUNCTION omop_emb.nearest(vector, integer, text[], text[], text[], boolean, boolean, text, text, boolean) IS
'The k concepts nearest to a query vector (e.g. from omop_emb.embed(text, ''query'')); same filters and columns as nearest(text). mode: ''semantic'' or ''hybrid'' (no text: the vector ranking alone); ''lexical'' is an error.';

CREATE OR REPLACE FUNCTION omop_emb.nearest_batch(
    queries text[],
    k integer DEFAULT @DEFAULT_K@,
    domain_ids text[] DEFAULT NULL,
    vocabulary_ids text[] DEFAULT NULL,
    concept_class_ids text[] DEFAULT NULL,
    standard_only boolean DEFAULT true,
    include_invalid boolean DEFAULT false,
    model text DEFAULT NULL,
    mode text DEFAULT NULL,
    rerank boolean DEFAULT NULL)
RETURNS TABLE (query_index integer, query text, rank integer, concept_id integer,
               concept_name text, domain_id text, vocabulary_id text, concept_class_id text,
               standard_concept text, similarity double precision, distance double precision,
               matched_text text, match_kind text, exact_match boolean,
               score double precision, confidence double precision)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = @DEFAULT_EF_SEARCH@
SET pg_trgm.similarity_threshold = @TRIGRAM_THRESHOLD@
AS $$
return @RT@.call(plpy, "nearest_batch", queries, k, domain_ids, vocabulary_ids,
                 concept_class_ids, standard_only, include_invalid, model, mode, rerank)
$$;
COMMENT ON FUNCTION omop_emb.nearest_batch(text[], integer, text[], text[], text[], boolean, boolean, text, text, boolean) IS
'nearest() for many queries in one statement: all queries are embedded in as few HTTP requests as possible (one per batch_size distinct uncached texts). query_index is the 1-based position in queries. mode and the columns (score included) as for nearest(text). Rows are streamed; queries x k is at most 200,000 per call (split larger work into chunks). mode ''fused'': exact matches, the HNSW neighbours, character-trigram matches (pg_trgm; for a query with a word no text of the model holds: a misspelling, a fragment), texts whose word initials spell an abbreviation-like query and texts holding it as a word (a token in at most @COMMON_WORD_ROWS@ texts), each filtered, scored by the model''s fitted ranking model (omop_emb.ranking()); the first k rows (at most 10) hold the concepts mode ''semantic'' returns there, reordered by score, unless a concept of the other sources scores >= -2 (then it displaces the lowest-scored of them), later rows follow the score; score = its log-odds, confidence = the calibrated probability (0..1) that the row is a right concept, never rising down the ranking (NULL in the other modes). rerank => true (NULL: setting omop_emb.rerank): the registered reranker reorders the top top_n rows in one request (exact matches stay first); score = the reranker''s score, confidence = it in [0, 1].';

CREATE OR REPLACE FUNCTION omop_emb.explain_nearest(
    query text,
    k integer DEFAULT @DEFAULT_K@,
    domain_ids text[] DEFAULT NULL,
    vocabulary_ids text[] DEFAULT NULL,
    concept_class_ids text[] DEFAULT NULL,
    standard_only boolean DEFAULT true,
    include_invalid boolean DEFAULT false,
    model text DEFAULT NULL)
RETURNS SETOF text
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = @DEFAULT_EF_SEARCH@
SET pg_trgm.similarity_threshold = @TRIGRAM_THRESHOLD@
AS $$
return @RT@.call(plpy, "explain_nearest", query, k, domain_ids, vocabulary_ids,
                 concept_class_ids, standard_only, include_invalid, model)
$$;
COMMENT ON FUNCTION omop_emb.explain_nearest(text, integer, text[], text[], text[], boolean, boolean, text) IS
'EXPLAIN of the k-NN statement nearest() runs for this query (with its real query vector): shows whether the HNSW index is used.';
