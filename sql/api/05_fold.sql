-- Case and white-space folding for exact matching: the one fold, used on both
-- sides (the index on the stored texts and the query, which the runtime passes
-- unfolded). Every Unicode space (no-break, em, ideographic...), tab, line
-- break and control character counts as a space; runs collapse to one, the
-- ends are trimmed; dotted capital I folds like I, final sigma like sigma.
-- A change here must REINDEX the per-model fold indexes (see
-- sql/schema/0.2.0/after-api/10_refold.sql).
CREATE OR REPLACE FUNCTION omop_emb.fold_text(t text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
SELECT pg_catalog.translate(
         pg_catalog.lower(
           pg_catalog.btrim(
             pg_catalog.regexp_replace(
               pg_catalog.translate(t, U&'\0130', 'I'),
               U&'[\\s\\u0001-\\u001f\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]+',
               ' ', 'g'),
             ' ')),
         U&'\03C2', U&'\03C3')
$$;
COMMENT ON FUNCTION omop_emb.fold_text(text) IS 'Case and white-space folding used to find exact matches: every Unicode space, tab, line break and control character is a space, runs collapse to one, ends trimmed, lower case (dotted I as I, final sigma as sigma)';
