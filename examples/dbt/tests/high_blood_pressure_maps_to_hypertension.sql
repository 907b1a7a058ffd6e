-- 'high blood pressure' must have 316866 Hypertensive disorder (SNOMED) as its
-- best candidate. Returns a row (= failure) when it is elsewhere or missing.
select 'high blood pressure' as source_code_description, m.candidate_concept_id
from (select 1) one
left join {{ ref('mapping_candidates') }} m on m.source_code_description = 'high blood pressure'
where m.candidate_concept_id is distinct from 316866
