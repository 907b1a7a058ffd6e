"""When a filtered search scans the filtered rows exactly instead of the HNSW graph.

The graph is searched first and the filter applied to what it finds (pgvector's
iterative scan, up to hnsw.max_scan_tuples visited). A filter that keeps few rows,
far from the query in the graph, is then satisfied by whichever filtered rows the
scan meets first, not the nearest ones: on the realistic 1M benchmark a 1%
vocabulary filter (CVX) got recall@10 0.66 at 195 ms, while scanning those 11k
rows exactly costs a few milliseconds and is exact. What decides is the share of
rows the filter keeps: the graph visits at most hnsw.max_scan_tuples (20,000) texts,
so it meets about that many times the share. At 200k texts (bench/results/
realistic_200k), graph against exact scan, same queries:
  vocabulary CVX, 1.1% (2,191 texts):   recall@10 0.705 / 78 ms   vs 1.000 / 8.9 ms
  domain Procedure, 7% (14,150 texts):  recall@10 0.9925 / 3.1 ms vs 1.000 / 38 ms
(an exact scan costs ~2.7 us a text). So a search is exact from the start when its
filters keep at most EXACT_SCAN_ROWS texts and either at most GRAPH_MIN_SHARE of
the table or so few texts (ALWAYS_EXACT_ROWS) that the scan is cheap anyway.
"""

# Filtered texts (estimated) above which a search always uses the graph: an exact
# scan of more would cost tens of milliseconds. omop_emb.exact_scan_rows overrides it.
EXACT_SCAN_ROWS = 20000
# Below this share of the model's texts a filter is too selective for the graph.
GRAPH_MIN_SHARE = 0.02
# At or below this many filtered texts the exact scan costs a few milliseconds.
ALWAYS_EXACT_ROWS = 2000

# The filter columns (sqlgen.FILTERS' order) and their statistics, one row each.
COLUMNS = ("domain_id", "vocabulary_id", "concept_class_id")
STATS_SQL = (
    "SELECT c.reltuples::float8 AS reltuples, s.attname::text AS col, "
    "s.most_common_vals::text::text[] AS vals, s.most_common_freqs::float8[] AS freqs, "
    "s.n_distinct::float8 AS n_distinct, s.null_frac::float8 AS null_frac "
    "FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_stats s "
    "ON s.schemaname = 'omop_emb' AND s.tablename = c.relname "
    "AND s.attname = ANY ('{domain_id,vocabulary_id,concept_class_id}'::name[]) "
    "WHERE c.oid = $1::regclass")


def column_stats(rows):
    """(table rows, {column: (value -> fraction of rows, fraction of a value not
    listed)}) from STATS_SQL rows. Columns never analyzed are missing."""
    total = 0.0
    cols = {}
    for r in rows:
        total = max(float(r["reltuples"] or 0), 0.0)
        if not r["col"]:
            continue
        vals, freqs = r["vals"] or [], r["freqs"] or []
        listed = dict(zip(vals, freqs))
        nd = float(r["n_distinct"] or 0)
        distinct = -nd * total if nd < 0 else nd
        rest = max(0.0, 1.0 - float(r["null_frac"] or 0) - sum(freqs))
        unlisted = rest / max(1.0, distinct - len(listed))
        cols[r["col"]] = (listed, unlisted)
    return total, cols


def estimated_rows(stats, filters):
    """Rows the filters keep ({column: values}; None: not filtered), estimated
    as the planner would (independent columns), or None when a filtered column
    has no statistics yet (never analyzed: nothing is known)."""
    total, cols = stats
    fraction = 1.0
    for col, values in filters.items():
        if values is None:
            continue
        if col not in cols:
            return None
        listed, unlisted = cols[col]
        fraction *= min(1.0, sum(listed.get(v, unlisted) for v in set(values)))
    return fraction * total


def exact_is_better(stats, filters, limit=EXACT_SCAN_ROWS):
    """Whether a search with these filters should scan them exactly."""
    if not any(v is not None for v in filters.values()):
        return False
    n = estimated_rows(stats, filters)
    if n is None or n > limit:
        return False
    total = stats[0]
    return n <= ALWAYS_EXACT_ROWS or (total > 0 and n / total <= GRAPH_MIN_SHARE)
