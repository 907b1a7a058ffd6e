-- Case and whitespace folding for exact matching. Must agree with
-- omop_emb_indb.vectors.fold().
CREATE OR REPLACE FUNCTION omop_emb.fold_text(t text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT pg_catalog.lower(pg_catalog.regexp_replace(pg_catalog.btrim(t), '\s+', ' ', 'g')) $$;
COMMENT ON FUNCTION omop_emb.fold_text(text) IS 'Case and whitespace folding used to find exact matches (lower, trimmed, runs of white space collapsed)';
