"""The SQL regression suite (test/sql/*.sql, test/expected/*.out), run with PostgreSQL's
own pg_regress against the test cluster and the deterministic test-double server.

The database is prepared here (GiBleed in schema ``gibleed``, omop_emb installed the way
the other tests install it); the SQL files do the rest as a user would write it. The
test double's URL reaches them in the setting ``omop_emb_test.endpoint`` (PGOPTIONS).
On failure the assertion shows pg_regress's diff. To accept a changed output after
reading it: run with OMOP_EMB_REGRESS_OUT=<dir> and copy ``<dir>/results/<test>.out``
over ``test/expected/<test>.out``.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from conftest import install_extension

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "test"
TESTS = sorted(p.stem for p in (SUITE / "sql").glob("*.sql"))


def pg_config(flag: str) -> str:
    return subprocess.run(["pg_config", flag], capture_output=True, text=True, check=True).stdout.strip()


def pg_regress() -> str:
    """pg_regress as PGXS installs it (postgresql-server-dev)."""
    return str(Path(pg_config("--pgxs")).parent.parent / "test" / "regress" / "pg_regress")


def test_sql_regression_suite(pg_server, fake_embedder_session, tmp_path):
    from psycopg.conninfo import conninfo_to_dict

    from omop_emb_pg.sample import load_gibleed

    assert TESTS, "no test/sql/*.sql"
    name = f"regress_{uuid.uuid4().hex[:8]}"
    dsn = pg_server.create_database(name)
    try:
        load_gibleed(dsn)
        install_extension(dsn)
        info = conninfo_to_dict(dsn)
        env = dict(os.environ, PGOPTIONS=f"-c omop_emb_test.endpoint={fake_embedder_session.url}")
        if info.get("password"):
            env["PGPASSWORD"] = info["password"]
        out = Path(os.environ.get("OMOP_EMB_REGRESS_OUT") or tmp_path / "regress")
        cmd = [pg_regress(), "--use-existing", f"--dbname={name}", f"--host={info.get('host', 'localhost')}",
               f"--port={info.get('port', 5432)}", f"--user={info.get('user', 'postgres')}",
               f"--inputdir={SUITE}", f"--outputdir={out}", f"--bindir={pg_config('--bindir')}", *TESTS]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        print(r.stdout)
        diffs = out / "regression.diffs"
        assert r.returncode == 0, (r.stdout + r.stderr + "\n" + (diffs.read_text() if diffs.exists() else ""))
        assert f"All {len(TESTS)} tests passed" in r.stdout or "All tests passed" in r.stdout
    finally:
        pg_server.drop_database(name)
