"""Where index_batch spends its time, measured on the real code of two source trees at once:
each installed into its own database, queue of N synthetic concepts (instant server), stored
without the secondary indexes as a first indexing does; batches alternate between the trees
(on a shared machine only alternating batches see the same load). Phases are wall time in the
backend's thread: the claim queries, HTTP waited for in that thread (requests made there, or
answers of the pipeline not there yet), the COPY of the rows (encoding, file, COPY), the rest
(settings, prefix, progress, threads); the secondary index builds are timed at the end over all
rows, from one session and split over two (omop_emb_internal.index_build_next, when the tree
has it).

    git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python bench/b_phases.py --n 100000 before=/tmp/before after=.
"""
import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import psycopg  # noqa: E402
import b_indexing as bi  # noqa: E402
from common import Database, Proc, log  # noqa: E402
from ab_indexing import install  # noqa: E402

FN = r"""
CREATE OR REPLACE FUNCTION public.bench_phases(model_name text) RETURNS text LANGUAGE plpython3u AS $f$
import json, threading, time
if "omop_emb" not in GD:
    plpy.execute("SELECT omop_emb_internal._bootstrap()")
rt = GD["omop_emb"]
pc = time.perf_counter
T = GD.setdefault("bench_phases", {})
main = threading.get_ident()
def timed(key, fn):
    def w(*a, **k):
        if threading.get_ident() != main:
            return fn(*a, **k)
        t0 = pc()
        try:
            return fn(*a, **k)
        finally:
            T[key] = T.get(key, 0.0) + pc() - t0
    w.bench_wrapped = True
    return w
if not GD.get("bench_wrapped"):
    GD["bench_wrapped"] = True
    rt.http.embed = timed("HTTP waited for in the backend's thread", rt.http.embed)
    rt._copy_rows = timed("rows stored (sha256 excluded; COPY data, file, COPY)", rt._copy_rows)
    plan = rt.plan
    def plan_w(plpy_, key, sql, types=()):
        p = plan(plpy_, key, sql, types)
        if isinstance(key, tuple) and key[0] == "claim":
            class P:
                def execute(self, args):
                    t0 = pc()
                    try:
                        return p.execute(args)
                    finally:
                        T["claim queries"] = T.get("claim queries", 0.0) + pc() - t0
            return P()
        return p
    rt.plan = plan_w
    try:
        from omop_emb_indb import http_client
        if hasattr(http_client, "EmbeddingPipeline"):
            http_client.EmbeddingPipeline.result = timed("HTTP waited for in the backend's thread",
                                                        http_client.EmbeddingPipeline.result)
    except ImportError:
        pass
t0 = pc()
n = rt.call(plpy, "index_batch", model_name, None)
T["whole index_batch"] = T.get("whole index_batch", 0.0) + pc() - t0
return json.dumps([n, T])
$f$;
"""


def secondary(c, mid):
    return c.execute("SELECT c.relname, pg_catalog.pg_get_indexdef(i.indexrelid) FROM pg_index i "
                     "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass "
                     "AND NOT i.indisprimary ORDER BY 1", (f"omop_emb.embedding_{mid}",)).fetchall()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    db = Database()
    inst = Proc("instant")
    try:
        trees = [v.split("=", 1) for v in a.variants]
        conns, mids, defs = {}, {}, {}
        for label, root in trees:
            dsn = db.create("ph_" + label)
            install(root, dsn)
            bi.make_synth_vocab(dsn, "synth", a.n)
            c = psycopg.connect(dsn, autocommit=True)
            bi.register(c, "p", inst.url)
            c.execute("CALL omop_emb.index_concepts(model => 'p', vocabulary_schema => 'synth', max_texts => 1)")
            mids[label] = mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name='p'").fetchone()[0]
            defs[label] = secondary(c, mid)
            for name, _ in defs[label]:
                c.execute(f"DROP INDEX omop_emb.{name}")
            c.execute(FN)
            conns[label] = (c, dsn)
        done = {label: 0 for label, _ in trees}
        phases = {}
        live = [label for label, _ in trees]
        while live:
            for label in list(live):
                k, T = json.loads(conns[label][0].execute("SELECT public.bench_phases('p')").fetchone()[0])
                if k <= 0:
                    live.remove(label)
                    continue
                done[label] += k
                phases[label] = T
        for label, root in trees:
            c, dsn = conns[label]
            T = phases[label]
            n = done[label]
            whole = T.pop("whole index_batch")
            T["rest (settings, prefix, sha256, progress, threads)"] = whole - sum(T.values())
            # the index builds, over all rows: one session, then split over two
            builds = {}
            for sessions in (1, 2):
                for name, _ in secondary(c, mids[label]):
                    c.execute(f"DROP INDEX omop_emb.{name}")
                t0 = time.perf_counter()
                if sessions == 1 or not c.execute("SELECT to_regprocedure('omop_emb_internal.index_build_next(text)') "
                                                  "IS NOT NULL").fetchone()[0]:
                    if sessions == 2:
                        continue
                    for _, ddl in defs[label]:
                        c.execute(ddl)
                else:
                    def builder():
                        with psycopg.connect(dsn, autocommit=True) as b:
                            while b.execute("SELECT omop_emb_internal.index_build_next('p')").fetchone()[0]:
                                pass
                    ts = [threading.Thread(target=builder) for _ in range(2)]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                builds[sessions] = time.perf_counter() - t0
            T["secondary indexes built at the end, 1 session"] = builds[1]
            tot = sum(T.values())
            log(f"[{label}] {n} texts, {1e6 * whole / n:.1f} us/concept in index_batch, "
                f"{1e6 * tot / n:.1f} with the index builds ({n / tot:,.0f} concepts/s)")
            for k, v in sorted(T.items(), key=lambda x: -x[1]):
                log(f"[{label}]   {k}: {1e6 * v / n:.1f} us/concept ({100 * v / tot:.0f}%)")
            if 2 in builds:
                log(f"[{label}]   (index builds split over 2 sessions: {1e6 * builds[2] / n:.1f} us/concept, "
                    f"against {1e6 * builds[1] / n:.1f} from 1)")
            c.close()
    finally:
        inst.stop()
        db.close()


if __name__ == "__main__":
    main()
