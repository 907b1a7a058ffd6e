-- Embedding with an explicit role; NULL and blank texts give NULL.
\set SHOW_CONTEXT never
SELECT vector_dims(omop_emb.embed('Childhood asthma', 'document')) AS dims;
SELECT omop_emb.embed(NULL, 'query') IS NULL AS null_in_null_out,
       omop_emb.embed('   ', 'query') IS NULL AS blank_in_null_out;
SELECT i, v IS NULL AS is_null, vector_dims(v) AS dims
FROM unnest(omop_emb.embed_batch(ARRAY['Fracture of rib', NULL, 'Bullet wound'], 'document'))
     WITH ORDINALITY AS t(v, i);
-- The same text and role give the same vector (the test double is deterministic).
SELECT omop_emb.embed('Fracture of rib', 'query') = omop_emb.embed('Fracture of rib', 'query') AS same;
SELECT round(omop_emb.similarity('Fracture of rib', 'Fracture of rib', 'query', 'query')::numeric, 3)
    AS self_similarity;
SELECT role, prefix, source FROM omop_emb.embedding_role_prefixes('fake');
