"""The BI pattern (sql/70_bi.sql): analysts INSERT into omop_emb.search_request,
BI tools read the view omop_emb.search_result; tested as reader roles."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import E5_MODEL, register_fake_model


@pytest.fixture
def readers(e5_sample_db, pg):
    """Two login roles that are members of omop_emb_reader; the requests they
    make are removed afterwards (e5_sample_db is shared by the session)."""
    names = [f"bi_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with psycopg.connect(pg, autocommit=True) as conn:
        for n in names:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE omop_emb_reader").format(sql.Identifier(n)))
    yield names
    with psycopg.connect(e5_sample_db, autocommit=True) as conn:
        conn.execute("DELETE FROM omop_emb.search_request WHERE created_by = ANY(%s)", (names,))
    with psycopg.connect(pg, autocommit=True) as conn:
        for n in names:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(n)))


def as_role(dsn: str, role: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    return conn


def test_reader_inserts_requests_and_reads_results(e5_sample_db, readers):
    alice, bob = readers
    label = f"cardio_{uuid.uuid4().hex[:6]}"
    with as_role(e5_sample_db, alice) as conn:
        ids = [r[0] for r in conn.execute(
            "INSERT INTO omop_emb.search_request (query, k, domain_ids, model, label) VALUES "
            "('high blood pressure', 3, '{Condition}', %(m)s, %(l)s), "
            "('heart attack', 2, NULL, %(m)s, %(l)s) RETURNING request_id",
            {"m": E5_MODEL, "l": label}).fetchall()]
        rows = conn.execute(
            "SELECT request_id, query, rank, concept_id, similarity, error, created_by "
            "FROM omop_emb.search_result WHERE label = %s ORDER BY request_id, rank", (label,)).fetchall()
    assert [(r[0], r[2]) for r in rows] == [(ids[0], 1), (ids[0], 2), (ids[0], 3), (ids[1], 1), (ids[1], 2)]
    # The same concepts, in the same order, as nearest() called directly.
    with psycopg.connect(e5_sample_db) as conn:
        direct = [r[0] for r in conn.execute(
            "SELECT concept_id FROM omop_emb.nearest('high blood pressure', 3, domain_ids => '{Condition}', "
            "model => %(m)s) UNION ALL SELECT concept_id FROM omop_emb.nearest('heart attack', 2, model => %(m)s)",
            {"m": E5_MODEL})]
    assert [r[3] for r in rows] == direct
    assert all(r[5] is None and 0 < r[4] <= 1 and r[6] == alice for r in rows)

    # Another reader sees the requests but cannot change or delete them,
    # nor insert in someone else's name.
    with as_role(e5_sample_db, bob) as conn:
        assert conn.execute("SELECT count(*) FROM omop_emb.search_result WHERE request_id = %s",
                            (ids[0],)).fetchone()[0] == 3
        assert conn.execute("DELETE FROM omop_emb.search_request WHERE request_id = %s", (ids[0],)).rowcount == 0
        assert conn.execute("UPDATE omop_emb.search_request SET k = 5 WHERE request_id = %s",
                            (ids[0],)).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO omop_emb.search_request (query, created_by) VALUES ('asthma', %s)", (alice,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE omop_emb.search_request SET created_by = %s WHERE request_id = %s", (bob, ids[0]))
    # The owner can.
    with as_role(e5_sample_db, alice) as conn:
        assert conn.execute("UPDATE omop_emb.search_request SET k = 1 WHERE request_id = %s",
                            (ids[0],)).rowcount == 1
        assert conn.execute("SELECT count(*) FROM omop_emb.search_result WHERE request_id = %s",
                            (ids[0],)).fetchone()[0] == 1
        assert conn.execute("DELETE FROM omop_emb.search_request WHERE request_id = %s", (ids[1],)).rowcount == 1


def test_rereading_the_view_makes_no_embedding_request(e5_sample_db, readers):
    alice, _ = readers
    with as_role(e5_sample_db, alice) as conn:
        rid = conn.execute("INSERT INTO omop_emb.search_request (query, k, model) VALUES "
                           "('sugar diabetes', 5, %s) RETURNING request_id", (E5_MODEL,)).fetchone()[0]
        first = conn.execute("SELECT concept_id FROM omop_emb.search_result WHERE request_id = %s "
                             "ORDER BY rank", (rid,)).fetchall()
        misses = conn.execute("SELECT cache_misses FROM omop_emb.status() WHERE model = %s",
                              (E5_MODEL,)).fetchone()[0]
        for _ in range(3):
            again = conn.execute("SELECT concept_id FROM omop_emb.search_result WHERE request_id = %s "
                                 "ORDER BY rank", (rid,)).fetchall()
            assert again == first
        assert conn.execute("SELECT cache_misses FROM omop_emb.status() WHERE model = %s",
                            (E5_MODEL,)).fetchone()[0] == misses
        # A filter on request_id is applied before nearest() runs.
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT * FROM omop_emb.search_result WHERE request_id = %s", (rid,)))
        assert "search_request_pkey" in plan or "request_id" in plan
    with psycopg.connect(e5_sample_db) as conn:
        assert first == conn.execute("SELECT concept_id FROM omop_emb.nearest('sugar diabetes', 5, "
                                     "model => %s)", (E5_MODEL,)).fetchall()


def test_invalid_requests_are_rejected(e5_sample_db, readers):
    alice, _ = readers
    with as_role(e5_sample_db, alice) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO omop_emb.search_request (query, k) VALUES ('asthma', 0)")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO omop_emb.search_request (query) VALUES ('   ')")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO omop_emb.search_request (query, model) VALUES ('asthma', 'no-such-model')")


def test_failed_request_does_not_break_the_view(omop_db, fake_embedder, pg):
    """In a database of its own: a model that is registered but not indexed."""
    register_fake_model(omop_db, fake_embedder, name="fake")
    role = f"bi_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE omop_emb_reader").format(sql.Identifier(role)))
    try:
        with as_role(omop_db, role) as conn:
            conn.execute("INSERT INTO omop_emb.search_request (query, model) VALUES ('asthma', 'fake')")
            rows = conn.execute("SELECT rank, concept_id, error FROM omop_emb.search_result").fetchall()
        assert len(rows) == 1
        assert rows[0][0] is None and rows[0][1] is None
        assert "SQLSTATE" in rows[0][2] and not rows[0][2].startswith("plpy.Error")
    finally:
        with psycopg.connect(omop_db, autocommit=True) as conn:
            conn.execute("DELETE FROM omop_emb.search_request")
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_bi_objects_are_commented(e5_sample_db):
    with psycopg.connect(e5_sample_db) as conn:
        missing = conn.execute(
            "SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.oid IN ('omop_emb.search_request'::regclass, 'omop_emb.search_result'::regclass) "
            "AND a.attnum > 0 AND NOT a.attisdropped AND col_description(c.oid, a.attnum) IS NULL").fetchall()
    assert missing == []
