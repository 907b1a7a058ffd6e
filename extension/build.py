#!/usr/bin/env python3
"""Assemble the versioned extension script from ``sql/`` and the in-database
Python modules in ``extension/omop_emb_indb/``.

The SQL files are concatenated in name order. The Python modules are embedded
as string literals in ``omop_emb._bootstrap()`` (``@OMOP_EMB_PYTHON_MODULES@``)
and ``@RT@`` in a function body becomes the expression that returns this
session's runtime, loading it on first use.

Run directly (``make build``) it writes ``extension/omop_emb--<version>.sql``
for PGXS and a copy beside the client package, which installs the same SQL
over a connection. Standard library only.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "sql"
PY_DIR = ROOT / "extension" / "omop_emb_indb"
PACKAGE_COPY = ROOT / "python" / "omop_emb_pg" / "_extension"

# Load order: a module comes after the modules it imports.
MODULES = ["errors", "checks", "vectors", "prefixes", "providers", "sqlgen", "lexical", "http_client",
           "registry", "indexing", "runtime"]

RT = ('(GD.get("omop_emb") or plpy.execute("SELECT omop_emb._bootstrap()") '
      'and GD["omop_emb"])')


def version():
    text = (PY_DIR / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def python_modules():
    mods = [("omop_emb_indb", True, (PY_DIR / "__init__.py").read_text())]
    present = {p.stem for p in PY_DIR.glob("*.py")} - {"__init__"}
    missing = present - set(MODULES)
    if missing:
        raise SystemExit("extension/build.py: add %s to MODULES (in import order)" % sorted(missing))
    for name in MODULES:
        mods.append(("omop_emb_indb." + name, False, (PY_DIR / (name + ".py")).read_text()))
    return mods


def build_script():
    """The whole extension script as a string."""
    ver = version()
    parts = []
    for path in sorted(SQL_DIR.glob("*.sql")):
        parts.append("-- %s\n%s" % (path.relative_to(ROOT), path.read_text()))
    script = "\n".join(parts)
    script = script.replace("@OMOP_EMB_PYTHON_MODULES@", repr(python_modules()))
    script = script.replace("@OMOP_EMB_VERSION@", repr(ver))
    script = script.replace("@RT@", RT)
    if "$bootstrap$" in repr(python_modules()):
        raise SystemExit("extension/build.py: a module contains the dollar-quote tag $bootstrap$")
    return script


def write(targets=None):
    ver = version()
    script = build_script()
    control = (ROOT / "extension" / "omop_emb.control").read_text()
    written = []
    for d in targets or [ROOT / "extension", PACKAGE_COPY]:
        d.mkdir(parents=True, exist_ok=True)
        out = d / ("omop_emb--%s.sql" % ver)
        out.write_text(script)
        written.append(out)
        if d != ROOT / "extension":
            (d / "omop_emb.control").write_text(control)
    return written


if __name__ == "__main__":
    for p in write():
        print("wrote", p.relative_to(ROOT), file=sys.stderr)
