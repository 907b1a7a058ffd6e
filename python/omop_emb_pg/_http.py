"""Small stdlib HTTP/1.1 JSON server pieces shared by ``serve`` and the test double.

- ``FastThreadingHTTPServer``: ``ThreadingHTTPServer`` with daemon threads, TCP_NODELAY on
  every accepted socket (a keep-alive client otherwise waits ~40 ms per call on delayed
  ACKs), and tracking of open connections so that ``close_all_connections()`` can end
  idle keep-alive threads on stop.
- ``JSONRequestHandler``: HTTP/1.1 keep-alive, bounded body reads (Content-Length or
  chunked), JSON replies, quiet logs, never a traceback to the client.
- ``ServerThread``: run any such server in a background thread (tests, benchmarks).

Standard library only: the test double imports this module without numpy.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HTTPError(Exception):
    """An error reply: status, message, and OpenAI-style ``type``/``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, close: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.close = close
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class FastThreadingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self):  # type: ignore[override]
        sock, addr = super().get_request()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request):  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        """Shut down every open client connection (ends idle keep-alive handler threads)."""
        with self._conns_lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:  # noqa: D401
        # Client went away mid-request and similar: not worth a traceback on stderr.
        pass


class JSONRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "omop-emb-pg"
    #: idle keep-alive connections are closed after this many seconds
    timeout = 120
    #: set by subclasses / servers
    max_body_bytes = 32 * 1024 * 1024
    #: an oversized body up to this size is read and discarded before the 413
    drain_limit_bytes = 256 * 1024 * 1024

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def version_string(self) -> str:
        return self.server_version

    # ---------------------------------------------------------------- body
    def read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise HTTPError(400, "invalid Content-Length header", close=True)
        if n < 0:
            raise HTTPError(400, "invalid Content-Length header", close=True)
        if n > self.max_body_bytes:
            # Drain a moderately oversized body so that the client, still sending, reads the 413
            # instead of a connection reset; past the drain limit just reply and close.
            drained = self._drain(n) if n <= self.drain_limit_bytes else False
            raise HTTPError(413, f"request body of {n} bytes exceeds the limit of {self.max_body_bytes} bytes",
                            code="body_too_large", close=not drained)
        data = self.rfile.read(n)
        if len(data) != n:
            raise HTTPError(400, "request body shorter than Content-Length", close=True)
        return data

    def _drain(self, n: int) -> bool:
        while n > 0:
            got = self.rfile.read(min(n, 1 << 20))
            if not got:
                return False
            n -= len(got)
        return True

    def _read_chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise HTTPError(400, "truncated chunked body", close=True)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HTTPError(400, "malformed chunked body", close=True)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > self.max_body_bytes:
                raise HTTPError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                code="body_too_large", close=True)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def read_json(self) -> Any:
        raw = self.read_body()
        if not raw.strip():
            raise HTTPError(400, "empty request body: expected a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}")

    # ---------------------------------------------------------------- replies
    def send_bytes(self, status: int, body: bytes, content_type: str = "application/json",
                   headers: dict[str, str] | None = None, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None, close: bool = False) -> None:
        self.send_bytes(status, json.dumps(obj, separators=(",", ":")).encode(), headers=headers, close=close)

    def send_http_error(self, err: HTTPError) -> None:
        self.send_json(err.status, err.body(), headers=err.headers, close=err.close)

    def guarded(self, fn) -> None:
        """Run ``fn()``; turn HTTPError into its reply and anything else into a 500."""
        try:
            fn()
        except HTTPError as e:
            try:
                self.send_http_error(e)
            except OSError:
                self.close_connection = True
        except (ConnectionError, socket.timeout, BrokenPipeError):
            self.close_connection = True
        except Exception as e:  # never a traceback, never a hung client
            try:
                self.send_json(500, HTTPError(500, f"internal error: {type(e).__name__}: {e}",
                                              type="server_error").body(), close=True)
            except OSError:
                self.close_connection = True


class ServerThread:
    """Run a ``FastThreadingHTTPServer`` in a daemon thread; ``stop()`` closes it completely."""

    def __init__(self, server: FastThreadingHTTPServer, name: str = "http-server") -> None:
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=name, daemon=True)
        self._started = False
        self._stopped = False

    @property
    def host(self) -> str:
        return self.server.server_address[0]

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerThread":
        """Start serving (idempotent: a started server is returned as is)."""
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        self.server.close_all_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
