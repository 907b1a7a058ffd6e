"""Rows in PostgreSQL's binary COPY format, for ``COPY ... FROM '<file>' (FORMAT
binary)``: the one way in-database Python can hand pgvector a vector without
formatting and parsing it as text (SPI parameters are converted from text).

Indexing writes one batch to a file of the backend's own in the cluster's
temporary-file directory (``spool_path``: PostgreSQL removes what a crash
left there at its next start), copies it into the embedding table and removes
it at once.
"""

import os
import struct

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = b"\xff\xff"
NULL = b"\xff\xff\xff\xff"

# How each column's value is written: int4; text (UTF-8: the caller makes sure the
# client and the database encoding are both UTF8, since binary COPY reads text in the
# client encoding); bytes as they are (bytea, or a value already in its type's binary
# form, such as vectors.to_binary).
INT4, TEXT, BYTES = "int4", "text", "bytes"

_INT4 = struct.Struct(">ii").pack
_LENGTH = struct.Struct(">i").pack


def encode(columns, kinds):
    """The COPY data of the rows given column by column (lists of equal length;
    None is NULL), each column written as ``kinds`` says."""
    if len(columns) != len(kinds):
        raise ValueError("%d columns but %d kinds" % (len(columns), len(kinds)))
    for k in kinds:
        if k not in (INT4, TEXT, BYTES):
            raise ValueError("unknown column kind %r" % (k,))
    field_count = struct.pack(">h", len(columns))
    out = [HEADER]
    add = out.append
    pairs = list(zip(columns, kinds))
    for r in range(len(columns[0]) if columns else 0):
        add(field_count)
        for col, kind in pairs:
            v = col[r]
            if v is None:
                add(NULL)
            elif kind == INT4:
                add(_INT4(4, v))
            else:
                if kind == TEXT:
                    v = v.encode("utf-8")
                add(_LENGTH(len(v)))
                add(v)
    add(TRAILER)
    return b"".join(out)


def spool_path(pid=None):
    """Where this backend writes its COPY data: the cluster's temporary-file
    directory (``base/pgsql_tmp``, relative to the data directory, the backend's
    working directory), under a name PostgreSQL's startup clean-up removes
    (``pgsql_tmp`` prefix) and that no other backend uses (the pid)."""
    return os.path.join(os.getcwd(), "base", "pgsql_tmp",
                        "pgsql_tmp%d.omop_emb_copy" % (os.getpid() if pid is None else pid))


def write_spool(path, data):
    """Write ``data`` to a new file ``path`` (0600), replacing one a crashed
    backend of the same pid left; the directory is made (0700) when missing."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def remove_spool(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
