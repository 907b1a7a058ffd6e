"""A first indexing of many texts (issue 16): the embedding table is loaded without its
secondary indexes, which are built once at the end; a load that fails midway leaves them to
the re-run, which completes the rows and builds them. Vectors are stored with a binary COPY
and must be exactly those the server sent."""

from __future__ import annotations

import struct
import threading
import time

import psycopg

from conftest import load_synthetic_vocabulary, register_fake_model

N = 10_500  # above indexing.DEFER_INDEXES_MIN_TEXTS (10,000)
SECONDARY = ("fold", "code", "vocabulary", "domain", "class", "fts", "trgm", "initials")
INDEX_SQL = ("CALL omop_emb.index_concepts(model => 'bulk', vocabulary_schema => 'vocab', "
             "include_synonyms => false, include_mapped => false)")


def secondary_indexes(conn, mid: int) -> set[str]:
    """The secondary indexes of the model's table that exist and are valid."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = %s::regclass AND NOT i.indisprimary AND i.indisvalid",
        (f"omop_emb.embedding_{mid}",)).fetchall()
    return {r[0].removeprefix(f"embedding_{mid}_") for r in rows}


def test_first_load_defers_indexes_and_a_failed_load_is_completed_by_the_rerun(omop_db, fake_embedder):
    load_synthetic_vocabulary(omop_db, [
        (i, f"load test concept {i} {'abcdefghij'[i % 10]}", "Condition" if i % 2 else "Drug",
         "SNOMED", "Clinical Finding", "S", f"C{i}", None) for i in range(1, N + 1)])
    register_fake_model(omop_db, fake_embedder, name="bulk")
    with psycopg.connect(omop_db, autocommit=True) as c:
        c.execute("SELECT omop_emb.alter_model('bulk', max_retries => 0)")
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = 'bulk'").fetchone()[0]
        assert secondary_indexes(c, mid) == set(SECONDARY)  # as registered

    # First run: once some batches are committed, look at the indexes, then make the
    # embedding server fail: the run stops with an error.
    seen = {}

    def watch():
        with psycopg.connect(omop_db, autocommit=True) as w:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = w.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0]
                if done >= 500:
                    seen["indexes_during_load"] = secondary_indexes(w, mid)
                    fake_embedder.set_fault("status", status=500, times=1000)
                    return
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with psycopg.connect(omop_db, autocommit=True) as c:
        try:
            c.execute(INDEX_SQL)
            failed = None
        except psycopg.Error as e:
            failed = e
        watcher.join()
        assert failed is not None and failed.diag.sqlstate == "OE001", failed
        assert seen["indexes_during_load"] == set()  # loaded without them
        stored, distinct = c.execute(f"SELECT count(*), count(DISTINCT (concept_id, text_kind, text)) "
                                     f"FROM omop_emb.embedding_{mid}").fetchone()
        assert 500 <= stored == distinct < N
        assert secondary_indexes(c, mid) == set()  # left to the run that completes the load

        fake_embedder.clear_fault()
        c.execute(INDEX_SQL)
        stored, distinct = c.execute(f"SELECT count(*), count(DISTINCT (concept_id, text_kind, text)) "
                                     f"FROM omop_emb.embedding_{mid}").fetchone()
        assert stored == distinct == N
        assert c.execute("SELECT count(*) FROM omop_emb.index_queue q JOIN omop_emb.model m "
                         "USING (model_id) WHERE m.name = 'bulk'").fetchone()[0] == 0
        assert secondary_indexes(c, mid) == set(SECONDARY)
        # the indexes serve the searches they exist for
        c.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in c.execute(
            f"EXPLAIN SELECT 1 FROM omop_emb.embedding_{mid} WHERE omop_emb.fold_text(text) = 'x'"))
        assert f"embedding_{mid}_fold" in plan

        # the vectors stored (binary COPY) are exactly what the server sent
        sample = c.execute(f"SELECT text, embedding::text FROM omop_emb.embedding_{mid} "
                           "ORDER BY concept_id LIMIT 3").fetchall()
    import requests

    def float32(xs):
        return [struct.unpack("<f", struct.pack("<f", x))[0] for x in xs]

    for text, stored_vec in sample:
        sent = requests.post(fake_embedder.url + "/v1/embeddings",
                             json={"model": "m", "input": [text]}, timeout=10).json()["data"][0]["embedding"]
        assert float32(float(x) for x in stored_vec.strip("[]").split(",")) == float32(sent)


def test_a_small_first_load_keeps_its_indexes(omop_db, fake_embedder):
    load_synthetic_vocabulary(omop_db, [(i, f"small concept {i}", "Condition", "SNOMED",
                                         "Clinical Finding", "S", f"S{i}", None) for i in range(1, 301)])
    register_fake_model(omop_db, fake_embedder, name="bulk")
    fake_embedder.set_fault("slow", seconds=0.1, times=1000)  # 30 batches of 10: ~3 s
    seen = {}
    with psycopg.connect(omop_db, autocommit=True) as c:
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = 'bulk'").fetchone()[0]

        def watch():
            with psycopg.connect(omop_db, autocommit=True) as w:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    if w.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0] >= 20:
                        seen["during"] = secondary_indexes(w, mid)
                        return
                    time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        c.execute(INDEX_SQL.replace(")", ", batch_size => 10)"))
        watcher.join()
        assert c.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0] == 300
        assert seen["during"] == set(SECONDARY)  # below the threshold: kept while loading
        assert secondary_indexes(c, mid) == set(SECONDARY)


def _names(conn, mid: int, names) -> list[str | None]:
    return [n.removeprefix(f"embedding_{mid}_") if n else None for n in names]


def test_sessions_finishing_together_build_different_indexes(omop_db, fake_embedder):
    """The indexes a first load left out are built one per transaction by whichever
    sessions reach the end (omop_emb_internal.index_build_next): none before every text is
    claimed, never one twice, the longest builds first; the CLI builds beside its session."""
    load_synthetic_vocabulary(omop_db, [
        (i, f"parallel build concept {i}", "Condition" if i % 2 else "Drug", "SNOMED",
         "Clinical Finding", "S", f"P{i}", None) for i in range(1, N + 1)])
    register_fake_model(omop_db, fake_embedder, name="bulk")
    with psycopg.connect(omop_db, autocommit=True) as c:
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = 'bulk'").fetchone()[0]
    # While a session indexes and texts are queued, another connection builds nothing.
    fake_embedder.set_fault("slow", seconds=0.3, times=8)
    seen = {}

    def early():
        with psycopg.connect(omop_db, autocommit=True) as w:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if w.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0] > 0:
                    seen["early"] = w.execute("SELECT omop_emb_internal.index_build_next('bulk')").fetchone()[0]
                    seen["queued"] = w.execute("SELECT count(*) FROM omop_emb.index_queue "
                                               "WHERE model_id = %s", (mid,)).fetchone()[0]
                    seen["indexes"] = secondary_indexes(w, mid)
                    return
                time.sleep(0.02)

    watcher = threading.Thread(target=early)
    watcher.start()
    with psycopg.connect(omop_db, autocommit=True) as c:
        c.execute(INDEX_SQL)
        watcher.join()
        assert seen["queued"] > 0 and seen["early"] is None and seen["indexes"] == set()
        assert secondary_indexes(c, mid) == set(SECONDARY)  # the session built them at its end
        assert c.execute("SELECT omop_emb_internal.index_build_next('bulk')").fetchone()[0] is None

        # Two connections building at once take different indexes, the longest first.
        for name in SECONDARY:
            c.execute(f"DROP INDEX omop_emb.embedding_{mid}_{name}")
    with psycopg.connect(omop_db) as first, psycopg.connect(omop_db, autocommit=True) as second:
        a = first.execute("SELECT omop_emb_internal.index_build_next('bulk')").fetchone()[0]  # open
        b = second.execute("SELECT omop_emb_internal.index_build_next('bulk')").fetchone()[0]
        assert _names(second, mid, [a, b]) == ["fts", "trgm"]
        first.commit()
        rest = []
        while (n := second.execute("SELECT omop_emb_internal.index_build_next('bulk')").fetchone()[0]):
            rest.append(n)
        assert sorted(_names(second, mid, [a, b] + rest)) == sorted(SECONDARY)  # each once
        assert secondary_indexes(second, mid) == set(SECONDARY)

    # The CLI's own connection builds beside the session: all there, once, at the end.
    from omop_emb_pg.cli import run_index

    with psycopg.connect(omop_db, autocommit=True) as c:
        c.execute(f"TRUNCATE omop_emb.embedding_{mid}")
        c.execute("SELECT omop_emb.drop_model('bulk', true)")
    register_fake_model(omop_db, fake_embedder, name="bulk")
    with psycopg.connect(omop_db, autocommit=True) as c:
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = 'bulk'").fetchone()[0]
    import io

    out = io.StringIO()
    assert run_index(omop_db, model="bulk", progress="plain", poll=0.1, out=out, vocabulary_schema="vocab",
                     include_synonyms=False, include_mapped=False) == 0
    with psycopg.connect(omop_db, autocommit=True) as c:
        assert secondary_indexes(c, mid) == set(SECONDARY)
        assert c.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0] == N


def test_drop_model_removes_its_queued_texts(omop_db, fake_embedder):
    """The queue has no foreign key to the model (its check per queued row slowed a first
    indexing): drop_model deletes the model's queued texts itself, and only those."""
    load_synthetic_vocabulary(omop_db, [(i, f"queued concept {i}", "Condition", "SNOMED",
                                         "Clinical Finding", "S", f"Q{i}", None) for i in range(1, 301)])
    register_fake_model(omop_db, fake_embedder, name="bulk")
    register_fake_model(omop_db, fake_embedder, name="other")
    with psycopg.connect(omop_db, autocommit=True) as c:
        for name in ("bulk", "other"):
            c.execute(INDEX_SQL.replace("'bulk'", f"'{name}'").replace(")", ", batch_size => 10, max_texts => 10)"))
        mids = dict(c.execute("SELECT name, model_id FROM omop_emb.model").fetchall())
        queued = dict(c.execute("SELECT model_id, count(*) FROM omop_emb.index_queue GROUP BY 1").fetchall())
        assert queued[mids["bulk"]] > 0 and queued[mids["other"]] > 0
        c.execute("SELECT omop_emb.drop_model('bulk')")
        after = dict(c.execute("SELECT model_id, count(*) FROM omop_emb.index_queue GROUP BY 1").fetchall())
        assert mids["bulk"] not in after
        assert after[mids["other"]] == queued[mids["other"]]
