"""The write side of PROTOCOL.md v2 for the client: events with ids and metadata
(``append-full``), what an append answers, and transactions (``MULTI``/``EXEC``).

    append       <stream> <expected> <name> <data> ...                  -> :<last number>
    append-full  <stream> <expected> <id> <name> <metadata> <data> ...  -> *2 :<number> :<position>

:func:`append_command` picks between the two: ``append`` while no event carries an id or
metadata (it is what every MeiliES server understands, the original's included), else
``append-full`` (an empty id or metadata on the wire means "none").

Nothing here does I/O: :class:`Transaction` queues commands and hands them to its
``Client``, which owns the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

from .connection import Arg
from .errors import ProtocolError

if TYPE_CHECKING:
    from .client import Client

Expected = Union[int, Literal["any", "none"]]
Name = Union[str, bytes]
#: A metadata or an id as a caller gives it: None (or empty metadata) means none.
Metadata = Union[bytes, bytearray, memoryview, str, None]
EventLike = Union["EventData", tuple[Name, Arg]]

_BYTES_LIKE = (str, bytes, bytearray, memoryview)


@dataclass(frozen=True, slots=True)
class EventData:
    """An event to append: ``name``, ``data``, and optionally an ``id`` and ``metadata``.

    ``id`` makes the append idempotent: an id is stored once per server, forever, so a
    request retried after a lost reply answers what it first did instead of storing the
    events again (PROTOCOL.md, "Idempotent appends"). A UUID is typical; 1..255 bytes
    of UTF-8. ``metadata`` is free bytes stored beside the data (correlation ids,
    causation, schema version); empty metadata is the same as none.

    A dataclass rather than a tuple, so that it is never mistaken for a
    ``(name, data)`` pair.
    """

    name: Name
    data: Arg
    id: Name | None = None
    metadata: Metadata = None


class AppendResult(int):
    """What an append answers: an ``int``, the last appended event's number, that also
    carries ``last_position``, its global position.

    Why an ``int`` subclass and not a pair: ``append`` returned the last number as an
    ``int`` before ids, metadata and positions existed, and callers compare it, add to
    it and pass it back as ``expected=``. They all keep working, and a caller that
    wants the position reads ``result.last_position``.

    ``last_position`` is None when the plain ``append`` command was used (its reply has
    no position): use :meth:`Client.append_full` to always get it. Equality and hash
    are the int's (the number): compare ``last_position`` explicitly when it matters.
    """

    last_position: int | None  # an instance attribute (int subtypes cannot have __slots__)

    def __new__(cls, last_number: int, last_position: int | None = None) -> AppendResult:
        result = super().__new__(cls, last_number)
        result.last_position = last_position
        return result

    @property
    def last_number(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"AppendResult(last_number={int(self)}, last_position={self.last_position})"

    # int's own str() falls back to repr(): without this, print(), f-strings and
    # click.echo would show the repr above instead of the number they always showed.
    __str__ = int.__repr__

    def __reduce__(self):
        return (AppendResult, (int(self), self.last_position))


def check_expected(expected: object) -> None:
    if isinstance(expected, bool) or not (
            expected in ("any", "none") or (isinstance(expected, int) and expected >= 0)):
        raise ValueError(f"expected must be 'any', 'none' or a number >= 0, not {expected!r}")


def _per_event(values, count: int, what: str, shared_ok: bool) -> list:
    """``values`` as a list of one per event. A single str/bytes metadata is shared by
    every event (``shared_ok``); ids never are (each must be unique)."""
    if values is None:
        return [None] * count
    if isinstance(values, _BYTES_LIKE):
        if shared_ok:
            return [values] * count
        raise ValueError(f"{what} takes one value per event (a list),"
                         f" not a single {type(values).__name__}")
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} values for {count} events")
    return values


def normalize_events(events: Iterable[EventLike], ids: Sequence[Name | None] | None = None,
                     metadata: Sequence[Metadata] | Metadata = None) -> list[EventData]:
    """``events`` (pairs or :class:`EventData`) merged with ``ids`` and ``metadata``
    (one per event; ``metadata`` may be one value for all), as EventData.

    Raises ValueError when there are no events, when an event gets an id (or metadata)
    from both its EventData and the arguments and they differ, or for an empty id: the
    wire reads an empty id as "none", and a caller who gave one asked for idempotency.
    """
    items: list[EventData] = []
    for event in events:
        if isinstance(event, EventData):
            items.append(event)
        else:
            name, data = event
            items.append(EventData(name, data))
    if not items:
        raise ValueError("append needs at least one event")
    ids = _per_event(ids, len(items), "ids", shared_ok=False)
    metadata = _per_event(metadata, len(items), "metadata", shared_ok=True)
    result = []
    for i, (event, event_id, meta) in enumerate(zip(items, ids, metadata)):
        if event_id is not None:
            if event.id is not None and event.id != event_id:
                raise ValueError(f"event {i} has two ids: {event.id!r} and {event_id!r}")
            event = EventData(event.name, event.data, event_id, event.metadata)
        if meta is not None:
            if event.metadata is not None and event.metadata != meta:
                raise ValueError(f"event {i} has two metadata values")
            event = EventData(event.name, event.data, event.id, meta)
        if event.id is not None:
            if not isinstance(event.id, (str, bytes)):
                raise TypeError(f"an event id is str or bytes, not {type(event.id).__name__}")
            if not event.id:
                raise ValueError(f"event {i} has an empty id (leave it None for no id)")
        result.append(event)
    return result


def append_command(stream: Name, events: list[EventData], expected: Expected,
                   full: bool = False) -> tuple[list[Arg], Callable[[object], AppendResult]]:
    """The request for ``events`` and the function that reads its reply.

    ``append`` when no event has an id or metadata and ``full`` is false, else
    ``append-full``.
    """
    check_expected(expected)
    full = full or any(e.id is not None or _has_metadata(e.metadata) for e in events)
    if not full:
        args: list[Arg] = ["append", stream, expected]
        for event in events:
            args += (event.name, event.data)
        return args, _plain_reply
    args = ["append-full", stream, expected]
    for event in events:
        args += (event.id or b"", event.name, event.metadata or b"", event.data)
    return args, _full_reply


def _has_metadata(metadata: Metadata) -> bool:
    if metadata is None:
        return False
    return (metadata.nbytes if isinstance(metadata, memoryview) else len(metadata)) > 0


def _plain_reply(reply: object) -> AppendResult:
    if type(reply) is not int:
        raise ProtocolError(f"unexpected reply to append: {reply!r}"[:300])
    return AppendResult(reply)


def _full_reply(reply: object) -> AppendResult:
    if not (type(reply) is list and len(reply) == 2 and type(reply[0]) is int
            and type(reply[1]) is int):
        raise ProtocolError(f"unexpected reply to append-full: {reply!r}"[:300])
    return AppendResult(reply[0], reply[1])


def _publish_reply(reply: object) -> None:
    if reply != b"OK":
        raise ProtocolError(f"unexpected reply to publish: {reply!r}"[:300])


#: A queued write: its request and the function that turns its EXEC reply into a result.
Queued = tuple[list[Arg], Callable[[object], object]]


class Transaction:
    """Writes queued here, sent at once as ``MULTI`` ... ``EXEC``: all stored or none.

    Made by :meth:`Client.transaction`; used as a context manager::

        with client.transaction() as tx:
            tx.publish("audit", "opened", b"...")
            i = tx.append("orders-17", [EventData("paid", b"{}", id=uuid)], expected=3)
        tx.results[i]          # AppendResult(last_number=4, last_position=...)

    Nothing is sent while the block runs: the methods only queue and check their
    arguments, so the block may compute freely and an exception inside it sends
    nothing. On a normal exit the queue goes out pipelined on the client's connection,
    and ``EXEC``'s failure is raised from the ``with`` statement:
    :class:`WrongExpectedVersion` or :class:`DuplicateEventId` from the server's checks
    (two appends to one stream chain their expected versions, as if applied in turn),
    or, when the server refused a queued command outright, that command's error with
    ``exc.index`` its place in the queue. In every such case nothing was stored.

    A :class:`ConnectionError` (or TimeoutError) leaves the outcome unknown and is never
    retried here. Retrying the whole transaction is safe when every write in it is an
    append whose events all have ids: the retry answers what the first ``EXEC`` did.
    A ``publish`` or an append without ids would be stored twice.

    Not thread-safe: one thread fills a transaction. The client's lock is held only
    while it is sent and answered.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._queue: list[Queued] = []
        self._results: list[object] | None = None
        self._done = False

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.discard()
            return
        self.execute()

    def publish(self, stream: Name, event_name: Name, data: Arg) -> int:
        """Queue a ``publish``; its result will be None. Returns its index in
        :attr:`results`."""
        return self._add(["publish", stream, event_name, data], _publish_reply)

    def append(self, stream: Name, events: Iterable[EventLike], expected: Expected = "any",
               ids: Sequence[Name | None] | None = None,
               metadata: Sequence[Metadata] | Metadata = None) -> int:
        """Queue an append, as :meth:`Client.append` takes it; its result will be an
        :class:`AppendResult`. Returns its index in :attr:`results`."""
        args, read = append_command(stream, normalize_events(events, ids, metadata), expected)
        return self._add(args, read)

    def append_full(self, stream: Name, events: Iterable[EventLike],
                    expected: Expected = "any") -> int:
        """Queue an ``append-full`` (its result has ``last_position`` even without ids
        or metadata). Returns its index in :attr:`results`."""
        args, read = append_command(stream, normalize_events(events), expected, full=True)
        return self._add(args, read)

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def results(self) -> list[object]:
        """One result per queued write, in order, once :meth:`execute` succeeded: None
        for a publish, an :class:`AppendResult` for an append."""
        if self._results is None:
            raise RuntimeError("the transaction has not been executed (or it failed)")
        return self._results

    def execute(self) -> list[object]:
        """Send the queue as one transaction; return (and keep) the results. An empty
        transaction returns ``[]`` without a round trip."""
        self._check_open()
        self._done = True
        queue, self._queue = self._queue, []
        if not queue:
            self._results = []
        else:
            self._results = self._client._transact(queue)
        return self._results

    def discard(self) -> None:
        """Drop the queue; nothing is sent."""
        self._done = True
        self._queue = []

    def _add(self, args: list[Arg], read: Callable[[object], object]) -> int:
        self._check_open()
        self._queue.append((args, read))
        return len(self._queue) - 1

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this transaction was already executed or discarded")
