"""A TCP proxy that loses one reply on purpose: the request reaches the server, which
stores it and answers, and the proxy closes the client's connection instead of
passing the answer on. What a client sees when a server crashes, or a network drops,
between storing a write and its reply arriving."""

from __future__ import annotations

import socket
import threading

#: Seconds of silence after which the server is taken to have answered everything.
QUIET = 0.3


class LossyProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        #: The bytes that mark the request whose reply is lost (e.g. b"EXEC").
        self.lose_reply_to: bytes | None = None
        self.lost = 0
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            pending = threading.Event()  # the marked request went up: lose what comes back
            pair = (downstream, upstream)
            threading.Thread(target=self._requests, args=(pair, pending), daemon=True).start()
            threading.Thread(target=self._replies, args=(pair, pending), daemon=True).start()

    def _requests(self, pair, pending: threading.Event) -> None:
        downstream, upstream = pair
        try:
            while data := downstream.recv(65536):
                marker = self.lose_reply_to
                if marker is not None and marker in data:
                    self.lose_reply_to = None
                    pending.set()
                upstream.sendall(data)
        except OSError:
            pass
        _close(pair)

    def _replies(self, pair, pending: threading.Event) -> None:
        downstream, upstream = pair
        try:
            while data := upstream.recv(65536):
                if pending.is_set():
                    self._drain(upstream)
                    self.lost += 1
                    break  # the server answered: drop it and the connection
                downstream.sendall(data)
        except OSError:
            pass
        _close(pair)

    @staticmethod
    def _drain(upstream: socket.socket) -> None:
        """Read (and drop) the server's replies until it has been quiet for a while: the
        whole of a pipelined transaction has then been answered, so stored."""
        upstream.settimeout(QUIET)
        try:
            while upstream.recv(65536):
                pass
        except OSError:
            pass  # quiet (a timeout): done

    def close(self) -> None:
        self._closed = True
        self.listener.close()


def _close(pair) -> None:
    for sock in pair:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
