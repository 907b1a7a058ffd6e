"""Where finishing a first indexing spends its time: each secondary index of an embedding
table (sqlgen.secondary_indexes) built alone over N synthetic concepts (instant server), and
all of them built one after another in one session against split over two sessions
(omop_emb_internal.index_build_next, as index_concepts run from two sessions does).

    .venv/bin/python bench/b_index_builds.py 100000
"""
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import psycopg  # noqa: E402
import b_indexing as bi  # noqa: E402
from common import Database, Proc, log  # noqa: E402
from ab_indexing import install  # noqa: E402


def secondary(c, mid):
    return c.execute("SELECT c.relname, pg_catalog.pg_get_indexdef(i.indexrelid) FROM pg_index i "
                     "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass "
                     "AND NOT i.indisprimary ORDER BY 1", (f"omop_emb.embedding_{mid}",)).fetchall()


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    db = Database()
    inst = Proc("instant")
    try:
        dsn = db.create("builds")
        install(str(ROOT), dsn)
        bi.make_synth_vocab(dsn, "synth", n)
        with psycopg.connect(dsn, autocommit=True) as c:
            bi.register(c, "b", inst.url)
            c.execute("CALL omop_emb.index_concepts(model => 'b', vocabulary_schema => 'synth')")
            mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name='b'").fetchone()[0]
            defs = secondary(c, mid)
            alone = {}
            for name, ddl in defs:
                c.execute(f"DROP INDEX omop_emb.{name}")
                t0 = time.perf_counter()
                c.execute(ddl)
                alone[name] = time.perf_counter() - t0
            tot = sum(alone.values())
            for name, s in sorted(alone.items(), key=lambda x: -x[1]):
                log(f"{name}: {s:.2f} s ({1e6 * s / n:.1f} us/concept, {100 * s / tot:.0f}%)")
            log(f"all {len(defs)} one after another: {tot:.2f} s ({1e6 * tot / n:.1f} us/concept)")

        def drop_all():
            with psycopg.connect(dsn, autocommit=True) as c:
                for name, _ in defs:
                    c.execute(f"DROP INDEX omop_emb.{name}")

        def builder():
            with psycopg.connect(dsn, autocommit=True) as c:
                while c.execute("SELECT omop_emb_internal.index_build_next('b')").fetchone()[0]:
                    pass

        for sessions in (1, 2, 1, 2):
            drop_all()
            t0 = time.perf_counter()
            ts = [threading.Thread(target=builder) for _ in range(sessions)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            s = time.perf_counter() - t0
            log(f"index_build_next from {sessions} session(s): {s:.2f} s ({1e6 * s / n:.1f} us/concept)")
    finally:
        inst.stop()
        db.close()


main()
