"""Issue 12, integrity and resource limits: no silent mixing of vector spaces, no stale
plans in other sessions, no search blocked by a rebuild or by another session's open
transaction, bounded nearest_batch, input length checked on what is sent, zero vectors
refused, honest messages for lexical searches that find nothing.

All on the deterministic test double (fast, exact request counts).
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from conftest import install_extension, register_fake_model

N_CONCEPTS = 60


def connect(dsn: str, **kw) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, **kw)


def scalar(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


@pytest.fixture(scope="module")
def idb(module_db) -> str:
    """omop_emb installed, N_CONCEPTS standard concepts in schema vocab."""
    dsn = install_extension(module_db())
    with connect(dsn) as c:
        c.execute("CREATE SCHEMA vocab")
        c.execute("CREATE TABLE vocab.concept (concept_id int PRIMARY KEY, concept_name text, "
                  "domain_id text, vocabulary_id text, concept_class_id text, standard_concept text, "
                  "concept_code text, invalid_reason text)")
        c.execute("INSERT INTO vocab.concept SELECT i, 'concept number ' || i, 'Condition', 'V', 'C', "
                  "'S', 'c' || i, NULL FROM generate_series(1, %s) i", (N_CONCEPTS,))
    return dsn


@pytest.fixture
def model(idb, fake_embedder):
    """A model on the test double with the vocabulary indexed (HNSW, cosine); dropped after."""
    name = "m" + uuid.uuid4().hex[:8]
    register_fake_model(idb, fake_embedder, name=name)
    with connect(idb) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'vocab')", (name,))
        c.execute("SELECT omop_emb.create_index(%s)", (name,))
    fake_embedder.reset()
    yield name
    with connect(idb) as c:
        c.execute("SELECT omop_emb.drop_model(%s, true)", (name,))


def index_notices(conn, name) -> list[str]:
    notes: list[str] = []
    conn.add_notice_handler(lambda d: notes.append(d.message_primary))
    conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'vocab')", (name,))
    return notes


def to_embed(notes: list[str]) -> int:
    line = next(n for n in notes if "to embed" in n)
    return int(line.split(" to embed")[0].rsplit(", ", 1)[1])


def table_of(conn, name) -> str:
    return "omop_emb.embedding_%d" % scalar(conn, "SELECT model_id FROM omop_emb.model WHERE name = %s", (name,))


# ---------------------------------------------------------------- 4. vector-space identity
def test_changing_the_remote_model_requires_a_reindex_before_searching(idb, fake_embedder, model):
    with connect(idb) as c:
        assert len(c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s)",
                             (model,)).fetchall()) == 5
        # Another server serving the same model (a replica): nothing to re-embed, searches go on.
        c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (model, fake_embedder.url + "/v1"))
        assert len(c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s)",
                             (model,)).fetchall()) == 5
        assert to_embed(index_notices(c, model)) == 0
        # Another model: the stored vectors come from the old one.
        c.execute("SELECT omop_emb.alter_model(%s, remote_model => 'another-model')", (model,))
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s)", (model,))
        d = ei.value.diag
        text = " ".join(x or "" for x in (d.message_primary, d.message_detail, d.message_hint))
        assert d.sqlstate == "OE005", text
        assert "another-model" in text and f"index_concepts(model => '{model}')" in text, text
        # The re-index re-embeds every text, then searches work again.
        fake_embedder.reset()
        assert to_embed(index_notices(c, model)) == N_CONCEPTS
        assert fake_embedder.stats()["texts"] == N_CONCEPTS
        assert len(c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s)",
                             (model,)).fetchall()) == 5
        assert to_embed(index_notices(c, model)) == 0


def test_lexical_search_works_while_vectors_are_stale(idb, fake_embedder, model):
    with connect(idb) as c:
        c.execute("SELECT omop_emb.alter_model(%s, remote_model => 'another-model')", (model,))
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s, mode => 'hybrid')",
                      (model,))
        assert ei.value.diag.sqlstate == "OE005"
        # Lexical search reads no vector: it keeps working meanwhile.
        assert c.execute("SELECT count(*) FROM omop_emb.nearest('concept number 3', 5, model => %s, "
                         "mode => 'lexical')", (model,)).fetchone()[0] == 5
        # A run cut short leaves rows of the old model: still refused.
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'vocab', batch_size => 10, "
                  "max_texts => 20)", (model,))
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s)", (model,))
        assert ei.value.diag.sqlstate == "OE005"
        assert to_embed(index_notices(c, model)) == N_CONCEPTS - 20
        assert len(c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s)",
                             (model,)).fetchall()) == 5


def test_a_new_document_prefix_is_re_embedded_in_place_while_searches_go_on(idb, fake_embedder, model):
    """The same model with another prefix stays in the same vector space: no refusal."""
    with connect(idb) as c:
        c.execute("SELECT omop_emb.alter_model(%s, document_prefix => 'passage: ')", (model,))
        assert len(c.execute("SELECT * FROM omop_emb.nearest('concept number 3', 5, model => %s)",
                             (model,)).fetchall()) == 5
        assert to_embed(index_notices(c, model)) == N_CONCEPTS


def test_query_caches_are_keyed_on_the_model_identity(idb, fake_embedder, model):
    q = "cached " + uuid.uuid4().hex
    with connect(idb) as a, connect(idb) as admin:
        a.execute("SELECT omop_emb.embed(%s, 'query', %s)", (q, model))
        a.execute("SELECT omop_emb.embed(%s, 'query', %s)", (q, model))
        assert fake_embedder.stats()["requests"] == 1
        admin.execute("SELECT omop_emb.alter_model(%s, remote_model => 'another-model')", (model,))
        # Neither this session's cache nor the shared one may answer for the new model.
        a.execute("SELECT omop_emb.embed(%s, 'query', %s)", (q, model))
        assert fake_embedder.stats()["requests"] == 2
        assert fake_embedder.stats()["last_texts"][-1] == q
    with connect(idb) as b:  # the entry written for the new model is shared
        b.execute("SELECT omop_emb.embed(%s, 'query', %s)", (q, model))
    assert fake_embedder.stats()["requests"] == 2


# ---------------------------------------------------------------- 5. other sessions' plans
def test_other_sessions_follow_a_metric_change(idb, fake_embedder, model):
    q = "SELECT concept_id, distance, similarity FROM omop_emb.nearest('concept number 7', 10, model => %s)"
    with connect(idb) as a, connect(idb) as admin:
        before = a.execute(q, (model,)).fetchall()  # plans prepared for cosine
        admin.execute("SELECT omop_emb.create_index(%s, metric => 'l2')", (model,))
        got = a.execute(q, (model,)).fetchall()
    with connect(idb) as fresh:
        want = fresh.execute(q, (model,)).fetchall()
        t = table_of(fresh, model)
        vec = scalar(fresh, "SELECT omop_emb.embed('concept number 7', 'query', %s)::text", (model,))
        l2 = scalar(fresh, f"SELECT embedding OPERATOR(public.<->) %s::vector FROM {t} WHERE concept_id = %s",
                    (vec, got[1][0]))
    assert [r[0] for r in got] == [r[0] for r in want]
    assert got[1][1] == pytest.approx(l2, abs=1e-5)  # an L2 distance, not the cosine one
    assert got[1][2] == pytest.approx(1 / (1 + l2), abs=1e-5)
    assert got[1][1] != pytest.approx(before[1][1], abs=1e-3)


# ---------------------------------------------------------------- 6. create_index vs searches
def test_searches_and_status_are_not_blocked_by_a_rebuild(idb, fake_embedder, model):
    with connect(idb) as c:
        t = table_of(c, model)
        c.execute("SELECT omop_emb.nearest('concept number 5', 3, model => %s)", (model,))  # cached query
    writer = psycopg.connect(idb)  # a writer that holds the table: the rebuild must wait for it
    writer.execute(f"LOCK TABLE {t} IN ROW EXCLUSIVE MODE")
    box: dict = {}

    def rebuild():
        try:
            with connect(idb) as r:
                box["pid"] = r.info.backend_pid
                box["method"] = scalar(r, "SELECT omop_emb.create_index(%s, m => 8, ef_construction => 32)",
                                       (model,))
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    th = threading.Thread(target=rebuild, daemon=True)
    th.start()
    try:
        with connect(idb) as c:
            deadline = time.monotonic() + 20
            while not scalar(c, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s "
                                "AND wait_event_type = 'Lock')", (box.get("pid", 0),)):
                assert time.monotonic() < deadline, "create_index never waited for the writer"
                time.sleep(0.05)
            with connect(idb) as s:
                s.execute("SET lock_timeout = '1s'")
                rows = s.execute("SELECT * FROM omop_emb.nearest('concept number 5', 3, model => %s)",
                                 (model,)).fetchall()
                assert len(rows) == 3
                assert len(s.execute("SELECT * FROM omop_emb.status()").fetchall()) >= 1
    finally:
        writer.rollback()
        writer.close()
        th.join(60)
    assert "error" not in box, box.get("error")
    assert box["method"] == "hnsw"
    with connect(idb) as c:
        mid = scalar(c, "SELECT model_id FROM omop_emb.model WHERE name = %s", (model,))
        idx = [r[0] for r in c.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s "
                                       "AND indexdef LIKE '%%hnsw%%'", (f"embedding_{mid}",))]
        assert idx == [f"embedding_{mid}_hnsw"]
        assert "m=8" in scalar(c, "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = %s",
                                 (f"embedding_{mid}_hnsw",))


# ---------------------------------------------------------------- 7. the shared cache
def test_a_cache_miss_never_waits_for_an_idle_transaction(idb, fake_embedder, model):
    q = "new text " + uuid.uuid4().hex
    idle = psycopg.connect(idb)  # psycopg's default: a transaction left open
    try:
        idle.execute("SELECT * FROM omop_emb.nearest(%s, 3, model => %s)", (q, model)).fetchall()
        with connect(idb) as other:
            other.execute("SET lock_timeout = '2s'")
            t0 = time.monotonic()
            rows = other.execute("SELECT * FROM omop_emb.nearest(%s, 3, model => %s)", (q, model)).fetchall()
            assert len(rows) == 3, time.monotonic() - t0
        idle.commit()
    finally:
        idle.close()
    with connect(idb) as c:
        assert scalar(c, "SELECT count(*) FROM omop_emb.query_cache WHERE text = %s", (q,)) == 1


# ---------------------------------------------------------------- 10. nearest_batch bound
def test_nearest_batch_refuses_unbounded_work_and_says_how_to_split(idb, fake_embedder, model):
    queries = [f"query {i}" for i in range(2000)]
    with connect(idb) as c:
        c.execute("SET statement_timeout = '20s'")
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT count(*) FROM omop_emb.nearest_batch(%s, 1000, model => %s)", (queries, model))
        d = ei.value.diag
        assert d.sqlstate == "22023", d.message_primary
        assert "2000" in d.message_primary and "1000" in d.message_primary
        assert d.message_hint and "chunks of" in d.message_hint, d.message_hint
        assert fake_embedder.stats()["requests"] == 0  # refused before any work
        # Within the bound it streams every row.
        n = scalar(c, "SELECT count(*) FROM omop_emb.nearest_batch(%s, 10, model => %s)", (queries[:50], model))
        assert n == 500


# ---------------------------------------------------------------- 12. input length
def test_the_length_limit_applies_to_what_is_sent(idb, fake_embedder, model):
    with connect(idb) as c:
        c.execute("SELECT omop_emb.alter_model(%s, max_input_chars => 100, query_prefix => 'query: ')", (model,))
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT omop_emb.embed(%s, 'query', %s)", ("x" * 100, model))
        d = ei.value.diag
        assert d.sqlstate == "22023"
        assert "107" in d.message_primary and "query: " in (d.message_detail or ""), d.message_primary
        assert fake_embedder.stats()["requests"] == 0
        assert scalar(c, "SELECT omop_emb.embed(%s, 'query', %s) IS NOT NULL", ("x" * 93, model))
        for mode in ("lexical", "hybrid"):
            with pytest.raises(psycopg.Error) as ei:
                c.execute("SELECT * FROM omop_emb.nearest(%s, 3, model => %s, mode => %s)",
                          ("word " * 2_000_000, model, mode))
            assert ei.value.diag.sqlstate == "22023", ei.value.diag.message_primary
            assert "at most 100" in ei.value.diag.message_primary


# ---------------------------------------------------------------- 13. zero vector, empty lexical
def test_a_zero_query_vector_is_refused(idb, fake_embedder, model):
    zero = "[" + ",".join(["0"] * 384) + "]"
    with connect(idb) as c:
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT * FROM omop_emb.nearest(%s::vector, 5, model => %s)", (zero, model))
        assert ei.value.diag.sqlstate == "22023"
        assert "zero" in ei.value.diag.message_primary and "cosine" in ei.value.diag.message_primary


def test_a_lexical_search_without_a_shared_word_says_so(idb, fake_embedder, model):
    with connect(idb) as c:
        notes: list[str] = []
        c.add_notice_handler(lambda d: notes.append(d.message_primary))
        rows = c.execute("SELECT * FROM omop_emb.nearest('zyxwv qwerty', 5, model => %s, mode => 'lexical')",
                         (model,)).fetchall()
        assert rows == []
        assert not any("matches the filters" in n for n in notes), notes
        assert any("no word" in n for n in notes), notes
