"""Errors of the server, and the one table that maps every error to its wire reply."""

from __future__ import annotations

from ..backends import BackendUnavailable
from ..engine import errors as engine_errors
from . import resp


class CommandError(Exception):
    """A request the server refuses; ``reply`` is the complete RESP error line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reply = resp.error(message)


def unknown_command(name: bytes) -> CommandError:
    return CommandError(f"ERR unknown command '{name.decode('utf-8', 'replace')}'")


def wrong_arity(command: str) -> CommandError:
    return CommandError(f"ERR wrong number of arguments for '{command}'")


NOAUTH = resp.error("NOAUTH Authentication required.")
WRONGPASS = resp.error("WRONGPASS invalid password")


def engine_error_reply(exc: engine_errors.EngineError) -> bytes | None:
    """The reply for an engine error a client caused or must hear of; None if unexpected.

    One table, as redis-py's ``EXCEPTION_CLASSES``: the prefix is the error's code.
    """
    if isinstance(exc, engine_errors.WrongExpectedVersion):
        return resp.error(f"WRONGEXPECTED {exc}")
    if isinstance(exc, engine_errors.DuplicateEventId):
        return resp.error(f"DUPLICATEID {exc}")
    if isinstance(exc, engine_errors.InvalidArgument):
        return resp.error(f"ERR {exc}")
    if isinstance(exc, engine_errors.StorageError):
        return resp.error(f"ERR storage failure, nothing was stored: {exc}")
    if isinstance(exc, BackendUnavailable):
        return resp.error(f"ERR backend unavailable: {exc}")
    if isinstance(exc, engine_errors.EngineClosed):
        return resp.error("ERR server is shutting down")
    return None
