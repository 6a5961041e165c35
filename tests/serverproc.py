"""Test support: the real ``meilies-server`` process on a free loopback port, and a raw
RESP client that asserts on bytes.

Every wait here waits on a condition (a port that accepts, bytes that arrive, a
process that exits) with a generous deadline, never on a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: Generous deadline for anything a test waits on (a shared 2-core CI machine).
DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = DEADLINE, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class ServerProcess:
    """``python -m meilies.cli.server`` as a child process with its log in a file."""

    def __init__(self, data_dir: Path, *args: str, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.args = list(args)
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> ServerProcess:
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "meilies.cli.server", "--data-dir", str(self.data_dir),
               "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        if wait:
            wait_for(self._ready, what=f"meilies-server to listen on {self.port}")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"meilies-server exited with {self.proc.returncode}:\n"
                                 + self.log())
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        """SIGTERM and wait: the graceful stop."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=DEADLINE)
        self._log.close()
        return code

    def kill(self) -> None:
        """``kill -9``: the crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=DEADLINE)
        self._log.close()

    def rss_kib(self) -> int:
        return self._status("VmRSS")

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def vm_size_kib(self) -> int:
        """The address space reserved, touched or not (a huge allocation shows here)."""
        return self._status("VmSize")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_idle(self, window: float = 0.5, most: float = 0.1,
                  timeout: float = DEADLINE) -> None:
        """Wait until the server used less than ``most`` CPU seconds over ``window``
        seconds: it has settled once its clients are quiet. A server spinning on its
        event loop never gets there, and the wait fails after ``timeout``."""
        def quiet() -> bool:
            before = self.cpu_seconds()
            time.sleep(window)
            return self.cpu_seconds() - before < most
        wait_for(quiet, timeout, what=f"meilies-server to be idle (pid {self.proc.pid})")

    def client(self) -> RawClient:
        return RawClient(self.port)


def command(*args: bytes | str | int) -> bytes:
    """One request as redis-cli sends it: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RawClient:
    """A plain socket that sends bytes and asserts on exactly the bytes that come back."""

    def __init__(self, port: int, timeout: float = DEADLINE) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, *args) -> bytes:
        """Send one command and return its reply's bytes (one RESP value)."""
        self.send(command(*args))
        return self.read_reply()

    def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError(f"closed after {self.buffer!r}")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def expect(self, expected: bytes) -> None:
        got = self.read_exactly(len(expected))
        assert got == expected, f"expected {expected!r}, got {got!r}"

    def read_reply(self) -> bytes:
        """The raw bytes of the next complete RESP value."""
        end = self._value_end(0)
        return self.read_exactly(end)

    def _line(self, at: int) -> int:
        while True:
            i = self.buffer.find(b"\r\n", at)
            if i >= 0:
                return i
            self._more()

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {self.buffer!r}")
        self.buffer += chunk

    def _value_end(self, at: int) -> int:
        line_end = self._line(at)
        kind, rest = self.buffer[at:at + 1], self.buffer[at + 1:line_end]
        after = line_end + 2
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return after
            while len(self.buffer) < after + n + 2:
                self._more()
            return after + n + 2
        if kind == b"*":
            for _ in range(max(int(rest), 0)):
                after = self._value_end(after)
            return after
        return after

    def closed_by_peer(self, timeout: float = DEADLINE) -> bool:
        """True once the server has closed the connection (reads EOF)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def event_frame(stream: bytes, number: int, name: bytes, data: bytes) -> bytes:
    return b"*5\r\n+event\r\n+%s\r\n:%d\r\n+%s\r\n$%d\r\n%s\r\n" % (
        stream, number, name, len(data), data)


def subscribed(stream: bytes) -> bytes:
    return b"*2\r\n+subscribed\r\n+%s\r\n" % stream
