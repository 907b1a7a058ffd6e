"""The shipped companion rankings (extension/omop_emb_indb/companion_weights.py) through the product:
on fit_ranking's databases (both embedded models indexed), every reporting half searched with
``nearest_batch`` in mode semantic, in mode fused with the model's shipped ranking, and in mode fused
after ``omop_emb.set_ranking(model, '{"companion": "<the other model>"}')``: Recall@1 / @10, and the
expected calibration error of ``confidence`` for the last.

    .venv/bin/python bench/ab_companion.py [--dsn SUPERUSER_DSN] [--embedder-url URL] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import fit_ranking as fr  # noqa: E402
from eval_quality import environment, log  # noqa: E402


def set_ranking(dsn: str, model: str, value: dict | None) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)", (model, None if value is None else json.dumps(value)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", help="superuser DSN of a server to use (default: own cluster)")
    ap.add_argument("--datadir", default=os.environ.get("OMOP_EMB_EVAL_DATADIR", "/tmp/omop_emb_rank"))
    ap.add_argument("--embedder-url", help="running omop-emb-pg serve --model e5,minilm")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "companion_nearest_batch.md"))
    args = ap.parse_args()
    lines = ["| model | + companion | set (reporting half) | index | n | semantic R@1 / R@10 | fused | fused + companion "
             "| ECE (all rows) | companion - semantic R@1 (points) |", "|---|---|---|---|---:|---|---|---|---:|---:|"]
    with environment(args.dsn, args.datadir, args.embedder_url) as (base, url):
        dsns = fr.setup(base, url, ["e5", "minilm"])
        for primary, companion in (("e5", "minilm"), ("minilm", "e5")):
            for s, db, reg, ix in fr.set_runs(dsns, primary):
                set_ranking(dsns[db], reg, None)
                sem = fr.search(dsns[db], reg, s.report, "semantic")
                fu = fr.search(dsns[db], reg, s.report, "fused")
                set_ranking(dsns[db], reg, {"companion": reg.replace(primary, companion)})
                try:
                    co = fr.search(dsns[db], reg, s.report, "fused")
                finally:
                    set_ranking(dsns[db], reg, None)
                lines.append(f"| {primary} | {companion} | {s.name} | {ix} | {len(s.report)} | "
                             f"{sem['recall@1']:.3f} / {sem['recall@10']:.3f} | {fu['recall@1']:.3f} / "
                             f"{fu['recall@10']:.3f} | {co['recall@1']:.3f} / {co['recall@10']:.3f} | "
                             f"{co['ece']:.3f} | {100 * (co['recall@1'] - sem['recall@1']):+.1f} |")
                log(lines[-1])
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
