"""ef_search calibrated on stored vectors (create_index) against real queries (calibrate_index).

create_index measures recall@10 on 50 queries: after a build the query cache is usually empty, so
these are the model's own stored vectors, which flatter the index (each lies in a dense part of the
graph; a query-role vector lies farther from every document). omop_emb.calibrate_index() measures
again on the most recent real queries of the cache. This benchmark shows what each choice gives on
real queries it was not chosen on:

* a cluster of bench/b_realistic.py (realistic vectors generated from e5 embeddings of real names,
  its npz cache in the work directory beside the data directory) is reused;
* the real names are split by a fixed seed into 200 CALIBRATION queries and up to 200 REPORT
  queries, disjoint;
* step 1: with an empty query cache (as after a build) calibrate_index(queries => 50) samples 50
  stored vectors, as create_index does; recall@10 and p50 of cached nearest(text, 10) on the
  report queries at the ef_search it chose;
* step 2: the calibration queries are searched (so they are the most recent real queries in the
  cache), then calibrate_index(queries => 50) and calibrate_index() (its default, 200); the report
  queries are measured again at each choice.

    .venv/bin/python bench/b_recalibrate.py --datadir /tmp/real200k/data --n 200000

Writes bench/results/recalibrate_<n>/{recalibrate.json, recalibrate.md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

import b_query  # noqa: E402
import b_realistic  # noqa: E402
from common import ROOT, Database, Proc, install_api, log  # noqa: E402

CALIBRATION = 200  # real names searched before calibrate_index (its default sample, RECALIBRATION_QUERIES)


def split(names: list[str], n_report: int, seed: int = 11) -> tuple[list[str], list[str]]:
    """Disjoint calibration and report queries (distinct real names), fixed by ``seed``."""
    uniq = sorted(set(names))
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(uniq))
    return [uniq[i] for i in pick[:CALIBRATION]], [uniq[i] for i in pick[CALIBRATION:CALIBRATION + n_report]]


def measure_default(c, model: str, texts: list[str], X: np.ndarray) -> dict:
    """Recall@10 / latency of cached nearest(text, 10) at the model's default ef_search."""
    Q = np.vstack([np.asarray(c.execute("SELECT omop_emb.embed(%s, 'query', %s)", (t, model)).fetchone()[0]
                              .to_numpy(), dtype=np.float32) for t in texts])
    truth = b_query.exact_top10(X, np.arange(len(X)), Q)
    sql = "SELECT concept_id FROM omop_emb.nearest(%(t)s, 10, model => %(m)s)"
    return b_query.by_ef_search(c, sql, [{"t": t, "m": model} for t in texts], truth, [None], X=X, Q=Q)["default"]


def run(dsn: str, data: dict, model: str, n_report: int) -> dict:
    from pgvector.psycopg import register_vector

    X = data["X"]
    calib, report = split(list(data["names"]), n_report)
    out: dict = {"vectors": len(X), "model": model, "calibration_queries": len(calib),
                 "report_queries": len(report), "report_examples": report[:3]}
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (model,)).fetchone()[0]
        # step 1: an empty query cache, as after a build: calibrate_index falls back to stored vectors
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")  # measured warm, every step alike
        c.execute(f"SELECT pg_prewarm('omop_emb.embedding_{mid}_hnsw')")
        c.execute("DELETE FROM omop_emb.query_cache WHERE model_id = %s", (mid,))
        p = c.execute("SELECT omop_emb.calibrate_index(%s, queries => 50)", (model,)).fetchone()[0]
        log(f"recalibrate: stored vectors chose ef_search {p['ef_search']}")
        c.execute("DELETE FROM omop_emb.query_cache WHERE model_id = %s", (mid,))
        out["stored"] = {"ef_search": p["ef_search"], "calibration": p["calibration"],
                         "report": measure_default(c, model, report, X)}
        # step 2: the calibration queries are the most recent real queries of the cache
        for t in calib:
            c.execute("SELECT count(*) FROM omop_emb.nearest(%s, 10, model => %s)", (t, model))
        for key, size in (("real_50", 50), ("real_200", 200)):
            p = c.execute("SELECT omop_emb.calibrate_index(%s, queries => %s)", (model, size)).fetchone()[0]
            log(f"recalibrate: {size} real queries chose ef_search {p['ef_search']}")
            out[key] = {"ef_search": p["ef_search"], "calibration": p["calibration"],
                        "report": measure_default(c, model, report, X)}
    return out


def markdown(r: dict) -> str:
    lines = [f"## ef_search calibrated on stored vectors and on real queries, {r['vectors']:,} realistic vectors "
             "(bench/b_recalibrate.py)", "",
             f"Up to {r['calibration_queries']} real query-role names calibrate, {r['report_queries']} other real "
             "names report (disjoint, fixed seed); cached nearest(text, 10), unfiltered, index prewarmed.", "",
             "| calibrated on | ef_search chosen | its recall@10 on the calibration sample | report queries: recall@10 "
             "(tie-tolerant) | p50 ms |", "|---|---:|---:|---:|---:|"]
    for key, label in (("stored", "50 stored vectors (create_index after a build)"),
                       ("real_50", "50 cached real queries (calibrate_index(queries => 50))"),
                       ("real_200", "200 cached real queries (calibrate_index(), the default)")):
        x = r[key]
        rep = x["report"]
        cal = x["calibration"]["recall_at_10_by_ef_search"][str(x["ef_search"])]
        lines.append(f"| {label} | {x['ef_search']} | {cal:.3f} | {rep['recall_at_10']:.4f} "
                     f"({rep.get('recall_at_10_tie_tolerant', float('nan')):.3f}) | {rep['p50_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datadir", required=True, help="a bench/b_realistic.py cluster's data directory")
    ap.add_argument("--n", type=int, default=1_000_000, help="its number of vectors (names its npz cache)")
    ap.add_argument("--model", default=b_realistic.MODEL)
    ap.add_argument("--queries", type=int, default=200, help="report queries")
    a = ap.parse_args(argv)
    out_dir = ROOT / "bench" / "results" / f"recalibrate_{a.n // 1000}k"
    db = Database(datadir=a.datadir)
    e5 = Proc("e5")
    try:
        data = b_realistic.prepare(e5.url, a.n, 5000, Path(a.datadir).parent / "work")
        dsn = db.create("bench_realistic", fresh=False)
        db.install(dsn)
        install_api(ROOT, dsn)  # a kept cluster keeps its version: bring its API to this checkout's
        with psycopg.connect(dsn, autocommit=True) as c:  # this run's e5 server answers the queries
            c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (a.model, e5.url))
        res = run(dsn, data, a.model, a.queries)
        res["postgres"] = db.settings()
    finally:
        e5.stop()
        db.cluster.stop()
    res["command"] = "python bench/b_recalibrate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recalibrate.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "recalibrate.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
