-- omop_emb 0.2.0: the candidate indexes of the fused ranking on every existing
-- embedding table (new tables get them from omop_emb_indb.sqlgen.create_table):
-- character trigrams (pg_trgm GIN, qualified with pg_trgm's schema) and word
-- initials (omop_emb.initials(), defined by the API).
DO $ranking_indexes$
DECLARE
    r record;
    trgm_schema text;
BEGIN
    SELECT n.nspname INTO trgm_schema
    FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'pg_trgm';
    IF trgm_schema IS NULL THEN
        RAISE EXCEPTION 'omop_emb 0.2.0 needs the pg_trgm extension (PostgreSQL contrib) in this database'
            USING HINT = 'CREATE EXTENSION pg_trgm; then run the upgrade again (omop-emb-pg install does both).';
    END IF;
    FOR r IN SELECT m.model_id FROM omop_emb.model m ORDER BY m.model_id LOOP
        IF pg_catalog.to_regclass(pg_catalog.format('omop_emb.embedding_%s', r.model_id)) IS NOT NULL THEN
            EXECUTE pg_catalog.format(
                'CREATE INDEX IF NOT EXISTS embedding_%s_trgm ON omop_emb.embedding_%s USING gin (text %I.gin_trgm_ops)',
                r.model_id, r.model_id, trgm_schema);
            EXECUTE pg_catalog.format(
                'CREATE INDEX IF NOT EXISTS embedding_%s_initials ON omop_emb.embedding_%s (omop_emb.initials(text))',
                r.model_id, r.model_id);
        END IF;
    END LOOP;
END
$ranking_indexes$;
