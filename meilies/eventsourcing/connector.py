"""Connections to one MeiliES server for the recorders: a pool of clients, the retry
policy, and the one table that maps client errors to the library's exceptions.

Every operation a recorder sends is safe to repeat: reads are, and every write carries
event ids, so a write whose reply was lost answers, when sent again, what it first did
(PROTOCOL.md, "Idempotent appends"). :meth:`Connector.run` therefore repeats an
operation on a new connection after a dropped connection, a timeout or a server that
is shutting down, until ``retry_seconds`` have passed since the first failure: an
application keeps working through a server restart, and never stores an event twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from eventsourcing.persistence import (DataError, IntegrityError, InterfaceError,
                                       NotSupportedError, OperationalError,
                                       PersistenceError, ProgrammingError)

from ..client import (AuthenticationError, Client, ConnectionError, DuplicateEventId,
                      DuplicateIdInRequest, MeiliesError, ProtocolError, ResponseError,
                      ServerShuttingDown, Subscription, TimeoutError, WrongExpectedVersion)

T = TypeVar("T")

log = logging.getLogger("meilies.eventsourcing")

#: Seconds an operation is retried after its first connection failure.
DEFAULT_RETRY_SECONDS = 10.0
#: Idle clients kept for reuse; more are opened when more threads need one at once.
DEFAULT_POOL_SIZE = 10
#: First wait before a retry, doubling up to the cap (seconds).
RETRY_DELAY = 0.05
RETRY_DELAY_MAX = 1.0

_TRANSIENT = (ConnectionError, TimeoutError, ServerShuttingDown)


class Connector:
    """Clients of one server, lent one per thread at a time. Thread-safe.

    A :class:`~meilies.client.Client` holds one connection; giving each concurrent
    caller its own keeps requests of different threads from queueing behind each other
    (the library's concurrency cases write from ten threads at once).
    """

    def __init__(self, host: str, port: int, password: str | None = None,
                 timeout: float | None = 10.0, retry_seconds: float = DEFAULT_RETRY_SECONDS,
                 pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.pool_size = pool_size
        self._idle: list[Client] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Connector(host={self.host!r}, port={self.port})"

    def run(self, operation: Callable[[Client], T]) -> T:
        """``operation(client)``, repeated on a new connection after a transient failure
        (see the module docstring), with the client's errors raised as the library's.

        :class:`~meilies.client.WrongExpectedVersion` is raised as it is: what it means
        depends on the write, which the recorder knows.
        """
        deadline: float | None = None
        delay = RETRY_DELAY
        while True:
            client = self._take()
            try:
                return operation(client)
            except _TRANSIENT as exc:
                client.close()
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_seconds
                    log.warning("MeiliES at %s:%s: %s; retrying for up to %gs", self.host,
                                self.port, exc, self.retry_seconds)
                if now + delay > deadline:
                    raise OperationalError(f"MeiliES at {self.host}:{self.port}: {exc}"
                                           f" (retried for {self.retry_seconds:g}s)") from exc
                time.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX)
            except WrongExpectedVersion:
                raise
            except MeiliesError as exc:
                raise persistence_error(exc) from exc
            finally:
                self._give_back(client)

    def subscribe(self, spec: str) -> Subscription:
        """A subscription with full frames on a connection of its own; it reconnects and
        resumes by itself. Its first connection is retried as :meth:`run` retries."""
        return self.run(lambda client: client.subscribe(spec, full=True))

    def close(self) -> None:
        """Close the idle connections (a later operation opens new ones)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()

    def _take(self) -> Client:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Client(self.host, self.port, password=self.password, timeout=self.timeout)

    def _give_back(self, client: Client) -> None:
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(client)
                return
        client.close()


def persistence_error(exc: MeiliesError) -> PersistenceError:
    """The library's exception (PEP 249 names) for a client error."""
    if isinstance(exc, DuplicateEventId):
        return IntegrityError(str(exc))
    if isinstance(exc, DuplicateIdInRequest):
        return ProgrammingError(str(exc))
    if isinstance(exc, AuthenticationError):
        return OperationalError(str(exc))
    if isinstance(exc, ProtocolError):
        return InterfaceError(str(exc))
    if isinstance(exc, ResponseError):
        message = str(exc)
        if message.startswith("ERR invalid "):  # a name, a size: PROTOCOL.md "Names and sizes"
            return DataError(message)
        if message.startswith("ERR unknown command"):
            return NotSupportedError(f"{message}: the server lacks PROTOCOL.md v2")
        if message.startswith("ERR storage failure"):
            return OperationalError(message)
        return ProgrammingError(message)
    return OperationalError(str(exc))
