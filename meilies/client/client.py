"""``Client``: the request/reply commands of MeiliES over one lazily opened connection."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence

import hiredis

from .connection import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, Arg, Connection
from .errors import (ConnectionError, ProtocolError, ResponseError, TimeoutError,
                     TransactionAborted, error_from_reply)
from .subscriber import Event, Subscription, event_from_frame
from .writes import (AppendResult, EventLike, Expected, Metadata, Queued, Transaction,
                     append_command, normalize_events)

#: ``publish_many`` sends this many requests, then reads their replies, then the next
#: batch: replies never pile up in the socket buffers (which could deadlock a pipeline
#: that only writes), and a batch's requests stay well under a megabyte of headers.
PIPELINE_BATCH = 1000

#: Names asked for per ``scan-streams`` page by :meth:`Client.scan_streams`.
SCAN_PAGE = 1000


class Client:
    """A MeiliES client: publish and append events, read stream metadata, subscribe.

    ``str`` and ``bytes`` are accepted everywhere (``str`` is sent as UTF-8); event data
    comes back as ``bytes``. Server error replies raise the exception classes of
    :mod:`meilies.client.errors`.

    The connection opens on first use and reopens by itself if the server closed it
    while it was idle (a server restart). A connection that breaks *during* a command
    raises :class:`ConnectionError`; reads (``ping``, ``last_event_number``,
    ``stream_names``) are retried once on a new connection first, writes never are,
    since the server may have stored them.

    This class is thread-safe: threads (or greenlets) share its one connection, one
    command at a time. For parallel throughput give each thread its own ``Client``.
    Each :meth:`subscribe` opens a connection of its own.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 password: str | bytes | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.timeout = timeout
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Client(host={self.host!r}, port={self.port})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- commands ---------------------------------------------------------------------------

    def publish(self, stream: str | bytes, event_name: str | bytes, data: Arg) -> None:
        """Append one event to ``stream``; returns once the server stored it."""
        self._call(("publish", stream, event_name, data), retry=False)

    def append(self, stream: str | bytes, events: Iterable[EventLike],
               expected: Expected = "any", ids: Sequence[str | bytes | None] | None = None,
               metadata: Sequence[Metadata] | Metadata = None) -> AppendResult:
        """Append events atomically (all or none, contiguous numbers); return the last
        event's number as an :class:`AppendResult`.

        ``events`` are ``(event_name, data)`` pairs or :class:`EventData`. ``ids`` (one
        per event, None for none) and ``metadata`` (one per event, or one value for
        all) add to the pairs what an EventData can carry itself.

        ``expected`` is ``"any"``, ``"none"`` (the stream must have no events) or the
        number the stream's last event must have. On mismatch nothing is stored and
        :class:`WrongExpectedVersion` is raised with the stream's ``actual`` last number.

        While no event has an id or metadata this sends ``append``, as it always did,
        and the result's ``last_position`` is None; otherwise ``append-full``, whose
        result has the position too. An :class:`AppendResult` *is* the last number (an
        ``int``), so callers of the plain form see no change.

        With ids the append is idempotent: if the reply was lost (ConnectionError), call
        again with the same events and ids. If the first attempt was stored, the retry
        stores nothing and returns the same result, whatever ``expected`` says now. An
        id already stored any other way raises :class:`DuplicateEventId` (the check
        comes before ``expected``'s). Writes are never retried automatically.
        """
        args, read = append_command(stream, normalize_events(events, ids, metadata), expected)
        return read(self._call(args, retry=False))

    def append_full(self, stream: str | bytes, events: Iterable[EventLike],
                    expected: Expected = "any") -> AppendResult:
        """:meth:`append` always sent as ``append-full``, so that the result carries
        ``last_position`` even for events without ids or metadata (e.g. to read your
        own write with ``range("$all", result.last_position)``). Needs a server with
        PROTOCOL.md v2."""
        args, read = append_command(stream, normalize_events(events), expected, full=True)
        return read(self._call(args, retry=False))

    def transaction(self) -> Transaction:
        """A :class:`Transaction`: writes queued in a ``with`` block, then stored all
        together or not at all (``MULTI``/``EXEC``, one round trip per 1,000 writes)::

            with client.transaction() as tx:
                tx.publish("audit", "paid", b"...")
                tx.append("orders-17", [EventData("paid", b"{}", id=uuid)], expected=3)
            tx.results      # [None, AppendResult(last_number=4, last_position=...)]
        """
        return Transaction(self)

    def publish_many(self, stream: str | bytes,
                     events: Iterable[tuple[str | bytes, Arg]]) -> int:
        """Publish ``(event_name, data)`` pairs with pipelining; return how many.

        Each event is its own ``publish`` (not atomic: use :meth:`append` for all or
        none); they are stored in order. If the server refuses some, the others are
        still stored and the first refusal is raised after every reply was read, with
        ``exc.index`` set to its position in ``events``.
        """
        count = 0
        error: ResponseError | None = None
        with self._lock:
            batch: list[tuple] = []
            for name, data in events:
                batch.append(("publish", stream, name, data))
                if len(batch) == PIPELINE_BATCH:
                    error = error or self._pipeline_locked(batch, count)
                    count += len(batch)
                    batch = []
            if batch:
                error = error or self._pipeline_locked(batch, count)
                count += len(batch)
        if error is not None:
            raise error
        return count

    def last_event_number(self, stream: str | bytes) -> int | None:
        """The number of the stream's last event, or ``None`` when it has none."""
        reply = self._call(("last-event-number", stream), retry=True)
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"last-event-number"):
            raise ProtocolError(f"unexpected reply to last-event-number: {reply!r}")
        number = reply[2]
        if number is not None and not isinstance(number, int):
            raise ProtocolError(f"unexpected reply to last-event-number: {reply!r}")
        return number

    def stream_names(self) -> list[str]:
        """Names of the streams that have events, in byte order."""
        reply = self._call(("stream-names",), retry=True)
        if not (isinstance(reply, list) and reply and reply[0] == b"stream-names"):
            raise ProtocolError(f"unexpected reply to stream-names: {reply!r}")
        return [name.decode() for name in reply[1:]]

    def range(self, stream: str | bytes, start: int | str = "-", end: int | str = "+",
              count: int | None = None) -> list[Event]:
        """Events of ``stream`` numbered ``start`` to ``end`` (both included; ``"-"``
        is the first, ``"+"`` the last), ascending, at most ``count`` (the server's
        default without it: 10,000). ``stream`` ``"$all"`` reads by global position.
        Each :class:`Event` carries its position and timestamp."""
        return self._range("range", stream, start, end, count)

    def revrange(self, stream: str | bytes, end: int | str = "+", start: int | str = "-",
                 count: int | None = None) -> list[Event]:
        """:meth:`range`, descending from ``end``: ``revrange(s, count=1)`` is the last
        event."""
        return self._range("revrange", stream, end, start, count)

    def _range(self, command: str, stream, first, second, count) -> list[Event]:
        args: list[Arg] = [command, stream, _bound(first), _bound(second)]
        if count is not None:
            args += ["COUNT", count]
        reply = self._call(args, retry=True)
        if type(reply) is not list:
            raise ProtocolError(f"unexpected reply to {command}: {reply!r}"[:300])
        return [event_from_frame(frame) for frame in reply]

    def last_position(self) -> int | None:
        """The global position of the last event stored, or None when there is none."""
        last = self.revrange("$all", count=1)
        return last[0].position if last else None

    def scan_streams(self, match: str | bytes | None = None,
                     count: int = SCAN_PAGE) -> Iterator[list[str]]:
        """The names of the streams that have events, in byte order, a page (about
        ``count`` names) at a time: ``match`` is ``"<prefix>*"``. Every stream that
        exists for the whole scan comes exactly once; memory stays one page."""
        cursor: bytes = b"0"
        while True:
            args: list[Arg] = ["scan-streams", cursor, "COUNT", count]
            if match is not None:
                args += ["MATCH", match]
            reply = self._call(args, retry=True)
            if not (type(reply) is list and len(reply) == 2 and type(reply[0]) is bytes
                    and type(reply[1]) is list):
                raise ProtocolError(f"unexpected reply to scan-streams: {reply!r}"[:300])
            cursor, names = reply
            if names:
                yield [name.decode(errors="surrogateescape") for name in names]
            if cursor == b"0":
                return

    def ping(self, message: str | bytes | None = None) -> bytes:
        """``b"PONG"``, or ``message`` echoed back."""
        args = ("ping",) if message is None else ("ping", message)
        reply = self._call(args, retry=True)
        if not isinstance(reply, bytes):
            raise ProtocolError(f"unexpected reply to ping: {reply!r}")
        return reply

    def execute_command(self, *args: Arg) -> object:
        """Send any command; return its reply as hiredis parses it (bytes, int, list,
        None). Error replies raise. Not retried."""
        return self._call(args, retry=False)

    def subscribe(self, *specs: str | bytes, reconnect: bool = True,
                  max_retries: int | None = None, backoff_base: float = 0.1,
                  backoff_max: float = 5.0, heartbeat: float | None = 30.0,
                  full: bool = False) -> Subscription:
        """Subscribe to ``specs`` on a new connection; iterate the result for events.

        See :class:`meilies.client.Subscription` for specs, resuming and options
        (``full=True``: events with positions and timestamps).
        """
        return Subscription(self._open, specs, reconnect=reconnect, max_retries=max_retries,
                            backoff_base=backoff_base, backoff_max=backoff_max,
                            heartbeat=heartbeat, timeout=self.timeout, full=full)

    # -- the connection ---------------------------------------------------------------------

    def _open(self) -> Connection:
        return Connection.open(self.host, self.port, self.password, self.timeout)

    def _call(self, args, *, retry: bool) -> object:
        with self._lock:
            conn = self._connection_locked()
            try:
                return conn.call(*args)
            except TimeoutError:
                self._drop_locked()  # a late reply would answer the next command
                raise
            except ConnectionError:
                self._drop_locked()
                if not retry:
                    raise
            conn = self._connection_locked()
            try:
                return conn.call(*args)
            except ConnectionError:
                self._drop_locked()
                raise

    def _pipeline_locked(self, commands: list[tuple], first: int) -> ResponseError | None:
        """Send ``commands`` at once, read every reply; return the first error. Caller
        holds ``self._lock``."""
        conn = self._connection_locked()
        error = None
        try:
            conn.send(*commands)
            for i in range(len(commands)):
                try:
                    conn.read_reply()
                except ResponseError as exc:
                    if error is None:
                        exc.index = first + i
                        error = exc
        except ConnectionError:
            self._drop_locked()
            raise
        return error

    def _transact(self, queue: list[Queued]) -> list[object]:
        """Send ``MULTI``, the queued writes and ``EXEC`` on one connection; return the
        results. Called by :meth:`Transaction.execute`.

        Requests go out in batches of PIPELINE_BATCH, each batch's ``+QUEUED`` replies
        read before the next is sent (as :meth:`publish_many`), EXEC with the last one.
        Every reply is read even after an error, so the connection is left out of the
        transaction and in step. Never retried: on ConnectionError the connection is
        dropped and the outcome is unknown to the caller.

        The first transaction on a connection sends ``MULTI`` alone and waits for its
        ``+OK``: a server without transactions (before PROTOCOL.md v2) answers it with
        an error and would then store the pipelined writes one by one, not all or
        none. Once a connection said ``+OK`` its server has them; later transactions
        on it are fully pipelined.
        """
        with self._lock:
            conn = self._connection_locked()
            try:
                replies = self._exchange_locked(conn, [args for args, _ in queue])
            except BaseException:
                self._drop_locked()  # replies half read (or a timeout): out of step
                raise
        return _transaction_results(queue, replies)

    def _exchange_locked(self, conn: Connection, writes: list[list[Arg]]) -> list[object]:
        """The replies to MULTI, ``writes`` and EXEC, errors as ``hiredis.ReplyError``;
        just ``[MULTI's error]`` when a first MULTI was refused. Caller holds the lock."""
        commands: list = [("MULTI",), *writes, ("EXEC",)]
        replies: list[object] = []
        if not conn.has_transactions:
            conn.send(commands.pop(0))
            replies.append(conn.read())
            if isinstance(replies[0], hiredis.ReplyError):
                return replies
            conn.has_transactions = True
        for start in range(0, len(commands), PIPELINE_BATCH):
            batch = commands[start:start + PIPELINE_BATCH]
            conn.send(*batch)
            replies += (conn.read() for _ in batch)
        return replies

    def _connection_locked(self) -> Connection:
        """The open connection, reopened if it died while idle. Caller holds the lock."""
        conn = self._conn
        if conn is not None and conn.peer_closed():
            self._drop_locked()
            conn = None
        if conn is None:
            conn = self._conn = self._open()
        return conn

    def _drop_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _bound(value: int | str) -> int | str:
    if isinstance(value, bool) or not (value in ("-", "+") or (isinstance(value, int)
                                                                and value >= 0)):
        raise ValueError(f"a range bound is '-', '+' or a number >= 0, not {value!r}")
    return value



def _transaction_results(queue: list[Queued], replies: list[object]) -> list[object]:
    """Each write's result from the replies to MULTI, the writes and EXEC; or the error
    that stored nothing: MULTI's, EXEC's, or the first refused write's (``.index`` its
    place in the queue) rather than EXEC's bare EXECABORT."""
    multi, queued, executed = replies[0], replies[1:-1], replies[-1]
    if isinstance(multi, hiredis.ReplyError):
        if len(replies) == 1:
            raise error_from_reply(str(multi))  # nothing else was sent
        raise ProtocolError(f"MULTI refused ({multi}) on a connection where it had worked:"
                            " the writes may have been stored one by one")
    refused = [(i, r) for i, r in enumerate(queued) if isinstance(r, hiredis.ReplyError)]
    if isinstance(executed, hiredis.ReplyError):
        error = error_from_reply(str(executed))
        if refused and isinstance(error, TransactionAborted):
            index, reply = refused[0]
            first = error_from_reply(str(reply))
            first.index = index
            raise first from error
        raise error
    if refused or type(executed) is not list or len(executed) != len(queue):
        raise ProtocolError(f"unexpected reply to EXEC after {len(refused)} refused"
                            f" command(s): {executed!r}"[:300])
    results = []
    for (_, read), reply in zip(queue, executed):
        if isinstance(reply, hiredis.ReplyError):  # not in the contract: EXEC is all or none
            raise ProtocolError(f"EXEC answered an error for one write: {reply}")
        results.append(read(reply))
    return results
