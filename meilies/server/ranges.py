"""``range`` and ``revrange`` (PROTOCOL.md v2): a stream's events by number, or the
whole log's by position, as full frames.

Numbers and positions are dense, so the reply's array header is known before any
event is read: ``min(COUNT, events in the range)``. The rest is read as it is sent,
a part of about ``SEND_BYTES`` at a time while the socket drains, exactly as a
subscriber is served: a reply of 100,000 events holds one part, never the whole
reply, and builds no object per event beyond the part in hand. A reply that fits one
part (an aggregate's 50 events) is built at once and goes out with the other replies
of its read.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

from ..engine.errors import InvalidArgument
from ..engine.names import ALL_STREAMS, check_stream_name
from . import resp
from .errors import CommandError
from .subscription import MAX_NUMBER, SEND_BYTES

if TYPE_CHECKING:
    from .connection import Connection

#: Events in a range without COUNT, and the largest COUNT (PROTOCOL.md v2).
DEFAULT_COUNT = 10_000
MAX_COUNT = 100_000
#: Events read per part, at most (the byte budget usually cuts first).
PART_EVENTS = 4096


class StreamedReply:
    """A reply sent as it is read: ``head`` first, then each of ``parts``."""

    __slots__ = ("head", "parts")

    def __init__(self, head: bytes, parts: Iterator[bytes]) -> None:
        self.head = head
        self.parts = parts


class ReplyCut(Exception):
    """Fewer events could be read than a reply's header announced (never expected:
    visible events are never taken back). The connection cannot mend the reply and
    is closed."""


def range_(conn: Connection, args: list[bytes]) -> bytes | StreamedReply:
    return _range(conn, args, descending=False)


def revrange(conn: Connection, args: list[bytes]) -> bytes | StreamedReply:
    return _range(conn, args, descending=True)


def _range(conn: Connection, args: list[bytes], descending: bool) -> bytes | StreamedReply:
    command = "revrange" if descending else "range"
    stream = args[1]
    engine = conn.engine
    by_position = stream == ALL_STREAMS
    if by_position:
        unit = "position"
        available = engine.visible_position
        sid = None
    else:
        unit = "event number"
        sid = engine.stream_id(stream)
        if sid is None:  # a stream that exists had its name checked when it was made
            try:
                check_stream_name(stream)
            except InvalidArgument as exc:
                raise CommandError(f"ERR {exc}") from None
            available = 0
        else:
            available = engine.stream_size(sid)
    high_raw, low_raw = (args[2], args[3]) if descending else (args[3], args[2])
    low = _bound(low_raw, "start", unit)
    high = _bound(high_raw, "end", unit)
    count = _count(args[4:], command) if len(args) > 4 else DEFAULT_COUNT
    stop = min(high + 1, available)
    if low >= stop:
        return resp.EMPTY_ARRAY
    total = min(stop - low, count)
    if descending:
        low = stop - total
    else:
        stop = low + total
    head = resp.array_header(total)
    if sid is not None and not descending:
        kept = engine.kept_full_frames(sid, low, stop, SEND_BYTES)
        if kept is not None:  # an aggregate read again: the frames as sent last time
            return head + kept
    if by_position:
        read = engine.all_full_frames
    else:
        read = partial(engine.stream_full_frames, sid)
    pieces, got, resume = read(low, stop, max_events=min(total, PART_EVENTS),
                               max_bytes=SEND_BYTES, descending=descending)
    if got == total:
        return b"".join([head, *pieces])
    if not got:
        raise ReplyCut(f"{command}: no event where {total} were announced")
    return StreamedReply(head, _parts(read, b"".join(pieces), low, stop, resume, total - got,
                                      descending))


def _parts(read, first: bytes, low: int, stop: int, resume: int, remaining: int,
           descending: bool) -> Iterator[bytes]:
    yield first
    while remaining:
        if descending:
            pieces, got, resume = read(low, resume, max_events=min(remaining, PART_EVENTS),
                                       max_bytes=SEND_BYTES, descending=True)
        else:
            pieces, got, resume = read(resume, stop, max_events=min(remaining, PART_EVENTS),
                                       max_bytes=SEND_BYTES)
        if not got:
            raise ReplyCut(f"{remaining} events short of the announced count")
        remaining -= got
        yield b"".join(pieces)


def _bound(raw: bytes, which: str, unit: str) -> int:
    """A range bound: ``-`` (the first), ``+`` (the last) or a number, at either end
    (as ``XRANGE``: ``range s + -`` is empty, not an error)."""
    if raw == b"-":
        return 0
    if raw == b"+":
        return MAX_NUMBER
    if raw.isdigit() and raw.isascii() and len(raw) <= 20 and int(raw) <= MAX_NUMBER:
        return int(raw)
    shown = raw[:64].decode("utf-8", "replace")
    raise CommandError(f"ERR invalid {which} '{shown}': must be '-', '+' or an {unit}"
                       " (a non-negative integer)")


def _count(options: list[bytes], command: str) -> int:
    if not options:
        return DEFAULT_COUNT
    if len(options) != 2 or options[0].lower() != b"count":
        raise CommandError(f"ERR syntax error in '{command}': expected COUNT <n> after the"
                           " range")
    raw = options[1]
    if raw.isdigit() and raw.isascii() and len(raw) <= 6 and 1 <= int(raw) <= MAX_COUNT:
        return int(raw)
    shown = raw[:64].decode("utf-8", "replace")
    raise CommandError(f"ERR invalid COUNT '{shown}': must be 1 to {MAX_COUNT}")
