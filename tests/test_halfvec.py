"""Issue 16.1: half-precision storage. A model registered with storage => 'halfvec'
(any dimension) and a model converted in place with alter_model(storage => ...)
index, search, filter, exact-match and search lexically like a vector model."""

from __future__ import annotations

import psycopg
import pytest

from conftest import load_synthetic_vocabulary, register_fake_model

DOMAINS = ["Condition", "Drug", "Procedure"]


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def load_vocab(dsn, n=300):
    load_synthetic_vocabulary(dsn, ((i, f"concept number {i} of kind {i % 7}", DOMAINS[i % 3], "V", "C", "S",
                                     f"C{i}", None) for i in range(1, n + 1)))


def column_type(conn, model):
    mid = conn.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (model,)).fetchone()[0]
    return conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                        "%s::regclass AND attname = 'embedding'", (f"omop_emb.embedding_{mid}",)).fetchone()[0]


def hnsw_opclass(conn, model):
    mid = conn.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (model,)).fetchone()[0]
    row = conn.execute("SELECT pg_get_indexdef(%s::regclass)", (f"omop_emb.embedding_{mid}_hnsw",)).fetchone()
    return row[0]


def results(conn, model, query, **kw):
    args = "".join(f", {k} => %({k})s" for k in kw)
    return conn.execute(f"SELECT concept_id, domain_id, exact_match FROM omop_emb.nearest(%(q)s, 10, "
                        f"model => %(m)s{args})", {"q": query, "m": model, **kw}).fetchall()


QUERIES = ["concept number 17 of kind 3", "kind 5 concept", "number 250", "something else entirely"]


def test_halfvec_model_indexes_searches_and_filters_like_a_vector_model(omop_db, fake_embedder):
    load_vocab(omop_db)
    register_fake_model(omop_db, fake_embedder, name="fv")
    register_fake_model(omop_db, fake_embedder, name="fh", storage="halfvec")
    with connect(omop_db) as conn:
        for m in ("fv", "fh"):
            conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'vocab')", (m,))
            conn.execute("SELECT omop_emb.create_index(%s)", (m,))
        assert conn.execute("SELECT name, storage FROM omop_emb.models ORDER BY name").fetchall() == [
            ("fh", "halfvec"), ("fv", "vector")]
        assert column_type(conn, "fh") == "halfvec(384)"
        assert "halfvec_cosine_ops" in hnsw_opclass(conn, "fh")
        conn.execute("SET enable_seqscan = off")  # the HNSW index serves the halfvec search
        plan = "\n".join(r[0] for r in conn.execute(
            "SELECT * FROM omop_emb.explain_nearest('kind 5 concept', 10, model => 'fh')"))
        assert "embedding_" in plan and "_hnsw" in plan, plan
        conn.execute("RESET enable_seqscan")
        for q in QUERIES:
            v, h = results(conn, "fv", q), results(conn, "fh", q)
            assert len(h) == 10
            # float16 keeps the ranking of these well-separated vectors
            assert [r[0] for r in h][:3] == [r[0] for r in v][:3], q
            assert len({r[0] for r in h} & {r[0] for r in v}) >= 8, q
        # exact match (the query is a concept's name) comes first, flagged
        h = results(conn, "fh", "Concept number 17 of kind 3")
        assert h[0][0] == 17 and h[0][2] is True
        # filters
        h = results(conn, "fh", "kind 5 concept", domain_ids=["Drug"])
        assert len(h) == 10 and {r[1] for r in h} == {"Drug"}
        # lexical and hybrid search work on the halfvec table
        assert results(conn, "fh", "number 250", mode="lexical")[0][0] == 250
        h, v = (results(conn, m, "number 250", mode="hybrid") for m in ("fh", "fv"))
        assert len(h) == 10 and [r[0] for r in h][:3] == [r[0] for r in v][:3]
        # nearest by vector: the vector of concept 42's text finds concept 42
        vec = conn.execute("SELECT omop_emb.embed('concept number 42 of kind 0', 'document', model => 'fh')"
                           ).fetchone()[0]
        assert conn.execute("SELECT concept_id FROM omop_emb.nearest(%s::vector, 1, model => 'fh')",
                            (vec,)).fetchone()[0] == 42


def test_halfvec_for_any_dimension_and_bad_storage_refused(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder, name="small", dims=16, storage="halfvec")
    with connect(omop_db) as conn:
        assert column_type(conn, "small") == "halfvec(16)"
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.register_model('x', 'openai', %s, dimensions => 16, "
                         "storage => 'float8')", (fake_embedder.url,))
        assert "unknown storage 'float8'" in e.value.diag.message_primary
        assert "halfvec" in e.value.diag.message_hint
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.register_model('x', 'openai', %s, dimensions => 3000, "
                         "storage => 'vector')", (fake_embedder.url,))
        assert "cannot index 3000 dimensions" in e.value.diag.message_primary
        assert conn.execute("SELECT count(*) FROM omop_emb.models WHERE name = 'x'").fetchone()[0] == 0


def test_alter_model_converts_storage_in_place_without_re_embedding(omop_db, fake_embedder):
    load_vocab(omop_db)
    register_fake_model(omop_db, fake_embedder, name="fv")
    with connect(omop_db) as conn, connect(omop_db) as other:
        conn.execute("CALL omop_emb.index_concepts(model => 'fv', vocabulary_schema => 'vocab')")
        conn.execute("SELECT omop_emb.create_index('fv', m => 8, ef_construction => 32)")
        before = {q: results(conn, "fv", q) for q in QUERIES}
        before_other = results(other, "fv", QUERIES[0])  # plans prepared for vector(384)
        fake_embedder.reset()
        conn.execute("SELECT omop_emb.alter_model('fv', storage => 'halfvec')")
        assert fake_embedder.stats()["texts"] == 0  # nothing re-embedded (queries are cached)
        assert column_type(conn, "fv") == "halfvec(384)"
        idx = hnsw_opclass(conn, "fv")
        assert "halfvec_cosine_ops" in idx and "m='8'" in idx and "ef_construction='32'" in idx
        assert conn.execute("SELECT storage, index_method FROM omop_emb.models").fetchone() == ("halfvec", "hnsw")
        for q in QUERIES:
            assert [r[0] for r in results(conn, "fv", q)][:3] == [r[0] for r in before[q]][:3]
        # another session's prepared plans follow the new type
        assert [r[0] for r in results(other, "fv", QUERIES[0])][:3] == [r[0] for r in before_other][:3]
        conn.execute("SELECT omop_emb.alter_model('fv', storage => 'vector')")
        assert column_type(conn, "fv") == "vector(384)"
        assert "vector_cosine_ops" in hnsw_opclass(conn, "fv")
        assert [r[0] for r in results(other, "fv", QUERIES[1])][:3] == [r[0] for r in before[QUERIES[1]]][:3]
        # indexing more concepts after the conversion writes the new type
        conn.execute("INSERT INTO vocab.concept (concept_id, concept_name, domain_id, vocabulary_id, "
                     "concept_class_id, standard_concept, concept_code) VALUES "
                     "(1001, 'a late concept', 'Drug', 'V', 'C', 'S', 'L1')")
        conn.execute("SELECT omop_emb.alter_model('fv', storage => 'halfvec')")
        conn.execute("CALL omop_emb.index_concepts(model => 'fv', vocabulary_schema => 'vocab')")
        assert results(conn, "fv", "a late concept")[0][:1] == (1001,)
