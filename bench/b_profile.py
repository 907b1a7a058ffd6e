"""Where one nearest() call spends its time: cProfile of the extension's own Runtime methods,
run inside the backend (PL/Python), plus client-side timings of the SQL pieces it runs."""

from __future__ import annotations

import json
import time

import psycopg

PROFILE_NEAREST = r"""
CREATE OR REPLACE FUNCTION public.bench_profile_nearest(model_name text, vec text, texts text[], reps int)
RETURNS text LANGUAGE plpython3u AS $f$
import time, json, cProfile, pstats, io
if "omop_emb" not in GD:
    plpy.execute("SELECT omop_emb_internal._bootstrap()")
rt = GD["omop_emb"]
pc = time.perf_counter
out = {}
def run(label, fn, n):
    pr = cProfile.Profile()
    t0 = pc()
    pr.enable()
    for i in range(n):
        fn(i)
    pr.disable()
    dt = pc() - t0
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    out[label] = {"us_per_call_profiled": 1e6 * dt / n, "cprofile": s.getvalue()}
# timings without the profiler
def timed(label, fn, n):
    t0 = pc()
    for i in range(n):
        fn(i)
    out.setdefault("plain_us_per_call", {})[label] = 1e6 * (pc() - t0) / n
st = rt.settings(plpy)
model = rt.model(plpy, model_name, st)
timed("settings()", lambda i: rt.settings(plpy), reps)
timed("model()", lambda i: rt.model(plpy, model_name, st), reps)
import omop_emb_indb.vectors as vectors
timed("vectors.from_sql(query vector)", lambda i: vectors.from_sql(vec), reps)
timed("nearest_vector (whole, in Python)", lambda i: rt.nearest_vector(plpy, vec, 10, None, None, None, None, None, model_name), reps)
timed("nearest text, session-cached (whole, in Python)", lambda i: rt.nearest(plpy, texts[i % 5], 10, None, None, None, None, None, model_name), reps)
timed("nearest text, uncached (whole, in Python)", lambda i: rt.nearest(plpy, texts[5 + i], 10, None, None, None, None, None, model_name), min(reps, len(texts) - 5 - reps))
run("nearest_vector", lambda i: rt.nearest_vector(plpy, vec, 10, None, None, None, None, None, model_name), reps)
run("nearest_text_uncached", lambda i: rt.nearest(plpy, texts[5 + reps + i], 10, None, None, None, None, None, model_name), min(reps, len(texts) - 5 - 2 * reps))
return json.dumps(out)
$f$;
"""


def profile_nearest(dsn: str, model: str, mid: int, reps: int = 200) -> dict:
    tag = str(time.time_ns())[-8:]
    texts = [f"profile {tag} {i}" for i in range(5 + 4 * reps)]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(PROFILE_NEAREST)
        vec = c.execute(f"SELECT embedding::text FROM omop_emb.embedding_{mid} LIMIT 1").fetchone()[0]
        out = json.loads(c.execute("SELECT public.bench_profile_nearest(%s, %s, %s, %s)",
                                   (model, vec, texts, reps)).fetchone()[0])
        # the same call from SQL: PL/Python entry, SECURITY DEFINER, SET clauses, result rows
        for i in range(20):
            c.execute("SELECT * FROM omop_emb.nearest(%s::vector, 10, model => %s)", (vec, model)).fetchall()
        t0 = time.perf_counter()
        for i in range(reps):
            c.execute("SELECT * FROM omop_emb.nearest(%s::vector, 10, model => %s)", (vec, model)).fetchall()
        out["client_us_per_call_nearest_vector_sql"] = 1e6 * (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for i in range(reps):
            c.execute("SELECT 1").fetchall()
        out["client_us_per_call_select_1"] = 1e6 * (time.perf_counter() - t0) / reps
    return out
