-- omop_emb 0.2.0: index_queue without its foreign key to omop_emb.model. The key was
-- checked once per queued row: queueing the 100,000 texts of a first indexing took
-- 1.6-1.9 s with it and 0.4-0.5 s without it and without ON CONFLICT (which the
-- first queueing of a model no longer uses either; indexing.IndexingMixin.index_prepare).
-- drop_model deletes the model's queued texts itself (it was the key's ON DELETE
-- CASCADE); nothing else deletes a model row.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT k.conname FROM pg_catalog.pg_constraint k
             WHERE k.conrelid OPERATOR(pg_catalog.=) 'omop_emb.index_queue'::pg_catalog.regclass
               AND k.contype OPERATOR(pg_catalog.=) 'f'
    LOOP
        EXECUTE pg_catalog.format('ALTER TABLE omop_emb.index_queue DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;
