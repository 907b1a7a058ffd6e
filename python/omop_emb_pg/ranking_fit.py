"""Fit the fused ranking's model on labelled pairs (query text -> right concept).

Used by ``omop-emb-pg fit-ranking`` (an administrator's own pairs, e.g. a
reviewed SOURCE_TO_CONCEPT_MAP) and by ``bench/fit_ranking.py`` (the shipped
defaults, on the fitting halves of the labelled sets). Needs numpy and
scikit-learn (``pip install 'omop-emb-pg[bench]'``); the database does not:
it applies the fitted weights in plain Python.

1. ``omop_emb.ranking_candidates()`` gives, for every query, every candidate
   text the fused ranking scores, with its feature vector.
2. A logistic regression on those texts (label: the text's concept is a right
   answer) gives one weight per feature; a concept's score is the score of its
   best text.
3. Platt scaling of the concept score and of its margin over the runner-up,
   fitted on scores of queries the regression did not see (two folds by query),
   gives ``confidence``: the probability that a row is a right concept.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

K = 10
# A concept outside the semantic ranking's first k enters the first k rows from
# this score on (the same rule and value as omop_emb_indb.ranking.ADMIT_SCORE and
# keep_semantic in the database; a test checks that they agree).
ADMIT_SCORE = -2.0
# Platt scaling needs scores of queries the regression did not see.
FOLDS = 2


@dataclass
class Candidates:
    """Candidate texts of labelled queries, with features."""

    feature_names: list[str]
    query: list[int]        # index of the query of each candidate text
    concept: list[int]
    exact: list[bool]
    features: list[list[float]]
    label: list[int]        # 1: the text's concept is a right answer
    n_queries: int
    answers: list[frozenset[int]]


def collect(conn, model: str | None, pairs: Sequence[tuple[str, Sequence[int]]], *,
            k: int = K, batch: int = 64, domain_ids: Sequence[str] | None = None) -> Candidates:
    """Candidates of every (query, answers) pair from ``omop_emb.ranking_candidates``."""
    names: list[str] = []
    out = Candidates([], [], [], [], [], [], len(pairs), [frozenset(a) for _, a in pairs])
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        rows = conn.execute(
            "SELECT query_index, concept_id, exact_match, features, feature_names "
            "FROM omop_emb.ranking_candidates(%s::text[], %s, domain_ids => %s::text[], "
            "model => %s)", ([q for q, _ in chunk], k, domain_ids, model)).fetchall()
        for qi, cid, exact, feats, fnames in rows:
            names = list(fnames)
            i = start + qi - 1
            out.query.append(i)
            out.concept.append(cid)
            out.exact.append(bool(exact))
            out.features.append([float(x) for x in feats])
            out.label.append(1 if cid in out.answers[i] else 0)
    out.feature_names = names
    return out


@contextlib.contextmanager
def companion_named(conn, model: str | None, companion: str | None,
                    current: dict | None = None) -> Iterator[None]:
    """While the block collects candidates, ``model``'s ranking names ``companion`` (its
    weights unchanged), so that ``omop_emb.ranking_candidates`` computes the companion
    features; the ranking before (``current``: omop_emb.ranking(model), read when not
    given) is put back after. Nothing happens when ``companion`` is None."""
    if companion is None:
        yield
        return
    if current is None:
        current = conn.execute("SELECT omop_emb.ranking(%s)", (model,)).fetchone()[0]
    weights = {k: v for k, v in current.items() if k != "source"}
    stored = weights if str(current.get("source", "")).startswith("model") else None
    conn.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)",
                 (model, json.dumps({**weights, "companion": companion})))
    try:
        yield
    finally:
        conn.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)",
                     (model, None if stored is None else json.dumps(stored)))


def _logistic(X, y, c_reg: float = 1.0):
    """(coef, intercept) of a logistic regression on raw features (standardised
    for the fit, converted back so that the database applies them as they are)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X, dtype=float)
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    lr = LogisticRegression(C=c_reg, max_iter=2000)
    lr.fit((X - mean) / scale, np.asarray(y))
    coef = lr.coef_[0] / scale
    intercept = float(lr.intercept_[0] - (coef * mean).sum())
    return coef, intercept


def rankings(c: Candidates, coef, intercept, queries: set[int] | None = None, k: int = K):
    """Per query: [(concept, score, right)] in the fused order (exact matches
    first, then by the concept's best text score), top k, holding the semantic
    ranking's first k but for concepts scored >= ADMIT_SCORE (keep_semantic)."""
    import numpy as np

    scores = np.asarray(c.features, dtype=float) @ np.asarray(coef, dtype=float) + intercept
    per: dict[int, dict[int, list]] = {}
    for i, q in enumerate(c.query):
        if queries is not None and q not in queries:
            continue
        d = per.setdefault(q, {})
        s = float(scores[i])
        cur = d.get(c.concept[i])
        if cur is None:
            d[c.concept[i]] = [s, c.exact[i], c.label[i], len(d)]
        else:
            cur[0] = max(cur[0], s)
            cur[1] = cur[1] or c.exact[i]
    # The semantic ranking (exact matches first, then the concept's best similarity).
    sim_col = c.feature_names.index("similarity") if "similarity" in c.feature_names else None
    best_sim: dict[int, dict[int, float]] = {}
    if sim_col is not None:
        for i, q in enumerate(c.query):
            if q in per:
                d = best_sim.setdefault(q, {})
                d[c.concept[i]] = max(d.get(c.concept[i], -2.0), c.features[i][sim_col])
    out = {}
    for q, d in per.items():
        order = sorted(d.items(), key=lambda t: (not t[1][1], -t[1][0], t[1][3]))
        if sim_col is not None:
            sem = sorted(d, key=lambda cid: (not d[cid][1], -best_sim[q][cid]))[:k]
            must = set(sem)
            keep = [t for t in order if t[0] in must or t[1][0] >= ADMIT_SCORE][:k]
            if len(keep) < k:
                keep += [t for t in order if t not in keep][:k - len(keep)]
                keep.sort(key=lambda t: order.index(t))
            order = keep
        out[q] = [(cid, v[0], v[2]) for cid, v in order[:k]]
    return out


def margins(scores: list[float]) -> list[float]:
    """Margin of each row's score over the runner-up: the first row against the
    second, every other row against the first (the same rule as
    omop_emb_indb.ranking.Scorer.confidences)."""
    if len(scores) == 1:
        return [5.0]
    return [scores[0] - scores[1]] + [s - scores[0] for s in scores[1:]]


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def confidences(ranked: list[tuple[int, float, int]], cal: dict) -> list[float]:
    out: list[float] = []
    scores = [s for _, s, _ in ranked]
    for s, m in zip(scores, margins(scores)):
        p = _sigmoid(cal["score"] * s + cal["margin"] * m + cal["intercept"])
        out.append(min(p, out[-1]) if out else p)
    return out


def _platt(points: list[tuple[float, float, int]]) -> dict:
    """Logistic calibration on (score, margin) -> {score, margin, intercept}, both
    slopes kept >= 0 so that confidence never falls as the score rises."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.asarray([[s, m] for s, m, _ in points], dtype=float)
    y = np.asarray([r for _, _, r in points])
    keep = [0, 1]
    while True:
        lr = LogisticRegression(C=100.0, max_iter=2000)
        lr.fit(X[:, keep], y)
        w = dict(zip(keep, lr.coef_[0]))
        neg = [j for j, v in w.items() if v < 0]
        if not neg:
            break
        keep = [j for j in keep if j not in neg]
        if not keep:
            return {"score": 0.0, "margin": 0.0, "intercept": float(math.log(y.mean() / (1 - y.mean())))}
    return {"score": float(w.get(0, 0.0)), "margin": float(w.get(1, 0.0)),
            "intercept": float(lr.intercept_[0])}


def expected_calibration_error(probs: list[float], right: list[int], bins: int = 10):
    """ECE (equal-width bins) and the reliability table [(bin lo, bin hi, n, mean
    confidence, share right)]."""
    table = []
    ece = 0.0
    n = len(probs)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if (lo <= p < hi) or (b == bins - 1 and p == 1.0)]
        if not idx:
            continue
        conf = sum(probs[i] for i in idx) / len(idx)
        acc = sum(right[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(conf - acc)
        table.append((lo, hi, len(idx), conf, acc))
    return ece, table


def fit(c: Candidates, *, seed: int = 0, k: int = K, c_reg: float = 1.0,
        fitted_on: str = "") -> dict:
    """A ranking model for ``omop_emb.set_ranking`` from collected candidates."""
    if not c.features or sum(c.label) == 0:
        raise ValueError("no candidate of any query is a right answer: nothing to fit "
                         "(are the answers indexed for this model?)")
    qs = sorted(set(c.query))
    rng = random.Random(seed)
    rng.shuffle(qs)
    folds = [set(qs[i::FOLDS]) for i in range(FOLDS)]
    points = []
    for f in range(FOLDS):
        train = [i for i, q in enumerate(c.query) if q not in folds[f]]
        coef, b = _logistic([c.features[i] for i in train], [c.label[i] for i in train], c_reg)
        for ranked in rankings(c, coef, b, folds[f], k).values():
            scores = [s for _, s, _ in ranked]
            points += [(s, m, r) for (_, s, r), m in zip(ranked, margins(scores))]
    cal = _platt(points)
    coef, b = _logistic(c.features, c.label, c_reg)
    return {
        "features": list(c.feature_names), "coef": [round(float(x), 6) for x in coef],
        "intercept": round(b, 6),
        "calibration": {k_: round(v, 6) for k_, v in cal.items()},
        "fitted_on": fitted_on, "queries": c.n_queries,
        "fitted_at": _dt.date.today().isoformat(),
    }


def evaluate(c: Candidates, weights: dict, k: int = K) -> dict:
    """Recall@1, Recall@10, MRR and ECE of a ranking model on collected candidates
    (queries whose answer is not among the candidates count as misses)."""
    idx = {f: i for i, f in enumerate(c.feature_names)}
    coef = [0.0] * len(c.feature_names)
    for f, w in zip(weights["features"], weights["coef"]):
        coef[idx[f]] = w
    ranked = rankings(c, coef, weights["intercept"], None, k)
    r1 = r10 = rr = 0.0
    probs, right = [], []
    for q in range(c.n_queries):
        got = ranked.get(q, [])
        for pos, (cid, _, r) in enumerate(got, 1):
            if r:
                r1 += pos == 1
                r10 += pos <= 10
                rr += 1 / pos
                break
        probs += confidences(got, weights["calibration"])
        right += [r for _, _, r in got]
    n = c.n_queries or 1
    ece, table = expected_calibration_error(probs, right)
    return {"n": c.n_queries, "recall@1": r1 / n, "recall@10": r10 / n, "mrr": rr / n,
            "ece": ece, "reliability": table}
