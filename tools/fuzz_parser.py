"""Coverage-guided fuzzing of the request path with atheris (libFuzzer for Python).

Two targets, each instrumented at the bytecode level so that libFuzzer keeps the
inputs that reach new branches of ``meilies/server/resp.py`` and
``meilies/server/connection.py``:

``parser``
    ``RequestParser`` alone, tens of thousands of inputs a second. The first byte of an
    input seeds where it is cut into reads; the rest is the byte stream. What must hold
    for every input:

    - cut anywhere (up to 6 reads, or reads of 1 to 3 bytes), the same requests come
      out as for the whole stream in one read, in
      the same order, up to what is still pending at its end (a complete inline line
      after an incomplete bulk may wait for the next read); if both are refused
      (``ProtocolError``), the requests before the refusal are the same;
    - every request is a list of ``bytes`` within the parser's limits (elements,
      bulk size, request size);
    - after a refusal the parser holds nothing (issue 10: what it held outlived it);
    - the process' address space stays within ``--vm-growth-mib`` of where it began
      (issue 10: hiredis reserved 16 GB for a 14-byte header).

``connection``
    The real server (engine, group commit, notifier, ``Connection.run``) in this
    process, on a loopback port, with a data directory in a temporary folder. Each
    input goes over a fresh connection in pieces, half-closed, read to the end, while
    a second connection holds a request cut in the middle and a third a subscription
    (the state of issue 10). What must hold: no reply says "internal error", no
    Python traceback is logged, the held connections are still served (the stalled
    request completes and is acknowledged, the subscriber gets its event), a fresh
    PING is answered, and the address space stays bounded.

The corpus is seeded from valid requests (``seeds()``: every command of the
protocol, pipelines, inline commands) written into ``CORPUS`` if it is empty.
Anything that breaks a rule above stops the run with the input saved by libFuzzer
(``crash-<sha1>``); replay it with ``--replay FILE``.

Usage (atheris is not a dependency of MeiliES: ``pip install atheris``)::

    python3 tools/fuzz_parser.py parser --corpus /tmp/fz-parser -- -max_total_time=600
    python3 tools/fuzz_parser.py connection --corpus /tmp/fz-conn -- -max_total_time=600
    python3 tools/fuzz_parser.py parser --replay /tmp/fz-parser --coverage

Arguments after ``--`` go to libFuzzer (``-max_total_time``, ``-jobs``, ``-dict``...).
libFuzzer prints ``cov:`` (edges reached) and ``corp:`` (inputs kept) as it goes;
a run has reached a plateau when ``cov`` stops growing. ``--replay`` runs a corpus
through the target once without atheris and, with ``--coverage``, prints the line
coverage of the two modules (coverage.py).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: The reads an input is cut into, at most (besides the byte-by-byte cut).
MOST_READS = 6
MAX_BULK = 64 * 1024


def command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def seeds() -> list[bytes]:
    """Valid requests, alone and pipelined, as clients send them: the starting corpus."""
    requests = [
        command(b"ping"), command(b"PING", b"hello"), command(b"publish", b"s", b"e", b"x"),
        command(b"publish", b"orders-1", b"created", b'{"id": 1}'),
        command(b"append", b"s", b"any", b"a", b"1", b"b", b"2"),
        command(b"append", b"s", b"none", b"a", b""),
        command(b"append", b"s", b"3", b"a", b"*1234\r\n"),
        command(b"subscribe", b"s"), command(b"subscribe", b"s:0", b"t:2:5"),
        command(b"subscribe", b"$all"), command(b"subscribe", b"$all:0:10"),
        command(b"last-event-number", b"s"), command(b"stream-names"), command(b"info"),
        command(b"command"), command(b"hello", b"2"), command(b"auth", b"pw"),
        command(b"quit"), b"PING\r\n", b"ping hello\r\n", b'publish s e "a b"\r\n',
        b"stream-names\n",
    ]
    out = [request for request in requests]
    out.append(b"".join(requests[:12]))
    out.append(command(b"publish", b"s", b"e", b"x") * 20)
    out.append(command(b"append", b"big", b"any", *[b"e"] * 1200))
    return [bytes([i % 256]) + data for i, data in enumerate(out)]


def cut(data: bytes) -> tuple[bytes, list[bytes]]:
    """Split an input into (stream, reads): its first byte seeds the cut points."""
    if not data:
        return b"", []
    stream = data[1:]
    if data[0] >= 0xF0:  # one in 16 inputs: reads of 1 to 3 bytes (a slow client)
        size = data[0] - 0xEF if data[0] < 0xF3 else 1
        return stream, [stream[i:i + size] for i in range(0, len(stream), size)]
    rng = random.Random(data[0])
    count = min(rng.randrange(1, MOST_READS + 1), len(stream) or 1)
    points = sorted(rng.sample(range(1, len(stream)), count - 1)) if len(stream) > count else []
    edges = [0] + points + [len(stream)]
    return stream, [stream[a:b] for a, b in zip(edges, edges[1:])]


def vm_size_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    raise RuntimeError("no VmSize in /proc/self/status")


class Broken(AssertionError):
    """A rule of the target did not hold for an input (libFuzzer saves the input)."""


# -- the parser target --------------------------------------------------------------------------


class ParserTarget:
    def __init__(self, vm_growth_mib: int) -> None:
        from meilies.server import resp
        self.resp = resp
        self.vm_limit = vm_size_kib() + vm_growth_mib * 1024

    def parse(self, reads: list[bytes]):
        """(requests, refused, parser) for ``reads`` fed one by one."""
        resp = self.resp
        parser = resp.RequestParser(max_bulk=MAX_BULK)
        requests = []
        for read in reads:
            try:
                requests += parser.feed(read)
            except resp.ProtocolError as exc:
                return requests + exc.requests, exc.reason, parser
        return requests, None, parser

    def __call__(self, data: bytes) -> None:
        stream, reads = cut(data)
        whole, whole_refused, _ = self.parse([stream])
        got, refused, parser = self.parse(reads)
        shorter = min(len(got), len(whole))
        if got[:shorter] != whole[:shorter] or (
                refused is not None and whole_refused is not None and got != whole):
            raise Broken(f"cut into {[len(r) for r in reads]}: {got!r} refused {refused!r};"
                         f" whole: {whole!r} refused {whole_refused!r}")
        resp = self.resp
        for request in got:
            if type(request) is not list or not all(type(x) is bytes for x in request):
                raise Broken(f"not a list of bytes: {request!r}")
            if len(request) > resp.MAX_ARRAY_LENGTH:
                raise Broken(f"{len(request)} elements")
            if any(len(x) > MAX_BULK for x in request):
                raise Broken("a bulk over max_bulk")
        if refused is not None and (parser._partial or parser._checked is not None
                                    or parser._inline):
            raise Broken("the parser still holds bytes after a refusal")
        if vm_size_kib() > self.vm_limit:
            raise Broken(f"address space grew to {vm_size_kib()} KiB")


# -- the connection target ----------------------------------------------------------------------


class ConnectionTarget:
    """The real server in this process; each input over a fresh connection."""

    HELD = b"fz-held"
    LIVE = b"fz-live"

    def __init__(self, vm_growth_mib: int) -> None:
        import logging

        import gevent
        from gevent import socket as gsocket

        from meilies.engine import Engine
        from meilies.server.app import Config, Server

        self.gevent, self.gsocket = gevent, gsocket
        self.tracebacks: list[str] = []

        class Remember(logging.Handler):
            def emit(inner, record: logging.LogRecord) -> None:
                if record.exc_info or record.levelno >= logging.ERROR:
                    self.tracebacks.append(inner.format(record))

        logging.getLogger("meilies").addHandler(Remember())
        self.directory = tempfile.TemporaryDirectory(prefix="meilies-fuzz-")
        self.engine = Engine.open(self.directory.name, fsync="no")
        self.server = Server(self.engine, Config(port=0, fsync="no"))
        self.server.start()
        self.port = self.server.port
        self.held_count = 0
        self.live_count = 0
        self._hold()
        self.vm_limit = vm_size_kib() + vm_growth_mib * 1024

    def connect(self):
        sock = self.gsocket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(30)
        return sock

    def read_exactly(self, sock, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise Broken(f"closed after {data!r}")
            data += chunk
        return data

    def _hold(self) -> None:
        """A request stopped in the middle, and a subscriber, held over the inputs."""
        self.request = command(b"publish", self.HELD, b"e", b"*2000 held")
        self.stalled = self.connect()
        self.stalled.sendall(self.request[:17])
        self.subscriber = self.connect()
        self.subscriber.sendall(command(b"subscribe", b"%s:%d" % (self.LIVE, self.live_count)))
        expected = b"*2\r\n+subscribed\r\n+%s\r\n" % self.LIVE
        if self.read_exactly(self.subscriber, len(expected)) != expected:
            raise Broken("no subscription")

    def _check_held(self) -> None:
        """Finish the stalled request, publish to the live stream; hold anew."""
        self.stalled.sendall(self.request[17:])
        if self.read_exactly(self.stalled, 5) != b"+OK\r\n":
            raise Broken("the stalled request was not acknowledged")
        self.held_count += 1
        self.stalled.close()
        publisher = self.connect()
        publisher.sendall(command(b"publish", self.LIVE, b"live", b"%d" % self.live_count))
        if self.read_exactly(publisher, 5) != b"+OK\r\n":
            raise Broken("publish failed")
        data = b"%d" % self.live_count
        frame = b"*5\r\n+event\r\n+%s\r\n:%d\r\n+live\r\n$%d\r\n%s\r\n" % (
            self.LIVE, self.live_count, len(data), data)
        if self.read_exactly(self.subscriber, len(frame)) != frame:
            raise Broken("the subscriber missed an event")
        self.live_count += 1
        publisher.sendall(b"PING\r\n")
        if self.read_exactly(publisher, 7) != b"+PONG\r\n":
            raise Broken("no PONG")
        publisher.close()
        self.subscriber.close()
        self._hold()

    def __call__(self, data: bytes) -> None:
        _stream, reads = cut(data)
        sock = self.connect()
        received = bytearray()
        try:
            try:
                for read in reads:
                    sock.sendall(read)
                sock.shutdown(self.gsocket.SHUT_WR)
            except OSError:
                pass  # closed by the server first (QUIT, a refusal): the replies say why
            try:
                while chunk := sock.recv(1 << 20):
                    received += chunk
            except ConnectionResetError:
                pass
        finally:
            sock.close()
        if b"internal error" in received:
            raise Broken(f"internal error: {bytes(received[-300:])!r}")
        if self.tracebacks:
            raise Broken("logged: " + self.tracebacks[-1])
        self._check_held()
        if vm_size_kib() > self.vm_limit:
            raise Broken(f"address space grew to {vm_size_kib()} KiB")


TARGETS = {"parser": ParserTarget, "connection": ConnectionTarget}
MODULES = ["meilies.server.resp", "meilies.server.connection", "meilies.server.commands",
           "meilies.server.subscription"]


def replay(target, paths: list[Path]) -> int:
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    started = time.monotonic()
    for f in files:
        target(f.read_bytes())
    print(f"replayed {len(files)} inputs in {time.monotonic() - started:.1f}s: all rules held")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--corpus", type=Path, help="corpus directory (seeded if empty)")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these inputs once")
    parser.add_argument("--coverage", action="store_true",
                        help="with --replay: print line coverage of the request path")
    parser.add_argument("--vm-growth-mib", type=int, default=256,
                        help="most address space an input may add (default 256 MiB)")
    args, libfuzzer_args = parser.parse_known_args()
    libfuzzer_args = [a for a in libfuzzer_args if a != "--"]

    if args.replay:
        if args.coverage:
            import coverage
            cov = coverage.Coverage(include=[str(REPO / "meilies/server/*.py")])
            cov.start()
        code = replay(TARGETS[args.target](args.vm_growth_mib), args.replay)
        if args.coverage:
            cov.stop()
            cov.report(include=[str(REPO / "meilies/server/resp.py"),
                                str(REPO / "meilies/server/connection.py")], show_missing=True)
        return code

    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed: pip install atheris")
    with atheris.instrument_imports():
        for module in MODULES:
            __import__(module)
    target = TARGETS[args.target](args.vm_growth_mib)
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"meilies-fuzz-{args.target}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
    print(f"corpus: {corpus} ({len(list(corpus.iterdir()))} inputs)", flush=True)
    atheris.Setup([sys.argv[0], *libfuzzer_args, str(corpus)], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
