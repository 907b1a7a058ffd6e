"""Serving the review page: where it may listen, and with which transport security.

Loopback (127.0.0.1) by default. Any other address carries passwords over the network, so
it needs a TLS certificate and key, or an explicit ``insecure_bind`` -- and the page says
which at start. ``single_user`` (the DSN's own user, no login form) is loopback only.
"""

from __future__ import annotations

import sys
from typing import TextIO

from psycopg.conninfo import conninfo_to_dict

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8780
#: Seconds without a request after which a login session ends.
DEFAULT_IDLE_TIMEOUT_S = 30 * 60


class UiStartError(RuntimeError):
    """The page cannot start with these options (the message says what to change)."""


def check_bind(host: str, *, tls: bool, insecure_bind: bool, single_user: bool) -> list[str]:
    """Refuse a bind that would expose passwords; returns the warnings to print at start."""
    from .app import is_loopback

    warnings: list[str] = []
    loopback = is_loopback(host)
    if single_user and not loopback:
        raise UiStartError(f"--single-user serves the DSN's own role without a login: it listens on loopback "
                           f"only, not on {host!r}. Drop --host, or log in per user (no --single-user).")
    if not loopback and not tls:
        if not insecure_bind:
            raise UiStartError(f"listening on {host!r} (not loopback) would send database passwords in clear "
                               f"text. Give --tls-cert and --tls-key, or --insecure-bind if a proxy in front "
                               f"terminates TLS.")
        warnings.append(f"WARNING: serving on {host} WITHOUT TLS (--insecure-bind): passwords typed into the "
                        f"login form cross the network in clear text unless a proxy in front encrypts them.")
    elif not loopback:
        warnings.append(f"serving on {host} with TLS: reachable from other machines.")
    return warnings


def run(dsn: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, tls_cert: str | None = None,
        tls_key: str | None = None, insecure_bind: bool = False, single_user: bool = False,
        model: str | None = None, vocabulary_schema: str | None = None, cdm_schema: str | None = None,
        idle_timeout: float | None = None,
        out: TextIO | None = None) -> int:
    import uvicorn

    from .app import UiSettings, create_app, dsn_target, is_loopback

    out = out or sys.stderr
    if bool(tls_cert) != bool(tls_key):
        raise UiStartError("give both --tls-cert and --tls-key (or neither)")
    tls = bool(tls_cert and tls_key)
    warnings = check_bind(host, tls=tls, insecure_bind=insecure_bind, single_user=single_user)
    d = conninfo_to_dict(dsn)
    if single_user and not is_loopback(d.get("host")):
        raise UiStartError(f"--single-user needs a database on this machine (the DSN's host is {d.get('host')!r}).")
    settings = UiSettings(dsn=dsn, single_user=single_user, model=model, vocabulary_schema=vocabulary_schema,
                          cdm_schema=cdm_schema, secure_cookies=tls, idle_timeout=idle_timeout or DEFAULT_IDLE_TIMEOUT_S)
    app = create_app(settings)
    scheme = "https" if tls else "http"
    shown_host = f"[{host}]" if ":" in host else host
    who = (f"as the DSN's user {d.get('user') or '(default)'} (single user, no login)" if single_user
           else "log in with a PostgreSQL user and password")
    print(f"omop-emb-pg ui: http{'s' if tls else ''} on {scheme}://{shown_host}:{port}/ for database "
          f"{dsn_target(dsn)}; {who}; sessions end after {settings.idle_timeout / 60:.0f} min idle.",
          file=out)
    for w in warnings:
        print(f"omop-emb-pg ui: {w}", file=out)
    out.flush()
    uvicorn.run(app, host=host, port=port, ssl_certfile=tls_cert, ssl_keyfile=tls_key, log_level="warning",
                access_log=False)  # no access log: URLs carry search terms of patients' records
    return 0
