"""Argument checks shared by the SQL functions: clear errors, nothing changed."""

from .errors import InvalidArgument

MAX_K = 1000
# Concepts nearest() and its siblings return when k is not given (the SQL signatures' DEFAULT).
DEFAULT_K = 10
# nearest_batch: at most this many result rows (queries x k) per call. Rows are
# streamed, but every query's vector and ranking are held while it is searched:
# 2,000 queries x k 1,000 took 942 MB in one backend before streaming.
MAX_BATCH_ROWS = 200000


def int_setting(value, name, lo, hi):
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except ValueError:
        raise InvalidArgument("setting %s = %r is not an integer" % (name, value))
    if not lo <= n <= hi:
        raise InvalidArgument("setting %s = %d is outside %d..%d" % (name, n, lo, hi))
    return n


def check_k(k):
    if k is None:
        raise InvalidArgument("k must not be NULL", hint="Ask for 1 to %d concepts." % MAX_K)
    if not 1 <= k <= MAX_K:
        raise InvalidArgument("k = %d is outside 1..%d" % (k, MAX_K),
                              hint="Ask for 1 to %d concepts; page through larger result sets "
                                   "with filters instead." % MAX_K)
    return int(k)


def sql_array(values):
    """A text array as SQL writes it: {a,b,NULL}."""
    return "{%s}" % ",".join("NULL" if v is None else v for v in values)


def check_filters(*arrays):
    names = ("domain_ids", "vocabulary_ids", "concept_class_ids")
    out = []
    for name, arr in zip(names, arrays):
        if arr is not None:
            arr = list(arr)
            if any(x is None for x in arr):
                raise InvalidArgument("%s contains NULL: %s" % (name, sql_array(arr)),
                                      hint="Remove NULL elements, e.g. array_remove(arr, NULL).")
        out.append(arr)
    return out


def check_input_length(model, texts, prefix="", role="query"):
    """The one length check: on what is sent to the embedding server (the prefix
    of the role included), and on texts searched lexically (prefix "")."""
    limit = int(model["max_input_chars"])
    room = limit - len(prefix)
    for i, t in enumerate(texts):
        if t is not None and len(t) > room:
            sent = len(t) + len(prefix)
            detail = "Text starts with: %r" % t[:60]
            if prefix:
                detail += "; the %s prefix %r (%d characters) is sent before it" % (
                    role, prefix, len(prefix))
            raise InvalidArgument(
                "text %d is %d characters long as sent; model %s accepts at most %d"
                % (i + 1, sent, model["name"], limit), detail=detail,
                hint="Shorten the text to at most %d characters, or raise max_input_chars "
                     "with omop_emb.alter_model()." % max(room, 0))


def check_batch_size(n_queries, k):
    if n_queries * k > MAX_BATCH_ROWS:
        per_call = max(1, MAX_BATCH_ROWS // k)
        raise InvalidArgument(
            "nearest_batch asks for %d queries x k %d = %d rows; at most %d rows per call"
            % (n_queries, k, n_queries * k, MAX_BATCH_ROWS),
            detail="The limit keeps the memory of one backend bounded.",
            hint="Split the queries into chunks of %d (at k = %d) and call nearest_batch once "
                 "per chunk, e.g. over (array_agg(q))[i:i+%d] slices, or lower k."
                 % (per_call, k, per_call - 1))
