"""Vectors between Python, SQL text and hashes.

Vectors cross SPI as pgvector's text form ``[x,y,...]``: PL/Python has no
binary path to ``vector``, and the text form is parsed in C on the server.
"""

import hashlib
import re

_WS = re.compile(r"\s+")


_FORMATS = {}


def to_sql(vec):
    """``[0.1, 0.2]`` -> ``'[0.1,0.2]'`` (pgvector's input form).

    Nine significant digits round-trip a float32 exactly (pgvector stores
    float32). One format string per dimension formats the whole vector in a
    single C call: formatting was half the cost of indexing with ``repr``.
    """
    n = len(vec)
    fmt = _FORMATS.get(n)
    if fmt is None:
        fmt = _FORMATS[n] = "[" + ",".join(["%.9g"] * n) + "]"
    return fmt % tuple(vec)


def from_sql(text):
    """pgvector's text output -> list of floats."""
    if text is None:
        return None
    body = text.strip()[1:-1]
    return [float(x) for x in body.split(",")] if body else []


_VECTOR_LITERAL = re.compile(r"'\[([^\]']*)\]'")


def abbreviate_literals(line, keep=3):
    """A plan line with every vector literal ``'[x1,...,x384]'`` shortened to its
    first ``keep`` numbers and its length: ``'[0.01,-0.2,0.03,... 384 dims]'``
    (EXPLAIN prints the query vector inline, thousands of characters)."""
    def short(m):
        parts = m.group(1).split(",")
        if len(parts) <= keep + 1:
            return m.group(0)
        return "'[%s,... %d dims]'" % (",".join(parts[:keep]), len(parts))
    return _VECTOR_LITERAL.sub(short, line)


def text_hash(sent_text):
    """SHA-256 of the exact text sent to the model (prefix included).

    Indexing compares it to decide what to re-embed; the same digest is
    computed in SQL with ``sha256(convert_to(prefix || text, 'UTF8'))``.
    """
    return hashlib.sha256(sent_text.encode("utf-8")).digest()


def fold(text):
    """Case and whitespace folding used by exact matching.

    Must agree with the SQL function ``omop_emb.fold_text``.
    """
    return _WS.sub(" ", text.strip()).lower()


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    if na == 0 or nb == 0:
        return None
    return dot / (na * nb)
