-- omop_emb 0.2.0: staging of index_concepts() (issue 12).
--
-- The vocabulary is a relation the caller names: it is read by a SECURITY
-- INVOKER step (omop_emb_internal.index_stage, with the caller's rights) into
-- these tables, and the SECURITY DEFINER step (index_prepare) reads only these.
-- A view or a temporary table named "concept" can then never run its maker's
-- code as the extension owner. Rows are written and consumed in one
-- transaction of one session (column pid), so the tables are always empty
-- between runs; UNLOGGED because nothing in them must survive a crash.
-- omop_emb_admin may INSERT (never read, change or delete) here.

CREATE UNLOGGED TABLE omop_emb_internal.index_stage_run (
    pid                integer NOT NULL DEFAULT pg_catalog.pg_backend_pid()
                       CHECK (pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()),
    model_id           integer NOT NULL,
    vocabulary_schema  text NOT NULL,
    vocabulary_version text,
    include_synonyms   boolean NOT NULL,
    include_mapped     boolean NOT NULL
);
COMMENT ON TABLE omop_emb_internal.index_stage_run IS 'omop_emb: one row per index_concepts() run being prepared (internal)';

-- The texts the vocabulary asks for (one row per concept, kind, text).
CREATE UNLOGGED TABLE omop_emb_internal.index_stage_text (
    pid               integer NOT NULL DEFAULT pg_catalog.pg_backend_pid()
                      CHECK (pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()),
    concept_id        integer NOT NULL,
    text_kind         text NOT NULL,
    text              text NOT NULL,
    source_concept_id integer NOT NULL,
    source_code       text,
    concept_name      text,
    domain_id         text,
    vocabulary_id     text,
    concept_class_id  text,
    standard_concept  text,
    invalid_reason    text
);
CREATE INDEX ON omop_emb_internal.index_stage_text (pid, concept_id, text_kind, text);
COMMENT ON TABLE omop_emb_internal.index_stage_text IS 'omop_emb: concept texts read from the vocabulary by index_concepts() as its caller (internal)';

-- Attributes of the concepts in scope and of the concepts embedded already.
CREATE UNLOGGED TABLE omop_emb_internal.index_stage_concept (
    pid              integer NOT NULL DEFAULT pg_catalog.pg_backend_pid()
                     CHECK (pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()),
    concept_id       integer NOT NULL,
    in_scope         boolean NOT NULL,
    concept_name     text,
    domain_id        text,
    vocabulary_id    text,
    concept_class_id text,
    standard_concept text,
    invalid_reason   text
);
CREATE INDEX ON omop_emb_internal.index_stage_concept (pid, concept_id);
COMMENT ON TABLE omop_emb_internal.index_stage_concept IS 'omop_emb: concept attributes read from the vocabulary by index_concepts() as its caller (internal)';

REVOKE ALL ON omop_emb_internal.index_stage_run, omop_emb_internal.index_stage_text,
    omop_emb_internal.index_stage_concept FROM PUBLIC;
