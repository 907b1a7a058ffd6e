"""Server-side sessions of the review page: who is logged in, as which database role.

The browser holds only a signed, random session id (cookie). The credentials live here,
in this process's memory, never in the cookie, a log or a page; each session owns one
psycopg connection opened as its own role (nothing is shared or cached across users).
A session ends at logout, after ``idle_timeout`` seconds without a request, or after
``max_age`` seconds in all; its connection is closed and its password forgotten then.
"""

from __future__ import annotations

import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import psycopg
from itsdangerous import BadSignature, URLSafeSerializer

from .server import DEFAULT_IDLE_TIMEOUT_S

#: Seconds after login after which a session ends whatever its activity.
DEFAULT_MAX_AGE_S = 12 * 60 * 60
#: Name of the cookie that carries the signed session id.
COOKIE_NAME = "omop_emb_session"


@dataclass
class Session:
    sid: str
    user: str
    conninfo: str  # holds the password: never rendered, never logged
    csrf: str
    created: float
    last_seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) shown on the next page
    _conn: psycopg.Connection | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:  # no conninfo (password) in any repr
        return f"Session(user={self.user!r})"

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """This session's own autocommit connection, as its role; reopened when it broke."""
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = psycopg.connect(self.conninfo, autocommit=True,
                                             application_name="omop-emb-pg ui")
            yield self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None
            self.conninfo = ""


class SessionStore:
    """Sessions by id, with idle and absolute expiry; ids travel signed in a cookie."""

    def __init__(self, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S, max_age: float = DEFAULT_MAX_AGE_S,
                 secret: str | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.max_age = max_age
        # A fresh secret per process: restarting the page logs everyone out.
        self._signer = URLSafeSerializer(secret or secrets.token_urlsafe(32), salt="omop-emb-ui-session")
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str, conninfo: str, conn: psycopg.Connection | None = None) -> tuple[Session, str]:
        """A new session (with an already open connection, when given); returns it and its cookie value."""
        now = time.monotonic()
        s = Session(sid=secrets.token_urlsafe(32), user=user, conninfo=conninfo,
                    csrf=secrets.token_urlsafe(24), created=now, last_seen=now, _conn=conn)
        with self._lock:
            self._sessions[s.sid] = s
        return s, self._signer.dumps(s.sid)

    def get(self, cookie: str | None) -> Session | None:
        """The live session of a cookie value, or None (bad signature, unknown, expired)."""
        self.sweep()
        if not cookie:
            return None
        try:
            sid = self._signer.loads(cookie)
        except BadSignature:
            return None
        with self._lock:
            s = self._sessions.get(sid)
        if s is None:
            return None
        s.last_seen = time.monotonic()
        return s

    def end(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.sid, None)
        session.close()

    def sweep(self) -> None:
        """End every session idle for longer than idle_timeout or older than max_age."""
        now = time.monotonic()
        with self._lock:
            dead = [s for s in self._sessions.values()
                    if now - s.last_seen > self.idle_timeout or now - s.created > self.max_age]
            for s in dead:
                self._sessions.pop(s.sid, None)
        for s in dead:
            s.close()

    def close_all(self) -> None:
        with self._lock:
            all_sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in all_sessions:
            s.close()

    def __len__(self) -> int:
        return len(self._sessions)
