"""Shared plumbing of the benchmarks: the cluster, the embedding servers, timing helpers."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "python"))

PG_SETTINGS = {
    "shared_buffers": "2GB",
    "maintenance_work_mem": "3GB",
    "max_parallel_maintenance_workers": 1,
    "work_mem": "64MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "jit": "off",
}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


class Proc:
    """A server subprocess on a free loopback port, stopped with SIGTERM on exit."""

    def __init__(self, kind: str, dim: int = 384):
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        py = sys.executable
        if kind == "instant":
            cmd = [py, str(BENCH / "instant_server.py"), "--port", str(self.port), "--dim", str(dim)]
        elif kind == "deterministic":
            cmd = [py, "-m", "omop_emb_pg.testing.deterministic_server", "--port", str(self.port),
                   "--dim", str(dim)]
        elif kind == "e5":
            exe = Path(py).parent / "omop-emb-pg"
            base = [str(exe)] if exe.exists() else [py, "-m", "omop_emb_pg.cli"]
            cmd = base + ["serve", "--port", str(self.port), "--quiet"]
        else:
            raise ValueError(kind)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, env=env)
        wait_http(self.url, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Database:
    """Where the benchmark databases live: ``--dsn`` (an existing server) or our own LocalCluster."""

    def __init__(self, dsn: str | None = None, datadir: str | None = None, keep: bool = False,
                 prefix: str = ""):
        self.prefix = prefix
        self.created: list[str] = []
        self.cluster = None
        self.tmp = None
        self.keep = keep or bool(datadir)
        if dsn:
            self.base_dsn = dsn
            return
        from omop_emb_pg.cluster import LocalCluster

        if datadir is None:
            self.tmp = tempfile.mkdtemp(prefix="omop_emb_bench_")
            os.chmod(self.tmp, 0o755)
            datadir = os.path.join(self.tmp, "data")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(datadir)), exist_ok=True)
            os.chmod(os.path.dirname(os.path.abspath(datadir)), 0o755)
        self.cluster = LocalCluster(datadir, fsync=False, settings=PG_SETTINGS)
        self.cluster.start()
        self.base_dsn = self.cluster.dsn("postgres")

    def dsn(self, dbname: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.base_dsn, dbname=dbname)

    def exists(self, name: str) -> bool:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            return c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

    def name(self, name: str) -> str:
        return self.prefix + name

    def create(self, name: str, fresh: bool = True) -> str:
        name = self.name(name)
        self.created.append(name)
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            if fresh:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                c.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def install(self, dsn: str) -> None:
        from omop_emb_pg.install import install

        install(dsn)

    def settings(self) -> dict:
        with psycopg.connect(self.dsn("postgres")) as c:
            names = ["server_version", "shared_buffers", "maintenance_work_mem",
                     "max_parallel_maintenance_workers", "work_mem", "max_parallel_workers_per_gather"]
            out = {n: c.execute(f"SHOW {n}").fetchone()[0] for n in names}
            out["pgvector"] = c.execute(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0]
            return out

    def close(self) -> None:
        if self.cluster is None and self.prefix:
            # a shared server (--dsn) with a private prefix: leave nothing behind
            with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
                for n in self.created:
                    c.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
        if self.cluster is not None and not self.keep:
            self.cluster.stop(mode="immediate")
            if self.tmp:
                import shutil

                shutil.rmtree(self.tmp, ignore_errors=True)


def pct(xs, p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summary_ms(samples_s) -> dict:
    ms = [s * 1000.0 for s in samples_s]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p95_ms": pct(ms, 95), "p99_ms": pct(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"), "min_ms": min(ms) if ms else None}


def vm_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])  # kB
    return out


@contextmanager
def progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as p:
        yield p


def write_result(path, res: dict, echo: bool = True) -> None:
    """Write an A/B benchmark's result as indented JSON to ``path`` (its folder made), and
    print it unless ``echo`` is false: the last steps of every bench/ab_*.py."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=1) + "\n")
    if echo:
        print(json.dumps(res, indent=1))


def save_plot(fig, ax, path: Path, legend_fontsize: int = 8) -> str:
    """Grid, legend, tight layout, PNG at 110 dpi, figure closed: the last steps of every
    benchmark plot. Returns the file name (for the list of plots made)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: [0] state, [1] ppid, [11..14] utime
    stime cutime cstime (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` of this machine has used; None if unreadable."""
    try:
        st = proc_stat(pid)
    except OSError:
        return None
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


class ServerCpu:
    """CPU seconds used by the PostgreSQL server at ``dsn`` so far: its postmaster and live
    children, plus the children it reaped (cutime, cstime). None when the server's processes
    cannot be read (another machine, no superuser)."""

    def __init__(self, dsn: str):
        self.pid = None
        try:
            with psycopg.connect(dsn) as c:
                datadir = c.execute("SHOW data_directory").fetchone()[0]
            with open(os.path.join(datadir, "postmaster.pid")) as f:
                self.pid = int(f.readline())
            self.now()
        except (OSError, ValueError, psycopg.Error):
            self.pid = None

    def now(self) -> float | None:
        if self.pid is None:
            return None
        ticks = sum(int(x) for x in proc_stat(self.pid)[11:15])
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    st = proc_stat(int(d))
                except OSError:
                    continue
                if int(st[1]) == self.pid:
                    ticks += sum(int(x) for x in st[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")


def install_api(root: str, dsn: str) -> str:
    """Run the re-runnable API (sql/api and the in-database Python) of the source tree ``root``,
    built by its own extension/build.py, in ``dsn``: a kept benchmark cluster keeps its installed
    version, and pgai's split makes the API CREATE OR REPLACE, so this brings its functions to
    that tree's (a function new since then is created outside the extension: fine for a bench)."""
    build_py = Path(root).resolve() / "extension" / "build.py"
    spec = importlib.util.spec_from_file_location("omop_emb_build_%x" % abs(hash(str(build_py))), build_py)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ver = build.version()
    script = build._substitute("\n".join(build._part(p) for p in build._api_files()), ver)
    with psycopg.connect(dsn, autocommit=True) as c, c.transaction():
        c.execute(script)
    return ver
