-- omop_emb 0.2.0: omop_emb.fold_text folds every Unicode space and control
-- character and the dotted I and final sigma (issue 12); the exact-match
-- indexes of the models were built with the 0.1.0 fold and are rebuilt.
DO $refold$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT m.model_id FROM omop_emb.model m ORDER BY m.model_id LOOP
        IF pg_catalog.to_regclass(pg_catalog.format('omop_emb.embedding_%s_fold', r.model_id)) IS NOT NULL THEN
            EXECUTE pg_catalog.format('REINDEX INDEX omop_emb.%I', 'embedding_' || r.model_id || '_fold');
        END IF;
    END LOOP;
END
$refold$;
