-- Indexing the vocabulary's CONCEPT table, and the vector index.

-- The steps of index_concepts(). The vocabulary is a relation the caller names,
-- so it is read by index_stage, SECURITY INVOKER (with the caller's rights, its
-- search_path pinned), into staging tables the extension owns
-- (sql/schema/0.2.0/10_index_staging.sql); the SECURITY DEFINER steps read only
-- those and the extension's own tables. A view, a foreign or temporary table is
-- refused unless the caller passes allow_any_relation => true.
CREATE OR REPLACE FUNCTION omop_emb_internal.load_runtime() RETURNS boolean
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@ is not None
$$;
COMMENT ON FUNCTION omop_emb_internal.load_runtime() IS
'Internal: loads the runtime into this session for the SECURITY INVOKER functions (which may not run _bootstrap)';

CREATE OR REPLACE FUNCTION omop_emb_internal.index_model(model text)
RETURNS TABLE (model_id integer, model_name text, vocabulary_schema text)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "index_model", model)
$$;
COMMENT ON FUNCTION omop_emb_internal.index_model(text) IS
'Internal: id, name and recorded vocabulary schema of a model (argument, else the setting omop_emb.model, else the only model)';

CREATE OR REPLACE FUNCTION omop_emb_internal.embedded_concepts(model_id integer)
RETURNS SETOF integer
LANGUAGE plpgsql STABLE SECURITY DEFINER ROWS 100000
AS $$
BEGIN
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT DISTINCT e.concept_id FROM omop_emb.%I e', 'embedding_' || embedded_concepts.model_id);
END
$$;
COMMENT ON FUNCTION omop_emb_internal.embedded_concepts(integer) IS
'Internal step of index_concepts(): the concepts a model has embeddings of (their attributes are refreshed from the vocabulary)';

CREATE OR REPLACE FUNCTION omop_emb_internal.index_stage(
    model text, vocabulary_schema text, domain_ids text[], vocabulary_ids text[],
    concept_class_ids text[], include_classification boolean, include_invalid boolean,
    include_synonyms boolean, include_mapped boolean, allow_any_relation boolean)
RETURNS TABLE (model_name text, total_texts bigint, queued bigint, pending bigint, deleted bigint)
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
plpy.execute("SELECT omop_emb_internal.load_runtime()")
return GD["omop_emb"].call(plpy, "index_stage", model, vocabulary_schema, domain_ids,
                           vocabulary_ids, concept_class_ids, include_classification,
                           include_invalid, include_synonyms, include_mapped, allow_any_relation)
$$;
COMMENT ON FUNCTION omop_emb_internal.index_stage(text, text, text[], text[], text[], boolean, boolean, boolean, boolean, boolean) IS
'Internal step of index_concepts(), SECURITY INVOKER: reads the vocabulary with the caller''s rights into staging rows, then queues what is missing or stale (index_prepare)';

CREATE OR REPLACE FUNCTION omop_emb_internal.index_prepare(model text)
RETURNS TABLE (model_name text, total_texts bigint, queued bigint, pending bigint, deleted bigint)
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "index_prepare", model)
$$;
COMMENT ON FUNCTION omop_emb_internal.index_prepare(text) IS
'Internal step of index_concepts(): from this session''s staging rows, queues the concept texts whose embedding is missing or stale';

CREATE OR REPLACE FUNCTION omop_emb_internal.index_batch(model text, batch_size integer) RETURNS integer
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "index_batch", model, batch_size)
$$;
COMMENT ON FUNCTION omop_emb_internal.index_batch(text, integer) IS
'Internal step of index_concepts(): embeds one batch of queued texts; returns how many (0: done, -1: the rest is being done by other sessions)';

-- A procedure so that each batch commits: an interrupted run keeps what it did,
-- and a re-run resumes. Procedures that commit cannot be SECURITY DEFINER nor
-- pin search_path, so this one runs in the caller's search_path and names
-- every function, operator and type with its schema (a look-alike in public,
-- count(integer) or *(numeric, integer), must not run as the caller).
CREATE OR REPLACE PROCEDURE omop_emb.index_concepts(
    model text DEFAULT NULL,
    vocabulary_schema text DEFAULT NULL,
    domain_ids text[] DEFAULT NULL,
    vocabulary_ids text[] DEFAULT NULL,
    concept_class_ids text[] DEFAULT NULL,
    include_classification boolean DEFAULT false,
    include_invalid boolean DEFAULT false,
    include_synonyms boolean DEFAULT NULL,
    include_mapped boolean DEFAULT NULL,
    batch_size integer DEFAULT NULL,
    max_texts bigint DEFAULT NULL,
    allow_any_relation boolean DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
    prep pg_catalog.record;
    n pg_catalog.int4;
    done pg_catalog.int8 := 0;
    retries pg_catalog.int4 := 0;
    started pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    last_notice pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    elapsed pg_catalog.float8;
    built pg_catalog.text;
BEGIN
    IF vocabulary_schema IS NULL THEN
        -- The caller's search_path decides, as for any unqualified table name.
        SELECT n.nspname INTO vocabulary_schema
        FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n
             ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
        WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('concept')::pg_catalog.oid;
    END IF;
    SELECT * INTO prep FROM omop_emb_internal.index_stage(model, vocabulary_schema, domain_ids,
        vocabulary_ids, concept_class_ids, include_classification, include_invalid,
        include_synonyms, include_mapped, allow_any_relation);
    RAISE NOTICE 'omop_emb: model %: % concept texts in scope, % to embed (% queued now, % stale rows removed)',
        prep.model_name, prep.total_texts, prep.pending, prep.queued, prep.deleted;
    COMMIT;
    LOOP
        EXIT WHEN max_texts IS NOT NULL AND done OPERATOR(pg_catalog.>=) max_texts;
        BEGIN
            n := omop_emb_internal.index_batch(prep.model_name, batch_size);
        EXCEPTION WHEN deadlock_detected OR serialization_failure OR lock_not_available
                       OR unique_violation THEN
            -- Only this batch rolled back (its texts are back in the queue), so a
            -- lock conflict with another indexing session, or a row of the same
            -- text stored by someone else after this batch claimed it (the batch
            -- copies its rows in), costs a retry, not the run.
            retries := retries OPERATOR(pg_catalog.+) 1;
            IF retries OPERATOR(pg_catalog.>) 5 THEN
                RAISE;
            END IF;
            RAISE NOTICE 'omop_emb: batch rolled back (%), retrying', SQLERRM;
            PERFORM pg_catalog.pg_sleep(0.1::pg_catalog.float8 OPERATOR(pg_catalog.*) retries::pg_catalog.float8);
            CONTINUE;
        END;
        retries := 0;
        IF n OPERATOR(pg_catalog.=) 0 THEN
            EXIT;
        ELSIF n OPERATOR(pg_catalog.<) 0 THEN
            -- What is left is claimed by other sessions: wait for them to finish
            -- or fail (a failed batch returns to the queue and is taken here).
            -- Commit first: texts this transaction took off the queue as already
            -- embedded stay locked until then, and the others would wait for us.
            COMMIT;
            PERFORM pg_catalog.pg_sleep(0.2::pg_catalog.float8);
            CONTINUE;
        END IF;
        done := done OPERATOR(pg_catalog.+) n::pg_catalog.int8;
        COMMIT;
        IF pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) last_notice
           OPERATOR(pg_catalog.>) '5 seconds'::pg_catalog.interval THEN
            elapsed := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) started);
            RAISE NOTICE 'omop_emb: % of % texts embedded (%/s)', done, prep.pending,
                pg_catalog.round((done::pg_catalog.float8 OPERATOR(pg_catalog./) GREATEST(elapsed, 0.001::pg_catalog.float8))::pg_catalog.numeric, 1);
            last_notice := pg_catalog.clock_timestamp();
        END IF;
    END LOOP;
    -- The secondary indexes a first indexing left out, one per transaction: sessions
    -- that finish together (and a second connection of the CLI) build different ones
    -- at once, each holding the table's SHARE lock only while it builds.
    LOOP
        built := omop_emb_internal.index_build_next(prep.model_name);
        COMMIT;
        EXIT WHEN built IS NULL;
    END LOOP;
    LOOP
        BEGIN
            PERFORM omop_emb_internal.index_finish(prep.model_name);
            EXIT;
        EXCEPTION WHEN deadlock_detected OR lock_not_available THEN
            retries := retries OPERATOR(pg_catalog.+) 1;
            IF retries OPERATOR(pg_catalog.>) 5 THEN
                RAISE;
            END IF;
            PERFORM pg_catalog.pg_sleep(0.1::pg_catalog.float8 OPERATOR(pg_catalog.*) retries::pg_catalog.float8);
        END;
    END LOOP;
    elapsed := pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) started);
    RAISE NOTICE 'omop_emb: done, % texts embedded in % s (%/s)', done,
        pg_catalog.round(elapsed::pg_catalog.numeric, 1),
        pg_catalog.round((done::pg_catalog.float8 OPERATOR(pg_catalog./) GREATEST(elapsed, 0.001::pg_catalog.float8))::pg_catalog.numeric, 1);
END
$$;
COMMENT ON PROCEDURE omop_emb.index_concepts(text, text, text[], text[], text[], boolean, boolean, boolean, boolean, integer, bigint, boolean) IS
'Embed the concepts of the vocabulary''s CONCEPT table (standard, valid concepts by default) with the DOCUMENT role, committing each batch. Resumable: a re-run embeds only texts that are missing or whose exact text sent (prefix included) changed. Several sessions can run it at once. Options: domain_ids, vocabulary_ids, concept_class_ids, include_classification, include_invalid, include_synonyms (English concept_synonym; NULL, the default: whenever the vocabulary has concept_synonym), include_mapped (names of source concepts that ''Maps to'' a standard concept; NULL, the default: whenever it has concept_relationship; false turns either off), batch_size (texts claimed, embedded and committed at a time; default @TEXTS_PER_TRANSACTION@, at least two requests of the model''s batch_size, the texts per embedding request), max_texts. A first indexing of 10,000 texts or more into an empty table loads it without its secondary indexes and builds them at the end (sessions that finish together build different ones at once). The vocabulary is read with the caller''s rights and must be plain tables: a view, a materialized view, a foreign or temporary table, a table with row-level security or user-defined column types is refused unless allow_any_relation => true. Must be CALLed outside an explicit transaction block.';

CREATE OR REPLACE FUNCTION omop_emb.create_index(
    model text DEFAULT NULL,
    method text DEFAULT 'hnsw',
    m integer DEFAULT 16,
    ef_construction integer DEFAULT 128,
    metric text DEFAULT NULL)
RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "create_index", model, method, m, ef_construction, metric)
$$;
COMMENT ON FUNCTION omop_emb.create_index(text, text, integer, integer, text) IS
'(Re)build the vector index of a model: method ''hnsw'' (m default 16, ef_construction default 128: measured recall@10 0.985 against 0.93 with 64 at +10% build time) or ''none'' (exact search); metric cosine (default), l2 or ip. The new index is built beside the old one (searches and status() go on meanwhile, writers of the model wait), then swapped in with a lock of a moment; other sessions re-plan on their next call. An HNSW build then measures recall@10 against exact search on 50 queries (the model''s most recent real queries cached by nearest(), made up with its own texts embedded in the query role, one request to its server, as a user typing a concept''s name would search; its stored vectors, which flatter the index, only when the server does not answer or the setting omop_emb.calibration_embeds is off; omop_emb.calibrate_index() measures again later) and records in index_params the smallest ef_search (40 to 800) reaching 0.98 (none reaching it: the largest, with a WARNING): nearest() searches with it while the setting omop_emb.ef_search is unset (about one sequential read of the table per sampled vector).';

CREATE OR REPLACE FUNCTION omop_emb.calibrate_index(model text DEFAULT NULL, queries integer DEFAULT @RECALIBRATION_QUERIES@)
RETURNS jsonb
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "calibrate_index", model, queries)
$$;
COMMENT ON FUNCTION omop_emb.calibrate_index(text, integer) IS
'Measure the ef_search of a model''s HNSW index again, as create_index does after a build (there on 50 queries), on the model''s most recent real queries (queries of them, default @RECALIBRATION_QUERIES@, at most @MAX_CALIBRATION_QUERIES@: query vectors cached by nearest(); its own texts embedded in the query role make up the number when fewer are cached, its stored vectors when the server does not answer or omop_emb.calibration_embeds is off; 50 are a noisy sample), and record the smallest ef_search (40 to 800) reaching recall@10 0.98 (none reaching it: the largest, with a WARNING) in index_params, which nearest() then uses while the setting omop_emb.ef_search is unset. Run it once users have searched: their queries are the truest sample (stored vectors flatter the index: at realistic 1M they chose ef_search 300, whose recall on real queries was 0.95). Returns the new index_params; about one sequential read of the table per query.';

-- A view is bound when it is created (at install and upgrade, with public on the
-- search_path): every function and operator that could be matched by a
-- look-alike with exact argument types is named with pg_catalog.
CREATE OR REPLACE VIEW omop_emb.index_status AS
SELECT m.name AS model,
       pg_catalog.count(p.pid) FILTER (WHERE a.pid IS NOT NULL AND p.finished_at IS NULL) AS active_sessions,
       coalesce(pg_catalog.sum(p.done), 0)::pg_catalog.int8 AS done,
       q.pending,
       coalesce(pg_catalog.sum(p.done), 0)::pg_catalog.int8 OPERATOR(pg_catalog.+) q.pending AS total,
       pg_catalog.round(coalesce(pg_catalog.sum(p.done::pg_catalog.float8 OPERATOR(pg_catalog./)
           GREATEST(pg_catalog.date_part('epoch', p.updated_at OPERATOR(pg_catalog.-) p.started_at),
                    0.001::pg_catalog.float8)), 0)::pg_catalog.numeric, 1) AS rate_per_s,
       pg_catalog.min(p.started_at) AS started_at,
       pg_catalog.max(p.updated_at) AS updated_at,
       pg_catalog.max(p.finished_at) FILTER (WHERE q.pending OPERATOR(pg_catalog.=) 0) AS finished_at
FROM omop_emb.model m
-- The queue is counted once per model (a full vocabulary queues millions of texts:
-- each count reads the queue's primary key from end to end).
CROSS JOIN LATERAL (SELECT pg_catalog.count(*) AS pending FROM omop_emb.index_queue iq
                    WHERE iq.model_id OPERATOR(pg_catalog.=) m.model_id) q
LEFT JOIN omop_emb.index_progress p ON p.model_id OPERATOR(pg_catalog.=) m.model_id
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) p.pid
GROUP BY m.model_id, m.name, q.pending;
COMMENT ON VIEW omop_emb.index_status IS 'omop_emb: progress of index_concepts() per model: texts done in the current run, pending, total, rate';

CREATE OR REPLACE FUNCTION omop_emb_internal.index_build_next(model text) RETURNS text
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "index_build_next", model)
$$;
COMMENT ON FUNCTION omop_emb_internal.index_build_next(text) IS
'Internal step of index_concepts() (and of a second connection beside it): builds one secondary index the model''s embedding table lacks that no other session is building and returns its name; NULL when none is left to this session (texts still queued while other sessions index: they build at their end)';

CREATE OR REPLACE FUNCTION omop_emb_internal.secondary_index_names(model text) RETURNS text[]
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "secondary_index_names", model)
$$;
COMMENT ON FUNCTION omop_emb_internal.secondary_index_names(text) IS
'Internal: the names of the secondary indexes index_build_next builds for a model (a bulk import leaves them to it: omop_emb.import_end(model, build_indexes => false))';

CREATE OR REPLACE FUNCTION omop_emb_internal.index_finish(model text) RETURNS boolean
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "index_finish", model)
$$;
COMMENT ON FUNCTION omop_emb_internal.index_finish(text) IS 'Internal last step of index_concepts(): refreshes planner statistics of the embedding table';

-- SECURITY INVOKER: the model's vocabulary is read with the caller's rights
-- (plain tables only), and its rows handed as values to the definer step.
CREATE OR REPLACE FUNCTION omop_emb_internal.upsert_concept_texts_store(
    concept_ids integer[], texts text[], model text, attributes text)
RETURNS integer
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
AS $$
return @RT@.call(plpy, "upsert_concept_texts_store", concept_ids, texts, model, attributes)
$$;
COMMENT ON FUNCTION omop_emb_internal.upsert_concept_texts_store(integer[], text[], text, text) IS
'Internal step of upsert_concept_texts(): embeds and stores the texts, with the attributes (JSON {concept_id: vocabulary row}) its caller read';

CREATE OR REPLACE FUNCTION omop_emb.upsert_concept_texts(concept_ids integer[], texts text[], model text DEFAULT NULL)
RETURNS integer
LANGUAGE plpython3u VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $$
plpy.execute("SELECT omop_emb_internal.load_runtime()")
return GD["omop_emb"].call(plpy, "upsert_concept_texts", concept_ids, texts, model)
$$;
COMMENT ON FUNCTION omop_emb.upsert_concept_texts(integer[], text[], text) IS
'Embed texts with the DOCUMENT role and store them as the names of the given concepts (replacing their previous name rows), for concepts that are not in a vocabulary table (the seed''s embed_and_upsert_concepts). Attributes come from the model''s vocabulary when it has the concept; otherwise the concept counts as standard and valid. Returns the number stored.';
