-- Every approved decision of the mapping job (each target concept) is a row of
-- source_to_concept_map, and nothing else is. Returns the differences (= failure).
with approved as (
    select t.source_code, u.concept_id
    from omop_emb.mapping_job j
    join omop_emb.mapping_term t on t.job_id = j.job_id
    join omop_emb.mapping_current_decision d on d.term_id = t.term_id and d.status = 'approved'
    cross join lateral unnest(d.concept_ids) as u(concept_id)
    where j.name = {{ omop_emb_mapping_job() }}
), exported as (
    select source_code, target_concept_id as concept_id from {{ ref('source_to_concept_map') }}
)
(select 'missing' as problem, * from approved except select 'missing', * from exported)
union all
(select 'not approved', * from exported except select 'not approved', * from approved)
