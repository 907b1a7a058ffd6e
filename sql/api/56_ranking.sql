-- The fused ranking (mode => 'fused'): the initials of a text (an index of each
-- embedding table serves abbreviation queries), the candidates with their
-- features (what an administrator fits a ranking model on) and the per-model
-- ranking model.

-- The same words and stop words as omop_emb_indb.ranking.initials() (build.py
-- writes them in from ranking.py). In PL/Python, not SQL: each embedding table
-- has an index on it, built over every text at the end of a first indexing or a
-- bundle import, and the SQL form (regexp_matches, string_agg) cost 15.5 us a
-- text against 4.5 here, the index build over 100,000 texts 1.90 s against 0.64.
-- Pure string work, no SQL run: IMMUTABLE and PARALLEL SAFE hold (SD is this
-- function's own per-session dictionary).
CREATE OR REPLACE FUNCTION omop_emb.initials(t text) RETURNS text
LANGUAGE plpython3u IMMUTABLE STRICT PARALLEL SAFE
AS $$
f = SD.get("initials")
if f is None:
    import re
    words, stop = re.compile(@INITIALS_WORD_PATTERN@).findall, frozenset(@INITIALS_STOP_WORDS@)

    def f(t):
        return "".join(w[0] for w in words(t.lower()) if w not in stop)
    SD["initials"] = f
return f(t)
$$;
COMMENT ON FUNCTION omop_emb.initials(text) IS
'The first letters (or digits) of the words of a text, lower case, small words (of, the, and, with, due, NOS, ...) left out: ''Type 2 diabetes mellitus'' -> ''t2dm''. The fused ranking finds concepts whose text has an abbreviation-like query as its initials.';

CREATE OR REPLACE FUNCTION omop_emb.ranking_candidates(
    queries text[],
    k integer DEFAULT @DEFAULT_K@,
    domain_ids text[] DEFAULT NULL,
    vocabulary_ids text[] DEFAULT NULL,
    concept_class_ids text[] DEFAULT NULL,
    standard_only boolean DEFAULT true,
    include_invalid boolean DEFAULT false,
    model text DEFAULT NULL)
RETURNS TABLE (query_index integer, concept_id integer, matched_text text, match_kind text,
               exact_match boolean, features double precision[], feature_names text[])
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = 200
SET pg_trgm.similarity_threshold = @TRIGRAM_THRESHOLD@
AS $$
return @RT@.call(plpy, "ranking_candidates", queries, k, domain_ids, vocabulary_ids,
                 concept_class_ids, standard_only, include_invalid, model)
$$;
COMMENT ON FUNCTION omop_emb.ranking_candidates(text[], integer, text[], text[], text[], boolean, boolean, text) IS
'Every candidate text the fused ranking scores for each query (exact matches, the HNSW neighbours, trigram, initials and abbreviation candidates), with its feature vector (names in feature_names). What omop-emb-pg fit-ranking fits a ranking model on; the queries are embedded like nearest_batch() does.';

CREATE OR REPLACE FUNCTION omop_emb.set_ranking(model text, ranking jsonb) RETURNS boolean
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "set_ranking", model, ranking)
$$;
COMMENT ON FUNCTION omop_emb.set_ranking(text, jsonb) IS
'Store the ranking model of mode ''fused'' for an embedding model (administrator): {"features": [...], "coef": [...], "intercept": x, "calibration": {"score": a, "margin": b, "intercept": c}}, as written by omop-emb-pg fit-ranking, with "companion": "<model>" when it uses the companion features (another registered model indexing the same vocabulary, whose similarity to the query they are). {"companion": "<model>"} alone stores the ranking shipped for the pair (the embedded e5 and MiniLM). NULL goes back to the shipped default. Checked before it is stored.';

CREATE OR REPLACE FUNCTION omop_emb.ranking(model text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "ranking_of", model)
$$;
COMMENT ON FUNCTION omop_emb.ranking(text) IS
'The ranking model mode ''fused'' uses for an embedding model: its own (set_ranking()) or the shipped default, with "source" saying which.';
