"""Who runs the fdatasync: a helper process, so that the event loop never waits on one.

An fdatasync makes a file durable, whoever wrote its pages; so the server writes
(``pwritev``, on the event loop) and a small helper process syncs, on a descriptor of
the segment sent when the segment changes (``SCM_RIGHTS``: a segment that a roll
closes meanwhile is still the one synced), opened anew so that a writeback error is
reported to the helper and to the server alike. While the helper waits for the disk,
the server goes on serving; its answer wakes the loop like any socket.

Why a process and not a thread, measured on this project's 2-core machine (4
connections publishing at depth 1, 2-second runs of tools/bench_server.py's publish
loop, alternating, within one hour): the fdatasync on the event loop (Redis' way)
served 12,000-15,500 events/s; a thread 10,000-13,000, with the server's CPU up from
65% to 90% (two GIL hand-offs per sync, each a futex round trip between the cores,
cost more than the overlap gains); the helper process 16,900-17,900.

Wire, over a UNIX stream socket pair: the server sends one byte, ``F`` with the
descriptor of the file to sync attached (the helper keeps it for the requests that
follow, and closes the one it had) or ``S`` to sync the file it has; the helper
answers each with a little-endian i32, 0 or the errno of the failed fdatasync (EBADF
if it has no file), in order. The helper ignores SIGINT and
SIGTERM (a Ctrl-C or a service manager reaches the whole process group; the server
decides when to stop) and exits when the server's end of the socket closes, which
also happens when the server dies.

If the helper cannot be started or dies, the group commit syncs on the event loop
itself (commit.py).
"""

from __future__ import annotations

import array
import errno
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from typing import Protocol

FILE = b"F"  # with a descriptor attached: sync this file (and keep it)
REQUEST = b"S"  # sync the file kept
RESULT = struct.Struct("<i")
log = logging.getLogger("meilies.server")
#: What :meth:`Syncer.result` returns when the helper is gone (its answer never comes).
GONE = OSError(errno.EPIPE, "the fdatasync helper process is gone")


class Syncer(Protocol):
    def fileno(self) -> int:
        """Readable when the oldest request's result is there."""

    def request(self, fd: int, file: object) -> None:
        """Ask for an fdatasync of the file behind ``fd``; ``file`` identifies that
        file (a syncer may keep a descriptor of it for the requests that follow)."""

    def result(self) -> OSError | None:
        """The oldest request's outcome: None (synced) or the error; ``GONE`` if the
        syncer died. Raises BlockingIOError when it is not there yet."""

    def close(self) -> None: ...


class SyncProcess:
    """The server's side of the helper process."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # This file, run as a script in isolated mode: it needs nothing but the
            # standard library, and so nothing from the current directory or the
            # environment can stand in for what it imports.
            self.process = subprocess.Popen(
                [sys.executable, "-I", __file__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self._file: object = None  # the file whose descriptor the helper has
        self._answer = b""  # part of an answer read so far

    def fileno(self) -> int:
        return self.sock.fileno()

    def request(self, fd: int, file: object) -> None:
        """Raises OSError if the helper is gone (its end of the socket is closed).

        The helper gets a descriptor of its own open file description (the file
        reopened through /proc), not a copy of ``fd``'s: Linux reports a writeback
        error once per open file description, so with a shared one, whichever of the
        helper's fdatasync and the server's own (a roll's) came first would take the
        error and the other would return success.
        """
        if file is self._file:
            self.sock.send(REQUEST)
            return
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            # Out of descriptors (EMFILE), or no /proc: send the server's own for this
            # request, and try again with the next one.
            log.warning("cannot open a descriptor of its own for the fdatasync helper"
                        " (%s): it shares the server's for now", exc)
            self.sock.sendmsg([FILE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [fd]))])
            self._file = None
            return
        try:
            self.sock.sendmsg([FILE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [own]))])
        finally:
            os.close(own)
        self._file = file

    def result(self) -> OSError | None:
        try:
            data = self.sock.recv(RESULT.size - len(self._answer))
        except ConnectionError:
            return GONE
        if not data:
            return GONE
        answer = self._answer + data
        if len(answer) < RESULT.size:  # the rest of the answer is on its way
            self._answer = answer
            raise BlockingIOError(errno.EAGAIN, "partial answer")
        self._answer = b""
        code = RESULT.unpack(answer)[0]
        return None if code == 0 else OSError(code, os.strerror(code))

    def close(self) -> None:
        """Close our end (the helper exits on it) and reap the helper."""
        self.sock.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve(sock: socket.socket) -> None:
    """The helper's loop: one fdatasync per request, until the server's end closes."""
    kept = -1  # the descriptor of the file to sync
    try:
        while True:
            try:
                data, ancillary, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(4 * 4))
            except ConnectionError:
                return
            if not data:
                return
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            if fds:  # a new file: keep its descriptor, close any other
                if kept >= 0:
                    os.close(kept)
                kept = fds[0]
                for fd in fds[1:]:
                    os.close(fd)
            if kept < 0:
                code = errno.EBADF
            else:
                try:
                    os.fdatasync(kept)
                    code = 0
                except OSError as exc:
                    code = exc.errno or errno.EIO
            try:
                sock.sendall(RESULT.pack(code))
            except ConnectionError:  # the server is gone (killed mid-sync): so are we
                return
    finally:
        if kept >= 0:
            os.close(kept)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -I syncer.py FD  (started by meilies-server)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(socket.socket(fileno=int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
