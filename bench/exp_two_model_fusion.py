#!/usr/bin/env python3
"""Experiment (not a product feature yet): the fused ranking of one embedded model with the
other model's similarity as two more features.

Issue 13 asked whether searching two models at once and fusing their rankings helps. Reciprocal
rank fusion of the two models' top 50 does not (bench/eval_quality.py: it lands between the
two). This tries the learned way: the candidates stay those of the primary model's fused ranking
(``omop_emb.ranking_candidates``: its semantic top 20 concepts, exact, trigram, initials and
abbreviation finds); each candidate concept gets

* ``companion_similarity``: its best cosine similarity, over its texts in the companion model's
  index (the same texts), to the query embedded by the companion model (query role), and
* ``companion_gap``: that minus the best companion similarity among the query's candidates

(computed by the database, ``omop_emb.ranking_candidates``, while the model's ranking names the
companion: ``ranking_fit.companion_named``);

and one logistic model is fitted on the fitting halves of every labelled set
(bench/labelled.py), exactly as bench/fit_ranking.py fits the shipped one (omop_emb_pg.ranking_fit:
the same folds, the same keep-semantic rule), once with the shipped features only and once with
the two added. Reported on the reporting halves only: Recall@1 / Recall@10 of semantic search,
the fused ranking and the fused ranking with the companion. Recall is computed on the collected
candidates (rf.evaluate), so the semantic and fused figures differ slightly from `make eval`'s,
which searches through nearest_batch.

    .venv/bin/python bench/exp_two_model_fusion.py [--datadir DIR] [--embedder-url URL]

Uses fit_ranking's databases (made and indexed when missing: both models, ~10 minutes on two
cores). Writes bench/results/two_model_fusion.md.
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
from omop_emb_pg import ranking_fit as rf  # noqa: E402

PAIRS = (("e5", "minilm"), ("minilm", "e5"))
ADDED = ["companion_similarity", "companion_gap"]


def without_added(c: rf.Candidates) -> rf.Candidates:
    """The candidates without the companion features (the shipped fused ranking's inputs)."""
    keep = [i for i, f in enumerate(c.feature_names) if f not in ADDED]
    return rf.Candidates([c.feature_names[i] for i in keep], c.query, c.concept, c.exact,
                         [[f[i] for i in keep] for f in c.features], c.label, c.n_queries, c.answers)


def semantic(c: rf.Candidates) -> tuple[float, float]:
    """Recall@1 and @10 of the semantic order of the candidates (exact matches first)."""
    si = c.feature_names.index("similarity")
    best: dict[int, dict[int, tuple]] = {}
    for i, (q, cid) in enumerate(zip(c.query, c.concept)):
        key = (not c.exact[i], -c.features[i][si])
        d = best.setdefault(q, {})
        if cid not in d or key < d[cid][0]:
            d[cid] = (key, c.label[i])
    r1 = r10 = 0
    for d in best.values():
        order = [v[1] for v in sorted(d.values())]
        r1 += order[:1] == [1]
        r10 += 1 in order[:10]
    return r1 / c.n_queries, r10 / c.n_queries


WEIGHTS_FILE = ROOT / "extension" / "omop_emb_indb" / "companion_weights.py"
WEIGHTS_HEAD = '''"""Shipped rankings of a model with a companion model (written by
bench/exp_two_model_fusion.py --write; do not edit by hand).

``DEFAULTS`` maps (the model's remote_model, the companion's remote_model) to a
ranking model with the two companion features, fitted on the fitting halves of
the labelled sets (bench/labelled.py) like ranking_weights.DEFAULTS. An
administrator applies one with SELECT omop_emb.set_ranking(model, '{"companion":
"<registered companion>"}'): both models must index the same vocabulary.
"""

'''


def write_weights(fitted: dict) -> None:
    import pprint

    remote = {m: fr.MODELS[m][0] for m in fr.MODELS}
    body = {(remote[p], remote[f["companion"]]): f["fused_with_companion"] for p, f in fitted.items()}
    WEIGHTS_FILE.write_text(WEIGHTS_HEAD + "DEFAULTS = " + pprint.pformat(body, width=100, sort_dicts=False) + "\n")
    log(f"wrote {WEIGHTS_FILE.relative_to(ROOT)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", help="superuser DSN of a server to use (default: own cluster)")
    ap.add_argument("--datadir", default=os.environ.get("OMOP_EMB_EVAL_DATADIR", "/tmp/omop_emb_rank"))
    ap.add_argument("--embedder-url", help="running omop-emb-pg serve --model e5,minilm")
    ap.add_argument("--write", action="store_true",
                    help="write the fitted pairs into extension/omop_emb_indb/companion_weights.py (the "
                         "shipped rankings that omop_emb.set_ranking(model, '{\"companion\": ...}') applies)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "two_model_fusion.md"),
                    help="the table (markdown); the fitted models and every figure go beside it as .json")
    args = ap.parse_args()
    lines = ["| primary model | + companion | set (reporting half) | index | n | semantic R@1 / R@10 | fused | "
             "fused + companion | companion - semantic R@1 (points) |", "|---|---|---|---|---:|---|---|---|---:|"]
    weights, fitted, figures = {}, {}, []
    with environment(args.dsn, args.datadir, args.embedder_url) as (base, url):
        dsns = fr.setup(base, url, [m for m, _ in PAIRS])
        for primary, companion in PAIRS:
            fitting, reporting = [], []
            for s, db, reg, ix in fr.set_runs(dsns, primary):
                # the companion features are computed in the database (ranking_candidates), as
                # every search computes them once the model's ranking names the companion
                with psycopg.connect(dsns[db], autocommit=True) as conn, \
                        rf.companion_named(conn, reg, reg.replace(primary, companion)):
                    for half, out in ((s.fit, fitting), (s.report, reporting)):
                        out.append((s.name, ix, rf.collect(conn, reg, fr.pairs(half))))
                log(f"{primary} + {companion}: {s.name} [{ix}] collected")
            merged = fr.merge([c for _, _, c in fitting])
            w_fused = rf.fit(without_added(merged))
            w_both = rf.fit(merged)
            weights[primary] = dict(zip(w_both["features"], w_both["coef"]))
            fitted[primary] = {"companion": companion, "fused": w_fused, "fused_with_companion": w_both}
            for name, ix, c in reporting:
                sem = semantic(c)
                fu = rf.evaluate(without_added(c), w_fused)
                bo = rf.evaluate(c, w_both)
                lines.append(f"| {primary} | {companion} | {name} | {ix} | {c.n_queries} | {sem[0]:.3f} / {sem[1]:.3f} | "
                             f"{fu['recall@1']:.3f} / {fu['recall@10']:.3f} | {bo['recall@1']:.3f} / "
                             f"{bo['recall@10']:.3f} | {100 * (bo['recall@1'] - sem[0]):+.1f} |")
                figures.append({"model": primary, "companion": companion, "set": name, "index": ix, "n": c.n_queries,
                                "semantic": {"recall@1": sem[0], "recall@10": sem[1]},
                                "fused": {k: fu[k] for k in ("recall@1", "recall@10", "mrr", "ece")},
                                "fused_with_companion": {k: bo[k] for k in ("recall@1", "recall@10", "mrr", "ece")}})
                log(lines[-1])
    text = "\n".join(lines) + "\n\nCoefficients of the companion features (raw feature units): " + "; ".join(
        f"{m}: similarity {w['companion_similarity']:.2f}, gap {w['companion_gap']:.2f}" for m, w in weights.items()) + "\n"
    Path(args.out).write_text(text)
    if args.write:
        write_weights(fitted)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"fitted_on": "fitting halves of bench/labelled.py; figures: reporting halves",
         "models": fitted, "results": figures}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
