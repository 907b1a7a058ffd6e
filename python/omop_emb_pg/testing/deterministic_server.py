"""A deterministic embedding server for tests: instant, any dimension, fault injection.

Standard library only. It answers the same routes as a real embedding server:

    POST /v1/embeddings   (OpenAI: {"input": str|[str], "encoding_format": "float"|"base64", "dimensions"?})
    POST /api/embed       (Ollama: {"model", "input": str|[str]} -> {"model", "embeddings"})
    POST /api/embeddings  (Ollama, old: {"model", "prompt"} -> {"embedding"})
    POST /rerank          (TEI, Infinity: {"query", "texts": [...]} -> [{"index", "score"}], best first)
    POST /v1/rerank       (Cohere-compatible: {"model", "query", "documents": [...], "top_n"?}
                           -> {"results": [{"index", "relevance_score"}]}, best first)
    GET  /health, GET /v1/models

The rerank score of a document is :func:`rerank_score`: the share of the query's
words found in it, minus a thousandth per extra word (deterministic, and a different
order than the vectors'). Fault modes apply to rerank requests as to embedding
requests (``wrong_count``: one result too few; ``nan``: the first score is NaN).

The vector of a text is a unit vector computed from the exact text (sha256 seed -> Gaussian
-> normalised): the same text always gives the same vector, any other text an unrelated one.
A text of the form ``[anything]vec:<comma-separated floats>`` (e.g. ``passage: vec:1,0,0``)
is returned as that vector, normalised (zero stays zero), so tests can build exact geometry.

Control routes (never counted, never faulted):

    GET  /_control/stats   {"requests", "texts", "by_route", "max_batch", "faults_injected",
                            "last_texts", "fault"}
    POST /_control/reset   clear counters, received texts and any fault
    POST /_control/fault   {"mode": ..., "times": N, ...}; {"mode": null} clears
    POST /_control/limit   {"max_batch": N}: refuse embedding requests of more than N texts
                           with HTTP 413, as Hugging Face TEI does above its
                           --max-client-batch-size (a limit, not a fault: it stays until
                           set to null or reset; refusals are counted in "refused_batches")

Fault modes (applied to the next ``times`` embedding requests, then back to normal; without
``times``: until cleared; ``skip``: after letting this many requests through first):

    refuse        reset the connection (RST) before reading the request
    hang          read the request, then answer nothing for ``seconds`` (default 60) and close
    slow          answer normally after ``seconds`` (default 1)
    status        reply ``status`` (default 500) with a JSON error; ``retry_after`` adds Retry-After
    not_json      200 with a body that is not JSON
    wrong_count   one embedding too few (or one too many for a single text)
    wrong_dim     embeddings of dimension dim-1
    nan / inf     the first component of every embedding is NaN / Infinity
    die_mid_batch read the request, then close the socket without answering
    drip          answer 200 with a long Content-Length, then one byte every ``interval`` seconds
                  (default 2) for ``seconds`` (default 60): every read gets a byte before the
                  read timeout, the answer never ends. Also applied to GET /v1/models (not counted)

In-process::

    with DeterministicEmbeddingServer(dim=384) as srv:
        srv.url; srv.set_fault("status", status=429, retry_after=1, times=2); srv.stats()

As a process::

    python -m omop_emb_pg.testing.deterministic_server --port 9000 --dim 384
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import math
import random
import re
import signal
import socket
import struct
import sys
import threading
from collections import deque
from typing import Any

from .._http import FastThreadingHTTPServer, HTTPError, JSONRequestHandler, ServerThread

__all__ = ["DeterministicEmbeddingServer", "deterministic_vector", "rerank_score", "FAULT_MODES",
           "main"]

FAULT_MODES = ("refuse", "hang", "slow", "status", "not_json", "wrong_count", "wrong_dim",
               "nan", "inf", "zero", "die_mid_batch", "drip")
MODEL_ID = "deterministic"
_VEC_RE = re.compile(r"vec:\s*([-+0-9.eE,\s]*)$")


def deterministic_vector(text: str, dim: int) -> list[float]:
    """The unit vector the server returns for ``text`` at dimension ``dim``."""
    m = _VEC_RE.search(text)
    if m:
        vals = [float(x) for x in m.group(1).split(",") if x.strip()]
        norm = math.sqrt(sum(v * v for v in vals))
        return [v / norm for v in vals] if norm > 0 else vals
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")
    rng = random.Random(seed)
    v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


_WORD_RE = re.compile(r"\w+")
RERANK_ROUTES = ("/rerank", "/v1/rerank")


def rerank_score(query: str, document: str) -> float:
    """The test double's rerank score: share of the query's words in the document,
    minus 0.001 per document word that is not a query word, in [-1, 1]."""
    q = set(_WORD_RE.findall(query.lower()))
    d = _WORD_RE.findall(document.lower())
    if not q:
        return 0.0
    shared = len(q & set(d)) / len(q)
    return round(shared - 0.001 * len([w for w in d if w not in q]), 6)


class _Handler(JSONRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.guarded(self._get)

    def do_POST(self) -> None:
        self.guarded(self._post)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        owner = self.server.owner
        if path in ("/health", ""):
            self.send_json(200, {"status": "ok", "model": MODEL_ID, "dimensions": owner.dim})
        elif path == "/v1/models":
            fault = owner.stats()["fault"]
            if fault and fault.get("mode") == "drip":
                self._drip(fault)
                return
            self.send_json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "owned_by": "omop_emb_pg.testing", "dimensions": owner.dim}]})
        elif path == "/_control/stats":
            self.send_json(200, owner.stats())
        else:
            raise HTTPError(404, f"no route GET {path}")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        owner = self.server.owner
        if path == "/_control/reset":
            self.read_body()
            owner.reset()
            self.send_json(200, {"ok": True})
            return
        if path == "/_control/fault":
            req = self.read_json()
            if not isinstance(req, dict):
                raise HTTPError(400, "fault must be a JSON object")
            owner.set_fault(req.pop("mode", None), **req)
            self.send_json(200, {"ok": True, "fault": owner.stats()["fault"]})
            return
        if path == "/_control/limit":
            req = self.read_json()
            if not isinstance(req, dict):
                raise HTTPError(400, "limit must be a JSON object")
            owner.set_max_batch(req.get("max_batch"))
            self.send_json(200, {"ok": True, "max_batch_limit": owner.stats()["max_batch_limit"]})
            return
        if path not in ("/v1/embeddings", "/embeddings", "/api/embed", "/api/embeddings") + RERANK_ROUTES:
            raise HTTPError(404, f"no route POST {path}", close=True)

        fault = owner._take_fault(path)
        mode = fault.get("mode") if fault else None
        if mode == "refuse":
            self._reset_connection()
            return
        req = self.read_json()
        if not isinstance(req, dict):
            raise HTTPError(400, "request body must be a JSON object")
        if path in RERANK_ROUTES:
            docs = req.get("texts" if path == "/rerank" else "documents")
            if not isinstance(req.get("query"), str) or not isinstance(docs, list) or \
                    not all(isinstance(t, str) for t in docs):
                raise HTTPError(400, "'query' must be a string and '%s' a list of strings"
                                % ("texts" if path == "/rerank" else "documents"))
            texts = docs
        elif path == "/api/embeddings":
            prompt = req.get("prompt")
            if not isinstance(prompt, str):
                raise HTTPError(400, "'prompt' must be a string")
            texts = [prompt]
        else:
            inp = req.get("input")
            texts = [inp] if isinstance(inp, str) else inp
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise HTTPError(400, "'input' must be a string or a list of strings")
            limit = owner._refuse_batch(len(texts))
            if limit is not None:
                # TEI's answer to a request above --max-client-batch-size
                self.send_json(413, {"error": f"batch size {len(texts)} > maximum allowed batch "
                                              f"size {limit}", "error_type": "Validation"})
                return
        owner._count(path, texts)

        if mode == "die_mid_batch":
            self._reset_connection()
            return
        if mode == "drip":
            self._drip(fault)
            return
        if mode == "hang":
            owner._release.wait(float(fault.get("seconds", 60)))
            self.close_connection = True
            return
        if mode == "slow":
            owner._release.wait(float(fault.get("seconds", 1)))
        if mode == "status":
            status = int(fault.get("status", 500))
            headers = {}
            if fault.get("retry_after") is not None:
                headers["Retry-After"] = str(fault["retry_after"])
            self.send_json(status, {"error": {"message": f"injected fault: HTTP {status}",
                                              "type": "server_error", "code": status}}, headers=headers)
            return
        if mode == "not_json":
            self.send_bytes(200, b"<html>this is not JSON</html>", content_type="text/html")
            return

        if path in RERANK_ROUTES:
            scored = sorted(((rerank_score(req["query"], t), i) for i, t in enumerate(texts)),
                            key=lambda t: (-t[0], t[1]))
            if mode == "wrong_count":
                scored = scored[:-1]
            elif mode in ("nan", "inf") and scored:
                scored[0] = (float("nan") if mode == "nan" else float("inf"), scored[0][1])
            if path == "/rerank":
                self.send_json(200, [{"index": i, "score": sc} for sc, i in scored])
            else:
                self.send_json(200, {"id": "rerank", "model": req.get("model") or MODEL_ID,
                                     "results": [{"index": i, "relevance_score": sc}
                                                 for sc, i in scored]})
            return

        dim = owner.dim
        if path == "/v1/embeddings" and isinstance(req.get("dimensions"), int) and req["dimensions"] > 0:
            dim = req["dimensions"]
        vecs = [deterministic_vector(t, dim) for t in texts]
        if mode == "wrong_count":
            vecs = vecs[:-1] if len(vecs) > 1 else vecs * 2
        elif mode == "wrong_dim":
            vecs = [v[:-1] for v in vecs]
        elif mode in ("nan", "inf"):
            bad = float("nan") if mode == "nan" else float("inf")
            vecs = [[bad, *v[1:]] for v in vecs]
        elif mode == "zero":
            vecs = [[0.0] * len(v) for v in vecs]
        model = req.get("model") or MODEL_ID

        if path in ("/v1/embeddings", "/embeddings"):
            b64 = req.get("encoding_format") == "base64"
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else v}
                    for i, v in enumerate(vecs)]
            ntok = sum(len(t.split()) for t in texts)
            self.send_json(200, {"object": "list", "data": data, "model": model,
                                 "usage": {"prompt_tokens": ntok, "total_tokens": ntok}})
        elif path == "/api/embed":
            self.send_json(200, {"model": model, "embeddings": vecs})
        else:
            self.send_json(200, {"embedding": vecs[0] if vecs else []})

    def _drip(self, fault: dict) -> None:
        """Headers at once, then the body one byte per ``interval`` s: it never completes."""
        interval = float(fault.get("interval", 2.0))
        owner = self.server.owner
        self.close_connection = True
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000\r\n\r\n")
            self.wfile.flush()
            waited = 0.0
            limit = float(fault.get("seconds", 60))
            while waited < limit and not owner._release.wait(interval):
                waited += interval
                self.wfile.write(b" ")
                self.wfile.flush()
        except OSError:  # the client gave up: what a drip must make it do
            with owner._lock:
                owner._drips_abandoned += 1

    def _reset_connection(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees a connection reset, not a reply."""
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass


class _Server(FastThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], owner: "DeterministicEmbeddingServer") -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class DeterministicEmbeddingServer:
    """In-process deterministic embedding server (see the module docstring).

    ``DeterministicEmbeddingServer(dim=384, host="127.0.0.1", port=0)``; ``start()``/``stop()``
    or a ``with`` block; ``url``; ``set_fault(mode, times=None, **params)``; ``clear_fault()``;
    ``reset()``; ``stats()``; ``received_texts`` (every embedded text, oldest first, last 100000).
    """

    def __init__(self, dim: int = 384, host: str = "127.0.0.1", port: int = 0, *,
                 keep_texts: int = 100_000) -> None:
        self.dim = dim
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._fault: dict | None = None
        self._max_batch_limit: int | None = None
        self.received_texts: deque[str] = deque(maxlen=keep_texts)
        self._reset_counters()
        self._server = _Server((host, port), self)
        self._thread = ServerThread(self._server, name="deterministic-embedding-server")

    # ------------------------------------------------------------ lifecycle
    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "DeterministicEmbeddingServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._thread.stop()

    def __enter__(self) -> "DeterministicEmbeddingServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ control
    def set_fault(self, mode: str | None, times: int | None = None, **params: Any) -> None:
        """Inject ``mode`` into the next ``times`` embedding requests (None: until cleared)."""
        if mode in (None, "", "none"):
            self.clear_fault()
            return
        if mode not in FAULT_MODES:
            raise HTTPError(400, f"unknown fault mode {mode!r}; expected one of {', '.join(FAULT_MODES)}")
        with self._lock:
            self._release.clear()
            self._fault = {"mode": mode, "times": times, **params}

    def set_max_batch(self, limit: int | None) -> None:
        """Refuse embedding requests of more than ``limit`` texts with HTTP 413 (None: no limit)."""
        with self._lock:
            self._max_batch_limit = None if limit is None else int(limit)

    def clear_fault(self) -> None:
        with self._lock:
            self._fault = None
        self._release.set()

    def reset(self) -> None:
        """Clear counters, received texts and any fault (releases hanging requests)."""
        self.clear_fault()
        with self._lock:
            self._reset_counters()
            self._max_batch_limit = None
            self.received_texts.clear()

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": self._requests, "texts": self._texts, "by_route": dict(self._by_route),
                "max_batch": self._max_batch, "faults_injected": self._faults_injected,
                "last_texts": list(self.received_texts)[-50:],
                "fault": dict(self._fault) if self._fault else None,
                "dim": self.dim,
                "drips_abandoned": self._drips_abandoned,
                "max_batch_limit": self._max_batch_limit, "refused_batches": self._refused_batches,
            }

    # ------------------------------------------------------------ internals
    def _refuse_batch(self, n: int) -> int | None:
        """The limit when a request of ``n`` texts is over it (counted), else None."""
        with self._lock:
            if self._max_batch_limit is None or n <= self._max_batch_limit:
                return None
            self._refused_batches += 1
            return self._max_batch_limit

    def _reset_counters(self) -> None:
        self._refused_batches = 0
        self._drips_abandoned = 0
        self._requests = 0
        self._texts = 0
        self._by_route: dict[str, int] = {}
        self._max_batch = 0
        self._faults_injected = 0

    def _take_fault(self, path: str) -> dict | None:
        with self._lock:
            self._requests += 1
            self._by_route[path] = self._by_route.get(path, 0) + 1
            f = self._fault
            if not f:
                return None
            if f.get("skip"):
                f["skip"] = int(f["skip"]) - 1
                return None
            self._faults_injected += 1
            if f.get("times") is not None:
                f["times"] = int(f["times"]) - 1
                if f["times"] <= 0:
                    self._fault = None
            return dict(f)

    def _count(self, path: str, texts: list[str]) -> None:
        with self._lock:
            self._texts += len(texts)
            self._max_batch = max(self._max_batch, len(texts))
            self.received_texts.extend(texts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="python -m omop_emb_pg.testing.deterministic_server",
                                 description="Deterministic embedding server with fault injection (tests).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--max-batch", type=int, default=None,
                    help="refuse requests of more texts with HTTP 413, as TEI does")
    args = ap.parse_args(argv)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    with DeterministicEmbeddingServer(dim=args.dim, host=args.host, port=args.port) as srv:
        srv.set_max_batch(args.max_batch)
        print(srv.url, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
