"""How fast the review page shows a page of a 10,000-term mapping job.

Starts its own throwaway cluster, loads the GiBleed vocabulary, creates a job of 10,000 source
terms as a reviewer role (omop_emb_mapper, row-level security applies), gives every term 10
candidates and a third of them a decision (written directly: suggesting 10,000 terms is not what
is measured), then serves ``omop-emb-pg ui`` and logs in as the reviewer with its password.

Measured, each page requested --repeat times after one warm-up:
  * HTTP: the whole response of GET /jobs/<id>?... (queries + rendering), over loopback;
  * SQL baseline: the page's queries alone (count, the page of mapping_queue, the candidates)
    on one connection as the same role -- what the page costs beyond its SQL is the ratio;
  * browser (when /usr/bin/chromium exists): navigation to the page until the load event,
    in headless Chromium driven by Playwright.

    .venv/bin/python bench/ui_queue_page.py [--terms 10000] [--repeat 20]

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from omop_emb_pg.cluster import PASSWORD_LOGIN_ROLE, LocalCluster, free_port  # noqa: E402
from omop_emb_pg.install import install  # noqa: E402
from omop_emb_pg.sample import load_gibleed  # noqa: E402
from omop_emb_pg.testing import DeterministicEmbeddingServer  # noqa: E402
from omop_emb_pg.web.app import DEFAULT_PAGE_SIZE, QUEUE_ORDER, queue_filter, queue_page  # noqa: E402

CHROMIUM = os.environ.get("OMOP_EMB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROLE, PASSWORD, JOB = "bench_reviewer", "bench-pw", "bench-10k"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def setup(dsn: str, terms: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in (PASSWORD_LOGIN_ROLE,):
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
        conn.execute(f"DROP ROLE IF EXISTS {ROLE}")
        conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}' IN ROLE omop_emb_mapper, {PASSWORD_LOGIN_ROLE}")
        conn.execute(f"GRANT USAGE ON SCHEMA gibleed TO {ROLE}; GRANT SELECT ON ALL TABLES IN SCHEMA gibleed TO {ROLE}")
    role_dsn = psycopg.conninfo.make_conninfo(dsn, user=ROLE, password=PASSWORD)
    with psycopg.connect(role_dsn, autocommit=True) as conn:
        job_id = conn.execute(
            "SELECT omop_emb.create_mapping_job(%s, %s, vocabulary_schema => 'gibleed')",
            (JOB, "SELECT 'SRC' || lpad(g::text, 6, '0') AS source_code, 'local source term ' || g AS source_name, "
                  f"({terms} * 10 / g)::bigint AS source_frequency FROM pg_catalog.generate_series(1, {terms}) g"),
        ).fetchone()[0]
    with psycopg.connect(dsn, autocommit=True) as conn:  # the candidates and decisions a review would have
        conn.execute("""
            WITH c AS (SELECT row_number() OVER (ORDER BY concept_id) AS rn, * FROM gibleed.concept
                       WHERE standard_concept = 'S'),
                 n AS (SELECT count(*) AS n FROM c)
            INSERT INTO omop_emb.mapping_candidate (term_id, rank, concept_id, concept_name, domain_id, vocabulary_id,
                   concept_class_id, standard_concept, similarity, score, confidence, matched_text, match_kind,
                   parents, descendant_count, record_count)
            SELECT t.term_id, r, c.concept_id, c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id,
                   c.standard_concept, 0.95 - r * 0.01, 0.95 - r * 0.01, CASE r WHEN 1 THEN 0.02 ELSE -0.01 END,
                   c.concept_name, 'name', ARRAY['Parent concept'], 3, 100 * r
            FROM omop_emb.mapping_term t CROSS JOIN pg_catalog.generate_series(1, 10) r CROSS JOIN n
            JOIN c ON c.rn = ((t.term_id * 7 + r) %% n.n) + 1
            WHERE t.job_id = %s""", (job_id,))
        conn.execute("""
            INSERT INTO omop_emb.mapping_decision (term_id, status, concept_ids, equivalence, decided_by)
            SELECT c.term_id, CASE WHEN t.term_id %% 9 = 0 THEN 'flagged' ELSE 'approved' END, ARRAY[c.concept_id],
                   'EQUAL', %s
            FROM omop_emb.mapping_term t JOIN omop_emb.mapping_candidate c ON c.term_id = t.term_id AND c.rank = 1
            WHERE t.job_id = %s AND t.term_id %% 3 = 0""", (ROLE, job_id))
        conn.execute("UPDATE omop_emb.mapping_term SET suggested_at = now() WHERE job_id = %s", (job_id,))
        conn.execute("ANALYZE omop_emb.mapping_term; ANALYZE omop_emb.mapping_candidate; "
                     "ANALYZE omop_emb.mapping_decision")
    return job_id


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--terms", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    import httpx

    base = tempfile.mkdtemp(prefix="omop_emb_bench_ui_")
    os.chmod(base, 0o755)
    cluster = LocalCluster(Path(base) / "data")
    proc = None
    try:
        cluster.start()
        dsn = cluster.create_database("ui_bench")
        load_gibleed(dsn)
        install(dsn)
        with DeterministicEmbeddingServer(dim=384) as fake:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT omop_emb.register_model('fake', 'openai', %s, dimensions => 384, "
                             "document_prefix => '', query_prefix => '')", (fake.url,))
            t0 = time.perf_counter()
            job_id = setup(dsn, args.terms)
            print(f"setup: job {job_id} with {args.terms} terms x 10 candidates in {time.perf_counter() - t0:.1f} s")

            port = free_port()
            proc = subprocess.Popen([str(Path(sys.executable).parent / "omop-emb-pg"), "ui", "--dsn", dsn,
                                     "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            url = f"http://127.0.0.1:{port}"
            client = httpx.Client(base_url=url, timeout=60)
            for _ in range(200):
                try:
                    client.get("/login")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            r = client.post("/login", data={"user": ROLE, "password": PASSWORD, "next": "/jobs"})
            assert r.status_code in (200, 303) and "/login" not in str(r.headers.get("location", "")), r.text[:300]

            pages = args.terms // DEFAULT_PAGE_SIZE
            cases = [
                ("first page", {}),
                ("middle page", {"page": pages // 2}),
                ("last page", {"page": pages}),
                ("status=unreviewed, page 1", {"status": "unreviewed"}),
                ("status=flagged, last page", {"status": "flagged", "page": max(1, args.terms // 27 // DEFAULT_PAGE_SIZE)}),
                (f"reviewer={ROLE}, page 1", {"reviewer": ROLE}),
            ]
            rows = []
            role_dsn = psycopg.conninfo.make_conninfo(dsn, user=ROLE, password=PASSWORD)
            with psycopg.connect(role_dsn, autocommit=True) as conn:
                for name, params in cases:
                    page = int(params.get("page", 1))
                    kw = dict(status=params.get("status"), reviewer=params.get("reviewer"), limit=DEFAULT_PAGE_SIZE,
                              offset=(page - 1) * DEFAULT_PAGE_SIZE)
                    queue_page(conn, job_id, **kw)
                    sql_ms = []
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        total, terms, _c = queue_page(conn, job_id, **kw)
                        sql_ms.append((time.perf_counter() - t) * 1000)
                    client.get(f"/jobs/{job_id}", params=params)
                    http_ms = []
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        r = client.get(f"/jobs/{job_id}", params=params)
                        http_ms.append((time.perf_counter() - t) * 1000)
                        assert r.status_code == 200 and 'id="queue"' in r.text, r.text[:500]
                    # Baseline: the whole view filtered, sorted and cut (what a page without the two steps costs).
                    where, qparams = queue_filter(job_id, kw["status"], kw["reviewer"])
                    naive = sql.SQL("SELECT * FROM omop_emb.mapping_queue WHERE {} ORDER BY " + QUEUE_ORDER
                                    + " LIMIT %(limit)s OFFSET %(offset)s").format(where)
                    naive_ms = []
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        conn.execute(naive, {**qparams, "limit": kw["limit"], "offset": kw["offset"]}).fetchall()
                        naive_ms.append((time.perf_counter() - t) * 1000)
                    rows.append((name, total, len(terms), statistics.median(naive_ms), statistics.median(sql_ms),
                                 statistics.median(http_ms), pct(http_ms, 95), len(r.content)))

            browser_ms = None
            if Path(CHROMIUM).exists():
                from playwright.sync_api import sync_playwright

                with sync_playwright() as p:
                    b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    ctx = b.new_context()
                    pg = ctx.new_page()
                    pg.goto(url + "/login")
                    pg.fill("input[name=user]", ROLE)
                    pg.fill("input[name=password]", PASSWORD)
                    pg.click("button[type=submit]")
                    pg.wait_for_load_state()
                    browser_ms = []
                    for i in range(args.repeat + 1):
                        pg.goto(f"{url}/jobs/{job_id}?page={1 + i % pages}")
                        nav = pg.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
                        import json

                        e = json.loads(nav)
                        if i:
                            browser_ms.append(e["loadEventEnd"] - e["startTime"])
                    b.close()

        print(f"\nReview page of a {args.terms:,}-term job, {DEFAULT_PAGE_SIZE} terms per page, "
              f"{args.repeat} requests each, as a mapper role (row-level security on):\n")
        print("| Page | terms matching | whole view sorted, p50 ms (baseline) | page's queries p50 ms | "
              "HTTP p50 ms | HTTP p95 ms | HTTP / page's queries | HTML KB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, total, n, naive_p50, sql_p50, http_p50, http_p95, size in rows:
            print(f"| {name} | {total:,} | {naive_p50:.1f} | {sql_p50:.1f} | {http_p50:.1f} | {http_p95:.1f} | "
                  f"{http_p50 / sql_p50:.2f} | {size / 1024:.0f} |")
        if browser_ms:
            print(f"\nHeadless Chromium, navigation to load event, pages 1..{args.repeat}: "
                  f"p50 {statistics.median(browser_ms):.0f} ms, p95 {pct(browser_ms, 95):.0f} ms")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        cluster.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
