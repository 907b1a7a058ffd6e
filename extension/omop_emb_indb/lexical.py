"""Lexical ranking and its fusion with the vector ranking (hybrid search).

The lexical side ranks the same texts as the vector side (the ``text`` column
of ``omop_emb.embedding_<id>``: names, synonyms, mapped source names) with
PostgreSQL's full-text search, English configuration (stemmed words, stop
words dropped):

* candidates: texts sharing at least one stemmed word with the query
  (``to_tsvector('english', text) @@`` an OR of the query's words, served by a
  GIN index per model). Words the index statistics count in more than
  COMMON_WORD_ROWS texts only find texts together (all of them, capped): see
  below;
* lexical score: the Dice overlap of the two sets of stemmed words,
  ``2 * |shared| / (|query words| + |text words|)``, in [0, 1]: 1 when the text
  has exactly the query's words in any order ("Fibrosis of lung" vs "lung
  fibrosis"), 0.5 when half of the words are shared, and so on. Ties go to the
  shorter text.

Hybrid mode fuses the two by score, not by rank. Candidates: the union of the
concepts of both rankings (each ranking filtered before fusion, so the union
holds k concepts whenever k concepts pass the filters). Each candidate gets the
similarity of its nearest text (computed for lexical-only candidates too) and
its best lexical score over its texts, and

    score = similarity + LEXICAL_WEIGHT * lexical score

LEXICAL_WEIGHT is small on purpose: e5 similarities of plausible concepts are
compressed into ~0.80-0.92 and the gap between the first and the second is
often below 0.01, so the lexical score only decides between concepts the
embedding finds nearly equally close ("Fibrosis of lung" vs "Pulmonary
fibrosis" for "lung fibrosis"); it never lifts a concept that is clearly
further away. Reciprocal rank fusion, the first design, discarded how close
the similarities are and lowered Recall@1 on every labelled set (see
bench/results/quality.md and bench/fusion_sweep.py for the variants measured).

Pure functions here (no plpy) so that plain pytest can test them.
"""

MODES = ("semantic", "lexical", "hybrid", "fused")
# Semantic by default: hybrid gains +0.005 Recall@1 on two sets (bench/results/quality.md)
# for the cost of a full-text search beside the vector search.
DEFAULT_MODE = "semantic"
SETTING = "omop_emb.search_mode"

# hybrid score = similarity + LEXICAL_WEIGHT * lexical score. Chosen with
# bench/fusion_sweep.py on the GiBleed synonym set (the smallest weight on its
# Recall@1 plateau: 0.833 for 0.005..0.015, 0.828 semantic alone) and checked
# on the other sets: 0.01 already costs a lay term its place in the top 10,
# 0.02 costs lay-term Recall@1.
LEXICAL_WEIGHT = 0.005

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
                              hint="Use 'fused' (embedding, trigram, word and abbreviation "
                                   "signals fused by a fitted model, with a confidence), "
                                   "'semantic' (embeddings only), 'lexical' (words only) or "
                                   "'hybrid' (similarity plus a small weight times the lexical "
                                   "score).")
    return v


def depth(k):
    from .checks import MAX_K
    return min(MAX_K, max(k, MIN_DEPTH))


def tsvector(column):
    """The full-text expression of a text column: the GIN index is built on it and
    searches must write it exactly so (the planner matches expressions verbatim).
    The SQL function omop_emb.lexemes() gets TS_CONFIG from here at build time."""
    return "to_tsvector('%s'::regconfig, %s)" % (TS_CONFIG, column)


def index_statement(model_id):
    """DDL of the full-text index of a model's embedding table."""
    mid = int(model_id)
    return "CREATE INDEX embedding_%d_fts ON omop_emb.embedding_%d USING gin (%s)" % (
        mid, mid, tsvector("text"))


# Words in more texts than this (planner statistics of the GIN index) are
# "common". Scoring every text that shares a common word is what made lexical
# and hybrid search slow at scale ("disorder", "oral", "tablet" are in hundreds
# of thousands of OMOP names), so common words only find texts together: the
# texts holding all of the query's common words, at most COMMON_WORD_CAP of them.
# Texts sharing any rarer word are all scored. Below COMMON_WORD_ROWS texts per
# word nothing changes: every text sharing a word is scored.
COMMON_WORD_ROWS = 2000
COMMON_WORD_CAP = 2000

WORD_STATS_SQL = (
    "SELECT s.most_common_elems::text::text[] AS words, s.most_common_elem_freqs AS freqs, "
    "c.reltuples FROM pg_catalog.pg_stats s, pg_catalog.pg_class c "
    "WHERE s.schemaname = 'omop_emb' AND s.tablename = $1 AND s.attname = 'to_tsvector' "
    "AND c.oid = $2::regclass")


def word_rows(stats_row):
    """{lexeme: estimated texts holding it} from a WORD_STATS_SQL row (ANALYZE's most
    common elements of the full-text index; words not listed are rarer than all listed)."""
    if not stats_row or not stats_row["words"] or not stats_row["freqs"]:
        return {}
    n = max(float(stats_row["reltuples"] or 0), 0.0)
    return {w: f * n for w, f in zip(stats_row["words"], stats_row["freqs"])}


def tsquery_literal(words, op):
    """words joined by op ('|' or '&') as tsquery text; each word quoted as a lexeme
    (already stemmed: the cast to tsquery does not stem again). None when empty."""
    if not words:
        return None
    return (" %s " % op).join("'%s'" % w.replace("\\", "\\\\").replace("'", "''") for w in words)


def unlisted_words(words, rows_by_word):
    """The query's lexemes the statistics do not list: rare or not in the vocabulary
    at all (a misspelling, a fragment); with no statistics yet, every word."""
    return [w for w in dict.fromkeys(words or ()) if w not in rows_by_word]


def unknown_words_sql(model):
    """How many of $1 (single lexemes as tsquery literals, tsquery_literal) no text of
    the model holds: one GIN probe each, cheap for the rare words it is given."""
    from . import sqlgen

    return ("SELECT pg_catalog.count(*)::int4 AS unknown "
            "FROM pg_catalog.unnest($1::pg_catalog.tsquery[]) AS w(q) WHERE NOT EXISTS "
            "(SELECT 1 FROM %s e WHERE %s OPERATOR(pg_catalog.@@) w.q)"
            % (sqlgen.table(model["model_id"]), tsvector("e.text")))


def rare_tokens(tokens_words, rows_by_word, threshold=COMMON_WORD_ROWS):
    """Of (token, its lexemes) pairs, the tokens every lexeme of which is in at most
    ``threshold`` texts; a token with no lexeme (a stop word: 'OR', 'AS') is dropped."""
    return [t for t, words in tokens_words
            if words and all(rows_by_word.get(w, 0) <= threshold for w in words)]


def split_words(words, rows_by_word, threshold=COMMON_WORD_ROWS):
    """(rare-word OR query, common-word AND query) for the lexical candidates."""
    rare = [w for w in words if rows_by_word.get(w, 0) <= threshold]
    common = [w for w in words if rows_by_word.get(w, 0) > threshold]
    return tsquery_literal(rare, "|"), tsquery_literal(common, "&")


def search_sql(model, where, op, n_filter_params):
    """Lexical candidates, best first: ($1 query vector, $2 the query's lexemes, $3 limit,
    $4 rare-word OR tsquery or NULL, $5 common-word AND tsquery or NULL, $6 cap of
    the common-word part, $7... filter arrays). Returns (sql, types).
    The distance is computed for the returned rows only."""
    from . import sqlgen

    t = sqlgen.table(model["model_id"])
    tsv = tsvector("e.text")
    part = ("SELECT %s, e.embedding, "
            "omop_emb.lexical_score(q.words, omop_emb.lexemes(e.text)) AS lex_score "
            "FROM %s e, q WHERE %%s AND %s" % (sqlgen.SELECT_COLS, t, where))
    rare = part % ("%s @@ $4::tsquery" % tsv)
    common = part % ("%s @@ $5::tsquery AND NOT coalesce(%s @@ $4::tsquery, false)" % (tsv, tsv))
    cols = sqlgen.SELECT_COLS.replace("e.", "s.")
    sql = ("WITH q AS (SELECT $2::text[] AS words) "
           "SELECT %s, s.embedding %s $1 AS distance, s.lex_score FROM ("
           "SELECT * FROM ((%s) UNION ALL (%s LIMIT $6)) u "
           "ORDER BY lex_score DESC, length(text), concept_id LIMIT $3) s"
           % (cols, op, rare, common))
    types = [sqlgen.vector_type(model), "text[]", "int4", "text", "text", "int4"]
    return sql, types + ["text[]"] * n_filter_params


def best_per_concept(rows, limit):
    """Rows ordered best first -> {concept_id: row} of the first row per concept."""
    out = {}
    for r in rows:
        if len(out) >= limit:
            break
        if r["concept_id"] not in out:
            out[r["concept_id"]] = r
    return out


def features_sql(model, where, op, n_filter_params):
    """Fusion features of candidate concepts: ($1 query vector, $2 query text,
    $3 int[] concept ids, $4... filter arrays) -> one row per concept: its
    nearest text (the columns of a search row, distance included) and
    ``lex_score``, the best lexical score over all its texts. Returns (sql, types)."""
    from . import sqlgen

    t = sqlgen.table(model["model_id"])
    sql = (
        "WITH q AS (SELECT omop_emb.lexemes($2) AS words) "
        "SELECT DISTINCT ON (e.concept_id) %s, e.embedding %s $1 AS distance, "
        "max(omop_emb.lexical_score(q.words, omop_emb.lexemes(e.text))) "
        "OVER (PARTITION BY e.concept_id) AS lex_score "
        "FROM %s e, q WHERE e.concept_id = ANY($3) AND %s "
        "ORDER BY e.concept_id, distance, length(e.text), e.text"
        % (sqlgen.SELECT_COLS, op, t, where))
    return sql, [sqlgen.vector_type(model), "text", "int4[]"] + ["text[]"] * n_filter_params


def fused_score(similarity, lex_score, weight=LEXICAL_WEIGHT):
    """Hybrid score of a concept: similarity + weight * lexical score."""
    return (similarity or 0.0) + weight * (lex_score or 0.0)


def fuse(candidates, weight=LEXICAL_WEIGHT):
    """Score fusion of candidates [(concept_id, similarity, lex_score)] given in
    the order first seen (semantic ranking first, then lexical-only ones).

    Returns [(concept_id, score)] best first; ties keep the given order.
    """
    scored = [(cid, fused_score(sim, lex, weight), i)
              for i, (cid, sim, lex) in enumerate(candidates)]
    scored.sort(key=lambda t: (-t[1], t[2]))
    return [(cid, score) for cid, score, _ in scored]
