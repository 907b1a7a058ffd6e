"""Install the omop_emb extension into a database.

Two paths, the same SQL:

* ``CREATE EXTENSION omop_emb CASCADE`` when the extension's files are on the
  server (``make -C extension install``, or the server built from
  ``Dockerfile.postgres``);
* otherwise the versioned script is run over the connection, for servers where
  files cannot be copied.

Both are idempotent and version-checked, and the prerequisites (superuser,
pgvector >= 0.8, plpython3u, ``requests`` on the server's Python) are checked
first with errors that say what to do.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import sys
from dataclasses import dataclass

import psycopg

from .errors import InstallError

MIN_PGVECTOR = (0, 8, 0)
_REPO = pathlib.Path(__file__).resolve().parents[2]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def extension_version() -> str:
    return extension_files()[0]


def extension_files() -> tuple[str, str, str]:
    """(version, script, control) of the extension this package installs.

    In a source checkout the script is built from ``sql/`` and
    ``extension/omop_emb_indb`` so that it is never stale; an installed package
    uses the copy built into it.
    """
    build = _REPO / "extension" / "build.py"
    if build.exists() and (_REPO / "sql").is_dir():
        sys.path.insert(0, str(build.parent))
        try:
            import build as _build  # type: ignore[import-not-found]
        finally:
            sys.path.pop(0)
        control = (_REPO / "extension" / "omop_emb.control").read_text()
        return _build.version(), _build.build_script(), control
    pkg = importlib.resources.files("omop_emb_pg") / "_extension"
    control = (pkg / "omop_emb.control").read_text()
    version = control.split("default_version", 1)[1].split("'")[1]
    return version, (pkg / f"omop_emb--{version}.sql").read_text(), control


@dataclass(frozen=True)
class InstallResult:
    version: str
    method: str  # "extension", "script" or "already installed"
    changed: bool


def check_prerequisites(conn: psycopg.Connection) -> None:
    """Raise InstallError naming everything that is missing."""
    problems: list[str] = []
    row = conn.execute(
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not row or not row[0]:
        raise InstallError(
            "installing omop_emb needs a superuser: its functions are PL/Python "
            "(plpython3u), an untrusted language only a superuser may use",
            hint="Connect as a superuser (e.g. postgres) to install; analysts then get "
                 "GRANT omop_emb_reader TO <role>.")
    avail = dict(conn.execute(
        "SELECT name, default_version FROM pg_available_extensions "
        "WHERE name IN ('vector', 'plpython3u')").fetchall())
    installed = dict(conn.execute(
        "SELECT extname, extversion FROM pg_extension WHERE extname = 'vector'").fetchall())
    vec = installed.get("vector") or avail.get("vector")
    if vec is None:
        problems.append("pgvector (extension 'vector') is not available on the server")
    elif _version_tuple(vec) < MIN_PGVECTOR:
        problems.append(f"pgvector {vec} is too old: omop_emb needs >= 0.8.0 (iterative index scans)")
    if "plpython3u" not in avail:
        problems.append("PL/Python (extension 'plpython3u') is not available on the server")
    if problems:
        raise InstallError(
            "the server lacks what omop_emb needs: " + "; ".join(problems),
            hint="On Debian/Ubuntu run scripts/install-server-deps.sh on the database server "
                 "(it installs postgresql-plpython3-N, python3-requests and pgvector >= 0.8), "
                 "or use the image built from Dockerfile.postgres.")
    conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    try:
        with conn.transaction():
            conn.execute("DO $probe$ import requests $probe$ LANGUAGE plpython3u")
    except psycopg.Error as e:
        raise InstallError(
            "the server's Python cannot import requests, which omop_emb uses to call "
            "embedding servers",
            hint="Install it for the Python that plpython3u uses (Debian: apt-get install "
                 "python3-requests).") from e


def installed_version(conn: psycopg.Connection) -> tuple[str | None, str | None]:
    """(version, how) of omop_emb in this database, or (None, None)."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'omop_emb'").fetchone()
    if row:
        return row[0], "extension"
    row = conn.execute("SELECT to_regprocedure('omop_emb.version()') IS NOT NULL").fetchone()
    if row and row[0]:
        return conn.execute("SELECT omop_emb.version()").fetchone()[0], "script"
    return None, None


def install(conninfo: str | psycopg.Connection, *, use_extension_files: bool = True) -> InstallResult:
    """Install omop_emb into the database (idempotent, version-checked)."""
    version, script, _ = extension_files()
    own = not isinstance(conninfo, psycopg.Connection)
    conn = psycopg.connect(conninfo) if own else conninfo
    try:
        with conn.transaction():
            have, how = installed_version(conn)
            if have == version:
                return InstallResult(version, "already installed", False)
            if have is not None:
                raise InstallError(
                    f"omop_emb {have} is installed (as {how}); this package installs {version}",
                    hint="ALTER EXTENSION omop_emb UPDATE when the server has the new files; "
                         "otherwise DROP SCHEMA omop_emb CASCADE and install again "
                         "(embeddings are rebuilt by index_concepts).")
            if conn.execute("SELECT to_regnamespace('omop_emb') IS NOT NULL").fetchone()[0]:
                raise InstallError(
                    "schema omop_emb exists but holds no omop_emb installation",
                    hint="Drop or rename that schema first.")
            check_prerequisites(conn)
            files = conn.execute(
                "SELECT 1 FROM pg_available_extension_versions WHERE name = 'omop_emb' "
                "AND version = %s", (version,)).fetchone()
            if files and use_extension_files:
                conn.execute("CREATE EXTENSION omop_emb CASCADE")
                return InstallResult(version, "extension", True)
            body = "\n".join(line for line in script.splitlines() if not line.startswith("\\echo"))
            conn.execute("CREATE SCHEMA omop_emb")
            conn.execute(body)
            return InstallResult(version, "script", True)
    finally:
        if own:
            conn.close()
