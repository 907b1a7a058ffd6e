-- The in-database Python runtime. Its modules (extension/omop_emb_indb/*.py) are
-- written into omop_emb_internal.python_module by extension/build.py (replaced
-- by every install and upgrade script) and loaded into GD once per session by
-- _bootstrap(), so that every function below is a one-line call into plain,
-- unit-tested Python.

DELETE FROM omop_emb_internal.python_module;
INSERT INTO omop_emb_internal.python_module (name, is_package, load_order, source) VALUES
@OMOP_EMB_PYTHON_MODULES@;

CREATE OR REPLACE FUNCTION omop_emb_internal._bootstrap() RETURNS void
LANGUAGE plpython3u VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $bootstrap$
import sys, types
VERSION = @OMOP_EMB_VERSION@
rows = plpy.execute("SELECT name, is_package, source FROM omop_emb_internal.python_module "
                    "ORDER BY load_order")
if not rows:
    # Reported as "omop_emb: <message>", like the runtime's own errors.
    err = type("omop_emb", (plpy.Error,), {"__module__": "builtins"})(
        "the runtime's modules are missing (omop_emb_internal.python_module is empty)")
    err.hint = ("Reinstall or upgrade the extension: ALTER EXTENSION omop_emb UPDATE, or "
                "omop-emb-pg install --dsn ...")
    raise err
for r in rows:
    name, is_pkg, source = r["name"], r["is_package"], r["source"]
    mod = types.ModuleType(name)
    mod.__file__ = "<omop_emb %s %s>" % (VERSION, name)
    mod.__package__ = name if is_pkg else name.rpartition(".")[0]
    if is_pkg:
        mod.__path__ = []
    sys.modules[name] = mod
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    if not is_pkg:
        setattr(sys.modules[mod.__package__], name.rpartition(".")[2], mod)
GD["omop_emb"] = sys.modules["omop_emb_indb.runtime"].Runtime(VERSION)
$bootstrap$;
COMMENT ON FUNCTION omop_emb_internal._bootstrap() IS 'Internal: loads the omop_emb Python runtime (omop_emb_internal.python_module) into this session (GD); called on first use';
REVOKE ALL ON FUNCTION omop_emb_internal._bootstrap() FROM PUBLIC;

CREATE OR REPLACE FUNCTION omop_emb.version() RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT @OMOP_EMB_VERSION@::pg_catalog.text $$;
COMMENT ON FUNCTION omop_emb.version() IS 'Version of the omop_emb SQL API installed in this database';
