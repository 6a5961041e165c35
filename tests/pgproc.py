"""Test support: a real PostgreSQL server (Debian's binaries) on a free loopback port.

``PostgresProcess`` runs ``initdb`` and ``pg_ctl`` into a directory of the test's own,
as the ``postgres`` user when the tests run as root (PostgreSQL refuses root).
``standby()`` makes a streaming-replication standby of it with ``pg_basebackup``.
Every wait is on a condition (``pg_ctl -w``, a query that answers), never a sleep.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from serverproc import free_port, wait_for


def postgres_bindir() -> Path | None:
    """Where Debian's PostgreSQL binaries are, or None if not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresProcess:
    """One PostgreSQL server; ``dsn(db)`` for a database in it."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.directory = Path(directory)
        self.data = self.directory / "pgdata"
        self.port = port or free_port()

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        return subprocess.run(cmd, check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=120)

    def _own(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            # The test's tmp_path parents belong to root: let postgres through them.
            for parent in self.directory.parents:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)

    def init(self, **settings: str) -> PostgresProcess:
        self._own()
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", "postgres", "--no-sync")
        self.configure(fsync="off", full_page_writes="off", **settings)
        return self

    def configure(self, **settings: str) -> None:
        with open(self.data / "postgresql.conf", "a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = '{value}'\n")

    def start(self) -> PostgresProcess:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.directory / "postgres.log"), "-w", "-t", "120", "-o",
                  f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1",
                  "start")
        wait_for(self._answers, what=f"PostgreSQL on port {self.port}")
        return self

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn("postgres"), connect_timeout=5) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def standby(self, directory: Path, name: str) -> PostgresProcess:
        """A streaming-replication standby of this server, named ``name`` (its
        ``application_name``, as ``synchronous_standby_names`` lists it); not started."""
        standby = PostgresProcess(directory)
        standby._own()
        self._run(str(self.bindir / "pg_basebackup"), "-d",
                  f"host=127.0.0.1 port={self.port} user=postgres", "-D", str(standby.data),
                  "-X", "stream", "-R", "--no-sync", "-c", "fast")
        standby.follow(self, name)
        return standby

    def follow(self, primary: PostgresProcess, name: str) -> None:
        """Stream from ``primary`` (a reload applies it to a running standby)."""
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port}"
                       f" user=postgres application_name={name}'\n")
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "reload")

    def promote(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "promote")

    def query(self, sql: str, *params):
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast",
                      "stop", check=False)

    def kill9(self) -> None:
        """``kill -9`` of the postmaster (its backends go with it)."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 9)
        wait_for(lambda: not _alive(pid), what=f"postmaster {pid} to die")

    def log(self) -> str:
        path = self.directory / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
