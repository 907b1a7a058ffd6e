-- Lexical (full-text) side of hybrid search: the words of a text, the OR query
-- that finds texts sharing one of them, and the overlap score that ranks them.
-- English text search configuration: stemmed words, stop words dropped.

CREATE OR REPLACE FUNCTION omop_emb.lexemes(t text) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT pg_catalog.tsvector_to_array(pg_catalog.to_tsvector('@TS_CONFIG@'::pg_catalog.regconfig, t)) $$;
COMMENT ON FUNCTION omop_emb.lexemes(text) IS
'The distinct stemmed words of a text (English full-text configuration, stop words dropped), as used by lexical search';

CREATE OR REPLACE FUNCTION omop_emb.lexical_query(t text) RETURNS tsquery
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
SELECT pg_catalog.string_agg(pg_catalog.quote_literal(l), ' | ')::pg_catalog.tsquery
FROM pg_catalog.unnest(omop_emb.lexemes(t)) AS l
$$;
COMMENT ON FUNCTION omop_emb.lexical_query(text) IS
'Full-text query matching any text that shares at least one stemmed word with t (OR of its words); NULL when t has no words';

CREATE OR REPLACE FUNCTION omop_emb.lexical_score(query_words text[], text_words text[]) RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
SELECT CASE WHEN pg_catalog.cardinality(query_words) OPERATOR(pg_catalog.+) pg_catalog.cardinality(text_words)
                 OPERATOR(pg_catalog.=) 0 THEN 0::pg_catalog.float8
       ELSE (2 OPERATOR(pg_catalog.*) (SELECT pg_catalog.count(*) FROM pg_catalog.unnest(query_words) w
                                       WHERE w OPERATOR(pg_catalog.=) ANY (text_words)))::pg_catalog.float8
            OPERATOR(pg_catalog./) (pg_catalog.cardinality(query_words) OPERATOR(pg_catalog.+)
                                    pg_catalog.cardinality(text_words))::pg_catalog.float8 END
$$;
COMMENT ON FUNCTION omop_emb.lexical_score(text[], text[]) IS
'Lexical score of nearest(mode => ''lexical'') and the lexical part of the hybrid score (similarity + 0.005 * this): Dice overlap of two sets of stemmed words, 2*|shared|/(|a|+|b|), in [0, 1] (1: the same words in any order)';
