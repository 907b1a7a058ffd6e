-- 'high blood pressure' must map to 316866 Hypertensive disorder (SNOMED).
-- Returns a row (= failure) when it maps elsewhere or is missing.
select 'high blood pressure' as source_code_description, m.target_concept_id
from (select 1) one
left join {{ ref('source_to_concept_map') }} m on m.source_code_description = 'high blood pressure'
where m.target_concept_id is distinct from 316866
