"""Full-vocabulary rehearsal: 5,000,000 realistic texts x 384 as halfvec on this machine.

The vectors are those of bench/b_realistic.py (real e5 embeddings of real concept names, mixed
and noised with the calibrated generator), made chunk by chunk (each chunk seeded on its own, so
that any chunk can be made again) and kept on disk as a float16 memmap (the exact values a
halfvec column stores: the ground truth is computed on them). They are loaded with binary COPY
straight into a model registered with ``storage => 'halfvec'`` (no vector model first).

Phases (each one resumable; results are written to rehearsal.json after every step, so that a run
stopped half way still reports what it measured):

* ``load``: generate, COPY, then each secondary index built alone and timed, VACUUM ANALYZE;
* ``build``: ``create_index(model, 'hnsw', 16, 128)`` (including its ef_search calibration) with
  ``maintenance_work_mem`` large enough for the halfvec graph, while a sampler records every 10 s
  the machine's used memory, the RSS/PSS of the building backend and its parallel worker, the
  dynamic shared memory in /dev/shm and pg_stat_progress_create_index;
* ``measure``: sizes, then cached ``nearest(text, 10)`` recall@10 and p50/p95 by ef_search
  (b_realistic.measure), unfiltered and one domain filter, against exact search in numpy over
  the memmap, chunk by chunk;
* ``graphmem``: bytes per element of pgvector's build graph, vector and halfvec (a small
  build that outgrows maintenance_work_mem = 32MB on purpose; its NOTICE says after how many rows);
* ``report``: rehearsal.md and memory.png from rehearsal.json (also of an unfinished build).

The cluster is reniced (nice 10) and shares the 2 cores with other work.

    .venv/bin/python bench/b_rehearsal.py --phase load      # ~30 min
    .venv/bin/python bench/b_rehearsal.py --phase build     # ~75-90 min on 2 shared cores
    .venv/bin/python bench/b_rehearsal.py --phase measure   # ~15 min (starts the e5 server)
    .venv/bin/python bench/b_rehearsal.py --phase report

run_all.py runs it as the opt-in part ``rehearsal`` (not in the default set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import b_query  # noqa: E402
import b_realistic  # noqa: E402
import common  # noqa: E402
from common import ROOT, Database, Proc, log  # noqa: E402

MODEL = "rehearsal_half"
DIM = b_query.DIM
N = 5_000_000
CHUNK = 100_000
SEED = 4242
# The halfvec graph of 5M x 384 needs ~7 GB in memory (1M halfvec: 1.17 GB on disk; in memory an
# element is its vector, 776 bytes, + level-0 neighbour list, 32 x 16 bytes, + ~130 bytes): a
# graph that outgrows maintenance_work_mem is finished on disk, far slower (pgvector's NOTICE
# "hnsw graph no longer fits into maintenance_work_mem after N tuples").
MAINTENANCE_WORK_MEM = "8GB"
OUT = ROOT / "bench" / "results" / "rehearsal_5m"
STORAGE = "halfvec"
# --storage vector: the same rows as float32 (the float16 values, exact in float32, so the same
# ground truth), in their own model, results folder and cluster. Its graph needs 2,317 bytes per
# element (phase graphmem), 10.8 GiB at 5M: maintenance_work_mem 12GB.
VECTOR_RUN = {"MODEL": "rehearsal_vec", "MAINTENANCE_WORK_MEM": "12GB",
              "OUT": ROOT / "bench" / "results" / "rehearsal_5m_vector", "STORAGE": "vector"}


def use_vector_storage() -> None:
    globals().update(VECTOR_RUN)
BASE = Path("/tmp/rehearsal5m")
EF_GRID = [None, 40, 100, 200, 400, 800]
SAMPLE_S = 10.0


# ---------------------------------------------------------------- results file
class Results:
    """rehearsal.json, rewritten after every step."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.lock = threading.Lock()

    def save(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            os.replace(tmp, self.path)


# ---------------------------------------------------------------- generator
def generator(work: Path, e5_url: str | None = None) -> dict:
    """Real sample, its neighbours and the calibrated noise (b_realistic), cached in ``work``."""
    conc = b_realistic.real_concepts(5000)
    names = [c[0] for c in conc]
    cache = work / f"real_names_{len(names)}.npy"
    if cache.exists():
        R = np.load(cache)
    else:
        if e5_url is None:
            with Proc("e5") as e5:
                R = b_realistic.embed(e5.url, names, "passage: ")
        else:
            R = b_realistic.embed(e5_url, names, "passage: ")
        np.save(cache, R)
    neigh = b_realistic.neighbours(R)
    pfile = work / "generator.json"
    if pfile.exists():
        info = json.loads(pfile.read_text())
    else:
        real_nn = b_realistic.nn_distances(R)
        sigma, spread, ks, gen_nn = b_realistic.calibrate(R, neigh, real_nn)
        q = [5, 25, 50, 75, 95]
        info = {"real_names": len(names), "sigma": sigma, "spread": spread, "ks": ks,
                "mix_share": b_realistic.MIX_SHARE, "neighbours": b_realistic.NEIGHBOURS,
                "nn_quantiles": {"q": q, "real": np.percentile(real_nn, q).tolist(),
                                 "generated_same_size": np.percentile(gen_nn, q).tolist()}}
        pfile.write_text(json.dumps(info, indent=1))
    return {"R": R, "neigh": neigh, "names": names, "domains": [c[1] for c in conc],
            "vocabs": [c[2] for c in conc], "info": info}


def chunk(g: dict, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [k*CHUNK, min(n, (k+1)*CHUNK)): (float16 unit vectors, parent index); seeded per chunk."""
    R, neigh, info = g["R"], g["neigh"], g["info"]
    m = min(n, (k + 1) * CHUNK) - k * CHUNK
    rng = np.random.default_rng([SEED, k])
    scale = (info["sigma"] * np.exp(info["spread"] * rng.standard_normal(m))).astype(np.float32)
    a = rng.integers(0, len(R), m)
    b = neigh[a, rng.integers(0, neigh.shape[1], m)]
    w = np.where(rng.random(m) < b_realistic.MIX_SHARE, rng.uniform(0.5, 1.0, m), 1.0).astype(np.float32)
    v = w[:, None] * R[a] + (1.0 - w[:, None]) * R[b]
    v += scale[:, None] * rng.standard_normal(v.shape, dtype=np.float32) / np.sqrt(R.shape[1])
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float16), a.astype(np.int16)


def vectors(work: Path, n: int, g: dict) -> tuple[np.ndarray, np.ndarray]:
    """(X float16 memmap n x DIM, parent int16 n), made once (chunk-wise) and kept in ``work``."""
    xp, pp, done = work / f"X_{n}_f16.npy", work / f"parent_{n}.npy", work / f"X_{n}.done"
    if not done.exists():
        log(f"rehearsal: generating {n:,} vectors chunk-wise into {xp}")
        X = np.lib.format.open_memmap(xp, mode="w+", dtype=np.float16, shape=(n, DIM))
        par = np.empty(n, dtype=np.int16)
        for k in range((n + CHUNK - 1) // CHUNK):
            X[k * CHUNK:(k + 1) * CHUNK], par[k * CHUNK:(k + 1) * CHUNK] = chunk(g, k, n)
        X.flush()
        del X
        np.save(pp, par)
        done.write_text("ok")
    return np.load(xp, mmap_mode="r"), np.load(pp)


# ---------------------------------------------------------------- cluster
def database(datadir: str) -> Database:
    common.PG_SETTINGS["maintenance_work_mem"] = MAINTENANCE_WORK_MEM  # before the cluster starts
    db = Database(datadir=datadir)
    b_realistic.renice_cluster(datadir)  # backends forked later (the build, its worker) inherit it
    return db


def model_id(c) -> int | None:
    row = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (MODEL,)).fetchone()
    return row[0] if row else None


def sizes(c, mid: int) -> dict:
    t = f"omop_emb.embedding_{mid}"
    idx = {r[0]: r[1] for r in c.execute(
        "SELECT indexname, pg_relation_size(format('omop_emb.%%I', indexname)) FROM pg_indexes "
        "WHERE schemaname = 'omop_emb' AND tablename = %s ORDER BY 1", (f"embedding_{mid}",))}
    return {"table_bytes": c.execute(f"SELECT pg_table_size('{t}')").fetchone()[0],
            "heap_bytes": c.execute(f"SELECT pg_relation_size('{t}')").fetchone()[0],
            "indexes_bytes": idx,
            "total_relation_bytes": c.execute(f"SELECT pg_total_relation_size('{t}')").fetchone()[0],
            "database_bytes": c.execute("SELECT pg_database_size(current_database())").fetchone()[0],
            "rows": c.execute(f"SELECT reltuples::bigint FROM pg_class WHERE oid = '{t}'::regclass").fetchone()[0]}


# ---------------------------------------------------------------- load
def phase_load(res: Results, db: Database, work: Path, n: int) -> None:
    import hashlib

    from b_indexing import register

    g = generator(work)
    res.data["generator"] = g["info"]
    res.data["vectors"] = n
    res.data["storage"] = STORAGE
    t0 = time.perf_counter()
    X, par = vectors(work, n, g)
    res.data.setdefault("load", {})["generate_s"] = time.perf_counter() - t0
    res.save()
    dsn = db.create("bench_rehearsal", fresh=False)
    db.install(dsn)
    names = np.array(g["names"])
    dom, voc = np.array(g["domains"]), np.array(g["vocabs"])
    with psycopg.connect(dsn, autocommit=True) as c:
        mid = model_id(c)
        if mid is not None and c.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0] == n \
                and res.data["load"].get("copy_s"):
            log("rehearsal: rows already loaded")
        else:
            c.execute("SELECT omop_emb.drop_model(%s, if_exists => true)", (MODEL,))
            # the endpoint is set to the e5 server of the measure phase (alter_model)
            c.execute("SELECT omop_emb.register_model(%s, 'openai', %s, dimensions => %s, document_prefix => "
                      "'passage: ', query_prefix => 'query: ', storage => %s)",
                      (MODEL, "http://127.0.0.1:9", DIM, STORAGE))
            mid = model_id(c)
            idx = c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'omop_emb' AND "
                            "tablename = %s AND indexname NOT LIKE '%%pkey'", (f"embedding_{mid}",)).fetchall()
            for name, _ in idx:
                c.execute(f"DROP INDEX omop_emb.{name}")
            res.data["secondary_index_ddl"] = {name: ddl for name, ddl in idx}
            log(f"rehearsal: COPY {n:,} {STORAGE} rows into omop_emb.embedding_{mid}")
            t0 = time.perf_counter()
            head = np.array([DIM, 0], dtype=">u2").tobytes()  # binary form: dim, unused, then the values
            wire = ">f2" if STORAGE == "halfvec" else ">f4"  # big-endian halves or floats
            with c.cursor().copy(
                    f"COPY omop_emb.embedding_{mid} (concept_id, text_kind, text, text_hash, source_concept_id, "
                    "source_code, concept_name, domain_id, vocabulary_id, concept_class_id, standard_concept, "
                    "embedding) FROM STDIN (FORMAT BINARY)") as cp:
                # the vector column goes as raw bytes in its type's binary format (halfvec_recv/vector_recv)
                cp.set_types(["int4", "text", "text", "bytea", "int4", "text", "text", "text", "text", "text",
                              "text", "bytea"])
                for k in range(0, n, CHUNK):
                    Xb = np.asarray(X[k:k + CHUNK]).astype(wire)
                    for j in range(len(Xb)):
                        i = k + j
                        cid = i + 1
                        p = par[i]
                        text = f"{names[p]} #{i}"  # unique texts, the parent's words
                        cp.write_row((cid, "name", text, hashlib.sha256(("passage: " + text).encode()).digest(),
                                      cid, f"SYN{cid}", text, str(dom[p]), str(voc[p]), "Synthetic", "S",
                                      head + Xb[j].tobytes()))
                    if (k // CHUNK) % 10 == 0:
                        log(f"rehearsal: COPY {k + len(Xb):,} rows, {time.perf_counter() - t0:,.0f} s")
            res.data["load"]["copy_s"] = time.perf_counter() - t0
            res.data["load"]["secondary_indexes"] = {}
            res.save()
        ddl = res.data.get("secondary_index_ddl", {})
        built = res.data["load"].setdefault("secondary_indexes", {})
        for name, stmt in ddl.items():
            if name in built:
                continue
            log(f"rehearsal: {name}")
            t0 = time.perf_counter()
            c.execute(stmt.replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1))
            built[name] = {"build_s": time.perf_counter() - t0,
                           "bytes": c.execute(f"SELECT pg_relation_size('omop_emb.{name}')").fetchone()[0]}
            res.save()
        if "vacuum_analyze_s" not in res.data["load"]:
            t0 = time.perf_counter()
            c.execute(f"VACUUM ANALYZE omop_emb.embedding_{mid}")
            res.data["load"]["vacuum_analyze_s"] = time.perf_counter() - t0
        res.data["after_load"] = sizes(c, mid)
        res.data["postgres"] = db.settings()
        res.save()


# ---------------------------------------------------------------- build
def _smaps(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Rss", "Pss", "Pss_Anon", "Pss_Shmem", "Private_Dirty"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _meminfo() -> dict:
    m = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            m[k] = int(v.split()[0]) * 1024
    return {"used": m["MemTotal"] - m["MemAvailable"], "total": m["MemTotal"], "available": m["MemAvailable"],
            "shmem": m.get("Shmem", 0)}


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def sampler(res: Results, dsn: str, build_pid: int, t_start: float, stop: threading.Event) -> None:
    samples = res.data["build"].setdefault("samples", [])
    with psycopg.connect(dsn, autocommit=True) as c:
        while not stop.is_set():
            pids = [build_pid] + [r[0] for r in c.execute(
                "SELECT pid FROM pg_stat_activity WHERE leader_pid = %s AND pid <> %s", (build_pid, build_pid))]
            prog = c.execute("SELECT phase, blocks_total, blocks_done, tuples_total, tuples_done "
                             "FROM pg_stat_progress_create_index WHERE pid = %s", (build_pid,)).fetchone()
            s = {"t": round(time.perf_counter() - t_start, 1), "time": time.strftime("%H:%M:%S"),
                 "mem": _meminfo(), "dev_shm": _shm_used(),
                 "procs": {str(p): _smaps(p) for p in pids}}
            if prog:
                s["progress"] = dict(zip(("phase", "blocks_total", "blocks_done", "tuples_total", "tuples_done"),
                                         prog))
            else:
                s["progress"] = {"phase": "no CREATE INDEX in progress (not started yet, or ef_search calibration after it)"}
            with res.lock:
                samples.append(s)
            if len(samples) % 6 == 0:
                res.save()
            stop.wait(SAMPLE_S)
    res.save()


def phase_build(res: Results, db: Database, m: int = 16, ef_construction: int = 128) -> None:
    dsn = db.dsn("bench_rehearsal")
    with psycopg.connect(dsn, autocommit=True) as c:
        mid = model_id(c)
        b = res.data.setdefault("build", {})
        built = c.execute("SELECT index_method = 'hnsw' FROM omop_emb.model WHERE name = %s", (MODEL,)).fetchone()
        if b.get("build_s") and built and built[0]:  # resumed run: this cluster has the index the json reports
            log("rehearsal: index already built")
            return
        res.data["build"] = b = {"m": m, "ef_construction": ef_construction,
                                 "maintenance_work_mem": c.execute("SHOW maintenance_work_mem").fetchone()[0],
                                 "max_parallel_maintenance_workers":
                                     c.execute("SHOW max_parallel_maintenance_workers").fetchone()[0],
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                 "reniced": "nice 10 (postmaster and the backends it forks)", "samples": []}
        notes: list = []
        c.add_notice_handler(lambda d: notes.append((time.strftime("%H:%M:%S"), d.message_primary)))
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        b["backend_pid"] = pid
        res.save()
        stop = threading.Event()
        t0 = time.perf_counter()
        th = threading.Thread(target=sampler, args=(res, dsn, pid, t0, stop), daemon=True)
        th.start()
        log(f"rehearsal: create_index(hnsw, m {m}, ef_construction {ef_construction}), backend {pid}")
        try:
            c.execute("SELECT omop_emb.create_index(%s, 'hnsw', %s, %s)", (MODEL, m, ef_construction))
            b["build_s"] = time.perf_counter() - t0  # CREATE INDEX + ef_search calibration
        finally:
            stop.set()
            th.join()
            b["notices"] = notes
            res.save()
        # CREATE INDEX alone: up to the first sample without a CREATE INDEX running
        seen = [i for i, s in enumerate(b["samples"]) if "blocks_total" in s["progress"]]
        ends = [s["t"] for s in b["samples"][seen[-1] + 1:]] if seen else []
        if ends:
            b["create_index_s_approx"] = ends[0]
            b["calibration_s_approx"] = b["build_s"] - ends[0]
        b["index_params"] = c.execute("SELECT index_params FROM omop_emb.model WHERE name = %s",
                                      (MODEL,)).fetchone()[0]
        b["peak"] = peaks(b["samples"])
        res.data["after_build"] = sizes(c, mid)
        res.save()
        log(f"rehearsal: built in {b['build_s']:,.0f} s")


def peaks(samples: list) -> dict:
    if not samples:
        return {}
    return {"machine_used_bytes": max(s["mem"]["used"] for s in samples),
            "machine_used_at_start_bytes": samples[0]["mem"]["used"],
            "dev_shm_bytes": max(s["dev_shm"] for s in samples),
            "backends_rss_sum_bytes": max(sum(p.get("Rss", 0) for p in s["procs"].values()) for s in samples),
            "backends_pss_sum_bytes": max(sum(p.get("Pss", 0) for p in s["procs"].values()) for s in samples),
            "one_backend_pss_bytes": max(max([p.get("Pss", 0) for p in s["procs"].values()] or [0]) for s in samples),
            # the build's own segment: others' parallel queries use /dev/shm too
            "dev_shm_median_during_create_index_bytes": float(np.median(
                [s["dev_shm"] for s in samples if s["progress"].get("blocks_total")] or [0]))}


# ---------------------------------------------------------------- measure
def exact_top10_chunked(X, idx_pool: np.ndarray, Q: np.ndarray) -> list[set]:
    """b_query.exact_top10 over a float16 memmap, chunk by chunk (never all 5M rows in float32)."""
    Q = np.asarray(Q, dtype=np.float32)
    best_s = np.full((len(Q), 10), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(Q), 10), dtype=np.int64)
    full = len(idx_pool) == len(X)
    for i in range(0, len(idx_pool), 250_000):
        ids = idx_pool[i:i + 250_000]
        C = np.asarray(X[ids[0]:ids[-1] + 1] if full else X[ids], dtype=np.float32)
        S = Q @ C.T
        top = np.argpartition(-S, 10, axis=1)[:, :10]
        cs = np.concatenate([best_s, np.take_along_axis(S, top, 1)], axis=1)
        ci = np.concatenate([best_i, ids[top]], axis=1)
        keep = np.argsort(-cs, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(cs, keep, 1), np.take_along_axis(ci, keep, 1)
    if _after_truth is not None:
        _after_truth()
    return [set((r + 1).tolist()) for r in best_i]


# Reading the 3.8 GB memmap for the ground truth pushes index pages out of the page cache: the
# first ef_search column timed after it (the default) then paid disk reads that the others did
# not (interleaved, default and ef 400 cost the same). phase_measure sets this to prewarm the
# index again after each ground truth.
_after_truth = None


def phase_measure(res: Results, db: Database, work: Path, n: int, n_queries: int) -> None:
    g = generator(work)
    X, par = vectors(work, n, g)
    dsn = db.dsn("bench_rehearsal")
    with psycopg.connect(dsn, autocommit=True) as c:
        mid = model_id(c)
        res.data["after_build"] = sizes(c, mid)
        res.data.setdefault("build", {})["index_params"] = c.execute(
            "SELECT index_params FROM omop_emb.model WHERE name = %s", (MODEL,)).fetchone()[0]
        res.save()
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        t0 = time.perf_counter()
        c.execute(f"SELECT pg_prewarm('omop_emb.embedding_{mid}_hnsw')")
        res.data["prewarm_index_s"] = time.perf_counter() - t0
    data = {"X": X, "parent": par, "names": g["names"], "domains": g["domains"], "vocabs": g["vocabs"]}
    b_query.exact_top10 = exact_top10_chunked  # b_realistic.measure calls it through the module
    global _after_truth

    def prewarm():
        with psycopg.connect(dsn, autocommit=True) as c2:
            c2.execute(f"SELECT pg_prewarm('omop_emb.embedding_{mid}_hnsw')")

    _after_truth = prewarm
    orig_filters = b_realistic.filters

    def filters(d):  # unfiltered and the domain case only (the ~1% vocabulary is scanned exactly)
        return {k: v for k, v in orig_filters(d).items() if not k.startswith("vocabulary")}

    b_realistic.filters = filters
    with Proc("e5") as e5:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (MODEL, e5.url))
        log(f"rehearsal: recall and cached latency, {n_queries} queries per case")
        t0 = time.perf_counter()
        res.data["recall"] = b_realistic.measure(dsn, data, n_queries, EF_GRID, model=MODEL)
        res.data["recall"]["seconds"] = time.perf_counter() - t0
    res.data["postgres"] = db.settings()
    res.save()


# ---------------------------------------------------------------- graph memory per element
def phase_graphmem(res: Results, base: Path) -> None:
    """Bytes per element of pgvector's in-memory build graph, by storage, serial and parallel.

    A build with maintenance_work_mem = 32MB over a few more random rows than fit: pgvector's
    NOTICE "hnsw graph no longer fits into maintenance_work_mem after N tuples" gives N, so the
    graph takes 32 MiB / N per element (random vectors: the graph's levels do not depend on the
    data, the element size does not either). In its own small cluster, a minute."""
    import re

    from omop_emb_pg.cluster import LocalCluster

    out = res.data.setdefault("graph_memory", {"maintenance_work_mem": "32MB", "m": 16, "rows": {}})
    out["pgvector"] = None
    cl = LocalCluster(base / "graphmem" / "data", fsync=False, settings={"shared_buffers": "256MB"})
    cl.start()
    try:
        with psycopg.connect(cl.dsn(), autocommit=True) as c:
            notes: list = []
            c.add_notice_handler(lambda d: notes.append(d.message_primary))
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            out["pgvector"] = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
            for typ, rows, workers in (("vector", 16000, 0), ("vector", 16000, 1), ("halfvec", 23000, 0),
                                       ("halfvec", 23000, 1)):
                c.execute("DROP TABLE IF EXISTS t")
                c.execute(f"CREATE TABLE t AS SELECT i, (SELECT array_agg(random()::real) FROM generate_series(1, {DIM}) "
                          f"WHERE i > 0)::vector::{typ}({DIM}) AS v FROM generate_series(1, {rows}) i")
                c.execute(f"SET max_parallel_maintenance_workers = {workers}")
                c.execute("SET maintenance_work_mem = '32MB'")
                notes.clear()
                c.execute(f"CREATE INDEX ti ON t USING hnsw (v {typ}_cosine_ops) WITH (m = 16, ef_construction = 32)")
                c.execute("DROP INDEX ti")
                hit = [int(m.group(1)) for x in notes for m in [re.search(r"after (\d+) tuples", x)] if m]
                if hit:
                    out["rows"][f"{typ}, {workers} worker(s)"] = {"tuples_fitting": hit[0],
                                                                 "bytes_per_element": 32 * 2**20 / hit[0]}
                res.save()
    finally:
        cl.stop()
        import shutil

        shutil.rmtree(base / "graphmem", ignore_errors=True)


def graph_bytes(r: dict, storage: str) -> float | None:
    rows = (r.get("graph_memory") or {}).get("rows", {})
    xs = [v["bytes_per_element"] for k, v in rows.items() if k.startswith(storage + ",")]
    return max(xs) if xs else None


# ---------------------------------------------------------------- report
def extrapolate_build(b: dict) -> dict | None:
    """For an unfinished build: fraction of the heap scanned (blocks) and a linear end estimate."""
    s = [x for x in b.get("samples", []) if x["progress"].get("blocks_total")]
    if not s:
        return None
    last = s[-1]
    frac = last["progress"]["blocks_done"] / last["progress"]["blocks_total"]
    return {"at_s": last["t"], "blocks_fraction": frac, "tuples_done": last["progress"]["tuples_done"],
            "phase": last["progress"]["phase"],
            "estimated_total_s": last["t"] / frac if frac > 0 else None}


def plot_memory(r: dict, out: Path) -> str | None:
    b = r.get("build", {})
    s = b.get("samples") or []
    if not s:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([x["t"] for x in s]) / 60
    gib = 2 ** 30
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(t, [x["mem"]["used"] / gib for x in s], label="machine: used (MemTotal - MemAvailable)")
    ax.plot(t, [x["dev_shm"] / gib for x in s], label="/dev/shm (parallel build's shared graph)")
    ax.plot(t, [sum(p.get("Pss", 0) for p in x["procs"].values()) / gib for x in s],
            label="build backend + worker: PSS")
    ax.plot(t, [sum(p.get("Rss", 0) for p in x["procs"].values()) / gib for x in s], ":",
            label="build backend + worker: RSS (shared pages counted twice)")
    mwm = b.get("maintenance_work_mem", "")
    ax.set_xlabel("minutes since create_index started")
    ax.set_ylabel("GiB")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(t, [100 * x["progress"]["blocks_done"] / x["progress"]["blocks_total"]
                 if x["progress"].get("blocks_total") else np.nan for x in s], "k--", lw=1,
             label="heap blocks scanned (%)")
    ax2.set_ylabel("build progress, % of heap blocks")
    ax2.set_ylim(0, 105)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set_title(f"HNSW build, {r.get('vectors', 0):,} x 384 {r.get('storage', STORAGE)} (maintenance_work_mem {mwm}, "
                 f"{b.get('max_parallel_maintenance_workers')} worker)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
    return "memory.png"


def mb(x) -> str:
    return f"{x / 2**20:,.0f} MB" if x is not None else "-"


def gb(x) -> str:
    return f"{x / 2**30:,.2f} GB" if x is not None else "-"


def markdown(r: dict) -> str:
    n = r.get("vectors", N)
    ld, b = r.get("load", {}), r.get("build", {})
    st = r.get("storage", STORAGE)
    lines = [f"## Full-vocabulary rehearsal: {n:,} x 384, {st} (bench/b_rehearsal.py)", "",
             "Realistic vectors (b_realistic's generator from e5 embeddings of real names), stored as "
             f"`{st}` (model registered with `storage => '{st}'`, binary COPY). The cluster was reniced "
             "(nice 10) and shared the 2 cores and 24 GB of this VM with other work: times are "
             "those of a shared machine.", ""]
    lines += ["| step | time | size |", "|---|---|---|",
              f"| generate vectors (numpy, chunk-wise) | {ld.get('generate_s', 0):,.0f} s | float16 memmap |",
              f"| COPY (binary, {st}) | {ld.get('copy_s', 0):,.0f} s | table "
              f"{mb(r.get('after_load', {}).get('table_bytes'))} |"]
    for name, x in ld.get("secondary_indexes", {}).items():
        lines.append(f"| secondary index {name} | {x['build_s']:,.0f} s | {mb(x['bytes'])} |")
    if "vacuum_analyze_s" in ld:
        lines.append(f"| VACUUM ANALYZE | {ld['vacuum_analyze_s']:,.0f} s | |")
    ab = r.get("after_build") or {}
    hnsw = {k: v for k, v in (ab.get("indexes_bytes") or {}).items() if k.endswith("_hnsw")}
    if b.get("build_s"):
        lines.append(f"| HNSW build (create_index: CREATE INDEX ~{b.get('create_index_s_approx', 0):,.0f} s + "
                     f"ef_search calibration ~{b.get('calibration_s_approx', 0):,.0f} s) | {b['build_s']:,.0f} s | "
                     f"index {mb(sum(hnsw.values()) if hnsw else None)} |")
    elif b.get("samples"):
        e = extrapolate_build(b) or {}
        lines.append(f"| HNSW build: **not finished** when this report was written | "
                     f"{e.get('at_s', 0):,.0f} s so far, {100 * e.get('blocks_fraction', 0):.0f}% of heap blocks "
                     f"scanned ({e.get('phase')}); linear estimate of CREATE INDEX "
                     f"{(e.get('estimated_total_s') or 0):,.0f} s | |")
    if ab:
        lines.append(f"| database total | | {gb(ab.get('database_bytes'))} (table {gb(ab.get('table_bytes'))}, "
                     f"table + all indexes {gb(ab.get('total_relation_bytes'))}) |")
    if b:
        pk = peaks(b.get("samples") or []) or b.get("peak") or {}
        lines += ["", f"HNSW: m {b.get('m')}, ef_construction {b.get('ef_construction')}, maintenance_work_mem "
                  f"{b.get('maintenance_work_mem')}, {b.get('max_parallel_maintenance_workers')} parallel maintenance "
                  f"worker, shared_buffers {r.get('postgres', {}).get('shared_buffers', '2GB')}. "
                  f"Memory sampled every {SAMPLE_S:.0f} s: machine used at the start {gb(pk.get('machine_used_at_start_bytes'))}, "
                  f"peak {gb(pk.get('machine_used_bytes'))} (all processes of all engineers); /dev/shm during "
                  f"CREATE INDEX {gb(pk.get('dev_shm_median_during_create_index_bytes'))} (the parallel build's "
                  f"shared graph: all of maintenance_work_mem, reserved when the build starts; peak "
                  f"{gb(pk.get('dev_shm_bytes'))} with other users' segments); PSS of one build process at most "
                  f"{gb(pk.get('one_backend_pss_bytes'))} (the leader writing the whole graph to disk after the "
                  f"worker finished: the graph it touched + shared buffers), leader + worker at most "
                  f"{gb(pk.get('backends_pss_sum_bytes'))}."]
        notes = [x[1] for x in b.get("notices", []) if "maintenance_work_mem" in x[1]]
        lines.append("pgvector's notices: " + ("; ".join(notes) if notes else
                                                "none about maintenance_work_mem (the graph fitted in memory)") + ".")
        ip = b.get("index_params") or {}
        if ip.get("calibration"):
            lines.append(f"create_index's ef_search calibration picked **{ip.get('ef_search')}** (recall@10 on "
                         f"{ip['calibration'].get('queries')} stored vectors by ef_search: "
                         f"{ip['calibration'].get('recall_at_10_by_ef_search')}).")
    gm = (r.get("graph_memory") or {}).get("rows")
    if gm:
        lines += ["", "pgvector's build graph per element (phase `graphmem`: maintenance_work_mem 32MB, the row after "
                  "which its NOTICE said the graph no longer fits): " + "; ".join(
                      f"{k}: {v['bytes_per_element']:,.0f} bytes" for k, v in gm.items()) + "."]
    if st == "halfvec":  # (the sizing table extrapolates from the halfvec run)
        lines += sizing(r)
    rec = r.get("recall")
    if rec:
        lines += ["", f"Cached `nearest(text, 10)` ({rec['queries_per_case']} real names per case; query vectors "
                  "from the shared cache): recall@10 against exact search in numpy over the stored "
                  "(float16, exact in either storage) "
                  "values (in brackets: tie-tolerant) / p50 / p95:", "",
                  "| case | rows in filter | " + " | ".join(f"ef {e}" for e in rec["ef_grid"]) + " |",
                  "|---|---|" + "---|" * len(rec["ef_grid"])]
        for name, case in rec["cases"].items():
            cells = [f"{x['recall_at_10']:.4f} ({x.get('recall_at_10_tie_tolerant', float('nan')):.3f}) / "
                     f"{x['p50_ms']:.2f} / {x['p95_ms']:.2f} ms" for x in case["by_ef"].values()]
            lines.append(f"| {name} | {case['rows_in_filter']:,} | " + " | ".join(cells) + " |")
        cold = r.get("recall_first_pass_cold")
        if cold:
            lines.append("\nA first pass without prewarming the index after each ground truth (whose 3.8 GB "
                         "memmap read evicts index pages from the page cache), p50 of the first column timed, the "
                         "default: " + "; ".join(f"{k} {c['by_ef']['default']['p50_ms']:.2f} ms"
                                                 for k, c in cold["cases"].items())
                         + " (same ef_search as ef 400, same recall: the difference is disk reads).")
        il = r.get("default_vs_ef400_interleaved")
        if il:
            lines.append("\nThe default column is timed first, with each text's first `nearest()` of the session; "
                         "interleaved call by call (" + il["script"] + "), p50: " + ", ".join(
                             f"{k} {v:.2f} ms" for k, v in il["p50_ms"].items())
                         + ": at the default ef_search a search costs what the ef 400 column shows.")
        graph = [(k, c) for k, c in rec["cases"].items() if "graph_only" in c]
        for k, c in graph:
            g2 = c["graph_only"]
            lines.append(f"\n{k}, graph alone (omop_emb.exact_scan_rows = 0): {g2['recall_at_10']:.4f} / "
                         f"p50 {g2['p50_ms']:.2f} ms.")
    return "\n".join(lines) + "\n"


def saved(out: Path = OUT) -> dict:
    """rehearsal.json with graph_memory.json merged in ({} when the rehearsal never ran)."""
    r = json.loads((out / "rehearsal.json").read_text()) if (out / "rehearsal.json").exists() else {}
    if (out / "graph_memory.json").exists():
        r["graph_memory"] = json.loads((out / "graph_memory.json").read_text()).get("graph_memory")
    return r


def baseline_1m() -> dict:
    """The measured 1M realistic runs (bench/b_realistic.py): {storage: {table, index, build_s}}."""
    out = {}
    for storage, d in (("vector", "realistic_1m"), ("halfvec", "realistic_1m_halfvec")):
        p = ROOT / "bench" / "results" / d / "realistic.json"
        if p.exists():
            r = json.loads(p.read_text())
            ix = r.get("index", {})
            out[storage] = {"vectors": r.get("vectors"), "table_bytes": ix.get("table_bytes"),
                            "index_bytes": ix.get("index_bytes"), "build_s": ix.get("build_s"),
                            "source": f"bench/results/{d}/realistic.json"}
    return out


def sizing(r: dict) -> list[str]:
    """Sizing table: 5M halfvec measured, 5M vector and 10M extrapolated (each cell says which)."""
    import math

    n = r.get("vectors", N)
    ab, b = r.get("after_build") or r.get("after_load") or {}, r.get("build") or {}
    base = baseline_1m()
    if not ab or "vector" not in base or "halfvec" not in base:
        return []
    hnsw = sum(v for k, v in ab["indexes_bytes"].items() if k.endswith("_hnsw")) or None
    sec = sum(v for k, v in ab["indexes_bytes"].items() if not k.endswith("_hnsw") and not k.endswith("pkey"))
    pkey = sum(v for k, v in ab["indexes_bytes"].items() if k.endswith("pkey"))
    bv, bh = base["vector"], base["halfvec"]
    f5 = n / bv["vectors"]
    vec_row = bv["table_bytes"] / bh["table_bytes"]  # vector's table per halfvec's, same rows (1M)
    logf = math.log(10_000_000) / math.log(n)
    per_v, per_h = graph_bytes(r, "vector"), graph_bytes(r, "halfvec")
    # create_index as a whole (CREATE INDEX + calibration), as the 1M baselines' build_s; an
    # unfinished build: the linear estimate of its CREATE INDEX
    h_build = b.get("build_s") or (extrapolate_build(b) or {}).get("estimated_total_s")

    def g(x, tag):
        return f"{x / 2**30:,.1f} GB ({tag})" if x else "-"

    def t(x, tag):
        return f"{x / 3600:,.1f} h ({tag})" if x else "-"

    m5, x5, x1 = "measured at 5M", "extrapolated from 5M", "extrapolated from 1M"
    lines = ["", f"**Sizing** (m 16, ef_construction 128; 1M baselines: {bv['source']}, {bh['source']}; graph bytes per "
             "element: phase `graphmem`). halfvec 5M is measured; vector 5M is extrapolated linearly from the measured "
             "1M vector run (its build did not fit in the session beside the halfvec one: ~1.5 h more, and its graph "
             "needs ~11 GB of maintenance_work_mem); 10M is extrapolated from 5M halfvec (sizes x 2, build x 2 x "
             f"log(10M)/log(5M) = x {2 * logf:.2f}) and for vector from 1M vector (sizes x 10).", "",
             "| | halfvec 5M | vector 5M | halfvec 10M | vector 10M |", "|---|---|---|---|---|"]
    lines.append(f"| table (`pg_table_size`) | {g(ab['table_bytes'], m5)} | {g(bv['table_bytes'] * f5, x1)} | "
                 f"{g(ab['table_bytes'] * 2, x5)} | {g(bv['table_bytes'] * 10, x1)} |")
    if not hnsw:  # the build did not finish: the halfvec index from the 1M halfvec run
        hnsw, m5i, x5i = bh["index_bytes"] * f5, x1 + "; 5M build unfinished", x1
    else:
        m5i, x5i = m5, x5
    lines.append(f"| HNSW index | {g(hnsw, m5i)} | {g(bv['index_bytes'] * f5, x1)} | {g(hnsw * 2, x5i)} | "
                 f"{g(bv['index_bytes'] * 10, x1)} |")
    lines.append(f"| secondary indexes (8) + primary key | {g(sec + pkey, m5)} | {g(sec + pkey, m5 + ', same rows')} | "
                 f"{g((sec + pkey) * 2, x5)} | {g((sec + pkey) * 2, x5)} |")
    lines.append(f"| database total{'' if r.get('after_build') else ' (without the HNSW index: build unfinished)'} | {g(ab['database_bytes'], m5)} | "
                 f"{g(ab['database_bytes'] + (bv['table_bytes'] - bh['table_bytes'] + bv['index_bytes'] - bh['index_bytes']) * f5, x1 + ' (+ the vector/halfvec difference)')} | "
                 f"{g(ab['database_bytes'] * 2, x5)} | "
                 f"{g((ab['database_bytes'] + (bv['table_bytes'] - bh['table_bytes'] + bv['index_bytes'] - bh['index_bytes']) * f5) * 2, x5 + ' + vector difference')} |")
    vb = h_build and h_build * bv["build_s"] / bh["build_s"]
    lines.append(f"| create_index (CREATE INDEX + ef_search calibration), 2 shared cores (leader + 1 worker) | {t(h_build, m5 if b.get('build_s') else 'linear estimate of the unfinished 5M build')} | "
                 f"{t(vb, '5M halfvec x the 1M vector/halfvec ratio ' + format(bv['build_s'] / bh['build_s'], '.2f'))} | "
                 f"{t(h_build and h_build * 2 * logf, x5)} | {t(vb and vb * 2 * logf, x5)} |")
    if per_v and per_h:
        lines.append(f"| maintenance_work_mem for an in-memory build (graph: {per_h:,.0f} B/element halfvec, "
                     f"{per_v:,.0f} B vector) | {g(per_h * n, 'graph; ' + str(b.get('maintenance_work_mem', '?')) + ' set')} | "
                     f"{g(per_v * n, 'graph')} | {g(per_h * 10_000_000, 'graph')} | {g(per_v * 10_000_000, 'graph')} |")
    pk = peaks(b.get("samples") or []) or b.get("peak")
    if pk:
        lines.append(f"| RAM during the build | {g(pk.get('machine_used_bytes'), 'machine peak, all users')}; "
                     f"/dev/shm {g(pk.get('dev_shm_median_during_create_index_bytes'), 'the build')} | shared_buffers + ~maintenance_work_mem | "
                     "shared_buffers + ~maintenance_work_mem | shared_buffers + ~maintenance_work_mem |")
    return lines


def phase_report(res: Results, out: Path) -> None:
    r = saved(out)
    made = plot_memory(r, out)
    (out / "rehearsal.md").write_text(markdown(r) + (f"\n![{made}]({made})\n" if made else ""))
    log(f"wrote {out / 'rehearsal.md'}")


def run(datadir: str, phases: list[str], n: int = N, n_queries: int = 100, out: Path = OUT) -> dict:
    """run_all's part ``rehearsal``: every phase, its own cluster in ``datadir``."""
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "rehearsal.json")
    work = Path(datadir).parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    db = None
    if set(phases) & {"load", "build", "measure"}:
        # (report alone writes nothing here: a build running meanwhile owns rehearsal.json)
        res.data["command"] = "python bench/b_rehearsal.py " + " ".join(sys.argv[1:])
        res.data["machine"] = {"cpu_count": os.cpu_count(), "mem_total_bytes": _meminfo()["total"],
                               "shared_with_other_work": True}
        db = database(datadir)
    try:
        if "load" in phases:
            phase_load(res, db, work, n)
        if "build" in phases:
            phase_build(res, db)
        if "measure" in phases:
            phase_measure(res, db, work, n, n_queries)
        if "graphmem" in phases:  # its own file: a build running meanwhile rewrites rehearsal.json
            phase_graphmem(Results(out / "graph_memory.json"), Path(datadir).parent)
    finally:
        if db is not None:
            res.save()
        phase_report(res, out)
    return res.data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--datadir", default=str(BASE / "data"), help="the cluster's data directory (kept)")
    ap.add_argument("--phase", default="load,build,measure",
                    help="comma-separated: load, build, measure, graphmem, report")
    ap.add_argument("--out", default=None, help=f"results folder (default {OUT}, with --storage vector "
                    f"{VECTOR_RUN['OUT']})")
    ap.add_argument("--storage", choices=("halfvec", "vector"), default="halfvec")
    a = ap.parse_args(argv)
    if a.storage == "vector":
        use_vector_storage()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(a.datadir, [p.strip() for p in a.phase.split(",")], a.n, a.queries, Path(a.out or OUT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
