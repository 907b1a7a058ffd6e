"""Embedding bundles: a model's embeddings in one Parquet file, embedded once and
loaded into any database that registered the same model (``omop-emb-pg export`` /
``omop-emb-pg import``).

The file holds one row per concept text (concept id, text kind, text, the SHA-256
of the exact text sent to the model, the concept's attributes, the vector as
float32) and, in the schema's metadata under ``omop_emb.bundle``, the model's
identity: provider, remote model, dimensions, metric, prefixes, storage. The
database reads and writes it only through ``omop_emb.export_embeddings`` (pages)
and ``omop_emb.import_begin`` / ``import_chunk`` / ``import_end``, whose staging
tables the client fills with binary COPY (administrator functions).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from .errors import InvalidArgument, OmopEmbError

FORMAT = "omop_emb.bundle/1"
META_KEY = b"omop_emb.bundle"
IDENTITY = ("provider", "remote_model", "dimensions", "metric", "document_prefix", "query_prefix")
ROW_COLUMNS = ("concept_id", "text_kind", "text", "text_hash", "source_concept_id", "source_code",
               "concept_name", "domain_id", "vocabulary_id", "concept_class_id", "standard_concept",
               "invalid_reason")
# Rows per export page: big enough that a call's fixed cost vanishes, small
# enough that one page stays a few tens of megabytes.
CHUNK_ROWS = 10_000
# Rows per import chunk (COPY into the staging tables, then import_chunk): the
# client reads and encodes the next chunk while the database stores this one.
IMPORT_CHUNK_ROWS = 25_000
# Connections that build the secondary indexes after a bulk or rebuild import
# (omop_emb_internal.index_build_next, one index each at a time). PostgreSQL builds
# an index on one core; the full-text and trigram GIN indexes are most of the work,
# so two connections take about the time of the larger one. 1: the import's own
# transaction builds them, one after the other.
INDEX_BUILD_CONNECTIONS = 2


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


# The staging tables of an import (sql/api/46_bundle.sql, import_begin), in the
# column order of the binary COPY the client writes.
STAGE_ROW_COLUMNS = ("ord",) + ROW_COLUMNS
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)


def _be32(out, pos, values) -> None:
    """Write big-endian int32 ``values`` at byte offsets ``pos`` of ``out`` (uint8)."""
    import numpy as np

    b = np.asarray(values).astype(">i4").view(np.uint8).reshape(-1, 4)
    for k in range(4):
        out[pos + k] = b[:, k]


def _copy_rows(batch, first_ord: int):
    """The rows of a bundle batch (without vectors) as one binary COPY body for
    pg_temp.omop_emb_import_row: per row the field count, then per field its length
    (-1 for NULL) and bytes. Built column by column with numpy (a row costs no
    Python call): fixed-width values are scattered with one fancy-index assignment,
    strings by their Arrow offsets."""
    import numpy as np

    pa, _ = _pa()
    n = len(batch)
    fields = []  # (kind, data, lengths, valid)
    for name in STAGE_ROW_COLUMNS:
        if name == "ord":
            fields.append(("fixed", np.arange(first_ord, first_ord + n, dtype=">i4").view(np.uint8).reshape(n, 4),
                           np.full(n, 4, np.int64), None))
            continue
        arr = batch.column(name)
        want = pa.int32() if name in ("concept_id", "source_concept_id") else \
            pa.binary(32) if name == "text_hash" else pa.string()
        if arr.type != want:
            try:
                arr = arr.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InvalidArgument(f"bundle column {name} has type {arr.type}, not {want}") from e
        valid = np.asarray(arr.is_valid()) if arr.null_count else None
        if want == pa.int32():
            data = np.asarray(arr.fill_null(0)).astype(">i4").view(np.uint8).reshape(n, 4)
            fields.append(("fixed", data, np.full(n, 4, np.int64), valid))
        elif want == pa.binary(32):
            data = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * 32:(arr.offset + n) * 32].reshape(n, 32)
            fields.append(("fixed", data, np.full(n, 32, np.int64), valid))
        else:
            bufs = arr.buffers()
            offsets = np.frombuffer(bufs[1], np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)
            data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
            fields.append(("var", (offsets, data), np.diff(offsets), valid))
    sizes = np.empty((n, len(fields)), np.int64)
    for j, (_, _, lengths, valid) in enumerate(fields):
        sizes[:, j] = 4 + (lengths if valid is None else np.where(valid, lengths, 0))
    row_len = 2 + sizes.sum(axis=1)
    pos = np.concatenate(([0], np.cumsum(row_len)[:-1]))
    out = np.empty(int(row_len.sum()), np.uint8)
    out[pos] = 0
    out[pos + 1] = len(fields)
    pos = pos + 2
    for j, (kind, data, lengths, valid) in enumerate(fields):
        _be32(out, pos, lengths if valid is None else np.where(valid, lengths, -1))
        at = pos + 4
        if kind == "fixed":
            if valid is not None:
                data, at = data[valid], at[valid]
            out[at[:, None] + np.arange(data.shape[1])] = data
        else:
            offsets, chars = data
            lens = lengths if valid is None else np.where(valid, lengths, 0)
            total = int(lens.sum())
            if total:
                dest = np.repeat(at - offsets[:-1], lens) + np.arange(offsets[0], offsets[0] + total)
                out[dest] = chars[offsets[0]:offsets[0] + total]
        pos = pos + sizes[:, j]
    return out


def _copy_vectors(batch, first_ord: int, dims: int):
    """The vectors of a bundle batch as one binary COPY body for
    pg_temp.omop_emb_import_vector (ord, embedding): every row has the same size,
    so it is one numpy record array (pgvector's binary form: int16 dimensions,
    int16 unused, big-endian float4s)."""
    import numpy as np

    pa, _ = _pa()
    n = len(batch)
    emb = batch.column("embedding")
    want = pa.list_(pa.float32(), dims)
    if emb.type != want:
        try:
            emb = emb.cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InvalidArgument(f"bundle column embedding has type {emb.type}, not {want}") from e
    if emb.null_count:
        raise InvalidArgument(f"the bundle has {emb.null_count} rows without a vector near row {first_ord}")
    mat = emb.flatten().to_numpy(zero_copy_only=False).reshape(n, dims)
    rows = np.empty(n, dtype=np.dtype([("fields", ">i2"), ("ord_len", ">i4"), ("ord", ">i4"), ("vec_len", ">i4"),
                                       ("dim", ">i2"), ("unused", ">i2"), ("v", ">f4", (dims,))]))
    rows["fields"] = 2
    rows["ord_len"] = 4
    rows["ord"] = np.arange(first_ord, first_ord + n)
    rows["vec_len"] = 4 + 4 * dims
    rows["dim"] = dims
    rows["unused"] = 0
    rows["v"] = mat
    return rows


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
    seconds: float  # the whole import: read, store, indexes, commit (and the HNSW rebuild, if any)
    # 'bulk': the model was empty, 'rebuild': it held at most a tenth as many rows as the bundle (both:
    # indexes built once at the end), 'merge': indexes maintained row by row
    mode: str = "merge"
    landed_seconds: float = 0.0  # until the last row was stored (before import_end)
    index_seconds: float = 0.0  # import_end and the secondary indexes built again (bulk, rebuild mode), ANALYZE
    indexes_built: int = 0
    hnsw_params: dict | None = None  # the HNSW index dropped by a bulk import (m, ef_construction, metric)
    hnsw_seconds: float | None = None  # create_index after commit, when it rebuilt that index
    hnsw_error: str | None = None  # why that rebuild failed (the rows are imported; searches are exact)

    @property
    def per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("inf")

    @property
    def landed_per_s(self) -> float:
        return self.rows / self.landed_seconds if self.landed_seconds else float("inf")


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


def _encoded_chunks(path: str | Path, dims: int, chunk_rows: int):
    """(rows payload, vectors payload, row count, the batch) per chunk of the bundle, read and
    encoded in a thread one chunk ahead of the caller (pyarrow and numpy release the
    GIL: the next chunk is read while the database stores this one)."""
    import queue
    import threading

    _, pq = _pa()
    done = object()
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def work():
        try:
            ord_ = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
                item = (_copy_rows(batch, ord_), _copy_vectors(batch, ord_, dims), len(batch), batch)
                ord_ += len(batch)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the caller
            q.put(e)

    t = threading.Thread(target=work, name="omop-emb-bundle-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


def _duplicate_error(path, batch, first_row: int, e: psycopg.Error) -> InvalidArgument:
    """The import stopped on a text that the bundle holds twice: name it (the chunk's own
    duplicate, else the one the database names, stored by an earlier chunk)."""
    seen: dict = {}
    keys = zip(*(batch.column(c).to_pylist() for c in ("concept_id", "text_kind", "text")))
    for i, key in enumerate(keys):
        if key in seen:
            where = f"rows {first_row + seen[key] + 1:,} and {first_row + i + 1:,}"
            break
        seen[key] = i
    else:
        key, where = None, "an earlier row and this chunk"
    return InvalidArgument(
        f"{path} holds the text {key!r} (concept_id, text_kind, text) twice ({where}); nothing was imported"
        if key else f"{path} holds a text twice; nothing was imported",
        detail=e.diag.message_detail or e.diag.message_primary,
        hint="A bundle has one row per concept text, as omop-emb-pg export writes it; drop the duplicates.")


def _build_secondary_indexes(dsn: str, model: str, connections: int) -> int:
    """Build the model's missing secondary indexes on ``connections`` connections at
    once (each: index_build_next until none is left to it); returns how many were
    built. The first error is raised once every connection has stopped."""
    import threading

    built: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                while True:
                    name = c.execute("SELECT omop_emb_internal.index_build_next(%s)", (model,)).fetchone()[0]
                    if name is None:
                        return
                    built.append(name)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, name="omop-emb-import-index", daemon=True)
               for _ in range(max(1, connections))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(built)


def import_bundle(dsn: str, path: str | Path, model: str | None = None,
                  chunk_rows: int = IMPORT_CHUNK_ROWS, rebuild_hnsw: bool = True,
                  index_connections: int = INDEX_BUILD_CONNECTIONS) -> ImportReport:
    """Load a bundle into ``model`` (default: the registered model of the bundle's name).

    Refused before anything is written when the bundle's identity differs from the
    registered model's. Texts present with the same hash are skipped; rows whose hash
    is not that of the model's document prefix + text are queued for re-embedding.
    The rows are one transaction: a failure while they are stored leaves the model
    as it was. Into an empty model, or one holding at most a tenth as many rows as
    the bundle, the database works in bulk or rebuild mode (sql/api/46_bundle.sql):
    the table is locked until commit and its indexes are built once over all rows:
    after commit on ``index_connections`` connections at once (with 1: inside the
    transaction, one after the other). Should that step fail, the rows stay and
    searches work, without the lexical indexes; ``index_concepts`` (its last step)
    builds what is missing. An HNSW index the table had is rebuilt after that with
    create_index (``rebuild_hnsw=False`` leaves it to the caller: searches are
    exact meanwhile)."""
    if not 1 <= index_connections <= 16:
        raise InvalidArgument(f"index_connections = {index_connections} is outside 1..16",
                              hint="Pass 1 to build the indexes inside the import's transaction, 2 (the default) "
                                   "or more to build several at once after it.")
    _, pq = _pa()
    identity = read_identity(path)
    dims = int(identity["dimensions"])
    t0 = time.perf_counter()
    totals = [0, 0, 0]
    n = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        m = _model_row(conn, model or identity.get("name"))
        # The same check import_begin makes, before the file is read.
        diffs = [f"{k}: bundle {identity.get(k)!r}, model {m[k]!r}" for k in IDENTITY if identity.get(k) != m[k]]
        if diffs:
            raise InvalidArgument(
                f"the bundle of model {identity.get('name')!r} does not match registered model {m['name']!r}",
                detail="; ".join(diffs),
                hint="Import it into a model registered with the bundle's identity, or export the bundle "
                     "from a model like this one.")
        # rows: import_begin rebuilds the indexes when the model holds at most a tenth of that
        bundle_json = json.dumps({**{k: identity.get(k) for k in ("name", *IDENTITY)},
                                  "rows": pq.ParquetFile(path).metadata.num_rows})
        copy_rows = "COPY pg_temp.omop_emb_import_row (%s) FROM STDIN (FORMAT BINARY)" % ", ".join(STAGE_ROW_COLUMNS)
        copy_vectors = "COPY pg_temp.omop_emb_import_vector (ord, embedding) FROM STDIN (FORMAT BINARY)"
        with conn.transaction():
            mode = conn.execute("SELECT omop_emb.import_begin(%s, %s::jsonb)", (m["name"], bundle_json)).fetchone()[0]
            cur = conn.cursor()
            for rows, vectors, k, batch in _encoded_chunks(path, dims, chunk_rows):
                for sql, payload in ((copy_rows, rows), (copy_vectors, vectors)):
                    with cur.copy(sql) as cp:
                        cp.write(COPY_HEADER)
                        cp.write(memoryview(payload).cast("B"))
                        cp.write(COPY_TRAILER)
                try:
                    row = conn.execute("SELECT * FROM omop_emb.import_chunk(%s)", (m["name"],)).fetchone()
                except (psycopg.errors.UniqueViolation, psycopg.errors.CardinalityViolation) as e:
                    raise _duplicate_error(path, batch, n, e) from e
                for i in range(3):
                    totals[i] += int(row[i])
                n += k
            t1 = time.perf_counter()
            later = index_connections > 1
            mode, built, hnsw = conn.execute("SELECT * FROM omop_emb.import_end(%s, build_indexes => %s)",
                                             (m["name"], not later)).fetchone()
        if mode != "merge" and later:
            try:
                built += _build_secondary_indexes(dsn, m["name"], index_connections)
                # ANALYZE, and whatever index is still missing (index_concepts' last step)
                conn.execute("SELECT omop_emb_internal.index_finish(%s)", (m["name"],))
            except psycopg.Error as e:
                raise OmopEmbError(
                    f"the {n} rows of the bundle are imported into model {m['name']!r}, but building its "
                    f"secondary indexes after them failed: {str(e).strip()}",
                    hint="Searches work meanwhile, without the lexical indexes. `omop-emb-pg index` (or CALL "
                         "omop_emb.index_concepts()) builds what is missing at its end.") from e
        t2 = time.perf_counter()
        report = ImportReport(str(path), m["name"], n, *totals, seconds=0.0, mode=mode, landed_seconds=t1 - t0,
                              index_seconds=t2 - t1, indexes_built=built, hnsw_params=hnsw)
        if hnsw is not None and rebuild_hnsw:
            # Committed already: searches run (exactly) while the index is built beside. An
            # import embeds nothing, its calibration neither: it takes stored vectors.
            try:
                conn.execute("SELECT pg_catalog.set_config('omop_emb.calibration_embeds', 'off', false)")
                conn.execute("SELECT omop_emb.create_index(%s, 'hnsw', %s, %s, %s)",
                             (m["name"], int(hnsw.get("m", 16)), int(hnsw.get("ef_construction", 128)),
                              hnsw.get("metric")))
                report.hnsw_seconds = time.perf_counter() - t2
            except psycopg.Error as e:
                report.hnsw_error = str(e).strip()
    report.seconds = time.perf_counter() - t0
    return report
