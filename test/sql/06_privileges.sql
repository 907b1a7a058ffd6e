-- Privileges: omop_emb_reader searches and embeds; only omop_emb_admin (and the
-- owner) registers, indexes and reads keys.
\set SHOW_CONTEXT never
CREATE ROLE regress_omop_analyst NOLOGIN;
GRANT omop_emb_reader TO regress_omop_analyst;
SELECT omop_emb.set_secret('regress_key', 'not-for-analysts');
SET ROLE regress_omop_analyst;
SELECT rank, concept_name FROM omop_emb.nearest('Bullet wound', 1);
SELECT vector_dims(omop_emb.embed('asthma', 'query')) AS dims;
SELECT name FROM omop_emb.models;
SELECT omop_emb.register_model('evil', 'openai', 'http://10.0.0.1:1', 384);
SELECT omop_emb.alter_model('fake', endpoint => 'http://10.0.0.1:1');
CALL omop_emb.index_concepts(vocabulary_schema => 'gibleed');
SELECT * FROM omop_emb.secret;
SELECT count(*) FROM omop_emb_internal.python_module;
RESET ROLE;
SELECT endpoint = current_setting('omop_emb_test.endpoint') AS endpoint_unchanged FROM omop_emb.models;
SELECT omop_emb.delete_secret('regress_key');
DROP ROLE regress_omop_analyst;
