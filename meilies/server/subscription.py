"""Subscriptions: parsing specs, and the greenlet that serves one.

One greenlet per subscription reads the log from its own cursor (catch-up from disk
and live events are the same loop), sends what it read, and sleeps on its wake-up
when it has reached the head. A read comes back as a few views of the log (one per
run of frames that lie back to back: a stored batch is one), sent as they are. It
holds at most one read's worth of frames
(``SEND_BYTES``, or one event larger than that) while its socket drains: a slow
subscriber lags behind in the log instead of growing a buffer, and never slows
anyone else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gevent.event import Event

from ..engine import Engine
from ..engine.errors import InvalidArgument
from ..engine.reads import DEFAULT_MAX_EVENTS
from ..engine.names import ALL_STREAMS, check_stream_name
from .errors import CommandError
from .notify import Notifier


#: About how many bytes of frames one read gets, and so what a subscriber whose client
#: does not read holds at most (large frames are sent as views of the log, no copy).
SEND_BYTES = 256 * 1024
#: Largest event number a spec may name (numbers are u64 on disk).
MAX_NUMBER = 2**64 - 1


@dataclass(frozen=True)
class Spec:
    """``stream`` (None for ``$all``), first number (None: live only), stop (exclusive).

    With ``by_position`` (``$all@from[:to]``, PROTOCOL.md v2), start and stop are
    global positions, not per-stream numbers.
    """

    stream: bytes | None
    start: int | None
    stop: int | None
    by_position: bool = False

    @property
    def label(self) -> bytes:
        return ALL_STREAMS if self.stream is None else self.stream


#: ``$all@<from>`` and ``$all@<from>:<to>``: by global position.
_BY_POSITION = ALL_STREAMS + b"@"


def parse_spec(raw: bytes) -> Spec:
    """Parse ``name``, ``name:from``, ``name:from:to`` (and ``$all`` forms), and
    ``$all@from``, ``$all@from:to``."""
    by_position = raw.startswith(_BY_POSITION)
    if by_position:
        parts = raw[len(_BY_POSITION):].split(b":")
        if len(parts) > 2:
            raise _bad_spec(raw, "too many ':'")
        numbers = [_spec_number(raw, part, "positions") for part in parts]
        name = ALL_STREAMS
    else:
        parts = raw.split(b":")
        if len(parts) > 3:
            raise _bad_spec(raw, "too many ':'")
        name = parts[0]
        if name != ALL_STREAMS:
            try:
                check_stream_name(name)
            except InvalidArgument as exc:
                raise _bad_spec(raw, f"stream name {exc.reason}") from None
        numbers = [_spec_number(raw, part, "event numbers") for part in parts[1:]]
    start = numbers[0] if numbers else None
    stop = numbers[1] if len(numbers) == 2 else None
    if stop is not None and start >= stop:
        raise _bad_spec(raw, "'from' must be lower than 'to'")
    return Spec(None if name == ALL_STREAMS else name, start, stop, by_position)


def _spec_number(raw: bytes, part: bytes, what: str) -> int:
    if not part or not part.isdigit() or not part.isascii():
        raise _bad_spec(raw, f"{what} must be non-negative integers")
    # Numbers are u64 on disk; the length check comes first because int() refuses
    # strings of over 4300 digits with a ValueError.
    if len(part) > 20 or int(part) > MAX_NUMBER:
        raise _bad_spec(raw, f"{what[:-1]} out of range")
    return int(part)


def _bad_spec(raw: bytes, reason: str) -> CommandError:
    return CommandError(f"ERR invalid subscription spec '{raw.decode('utf-8', 'replace')}':"
                        f" {reason}")


def serve(spec: Spec, engine: Engine, notifier: Notifier,
          send: Callable[[list[bytes | memoryview]], None], start: int, wakeup: Event,
          full: bool = False) -> None:
    """Serve one subscription until its range ends (or the greenlet is killed).

    ``start`` was pinned when the subscription was made: the first number (or, for
    ``$all``, the global position) to send. ``wakeup`` is the subscription's own
    ``notifier.watch(spec.stream)``; it is unwatched when serving ends. ``full``:
    send full frames (``envelope full``) instead of the stored original ones.
    """
    try:
        if spec.stream is None:
            _serve_all(spec, engine, wakeup, send, start, full)
        else:
            _serve_stream(spec, engine, wakeup, send, start, full)
    finally:
        notifier.unwatch(spec.stream, wakeup)


def _serve_stream(spec, engine, wakeup, send, number, full) -> None:
    stream, stop = spec.stream, spec.stop
    while stop is None or number < stop:
        wakeup.clear()
        if full:
            pieces, _count, number = engine.stream_full_frames(stream, number, stop,
                                                               max_bytes=SEND_BYTES)
            views = [memoryview(b"".join(pieces))] if pieces else []
        else:
            views, number = engine.stream_spans(stream, number, stop, max_bytes=SEND_BYTES)
        if views:
            send(views)
            if (stop is not None and number >= stop) or number < engine.next_number(stream):
                continue  # the range is done, or more is visible (or left for next read)
        # Caught up when the read began (or just now): whatever becomes visible after
        # the clear above sets the wake-up, so waiting loses nothing.
        wakeup.wait()


def _serve_all(spec, engine, wakeup, send, position, full) -> None:
    if spec.by_position:
        low, high, stop = 0, None, spec.stop
    else:
        low, high, stop = spec.start or 0, spec.stop, None
    while stop is None or position < stop:
        wakeup.clear()
        if full:
            pieces, _count, after = engine.all_full_frames(
                position, stop, min_number=low, max_number=high, max_bytes=SEND_BYTES)
            views = [memoryview(b"".join(pieces))] if pieces else []
        else:
            caps = DEFAULT_MAX_EVENTS if stop is None else min(DEFAULT_MAX_EVENTS,
                                                               stop - position)
            views, after = engine.all_spans(position, max_events=caps, min_number=low,
                                            max_number=high, max_bytes=SEND_BYTES)
        if after == position:
            wakeup.wait()
            continue
        position = after
        if views:
            send(views)
        if stop is not None and position >= stop:
            return
        if position >= engine.visible_position:
            wakeup.wait()  # caught up: as in _serve_stream, nothing visible is missed
