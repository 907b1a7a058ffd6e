"""A throwaway PostgreSQL cluster for tests, the demo and benchmarks.

``LocalCluster`` wraps ``initdb`` / ``pg_ctl`` of the PostgreSQL found through
``pg_config --bindir``. The cluster listens on 127.0.0.1 only (plus a unix
socket inside the data directory), trusts local connections -- except those of
members of the role ``password_login`` over TCP, which must give their password
(scram-sha-256), so that a login form can be tested -- and records its
port in the data directory so that a second run reuses it (fast ``make demo``).

``initdb`` refuses to run as root: when the current process is root the data
directory is handed to the ``postgres`` OS account and every server command
runs through ``runuser -u postgres --``.

    with LocalCluster("/tmp/omop_emb/pg") as pg:
        dsn = pg.dsn("postgres")

A streaming hot standby of a running cluster: ``pg.make_replica(path)``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

__all__ = ["LocalCluster", "ClusterError", "free_port", "find_bindir", "PASSWORD_LOGIN_ROLE"]

#: File (inside the data directory) holding the settings this module manages.
CONF_NAME = "omop_emb_cluster.conf"
#: Members of this role (when it exists) must give their password over TCP; every other role is trusted.
PASSWORD_LOGIN_ROLE = "password_login"
#: File (inside the data directory) recording port and superuser for reuse.
STATE_NAME = "omop_emb_cluster.json"
LOG_NAME = "server.log"


class ClusterError(RuntimeError):
    """A PostgreSQL command failed; the message carries its output."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def find_bindir(pg_config: str | None = None) -> Path:
    """PostgreSQL's bin directory: ``pg_config --bindir``, else the newest /usr/lib/postgresql/N/bin."""
    candidates = [pg_config] if pg_config else []
    candidates += [os.environ.get("PG_CONFIG"), shutil.which("pg_config")]
    for cfg in candidates:
        if not cfg:
            continue
        try:
            out = subprocess.run([cfg, "--bindir"], capture_output=True, text=True, check=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        majors = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for p in reversed(majors):
            if (p / "bin" / "initdb").exists():
                return p / "bin"
    raise ClusterError(
        "PostgreSQL server binaries not found (no pg_config on PATH, nothing in /usr/lib/postgresql). "
        "Run `sudo bash scripts/install-server-deps.sh`."
    )


class LocalCluster:
    """A PostgreSQL cluster in ``datadir``, owned by an unprivileged account.

    Parameters
    ----------
    datadir: the data directory; created (and initdb'ed) when missing or empty,
        reused when it already holds a cluster.
    port: TCP port; default: the port recorded in ``datadir`` when free, else a free one.
    fsync: ``False`` (default) turns off fsync/full_page_writes/synchronous_commit — fine
        for throwaway clusters, never for data you keep.
    settings: extra ``postgresql.conf`` settings, e.g. ``{"work_mem": "64MB"}``.
    superuser: name of the bootstrap superuser (default ``postgres``).
    os_user: OS account that owns and runs the cluster; default: ``postgres`` when we are
        root, else the current user.
    """

    def __init__(
        self,
        datadir: str | os.PathLike,
        *,
        port: int | None = None,
        fsync: bool = False,
        settings: Mapping[str, object] | None = None,
        superuser: str = "postgres",
        os_user: str | None = None,
        bindir: str | os.PathLike | None = None,
        stop_on_exit: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.datadir = Path(datadir).absolute()
        self.host = "127.0.0.1"
        self.fsync = fsync
        self.settings = dict(settings or {})
        self.superuser = superuser
        self.bindir = Path(bindir) if bindir else find_bindir()
        self.stop_on_exit = stop_on_exit
        self.start_timeout = start_timeout
        if os_user is None and os.geteuid() == 0:
            os_user = "postgres"
        self.os_user = os_user if os_user and os_user != _current_user() else None
        self._requested_port = port
        self.port: int = port or self._recorded_state().get("port") or 0
        if self._recorded_state().get("superuser"):
            self.superuser = self._recorded_state()["superuser"]

    # ------------------------------------------------------------ properties
    def __repr__(self) -> str:
        return f"LocalCluster({str(self.datadir)!r}, port={self.port}, running={self.is_running()})"

    @property
    def log_file(self) -> Path:
        return self.datadir / LOG_NAME

    @property
    def socket_dir(self) -> Path:
        """Directory holding the unix socket (the data dir unless its path is too long)."""
        st = self._recorded_state()
        return Path(st["socket_dir"]) if st.get("socket_dir") else self.datadir

    def is_initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not (self.datadir / "postmaster.pid").exists():
            return False
        r = self._run([self._bin("pg_ctl"), "-D", str(self.datadir), "status"], check=False)
        return r.returncode == 0

    def dsn(self, dbname: str = "postgres", user: str | None = None, **extra: object) -> str:
        """A libpq keyword/value DSN for ``dbname`` over TCP loopback."""
        if not self.port:
            raise ClusterError("cluster has no port yet: call start() first")
        parts = {"host": self.host, "port": self.port, "dbname": dbname, "user": user or self.superuser}
        parts.update(extra)
        return " ".join(f"{k}={_dsn_quote(v)}" for k, v in parts.items())

    def url(self, dbname: str = "postgres", user: str | None = None) -> str:
        """The same as :meth:`dsn`, as a ``postgresql://`` URL."""
        return f"postgresql://{user or self.superuser}@{self.host}:{self.port}/{dbname}"

    # ------------------------------------------------------------ lifecycle
    def init(self) -> "LocalCluster":
        """initdb the data directory unless it already holds a cluster."""
        if self.is_initialized():
            return self
        self._prepare_dir(self.datadir)
        locale_args = ["--locale=C.UTF-8"] if _has_c_utf8() else ["--no-locale"]
        self._run(
            [
                self._bin("initdb"),
                "-D", str(self.datadir),
                "-U", self.superuser,
                "--auth=trust",
                "-E", "UTF8",
                *locale_args,
                *([] if self.fsync else ["--no-sync"]),
            ],
            what="initdb",
        )
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as f:
            f.write(f"\n# managed by omop_emb_pg.cluster\ninclude_if_exists = '{CONF_NAME}'\n")
        self._write_state({"superuser": self.superuser})
        return self

    def start(self) -> "LocalCluster":
        """Start the server (initdb first when needed). A running cluster is left as is."""
        self.init()
        if self.is_running():
            if not self.port:
                self.port = int(self._recorded_state().get("port") or 0)
            return self
        port = self._requested_port or self._recorded_state().get("port")
        if not port or _port_in_use(port, self.host):
            port = free_port(self.host)
        self.port = int(port)
        self._write_conf()
        self._run(
            [
                self._bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.log_file),
                "-w", "-t", str(int(self.start_timeout)), "start",
            ],
            what="pg_ctl start",
        )
        self._wait_accepting()
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` shutdown by default). No-op when it is not running."""
        if not self.is_running():
            return
        self._run(
            [self._bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"],
            what="pg_ctl stop",
        )

    def restart(self) -> "LocalCluster":
        self.stop()
        return self.start()

    def destroy(self) -> None:
        """Stop the server and remove the data directory."""
        self.stop(mode="immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
        sock = self._recorded_socket_dir_if_separate()
        if sock:
            shutil.rmtree(sock, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.stop_on_exit:
            self.stop()

    # ------------------------------------------------------------ SQL helpers
    def psql(self, sql: str, dbname: str = "postgres", *, check: bool = True) -> str:
        """Run SQL through ``psql`` (no Python driver needed); returns unaligned, tuples-only output."""
        r = self._run(
            [self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", self.superuser, "-d", dbname, "-c", sql],
            check=check,
            what="psql",
        )
        return r.stdout.strip()

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """CREATE DATABASE ``name`` (if missing); returns its DSN."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = {_sql_literal(name)}")
        if not exists:
            tmpl = f" TEMPLATE {_ident(template)}" if template else ""
            self.psql(f"CREATE DATABASE {_ident(name)}{tmpl}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")

    # ------------------------------------------------------------ replication
    def make_replica(
        self,
        datadir: str | os.PathLike,
        *,
        port: int | None = None,
        start: bool = True,
        settings: Mapping[str, object] | None = None,
    ) -> "LocalCluster":
        """pg_basebackup this (running) cluster into ``datadir`` as a streaming hot standby.

        The replica gets its own port and socket directory and is started unless
        ``start=False``. Returns its ``LocalCluster``. Use :meth:`wait_for_replica`
        to wait until it has replayed everything written so far.
        """
        if not self.is_running():
            raise ClusterError("make_replica: the primary is not running")
        datadir = Path(datadir).absolute()
        if (datadir / "PG_VERSION").exists():
            raise ClusterError(f"make_replica: {datadir} already holds a cluster")
        self._prepare_dir(datadir)
        self._run(
            [
                self._bin("pg_basebackup"),
                "-h", self.host, "-p", str(self.port), "-U", self.superuser,
                "-D", str(datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync",
            ],
            what="pg_basebackup",
        )
        # Do not inherit the primary's state file (port, socket dir) or its log.
        for name in (STATE_NAME, LOG_NAME, CONF_NAME):
            p = datadir / name
            if p.exists():
                p.unlink()
        replica = LocalCluster(
            datadir,
            port=port,
            fsync=self.fsync,
            settings={**self.settings, "hot_standby": "on", **(settings or {})},
            superuser=self.superuser,
            os_user=self.os_user,
            bindir=self.bindir,
            stop_on_exit=self.stop_on_exit,
            start_timeout=self.start_timeout,
        )
        replica._write_state({"superuser": self.superuser, "replica_of": self.port})
        if start:
            replica.start()
        return replica

    def is_in_recovery(self) -> bool:
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    def wait_for_replica(self, replica: "LocalCluster", timeout: float = 30.0) -> None:
        """Block until ``replica`` has replayed the primary's current WAL position."""
        # insert (not write) position: with synchronous_commit=off the last commit may not be written yet.
        target = self.psql("SELECT pg_current_wal_insert_lsn()")
        deadline = time.monotonic() + timeout
        while True:
            done = replica.psql(
                f"SELECT coalesce(pg_last_wal_replay_lsn() >= '{target}'::pg_lsn, false)", check=False
            )
            if done == "t":
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"replica on port {replica.port} did not reach {target} within {timeout}s")
            time.sleep(0.05)

    # ------------------------------------------------------------ internals
    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _run(self, cmd: list[str], *, check: bool = True, what: str | None = None) -> subprocess.CompletedProcess:
        if self.os_user:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        env = dict(os.environ)
        for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGOPTIONS", "PGDATA"):
            env.pop(k, None)
        env.setdefault("LC_ALL", "C.UTF-8" if _has_c_utf8() else "C")
        # cwd "/" so that the unprivileged account never trips over an unreadable cwd.
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env=env, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            detail = (r.stderr or r.stdout).strip()
            if what in ("pg_ctl start",) and self.log_file.exists():
                try:
                    detail += "\n--- server log (tail) ---\n" + "\n".join(
                        self.log_file.read_text(errors="replace").splitlines()[-30:]
                    )
                except OSError:
                    pass
            raise ClusterError(f"{what or cmd[0]} failed (exit {r.returncode}) for {self.datadir}:\n{detail}")
        return r

    def _prepare_dir(self, path: Path) -> None:
        """Create ``path`` empty with mode 0700, owned by the OS account that runs the server."""
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise ClusterError(f"{path} exists, is not empty and holds no PostgreSQL cluster")
        os.chmod(path, 0o700)
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)
            r = subprocess.run(["runuser", "-u", self.os_user, "--", "test", "-w", str(path)], cwd="/")
            if r.returncode != 0:
                raise ClusterError(
                    f"the {self.os_user!r} account cannot reach {path}: a parent directory is not "
                    f"searchable by it (make the parents world-executable, or use a directory under /tmp)"
                )

    def _recorded_state(self) -> dict:
        try:
            return json.loads((self.datadir / STATE_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, update: Mapping[str, object]) -> None:
        st = self._recorded_state()
        st.update(update)
        self._write_owned(self.datadir / STATE_NAME, json.dumps(st, indent=2) + "\n")

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(path, 0o600)

    def _recorded_socket_dir_if_separate(self) -> Path | None:
        sd = self._recorded_state().get("socket_dir")
        return Path(sd) if sd and Path(sd) != self.datadir else None

    def _choose_socket_dir(self) -> Path:
        # sun_path holds 107 bytes: "<dir>/.s.PGSQL.<port>" must fit.
        if len(str(self.datadir)) + len("/.s.PGSQL.65535") < 100:
            return self.datadir
        existing = self._recorded_socket_dir_if_separate()
        if existing and existing.is_dir():
            return existing
        d = Path(tempfile.mkdtemp(prefix="omop_emb_sock_"))
        os.chmod(d, 0o700)
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        return d

    def _write_conf(self) -> None:
        sock = self._choose_socket_dir()
        base: dict[str, object] = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(sock),
            "shared_buffers": "128MB",
            "max_connections": 100,
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "wal_keep_size": "256MB",
            "hot_standby": "on",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "dynamic_shared_memory_type": "posix",
        }
        if not self.fsync:
            base.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        base.update(self.settings)
        lines = ["# Written by omop_emb_pg.cluster.LocalCluster on every start; edits are overwritten."]
        lines += [f"{k} = {_conf_value(v)}" for k, v in base.items()]
        self._write_owned(self.datadir / CONF_NAME, "\n".join(lines) + "\n")
        self._write_hba()
        self._write_state({"port": self.port, "socket_dir": str(sock) if sock != self.datadir else None})

    def _write_hba(self) -> None:
        """pg_hba.conf: trust, except members of PASSWORD_LOGIN_ROLE over TCP (first match wins)."""
        lines = ["# Written by omop_emb_pg.cluster.LocalCluster on every start; edits are overwritten.",
                 "local all all trust"]
        for net in ("127.0.0.1/32", "::1/128"):
            lines.append(f"host all +{PASSWORD_LOGIN_ROLE} {net} scram-sha-256")
        for net in ("127.0.0.1/32", "::1/128"):
            lines += [f"host all all {net} trust", f"host replication all {net} trust"]
        lines.append("local replication all trust")
        self._write_owned(self.datadir / "pg_hba.conf", "\n".join(lines) + "\n")

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            r = self._run(
                [self._bin("pg_isready"), "-h", self.host, "-p", str(self.port), "-U", self.superuser, "-d", "postgres"],
                check=False,
            )
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise ClusterError(f"server in {self.datadir} did not accept connections on port {self.port}")


# ---------------------------------------------------------------- helpers
def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


_C_UTF8: bool | None = None


def _has_c_utf8() -> bool:
    global _C_UTF8
    if _C_UTF8 is None:
        try:
            out = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=5).stdout
            _C_UTF8 = any(x.lower() in ("c.utf8", "c.utf-8") for x in out.split())
        except (OSError, subprocess.SubprocessError):
            _C_UTF8 = False
    return _C_UTF8


def _conf_value(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("\\", "\\\\").replace("'", "''") + "'"


def _dsn_quote(v: object) -> str:
    s = str(v)
    if s and not any(c in s for c in " '\\"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"

