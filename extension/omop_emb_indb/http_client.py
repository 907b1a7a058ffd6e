"""HTTP calls to the embedding server.

Python inside PostgreSQL is not interrupted by ``statement_timeout``, so every
call has its own connect and read timeout, and a deadline for the whole request
(connect_timeout_s + read_timeout_s, retries included): a server that sends one
byte just before each read timeout would otherwise hold the backend forever. The
request runs in a thread while the backend polls for cancels; a cancelled or
overdue request has its socket shut down, so its thread ends at once instead of
piling up. One ``requests.Session`` per backend
is reused across calls (a new connection per text costs ~100x a batched call).
Retries are bounded and done by urllib3's ``Retry`` (429, 5xx, connection
errors, honouring ``Retry-After`` up to a cap). Errors name the endpoint, the
model, the status and a hint, never the key.
"""

import json
import os
import socket
import struct
import threading
import time

from .errors import EmbeddingServiceError, InvalidEmbeddingResponse, RequestTooLarge
from . import providers, vectors

RETRY_STATUSES = (429, 500, 502, 503, 504)
# A server of a model with several servers that failed is left out for this long
# (per session), unless all of them failed.
SERVER_DOWN_S = 30.0
# A Retry-After longer than this is shortened: the backend holds locks meanwhile.
MAX_RETRY_AFTER_S = 10.0


_CAPPED_RETRY = []
_TRACKING_POOLS = []
# thread id -> the urllib3 connection that thread is using (to shut it down).
_ACTIVE_CONNECTIONS = {}


class DeadlineExceeded(Exception):
    """The whole request took longer than its deadline."""


def _tracking_pool_classes():
    """urllib3 pools that remember which connection each thread took, so that
    the waiting backend can shut down the socket of a request it abandons."""
    if not _TRACKING_POOLS:
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        def tracking(base):
            class Pool(base):
                def _get_conn(self, timeout=None):
                    conn = super()._get_conn(timeout)
                    _ACTIVE_CONNECTIONS[threading.get_ident()] = conn
                    return conn
            Pool.__name__ = "Tracking" + base.__name__
            return Pool

        _TRACKING_POOLS.append({"http": tracking(HTTPConnectionPool),
                                "https": tracking(HTTPSConnectionPool)})
    return _TRACKING_POOLS[0]


def _abort(thread):
    """Shut down the socket a request thread reads from: its read returns at once."""
    conn = _ACTIVE_CONNECTIONS.pop(thread.ident, None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _requests():
    """requests, imported on the first HTTP call of the session, not when the runtime
    loads: requests and urllib.request cost ~80 ms to import, and a session whose
    searches all hit the query cache never needs them (a BI tool or dbt opens many
    short sessions)."""
    import requests

    return requests


def _capped_retry_class():
    if not _CAPPED_RETRY:
        from urllib3.util.retry import Retry

        class CappedRetry(Retry):
            def get_retry_after(self, response):
                after = super().get_retry_after(response)
                if after is None:
                    return None
                return min(after, MAX_RETRY_AFTER_S)

        _CAPPED_RETRY.append(CappedRetry)
    return _CAPPED_RETRY[0]


def make_retry(max_retries):
    return _capped_retry_class()(
        total=max_retries,
        connect=max_retries,
        # A read timeout is not retried: a server that accepts and never answers
        # must cost one read timeout, not several.
        read=0,
        status=max_retries,
        backoff_factor=0.2,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # embedding POSTs are idempotent
        respect_retry_after_header=True,
        raise_on_status=False,
    )


class EmbeddingHTTP:
    """A per-backend HTTP client: one session, one adapter per retry budget."""

    # How often a waiting backend checks for cancel requests.
    INTERRUPT_POLL_S = 0.02

    def __init__(self, interrupt=None):
        self._sessions = {}
        self.requests_sent = 0
        # Round robin over a model's servers, starting at the backend's pid so that
        # concurrent indexing sessions start on different servers.
        self._turn = os.getpid()
        self._down = {}  # server URL -> time.monotonic() until which it is skipped
        # server URL -> the most texts it accepted in one request after refusing more
        # (HTTP 413), for this backend's life: later chunks are cut to that size.
        self.request_cap = {}
        # ``interrupt()`` raises when the statement was cancelled (pg_cancel_backend,
        # statement_timeout): PostgreSQL cannot interrupt Python blocked in a socket
        # read, so the request runs in a thread while the backend keeps checking.
        self.interrupt = interrupt
        # A thread of an EmbeddingPipeline checks its own stop flag instead:
        # only the backend's thread may call plpy.
        self._local = threading.local()

    def _check_interrupt(self):
        check = getattr(self._local, "interrupt", None) or self.interrupt
        if check is not None:
            check()

    def _send(self, session, method, url, timeout, deadline_s, **kw):
        """``session.request`` in a thread, given up (socket shut down) when the
        statement is cancelled or after ``deadline_s`` seconds in all."""
        box = {}
        done = threading.Event()

        def work():
            try:
                box["resp"] = session.request(method, url, timeout=timeout, **kw)
            except BaseException as e:  # handed to the waiting backend below
                box["exc"] = e
            finally:
                _ACTIVE_CONNECTIONS.pop(threading.get_ident(), None)
                done.set()

        thread = threading.Thread(target=work, name="omop_emb-http", daemon=True)
        thread.start()
        ends = time.monotonic() + deadline_s
        while not done.wait(self.INTERRUPT_POLL_S):
            if time.monotonic() > ends:
                _abort(thread)
                raise DeadlineExceeded()
            try:
                self._check_interrupt()  # raises when the statement was cancelled
            except BaseException:
                _abort(thread)
                raise
        if "exc" in box:
            raise box["exc"]
        return box["resp"]

    def get(self, url, timeout):
        """A GET (prefix discovery): cancellable, within connect + read timeout in all."""
        return self._send(self.session(0), "GET", url, timeout, sum(timeout))

    def session(self, max_retries):
        s = self._sessions.get(max_retries)
        if s is None:
            import urllib.request

            requests = _requests()
            from requests.adapters import HTTPAdapter

            s = requests.Session()
            # requests re-reads proxy variables (and .netrc) from the environment on
            # every request (~0.25 ms per call). With no proxy configured for the
            # server process there is nothing to re-read; with one, requests keeps
            # honouring it together with no_proxy.
            if not urllib.request.getproxies():
                s.trust_env = False
            adapter = HTTPAdapter(max_retries=make_retry(max_retries), pool_connections=4,
                                  pool_maxsize=4)
            adapter.poolmanager.pool_classes_by_scheme = _tracking_pool_classes()
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = "omop_emb/0.1 (PostgreSQL PL/Python)"
            self._sessions[max_retries] = s
        return s

    def embed(self, model, texts, api_key=None, sql_text=False, binary=False):
        """Embed one chunk on one of the model's servers (``providers.split_endpoints``):
        the next in turn, skipping those that failed lately; a server that cannot be
        reached or fails is left for the next one. Returns as ``post_embeddings``."""
        servers = providers.split_endpoints(model["endpoint"])
        if len(servers) == 1:
            return self.post_fitting(model, texts, api_key, sql_text, binary)
        self._turn += 1
        now = time.monotonic()
        order = [servers[(self._turn + i) % len(servers)] for i in range(len(servers))]
        order.sort(key=lambda s: self._down.get(s, 0.0) > now)  # healthy first, turn kept
        failures = []
        for server in order:
            try:
                return self.post_fitting(dict(model, endpoint=server), texts, api_key, sql_text,
                                         binary)
            except EmbeddingServiceError as e:
                self._down[server] = time.monotonic() + SERVER_DOWN_S
                failures.append(e)
        raise EmbeddingServiceError(
            "all %d servers of model %s failed: %s" % (len(servers), model["name"], failures[-1].message),
            detail="; ".join(e.message for e in failures[:-1]) or None,
            hint=failures[-1].hint)

    def post_fitting(self, model, texts, api_key=None, sql_text=False, binary=False):
        """``post_embeddings`` in requests the server accepts. A server that refuses a
        request of several texts as too large (HTTP 413: Hugging Face TEI above its
        --max-client-batch-size, Infinity, omop-emb-pg serve above --max-batch) gets
        it again in halves; the size both halves passed at is remembered for the
        server (``request_cap``), so later chunks are cut to it without a refusal.
        The size is learned only from requests that then succeeded: a single text
        refused as too long stays an error and teaches nothing."""
        server = model["endpoint"]
        cap = self.request_cap.get(server)
        if cap and len(texts) > cap:
            out = []
            for i in range(0, len(texts), cap):
                out.extend(self.post_fitting(model, texts[i:i + cap], api_key, sql_text, binary))
            return out
        try:
            return self.post_embeddings(model, texts, api_key, sql_text, binary)
        except RequestTooLarge:
            if len(texts) < 2:
                raise
        half = (len(texts) + 1) // 2
        out = self.post_fitting(model, texts[:half], api_key, sql_text, binary)
        out.extend(self.post_fitting(model, texts[half:], api_key, sql_text, binary))
        # (a plain dict store: the pipeline's two threads may race, both to a size
        # that worked)
        self.request_cap[server] = min(half, self.request_cap.get(server) or half)
        return out

    def post_embeddings(self, model, texts, api_key=None, sql_text=False, binary=False):
        """POST one chunk of ``texts``; return validated vectors in order
        (with ``sql_text``: as pgvector's text form, ready for a parameter; with
        ``binary``: as pgvector's binary form, for a binary COPY).

        ``model`` is a mapping with name, provider, endpoint, remote_model,
        dimensions, connect_timeout_s, read_timeout_s, max_retries.
        """
        provider = model["provider"]
        url = providers.embeddings_url(provider, model["endpoint"])
        body = providers.request_body(provider, model["remote_model"] or model["name"], texts,
                                      floats=sql_text)
        where = "embedding server %s (model %s, provider %s)" % (url, model["name"], provider)
        resp = self.post_checked(model, url, body, where, api_key)
        if provider == "openai" and model.get("dimensions"):
            if binary:
                fast = vectors.base64_vectors(resp.content, len(texts), int(model["dimensions"]))
            elif sql_text:
                fast = vectors.json_arrays(resp.content, len(texts), int(model["dimensions"]))
            else:
                fast = None
            if fast is not None:
                return fast
        payload = _json_of(resp, where, api_key, provider)
        try:
            vecs = providers.parse_response(provider, payload, len(texts))
            vecs = providers.validate_vectors(vecs, model.get("dimensions"), model.get("metric"))
            if binary:
                return [_binary(i, v) for i, v in enumerate(vecs)]
            return [vectors.to_sql(v) for v in vecs] if sql_text else vecs
        except InvalidEmbeddingResponse as e:
            raise InvalidEmbeddingResponse(
                "%s gave an invalid answer: %s" % (where, e.message),
                hint="Check that the model registered (dimensions, provider) is the one the "
                     "server runs; omop_emb.models lists the registry.")

    def post_rerank(self, reranker, query, texts, api_key=None):
        """Scores of ``texts`` for ``query`` from a rerank server, in the order of
        ``texts`` (validated: one finite score per text). The same timeouts,
        deadline, retries and errors as an embedding call."""
        from . import rerank

        provider = reranker["provider"]
        url = rerank.rerank_url(provider, reranker["endpoint"])
        body = rerank.request_body(provider, reranker.get("remote_model"), query, texts)
        where = "reranker %s (%s, provider %s)" % (url, reranker["name"], provider)
        resp = self.post_checked(reranker, url, body, where, api_key)
        payload = _json_of(resp, where, api_key, provider)
        try:
            return rerank.parse_response(provider, payload, len(texts))
        except InvalidEmbeddingResponse as e:
            raise InvalidEmbeddingResponse(
                "%s gave an invalid answer: %s" % (where, e.message),
                hint="Check the reranker's provider: 'tei' posts to /rerank (TEI, Infinity), "
                     "'cohere' to /v1/rerank (vLLM, Jina, Cohere).")

    def post_checked(self, conf, url, body, where, api_key):
        """POST ``body`` as JSON under ``conf``'s timeouts, deadline and retry budget
        (connect_timeout_s, read_timeout_s, max_retries); the response when it is
        HTTP 200, else a clear error naming ``where``, never the key."""
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = "Bearer " + api_key
        timeout = (float(conf["connect_timeout_s"]), float(conf["read_timeout_s"]))
        deadline_s = timeout[0] + timeout[1]
        started = time.monotonic()
        requests = _requests()
        from urllib3.exceptions import ReadTimeoutError

        try:
            self.requests_sent += 1
            try:
                resp = self._send(self.session(int(conf["max_retries"])), "POST", url,
                                  timeout, deadline_s, data=json.dumps(body), headers=headers)
            except requests.exceptions.ConnectionError as e:
                # With Retry(read=0) urllib3 wraps a read timeout in MaxRetryError, which
                # requests reports as ConnectionError: report it as the timeout it is.
                if isinstance(getattr(e.args[0] if e.args else None, "reason", None),
                              ReadTimeoutError):
                    raise requests.exceptions.ReadTimeout(str(e))
                raise
        except DeadlineExceeded:
            raise EmbeddingServiceError(
                "no complete answer from %s within the deadline of %.1f s per request"
                % (where, deadline_s),
                detail="The deadline is connect_timeout_s + read_timeout_s for the whole request, "
                       "retries included; the server was still sending (or retrying) after it.",
                hint="The server answers too slowly or drips its answer. Raise read_timeout_s "
                     "with omop_emb.alter_model() for slow servers, or reduce batch_size.")
        except requests.exceptions.ConnectTimeout:
            raise EmbeddingServiceError(
                "could not connect to %s within %.1f s" % (where, timeout[0]),
                hint="Check that the server is running and reachable from the database "
                     "server; the endpoint is set with omop_emb.alter_model() (a reranker's: "
                     "omop_emb.register_reranker()).")
        except requests.exceptions.ReadTimeout:
            raise EmbeddingServiceError(
                "no answer from %s within the read timeout of %.1f s" % (where, timeout[1]),
                detail="The server accepted the connection but did not answer.",
                hint="The server may be overloaded or hung. Raise read_timeout_s with "
                     "omop_emb.alter_model() for slow servers, or reduce batch_size.")
        except requests.exceptions.ConnectionError as e:
            raise EmbeddingServiceError(
                "cannot reach %s: %s" % (where, _reason(e)),
                detail="gave up after %.1f s (at most %d retries)"
                       % (time.monotonic() - started, int(conf["max_retries"])),
                hint="Check that the server is running (omop-emb-pg serve for the embedded "
                     "default) and that the endpoint is right.")
        except requests.exceptions.RequestException as e:
            raise EmbeddingServiceError("request to %s failed: %s" % (where, _reason(e)),
                                        hint="Check the endpoint registered.")
        if resp.status_code != 200:
            raise (RequestTooLarge if resp.status_code == 413 else EmbeddingServiceError)(
                "%s answered HTTP %d" % (where, resp.status_code),
                detail=_short(resp.text, api_key),
                hint=_status_hint(resp.status_code))
        return resp


def _binary(i, vec):
    try:
        return vectors.to_binary(vec)
    except (OverflowError, struct.error):
        raise InvalidEmbeddingResponse("vector %d holds a value out of the range of float32" % i)


def _json_of(resp, where, api_key, provider):
    try:
        return resp.json()
    except ValueError:
        raise InvalidEmbeddingResponse(
            "%s answered HTTP 200 with a body that is not JSON" % where,
            detail=_short(resp.text, api_key),
            hint="Is the endpoint a server of provider %r?" % provider)


def _reason(exc):
    # The root cause without the request (which could carry headers).
    inner = exc.args[0] if exc.args else exc
    reason = str(getattr(inner, "reason", None) or inner)
    # urllib3 puts "<HTTPConnection object at 0x...>: " before the cause.
    if reason.startswith("<") and ">: " in reason:
        reason = reason.split(">: ", 1)[1]
    return reason[:300]


def _short(text, api_key):
    text = (text or "")[:500]
    if api_key:
        text = text.replace(api_key, "***")
    return "response: " + text


def _status_hint(status):
    if status in (401, 403):
        return ("The server refused the credentials. The administrator sets the key "
                "reference with omop_emb.alter_model(model, api_key_ref => ...).")
    if status == 404:
        return "Check the endpoint and the provider ('openai' posts to /v1/embeddings, " \
               "'ollama' to /api/embed) and the remote model name."
    if status == 413:
        return ("The server refused the request as too large. Embedding requests of several "
                "texts are split until the server takes them, so one text was too long for "
                "it: check the model's max_input_chars and the server's input limit (a "
                "reranker: lower top_n).")
    if status in (400, 422):
        return "The server rejected the input: check text length, batch_size and prefixes."
    if status == 429:
        return "Rate limited after retries: lower the load or raise max_retries."
    return "The embedding server failed; retried with backoff. Check its logs."


class PipelineStopped(Exception):
    """The backend stopped its pipeline (the statement was cancelled or failed)."""


class EmbeddingPipeline:
    """Embed the chunks of a batch in background threads (``threads`` requests in
    flight), results taken in the order submitted: the server embeds one chunk while
    the backend claims the rest of the batch, or reads and checks the answer before
    (one request at a time, the backend and the server each waited for the other).

    ``embed(texts)`` runs in a thread and must not touch plpy: only the backend's
    thread may. That thread waits for each result in slices of INTERRUPT_POLL_S and
    checks for cancels between them (``result``). The threads' own HTTP waits check
    the pipeline's stop flag instead, so that leaving the ``with`` block, normally or
    by an error (a cancel included), stops them at once: a request running is
    abandoned (its socket shut down), chunks not started are dropped, and the threads
    are joined before the block is left. After a chunk fails, no chunk is started and
    the ones not done fail with the same error (their texts stay claimed by the
    transaction, which the error rolls back into the queue)."""

    THREAD_NAME = "omop_emb-http-pipeline"

    def __init__(self, http, embed, threads=1):
        self.http = http
        self._embed = embed
        self._stop = threading.Event()
        self._jobs = []
        self._cv = threading.Condition()
        self._threads = []
        self._want = max(1, int(threads))
        self._failed = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def submit(self, texts):
        """Queue one chunk; returns the job that ``result`` waits for."""
        job = {"texts": texts, "done": threading.Event()}
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()
        if len(self._threads) < min(self._want, len(self._jobs) + len(self._threads)):
            t = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
            self._threads.append(t)
            t.start()
        return job

    def _stopped(self):
        if self._stop.is_set():
            raise PipelineStopped()

    def _run(self):
        self.http._local.interrupt = self._stopped
        while True:
            with self._cv:
                while not self._jobs and not self._stop.is_set():
                    self._cv.wait()
                if self._stop.is_set():
                    return
                job = self._jobs.pop(0)
                failed = self._failed
            if failed is None:
                try:
                    job["result"] = self._embed(job["texts"])
                except BaseException as e:  # handed to the backend's thread by result()
                    with self._cv:
                        self._failed = failed = self._failed or e
            if failed is not None:
                job["exc"] = failed
            job["done"].set()

    def result(self, job):
        """The vectors of ``job`` (the backend's thread only: it checks for cancels)."""
        while not job["done"].wait(self.http.INTERRUPT_POLL_S):
            self.http._check_interrupt()
        if "exc" in job:
            raise job["exc"]
        return job["result"]

    def close(self):
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        # Bounded: a thread's HTTP wait checks the stop flag every INTERRUPT_POLL_S.
        for t in self._threads:
            t.join()
        self._threads = []
