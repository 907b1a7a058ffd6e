-- omop_emb 0.2.0: a new model sends 256 texts per embedding request (was 64). Each
-- request costs the indexing backend the HTTP call and the reading of its answer
-- whatever its size: with 256, one session used 82-87 us of CPU per concept
-- against 100-119 with 64 and indexed 11,010-11,630 concepts/s against
-- 8,029-9,483 (instant server, 100,000 concepts, bench/b_indexing.py). A server
-- that takes fewer (Hugging Face TEI: 32 unless started with a larger
-- --max-client-batch-size) refuses with HTTP 413 and gets halves
-- (http_client.EmbeddingHTTP.post_fitting). Models registered before keep theirs.
ALTER TABLE omop_emb.model ALTER COLUMN batch_size SET DEFAULT 256;
