-- omop_emb 0.2.0: source-term mapping (Usagi's workflow in SQL). Run once.
--
-- A job holds source terms; suggest_mappings() fills their ranked candidates
-- (with the context a reviewer needs); people (or auto_approve) append
-- decisions. Decisions are never updated: the current decision of a term is
-- its latest row. Who may write what is decided by row-level security as the
-- calling role (the functions are SECURITY INVOKER); the policies, grants and
-- functions are in sql/api/80_mapping.sql.

CREATE TABLE omop_emb.mapping_job (
    job_id               bigserial PRIMARY KEY,
    name                 text NOT NULL UNIQUE CHECK (btrim(name) <> ''),
    model                text,
    domain_ids           text[],
    vocabulary_ids       text[],
    concept_class_ids    text[],
    source_vocabulary_id text,
    vocabulary_schema    text,
    cdm_schema           text,
    candidates_per_term  integer NOT NULL DEFAULT 10 CHECK (candidates_per_term BETWEEN 1 AND 1000),
    reviewers            name[] NOT NULL DEFAULT '{}',
    created_by           name NOT NULL DEFAULT current_user,
    created_at           timestamptz NOT NULL DEFAULT now(),
    -- suggest_mappings(resuggest => true) sets it: terms suggested before it are
    -- pending again, so that an interrupted re-suggest resumes where it stopped.
    suggest_requested_at timestamptz,
    -- When the job's record counts (mapping_record_count) were computed, and from where.
    record_counts_at     timestamptz,
    record_counts_source text
);
COMMENT ON TABLE omop_emb.mapping_job IS 'omop_emb: a mapping job (source terms to map onto standard concepts, Usagi-style). Create with omop_emb.create_mapping_job().';

CREATE TABLE omop_emb.mapping_term (
    term_id           bigserial PRIMARY KEY,
    job_id            bigint NOT NULL REFERENCES omop_emb.mapping_job ON DELETE CASCADE,
    source_code       text NOT NULL,
    source_name       text NOT NULL,
    source_frequency  bigint,
    extra             jsonb,
    assigned_reviewer name,
    added_at          timestamptz NOT NULL DEFAULT now(),
    suggested_at      timestamptz,
    UNIQUE (job_id, source_code)
);
CREATE INDEX ON omop_emb.mapping_term (job_id, suggested_at);
COMMENT ON TABLE omop_emb.mapping_term IS 'omop_emb: the source terms of a mapping job (extra: the source query''s other columns, kept as they came)';

CREATE TABLE omop_emb.mapping_candidate (
    term_id          bigint NOT NULL REFERENCES omop_emb.mapping_term ON DELETE CASCADE,
    rank             integer NOT NULL,
    concept_id       integer NOT NULL,
    concept_name     text,
    domain_id        text,
    vocabulary_id    text,
    concept_class_id text,
    standard_concept text,
    similarity       double precision,
    score            double precision,
    confidence       double precision,
    matched_text     text,
    match_kind       text,
    parents          text[],
    descendant_count bigint,
    record_count     bigint,
    exact_match      boolean,
    confidence_kind  text,
    PRIMARY KEY (term_id, rank)
);
COMMENT ON TABLE omop_emb.mapping_candidate IS 'omop_emb: ranked candidate concepts of a source term, with context (parents = names of the concept_ancestor parents at level 1, descendant_count, record_count in the job''s CDM)';
COMMENT ON COLUMN omop_emb.mapping_candidate.confidence IS 'confidence_kind ''margin'': this candidate''s similarity minus the best similarity of the other candidates (positive only for a clear rank 1); ''calibrated'': nearest_batch''s own confidence column';

CREATE TABLE omop_emb.mapping_decision (
    decision_id bigserial PRIMARY KEY,
    term_id     bigint NOT NULL REFERENCES omop_emb.mapping_term ON DELETE CASCADE,
    status      text NOT NULL CHECK (status IN ('approved', 'flagged', 'unmapped', 'ignored', 'unreviewed')),
    concept_ids integer[] NOT NULL DEFAULT '{}',
    equivalence text NOT NULL DEFAULT 'UNREVIEWED' CHECK (equivalence IN ('EQUAL', 'EQUIVALENT', 'WIDER',
                    'NARROWER', 'INEXACT', 'UNMATCHED', 'UNREVIEWED')),
    comment     text,
    automatic   boolean NOT NULL DEFAULT false,
    decided_by  name NOT NULL DEFAULT current_user,
    decided_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Where an imported decision came from (Usagi: statusSetBy, statusSetOn,
    -- mappingStatus, and per concept mappingType, createdBy, createdOn), so
    -- that an export writes back what was read.
    provenance  jsonb,
    CHECK (status <> 'approved' OR cardinality(concept_ids) > 0)
);
CREATE INDEX ON omop_emb.mapping_decision (term_id, decision_id DESC);
COMMENT ON TABLE omop_emb.mapping_decision IS 'omop_emb: decisions on source terms, appended and never updated (the current decision is the term''s latest row). Write with omop_emb.record_decision().';

-- Record counts of concepts in the job's CDM, computed once per job.
CREATE TABLE omop_emb.mapping_record_count (
    job_id       bigint NOT NULL REFERENCES omop_emb.mapping_job ON DELETE CASCADE,
    concept_id   integer NOT NULL,
    record_count bigint NOT NULL,
    PRIMARY KEY (job_id, concept_id)
);
COMMENT ON TABLE omop_emb.mapping_record_count IS 'omop_emb: records per concept in a mapping job''s CDM (clinical tables or Achilles results), computed once per job';

ALTER TABLE omop_emb.mapping_job ENABLE ROW LEVEL SECURITY;
ALTER TABLE omop_emb.mapping_term ENABLE ROW LEVEL SECURITY;
ALTER TABLE omop_emb.mapping_candidate ENABLE ROW LEVEL SECURITY;
ALTER TABLE omop_emb.mapping_decision ENABLE ROW LEVEL SECURITY;
ALTER TABLE omop_emb.mapping_record_count ENABLE ROW LEVEL SECURITY;
