"""Every error the client raises, in one place, and the one table that maps a server
error reply to its exception class (as redis-py's ``EXCEPTION_CLASSES``).

A server error reply is ``-<CODE> <message>``; ``CODE`` picks the class::

    -ERR wrong number of arguments for 'publish'            -> ResponseError
    -WRONGEXPECTED stream s is at 3, expected 1             -> WrongExpectedVersion
    -NOAUTH Authentication required.                        -> AuthenticationRequired
    -WRONGPASS invalid password                             -> InvalidPassword

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
    """An ``append`` whose expected version did not match; nothing was stored.

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


class AuthenticationError(ResponseError):
    """Base class of the AUTH errors."""


class AuthenticationRequired(AuthenticationError):
    """``-NOAUTH``: the server has ``--requirepass`` and this client gave no password."""


class InvalidPassword(AuthenticationError):
    """``-WRONGPASS``: the password given to the client is wrong."""


#: Error reply code -> exception class. Codes not listed give a plain ResponseError.
ERROR_CLASSES: dict[str, type[ResponseError]] = {
    "ERR": ResponseError,
    "WRONGEXPECTED": WrongExpectedVersion,
    "NOAUTH": AuthenticationRequired,
    "WRONGPASS": InvalidPassword,
}


def error_from_reply(message: str) -> ResponseError:
    """The exception for a server error reply (its text without the leading ``-``)."""
    if message.startswith(ServerShuttingDown.MESSAGE):
        return ServerShuttingDown(message)
    cls = ERROR_CLASSES.get(message.split(" ", 1)[0], ResponseError)
    return cls(message)
