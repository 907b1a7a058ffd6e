"""Source-term mapping from Python: jobs from CSV files, suggestions with progress, Usagi CSV
in and out, SOURCE_TO_CONCEPT_MAP export.

Everything here calls the SQL API of ``sql/api/80_mapping.sql`` (``omop_emb.create_mapping_job``,
``suggest_mappings_batch``, ``export_source_to_concept_map``...) as the connected role, so the
database's grants and row-level security decide what a user may do.

Usagi's CSV (OHDSI Usagi's ``WriteCodeMappingsToFile``): one row per source code and target
concept (a code without target has one row with conceptId 0), columns :data:`USAGI_COLUMNS` with
the ``ADD_INFO:<name>`` columns after ``sourceAutoAssignedConceptIds``; ``matchScore`` with two
decimals; ``statusSetOn`` and ``createdOn`` in milliseconds since 1970 (0: unset);
``sourceFrequency`` -1 when unknown. Statuses, both ways (:data:`STATUS_TO_USAGI`):

=================  ======================================================
omop_emb           Usagi mappingStatus
=================  ======================================================
approved           APPROVED (automatic approvals: AUTO_MAPPED)
unmapped           APPROVED with conceptId 0 (equivalence UNMATCHED)
flagged            FLAGGED (INVALID_TARGET is read as flagged, written back as read)
ignored            IGNORED
unreviewed / none  UNCHECKED
=================  ======================================================

An imported decision keeps Usagi's statusSetBy/statusSetOn/mappingStatus and per-target
mappingType/createdBy/createdOn in ``mapping_decision.provenance``; Usagi's matchScore and
sourceAutoAssignedConceptIds are kept in ``mapping_term.extra`` (keys ``usagi.*``), the
ADD_INFO columns as the other keys of ``extra``. A file written by :func:`export_usagi_csv`
and read back by :func:`import_usagi_csv` is written again identically.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .errors import OmopEmbError, from_db_error

USAGI_COLUMNS = [
    "sourceCode", "sourceName", "sourceFrequency", "sourceAutoAssignedConceptIds",
    # ADD_INFO:* columns go here
    "matchScore", "mappingStatus", "equivalence", "statusSetBy", "statusSetOn", "conceptId",
    "conceptName", "domainId", "mappingType", "comment", "createdBy", "createdOn", "assignedReviewer",
]
ADD_INFO = "ADD_INFO:"
USAGI_STATUSES = ("APPROVED", "UNCHECKED", "AUTO_MAPPED", "AUTO_MAPPED_TO_1", "INVALID_TARGET", "FLAGGED",
                  "IGNORED")
EQUIVALENCES = ("EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT", "UNMATCHED", "UNREVIEWED")
MAPPING_TYPES = ("MAPS_TO", "MAPS_TO_VALUE", "MAPS_TO_UNIT", "MAPS_TO_OPERATOR", "MAPS_TO_TYPE",
                 "MAPS_TO_NUMBER")
# Usagi's mappingStatus for an omop_emb status (automatic approvals: AUTO_MAPPED).
STATUS_TO_USAGI = {"approved": "APPROVED", "unmapped": "APPROVED", "flagged": "FLAGGED",
                   "ignored": "IGNORED", "unreviewed": "UNCHECKED"}
# Keys of mapping_term.extra that hold Usagi's own term fields (not ADD_INFO columns).
EXTRA_MATCH_SCORE = "usagi.matchScore"
EXTRA_AUTO_IDS = "usagi.sourceAutoAssignedConceptIds"
DEFAULT_BATCH_SIZE = 200


# ---------------------------------------------------------------- connections
class _Conn:
    """A connection given, or one opened from a DSN (closed on exit)."""

    def __init__(self, db: str | psycopg.Connection) -> None:
        self.owned = not isinstance(db, psycopg.Connection)
        self.conn = psycopg.connect(db or "", autocommit=True) if self.owned else db

    def __enter__(self) -> psycopg.Connection:
        return self.conn

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.conn.close()


def _run(conn: psycopg.Connection, query, params=None) -> list[dict]:
    try:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []
    except psycopg.Error as e:
        if not conn.autocommit and not conn.closed:
            conn.rollback()
        if e.diag.sqlstate:
            raise from_db_error(e) from None
        raise


def _job(conn: psycopg.Connection, job: str) -> dict:
    rows = _run(conn, "SELECT (omop_emb_internal.mapping_job(%s)).*", (job,))
    return rows[0]


# ---------------------------------------------------------------- jobs
def _read_csv(path: str | os.PathLike[str], delimiter: str | None = None) -> tuple[list[str], list[list[str]]]:
    text = Path(path).read_text(encoding="utf-8-sig")
    if delimiter is None:
        first = text.split("\n", 1)[0]
        delimiter = "\t" if first.count("\t") > first.count(",") else ","
    return _header_and_body(path, list(csv.reader(text.splitlines(), delimiter=delimiter)),
                            empty_hint="A header line and one line per source code.")


def _header_and_body(path: str | os.PathLike[str], rows: list[list[str]], *, empty_hint: str,
                     width_hint: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, non-blank rows) of a file's parsed lines: an error when it is empty, when a
    column name repeats or when a row's width differs from the header's."""
    if not rows:
        raise OmopEmbError(f"{path}: the file is empty", hint=empty_hint)
    header = rows[0]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise OmopEmbError(f"{path}: duplicate column names {dup}")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise OmopEmbError(f"{path}: line {i} has {len(r)} fields, the header {len(header)}",
                               hint=width_hint)
    return header, body


def _pick(header: list[str], given: str | None, candidates: Iterable[str], what: str, required: bool) -> str | None:
    if given is not None:
        if given not in header:
            raise OmopEmbError(f"no column {given!r} for the {what}", detail=f"Columns: {', '.join(header)}")
        return given
    for c in candidates:
        if c in header:
            return c
    if required:
        raise OmopEmbError(f"cannot tell which column holds the {what}", detail=f"Columns: {', '.join(header)}",
                           hint=f"Name it (e.g. --{what.replace(' ', '-')}-column), or call the column "
                                f"{' or '.join(candidates)}.")
    return None


def _load_temp_table(conn: psycopg.Connection, table: str, header: list[str], rows: list[list[str]]) -> None:
    cols = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(h)) for h in header)
    _run(conn, sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(table)))
    _run(conn, sql.SQL("CREATE TEMP TABLE {} ({})").format(sql.Identifier(table), cols))
    with conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY pg_temp.{} FROM STDIN").format(sql.Identifier(table))) as cp:
            for r in rows:
                cp.write_row(r)


def create_job_from_csv(db: str | psycopg.Connection, name: str, path: str | os.PathLike[str], *,
                        code_column: str | None = None, name_column: str | None = None,
                        frequency_column: str | None = None, delimiter: str | None = None,
                        **job_options: Any) -> int:
    """Create mapping job ``name`` from a CSV of source codes (header line; columns
    ``source_code``/``sourceCode``, ``source_name``/``sourceName`` and optionally
    ``source_frequency``/``sourceFrequency``, or the ones named). Other columns are kept
    (``mapping_term.extra``). ``job_options``: the keyword arguments of
    ``omop_emb.create_mapping_job`` (model, domain_ids, vocabulary_ids, concept_class_ids,
    source_vocabulary_id, vocabulary_schema, cdm_schema, candidates_per_term). Returns the job id."""
    header, rows = _read_csv(path, delimiter)
    code = _pick(header, code_column, ("source_code", "sourceCode", "code"), "code", True)
    label = _pick(header, name_column, ("source_name", "sourceName", "name", "description"), "name", True)
    freq = _pick(header, frequency_column, ("source_frequency", "sourceFrequency", "frequency", "count"),
                 "frequency", False)
    bad = [i for i, r in enumerate(rows, start=2) if freq and r[header.index(freq)].strip()
           and not r[header.index(freq)].strip().lstrip("-").isdigit()]
    if bad:
        raise OmopEmbError(f"{path}: column {freq!r} is not a whole number on line(s) {bad[:10]}")
    table = "omop_emb_csv_terms"
    select = [sql.SQL("{} AS source_code").format(sql.Identifier(code)),
              sql.SQL("{} AS source_name").format(sql.Identifier(label))]
    if freq:
        # Usagi writes -1 for an unknown frequency.
        select.append(sql.SQL("CASE WHEN btrim({0}) ~ '^[0-9]+$' THEN btrim({0})::bigint END AS source_frequency")
                      .format(sql.Identifier(freq)))
    select += [sql.Identifier(h) for h in header if h not in (code, label, freq)]
    query = sql.SQL("SELECT {} FROM pg_temp.{}").format(sql.SQL(", ").join(select), sql.Identifier(table))
    with _Conn(db) as conn:
        _load_temp_table(conn, table, header, rows)
        try:
            query_text = query.as_string(conn)
            opts = {k: v for k, v in job_options.items() if v is not None}
            args = sql.SQL(", ").join([sql.Placeholder("name"), sql.Placeholder("q")] + [
                sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in opts])
            row = _run(conn, sql.SQL("SELECT omop_emb.create_mapping_job({}) AS job_id").format(args),
                       {"name": name, "q": query_text, **opts})
            return int(row[0]["job_id"])
        finally:
            _run(conn, sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(table)))


@dataclass
class SuggestResult:
    job: str
    terms: int
    suggested: int
    seconds: float


def suggest(db: str | psycopg.Connection, job: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
            resuggest: bool = False, context: bool = True,
            on_progress: Callable[[int, int], None] | None = None) -> SuggestResult:
    """Candidates for every term of ``job`` without current ones, one committed batch at a
    time (``omop_emb.suggest_mappings_batch``); ``on_progress(done, pending)`` after each.
    Interrupted, it keeps what was committed; calling it again resumes."""
    t0 = time.perf_counter()
    done = 0
    with _Conn(db) as conn:
        if not conn.autocommit:
            conn.commit()
        start = _run(conn, "SELECT * FROM omop_emb.suggest_mappings_start(%s, %s)", (job, resuggest))[0]
        if not conn.autocommit:
            conn.commit()
        pending = int(start["pending"])
        if on_progress:
            on_progress(0, pending)
        while True:
            n = _run(conn, "SELECT omop_emb.suggest_mappings_batch(%s, %s, %s) AS n",
                     (job, batch_size, context))[0]["n"]
            if not conn.autocommit:
                conn.commit()
            if not n:
                break
            done += n
            if on_progress:
                on_progress(done, max(pending, done))
    return SuggestResult(job, int(start["terms"]), done, time.perf_counter() - t0)


def job_progress(db: str | psycopg.Connection, job: str | None = None) -> list[dict]:
    """Rows of ``omop_emb.mapping_jobs`` (one job, or all)."""
    with _Conn(db) as conn:
        if job is not None:
            _job(conn, job)  # a clear error for an unknown name
        return _run(conn, "SELECT * FROM omop_emb.mapping_jobs WHERE %(j)s::text IS NULL OR name = %(j)s "
                          "ORDER BY job_id", {"j": job})


def export_source_to_concept_map(db: str | psycopg.Connection, job: str, target_table: str) -> dict:
    """``omop_emb.export_source_to_concept_map``: {'inserted', 'end_dated', 'unchanged'}."""
    with _Conn(db) as conn:
        return _run(conn, "SELECT * FROM omop_emb.export_source_to_concept_map(%s, %s)", (job, target_table))[0]


# ---------------------------------------------------------------- Usagi CSV
def _ms(ts: datetime | None) -> int:
    if ts is None:
        return 0
    return int((ts - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 1000 // 1)


def _score(x: Any) -> str:
    """Usagi's DecimalFormat("####0.00") (half-even)."""
    return str(Decimal(str(x if x is not None else 0)).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


# Usagi's CSV dialect (org.ohdsi.utilities.files.WriteCSVFile / ReadCSVFile), which is not
# RFC 4180: a quote inside a value is written \" (not doubled), a backslash \\, a line break
# the two characters \n (a carriage return is dropped); a value is quoted when it holds a quote
# or the delimiter. Reading splits at delimiters outside quotes and not escaped, strips the
# outer quotes and turns \" and \\ back (\n stays as it is: Usagi does not turn it back).
def usagi_line(values: Iterable[str], delimiter: str = ",") -> str:
    """One line of a Usagi CSV file holding ``values``, as Usagi writes it."""
    out = []
    for v in values:
        quoted = '"' in v
        v = v.replace("\\", "\\\\")
        if quoted:
            v = v.replace('"', '\\"')
        v = v.replace("\r", "").replace("\n", "\\n")
        out.append('"' + v + '"' if quoted or delimiter in v else v)
    return delimiter.join(out)


def usagi_fields(line: str, delimiter: str = ",") -> list[str]:
    """The values of one line of a Usagi CSV file, as Usagi reads them."""
    fields, start, literal, escape = [], 0, False, False
    for i, ch in enumerate(line):
        if ch == '"' and not escape:
            literal = not literal
        if ch == delimiter and not literal and not escape:
            fields.append(line[start:i])
            start = i + 1
        escape = not escape if ch == "\\" else False
    fields.append(line[start:])
    out = []
    for f in fields:
        if len(f) > 1 and f.startswith('"') and f.endswith('"'):
            f = f[1:-1]
        out.append(f.replace('\\"', '"').replace("\\\\", "\\"))
    return out


def _read_usagi_csv(path: str | os.PathLike[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a Usagi CSV file, read with Usagi's dialect (usagi_fields)."""
    # Line breaks as Java's readLine sees them (not str.splitlines: it also breaks at
    # form feeds and Unicode separators, which a source name may hold).
    lines = re.split(r"\r\n|\r|\n", Path(path).read_text(encoding="utf-8-sig"))
    if lines and lines[-1] == "":
        lines.pop()
    return _header_and_body(
        path, [usagi_fields(line) for line in lines], empty_hint="A Usagi mapping file has a header line.",
        width_hint="Usagi escapes a quote inside a value as \\\" and a backslash as \\\\; a file "
                   "saved by a spreadsheet may quote otherwise.")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


_EXPORT_SQL = """
SELECT t.term_id, t.source_code, t.source_name, t.source_frequency, t.extra, t.assigned_reviewer,
       d.decision_id, d.status, d.concept_ids, d.equivalence, d.comment, d.automatic, d.decided_by,
       d.decided_at, d.provenance, c1.score AS top_score
FROM omop_emb.mapping_term t
LEFT JOIN LATERAL (SELECT * FROM omop_emb.mapping_decision x WHERE x.term_id = t.term_id
                   ORDER BY x.decision_id DESC LIMIT 1) d ON true
LEFT JOIN omop_emb.mapping_candidate c1 ON c1.term_id = t.term_id AND c1.rank = 1
WHERE t.job_id = %s
ORDER BY t.term_id
"""


def usagi_rows(db: str | psycopg.Connection, job: str) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a job in Usagi's CSV layout."""
    with _Conn(db) as conn:
        j = _job(conn, job)
        terms = _run(conn, _EXPORT_SQL, (j["job_id"],))
        ids = sorted({cid for t in terms for cid in (t["concept_ids"] or [])})
        concepts = {}
        if ids:
            for r in _run(conn, sql.SQL("SELECT concept_id, concept_name, domain_id FROM {}.concept "
                                        "WHERE concept_id = ANY(%s)").format(sql.Identifier(j["vocabulary_schema"])),
                          (ids,)):
                concepts[r["concept_id"]] = r
    add_info: list[str] = []
    for t in terms:
        for k in (t["extra"] or {}):
            if not k.startswith("usagi.") and k not in add_info:
                add_info.append(k)
    columns = USAGI_COLUMNS[:4] + [ADD_INFO + k for k in add_info] + USAGI_COLUMNS[4:]
    out = []
    for t in terms:
        extra = t["extra"] or {}
        prov = t["provenance"] or {}
        status = t["status"] or "unreviewed"
        usagi_status = "AUTO_MAPPED" if status == "approved" and t["automatic"] else STATUS_TO_USAGI[status]
        if prov.get("mappingStatus") and _status_from_usagi(prov["mappingStatus"], bool(t["concept_ids"]))[0] == status:
            usagi_status = prov["mappingStatus"]
        if t["decision_id"] is None:
            set_by, set_on = "", 0
        else:
            set_by = prov.get("statusSetBy", t["decided_by"])
            set_on = prov.get("statusSetOn", _ms(t["decided_at"]))
        score = t["top_score"] if t["top_score"] is not None else extra.get(EXTRA_MATCH_SCORE, 0)
        auto_ids = extra.get(EXTRA_AUTO_IDS, "")
        base = {
            "sourceCode": t["source_code"], "sourceName": t["source_name"],
            "sourceFrequency": str(t["source_frequency"] if t["source_frequency"] is not None else -1),
            "sourceAutoAssignedConceptIds": auto_ids,
            **{ADD_INFO + k: _cell(extra.get(k)) for k in add_info},
            "matchScore": _score(score), "mappingStatus": usagi_status,
            "equivalence": t["equivalence"] or "UNREVIEWED", "statusSetBy": set_by or "",
            "statusSetOn": str(set_on), "comment": t["comment"] or "",
            "assignedReviewer": t["assigned_reviewer"] or "",
        }
        targets = list(t["concept_ids"] or []) if status in ("approved", "flagged", "ignored", "unreviewed") else []
        if not targets:
            out.append({**base, "conceptId": "0", "conceptName": "Unmapped", "domainId": "",
                        "mappingType": "MAPS_TO", "createdBy": "", "createdOn": "0"})
            continue
        types = prov.get("mappingType") or []
        by = prov.get("createdBy") or []
        on = prov.get("createdOn") or []
        for i, cid in enumerate(targets):
            c = concepts.get(cid) or {}
            out.append({**base, "conceptId": str(cid), "conceptName": c.get("concept_name") or "",
                        "domainId": c.get("domain_id") or "",
                        "mappingType": types[i] if i < len(types) else "MAPS_TO",
                        "createdBy": by[i] if i < len(by) else (t["decided_by"] or ""),
                        "createdOn": str(on[i] if i < len(on) else _ms(t["decided_at"]))})
    return columns, out


def export_usagi_csv(db: str | psycopg.Connection, job: str, path: str | os.PathLike[str]) -> int:
    """Write a job as a Usagi mapping CSV (one row per source code and target concept).
    Returns the rows written."""
    columns, rows = usagi_rows(db, job)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(usagi_line(columns) + "\n")
        for r in rows:
            f.write(usagi_line(r[c] for c in columns) + "\n")
    return len(rows)


def _status_from_usagi(usagi: str, has_targets: bool) -> tuple[str, bool]:
    """(omop_emb status, automatic) of a Usagi mappingStatus."""
    if usagi == "APPROVED":
        return ("approved" if has_targets else "unmapped"), False
    if usagi in ("AUTO_MAPPED", "AUTO_MAPPED_TO_1"):
        return ("approved", True) if has_targets else ("unreviewed", True)
    if usagi in ("FLAGGED", "INVALID_TARGET"):
        return "flagged", False
    if usagi == "IGNORED":
        return "ignored", False
    return "unreviewed", False


def _int(value: str, what: str, line: int, default: int = 0) -> int:
    value = (value or "").strip()
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise OmopEmbError(f"line {line}: {what} must be a whole number, not {value!r}") from None


@dataclass
class UsagiImport:
    job: str
    terms_added: int
    decisions_added: int
    unchanged: int
    invalid_targets: list[int]


def import_usagi_csv(db: str | psycopg.Connection, job: str, path: str | os.PathLike[str],
                     **job_options: Any) -> UsagiImport:
    """Read a Usagi mapping CSV into job ``job`` (created with ``job_options`` when it does
    not exist): new source codes become terms, and each code's mapping becomes its current
    decision unless it already is (re-importing the same file adds nothing). A target concept
    not in the vocabulary makes the decision 'flagged' (Usagi's INVALID_TARGET), its id kept."""
    header, body = _read_usagi_csv(path)
    missing = [c for c in ("sourceCode", "sourceName", "mappingStatus", "conceptId") if c not in header]
    if missing:
        raise OmopEmbError(f"{path}: not a Usagi mapping file: columns missing: {missing}",
                           detail=f"Columns: {', '.join(header)}",
                           hint="A list of source codes is loaded with create_job_from_csv (omop-emb-pg map create).")
    # Group consecutive rows of one code (Usagi writes one row per target concept).
    codes: dict[str, dict] = {}
    order: list[str] = []
    for line, values in enumerate(body, start=2):
        r = dict(zip(header, values))
        status = r["mappingStatus"].strip() or "UNCHECKED"
        if status not in USAGI_STATUSES:
            raise OmopEmbError(f"{path}: line {line}: unknown mappingStatus {status!r}",
                               detail="Usagi's: " + ", ".join(USAGI_STATUSES))
        eq = (r.get("equivalence") or "UNREVIEWED").strip() or "UNREVIEWED"
        if eq not in EQUIVALENCES:
            raise OmopEmbError(f"{path}: line {line}: unknown equivalence {eq!r}", detail=", ".join(EQUIVALENCES))
        mtype = (r.get("mappingType") or "MAPS_TO").strip() or "MAPS_TO"
        mtype = {"EVENT": "MAPS_TO", "VALUE": "MAPS_TO_VALUE", "UNIT": "MAPS_TO_UNIT"}.get(mtype, mtype)
        if mtype not in MAPPING_TYPES:
            raise OmopEmbError(f"{path}: line {line}: unknown mappingType {mtype!r}", detail=", ".join(MAPPING_TYPES))
        code = r["sourceCode"]
        if code not in codes:
            freq = _int(r.get("sourceFrequency", ""), "sourceFrequency", line, -1)
            extra = {k[len(ADD_INFO):]: v for k, v in r.items() if k.startswith(ADD_INFO)}
            if r.get("matchScore", "").strip():
                extra[EXTRA_MATCH_SCORE] = r["matchScore"].strip()
            if r.get("sourceAutoAssignedConceptIds", "").strip():
                extra[EXTRA_AUTO_IDS] = r["sourceAutoAssignedConceptIds"].strip()
            codes[code] = {
                "source_code": code, "source_name": r["sourceName"], "freq": None if freq < 0 else freq,
                "extra": extra or None, "usagi_status": status, "equivalence": eq,
                "comment": r.get("comment") or None, "reviewer": (r.get("assignedReviewer") or "").strip() or None,
                "set_by": r.get("statusSetBy", ""), "set_on": _int(r.get("statusSetOn", ""), "statusSetOn", line),
                "targets": [], "types": [], "created_by": [], "created_on": [],
            }
            order.append(code)
        cid = _int(r["conceptId"], "conceptId", line)
        if cid != 0:
            c = codes[code]
            c["targets"].append(cid)
            c["types"].append(mtype)
            c["created_by"].append(r.get("createdBy", ""))
            c["created_on"].append(_int(r.get("createdOn", ""), "createdOn", line))
    with _Conn(db) as conn:
        exists = _run(conn, "SELECT 1 FROM omop_emb.mapping_job WHERE name = %s", (job,))
        if not exists:
            opts = {k: v for k, v in job_options.items() if v is not None}
            args = sql.SQL(", ").join([sql.Placeholder("name"), sql.SQL("'SELECT NULL::text AS source_code, NULL::text AS source_name WHERE false'")] + [
                sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in opts])
            _run(conn, sql.SQL("SELECT omop_emb.create_mapping_job({})").format(args), {"name": job, **opts})
        j = _job(conn, job)
        terms_table = "omop_emb_usagi_terms"
        _load_temp_table(conn, terms_table, ["source_code", "source_name", "source_frequency", "extra"],
                         [[c["source_code"], c["source_name"], None if c["freq"] is None else str(c["freq"]),
                           None if c["extra"] is None else json.dumps(c["extra"], ensure_ascii=False)]
                          for c in (codes[k] for k in order)])
        added = _run(conn, "SELECT omop_emb.add_mapping_terms(%s, 'SELECT source_code, source_name, "
                           "source_frequency::bigint AS source_frequency, extra::jsonb AS extra "
                           "FROM pg_temp.omop_emb_usagi_terms') AS n", (job,))[0]["n"]
        _run(conn, sql.SQL("DROP TABLE pg_temp.{}").format(sql.Identifier(terms_table)))
        terms = {r["source_code"]: r for r in _run(conn, """
            SELECT t.term_id, t.source_code, t.assigned_reviewer, d.decision_id, d.status, d.concept_ids,
                   d.equivalence, d.comment, d.automatic, d.provenance
            FROM omop_emb.mapping_term t
            LEFT JOIN LATERAL (SELECT * FROM omop_emb.mapping_decision x WHERE x.term_id = t.term_id
                               ORDER BY x.decision_id DESC LIMIT 1) d ON true
            WHERE t.job_id = %s""", (j["job_id"],))}
        all_ids = sorted({cid for c in codes.values() for cid in c["targets"]})
        known = {r["concept_id"] for r in _run(
            conn, sql.SQL("SELECT concept_id FROM {}.concept WHERE concept_id = ANY(%s)")
            .format(sql.Identifier(j["vocabulary_schema"])), (all_ids,))} if all_ids else set()
        invalid = sorted(set(all_ids) - known)
        decisions, unchanged = [], 0
        for code in order:
            c = codes[code]
            t = terms[code]
            if c["reviewer"] != t["assigned_reviewer"]:
                _run(conn, "UPDATE omop_emb.mapping_term SET assigned_reviewer = %s WHERE term_id = %s",
                     (c["reviewer"], t["term_id"]))
            status, automatic = _status_from_usagi(c["usagi_status"], bool(c["targets"]))
            comment = c["comment"]
            if any(cid in invalid for cid in c["targets"]) and status != "flagged":
                status, c["usagi_status"] = "flagged", "INVALID_TARGET"
                bad = [str(x) for x in c["targets"] if x in invalid]
                comment = (comment + "; " if comment else "") + "Invalid existing target: " + ", ".join(bad)
            prov = {"source": "usagi", "mappingStatus": c["usagi_status"], "statusSetBy": c["set_by"],
                    "statusSetOn": c["set_on"], "mappingType": c["types"], "createdBy": c["created_by"],
                    "createdOn": c["created_on"]}
            if t["decision_id"] is None and status == "unreviewed" and not c["set_by"] and not c["targets"] \
                    and not comment and c["equivalence"] == "UNREVIEWED":
                unchanged += 1  # UNCHECKED and never touched: nothing to record
                continue
            if (t["decision_id"] is not None and t["status"] == status and list(t["concept_ids"] or []) == c["targets"]
                    and t["equivalence"] == c["equivalence"] and (t["comment"] or None) == comment
                    and bool(t["automatic"]) == automatic):
                unchanged += 1
                continue
            decisions.append((t["term_id"], status, c["targets"], c["equivalence"], comment, automatic, Jsonb(prov)))
        if decisions:
            with conn.cursor() as cur:
                try:
                    cur.executemany(
                        "INSERT INTO omop_emb.mapping_decision (term_id, status, concept_ids, equivalence, comment, "
                        "automatic, provenance) VALUES (%s, %s, %s, %s, %s, %s, %s)", decisions)
                except psycopg.Error as e:
                    raise from_db_error(e) from None
    return UsagiImport(job, int(added), len(decisions), unchanged, invalid)
