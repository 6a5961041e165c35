"""``Client``: the request/reply commands of MeiliES over one lazily opened connection."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Literal

from .connection import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, Arg, Connection
from .errors import ConnectionError, ProtocolError, ResponseError, TimeoutError
from .subscriber import Event, Subscription, event_from_frame

#: ``publish_many`` sends this many requests, then reads their replies, then the next
#: batch: replies never pile up in the socket buffers (which could deadlock a pipeline
#: that only writes), and a batch's requests stay well under a megabyte of headers.
PIPELINE_BATCH = 1000

Expected = int | Literal["any", "none"]
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

    def append(self, stream: str | bytes, events: Iterable[tuple[str | bytes, Arg]],
               expected: Expected = "any") -> int:
        """Append ``(event_name, data)`` pairs atomically; return the last event's number.

        ``expected`` is ``"any"``, ``"none"`` (the stream must have no events) or the
        number the stream's last event must have. On mismatch nothing is stored and
        :class:`WrongExpectedVersion` is raised with the stream's ``actual`` last number.
        """
        if isinstance(expected, bool) or not (
                expected in ("any", "none") or (isinstance(expected, int) and expected >= 0)):
            raise ValueError(f"expected must be 'any', 'none' or a number >= 0, not {expected!r}")
        args: list[Arg] = ["append", stream, expected]
        for name, data in events:
            args += (name, data)
        if len(args) == 3:
            raise ValueError("append needs at least one (event_name, data) pair")
        reply = self._call(args, retry=False)
        return _expect_int(reply, "append")

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


def _expect_int(reply: object, command: str) -> int:
    if not isinstance(reply, int):
        raise ProtocolError(f"unexpected reply to {command}: {reply!r}")
    return reply
