-- omop_emb 0.2.0: the in-database Python runtime's module sources live in a
-- table, not in a function body, so that \df+ omop_emb.* stays readable. The
-- API part of every install and upgrade script (sql/api/10_runtime.sql)
-- replaces its rows; omop_emb_internal._bootstrap() reads them.
CREATE TABLE omop_emb_internal.python_module (
    name       text PRIMARY KEY,
    is_package boolean NOT NULL,
    load_order integer NOT NULL UNIQUE,
    source     text NOT NULL
);
COMMENT ON TABLE omop_emb_internal.python_module IS
'omop_emb: source of the in-database Python modules (extension/omop_emb_indb), in import order; written by the install/upgrade script, read by omop_emb_internal._bootstrap()';
REVOKE ALL ON TABLE omop_emb_internal.python_module FROM PUBLIC;
