{#-
  The OMOP CDM 5.4 SOURCE_TO_CONCEPT_MAP of the local source terms: the approved
  decisions of the mapping job only (one row per target concept; a term may map
  to several). Decisions are taken elsewhere: omop_emb.record_decision() in SQL,
  the review page, a Usagi file imported with `omop-emb-pg map import-usagi`,
  or the automatic approvals of the pre-hook (column automatic).
  To load a CDM table incrementally (end-dating withdrawn rows instead of
  rebuilding), use omop_emb.export_source_to_concept_map(job, 'cdm.source_to_concept_map').
-#}
{{ config(materialized='table') }}
-- depends_on: {{ ref('mapping_candidates') }}

select
    t.source_code,
    0                                            as source_concept_id,
    j.source_vocabulary_id,
    left(t.source_name, 255)                     as source_code_description,
    u.concept_id                                 as target_concept_id,
    c.vocabulary_id                              as target_vocabulary_id,
    d.decided_at::date                           as valid_start_date,
    date '2099-12-31'                            as valid_end_date,
    null::text                                   as invalid_reason,
    d.equivalence,
    d.automatic,
    d.decided_by
from omop_emb.mapping_job j
join omop_emb.mapping_term t on t.job_id = j.job_id
join omop_emb.mapping_current_decision d on d.term_id = t.term_id and d.status = 'approved'
cross join lateral unnest(d.concept_ids) as u(concept_id)
join {{ source('cdm', 'concept') }} c on c.concept_id = u.concept_id
where j.name = {{ omop_emb_mapping_job() }}
