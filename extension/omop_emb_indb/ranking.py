"""The fused ranking (``mode => 'fused'``) and its calibrated confidence.

Candidates (each source filtered like the search itself, so k rows come back
whenever k concepts pass the filters): exact matches, the HNSW ranking, the
character-trigram ranking (pg_trgm, GIN index), texts whose word initials equal
an abbreviation-like query ("T2DM" -> "Type 2 diabetes mellitus", btree index
on ``omop_emb.initials(text)``) and texts holding an abbreviation-like query
token as a word ("COPD" -> a synonym "COPD - chronic obstructive pulmonary
disease", full-text index).

Every candidate text gets the features of ``FEATURES``; a logistic model (one
weight per feature and an intercept, fitted offline on labelled pairs:
bench/fit_ranking.py, ``omop-emb-pg fit-ranking``) scores it, a concept takes
the score of its best text, and concepts are ordered by score (exact matches
first, as in every mode). The first k rows always hold the first k concepts of
the semantic ranking (reordered), except that a concept from outside them
whose score reaches ``ADMIT_SCORE`` takes the place of the lowest-scored one
(``keep_semantic``): the fused ranking reorders what semantic search finds and
adds only confident lexical finds, so its Recall@k stays that of semantic
search (it never lost Recall@10 on the labelled sets' fitting halves). ``confidence`` is Platt scaling of the score and of
its margin over the runner-up (fitted on queries the logistic model did not
see): the estimated probability that the row is the right concept.

Pure functions here (no plpy), unit-testable with plain pytest.
"""

import json
import math
import operator
import re

from .errors import InvalidArgument

FEATURES = (
    "similarity",        # cosine similarity of query and text
    "similarity_gap",    # similarity - the best similarity among the candidates (<= 0)
    "trigram",           # pg_trgm similarity() of query and text
    "trigram_gap",       # trigram - the best trigram similarity among the candidates
    "word_dice",         # Dice overlap of words (stop words dropped, cut to 6 letters)
    "query_coverage",    # share of the query's words found in the text
    "initialism",        # an abbreviation-like query equals the initials of the text's words
    "abbreviation_in_text",  # an abbreviation-like query token is a word of the text
    "exact",             # the text (or its code) equals the query, folded (omop_emb.fold_text)
    "kind_synonym",      # the text is an English synonym
    "kind_mapped",       # the text is the name of a source concept that 'Maps to' it
    "length_ratio",      # |log((chars of text + 1) / (chars of query + 1))|
    "classification",    # the concept is a classification concept ('C'), not standard ('S')
    "concept_similarity_gap",  # the best similarity of the text's concept (over all its
                               # candidate texts) - the best similarity overall (<= 0)
    # With a companion model (the weights name one, "companion"): the concept's best
    # similarity to the query by that other model, over the concept's texts in its
    # index, and that minus the best among the candidates (<= 0); 0 without one.
    "companion_similarity",
    "companion_gap",
)

# Words that carry no meaning of their own in concept names. Must agree with
# omop_emb.initials() (sql/api/56_ranking.sql).
STOP_WORDS = frozenset(("of", "the", "and", "or", "in", "on", "to", "with", "by", "for", "a",
                        "an", "at", "as", "due", "nos"))
WORD_RE = re.compile(r"[a-z0-9]+")
# Word prefix compared by word_dice: a crude stemmer (diabetes ~ diabetic).
STEM_CHARS = 6
# An abbreviation-like token: 2..8 letters/digits, all capitals in the query
# (COPD, T2DM, HbA1c is not) or the whole query when it is one short token (copd).
ABBREV_MAX = 8
SHORT_QUERY_MAX = 5

# How many concepts each candidate source contributes (besides exact matches).
# The semantic source: 20 concepts (the first k stay, keep_semantic; concepts
# ranked 11..50 by cosine added nothing on the fitting halves and cost a third
# of the time), read from a window of 40 texts (widened when synonyms crowd it).
SEMANTIC_DEPTH = 20
TRIGRAM_DEPTH = 30
INITIALS_DEPTH = 30
ABBREVIATION_DEPTH = 30
SEMANTIC_FETCH = 40
# keep_semantic holds the semantic ranking's first min(k, KEPT_ROWS) concepts in the
# first min(k, KEPT_ROWS) rows; rows after those follow the score. So the first 10
# rows are the same whatever k >= 10 is asked for (Recall@10 of a k = 50 search is
# that of a k = 10 search).
KEPT_ROWS = 10
# The score (log-odds) from which a concept outside the semantic ranking's first
# k may displace one of them from the first k rows (keep_semantic). Chosen by
# two-fold cross-validation on the fitting halves (-3..0 tried).
ADMIT_SCORE = -2.0
# pg_trgm's similarity threshold for the % operator that finds trigram candidates.
# The GIN index must merge the posting lists of all but the rarest
# (1 - threshold) share of the query's trigrams, so the lookup's cost falls
# steeply as the threshold rises: at 200k texts 0.8 takes about a seventh of the
# time of 0.6 (which took a third of 0.4's), and the reporting halves' figures
# did not change (the texts it still finds are near-verbatim: word order,
# plurals, a stop word; misspellings are found by the semantic source).
TRIGRAM_THRESHOLD = 0.8


def words(text):
    return [w for w in WORD_RE.findall((text or "").lower()) if w not in STOP_WORDS]


def initials(text):
    """First characters of the words of a text, stop words dropped:
    'Type 2 diabetes mellitus' -> 't2dm'. Must agree with omop_emb.initials()."""
    return "".join(w[0] for w in words(text))


def abbreviations(query):
    """Abbreviation-like tokens of a query, lower-cased (see ABBREV_MAX)."""
    q = (query or "").strip()
    toks = re.findall(r"[A-Za-z0-9]+", q)
    out = [t.lower() for t in toks
           if 2 <= len(t) <= ABBREV_MAX and t.upper() == t and any(c.isalpha() for c in t)]
    if len(toks) == 1 and 2 <= len(toks[0]) <= SHORT_QUERY_MAX and \
            any(c.isalpha() for c in toks[0]):
        out.append(toks[0].lower())
    # 'T2DM', 'C.O.P.D.' and 'type 2 dm' written without spaces
    joined = "".join(t.lower() for t in toks)
    if 2 <= len(joined) <= ABBREV_MAX and len(toks) > 1 and all(len(t) <= 2 for t in toks):
        out.append(joined)
    return list(dict.fromkeys(out))


class Query:
    """What the features need to know about a query, computed once."""

    def __init__(self, text):
        self.text = text
        self.words = words(text)
        self.stems = {w[:STEM_CHARS] for w in self.words}
        self.abbrevs = set(abbreviations(text))
        self.length = len(text.strip())


def concept_similarities(rows):
    """{concept_id: its best similarity over the candidate text rows}."""
    out = {}
    for r in rows:
        s = r["similarity"] if r["similarity"] is not None else 0.0
        if s > out.get(r["concept_id"], -2.0):
            out[r["concept_id"]] = s
    return out


def text_features(q, row, best_similarity, best_trigram, concept_similarity=None,
                  companion=None):
    """The feature vector (in FEATURES order) of one candidate text ``row``
    (concept_name, text, text_kind, standard_concept, similarity, trigram, and
    exact: whether the exact-match lookup found it); ``concept_similarity``:
    the best similarity of its concept (concept_similarities); ``companion``:
    (the companion model's similarity of its concept, the best among the
    candidates), or None without a companion model."""
    text = row["text"]
    ws = [w for w in WORD_RE.findall(text.lower()) if w not in STOP_WORDS] if text else []
    stems = {w[:STEM_CHARS] for w in ws}
    q_stems = q.stems
    shared = len(q_stems & stems)
    n = len(q_stems) + len(stems)
    sim = row["similarity"] if row["similarity"] is not None else 0.0
    trg = row["trigram"] or 0.0
    kind = row["text_kind"]
    # The abbreviation features are 0 unless the query has an abbreviation-like
    # token (most queries have none): their word work is skipped then.
    abbrevs = q.abbrevs
    multi_word = abbrevs and len(ws) >= 2
    return [
        sim,
        sim - best_similarity,
        trg,
        trg - best_trigram,
        (2.0 * shared / n) if n else 0.0,
        (shared / len(q_stems)) if q_stems else 0.0,
        1.0 if multi_word and "".join(w[0] for w in ws) in abbrevs else 0.0,
        1.0 if multi_word and abbrevs.intersection(ws) else 0.0,
        1.0 if row.get("exact") else 0.0,
        1.0 if kind == "synonym" else 0.0,
        1.0 if kind == "mapped" else 0.0,
        abs(math.log((len(text) + 1.0) / (q.length + 1.0))),
        1.0 if row["standard_concept"] == "C" else 0.0,
        (sim if concept_similarity is None else concept_similarity) - best_similarity,
        companion[0] if companion else 0.0,
        (companion[0] - companion[1]) if companion else 0.0,
    ]


def companion_pairs(similarities):
    """{concept_id: (its companion similarity, the best)} from {concept_id: similarity}."""
    if not similarities:
        return {}
    best = max(similarities.values())
    return {cid: (s, best) for cid, s in similarities.items()}


def companion_of(pairs, concept_id):
    """The ``companion`` argument of text_features for one concept (pairs: companion_pairs)."""
    if not pairs:
        return None
    hit = pairs.get(concept_id)
    if hit is None:
        # A concept the companion's index lacks: similarity 0, as in the fit
        # (bench/exp_two_model_fusion.py), far below any indexed candidate's.
        return (0.0, next(iter(pairs.values()))[1])
    return hit


def check_weights(w):
    """Validate a ranking model (a dict, or its JSON); returns it as a dict."""
    if isinstance(w, str):
        try:
            w = json.loads(w)
        except ValueError as e:
            raise InvalidArgument("ranking weights are not JSON: %s" % e)
    hint = ('Give {"features": [...], "coef": [...], "intercept": x, "calibration": '
            '{"score": a, "margin": b, "intercept": c}} with feature names from: '
            + ", ".join(FEATURES) + " (omop-emb-pg fit-ranking writes it).")
    if not isinstance(w, dict):
        raise InvalidArgument("ranking weights must be a JSON object", hint=hint)
    feats, coef = w.get("features"), w.get("coef")
    if not isinstance(feats, list) or not isinstance(coef, list) or len(feats) != len(coef) \
            or not feats:
        raise InvalidArgument("ranking weights need lists 'features' and 'coef' of equal length",
                              hint=hint)
    unknown = [f for f in feats if f not in FEATURES]
    if unknown:
        raise InvalidArgument("unknown ranking features %s" % unknown, hint=hint)
    companion = w.get("companion")
    if companion is not None and (not isinstance(companion, str) or not companion.strip()):
        raise InvalidArgument("ranking weights: 'companion' must be the name of a registered model",
                              hint=hint)
    uses = [f for f, c in zip(feats, coef) if f.startswith("companion_") and c]
    if uses and companion is None:
        raise InvalidArgument("ranking weights use %s but name no companion model" % uses,
                              hint='Add "companion": "<registered model>" (the model whose '
                                   'similarities these features are).')
    cal = w.get("calibration")
    if not isinstance(cal, dict):
        raise InvalidArgument("ranking weights lack 'calibration'", hint=hint)
    nums = list(coef) + [w.get("intercept"), cal.get("score"), cal.get("margin"),
                         cal.get("intercept")]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
               for x in nums):
        raise InvalidArgument("ranking weights hold a value that is not a finite number",
                              hint=hint)
    if cal["score"] < 0 or cal["margin"] < 0:
        raise InvalidArgument("calibration 'score' and 'margin' must be >= 0 (confidence must "
                              "not fall as the score rises)", hint=hint)
    return w


class Scorer:
    """A ranking model: feature weights and the confidence calibration."""

    def __init__(self, weights):
        w = check_weights(weights)
        self.weights = w
        idx = {f: i for i, f in enumerate(FEATURES)}
        self.terms = [(idx[f], float(c)) for f, c in zip(w["features"], w["coef"])]
        self._coefs = [c for _, c in self.terms]
        self._index = [i for i, _ in self.terms]
        self.intercept = float(w["intercept"])
        # the model whose similarity the companion features are (None: no such features)
        self.companion = w.get("companion")
        cal = w["calibration"]
        self.cal = (float(cal["score"]), float(cal["margin"]), float(cal["intercept"]))

    def score(self, x):
        # The terms summed in the order of self.terms (the same float as a loop).
        return self.intercept + sum(map(operator.mul, self._coefs, map(x.__getitem__, self._index)))

    def confidences(self, scores):
        """Confidence of each row of a ranking (scores in rank order), never above
        the confidence of the row ranked before it."""
        a, b, c = self.cal
        out = []
        for i, s in enumerate(scores):
            if len(scores) == 1:
                margin = 0.0 if i else 5.0
            elif i == 0:
                margin = s - scores[1]
            else:
                margin = s - scores[0]
            p = sigmoid(a * s + b * margin + c)
            out.append(min(p, out[-1]) if out else p)
        return out


def sigmoid(z):
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def rank(q, rows, scorer, companion=None):
    """Score candidate text rows; returns [(concept_id, score, best row, features)],
    best first (ties: the order rows were given in). ``companion``: companion_pairs
    of the candidates' concepts, when the scorer has a companion model."""
    if not rows:
        return []
    best_sim = max((r["similarity"] for r in rows if r["similarity"] is not None),
                   default=0.0)
    best_trg = max((r["trigram"] or 0.0 for r in rows), default=0.0)
    csim = concept_similarities(rows)
    best = {}
    order = []
    for r in rows:
        x = text_features(q, r, best_sim, best_trg, csim[r["concept_id"]],
                          companion_of(companion, r["concept_id"]))
        s = scorer.score(x)
        cid = r["concept_id"]
        if cid not in best:
            order.append(cid)
            best[cid] = (s, r, x)
        elif s > best[cid][0]:
            best[cid] = (s, r, x)
    pos = {cid: i for i, cid in enumerate(order)}
    ranked = sorted(order, key=lambda cid: (-best[cid][0], pos[cid]))
    return [(cid, best[cid][0], best[cid][1], best[cid][2]) for cid in ranked]


def keep_semantic(ranked, semantic_ids, k, admit_score=ADMIT_SCORE):
    """The first k of ``ranked`` (rank()'s output, in score order) that hold the
    first k concepts of ``semantic_ids`` (the semantic ranking, exact matches
    first), except where a concept outside them scores >= ``admit_score``: it
    displaces the lowest-scored of them. Rows stay in score order (so the
    confidence still never rises down the ranking)."""
    must = set(semantic_ids[:k])
    picked = [i for i, t in enumerate(ranked) if t[0] in must or t[1] >= admit_score][:k]
    if len(picked) < k:  # fewer than k semantic concepts: the best of the rest
        taken = set(picked)
        picked += [i for i in range(len(ranked)) if i not in taken][:k - len(picked)]
    return [ranked[i] for i in sorted(picked)]


def fused_rows(ranked, semantic_ids, k):
    """The k rows of the fused ranking: keep_semantic over the first
    min(k, KEPT_ROWS) rows, then the best-scored of the rest."""
    head = keep_semantic(ranked, semantic_ids, min(k, KEPT_ROWS))
    taken = {t[0] for t in head}
    return head + [t for t in ranked if t[0] not in taken][:k - len(head)]
