"""index_concepts of several source trees against each other: each installed (script method)
into its own database of one cluster, indexed with the instant server at N synthetic concepts,
1 session then 2 sessions, back to back (rounds interleaved), so that the machine's load hits
every side alike. A tree given as ``label=path:256`` passes batch_size => 256.

    git archive main | tar -x -C /tmp/before
    .venv/bin/python bench/ab_indexing.py --n 100000 --rounds 2 before=/tmp/before after=.

``--cli`` also times ``omop-emb-pg index`` (1 job) of each tree, whole command: the client
of the tree, whose connection of its own may build indexes beside the session.
"""
import argparse
import os
import subprocess
import sys
import threading
import time

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import b_indexing as bi  # noqa: E402
import psycopg  # noqa: E402
from common import Database, Proc, log  # noqa: E402


def install(root, dsn):
    """Install the extension built from the source tree ``root`` (its own SQL and Python)."""
    root = str(Path(root).resolve())
    env = dict(os.environ, PYTHONPATH=root + "/python", OMOP_EMB_INSTALL_METHOD="script")
    subprocess.run([sys.executable, "-c", "import sys; from omop_emb_pg.install import install; "
                    "print(install(sys.argv[1]))", dsn], env=env, check=True)


def cli_one(root, dsn, model):
    """``omop-emb-pg index`` of the tree ``root`` (its own client), 1 job, timed as a whole."""
    root = str(Path(root).resolve())
    env = dict(os.environ, PYTHONPATH=root + "/python")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from omop_emb_pg.cli import main; sys.exit(main(sys.argv[1:]))",
                    "index", "--dsn", dsn, "--model", model, "--schema", "synth", "--progress", "none"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def two(dsn, n, model, batch=None):
    results = [None, None]

    def worker(i):
        results[i] = bi.run_index(dsn, model, "synth", batch_size=batch)

    ta = threading.Thread(target=worker, args=(0,))
    ta.start()
    with psycopg.connect(dsn, autocommit=True) as c:
        while True:
            r = c.execute("SELECT done + pending FROM omop_emb.index_status WHERE model = %s", (model,)).fetchone()
            act = c.execute("SELECT count(*) FROM omop_emb.index_progress p JOIN omop_emb.model m "
                            "USING (model_id) WHERE m.name = %s", (model,)).fetchone()[0]
            if act and r and r[0] >= n:
                break
            time.sleep(0.05)
    tb = threading.Thread(target=worker, args=(1,))
    tb.start()
    ta.join(); tb.join()
    a, b = results
    end = max(a["t_end"], b["t_end"])
    return {"total_s": end - a["t_start"], "per_s": n / (end - a["t_start"]),
            "embed_phase_per_s": n / (end - a["t_prepared"]), "by_session": [a["embedded"], b["embedded"]],
            "prepare_s": a["prepare_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--no-two", action="store_true")
    ap.add_argument("--cli", action="store_true",
                    help="also time `omop-emb-pg index` (1 job) of each tree, whole command")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--datadir", default=None)
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    db = Database(datadir=a.datadir)
    inst = Proc("instant")
    try:
        vs = [v.split("=", 1) for v in a.variants]
        batches = {}
        for v in vs:
            if ":" in v[1]:
                v[1], b = v[1].split(":")
                batches[v[0]] = int(b)
        dsns = {}
        for label, root in vs:
            same = [l for l, r in vs if r == root and l in dsns]
            if same:
                dsns[label] = dsns[same[0]]
                continue
            dsn = db.create("ab_" + label)
            install(root, dsn)
            bi.make_synth_vocab(dsn, "synth", a.n)
            dsns[label] = dsn
        for rnd in range(a.rounds):
            for label, root in vs:
                dsn = dsns[label]
                with psycopg.connect(dsn, autocommit=True) as c:
                    bi.register(c, "one", inst.url)
                r = bi.run_index(dsn, "one", "synth", batch_size=batches.get(label))
                with psycopg.connect(dsn, autocommit=True) as c:
                    rows = c.execute("SELECT count(*) FROM omop_emb.embedding_%d" % c.execute(
                        "SELECT model_id FROM omop_emb.model WHERE name='one'").fetchone()[0]).fetchone()[0]
                log(f"[{label}] 1 session: {a.n / r['total_s']:,.0f} concepts/s end to end "
                    f"({1e6 * r['total_s'] / a.n:.1f} us/concept), embed phase "
                    f"{a.n / (r['t_end'] - r['t_prepared']):,.0f}/s, prepare {r['prepare_s']:.1f}s, rows {rows}")
            if a.cli:
                for label, root in vs:
                    dsn = dsns[label]
                    with psycopg.connect(dsn, autocommit=True) as c:
                        bi.register(c, "cli", inst.url)
                    secs = cli_one(root, dsn, "cli")
                    log(f"[{label}] omop-emb-pg index, 1 job: {a.n / secs:,.0f} concepts/s, whole command "
                        f"({1e6 * secs / a.n:.1f} us/concept)")
            if not a.no_two:
                for label, root in vs:
                    dsn = dsns[label]
                    with psycopg.connect(dsn, autocommit=True) as c:
                        bi.register(c, "two", inst.url)
                    t = two(dsn, a.n, "two", batches.get(label))
                    with psycopg.connect(dsn, autocommit=True) as c:
                        rows = c.execute("SELECT count(*), count(DISTINCT (concept_id, text_kind, text)) FROM omop_emb.embedding_%d" % c.execute(
                            "SELECT model_id FROM omop_emb.model WHERE name='two'").fetchone()[0]).fetchone()
                    log(f"[{label}] 2 sessions: {t['per_s']:,.0f} concepts/s end to end, embed phase "
                        f"{t['embed_phase_per_s']:,.0f}/s, by session {t['by_session']}, rows {rows}")
    finally:
        inst.stop()
        db.close()


if __name__ == "__main__":
    main()
