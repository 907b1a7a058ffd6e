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
import os
import pathlib
import sys
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .errors import InstallError

MIN_PGVECTOR = (0, 8, 0)
_REPO = pathlib.Path(__file__).resolve().parents[2]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def extension_version() -> str:
    return extension_files()[0]


def extension_files() -> tuple[str, dict[str, str]]:
    """(version, {file name: text}) of the extension this package installs: the
    install script, the upgrade steps, released install scripts and the control file.

    In a source checkout the scripts are built from ``sql/`` and
    ``extension/omop_emb_indb`` so that they are never stale; an installed package
    uses the copies built into it.
    """
    build = _REPO / "extension" / "build.py"
    if build.exists() and (_REPO / "sql").is_dir():
        sys.path.insert(0, str(build.parent))
        try:
            import build as _build  # type: ignore[import-not-found]
        finally:
            sys.path.pop(0)
        return _build.version(), _build.scripts()
    pkg = importlib.resources.files("omop_emb_pg") / "_extension"
    files = {f.name: f.read_text() for f in pkg.iterdir()
             if f.name.startswith("omop_emb") and f.name.endswith((".sql", ".control"))}
    control = files["omop_emb.control"]
    version = control.split("default_version", 1)[1].split("'")[1]
    return version, files


def _script_body(text: str) -> str:
    """A script as run over a connection: without psql's ``\\echo ... \\quit`` guard."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("\\echo"))


def upgrade_path(files: dict[str, str], have: str, want: str) -> list[str]:
    """Names of the step scripts that lead from ``have`` to ``want``, in order."""
    steps = {}
    for name in files:
        parts = name[len("omop_emb--"):-len(".sql")].split("--") if name.endswith(".sql") else []
        if len(parts) == 2:
            steps[parts[0]] = (parts[1], name)
    path, at = [], have
    while at != want:
        if at not in steps:
            raise InstallError(
                f"no upgrade path from omop_emb {have} to {want} (stuck at {at})",
                hint="Upgrade with a package version that knows the way, or DROP SCHEMA "
                     "omop_emb CASCADE and install again (embeddings are rebuilt by "
                     "index_concepts).")
        at, name = steps[at]
        path.append(name)
    return path


@dataclass(frozen=True)
class InstallResult:
    version: str
    method: str  # "extension", "script", "already installed" or "<how> upgrade from <version>"
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
        "WHERE name IN ('vector', 'plpython3u', 'pg_trgm')").fetchall())
    installed = dict(conn.execute(
        "SELECT extname, extversion FROM pg_extension WHERE extname = 'vector'").fetchall())
    vec = installed.get("vector") or avail.get("vector")
    if vec is None:
        problems.append("pgvector (extension 'vector') is not available on the server")
    elif _version_tuple(vec) < MIN_PGVECTOR:
        problems.append(f"pgvector {vec} is too old: omop_emb needs >= 0.8.0 (iterative index scans)")
    if "plpython3u" not in avail:
        problems.append("PL/Python (extension 'plpython3u') is not available on the server")
    if "pg_trgm" not in avail:
        problems.append("pg_trgm (PostgreSQL contrib: character-trigram similarity, used by the "
                        "fused ranking) is not available on the server")
    if problems:
        raise InstallError(
            "the server lacks what omop_emb needs: " + "; ".join(problems),
            hint="On Debian/Ubuntu run scripts/install-server-deps.sh on the database server "
                 "(it installs postgresql-plpython3-N, python3-requests and pgvector >= 0.8), "
                 "or use the image built from Dockerfile.postgres.")
    conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
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


METHODS = ("auto", "extension", "script")


def install(conninfo: str | psycopg.Connection, *, method: str = "auto") -> InstallResult:
    """Install omop_emb into the database, or upgrade an older installation
    (idempotent, version-checked).

    ``method``: ``"extension"`` (CREATE EXTENSION / ALTER EXTENSION UPDATE: the
    server has the extension's files), ``"script"`` (the same SQL over the
    connection, for servers where files cannot be copied; upgrades run the same
    step scripts) or ``"auto"`` (the files when the server has them). An
    installation keeps the method it was made with. The environment variable
    ``OMOP_EMB_INSTALL_METHOD`` overrides ``"auto"``.
    """
    if method == "auto":
        method = os.environ.get("OMOP_EMB_INSTALL_METHOD") or "auto"
    if method not in METHODS:
        raise InstallError(f"unknown install method {method!r}",
                           hint="Use one of: " + ", ".join(METHODS) + ".")
    version, files = extension_files()
    own = not isinstance(conninfo, psycopg.Connection)
    conn = psycopg.connect(conninfo) if own else conninfo
    try:
        with conn.transaction():
            have, how = installed_version(conn)
            if have == version:
                return InstallResult(version, "already installed", False)
            if have is not None:
                return _upgrade(conn, have, how, version, files, method)
            if conn.execute("SELECT to_regnamespace('omop_emb') IS NOT NULL").fetchone()[0]:
                raise InstallError(
                    "schema omop_emb exists but holds no omop_emb installation",
                    hint="Drop or rename that schema first.")
            check_prerequisites(conn)
            if method != "script" and _server_has(conn, version):
                conn.execute("CREATE EXTENSION omop_emb CASCADE")
                return InstallResult(version, "extension", True)
            if method == "extension":
                raise _no_files(version)
            conn.execute("CREATE SCHEMA omop_emb")
            conn.execute(_script_body(files[f"omop_emb--{version}.sql"]))
            return InstallResult(version, "script", True)
    finally:
        if own:
            conn.close()


def _server_has(conn: psycopg.Connection, version: str) -> bool:
    return conn.execute(
        "SELECT 1 FROM pg_available_extension_versions WHERE name = 'omop_emb' "
        "AND version = %s", (version,)).fetchone() is not None


def _no_files(version: str) -> InstallError:
    return InstallError(
        f"the server has no files for omop_emb {version}",
        hint="Install them on the database server (make -C extension install), or install "
             "over the connection with method 'script' (omop-emb-pg install --method script).")


def _ensure_pg_trgm(conn) -> None:
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone():
        return
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'").fetchone():
        raise InstallError(
            "this version of omop_emb needs pg_trgm (PostgreSQL contrib), which the server lacks",
            hint="Install PostgreSQL's contrib modules on the database server (Debian: they "
                 "come with postgresql-N).")
    conn.execute("CREATE EXTENSION pg_trgm")


def _upgrade(conn, have, how, version, files, method) -> InstallResult:
    if _version_tuple(have) > _version_tuple(version):
        raise InstallError(
            f"omop_emb {have} is installed; this package installs the older {version}",
            hint="Use a client package of version " + have + " or newer.")
    # 0.2.0 requires pg_trgm; ALTER EXTENSION UPDATE cannot CASCADE.
    _ensure_pg_trgm(conn)
    if how == "extension":
        if method == "script":
            raise InstallError(
                f"omop_emb {have} was installed as an extension: it is upgraded with ALTER "
                "EXTENSION, not over the connection",
                hint="Install the new files on the server (make -C extension install) and "
                     "run again without --method script.")
        if not _server_has(conn, version):
            raise _no_files(version)
        conn.execute(sql.SQL("ALTER EXTENSION omop_emb UPDATE TO {}").format(sql.Literal(version)))
        return InstallResult(version, f"extension upgrade from {have}", True)
    for name in upgrade_path(files, have, version):
        conn.execute(_script_body(files[name]))
    return InstallResult(version, f"script upgrade from {have}", True)
