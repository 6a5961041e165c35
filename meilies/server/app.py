"""The server process: configuration, the listener, and a clean stop.

``Server`` owns the engine, the group commit, the notifier and the gevent
``StreamServer``; every connection gets a greenlet of its own (connection.py). All
engine calls happen on the gevent hub's thread, which is what the engine requires.

Connections beyond ``--maxclients`` get ``-ERR max number of clients reached`` and are
closed; ``maxclients`` is lowered at start if the open-file limit cannot hold that many
(the CLI first raises the limit as far as the hard limit allows). Both, and an accept
that fails for want of descriptors, are logged without flooding the log.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from ..backends import WriteBackend
from ..engine import Engine
from ..engine.errors import EngineError
from ..engine.names import DEFAULT_MAX_EVENT_SIZE
from . import resp
from .commit import GroupCommit
from .connection import Connection
from .notify import Notifier

log = logging.getLogger("meilies.server")

DEFAULT_PORT = 6480
DEFAULT_MAXCLIENTS = 10000
#: How long a graceful stop lets in-flight requests finish before cutting them.
STOP_GRACE_SECONDS = 3.0
#: File descriptors kept free for the engine's files, beyond those open at start, when
#: the open-file limit caps the number of clients (Redis keeps 32).
RESERVED_FDS = 64
#: At most one log line per this many seconds about refused connections or a failing
#: accept; the lines count what they summarise.
REFUSAL_LOG_SECONDS = 10.0
MAXCLIENTS_REACHED = resp.error("ERR max number of clients reached")
#: accept() errors that mean "out of descriptors or memory, try again later".
ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    fsync: str = "always"
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE
    requirepass: str | None = None
    maxclients: int = DEFAULT_MAXCLIENTS
    #: Where the log of record lives (backends/): "embedded" or "postgres".
    backend: str = "embedded"

    @property
    def max_bulk(self) -> int:
        """Longest bulk string a request may carry: an event plus room for its framing.

        Larger data is refused while it is still being announced, before it is read.
        Data between ``max_event_size`` and this is read, then refused by name.
        """
        return self.max_event_size + 64 * 1024


class Server:
    def __init__(self, engine: Engine, config: Config, writer: WriteBackend | None = None
                 ) -> None:
        self.engine = engine
        #: Where writes go: the engine (embedded) or the postgres backend, whose replica
        #: ``engine`` then is (backends/).
        self.writer: WriteBackend = writer if writer is not None else engine
        self._backend = writer
        self.config = config
        self.notifier = Notifier(engine)
        self.commit = GroupCommit(engine)
        self.connections: set[Connection] = set()
        self.subscriptions_started = 0
        self.started = time.monotonic()
        self._stream_server = _Listener((config.host, config.port), self._handle,
                                        backlog=1024)
        self._stopped = Event()
        #: ``--maxclients``, lowered if the open-file limit cannot hold that many.
        self.maxclients = config.maxclients
        #: Connections refused because ``maxclients`` were connected.
        self.refused = 0
        self._refusals = _RateLimitedLog("refused %d connection(s): max number of clients"
                                         " reached (%d connected, maxclients %d)")

    @property
    def port(self) -> int:
        return self._stream_server.server_port

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    def stop_on_signals(self) -> None:
        """Have SIGTERM and SIGINT stop the server cleanly (see
        :meth:`serve_until_signalled`); call it before :meth:`start`, so that a
        supervisor that finds the port open may already count on it."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._on_signal, signum)

    def start(self) -> None:
        """Start the fdatasync helper, then bind and listen (raises OSError, e.g.
        EADDRINUSE) and serve in the background.

        Listening comes last: a client that finds the port open finds the server whole.
        """
        self.maxclients = clients_allowed_by_open_file_limit(self.config.maxclients)
        if self._backend is not None:
            self._backend.start()
        # The engine's own policy: under postgres its replica is never synced, whatever
        # --fsync asked of PostgreSQL's commits (backends/postgres.py).
        if self.engine.fsync == "always":
            self.commit.start()
        elif self.engine.fsync == "everysec":
            self.commit.sync_periodically(1.0)
        try:
            self._stream_server.start()
        except OSError:
            self.commit.close()
            raise

    def serve_until_signalled(self) -> bool:
        """Serve until SIGTERM or SIGINT (handled once :meth:`stop_on_signals` is
        called), then stop cleanly; see :meth:`stop`."""
        self._stopped.wait()
        return self.stop()

    def _on_signal(self, signum: int) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self._stopped.set()

    def stop(self) -> bool:
        """Stop accepting, let in-flight requests finish, sync and close the engine.

        Returns False if the last sync failed (events acknowledged under ``everysec`` or
        ``no`` may not be on stable storage; under ``always`` every acknowledged one is).
        A checkpoint that cannot be written (a full disk) is only a warning: it is
        derived data, and the next start rebuilds it from the log.
        """
        self._stream_server.close()
        for connection in list(self.connections):
            connection.stop()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.connections and time.monotonic() < deadline:
            gevent.sleep(0.01)
        for connection in list(self.connections):
            connection.closing = True
            connection._abort()
        self.commit.close()
        if self._backend is not None:
            self._backend.close()
        synced = True
        try:
            self.engine.sync()
        except EngineError as exc:
            synced = False
            log.error("stopping: the last sync failed: %s", exc)
        try:
            self.engine.close()
        except EngineError as exc:
            log.warning("stopping: could not write the checkpoint (the next start rebuilds it"
                        " from the log; no event is lost): %s", exc)
        log.info("stopped: %d events in %d streams, %s", self.engine.visible_position,
                 len(self.engine.streams), "synced and closed" if synced else "NOT synced")
        return synced

    def _handle(self, sock, address) -> None:
        if len(self.connections) >= self.maxclients:
            self._refuse(sock, address)
            return
        try:
            # Replies and events go out as soon as they are ready, as Redis sends them:
            # Nagle would hold a small frame back until the previous one is acknowledged.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not TCP, or the peer is already gone
            log.debug("TCP_NODELAY on %s: %s", address, exc)
        connection = Connection(self, sock, address)
        self.connections.add(connection)
        log.debug("connection from %s", address)
        try:
            connection.run()
        finally:
            self.connections.discard(connection)
            log.debug("connection from %s closed", address)


    def _refuse(self, sock, address) -> None:
        """Over ``maxclients``: one error line, then close (the greenlet's return closes
        the socket). Logged at most once per REFUSAL_LOG_SECONDS, with a count."""
        self.refused += 1
        self._refusals.note(len(self.connections), self.maxclients)
        try:
            sock.sendall(MAXCLIENTS_REACHED)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.debug("refusing %s: %s", address, exc)


class _Listener(StreamServer):
    """gevent's StreamServer, but an accept that fails for want of file descriptors or
    memory (EMFILE, ENFILE, ...) is one rate-limited log line instead of a traceback per
    attempt, and accepting pauses (10 ms, doubling up to 1 s) until it works again."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pause = 0.01
        self._exhausted = _RateLimitedLog("cannot accept a connection (%d time(s)): %s;"
                                          " pausing accepts")

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in ACCEPT_EXHAUSTED:
                raise
            self._exhausted.note(os.strerror(exc.errno))
            self.stop_accepting()
            gevent.spawn_later(self._pause, self._resume_accepting)
            self._pause = min(self._pause * 2, 1.0)
            return None
        self._pause = 0.01
        return accepted

    def _resume_accepting(self) -> None:
        if not self.closed:
            self.start_accepting()


class _RateLimitedLog:
    """A warning that a flood could repeat thousands of times a second: logged at once
    the first time, then at most once per REFUSAL_LOG_SECONDS with how many it stands for.
    ``message`` takes the count, then ``note``'s arguments."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.count = 0
        self.next_at = 0.0

    def note(self, *args) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self.next_at:
            log.warning(self.message, self.count, *args)
            self.count = 0
            self.next_at = now + REFUSAL_LOG_SECONDS


def raise_open_file_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit towards ``wanted`` (as far as the hard limit
    allows); return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open-file limit from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", target, exc)
    if soft < wanted:
        log.warning("the open-file limit is %d (hard limit %s), below the %d wanted", soft,
                    "unlimited" if hard == resource.RLIM_INFINITY else hard, wanted)
    return soft


def clients_allowed_by_open_file_limit(maxclients: int) -> int:
    """``maxclients``, or fewer if the open-file limit in force cannot hold that many
    connections beside the files open now and RESERVED_FDS more (logged)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return maxclients
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    allowed = max(soft - open_now - RESERVED_FDS, 1)
    if allowed < maxclients:
        log.warning("the open-file limit (%d) allows about %d clients: serving at most %d,"
                    " not %d (--maxclients)", soft, allowed, allowed, maxclients)
        return allowed
    return maxclients
