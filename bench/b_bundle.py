"""Embedding bundles: export a model's vectors to Parquet and import them into other databases,
timed, against the database's own INSERT ... SELECT of the same rows (same run):

- import into an empty model (bulk mode: rows stored, then the secondary indexes built once)
  against INSERT ... SELECT into a table with the primary key only, then the same indexes built;
- import into a model that holds 15% of the bundle's texts (merge mode: indexes maintained row
  by row, present texts skipped) against INSERT ... SELECT into a table with the same indexes;
- import again (everything present: skipped);
- optionally (``--before-src DIR``) the import of an older checkout (its python/ and SQL, e.g.
  ``git archive <rev> | tar -x -C DIR; python DIR/extension/build.py``), into a database it installs.

Each step also reports the CPU seconds it used, in the client (this process and its threads) and
in the database server (all processes of the cluster, when it runs on this machine): on a machine
shared with other work, wall-clock rates depend on the load, CPU seconds much less.

    python bench/b_bundle.py --n 100000 [--dsn ...] [--before-src DIR] [--out bench/results/bundle]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import b_query  # noqa: E402
from common import Database, ServerCpu, log  # noqa: E402

DUMMY_URL = "http://127.0.0.1:9"
REGISTER = ("SELECT omop_emb.register_model('bundle', 'openai', %s, dimensions => %s, "
            "document_prefix => 'passage: ', query_prefix => 'query: ')")

# Run in a subprocess with an older checkout's package first on sys.path (--before-src).
BEFORE_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import psycopg
from omop_emb_pg.install import install
from omop_emb_pg.bundle import import_bundle
mode, dsn, path, url, dims = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
if mode == "setup":
    install(dsn, method="script")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT omop_emb.register_model('bundle', 'openai', %s, dimensions => %s, "
                  "document_prefix => 'passage: ', query_prefix => 'query: ')", (url, dims))
else:
    c0 = time.process_time()
    r = import_bundle(dsn, path, "bundle")
    print(json.dumps({"seconds": r.seconds, "per_s": r.per_s, "imported": r.imported,
                      "client_cpu_s": time.process_time() - c0}))
"""


def _cpu(server: ServerCpu, n: int, client0: float, server0: float | None) -> dict:
    client = time.process_time() - client0
    srv = server.now() - server0 if server0 is not None else None
    out = {"client_cpu_s": client, "server_cpu_s": srv}
    if srv is not None:
        out["vectors_per_cpu_s"] = n / (client + srv) if client + srv else None
    return out


def _import(dsn: str, path: Path, server: ServerCpu) -> dict:
    from omop_emb_pg.bundle import import_bundle

    c0, s0 = time.process_time(), server.now()
    i = import_bundle(dsn, path, "bundle")
    return {"seconds": i.seconds, "per_s": i.per_s, "imported": i.imported, "skipped": i.skipped,
            "queued": i.queued, "mode": i.mode, "landed_seconds": i.landed_seconds,
            "landed_per_s": i.landed_per_s, "index_seconds": i.index_seconds, "indexes_built": i.indexes_built,
            **_cpu(server, i.rows, c0, s0)}


def _dst(db, name: str) -> str:
    dsn = db.create(name)
    db.install(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(REGISTER, (DUMMY_URL, b_query.DIM))
    return dsn


def _insert_select(dsn: str, n: int, server: ServerCpu) -> dict:
    """The database's own INSERT ... SELECT of the model's rows into a table of the same shape:
    with the same indexes, and with the primary key only followed by building the others."""
    out = {}
    with psycopg.connect(dsn) as c:
        c.execute("CREATE TABLE public.copy_ceiling (LIKE omop_emb.embedding_1 INCLUDING ALL)")
        s0 = server.now()
        t0 = time.perf_counter()
        c.execute("INSERT INTO public.copy_ceiling SELECT * FROM omop_emb.embedding_1")
        out["same_indexes_s"] = time.perf_counter() - t0
        out["same_indexes_server_cpu_s"] = server.now() - s0 if s0 is not None else None
        c.rollback()
        c.execute("CREATE TABLE public.copy_ceiling (LIKE omop_emb.embedding_1 INCLUDING ALL)")
        idx = c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                        "AND tablename = 'copy_ceiling' AND indexname NOT LIKE '%pkey'").fetchall()
        for name, _ in idx:
            c.execute(f"DROP INDEX public.{name}")
        s0 = server.now()
        t0 = time.perf_counter()
        c.execute("INSERT INTO public.copy_ceiling SELECT * FROM omop_emb.embedding_1")
        t1 = time.perf_counter()
        s1 = server.now()
        for _, ddl in idx:
            c.execute(ddl)
        c.execute("ANALYZE public.copy_ceiling")
        t2 = time.perf_counter()
        s2 = server.now()
        c.rollback()
    out.update(pk_only_rows_s=t1 - t0, pk_only_indexes_s=t2 - t1, pk_only_total_s=t2 - t0)
    if s0 is not None:
        out.update(pk_only_rows_server_cpu_s=s1 - s0, pk_only_total_server_cpu_s=s2 - s0)
    for k in ("same_indexes", "pk_only_rows", "pk_only_total"):
        out[k + "_per_s"] = n / out[k + "_s"]
    return out


def run(db, n: int, before_src: str | None = None) -> dict:
    """Export n vectors from one database of ``db`` and import them into others."""
    import pyarrow.parquet as pq

    from omop_emb_pg.bundle import export_bundle

    r: dict = {"vectors": n, "dims": b_query.DIM}
    server = ServerCpu(db.dsn("postgres"))
    r["load_average_before"] = os.getloadavg()
    src = db.create("bench_bundle_src")
    db.install(src)
    b_query.MODEL = "bundle"
    b_query.load(src, DUMMY_URL, n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.parquet"
        log(f"bundle: export {n:,} vectors")
        e = export_bundle(src, path, "bundle")
        r["export"] = {"seconds": e.seconds, "per_s": e.per_s, "bytes": e.bytes}
        if before_src:
            log("bundle: import with the code of --before-src (baseline)")
            dsn = db.create("bench_bundle_before")
            env = dict(os.environ, PYTHONPATH=str(Path(before_src) / "python"))
            s0 = None
            for step in ("setup", "import"):
                s0 = server.now()
                p = subprocess.run([sys.executable, "-c", BEFORE_SCRIPT, str(Path(before_src) / "python"), step,
                                    dsn, str(path), DUMMY_URL, str(b_query.DIM)],
                                   capture_output=True, text=True, env=env)
                if p.returncode:
                    raise RuntimeError(f"--before-src {step} failed: {p.stderr[-2000:]}")
            r["before"] = json.loads(p.stdout.strip().splitlines()[-1])
            r["before"]["src"] = str(before_src)
            if s0 is not None:
                r["before"]["server_cpu_s"] = server.now() - s0
                cpu = r["before"]["client_cpu_s"] + r["before"]["server_cpu_s"]
                r["before"]["vectors_per_cpu_s"] = n / cpu if cpu > 0 else None
        dst = _dst(db, "bench_bundle_dst")
        log(f"bundle: import into an empty model ({e.per_s:,.0f} vectors/s exported)")
        r["import"] = _import(dst, path, server)
        log(f"bundle: import again, everything present ({r['import']['per_s']:,.0f} vectors/s imported)")
        r["reimport"] = _import(dst, path, server)
        # merge mode: the model holds more than a tenth of the bundle's texts already (15%)
        merge = _dst(db, "bench_bundle_merge")
        part = Path(tmp) / "part.parquet"
        pq.write_table(pq.read_table(path).slice(0, max(1, n * 15 // 100)), part)
        _import(merge, part, server)
        log("bundle: import into a model holding 15% of the texts (merge mode)")
        r["merge"] = _import(merge, path, server)
    log("bundle: INSERT ... SELECT of the same rows inside the database (baselines)")
    r["insert_select"] = _insert_select(dst, n, server)
    r["load_average_after"] = os.getloadavg()
    return r


def _cpu_cell(x: dict, server_key: str = "server_cpu_s", client_key: str = "client_cpu_s", n: int = 0) -> str:
    srv = x.get(server_key)
    if srv is None:
        return ""
    client = x.get(client_key, 0.0)
    if client + srv <= 0:  # below the clock tick
        return f"({client:.1f} + {srv:.1f} s)"
    return f"{n / (client + srv):,.0f} ({client:.1f} + {srv:.1f} s)"


def markdown(r: dict) -> str:
    n = r["vectors"]
    i, s, m, b = r["import"], r["reimport"], r["merge"], r["insert_select"]
    rows = [
        f"Embedding bundle, {n:,} x {r['dims']} vectors (same run; load average "
        f"{r['load_average_before'][0]:.1f} before, {r['load_average_after'][0]:.1f} after, on "
        f"{os.cpu_count()} cores):", "",
        "| step | seconds | vectors/s | vectors per CPU second (client + database CPU) | against |",
        "|---|---|---|---|---|",
        f"| export (omop-emb-pg export) | {r['export']['seconds']:.1f} | {r['export']['per_s']:,.0f} | | |",
    ]
    if "before" in r:
        rows.append(f"| before: import into an empty model, the older code (`--before-src`) | "
                    f"{r['before']['seconds']:.1f} | {r['before']['per_s']:,.0f} | {_cpu_cell(r['before'], n=n)} | |")
    rows += [
        f"| import into an empty model (bulk mode), whole command | {i['seconds']:.1f} | {i['per_s']:,.0f} | "
        f"{_cpu_cell(i, n=n)} | {i['per_s'] / b['pk_only_total_per_s']:.2f} of INSERT ... SELECT, then the same "
        "indexes |",
        f"| - rows stored (read, COPY, insert; before the indexes) | {i['landed_seconds']:.1f} | "
        f"{i['landed_per_s']:,.0f} | | {i['landed_per_s'] / b['pk_only_rows_per_s']:.2f} of INSERT ... SELECT, "
        "primary key only |",
        f"| - {i['indexes_built']} secondary indexes built, ANALYZE | {i['index_seconds']:.1f} | | | "
        f"{b['pk_only_indexes_s']:.1f} s in the baseline |",
        f"| import into a model holding 15% of the texts (merge mode; {m['skipped']:,} skipped) | "
        f"{m['seconds']:.1f} | {m['per_s']:,.0f} | "
        f"{_cpu_cell(m, n=n)} | {m['per_s'] / b['same_indexes_per_s']:.2f} of INSERT ... SELECT, same indexes |",
        f"| import again (all present, skipped) | {s['seconds']:.1f} | {s['per_s']:,.0f} | {_cpu_cell(s, n=n)} | |",
        f"| baseline: INSERT ... SELECT of the same rows, primary key only, then the same indexes built | "
        f"{b['pk_only_total_s']:.1f} | {b['pk_only_total_per_s']:,.0f} | "
        f"{_cpu_cell(b, 'pk_only_total_server_cpu_s', n=n)} | rows {b['pk_only_rows_s']:.1f} s "
        f"({b['pk_only_rows_per_s']:,.0f}/s; {_cpu_cell(b, 'pk_only_rows_server_cpu_s', n=n)} per CPU s), "
        f"indexes {b['pk_only_indexes_s']:.1f} s |",
        f"| baseline: INSERT ... SELECT of the same rows, same indexes | {b['same_indexes_s']:.1f} | "
        f"{b['same_indexes_per_s']:,.0f} | {_cpu_cell(b, 'same_indexes_server_cpu_s', n=n)} | |",
        "", f"Bundle file: {r['export']['bytes'] / 1e6:.1f} MB (zstd)."]
    if "before" in r:
        rows.append(f"Import into an empty model, whole command, against the older code: "
                    f"{i['per_s'] / r['before']['per_s']:.1f}x the vectors/s"
                    + (f", {i['vectors_per_cpu_s'] / r['before']['vectors_per_cpu_s']:.1f}x the vectors per CPU "
                       "second." if i.get("vectors_per_cpu_s") and r["before"].get("vectors_per_cpu_s") else "."))
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--db-prefix", default="")
    ap.add_argument("--before-src", default=None,
                    help="a checkout (or `git archive` of python/ extension/ sql/) whose import is the baseline")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bundle"))
    a = ap.parse_args(argv)
    db = Database(a.dsn, prefix=a.db_prefix)
    try:
        r = run(db, a.n, a.before_src)
    finally:
        db.close()
    md = markdown(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=1, default=str))
    (out / "bundle.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
