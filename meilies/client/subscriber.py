"""Subscriptions that survive server restarts: reconnect, resume, no gap, no duplicate.

A :class:`Subscription` owns one connection. It remembers, for every stream, the number
of the next event it should yield; when the connection drops it reconnects (capped
exponential backoff with jitter) and subscribes again from those numbers.

Named streams
    ``s:from[:to]`` is re-subscribed as ``s:<next>[:to]``. A live-only ``s`` is pinned
    when the subscription is made: it asks ``last-event-number s`` and subscribes
    ``s:<last + 1>``, so events published while disconnected are never skipped, even
    before the first event arrived.

``$all`` on a server with global positions (PROTOCOL.md v2)
    Each connection first sends ``envelope full``, so that every frame carries its
    position. A live ``$all`` is pinned with ``revrange $all + - COUNT 1`` (the last
    position); a drop resumes with one spec, ``$all@<last position yielded + 1>``.
    ``$all:from:to`` (per-stream numbers) goes to the server as is on the first
    connection and resumes as ``$all@<next>`` with the numbers checked here. Every
    position is yielded once, in order; without a number range a skipped position is
    a gap (ProtocolError). ``$all@from[:to]`` needs such a server.

``$all`` on an older server
    The server numbers events per stream, and a ``$all`` subscription can only start
    live or replay the whole log (``$all:0``), so a resume works per stream:

    1. on a new connection, send ``subscribe $all`` (live: the server pins position P)
       and, pipelined behind it, ``stream-names``; then ``last-event-number`` of every
       name. This snapshot S is taken after P, so every event stored before P has a
       number <= S[s].
    2. for each stream with S[s] >= next[s], also subscribe the bounded range
       ``s:<next[s]>:<S[s] + 1>`` (the catch-up) on the same connection.
    3. every event from either source is yielded only if its number is exactly next[s];
       smaller ones are duplicates (skipped); larger ones arrived ahead of their
       catch-up and wait (in ``held``) until the numbers before them are yielded.

    Events stored before P come from the catch-ups, events after P from the live
    subscription, so none is lost; the per-stream check removes the overlap. A live
    ``$all`` is pinned with the same snapshot when the subscription is made: streams
    in S start after S[s], streams created later start at 0. The first connection of
    ``$all:from[:to]`` needs no snapshot: it subscribes ``$all:from[:to]`` as is.

    Order: per stream, always the server's order. Across streams, the server's global
    order, except for the events a resume's catch-up delivers (those published while
    disconnected), which interleave with other streams in no particular order. The
    cost of a resume is one ``last-event-number`` per stream (pipelined), not a
    replay of the log.

A subscription may hold either one ``$all`` spec or named specs (each stream once): an
event frame does not say which subscription it answers, so overlapping specs could not
be told apart.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import hiredis

from .connection import Connection
from .errors import (ConnectionError, MeiliesError, ProtocolError, ResponseError,
                     ServerShuttingDown, TimeoutError, error_from_reply)

log = logging.getLogger("meilies.client")

ALL_STREAMS = b"$all"
#: Requests per pipelined batch while taking a snapshot or subscribing catch-ups; the
#: next batch goes out once this one is answered, so nothing piles up in socket buffers.
BATCH = 500

_BAD_STREAM_BYTES = re.compile(rb"[\x00-\x20\x7f:]")


class Event(NamedTuple):
    """One event: ``stream`` and ``name`` as text, ``data`` as the bytes stored.

    ``position`` (global, from 0), ``timestamp`` (ms since the epoch, the server's clock
    when stored), ``id`` and ``metadata`` come with full frames (``range``,
    ``revrange``, subscriptions with ``full=True`` or by position, PROTOCOL.md v2); they
    are None where the server sent the original frame, and ``id``/``metadata`` are
    None for an event stored without them.
    """

    stream: str
    number: int
    name: str
    data: bytes
    position: int | None = None
    timestamp: int | None = None
    id: str | None = None
    metadata: bytes | None = None


def event_from_frame(frame: object) -> Event:
    """The :class:`Event` of an event frame as hiredis parses it (original: 5
    elements, full: 9); ProtocolError for anything else."""
    if type(frame) is list and frame and frame[0] == b"event":
        if len(frame) == 5:
            _, stream, number, name, data = frame
            if type(number) is int and type(data) is bytes:
                return Event(stream.decode(errors="surrogateescape"), number,
                             name.decode(errors="surrogateescape"), data)
        elif len(frame) == 9:
            _, stream, number, name, data, position, timestamp, event_id, metadata = frame
            if type(number) is int and type(position) is int and type(timestamp) is int:
                return Event(stream.decode(errors="surrogateescape"), number,
                             name.decode(errors="surrogateescape"), data, position, timestamp,
                             None if event_id is None else event_id.decode(errors="surrogateescape"),
                             metadata)
    raise ProtocolError(f"not an event frame: {frame!r}"[:300])


@dataclass(frozen=True)
class Spec:
    """A parsed subscription spec: ``stream`` (None for ``$all``), ``start`` (None for
    live only) and ``stop`` (exclusive; None for no end); with ``by_position``
    (``$all@from[:to]``) start and stop are global positions."""

    stream: bytes | None
    start: int | None = None
    stop: int | None = None
    by_position: bool = False

    def __str__(self) -> str:
        text = (ALL_STREAMS if self.stream is None else self.stream).decode(errors="replace")
        if self.by_position:
            text += f"@{self.start}"
        elif self.start is not None:
            text += f":{self.start}"
        if self.stop is not None:
            text += f":{self.stop}"
        return text


def parse_spec(raw: str | bytes) -> Spec:
    """Parse ``name``, ``name:from``, ``name:from:to``, the ``$all`` forms, and
    ``$all@from``, ``$all@from:to`` (by global position).

    Raises ValueError for what PROTOCOL.md calls malformed (the server checks the
    finer rules of names again).
    """
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    by_position = data.startswith(ALL_STREAMS + b"@")
    if by_position:
        name, parts = ALL_STREAMS, data[len(ALL_STREAMS) + 1:].split(b":")
        if len(parts) > 2:
            raise ValueError(f"invalid subscription spec {raw!r}: too many ':'")
    else:
        parts = data.split(b":")
        if len(parts) > 3:
            raise ValueError(f"invalid subscription spec {raw!r}: too many ':'")
        name, parts = parts[0], parts[1:]
    if not name or (name != ALL_STREAMS and _BAD_STREAM_BYTES.search(name)):
        raise ValueError(f"invalid subscription spec {raw!r}: bad stream name")
    numbers = []
    for part in parts:
        if not (part.isdigit() and part.isascii()):
            what = "positions" if by_position else "event numbers"
            raise ValueError(f"invalid subscription spec {raw!r}:"
                             f" {what} must be non-negative integers")
        numbers.append(int(part))
    start = numbers[0] if numbers else None
    stop = numbers[1] if len(numbers) == 2 else None
    if stop is not None and start >= stop:
        raise ValueError(f"invalid subscription spec {raw!r}: 'from' must be lower than 'to'")
    return Spec(None if name == ALL_STREAMS else name, start, stop, by_position)


@dataclass
class _StreamCursor:
    """A named spec: the next number to yield (None until pinned) and the stop."""

    stream: bytes
    next: int | None
    stop: int | None

    @property
    def done(self) -> bool:
        return self.stop is not None and self.next is not None and self.next >= self.stop

    def spec(self) -> bytes:
        spec = b"%s:%d" % (self.stream, self.next)
        return spec if self.stop is None else spec + b":%d" % self.stop


@dataclass
class _AllCursor:
    """The ``$all`` spec: per stream, the next number to yield (``low`` if unseen)."""

    low: int
    stop: int | None
    #: True once we know where every stream starts (a from-spec is pinned by its number).
    pinned: bool
    #: True after the first connection: later ones subscribe live and catch up.
    resumed: bool = False
    next: dict[bytes, int] = field(default_factory=dict)
    #: Events that arrived before their turn: stream -> number -> event.
    held: dict[bytes, dict[int, Event]] = field(default_factory=dict)
    #: Events that arrived before the pin, in arrival order (judged once pinned).
    early: list[tuple[bytes, Event]] = field(default_factory=list)
    #: Catch-up ranges in progress: stream -> exclusive end.
    catching: dict[bytes, int] = field(default_factory=dict)
    #: Between ``subscribe $all`` and the end of the snapshot: hold, do not judge gaps.
    settling: bool = False

    def want(self, stream: bytes) -> int:
        return self.next.get(stream, self.low)

    def spec(self) -> bytes:
        spec = b"$all:%d" % self.low
        return spec if self.stop is None else spec + b":%d" % self.stop


@dataclass
class _PositionCursor:
    """``$all`` on a server with global positions (PROTOCOL.md v2): the next position
    to yield (None until pinned), the position to stop before, and the per-stream
    number range of a ``$all:from:to`` spec, which the server applies on the first
    connection and this client on resumed ones (``$all@<next>``)."""

    next: int | None
    stop: int | None = None
    low: int = 0
    high: int | None = None
    #: The first connection sends the spec by numbers as it is.
    by_numbers_first: bool = False
    resumed: bool = False

    @property
    def filtered(self) -> bool:
        return self.low != 0 or self.high is not None

    @property
    def done(self) -> bool:
        return self.stop is not None and self.next is not None and self.next >= self.stop

    def spec(self) -> bytes:
        if self.by_numbers_first and not self.resumed:
            spec = b"$all:%d" % self.low
            return spec if self.high is None else spec + b":%d" % self.high
        spec = b"$all@%d" % self.next
        return spec if self.stop is None else spec + b":%d" % self.stop


class Subscription(Iterator[Event]):
    """An iterator of :class:`Event` over one or more subscription specs.

    Made by :meth:`Client.subscribe`, which connects and pins the start before it
    returns (a failure there raises at once; retries apply only to later drops).
    Specs: ``name`` (live), ``name:from``, ``name:from:to`` (``to`` exclusive), the
    same for ``$all``, and ``$all@from``, ``$all@from:to`` by global position. Iteration
    ends when every named spec is bounded and complete, or a ``$all@from:to`` has
    reached ``to`` (a ``$all:from:to`` by numbers never ends: a stream created later
    could still fall in range). With ``full=True`` events carry their position and
    timestamp (``envelope full``; a server without it raises ProtocolError).

    When the connection drops it reconnects with exponential backoff (``backoff_base``
    doubling up to ``backoff_max`` seconds, each wait jittered between half and all of
    it) and resumes after the last event yielded, as the module docstring explains.
    ``reconnect=False`` raises the :class:`ConnectionError` instead; ``max_retries``
    bounds consecutive failed attempts (None: forever). An idle connection is checked
    with a ``PING`` every ``heartbeat`` seconds, so a silent network cut is noticed too.

    Iterate from one thread (or greenlet) at a time; :meth:`close` may be called from
    any thread and makes the iteration stop.
    """

    def __init__(self, connect: Callable[[], Connection], specs: Sequence[str | bytes], *,
                 reconnect: bool = True, max_retries: int | None = None,
                 backoff_base: float = 0.1, backoff_max: float = 5.0,
                 heartbeat: float | None = 30.0, timeout: float | None = 10.0,
                 full: bool = False) -> None:
        if not specs:
            raise ValueError("subscribe needs at least one spec")
        parsed = [parse_spec(spec) for spec in specs]
        self._cursors: list[_StreamCursor] = []
        self._by_stream: dict[bytes, _StreamCursor] = {}
        self._all: _AllCursor | None = None
        self._positions: _PositionCursor | None = None
        self._full = full
        for spec in parsed:
            if spec.stream is None:
                if len(parsed) > 1:
                    raise ValueError("'$all' covers every stream: subscribe to it alone")
                if spec.by_position:
                    self._positions = _PositionCursor(spec.start, spec.stop)
                else:
                    self._all = _AllCursor(low=spec.start or 0, stop=spec.stop,
                                           pinned=spec.start is not None)
            else:
                if spec.stream in self._by_stream:
                    raise ValueError(f"stream {spec.stream.decode(errors='replace')!r}"
                                     " appears in more than one spec")
                cursor = _StreamCursor(spec.stream, spec.start, spec.stop)
                self._cursors.append(cursor)
                self._by_stream[spec.stream] = cursor
        self.specs = tuple(parsed)
        self._connect = connect
        self._reconnect = reconnect
        self._max_retries = max_retries
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._heartbeat = heartbeat
        self._timeout = timeout
        self._conn: Connection | None = None
        self._ready: deque[Event] = deque()
        #: What to do with each awaited reply, in the order the replies will come.
        self._handlers: deque[Callable[[object], None]] = deque()
        self._snapshot: _Snapshot | None = None
        self._catchup_batches: list[list[bytes]] = []
        self._attempts = 0
        #: PINGs sent and not answered yet (0 or 1).
        self._pings = 0
        self._closed = False
        self._closing = threading.Event()
        try:
            self._open_session()
            while self._handlers and self._conn is not None:
                self._dispatch(self._conn.read())  # pinned and confirmed before we return
        except BaseException:
            self.close()
            raise

    # -- the iterator -----------------------------------------------------------------------

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Event:
        while not self._ready:
            if self._closed or self._finished():
                self.close()
                raise StopIteration
            self._pump()
        if self._closed:
            raise StopIteration
        return self._ready.popleft()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop: close the connection; the iteration ends. Thread-safe, idempotent."""
        self._closed = True
        self._closing.set()
        conn = self._conn
        if conn is not None:
            conn.shutdown()
            conn.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _finished(self) -> bool:
        if self._positions is not None:
            return self._positions.done
        return self._all is None and all(cursor.done for cursor in self._cursors)

    # -- one read, and recovering from a drop -------------------------------------------------

    def _pump(self) -> None:
        """Read one message and act on it; on a drop, reconnect (or raise)."""
        try:
            if self._conn is None:
                raise ConnectionError("not connected")
            # Awaiting replies (other than our PING's): the client's timeout applies.
            # Otherwise silence for ``heartbeat`` seconds sends a PING, and silence for
            # as long again means the connection is dead.
            awaiting = len(self._handlers) > self._pings
            try:
                message = self._conn.read(self._timeout if awaiting else self._heartbeat)
            except TimeoutError:
                if awaiting or self._pings:
                    raise
                self._conn.send(("ping",))
                self._handlers.append(self._on_pong)
                self._pings += 1
                return
            self._dispatch(message)
        except (ConnectionError, ServerShuttingDown) as exc:
            if self._closed:
                return
            self._recover(exc)
        except OSError:
            # close() from another thread may close the socket under this read (EBADF):
            # that ends the iteration, as close() promises, and is no error.
            if self._closed:
                return
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def _recover(self, exc: MeiliesError) -> None:
        address = self._conn.address if self._conn is not None else "the server"
        self._drop_session()
        if not self._reconnect:
            self.close()
            raise exc
        if self._finished():
            return
        log.warning("connection to %s lost (%s); reconnecting", address, exc)
        last = exc
        while not self._closed:
            self._attempts += 1
            if self._max_retries is not None and self._attempts > self._max_retries:
                self.close()
                raise ConnectionError(f"gave up reconnecting to {address} after"
                                      f" {self._max_retries} attempts: {last}") from last
            delay = self._backoff(self._attempts)
            if self._closing.wait(delay):
                return
            try:
                self._open_session()
            except (ConnectionError, ServerShuttingDown) as retry_exc:
                self._drop_session()
                last = retry_exc
                log.info("reconnect attempt %d failed: %s", self._attempts, retry_exc)
                continue
            log.warning("reconnected to %s; resuming %s", self._conn.address, self._describe())
            return

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff, jittered between half and all of the step."""
        step = min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1))
        return step / 2 + random.uniform(0, step / 2)

    def _describe(self) -> str:
        if self._positions is not None:
            return f"$all from position {self._positions.next}"
        if self._all is not None:
            return f"$all ({len(self._all.next)} streams positioned)"
        return ", ".join(f"{c.stream.decode(errors='replace')} from {c.next}"
                         for c in self._cursors if not c.done)

    # -- sessions -----------------------------------------------------------------------------

    def _open_session(self) -> None:
        """Connect, pin what is unpinned, send the subscriptions. The replies are handled
        as they arrive (``_handlers``)."""
        conn = self._conn = self._connect()
        if self._closed:  # close() ran while we were connecting
            conn.close()
            return
        if self._full or self._all is not None or self._positions is not None:
            self._ask_for_full_frames(conn)
        positions = self._positions
        if positions is not None and positions.next is None:  # live $all: pin it
            last = conn.call("revrange", ALL_STREAMS, "+", "-", "COUNT", "1")
            positions.next = event_from_frame(last[0]).position + 1 if last else 0
        unpinned = [cursor for cursor in self._cursors if cursor.next is None]
        if unpinned:  # nothing subscribed on this connection yet: replies only
            conn.send(*[("last-event-number", cursor.stream) for cursor in unpinned])
            for cursor in unpinned:
                last = _last_number(conn.read(), cursor.stream)
                cursor.next = 0 if last is None else last + 1
        specs = [cursor.spec() for cursor in self._cursors if not cursor.done]
        commands: list[tuple] = []
        if positions is not None and not positions.done:
            specs.append(positions.spec())
            positions.resumed = True
        all_cursor = self._all
        if all_cursor is not None:
            if all_cursor.pinned and not all_cursor.resumed:
                specs.append(all_cursor.spec())
            else:
                specs.append(ALL_STREAMS)
                all_cursor.settling = True
                commands.append(("stream-names",))
            all_cursor.resumed = True
        if not specs:
            return
        commands.insert(0, ("subscribe", *specs))
        self._handlers.extend(self._on_subscribed for _ in specs)
        if len(commands) == 2:
            self._handlers.append(self._on_stream_names)
        conn.send(*commands)

    def _ask_for_full_frames(self, conn: Connection) -> None:
        """``envelope full`` on a new connection (nothing subscribed yet: a plain call).

        A ``$all`` subscription uses positions when the server has them: it resumes
        from the last position + 1 with one spec. An older server (no ``envelope``)
        keeps the per-stream resume, unless positions or full frames were asked for.
        """
        try:
            conn.call("envelope", "full")
            supported = True
        except ResponseError:
            supported = False
        if supported and self._all is not None and not self._all.resumed:
            cursor = self._all  # first connection: nothing yielded yet
            if cursor.pinned:
                self._positions = _PositionCursor(0, low=cursor.low, high=cursor.stop,
                                                  by_numbers_first=True)
            else:
                self._positions = _PositionCursor(None)
            self._all = None
        if not supported and (self._full or self._positions is not None):
            raise ProtocolError(f"the server at {conn.address} has no full frames or global"
                                " positions (PROTOCOL.md v2): subscribe without full=True and"
                                " without '$all@'")

    def _drop_session(self) -> None:
        """Forget everything tied to the connection; keep the per-stream positions."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._handlers.clear()
        self._pings = 0
        self._snapshot = None
        self._catchup_batches = []
        if self._all is not None:
            # Held events will come again: from the next catch-up or live subscription.
            self._all.held.clear()
            self._all.early.clear()
            self._all.catching.clear()
            self._all.settling = False

    # -- messages -----------------------------------------------------------------------------

    def _dispatch(self, message: object) -> None:
        if type(message) is list and len(message) in (5, 9) and message[0] == b"event":
            self._on_event(message)
            return
        if not self._handlers:
            raise ProtocolError(f"unexpected message from the server: {message!r}")
        handler = self._handlers.popleft()
        if isinstance(message, hiredis.ReplyError):
            raise error_from_reply(str(message))
        handler(message)

    def _on_subscribed(self, reply: object) -> None:
        if not (type(reply) is list and len(reply) == 2 and reply[0] == b"subscribed"):
            raise ProtocolError(f"unexpected reply to subscribe: {reply!r}")
        self._attempts = 0  # the server is back and serving us

    def _on_pong(self, reply: object) -> None:
        self._pings -= 1
        if reply != b"PONG":
            raise ProtocolError(f"unexpected reply to ping: {reply!r}")

    def _on_event(self, message: list) -> None:
        event = event_from_frame(message)
        raw_stream, number = message[1], event.number
        if self._positions is not None:
            self._on_positioned_event(event)
            return
        if self._all is not None:
            self._on_all_event(raw_stream, event)
            return
        cursor = self._by_stream.get(raw_stream)
        if cursor is None or cursor.done or number < cursor.next:
            return  # not ours, or already yielded
        if number > cursor.next:
            raise ProtocolError(f"gap in stream {event.stream}: expected event"
                                f" {cursor.next}, got {number}")
        self._ready.append(event)
        cursor.next = number + 1
        if cursor.done and self._finished() and self._conn is not None:
            self._conn.close()
            self._conn = None

    def _on_all_event(self, stream: bytes, event: Event) -> None:
        cursor = self._all
        number = event.number
        if cursor.stop is not None and number >= cursor.stop:
            return
        if not cursor.pinned:
            cursor.early.append((stream, event))
            return
        want = cursor.want(stream)
        if number < want:
            return  # a duplicate: the live subscription and a catch-up overlap
        if number == want:
            self._yield_all(stream, event)
            if stream in cursor.held:
                self._drain(stream)
            return
        if not cursor.settling and stream not in cursor.catching:
            raise ProtocolError(f"gap in stream {event.stream}: expected event {want},"
                                f" got {number}")
        cursor.held.setdefault(stream, {})[number] = event

    def _on_positioned_event(self, event: Event) -> None:
        """``$all`` by position: each position once, in order."""
        cursor = self._positions
        position = event.position
        if position is None:
            raise ProtocolError("an original frame on a subscription by position")
        if position < cursor.next:
            return  # sent again after a resume
        if position > cursor.next and not cursor.filtered:
            raise ProtocolError(f"gap in $all: expected position {cursor.next}, got {position}")
        cursor.next = position + 1
        if event.number < cursor.low or (cursor.high is not None and event.number >= cursor.high):
            return
        if cursor.stop is not None and position >= cursor.stop:
            return
        self._ready.append(event)
        if cursor.done and self._conn is not None:
            self._conn.close()
            self._conn = None

    def _yield_all(self, stream: bytes, event: Event) -> None:
        cursor = self._all
        self._ready.append(event)
        cursor.next[stream] = event.number + 1
        end = cursor.catching.get(stream)
        if end is not None and event.number + 1 >= end:
            del cursor.catching[stream]

    def _drain(self, stream: bytes) -> None:
        """Yield the held events of ``stream`` that are now next in line."""
        cursor = self._all
        held = cursor.held[stream]
        want = cursor.want(stream)
        for number in [n for n in held if n < want]:
            del held[number]
        while want in held:
            self._yield_all(stream, held.pop(want))
            want += 1
        if not held:
            del cursor.held[stream]

    # -- the $all snapshot and catch-ups ---------------------------------------------------------

    def _on_stream_names(self, reply: object) -> None:
        if not (type(reply) is list and reply and reply[0] == b"stream-names"):
            raise ProtocolError(f"unexpected reply to stream-names: {reply!r}")
        self._snapshot = _Snapshot(reply[1:])
        self._next_snapshot_batch()

    def _next_snapshot_batch(self) -> None:
        snapshot = self._snapshot
        batch = snapshot.names[snapshot.sent:snapshot.sent + BATCH]
        if not batch:
            self._snapshot_done()
            return
        snapshot.sent += len(batch)
        self._conn.send(*[("last-event-number", name) for name in batch])
        for i, name in enumerate(batch):
            last_in_batch = i == len(batch) - 1
            self._handlers.append(lambda reply, name=name, last=last_in_batch:
                                  self._on_snapshot_number(name, reply, last))

    def _on_snapshot_number(self, name: bytes, reply: object, last_in_batch: bool) -> None:
        number = _last_number(reply, name)
        if number is not None:
            self._snapshot.lasts[name] = number
        if last_in_batch:
            self._next_snapshot_batch()

    def _snapshot_done(self) -> None:
        cursor = self._all
        lasts = self._snapshot.lasts
        self._snapshot = None
        catchups = []
        if not cursor.pinned:
            for stream, last in lasts.items():
                cursor.next[stream] = last + 1
            cursor.pinned = True
            early, cursor.early = cursor.early, []
            for stream, event in early:  # in arrival order: the server's global order
                self._on_all_event(stream, event)
        else:
            for stream, last in lasts.items():
                start = cursor.want(stream)
                end = last + 1 if cursor.stop is None else min(last + 1, cursor.stop)
                if start < end:
                    cursor.catching[stream] = end
                    catchups.append(b"%s:%d:%d" % (stream, start, end))
        cursor.settling = False
        for stream in list(cursor.held):
            self._drain(stream)
        for stream, held in cursor.held.items():
            if stream not in cursor.catching:
                raise ProtocolError(f"gap in stream {stream.decode(errors='replace')}:"
                                    f" expected event {cursor.want(stream)}, got {min(held)}")
        self._catchup_batches = [catchups[i:i + BATCH] for i in range(0, len(catchups), BATCH)]
        self._next_catchup_batch()

    def _next_catchup_batch(self, reply: object = None) -> None:
        if reply is not None:
            self._on_subscribed(reply)
        if not self._catchup_batches:
            return
        batch = self._catchup_batches.pop(0)
        self._conn.send(("subscribe", *batch))
        self._handlers.extend(self._on_subscribed for _ in batch[:-1])
        self._handlers.append(self._next_catchup_batch)


@dataclass
class _Snapshot:
    """``stream-names`` and then ``last-event-number`` of each, batch by batch."""

    names: list[bytes]
    sent: int = 0
    lasts: dict[bytes, int] = field(default_factory=dict)


def _last_number(reply: object, stream: bytes) -> int | None:
    if isinstance(reply, hiredis.ReplyError):
        raise error_from_reply(str(reply))
    if not (type(reply) is list and len(reply) == 3 and reply[0] == b"last-event-number"
            and (reply[2] is None or type(reply[2]) is int)):
        raise ProtocolError(f"unexpected reply to last-event-number {stream!r}: {reply!r}")
    return reply[2]
