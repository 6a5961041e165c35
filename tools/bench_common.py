"""Helpers for the benchmark tools: server processes, RESP encoding, statistics.

Everything here talks to 127.0.0.1 only. Processes started here are tracked by pid
and stopped by pid (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import struct
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hiredis

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
REDIS_SERVER = "/usr/bin/redis-server"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def command(*args: bytes | str | int) -> bytes:
    """One request as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or y == 0:
        return None
    return x / y


def figure(meilies: float | None, redis: float | None, digits: int = 3) -> dict:
    def r(v):
        return None if v is None else round(v, digits)
    rt = ratio(meilies, redis)
    return {"meilies": r(meilies), "redis": r(redis), "ratio": None if rt is None else round(rt, 3)}


class Client:
    """A blocking connection for setup and checks (not for measured traffic)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def call(self, *args):
        self.sock.sendall(command(*args))
        return self.read()

    def read(self):
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("server closed the connection")
            self.reader.feed(data)

    def close(self) -> None:
        self.sock.close()


class ServerProcess:
    """A server we started: its pid, its CPU time and memory from /proc, a clean stop."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                c = Client(self.port, timeout=2.0)
                try:
                    if c.call("PING") in (b"PONG", "PONG"):
                        return
                finally:
                    c.close()
            except (OSError, ConnectionError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready on port {self.port} after {timeout}s: "
                           f"{self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) did not stop in {grace}s: SIGKILL")
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode


def start_meilies(workdir: Path, fsync: str, tag: str, extra: list[str] | None = None
                  ) -> ServerProcess:
    port = free_port()
    data_dir = workdir / f"meilies-{tag}"
    argv = [sys.executable, "-m", "meilies.cli.server", "--data-dir", str(data_dir),
            "--port", str(port), "--fsync", fsync, "--log-level", "warning"] + (extra or [])
    server = ServerProcess(f"meilies[{tag}]", argv, port, workdir / f"meilies-{tag}.log",
                           cwd=REPO)
    server.wait_ready()
    return server


def start_redis(workdir: Path, appendfsync: str, tag: str, extra: list[str] | None = None
                ) -> ServerProcess:
    port = free_port()
    data_dir = workdir / f"redis-{tag}"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "yes", "--appendfsync", appendfsync, "--dir", str(data_dir),
            "--daemonize", "no", "--protected-mode", "yes"] + (extra or [])
    server = ServerProcess(f"redis[{tag}]", argv, port, workdir / f"redis-{tag}.log")
    server.wait_ready()
    return server


def redis_available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK) or shutil.which("redis-server") is not None


def meilies_frame_size(stream: bytes, name: bytes, number: int, data_len: int) -> int:
    """Bytes of one event frame as MeiliES sends it (PROTOCOL.md)."""
    return (len(b"*5\r\n+event\r\n+%s\r\n:%d\r\n+%s\r\n$%d\r\n"
                % (stream, number, name, data_len)) + data_len + 2)


def meilies_frames_total(stream: bytes, name: bytes, first: int, stop: int,
                         data_len: int) -> int:
    """Total bytes of frames ``first`` .. ``stop-1`` (closed form over digit counts)."""
    fixed = len(b"*5\r\n+event\r\n+%s\r\n:\r\n+%s\r\n$%d\r\n" % (stream, name, data_len)) \
        + data_len + 2
    total = fixed * max(0, stop - first)
    lo = first
    digits = len(str(first))
    while lo < stop:
        hi = min(stop, 10 ** digits)
        total += (hi - lo) * digits
        lo = hi
        digits += 1
    return total


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def connect(port: int) -> socket.socket:
    """A client socket to the server on ``port``, Nagle off."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def close_all(socks) -> None:
    """Close ``socks`` with a reset (linger on, 0 s), leaving no TIME_WAIT behind."""
    for sock in socks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass


# -- what every benchmark's run and report share ---------------------------------------------

#: Every run's value behind each median figure, by figure name: the report's ``runs``.
RAW: dict[str, dict[str, list]] = {}


def summarize(name: str, m_runs: list[dict], r_runs: list[dict], key: str,
              digits: int = 3) -> dict:
    """The figure for ``key`` (median over runs); every run's value goes to ``RAW``."""
    m = [r[key] for r in m_runs]
    rd = [r[key] for r in r_runs]
    RAW[name] = {"meilies": [None if v is None else round(v, digits) for v in m],
                 "redis": [None if v is None else round(v, digits) for v in rd]}
    return figure(median(m), median(rd), digits)


def median_run(runs: list[dict], key: str) -> dict:
    """The run whose ``key`` is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def stop_on_sigterm() -> None:
    """SIGTERM ends a benchmark as Ctrl-C does: its servers stopped, its files removed."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)


def run_scenarios(table: dict, chosen: list[str], *args) -> dict[str, str]:
    """Run each scenario of ``table`` (name -> function of ``*args``) that is
    ``chosen``, in the table's order; return the failures, by name. A scenario that
    fails is reported, and the others still run."""
    failures = {}
    for name, scenario in table.items():
        if name not in chosen:
            continue
        started = time.perf_counter()
        try:
            scenario(*args)
        except (RuntimeError, OSError, TimeoutError, ConnectionError) as exc:
            log(f"{name}: FAILED: {exc!r}")
            failures[name] = repr(exc)
        log(f"{name}: done in {time.perf_counter() - started:.1f} s")
    return failures


def report_meta(tool: str, cfg, started: float, load_before: tuple, client: str,
                notes: list[str]) -> dict:
    """The ``meta`` section of a benchmark's JSON report."""
    return {
        "tool": tool,
        "argv": sys.argv[1:],
        "runs": cfg.runs, "quick": cfg.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "redis": redis_version(),
        "client": client,
        "notes": notes,
    }


def redis_version() -> str | None:
    try:
        out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        m = re.search(r"v=(\S+)", out)
        return m.group(1) if m else out.strip()
    except (OSError, subprocess.SubprocessError):
        return None
