"""Vectors between Python, SQL text, pgvector's binary form and hashes.

Parameters cross SPI as text: PL/Python has no binary path to ``vector`` (a
``real[]`` parameter is converted element by element through Python's
``repr``), and pgvector parses the text form with ``strtof``, about 100 us for
384 floats of 17 digits, the largest cost of indexing. Two ways around it:

* ``json_arrays``: a JSON array of numbers already is the text form; it is cut
  out of the server's answer instead of decoding and formatting 384 floats in
  Python (searches and the fallback path of indexing);
* ``base64_vectors``: the base64 float32 answer decoded into pgvector's binary
  form (``vector_recv``), which indexing hands to a binary ``COPY``
  (``copy_binary``): nothing is formatted nor parsed, 4 bytes per float.
"""

import array
import binascii
import hashlib
import math
import re
import struct
import sys

_EMBEDDING_KEY = re.compile(rb'"embedding"\s*:\s*\[')
_INDEX_KEY = re.compile(rb'"index"\s*:\s*(\d+)')
# What a JSON array of finite numbers is made of. NaN, Infinity, null, strings
# or nested arrays are not, and take the slow path, which names the fault.
_NUMBER_CHARS = b"0123456789.,-+eE \t\r\n[]"
_ZERO_CHARS = b"0.,-+eE \t\r\n[]"  # all a JSON array of zeros can hold


def json_arrays(body, count, dimensions):
    """The embeddings of an OpenAI-style answer (``{"data": [{"index": i,
    "embedding": [x, ...]}, ...]}``, floats) as pgvector text, in input order,
    cut out of the raw ``body`` (bytes) without parsing a float.

    Returns None when the body is not plainly that shape (base64, another key
    order of indexes, a wrong count or dimension, a non-finite value...): the
    caller then parses it fully, which validates and names what is wrong.
    pgvector parses the text again on insert (and rejects what slipped through).
    """
    out = []
    find = body.find
    for m in _EMBEDDING_KEY.finditer(body):
        start = m.end() - 1
        end = find(b"]", start)
        if end < 0:
            return None
        arr = body[start:end + 1]
        if arr.count(b",") != dimensions - 1 or arr.translate(None, _NUMBER_CHARS) \
                or arr.count(b"[") != 1 or not arr.translate(None, _ZERO_CHARS):
            return None  # (no digit but 0: all zeros, which the full parse judges)
        out.append(arr)
    if len(out) != count:
        return None
    indexes = _INDEX_KEY.findall(body)
    if indexes and [int(i) for i in indexes] != list(range(count)):
        return None  # out of order: let the full parse sort them
    return [a.decode("ascii") for a in out]


_B64_KEY = b'"embedding"'
_LITTLE_ENDIAN = sys.byteorder == "little"
# Top bytes of little-endian float32 values below 2**127 in magnitude (deleted with
# bytes.translate: what is left may be an infinity or a NaN).
_BELOW_2_127 = bytes(b for b in range(256) if b not in (0x7F, 0xFF))


def base64_vectors(body, count, dimensions):
    """The embeddings of an OpenAI-style base64 answer (``{"data": [{"index": i,
    "embedding": "<base64 of little-endian float32>"}, ...]}``) in pgvector's
    binary form (``to_binary``), in input order, cut out of the raw ``body``
    (bytes) without a JSON parse.

    Returns None when the body is not plainly that shape (floats, another order
    of indexes, a wrong count or length, a non-finite value...): the caller then
    parses it fully, which validates and names what is wrong.
    """
    size = 4 * dimensions
    head = _BINARY_HEAD.pack(dimensions, 0)
    out = []
    find = body.find
    at = find(_B64_KEY)
    while at >= 0:
        # "embedding", blanks, a colon, blanks, then the string (bytes.find runs in C;
        # a regular expression scanning the 2 KB strings cost 5 us per vector). Not
        # followed by a colon: the value "embedding" (of "object"), looked past.
        opening = find(b'"', at + len(_B64_KEY))
        if opening < 0:
            return None
        if body[at + len(_B64_KEY):opening].strip() != b":":
            at = find(_B64_KEY, at + len(_B64_KEY))
            continue
        closing = find(b'"', opening + 1)
        if closing < 0:
            return None
        try:
            raw = binascii.a2b_base64(body[opening + 1:closing])
        except binascii.Error:
            return None
        at = find(_B64_KEY, closing + 1)
        if len(raw) != size:
            return None
        a = array.array("f", raw)
        if not _LITTLE_ENDIAN:
            a.byteswap()  # the wire is little-endian; now native, which is big-endian
        # NaN or an infinity makes the sum non-finite (finite float32 cannot overflow
        # a double sum); pgvector would refuse the vector with a vaguer error. Only
        # vectors with a value of magnitude >= 2**127 (its top byte 0x7F or 0xFF;
        # never in an embedding) are summed.
        if (raw[3::4].translate(None, _BELOW_2_127) and not math.isfinite(sum(a))) \
                or not any(a):
            return None  # (all zeros: the full parse decides by the model's metric)
        if _LITTLE_ENDIAN:
            a.byteswap()  # pgvector's binary form is big-endian (network order)
        out.append(head + a.tobytes())
    if len(out) != count:
        return None
    indexes = _INDEX_KEY.findall(body)
    if indexes and [int(i) for i in indexes] != list(range(count)):
        return None  # out of order: let the full parse sort them
    return out


_BINARY_HEAD = struct.Struct(">hh")
_BINARY_FORMATS = {}


def to_binary(vec):
    """``[0.1, 0.2]`` -> pgvector's binary form (``vector_recv``): int16 dimensions,
    int16 unused, then each value as a big-endian float32."""
    n = len(vec)
    fmt = _BINARY_FORMATS.get(n)
    if fmt is None:
        fmt = _BINARY_FORMATS[n] = struct.Struct(">hh%df" % n)
    return fmt.pack(n, 0, *vec)


def from_binary(data):
    """pgvector's binary form -> list of floats (the inverse of ``to_binary``)."""
    n, _ = _BINARY_HEAD.unpack_from(data)
    return list(struct.unpack_from(">%df" % n, data, 4))


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


def identity_salt(identity_version):
    """What goes before the text sent in ``identity_hash`` (also in SQL:
    ``sha256(convert_to(salt || prefix || text, 'UTF8'))``; written out again in
    sql/api/46_bundle.sql, whose plpgsql cannot call this)."""
    return "omop_emb identity %d\n" % int(identity_version) if identity_version else ""


def identity_hash(sent_text, identity_version):
    """The hash of the exact text sent, salted with the model's identity version
    (omop_emb.model.identity_version): the ``text_hash`` of embedding rows and the
    key of the query cache. A vector made before a change of provider, remote
    model or dimensions so never passes for one of the model as
    it is now: indexing re-embeds such rows, the cache misses. Version 0 salts
    nothing: rows and cache entries made before versions existed stay valid."""
    return text_hash(identity_salt(identity_version) + sent_text)


def norm(vec):
    return sum(x * x for x in vec) ** 0.5


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    if na == 0 or nb == 0:
        return None
    return dot / (na * nb)
