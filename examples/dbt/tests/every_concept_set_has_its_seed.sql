-- Every concept set contains at least one seed concept (level 0), even where
-- CONCEPT_ANCESTOR has no row for it.
select d.concept_set_name
from {{ ref('concept_set_definitions') }} d
where not exists (select 1 from {{ ref('concept_sets') }} s
                  where s.concept_set_name = d.concept_set_name and s.is_seed)
