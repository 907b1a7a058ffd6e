{#-
  Map every local source term to its nearest standard concept, in the shape of
  the OMOP CDM SOURCE_TO_CONCEPT_MAP table (plus similarity and exact_match for
  review). All terms go to the embedding service in one nearest_batch() call,
  i.e. one HTTP request per batch of terms not yet in the shared query cache;
  a re-run finds them all cached and makes no request at all.
  A term whose best match is below var('min_similarity') stays unmapped
  (target_concept_id 0, the CDM convention).
-#}
{{ config(materialized='table') }}

with terms as (
    select source_code, source_term,
           row_number() over (order by source_code) as query_index
    from {{ ref('local_source_terms') }}
),

best as (
    select n.*
    from (select array_agg(source_term order by query_index) as queries from terms) q
    cross join lateral omop_emb.nearest_batch(
        q.queries,
        k => 1,
        domain_ids => {{ omop_emb_text_array(var('mapping_domains')) }},
        model => {{ omop_emb_model() }}
    ) n
)

select
    t.source_code,
    0                                            as source_concept_id,
    'LOCAL_DX'::text                             as source_vocabulary_id,
    t.source_term                                as source_code_description,
    case when b.similarity >= {{ var('min_similarity') }} then b.concept_id else 0 end
                                                 as target_concept_id,
    case when b.similarity >= {{ var('min_similarity') }} then b.vocabulary_id end
                                                 as target_vocabulary_id,
    b.concept_id                                 as candidate_concept_id,
    b.concept_name                               as candidate_concept_name,
    b.similarity,
    coalesce(b.exact_match, false)               as exact_match,
    current_date                                 as valid_start_date,
    date '2099-12-31'                            as valid_end_date,
    null::text                                   as invalid_reason
from terms t
left join best b on b.query_index = t.query_index
