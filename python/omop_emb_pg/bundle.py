"""Embedding bundles: a model's embeddings in one Parquet file, embedded once and
loaded into any database that registered the same model (``omop-emb-pg export`` /
``omop-emb-pg import``).

The file holds one row per concept text (concept id, text kind, text, the SHA-256
of the exact text sent to the model, the concept's attributes, the vector as
float32) and, in the schema's metadata under ``omop_emb.bundle``, the model's
identity: provider, remote model, dimensions, metric, prefixes, storage. The
database reads and writes it only through ``omop_emb.export_embeddings`` and
``omop_emb.import_embeddings`` (administrator functions taking arrays).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from .errors import InvalidArgument

FORMAT = "omop_emb.bundle/1"
META_KEY = b"omop_emb.bundle"
IDENTITY = ("provider", "remote_model", "dimensions", "metric", "document_prefix", "query_prefix")
ROW_COLUMNS = ("concept_id", "text_kind", "text", "text_hash", "source_concept_id", "source_code",
               "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
               "invalid_reason")
# Rows per database call: big enough that a call's fixed cost vanishes, small
# enough that one call's arrays stay a few tens of megabytes.
CHUNK_ROWS = 10_000


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise InvalidArgument("embedding bundles need pyarrow",
                              hint="pip install 'omop-emb-pg[bundle]'") from e
    return pa, pq


def _schema(pa, dims: int, identity: dict[str, Any]):
    fields = [pa.field("concept_id", pa.int32(), nullable=False),
              pa.field("text_kind", pa.string(), nullable=False),
              pa.field("text", pa.string(), nullable=False),
              pa.field("text_hash", pa.binary(32), nullable=False),
              pa.field("source_concept_id", pa.int32())]
    fields += [pa.field(c, pa.string()) for c in ROW_COLUMNS[5:]]
    fields.append(pa.field("embedding", pa.list_(pa.float32(), dims), nullable=False))
    return pa.schema(fields, metadata={META_KEY: json.dumps(identity).encode()})


class _VectorArray:
    """A ``vector[]`` parameter already in PostgreSQL's binary array format."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


def _register_vector_array(conn: psycopg.Connection) -> int:
    """Teach ``conn`` to send a _VectorArray as binary ``vector[]``; returns vector's oid."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise InvalidArgument("the pgvector extension (type vector) is not in this database")

    class VectorArrayDumper(Dumper):
        format = Format.BINARY
        oid = info.array_oid

        def dump(self, obj: _VectorArray) -> bytes:
            return obj.payload

    conn.adapters.register_dumper(_VectorArray, VectorArrayDumper)
    return info.oid


def _vector_array(mat, vector_oid: int) -> _VectorArray:
    """Rows of a float32 matrix as one binary ``vector[]`` (array header, then per element
    its length and pgvector's binary form: int16 dimensions, int16 unused, big-endian float4s),
    built by numpy in one pass instead of one Python object per vector."""
    import numpy as np

    n, d = mat.shape
    rows = np.empty(n, dtype=np.dtype([("len", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("v", ">f4", (d,))]))
    rows["len"] = 4 + 4 * d
    rows["dim"] = d
    rows["unused"] = 0
    rows["v"] = mat
    return _VectorArray(struct.pack(">iiIii", 1, 0, vector_oid, n, 1) + rows.tobytes())


def _model_row(conn: psycopg.Connection, model: str | None) -> dict[str, Any]:
    rows = conn.execute("SELECT name, provider, endpoint, remote_model, dimensions, metric, document_prefix, "
                        "query_prefix, storage FROM omop_emb.models ORDER BY name").fetchall()
    names = [r[0] for r in rows]
    if model is None and len(rows) == 1:
        model = names[0]
    for r in rows:
        if r[0] == model:
            keys = ("name", "provider", "endpoint", "remote_model", "dimensions", "metric", "document_prefix",
                    "query_prefix", "storage")
            return dict(zip(keys, r))
    raise InvalidArgument(f"unknown model {model!r}" if model else "several models are registered and none is chosen",
                          detail=f"Registered models: {', '.join(names) or '(none)'}",
                          hint="Pass --model NAME.")


@dataclass
class ExportReport:
    path: str
    model: str
    rows: int
    dimensions: int
    seconds: float
    bytes: int

    @property
    def per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("inf")


@dataclass
class ImportReport:
    path: str
    model: str
    rows: int
    imported: int
    skipped: int
    queued: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("inf")


def export_bundle(dsn: str, path: str | Path, model: str | None = None, chunk_rows: int = CHUNK_ROWS) -> ExportReport:
    """Write the model's stored embeddings and identity to a Parquet file at ``path``."""
    import numpy as np
    from pgvector.psycopg import register_vector

    pa, pq = _pa()
    t0 = time.perf_counter()
    path = Path(path)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        m = _model_row(conn, model)
        dims = int(m["dimensions"])
        identity = {"format": FORMAT, "name": m["name"], **{k: m[k] for k in IDENTITY},
                    "storage": m["storage"], "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        schema = _schema(pa, dims, identity)
        n = 0
        after: tuple = (None, None, None)
        tmp = path.with_name(path.name + ".part")
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            while True:
                cur = conn.cursor(binary=True)
                rows = cur.execute("SELECT * FROM omop_emb.export_embeddings(%s, %s, %s, %s, %s)",
                                   (m["name"], *after, chunk_rows)).fetchall()
                if not rows:
                    break
                cols = list(zip(*rows))
                mat = np.stack([np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, dtype=np.float32)
                                for v in cols[12]])
                arrays = [pa.array(cols[0], pa.int32()), pa.array(cols[1], pa.string()),
                          pa.array(cols[2], pa.string()), pa.array([bytes(h) for h in cols[3]], pa.binary(32)),
                          pa.array(cols[4], pa.int32())]
                arrays += [pa.array(cols[i], pa.string()) for i in range(5, 12)]
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa.float32()), dims))
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
                n += len(rows)
                last = rows[-1]
                after = (last[0], last[1], last[2])
                if len(rows) < chunk_rows:
                    break
        tmp.replace(path)
    return ExportReport(str(path), m["name"], n, dims, time.perf_counter() - t0, path.stat().st_size)


def read_identity(path: str | Path) -> dict[str, Any]:
    _, pq = _pa()
    meta = pq.read_schema(path).metadata or {}
    if META_KEY not in meta:
        raise InvalidArgument(f"{path} is not an omop_emb embedding bundle (no {META_KEY.decode()} metadata)",
                              hint="Write bundles with omop-emb-pg export.")
    identity = json.loads(meta[META_KEY])
    if identity.get("format") != FORMAT:
        raise InvalidArgument(f"{path}: bundle format {identity.get('format')!r} is not {FORMAT!r}",
                              hint="Export it again with this version of omop-emb-pg.")
    return identity


def import_bundle(dsn: str, path: str | Path, model: str | None = None,
                  chunk_rows: int = CHUNK_ROWS) -> ImportReport:
    """Load a bundle into ``model`` (default: the registered model of the bundle's name).

    Refused before anything is written when the bundle's identity differs from the
    registered model's. Texts present with the same hash are skipped; rows whose hash
    is not that of the model's document prefix + text are queued for re-embedding."""
    import numpy as np

    pa, pq = _pa()
    identity = read_identity(path)
    dims = int(identity["dimensions"])
    t0 = time.perf_counter()
    totals = [0, 0, 0]
    n = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        vector_oid = _register_vector_array(conn)
        m = _model_row(conn, model or identity.get("name"))
        # The same check import_embeddings makes, before the file is read.
        diffs = [f"{k}: bundle {identity.get(k)!r}, model {m[k]!r}" for k in IDENTITY if identity.get(k) != m[k]]
        if diffs:
            raise InvalidArgument(
                f"the bundle of model {identity.get('name')!r} does not match registered model {m['name']!r}",
                detail="; ".join(diffs),
                hint="Import it into a model registered with the bundle's identity, or export the bundle "
                     "from a model like this one.")
        bundle_json = json.dumps({k: identity.get(k) for k in ("name", *IDENTITY)})
        sql = ("SELECT * FROM omop_emb.import_embeddings(%s, %s::jsonb, %b::int4[], %b::text[], %b::text[], "
               "%b::bytea[], %b::int4[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], "
               "%b::text[], %b)")
        pf = pq.ParquetFile(path)
        with conn.transaction():
            for batch in pf.iter_batches(batch_size=chunk_rows):
                cols = [batch.column(c).to_pylist() for c in ROW_COLUMNS]
                emb = batch.column("embedding")
                mat = emb.values.to_numpy(zero_copy_only=False).reshape(len(batch), dims)
                vecs = _vector_array(mat.astype(np.float32, copy=False), vector_oid)
                row = conn.execute(sql, (m["name"], bundle_json, *cols, vecs)).fetchone()
                for i in range(3):
                    totals[i] += int(row[i])
                n += len(batch)
    return ImportReport(str(path), m["name"], n, *totals, time.perf_counter() - t0)
