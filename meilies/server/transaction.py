"""``append-full`` and ``MULTI``/``EXEC``/``DISCARD`` (PROTOCOL.md, version 2).

After ``MULTI`` a connection queues its writes (``publish``, ``append``,
``append-full``), each checked by itself as it arrives (arity, names, sizes, ids, the
transaction's limits) and answered ``+QUEUED``; anything else is answered ``-ERR`` and
dooms the transaction, as a malformed write does: its ``EXEC`` answers ``-EXECABORT``.
``EXEC`` hands the queue to the engine as one list of writes (engine/writes.py), which
checks each against the state the ones before it leave and stores all or none; the
reply is the array of each write's usual reply, sent once the whole transaction is
durable (the connection's usual write settling). A failure (``-WRONGEXPECTED``,
``-DUPLICATEID``) is EXEC's whole answer, and nothing is stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engine import ANY, NO_STREAM
from ..engine.errors import DuplicateIdInRequest, EngineError, InvalidArgument
from ..engine.names import check_new_stream_name, check_stream_name
from ..engine.writes import MAX_TRANSACTION_BYTES, MAX_TRANSACTION_EVENTS, Write, check_write
from . import resp
from .errors import CommandError, engine_error_reply, wrong_arity

if TYPE_CHECKING:
    from ..engine.appends import AppendResult
    from .connection import Connection

QUEUED = b"+QUEUED\r\n"
EXECABORT = resp.error("EXECABORT Transaction discarded because of previous errors.")
NESTED = CommandError("ERR MULTI calls can not be nested")
EXEC_WITHOUT_MULTI = CommandError("ERR EXEC without MULTI")
DISCARD_WITHOUT_MULTI = CommandError("ERR DISCARD without MULTI")
#: The writes a transaction may queue, by the lower-case name as bytes.
WRITES = (b"publish", b"append", b"append-full")


def parse_expected(raw: bytes) -> str | int:
    lowered = raw.lower()
    if lowered == b"any":
        return ANY
    if lowered == b"none":
        return NO_STREAM
    if raw.isdigit() and raw.isascii() and len(raw) <= 20:
        return int(raw)
    raise CommandError("ERR invalid expected: must be 'any', 'none' or an event number")


def append_full_write(args: list[bytes]) -> Write:
    """The write of ``append-full <stream> <expected> (<id> <name> <metadata> <data>)+``
    (``args[0]`` is the command name); an empty id or metadata means none."""
    if len(args) < 7 or (len(args) - 3) % 4:
        raise wrong_arity("append-full")
    expected = parse_expected(args[2])
    body = args[3:]
    ids = [event_id or None for event_id in body[0::4]]
    metadata = [meta or None for meta in body[2::4]]
    events = list(zip(body[1::4], body[3::4]))
    return Write(args[1], events, expected, ids, metadata)


def _write_of(name: bytes, args: list[bytes]) -> Write:
    """A queued write as the engine takes it, or the CommandError that refuses it."""
    if name == b"publish":
        if len(args) != 4:
            raise wrong_arity("publish")
        return Write(args[1], [(args[2], args[3])])
    if name == b"append":
        if len(args) < 5 or len(args) % 2 == 0:
            raise wrong_arity("append")
        return Write(args[1], [(args[i], args[i + 1]) for i in range(3, len(args), 2)],
                     parse_expected(args[2]))
    return append_full_write(args)


def reply_of(name: bytes, result: AppendResult) -> bytes:
    """A write's usual reply."""
    if name == b"publish":
        return resp.OK
    if name == b"append":
        return resp.integer(result.last_number)
    return b"*2\r\n:%d\r\n:%d\r\n" % (result.last_number, result.end_position - 1)


class Transaction:
    """A connection's queue between ``MULTI`` and ``EXEC`` or ``DISCARD``."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.names: list[bytes] = []
        self.aborted = False
        self._ids: set[bytes] = set()
        self._events = 0
        self._bytes = 0

    def queue(self, conn: Connection, name: bytes, args: list[bytes]) -> bytes:
        """Queue one write, or refuse it (and doom the transaction)."""
        try:
            write = _write_of(name, args)
            self._check(conn, write)
        except CommandError as exc:
            self.aborted = True
            return exc.reply
        except EngineError as exc:
            self.aborted = True
            return engine_error_reply(exc) or resp.error("ERR invalid write")
        self.writes.append(write)
        self.names.append(name)
        return QUEUED

    def refuse(self, reply: bytes) -> bytes:
        """Answer a request that cannot be queued, dooming the transaction."""
        self.aborted = True
        return reply

    def _check(self, conn: Connection, write: Write) -> None:
        engine = conn.engine
        if engine.stream_id(write.stream) is None:
            check_new_stream_name(write.stream)
        else:
            check_stream_name(write.stream)
        check_write(write, engine.max_event_size)
        ids = [i for i in write.ids or () if i is not None]
        for event_id in ids:
            if event_id in self._ids:
                raise DuplicateIdInRequest(event_id)
        events = self._events + len(write.events)
        size = self._bytes + sum(len(data) for _name, data in write.events) + \
            sum(len(meta) for meta in write.metadata or () if meta is not None)
        if events > MAX_TRANSACTION_EVENTS:
            raise InvalidArgument("transaction", f"more than {MAX_TRANSACTION_EVENTS} events")
        if size > MAX_TRANSACTION_BYTES:
            raise InvalidArgument("transaction", f"more than {MAX_TRANSACTION_BYTES} bytes"
                                  " of data and metadata")
        self._ids.update(ids)
        self._events, self._bytes = events, size

    def execute(self, conn: Connection) -> bytes:
        """Store the queue all or none; the reply of ``EXEC`` (before durability: the
        connection settles it as any write's)."""
        if self.aborted:
            return EXECABORT
        if not self.writes:
            return resp.EMPTY_ARRAY
        if conn.deferred:
            return conn.defer(self.writes, self._reply)
        results = conn.writer.write(self.writes, flush=False)
        conn.wrote(max(result.end_position for result in results))
        return self._reply(results)

    def _reply(self, results: list[AppendResult]) -> bytes:
        return b"".join([resp.array_header(len(results))]
                        + [reply_of(name, result) for name, result in zip(self.names, results)])
