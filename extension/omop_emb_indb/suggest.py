"""Filter values that match nothing: the error names the closest known values.

A filter value (``domain_ids => '{Conditon}'``) that no indexed concept has
would give an empty result that looks like "no match". Instead the search
fails with the values the model's embedding table does hold, closest first: a
value equal but for case, then the nearest spellings (difflib).
"""

import difflib

from .errors import InvalidArgument

# SQL argument -> column of the embedding table it filters on.
FILTER_COLUMNS = (("domain_ids", "domain_id"), ("vocabulary_ids", "vocabulary_id"),
                  ("concept_class_ids", "concept_class_id"))

SHOWN = 5       # closest values named in the hint
LISTED = 40     # known values listed in the detail


def distinct_values_sql(table, column):
    """The distinct non-NULL values of an indexed column, by a loose index scan
    (one btree descent per value: milliseconds on millions of rows)."""
    return ("WITH RECURSIVE v(x) AS (SELECT pg_catalog.min({c}) FROM {t} "
            "UNION ALL SELECT (SELECT pg_catalog.min(e.{c}) FROM {t} e "
            "WHERE e.{c} OPERATOR(pg_catalog.>) v.x) FROM v WHERE v.x IS NOT NULL) "
            "SELECT x FROM v WHERE x IS NOT NULL").format(c=column, t=table)


def closest(value, known, n=SHOWN):
    """Known values closest to ``value``: equal but for case first, then by spelling."""
    low = value.lower()
    same_case = sorted(k for k in known if k.lower() == low)
    by_spelling = difflib.get_close_matches(low, [k.lower() for k in known], n=n, cutoff=0.5)
    lowered = {}
    for k in sorted(known):
        lowered.setdefault(k.lower(), k)
    out = same_case + [lowered[m] for m in by_spelling if lowered[m] not in same_case]
    # Also a known value that contains the word asked for ('snomed' -> 'SNOMED').
    out += sorted(k for k in known if low and low in k.lower() and k not in out)
    return out[:n]


def unknown_value_error(argument, column, value, known, model_name):
    """The InvalidArgument raised for a filter value no indexed concept has."""
    near = closest(value, known)
    listed = sorted(known)
    more = "" if len(listed) <= LISTED else ", ... (%d in all)" % len(listed)
    detail = "Indexed %s values of model %s: %s%s" % (
        column, model_name, ", ".join(listed[:LISTED]), more)
    if near:
        hint = "Did you mean %s? Values are case-sensitive: %s => ARRAY[%s]." % (
            " or ".join(repr(v) for v in near), argument, repr(near[0]))
    else:
        hint = ("No indexed value is close: index concepts of that %s first "
                "(CALL omop_emb.index_concepts(...)), or drop the filter." % column)
    err = InvalidArgument("%s: no indexed concept has %s %r" % (argument, column, value),
                          detail=detail, hint=hint)
    err.column = argument
    err.suggestions = near
    return err
