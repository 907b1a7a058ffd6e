-- Roles are cluster-wide: created once, shared by every database that installs
-- the extension. omop_emb_reader searches and embeds; omop_emb_admin also
-- registers models, indexes and configures; omop_emb_mapper (a reader) creates
-- mapping jobs and records decisions in its own or assigned jobs, and
-- omop_emb_admin is a mapper too. Re-runnable.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'omop_emb_reader') THEN
        CREATE ROLE omop_emb_reader NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'omop_emb_admin') THEN
        CREATE ROLE omop_emb_admin NOLOGIN;
    END IF;
    IF NOT pg_catalog.pg_has_role('omop_emb_admin', 'omop_emb_reader', 'MEMBER') THEN
        GRANT omop_emb_reader TO omop_emb_admin;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'omop_emb_mapper') THEN
        CREATE ROLE omop_emb_mapper NOLOGIN;
    END IF;
    IF NOT pg_catalog.pg_has_role('omop_emb_mapper', 'omop_emb_reader', 'MEMBER') THEN
        GRANT omop_emb_reader TO omop_emb_mapper;
    END IF;
    IF NOT pg_catalog.pg_has_role('omop_emb_admin', 'omop_emb_mapper', 'MEMBER') THEN
        GRANT omop_emb_mapper TO omop_emb_admin;
    END IF;
END
$roles$;
