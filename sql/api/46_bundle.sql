-- Embedding bundles (omop-emb-pg export / import): a model's embeddings written
-- once, on the machine with the GPU, and loaded into any database that registered
-- the same model. Administrator only. These functions never read a relation the
-- caller named: export returns pages; import reads only the temporary tables that
-- import_begin itself creates (see there).

CREATE OR REPLACE FUNCTION omop_emb.export_embeddings(
    model text,
    after_concept_id integer DEFAULT NULL,
    after_text_kind text DEFAULT NULL,
    after_text text DEFAULT NULL,
    max_rows integer DEFAULT 10000)
RETURNS TABLE (concept_id integer, text_kind text, text text, text_hash bytea,
               source_concept_id integer, source_code text, concept_name text, domain_id text,
               vocabulary_id text, concept_class_id text, standard_concept text,
               invalid_reason text, embedding vector)
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
DECLARE
    mid integer;
    prefix text;
    salt text;
    vschema text;
BEGIN
    -- salt: omop_emb_indb.vectors.identity_salt (the model's identity version,
    -- which is this database's own count: a bundle carries the unsalted hash).
    SELECT m.model_id, m.document_prefix,
           CASE WHEN m.identity_version > 0 THEN 'omop_emb identity ' || m.identity_version || E'\n' ELSE '' END
      INTO mid, prefix, salt
      FROM omop_emb.model m WHERE m.name = export_embeddings.model;
    IF mid IS NULL THEN
        RAISE EXCEPTION 'omop_emb: unknown model %', pg_catalog.quote_literal(export_embeddings.model)
            USING ERRCODE = 'OE004', HINT = 'omop_emb.models lists the registered models.';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 1000000 THEN
        RAISE EXCEPTION 'omop_emb: max_rows = % is outside 1..1000000', max_rows USING ERRCODE = '22023';
    END IF;
    SELECT n.nspname INTO vschema FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector';
    -- Pages in primary-key order (keyset: the last row of the previous page). Rows
    -- of an older identity of the model (stale, waiting for re-embedding) are left out.
    -- (Two statements rather than "$1 IS NULL OR ...": the row comparison must be
    -- an index condition on the primary key, or every page scans and sorts the table.)
    RETURN QUERY EXECUTE pg_catalog.format(
        'SELECT e.concept_id, e.text_kind, e.text, '
        'pg_catalog.sha256(pg_catalog.convert_to($5 || e.text, ''UTF8'')), e.source_concept_id, '
        'e.source_code, e.concept_name, e.domain_id, e.vocabulary_id, e.concept_class_id, '
        'e.standard_concept, e.invalid_reason, e.embedding::%I.vector FROM omop_emb.embedding_%s e '
        'WHERE %s e.text_hash = pg_catalog.sha256(pg_catalog.convert_to($6 || $5 || e.text, ''UTF8'')) '
        'ORDER BY e.concept_id, e.text_kind, e.text LIMIT $4', vschema, mid,
        CASE WHEN after_concept_id IS NULL THEN '' ELSE '(e.concept_id, e.text_kind, e.text) > ($1, $2, $3) AND' END)
        USING after_concept_id, after_text_kind, after_text, max_rows, prefix, salt;
END
$$;
COMMENT ON FUNCTION omop_emb.export_embeddings(text, integer, text, text, integer) IS
'One page (max_rows, in primary-key order after the given key) of a model''s stored embeddings with the exact hash of the text sent (document prefix included); read by omop-emb-pg export, which writes them with the model''s identity to a Parquet bundle.';

-- An import is one transaction of one session:
--   import_begin(model, bundle)  checks the bundle's identity against the model and
--       creates the session's staging tables pg_temp.omop_emb_import_row (the
--       texts) and pg_temp.omop_emb_import_vector (the vectors), joined on ord;
--   COPY ... FROM STDIN (FORMAT BINARY) into both (the client), then
--   import_chunk(model) moves the staged rows into the model (as often as wanted);
--   import_end(model) finishes (import_end(model, build_indexes => false): the
--       caller builds the secondary indexes after commit, several at once).
-- The staging tables are made by this SECURITY DEFINER code, so they belong to the
-- extension owner: the caller may INSERT (COPY) into them and nothing else (no
-- trigger, rule, policy, column or default of its own can be added), no other
-- session can see them, and each step checks that they are still the owner's
-- before reading them. Temporary, created in the import's transaction and dropped
-- at its end: no WAL, and each chunk's TRUNCATE reuses the same storage.
--
-- Bulk mode: when the model's table is empty, import_begin locks it (ACCESS
-- EXCLUSIVE: searches of this model wait until the import commits; they would
-- find nothing anyway), drops its secondary indexes (every index but the primary
-- key) and import_end builds them again: building an index once over all rows is
-- several times cheaper than maintaining it row by row. An HNSW index of the
-- empty table is dropped too and the model's index method becomes 'none' (exact
-- search); import_end returns its parameters so that the caller rebuilds it after
-- commit with create_index (which keeps searches running meanwhile).
-- Rebuild mode: the same when the table holds at most a tenth as many rows as
-- the bundle (the caller passes its row count as bundle->'rows'), but rows are
-- merged as in merge mode (present texts skipped or updated).

CREATE OR REPLACE FUNCTION omop_emb.import_begin(model text, bundle jsonb)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
AS $$
DECLARE
    m record;
    vschema text;
    diffs text[] := '{}';
    field text;
    tbl text;
    bulk boolean;
    mode text := 'merge';
    small bigint;
    held bigint;
    ddl text[] := '{}';
    names text[] := '{}';
    hnsw jsonb;
    r record;
BEGIN
    SELECT * INTO m FROM omop_emb.model x WHERE x.name OPERATOR(pg_catalog.=) import_begin.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'omop_emb: unknown model %', pg_catalog.quote_literal(import_begin.model)
            USING ERRCODE = 'OE004',
                  HINT = 'Register the bundle''s model first (omop-emb-pg import prints its identity).';
    END IF;
    -- The bundle must come from the same model: same vectors for the same text.
    FOREACH field IN ARRAY ARRAY['provider', 'remote_model', 'dimensions', 'metric',
                                 'document_prefix', 'query_prefix'] LOOP
        IF (bundle OPERATOR(pg_catalog.->>) field) IS DISTINCT FROM (pg_catalog.to_jsonb(m) OPERATOR(pg_catalog.->>) field) THEN
            diffs := diffs OPERATOR(pg_catalog.||) pg_catalog.format('%s: bundle %s, model %s', field,
                COALESCE(pg_catalog.quote_literal(bundle OPERATOR(pg_catalog.->>) field), 'missing'),
                pg_catalog.quote_literal(pg_catalog.to_jsonb(m) OPERATOR(pg_catalog.->>) field));
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(diffs) OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION 'omop_emb: the bundle of model % does not match registered model %',
            pg_catalog.quote_literal(COALESCE(bundle OPERATOR(pg_catalog.->>) 'name', '?')), pg_catalog.quote_literal(m.name)
            USING ERRCODE = '22023', DETAIL = pg_catalog.array_to_string(diffs, '; '),
                  HINT = 'Import it into a model registered with the bundle''s identity, or export the bundle from a model like this one.';
    END IF;
    IF pg_catalog.to_regclass('pg_temp.omop_emb_import_state') IS NOT NULL
       OR pg_catalog.to_regclass('pg_temp.omop_emb_import_row') IS NOT NULL
       OR pg_catalog.to_regclass('pg_temp.omop_emb_import_vector') IS NOT NULL THEN
        RAISE EXCEPTION 'omop_emb: an import is already under way in this session (or a relation named pg_temp.omop_emb_import_* exists)'
            USING ERRCODE = '55000',
                  HINT = 'Finish it with omop_emb.import_end() or roll its transaction back; drop a temporary relation of that name.';
    END IF;
    SELECT x.nspname INTO vschema FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace x ON x.oid OPERATOR(pg_catalog.=) e.extnamespace WHERE e.extname OPERATOR(pg_catalog.=) 'vector';
    CREATE TEMPORARY TABLE omop_emb_import_state (
        model_id pg_catalog.int4 NOT NULL, mode pg_catalog.text NOT NULL,
        index_ddl pg_catalog.text[] NOT NULL, hnsw pg_catalog.jsonb) ON COMMIT DROP;
    CREATE TEMPORARY TABLE omop_emb_import_row (
        ord pg_catalog.int4 NOT NULL, concept_id pg_catalog.int4, text_kind pg_catalog.text,
        text pg_catalog.text, text_hash pg_catalog.bytea, source_concept_id pg_catalog.int4,
        source_code pg_catalog.text, concept_name pg_catalog.text, domain_id pg_catalog.text,
        vocabulary_id pg_catalog.text, concept_class_id pg_catalog.text,
        standard_concept pg_catalog.text, invalid_reason pg_catalog.text) ON COMMIT DROP;
    EXECUTE pg_catalog.format('CREATE TEMPORARY TABLE omop_emb_import_vector (ord pg_catalog.int4 NOT NULL, '
                              'embedding %I.vector(%s) NOT NULL) ON COMMIT DROP', vschema, m.dimensions);
    GRANT INSERT ON pg_temp.omop_emb_import_row, pg_temp.omop_emb_import_vector TO omop_emb_admin;

    tbl := pg_catalog.format('omop_emb.embedding_%s', m.model_id);
    -- "Few rows": at most a tenth of the bundle's (counted up to that bound only).
    small := CASE WHEN pg_catalog.jsonb_typeof(bundle OPERATOR(pg_catalog.->) 'rows') OPERATOR(pg_catalog.=) 'number'
                  THEN GREATEST(0, LEAST((bundle OPERATOR(pg_catalog.->>) 'rows')::pg_catalog.numeric, 1e15)::pg_catalog.int8
                                   OPERATOR(pg_catalog./) 10) ELSE 0 END;
    FOR pass IN 1..2 LOOP
        EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM (SELECT FROM %s LIMIT $1) x', tbl)
            INTO held USING small OPERATOR(pg_catalog.+) 1;
        EXIT WHEN held OPERATOR(pg_catalog.>) small;
        IF pass OPERATOR(pg_catalog.=) 1 THEN
            EXECUTE pg_catalog.format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', tbl);
        ELSE
            mode := CASE WHEN held OPERATOR(pg_catalog.=) 0 THEN 'bulk' ELSE 'rebuild' END;
        END IF;
    END LOOP;
    bulk := mode OPERATOR(pg_catalog.<>) 'merge';
    IF bulk THEN
        FOR r IN SELECT c.relname::pg_catalog.text AS name, pg_catalog.pg_get_indexdef(i.indexrelid) AS def,
                        a.amname::pg_catalog.text AS am
                 FROM pg_catalog.pg_index i
                 JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid
                 JOIN pg_catalog.pg_am a ON a.oid OPERATOR(pg_catalog.=) c.relam
                 WHERE i.indrelid OPERATOR(pg_catalog.=) tbl::pg_catalog.regclass AND NOT i.indisprimary
                 ORDER BY c.relname LOOP
            IF r.am OPERATOR(pg_catalog.=) 'hnsw' THEN
                hnsw := COALESCE(m.index_params, '{}'::pg_catalog.jsonb)
                        OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('metric', m.metric);
            ELSE
                ddl := ddl OPERATOR(pg_catalog.||) r.def;
            END IF;
            names := names OPERATOR(pg_catalog.||) r.name;
        END LOOP;
        FOREACH field IN ARRAY names LOOP
            EXECUTE pg_catalog.format('DROP INDEX omop_emb.%I', field);
        END LOOP;
        IF hnsw IS NOT NULL THEN
            UPDATE omop_emb.model x SET index_method = 'none',
                generation = pg_catalog.nextval('omop_emb.model_generation_seq'::pg_catalog.regclass)
            WHERE x.model_id OPERATOR(pg_catalog.=) m.model_id;
        END IF;
    END IF;
    INSERT INTO pg_temp.omop_emb_import_state VALUES (m.model_id, mode, ddl, hnsw);
    RETURN mode;
END
$$;
COMMENT ON FUNCTION omop_emb.import_begin(text, jsonb) IS
'Start loading an embedding bundle into a model (omop-emb-pg import drives it, in one transaction): refuses a bundle whose identity (provider, remote_model, dimensions, metric, document_prefix, query_prefix) differs from the model''s, naming each field; creates the session''s staging tables pg_temp.omop_emb_import_row and pg_temp.omop_emb_import_vector (the caller COPYs into them; dropped at commit). Returns ''bulk'' when the model''s table was empty (then it is locked until commit, its secondary indexes are dropped and rebuilt by import_end, and an HNSW index is dropped for the caller to rebuild after commit), ''rebuild'' when it held at most a tenth of bundle->''rows'' rows (the same, rows merged) or ''merge''.';

-- The session's import state, after checking that the staging tables are the
-- ones import_begin made (owned by this function's owner, plain tables).
CREATE OR REPLACE FUNCTION omop_emb_internal.import_state(model text)
RETURNS TABLE (model_id integer, mode text, index_ddl text[], hnsw jsonb, document_prefix text, salt text,
               storage text, dimensions integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
AS $$
DECLARE
    mid integer;
BEGIN
    IF (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class c
        WHERE c.relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()
          AND c.relname OPERATOR(pg_catalog.=) ANY (ARRAY['omop_emb_import_state', 'omop_emb_import_row',
                                                          'omop_emb_import_vector']::pg_catalog.name[])
          AND c.relkind OPERATOR(pg_catalog.=) 'r'
          AND c.relowner OPERATOR(pg_catalog.=) (SELECT r.oid FROM pg_catalog.pg_roles r
                                                 WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER))
       OPERATOR(pg_catalog.<>) 3 THEN
        RAISE EXCEPTION 'omop_emb: no import under way in this transaction'
            USING ERRCODE = '55000', HINT = 'Call omop_emb.import_begin(model, bundle) first, in the same transaction.';
    END IF;
    SELECT x.model_id INTO mid FROM omop_emb.model x WHERE x.name OPERATOR(pg_catalog.=) import_state.model;
    RETURN QUERY
        SELECT s.model_id, s.mode, s.index_ddl, s.hnsw, m.document_prefix,
               CASE WHEN m.identity_version OPERATOR(pg_catalog.>) 0
                    THEN 'omop_emb identity ' OPERATOR(pg_catalog.||) m.identity_version OPERATOR(pg_catalog.||) E'\n'
                    ELSE '' END,
               m.storage, m.dimensions
        FROM pg_temp.omop_emb_import_state s JOIN omop_emb.model m ON m.model_id OPERATOR(pg_catalog.=) s.model_id
        WHERE s.model_id OPERATOR(pg_catalog.=) mid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'omop_emb: the import under way in this transaction is not one into model %',
            pg_catalog.quote_literal(import_state.model)
            USING ERRCODE = '55000', HINT = 'Pass the model given to omop_emb.import_begin().';
    END IF;
END
$$;
COMMENT ON FUNCTION omop_emb_internal.import_state(text) IS
'The import of embedding bundle rows under way in this transaction (internal: import_chunk and import_end check with it that the staging tables are import_begin''s).';

CREATE OR REPLACE FUNCTION omop_emb.import_chunk(model text)
RETURNS TABLE (imported bigint, skipped bigint, queued bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
-- The staging tables have no statistics: without this the planner may sort the
-- vectors (a merge join, spilling to disk) instead of hashing the rows.
SET enable_mergejoin = off
AS $$
DECLARE
    st record;
    vschema text;
    n_rows bigint;
    n_vectors bigint;
    n_imported bigint;
    n_queued bigint;
BEGIN
    SELECT * INTO st FROM omop_emb_internal.import_state(import_chunk.model);
    SELECT pg_catalog.count(*) INTO n_rows FROM pg_temp.omop_emb_import_row;
    SELECT pg_catalog.count(*) INTO n_vectors FROM pg_temp.omop_emb_import_vector;
    IF n_rows OPERATOR(pg_catalog.<>) n_vectors THEN
        RAISE EXCEPTION 'omop_emb: % rows and % vectors are staged: every row needs its vector (same ord)', n_rows, n_vectors
            USING ERRCODE = '22023';
    END IF;
    SELECT x.nspname INTO vschema FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace x ON x.oid OPERATOR(pg_catalog.=) e.extnamespace WHERE e.extname OPERATOR(pg_catalog.=) 'vector';
    -- A row whose hash is the hash of this model's document prefix + text is
    -- stored (with the hash salted by this database's identity version of the
    -- model, omop_emb_indb.vectors.identity_hash) unless the same text with the
    -- same hash is there already, and taken off the queue; any other row was
    -- embedded from another text: it is queued for re-embedding instead.
    -- (Data-modifying WITH queries run to completion whether read or not.)
    IF st.mode OPERATOR(pg_catalog.=) 'bulk' THEN
        -- The table held nothing when import_begin locked it: each row is
        -- inserted as it is (a text twice in the bundle is a duplicate key
        -- error), by plain statements (no row is carried from one to the next).
        EXECUTE pg_catalog.format($sql$
            INSERT INTO omop_emb.embedding_%1$s (concept_id, text_kind, text, text_hash,
                source_concept_id, source_code, concept_name, domain_id, vocabulary_id,
                concept_class_id, standard_concept, invalid_reason, embedding)
            SELECT r.concept_id, r.text_kind, r.text,
                   CASE WHEN $2 OPERATOR(pg_catalog.=) '' THEN r.text_hash
                        ELSE pg_catalog.sha256(pg_catalog.convert_to($2 OPERATOR(pg_catalog.||) $1 OPERATOR(pg_catalog.||) r.text, 'UTF8')) END,
                   r.source_concept_id, r.source_code, r.concept_name, r.domain_id, r.vocabulary_id,
                   r.concept_class_id, r.standard_concept, r.invalid_reason, v.embedding::%2$I.%3$s(%4$s)
            FROM pg_temp.omop_emb_import_row r
            JOIN pg_temp.omop_emb_import_vector v ON v.ord OPERATOR(pg_catalog.=) r.ord
            WHERE r.text_hash OPERATOR(pg_catalog.=) pg_catalog.sha256(pg_catalog.convert_to($1 OPERATOR(pg_catalog.||) r.text, 'UTF8'))
            $sql$, st.model_id, vschema, st.storage, st.dimensions)
            USING st.document_prefix, st.salt;
        GET DIAGNOSTICS n_imported = ROW_COUNT;
        IF EXISTS (SELECT FROM omop_emb.index_queue q WHERE q.model_id OPERATOR(pg_catalog.=) st.model_id) THEN
            EXECUTE $sql$
                DELETE FROM omop_emb.index_queue q USING pg_temp.omop_emb_import_row r
                WHERE q.model_id OPERATOR(pg_catalog.=) $3 AND q.concept_id OPERATOR(pg_catalog.=) r.concept_id
                  AND q.text_kind OPERATOR(pg_catalog.=) r.text_kind AND q.text OPERATOR(pg_catalog.=) r.text
                  AND r.text_hash OPERATOR(pg_catalog.=) pg_catalog.sha256(pg_catalog.convert_to($1 OPERATOR(pg_catalog.||) r.text, 'UTF8'))
                $sql$ USING st.document_prefix, st.salt, st.model_id;
        END IF;
        EXECUTE $sql$
            INSERT INTO omop_emb.index_queue (model_id, concept_id, text_kind, text, text_hash,
                source_concept_id, source_code, concept_name, domain_id, vocabulary_id,
                concept_class_id, standard_concept, invalid_reason)
            SELECT $3, r.concept_id, r.text_kind, r.text,
                   pg_catalog.sha256(pg_catalog.convert_to($2 OPERATOR(pg_catalog.||) $1 OPERATOR(pg_catalog.||) r.text, 'UTF8')),
                   r.source_concept_id, r.source_code, r.concept_name, r.domain_id, r.vocabulary_id,
                   r.concept_class_id, r.standard_concept, r.invalid_reason
            FROM pg_temp.omop_emb_import_row r
            WHERE r.text_hash IS DISTINCT FROM pg_catalog.sha256(pg_catalog.convert_to($1 OPERATOR(pg_catalog.||) r.text, 'UTF8'))
            ON CONFLICT (model_id, concept_id, text_kind, text) DO UPDATE SET text_hash = EXCLUDED.text_hash
            $sql$ USING st.document_prefix, st.salt, st.model_id;
        GET DIAGNOSTICS n_queued = ROW_COUNT;
        RETURN QUERY SELECT n_imported, 0::pg_catalog.int8, n_queued;
    ELSE
        RETURN QUERY EXECUTE pg_catalog.format($sql$
            WITH b AS MATERIALIZED (
                SELECT x.*, CASE WHEN $2 OPERATOR(pg_catalog.=) '' THEN x.expected
                                 ELSE pg_catalog.sha256(pg_catalog.convert_to($2 OPERATOR(pg_catalog.||) $1 OPERATOR(pg_catalog.||) x.text, 'UTF8')) END AS stored
                FROM (SELECT r.*, pg_catalog.sha256(pg_catalog.convert_to($1 OPERATOR(pg_catalog.||) r.text, 'UTF8')) AS expected
                      FROM pg_temp.omop_emb_import_row r) x
            ), good AS (
                SELECT b.* FROM b WHERE b.text_hash OPERATOR(pg_catalog.=) b.expected
                  AND NOT EXISTS (SELECT FROM omop_emb.embedding_%1$s e WHERE e.concept_id OPERATOR(pg_catalog.=) b.concept_id
                                  AND e.text_kind OPERATOR(pg_catalog.=) b.text_kind AND e.text OPERATOR(pg_catalog.=) b.text
                                  AND e.text_hash OPERATOR(pg_catalog.=) b.stored)
            ), ins AS (
                INSERT INTO omop_emb.embedding_%1$s AS e (concept_id, text_kind, text, text_hash,
                    source_concept_id, source_code, concept_name, domain_id, vocabulary_id,
                    concept_class_id, standard_concept, invalid_reason, embedding)
                SELECT g.concept_id, g.text_kind, g.text, g.stored, g.source_concept_id, g.source_code,
                       g.concept_name, g.domain_id, g.vocabulary_id, g.concept_class_id,
                       g.standard_concept, g.invalid_reason, v.embedding::%2$I.%3$s(%4$s)
                FROM good g JOIN pg_temp.omop_emb_import_vector v ON v.ord OPERATOR(pg_catalog.=) g.ord
                ON CONFLICT (concept_id, text_kind, text) DO UPDATE SET text_hash = EXCLUDED.text_hash,
                    source_concept_id = EXCLUDED.source_concept_id, source_code = EXCLUDED.source_code,
                    embedding = EXCLUDED.embedding, embedded_at = pg_catalog.now()
                RETURNING e.concept_id, e.text_kind, e.text
            ), dequeued AS (
                DELETE FROM omop_emb.index_queue q USING ins
                WHERE q.model_id OPERATOR(pg_catalog.=) %1$s AND q.concept_id OPERATOR(pg_catalog.=) ins.concept_id
                  AND q.text_kind OPERATOR(pg_catalog.=) ins.text_kind AND q.text OPERATOR(pg_catalog.=) ins.text
                RETURNING 1
            ), requeued AS (
                INSERT INTO omop_emb.index_queue (model_id, concept_id, text_kind, text, text_hash,
                    source_concept_id, source_code, concept_name, domain_id, vocabulary_id,
                    concept_class_id, standard_concept, invalid_reason)
                SELECT %1$s, b.concept_id, b.text_kind, b.text, b.stored, b.source_concept_id,
                       b.source_code, b.concept_name, b.domain_id, b.vocabulary_id, b.concept_class_id,
                       b.standard_concept, b.invalid_reason
                FROM b WHERE b.text_hash IS DISTINCT FROM b.expected
                ON CONFLICT (model_id, concept_id, text_kind, text) DO UPDATE SET text_hash = EXCLUDED.text_hash
                RETURNING 1
            )
            SELECT (SELECT pg_catalog.count(*) FROM ins),
                   (SELECT pg_catalog.count(*) FROM b WHERE b.text_hash OPERATOR(pg_catalog.=) b.expected)
                     OPERATOR(pg_catalog.-) (SELECT pg_catalog.count(*) FROM ins),
                   (SELECT pg_catalog.count(*) FROM requeued)
            $sql$, st.model_id, vschema, st.storage, st.dimensions)
            USING st.document_prefix, st.salt;
    END IF;
    TRUNCATE pg_temp.omop_emb_import_row, pg_temp.omop_emb_import_vector;
END
$$;
COMMENT ON FUNCTION omop_emb.import_chunk(text) IS
'Move the rows staged (COPY) in pg_temp.omop_emb_import_row / omop_emb_import_vector into the model of the import under way (import_begin) and empty the staging tables. A row whose text_hash is the hash of the model''s document prefix + text is stored unless that text with that hash is there already, and leaves the queue; any other row is queued for re-embedding. Returns imported, skipped (present with the same hash), queued.';

CREATE OR REPLACE FUNCTION omop_emb.import_end(model text, build_indexes boolean DEFAULT true)
RETURNS TABLE (mode text, indexes_built integer, hnsw jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
AS $$
DECLARE
    st record;
    ddl text;
    later text[] := '{}';
BEGIN
    SELECT * INTO st FROM omop_emb_internal.import_state(import_end.model);
    IF (SELECT pg_catalog.count(*) FROM pg_temp.omop_emb_import_row) OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION 'omop_emb: rows are staged but not imported' USING ERRCODE = '55000',
            HINT = 'Call omop_emb.import_chunk() first.';
    END IF;
    IF st.mode OPERATOR(pg_catalog.<>) 'merge' THEN
        -- The definitions were read from the catalog by import_begin in this
        -- transaction; the state table is the owner's (import_state checked it).
        -- build_indexes => false: the model's own secondary indexes are left to the
        -- caller, who builds them after commit on several connections at once
        -- (omop_emb_internal.index_build_next, then index_finish): PostgreSQL builds
        -- each on one core, and the two GIN indexes are most of the time. Any other
        -- index the table had is built here.
        IF NOT build_indexes THEN
            later := omop_emb_internal.secondary_index_names(import_end.model);
        END IF;
        FOREACH ddl IN ARRAY st.index_ddl LOOP
            CONTINUE WHEN pg_catalog.substring(ddl, '^CREATE (?:UNIQUE )?INDEX (\S+) ON ')
                          OPERATOR(pg_catalog.=) ANY (later);
            EXECUTE ddl;
        END LOOP;
        IF build_indexes THEN
            -- index_concepts' last step: builds the secondary indexes the table still
            -- lacks (a first indexing that stopped midway leaves them out), ANALYZE.
            PERFORM omop_emb_internal.index_finish(import_end.model);
        END IF;
        IF st.hnsw IS NOT NULL THEN
            RAISE NOTICE 'omop_emb: the HNSW index of model % was dropped for the import: searches are exact until omop_emb.create_index(%, ''hnsw'', %, %, %) rebuilds it',
                pg_catalog.quote_literal(import_end.model), pg_catalog.quote_literal(import_end.model),
                COALESCE(st.hnsw OPERATOR(pg_catalog.->>) 'm', '16'),
                COALESCE(st.hnsw OPERATOR(pg_catalog.->>) 'ef_construction', '128'),
                pg_catalog.quote_literal(st.hnsw OPERATOR(pg_catalog.->>) 'metric');
        END IF;
    END IF;
    DROP TABLE pg_temp.omop_emb_import_row, pg_temp.omop_emb_import_vector, pg_temp.omop_emb_import_state;
    -- (bulk and rebuild: every secondary index there now was built by this step)
    RETURN QUERY SELECT st.mode,
        CASE WHEN st.mode OPERATOR(pg_catalog.=) 'merge' THEN 0 ELSE
            (SELECT pg_catalog.count(*)::pg_catalog.int4 FROM pg_catalog.pg_index i
             JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid
             JOIN pg_catalog.pg_am a ON a.oid OPERATOR(pg_catalog.=) c.relam
             WHERE i.indrelid OPERATOR(pg_catalog.=) pg_catalog.format('omop_emb.embedding_%s', st.model_id)::pg_catalog.regclass
               AND NOT i.indisprimary AND a.amname OPERATOR(pg_catalog.<>) 'hnsw') END,
        st.hnsw;
END
$$;
COMMENT ON FUNCTION omop_emb.import_end(text, boolean) IS
'Finish the import under way (import_begin): in bulk and rebuild mode build the secondary indexes dropped by import_begin again, and any other the table lacks, and ANALYZE it (omop_emb_internal.index_finish); with build_indexes => false the model''s own secondary indexes (omop_emb_internal.secondary_index_names) are left to the caller, to build after commit with omop_emb_internal.index_build_next on several connections, then index_finish. Drops the staging tables. Returns the mode, the number of indexes built and, when an HNSW index was dropped, its parameters (m, ef_construction, metric) for omop_emb.create_index after commit.';
