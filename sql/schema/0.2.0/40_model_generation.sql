-- omop_emb 0.2.0: what produced a model's vectors, and a generation number that
-- sessions compare to drop what they cached (issue 12, items 4 and 5).
--
-- generation: drawn from one sequence, so that a model re-registered under the
-- same id never reuses a number; bumped by every DDL-like change (create_index,
-- alter_model of what produces vectors, the end of the re-index that follows).
-- Every session reads it with the model row it reads anyway, and drops its
-- prepared plans and cached query vectors of the model when it changed.
--
-- identity_version: counts changes of what produces vectors (provider, remote
-- model, dimensions; not the endpoint nor the prefixes: README). The hash of every embedding row and of
-- every query-cache key is salted with it (omop_emb_indb.vectors.identity_hash):
-- a vector of the model before a change never passes for one of the model now;
-- index_concepts() re-embeds such rows, the cache misses. Version 0 salts
-- nothing: rows and cache entries made before 0.2.0 stay valid.
--
-- vectors_stale: such a change happened while the table held vectors; semantic
-- and hybrid searches refuse until index_concepts() re-embedded them all.
-- identity_changed_at: when (for people; nothing depends on the clock).
CREATE SEQUENCE omop_emb.model_generation_seq;
ALTER TABLE omop_emb.model
    ADD COLUMN generation bigint NOT NULL DEFAULT pg_catalog.nextval('omop_emb.model_generation_seq'),
    ADD COLUMN identity_version integer NOT NULL DEFAULT 0,
    ADD COLUMN identity_changed_at timestamptz,
    ADD COLUMN vectors_stale boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN omop_emb.model.generation IS 'Bumped by every change that invalidates plans or cached vectors of the model (create_index, alter_model of provider/remote_model/storage, the end of the re-index after such a change); sessions compare it on each call';
COMMENT ON COLUMN omop_emb.model.identity_version IS 'Number of changes of what produces vectors (provider, remote_model, dimensions); salts the query-cache keys';
COMMENT ON COLUMN omop_emb.model.identity_changed_at IS 'When what produces vectors (provider, remote_model, dimensions) last changed';
COMMENT ON COLUMN omop_emb.model.vectors_stale IS 'true from such a change until index_concepts() re-embedded every row: semantic and hybrid searches refuse meanwhile';

DO $dump$
BEGIN
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.model_generation_seq', '');
EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$dump$;
