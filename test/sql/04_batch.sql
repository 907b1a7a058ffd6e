-- nearest_batch(): many source terms mapped in one statement (one embedding
-- request for all uncached texts); query_index follows the input order.
\set SHOW_CONTEXT never
SELECT query_index, query, concept_name, exact_match
FROM omop_emb.nearest_batch(ARRAY['Facial laceration', 'Laceration of foot', 'Perennial allergic rhinitis'], 1)
ORDER BY query_index;

-- A source-to-concept map from a table of terms, the LATERAL form.
CREATE TEMP TABLE source_terms (source_code text, term text);
INSERT INTO source_terms VALUES ('L1', 'laceration of hand'), ('B2', 'SECOND DEGREE BURN'), ('X3', NULL);
SELECT s.source_code, n.concept_id, n.concept_name, n.exact_match
FROM source_terms s
CROSS JOIN LATERAL omop_emb.nearest(s.term, 1, domain_ids => '{Condition}') n
ORDER BY 1;

-- Blank texts give no rows and one warning for the statement.
SELECT query_index, concept_name
FROM omop_emb.nearest_batch(ARRAY['Bullet wound', '  ', 'Fracture of rib'], 1)
ORDER BY query_index;
