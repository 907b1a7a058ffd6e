"""Issue 5: every `omop-emb-pg` subcommand against the real stack.

In-process through ``cli.main(argv)`` (fast) except Ctrl-C and exit codes of the
installed console script, which run it as a subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import E5_MODEL, register_fake_model, serve_command
from omop_emb_pg import cli


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def gib_dsn(module_db):
    """Fresh database with GiBleed (no extension yet: `install` is tested on it)."""
    from omop_emb_pg.sample import load_gibleed

    dsn = module_db()
    load_gibleed(dsn)
    return dsn


def test_help_and_usage_errors(capsys):
    for sub in ("install", "register-model", "index", "search", "status", "demo", "serve"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["search"])  # missing text
    assert e.value.code == 2


def test_install_register_index_search_status(capsys, gib_dsn, fake_embedder):
    code, out, _ = run(capsys, "install", "--dsn", gib_dsn)
    assert code == 0 and "omop_emb" in out
    code, out, _ = run(capsys, "install", "--dsn", gib_dsn)
    assert code == 0 and "already installed" in out

    code, out, err = run(capsys, "register-model", "--dsn", gib_dsn, "fake", "--endpoint", fake_embedder.url,
                         "--dimensions", "384", "--document-prefix", "", "--query-prefix", "")
    assert code == 0, err
    assert "registered model 'fake'" in out and "384 dimensions" in out
    code, out, _ = run(capsys, "register-model", "--dsn", gib_dsn, "fake", "--endpoint", fake_embedder.url,
                       "--if-not-exists")
    assert code == 0 and "already registered" in out

    # index with the rich progress bar, driven to completion (written to a string console).
    buf = io.StringIO()
    assert cli.run_index(gib_dsn, model="fake", progress="bar", poll=0.05, out=buf,
                         vocabulary_schema="gibleed", batch_size=16) == 0
    text = buf.getvalue()
    with psycopg.connect(gib_dsn) as conn:
        (n,) = conn.execute("SELECT done FROM omop_emb.index_status WHERE model = 'fake'").fetchone()
    assert n > 100 and f"{n}/{n}" in text and "texts/s" in text and "indexed fake" in text

    # the CLI subcommand (plain progress), nothing left to do, then build the index
    code, out, err = run(capsys, "index", "--dsn", gib_dsn, "--model", "fake", "--schema", "gibleed",
                         "--progress", "plain", "--create-index")
    assert code == 0, err
    assert "0 texts embedded" in err and "index:" in out

    with psycopg.connect(gib_dsn) as conn:
        name, cid = conn.execute("SELECT concept_name, concept_id FROM gibleed.concept WHERE domain_id = 'Drug' "
                                 "AND standard_concept = 'S' ORDER BY concept_id LIMIT 1").fetchone()

    code, out, err = run(capsys, "search", "--dsn", gib_dsn, "--model", "fake", name, "-k", "5",
                         "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 5 and rows[0]["concept_id"] == cid and rows[0]["exact_match"] is True
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["query"] == name

    code, out, _ = run(capsys, "search", "--dsn", gib_dsn, "--model", "fake", name, "zzz", "-k", "3",
                       "--domain", "Drug", "--format", "csv")
    recs = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(recs) == 6 and {r["domain_id"] for r in recs} == {"Drug"}
    assert recs[0]["query"] == name and recs[3]["query"] == "zzz"

    code, out, _ = run(capsys, "search", "--dsn", gib_dsn, "--model", "fake", name, "-k", "2", "--format", "tsv")
    lines = out.strip().split("\n")
    assert code == 0 and lines[0].split("\t")[:2] == ["rank", "concept_id"] and lines[1].split("\t")[1] == str(cid)

    code, out, _ = run(capsys, "search", "--dsn", gib_dsn, "--model", "fake", name, "-k", "3")
    assert code == 0 and str(cid) in out and "nearest to" in out

    code, out, _ = run(capsys, "status", "--dsn", gib_dsn)
    assert code == 0 and "model fake" in out and "pending" in out and "hit rate" in out and "hnsw" in out
    code, out, _ = run(capsys, "status", "--dsn", gib_dsn, "--format", "json")
    st = json.loads(out)
    (m,) = st["models"]
    assert m["model"] == "fake" and m["pending"] == 0 and m["texts"] == n and m["index_method"] == "hnsw"


def test_errors_exit_1_with_hint_no_traceback(capsys, gib_dsn, fake_embedder):
    code, out, err = run(capsys, "search", "--dsn", gib_dsn, "--model", "nope", "x")
    assert code == 1 and "error" in err and "Traceback" not in err and "plpy" not in err
    code, out, err = run(capsys, "search", "--dsn", gib_dsn, "--model", "fake", "x", "-k", "0")
    assert code == 1 and "Traceback" not in err
    code, out, err = run(capsys, "status", "--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    assert code == 1 and "HINT" in err and "PGHOST" in err


def test_pg_env_vars_are_used(capsys, gib_dsn, monkeypatch):
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(gib_dsn)
    monkeypatch.delenv("OMOP_EMB_DSN", raising=False)
    for k, env in (("host", "PGHOST"), ("port", "PGPORT"), ("dbname", "PGDATABASE"), ("user", "PGUSER")):
        if k in d:
            monkeypatch.setenv(env, str(d[k]))
    if "password" in d:
        monkeypatch.setenv("PGPASSWORD", d["password"])
    code, out, err = run(capsys, "status")
    assert code == 0, err and "model" in out


def test_index_ctrl_c_cancels_and_resumes(fresh_db, fake_embedder):
    """SIGINT during `index` cancels the server-side CALL, exits 130, says it is resumable;
    a second run finishes the job."""
    from omop_emb_pg.install import install
    from omop_emb_pg.sample import load_gibleed

    dsn = fresh_db()
    load_gibleed(dsn)
    install(dsn)
    register_fake_model(dsn, fake_embedder, batch_size=8)
    fake_embedder.set_fault("slow", seconds=0.3)
    # SIGINT as a terminal delivers it: a test run started in the background (`make test &`, CI
    # runners) has SIGINT ignored, the child would inherit that and Python would never raise
    # KeyboardInterrupt, so the child starts with the default disposition.
    proc = subprocess.Popen(serve_command("index", "--dsn", dsn, "--schema", "gibleed", "--batch-size", "8",
                                          "--progress", "plain"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            (done,) = conn.execute("SELECT coalesce(sum(done), 0) FROM omop_emb.index_progress").fetchone()
            if done >= 16:
                break
            time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    # The CLI waits up to 30 s for the cancelled session to return (cli.py), then exits: give it
    # that and some (the checks below still say whether the CALL stopped).
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    t_cancel = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:  # the backend stops at its next interrupt check (after the HTTP call in flight)
            (active,) = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'CALL omop_emb%' "
                                     "AND state = 'active' AND pid <> pg_backend_pid()").fetchone()
            if active == 0 or time.monotonic() - t_cancel > 10:
                break
            time.sleep(0.1)
        (pending,) = conn.execute("SELECT pending FROM omop_emb.index_status").fetchone()
    assert active == 0, f"CALL still running {time.monotonic() - t_cancel:.1f} s after Ctrl-C"
    assert pending > 0
    fake_embedder.set_fault(None)
    r = subprocess.run(serve_command("index", "--dsn", dsn, "--schema", "gibleed", "--progress", "none"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT pending FROM omop_emb.index_status").fetchone()[0] == 0


def test_search_on_e5_sample(capsys, e5_sample_db):
    code, out, err = run(capsys, "search", "--dsn", e5_sample_db, "--model", E5_MODEL, "high blood pressure",
                         "-k", "10", "--domain", "Condition", "--format", "json")
    assert code == 0, err
    assert 316866 in [r["concept_id"] for r in json.loads(out)]


def test_demo_pieces(tmp_path, capsys, monkeypatch):
    """demo --stop on an empty state dir is a clean no-op; the example SQL is valid on the sample db."""
    from omop_emb_pg import demo

    assert cli.main(["demo", "--stop", "--dir", str(tmp_path / "st")]) == 0
    assert "no demo cluster" in capsys.readouterr().out
    assert "condition_occurrence" in demo.EXAMPLE_SQL and demo.DEFAULT_DOMAINS is None


def test_demo_example_query(e5_sample_db):
    from omop_emb_pg import demo

    with psycopg.connect(e5_sample_db) as conn:
        rows = conn.execute(demo.EXAMPLE_SQL, ("heart attack",)).fetchall()
    assert rows and 4329847 in [r[1] for r in rows]
    assert all(r[4] >= 0 for r in rows)


def test_demo_indexes_every_domain_with_standard_concepts(e5_sample_db):
    # The demo's default: every domain of the sample that has standard concepts, the
    # sample's largest (Measurement) and Observation included.
    from omop_emb_pg import demo

    domains = demo.standard_domains(e5_sample_db)
    assert {"Condition", "Drug", "Measurement", "Observation", "Procedure"} <= set(domains)
    with psycopg.connect(e5_sample_db) as conn:
        rows = conn.execute(demo.COMPARE_SQL, ("heart attack", "e5-small")).fetchall()
    assert len(rows) == 3 and [r[0] for r in rows] == [1, 2, 3]
