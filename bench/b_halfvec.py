"""Half-precision storage against vector, in one run: table and HNSW index size, build time,
recall@10 and nearest() latency, on the same synthetic vectors (bench/b_query.py's clustered
generator), plus the time of converting a vector model in place (alter_model(storage => 'halfvec')).

    python bench/b_halfvec.py --n 50000 [--dsn ...] [--out bench/results/halfvec]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import b_query  # noqa: E402
from common import Database, log, pct  # noqa: E402

DUMMY_URL = "http://127.0.0.1:9"  # never called: vectors are loaded directly, queries are vectors


def sizes(c, mid: int) -> dict:
    return {"table_bytes": c.execute(f"SELECT pg_table_size('omop_emb.embedding_{mid}')").fetchone()[0],
            "hnsw_bytes": c.execute(f"SELECT pg_relation_size('omop_emb.embedding_{mid}_hnsw')").fetchone()[0]}


def model_id(c, name: str) -> int:
    return c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (name,)).fetchone()[0]


def run(dsn: str, n: int, n_queries: int, seed: int = 7) -> dict:
    b_query.MODEL = "hv_vector"
    mid_v, load = b_query.load(dsn, DUMMY_URL, n)
    X, *_ = b_query.synth(n)
    out: dict = {"vectors": n, "dims": b_query.DIM, "load": load, "models": {}}
    with psycopg.connect(dsn, autocommit=True) as c:
        for name, storage in (("hv_half", "halfvec"), ("hv_conv", "vector")):
            c.execute("SELECT omop_emb.drop_model(%s, if_exists => true)", (name,))
            c.execute("SELECT omop_emb.register_model(%s, 'openai', %s, dimensions => %s, document_prefix => "
                      "'passage: ', query_prefix => 'query: ', storage => %s)", (name, DUMMY_URL, b_query.DIM, storage))
            mid = model_id(c, name)
            c.execute(f"INSERT INTO omop_emb.embedding_{mid} SELECT * FROM omop_emb.embedding_{mid_v}")
            c.execute(f"VACUUM ANALYZE omop_emb.embedding_{mid}")
        for name in ("hv_vector", "hv_half", "hv_conv"):
            mid = model_id(c, name)
            log(f"halfvec: create_index({name}) on {n:,} vectors")
            t0 = time.perf_counter()
            c.execute("SELECT omop_emb.create_index(%s, 'hnsw', 16, 128)", (name,))
            out["models"][name] = {"build_s": time.perf_counter() - t0, **sizes(c, mid)}
        log("halfvec: alter_model(hv_conv, storage => 'halfvec'), in place with the index rebuilt")
        t0 = time.perf_counter()
        c.execute("SELECT omop_emb.alter_model('hv_conv', storage => 'halfvec')")
        out["convert_in_place_s"] = time.perf_counter() - t0
        out["models"]["hv_conv"].update({"after_conversion": sizes(c, model_id(c, "hv_conv"))})
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        for name in ("hv_vector", "hv_half"):
            mid = model_id(c, name)
            c.execute(f"SELECT pg_prewarm('omop_emb.embedding_{mid}_hnsw')")
            c.execute(f"SELECT pg_prewarm('omop_emb.embedding_{mid}')")

    # queries: noisy copies of stored vectors; the truth: exact cosine top-10 over the float32 vectors
    rng = np.random.default_rng(seed)
    base = rng.integers(0, n, n_queries)
    Q = X[base] + b_query.QUERY_NOISE * rng.standard_normal((n_queries, b_query.DIM)).astype(np.float32) / np.sqrt(b_query.DIM)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    truth = []
    for i in range(0, n_queries, 50):
        sims = Q[i:i + 50] @ X.T
        truth.extend(np.argsort(-sims, axis=1)[:, :10] + 1)  # concept_id = row + 1
    texts = ["[" + ",".join("%.8g" % x for x in q) + "]" for q in Q]
    with psycopg.connect(dsn, autocommit=True) as c:
        for name in ("hv_vector", "hv_half"):
            sql = "SELECT concept_id FROM omop_emb.nearest(%s::vector, 10, model => %s)"
            for t in texts[:20]:
                c.execute(sql, (t, name)).fetchall()  # warm-up
            lat, rec = [], []
            for t, want in zip(texts, truth):
                t0 = time.perf_counter()
                got = [r[0] for r in c.execute(sql, (t, name)).fetchall()]
                lat.append(time.perf_counter() - t0)
                rec.append(len(set(got) & set(int(x) for x in want)) / 10)
            out["models"][name].update({"recall_at_10": float(np.mean(rec)), "p50_ms": 1e3 * pct(lat, 50),
                                        "p95_ms": 1e3 * pct(lat, 95)})
            log(f"halfvec: {name}: recall@10 {np.mean(rec):.4f}, p50 {1e3 * pct(lat, 50):.2f} ms")
    return out


def markdown(r: dict) -> str:
    v, h = r["models"]["hv_vector"], r["models"]["hv_half"]
    mb = 1024 * 1024
    rows = [("table size", f"{v['table_bytes'] / mb:.1f} MB", f"{h['table_bytes'] / mb:.1f} MB",
             h["table_bytes"] / v["table_bytes"]),
            ("HNSW index size", f"{v['hnsw_bytes'] / mb:.1f} MB", f"{h['hnsw_bytes'] / mb:.1f} MB",
             h["hnsw_bytes"] / v["hnsw_bytes"]),
            ("HNSW build (m 16, ef_construction 128)", f"{v['build_s']:.1f} s", f"{h['build_s']:.1f} s",
             h["build_s"] / v["build_s"]),
            ("recall@10 (default ef_search)", f"{v['recall_at_10']:.4f}", f"{h['recall_at_10']:.4f}",
             h["recall_at_10"] / v["recall_at_10"]),
            ("nearest(vector) p50", f"{v['p50_ms']:.2f} ms", f"{h['p50_ms']:.2f} ms", h["p50_ms"] / v["p50_ms"]),
            ("nearest(vector) p95", f"{v['p95_ms']:.2f} ms", f"{h['p95_ms']:.2f} ms", h["p95_ms"] / v["p95_ms"])]
    lines = [f"halfvec against vector, {r['vectors']:,} x {r['dims']} synthetic clustered vectors, same run:", "",
             "| | vector | halfvec | halfvec / vector |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d:.2f} |" for a, b, c, d in rows]
    lines += ["", f"Converting a vector model in place (alter_model(storage => 'halfvec'), table rewritten and HNSW "
                  f"rebuilt): {r['convert_in_place_s']:.1f} s."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dsn", default=None, help="an existing PostgreSQL (superuser) instead of a LocalCluster")
    ap.add_argument("--db-prefix", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "halfvec"))
    a = ap.parse_args(argv)
    db = Database(a.dsn, prefix=a.db_prefix)
    try:
        dsn = db.create("bench_halfvec")
        db.install(dsn)
        r = run(dsn, a.n, a.queries)
        r["command"] = "python bench/b_halfvec.py " + " ".join(argv if argv is not None else sys.argv[1:])
        r["postgres"] = db.settings()
        r["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    finally:
        db.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1, default=str))
    md = markdown(r)
    (out / "halfvec.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
