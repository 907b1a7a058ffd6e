{#-
  Every local source term of the mapping job with its best candidate, for review.
  The pre-hooks keep the job in step with the seed (omop_emb_sync_mapping_job):
  new terms are added and suggested through nearest_batch, all of them in one
  statement, i.e. one HTTP request per batch of terms not yet in the shared
  query cache; a re-run finds nothing to suggest and makes no request at all.
-#}
{{ config(materialized='table',
          pre_hook="{{ omop_emb_sync_mapping_job(ref('local_source_terms'), 'source_code', 'source_term') }}") }}
-- depends_on: {{ ref('local_source_terms') }}

select
    q.term_id,
    q.source_code,
    q.source_name                                as source_code_description,
    q.status,
    q.concept_ids,
    q.automatic,
    c.concept_id                                 as candidate_concept_id,
    c.concept_name                               as candidate_concept_name,
    c.similarity,
    c.confidence,
    coalesce(c.exact_match, false)               as exact_match
from omop_emb.mapping_queue q
join omop_emb.mapping_job j on j.job_id = q.job_id
left join omop_emb.mapping_candidate c on c.term_id = q.term_id and c.rank = 1
where j.name = {{ omop_emb_mapping_job() }}
