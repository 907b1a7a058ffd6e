"""index_batch with 1 against 2 requests in flight (indexing.PIPELINE_REQUESTS), or batches
of other sizes ("2x512": 2 in flight, 512 texts per batch), batch by batch interleaved in one
database with the instant server: on a shared machine only alternating batches see the same
load. The tree before the pipeline is compared with bench/b_phases.py.

    .venv/bin/python bench/b_pipeline.py 100000 1,2
    .venv/bin/python bench/b_pipeline.py 100000 2x256,2x512,3x512
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import psycopg  # noqa: E402
import b_indexing as bi  # noqa: E402
from common import Database, Proc, log  # noqa: E402
from ab_indexing import install  # noqa: E402

FN = r"""
CREATE OR REPLACE FUNCTION public.bench_batch(mode text) RETURNS text LANGUAGE plpython3u AS $f$
# mode: "<requests in flight>" or "<requests in flight>x<texts per batch>"
import time, json
if "omop_emb" not in GD:
    plpy.execute("SELECT omop_emb_internal._bootstrap()")
rt = GD["omop_emb"]
import omop_emb_indb.indexing as indexing
flight, _, size = mode.partition("x")
indexing.PIPELINE_REQUESTS = int(flight)
t0 = time.perf_counter()
n = rt.call(plpy, "index_batch", "p", int(size) if size else None)
return json.dumps([n, time.perf_counter() - t0])
$f$;
"""

def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60000
    db = Database(); inst = Proc("instant")
    try:
        dsn = db.create("pipe")
        install(str(ROOT), dsn)
        bi.make_synth_vocab(dsn, "synth", n)
        with psycopg.connect(dsn, autocommit=True) as c:
            bi.register(c, "p", inst.url)
            c.execute("CALL omop_emb.index_concepts(model => 'p', vocabulary_schema => 'synth', max_texts => 1)")
            mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name='p'").fetchone()[0]
            for (name,) in c.execute("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                     "WHERE i.indrelid = %s::regclass AND NOT i.indisprimary",
                                     (f"omop_emb.embedding_{mid}",)).fetchall():
                c.execute(f"DROP INDEX omop_emb.{name}")
            c.execute(FN)
            modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["1", "2"]
            tot = {m: [0, 0.0, 0.0] for m in modes}; per = {m: [] for m in modes}
            i = 0
            while True:
                m = modes[i % len(modes)]; i += 1
                t0 = time.perf_counter()
                k, inner = json.loads(c.execute("SELECT public.bench_batch(%s)", (m,)).fetchone()[0])
                dt = time.perf_counter() - t0
                if k <= 0:
                    break
                tot[m][0] += k; tot[m][1] += dt; tot[m][2] += inner; per[m].append(1e6*dt/k)
            for m, (k, dt, inner) in tot.items():
                log(f"{m} in flight: {k} texts, {1e6*dt/k:.1f} us/text client ({k/dt:,.0f}/s), {1e6*inner/k:.1f} us/text inside; median batch {sorted(per[m])[len(per[m])//2]:.1f} us/text")
    finally:
        inst.stop(); db.close()

main()
