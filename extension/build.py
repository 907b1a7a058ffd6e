#!/usr/bin/env python3
"""Assemble the extension's install and upgrade scripts from ``sql/`` and the
in-database Python modules in ``extension/omop_emb_indb/``.

Layout (pgai's split between what runs once and what can be re-run):

``sql/schema/<version>/*.sql``
    What a version adds that must run exactly once: tables, columns, data
    migrations (every per-model embedding table included). Never edited once
    the version is released; a later version adds a new folder.
``sql/schema/<version>/after-api/*.sql``
    The same, for steps that need the new functions (run after ``sql/api``).
``sql/api/*.sql``
    What can be re-run: functions, procedures, views, grants, the Python
    runtime, all ``CREATE OR REPLACE``. ``00_roles.sql`` runs first.

Scripts written (``make build``), pgvector style:

* ``omop_emb--<V>.sql``: install of the current version V: roles, every
  version's schema in order, the API, every version's after-api steps;
* ``omop_emb--<A>--<B>.sql`` for each consecutive pair of versions: roles, B's
  schema, the old API dropped (views, then routines nothing else depends on),
  the API, B's after-api steps;
* ``omop_emb--<old>.sql`` for released versions, copied unchanged from
  ``extension/frozen/`` so that ``CREATE EXTENSION omop_emb VERSION '<old>'``
  and the upgrade path can be tested;
* ``omop_emb.control`` with ``default_version`` from the file ``VERSION``
  (the one place the version is written).

Each is written to ``extension/`` for PGXS and beside the client package,
which installs and upgrades with the same SQL over a connection. Standard
library only.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "sql"
SCHEMA_DIR = SQL_DIR / "schema"
API_DIR = SQL_DIR / "api"
ROLES = API_DIR / "00_roles.sql"
PY_DIR = ROOT / "extension" / "omop_emb_indb"
FROZEN_DIR = ROOT / "extension" / "frozen"
CONTROL_TEMPLATE = ROOT / "extension" / "omop_emb.control.in"
PACKAGE_COPY = ROOT / "python" / "omop_emb_pg" / "_extension"

# Load order: a module comes after the modules it imports.
MODULES = ["errors", "checks", "suggest", "vectors", "copy_binary", "prefixes", "providers", "sqlgen", "selectivity", "lexical",
           "ranking_weights", "companion_weights", "ranking", "rerank", "http_client", "registry", "indexing", "drift",
           "runtime"]

HEADER = '\\echo Use "CREATE EXTENSION omop_emb CASCADE" to load this file. \\quit\n'


def runtime_expr(ver):
    """What ``@RT@`` becomes in a function body: this session's runtime, loaded
    on first use, and loaded again when the extension was updated under a
    running session (the runtime in GD is then of another version)."""
    return ('(GD["omop_emb"] if getattr(GD.get("omop_emb"), "version", None) == %r '
            'else (plpy.execute("SELECT omop_emb_internal._bootstrap()") and GD["omop_emb"]))' % ver)


# Run by an upgrade before the new API: views first (they may call the
# functions), then every routine nothing else depends on. A routine that an
# index, a column default or a policy uses stays; the API re-creates it with
# CREATE OR REPLACE. Only objects of the installation are touched (members of
# the extension; for an install made over a connection, the schema's). A
# user's view on an API function makes the DROP fail: nothing is dropped with
# CASCADE.
DROP_API = r"""
DO $omop_emb_drop_api$
DECLARE
    r record;
    ext oid := (SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname = 'omop_emb');
    schemas oid[] := ARRAY(SELECT n.oid FROM pg_catalog.pg_namespace n
                           WHERE n.nspname IN ('omop_emb', 'omop_emb_internal'));
BEGIN
    FOR r IN
        SELECT c.oid::pg_catalog.regclass AS rel FROM pg_catalog.pg_class c
        WHERE c.relnamespace = ANY (schemas) AND c.relkind = 'v'
          AND (ext IS NULL OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
               WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid
                 AND d.refobjid = ext AND d.deptype = 'e'))
        ORDER BY c.oid DESC
    LOOP
        EXECUTE pg_catalog.format('DROP VIEW %s', r.rel);
    END LOOP;
    FOR r IN
        SELECT p.oid::pg_catalog.regprocedure AS sig FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = ANY (schemas)
          AND (ext IS NULL OR EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
               WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid
                 AND d.refobjid = ext AND d.deptype = 'e'))
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
               WHERE d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                 AND d.refobjid = p.oid AND d.deptype <> 'e')
    LOOP
        EXECUTE pg_catalog.format('DROP ROUTINE %s', r.sig);
    END LOOP;
END
$omop_emb_drop_api$;
"""


def _vkey(v):
    return tuple(int(x) for x in re.findall(r"\d+", v))


def version():
    """The version of the extension and of the client package (file VERSION)."""
    return (ROOT / "VERSION").read_text().strip()


def versions():
    """Every version that has a schema folder or is current, oldest first."""
    found = {p.name for p in SCHEMA_DIR.iterdir() if p.is_dir()} | {version()}
    return sorted(found, key=_vkey)


def frozen():
    """{version: path} of released install scripts kept unchanged."""
    out = {}
    for p in FROZEN_DIR.glob("omop_emb--*.sql"):
        m = re.fullmatch(r"omop_emb--([0-9.]+)\.sql", p.name)
        if m:
            out[m.group(1)] = p
    return out


def python_modules():
    mods = [("omop_emb_indb", True, (PY_DIR / "__init__.py").read_text())]
    present = {p.stem for p in PY_DIR.glob("*.py")} - {"__init__"}
    missing = present - set(MODULES)
    if missing:
        raise SystemExit("extension/build.py: add %s to MODULES (in import order)" % sorted(missing))
    for name in MODULES:
        mods.append(("omop_emb_indb." + name, False, (PY_DIR / (name + ".py")).read_text()))
    return mods


def _part(path):
    return "-- %s\n%s" % (path.relative_to(ROOT), path.read_text())


def _schema_files(ver, after_api=False):
    d = SCHEMA_DIR / ver / ("after-api" if after_api else "")
    return sorted(d.glob("*.sql")) if d.is_dir() else []


def _api_files():
    return [p for p in sorted(API_DIR.glob("*.sql")) if p != ROLES]


MODULE_QUOTE = "$omop_emb_module$"


def module_rows():
    """The rows of omop_emb_internal.python_module, as the VALUES list of an INSERT:
    (name, is_package, load_order, source), each source dollar-quoted."""
    rows = []
    for order, (name, is_pkg, source) in enumerate(python_modules(), 1):
        if MODULE_QUOTE in source:
            raise SystemExit("extension/build.py: module %s contains the dollar-quote tag %s"
                             % (name, MODULE_QUOTE))
        rows.append("('%s', %s, %d, %s%s%s)" % (name, "true" if is_pkg else "false", order,
                                                  MODULE_QUOTE, source, MODULE_QUOTE))
    return ",\n".join(rows)


# Numbers the SQL states (function SET clauses, comments) that the in-database
# Python defines: @NAME@ in sql/ becomes the value of NAME in that module, so
# that each is written once.
SQL_CONSTANTS = {"MAX_K": "checks", "MAX_BATCH_ROWS": "checks", "DEFAULT_K": "checks", "DEFAULT_EF_SEARCH": "runtime", "TS_CONFIG": "lexical",
                 "TRIGRAM_THRESHOLD": "ranking", "DEFAULT_TOP_N": "rerank",
                 "RECALIBRATION_QUERIES": "indexing", "MAX_CALIBRATION_QUERIES": "indexing",
                 "COMMON_WORD_ROWS": "lexical", "TEXTS_PER_TRANSACTION": "indexing"}


def python_constant(name, module):
    """NAME = 123, NAME = 0.5 or NAME = "word" in omop_emb_indb/<module>.py, as SQL text."""
    m = re.search(r'^%s = (\d+(?:\.\d+)?|"[a-z_]+")\s*(#.*)?$' % name,
                  (PY_DIR / (module + ".py")).read_text(), re.M)
    if not m:
        raise SystemExit("extension/build.py: no constant %s in omop_emb_indb/%s.py" % (name, module))
    return m.group(1).strip('"')


# Python values a PL/Python function body written in sql/ takes from the in-database
# modules (@NAME@ becomes the value's Python literal): omop_emb.initials() must agree
# with ranking.initials(), and these are the two facts it needs.
PY_LITERALS = {"INITIALS_STOP_WORDS": ("ranking", "STOP_WORDS"),
               "INITIALS_WORD_PATTERN": ("ranking", "WORD_RE")}


def python_literal(module, name):
    """The Python literal of omop_emb_indb.<module>.<name> (a compiled pattern: its
    pattern; a set: a sorted tuple)."""
    sys.path.insert(0, str(PY_DIR.parent))
    try:
        import importlib
        value = getattr(importlib.import_module("omop_emb_indb." + module), name)
    finally:
        sys.path.pop(0)
    if isinstance(value, re.Pattern):
        value = value.pattern
    if isinstance(value, (set, frozenset)):
        value = tuple(sorted(value))
    return repr(value)


def _substitute(script, ver):
    for name, module in SQL_CONSTANTS.items():
        script = script.replace("@%s@" % name, python_constant(name, module))
    for name, (module, attr) in PY_LITERALS.items():
        script = script.replace("@%s@" % name, python_literal(module, attr))
    script = script.replace("@OMOP_EMB_PYTHON_MODULES@", module_rows())
    script = script.replace("@OMOP_EMB_VERSION@", repr(ver))
    return script.replace("@RT@", runtime_expr(ver))


def build_script():
    """The install script of the current version, as a string."""
    ver = version()
    upto = [v for v in versions() if _vkey(v) <= _vkey(ver)]
    parts = [HEADER, _part(ROLES)]
    parts += [_part(p) for v in upto for p in _schema_files(v)]
    parts += [_part(p) for p in _api_files()]
    parts += [_part(p) for v in upto for p in _schema_files(v, after_api=True)]
    return _substitute("\n".join(parts), ver)


def upgrade_script(new):
    """The step script from the version before ``new`` to ``new``."""
    parts = [HEADER, _part(ROLES)]
    parts += [_part(p) for p in _schema_files(new)]
    parts.append("-- (build.py) the previous version's API\n" + DROP_API)
    parts += [_part(p) for p in _api_files()]
    parts += [_part(p) for p in _schema_files(new, after_api=True)]
    return _substitute("\n".join(parts), new)


def upgrade_steps():
    """[(from, to)] for each consecutive pair of versions up to the current one."""
    vs = [v for v in versions() if _vkey(v) <= _vkey(version())]
    return list(zip(vs, vs[1:]))


def scripts():
    """{file name: text} of every script and the control file."""
    ver = version()
    out = {"omop_emb--%s.sql" % ver: build_script()}
    for old, path in frozen().items():
        if old != ver:
            out["omop_emb--%s.sql" % old] = path.read_text()
            control = path.with_suffix(".control")
            if control.exists():  # what installing that version requires, as released
                out[control.name] = control.read_text()
    for a, b in upgrade_steps():
        out["omop_emb--%s--%s.sql" % (a, b)] = upgrade_script(b)
    out["omop_emb.control"] = CONTROL_TEMPLATE.read_text().replace("@OMOP_EMB_VERSION@", ver)
    return out


def write(targets=None):
    files = scripts()
    written = []
    for d in targets or [ROOT / "extension", PACKAGE_COPY]:
        d.mkdir(parents=True, exist_ok=True)
        for stale in [*d.glob("omop_emb--*.sql"), *d.glob("omop_emb--*.control")]:
            if stale.name not in files:
                stale.unlink()
        for name, text in files.items():
            out = d / name
            out.write_text(text)
            written.append(out)
    return written


if __name__ == "__main__":
    for p in write():
        print("wrote", p.relative_to(ROOT), file=sys.stderr)
