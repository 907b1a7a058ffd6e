"""Argument checks shared by the SQL functions: clear errors, nothing changed."""

from .errors import InvalidArgument

MAX_K = 1000


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


def check_filters(*arrays):
    names = ("domain_ids", "vocabulary_ids", "concept_class_ids")
    out = []
    for name, arr in zip(names, arrays):
        if arr is not None:
            arr = list(arr)
            if any(x is None for x in arr):
                raise InvalidArgument("%s contains NULL: %r" % (name, arr),
                                      hint="Remove NULL elements, e.g. array_remove(arr, NULL).")
        out.append(arr)
    return out
