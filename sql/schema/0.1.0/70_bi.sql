-- omop_emb 0.1.0: the BI request table (run once). Its functions and view are in sql/api/70_bi.sql.

CREATE TABLE omop_emb.search_request (
    request_id     bigserial PRIMARY KEY,
    query          text NOT NULL CHECK (pg_catalog.btrim(query) <> ''),
    k              integer NOT NULL DEFAULT 10 CHECK (k BETWEEN 1 AND 100),
    domain_ids     text[],
    vocabulary_ids text[],
    model          text REFERENCES omop_emb.model (name) ON UPDATE CASCADE ON DELETE CASCADE,
    label          text,
    created_by     name NOT NULL DEFAULT CURRENT_USER,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX search_request_label ON omop_emb.search_request (label);
COMMENT ON TABLE omop_emb.search_request IS
'omop_emb: semantic searches for BI tools. INSERT a query (and optionally k, domain_ids, vocabulary_ids, model, label); read the results in the view omop_emb.search_result. Everybody with omop_emb_reader sees all requests; each role changes or deletes only its own.';
COMMENT ON COLUMN omop_emb.search_request.request_id IS 'Identifier of the request; filter omop_emb.search_result on it';
COMMENT ON COLUMN omop_emb.search_request.query IS 'Free text to search for (a term, a description, in any language the model knows)';
COMMENT ON COLUMN omop_emb.search_request.k IS 'Number of concepts to return (1..100, default 10)';
COMMENT ON COLUMN omop_emb.search_request.domain_ids IS 'Only concepts of these domains (e.g. {Condition}); NULL: all indexed domains';
COMMENT ON COLUMN omop_emb.search_request.vocabulary_ids IS 'Only concepts of these vocabularies (e.g. {SNOMED}); NULL: all';
COMMENT ON COLUMN omop_emb.search_request.model IS 'Registered model to search with; NULL: the default model (setting omop_emb.model, else the only one)';
COMMENT ON COLUMN omop_emb.search_request.label IS 'Free label to group requests (e.g. a dashboard or study name)';
COMMENT ON COLUMN omop_emb.search_request.created_by IS 'Role that made the request (set automatically)';
COMMENT ON COLUMN omop_emb.search_request.created_at IS 'When the request was made';

ALTER TABLE omop_emb.search_request ENABLE ROW LEVEL SECURITY;
CREATE POLICY search_request_read ON omop_emb.search_request FOR SELECT USING (true);
CREATE POLICY search_request_insert ON omop_emb.search_request FOR INSERT
    WITH CHECK (created_by = CURRENT_USER);
CREATE POLICY search_request_update ON omop_emb.search_request FOR UPDATE
    USING (created_by = CURRENT_USER) WITH CHECK (created_by = CURRENT_USER);
CREATE POLICY search_request_delete ON omop_emb.search_request FOR DELETE
    USING (created_by = CURRENT_USER);
CREATE POLICY search_request_admin ON omop_emb.search_request FOR ALL TO omop_emb_admin
    USING (true) WITH CHECK (true);

-- pg_dump keeps the requests of an extension install.
DO $dump$
BEGIN
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.search_request', '');
    PERFORM pg_catalog.pg_extension_config_dump('omop_emb.search_request_request_id_seq', '');
EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$dump$;
