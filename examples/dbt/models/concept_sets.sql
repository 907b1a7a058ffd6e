{#-
  Concept sets from free-text descriptions (seed concept_set_definitions):
  the nearest standard concepts to each description (LATERAL nearest(), top
  var('concept_set_seeds') above var('concept_set_min_similarity')) are the
  seeds; each seed comes in itself (level 0, whether or not concept_ancestor
  has a row for it) with all its descendants through CONCEPT_ANCESTOR.
-#}
{{ config(materialized='table') }}

with seeds as (
    select d.concept_set_name, d.description,
           n.concept_id as seed_concept_id, n.rank as seed_rank, n.similarity as seed_similarity
    from {{ ref('concept_set_definitions') }} d
    cross join lateral omop_emb.nearest(
        d.description,
        k => {{ var('concept_set_seeds') }},
        model => {{ omop_emb_model() }}
    ) n
    where n.rank = 1 or n.similarity >= {{ var('concept_set_min_similarity') }}
),

members as (
    select s.concept_set_name, s.seed_concept_id, s.seed_similarity,
           s.seed_concept_id as concept_id, 0 as levels_of_separation
    from seeds s
    union all
    select s.concept_set_name, s.seed_concept_id, s.seed_similarity,
           ca.descendant_concept_id, ca.min_levels_of_separation
    from seeds s
    join {{ source('cdm', 'concept_ancestor') }} ca
      on ca.ancestor_concept_id = s.seed_concept_id
     and ca.descendant_concept_id <> s.seed_concept_id
),

-- A concept reached from several seeds: keep the closest path, best seed first.
ranked as (
    select m.*,
           row_number() over (partition by m.concept_set_name, m.concept_id
                              order by m.levels_of_separation, m.seed_similarity desc) as pick
    from members m
)

select
    r.concept_set_name || ':' || r.concept_id   as concept_set_member_key,
    r.concept_set_name,
    r.concept_id,
    c.concept_name,
    c.domain_id,
    c.vocabulary_id,
    c.standard_concept,
    r.seed_concept_id,
    r.seed_similarity,
    r.levels_of_separation,
    r.levels_of_separation = 0                  as is_seed
from ranked r
join {{ source('cdm', 'concept') }} c on c.concept_id = r.concept_id
where r.pick = 1
  and c.invalid_reason is null
