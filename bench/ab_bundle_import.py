"""Bundle import into an empty model, two source trees against each other: one bundle of N
synthetic vectors exported once, then imported with each tree's client and SQL (each installed
into a fresh database of one cluster), rounds alternating (A B A B ...) so that the machine's load
hits both alike. Prints and writes each import's whole-command time, the time until the rows
were stored and the time of the index builds (ImportReport).

    git archive main | tar -x -C /tmp/before && python /tmp/before/extension/build.py
    .venv/bin/python bench/ab_bundle_import.py --n 100000 --rounds 3 before=/tmp/before after=.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import b_query  # noqa: E402
from common import Database, log, write_result  # noqa: E402

DUMMY_URL = "http://127.0.0.1:9"
SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import psycopg
from omop_emb_pg.install import install
from omop_emb_pg.bundle import import_bundle
dsn, path, url, dims = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
install(dsn, method="script")
with psycopg.connect(dsn, autocommit=True) as c:
    c.execute("SELECT omop_emb.register_model('bundle', 'openai', %s, dimensions => %s, "
              "document_prefix => 'passage: ', query_prefix => 'query: ')", (url, dims))
r = import_bundle(dsn, path, "bundle")
print(json.dumps({"seconds": r.seconds, "per_s": r.per_s, "imported": r.imported, "mode": r.mode,
                  "landed_seconds": r.landed_seconds, "index_seconds": r.index_seconds,
                  "indexes_built": r.indexes_built}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="label=path of a source tree (built: extension/build.py)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    a = ap.parse_args(argv)
    trees = [t.split("=", 1) for t in a.trees]
    db = Database()
    res: dict = {"vectors": a.n, "rounds": [], "load_average_before": os.getloadavg()}
    try:
        src = db.create("ab_bundle_src")
        db.install(src)
        b_query.MODEL = "bundle"
        b_query.load(src, DUMMY_URL, a.n)
        from omop_emb_pg.bundle import export_bundle

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bundle.parquet"
            export_bundle(src, path, "bundle")
            for rnd in range(a.rounds):
                for label, root in trees:
                    dsn = db.create(f"ab_bundle_{label}")
                    py = str(Path(root).resolve() / "python")
                    p = subprocess.run([sys.executable, "-c", SCRIPT, py, dsn, str(path), DUMMY_URL,
                                        str(b_query.DIM)], capture_output=True, text=True,
                                       env=dict(os.environ, PYTHONPATH=py))
                    if p.returncode:
                        raise RuntimeError(f"{label}: {p.stderr[-2000:]}")
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                    r.update(label=label, round=rnd + 1, load_average=os.getloadavg()[0])
                    res["rounds"].append(r)
                    log(f"round {rnd + 1} {label}: {r['per_s']:,.0f} vectors/s ({r['seconds']:.2f} s: rows "
                        f"{r['landed_seconds']:.2f} s, indexes {r['index_seconds']:.2f} s, {r['indexes_built']} "
                        f"built), load {r['load_average']:.1f}")
    finally:
        db.close()
    if a.out:
        write_result(a.out, res, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
