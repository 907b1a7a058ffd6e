-- Register the deterministic test-double embedding server as model "fake" and
-- index GiBleed's standard concepts (schema gibleed), then build the HNSW index.
-- The runner puts the test double's URL in the setting omop_emb_test.endpoint.
\set SHOW_CONTEXT never
SELECT omop_emb.version() ~ '^\d+\.\d+\.\d+$' AS has_version;

-- The test double embeds any text; the prefixes are those an E5 model wants.
SELECT omop_emb.register_model('fake', 'openai', current_setting('omop_emb_test.endpoint'),
                               dimensions => 384, document_prefix => 'passage: ',
                               query_prefix => 'query: ') AS model_id;
SELECT name, provider, dimensions, metric, batch_size, read_timeout_s, index_method
FROM omop_emb.models;

-- Names, English synonyms and mapped source names (GiBleed's 439 concepts have 1,092 texts).
-- Progress notices carry timings: keep them out of the expected output.
SET client_min_messages = warning;
CALL omop_emb.index_concepts(vocabulary_schema => 'gibleed');
SELECT omop_emb.create_index('fake');
RESET client_min_messages;

-- index_params: the build's parameters and the ef_search create_index calibrated
-- (recall@10 >= 0.98 on the model's own vectors); the per-ef recalls left out here.
SELECT model, texts, concepts, pending, index_method, index_params - 'calibration' AS index_params,
       index_params #> '{calibration,queries}' AS calibration_queries,
       vocabulary_version, vocabulary_version_now, stale_texts, advice
FROM omop_emb.status();

-- A second run finds nothing to embed.
SET client_min_messages = warning;
CALL omop_emb.index_concepts(vocabulary_schema => 'gibleed');
RESET client_min_messages;
SELECT texts, pending FROM omop_emb.status();
