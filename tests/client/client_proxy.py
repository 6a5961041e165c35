"""A TCP proxy between a client and the real server that a test can cut, block and
black-hole: network failures on demand, without killing the server.

- ``cut()`` closes every proxied connection (the client reads EOF, as on a restart);
- ``block()`` closes each new connection as soon as it is accepted (``refused`` counts
  them), until ``unblock()``: the server is "down" for the client only;
- ``freeze()`` stops forwarding on the current connections without closing them: the
  client sees silence, as on a network cut.

With ``older_server=True`` it plays a server from before PROTOCOL.md v2: the name of
every ``envelope`` request is changed on its way (same length), so that the server
answers ``-ERR unknown command`` as an older one would, and a client falls back to
what it does with those.
"""

from __future__ import annotations

import socket
import threading


class _Pair:
    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (downstream, upstream)
        self.frozen = False

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
            sock.close()


#: ``envelope`` as a request's first bulk string, and what it becomes (older_server).
ENVELOPE = b"$8\r\nenvelope\r\n"
UNKNOWN = b"$8\r\nenvelopx\r\n"


class Proxy:
    def __init__(self, target_port: int, older_server: bool = False) -> None:
        self.target_port = target_port
        self.older_server = older_server
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.blocked = False
        self.accepted = 0
        self.refused = 0
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked:
                self.refused += 1
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                self.refused += 1
                downstream.close()
                continue
            pair = _Pair(downstream, upstream)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        rewrite = self.older_server and src is pair.sockets[0]
        held = b""
        try:
            while data := src.recv(65536):
                if rewrite:
                    data, held = _hide_envelope(held + data)
                if not pair.frozen:
                    dst.sendall(data)
        except OSError:
            pass  # one side closed: end this direction
        pair.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len([p for p in self._pairs if p.sockets[0].fileno() != -1])

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def block(self) -> None:
        self.blocked = True

    def unblock(self) -> None:
        self.blocked = False

    def freeze(self) -> None:
        with self._lock:
            for pair in self._pairs:
                pair.frozen = True

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut()


def _hide_envelope(data: bytes) -> tuple[bytes, bytes]:
    """``data`` with ENVELOPE renamed, and the tail to hold back because it may be the
    start of one cut by the read (a request never ends there: it is always followed
    by more bytes of the same request)."""
    data = data.replace(ENVELOPE, UNKNOWN)
    for keep in range(min(len(ENVELOPE) - 1, len(data)), 0, -1):
        if ENVELOPE.startswith(data[-keep:]):
            return data[:-keep], data[-keep:]
    return data, b""
