"""The dbt example (examples/dbt) built with dbt-postgres against the real stack.

`dbt build` seeds local source terms and concept-set descriptions, keeps a
mapping job in step with them (pre-hooks: create, add terms, suggest through
nearest_batch, auto-approve), builds mapping_candidates, the
source_to_concept_map of the job's approved decisions and the concept sets
(LATERAL nearest + concept_ancestor) as tables, and runs the dbt tests (every
approved decision is exported). A decision recorded in SQL between two builds
is in the second one, which makes no embedding request: every query text is in
omop_emb.query_cache by then.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from conftest import E5_MODEL

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "examples" / "dbt"

pytestmark = pytest.mark.skipif(
    shutil.which("dbt", path=str(Path(sys.executable).parent)) is None,
    reason="dbt-postgres is not installed in this environment",
)

EXPECTED = {
    "high blood pressure": 316866,  # Hypertensive disorder
    "heart attack": 4329847,  # Myocardial infarction
    "sugar diabetes": 201826,  # Type 2 diabetes mellitus
    "broken hip": 4230399,  # Closed fracture of hip
}


def dbt_env(dsn: str, schema: str, workdir: Path) -> dict[str, str]:
    params = conninfo_to_dict(dsn)
    env = dict(os.environ)
    env.update({
        "OMOP_EMB_DBT_HOST": str(params.get("host") or "localhost"),
        "OMOP_EMB_DBT_PORT": str(params.get("port") or 5432),
        "OMOP_EMB_DBT_USER": str(params.get("user") or "postgres"),
        "OMOP_EMB_DBT_PASSWORD": str(params.get("password") or ""),
        "OMOP_EMB_DBT_DBNAME": str(params["dbname"]),
        "OMOP_EMB_DBT_SCHEMA": schema,
        "DBT_LOG_PATH": str(workdir / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_PARTIAL_PARSE": "false",
        "DBT_USE_COLORS": "false",
    })
    return env


def dbt_build(env: dict[str, str], workdir: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("dbt", path=str(Path(sys.executable).parent))
    return subprocess.run(
        [exe, "build", "--project-dir", str(PROJECT), "--profiles-dir", str(PROJECT),
         "--target-path", str(workdir / "target"),
         "--vars", f"{{omop_emb_model: {E5_MODEL}, cdm_schema: cdm}}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )


def cache_counts(dsn: str) -> tuple[int, int]:
    """(cache_misses, cache entries) of the e5 model."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT cache_misses, cache_entries FROM omop_emb.status() WHERE model = %s",
                           (E5_MODEL,)).fetchone()
    return int(row[0] or 0), int(row[1] or 0)


@pytest.fixture
def dbt_schema(e5_sample_db):
    schema = f"dbt_{uuid.uuid4().hex[:8]}"
    yield schema
    with psycopg.connect(e5_sample_db, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        # The session's database is shared: leave no mapping job behind.
        conn.execute("DELETE FROM omop_emb.mapping_job WHERE name = %s", (f"{schema}_local_dx",))


def test_dbt_build_maps_terms_and_rerun_hits_the_cache(e5_sample_db, dbt_schema, tmp_path):
    env = dbt_env(e5_sample_db, dbt_schema, tmp_path)

    first = dbt_build(env, tmp_path)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    assert "Completed successfully" in first.stdout
    assert "ERROR=0" in first.stdout and "PASS=" in first.stdout
    # Nothing is written into the repository.
    assert not (PROJECT / "target").exists() and not (PROJECT / "logs").exists()

    with psycopg.connect(e5_sample_db) as conn:
        rows = conn.execute(sql.SQL(
            "SELECT source_code_description, candidate_concept_id, similarity, exact_match, status, automatic "
            "FROM {}.mapping_candidates").format(sql.Identifier(dbt_schema))).fetchall()
        candidates = {r[0]: r for r in rows}
        assert len(rows) == 15
        for term, concept_id in EXPECTED.items():
            assert candidates[term][1] == concept_id, (term, candidates[term])
            assert 0.8 < candidates[term][2] <= 1.0
        assert candidates["gout"][3] is True  # exact name match
        # Auto-approved terms only so far, and every one is in source_to_concept_map.
        auto = {r[0]: r[1] for r in rows if r[4] == "approved"}
        assert auto and all(r[5] for r in rows if r[4] == "approved")
        assert all(r[4] == "unreviewed" for r in rows if r[0] not in auto)
        stcm = conn.execute(sql.SQL(
            "SELECT source_code_description, target_concept_id, source_vocabulary_id, target_vocabulary_id, "
            "valid_end_date, automatic FROM {}.source_to_concept_map").format(sql.Identifier(dbt_schema))).fetchall()
        assert {r[0]: r[1] for r in stcm} == auto
        assert all(r[2] == "LOCAL_DX" and r[3] and str(r[4]) == "2099-12-31" and r[5] for r in stcm)
        # A reviewer decides (replacing an automatic approval, if there is one).
        pending = "high blood pressure"
        conn.execute("SELECT omop_emb.record_decision(term_id, 'approved', ARRAY[%s]) FROM omop_emb.mapping_term "
                     "WHERE job_id = (SELECT job_id FROM omop_emb.mapping_job WHERE name = %s) AND source_name = %s",
                     (EXPECTED[pending], f"{dbt_schema}_local_dx", pending))
        conn.commit()

        sets = conn.execute(sql.SQL(
            "SELECT concept_set_name, concept_id, levels_of_separation, is_seed FROM {}.concept_sets")
            .format(sql.Identifier(dbt_schema))).fetchall()
        members = {(r[0], r[1]) for r in sets}
        assert ("diabetes", 201826) in members
        assert ("hypertension", 316866) in members
        assert ("hip_fracture", 4230399) in members
        assert all(r[2] >= 0 and r[3] == (r[2] == 0) for r in sets)

    misses_before, entries_before = cache_counts(e5_sample_db)
    second = dbt_build(env, tmp_path)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    misses_after, entries_after = cache_counts(e5_sample_db)
    # Re-running made no embedding request: every query text came from the cache.
    assert misses_after == misses_before
    assert entries_after == entries_before
    with psycopg.connect(e5_sample_db) as conn:
        stcm = conn.execute(sql.SQL("SELECT source_code_description, target_concept_id, automatic FROM "
                                    "{}.source_to_concept_map").format(sql.Identifier(dbt_schema))).fetchall()
    assert (pending, EXPECTED[pending], False) in stcm and len(stcm) == len(auto | {pending: 0})
