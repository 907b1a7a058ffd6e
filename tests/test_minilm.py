"""The second embedded model: all-MiniLM-L6-v2 served by ``omop-emb-pg serve --model``.

Its vectors are checked against reference vectors computed once with
sentence-transformers (tests/data/minilm_reference.json: see "computed_with" there);
then it is served beside e5 by a real server process, registered through the
extension with the prefixes the server advertises (none), and searched.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import psycopg
import pytest
import requests
from conftest import free_port, serve_command, start_serve_process, stop_process

from omop_emb_pg.minilm import MODEL_ID, MiniLM
from omop_emb_pg.sample import load_gibleed

REFERENCE = Path(__file__).resolve().parent / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def minilm() -> MiniLM:
    return MiniLM()


def test_vectors_match_sentence_transformers(minilm):
    ref = json.loads(REFERENCE.read_text())
    got = minilm.embed(ref["texts"])
    want = np.asarray(ref["vectors"], dtype=np.float64)
    cos = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print("cosine to sentence-transformers: min %.4f, mean %.4f" % (cos.min(), cos.mean()))
    assert cos.min() >= 0.99, dict(zip(ref["texts"], cos.round(4)))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)


def test_batching_does_not_change_a_vector(minilm):
    # Texts of different lengths are padded together: padding must not leak into the mean.
    alone = minilm.embed(["heart attack"])[0]
    mixed = minilm.embed(["Closed fracture of right hip, initial encounter", "heart attack", "a"])[1]
    assert float(alone @ mixed) > 0.9999


@pytest.fixture(scope="module")
def two_model_server():
    port = free_port()
    proc = start_serve_process(port, "--model", "e5,minilm", timeout=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        assert stop_process(proc) == 0


def test_server_lists_both_models_with_their_prefixes(two_model_server):
    cards = {c["id"]: c for c in requests.get(two_model_server + "/v1/models", timeout=10).json()["data"]}
    assert cards[MODEL_ID]["prefixes"] == {"document": "", "query": ""}
    assert cards["multilingual-e5-small"]["prefixes"] == {"document": "passage: ", "query": "query: "}


def test_server_refuses_e5_prefixes_and_unknown_models(two_model_server):
    url = two_model_server + "/v1/embeddings"
    r = requests.post(url, json={"model": MODEL_ID, "input": ["query: heart attack"]}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unexpected_prefix" and "symmetric" in err["message"]
    r = requests.post(url, json={"model": "all-MiniLM-L12-v2", "input": ["heart attack"]}, timeout=30)
    assert r.status_code == 404 and MODEL_ID in r.json()["error"]["message"]
    # The default model (the first given) still answers requests that name none.
    r = requests.post(url, json={"input": ["query: heart attack"]}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "multilingual-e5-small"


def test_unknown_model_option_is_a_clear_usage_error():
    r = subprocess.run(serve_command("serve", "--model", "e5,minillm", "--port", "0"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "'minillm'" in r.stderr and "minilm" in r.stderr.replace("'minillm'", "")


def test_registered_through_the_server_and_searched(fresh_db, two_model_server):
    from conftest import install_extension

    dsn = install_extension(fresh_db())
    load_gibleed(dsn)
    notices: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} | {d.message_hint}"))
        # No prefixes given: both models get what the one server advertises for each.
        for name, remote in (("minilm", MODEL_ID), ("e5", "multilingual-e5-small")):
            conn.execute("SELECT omop_emb.register_model(%s, 'openai', %s, remote_model => %s)",
                         (name, two_model_server, remote))
        recorded = dict((r[0], (r[1], r[2])) for r in conn.execute(
            "SELECT name, document_prefix, query_prefix FROM omop_emb.models"))
        assert recorded == {"minilm": ("", ""), "e5": ("passage: ", "query: ")}
        conn.execute("CALL omop_emb.index_concepts(model => 'minilm', vocabulary_schema => 'gibleed', "
                     "domain_ids => ARRAY['Condition'])")
        rows = conn.execute("SELECT concept_id, concept_name FROM omop_emb.nearest('heart attack', 3, "
                            "model => 'minilm', mode => 'semantic')").fetchall()
    assert rows[0][0] == 4329847, rows  # Myocardial infarction
    # The empty-prefix warning says that empty is right for this symmetric model.
    empty = [n for n in notices if "prefix is empty" in n]
    assert empty and all("which is right" in n and "Nothing to do" in n for n in empty), notices


def both_models_on_gibleed(dsn: str, server: str) -> str:
    """``dsn`` with omop_emb installed, GiBleed loaded, and MiniLM and e5 (the server at
    ``server``) registered and indexed over its Condition concepts."""
    from conftest import install_extension

    install_extension(dsn)
    load_gibleed(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, remote in (("minilm", MODEL_ID), ("e5", "multilingual-e5-small")):
            conn.execute("SELECT omop_emb.register_model(%s, 'openai', %s, remote_model => %s)",
                         (name, server, remote))
            conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'gibleed', "
                         "domain_ids => ARRAY['Condition'])", (name,))
    return dsn


def test_e5_ranked_with_minilm_as_companion(fresh_db, two_model_server):
    """The shipped ranking of the embedded pair (bench/exp_two_model_fusion.py): e5's fused
    candidates, MiniLM's similarity as two more features; one call applies it."""
    dsn = both_models_on_gibleed(fresh_db(), two_model_server)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""SELECT omop_emb.set_ranking('e5', '{"companion": "minilm"}')""")
        w = conn.execute("SELECT omop_emb.ranking('e5')").fetchone()[0]
        assert w["companion"] == "minilm" and w["source"].startswith("model")
        assert dict(zip(w["features"], w["coef"]))["companion_similarity"] > 0
        rows = conn.execute("SELECT concept_id, confidence FROM omop_emb.nearest('heart attack', 5, "
                            "model => 'e5', mode => 'fused')").fetchall()
        assert rows[0][0] == 4329847, rows  # Myocardial infarction
        assert [c for _, c in rows] == sorted((c for _, c in rows), reverse=True)
        # MiniLM embedded the query too (its query cache holds it)
        assert conn.execute("SELECT count(*) FROM omop_emb.query_cache q JOIN omop_emb.model m USING (model_id) "
                            "WHERE m.name = 'minilm' AND q.text = 'heart attack'").fetchone()[0] == 1


def test_the_demo_makes_the_companion_ranking_the_default(fresh_db, two_model_server, capsys):
    """demo.use_fused_ranking (what `omop-emb-pg demo` does with both models): each model takes
    the shipped ranking with the other as companion and the database's searches default to mode
    fused, so nearest() without a mode returns the fused rows with their confidence. A second
    run changes nothing; what a site set itself (its own ranking, its own search_mode) is kept."""
    from psycopg.conninfo import conninfo_to_dict

    from omop_emb_pg import demo

    dsn = both_models_on_gibleed(fresh_db(), two_model_server)
    dbname = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        own = conn.execute("SELECT omop_emb.ranking('minilm')").fetchone()[0]
        own = {k: v for k, v in own.items() if k != "source"}
        conn.execute("SELECT omop_emb.set_ranking('minilm', %s::jsonb)", (json.dumps(own),))  # a site's own
        before = conn.execute("SELECT concept_id FROM omop_emb.nearest('heart attack', 5, model => 'e5')").fetchall()
    assert demo.use_fused_ranking(dsn, dbname, [("e5", "minilm"), ("minilm", "e5")]) is True
    out = capsys.readouterr().out
    assert "e5: fused ranking with minilm as companion" in out and "minilm: a ranking of its own" in out
    with psycopg.connect(dsn) as conn:  # a new session: the database's setting applies
        assert conn.execute("SHOW omop_emb.search_mode").fetchone()[0] == "fused"
        assert conn.execute("SELECT omop_emb.ranking('e5')->>'companion'").fetchone()[0] == "minilm"
        assert conn.execute("SELECT omop_emb.ranking('minilm') ? 'companion'").fetchone()[0] is False
        default = conn.execute("SELECT concept_id, confidence FROM omop_emb.nearest('heart attack', 5, "
                               "model => 'e5')").fetchall()
        fused = conn.execute("SELECT concept_id, confidence FROM omop_emb.nearest('heart attack', 5, "
                             "model => 'e5', mode => 'fused')").fetchall()
        assert default == fused and all(c is not None for _, c in default)
        assert default[0][0] == 4329847 and before[0][0] == 4329847  # Myocardial infarction
        conn.execute("SET omop_emb.search_mode = 'semantic'")  # per session, back to the bare model
        assert conn.execute("SELECT concept_id FROM omop_emb.nearest('heart attack', 5, model => 'e5')"
                            ).fetchall() == before
    # again, and with a search_mode the database's owner chose: kept
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" SET omop_emb.search_mode = \'hybrid\'')
    assert demo.use_fused_ranking(dsn, dbname, [("e5", "minilm")]) is False
    out = capsys.readouterr().out
    assert "ranked with minilm as companion already" in out and "'hybrid' (a setting of the database's own, kept)" in out
