"""Embedding bundles: export a model's vectors to Parquet and import them into another database,
timed, against a plain binary COPY of the same rows into a table of the same shape (the ceiling).

    python bench/b_bundle.py --n 100000 [--dsn ...] [--out bench/results/bundle]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import b_query  # noqa: E402
from common import Database, log  # noqa: E402

DUMMY_URL = "http://127.0.0.1:9"


def run(db, n: int) -> dict:
    """Export n vectors from one database of ``db`` and import them into another."""
    from omop_emb_pg.bundle import export_bundle, import_bundle

    r: dict = {"vectors": n, "dims": b_query.DIM}
    src, dst = db.create("bench_bundle_src"), db.create("bench_bundle_dst")
    db.install(src)
    db.install(dst)
    b_query.MODEL = "bundle"
    b_query.load(src, DUMMY_URL, n)
    with psycopg.connect(dst, autocommit=True) as c:
        c.execute("SELECT omop_emb.register_model('bundle', 'openai', %s, dimensions => %s, "
                  "document_prefix => 'passage: ', query_prefix => 'query: ')", (DUMMY_URL, b_query.DIM))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.parquet"
        log(f"bundle: export {n:,} vectors")
        e = export_bundle(src, path, "bundle")
        r["export"] = {"seconds": e.seconds, "per_s": e.per_s, "bytes": e.bytes}
        log(f"bundle: import into an empty model ({e.per_s:,.0f} vectors/s exported)")
        i = import_bundle(dst, path, "bundle")
        r["import"] = {"seconds": i.seconds, "per_s": i.per_s, "imported": i.imported}
        log(f"bundle: import again (everything present: skipped) ({i.per_s:,.0f} vectors/s imported)")
        s = import_bundle(dst, path, "bundle")
        r["reimport"] = {"seconds": s.seconds, "per_s": s.per_s, "skipped": s.skipped}
    # the ceiling: the same rows copied inside the database into a table of the same shape and indexes
    with psycopg.connect(dst) as c:
        c.execute("CREATE TABLE public.copy_ceiling (LIKE omop_emb.embedding_1 INCLUDING ALL)")
        t0 = time.perf_counter()
        c.execute("INSERT INTO public.copy_ceiling SELECT * FROM omop_emb.embedding_1")
        r["insert_select_same_indexes_s"] = time.perf_counter() - t0
        c.commit()
    r["insert_select_per_s"] = n / r["insert_select_same_indexes_s"]
    return r


def markdown(r: dict) -> str:
    return "\n".join([
        f"Embedding bundle, {r['vectors']:,} x {r['dims']} vectors (same run):", "",
        "| step | seconds | vectors/s |", "|---|---|---|",
        f"| export (omop-emb-pg export) | {r['export']['seconds']:.1f} | {r['export']['per_s']:,.0f} |",
        f"| import into an empty model (omop-emb-pg import) | {r['import']['seconds']:.1f} | {r['import']['per_s']:,.0f} |",
        f"| import again (all present, skipped) | {r['reimport']['seconds']:.1f} | {r['reimport']['per_s']:,.0f} |",
        f"| baseline: INSERT ... SELECT of the same rows inside the database, same indexes | "
        f"{r['insert_select_same_indexes_s']:.1f} | {r['insert_select_per_s']:,.0f} |",
        "", f"Bundle file: {r['export']['bytes'] / 1e6:.1f} MB (zstd)."])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--db-prefix", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bundle"))
    a = ap.parse_args(argv)
    db = Database(a.dsn, prefix=a.db_prefix)
    try:
        r = run(db, a.n)
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
