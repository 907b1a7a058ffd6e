-- Bad input: each a clear error (message, detail, hint) or a warning, nothing changed.
\set SHOW_CONTEXT never
\set VERBOSITY default
-- A filter value no indexed concept has names the closest values.
SELECT * FROM omop_emb.nearest('asthma', 5, domain_ids => '{Conditon}');
SELECT * FROM omop_emb.nearest('asthma', 5, domain_ids => '{condition}');
SELECT * FROM omop_emb.nearest('asthma', 5, vocabulary_ids => '{snomed}');
-- Filters that exist but match nothing together: a notice, no rows.
SELECT * FROM omop_emb.nearest('asthma', 5, domain_ids => '{Condition}', vocabulary_ids => '{RxNorm}');
-- An empty filter array matches nothing.
SELECT count(*) FROM omop_emb.nearest('asthma', 5, domain_ids => '{}');
-- k, mode, role, model.
SELECT * FROM omop_emb.nearest('asthma', 0);
SELECT * FROM omop_emb.nearest('asthma', 5, mode => 'fuzzy');
SELECT omop_emb.embed('asthma', 'passage');
SELECT * FROM omop_emb.nearest('asthma', 5, model => 'nope');
SELECT * FROM omop_emb.nearest('asthma', 5, domain_ids => ARRAY['Condition', NULL]);
-- A blank query says so; a NULL query is silent (a NULL row of a table).
SELECT count(*) FROM omop_emb.nearest('   ');
SELECT count(*) FROM omop_emb.nearest(NULL::text);
-- create_index: NULL is not a way to ask for the default.
SELECT omop_emb.create_index('fake', m => NULL);
-- Nothing changed.
SELECT count(*) AS models FROM omop_emb.models;
