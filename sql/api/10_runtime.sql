-- The in-database Python runtime. Its modules (extension/omop_emb_indb/*.py) are
-- embedded here by extension/build.py and loaded into GD once per session, so
-- that every function below is a one-line call into plain, unit-tested Python.

CREATE OR REPLACE FUNCTION omop_emb._bootstrap() RETURNS void
LANGUAGE plpython3u VOLATILE
AS $bootstrap$
import sys, types
VERSION = @OMOP_EMB_VERSION@
MODULES = @OMOP_EMB_PYTHON_MODULES@
for name, is_pkg, source in MODULES:
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
COMMENT ON FUNCTION omop_emb._bootstrap() IS 'Internal: loads the omop_emb Python runtime into this session (GD); called on first use';

CREATE OR REPLACE FUNCTION omop_emb.version() RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT @OMOP_EMB_VERSION@::text $$;
COMMENT ON FUNCTION omop_emb.version() IS 'Version of the omop_emb SQL API installed in this database';
