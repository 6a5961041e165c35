"""The server process: configuration, the listener, and a clean stop.

``Server`` owns the engine, the group commit, the notifier and the gevent
``StreamServer``; every connection gets a greenlet of its own (connection.py). All
engine calls happen on the gevent hub's thread, which is what the engine requires.
"""

from __future__ import annotations

import logging
import resource
import signal
import time
from dataclasses import dataclass

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from ..engine import Engine
from ..engine.names import DEFAULT_MAX_EVENT_SIZE
from . import resp
from .commit import GroupCommit, sync_every_second
from .connection import Connection
from .notify import Notifier

log = logging.getLogger("meilies.server")

DEFAULT_PORT = 6480
DEFAULT_MAXCLIENTS = 10000
#: How long a graceful stop lets in-flight requests finish before cutting them.
STOP_GRACE_SECONDS = 3.0


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    fsync: str = "always"
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE
    requirepass: str | None = None
    maxclients: int = DEFAULT_MAXCLIENTS

    @property
    def max_bulk(self) -> int:
        """Longest bulk string a request may carry: an event plus room for its framing.

        Larger data is refused while it is still being announced, before it is read.
        Data between ``max_event_size`` and this is read, then refused by name.
        """
        return self.max_event_size + 64 * 1024


class Server:
    def __init__(self, engine: Engine, config: Config) -> None:
        self.engine = engine
        self.config = config
        self.notifier = Notifier(engine)
        self.commit = GroupCommit(engine)
        self.connections: set[Connection] = set()
        self.subscriptions_started = 0
        self.started = time.monotonic()
        self._stream_server = StreamServer((config.host, config.port), self._handle,
                                           backlog=1024)
        self._stopped = Event()
        self._background: list[gevent.Greenlet] = []

    @property
    def port(self) -> int:
        return self._stream_server.server_port

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    def start(self) -> None:
        """Bind and listen (raises OSError, e.g. EADDRINUSE), then serve in the background."""
        self._stream_server.start()
        if self.config.fsync == "everysec":
            self._background.append(gevent.spawn(sync_every_second, self.engine))

    def serve_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._on_signal, signum)
        self._stopped.wait()
        self.stop()

    def _on_signal(self, signum: int) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self._stopped.set()

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, sync and close the engine."""
        self._stream_server.close()
        for connection in list(self.connections):
            connection.stop()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.connections and time.monotonic() < deadline:
            gevent.sleep(0.01)
        for connection in list(self.connections):
            connection.closing = True
            connection._abort()
        gevent.killall(self._background)
        self.commit.close()
        self.engine.close()
        log.info("stopped: %d events in %d streams, synced and closed",
                 self.engine.visible_position, len(self.engine.streams))

    def _handle(self, sock, address) -> None:
        if len(self.connections) >= self.config.maxclients:
            try:
                sock.sendall(resp.error("ERR max number of clients reached"))
            except OSError as exc:
                log.debug("refusing %s: %s", address, exc)
            return
        connection = Connection(self, sock, address)
        self.connections.add(connection)
        log.debug("connection from %s", address)
        try:
            connection.run()
        finally:
            self.connections.discard(connection)
            log.debug("connection from %s closed", address)


def raise_open_file_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (as far as the hard limit
    allows); return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", target, exc)
    return soft
