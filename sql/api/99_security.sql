-- Privileges and search_path pinning, applied to everything defined above.
--
-- Nothing is executable by PUBLIC. omop_emb_reader searches and embeds;
-- omop_emb_admin (a member of omop_emb_reader) registers models, indexes and
-- configures. Every SECURITY DEFINER function pins search_path to pg_catalog
-- and pg_temp (last) only: not this schema, not pgvector's (public, where a
-- user may be allowed to create look-alike functions, operators and casts).
-- Their SQL names every object with its schema (pgvector's through
-- omop_emb_indb.sqlgen, whose schema is looked up once per session).

REVOKE ALL ON ALL TABLES IN SCHEMA omop_emb FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA omop_emb FROM PUBLIC;
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA omop_emb FROM PUBLIC;
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA omop_emb_internal FROM PUBLIC;
-- The internal steps of index_concepts() and upsert_concept_texts(), run with the
-- administrator's rights where they read the vocabulary (SECURITY INVOKER), so
-- the administrator reaches their schema and may add rows to the staging tables.
GRANT USAGE ON SCHEMA omop_emb_internal TO omop_emb_admin;
-- The mapping functions (SECURITY INVOKER) call their internal helpers as the
-- reader or mapper who calls them (execute rights: sql/api/80_mapping.sql).
GRANT USAGE ON SCHEMA omop_emb_internal TO omop_emb_reader;
GRANT INSERT ON omop_emb_internal.index_stage_run, omop_emb_internal.index_stage_text,
    omop_emb_internal.index_stage_concept TO omop_emb_admin;
GRANT USAGE ON SCHEMA omop_emb TO omop_emb_reader;
GRANT SELECT ON omop_emb.models, omop_emb.index_status, omop_emb.rerankers TO omop_emb_reader;

DO $privileges$
DECLARE
    r record;
    vector_schema text;
    reader_routines text[] := ARRAY['embed', 'embed_batch', 'similarity',
        'embedding_role_prefixes', 'nearest', 'nearest_batch', 'explain_nearest', 'status', 'fold_text', 'version',
        'initials', 'ranking_candidates', 'ranking'];
BEGIN
    SELECT n.nspname INTO vector_schema
    FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'vector';
    IF vector_schema IS NULL THEN
        RAISE EXCEPTION 'omop_emb needs the pgvector extension (vector) in this database'
            USING HINT = 'CREATE EXTENSION vector; or CREATE EXTENSION omop_emb CASCADE;';
    END IF;
    FOR r IN
        SELECT p.oid::regprocedure AS sig, p.proname, p.prosecdef, p.prokind,
               p.pronamespace = 'omop_emb_internal'::regnamespace AS internal
        FROM pg_catalog.pg_proc p
        WHERE p.pronamespace IN ('omop_emb'::regnamespace, 'omop_emb_internal'::regnamespace)
    LOOP
        IF r.internal THEN
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO omop_emb_admin', r.sig);
        ELSIF r.proname = ANY (reader_routines) THEN
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO omop_emb_reader', r.sig);
        ELSIF r.proname NOT IN ('_bootstrap') THEN
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO omop_emb_admin', r.sig);
        END IF;
        IF r.prosecdef THEN
            EXECUTE format('ALTER ROUTINE %s SET search_path = pg_catalog, pg_temp', r.sig);
        END IF;
    END LOOP;
END
$privileges$;
