"""Every error the client raises, in one place, and the one table that maps a server
error reply to its exception class (as redis-py's ``EXCEPTION_CLASSES``).

A server error reply is ``-<CODE> <message>``; ``CODE`` picks the class::

    -ERR wrong number of arguments for 'publish'            -> ResponseError
    -WRONGEXPECTED stream s is at 3, expected 1             -> WrongExpectedVersion
    -NOAUTH Authentication required.                        -> AuthenticationRequired
    -WRONGPASS invalid password                             -> InvalidPassword
    -DUPLICATEID event id <id> is already stored as s:4     -> DuplicateEventId
    -ERR duplicate event id <id> in request                 -> DuplicateIdInRequest
    -EXECABORT Transaction discarded because of ...         -> TransactionAborted

Callers act on classes and attributes (``exc.actual``), never on message text.
"""

from __future__ import annotations

import builtins
import re


class MeiliesError(Exception):
    """Base class of every error raised by :mod:`meilies.client`."""


# -- the transport -----------------------------------------------------------------------


class ConnectionError(MeiliesError, builtins.ConnectionError):  # noqa: A001 (redis-py's name)
    """The server could not be reached, or the connection broke.

    Also a builtin :class:`ConnectionError` (an :class:`OSError`), so either ``except``
    catches it. When it interrupts a write (``publish``, ``append``), the write may or
    may not have been stored: use ``append`` with an expected version to retry safely.
    """


class TimeoutError(ConnectionError, builtins.TimeoutError):  # noqa: A001
    """The server did not answer within the client's ``timeout``."""


class ProtocolError(MeiliesError):
    """The server sent something this client does not understand (or broke the contract,
    e.g. a gap in a stream's numbers). The connection is closed."""


# -- error replies -----------------------------------------------------------------------


class ResponseError(MeiliesError):
    """The server answered with an error reply; nothing was stored.

    ``code`` is the reply's first word (``ERR``, ``WRONGEXPECTED``, ...); the message
    (``str(exc)``) is the whole reply text as the server sent it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]


class ServerShuttingDown(ResponseError):
    """``-ERR server is shutting down``: the server is stopping; retry after it restarts.

    The only ``ERR`` reply with a class of its own: a subscriber treats it like a dropped
    connection and reconnects.
    """

    MESSAGE = "ERR server is shutting down"


_WRONG_EXPECTED = re.compile(r"WRONGEXPECTED stream (?P<stream>\S+) is at (?P<actual>none|\d+),"
                             r" expected (?P<expected>\S+)\Z")


class WrongExpectedVersion(ResponseError):
    """An ``append`` whose expected version did not match; nothing was stored (in a
    transaction: nothing of the whole transaction).

    ``stream`` is the stream's name, ``actual`` its last event number (``None`` when it
    has no events) and ``expected`` what the append asked for (``"any"``, ``"none"`` or
    a number), parsed from ``-WRONGEXPECTED stream <s> is at <n|none>, expected <e>``.
    """

    stream: str | None
    actual: int | None
    expected: int | str | None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        match = _WRONG_EXPECTED.match(message)
        if match is None:  # a server that words it differently: keep the message
            self.stream = self.actual = self.expected = None
            return
        self.stream = match["stream"]
        self.actual = None if match["actual"] == "none" else int(match["actual"])
        expected = match["expected"]
        self.expected = int(expected) if expected.isdigit() else expected


_DUPLICATE_ID = re.compile(r"DUPLICATEID event id (?P<id>.+) is already stored as"
                           r" (?P<stream>[^\s:]+):(?P<number>\d+)\Z", re.DOTALL)


class DuplicateEventId(ResponseError):
    """An ``append-full`` (or a transaction) reused an event id that is already stored,
    and is not an exact retry of the request that stored it; nothing was stored.

    ``event_id`` is the first such id in request order, ``stream`` and ``number`` where
    the event that has it lives, parsed from ``-DUPLICATEID event id <id> is already
    stored as <stream>:<number>``. (An exact retry is not an error: it answers what the
    first request did, which is what makes retrying with the same ids safe.)
    """

    event_id: str | None
    stream: str | None
    number: int | None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # An id may contain spaces; a stream name may not, and ends the message, so
        # the greedy id group still splits the message at the right place.
        match = _DUPLICATE_ID.match(message)
        if match is None:
            self.event_id = self.stream = self.number = None
            return
        self.event_id, self.stream = match["id"], match["stream"]
        self.number = int(match["number"])


_DUPLICATE_IN_REQUEST = re.compile(r"ERR duplicate event id (?P<id>.+) in request\Z",
                                   re.DOTALL)


class DuplicateIdInRequest(ResponseError):
    """``-ERR duplicate event id <id> in request``: one id given twice in one
    ``append-full`` or one transaction; nothing was stored.

    Not a :class:`DuplicateEventId`: nothing is stored under that id, so code that
    handles "this id already lives at stream:number" must not catch it. It is a bug in
    the request, and retrying cannot help. ``event_id`` is the repeated id.
    """

    PREFIX = "ERR duplicate event id "

    event_id: str | None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        match = _DUPLICATE_IN_REQUEST.match(message)
        self.event_id = None if match is None else match["id"]


class TransactionAborted(ResponseError):
    """``-EXECABORT``: the server refused a queued command, so ``EXEC`` stored nothing.

    :meth:`Client.transaction` raises the queued command's own error instead (more
    useful); this class is what ``EXEC`` itself answered, kept as that error's context.
    """


class AuthenticationError(ResponseError):
    """Base class of the AUTH errors."""


class AuthenticationRequired(AuthenticationError):
    """``-NOAUTH``: the server has ``--requirepass`` and this client gave no password."""


class InvalidPassword(AuthenticationError):
    """``-WRONGPASS``: the password given to the client is wrong."""


#: Error reply code -> exception class, for the commands of the original and the
#: version 1 extensions. Codes not listed in either table give a plain ResponseError.
ERROR_CLASSES: dict[str, type[ResponseError]] = {
    "ERR": ResponseError,
    "WRONGEXPECTED": WrongExpectedVersion,
    "NOAUTH": AuthenticationRequired,
    "WRONGPASS": InvalidPassword,
}

#: The codes of PROTOCOL.md's event-store extensions, version 2 (idempotent appends,
#: transactions). A table of their own only so that ``ERROR_CLASSES`` keeps the exact
#: contents callers (and a test) already rely on; :func:`error_from_reply` reads both.
EVENT_STORE_ERROR_CLASSES: dict[str, type[ResponseError]] = {
    "DUPLICATEID": DuplicateEventId,
    "EXECABORT": TransactionAborted,
}


def error_from_reply(message: str) -> ResponseError:
    """The exception for a server error reply (its text without the leading ``-``)."""
    if message.startswith(ServerShuttingDown.MESSAGE):
        return ServerShuttingDown(message)
    if message.startswith(DuplicateIdInRequest.PREFIX):
        return DuplicateIdInRequest(message)
    code = message.split(" ", 1)[0]
    cls = ERROR_CLASSES.get(code) or EVENT_STORE_ERROR_CLASSES.get(code, ResponseError)
    return cls(message)
