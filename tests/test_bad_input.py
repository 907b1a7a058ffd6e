"""Bad input (issue 7): NULL/blank/huge/odd texts, bad k, unknown role or model, NULL in filters,
SQL-injection-shaped text in every text argument, and property-based tests over texts.

Each case gives a defined result or a clear error, and nothing changes in the tables (apart from
the query cache and its statistics, which a cache miss is allowed to write).
"""

from __future__ import annotations

import hashlib
import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import install_extension, register_fake_model
from test_faults import connect, full_text, load_vocabulary, sql_error

MODEL = "fake"
INPUT_RESULTS: dict[str, str] = {}


def snapshot(dsn: str) -> dict[str, str]:
    """Row count + checksum of every table of omop_emb (but the query cache) and of the
    vocabulary, plus the catalog: relations, functions and roles."""
    out: dict[str, str] = {}
    with connect(dsn) as c:
        tables = c.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname IN ('omop_emb', "
            "'gibleed') AND c.relname NOT IN ('query_cache', 'cache_stats', 'index_progress') "
            "ORDER BY 1").fetchall()
        for (t,) in tables:
            if t.startswith("gibleed."):  # large (concept_ancestor): an order-free hash
                n, h = c.execute(f"SELECT count(*), sum(hashtextextended(x::text, 0)) FROM {t} x").fetchone()
                out[t] = f"{n}:{h}"
                continue
            # timestamps of the model row move when index_concepts runs: not content
            # (vectors are summarised by their norm: hashing their text form is slow)
            n, h = c.execute(f"SELECT count(*), md5(coalesce(string_agg((to_jsonb(x) - ARRAY["
                             f"'updated_at', 'indexed_at', 'embedding'])::text || coalesce(round("
                             f"vector_norm((to_jsonb(x) ->> 'embedding')::vector)::numeric, 6)::text, "
                             f"'') , '|' ORDER BY (to_jsonb(x) - 'embedding')::text), '')) "
                             f"FROM {t} x").fetchone()
            out[t] = f"{n}:{h}"
        out["catalog"] = hashlib.md5(repr(c.execute(
            "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON "
            "n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', "
            "'pg_toast') ORDER BY 1, 2").fetchall()).encode()).hexdigest()
        out["functions"] = str(c.execute("SELECT count(*), md5(string_agg(oid::regprocedure::text, ',' "
                                         "ORDER BY oid)) FROM pg_proc").fetchone())
        out["roles"] = str(c.execute("SELECT count(*), md5(string_agg(rolname || rolsuper::text, ',' "
                                     "ORDER BY rolname)) FROM pg_roles").fetchone())
    return out


@pytest.fixture(scope="module")
def db(module_db, fake_embedder_session) -> str:
    """GiBleed + omop_emb + the fake model, concept names indexed, HNSW index."""
    dsn = module_db()
    load_vocabulary(dsn)
    install_extension(dsn)
    register_fake_model(dsn, fake_embedder_session, name=MODEL)
    with connect(dsn) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'gibleed')", (MODEL,))
        c.execute("SELECT omop_emb.create_index(%s)", (MODEL,))
    return dsn


@pytest.fixture(scope="module")
def module_unchanged(db):
    """Nothing in the tables changes across the whole module."""
    before = snapshot(db)
    yield
    assert snapshot(db) == before


@pytest.fixture
def unchanged(db, module_unchanged):
    before = snapshot(db)
    yield
    assert snapshot(db) == before


@pytest.fixture
def conn(db, module_unchanged, fake_embedder):
    with connect(db) as c:
        yield c


# ---------------------------------------------------------------- texts
@pytest.mark.parametrize("text", [None, "", " ", "   \t\n  ", "\u00a0\u2003"],
                         ids=["null", "empty", "space", "whitespace", "unicode_spaces"])
def test_null_and_blank_text_is_null_or_no_rows(conn, fake_embedder, text):
    assert conn.execute("SELECT omop_emb.embed(%s, 'query')", (text,)).fetchone()[0] is None
    assert conn.execute("SELECT count(*) FROM omop_emb.nearest(%s)", (text,)).fetchone()[0] == 0
    rows = conn.execute("SELECT DISTINCT query_index FROM omop_emb.nearest_batch(ARRAY[%s, 'x'])",
                        (text,)).fetchall()
    assert rows == [(2,)]
    assert conn.execute("SELECT omop_emb.embed_batch(ARRAY[%s, 'y'], 'document')::text[]",
                        (text,)).fetchone()[0][0] is None
    assert fake_embedder.stats()["requests"] <= 2  # only for 'x' and 'y'
    INPUT_RESULTS["NULL / empty / whitespace"] = "embed -> NULL, nearest -> no rows, no HTTP call"


def test_huge_text_is_a_clear_error_without_http_call(conn, fake_embedder):
    huge = "a" * 100_000
    for sql in ("SELECT omop_emb.embed(%s, 'query')", "SELECT * FROM omop_emb.nearest(%s)",
                "SELECT * FROM omop_emb.nearest_batch(ARRAY['ok', %s])"):
        e, elapsed = sql_error(conn, sql, (huge,))
        assert e.diag.sqlstate == "22023", full_text(e)
        assert "100000 characters" in e.diag.message_primary and "8192" in e.diag.message_primary
        assert "max_input_chars" in (e.diag.message_hint or "")
        assert elapsed < 2
    assert fake_embedder.stats()["requests"] == 0
    INPUT_RESULTS["100,000-character text"] = "22023 'text 1 is 100000 characters long as sent; model fake accepts at most 8192', no HTTP call"


@pytest.mark.parametrize("text", [
    "a\x01b\x07c\x1bd\x7f", "tab\there\nnewline\r\n", "\u200b\u200d zero width",
    "ارتفاع ضغط الدم", "לחץ דם גבוה", "\u202eevil\u202c override",
    "💔 heart attack 🫀", "👩🏽‍⚕️ doctor", "糖尿病", "a" * 8192,
], ids=["c0_controls", "tabs_newlines", "zero_width", "arabic", "hebrew", "bidi_override",
        "emoji", "emoji_zwj", "cjk", "max_len"])
def test_odd_texts_work(conn, fake_embedder, text):
    v = conn.execute("SELECT vector_dims(omop_emb.embed(%s, 'query'))", (text,)).fetchone()[0]
    assert v == 384
    rows = conn.execute("SELECT rank, concept_id FROM omop_emb.nearest(%s, 5)", (text,)).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    rows = conn.execute("SELECT query_index, query FROM omop_emb.nearest_batch(ARRAY[%s, %s], 3)",
                        (text, text[:-2] + " 2")).fetchall()
    assert {r[0] for r in rows} == {1, 2} and rows[0][1] == text
    assert text in fake_embedder.received_texts  # sent as is (no prefix for this model)
    INPUT_RESULTS["control chars, RTL, bidi override, emoji, CJK, 8192 chars"] = "work (vector, k rows)"


def test_nul_byte_is_rejected_by_postgres(conn):
    with pytest.raises(psycopg.DataError):
        conn.execute("SELECT omop_emb.embed(%s, 'query')", ("a\x00b",))
    INPUT_RESULTS["NUL byte"] = "rejected before the server (PostgreSQL text cannot hold NUL)"


# ---------------------------------------------------------------- k, role, model, filters
@pytest.mark.parametrize("k", [0, -1, 10**6, None])
def test_bad_k_is_22023(conn, fake_embedder, k):
    for sql in ("SELECT * FROM omop_emb.nearest('heart', %s)",
                "SELECT * FROM omop_emb.nearest_batch(ARRAY['heart'], %s)",
                "SELECT * FROM omop_emb.nearest(omop_emb.embed('heart', 'query'), %s)"):
        e, _ = sql_error(conn, sql, (k,))
        assert e.diag.sqlstate == "22023", full_text(e)
        assert "k" in e.diag.message_primary and e.diag.message_hint
    INPUT_RESULTS["k = 0, -1, 10^6, NULL"] = "22023 'k = ... is outside 1..1000'"


@pytest.mark.parametrize("role", ["", "Query ", "passage", "queries", None, "query'; DROP TABLE x; --"])
def test_unknown_role_is_22023(conn, fake_embedder, role):
    if role == "Query ":  # case and spaces are forgiven
        assert conn.execute("SELECT omop_emb.embed('x', %s) IS NOT NULL", (role,)).fetchone()[0]
        return
    for sql in ("SELECT omop_emb.embed('x', %s)", "SELECT omop_emb.embed_batch(ARRAY['x'], %s)",
                "SELECT omop_emb.similarity('x', 'y', %s)"):
        e, _ = sql_error(conn, sql, (role,))
        assert e.diag.sqlstate == "22023", full_text(e)
        assert "role" in e.diag.message_primary
    assert fake_embedder.stats()["requests"] == 0
    INPUT_RESULTS["unknown / NULL role"] = "22023 'unknown embedding role'"


@pytest.mark.parametrize("model", ["nope", "", "FAKE", "fake'; DELETE FROM omop_emb.model; --"])
def test_unknown_model_is_oe004(conn, fake_embedder, model):
    if model == "":  # SET omop_emb.model = '' is 'not set': the only registered model is used
        conn.execute("SET omop_emb.model = ''")
        assert conn.execute("SELECT count(*) FROM omop_emb.nearest('x', 2)").fetchone()[0] == 2
    for sql in ("SELECT omop_emb.embed('x', 'query', %s)",
                "SELECT * FROM omop_emb.nearest('x', model => %s)",
                "SELECT * FROM omop_emb.nearest_batch(ARRAY['x'], model => %s)"):
        e, _ = sql_error(conn, sql, (model,))
        assert e.diag.sqlstate == "OE004", full_text(e)
        assert "fake" in (e.diag.message_detail or "")  # lists the registered models
    if model:
        conn.execute("SELECT set_config('omop_emb.model', %s, false)", (model,))
        e, _ = sql_error(conn, "SELECT * FROM omop_emb.nearest('y')")
        assert e.diag.sqlstate == "OE004"
        assert fake_embedder.stats()["requests"] == 0
    INPUT_RESULTS["unknown model (argument or SET omop_emb.model)"] = "OE004 'unknown model', lists registered models"


@pytest.mark.parametrize("arg", ["domain_ids", "vocabulary_ids", "concept_class_ids"])
def test_null_in_filter_is_22023(conn, arg):
    for fn in ("nearest", "nearest_batch"):
        q = "'heart'" if fn == "nearest" else "ARRAY['heart']"
        e, _ = sql_error(conn, f"SELECT * FROM omop_emb.{fn}({q}, 5, {arg} => ARRAY['Condition', NULL])")
        assert e.diag.sqlstate == "22023", full_text(e)
        assert arg in e.diag.message_primary and "NULL" in e.diag.message_primary
    # an empty array: no concept matches, no error
    assert conn.execute(f"SELECT count(*) FROM omop_emb.nearest('heart', 5, {arg} => ARRAY[]::text[])"
                        ).fetchone()[0] == 0
    INPUT_RESULTS["filter array with NULL"] = "22023 '<arg> contains NULL'; empty array: no rows + NOTICE"


# ---------------------------------------------------------------- SQL injection
INJECTIONS = [
    "'; DROP TABLE omop_emb.model; --",
    "x'); DELETE FROM omop_emb.model; --",
    "\"; DROP SCHEMA gibleed CASCADE; --",
    "$$; DROP TABLE gibleed.concept; $$",
    "1 OR 1=1",
    "Condition' OR 'x'='x",
    "gibleed.concept; TRUNCATE gibleed.concept",
    "pg_catalog\"; CREATE ROLE pwned SUPERUSER; --",
]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_sql_injection_in_every_text_argument(db, unchanged, conn, fake_embedder, bad):
    def err(sql, params, states):
        e, _ = sql_error(conn, sql, params)
        assert e.diag.sqlstate in states, full_text(e)

    # query texts: embedded and searched as text
    assert conn.execute("SELECT count(*) FROM omop_emb.nearest(%s, 3)", (bad,)).fetchone()[0] == 3
    assert conn.execute("SELECT count(*) FROM omop_emb.nearest_batch(ARRAY[%s, %s], 3)",
                        (bad, bad + "2")).fetchone()[0] == 6
    assert conn.execute("SELECT omop_emb.embed(%s, 'document') IS NOT NULL", (bad,)).fetchone()[0]
    assert conn.execute("SELECT omop_emb.similarity(%s, %s) IS NOT NULL", (bad, bad)).fetchone()[0]
    # filters: values compared, never spliced (a value no indexed concept has is 22023)
    for arg in ("domain_ids", "vocabulary_ids", "concept_class_ids"):
        err(f"SELECT count(*) FROM omop_emb.nearest('heart', 3, {arg} => %s)", ([bad],), ("22023",))
        err(f"SELECT count(*) FROM omop_emb.nearest_batch(ARRAY['heart'], 3, {arg} => %s)",
            ([bad, "Condition"],), ("22023",))
    # role, model
    err("SELECT omop_emb.embed('x', %s)", (bad,), ("22023",))
    err("SELECT * FROM omop_emb.nearest('x', model => %s)", (bad,), ("OE004",))
    err("SELECT omop_emb.embed_batch(ARRAY['x'], 'query', %s)", (bad,), ("OE004",))
    err("SELECT * FROM omop_emb.embedding_role_prefixes(%s)", (bad,), ("OE004",))
    err("SELECT omop_emb.drop_model(%s)", (bad,), ("22023", "OE004"))
    err("SELECT omop_emb.alter_model(%s, batch_size => 1)", (bad,), ("22023", "OE004"))
    assert conn.execute("SELECT omop_emb.clear_cache(%s)", (bad,)).fetchone()[0] == 0
    # settings
    conn.execute("SELECT set_config('omop_emb.model', %s, false)", (bad,))
    err("SELECT * FROM omop_emb.nearest('x')", None, ("OE004",))
    conn.execute("RESET omop_emb.model")
    # vocabulary_schema and filters of index_concepts (as the administrator)
    err("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s)", (MODEL, bad), ("22023",))
    conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'gibleed', "
                  "domain_ids => %s, vocabulary_ids => %s, concept_class_ids => %s)",
                  (MODEL, [bad], [bad], [bad]))
    err("SELECT omop_emb.register_model(%s, 'openai', %s, 384)", (bad, fake_embedder.url), ("22023",))
    err("SELECT omop_emb.register_model('okname', %s, %s, 384)", (bad, fake_embedder.url), ("22023",))
    err("SELECT omop_emb.register_model('okname', 'openai', %s, 384)", (bad,), ("22023",))
    err("SELECT omop_emb.register_model('okname', 'openai', %s, 384, metric => %s)",
        (fake_embedder.url, bad), ("22023",))
    err("SELECT omop_emb.register_model('okname', 'openai', %s, 384, api_key_ref => %s)",
        (fake_embedder.url, bad), ("22023",))
    err("SELECT omop_emb.create_index(%s, %s)", (MODEL, bad), ("22023",))
    INPUT_RESULTS["SQL-injection-shaped text in query, filters, role, model, settings, "
                  "vocabulary_schema, register_model args"] = (
        f"{len(INJECTIONS)} payloads: searched as text / 22023 / OE004; tables, catalog and roles unchanged")


# ---------------------------------------------------------------- property-based
texts = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=300)
PROP = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def prop_conn(db):
    with connect(db) as c:
        yield c


@pytest.fixture(scope="module")
def prop_snapshot(db, module_unchanged):
    before = snapshot(db)
    yield
    assert snapshot(db) == before


@PROP
@given(text=texts)
def test_property_embed(prop_conn, prop_snapshot, fake_embedder_session, text):
    v = prop_conn.execute("SELECT vector_dims(omop_emb.embed(%s, 'query'))", (text,)).fetchone()[0]
    assert v == (None if not text.strip() else 384)


@PROP
@given(text=texts, k=st.integers(min_value=-5, max_value=1100))
def test_property_nearest(prop_conn, prop_snapshot, fake_embedder_session, text, k):
    try:
        rows = prop_conn.execute("SELECT rank, concept_id, similarity FROM omop_emb.nearest(%s, %s)",
                                 (text, k)).fetchall()
    except psycopg.Error as e:
        assert e.diag.sqlstate == "22023" and not 1 <= k <= 1000, full_text(e)
        return
    assert 1 <= k <= 1000
    if not text.strip():
        assert rows == []
    else:
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1)) and 0 < len(rows) <= k
        assert len({r[1] for r in rows}) == len(rows)  # one row per concept
        assert all(-1.0001 <= r[2] <= 1.0001 for r in rows)


@PROP
@given(queries=st.lists(st.one_of(st.none(), texts), max_size=8))
def test_property_nearest_batch(prop_conn, prop_snapshot, fake_embedder_session, queries):
    rows = prop_conn.execute("SELECT query_index, query, rank FROM omop_emb.nearest_batch(%s::text[], 3)",
                             (queries,)).fetchall()
    want = {i + 1 for i, q in enumerate(queries) if q is not None and q.strip()}
    assert {r[0] for r in rows} == want
    for qi, q, _ in rows:
        assert q == queries[qi - 1]
    per = {}
    for qi, _, rank in rows:
        per.setdefault(qi, []).append(rank)
    assert all(sorted(r) == [1, 2, 3] for r in per.values())


@PROP
@given(text=texts, mode=st.sampled_from(["lexical", "hybrid"]))
def test_property_lexical_and_hybrid(prop_conn, prop_snapshot, fake_embedder_session, text, mode):
    """Any text in the word-based modes (its words become a tsquery): ranked rows, one per
    concept, scores as documented, and nothing changes in the tables."""
    rows = prop_conn.execute("SELECT rank, concept_id, score, similarity FROM omop_emb.nearest(%s, 10, "
                             "mode => %s)", (text, mode)).fetchall()
    if not text.strip():
        assert rows == []
        return
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) <= 10
    assert len({r[1] for r in rows}) == len(rows)
    if mode == "lexical":
        assert all(0 <= r[2] <= 1 for r in rows)
    else:  # the semantic side always finds k concepts here
        assert len(rows) == 10
        assert all(r[2] <= r[3] + 0.005 + 1e-9 for r in rows)


def test_zz_report_inputs():
    for k, v in INPUT_RESULTS.items():
        print(f"INPUT {k}: {v}")
