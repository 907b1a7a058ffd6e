"""Run every omop_emb benchmark and write bench/results/{results.json, benchmarks.md, *.png}.

    .venv/bin/python bench/run_all.py                     # full run (1M vectors; ~60 min on 2 cores,
                                                          # of which ~20 the realistic 1M part)
    .venv/bin/python bench/run_all.py --scale 20000       # development size
    .venv/bin/python bench/run_all.py --scale 2000 --quick --no-e5   # smoke (tests/test_bench_smoke.py)
    .venv/bin/python bench/run_all.py --only rehearsal    # opt-in: 5,000,000 halfvec texts, ~2 h

Starts its own PostgreSQL (LocalCluster in a temp dir, or --datadir to keep and reuse it, or --dsn)
and its own embedding servers (bench/instant_server.py, the deterministic test double and
`omop-emb-pg serve` for e5). Every goal is reported beside a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Database, Proc, log  # noqa: E402

PARTS = ("indexing", "e5", "query", "modes", "recall", "memory", "batch", "halfvec", "bundle", "servers",
         "realistic")
# Not in the default set: the 5,000,000-text halfvec rehearsal (bench/b_rehearsal.py) takes ~2 h on
# 2 cores and ~20 GB of disk, with its own cluster (maintenance_work_mem 8GB) and e5 server; its
# saved rows (bench/results/rehearsal_5m/) show in every report.
OPT_IN_PARTS = ("rehearsal",)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=1_000_000, help="vectors in the query/recall table")
    ap.add_argument("--index-scale", type=int, default=None, help="synthetic concepts indexed (default 100,000; "
                    "min(scale, 100000))")
    ap.add_argument("--latency-queries", type=int, default=None)
    ap.add_argument("--recall-queries", type=int, default=None)
    ap.add_argument("--memory-calls", type=int, default=None)
    ap.add_argument("--batch-terms", type=int, default=1000, help="nearest_batch source terms (e5)")
    ap.add_argument("--e5-domains", default="Condition")
    ap.add_argument("--quick", action="store_true", help="tiny sample sizes (smoke test)")
    ap.add_argument("--no-e5", action="store_true", help="skip the parts that need the real e5 server")
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ",".join(PARTS)
                    + " (default: all of these); opt-in: " + ",".join(OPT_IN_PARTS)
                    + " (the 5M halfvec rehearsal, ~2 h: --only rehearsal)")
    ap.add_argument("--rehearsal-datadir", default="/tmp/rehearsal5m/data",
                    help="part rehearsal: its own cluster's data directory (kept; ~20 GB)")
    ap.add_argument("--dsn", default=None, help="use an existing PostgreSQL (superuser) instead of a LocalCluster")
    ap.add_argument("--datadir", default=None, help="keep the LocalCluster here and reuse it across runs")
    ap.add_argument("--generator", choices=("clusters", "hierarchical"), default="clusters",
                    help="synthetic vectors: isolated clusters (default, hard) or clusters of clusters")
    ap.add_argument("--ef-construction", type=int, default=128,
                    help="HNSW ef_construction (create_index; 128 is its default)")
    ap.add_argument("--db-prefix", default="", help="prefix of the databases created (bench_index, ...)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    q = a.quick
    index_scale = a.index_scale or min(a.scale, 100_000)
    lat_n = a.latency_queries or (50 if q else 1000)
    rec_n = a.recall_queries or (20 if q else 200)
    mem_n = a.memory_calls or (200 if q else 10_000)
    parts = [p.strip() for p in a.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS) - set(OPT_IN_PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS + OPT_IN_PARTS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    res_path = out / "results.json"
    results: dict = {}
    if res_path.exists() and set(parts) != set(PARTS):
        results = json.loads(res_path.read_text())  # partial re-run: keep the other parts
    meta = {"command": "python bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "scale": a.scale, "index_scale": index_scale, "quick": q,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}
    if results.get("meta"):
        results["meta"].setdefault("partial_runs", []).append({**meta, "parts": parts})
    else:
        results["meta"] = meta
    db = Database(a.dsn, a.datadir, prefix=a.db_prefix)
    servers = []
    try:
        results["meta"].setdefault("postgres", db.settings())
        inst = Proc("instant")
        servers.append(inst)

        def save():
            res_path.write_text(json.dumps(results, indent=1, default=str))

        if {"query", "modes", "recall", "memory"} & set(parts):
            import b_profile
            import b_query

            b_query.GENERATOR = a.generator

            dsn = db.create("bench_query", fresh=False)
            db.install(dsn)
            mid, load_info = b_query.load(dsn, inst.url, a.scale)
            results.setdefault("scale", {})
            results["scale"].update({"vectors": a.scale, "dims": b_query.DIM, "load": load_info,
                                     "generator": {"kind": a.generator, "cluster_size_mean": 20, "spread": b_query.SPREAD,
                                                   "query_noise": b_query.QUERY_NOISE}})
            prev = results["scale"].get("index") or {}
            info = b_query.build_index(dsn, mid, ef_construction=a.ef_construction)
            if info.get("reused") and "build_s" in prev:
                info = {**prev, "reused_in_partial_run": True}  # keep the measured build
            results["scale"]["index"] = info
            save()
            if "query" in parts:
                log(f"query: latency, {lat_n} queries per case")
                results["latency"] = b_query.latency(dsn, mid, inst.url, lat_n)
                log("query: profile of nearest() inside the backend")
                results["latency"]["profile"] = b_profile.profile_nearest(dsn, b_query.MODEL, mid,
                                                                          reps=30 if q else 200)
                save()
            if "modes" in parts:
                log("query: latency by search mode")
                results.setdefault("latency", {})["modes"] = b_query.modes(dsn, 5 if q else 40)
                save()
            if "recall" in parts:
                log(f"recall: {rec_n} queries per case and ef_search")
                results["recall"] = b_query.recall(dsn, mid, a.scale, rec_n)
                save()
            if "memory" in parts:
                log(f"memory: {mem_n} nearest() calls in one session")
                results["memory"] = b_query.memory(dsn, mem_n)
                save()
        if "indexing" in parts:
            import b_indexing

            det = Proc("deterministic")
            servers.append(det)
            results["indexing"] = b_indexing.bench_instant(db, inst.url, index_scale, q, det_url=det.url)
            det.stop()
            save()
        if "halfvec" in parts:
            import b_halfvec

            dsn = db.create("bench_halfvec")
            db.install(dsn)
            results["halfvec"] = b_halfvec.run(dsn, index_scale, 50 if q else 200)
            results["halfvec"]["markdown"] = b_halfvec.markdown(results["halfvec"])
            save()
        if "bundle" in parts:
            import b_bundle

            results["bundle"] = b_bundle.run(db, index_scale)
            results["bundle"]["markdown"] = b_bundle.markdown(results["bundle"])
            save()
        if "servers" in parts and not a.no_e5:
            import b_servers

            results["servers"] = b_servers.run(db, a.e5_domains.split(","))
            results["servers"]["markdown"] = b_servers.markdown(results["servers"])
            save()
        e5 = None
        if not a.no_e5 and ({"e5", "batch", "realistic"} & set(parts)):
            e5 = Proc("e5")
            servers.append(e5)
        if e5 and "e5" in parts:
            import b_indexing

            results["e5_indexing"] = b_indexing.bench_e5(db, e5.url, a.e5_domains.split(","), q)
            save()
        if e5 and "realistic" in parts:
            import b_realistic

            # the same scale as the uniform query/recall table, from real e5 embeddings
            results["realistic"] = b_realistic.run(db, e5.url, a.scale, rec_n, 500 if q else 5000,
                                                   ef_construction=a.ef_construction, datadir=a.datadir,
                                                   renice=False)
            results["realistic"]["markdown"] = b_realistic.markdown(results["realistic"], results.get("recall"))
            save()
            import ab_companion_1m

            # the demo's default ranking (fused with a companion model) against semantic, same database
            results["realistic_companion"] = ab_companion_1m.measure(
                db.dsn(db.name("bench_realistic")), b_realistic.MODEL, e5.url, 40 if q else 200, rounds=1 if q else 2)
            save()
        if e5 and "batch" in parts:
            import b_query
            import psycopg

            dsn = db.dsn(db.name("bench_e5"))
            if "e5_indexing" not in results:
                import b_indexing

                results["e5_indexing"] = b_indexing.bench_e5(db, e5.url, a.e5_domains.split(","), q)
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT omop_emb.alter_model('e5', endpoint => %s)", (e5.url,))
            results["batch"] = b_query.batch_mapping(dsn, e5.url, 100 if q else a.batch_terms)
            save()
        if e5:
            e5.stop()
        if "rehearsal" in parts:
            import b_rehearsal

            # its own cluster, e5 server and results directory (rehearsal_5m/); report.py reads them
            b_rehearsal.run(a.rehearsal_datadir, ["load", "build", "measure", "graphmem"],
                            out=out / "rehearsal_5m")
            results["rehearsal"] = {"saved_in": "rehearsal_5m/rehearsal.json"}
            save()
    except Exception:
        results.setdefault("errors", []).append(traceback.format_exc())
        traceback.print_exc()
    finally:
        for s in servers:
            s.stop()
        db.close()
    (results["meta"]["partial_runs"][-1] if results["meta"].get("partial_runs") else results["meta"])[
        "finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res_path.write_text(json.dumps(results, indent=1, default=str))
    import report

    report.write(results, out)
    log(f"wrote {res_path}, {out / 'benchmarks.md'} and plots")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
