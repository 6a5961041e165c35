"""The rules for stream names, event names and sizes (PROTOCOL.md, "Names and sizes").

Stream names travel inside frames as RESP simple strings and inside subscription
specs split on ``:``, hence their stricter rule.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidArgument

MAX_NAME_BYTES = 255
#: Default cap on one event's data, in bytes (``--max-event-size``).
DEFAULT_MAX_EVENT_SIZE = 1024 * 1024
#: Reserved stream name: the subscription to every stream.
ALL_STREAMS = b"$all"

# ASCII bytes that may never appear: controls (C0, DEL), plus for streams the space
# and ':' (the spec separator).
_ASCII_BAD_EVENT = re.compile(rb"[\x00-\x1f\x7f]")
_ASCII_BAD_STREAM = re.compile(rb"[\x00-\x20\x7f:]")


def _has_bad_unicode(text: str, *, whitespace: bool) -> bool:
    for ch in text:
        if unicodedata.category(ch) == "Cc" or (whitespace and ch.isspace()):
            return True
    return False


def _check_name(value: bytes, argument: str, ascii_bad: re.Pattern, whitespace: bool) -> None:
    if not value:
        raise InvalidArgument(argument, "must not be empty")
    if len(value) > MAX_NAME_BYTES:
        raise InvalidArgument(argument, f"is {len(value)} bytes, at most {MAX_NAME_BYTES} allowed")
    if ascii_bad.search(value):
        what = "whitespace, ':' or control characters" if whitespace else "control characters"
        raise InvalidArgument(argument, f"must not contain {what}")
    if value.isascii():
        return
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(argument, "is not valid UTF-8") from None
    if _has_bad_unicode(text, whitespace=whitespace):
        what = "whitespace or control characters" if whitespace else "control characters"
        raise InvalidArgument(argument, f"must not contain {what}")


def quoted(name: bytes) -> str:
    """A stream or event name as messages show it: ``'orders-17'``. A damaged log's
    names can hold any bytes: those that are not printable UTF-8 come out escaped."""
    return repr(name.decode("utf-8", "backslashreplace"))


def check_stream_name(value: bytes) -> None:
    """Raise :class:`InvalidArgument` unless ``value`` may name a stream in a log: what
    reads, subscriptions and fsck accept (a log written before names beginning with
    ``$`` were reserved may hold one, and it stays readable)."""
    _check_name(value, "stream", _ASCII_BAD_STREAM, whitespace=True)
    if value == ALL_STREAMS:
        raise InvalidArgument("stream", "'$all' is reserved (subscribe only)")


def check_new_stream_name(value: bytes) -> None:
    """Raise :class:`InvalidArgument` unless a write may create a stream named ``value``:
    as :func:`check_stream_name`, and names beginning with ``$`` are reserved for the
    server (PROTOCOL.md, version 2: ``$all`` and what may come)."""
    check_stream_name(value)
    if value.startswith(b"$"):
        raise InvalidArgument("stream", f"{quoted(value)} is reserved: stream names beginning"
                              " with '$' are the server's")


#: One C call that accepts the common event name, 1..255 printable ASCII bytes (a match,
#: else None: then :func:`check_event_name` decides).
plain_event_name = re.compile(rb"[\x20-\x7e]{1,255}").fullmatch


def check_event_name(value: bytes) -> None:
    """Raise :class:`InvalidArgument` unless ``value`` may name an event."""
    if plain_event_name(value) is None:
        _check_name(value, "event-name", _ASCII_BAD_EVENT, whitespace=False)


def check_data(value: bytes, max_event_size: int) -> None:
    """Raise :class:`InvalidArgument` if ``value`` is larger than ``max_event_size``."""
    if len(value) > max_event_size:
        raise InvalidArgument("data", f"is {len(value)} bytes, at most {max_event_size} allowed")


def check_event_id(value: bytes) -> None:
    """Raise :class:`InvalidArgument` unless ``value`` may be an event id: 1..255 bytes
    of UTF-8 without control characters (PROTOCOL.md, version 2; a UUID is typical)."""
    if plain_event_name(value) is None:
        _check_name(value, "id", _ASCII_BAD_EVENT, whitespace=False)
