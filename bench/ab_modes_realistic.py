"""Fused against semantic search of several source trees, on one kept realistic cluster.

Each round installs a tree's API (functions and in-database Python: the re-runnable part of
sql/api, pgai-style, so the tables and indexes stay) into the database of a bench/b_realistic.py
cluster, then times cached ``nearest(text, 10)`` in modes semantic and fused, interleaved query by
query, on the model's cached real query names (the names b_realistic measured recall with). The
trees alternate (A B A B ...), so the machine's load hits both alike.

    git archive main | tar -x -C /tmp/before
    .venv/bin/python bench/ab_modes_realistic.py --dsn 'host=... dbname=bench_realistic' \\
        --model real1m before=/tmp/before after=. [--rounds 2] [--out bench/results/modes_realistic_200k]

The texts of a realistic cluster are '<real name> #<row>': every real name is repeated
(n / 3,095 times), so the lexical sources see realistic words, with each name's words in many
texts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import b_query  # noqa: E402
from common import install_api, log, summary_ms  # noqa: E402

MODES = ("semantic", "fused")


def measure(dsn: str, model: str, n_queries: int) -> dict:
    """p50/p95/p99 of both modes over the cached query names (b_query.interleaved: two
    rounds, modes interleaved query by query), after one such untimed pass."""
    with psycopg.connect(dsn, autocommit=True) as c:
        texts = [r[0].removeprefix("query: ") for r in c.execute(
            "SELECT q.text FROM omop_emb.query_cache q JOIN omop_emb.model m USING (model_id) "
            "WHERE m.name = %s AND q.role = 'query' ORDER BY q.created_at LIMIT %s", (model, n_queries))]
        b_query.interleaved(c, model, texts, MODES)  # warm: plans, pages, each text's first call
        lat = b_query.interleaved(c, model, texts, MODES)
    out: dict = {"queries": len(texts)}
    for mode, v in lat.items():
        out[mode] = summary_ms(v)
    out["fused_over_semantic_p50"] = round(out["fused"]["p50_ms"] / out["semantic"]["p50_ms"], 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", required=True, help="superuser DSN of the realistic benchmark database")
    ap.add_argument("--model", default="real1m")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of A B ... (each tree once a round)")
    ap.add_argument("--out", default=None, help="folder for ab_modes.json")
    ap.add_argument("trees", nargs="+", help="label=path of a source tree")
    a = ap.parse_args(argv)
    trees = [t.split("=", 1) for t in a.trees]
    runs = []
    for rnd in range(a.rounds):
        for label, root in trees:
            install_api(root, a.dsn)
            r = measure(a.dsn, a.model, a.queries)
            r.update(tree=label, round=rnd + 1)
            runs.append(r)
            sem, fus = r["semantic"], r["fused"]
            log(f"{label} round {rnd + 1}: semantic p50 {sem['p50_ms']:.2f} ms, fused p50 {fus['p50_ms']:.2f} / "
                f"p95 {fus['p95_ms']:.2f} / p99 {fus['p99_ms']:.2f} ms, ratio {r['fused_over_semantic_p50']}")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ab_modes.json").write_text(json.dumps(
            {"command": "python bench/ab_modes_realistic.py " + " ".join(argv or sys.argv[1:]), "runs": runs},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
