"""Smoke run of the benchmarks at tiny sizes (fake servers only), so that bench/ does not rot.

The real benchmark is `make bench` (bench/run_all.py); this only checks that every part runs
end to end and writes its JSON, markdown table and plots.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path, pg):
    pytest.importorskip("matplotlib")
    pytest.importorskip("numpy")
    pytest.importorskip("pgvector")
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "run_all.py"), "--scale", "2000", "--index-scale", "1000", "--quick", "--no-e5",
           "--latency-queries", "20", "--recall-queries", "10", "--memory-calls", "60",
           "--dsn", pg, "--db-prefix", f"smoke_{tmp_path.name[-8:]}_", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert not res.get("errors")
    assert res["indexing"]["one_session"]["embedded"] == 1000
    # the session's CPU per concept is read from /proc (the cluster runs on this machine)
    assert res["indexing"]["one_session"]["backend_cpu_us_per_concept"] > 0
    assert res["indexing"]["one_session_other_request_size"]["embedded"] == 1000
    assert sum(res["indexing"]["two_sessions"]["embedded_by_session"]) == 1000
    assert res["latency"]["nearest_text_cached_session"]["n"] == 20
    assert res["recall"]["ground_truth_check_overlap"] >= 0.9
    for case in res["recall"]["cases"].values():
        assert 0.0 <= case["by_ef"]["default"]["recall_at_10"] <= 1.0
    assert res["halfvec"]["models"]["hv_half"]["table_bytes"] < res["halfvec"]["models"]["hv_vector"]["table_bytes"]
    assert res["bundle"]["import"]["imported"] == 1000 and res["bundle"]["reimport"]["skipped"] == 1000
    md = (out / "benchmarks.md").read_text()
    assert "| Goal |" in md and "Recall@10" in md
    assert "halfvec against vector" in md and "Embedding bundle" in md
    for png in ("latency_cdf.png", "recall_latency.png", "memory_rss.png", "indexing.png"):
        assert (out / png).stat().st_size > 1000, png
