"""Where one nearest(mode => 'fused') call spends its time, beside mode 'semantic'.

Runs inside the backend (PL/Python): every prepared statement the runtime executes is timed
(Runtime.plan wrapped), the rest of the call is Python; then EXPLAIN ANALYZE of each statement
of one fused call with its real parameters.

    .venv/bin/python bench/b_fused_profile.py DSN [--model NAME] [--queries 40] [--explain]

Uses the query texts of the modes benchmark (b_query.query_texts), embedded once first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROFILE_FUSED = r"""
CREATE OR REPLACE FUNCTION public.bench_profile_fused(model_name text, texts text[], modes text[],
                                                      rounds int, explain boolean)
RETURNS text LANGUAGE plpython3u AS $f$
import time, json
# what nearest()'s SET clauses set
plpy.execute("SET hnsw.iterative_scan = 'relaxed_order'")
plpy.execute("SELECT omop_emb_internal._bootstrap()")
rt = GD["omop_emb"]
from omop_emb_indb import ranking
plpy.execute("SET pg_trgm.similarity_threshold = %s" % ranking.TRIGRAM_THRESHOLD)
pc = time.perf_counter
out = {}
stats = {}
captured = {}
orig_plan = type(rt).plan

class Timed:
    def __init__(self, key, sql, types, p):
        self.key, self.sql, self.types, self.p = key, sql, types, p
    def execute(self, args, *rest):
        t0 = pc()
        r = self.p.execute(args, *rest)
        dt = pc() - t0
        name = self.key[0] if isinstance(self.key, tuple) else self.key
        s = stats.setdefault(name, [0.0, 0])
        s[0] += dt
        s[1] += 1
        captured.setdefault(name, (self.sql, self.types, list(args)))
        return r

def plan(self, plpy_, key, sql, types=()):
    return Timed(key, sql, list(types), orig_plan(self, plpy_, key, sql, types))

rt.plan = plan.__get__(rt)
try:
    for mode in modes:
        for t in texts:  # warm: plans prepared, query vectors in the session cache
            rt.nearest(plpy, t, 10, None, None, None, None, None, model_name, mode, None)
        stats.clear()
        t0 = pc()
        for _ in range(rounds):
            for t in texts:
                rt.nearest(plpy, t, 10, None, None, None, None, None, model_name, mode, None)
        n = rounds * len(texts)
        total = (pc() - t0) * 1000.0 / n
        sql_ms = {k: v[0] * 1000.0 / n for k, v in stats.items()}
        out[mode] = {"ms_per_call": total, "statements_ms": sql_ms,
                     "executions_per_call": {k: v[1] / n for k, v in stats.items()},
                     "python_ms": total - sum(sql_ms.values())}
        if explain:
            captured.clear()
            rt.nearest(plpy, texts[0], 10, None, None, None, None, None, model_name, mode, None)
            out[mode]["explain"] = {}
            for name, (sql, types, args) in captured.items():
                p = plpy.prepare("EXPLAIN (ANALYZE, BUFFERS) " + sql, types)
                out[mode]["explain"][name] = [r["QUERY PLAN"] for r in p.execute(args)]
finally:
    del rt.plan
return json.dumps(out)
$f$;
"""


def profile(dsn: str, model: str, n: int, rounds: int = 3, explain: bool = False,
            modes=("semantic", "fused"), untagged: bool = False) -> dict:
    import b_query

    texts = b_query.query_texts(n, "pf" + str(time.time_ns())[-6:], 31)
    if untagged:  # the words alone: their trigrams are all common, the GIN lookup costs more
        texts = [t.rsplit(" ", 1)[0] for t in texts]
    with psycopg.connect(dsn, autocommit=True) as c:
        for t in texts:
            c.execute("SELECT omop_emb.embed(%s, 'query', %s)", (t, model)).fetchone()
        c.execute(PROFILE_FUSED)
        out = json.loads(c.execute("SELECT public.bench_profile_fused(%s, %s, %s, %s, %s)",
                                   (model, texts, list(modes), rounds, explain)).fetchone()[0])
        c.execute("DROP FUNCTION public.bench_profile_fused(text, text[], text[], int, boolean)")
    out["queries"] = n
    out["rounds"] = rounds
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default=None, help="database holding the benchmark model (superuser)")
    ap.add_argument("--datadir", default=None, help="or: run_all's kept LocalCluster (--datadir)")
    ap.add_argument("--db", default="bench_query")
    ap.add_argument("--model", default=None)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--explain", action="store_true")
    ap.add_argument("--untagged", action="store_true",
                    help="queries without the benchmark's unique number (realistic trigram lookups)")
    a = ap.parse_args(argv)
    import b_query

    from common import Database, Proc

    model = a.model or b_query.MODEL
    db = Database(a.dsn, a.datadir)
    try:
        dsn = db.dsn(a.db)
        with Proc("instant") as inst, psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (model, inst.url))
            res = profile(dsn, model, a.queries, a.rounds, a.explain, untagged=a.untagged)
    finally:
        db.close()
    for mode in ("semantic", "fused"):
        r = res[mode]
        print(f"{mode}: {r['ms_per_call']:.2f} ms per call (in the backend), Python {r['python_ms']:.2f} ms")
        for k, v in sorted(r["statements_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:<14} {v:6.2f} ms  ({r['executions_per_call'][k]:.1f} per call)")
        for k, plan in (r.get("explain") or {}).items():
            print(f"--- EXPLAIN ANALYZE {mode} / {k}")
            print("\n".join(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
