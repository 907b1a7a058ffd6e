"""Markdown table and PNG plots from bench/results/results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(x, nd=1):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def rows(r: dict) -> list[tuple]:
    """(goal, measured, baseline, ratio, met) per goal."""
    out = []
    e5 = r.get("e5_indexing")
    if e5:
        out.append(("Indexing, e5 server: index_concepts / raw server throughput >= 0.95",
                    f"{_f(e5['index_per_s'])} concepts/s ({e5['embedded']} texts, {','.join(e5['domains'])})",
                    f"{_f(e5['raw_per_s'])} texts/s raw, batch {e5['batch_size']}", f"{e5['ratio']:.3f}",
                    e5["ratio"] >= 0.95))
    ix = r.get("indexing")
    if ix:
        one, two, raw = ix["one_session"], ix["two_sessions"], ix["raw_server"]
        out.append((f"Indexing, instant server, {ix['concepts']:,} concepts, 1 session >= 10,000 concepts/s",
                    f"{_f(one['concepts_per_s'], 0)} concepts/s ({_f(one['us_per_concept'])} us/concept"
                    + (f"; CPU: backend {_f(one['backend_cpu_us_per_concept'])} us, cluster "
                       f"{_f(one.get('cluster_cpu_us_per_concept'))} us per concept"
                       if one.get("backend_cpu_us_per_concept") is not None else "") + ")",
                    f"{_f(raw['per_s'], 0)} texts/s raw server", f"{one['concepts_per_s'] / raw['per_s']:.3f}",
                    one["concepts_per_s"] >= 10_000))
        other = ix.get("one_session_other_request_size")
        if other:
            out.append((f"Indexing, instant server, 1 session, the default batch_size against "
                        f"{other['batch_size']} texts per request (same run)",
                        f"{_f(one['concepts_per_s'], 0)} concepts/s at the default",
                        f"{_f(other['concepts_per_s'], 0)} concepts/s (CPU: backend "
                        f"{_f(other['backend_cpu_us_per_concept'])} us per concept)",
                        f"{one['concepts_per_s'] / other['concepts_per_s']:.2f}", None))
        out.append((f"Indexing, instant server, 2 sessions (scales with sessions)",
                    f"{_f(two['concepts_per_s'], 0)} concepts/s",
                    f"{_f(one['concepts_per_s'], 0)} concepts/s on 1 session",
                    f"{two['concepts_per_s'] / one['concepts_per_s']:.2f}", None))
    lat = r.get("latency")
    sc = r.get("scale", {})
    nv = sc.get("vectors")
    if lat and "baseline_sql" in lat:  # (absent when only the part 'modes' ran)
        b, bb = lat["baseline_sql"], lat["baseline_http_plus_sql"]
        mode = lat.get("default_mode", "")
        for key, label in (("nearest_text_cached_session", "default mode"),
                           ("nearest_text_cached_session_semantic", "mode => 'semantic'")):
            if key not in lat:
                continue
            c = lat[key]
            out.append((f"nearest(text, 10) cached, {label}, p50 <= 3 ms ({_f(nv)} x 384)",
                        f"p50 {c['p50_ms']:.2f} / p95 {c['p95_ms']:.2f} / p99 {c['p99_ms']:.2f} ms",
                        f"hand-written SQL p50 {b['p50_ms']:.2f} ms", f"{c['p50_ms'] / b['p50_ms']:.2f}",
                        c["p50_ms"] <= 3.0))
        for key, okey, label in (("nearest_text_uncached", "overhead_uncached_p50_ms", "default mode"),
                                 ("nearest_text_uncached_semantic", "overhead_uncached_semantic_p50_ms",
                                  "mode => 'semantic'")):
            if key not in lat:
                continue
            u = lat[key]
            out.append((f"nearest(text, 10) uncached, {label}: overhead vs raw HTTP + SQL <= 2 ms at p50",
                        f"p50 {u['p50_ms']:.2f} / p95 {u['p95_ms']:.2f} / p99 {u['p99_ms']:.2f} ms "
                        f"(overhead {lat[okey]:+.2f} ms)",
                        f"HTTP + SQL p50 {bb['p50_ms']:.2f} / p95 {bb['p95_ms']:.2f} / p99 {bb['p99_ms']:.2f} ms",
                        f"{u['p50_ms'] / bb['p50_ms']:.2f}", lat[okey] <= 2.0))
        v = lat["nearest_vector"]
        out.append(("nearest(vector, 10): overhead vs hand-written SQL <= 2 ms at p50",
                    f"p50 {v['p50_ms']:.2f} / p95 {v['p95_ms']:.2f} / p99 {v['p99_ms']:.2f} ms "
                    f"(overhead {lat['overhead_vector_p50_ms']:+.2f} ms)",
                    f"SQL p50 {b['p50_ms']:.2f} / p95 {b['p95_ms']:.2f} / p99 {b['p99_ms']:.2f} ms",
                    f"{v['p50_ms'] / b['p50_ms']:.2f}", lat["overhead_vector_p50_ms"] <= 2.0))
    md_ = lat.get("modes") if lat else None
    cases = [(md_, f"nearest(text, 10) cached, mode 'fused' / 'semantic' at p50 <= 1.5 ({_f(nv)} x 384)"),
             ((md_ or {}).get("untagged"),
              f"same, the queries' common words only (no unique tag word) ({_f(nv)} x 384)")]
    for x, label in cases:
        if x and x.get("fused") and x.get("semantic"):
            f, sm = x["fused"], x["semantic"]
            ratio = f["p50_ms"] / sm["p50_ms"]
            out.append((label, f"p50 {f['p50_ms']:.2f} / p95 {f['p95_ms']:.2f} / p99 {f['p99_ms']:.2f} ms",
                        f"semantic p50 {sm['p50_ms']:.2f} / p95 {sm['p95_ms']:.2f} / p99 {sm['p99_ms']:.2f} ms",
                        f"{ratio:.2f}", ratio <= 1.5))
    if r.get("realistic_companion"):
        import ab_companion_1m  # bench/ (report.py runs from there)

        out += ab_companion_1m.markdown_rows(r["realistic_companion"])
    rec = r.get("recall")
    if rec:
        for name, case in rec["cases"].items():
            d = case["by_ef"]["default"]
            ok_ef = next((ef for ef, x in case["by_ef"].items() if ef != "default" and x["recall_at_10"] >= 0.98),
                         None)
            out.append((f"Recall@10, {name}, defaults >= 0.98",
                        f"{d['recall_at_10']:.4f} (p50 {d['p50_ms']:.2f} ms)",
                        "exact search = 1.0", f"{d['recall_at_10']:.4f}",
                        d["recall_at_10"] >= 0.98))
    bt = r.get("batch")
    if bt:
        out.append((f"nearest_batch of {bt['terms']:,} terms (e5) / raw embedding throughput >= 0.9",
                    f"{_f(bt['nearest_batch_per_s'])} terms/s" + (
                        f" (in-database part {bt['in_db_ms_per_term']:.2f} ms/term)" if "in_db_ms_per_term" in bt else ""),
                    f"{_f(bt['raw_per_s'])} texts/s raw", f"{bt['ratio']:.3f}", bt["ratio"] >= 0.9))
    mem = r.get("memory")
    if mem:
        g = mem["growth_second_half_kb"] / 1024
        out.append((f"Backend private memory (RssAnon) over {mem['calls']:,} nearest() calls: flat",
                    f"RssAnon {mem['rss_start_kb'] / 1024:.1f} -> {mem['rss_mid_kb'] / 1024:.1f} -> "
                    f"{mem['rss_end_kb'] / 1024:.1f} MB (second half {g:+.1f} MB)",
                    "start of session", f"{mem['rss_end_kb'] / mem['rss_start_kb']:.2f}", abs(g) < 5))
    ix2 = sc.get("index")
    if ix2:
        out.append((f"HNSW build at {_f(nv)} x 384 (m {ix2.get('m', 16)}, ef_construction {ix2.get('ef_construction', 64)})",
                    (f"{ix2['build_s']:.0f} s" if "build_s" in ix2 else "reused") +
                    f", index {ix2['index_bytes'] / 2**20:,.0f} MB",
                    f"maintenance_work_mem {ix2['maintenance_work_mem']}, "
                    f"{ix2['max_parallel_maintenance_workers']} parallel worker(s); table "
                    f"{ix2['table_bytes'] / 2**20:,.0f} MB", "", None))
    for rh in r.get("rehearsals") or []:
        _rehearsal_rows(rh, out)
    bu = r.get("bundle")
    if bu and "insert_select" in bu:
        i, b = bu["import"], bu["insert_select"]
        out.append((f"Bundle import into an empty model, {bu['vectors']:,} x {bu['dims']} (omop-emb-pg import) "
                    ">= 50,000 vectors/s",
                    f"{_f(i['per_s'], 0)} vectors/s whole command; rows stored {_f(i['landed_per_s'], 0)}/s, "
                    f"then {i['indexes_built']} indexes {i['index_seconds']:.1f} s",
                    f"INSERT ... SELECT, primary key only, then the same indexes: {_f(b['pk_only_total_per_s'], 0)}"
                    f"/s (rows alone {_f(b['pk_only_rows_per_s'], 0)}/s)",
                    f"{i['per_s'] / b['pk_only_total_per_s']:.2f}", i["per_s"] >= 50_000))
    return out


def _rehearsal_rows(rh: dict, out: list) -> None:
    """Goal rows of one saved 5M rehearsal (bench/b_rehearsal.py, halfvec or vector)."""
    if not (rh.get("recall") or rh.get("build")):
        return
    st = rh.get("storage", "halfvec")
    n = rh.get("vectors", 0)
    base = _realistic_1m(st)
    for name, case in (rh.get("recall") or {}).get("cases", {}).items():
        d = case["by_ef"]["default"]
        b1 = ((base.get("recall") or {}).get("cases") or {}).get(name, {}).get("by_ef", {}).get("default")
        ef = (rh.get("build") or {}).get("index_params", {}).get("ef_search", "?")
        # the default column is each text's first call of the session; the same ef_search in
        # the grid is timed on repeat calls (b_rehearsal.markdown explains)
        same = case["by_ef"].get(str(ef))
        out.append((f"nearest(text, 10) cached, rehearsal {n:,} x 384 {st} (realistic), {name}, defaults: "
                    "recall@10 >= 0.98 at p50 <= 3 ms",
                    f"{d['recall_at_10']:.4f} / p50 {d['p50_ms']:.2f} / p95 {d['p95_ms']:.2f} ms "
                    f"(ef_search {ef}" + (f"; the same ef in the grid: p50 {same['p50_ms']:.2f} / p95 "
                                         f"{same['p95_ms']:.2f} ms" if same else "") + ")",
                    "exact search = 1.0" + (f"; 1M {st} (saved run): {b1['recall_at_10']:.4f} / p50 "
                                            f"{b1['p50_ms']:.2f} ms" if b1 else ""),
                    f"{d['recall_at_10']:.4f}", d["recall_at_10"] >= 0.98 and d["p50_ms"] <= 3.0))
    b = rh.get("build") or {}
    ab = rh.get("after_build") or {}
    hnsw = sum(v for k, v in (ab.get("indexes_bytes") or {}).items() if k.endswith("_hnsw"))
    bi = base.get("index") or {}
    if b.get("build_s"):
        meas = f"{b['build_s']:,.0f} s (with ef_search calibration), index {hnsw / 2**20:,.0f} MB"
    elif b.get("samples"):
        last = [x for x in b["samples"] if x["progress"].get("blocks_total")]
        p = last[-1]["progress"] if last else {}
        meas = (f"unfinished: {last[-1]['t']:,.0f} s, {100 * p['blocks_done'] / p['blocks_total']:.0f}% of heap "
                "blocks" if last else "unfinished")
    else:
        meas = None
    if meas:
        out.append((f"HNSW build, rehearsal {n:,} x 384 {st} (m {b.get('m')}, ef_construction "
                    f"{b.get('ef_construction')}, maintenance_work_mem {b.get('maintenance_work_mem')})", meas,
                    (f"1M {st} (saved run): {bi['build_s']:,.0f} s, index {bi['index_bytes'] / 2**20:,.0f} MB"
                     if bi.get("build_s") else ""), "", None))


def _realistic_1m(storage: str = "halfvec") -> dict:
    p = Path(__file__).parent / "results" / ("realistic_1m_halfvec" if storage == "halfvec" else "realistic_1m") \
        / "realistic.json"
    return json.loads(p.read_text()) if p.exists() else {}


REHEARSAL_DIRS = ("rehearsal_5m", "rehearsal_5m_vector")  # b_rehearsal.py, halfvec and --storage vector


def rehearsals(out: Path) -> list[dict]:
    """The saved runs of the opt-in part ``rehearsal`` (bench/b_rehearsal.py), each with its
    folder under ``_dir``; none when never run."""
    import b_rehearsal

    runs = []
    for d in REHEARSAL_DIRS:
        try:
            r = b_rehearsal.saved(out / d)
        except Exception as e:  # a broken saved file must not lose the rest of the report
            print(f"rehearsal rows of {d} unreadable:", e, file=sys.stderr)
            continue
        if r:
            runs.append({**r, "_dir": d})
    return runs


def markdown(r: dict) -> str:
    lines = ["| Goal | Measured | Baseline (same run) | Ratio | Met |", "|---|---|---|---|---|"]
    for goal, meas, base, ratio, met in rows(r):
        lines.append(f"| {goal} | {meas} | {base} | {ratio} | {'' if met is None else ('yes' if met else '**no**')} |")
    m = r.get("meta", {})
    pg = m.get("postgres", {})
    lines += ["", f"Command: `{m.get('command', '')}`; {m.get('started', '')} .. {m.get('finished', '')}; "
              f"{m.get('cpu_count')} CPUs; PostgreSQL {pg.get('server_version', '?')}, pgvector "
              f"{pg.get('pgvector', '?')}, shared_buffers {pg.get('shared_buffers', '?')}, "
              f"maintenance_work_mem {pg.get('maintenance_work_mem', '?')}."]
    md_ = (r.get("latency") or {}).get("modes")
    if md_:
        lines += ["", f"nearest(text, 10) by search mode, cached query vector, {md_['queries']} analyst-like "
                  f"queries (texts the lexical side scores per query: {md_['lexical_matches_per_query_first10']}):",
                  "", "| mode | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
        for mode in ("semantic", "fused", "hybrid", "lexical"):
            x = md_.get(mode)
            if x:
                lines.append(f"| {mode} | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | {x['p99_ms']:.1f} |")
        for mode, x in ((m, (md_.get("untagged") or {}).get(m)) for m in ("semantic", "fused")):
            if x:
                lines.append(f"| {mode}, common words only | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | "
                             f"{x['p99_ms']:.1f} |")
    rec = r.get("recall")
    if rec:
        lines += ["", "Recall@10 and p50 latency by omop_emb.ef_search (default = setting unset):", "",
                  "| Case | rows in filter | " + " | ".join(f"ef {e}" for e in rec["ef_grid"]) + " |",
                  "|---|---|" + "---|" * len(rec["ef_grid"])]
        for name, case in rec["cases"].items():
            cells = [f"{x['recall_at_10']:.4f} / {x['p50_ms']:.2f} ms" for x in case["by_ef"].values()]
            lines.append(f"| {name} | {case['rows_in_filter']:,} | " + " | ".join(cells) + " |")
    ix = r.get("indexing")
    if ix and ix.get("profile"):
        p = ix["profile"]
        lines += ["", f"Where one indexed concept's time goes (replica of _index_batch inside the backend, "
                  f"{p['texts']:,} texts, batch {ix['batch_size']}; total "
                  f"{p['replica_us_per_concept_total']:.0f} us/concept):", "", "| Phase | us/concept | share |",
                  "|---|---|---|"]
        for k, v in sorted(p["us_per_concept"].items(), key=lambda kv: -kv[1]):
            share = p["share"].get(k)
            lines.append(f"| {k} | {v:.1f} | {'' if share is None else f'{share:.0%}'} |")
        if ix.get("deterministic_server_raw"):
            lines += ["", f"The deterministic test double answers {ix['deterministic_server_raw']['per_s']:,.0f} "
                      f"texts/s raw (it draws 384 Gaussians in Python per text), so the instant server "
                      f"(bench/instant_server.py, {ix['raw_server']['per_s']:,.0f} texts/s) is used to measure "
                      f"the extension's own overhead."]
    if r.get("errors"):
        lines += ["", "Errors during the run:", "", "```", *r["errors"], "```"]
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from common import save_plot

    made = []
    lat = r.get("latency")
    if lat and lat.get("samples_ms"):  # absent when only the part 'modes' ran
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, xs in lat["samples_ms"].items():
            xs = np.sort(np.array(xs))
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
        ax.set_xscale("log")
        ax.set_xlabel("latency per call (ms, log)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(f"nearest(.., 10) latency CDF, {r['scale']['vectors']:,} x 384, HNSW")
        ax.axvline(3.0, color="grey", ls=":", lw=1)
        made.append(save_plot(fig, ax, out / "latency_cdf.png", legend_fontsize=8))
    rec = r.get("recall")
    if rec:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, case in rec["cases"].items():
            xs = [x["p50_ms"] for x in case["by_ef"].values()]
            ys = [x["recall_at_10"] for x in case["by_ef"].values()]
            ax.plot(xs, ys, "o-", label=name)
            for (ef, x), xx, yy in zip(case["by_ef"].items(), xs, ys):
                ax.annotate(f"ef {ef}", (xx, yy), fontsize=7, xytext=(3, -8), textcoords="offset points")
        ax.axhline(0.98, color="grey", ls=":", lw=1)
        ax.set_xlabel("p50 latency of nearest(vector, 10) (ms)")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title("Recall / latency by omop_emb.ef_search")
        made.append(save_plot(fig, ax, out / "recall_latency.png", legend_fontsize=8))
    mem = r.get("memory")
    if mem:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        pts = mem["points"]
        ax.plot([p[0] for p in pts], [p[1] / 1024 for p in pts], "o-", ms=3, label="VmRSS (incl. shared buffers)")
        ax.plot([p[0] for p in pts], [(p[2] or 0) / 1024 for p in pts], "o-", ms=3, label="RssAnon (private)")
        ax.legend(fontsize=8)
        ax.set_xlabel("nearest(text) calls with new texts, one session")
        ax.set_ylabel("backend RSS (MB)")
        ax.set_title("Backend memory over nearest() calls")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "memory_rss.png", dpi=110)
        plt.close(fig)
        made.append("memory_rss.png")
    ix = r.get("indexing")
    if ix:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for key, label in (("one_session", "1 session"), ("two_sessions", "2 sessions")):
            prog = ix[key].get("progress") or []
            if len(prog) > 2:
                t = np.array([p[0] for p in prog])
                d = np.array([p[1] for p in prog])
                a1.plot(t[1:], np.diff(d) / np.maximum(np.diff(t), 1e-6), label=label)
        a1.axhline(ix["raw_server"]["per_s"], color="grey", ls=":", lw=1, label="raw server")
        a1.set_yscale("log")
        a1.set_xlabel("seconds since CALL")
        a1.set_ylabel("texts/s (0.5 s windows)")
        a1.set_title(f"index_concepts, instant server, {ix['concepts']:,} concepts")
        a1.grid(alpha=0.3)
        a1.legend(fontsize=8)
        p = ix.get("profile")
        if p:
            items = sorted(((k, v) for k, v in p["us_per_concept"].items() if not k.startswith("(alt)")),
                           key=lambda kv: kv[1])
            a2.barh([k for k, _ in items], [v for _, v in items])
            a2.set_xlabel("us per concept")
            a2.set_title("where _index_batch spends its time")
            a2.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "indexing.png", dpi=110)
        plt.close(fig)
        made.append("indexing.png")
    return made


def write(r: dict, out: Path) -> None:
    # the opt-in 5M rehearsal is read from its own directory: its saved rows show in every report
    r = {**r, "rehearsals": rehearsals(out)}
    made = []
    try:
        made = plots(r, out)
    except Exception as e:  # a plot failure must not lose the table
        print("plots failed:", e, file=sys.stderr)
    # the parts of issue 16 bring their own tables (bench/b_halfvec.py, b_bundle.py, b_servers.py)
    extra = "".join("\n" + r[k]["markdown"] + "\n" for k in ("halfvec", "bundle", "servers", "realistic")
                    if isinstance(r.get(k), dict) and r[k].get("markdown"))
    if isinstance(r.get("realistic"), dict) and r["realistic"].get("recall"):
        try:
            import b_realistic

            made += b_realistic.plots(r["realistic"], out, r.get("recall"))
        except Exception as e:
            print("realistic plots failed:", e, file=sys.stderr)
    for rh in r["rehearsals"]:
        import b_rehearsal

        extra += ("\n" + b_rehearsal.markdown(rh)
                  + f"\n(Saved rows of the opt-in part `rehearsal`, {rh.get('build', {}).get('started', '')}; "
                  f"`bench/results/{rh['_dir']}/rehearsal.md`.)\n")
        if (out / rh["_dir"] / "memory.png").exists():
            made.append(f"{rh['_dir']}/memory.png")
    md = "# omop_emb benchmarks\n\n" + markdown(r) + extra + "".join(
        f"\n![{m}]({m})\n" for m in made)
    (out / "benchmarks.md").write_text(md)


if __name__ == "__main__":
    d = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    write(json.loads((d / "results.json").read_text()), d)
