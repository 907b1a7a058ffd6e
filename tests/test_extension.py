"""Issue 3: CREATE EXTENSION, the model registry, embed() with role prefixes.

Real PostgreSQL with pgvector and plpython3u; the real e5 server where meaning
matters; the deterministic test double where a test counts requests.
"""

from __future__ import annotations

import time

import psycopg
import pytest
import requests

from conftest import register_fake_model
from omop_emb_pg.install import extension_version, install

VERSION = extension_version()  # the file VERSION, through the build


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def notices_of(conn):
    seen = []
    conn.add_notice_handler(lambda d: seen.append((d.severity_nonlocalized, d.message_primary)))
    return seen


def register_e5(conn, url, provider="openai", name="e5-small", **kw):
    extra = "".join(f", {k} => %({k})s" for k in kw)
    conn.execute(
        f"SELECT omop_emb.register_model(%(name)s, %(provider)s, %(url)s, "
        f"remote_model => 'multilingual-e5-small'{extra})",
        {"name": name, "provider": provider, "url": url, **kw})


# ------------------------------------------------------------------ install
def test_create_extension_cascade(fresh_db):
    dsn = fresh_db()
    with connect(dsn) as conn:
        conn.execute("CREATE EXTENSION omop_emb CASCADE")
        exts = dict(conn.execute("SELECT extname, extversion FROM pg_extension").fetchall())
        assert exts["omop_emb"] == VERSION
        assert "vector" in exts and "plpython3u" in exts
        assert conn.execute("SELECT omop_emb.version()").fetchone()[0] == VERSION


def test_install_over_connection_is_idempotent(fresh_db):
    dsn = fresh_db()
    first = install(dsn, method="script")
    assert first.method == "script" and first.changed
    again = install(dsn)
    assert again.method == "already installed" and not again.changed
    with connect(dsn) as conn:
        # Script install: no extension row, but the same API.
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'omop_emb'").fetchone()[0] == 0
        assert conn.execute("SELECT omop_emb.version()").fetchone()[0] == first.version


def test_every_function_pins_search_path_and_nothing_is_public(omop_db):
    with connect(omop_db) as conn:
        rows = conn.execute(
            "SELECT p.proname, p.prosecdef, p.proconfig, "
            "has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec "
            "FROM pg_proc p WHERE p.pronamespace = 'omop_emb'::regnamespace").fetchall()
    assert rows
    for name, secdef, config, public_exec in rows:
        assert not public_exec, f"{name} is executable by PUBLIC"
        if secdef:
            assert "search_path=pg_catalog, pg_temp" in (config or []), (name, config)


def test_network_functions_are_never_immutable(omop_db):
    """Every PL/Python function that reaches the runtime (the code that makes HTTP
    requests) is VOLATILE; the only others are pure string functions (initials(), an
    index expression), which never touch it."""
    with connect(omop_db) as conn:
        rows = conn.execute(
            "SELECT proname, provolatile, prosrc FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
            "WHERE p.pronamespace = 'omop_emb'::regnamespace AND l.lanname = 'plpython3u'").fetchall()
    assert {name for name, _, _ in rows} >= {"embed", "embed_batch", "nearest", "nearest_batch", "similarity"}
    runtime = [(name, vol) for name, vol, src in rows if 'GD["omop_emb"]' in src or "_bootstrap" in src]
    assert {name for name, _ in runtime} >= {"embed", "embed_batch", "nearest", "nearest_batch", "similarity"}
    assert all(vol == "v" for _, vol in runtime), runtime
    pure = {name for name, vol, src in rows if vol != "v"}
    assert pure == {"initials"}, pure


# ------------------------------------------------------------------ embed
@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_embed_has_registered_dimension_through_both_providers(omop_db, e5_server, provider):
    with connect(omop_db) as conn:
        register_e5(conn, e5_server, provider=provider)
        dims, registered = conn.execute(
            "SELECT vector_dims(omop_emb.embed('high blood pressure', 'query')), "
            "(SELECT dimensions FROM omop_emb.models)").fetchone()
        assert dims == registered == 384
        # Prefixes advertised by the server were recorded at registration.
        prefixes = dict(conn.execute(
            "SELECT role, prefix FROM omop_emb.embedding_role_prefixes()").fetchall())
        assert prefixes == {"document": "passage: ", "query": "query: "}


def test_similarity_ranks_meaning_with_e5_prefixes(omop_db, e5_server):
    with connect(omop_db) as conn:
        register_e5(conn, e5_server)
        conn.execute("SET omop_emb.document_embedding_prefix = 'passage: '")
        conn.execute("SET omop_emb.query_embedding_prefix = 'query: '")
        hyp, fracture = conn.execute(
            "SELECT omop_emb.similarity('high blood pressure', 'Hypertensive disorder', 'query', 'document'), "
            "omop_emb.similarity('high blood pressure', 'Fracture of femur', 'query', 'document')").fetchone()
        assert hyp > fracture


def test_prefix_setting_is_applied_to_the_text_sent(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("SET omop_emb.query_embedding_prefix = 'search_query: '")
        conn.execute("SET omop_emb.document_embedding_prefix = 'search_document: '")
        conn.execute("SELECT omop_emb.embed('aspirin', 'query'), omop_emb.embed('Aspirin', 'document')")
    assert "search_query: aspirin" in fake_embedder.received_texts
    assert "search_document: Aspirin" in fake_embedder.received_texts


def test_empty_prefix_warns_once_per_session(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder, name="nomic-embed-text")
    with connect(omop_db) as conn:
        seen = notices_of(conn)
        for text in ("a", "b", "c"):
            conn.execute("SELECT omop_emb.embed(%s, 'query')", (text,))
        warnings = [m for s, m in seen if s == "WARNING" and "prefix is empty" in m]
        assert len(warnings) == 1
    with connect(omop_db) as conn:  # a new session warns again
        seen = notices_of(conn)
        conn.execute("SELECT omop_emb.embed('d', 'query')")
        assert sum("prefix is empty" in m for _, m in seen) == 1


def test_empty_prefix_warning_names_the_family_prefixes(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder, name="nomic-embed-text")
    with connect(omop_db) as conn:
        hints = []  # a Diagnostic is only valid inside the handler
        conn.add_notice_handler(lambda d: hints.append(d.message_hint or ""))
        conn.execute("SELECT omop_emb.embed('x', 'query')")
        hint = " ".join(hints)
        assert "search_query: " in hint and "search_document: " in hint


def test_prefix_mismatch_warns_and_is_an_error_in_strict_mode(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder, document_prefix="passage: ", query_prefix="query: ")
    with connect(omop_db) as conn:
        seen = notices_of(conn)
        conn.execute("SET omop_emb.query_embedding_prefix = 'search_query: '")
        conn.execute("SELECT omop_emb.embed('x', 'query')")
        mismatch = [m for s, m in seen if s == "WARNING" and "search_query: " in m]
        assert mismatch and "query: " in mismatch[0].replace("search_query: ", "")
        conn.execute("SET omop_emb.strict_prefixes = on")
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.embed('y', 'query')")
        assert e.value.diag.sqlstate == "OE003"


def test_unset_setting_falls_back_to_the_model_record(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder, document_prefix="passage: ", query_prefix="query: ")
    with connect(omop_db) as conn:
        conn.execute("SET omop_emb.query_embedding_prefix = 'other: '")
        conn.execute("RESET omop_emb.query_embedding_prefix")
        rows = dict((r[0], (r[1], r[2])) for r in conn.execute(
            "SELECT role, prefix, source FROM omop_emb.embedding_role_prefixes()").fetchall())
        assert rows["query"] == ("query: ", "model")
        # '' is indistinguishable from RESET for custom settings: it also falls back.
        conn.execute("SET omop_emb.query_embedding_prefix = ''")
        rows = dict((r[0], r[1]) for r in conn.execute(
            "SELECT role, prefix FROM omop_emb.embedding_role_prefixes()").fetchall())
        assert rows["query"] == "query: "


def test_wrong_role_and_unknown_model_are_clear_errors(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.embed('x', 'passage')")
        assert e.value.diag.sqlstate == "22023"
        assert "unknown embedding role" in e.value.diag.message_primary
        assert "'document'" in e.value.diag.message_hint
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.embed('x', 'query', 'no-such-model')")
        assert e.value.diag.sqlstate == "OE004"
        assert "fake" in e.value.diag.message_detail  # lists the registered models


def test_model_comes_from_setting_else_the_only_one(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder, name="a", query_prefix="a: ")
    with connect(omop_db) as conn:
        conn.execute("SELECT omop_emb.embed('only one', 'query')")
    assert "a: only one" in fake_embedder.received_texts
    register_fake_model(omop_db, fake_embedder, name="b", query_prefix="b: ")
    with connect(omop_db) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.embed('x', 'query')")
        assert e.value.diag.sqlstate == "OE004"
        assert "a, b" in e.value.diag.message_detail
    with connect(omop_db) as conn:
        conn.execute("SET omop_emb.model = 'b'")
        conn.execute("SELECT omop_emb.embed('chosen by setting', 'query')")
    assert "b: chosen by setting" in fake_embedder.received_texts


def test_dimensions_discovered_with_one_probe(omop_db, fake_embedder):
    with connect(omop_db) as conn:
        conn.execute("SELECT omop_emb.register_model('probe', 'openai', %s, document_prefix => '', "
                     "query_prefix => '')", (fake_embedder.url,))
        assert conn.execute("SELECT dimensions FROM omop_emb.models").fetchone()[0] == fake_embedder.dim
    assert fake_embedder.stats()["requests"] == 1


def test_embed_batch_of_100_texts_is_one_request(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder, batch_size=128)
    fake_embedder.reset()
    with connect(omop_db) as conn:
        vecs = conn.execute("SELECT omop_emb.embed_batch(array_agg('term ' || i), 'document') "
                            "FROM generate_series(1, 100) i").fetchone()[0]
    assert fake_embedder.stats()["requests"] == 1
    assert fake_embedder.stats()["texts"] == 100
    assert len(vecs.strip("{}").split('","')) == 100


def test_null_in_null_out_and_repeats_hit_the_cache(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder)
    fake_embedder.reset()
    with connect(omop_db) as conn:
        assert conn.execute("SELECT omop_emb.embed(NULL, 'query')").fetchone()[0] is None
        conn.execute("SELECT omop_emb.embed('repeat me', 'query')")
    with connect(omop_db) as conn:  # another session: the shared cache answers
        conn.execute("SELECT omop_emb.embed('repeat me', 'query')")
    assert fake_embedder.stats()["requests"] == 1


def test_alter_and_drop_model(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("SELECT omop_emb.alter_model('fake', batch_size => 7, read_timeout_s => 3)")
        assert conn.execute("SELECT batch_size, read_timeout_s FROM omop_emb.models").fetchone() == (7, 3.0)
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.alter_model('fake', api_key_ref => 'sk-live-1234567890abcdef')")
        assert "sk-live" not in str(e.value)
        assert conn.execute("SELECT omop_emb.drop_model('fake')").fetchone()[0] is True
        assert conn.execute("SELECT count(*) FROM omop_emb.models").fetchone()[0] == 0
        assert conn.execute("SELECT to_regclass('omop_emb.embedding_1')").fetchone()[0] is None


def test_embed_latency_against_direct_http(omop_db, e5_server):
    """Uncached embed() calls each reach the server; prints their latency beside a
    direct HTTP call (a figure, not a timing assertion)."""
    with connect(omop_db) as conn:
        register_e5(conn, e5_server)
        conn.execute("SELECT omop_emb.embed('warm up', 'query')")
        n = 10
        t = time.perf_counter()
        vecs = [conn.execute("SELECT omop_emb.embed(%s, 'query')::text",
                             (f"uncached latency probe {i}",)).fetchone()[0] for i in range(n)]
        in_db = (time.perf_counter() - t) / n
        # Every call embedded its own text (no cache hit across different texts).
        assert len(set(vecs)) == n and all(v.count(",") == 383 for v in vecs)
    s = requests.Session()
    t = time.perf_counter()
    for i in range(n):
        s.post(f"{e5_server}/v1/embeddings", json={"input": [f"query: direct latency probe {i}"]}).raise_for_status()
    direct = (time.perf_counter() - t) / n
    print(f"\nembed() {in_db * 1000:.1f} ms vs direct HTTP {direct * 1000:.1f} ms per call")
