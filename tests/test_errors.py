"""Errors that say what is wrong, from SQL, Python and the CLI alike: a filter value that
no indexed concept has names the closest values the model holds; messages start with the
message (no ``plpy.Error:``, no traceback); hints name SQL arguments in SQL and CLI flags
in the CLI; the WARNINGs and NOTICEs of the SQL API reach Python and CLI users."""

from __future__ import annotations

import logging

import psycopg
import pytest

from conftest import install_extension, register_fake_model
from omop_emb_pg import OmopEmb, cli
from omop_emb_pg.errors import InvalidArgument, OmopEmbWarning

MODEL = "fake"


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


@pytest.fixture(scope="module")
def db(module_db, fake_embedder_session) -> str:
    """GiBleed's concepts indexed with the deterministic test double."""
    from omop_emb_pg.sample import load_gibleed

    dsn = module_db()
    load_gibleed(dsn)
    install_extension(dsn)
    register_fake_model(dsn, fake_embedder_session, name=MODEL)
    with connect(dsn) as c:
        c.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'gibleed')")
    return dsn


def sql_error(dsn, sql, params=None) -> psycopg.Error:
    with connect(dsn) as c, pytest.raises(psycopg.Error) as e:
        c.execute(sql, params)
    return e.value


@pytest.mark.parametrize("argument,value,expected", [
    ("domain_ids", "Conditon", "Condition"),     # a typo
    ("domain_ids", "condition", "Condition"),    # the case
    ("vocabulary_ids", "snomed", "SNOMED"),
    ("concept_class_ids", "clinical finding", "Clinical Finding"),
])
def test_unknown_filter_value_is_an_error_naming_the_closest_values(db, fake_embedder, argument, value,
                                                                    expected):
    e = sql_error(db, f"SELECT * FROM omop_emb.nearest('bleeding', 5, {argument} => %s)", ([value],))
    d = e.diag
    assert d.sqlstate == "22023"
    column = argument[:-1]  # domain_ids -> domain_id
    assert d.message_primary == f"omop_emb: {argument}: no indexed concept has {column} {value!r}"
    assert d.column_name == argument
    assert d.message_hint.startswith(f"Did you mean {expected!r}")   # the closest first
    assert f"{argument} => ARRAY[{expected!r}]" in d.message_hint   # SQL syntax in SQL
    assert expected in d.message_detail and f"model {MODEL}" in d.message_detail
    assert fake_embedder.stats()["requests"] == 0   # checked before embedding anything
    # The same from nearest_batch, lexical mode and a query vector.
    for sql in (f"SELECT * FROM omop_emb.nearest_batch(ARRAY['bleeding'], 5, {argument} => %s)",
                f"SELECT * FROM omop_emb.nearest('bleeding', 5, {argument} => %s, mode => 'lexical')",
                f"SELECT * FROM omop_emb.nearest(omop_emb.embed('x', 'query'), 5, {argument} => %s)"):
        assert sql_error(db, sql, ([value],)).diag.column_name == argument


def test_known_values_still_search_and_a_value_indexed_later_is_seen(db, fake_embedder):
    with connect(db) as c:
        rows = c.execute("SELECT domain_id FROM omop_emb.nearest('bleeding', 5, "
                         "domain_ids => '{Condition}')").fetchall()
        assert rows and {r[0] for r in rows} == {"Condition"}
        # The session has read the known values; a value indexed afterwards is found
        # (an unknown value reads them again before failing).
        c.execute("SELECT omop_emb.upsert_concept_texts('{2000000001}', '{Local bleeding term}')")
        c.execute("UPDATE omop_emb.embedding_1 SET domain_id = 'Local' WHERE concept_id = 2000000001")
        rows = c.execute("SELECT concept_id FROM omop_emb.nearest('Local bleeding term', 5, "
                         "domain_ids => '{Local}')").fetchall()
        assert rows == [(2000000001,)]
        c.execute("DELETE FROM omop_emb.embedding_1 WHERE concept_id = 2000000001")


def test_errors_start_with_the_message(db, fake_embedder):
    e = sql_error(db, "SELECT * FROM omop_emb.nearest('x', 0)")
    assert e.diag.message_primary == "omop_emb: k = 0 is outside 1..1000"
    e = sql_error(db, "SELECT * FROM omop_emb.nearest('x', 5, model => 'nope')")
    assert e.diag.message_primary == "omop_emb: unknown model 'nope'"


def test_python_client_gets_the_error_and_the_warnings(db, fake_embedder, caplog):
    with OmopEmb(db) as client:
        with pytest.raises(InvalidArgument) as e:
            client.nearest("bleeding", domain_ids=["Conditon"])
        assert str(e.value).startswith("domain_ids: no indexed concept has domain_id 'Conditon'")
        assert e.value.argument == "domain_ids" and "'Condition'" in e.value.hint
        # A blank query is a WARNING (no rows): a Python warning.
        with pytest.warns(OmopEmbWarning, match="blank"):
            assert client.nearest("   ") == []
        # NOTICEs go to the logger omop_emb_pg.
        with caplog.at_level(logging.INFO, logger="omop_emb_pg"):
            assert client.nearest("bleeding", domain_ids=["Condition"], vocabulary_ids=["RxNorm"]) == []
        assert any("no indexed concept matches the filters" in r.getMessage() for r in caplog.records)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_and_hints_name_cli_flags(capsys, db, fake_embedder):
    code, _, err = run(capsys, "search", "--dsn", db, "--domain", "Conditon", "bleeding")
    assert code == 1
    assert err.startswith("omop-emb-pg search: error: domain_ids: no indexed concept has domain_id 'Conditon'")
    assert "--domain 'Condition'" in err and "=>" not in err and "Traceback" not in err
    code, _, err = run(capsys, "search", "--dsn", db, "--model", "nope", "bleeding")
    assert code == 1 and "--model" in err and "SET omop_emb.model" not in err
    code, _, err = run(capsys, "index", "--dsn", db, "--schema", "nowhere", "--progress", "none")
    assert code == 1 and "Traceback" not in err


def test_cli_shows_notices_and_refuses_a_blank_query(capsys, db, fake_embedder):
    code, out, err = run(capsys, "search", "--dsn", db, "--domain", "Condition", "--vocabulary", "RxNorm",
                         "--format", "csv", "bleeding")
    assert code == 0 and "omop-emb-pg search: notice: no indexed concept matches" in err
    code, out, err = run(capsys, "search", "--dsn", db, "  ")
    assert code == 2 and "blank" in err and out == ""


def test_vocabulary_drift_is_visible_in_status_and_warned_once_per_session(capsys, db, fake_embedder):
    with connect(db) as c:
        (recorded, now, stale, advice) = c.execute(
            "SELECT vocabulary_version, vocabulary_version_now, stale_texts, advice "
            "FROM omop_emb.status()").fetchone()
        assert recorded == now == "v5.0 18-JAN-19" and stale == 0 and advice is None
        cid, name = c.execute("SELECT concept_id, concept_name FROM gibleed.concept c WHERE EXISTS "
                              "(SELECT 1 FROM omop_emb.embedding_1 e WHERE e.concept_id = c.concept_id) "
                              "ORDER BY concept_id LIMIT 1").fetchone()
        c.execute("UPDATE gibleed.vocabulary SET vocabulary_version = 'v5.0 01-JAN-26' "
                  "WHERE vocabulary_id = 'None'")
        c.execute("UPDATE gibleed.concept SET concept_name = concept_name || ' (renamed)' "
                  "WHERE concept_id = %s", (cid,))
    try:
        with connect(db) as c:
            now, stale, advice = c.execute("SELECT vocabulary_version_now, stale_texts, advice "
                                           "FROM omop_emb.status()").fetchone()
            assert now == "v5.0 01-JAN-26" and stale == 1
            assert advice == ("vocabulary version v5.0 18-JAN-19 -> v5.0 01-JAN-26; 1 embedded names no "
                              "longer match the vocabulary since indexing: CALL omop_emb.index_concepts("
                              "model => 'fake') re-embeds what changed")
            seen = []
            c.add_notice_handler(lambda d: seen.append((d.severity_nonlocalized, d.message_primary)))
            for _ in range(3):
                c.execute("SELECT * FROM omop_emb.nearest('bleeding', 3)").fetchall()
            drift = [m for s, m in seen if "may be stale" in m]
            assert drift == ["omop_emb: model fake may be stale: vocabulary version v5.0 18-JAN-19 -> "
                             "v5.0 01-JAN-26 since it was indexed"]   # once per session
        code, out, _ = run(capsys, "status", "--dsn", db)
        assert code == 0 and "omop-emb-pg index --model fake re-embeds what changed" in out
        # Re-indexing takes the renamed concept and records the new version.
        with connect(db) as c:
            c.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'gibleed')")
            assert c.execute("SELECT stale_texts, advice FROM omop_emb.status()").fetchone() == (0, None)
    finally:
        with connect(db) as c:
            c.execute("UPDATE gibleed.vocabulary SET vocabulary_version = 'v5.0 18-JAN-19' "
                      "WHERE vocabulary_id = 'None'")
            c.execute("UPDATE gibleed.concept SET concept_name = %s WHERE concept_id = %s", (name, cid))
