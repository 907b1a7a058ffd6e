-- Source-term mapping (Usagi's workflow in SQL): policies, grants, views and
-- functions over the tables of sql/schema/0.2.0/40_mapping.sql. Re-runnable.
--
-- Every function here is SECURITY INVOKER with search_path pinned to
-- pg_catalog, pg_temp: the caller's own rights decide (row-level security on
-- the mapping tables, the caller's SELECT on the vocabulary and CDM tables,
-- the caller's INSERT/UPDATE on an export target). A source query therefore
-- runs as the caller, and must schema-qualify its tables (pg_temp works).

-- ---------------------------------------------------------------- row-level security
-- Readers see every job; a mapper writes in jobs it created or reviews (and
-- decides on terms assigned to it); an administrator writes everywhere, but
-- records decisions under its own name only. Nobody may update or delete a
-- decision: there is no grant for it.
DROP POLICY IF EXISTS mapping_job_read ON omop_emb.mapping_job;
CREATE POLICY mapping_job_read ON omop_emb.mapping_job FOR SELECT TO omop_emb_reader USING (true);
DROP POLICY IF EXISTS mapping_job_create ON omop_emb.mapping_job;
CREATE POLICY mapping_job_create ON omop_emb.mapping_job FOR INSERT TO omop_emb_mapper
    WITH CHECK (created_by = current_user);
DROP POLICY IF EXISTS mapping_job_change ON omop_emb.mapping_job;
CREATE POLICY mapping_job_change ON omop_emb.mapping_job FOR UPDATE TO omop_emb_mapper
    USING (created_by = current_user OR current_user = ANY (reviewers));
DROP POLICY IF EXISTS mapping_job_delete ON omop_emb.mapping_job;
CREATE POLICY mapping_job_delete ON omop_emb.mapping_job FOR DELETE TO omop_emb_mapper
    USING (created_by = current_user);
DROP POLICY IF EXISTS mapping_job_admin ON omop_emb.mapping_job;
CREATE POLICY mapping_job_admin ON omop_emb.mapping_job FOR ALL TO omop_emb_admin USING (true) WITH CHECK (true);

DROP POLICY IF EXISTS mapping_term_read ON omop_emb.mapping_term;
CREATE POLICY mapping_term_read ON omop_emb.mapping_term FOR SELECT TO omop_emb_reader USING (true);
DROP POLICY IF EXISTS mapping_term_write ON omop_emb.mapping_term;
CREATE POLICY mapping_term_write ON omop_emb.mapping_term FOR ALL TO omop_emb_mapper
    USING (EXISTS (SELECT 1 FROM omop_emb.mapping_job j WHERE j.job_id = mapping_term.job_id
                   AND (j.created_by = current_user OR current_user = ANY (j.reviewers))));
DROP POLICY IF EXISTS mapping_term_admin ON omop_emb.mapping_term;
CREATE POLICY mapping_term_admin ON omop_emb.mapping_term FOR ALL TO omop_emb_admin USING (true) WITH CHECK (true);

DROP POLICY IF EXISTS mapping_candidate_read ON omop_emb.mapping_candidate;
CREATE POLICY mapping_candidate_read ON omop_emb.mapping_candidate FOR SELECT TO omop_emb_reader USING (true);
DROP POLICY IF EXISTS mapping_candidate_write ON omop_emb.mapping_candidate;
CREATE POLICY mapping_candidate_write ON omop_emb.mapping_candidate FOR ALL TO omop_emb_mapper
    USING (EXISTS (SELECT 1 FROM omop_emb.mapping_term t JOIN omop_emb.mapping_job j ON j.job_id = t.job_id
                   WHERE t.term_id = mapping_candidate.term_id
                   AND (j.created_by = current_user OR current_user = ANY (j.reviewers))));
DROP POLICY IF EXISTS mapping_candidate_admin ON omop_emb.mapping_candidate;
CREATE POLICY mapping_candidate_admin ON omop_emb.mapping_candidate FOR ALL TO omop_emb_admin USING (true) WITH CHECK (true);

DROP POLICY IF EXISTS mapping_record_count_read ON omop_emb.mapping_record_count;
CREATE POLICY mapping_record_count_read ON omop_emb.mapping_record_count FOR SELECT TO omop_emb_reader USING (true);
DROP POLICY IF EXISTS mapping_record_count_write ON omop_emb.mapping_record_count;
CREATE POLICY mapping_record_count_write ON omop_emb.mapping_record_count FOR ALL TO omop_emb_mapper
    USING (EXISTS (SELECT 1 FROM omop_emb.mapping_job j WHERE j.job_id = mapping_record_count.job_id
                   AND (j.created_by = current_user OR current_user = ANY (j.reviewers))));
DROP POLICY IF EXISTS mapping_record_count_admin ON omop_emb.mapping_record_count;
CREATE POLICY mapping_record_count_admin ON omop_emb.mapping_record_count FOR ALL TO omop_emb_admin USING (true) WITH CHECK (true);

DROP POLICY IF EXISTS mapping_decision_read ON omop_emb.mapping_decision;
CREATE POLICY mapping_decision_read ON omop_emb.mapping_decision FOR SELECT TO omop_emb_reader USING (true);
DROP POLICY IF EXISTS mapping_decision_decide ON omop_emb.mapping_decision;
CREATE POLICY mapping_decision_decide ON omop_emb.mapping_decision FOR INSERT TO omop_emb_mapper
    WITH CHECK (decided_by = current_user
                AND EXISTS (SELECT 1 FROM omop_emb.mapping_term t JOIN omop_emb.mapping_job j ON j.job_id = t.job_id
                            WHERE t.term_id = mapping_decision.term_id
                            AND (j.created_by = current_user OR current_user = ANY (j.reviewers)
                                 OR t.assigned_reviewer = current_user)));
DROP POLICY IF EXISTS mapping_decision_admin ON omop_emb.mapping_decision;
CREATE POLICY mapping_decision_admin ON omop_emb.mapping_decision FOR INSERT TO omop_emb_admin
    WITH CHECK (decided_by = current_user);

GRANT SELECT ON omop_emb.mapping_job, omop_emb.mapping_term, omop_emb.mapping_candidate,
    omop_emb.mapping_decision, omop_emb.mapping_record_count TO omop_emb_reader;
GRANT INSERT, DELETE ON omop_emb.mapping_job, omop_emb.mapping_term, omop_emb.mapping_candidate,
    omop_emb.mapping_record_count TO omop_emb_mapper;
-- vocabulary_schema and cdm_schema are set when the job is created, not later: the job's
-- reviewers read those schemas as themselves (see omop_emb_internal.mapping_guard).
GRANT UPDATE (model, domain_ids, vocabulary_ids, concept_class_ids, source_vocabulary_id,
    candidates_per_term, reviewers, suggest_requested_at, record_counts_at, record_counts_source)
    ON omop_emb.mapping_job TO omop_emb_mapper;
REVOKE UPDATE (vocabulary_schema, cdm_schema) ON omop_emb.mapping_job FROM omop_emb_mapper;
GRANT UPDATE (source_name, source_frequency, extra, assigned_reviewer, suggested_at)
    ON omop_emb.mapping_term TO omop_emb_mapper;
GRANT INSERT ON omop_emb.mapping_decision TO omop_emb_mapper;
GRANT USAGE, SELECT ON SEQUENCE omop_emb.mapping_job_job_id_seq, omop_emb.mapping_term_term_id_seq,
    omop_emb.mapping_decision_decision_id_seq TO omop_emb_mapper;

-- ---------------------------------------------------------------- views
CREATE OR REPLACE VIEW omop_emb.mapping_current_decision WITH (security_invoker = true) AS
SELECT DISTINCT ON (d.term_id) d.*
FROM omop_emb.mapping_decision d
ORDER BY d.term_id, d.decision_id DESC;
COMMENT ON VIEW omop_emb.mapping_current_decision IS 'omop_emb: the current (latest) decision of each decided source term';

CREATE OR REPLACE VIEW omop_emb.mapping_queue WITH (security_invoker = true) AS
SELECT t.job_id, t.term_id, t.source_code, t.source_name, t.source_frequency, t.assigned_reviewer,
       coalesce(d.status, 'unreviewed') AS status, d.concept_ids, d.equivalence, d.comment,
       d.decided_by, d.decided_at, d.automatic,
       c.concept_id AS top_concept_id, c.concept_name AS top_concept_name, c.confidence AS top_confidence,
       t.suggested_at, t.extra, d.decision_id
FROM omop_emb.mapping_term t
LEFT JOIN LATERAL (SELECT * FROM omop_emb.mapping_decision x WHERE x.term_id = t.term_id
                   ORDER BY x.decision_id DESC LIMIT 1) d ON true
LEFT JOIN omop_emb.mapping_candidate c ON c.term_id = t.term_id AND c.rank = 1;
COMMENT ON VIEW omop_emb.mapping_queue IS 'omop_emb: one row per source term with its current decision (status ''unreviewed'' when none) and its top candidate; page it with ORDER BY source_frequency DESC NULLS LAST, source_code';

-- Bound at install and upgrade (public on the search_path): aggregates and the
-- division are named with pg_catalog, so that no look-alike is bound in.
CREATE OR REPLACE VIEW omop_emb.mapping_jobs WITH (security_invoker = true) AS
SELECT j.job_id, j.name, j.model, j.created_by, j.created_at,
       pg_catalog.count(q.term_id) AS terms,
       pg_catalog.count(q.term_id) FILTER (WHERE q.suggested_at IS NOT NULL
           AND (j.suggest_requested_at IS NULL OR q.suggested_at >= j.suggest_requested_at)) AS suggested,
       pg_catalog.count(q.term_id) FILTER (WHERE q.status = 'approved') AS approved,
       pg_catalog.count(q.term_id) FILTER (WHERE q.status = 'flagged') AS flagged,
       pg_catalog.count(q.term_id) FILTER (WHERE q.status = 'unmapped') AS unmapped,
       pg_catalog.count(q.term_id) FILTER (WHERE q.status = 'ignored') AS ignored,
       pg_catalog.count(q.term_id) FILTER (WHERE q.status = 'unreviewed') AS unreviewed,
       CASE WHEN pg_catalog.count(q.term_id) = 0 THEN 0::double precision
            ELSE (pg_catalog.count(q.term_id) FILTER (WHERE q.status <> 'unreviewed'))::double precision
                 OPERATOR(pg_catalog./) pg_catalog.count(q.term_id)::double precision
       END AS progress,
       j.source_vocabulary_id, j.vocabulary_schema, j.cdm_schema, j.reviewers,
       pg_catalog.count(q.term_id) FILTER (WHERE q.automatic AND q.status = 'approved') AS auto_approved,
       pg_catalog.max(q.suggested_at) AS last_suggested_at
FROM omop_emb.mapping_job j
LEFT JOIN omop_emb.mapping_queue q ON q.job_id = j.job_id
GROUP BY j.job_id;
COMMENT ON VIEW omop_emb.mapping_jobs IS 'omop_emb: one row per mapping job: terms, suggested (candidates current), counts per current status, progress = reviewed / terms (0..1)';

-- ---------------------------------------------------------------- internal helpers
CREATE OR REPLACE FUNCTION omop_emb_internal.mapping_job(job text, for_write boolean DEFAULT false)
RETURNS omop_emb.mapping_job
LANGUAGE plpgsql STABLE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job;
    near text;
BEGIN
    IF job IS NULL OR btrim(job) = '' THEN
        RAISE EXCEPTION 'omop_emb: a mapping job name is required' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO j FROM omop_emb.mapping_job m WHERE m.name = job;
    IF NOT FOUND THEN
        SELECT string_agg(quote_literal(s.name), ', ') INTO near
        FROM (SELECT m.name FROM omop_emb.mapping_job m
              ORDER BY (strpos(lower(m.name), lower(job)) > 0 OR strpos(lower(job), lower(m.name)) > 0) DESC,
                       abs(length(m.name) - length(job)), m.name LIMIT 5) s;
        RAISE EXCEPTION 'omop_emb: no mapping job named %', quote_literal(job)
            USING ERRCODE = '42704', DETAIL = 'Closest jobs: ' || coalesce(near, '(none)'),
                  HINT = 'SELECT name FROM omop_emb.mapping_jobs; or create one with omop_emb.create_mapping_job().';
    END IF;
    IF for_write AND j.created_by <> current_user AND NOT current_user = ANY (j.reviewers)
       AND NOT pg_has_role(current_user, 'omop_emb_admin', 'USAGE') THEN
        RAISE EXCEPTION 'omop_emb: role % may not change mapping job % (created by %; reviewers: %)',
            current_user, quote_literal(job), j.created_by, coalesce(nullif(array_to_string(j.reviewers, ', '), ''), 'none')
            USING ERRCODE = '42501', HINT = 'The job''s creator adds you: UPDATE omop_emb.mapping_job SET reviewers = reviewers || ''you''::name WHERE name = ...';
    END IF;
    RETURN j;
END
$$;

-- The schema of a vocabulary table given by name, checked: the schema must
-- hold a CONCEPT table the caller can see.
CREATE OR REPLACE FUNCTION omop_emb_internal.mapping_check_schema(schema_name text, what text, needed text)
RETURNS text
LANGUAGE plpgsql STABLE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    near text;
BEGIN
    IF to_regclass(format('%I.%I', schema_name, needed)) IS NULL THEN
        SELECT string_agg(quote_literal(n.nspname), ', ' ORDER BY n.nspname) INTO near
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname = needed AND c.relkind IN ('r', 'v', 'm', 'p', 'f');
        RAISE EXCEPTION 'omop_emb: % % has no table %', what, quote_literal(schema_name), needed
            USING ERRCODE = '42P01', DETAIL = 'Schemas with a table ' || needed || ': ' || coalesce(near, '(none)'),
                  HINT = 'Pass ' || what || ' => ''<schema>'' naming the schema that holds ' || needed || '.';
    END IF;
    RETURN schema_name;
END
$$;

-- The job's schemas were chosen by its creator. Anyone else (a reviewer, an
-- assigned mapper, an administrator) reads them as themselves: a view, or a
-- table with row-level security, could run the creator's code with the
-- reader's rights. So for them the relations read must be plain tables.
CREATE OR REPLACE FUNCTION omop_emb_internal.mapping_guard(j omop_emb.mapping_job)
RETURNS void
LANGUAGE plpgsql STABLE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad text;
BEGIN
    IF j.created_by = current_user THEN
        RETURN;
    END IF;
    SELECT string_agg(format('%I.%I (%s)', n.nspname, c.relname,
                             CASE WHEN c.relrowsecurity THEN 'row-level security' ELSE 'relkind ' || c.relkind::text END),
                      ', ' ORDER BY n.nspname, c.relname)
    INTO bad
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE ((n.nspname = j.vocabulary_schema AND c.relname IN ('concept', 'concept_ancestor', 'concept_relationship'))
        OR (n.nspname = j.cdm_schema AND c.relname IN ('achilles_results', 'condition_occurrence', 'drug_exposure',
              'procedure_occurrence', 'measurement', 'observation', 'device_exposure', 'visit_occurrence',
              'specimen', 'death', 'note')))
      AND (c.relkind NOT IN ('r', 'p', 'm') OR c.relrowsecurity);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'omop_emb: mapping job % reads % (chosen by its creator %), which could run code as you',
            quote_literal(j.name), bad, j.created_by
            USING ERRCODE = '42501',
                  HINT = 'Only the job''s creator may suggest, decide or export in a job whose vocabulary or CDM relations are views or have row-level security; or re-create the job on plain tables.';
    END IF;
END
$$;

-- Runs the caller's source query and adds its rows as terms (as the caller).
CREATE OR REPLACE FUNCTION omop_emb_internal.mapping_add_terms(job_id bigint, source_query text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text := regexp_replace(coalesce(source_query, ''), '[\s;]+$', '');
    first_row jsonb;
    n bigint;
BEGIN
    IF btrim(q) = '' THEN
        RAISE EXCEPTION 'omop_emb: source_query is empty'
            USING ERRCODE = '22023', HINT = 'A SELECT returning source_code, source_name and optionally source_frequency, e.g. SELECT code AS source_code, label AS source_name, n AS source_frequency FROM myschema.local_codes';
    END IF;
    BEGIN
        EXECUTE format('SELECT pg_catalog.to_jsonb(s) FROM (%s) s LIMIT 1', q) INTO first_row;
    EXCEPTION WHEN undefined_table OR undefined_function THEN
        RAISE EXCEPTION 'omop_emb: source_query failed: %', SQLERRM
            USING ERRCODE = SQLSTATE, DETAIL = 'source_query: ' || left(q, 300),
                  HINT = 'The query runs with search_path = pg_catalog, pg_temp: qualify tables with their schema (e.g. public.local_codes, or pg_temp.t for a temporary table).';
    END;
    IF first_row IS NULL THEN
        RETURN 0;
    END IF;
    IF NOT (first_row ? 'source_code' AND first_row ? 'source_name') THEN
        RAISE EXCEPTION 'omop_emb: source_query must return columns source_code and source_name'
            USING ERRCODE = '42703',
                  DETAIL = 'Columns returned: ' || (SELECT string_agg(k, ', ') FROM jsonb_object_keys(first_row) k),
                  HINT = 'Rename them in the query: SELECT code AS source_code, label AS source_name, freq AS source_frequency FROM ...';
    END IF;
    BEGIN
        EXECUTE format($sql$
            INSERT INTO omop_emb.mapping_term (job_id, source_code, source_name, source_frequency, extra)
            SELECT $1, s.j ->> 'source_code', s.j ->> 'source_name', (s.j ->> 'source_frequency')::bigint,
                   -- A jsonb object column named extra is taken as the extra itself.
                   nullif(CASE jsonb_typeof(s.j -> 'extra')
                              WHEN 'object' THEN (s.j -> 'extra') || (s.j - 'source_code' - 'source_name' - 'source_frequency' - 'extra')
                              WHEN 'null' THEN s.j - 'source_code' - 'source_name' - 'source_frequency' - 'extra'
                              ELSE s.j - 'source_code' - 'source_name' - 'source_frequency' END, '{}'::jsonb)
            FROM (SELECT pg_catalog.to_jsonb(s) AS j FROM (%s) s) s
            ON CONFLICT (job_id, source_code) DO NOTHING$sql$, q) USING job_id;
    EXCEPTION
        WHEN not_null_violation THEN
            RAISE EXCEPTION 'omop_emb: source_query returned a row with a NULL source_code or source_name'
                USING ERRCODE = '23502', HINT = 'Filter them out (WHERE code IS NOT NULL) or give a name (coalesce(label, code)).';
        WHEN invalid_text_representation OR numeric_value_out_of_range THEN
            RAISE EXCEPTION 'omop_emb: source_frequency must be a whole number: %', SQLERRM
                USING ERRCODE = '22P02', HINT = 'Cast it in the query (freq::bigint) or leave the column out.';
        WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'omop_emb: %', SQLERRM
                USING ERRCODE = '42501', HINT = 'Adding terms needs the omop_emb_mapper role and a job you created or review; the source query runs with your own rights.';
    END;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION omop_emb.create_mapping_job(
    name text,
    source_query text,
    model text DEFAULT NULL,
    domain_ids text[] DEFAULT NULL,
    vocabulary_ids text[] DEFAULT NULL,
    concept_class_ids text[] DEFAULT NULL,
    source_vocabulary_id text DEFAULT NULL,
    vocabulary_schema text DEFAULT NULL,
    cdm_schema text DEFAULT NULL,
    candidates_per_term integer DEFAULT 10)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m record;
    existing omop_emb.mapping_job;
    new_id bigint;
    model_name text := model;
    vs text := vocabulary_schema;
BEGIN
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'omop_emb: a mapping job needs a name' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO existing FROM omop_emb.mapping_job j WHERE j.name = create_mapping_job.name;
    IF FOUND THEN
        RAISE EXCEPTION 'omop_emb: a mapping job named % exists already (job_id %, created by % at %)',
            quote_literal(name), existing.job_id, existing.created_by, existing.created_at
            USING ERRCODE = '42710', HINT = 'Add terms to it with omop_emb.add_mapping_terms(job, source_query), or choose another name.';
    END IF;
    IF candidates_per_term IS NULL OR candidates_per_term NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'omop_emb: candidates_per_term must be between 1 and 1000, not %', coalesce(candidates_per_term::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'The default is 10 (Usagi shows 25 at most).';
    END IF;
    IF source_vocabulary_id IS NOT NULL AND length(source_vocabulary_id) > 20 THEN
        RAISE EXCEPTION 'omop_emb: source_vocabulary_id % is longer than the 20 characters of SOURCE_TO_CONCEPT_MAP.source_vocabulary_id',
            quote_literal(source_vocabulary_id) USING ERRCODE = '22001';
    END IF;
    IF model_name IS NULL THEN
        model_name := nullif(current_setting('omop_emb.model', true), '');
    END IF;
    IF model_name IS NULL THEN
        SELECT CASE WHEN count(*) = 1 THEN min(x.name) END INTO model_name FROM omop_emb.models x;
        IF model_name IS NULL THEN
            RAISE EXCEPTION 'omop_emb: no model given, and not exactly one model is registered'
                USING ERRCODE = '22023',
                      DETAIL = 'Registered models: ' || coalesce((SELECT string_agg(x.name, ', ' ORDER BY x.name) FROM omop_emb.models x), '(none)'),
                      HINT = 'Pass model => ''<name>'' or SET omop_emb.model.';
        END IF;
    END IF;
    SELECT * INTO m FROM omop_emb.models x WHERE x.name = model_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'omop_emb: unknown model %', quote_literal(model_name)
            USING ERRCODE = '42704',
                  DETAIL = 'Registered models: ' || coalesce((SELECT string_agg(x.name, ', ' ORDER BY x.name) FROM omop_emb.models x), '(none)');
    END IF;
    vs := coalesce(vs, m.vocabulary_schema);
    IF vs IS NULL THEN
        SELECT n.nspname INTO vs FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relname = 'concept' AND c.relkind IN ('r', 'v', 'm', 'p', 'f') ORDER BY n.nspname LIMIT 1;
    END IF;
    IF vs IS NULL THEN
        RAISE EXCEPTION 'omop_emb: no vocabulary schema given, and model % records none', quote_literal(model_name)
            USING ERRCODE = '22023', HINT = 'Pass vocabulary_schema => ''<schema holding CONCEPT>''.';
    END IF;
    PERFORM omop_emb_internal.mapping_check_schema(vs, 'vocabulary_schema', 'concept');
    IF cdm_schema IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = cdm_schema) THEN
        RAISE EXCEPTION 'omop_emb: cdm_schema % does not exist', quote_literal(cdm_schema)
            USING ERRCODE = '3F000', HINT = 'Pass the schema holding the clinical tables (condition_occurrence, ...), or NULL for no record counts.';
    END IF;
    BEGIN
        INSERT INTO omop_emb.mapping_job (name, model, domain_ids, vocabulary_ids, concept_class_ids,
            source_vocabulary_id, vocabulary_schema, cdm_schema, candidates_per_term)
        VALUES (name, model_name, domain_ids, vocabulary_ids, concept_class_ids, source_vocabulary_id,
            vs, cdm_schema, candidates_per_term)
        RETURNING job_id INTO new_id;
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'omop_emb: %', SQLERRM
            USING ERRCODE = '42501', HINT = 'Creating a mapping job needs the role omop_emb_mapper: GRANT omop_emb_mapper TO ' || current_user || ';';
    END;
    PERFORM omop_emb_internal.mapping_add_terms(new_id, source_query);
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION omop_emb.create_mapping_job(text, text, text, text[], text[], text[], text, text, text, integer) IS
'Create a mapping job and load its source terms. source_query runs AS THE CALLER with search_path pg_catalog, pg_temp (qualify its tables) and returns source_code, source_name, optionally source_frequency; its other columns are kept in mapping_term.extra. model: NULL = setting omop_emb.model, else the only registered model. domain_ids, vocabulary_ids, concept_class_ids: the search filters. source_vocabulary_id: the SOURCE_TO_CONCEPT_MAP vocabulary the export writes. vocabulary_schema: NULL = the model''s. cdm_schema: for record counts (NULL: none). Then CALL omop_emb.suggest_mappings(name). Returns the job id.';

CREATE OR REPLACE FUNCTION omop_emb.add_mapping_terms(job text, source_query text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job := omop_emb_internal.mapping_job(job, true);
BEGIN
    RETURN omop_emb_internal.mapping_add_terms(j.job_id, source_query);
END
$$;
COMMENT ON FUNCTION omop_emb.add_mapping_terms(text, text) IS
'Add the rows of source_query (run as the caller; columns as for create_mapping_job) to a job as new terms; codes already in the job are left as they are. Returns the number of terms added.';

CREATE OR REPLACE FUNCTION omop_emb.assign_mapping_terms(job text, reviewer name, term_ids bigint[] DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job := omop_emb_internal.mapping_job(job, true);
    n bigint;
BEGIN
    IF reviewer IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = reviewer) THEN
        RAISE EXCEPTION 'omop_emb: no role named %', quote_ident(reviewer) USING ERRCODE = '42704';
    END IF;
    UPDATE omop_emb.mapping_term t SET assigned_reviewer = reviewer
    WHERE t.job_id = j.job_id AND (term_ids IS NULL OR t.term_id = ANY (term_ids));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION omop_emb.assign_mapping_terms(text, name, bigint[]) IS
'Assign terms of a job (all, or term_ids) to a reviewer, who may then record decisions on them; NULL reviewer removes the assignment. Returns the terms changed.';

-- Record counts per concept in the job's CDM, once per job: from Achilles
-- results when the CDM schema has them, else from the main *_concept_id
-- column of each clinical table present (read as the caller).
CREATE OR REPLACE FUNCTION omop_emb_internal.mapping_record_counts(job_id bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job;
    parts text[] := '{}';
    r record;
    src text;
BEGIN
    SELECT * INTO j FROM omop_emb.mapping_job m WHERE m.job_id = mapping_record_counts.job_id;
    IF j.cdm_schema IS NULL OR j.record_counts_at IS NOT NULL THEN
        RETURN j.record_counts_source;
    END IF;
    PERFORM omop_emb_internal.mapping_guard(j);
    DELETE FROM omop_emb.mapping_record_count c WHERE c.job_id = j.job_id;
    IF to_regclass(format('%I.achilles_results', j.cdm_schema)) IS NOT NULL THEN
        -- Achilles: records per concept (condition 401, procedure 601, drug 701,
        -- observation 801, measurement 1801, device 2101, visit 201).
        EXECUTE format($sql$
            INSERT INTO omop_emb.mapping_record_count (job_id, concept_id, record_count)
            SELECT $1, a.stratum_1::integer, sum(a.count_value)::bigint
            FROM %I.achilles_results a
            WHERE a.analysis_id IN (201, 401, 601, 701, 801, 1801, 2101) AND a.stratum_1 ~ '^[0-9]+$'
            GROUP BY 2$sql$, j.cdm_schema) USING j.job_id;
        src := 'achilles_results';
    ELSE
        FOR r IN
            SELECT t.tbl, t.col FROM (VALUES
                ('condition_occurrence', 'condition_concept_id'), ('drug_exposure', 'drug_concept_id'),
                ('procedure_occurrence', 'procedure_concept_id'), ('measurement', 'measurement_concept_id'),
                ('observation', 'observation_concept_id'), ('device_exposure', 'device_concept_id'),
                ('visit_occurrence', 'visit_concept_id'), ('specimen', 'specimen_concept_id'),
                ('death', 'cause_concept_id'), ('note', 'note_class_concept_id')) t(tbl, col)
            WHERE EXISTS (SELECT 1 FROM pg_attribute a
                          WHERE a.attrelid = to_regclass(format('%I.%I', j.cdm_schema, t.tbl))
                            AND a.attname = t.col AND NOT a.attisdropped)
        LOOP
            parts := parts || format('SELECT %I AS concept_id FROM %I.%I', r.col, j.cdm_schema, r.tbl);
        END LOOP;
        IF cardinality(parts) > 0 THEN
            EXECUTE format($sql$
                INSERT INTO omop_emb.mapping_record_count (job_id, concept_id, record_count)
                SELECT $1, x.concept_id, count(*) FROM (%s) x
                WHERE x.concept_id IS NOT NULL AND x.concept_id <> 0 GROUP BY x.concept_id$sql$,
                array_to_string(parts, ' UNION ALL ')) USING j.job_id;
        END IF;
        src := 'clinical tables';
    END IF;
    UPDATE omop_emb.mapping_job m SET record_counts_at = clock_timestamp(), record_counts_source = src
    WHERE m.job_id = j.job_id;
    RETURN src;
END
$$;

CREATE OR REPLACE FUNCTION omop_emb.suggest_mappings_start(job text, resuggest boolean DEFAULT false)
RETURNS TABLE (job_id bigint, terms bigint, pending bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job := omop_emb_internal.mapping_job(job, true);
BEGIN
    IF resuggest THEN
        UPDATE omop_emb.mapping_job m SET suggest_requested_at = clock_timestamp(),
            record_counts_at = NULL
        WHERE m.job_id = j.job_id
        RETURNING * INTO j;
    END IF;
    PERFORM omop_emb_internal.mapping_record_counts(j.job_id);
    RETURN QUERY
    SELECT j.job_id, count(*),
           count(*) FILTER (WHERE t.suggested_at IS NULL OR t.suggested_at < j.suggest_requested_at)
    FROM omop_emb.mapping_term t WHERE t.job_id = j.job_id;
END
$$;
COMMENT ON FUNCTION omop_emb.suggest_mappings_start(text, boolean) IS
'First step of suggest_mappings() (for clients that drive the batches themselves): with resuggest, marks every term of the job as pending again; computes the job''s record counts when it has a cdm_schema. Returns the terms and how many wait for candidates.';

CREATE OR REPLACE FUNCTION omop_emb.suggest_mappings_batch(job text, batch_size integer DEFAULT 200,
                                                          context boolean DEFAULT true)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job := omop_emb_internal.mapping_job(job, true);
    ids bigint[];
    names text[];
    has_confidence boolean;
    ancestor_ok boolean;
    conf_expr text;
    parents_expr text := 'NULL::text[]';
    descendants_expr text := 'NULL::bigint';
BEGIN
    IF batch_size IS NULL OR batch_size NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'omop_emb: batch_size must be between 1 and 10000, not %', coalesce(batch_size::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'The default, 200, keeps each commit short.';
    END IF;
    SELECT array_agg(s.term_id ORDER BY s.term_id), array_agg(s.source_name ORDER BY s.term_id)
    INTO ids, names
    FROM (SELECT t.term_id, t.source_name FROM omop_emb.mapping_term t
          WHERE t.job_id = j.job_id
            AND (t.suggested_at IS NULL OR t.suggested_at < j.suggest_requested_at)
          -- nearest_batch refuses more than @MAX_BATCH_ROWS@ rows (queries x k) per call:
          -- with many candidates per term a batch takes fewer terms instead of failing.
          ORDER BY t.term_id LIMIT least(batch_size, greatest(1, @MAX_BATCH_ROWS@ / j.candidates_per_term))
          FOR UPDATE SKIP LOCKED) s;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM omop_emb_internal.mapping_guard(j);
    -- A calibrated confidence from nearest_batch when it has one; until then the
    -- similarity margin of a candidate over the best of the others.
    SELECT coalesce(bool_or('confidence' = ANY (p.proargnames)), false) INTO has_confidence
    FROM pg_proc p WHERE p.pronamespace = 'omop_emb'::regnamespace AND p.proname = 'nearest_batch';
    -- nearest_batch fills confidence in mode 'fused' only: the margin stands in
    -- row by row where it is NULL.
    IF has_confidence THEN
        conf_expr := $e$coalesce(r.confidence, CASE WHEN r.similarity IS NULL THEN NULL
                         WHEN r.similarity >= r.best THEN r.similarity - coalesce(r.second, 0)
                         ELSE r.similarity - r.best END),
                    CASE WHEN r.confidence IS NULL THEN 'margin' ELSE 'calibrated' END$e$;
    ELSE
        conf_expr := $e$CASE WHEN r.similarity IS NULL THEN NULL
                         WHEN r.similarity >= r.best THEN r.similarity - coalesce(r.second, 0)
                         ELSE r.similarity - r.best END, 'margin'$e$;
    END IF;
    IF context THEN
        ancestor_ok := to_regclass(format('%I.concept_ancestor', j.vocabulary_schema)) IS NOT NULL;
        IF ancestor_ok THEN
            parents_expr := format($e$(SELECT array_agg(p.concept_name ORDER BY p.concept_name)
                FROM %1$I.concept_ancestor a JOIN %1$I.concept p ON p.concept_id = a.ancestor_concept_id
                WHERE a.descendant_concept_id = d.concept_id AND a.min_levels_of_separation = 1)$e$, j.vocabulary_schema);
            descendants_expr := format($e$(SELECT count(*) FROM %1$I.concept_ancestor a
                WHERE a.ancestor_concept_id = d.concept_id AND a.min_levels_of_separation > 0)$e$, j.vocabulary_schema);
        END IF;
    END IF;
    DELETE FROM omop_emb.mapping_candidate c WHERE c.term_id = ANY (ids);
    EXECUTE format($sql$
        WITH b AS (
            SELECT * FROM omop_emb.nearest_batch(queries => $2, k => $3, domain_ids => $4, vocabulary_ids => $5,
                concept_class_ids => $6, standard_only => true, include_invalid => false, model => $7)
        ), r AS (
            SELECT b.*,
                   max(b.similarity) OVER w AS best,
                   nth_value(b.similarity, 2) OVER (PARTITION BY b.query_index ORDER BY b.similarity DESC NULLS LAST
                       ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS second
            FROM b WINDOW w AS (PARTITION BY b.query_index)
        ), c AS (
            SELECT d.concept_id, %2$s AS parents, %3$s AS descendant_count
            FROM (SELECT DISTINCT r.concept_id FROM r) d
        )
        INSERT INTO omop_emb.mapping_candidate (term_id, rank, concept_id, concept_name, domain_id,
            vocabulary_id, concept_class_id, standard_concept, similarity, score, confidence,
            confidence_kind, matched_text, match_kind, exact_match, parents, descendant_count, record_count)
        SELECT $1[r.query_index], r.rank, r.concept_id, r.concept_name, r.domain_id, r.vocabulary_id,
               r.concept_class_id, r.standard_concept, r.similarity, r.score, %1$s,
               r.matched_text, r.match_kind, r.exact_match, c.parents, c.descendant_count, rc.record_count
        FROM r JOIN c ON c.concept_id = r.concept_id
        LEFT JOIN omop_emb.mapping_record_count rc ON $8 AND rc.job_id = $9 AND rc.concept_id = r.concept_id
        $sql$, conf_expr, parents_expr, descendants_expr)
    USING ids, names, j.candidates_per_term, j.domain_ids, j.vocabulary_ids, j.concept_class_ids,
          j.model, context AND j.cdm_schema IS NOT NULL, j.job_id;
    UPDATE omop_emb.mapping_term t SET suggested_at = clock_timestamp() WHERE t.term_id = ANY (ids);
    RETURN cardinality(ids);
END
$$;
COMMENT ON FUNCTION omop_emb.suggest_mappings_batch(text, integer, boolean) IS
'One batch of suggest_mappings(): candidates for up to batch_size pending terms of the job (fewer when batch_size x candidates_per_term would pass nearest_batch''s @MAX_BATCH_ROWS@ rows) through nearest_batch(), replacing their previous candidates; context => false leaves parents, descendant_count and record_count empty. Returns the terms done (0: none pending). Sessions running it at once share the work.';

-- A procedure so that each batch commits: an interrupted run keeps what it did
-- and a re-run resumes. Procedures that commit cannot pin search_path, so this
-- one only calls schema-qualified functions.
CREATE OR REPLACE PROCEDURE omop_emb.suggest_mappings(job text, batch_size integer DEFAULT 200,
                                                     resuggest boolean DEFAULT false,
                                                     context boolean DEFAULT true)
LANGUAGE plpgsql
AS $$
-- A procedure that commits cannot pin search_path: it runs in the caller's, so
-- every operator and type is named with pg_catalog (a look-alike in public,
-- =(integer, integer) say, must not run as the caller nor end the loop).
DECLARE
    st pg_catalog.record;
    n pg_catalog.int4;
    done pg_catalog.int8 := 0;
    started pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    last_notice pg_catalog.timestamptz := pg_catalog.clock_timestamp();
BEGIN
    SELECT * INTO st FROM omop_emb.suggest_mappings_start(job, resuggest);
    RAISE NOTICE 'omop_emb: mapping job %: % terms, % to suggest', job, st.terms, st.pending;
    COMMIT;
    LOOP
        n := omop_emb.suggest_mappings_batch(job, batch_size, context);
        EXIT WHEN n OPERATOR(pg_catalog.=) 0;
        done := done OPERATOR(pg_catalog.+) n::pg_catalog.int8;
        COMMIT;
        IF pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) last_notice
           OPERATOR(pg_catalog.>) '5 seconds'::pg_catalog.interval THEN
            RAISE NOTICE 'omop_emb: % of % terms suggested', done, st.pending;
            last_notice := pg_catalog.clock_timestamp();
        END IF;
    END LOOP;
    RAISE NOTICE 'omop_emb: done, % terms suggested in % s', done,
        pg_catalog.round(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) started)::pg_catalog.numeric, 1);
END
$$;
COMMENT ON PROCEDURE omop_emb.suggest_mappings(text, integer, boolean, boolean) IS
'Candidates (job''s candidates_per_term, through nearest_batch) for every term of a job without current ones, committing each batch: resumable, progress in omop_emb.mapping_jobs. resuggest => true: every term again (after a vocabulary or model change); decisions are kept. context => false: no parents, descendant_count, record_count. Must be CALLed outside an explicit transaction block.';

CREATE OR REPLACE FUNCTION omop_emb.record_decision(
    term_id bigint,
    status text,
    concept_ids integer[] DEFAULT NULL,
    equivalence text DEFAULT NULL,
    comment text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t omop_emb.mapping_term;
    j omop_emb.mapping_job;
    st text := lower(btrim(status));
    eq text := upper(btrim(equivalence));
    ids integer[] := concept_ids;
    unknown integer[];
    new_id bigint;
BEGIN
    IF st IS NULL OR st NOT IN ('approved', 'flagged', 'unmapped', 'ignored', 'unreviewed') THEN
        RAISE EXCEPTION 'omop_emb: unknown decision status %', coalesce(quote_literal(status), 'NULL')
            USING ERRCODE = '22023', DETAIL = 'Valid statuses: approved, flagged, unmapped, ignored, unreviewed';
    END IF;
    IF eq IS NOT NULL AND eq NOT IN ('EQUAL', 'EQUIVALENT', 'WIDER', 'NARROWER', 'INEXACT', 'UNMATCHED', 'UNREVIEWED') THEN
        RAISE EXCEPTION 'omop_emb: unknown equivalence %', quote_literal(equivalence)
            USING ERRCODE = '22023', DETAIL = 'Valid values (Usagi''s): EQUAL, EQUIVALENT, WIDER, NARROWER, INEXACT, UNMATCHED, UNREVIEWED';
    END IF;
    SELECT * INTO t FROM omop_emb.mapping_term x WHERE x.term_id = record_decision.term_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'omop_emb: no mapping term with term_id %', coalesce(term_id::text, 'NULL')
            USING ERRCODE = '42704', HINT = 'term_id comes from omop_emb.mapping_queue.';
    END IF;
    SELECT * INTO j FROM omop_emb.mapping_job x WHERE x.job_id = t.job_id;
    IF j.created_by <> current_user AND NOT current_user = ANY (j.reviewers)
       AND t.assigned_reviewer IS DISTINCT FROM current_user
       AND NOT pg_has_role(current_user, 'omop_emb_admin', 'USAGE') THEN
        RAISE EXCEPTION 'omop_emb: role % may not decide on term % of mapping job % (created by %; reviewers: %; term assigned to: %)',
            current_user, t.term_id, quote_literal(j.name), j.created_by,
            coalesce(nullif(array_to_string(j.reviewers, ', '), ''), 'none'), coalesce(t.assigned_reviewer::text, 'nobody')
            USING ERRCODE = '42501', HINT = 'The job''s creator assigns the term: SELECT omop_emb.assign_mapping_terms(job, reviewer, term_ids).';
    END IF;
    PERFORM omop_emb_internal.mapping_guard(j);
    IF st = 'approved' AND (ids IS NULL OR cardinality(ids) = 0) THEN
        SELECT ARRAY[c.concept_id] INTO ids FROM omop_emb.mapping_candidate c
        WHERE c.term_id = t.term_id AND c.rank = 1;
        IF ids IS NULL THEN
            RAISE EXCEPTION 'omop_emb: term % (%) has no candidate to approve', t.term_id, quote_literal(t.source_code)
                USING ERRCODE = '22023', HINT = 'Give concept_ids, or CALL omop_emb.suggest_mappings(job) first.';
        END IF;
    END IF;
    ids := coalesce(ids, '{}');
    IF array_position(ids, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'omop_emb: concept_ids contains NULL' USING ERRCODE = '22004';
    END IF;
    IF cardinality(ids) > 0 THEN
        EXECUTE format('SELECT array_agg(u.id) FROM unnest($1) u(id) WHERE NOT EXISTS (SELECT 1 FROM %I.concept c WHERE c.concept_id = u.id)',
                       j.vocabulary_schema) INTO unknown USING ids;
        IF unknown IS NOT NULL THEN
            RAISE EXCEPTION 'omop_emb: concept_ids % not in %.concept', unknown, quote_ident(j.vocabulary_schema)
                USING ERRCODE = '23503', HINT = 'Pick concepts from the term''s candidates (omop_emb.mapping_candidate) or omop_emb.nearest().';
        END IF;
    END IF;
    eq := coalesce(eq, CASE st WHEN 'approved' THEN 'EQUAL' WHEN 'unmapped' THEN 'UNMATCHED' ELSE 'UNREVIEWED' END);
    INSERT INTO omop_emb.mapping_decision (term_id, status, concept_ids, equivalence, comment)
    VALUES (t.term_id, st, ids, eq, comment)
    RETURNING decision_id INTO new_id;
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION omop_emb.record_decision(bigint, text, integer[], text, text) IS
'Record a decision on a term (appended: earlier decisions stay as history). status: approved, flagged, unmapped, ignored, unreviewed; approved without concept_ids takes the rank-1 candidate; a term may map to several concepts. equivalence (Usagi''s): EQUAL (default when approved), EQUIVALENT, WIDER, NARROWER, INEXACT, UNMATCHED (default when unmapped), UNREVIEWED. Allowed to the job''s creator, its reviewers and the term''s assigned reviewer (omop_emb_mapper), and to omop_emb_admin. Returns the decision id.';

CREATE OR REPLACE FUNCTION omop_emb.auto_approve(job text, min_confidence double precision)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job := omop_emb_internal.mapping_job(job, true);
    n bigint;
BEGIN
    IF min_confidence IS NULL OR min_confidence = 'NaN'::double precision THEN
        RAISE EXCEPTION 'omop_emb: min_confidence is required'
            USING ERRCODE = '22023', HINT = 'With the similarity margin (confidence_kind ''margin''), 0.05 approves terms whose first candidate is clearly ahead of the second.';
    END IF;
    -- Terms with no decision, an 'unreviewed' one, or an earlier automatic
    -- approval of another concept: human decisions and flags are never replaced.
    INSERT INTO omop_emb.mapping_decision (term_id, status, concept_ids, equivalence, comment, automatic)
    SELECT t.term_id, 'approved', ARRAY[c.concept_id], 'UNREVIEWED',
           format('auto_approve: %s %s >= %s', coalesce(c.confidence_kind, 'confidence'),
                  round(c.confidence::numeric, 4), min_confidence),
           true
    FROM omop_emb.mapping_term t
    JOIN omop_emb.mapping_candidate c ON c.term_id = t.term_id AND c.rank = 1
    LEFT JOIN LATERAL (SELECT * FROM omop_emb.mapping_decision d WHERE d.term_id = t.term_id
                       ORDER BY d.decision_id DESC LIMIT 1) d ON true
    WHERE t.job_id = j.job_id AND c.confidence >= min_confidence
      AND (d.decision_id IS NULL OR d.status = 'unreviewed'
           OR (d.automatic AND d.status = 'approved' AND d.concept_ids <> ARRAY[c.concept_id]));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION omop_emb.auto_approve(text, double precision) IS
'Approve, marked automatic, the rank-1 candidate of every term of a job whose confidence is at least min_confidence and that has no decision (or an ''unreviewed'' one, or an older automatic approval). Confidence is the candidate''s confidence column: until nearest_batch returns a calibrated one (confidence_kind ''calibrated''), the similarity margin of rank 1 over rank 2 (''margin''). Returns the terms approved.';

CREATE OR REPLACE FUNCTION omop_emb.export_source_to_concept_map(job text, target_table text)
RETURNS TABLE (inserted bigint, end_dated bigint, unchanged bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job := omop_emb_internal.mapping_job(job, false);
    parts text[];
    target regclass;
    missing text;
BEGIN
    PERFORM omop_emb_internal.mapping_guard(j);
    IF j.source_vocabulary_id IS NULL THEN
        RAISE EXCEPTION 'omop_emb: mapping job % has no source_vocabulary_id', quote_literal(job)
            USING ERRCODE = '22023', HINT = 'Set it: UPDATE omop_emb.mapping_job SET source_vocabulary_id = ''MY_CODES'' WHERE name = ' || quote_literal(job) || ';';
    END IF;
    BEGIN
        parts := parse_ident(coalesce(target_table, ''));
    EXCEPTION WHEN invalid_parameter_value THEN
        parts := NULL;
    END;
    IF parts IS NULL OR cardinality(parts) <> 2 THEN
        RAISE EXCEPTION 'omop_emb: target_table must be schema.table, not %', coalesce(quote_literal(target_table), 'NULL')
            USING ERRCODE = '22023', HINT = 'e.g. ''cdm.source_to_concept_map''';
    END IF;
    target := to_regclass(format('%I.%I', parts[1], parts[2]));
    IF target IS NULL THEN
        RAISE EXCEPTION 'omop_emb: table %.% does not exist', quote_ident(parts[1]), quote_ident(parts[2])
            USING ERRCODE = '42P01',
                  HINT = format('Create it (OMOP CDM 5.4): CREATE TABLE %I.%I (source_code varchar(50) NOT NULL, '
                                || 'source_concept_id integer NOT NULL, source_vocabulary_id varchar(20) NOT NULL, '
                                || 'source_code_description varchar(255), target_concept_id integer NOT NULL, '
                                || 'target_vocabulary_id varchar(20) NOT NULL, valid_start_date date NOT NULL, '
                                || 'valid_end_date date NOT NULL, invalid_reason varchar(1));', parts[1], parts[2]);
    END IF;
    SELECT string_agg(w.col, ', ') INTO missing
    FROM unnest(ARRAY['source_code', 'source_concept_id', 'source_vocabulary_id', 'source_code_description',
                      'target_concept_id', 'target_vocabulary_id', 'valid_start_date', 'valid_end_date',
                      'invalid_reason']) w(col)
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = target AND a.attname = w.col AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'omop_emb: % is not a SOURCE_TO_CONCEPT_MAP table: columns missing: %', target, missing
            USING ERRCODE = '42703';
    END IF;
    -- Live rows (invalid_reason NULL) of this source vocabulary and of this
    -- job's codes are compared with the approved decisions: matches stay,
    -- new decisions are inserted, withdrawn ones end-dated (invalid_reason
    -- 'U' when the code maps elsewhere now, 'D' when it no longer maps).
    RETURN QUERY EXECUTE format($sql$
        WITH want AS (
            SELECT DISTINCT ON (t.source_code, u.concept_id)
                   t.source_code, left(t.source_name, 255) AS description, u.concept_id,
                   c.vocabulary_id, d.decided_at::date AS start_date
            FROM omop_emb.mapping_term t
            JOIN LATERAL (SELECT * FROM omop_emb.mapping_decision x WHERE x.term_id = t.term_id
                          ORDER BY x.decision_id DESC LIMIT 1) d ON d.status = 'approved'
            CROSS JOIN LATERAL unnest(d.concept_ids) u(concept_id)
            LEFT JOIN %1$I.concept c ON c.concept_id = u.concept_id
            WHERE t.job_id = $1
            ORDER BY t.source_code, u.concept_id
        ), live AS (
            SELECT s.source_code, s.target_concept_id FROM %2$s s
            WHERE s.source_vocabulary_id = $2 AND s.invalid_reason IS NULL
              AND s.source_code IN (SELECT t.source_code FROM omop_emb.mapping_term t WHERE t.job_id = $1)
        ), ended AS (
            UPDATE %2$s s SET valid_end_date = greatest(current_date, s.valid_start_date),
                   invalid_reason = CASE WHEN EXISTS (SELECT 1 FROM want w WHERE w.source_code = s.source_code)
                                         THEN 'U' ELSE 'D' END
            WHERE s.source_vocabulary_id = $2 AND s.invalid_reason IS NULL
              AND s.source_code IN (SELECT t.source_code FROM omop_emb.mapping_term t WHERE t.job_id = $1)
              AND NOT EXISTS (SELECT 1 FROM want w WHERE w.source_code = s.source_code
                              AND w.concept_id = s.target_concept_id)
            RETURNING 1
        ), reopened AS (
            -- A mapping end-dated today and approved again the same day is re-opened,
            -- not inserted anew: a second row would repeat the CDM's primary key
            -- (source_vocabulary_id, target_concept_id, source_code, valid_end_date)
            -- as soon as it was withdrawn again that day.
            UPDATE %2$s s SET valid_end_date = DATE '2099-12-31', invalid_reason = NULL
            FROM want w
            WHERE s.source_vocabulary_id = $2 AND s.source_code = w.source_code
              AND s.target_concept_id = w.concept_id AND s.invalid_reason IS NOT NULL
              AND s.valid_end_date = greatest(current_date, s.valid_start_date)
              AND NOT EXISTS (SELECT 1 FROM live l WHERE l.source_code = w.source_code
                              AND l.target_concept_id = w.concept_id)
            RETURNING s.source_code, s.target_concept_id
        ), ins AS (
            INSERT INTO %2$s (source_code, source_concept_id, source_vocabulary_id, source_code_description,
                              target_concept_id, target_vocabulary_id, valid_start_date, valid_end_date, invalid_reason)
            SELECT w.source_code, 0, $2, w.description, w.concept_id, w.vocabulary_id, w.start_date,
                   DATE '2099-12-31', NULL
            FROM want w
            WHERE NOT EXISTS (SELECT 1 FROM live l WHERE l.source_code = w.source_code AND l.target_concept_id = w.concept_id)
              AND NOT EXISTS (SELECT 1 FROM reopened r WHERE r.source_code = w.source_code
                              AND r.target_concept_id = w.concept_id)
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM ins) + (SELECT count(*) FROM reopened), (SELECT count(*) FROM ended),
               (SELECT count(*) FROM want) - (SELECT count(*) FROM ins) - (SELECT count(*) FROM reopened)$sql$, j.vocabulary_schema, target)
    USING j.job_id, j.source_vocabulary_id;
END
$$;
COMMENT ON FUNCTION omop_emb.export_source_to_concept_map(text, text) IS
'Write a job''s approved decisions (one row per target concept) into a CDM 5.4 SOURCE_TO_CONCEPT_MAP table (''schema.table''), as the caller (needs SELECT, INSERT, UPDATE on it). Idempotent: rows already there stay; a decision withdrawn since the last export is end-dated (valid_end_date today, invalid_reason ''U'' when the code maps elsewhere now, ''D'' otherwise), never deleted; one end-dated today and approved again is re-opened (counted as inserted), so the CDM primary key never repeats. source_concept_id 0, valid_start_date the decision''s date, valid_end_date 2099-12-31. Returns (inserted, end_dated, unchanged).';

CREATE OR REPLACE FUNCTION omop_emb.check_mappings(job text)
RETURNS TABLE (term_id bigint, source_code text, concept_id integer, problem text, suggested_concept_id integer)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    j omop_emb.mapping_job := omop_emb_internal.mapping_job(job, true);
    has_rel boolean;
BEGIN
    PERFORM omop_emb_internal.mapping_guard(j);
    has_rel := to_regclass(format('%I.concept_relationship', j.vocabulary_schema)) IS NOT NULL;
    CREATE TEMP TABLE IF NOT EXISTS omop_emb_check_mappings (
        term_id bigint, source_code text, concept_id integer, problem text, suggested_concept_id integer
    ) ON COMMIT DROP;
    TRUNCATE pg_temp.omop_emb_check_mappings;
    EXECUTE format($sql$
        INSERT INTO pg_temp.omop_emb_check_mappings
        SELECT t.term_id, t.source_code, u.concept_id,
               CASE WHEN c.concept_id IS NULL THEN 'not in the vocabulary'
                    WHEN c.invalid_reason = 'U' THEN 'invalid (replaced)'
                    WHEN c.invalid_reason IS NOT NULL THEN 'invalid (' || c.invalid_reason || ')'
                    ELSE 'non-standard' END,
               %2$s
        FROM omop_emb.mapping_term t
        JOIN LATERAL (SELECT * FROM omop_emb.mapping_decision x WHERE x.term_id = t.term_id
                      ORDER BY x.decision_id DESC LIMIT 1) d ON d.status = 'approved'
        CROSS JOIN LATERAL unnest(d.concept_ids) u(concept_id)
        LEFT JOIN %1$I.concept c ON c.concept_id = u.concept_id
        WHERE t.job_id = $1
          AND (c.concept_id IS NULL OR c.invalid_reason IS NOT NULL OR c.standard_concept IS DISTINCT FROM 'S')$sql$,
        j.vocabulary_schema,
        CASE WHEN has_rel THEN format($e$(SELECT r.concept_id_2 FROM %1$I.concept_relationship r
              JOIN %1$I.concept t2 ON t2.concept_id = r.concept_id_2
              WHERE r.concept_id_1 = u.concept_id AND r.concept_id_2 <> u.concept_id
                AND r.relationship_id IN ('Maps to', 'Concept replaced by') AND r.invalid_reason IS NULL
              ORDER BY (t2.invalid_reason IS NULL AND t2.standard_concept = 'S') DESC,
                       (r.relationship_id = 'Maps to') DESC, r.concept_id_2
              LIMIT 1)$e$, j.vocabulary_schema) ELSE 'NULL::integer' END)
    USING j.job_id;
    INSERT INTO omop_emb.mapping_decision (term_id, status, concept_ids, equivalence, comment, automatic)
    SELECT p.term_id, 'flagged', d.concept_ids, d.equivalence,
           'check_mappings: ' || string_agg(format('concept %s %s%s', p.concept_id, p.problem,
                CASE WHEN p.suggested_concept_id IS NOT NULL THEN ', now ' || p.suggested_concept_id ELSE '' END), '; '),
           true
    FROM pg_temp.omop_emb_check_mappings p
    JOIN LATERAL (SELECT * FROM omop_emb.mapping_decision x WHERE x.term_id = p.term_id
                  ORDER BY x.decision_id DESC LIMIT 1) d ON true
    GROUP BY p.term_id, d.concept_ids, d.equivalence;
    RETURN QUERY SELECT p.term_id, p.source_code, p.concept_id, p.problem, p.suggested_concept_id
                 FROM pg_temp.omop_emb_check_mappings p ORDER BY p.term_id, p.concept_id;
    DROP TABLE pg_temp.omop_emb_check_mappings;
END
$$;
COMMENT ON FUNCTION omop_emb.check_mappings(text) IS
'After a vocabulary update: lists the approved mappings of a job whose concept is no longer in the vocabulary, invalid or non-standard, with the concept it now ''Maps to'' (or was ''Concept replaced by'') as suggested_concept_id, and flags those terms (an automatic ''flagged'' decision keeping the concepts, comment saying why). The next run lists only newly broken mappings.';

-- ---------------------------------------------------------------- execute rights
DO $mapping_grants$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT p.oid::regprocedure AS sig, p.proname, p.prokind FROM pg_proc p
        WHERE (p.pronamespace = 'omop_emb'::regnamespace
               AND p.proname IN ('create_mapping_job', 'add_mapping_terms', 'assign_mapping_terms',
                                 'suggest_mappings', 'suggest_mappings_start', 'suggest_mappings_batch',
                                 'record_decision', 'auto_approve', 'export_source_to_concept_map',
                                 'check_mappings'))
           OR (p.pronamespace = 'omop_emb_internal'::regnamespace
               AND p.proname IN ('mapping_job', 'mapping_check_schema', 'mapping_guard',
                                 'mapping_add_terms', 'mapping_record_counts'))
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', r.sig);
        -- Exporting needs write rights on the target table and nothing more.
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %s', r.sig,
                       CASE WHEN r.proname IN ('export_source_to_concept_map', 'mapping_job', 'mapping_guard')
                            THEN 'omop_emb_reader' ELSE 'omop_emb_mapper' END);
    END LOOP;
END
$mapping_grants$;
GRANT SELECT ON omop_emb.mapping_jobs, omop_emb.mapping_queue, omop_emb.mapping_current_decision TO omop_emb_reader;

COMMENT ON FUNCTION omop_emb_internal.mapping_job(text, boolean) IS 'Internal: the mapping job of a name (clear error when unknown or, for_write, when the caller may not change it)';
COMMENT ON FUNCTION omop_emb_internal.mapping_check_schema(text, text, text) IS 'Internal: checks that a schema holds a table (clear error otherwise)';
COMMENT ON FUNCTION omop_emb_internal.mapping_guard(omop_emb.mapping_job) IS 'Internal: refuses, to anyone but a job''s creator, vocabulary or CDM relations that could run code (views, row-level security)';
COMMENT ON FUNCTION omop_emb_internal.mapping_add_terms(bigint, text) IS 'Internal: runs a source query as the caller and adds its rows as terms of a job';
COMMENT ON FUNCTION omop_emb_internal.mapping_record_counts(bigint) IS 'Internal: computes a job''s record counts per concept once (Achilles results or the clinical tables of its cdm_schema)';
