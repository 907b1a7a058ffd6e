"""Lexical ranking and its fusion with the vector ranking (hybrid search).

The lexical side ranks the same texts as the vector side (the ``text`` column
of ``omop_emb.embedding_<id>``: names, synonyms, mapped source names) with
PostgreSQL's full-text search, English configuration (stemmed words, stop
words dropped):

* candidates: texts sharing at least one stemmed word with the query
  (``to_tsvector('english', text) @@ omop_emb.lexical_query(query)``, an OR of
  the query's words, served by a GIN index per model);
* lexical score: the Dice overlap of the two sets of stemmed words,
  ``2 * |shared| / (|query words| + |text words|)``, in [0, 1]: 1 when the text
  has exactly the query's words in any order ("Fibrosis of lung" vs "lung
  fibrosis"), 0.5 when half of the words are shared, and so on. Ties go to the
  shorter text.

Hybrid mode fuses the two rankings of concepts (each concept ranked by its
best text) with reciprocal rank fusion: ``score = sum over rankings of
w / (RRF_K + rank)``; a concept absent from a ranking contributes nothing for
it. Filters are applied inside both rankings, before fusion, so the fused
list has k concepts whenever k concepts pass the filters.

Pure functions here (no plpy) so that plain pytest can test them.
"""

MODES = ("semantic", "lexical", "hybrid")
# Measured by bench/eval_quality.py (bench/results/quality.md): equal-weight
# RRF lowers Recall@1 against semantic alone on every labelled set (lexical is
# much weaker than e5 there), so the default stays semantic; hybrid is opt-in.
DEFAULT_MODE = "semantic"
SETTING = "omop_emb.search_mode"

# Reciprocal rank fusion constant (Cormack et al. 2009 use 60) and weights.
RRF_K = 60
SEMANTIC_WEIGHT = 1.0
LEXICAL_WEIGHT = 1.0

# How many concepts each ranking contributes to the fusion.
MIN_DEPTH = 50

TS_CONFIG = "english"


def check_mode(mode, setting=None):
    """The search mode from the argument, else the setting, else the default."""
    from .errors import InvalidArgument

    source = "mode"
    value = mode
    if value is None:
        value, source = setting, SETTING
    if value is None or (source == SETTING and not value.strip()):
        return DEFAULT_MODE
    v = value.strip().lower()
    if v not in MODES:
        raise InvalidArgument("%s = %r is not a search mode" % (source, value),
                              hint="Use 'semantic' (embeddings only), 'lexical' (words only) "
                                   "or 'hybrid' (both, fused by reciprocal rank).")
    return v


def depth(k):
    from .checks import MAX_K
    return min(MAX_K, max(k, MIN_DEPTH))


def index_statements(model_id):
    """DDL of the lexical index of a model's embedding table (idempotent)."""
    mid = int(model_id)
    return ["CREATE INDEX IF NOT EXISTS embedding_%d_fts ON omop_emb.embedding_%d "
            "USING gin (to_tsvector('%s'::regconfig, text))" % (mid, mid, TS_CONFIG)]


def search_sql(model, where, op, n_filter_params):
    """Lexical candidates, best first: ($1 query vector or NULL, $2 query text,
    $3 limit, $4... filter arrays). Returns (sql, types)."""
    from . import sqlgen

    t = sqlgen.table(model["model_id"])
    sql = (
        "WITH q AS (SELECT omop_emb.lexical_query($2) AS tsq, "
        "omop_emb.lexemes($2) AS words) "
        "SELECT %s, e.embedding %s $1 AS distance, "
        "omop_emb.lexical_score(q.words, omop_emb.lexemes(e.text)) AS lex_score "
        "FROM %s e, q WHERE q.tsq IS NOT NULL "
        "AND to_tsvector('%s'::regconfig, e.text) @@ q.tsq AND %s "
        "ORDER BY lex_score DESC, length(e.text), e.concept_id LIMIT $3"
        % (sqlgen.SELECT_COLS, op, t, TS_CONFIG, where))
    return sql, [sqlgen.vector_type(model), "text", "int4"] + ["text[]"] * n_filter_params


def best_per_concept(rows, limit):
    """Rows ordered best first -> {concept_id: row} of the first row per concept."""
    out = {}
    for r in rows:
        if len(out) >= limit:
            break
        if r["concept_id"] not in out:
            out[r["concept_id"]] = r
    return out


def rrf(rankings, weights=None, k=RRF_K):
    """Reciprocal rank fusion of rankings (lists of concept ids, best first).

    Returns [(concept_id, score)] best first; ties keep the order of the first
    ranking that holds the concept (the semantic one in hybrid mode).
    """
    weights = weights or [1.0] * len(rankings)
    score, first_seen = {}, {}
    for j, (ranking, w) in enumerate(zip(rankings, weights)):
        for rank, cid in enumerate(ranking, 1):
            score[cid] = score.get(cid, 0.0) + w / (k + rank)
            first_seen.setdefault(cid, (j, rank))
    return sorted(score.items(), key=lambda kv: (-kv[1], first_seen[kv[0]]))
