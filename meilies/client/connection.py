"""One TCP connection to a MeiliES server: encode requests, parse replies with hiredis.

Only the standard ``socket`` module is used, looked up at call time, so the same code
runs in threads and under gevent once ``gevent.monkey.patch_all()`` has run.

A :class:`Connection` is not thread-safe: one user at a time (``Client`` holds a lock
around it; a ``Subscription`` owns its own).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence

import hiredis

from .errors import ConnectionError, ProtocolError, TimeoutError, error_from_reply

DEFAULT_HOST = "127.0.0.1"
#: The original MeiliES' port (PROTOCOL.md, "Transport").
DEFAULT_PORT = 6480
#: Seconds to wait for a connection or a reply before giving up.
DEFAULT_TIMEOUT = 10.0

RECV_SIZE = 64 * 1024
#: Arguments at least this long are sent as their own buffer instead of being copied
#: into the joined request (redis-py's ``PythonRespSerializer.pack`` does the same).
BIG_ARGUMENT = 16 * 1024

# hiredis' ``gets()`` answers this when no complete reply is buffered yet. Its default
# (False) could not be told apart from a reply if RESP3 booleans ever came in; an
# object of our own can be.
NOT_ENOUGH_DATA = object()

Arg = bytes | bytearray | memoryview | str | int


def to_bytes(value: Arg) -> bytes | bytearray | memoryview:
    """``str`` as UTF-8, ``int`` as its decimal digits, bytes-likes as they are."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("a bool is not a valid argument")
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    raise TypeError(f"argument must be str, bytes or int, not {type(value).__name__}")


def encode_command(args: Sequence[Arg], out: list) -> None:
    """Append one request (an array of bulk strings) to ``out`` as buffers to send.

    Small arguments are joined into one buffer; big ones stay separate, uncopied.
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = to_bytes(arg)
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if size >= BIG_ARGUMENT:
            parts.append(b"$%d\r\n" % size)
            out.append(b"".join(parts))
            out.append(data)
            parts = [b"\r\n"]
        else:
            parts.append(b"$%d\r\n%s\r\n" % (size, data))
    out.append(b"".join(parts))


class Connection:
    """A connected socket plus a hiredis reader. Construct with :meth:`open`."""

    def __init__(self, sock: socket.socket, host: str, port: int, timeout: float | None) -> None:
        self.sock = sock
        self.host = host
        self.port = port
        self.timeout = timeout
        self.reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
        self._buf = bytearray(RECV_SIZE)
        self.closed = False
        #: True once the server answered ``MULTI`` with ``+OK`` on this connection (it
        #: has PROTOCOL.md v2 transactions); set by ``Client``.
        self.has_transactions = False

    @classmethod
    def open(cls, host: str, port: int, password: str | bytes | None = None,
             timeout: float | None = DEFAULT_TIMEOUT) -> Connection:
        """Connect, and AUTH when a password is given. Raises :class:`ConnectionError`
        (or :class:`InvalidPassword` for a wrong password)."""
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {host}:{port}: {_reason(exc)}") from exc
        if _connected_to_itself(sock):
            sock.close()
            raise ConnectionError(f"cannot connect to {host}:{port}: nothing listens"
                                  " (the socket connected to itself)")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass  # not every socket family has these; they are optimisations
        conn = cls(sock, host, port, timeout)
        if password is not None:
            try:
                conn.call("AUTH", password)
            except BaseException:
                conn.close()
                raise
        return conn

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- sending ----------------------------------------------------------------------------

    def send(self, *commands: Sequence[Arg]) -> None:
        """Send one or more requests in one go (pipelining)."""
        buffers: list = []
        for args in commands:
            encode_command(args, buffers)
        self.send_buffers(buffers)

    def send_buffers(self, buffers: Iterable) -> None:
        try:
            for data in buffers:
                self.sock.sendall(data)
        except OSError as exc:
            self.close()
            raise self._broken(exc) from exc

    # -- receiving --------------------------------------------------------------------------

    def read(self, timeout: float | None | object = NOT_ENOUGH_DATA) -> object:
        """The next reply or pushed event, as hiredis parses it. An error reply is
        returned as ``hiredis.ReplyError`` (not raised): callers decide.

        ``timeout`` defaults to the connection's. On :class:`TimeoutError` nothing is
        lost: what arrived stays buffered, and the connection is still usable.
        """
        reply = self.reader.gets()
        if reply is not NOT_ENOUGH_DATA:
            return reply
        sock = self.sock
        sock.settimeout(self.timeout if timeout is NOT_ENOUGH_DATA else timeout)
        while True:
            try:
                n = sock.recv_into(self._buf)
            except socket.timeout as exc:
                raise TimeoutError(f"no reply from {self.address} in time") from exc
            except OSError as exc:
                self.close()
                raise self._broken(exc) from exc
            if not n:
                self.close()
                raise ConnectionError(f"connection to {self.address} closed by the server")
            try:
                self.reader.feed(self._buf, 0, n)
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.close()
                raise ProtocolError(f"unreadable reply from {self.address}: {exc}") from exc
            if reply is not NOT_ENOUGH_DATA:
                return reply

    def read_reply(self) -> object:
        """The next reply; an error reply is raised as its exception class."""
        reply = self.read()
        if isinstance(reply, hiredis.ReplyError):
            raise error_from_reply(str(reply))
        return reply

    def call(self, *args: Arg) -> object:
        """Send one request and return its reply (raising error replies)."""
        self.send(args)
        return self.read_reply()

    # -- state ------------------------------------------------------------------------------

    def peer_closed(self) -> bool:
        """True if this idle connection can no longer be used: the server closed it (a
        restart), reset it, or sent something nobody asked for. One non-blocking peek."""
        if self.closed:
            return True
        sock = self.sock
        try:
            sock.settimeout(0)
            sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return False  # nothing to read: alive and idle
        except OSError:
            return True
        finally:
            if not self.closed:
                sock.settimeout(self.timeout)
        return True  # EOF (b"") or unexpected bytes: either way unusable

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass  # closing a broken socket can fail; it is closed either way

    def shutdown(self) -> None:
        """Wake a thread blocked reading this connection (it sees EOF). Thread-safe."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed or never connected

    def _broken(self, exc: OSError) -> ConnectionError:
        if isinstance(exc, socket.timeout):
            return TimeoutError(f"no reply from {self.address} in time")
        return ConnectionError(f"connection to {self.address} lost: {_reason(exc)}")


def _connected_to_itself(sock: socket.socket) -> bool:
    """A TCP quirk: on some kernels, connecting to a local port nobody listens on can
    succeed when the kernel picks that same port as the source ("simultaneous open");
    the client would then read its own requests. A reconnect loop aimed at a stopped
    local server is where that can happen, so check: two cheap syscalls per connect."""
    try:
        return sock.getsockname() == sock.getpeername()
    except OSError:
        return False


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
