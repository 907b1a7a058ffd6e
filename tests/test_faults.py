"""Faults in the embedding server, during embed() and index_concepts(); cancellation (issue 7).

Every fault must give a clear SQL error (endpoint, model, status, hint; SQLSTATE OE001/OE002)
within a bounded time. During index_concepts a failing batch commits nothing, and a re-run
completes with exactly one row per concept text, also after pg_terminate_backend and after the
embedding server was restarted mid-run. pg_cancel_backend and statement_timeout during a hung
embedding call return control within the HTTP read timeout (see docs/reliability.md).

The helpers at the top are plain functions shared with the other reliability test files.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from conftest import free_port, register_fake_model

READ_TIMEOUT = 2.0  # seconds: the model's read_timeout_s in fault tests
FAULT_RESULTS: dict[str, str] = {}  # fault -> figures, printed at the end (docs/reliability.md)


# ---------------------------------------------------------------- helpers (shared)
def connect(dsn: str, **kw) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, **kw)


def scalar(dsn_or_conn, sql: str, params=None):
    if isinstance(dsn_or_conn, str):
        with connect(dsn_or_conn) as c:
            return c.execute(sql, params).fetchone()[0]
    return dsn_or_conn.execute(sql, params).fetchone()[0]


def sql_error(conn: psycopg.Connection, sql: str, params=None) -> tuple[psycopg.Error, float]:
    """Run ``sql`` expecting an error; return it with the elapsed seconds."""
    t0 = time.monotonic()
    with pytest.raises(psycopg.Error) as ei:
        conn.execute(sql, params)
    return ei.value, time.monotonic() - t0


def full_text(e: psycopg.Error) -> str:
    d = e.diag
    return "\n".join(x or "" for x in (d.message_primary, d.message_detail, d.message_hint))


def model_id(dsn: str, name: str) -> int:
    return scalar(dsn, "SELECT model_id FROM omop_emb.model WHERE name = %s", (name,))


def unique(prefix: str = "t") -> str:
    return f"{prefix} {uuid.uuid4().hex[:12]}"


def load_vocabulary(dsn: str, schema: str = "gibleed") -> None:
    from omop_emb_pg.sample import load_gibleed

    load_gibleed(dsn, schema=schema)


def expected_name_texts(dsn: str, schema: str = "gibleed") -> int:
    """Concept-name texts index_concepts(include_synonyms => false) must produce (independently)."""
    return scalar(dsn, f"SELECT count(*) FROM {schema}.concept WHERE standard_concept = 'S' "
                       "AND invalid_reason IS NULL AND btrim(concept_name) <> ''")


def index_invariants(dsn: str, name: str, schema: str = "gibleed") -> tuple[int, int, int]:
    """(rows, distinct (concept_id, text_kind, text), expected): must all be equal when done."""
    t = f"omop_emb.embedding_{model_id(dsn, name)}"
    with connect(dsn) as c:
        rows, distinct = c.execute(
            f"SELECT count(*), count(DISTINCT (concept_id, text_kind, text)) FROM {t}").fetchone()
        # every concept that should be there is there, once, with its current name
        missing = c.execute(
            f"SELECT count(*) FROM {schema}.concept c WHERE c.standard_concept = 'S' AND "
            f"c.invalid_reason IS NULL AND btrim(c.concept_name) <> '' AND NOT EXISTS "
            f"(SELECT 1 FROM {t} e WHERE e.concept_id = c.concept_id AND e.text_kind = 'name' "
            f"AND e.text = c.concept_name)").fetchone()[0]
    assert missing == 0, f"{missing} concept names missing from {t}"
    return rows, distinct, expected_name_texts(dsn, schema)


def count_rows(dsn: str, name: str) -> int:
    return scalar(dsn, f"SELECT count(*) FROM omop_emb.embedding_{model_id(dsn, name)}")


def queue_len(dsn: str, name: str) -> int:
    return scalar(dsn, "SELECT count(*) FROM omop_emb.index_queue WHERE model_id = %s",
                  (model_id(dsn, name),))


def backend_pid_of(dsn_admin: str, marker: str, timeout: float = 10.0) -> int:
    """pid of the backend whose current query contains ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connect(dsn_admin) as c:
            row = c.execute("SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> "
                            "pg_backend_pid() AND state = 'active'", (f"%{marker}%",)).fetchone()
        if row:
            return row[0]
        time.sleep(0.05)
    raise AssertionError(f"no active backend running {marker!r}")


class Runner(threading.Thread):
    """Run one statement on its own connection in a thread; keep error, elapsed, pid."""

    def __init__(self, dsn: str, sql: str, params=None, setup: list[str] | None = None):
        super().__init__(daemon=True)
        self.dsn, self.sql, self.params, self.setup = dsn, sql, params, setup or []
        self.error: BaseException | None = None
        self.result = None
        self.elapsed: float | None = None
        self.pid: int | None = None
        self.started_at: float | None = None
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.dsn) as c:
                self.pid = c.info.backend_pid
                for s in self.setup:
                    c.execute(s)
                self.ready.set()
                self.started_at = time.monotonic()
                try:
                    cur = c.execute(self.sql, self.params)
                    self.result = cur.fetchall() if cur.description else None
                except BaseException as e:  # noqa: BLE001 - reported to the test
                    self.error = e
                self.elapsed = time.monotonic() - self.started_at
        except BaseException as e:  # noqa: BLE001 - connection lost (terminated)
            self.error = self.error or e
            if self.started_at is not None and self.elapsed is None:
                self.elapsed = time.monotonic() - self.started_at
        finally:
            self.ready.set()


def wait_requests(server, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.stats()["requests"] < n:
        assert time.monotonic() < deadline, f"embedding server saw < {n} requests"
        time.sleep(0.01)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vocab_db(module_db) -> str:
    """A database with GiBleed in schema gibleed and omop_emb installed (no model)."""
    from conftest import install_extension

    dsn = module_db()
    load_vocabulary(dsn)
    return install_extension(dsn)


@pytest.fixture
def fault_model(vocab_db, fake_embedder):
    """A fresh model on the fake server with a short read timeout; dropped after the test."""
    name = "f" + uuid.uuid4().hex[:8]
    register_fake_model(vocab_db, fake_embedder, name=name, read_timeout_s=READ_TIMEOUT)
    yield name
    fake_embedder.reset()
    with connect(vocab_db) as c:
        c.execute("SELECT omop_emb.drop_model(%s, true)", (name,))


# ---------------------------------------------------------------- faults on embed()
FAULTS = [
    # id, fault kwargs, SQLSTATE, words the message must hold, max seconds, max requests
    ("refuse", dict(mode="refuse"), "OE001", ["cannot reach"], 5.0, 4),
    ("hang", dict(mode="hang", seconds=30), "OE001", ["no answer", "read timeout"], READ_TIMEOUT + 2, 1),
    ("http_500", dict(mode="status", status=500), "OE001", ["HTTP 500"], 6.0, 4),
    ("http_503_retry_after", dict(mode="status", status=503, retry_after=1), "OE001", ["HTTP 503"], 8.0, 4),
    ("http_401", dict(mode="status", status=401), "OE001", ["HTTP 401"], 2.0, 1),
    ("not_json", dict(mode="not_json"), "OE002", ["not JSON"], 2.0, 1),
    ("wrong_count", dict(mode="wrong_count"), "OE002", ["invalid answer"], 2.0, 1),
    ("wrong_dim", dict(mode="wrong_dim"), "OE002", ["invalid answer"], 2.0, 1),
    ("nan", dict(mode="nan"), "OE002", ["invalid answer"], 2.0, 1),
    ("inf", dict(mode="inf"), "OE002", ["invalid answer"], 2.0, 1),
    ("zero_vector", dict(mode="zero"), "OE002", ["invalid answer", "all zeros"], 2.0, 1),
    ("die_mid_batch", dict(mode="die_mid_batch"), "OE001", ["cannot reach"], 5.0, 4),
]


@pytest.mark.parametrize("fid,fault,sqlstate,words,max_s,max_req", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_gives_clear_error_in_bounded_time(vocab_db, fake_embedder, fault_model, fid, fault,
                                                 sqlstate, words, max_s, max_req):
    fake_embedder.set_fault(**fault)
    with connect(vocab_db) as c:
        for sql, params in [("SELECT omop_emb.embed(%s, 'query', %s)", (unique(), fault_model)),
                            ("SELECT * FROM omop_emb.embed_batch(%s, 'document', %s)",
                             ([unique(), unique(), unique()], fault_model))]:
            before = fake_embedder.stats()["requests"]
            e, elapsed = sql_error(c, sql, params)
            requests = fake_embedder.stats()["requests"] - before
            msg = full_text(e)
            assert e.diag.sqlstate == sqlstate, msg
            assert fake_embedder.url in e.diag.message_primary, msg       # endpoint
            assert f"model {fault_model}" in e.diag.message_primary, msg  # model
            for w in words:                                                # status / what
                assert w in msg, msg
            assert e.diag.message_hint, msg                                # hint
            assert elapsed < max_s, f"{fid}: {elapsed:.2f}s"
            assert 1 <= requests <= max_req, f"{fid}: {requests} requests"
            FAULT_RESULTS[fid] = (f"{e.diag.sqlstate} in {elapsed:.2f}s after {requests} request(s): "
                                  f"{e.diag.message_primary}")
        # the session still works once the fault is gone
        fake_embedder.clear_fault()
        assert c.execute("SELECT omop_emb.embed(%s, 'query', %s) IS NOT NULL",
                         (unique(), fault_model)).fetchone()[0]


def test_connection_refused_closed_port(vocab_db, fault_model):
    port = free_port()  # nothing listens there
    with connect(vocab_db) as c:
        c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s, max_retries => 2)",
                  (fault_model, f"http://127.0.0.1:{port}"))
        e, elapsed = sql_error(c, "SELECT omop_emb.embed(%s, 'query', %s)", (unique(), fault_model))
    msg = full_text(e)
    assert e.diag.sqlstate == "OE001", msg
    assert f"127.0.0.1:{port}" in e.diag.message_primary and fault_model in e.diag.message_primary
    assert "refused" in msg.lower() and e.diag.message_hint, msg
    assert elapsed < 5, elapsed
    FAULT_RESULTS["closed_port"] = f"OE001 in {elapsed:.2f}s: {e.diag.message_primary}"


def test_429_retry_after_then_success(vocab_db, fake_embedder, fault_model):
    fake_embedder.set_fault("status", status=429, retry_after=1, times=2)
    with connect(vocab_db) as c:
        t0 = time.monotonic()
        v = c.execute("SELECT omop_emb.embed(%s, 'query', %s)::text", (unique(), fault_model)).fetchone()[0]
        elapsed = time.monotonic() - t0
    assert v and v.startswith("[")
    st = fake_embedder.stats()
    assert st["faults_injected"] == 2 and st["requests"] == 3
    assert 1.8 <= elapsed < 6, elapsed  # honoured Retry-After: 1 twice
    FAULT_RESULTS["http_429_retry_after"] = f"success after 2 x 429 (Retry-After: 1) in {elapsed:.2f}s"


# ---------------------------------------------------------------- faults during index_concepts
# Names only (synonyms and mapped names are indexed by default): expected_name_texts() counts them.
INDEX_SQL = ("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'gibleed', "
             "include_synonyms => false, include_mapped => false, batch_size => %s, max_texts => %s)")


@pytest.mark.parametrize("fault", [dict(mode="status", status=500), dict(mode="wrong_dim"),
                                   dict(mode="nan"), dict(mode="die_mid_batch")],
                         ids=["500", "wrong_dim", "nan", "die_mid_batch"])
def test_failing_batch_commits_nothing_and_rerun_completes(vocab_db, fake_embedder, fault_model, fault):
    with connect(vocab_db) as c:
        c.execute("SELECT omop_emb.alter_model(%s, max_retries => 0)", (fault_model,))
        c.execute(INDEX_SQL, (fault_model, 25, 100))  # four committed batches
        done = count_rows(vocab_db, fault_model)
        assert done == 100
        fake_embedder.set_fault(**fault)
        e, _ = sql_error(c, INDEX_SQL, (fault_model, 25, None))
        assert e.diag.sqlstate in ("OE001", "OE002"), full_text(e)
        assert count_rows(vocab_db, fault_model) == done  # the failed batch committed nothing
        expected = expected_name_texts(vocab_db)
        assert queue_len(vocab_db, fault_model) == expected - done  # ... and went back to the queue
        fake_embedder.clear_fault()
        c.execute(INDEX_SQL, (fault_model, 25, None))
    rows, distinct, expected = index_invariants(vocab_db, fault_model)
    assert rows == distinct == expected
    assert queue_len(vocab_db, fault_model) == 0


def test_fault_in_a_prefetched_chunk_keeps_the_committed_batches(vocab_db, fake_embedder, fault_model):
    """index_concepts keeps two requests of a batch in flight (http_client.EmbeddingPipeline)
    while it claims the rest. A chunk that fails after an earlier chunk of its batch was
    embedded rolls back that batch only: the batches committed before stay, nothing is left
    half-stored, no later batch is started, and a re-run completes."""
    with connect(vocab_db) as c:
        c.execute("SELECT omop_emb.alter_model(%s, max_retries => 0, batch_size => 10)", (fault_model,))
        # Batches of 40 texts = 4 requests of 10. Requests 1-4 are batch 1 (committed),
        # request 5 is batch 2's first chunk (answered), the next one fails.
        fake_embedder.set_fault("status", status=500, skip=5)
        e, _ = sql_error(c, INDEX_SQL, (fault_model, 40, None))
        msg = full_text(e)
        assert e.diag.sqlstate == "OE001" and "HTTP 500" in msg, msg
        assert 6 <= fake_embedder.stats()["requests"] <= 8  # batch 2's chunks at most
        assert count_rows(vocab_db, fault_model) == 40
        expected = expected_name_texts(vocab_db)
        assert queue_len(vocab_db, fault_model) == expected - 40
        fake_embedder.clear_fault()
        c.execute(INDEX_SQL, (fault_model, 40, None))
    rows, distinct, expected = index_invariants(vocab_db, fault_model)
    assert rows == distinct == expected
    assert queue_len(vocab_db, fault_model) == 0


def test_cancel_during_a_pipelined_index_run(vocab_db, fake_embedder, fault_model):
    """statement_timeout while chunks are queued and one is in flight: the cancel comes
    back at once, the batch under way rolls back, no HTTP thread is left in the backend,
    and a re-run completes."""
    fake_embedder.set_fault("slow", seconds=0.15)
    with connect(vocab_db) as c:
        c.execute(HTTP_THREADS_SQL)
        c.execute("SELECT omop_emb.alter_model(%s, batch_size => 10)", (fault_model,))
        c.execute("SET statement_timeout = '1500ms'")
        e, elapsed = sql_error(c, INDEX_SQL, (fault_model, 40, None))
        assert e.diag.sqlstate == "57014", full_text(e)
        assert elapsed < 1.5 + 0.5, elapsed
        c.execute("SET statement_timeout = 0")
        # The pipeline's thread is joined before the call returns; a request thread it
        # abandoned ends as its socket is shut down.
        deadline = time.monotonic() + 2
        while (threads := scalar(c, "SELECT public.t_http_threads()")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threads == 0, threads
        committed = count_rows(vocab_db, fault_model)
        assert committed > 0 and committed % 40 == 0, committed
        fake_embedder.clear_fault()
        c.execute(INDEX_SQL, (fault_model, 40, None))
    rows, distinct, expected = index_invariants(vocab_db, fault_model)
    assert rows == distinct == expected
    FAULT_RESULTS["statement_timeout during a pipelined index_concepts"] = (
        f"57014 after {elapsed:.2f}s (timeout 1.5s), {committed} rows kept, 0 HTTP threads left")


def test_backend_terminated_mid_run(vocab_db, pg, fake_embedder, fault_model):
    fake_embedder.set_fault("slow", seconds=0.05)
    run = Runner(vocab_db, INDEX_SQL, (fault_model, 10, None))
    run.start()
    wait_requests(fake_embedder, 4)
    fake_embedder.set_fault("hang", seconds=60)  # the next batch hangs
    wait_requests(fake_embedder, fake_embedder.stats()["requests"] + 1)
    committed = count_rows(vocab_db, fault_model)
    assert committed > 0
    t0 = time.monotonic()
    with connect(pg) as c:
        assert c.execute("SELECT pg_terminate_backend(%s)", (run.pid,)).fetchone()[0]
    run.join(READ_TIMEOUT + 10)
    gone = time.monotonic() - t0
    assert not run.is_alive()
    assert run.error is not None
    # The HTTP call runs in a thread while the backend polls for interrupts, so the
    # backend exits at once; the read timeout is the bound whatever the machine.
    assert gone < READ_TIMEOUT + 3, gone
    fake_embedder.clear_fault()
    assert count_rows(vocab_db, fault_model) == committed  # the hung batch committed nothing
    with connect(vocab_db) as c:
        c.execute(INDEX_SQL, (fault_model, 10, None))
    rows, distinct, expected = index_invariants(vocab_db, fault_model)
    assert rows == distinct == expected
    FAULT_RESULTS["pg_terminate_backend during index_concepts"] = (
        f"backend gone {gone:.2f}s after terminate (read timeout {READ_TIMEOUT}s); "
        f"{committed} rows kept, re-run: {rows} rows = {expected} expected, 0 duplicates")


def test_embedding_server_restarted_mid_run(vocab_db, fault_model):
    from omop_emb_pg.testing import DeterministicEmbeddingServer

    srv = DeterministicEmbeddingServer(dim=384).start()
    port = srv.port
    with connect(vocab_db) as c:
        c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s, max_retries => 1)",
                  (fault_model, srv.url))
    srv.set_fault("slow", seconds=0.05)
    run = Runner(vocab_db, INDEX_SQL, (fault_model, 10, None))
    run.start()
    wait_requests(srv, 5)
    srv.stop()
    time.sleep(1.0)  # the server is down for a second: the run fails or retries across it
    srv2 = DeterministicEmbeddingServer(dim=384, port=port).start()
    try:
        run.join(60)
        assert not run.is_alive()
        if run.error is not None:
            assert getattr(run.error, "sqlstate", None) in ("OE001", "OE002"), run.error
        with connect(vocab_db) as c:
            c.execute(INDEX_SQL, (fault_model, 10, None))
        rows, distinct, expected = index_invariants(vocab_db, fault_model)
        assert rows == distinct == expected
        FAULT_RESULTS["server restarted during index_concepts"] = (
            f"first run: {'OE001 ' + str(run.error).splitlines()[0][:80] if run.error else 'completed'}; "
            f"re-run: {rows} rows = {expected} expected, 0 duplicates")
    finally:
        srv2.stop()


# ---------------------------------------------------------------- cancellation
@pytest.mark.parametrize("how", ["pg_cancel_backend", "statement_timeout"])
def test_cancel_during_hung_call_returns_within_read_timeout(vocab_db, pg, fake_embedder, fault_model, how):
    fake_embedder.set_fault("hang", seconds=60)
    setup = ["SET statement_timeout = '500ms'"] if how == "statement_timeout" else []
    run = Runner(vocab_db, "SELECT omop_emb.embed(%s, 'query', %s)", (unique(), fault_model), setup)
    run.start()
    wait_requests(fake_embedder, 1)
    if how == "pg_cancel_backend":
        time.sleep(0.3)
        with connect(pg) as c:
            assert c.execute("SELECT pg_cancel_backend(%s)", (run.pid,)).fetchone()[0]
    run.join(READ_TIMEOUT + 10)
    assert not run.is_alive()
    assert isinstance(run.error, psycopg.Error), run.error
    state = run.error.diag.sqlstate
    # The backend keeps checking for cancels while the request runs in a thread: the
    # cancel is honoured at once (well before the read timeout) as a normal cancel.
    assert state == "57014", state
    assert run.elapsed < READ_TIMEOUT, run.elapsed
    FAULT_RESULTS[how + " during a hung call"] = (
        f"control back after {run.elapsed:.2f}s (read timeout {READ_TIMEOUT}s), SQLSTATE {state}: "
        f"{run.error.diag.message_primary}")
    # the session that was cancelled is usable again
    fake_embedder.clear_fault()
    with connect(vocab_db) as c:
        assert c.execute("SELECT omop_emb.embed(%s, 'query', %s) IS NOT NULL",
                         (unique(), fault_model)).fetchone()[0]


# ---------------------------------------------------------------- drip-feeding servers (issue 12)
HTTP_THREADS_SQL = """CREATE OR REPLACE FUNCTION public.t_http_threads() RETURNS integer
LANGUAGE plpython3u AS $$
import threading
return sum(1 for t in threading.enumerate() if t.name.startswith('omop_emb-http'))
$$"""


def test_drip_feeding_server_hits_the_total_deadline(vocab_db, fake_embedder, fault_model):
    """One byte every 0.5 s never trips the 2 s read timeout; the deadline of the
    whole request (connect_timeout_s + read_timeout_s) ends it."""
    fake_embedder.set_fault("drip", interval=0.5, seconds=30)
    with connect(vocab_db) as c:
        c.execute("SELECT omop_emb.alter_model(%s, connect_timeout_s => 1)", (fault_model,))
        c.execute("SET statement_timeout = '12s'")  # the old behaviour: drips until this
        e, elapsed = sql_error(c, "SELECT omop_emb.embed(%s, 'query', %s)", (unique(), fault_model))
    msg = full_text(e)
    assert e.diag.sqlstate == "OE001", msg
    assert "deadline" in msg and fake_embedder.url in msg, msg
    assert elapsed < 1 + READ_TIMEOUT + 2, elapsed
    FAULT_RESULTS["drip (1 byte / 0.5 s)"] = f"OE001 in {elapsed:.2f}s: {e.diag.message_primary}"


def test_cancelled_calls_leave_no_http_threads_behind(vocab_db, pg, fake_embedder, fault_model):
    fake_embedder.set_fault("drip", interval=0.5, seconds=60)
    with connect(vocab_db) as c:
        c.execute(HTTP_THREADS_SQL)
        c.execute("SET statement_timeout = '300ms'")
        for _ in range(10):
            e, _ = sql_error(c, "SELECT omop_emb.embed(%s, 'query', %s)", (unique(), fault_model))
            assert e.diag.sqlstate == "57014", full_text(e)
        c.execute("SET statement_timeout = 0")
        deadline = time.monotonic() + 3
        while (threads := scalar(c, "SELECT public.t_http_threads()")) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert threads == 0, f"{threads} HTTP threads left after 10 cancels"
    FAULT_RESULTS["10 cancels of drip-fed calls"] = f"{threads} HTTP threads left in the backend"


def test_register_model_discovery_is_cancellable(vocab_db, fake_embedder):
    fake_embedder.set_fault("drip", interval=0.5, seconds=20)
    name = "d" + uuid.uuid4().hex[:8]
    with connect(vocab_db) as c:
        c.execute("SET statement_timeout = '1s'")
        e, elapsed = sql_error(c, "SELECT omop_emb.register_model(%s, 'openai', %s, dimensions => 384)",
                               (name, fake_embedder.url))
        assert e.diag.sqlstate == "57014", full_text(e)
        assert elapsed < 3, elapsed
        assert scalar(c, "SELECT count(*) FROM omop_emb.model WHERE name = %s", (name,)) == 0
    FAULT_RESULTS["register_model discovery on a drip"] = f"cancelled by statement_timeout after {elapsed:.2f}s"


def test_zz_report_fault_figures():
    """Prints the figures collected above (run with -s to see them)."""
    for k, v in FAULT_RESULTS.items():
        print(f"FAULT {k}: {v}")
