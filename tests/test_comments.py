"""psql users discover the API with \\df+ omop_emb.* and \\dx+ omop_emb: every
routine, table and view of schema omop_emb has a comment and every argument of
the public routines has a name."""

from __future__ import annotations

import shutil
import subprocess

import psycopg
import pytest

from conftest import register_fake_model


@pytest.fixture(scope="module")
def commented_db(module_omop_db, fake_embedder_session):
    # A registered model adds its embedding table to the schema.
    register_fake_model(module_omop_db, fake_embedder_session, name="fake_comments")
    return module_omop_db


def test_every_routine_has_a_comment(commented_db):
    with psycopg.connect(commented_db) as conn:
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, obj_description(p.oid, 'pg_proc') "
            "FROM pg_proc p WHERE p.pronamespace = 'omop_emb'::regnamespace ORDER BY 1").fetchall()
    assert len(rows) >= 15
    missing = [sig for sig, comment in rows if not (comment or "").strip()]
    assert missing == [], f"routines without COMMENT: {missing}"


def test_every_argument_of_public_routines_is_named(commented_db):
    with psycopg.connect(commented_db) as conn:
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, p.pronargs, p.proargnames, p.proargmodes "
            "FROM pg_proc p WHERE p.pronamespace = 'omop_emb'::regnamespace "
            "AND p.proname NOT LIKE '\\_%' AND p.pronargs > 0").fetchall()
    unnamed = []
    for sig, nargs, names, modes in rows:
        # proargnames covers all arguments, output columns included (modes not NULL).
        inputs = [n for n, m in zip(names or [], modes or ["i"] * len(names or [])) if m in ("i", "b", "v")]
        if len(inputs) != nargs or not all(inputs):
            unnamed.append(sig)
    assert unnamed == [], f"routines with unnamed arguments: {unnamed}"


def test_every_table_and_view_has_a_comment(commented_db):
    with psycopg.connect(commented_db) as conn:
        rows = conn.execute(
            "SELECT c.relname, c.relkind, obj_description(c.oid, 'pg_class') FROM pg_class c "
            "WHERE c.relnamespace = 'omop_emb'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p') "
            "ORDER BY 1").fetchall()
    names = {r[0] for r in rows}
    assert {"model", "models", "search_request", "search_result"} <= names
    assert any(n.startswith("embedding_") for n in names)
    missing = [r[0] for r in rows if not (r[2] or "").strip()]
    assert missing == [], f"tables/views without COMMENT: {missing}"


def test_every_view_column_has_a_comment_or_is_self_explaining(commented_db):
    """The BI view's columns are what BI tools show as field descriptions."""
    with psycopg.connect(commented_db) as conn:
        missing = conn.execute(
            "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = 'omop_emb.search_result'::regclass "
            "AND a.attnum > 0 AND NOT a.attisdropped AND col_description(a.attrelid, a.attnum) IS NULL"
        ).fetchall()
    assert missing == []


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_psql_df_plus_and_dx_plus_show_the_api(commented_db):
    df = subprocess.run(["psql", "-X", "-d", commented_db, "-c", r"\df+ omop_emb.*"],
                        capture_output=True, text=True, timeout=60)
    assert df.returncode == 0, df.stderr
    assert "nearest_batch" in df.stdout and "search_request_results" in df.stdout
    assert "The k (1..1000) concepts nearest" in df.stdout or "concepts nearest" in df.stdout
    with psycopg.connect(commented_db) as conn:
        is_extension = conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'omop_emb'").fetchone()[0]
    if is_extension:
        dx = subprocess.run(["psql", "-X", "-d", commented_db, "-c", r"\dx+ omop_emb"],
                            capture_output=True, text=True, timeout=60)
        assert dx.returncode == 0, dx.stderr
        assert "function omop_emb.nearest(" in dx.stdout
        assert "view omop_emb.search_result" in dx.stdout
