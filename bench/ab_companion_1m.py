"""The cost of a companion model at 1M: cached nearest(text, 10) in modes semantic and fused, with
and without a companion named by the model's ranking, on a kept bench/b_realistic.py cluster.

The companion is a second model over the same 1,000,000 texts, loaded from a bundle of the first
(``omop-emb-pg export`` / ``import``: the same identity, so the same query vectors; what it costs
does not depend on what its vectors are: one query embedding, from the cache here, and one lookup
of the candidates' concepts in its table). Its ranking is the shipped e5 + MiniLM pair's weights
naming it. Blocks alternate (no companion, companion; twice), the modes interleaved query by
query inside each block, so each block has its own semantic baseline; at the calibrated ef_search
and at ``--ef`` (the ef_search whose recall@10 reaches 0.98 on the cluster's real queries).

    .venv/bin/python bench/ab_companion_1m.py --datadir /tmp/x/data --model real1m_half --ef 800
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "extension"))

import b_query  # noqa: E402
from common import Database, Proc, log, summary_ms, write_result  # noqa: E402

COMPANION = "companion1m"


def ensure_companion(dsn: str, model: str, url: str) -> None:
    from omop_emb_pg.bundle import export_bundle, import_bundle

    with psycopg.connect(dsn, autocommit=True) as c:
        m = c.execute("SELECT provider, remote_model, dimensions, metric, document_prefix, query_prefix "
                      "FROM omop_emb.model WHERE name = %s", (model,)).fetchone()
        have = c.execute("SELECT count(*) FROM omop_emb.model WHERE name = %s", (COMPANION,)).fetchone()[0]
        if have:
            return
        c.execute("SELECT omop_emb.register_model(%s, %s, %s, dimensions => %s, metric => %s, "
                  "document_prefix => %s, query_prefix => %s, remote_model => %s)",
                  (COMPANION, m[0], url, m[2], m[3], m[4], m[5], m[1]))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bundle.parquet"
        log(f"exporting {model}")
        export_bundle(dsn, path, model)
        log(f"importing into {COMPANION}")
        r = import_bundle(dsn, path, COMPANION, rebuild_hnsw=False)
        log(f"imported {r.imported} rows in {r.seconds:.0f} s")


def mid(c, model: str) -> int:
    return c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (model,)).fetchone()[0]


def block(c, model: str, texts: list[str]) -> dict:
    lat = b_query.interleaved(c, model, texts, ("semantic", "fused"))
    out = {m: summary_ms(v) for m, v in lat.items()}
    out["fused_over_semantic_p50"] = round(out["fused"]["p50_ms"] / out["semantic"]["p50_ms"], 2)
    return out


def measure(dsn: str, model: str, url: str, n_queries: int = 200, ef: int = 800, rounds: int = 2) -> dict:
    """The blocks on ``model`` of the database at ``dsn`` (its companion loaded first when missing),
    the e5 server at ``url`` answering both models; returns every block's figures and their medians."""
    from omop_emb_indb import companion_weights

    weights = dict(next(iter(companion_weights.DEFAULTS.values())), companion=COMPANION)
    res: dict = {"model": model, "companion": COMPANION, "runs": []}
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (model, url))
    ensure_companion(dsn, model, url)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT omop_emb.alter_model(%s, endpoint => %s)", (COMPANION, url))
        texts = [r[0].removeprefix("query: ") for r in c.execute(
            "SELECT q.text FROM omop_emb.query_cache q JOIN omop_emb.model m USING (model_id) "
            "WHERE m.name = %s AND q.role = 'query' ORDER BY q.created_at LIMIT %s", (model, n_queries))]
        if len(texts) < n_queries:  # no measure phase yet: real names of the table's texts
            texts += [r[0] for r in c.execute(
                "SELECT name FROM (SELECT DISTINCT split_part(text, ' #', 1) AS name FROM omop_emb.embedding_%d) s "
                "ORDER BY md5(name) LIMIT %%s" % mid(c, model), (n_queries - len(texts),))]
        res["queries"] = len(texts)
        res["scale"] = f"{c.execute('SELECT count(*) FROM omop_emb.embedding_%d' % mid(c, model)).fetchone()[0]:,}"
        for t in texts:  # both models' query vectors cached first: the timed calls embed nothing
            for m in (model, COMPANION):
                c.execute("SELECT omop_emb.embed(%s, 'query', %s)", (t, m)).fetchone()
        res["index_params"] = c.execute("SELECT index_params FROM omop_emb.status() WHERE model = %s",
                                        (model,)).fetchone()[0]
        try:
            for ef_ in (None, ef):
                c.execute("SELECT set_config('omop_emb.ef_search', %s, false)", ("" if ef_ is None else str(ef_),))
                for r in range(rounds):
                    for with_companion in (False, True):
                        c.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)",
                                  (model, json.dumps(weights) if with_companion else None))
                        b_query.interleaved(c, model, texts, ("semantic", "fused"))  # warm: plans, pages
                        out = {"ef_search": ef_ or "calibrated", "companion": with_companion, "round": r + 1,
                               **block(c, model, texts)}
                        res["runs"].append(out)
                        log(json.dumps(out))
        finally:
            c.execute("SELECT omop_emb.set_ranking(%s, NULL)", (model,))
    for ef_ in ("calibrated", ef):
        for with_companion in (False, True):
            runs = [x for x in res["runs"] if x["ef_search"] == ef_ and x["companion"] == with_companion]
            res.setdefault("median", []).append({
                "ef_search": ef_, "companion": with_companion,
                "fused_p50_ms": statistics.median(x["fused"]["p50_ms"] for x in runs),
                "semantic_p50_ms": statistics.median(x["semantic"]["p50_ms"] for x in runs),
                "fused_over_semantic_p50": statistics.median(x["fused_over_semantic_p50"] for x in runs)})
    return res


def markdown_rows(res: dict) -> list[tuple]:
    """report.py rows: the default ranking of the demo (fused + companion) against semantic at p50."""
    out = []
    for m in res.get("median", []):
        what = "fused + companion (the demo's default)" if m["companion"] else "fused"
        out.append((f"nearest(text, 10) cached, realistic {res['scale']} x 384, {what} / semantic "
                    f"at p50 <= 1.5, ef_search {m['ef_search']} (bench/ab_companion_1m.py)",
                    f"p50 {m['fused_p50_ms']:.2f} ms", f"semantic p50 {m['semantic_p50_ms']:.2f} ms",
                    f"{m['fused_over_semantic_p50']:.2f}", m["fused_over_semantic_p50"] <= 1.5))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datadir", required=True)
    ap.add_argument("--model", default="real1m_half")
    ap.add_argument("--db", default="bench_realistic")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "modes_realistic_1m_companion" / "ab.json"))
    a = ap.parse_args()
    db = Database(datadir=a.datadir)
    e5 = Proc("e5")
    try:
        res = measure(db.dsn(a.db), a.model, e5.url, a.queries, a.ef, a.rounds)
    finally:
        e5.stop()
        db.close()
    write_result(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
