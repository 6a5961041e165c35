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
cost more than the overlap gains); the helper process 16,900-17,900. For a server
that does nothing but write and sync (tools/bench_floor.py) the order is the other
way round, the loop 16,600 and 18,800 against the helper 14,100 and 16,200 in two
runs: the helper pays off
because MeiliES' own Python work per request overlaps the sync of the other clients'
(alternating runs at 14:59: helper 11,900, loop 10,400), and at depth 64 even the
do-nothing server is faster with it (2.86x Redis against 2.10x).

Wire, over a UNIX stream socket pair: the server sends one byte, ``F`` with the
descriptor of the file to sync attached (the helper keeps it for the requests that
follow, and closes the one it had) or ``S`` to sync the file it has; the helper
answers each with a little-endian i32, 0 or the errno of the fdatasync that covered it
(EBADF if it has no file), in order. The server may send requests while one is being
served; the helper serves every request waiting with one fdatasync per file among
them (an ``F`` between requests: the earlier file is synced before it is closed).
The helper ignores SIGINT and
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
        self._answer = b""  # answers read and not yet taken, or part of one

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
        """Reads every answer there is at once; the next calls take them from memory."""
        if len(self._answer) < RESULT.size:
            try:
                data = self.sock.recv(4096)
            except ConnectionError:
                return GONE
            if not data:
                return GONE
            self._answer += data
            if len(self._answer) < RESULT.size:  # the rest of the answer is on its way
                raise BlockingIOError(errno.EAGAIN, "partial answer")
        code = RESULT.unpack_from(self._answer)[0]
        self._answer = self._answer[RESULT.size:]
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
    """The helper's loop, until the server's end closes: wait for a request, take every
    other one already sent, sync once for all of them (the file of each in turn, if a
    roll changed it among them), answer each.

    Taking them together is what keeps the disk busy: requests the server sends while
    a sync runs are all covered by the next one, which starts as soon as the first
    returns, without waiting for the server to read the answer and ask again.
    """
    kept = -1  # the descriptor of the file to sync
    try:
        while True:
            messages = _receive(sock, 0)
            if messages is None:
                return
            while True:  # whatever else is there, without waiting
                more = _receive(sock, socket.MSG_DONTWAIT)
                if not more:
                    break
                messages += more
            codes: list[int] = []  # one per request: the outcome of the sync covering it
            unsynced = 0  # requests at the end of ``codes`` that no sync covered yet
            for kind, fd in messages:
                if kind == FILE:
                    if unsynced:  # the previous file's requests: sync it before closing
                        codes[-unsynced:] = [_sync(kept)] * unsynced
                        unsynced = 0
                    if kept >= 0:
                        os.close(kept)
                    kept = fd
                codes.append(0)
                unsynced += 1
            if unsynced:
                codes[-unsynced:] = [_sync(kept)] * unsynced
            try:
                sock.sendall(b"".join(map(RESULT.pack, codes)))
            except ConnectionError:  # the server is gone (killed mid-sync): so are we
                return
    finally:
        if kept >= 0:
            os.close(kept)


def _receive(sock: socket.socket, flags: int) -> list[tuple[bytes, int]] | None:
    """The requests of one read: (``FILE`` or ``REQUEST``, the descriptor sent with a
    ``FILE``, else -1). None once the server's end is closed; an empty list if
    ``flags`` says not to wait and nothing is there."""
    try:
        data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(4 * 4), flags)
    except BlockingIOError:
        return []
    except ConnectionError:
        return None
    if not data:
        return None
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    fds = list(fds)
    messages = []
    for byte in data:
        if byte == FILE[0]:
            # A read stops at the message that carries descriptors: one per FILE, in
            # order. A FILE without one (never sent so) leaves no file to sync.
            messages.append((FILE, fds.pop(0) if fds else -1))
        else:
            messages.append((REQUEST, -1))
    for fd in fds:  # more descriptors than FILEs: not ours to keep
        os.close(fd)
    return messages


def _sync(fd: int) -> int:
    """fdatasync ``fd``: 0, or the errno it failed with (EBADF without a file)."""
    if fd < 0:
        return errno.EBADF
    try:
        os.fdatasync(fd)
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO


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
