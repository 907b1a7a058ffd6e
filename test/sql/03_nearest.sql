-- nearest(): an exact name ranks first; filters; the three modes.
\set SHOW_CONTEXT never
-- (The test double's vectors carry no meaning: only exact matches are shown by name.)
SELECT rank, concept_id, concept_name, domain_id, exact_match, match_kind
FROM omop_emb.nearest('Childhood asthma', 3) WHERE exact_match;
SELECT count(*) AS rows, count(DISTINCT concept_id) AS concepts
FROM omop_emb.nearest('Childhood asthma', 3);

-- Case and spaces are folded for the exact match.
SELECT rank, concept_name, exact_match FROM omop_emb.nearest('  CHILDHOOD   asthma ', 1);

-- Filters: every row satisfies them.
SELECT count(*) AS rows, bool_and(domain_id = 'Condition') AS all_condition,
       bool_and(vocabulary_id = 'SNOMED') AS all_snomed
FROM omop_emb.nearest('Fracture of forearm', 20, domain_ids => '{Condition}',
                      vocabulary_ids => '{SNOMED}');

-- Lexical: texts sharing a stemmed word, ranked by Dice overlap; no embedding.
SELECT rank, concept_name, round(score::numeric, 3) AS score, similarity IS NULL AS no_similarity
FROM omop_emb.nearest('fracture forearm', 1, mode => 'lexical');
SELECT count(*) AS rows, bool_and(concept_name ~* 'fracture|forearm') AS all_share_a_word,
       bool_and(score > 0 AND score <= 1) AS scores_in_0_1
FROM omop_emb.nearest('fracture forearm', 5, mode => 'lexical');

-- Hybrid: the vector ranking, the words breaking near-ties; every row has a score.
SELECT count(*) AS rows, bool_and(score IS NOT NULL) AS scored,
       bool_and(score <= similarity + 0.005 + 1e-9) AS bounded
FROM omop_emb.nearest('fracture of the forearm', 10, mode => 'hybrid');
SELECT rank, concept_name FROM omop_emb.nearest('Fracture of forearm', 1, mode => 'hybrid');

-- A query vector instead of a text.
SELECT rank, concept_name
FROM omop_emb.nearest(omop_emb.embed('Bullet wound', 'document'), 1);

-- explain_nearest shows the plan with the query vector abbreviated.
SET enable_seqscan = off;
SELECT count(*) FILTER (WHERE line LIKE '%Index Scan using embedding_1_hnsw%') AS hnsw_scans,
       max(length(line)) < 400 AS short_lines,
       bool_or(line LIKE '%... 384 dims]%') AS vector_abbreviated
FROM omop_emb.explain_nearest('Bullet wound', 5) AS line;
RESET enable_seqscan;
