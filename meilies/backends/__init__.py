"""Storage backends: where the log of record lives.

The server talks to one :class:`WriteBackend` for every write (``publish``, ``append``,
``append-full``, ``EXEC``) and to the embedded engine (:class:`meilies.engine.Engine`)
for every read and every subscriber's wake-up. Two backends exist:

- ``embedded`` (the default): the engine itself is the write backend. The server keeps
  calling it directly, with group commit on its fdatasync (server/commit.py), so
  nothing changes for it, in speed or in behaviour.
- ``postgres`` (backends/postgres.py): PostgreSQL is the log of record. Each write is
  checked and stored inside a PostgreSQL transaction, and the server's engine becomes
  a *replica*: a derived, rebuildable copy of that log, applied in position order from
  committed rows (the server's own writes at once, other servers' on ``NOTIFY``). A
  write is answered once PostgreSQL committed it and the replica applied it.

Reads stay on the engine in both cases, so ranges, catch-up and fan-out keep the
embedded engine's speed (mmap views, spans, one sendmsg for many frames) whatever the
backend: the interface is the write side alone. See README "Running on more than one
machine" for the design and its measurements.
"""

from __future__ import annotations

from typing import Protocol

from ..engine.appends import AppendResult
from ..engine.errors import EngineError
from ..engine.writes import Write

#: The backends ``meilies-server --backend`` knows.
BACKENDS = ("embedded", "postgres")


class WriteBackend(Protocol):
    """What the server writes through. Both methods check and store all or none and
    raise the engine's errors (:class:`WrongExpectedVersion`,
    :class:`DuplicateEventId`, :class:`InvalidArgument`...) or
    :class:`BackendUnavailable`. ``flush=False`` lets the embedded engine leave the
    write to its group commit; the postgres backend returns once the write is
    committed and applied to the replica."""

    def append(self, stream: bytes, events: list[tuple[bytes, bytes]],
               expected: str | int = ..., *, flush: bool = True) -> AppendResult: ...

    def write(self, writes: list[Write], *, flush: bool = True) -> list[AppendResult]: ...


class BackendUnavailable(EngineError):
    """The log of record could not be reached or did not confirm a write.

    ``outcome`` says what became of the write: ``"not stored"`` (it failed before the
    commit), ``"unknown"`` (the connection was lost during the commit) or
    ``"not replicated"`` (committed on the primary, but its wait for a synchronous
    standby was cancelled: a failover may lose it). A retry with the same event ids is
    safe in every case: an exact retry of a stored write gets its first reply.
    """

    def __init__(self, reason: str, outcome: str = "not stored") -> None:
        super().__init__(f"{reason} (outcome: {outcome})")
        self.reason = reason
        self.outcome = outcome
