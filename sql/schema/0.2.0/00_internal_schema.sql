-- omop_emb 0.2.0: a schema for what is not the API (the runtime's module
-- sources, the internal steps of index_concepts), so that \df omop_emb.* and
-- \dx+ omop_emb show the API only. Nobody but the extension owner uses it.
CREATE SCHEMA omop_emb_internal;
COMMENT ON SCHEMA omop_emb_internal IS 'omop_emb: internal objects (not an API; may change in any version)';
REVOKE ALL ON SCHEMA omop_emb_internal FROM PUBLIC;
