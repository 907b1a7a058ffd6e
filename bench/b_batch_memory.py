"""Memory of one backend running nearest_batch (issue 12, item 10).

A throwaway PostgreSQL cluster, the deterministic embedding server, N synthetic
concepts; then, per case, a fresh session runs one small warm-up search and one
``SELECT count(*) FROM omop_emb.nearest_batch(<Q queries>, k)``, and the backend's
peak resident memory (VmHWM of /proc/<pid>/status) above its RSS after the warm-up
is printed. Run it on another checkout to compare (``--root``: its client package
and its built extension are used):

    .venv/bin/python bench/b_batch_memory.py                      # this checkout
    .venv/bin/python bench/b_batch_memory.py --root /tmp/old-tree # e.g. an older commit

Under 2 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose client and extension to use")
    ap.add_argument("--concepts", type=int, default=3000)
    ap.add_argument("--cases", default="50x1000,200x1000,2000x100",
                    help="comma-separated QUERIESxK (embed:QUERIESxK: embed_batch of the queries only)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.root / "python"))
    import psycopg

    from omop_emb_pg.cluster import LocalCluster
    from omop_emb_pg.install import install
    from omop_emb_pg.testing import DeterministicEmbeddingServer

    base = tempfile.mkdtemp(prefix="omop_emb_bench_mem_")
    Path(base).chmod(0o755)
    cluster = LocalCluster(Path(base) / "data", fsync=False)
    cluster.start()
    try:
        with DeterministicEmbeddingServer(dim=384) as srv:
            dsn = cluster.dsn("postgres")
            install(dsn, method="script")
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("CREATE SCHEMA vocab")
                c.execute("CREATE TABLE vocab.concept (concept_id int PRIMARY KEY, concept_name text, "
                          "domain_id text, vocabulary_id text, concept_class_id text, standard_concept text, "
                          "concept_code text, invalid_reason text)")
                c.execute("INSERT INTO vocab.concept SELECT i, 'concept ' || i, 'Condition', 'V', 'C', 'S', "
                          "'c' || i, NULL FROM generate_series(1, %s) i", (args.concepts,))
                c.execute("SELECT omop_emb.register_model('fake', 'openai', %s, dimensions => 384, "
                          "document_prefix => '', query_prefix => '')", (srv.url,))
                c.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab', batch_size => 500)")
                c.execute("SELECT omop_emb.create_index('fake')")
            print(f"root {args.root}  ({args.concepts} concepts, 384 dimensions)")
            print(f"{'queries x k':>14} {'rows':>9} {'seconds':>8} {'peak MB above warm':>19}")
            for case in args.cases.split(","):
                embed_only = case.startswith("embed:")  # the embedding phase alone
                q, k = (int(x) for x in case.removeprefix("embed:").split("x"))
                queries = [f"query {case} {i}" for i in range(q)]
                sql = ("SELECT cardinality(omop_emb.embed_batch(%s, 'query')) + 0 * %s" if embed_only
                       else "SELECT count(*) FROM omop_emb.nearest_batch(%s, %s)")
                with psycopg.connect(dsn, autocommit=True) as c:
                    pid = c.info.backend_pid
                    c.execute("SELECT count(*) FROM omop_emb.nearest_batch(ARRAY['warm up'], 10)")
                    warm = proc_kb(pid, "VmRSS")
                    t0 = time.monotonic()
                    try:
                        rows = c.execute(sql, (queries, k)).fetchone()[0]
                    except psycopg.Error as e:
                        print(f"{case:>14} refused: {e.diag.message_primary}")
                        continue
                    secs = time.monotonic() - t0
                    peak = proc_kb(pid, "VmHWM")
                print(f"{case:>14} {rows:>9} {secs:>8.1f} {(peak - warm) / 1024:>19.0f}")
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
