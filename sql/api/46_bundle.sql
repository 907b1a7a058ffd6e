-- Embedding bundles (omop-emb-pg export / import): a model's embeddings written
-- once, on the machine with the GPU, and loaded into any database that registered
-- the same model. Administrator only. The client reads the Parquet file and hands
-- the rows over as arrays: these functions never read a relation the caller named.

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

CREATE OR REPLACE FUNCTION omop_emb.import_embeddings(
    model text,
    bundle jsonb,
    concept_ids integer[], text_kinds text[], texts text[], text_hashes bytea[],
    source_concept_ids integer[], source_codes text[], concept_names text[], domain_ids text[],
    vocabulary_ids text[], concept_class_ids text[], standard_concepts text[],
    invalid_reasons text[], embeddings vector[])
RETURNS TABLE (imported bigint, skipped bigint, queued bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
AS $$
DECLARE
    m record;
    vschema text;
    diffs text[] := '{}';
    field text;
    n integer := pg_catalog.cardinality(concept_ids);
BEGIN
    SELECT * INTO m FROM omop_emb.model x WHERE x.name = import_embeddings.model;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'omop_emb: unknown model %', pg_catalog.quote_literal(import_embeddings.model)
            USING ERRCODE = 'OE004',
                  HINT = 'Register the bundle''s model first (omop-emb-pg import prints its identity).';
    END IF;
    -- The bundle must come from the same model: same vectors for the same text.
    FOREACH field IN ARRAY ARRAY['provider', 'remote_model', 'dimensions', 'metric',
                                 'document_prefix', 'query_prefix'] LOOP
        IF (bundle ->> field) IS DISTINCT FROM (pg_catalog.to_jsonb(m) ->> field) THEN
            diffs := diffs || pg_catalog.format('%s: bundle %s, model %s', field,
                COALESCE(pg_catalog.quote_literal(bundle ->> field), 'missing'),
                pg_catalog.quote_literal(pg_catalog.to_jsonb(m) ->> field));
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(diffs) > 0 THEN
        RAISE EXCEPTION 'omop_emb: the bundle of model % does not match registered model %',
            pg_catalog.quote_literal(COALESCE(bundle ->> 'name', '?')), pg_catalog.quote_literal(m.name)
            USING ERRCODE = '22023', DETAIL = pg_catalog.array_to_string(diffs, '; '),
                  HINT = 'Import it into a model registered with the bundle''s identity, or export the bundle from a model like this one.';
    END IF;
    IF n IS NULL OR n = 0 THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF pg_catalog.cardinality(embeddings) IS DISTINCT FROM n OR pg_catalog.cardinality(texts) IS DISTINCT FROM n
       OR pg_catalog.cardinality(text_kinds) IS DISTINCT FROM n OR pg_catalog.cardinality(text_hashes) IS DISTINCT FROM n THEN
        RAISE EXCEPTION 'omop_emb: the arrays of one import call differ in length (% concept ids)', n
            USING ERRCODE = '22023';
    END IF;
    SELECT x.nspname INTO vschema FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace x ON x.oid = e.extnamespace WHERE e.extname = 'vector';
    -- A row whose hash is the hash of this model's document prefix + text is
    -- stored (with the hash salted by this database's identity version of the
    -- model, omop_emb_indb.vectors.identity_hash) (unless the same text with the same hash is there already) and taken
    -- off the queue; any other row was embedded from another text: it is queued
    -- for re-embedding instead.
    RETURN QUERY EXECUTE pg_catalog.format($sql$
        WITH b AS (
            SELECT u.*, pg_catalog.sha256(pg_catalog.convert_to($14 || u.text, 'UTF8')) AS expected,
                   pg_catalog.sha256(pg_catalog.convert_to($15 || $14 || u.text, 'UTF8')) AS stored
            FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3),
                            pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6),
                            pg_catalog.unnest($7), pg_catalog.unnest($8), pg_catalog.unnest($9),
                            pg_catalog.unnest($10), pg_catalog.unnest($11), pg_catalog.unnest($12),
                            pg_catalog.unnest($13))
                 AS u(concept_id, text_kind, text, text_hash, source_concept_id, source_code,
                      concept_name, domain_id, vocabulary_id, concept_class_id, standard_concept,
                      invalid_reason, embedding)
        ), good AS (
            SELECT b.* FROM b WHERE b.text_hash = b.expected
              AND NOT EXISTS (SELECT 1 FROM omop_emb.embedding_%1$s e WHERE e.concept_id = b.concept_id
                              AND e.text_kind = b.text_kind AND e.text = b.text AND e.text_hash = b.stored)
        ), ins AS (
            INSERT INTO omop_emb.embedding_%1$s AS e (concept_id, text_kind, text, text_hash,
                source_concept_id, source_code, concept_name, domain_id, vocabulary_id,
                concept_class_id, standard_concept, invalid_reason, embedding)
            SELECT g.concept_id, g.text_kind, g.text, g.stored, g.source_concept_id, g.source_code,
                   g.concept_name, g.domain_id, g.vocabulary_id, g.concept_class_id,
                   g.standard_concept, g.invalid_reason, g.embedding::%2$I.%3$s(%4$s)
            FROM good g
            ON CONFLICT (concept_id, text_kind, text) DO UPDATE SET text_hash = EXCLUDED.text_hash,
                source_concept_id = EXCLUDED.source_concept_id, source_code = EXCLUDED.source_code,
                embedding = EXCLUDED.embedding, embedded_at = pg_catalog.now()
            RETURNING e.concept_id, e.text_kind, e.text
        ), dequeued AS (
            DELETE FROM omop_emb.index_queue q USING ins
            WHERE q.model_id = %1$s AND q.concept_id = ins.concept_id AND q.text_kind = ins.text_kind
              AND q.text = ins.text
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
               (SELECT pg_catalog.count(*) FROM b WHERE b.text_hash = b.expected)
                 - (SELECT pg_catalog.count(*) FROM ins),
               (SELECT pg_catalog.count(*) FROM b WHERE b.text_hash IS DISTINCT FROM b.expected)
               + 0 * (SELECT pg_catalog.count(*) FROM dequeued) + 0 * (SELECT pg_catalog.count(*) FROM requeued)
        $sql$, m.model_id, vschema, m.storage, m.dimensions)
        USING concept_ids, text_kinds, texts, text_hashes, source_concept_ids, source_codes,
              concept_names, domain_ids, vocabulary_ids, concept_class_ids, standard_concepts,
              invalid_reasons, embeddings, m.document_prefix,
              CASE WHEN m.identity_version > 0 THEN 'omop_emb identity ' || m.identity_version || E'\n' ELSE '' END;
END
$$;
COMMENT ON FUNCTION omop_emb.import_embeddings(text, jsonb, integer[], text[], text[], bytea[], integer[], text[], text[], text[], text[], text[], text[], text[], vector[]) IS
'Load rows of an embedding bundle into a model (omop-emb-pg import calls it with arrays of up to some thousand rows). Refuses a bundle whose identity (provider, remote_model, dimensions, metric, document_prefix, query_prefix) differs from the model''s. A row whose text_hash is the hash of the model''s document prefix + text is stored unless that text with that hash is there already, and leaves the queue; any other row is queued for re-embedding. Returns imported, skipped (present with the same hash), queued.';
