"""The command table: every command's arity, and what it answers (PROTOCOL.md).

A handler takes ``(connection, args)`` (``args[0]`` is the command name as sent) and
returns its reply bytes, or raises :class:`CommandError` / an engine error that
``errors.engine_error_reply`` maps to the wire. Writes append without flushing and
tell the connection (``Connection.wrote``), which writes, syncs and turns the reply
into an error if either fails, before the reply goes out.
"""

from __future__ import annotations

import bisect
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import __version__
from ..engine import ANY
from ..engine.appends import AppendResult
from ..engine.errors import InvalidArgument
from ..engine.writes import Write
from ..engine.names import check_stream_name
from . import ranges, resp, transaction
from .errors import NOAUTH, WRONGPASS, CommandError
from .subscription import parse_spec

if TYPE_CHECKING:
    from .connection import Connection

Handler = Callable[["Connection", list[bytes]], "bytes | ranges.StreamedReply"]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    min_args: int  # including the command name
    max_args: int | None  # None: no upper bound
    #: Reads state that this connection's own unsynced writes must be part of first.
    reads: bool = False
    #: Allowed before AUTH on a server with --requirepass.
    before_auth: bool = False


def _ok(results: list[AppendResult]) -> bytes:
    return resp.OK


def _last_number(results: list[AppendResult]) -> bytes:
    return resp.integer(results[0].last_number)


def _append_full_reply(results: list[AppendResult]) -> bytes:
    return transaction.reply_of(b"append-full", results[0])


def publish(conn: Connection, args: list[bytes]) -> bytes:
    if conn.deferred:
        return conn.defer([Write(args[1], [(args[2], args[3])])], _ok)
    result = conn.writer.append(args[1], [(args[2], args[3])], ANY, flush=False)
    conn.wrote(result.end_position)
    return resp.OK


def append(conn: Connection, args: list[bytes]) -> bytes:
    if len(args) % 2 == 0:
        raise CommandError("ERR wrong number of arguments for 'append'")
    expected = transaction.parse_expected(args[2])
    events = [(args[i], args[i + 1]) for i in range(3, len(args), 2)]
    if conn.deferred:
        return conn.defer([Write(args[1], events, expected)], _last_number)
    result = conn.writer.append(args[1], events, expected, flush=False)
    conn.wrote(result.end_position)
    return resp.integer(result.last_number)


def append_full(conn: Connection, args: list[bytes]) -> bytes:
    """``append-full <stream> <expected> (<id> <name> <metadata> <data>)+``:
    ``*2 :<last number> :<last position>`` (an exact retry gets its first reply)."""
    write = transaction.append_full_write(args)
    if conn.deferred:
        return conn.defer([write], _append_full_reply)
    result = conn.writer.write([write], flush=False)[0]
    conn.wrote(result.end_position)
    return transaction.reply_of(b"append-full", result)


def multi(conn: Connection, args: list[bytes]) -> bytes:
    conn.begin_transaction()
    return resp.OK


def exec_(conn: Connection, args: list[bytes]) -> bytes:
    raise transaction.EXEC_WITHOUT_MULTI  # inside MULTI the connection runs it


def discard(conn: Connection, args: list[bytes]) -> bytes:
    raise transaction.DISCARD_WITHOUT_MULTI  # inside MULTI the connection runs it


def last_event_number(conn: Connection, args: list[bytes]) -> bytes:
    stream = args[1]
    _check_stream_argument(stream)
    number = conn.engine.last_event_number(stream)
    tail = resp.NIL if number is None else resp.integer(number)
    return b"*3\r\n+last-event-number\r\n" + resp.simple(stream) + tail


def _check_stream_argument(stream: bytes) -> None:
    try:
        check_stream_name(stream)
    except InvalidArgument as exc:
        raise CommandError(f"ERR {exc}") from None


def stream_names(conn: Connection, args: list[bytes]) -> bytes:
    names = conn.engine.stream_names()
    return b"".join([resp.array_header(len(names) + 1), b"+stream-names\r\n"]
                    + [b"+%s\r\n" % name for name in names])


def envelope(conn: Connection, args: list[bytes]) -> bytes:
    """``envelope full|original``: the frames of subscriptions made afterwards."""
    kind = args[1].lower()
    if kind not in (b"full", b"original"):
        shown = args[1][:64].decode("utf-8", "replace")
        raise CommandError(f"ERR invalid envelope '{shown}': must be 'full' or 'original'")
    conn.full_envelope = kind == b"full"
    return resp.OK


#: Names per ``scan-streams`` page without COUNT, and the largest COUNT.
SCAN_DEFAULT_COUNT = 100
SCAN_MAX_COUNT = 100_000
#: The cursor that starts a scan and that says it is over (as Redis' SCAN).
SCAN_DONE = b"0"


def scan_streams(conn: Connection, args: list[bytes]) -> bytes:
    """``scan-streams <cursor> [MATCH <prefix>*] [COUNT <n>]``: a page of stream names.

    The names are walked in byte order; the cursor is the last name a page returned,
    hex-encoded (never ``0``: that is an odd number of hex digits), so the next page
    starts after it. A stream that exists for the whole scan is returned exactly
    once; one created meanwhile is returned if its name sorts after the cursor.
    """
    after = _scan_cursor(args[1])
    prefix = b""
    count = SCAN_DEFAULT_COUNT
    at = 2
    while at < len(args):
        option = args[at].lower()
        if at + 1 >= len(args) or option not in (b"match", b"count"):
            raise CommandError("ERR syntax error in 'scan-streams': expected MATCH <prefix>*"
                               " or COUNT <n>")
        value = args[at + 1]
        if option == b"match":
            prefix = _scan_prefix(value)
        else:
            if not (value.isdigit() and value.isascii() and len(value) <= 6
                    and 1 <= int(value) <= SCAN_MAX_COUNT):
                shown = value[:64].decode("utf-8", "replace")
                raise CommandError(f"ERR invalid COUNT '{shown}': must be 1 to {SCAN_MAX_COUNT}")
            count = int(value)
        at += 2
    names = conn.engine.stream_names()
    start = bisect.bisect_left(names, prefix)
    if after is not None:
        start = max(start, bisect.bisect_right(names, after))
    # The names with the prefix are one slice of the sorted names: up to the first
    # name that sorts after all of them.
    end = _prefix_end(prefix) if prefix else None
    limit = len(names) if end is None else bisect.bisect_left(names, end)
    page = names[start:min(start + count, limit)]
    more = start + len(page) < limit
    cursor = page[-1].hex().encode() if more else SCAN_DONE
    return b"".join([b"*2\r\n", resp.bulk(cursor), resp.array_header(len(page))]
                    + [b"+%s\r\n" % name for name in page])


def _scan_cursor(raw: bytes) -> bytes | None:
    """The name a scan goes on after (None: from the start)."""
    if raw == SCAN_DONE:
        return None
    try:
        if len(raw) % 2 or not raw.isascii():
            raise ValueError(raw)
        return bytes.fromhex(raw.decode("ascii"))
    except ValueError:
        shown = raw[:64].decode("utf-8", "replace")
        raise CommandError(f"ERR invalid cursor '{shown}': pass 0, or the cursor the last"
                           " scan-streams returned") from None


def _scan_prefix(pattern: bytes) -> bytes:
    prefix = pattern[:-1]
    if not pattern.endswith(b"*") or any(c in prefix for c in b"*?[\\"):
        shown = pattern[:64].decode("utf-8", "replace")
        raise CommandError(f"ERR invalid MATCH '{shown}': only '<prefix>*' patterns are"
                           " supported")
    return prefix


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest name that sorts after every name starting with ``prefix`` (None
    when there is none: a prefix of 0xff bytes)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


#: Most specs one ``subscribe`` may carry: each is a greenlet and a first read, and one
#: command must not hold the event loop long (more streams: more commands).
MAX_SPECS_PER_SUBSCRIBE = 10_000


def subscribe(conn: Connection, args: list[bytes]) -> bytes:
    if len(args) - 1 > MAX_SPECS_PER_SUBSCRIBE:
        raise CommandError(f"ERR too many subscription specs: {len(args) - 1}, at most"
                           f" {MAX_SPECS_PER_SUBSCRIBE} per subscribe")
    specs = [parse_spec(raw) for raw in args[1:]]  # all or none: parse every spec first
    conn.subscribe(specs)
    return b""


def ping(conn: Connection, args: list[bytes]) -> bytes:
    return resp.PONG if len(args) == 1 else resp.bulk(args[1])


def quit_(conn: Connection, args: list[bytes]) -> bytes:
    conn.closing = True
    return resp.OK


def auth(conn: Connection, args: list[bytes]) -> bytes:
    password = conn.server.config.requirepass
    if password is None:  # nothing can match (PROTOCOL.md: "otherwise -WRONGPASS")
        return WRONGPASS
    # A refused AUTH leaves the connection as it was (as Redis does): once a good
    # AUTH has been seen, a later bad one does not lock the connection again.
    if len(args) == 3 and args[1] != b"default":
        return WRONGPASS
    if hmac.compare_digest(args[-1], password.encode()):
        conn.authenticated = True
        return resp.OK
    return WRONGPASS


def hello(conn: Connection, args: list[bytes]) -> bytes:
    """``HELLO [protover [AUTH username password] [SETNAME name]]``: the handshake.

    redis-py 8 opens every connection with ``HELLO 3`` (``HELLO 3 AUTH default
    <password>`` when it has a password) and gives up if that fails. Every reply of
    ours is also valid RESP3 (simple strings, errors, integers, bulk strings, arrays,
    the ``$-1`` nil), so both versions are accepted; only this reply differs (a map
    for 3, a flat array for 2), and nothing else changes on the connection.
    """
    version = 2
    if len(args) >= 2:
        raw = args[1]
        if not (raw.isdigit() and raw.isascii() and len(raw) <= 9):
            raise CommandError("ERR Protocol version is not an integer or out of range")
        version = int(raw)
        if version not in (2, 3):
            raise CommandError("NOPROTO unsupported protocol version")
    credentials = None
    at = 2
    while at < len(args):
        option = args[at].lower()
        if option == b"auth" and at + 2 < len(args):
            credentials = (args[at + 1], args[at + 2])
            at += 3
        elif option == b"setname" and at + 1 < len(args):
            at += 2
        else:
            name = args[at].decode("utf-8", "replace")
            raise CommandError(f"ERR Syntax error in HELLO option '{name}'")
    password = conn.server.config.requirepass
    if credentials is not None and password is not None:
        user, given = credentials
        if user != b"default" or not hmac.compare_digest(given, password.encode()):
            return WRONGPASS
        conn.authenticated = True
    if not conn.authenticated:
        return NOAUTH
    fields = [
        (b"server", resp.bulk(b"meilies")),
        (b"version", resp.bulk(__version__.encode())),
        (b"proto", resp.integer(version)),
        (b"id", resp.integer(id(conn))),
        (b"mode", resp.bulk(b"standalone")),
        (b"role", resp.bulk(b"master")),
        (b"modules", resp.EMPTY_ARRAY),
    ]
    header = b"%%%d\r\n" % len(fields) if version == 3 else resp.array_header(2 * len(fields))
    return header + b"".join(resp.bulk(key) + value for key, value in fields)


def command(conn: Connection, args: list[bytes]) -> bytes:
    if len(args) >= 2 and args[1].lower() == b"count":
        return resp.integer(len(COMMANDS))
    # COMMAND, COMMAND DOCS, COMMAND INFO ...: an empty array keeps redis-cli happy.
    return resp.EMPTY_ARRAY


def _backend_fields(server) -> list[tuple[str, object]]:
    """INFO's lines about a backend other than the engine: whether it answers."""
    available = getattr(server.writer, "available", None)
    return [] if available is None else [("backend_available", int(available))]


def info(conn: Connection, args: list[bytes]) -> bytes:
    server = conn.server
    stats = conn.engine.stats()
    fields = [
        ("meilies_version", __version__),
        ("process_id", os.getpid()),
        ("tcp_port", server.port),
        ("uptime_in_seconds", int(time.monotonic() - server.started)),
        ("connected_clients", server.connection_count),
        ("maxclients", server.maxclients),
        ("rejected_connections", server.refused),
        ("subscribers", server.notifier.subscriptions),
        ("streams", stats["streams"]),
        ("events", stats["events"]),
        # The global position of the last event readers may see (PROTOCOL.md v2).
        ("last_position", conn.engine.visible_position - 1),
        ("segments", stats["segments"]),
        ("disk_bytes", stats["disk_bytes"]),
        ("fsync", server.config.fsync),
        ("backend", server.config.backend),
        *_backend_fields(server),
        ("max_event_size", server.config.max_event_size),
        *_range_cache_fields(conn.engine.frame_cache),
    ]
    body = "# Server\r\n" + "".join(f"{key}:{value}\r\n" for key, value in fields)
    return resp.bulk(body.encode())


def _range_cache_fields(cache) -> list[tuple[str, int]]:
    """The frame cache's use (engine/framecache.py): all 0 when it is off."""
    if cache is None:
        return [("range_cache_max_bytes", 0), ("range_cache_bytes", 0),
                ("range_cache_streams", 0), ("range_cache_hits", 0), ("range_cache_misses", 0)]
    return [("range_cache_max_bytes", cache.max_bytes), ("range_cache_bytes", cache.size),
            ("range_cache_streams", len(cache)), ("range_cache_hits", cache.hits),
            ("range_cache_misses", cache.misses)]


_TABLE = [
    Command("publish", publish, 4, 4),
    Command("append", append, 5, None),
    Command("append-full", append_full, 7, None),
    Command("multi", multi, 1, 1),
    Command("exec", exec_, 1, 1),
    Command("discard", discard, 1, 1),
    Command("subscribe", subscribe, 2, None, reads=True),
    Command("last-event-number", last_event_number, 2, 2, reads=True),
    Command("stream-names", stream_names, 1, 1, reads=True),
    Command("ping", ping, 1, 2),
    Command("quit", quit_, 1, None, before_auth=True),
    Command("auth", auth, 2, 3, before_auth=True),
    Command("hello", hello, 1, None, before_auth=True),
    Command("command", command, 1, None),
    Command("info", info, 1, 2, reads=True),
    Command("range", ranges.range_, 4, 6, reads=True),
    Command("revrange", ranges.revrange, 4, 6, reads=True),
    Command("envelope", envelope, 2, 2),
    Command("scan-streams", scan_streams, 2, 6, reads=True),
]

#: Lookup by the lower-case name as bytes.
COMMANDS: dict[bytes, Command] = {c.name.encode(): c for c in _TABLE}


def lookup(name: bytes) -> Command | None:
    """The command called ``name`` (case-insensitive), or None."""
    found = COMMANDS.get(name)
    if found is None:
        found = COMMANDS.get(name.lower())
    return found
