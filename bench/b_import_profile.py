"""Where `omop-emb-pg import` spends its time, statement by statement: a bundle of N synthetic
vectors exported from one database and imported into an empty model of another (bulk mode),
twice, with each statement the client runs and each COPY timed from the client, and the
reader thread's encoding (``_copy_rows``, ``_copy_vectors``) timed where it runs.

    .venv/bin/python bench/b_import_profile.py [--n 100000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))
import psycopg  # noqa: E402

import b_bundle  # noqa: E402
import b_query  # noqa: E402
from common import Database  # noqa: E402
from omop_emb_pg import bundle  # noqa: E402

SECONDS: dict = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()


def _timed(key: str, t0: float) -> None:
    SECONDS[key] += time.perf_counter() - t0
    CALLS[key] += 1


def instrument() -> None:
    execute, copy = psycopg.Connection.execute, psycopg.Cursor.copy

    def timed_execute(self, query, *a, **k):
        t0 = time.perf_counter()
        try:
            return execute(self, query, *a, **k)
        finally:
            _timed(str(query)[:60], t0)

    @contextlib.contextmanager
    def timed_copy(self, query, *a, **k):
        t0 = time.perf_counter()
        with copy(self, query, *a, **k) as c:
            yield c
        _timed("COPY into " + str(query).split()[1], t0)

    psycopg.Connection.execute, psycopg.Cursor.copy = timed_execute, timed_copy
    for name in ("_copy_rows", "_copy_vectors"):
        encode = getattr(bundle, name)

        def timed_encode(*a, _encode=encode, _key="client " + name, **k):
            t0 = time.perf_counter()
            try:
                return _encode(*a, **k)
            finally:
                _timed(_key, t0)

        setattr(bundle, name, timed_encode)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    instrument()
    db = Database()
    try:
        src = db.create("bench_import_profile_src")
        db.install(src)
        b_query.MODEL = "bundle"
        b_query.load(src, b_bundle.DUMMY_URL, a.n)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bundle.parquet"
            bundle.export_bundle(src, path, "bundle")
            for rnd in range(a.rounds):
                dst = b_bundle._dst(db, f"bench_import_profile_dst{rnd}")
                SECONDS.clear()
                CALLS.clear()
                t0 = time.perf_counter()
                r = bundle.import_bundle(dst, path, "bundle")
                total = time.perf_counter() - t0
                print(f"round {rnd + 1}: {a.n:,} vectors, whole command {total:.2f} s ({a.n / total:,.0f}/s); rows "
                      f"stored {r.landed_seconds:.2f} s ({r.landed_per_s:,.0f}/s); indexes and ANALYZE "
                      f"{r.index_seconds:.2f} s")
                print("  seconds  calls  statement (index builds: summed over the connections that build at once)")
                for key, s in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
                    print(f"  {s:7.3f}  {CALLS[key]:5d}  {key}")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
