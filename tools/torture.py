#!/usr/bin/env python3
"""Crash torture: the real ``meilies-server --fsync always``, a mixed load, ``kill -9`` at
random moments, and after every crash a check that nothing acknowledged was lost.

One round::

    start the server ........ (sometimes killed during its own start-up first)
    load .................... publishers pipelining publish/append on their own streams,
                              subscribers from 0, from the middle, past the end, live,
                              bounded, and $all; writers (--tx-writers, default 2)
                              pipelining append-full and MULTI/EXEC transactions of 2-4
                              append-full on 2-3 streams, each event with a fresh id,
                              over private streams (exact expected versions) and shared
                              ones (any, or an optimistic guess), plus requests that must
                              be refused (a wrong expected version, a reused id) and
                              exact repeats of answered ones, some sent on two
                              connections at once
    kill -9 ................. at a random moment (a few ms in, mid-load, or idle)
    fsck the crashed dir .... only a torn tail may be wrong with it
    restart and verify ...... every stream read from 0: every acknowledged event there
                              with its number and bytes, numbering contiguous, what was
                              in flight stored whole or not at all, nothing else; $all:0
                              agrees; what every subscriber saw is exactly what is stored;
                              the whole store by ``range $all``: positions and numbers
                              dense, every event verified before unchanged byte for byte
                              (with its timestamp, id and metadata), each writer request
                              stored whole where its reply said (acknowledged), not at
                              all (refused), whole or not at all (reply lost), in the
                              order its connection sent them, no id twice
    retry ................... every writer request whose reply the kill swallowed, sent
                              again with the same ids: the reply must be exactly what
                              the store predicts (the first reply if it was stored, by
                              PROTOCOL.md's idempotency rule), and ``range $all`` must
                              then show exactly what the retries had to store
    stop and fsck ........... SIGTERM (exit 0) or kill -9 of the idle server, then
                              ``meilies-fsck`` must exit 0

Each publisher owns its streams, so the order it sent them is the order they must be
stored in. The model of a stream is what the last verification read: it must survive
every later crash, whether or not it was acknowledged when it was first written. With
writers the model is also the whole store by position (data by digest), read back in
full every round; after the last round it is read once more (ids counted again).

    python3 tools/torture.py --rounds 200 --seed 7
    python3 tools/torture.py --rounds 3 --data-dir /tmp/t --port 7000 --keep
    python3 tools/torture.py --rounds 50 --tx-writers 0     # publishers only

Prints one line per round and a summary; exit status 0 when nothing was lost and
every check passed, 1 on any problem (the data directory and server log are kept
and named), 2 on a usage or setup error. Bounded: ``--max-seconds`` stops early
(the rounds run are reported). All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import hiredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import command  # noqa: E402  (tools/ is not a package)

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
#: Deadline for anything we wait on (a start, a read, a thread, an fsck).
DEADLINE = 120.0
#: Kinds of fsck problem a crashed directory may show (kill -9 mid-write).
CRASH_PROBLEMS = {"torn-tail"}


# -- the wire ------------------------------------------------------------------------------


class Conn:
    """A socket and a hiredis reader: replies as Python values (errors as ReplyError)."""

    def __init__(self, port: int, timeout: float = DEADLINE, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.reader = hiredis.Reader()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self):
        """The next reply; raises ConnectionError at EOF."""
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.reader.feed(chunk)

    def call(self, *args):
        self.send(command(*args))
        return self.read()

    def close(self) -> None:
        self.sock.close()


# -- the server process ----------------------------------------------------------------------


class Server:
    def __init__(self, data_dir: Path, port: int, log_path: Path,
                 extra: list[str] | None = None) -> None:
        self.data_dir, self.port, self.log_path = data_dir, port, log_path
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meilies.cli.server", "--data-dir", str(self.data_dir),
                 "--host", HOST, "--port", str(self.port), "--fsync", "always", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise StartFailed(f"meilies-server exited with {self.proc.returncode}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise StartFailed(f"meilies-server not listening after {DEADLINE}s")
                time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=DEADLINE)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


class StartFailed(Exception):
    pass


def fsck(data_dir: Path) -> tuple[int, dict | None, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "meilies.cli.fsck", str(data_dir), "--json"],
                          capture_output=True, text=True, timeout=DEADLINE * 5, env=env)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    return done.returncode, report, done.stdout + done.stderr


# -- the model -------------------------------------------------------------------------------


@dataclass
class Stream:
    name: bytes
    owner: int
    #: What the last verification read: (event name, data) per number.
    events: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: The owner's send sequence of each event (-1: found in the directory at start).
    seqs: list[int] = field(default_factory=list)


@dataclass
class Request:
    stream: Stream
    events: list[tuple[bytes, bytes]]
    seq: int  # owner's send sequence of the first event


class Publisher(threading.Thread):
    """Pipelines publish/append requests on the streams it owns until its budget is
    spent or the server dies. ``requests``: what it sent, in order; ``acked``: how many
    of them were answered as expected."""

    def __init__(self, index: int, port: int, streams: list[Stream], budget: int,
                 rng: random.Random, next_seq: int, problems: list[str]) -> None:
        super().__init__(daemon=True, name=f"publisher-{index}")
        self.index, self.port, self.streams, self.budget = index, port, streams, budget
        self.rng, self.seq, self.problems = rng, next_seq, problems
        self.requests: list[Request] = []
        self.acked = 0
        self.acked_events = 0
        self.wrong_expected = 0
        self.depth = rng.choice([1, 2, 8, 32, 64, 128])
        self.done = threading.Event()

    def run(self) -> None:
        try:
            conn = Conn(self.port)
        except OSError:
            self.done.set()
            return
        rng = self.rng
        next_number = {s.name: len(s.events) for s in self.streams}
        try:
            sent_events = 0
            while sent_events < self.budget:
                batch: list[tuple[Request | None, object]] = []
                wire = []
                for _ in range(self.depth):
                    stream = rng.choice(self.streams)
                    n = next_number[stream.name]
                    roll = rng.random()
                    if roll < 0.05 and n > 0:  # a wrong expected version: refused, not stored
                        wrong = rng.choice(["none", str(n - 1 + rng.randint(1, 3)),
                                            str(max(n - 2, 0)) if n > 1 else "none"])
                        wire.append(command("append", stream.name, wrong, "never", "x"))
                        batch.append((None, (stream.name, n)))
                        continue
                    count = 1 if roll < 0.7 else rng.randint(1, 6)
                    events = [(event_name(rng), payload(rng)) for _ in range(count)]
                    if roll < 0.7:
                        wire.append(command("publish", stream.name, *events[0]))
                        expect = b"OK"
                    else:
                        expected = "any" if roll > 0.93 else ("none" if n == 0 else str(n - 1))
                        wire.append(command("append", stream.name, expected,
                                            *[x for e in events for x in e]))
                        expect = n + count - 1
                    request = Request(stream, events, self.seq)
                    self.seq += count
                    next_number[stream.name] = n + count
                    sent_events += count
                    batch.append((request, expect))
                for request, _ in batch:
                    if request is not None:
                        self.requests.append(request)
                conn.send(b"".join(wire))
                for request, expect in batch:
                    reply = conn.read()
                    if request is None:
                        name, n = expect
                        if not (isinstance(reply, hiredis.ReplyError)
                                and str(reply).startswith(f"WRONGEXPECTED stream {name.decode()}"
                                                          f" is at {n - 1}, expected")):
                            self.problems.append(f"publisher {self.index}: a wrong expected"
                                                 f" version on {name!r} at {n - 1} got {reply!r}")
                            return
                        self.wrong_expected += 1
                        continue
                    if reply != expect:
                        self.problems.append(f"publisher {self.index}: expected {expect!r} for"
                                             f" a request on {request.stream.name!r}, got"
                                             f" {reply!r}")
                        return
                    self.acked += 1
                    self.acked_events += len(request.events)
        except (OSError, ConnectionError):
            pass  # the server was killed
        finally:
            conn.close()
            self.done.set()


class Subscriber(threading.Thread):
    """Subscribes with one spec and records every event until the server dies."""

    def __init__(self, port: int, spec: bytes, rcvbuf: int | None) -> None:
        super().__init__(daemon=True, name=f"subscriber {spec.decode()}")
        self.spec = spec
        self.seen: list[tuple[bytes, int, bytes, bytes]] = []
        self.error: str | None = None
        try:
            self.conn = Conn(port, rcvbuf=rcvbuf)
            self.conn.send(command("subscribe", spec))
        except OSError:
            self.conn = None

    def run(self) -> None:
        if self.conn is None:
            return
        try:
            first = self.conn.read()
            label = self.spec.split(b":")[0]
            if first != [b"subscribed", label]:
                self.error = f"subscribe {self.spec!r} answered {first!r}"
                return
            while True:
                frame = self.conn.read()
                if not (isinstance(frame, list) and len(frame) == 5 and frame[0] == b"event"):
                    self.error = f"subscription {self.spec!r} sent {frame!r}"
                    return
                self.seen.append((frame[1], frame[2], frame[3], frame[4]))
        except (OSError, ConnectionError):
            pass
        finally:
            self.conn.close()


def event_name(rng: random.Random) -> bytes:
    return rng.choice([b"e", b"created", b"moved", "\u00e9v\u00e9nement".encode(),
                       b"n%d" % rng.randrange(1000), b"$-1", b"*5"])


def payload(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([b"", b"\r\n", b"\x00", b"*5\r\n+event\r\n", b"$-1\r\n"])
    if roll < 0.65:
        return rng.randbytes(rng.randrange(1, 64))
    if roll < 0.95:
        return rng.randbytes(rng.randrange(64, 1024))
    if roll < 0.995:
        return rng.randbytes(rng.randrange(1024, 16 * 1024))
    return rng.randbytes(rng.randrange(64 * 1024, 256 * 1024))


# -- transactions and idempotent retries (--tx-writers) -----------------------------------
#
# Writers send ``append-full`` requests and ``MULTI``/``EXEC`` transactions of 2-3 of them,
# every event with a fresh id, over streams that overlap: each writer has private streams
# (exact expected versions, so it always knows their numbers) and all share a few more
# (``any``, or an optimistic guess that may be refused). Every request whose reply the
# kill swallows is retried after the restart, with the same ids, and must get exactly the
# reply the store state predicts (its first reply if it was stored).

#: Kinds of writer request.
NEW = "new"  # expected to be stored (private streams exact, shared ones ``any``)
OPTIMISTIC = "optimistic"  # a guessed expected version on a shared stream: stored or refused
WRONG_EXPECTED = "wrong-expected"  # a wrong expected version on a private stream: refused
DUPLICATE_ID = "duplicate-id"  # reuses a stored id with other data: refused
REPLAY = "replay"  # an exact copy of a request answered earlier: its first reply again
#: What became of a request.
ACKED, REFUSED, LOST = "acknowledged", "refused", "lost"
#: Shared streams of the writers (each writer also has PRIVATE_STREAMS of its own).
SHARED_STREAMS = 5
PRIVATE_STREAMS = 2
TX_PREFIX = b"tort-tx-"
#: Problems told per writer and round (a cut-back log would make one per request).
MAX_UNIT_PROBLEMS = 5


class UnexpectedReply(Exception):
    pass


@dataclass(frozen=True)
class TxEvent:
    id: bytes
    name: bytes
    metadata: bytes  # b"": none (stored as nil)
    data: bytes


@dataclass
class TxWrite:
    stream: bytes
    expected: str  # "any", "none" or a number
    events: list[TxEvent]


@dataclass(eq=False)
class Unit:
    """One request of a writer: an ``append-full``, or ``MULTI``, its ``append-full``
    requests and ``EXEC``."""

    writer: int
    seq: int
    kind: str
    tx: bool
    writes: list[TxWrite]
    #: A probe's error (the text after "-"); a replay's original Unit.
    expect: object = None
    #: The reused event of a DUPLICATE_ID probe (an id stored before).
    reused: TxEvent | None = None
    reply: object = None
    state: str = LOST
    retried: bool = False
    #: The requests pipelined with it in one send (itself included), for diagnostics.
    batch: list[Unit] = field(default_factory=list, repr=False)

    def wire(self) -> bytes:
        parts = [command("append-full", w.stream, w.expected,
                         *[x for e in w.events for x in (e.id, e.name, e.metadata, e.data)])
                 for w in self.writes]
        if self.tx:
            return command("MULTI") + b"".join(parts) + command("EXEC")
        return parts[0]

    def own_events(self) -> list[tuple[TxWrite, int, TxEvent]]:
        """The events whose ids this request brings (a replay brings none, a duplicate-id
        probe all but the reused one)."""
        if self.kind == REPLAY:
            return []
        return [(w, k, e) for w in self.writes for k, e in enumerate(w.events)
                if e is not self.reused]

    def describe(self) -> str:
        what = (f"transaction of {len(self.writes)} append-full"
                if self.tx else "append-full")
        streams = ", ".join(f"{w.stream.decode()} expected {w.expected} x{len(w.events)}"
                            for w in self.writes)
        first = self.writes[0].events[0].id.decode()
        return (f"writer {self.writer} request {self.seq} ({self.kind} {what}: {streams};"
                f" first id {first})")


def exact(last: int | None) -> str:
    """The expected version that matches a stream whose last number is ``last``."""
    return "none" if last is None else str(last)


def read_unit_reply(conn: Conn, unit: Unit):
    """The reply to ``unit`` (EXEC's, for a transaction); raises ConnectionError when
    the server is gone, UnexpectedReply when MULTI or a queued write is not accepted."""
    if unit.tx:
        first = conn.read()
        if first != b"OK":
            raise UnexpectedReply(f"{unit.describe()}: MULTI answered {first!r}")
        for write in unit.writes:
            queued = conn.read()
            if queued != b"QUEUED":
                raise UnexpectedReply(f"{unit.describe()}: append-full on"
                                      f" {write.stream!r} answered {queued!r}, not QUEUED")
    return conn.read()


def reply_pairs(unit: Unit, reply) -> list[list[int]] | None:
    """A success reply as one ``[last number, last position]`` per write, or None when
    it does not have that shape."""
    pairs = reply if unit.tx else [reply]
    if not (isinstance(pairs, list) and len(pairs) == len(unit.writes)):
        return None
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, int) and x >= 0 for x in pair)):
            return None
    return pairs


def stored_reply(unit: Unit, found: list[list]) -> tuple[object, str | None]:
    """The reply ``unit`` had, from its stored events (``found``: the full frames of
    its events in request order), or what is wrong with how they are stored: its
    events in the wrong stream or with other bytes, positions not contiguous in queue
    order, numbers not consecutive, an expected version not honoured."""
    position = found[0][5]
    in_unit: dict[bytes, int] = {}
    pairs = []
    i = 0
    for write in unit.writes:
        first = found[i][2]
        for k, event in enumerate(write.events):
            raw = found[i]
            if (raw[1], raw[3], raw[4], raw[7], raw[8]) != (
                    write.stream, event.name, event.data, event.id, event.metadata or None):
                return None, (f"id {event.id!r} is stored as {raw[1]!r} {raw[2]} with other"
                              " bytes, name or metadata")
            if raw[5] != position:
                return None, f"id {event.id!r} at position {raw[5]}, not {position}"
            if raw[2] != first + k:
                return None, f"id {event.id!r} numbered {raw[2]}, not {first + k}"
            position += 1
            i += 1
        stream = write.stream
        if stream in in_unit:
            if first != in_unit[stream] + 1:
                return None, f"{stream!r} numbered from {first}, after {in_unit[stream]}"
        elif write.expected != "any" and first != (
                0 if write.expected == "none" else int(write.expected) + 1):
            return None, f"{stream!r} numbered from {first} with expected {write.expected}"
        in_unit[stream] = first + len(write.events) - 1
        pairs.append([in_unit[stream], position - 1])
    return (pairs if unit.tx else pairs[0]), None


WRONG_EXPECTED_REPLY = re.compile(
    r"WRONGEXPECTED stream (\S+) is at (none|\d+), expected (none|\d+)")


class TxWriter(threading.Thread):
    """Pipelines append-full requests and transactions until its budget is spent or the
    server dies; ``units``: what it sent, in order, each with its fate. An optimistic
    request ends a pipelined batch (what follows depends on its answer). Sometimes the
    first request of a batch is also sent on a second connection at once (a client
    retrying while the first try is in flight): both must get the same reply."""

    def __init__(self, index: int, port: int, private: list[bytes], shared: list[bytes],
                 known: dict[bytes, int | None], stored_ids: list[tuple[bytes, bytes, int]],
                 budget: int, rng: random.Random, token: bytes, problems: list[str]) -> None:
        """``token``: unique to the run and round, so that every id is new."""
        super().__init__(daemon=True, name=f"tx-writer-{index}")
        self.index, self.port, self.budget, self.rng = index, port, budget, rng
        self.private, self.shared, self.token, self.problems = private, shared, token, problems
        #: Last number of each stream as this writer's replies told it (exact for private
        #: streams; for shared ones, a lower bound).
        self.committed = dict(known)
        #: Ids known to be stored, with where: (id, stream, number), for duplicate probes.
        self.stored_ids = list(stored_ids)
        self.units: list[Unit] = []
        self.acked_units: list[Unit] = []
        self.last_position = -1
        self.counter = 0
        self.twins = 0
        self.depth = rng.choice([1, 2, 4, 16])
        self.done = threading.Event()

    def run(self) -> None:
        try:
            conn = Conn(self.port)
        except OSError:
            self.done.set()
            return
        try:
            twin = Conn(self.port)
        except OSError:
            conn.close()
            self.done.set()
            return
        rng = self.rng
        try:
            made = 0
            while made < self.budget:
                tentative = {s: self.committed.get(s) for s in self.private}
                batch: list[Unit] = []
                while len(batch) < self.depth and made < self.budget:
                    unit = self.make_unit(len(self.units) + len(batch), tentative)
                    batch.append(unit)
                    made += 1
                    if unit.kind == OPTIMISTIC:
                        break
                self.units.extend(batch)
                for unit in batch:
                    unit.batch = batch
                doubled = batch[0] if batch[0].kind == NEW and rng.random() < 0.05 else None
                conn.send(b"".join(unit.wire() for unit in batch))
                if doubled is not None:
                    self.twins += 1
                    twin.send(doubled.wire())
                    if not self.settle(doubled, read_unit_reply(twin, doubled)):
                        return
                for unit in batch:
                    reply = read_unit_reply(conn, unit)
                    if unit is doubled:
                        if reply != unit.reply:
                            self.problems.append(f"{unit.describe()}: sent on two connections"
                                                 f" at once, answered {unit.reply!r} and"
                                                 f" {reply!r}")
                            return
                        continue
                    if not self.settle(unit, reply):
                        return
        except (OSError, ConnectionError):
            pass  # the server was killed
        except UnexpectedReply as exc:
            self.problems.append(str(exc))
        finally:
            conn.close()
            twin.close()
            self.done.set()

    # -- making requests ---------------------------------------------------------------

    def event(self) -> TxEvent:
        rng = self.rng
        self.counter += 1
        event_id = b"%s-w%d-%d" % (self.token, self.index, self.counter)
        roll = rng.random()
        if roll < 0.4:
            metadata = b""
        elif roll < 0.8:
            metadata = b'{"writer":%d,"n":%d}' % (self.index, self.counter)
        else:
            metadata = (rng.choice([b"\r\n", b"$-1\r\n", b"\x00"])
                        + rng.randbytes(rng.randrange(300)))
        return TxEvent(event_id, event_name(rng), metadata, payload(rng))

    def events(self, most: int) -> list[TxEvent]:
        return [self.event() for _ in range(self.rng.randint(1, most))]

    def make_unit(self, seq: int, tentative: dict[bytes, int | None]) -> Unit:
        """The next request. ``tentative``: each private stream's last number once the
        requests before it in the batch are stored (updated for this one)."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.06 and self.acked_units:
            original = rng.choice(self.acked_units)
            return Unit(self.index, seq, REPLAY, original.tx, original.writes, expect=original)
        if roll < 0.10:
            return self.wrong_expected_probe(seq, tentative)
        if roll < 0.13 and self.stored_ids:
            return self.duplicate_id_probe(seq, tentative)
        tx = roll < 0.6
        optimistic = rng.random() < 0.15
        pool = self.private + self.shared
        if tx:
            streams = rng.sample(pool, rng.choice([2, 2, 3]))
            if not optimistic and rng.random() < 0.15:
                streams.insert(rng.randrange(len(streams) + 1), rng.choice(streams))
        else:
            streams = [rng.choice(pool)]
        local = dict(tentative)
        writes = []
        guessed = False
        for stream in streams:
            events = self.events(3 if tx else 4)
            if stream in local:
                expected = exact(local[stream])
                local[stream] = (-1 if local[stream] is None else local[stream]) + len(events)
            elif optimistic:
                expected = exact(self.committed.get(stream))
                guessed = True
            else:
                expected = "any"
            writes.append(TxWrite(stream, expected, events))
        if guessed:
            return Unit(self.index, seq, OPTIMISTIC, tx, writes)
        tentative.update(local)
        return Unit(self.index, seq, NEW, tx, writes)

    def valid_prefix(self, local: dict[bytes, int | None]) -> TxWrite:
        """A write that passes, for a probe's transaction to hold before the bad one."""
        stream = self.rng.choice(self.private + self.shared)
        events = self.events(2)
        if stream in local:
            expected = exact(local[stream])
            local[stream] = (-1 if local[stream] is None else local[stream]) + len(events)
        else:
            expected = "any"
        return TxWrite(stream, expected, events)

    def wrong_expected_probe(self, seq: int, tentative: dict[bytes, int | None]) -> Unit:
        rng = self.rng
        local = dict(tentative)
        tx = rng.random() < 0.5
        writes = [self.valid_prefix(local)] if tx else []
        stream = rng.choice(self.private)
        at = local[stream]
        if at is None:
            wrong = str(rng.randrange(3))
        else:
            wrong = rng.choice(["none", str(at + rng.randint(1, 3))]
                               + ([str(rng.randrange(at))] if at > 0 else []))
        writes.append(TxWrite(stream, wrong, self.events(3)))
        return Unit(self.index, seq, WRONG_EXPECTED, tx, writes,
                    expect=f"WRONGEXPECTED stream {stream.decode()} is at {exact(at)},"
                           f" expected {wrong}")

    def duplicate_id_probe(self, seq: int, tentative: dict[bytes, int | None]) -> Unit:
        rng = self.rng
        local = dict(tentative)
        tx = rng.random() < 0.5
        writes = [self.valid_prefix(local)] if tx else []
        reused_id, where, number = rng.choice(self.stored_ids)
        reused = TxEvent(reused_id, b"dup", b"", b"not the stored data %d" % rng.randrange(1000))
        events = self.events(2)
        events.insert(rng.randint(1, len(events)), reused)  # after a fresh id: first found
        stream = rng.choice(self.private + self.shared)
        writes.append(TxWrite(stream, "any", events))
        return Unit(self.index, seq, DUPLICATE_ID, tx, writes, reused=reused,
                    expect=f"DUPLICATEID event id {reused_id.decode()} is already stored as"
                           f" {where.decode()}:{number}")

    # -- checking replies --------------------------------------------------------------

    def settle(self, unit: Unit, reply) -> bool:
        """Record ``unit``'s reply; False (and a problem noted) when it is wrong."""
        error = str(reply) if isinstance(reply, hiredis.ReplyError) else None
        if unit.kind in (WRONG_EXPECTED, DUPLICATE_ID):
            if error != unit.expect:
                self.problems.append(f"{unit.describe()}: must be refused with"
                                     f" -{unit.expect}, got {reply!r}")
                return False
            unit.reply, unit.state = reply, REFUSED
            return True
        if unit.kind == REPLAY:
            if reply != unit.expect.reply:
                self.problems.append(f"{unit.describe()}: an exact retry of request"
                                     f" {unit.expect.seq} (answered {unit.expect.reply!r})"
                                     f" got {reply!r}")
                return False
            unit.reply, unit.state = reply, ACKED
            return True
        if error is not None and unit.kind == OPTIMISTIC:
            match = WRONG_EXPECTED_REPLY.fullmatch(error)
            guessed = {w.stream.decode("utf-8", "replace"): w.expected
                       for w in unit.writes if w.stream in self.shared and w.expected != "any"}
            if match and guessed.get(match[1]) == match[3] and match[2] != match[3]:
                stream = match[1].encode()
                self.committed[stream] = None if match[2] == "none" else int(match[2])
                unit.reply, unit.state = reply, REFUSED
                return True
        wrong = self.check_success(unit, reply)
        if wrong:
            self.problems.append(f"{unit.describe()}: {wrong} (reply {reply!r})")
            return False
        unit.reply, unit.state = reply, ACKED
        self.acked_units.append(unit)
        for write, (last, position) in zip(unit.writes, reply_pairs(unit, reply)):
            self.committed[write.stream] = last
            first = last - len(write.events) + 1
            self.stored_ids.extend((e.id, write.stream, first + k)
                                   for k, e in enumerate(write.events))
            self.last_position = max(self.last_position, position)
        return True

    def check_success(self, unit: Unit, reply) -> str | None:
        pairs = reply_pairs(unit, reply)
        if pairs is None:
            return "not a success reply"
        position = pairs[0][1] - len(unit.writes[0].events)
        if position < self.last_position:
            return (f"stored at position {position + 1}, not after this writer's last"
                    f" acknowledged position {self.last_position}")
        in_unit: dict[bytes, int] = {}
        for write, (last, end) in zip(unit.writes, pairs):
            count = len(write.events)
            position += count
            if end != position:
                return "positions are not contiguous in queue order"
            first = last - count + 1
            stream = write.stream
            if stream in in_unit:
                if first != in_unit[stream] + 1:
                    return f"{stream!r} numbers do not follow the request's write before"
            elif write.expected == "any":
                seen = self.committed.get(stream)
                if first <= (-1 if seen is None else seen):
                    return f"{stream!r} numbered {first}, already at {seen} before"
            elif first != (0 if write.expected == "none" else int(write.expected) + 1):
                return f"{stream!r} numbered from {first} with expected {write.expected}"
            in_unit[stream] = last
        return None


# -- reading back ------------------------------------------------------------------------------


def read_everything(port: int) -> tuple[dict[bytes, list[tuple[bytes, bytes]]], list[str]]:
    """Every stream's events from 0, each read by a bounded subscription; problems found."""
    problems: list[str] = []
    conn = Conn(port)
    try:
        reply = conn.call("stream-names")
        names = reply[1:]
        counts = {}
        for name in names:
            last = conn.call("last-event-number", name)
            counts[name] = 0 if last[2] is None else last[2] + 1
        streams: dict[bytes, list[tuple[bytes, bytes]]] = {name: [] for name in names}
        specs = [b"%s:0:%d" % (name, n) for name, n in counts.items() if n]
        if specs:
            conn.send(command("subscribe", *specs))
            for name in [n for n in names if counts[n]]:
                confirmation = conn.read()
                if confirmation != [b"subscribed", name]:
                    problems.append(f"subscribe {name!r}:0 answered {confirmation!r}")
            remaining = sum(counts.values())
            while remaining:
                frame = conn.read()
                _kind, stream, number, name, data = frame
                events = streams[stream]
                if number != len(events):
                    problems.append(f"stream {stream!r}: event {number} came after"
                                    f" {len(events) - 1} (numbering not contiguous)")
                    return streams, problems
                events.append((name, data))
                remaining -= 1
        return streams, problems
    finally:
        conn.close()


def read_all_stream(port: int, total: int) -> list[tuple[bytes, int, bytes, bytes]]:
    """The first ``total`` events of ``$all:0``."""
    conn = Conn(port)
    try:
        conn.send(command("subscribe", "$all:0"))
        assert conn.read() == [b"subscribed", b"$all"]
        out = []
        while len(out) < total:
            frame = conn.read()
            out.append((frame[1], frame[2], frame[3], frame[4]))
        return out
    finally:
        conn.close()


# -- the whole store, by position (--tx-writers) --------------------------------------------


class Frame(NamedTuple):
    """A full frame as the model keeps it: the data as a digest."""

    stream: bytes
    number: int
    name: bytes
    digest: bytes
    position: int
    timestamp: int
    id: bytes | None
    metadata: bytes | None


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def frame_of(raw: list) -> Frame:
    _kind, stream, number, name, data, position, timestamp, event_id, metadata = raw
    return Frame(stream, number, name, digest(data), position, timestamp, event_id, metadata)


def range_pages(port: int, start: int, page: int = 2000):
    """``range $all <start> +`` in pages of full frames, until the end."""
    conn = Conn(port)
    try:
        while True:
            reply = conn.call("range", "$all", str(start), "+", "COUNT", str(page))
            if not isinstance(reply, list):
                raise UnexpectedReply(f"range $all {start} + COUNT {page} answered {reply!r}")
            for raw in reply:
                if not (isinstance(raw, list) and len(raw) == 9 and raw[0] == b"event"
                        and isinstance(raw[5], int)):
                    raise UnexpectedReply(f"range $all {start} + sent {raw!r}")
            if reply:
                yield reply
            if len(reply) < page:
                return
            start = reply[-1][5] + 1
    finally:
        conn.close()


class StoreModel:
    """Every stored event by position, as the last verification read it: each later
    read must find it again byte for byte (data by digest), with its number, position,
    timestamp, id and metadata. ``ids``: id -> position; ``last``: stream -> last number."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.ids: dict[bytes, int] = {}
        self.last: dict[bytes, int] = {}

    def scan(self, port: int, problems: list[str], since_ms: int | None = None) -> list[list]:
        """Read the whole store with ``range $all`` and check it against the model:
        positions dense from 0, what the model holds unchanged, each new event numbered
        next in its stream, no id twice (counted over everything read), timestamps of
        new events no older than ``since_ms``. Adds the new events to the model; returns
        them as read (with their data)."""
        known = len(self.frames)
        new: list[list] = []
        at = 0
        changed = 0
        for page in range_pages(port, 0):
            for raw in page:
                position = raw[5]
                if position != at:
                    problems.append(f"range $all: position {position} after {at - 1}"
                                    " (positions not dense)")
                    return new
                at += 1
                if position < known:
                    if frame_of(raw) != self.frames[position]:
                        changed += 1
                        if changed <= 3:
                            problems.append(f"range $all: the event at position {position}"
                                            f" was {self.frames[position]}, now"
                                            f" {frame_of(raw)} (LOSS)")
                    continue
                self.add(raw, problems, since_ms)
                new.append(raw)
        if changed > 3:
            problems.append(f"range $all: {changed} verified events changed (LOSS)")
        if at < known:
            problems.append(f"range $all: {at} events stored, {known} verified before (LOSS)")
        return new

    def scan_tail(self, port: int, problems: list[str], since_ms: int | None = None
                  ) -> list[list]:
        """The events stored after the model's last, added to it (checked as in scan)."""
        new: list[list] = []
        for page in range_pages(port, len(self.frames)):
            for raw in page:
                if raw[5] != len(self.frames):
                    problems.append(f"range $all: position {raw[5]} after"
                                    f" {len(self.frames) - 1} (positions not dense)")
                    return new
                self.add(raw, problems, since_ms)
                new.append(raw)
        return new

    def add(self, raw: list, problems: list[str], since_ms: int | None) -> None:
        frame = frame_of(raw)
        stream, number, event_id = frame.stream, frame.number, frame.id
        last = self.last.get(stream, -1)
        if number != last + 1:
            problems.append(f"range $all: {stream!r} event {number} at position"
                            f" {frame.position} after {last} (numbering not dense)")
        self.last[stream] = max(last, number)
        if event_id is not None:
            if event_id in self.ids:
                problems.append(f"event id {event_id!r} stored twice: positions"
                                f" {self.ids[event_id]} and {frame.position} (DUPLICATE)")
            else:
                self.ids[event_id] = frame.position
        if since_ms is not None and not since_ms <= frame.timestamp <= time.time() * 1000 + 5000:
            problems.append(f"range $all: position {frame.position} has timestamp"
                            f" {frame.timestamp}, not in this round")
        self.frames.append(frame)


class Overlay:
    """The store as it is during the retries: the model plus what the retries stored."""

    def __init__(self, model: StoreModel) -> None:
        self.model = model
        self.frames: list[Frame] = []
        self.ids: dict[bytes, Frame] = {}
        self.last: dict[bytes, int] = {}

    def find(self, event_id: bytes) -> Frame | None:
        if event_id in self.ids:
            return self.ids[event_id]
        position = self.model.ids.get(event_id)
        return None if position is None else self.model.frames[position]

    def last_number(self, stream: bytes) -> int | None:
        last = self.last.get(stream, self.model.last.get(stream))
        return last

    def predict(self, unit: Unit) -> tuple[object, list[Frame]]:
        """What ``unit`` must get if sent now (its reply, or the error text) and the
        events it must store (timestamps left 0): PROTOCOL.md's idempotency rule first,
        then each write's expected version as if the ones before it were applied."""
        numbers: dict[bytes, int | None] = {}
        position = len(self.model.frames) + len(self.frames)
        replies: list[list[int]] = []
        new: list[Frame] = []
        for write in unit.writes:
            found = [self.find(e.id) for e in write.events]
            if any(found):
                first = found[0]
                if first is not None and all(
                        f is not None and f.stream == write.stream
                        and f.number == first.number + k and f.name == e.name
                        and f.digest == digest(e.data) and f.metadata == (e.metadata or None)
                        for k, (f, e) in enumerate(zip(found, write.events))):
                    replies.append([found[-1].number, found[-1].position])
                    continue
                k, f = next((k, f) for k, f in enumerate(found) if f is not None)
                return (f"DUPLICATEID event id {write.events[k].id.decode()} is already"
                        f" stored as {f.stream.decode()}:{f.number}"), []
            stream = write.stream
            last = numbers[stream] if stream in numbers else self.last_number(stream)
            if write.expected != "any" and write.expected != exact(last):
                return (f"WRONGEXPECTED stream {stream.decode()} is at {exact(last)},"
                        f" expected {write.expected}"), []
            first = 0 if last is None else last + 1
            for k, e in enumerate(write.events):
                new.append(Frame(stream, first + k, e.name, digest(e.data), position, 0,
                                 e.id, e.metadata or None))
                position += 1
            numbers[stream] = first + len(write.events) - 1
            replies.append([numbers[stream], position - 1])
        return (replies if unit.tx else replies[0]), new

    def apply(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.frames.append(frame)
            self.ids[frame.id] = frame
            self.last[frame.stream] = frame.number


# -- the torture -------------------------------------------------------------------------------


@dataclass
class Totals:
    rounds: int = 0
    acked_events: int = 0
    acked_requests: int = 0
    verified: int = 0  # acknowledged events found intact right after their crash
    rechecked: int = 0  # events compared in later rounds (each round reads everything)
    inflight_stored: int = 0
    inflight_lost: int = 0
    wrong_expected: int = 0
    subscribers: int = 0
    subscriber_events: int = 0
    startup_kills: int = 0
    idle_kills: int = 0
    torn_tails: int = 0
    fsck_runs: int = 0
    # --tx-writers: requests (units) and events of the writers
    tx_acked: int = 0  # transactions acknowledged
    tx_writes: int = 0  # their append-full requests
    tx_events: int = 0
    tx_verified: int = 0  # ... found stored whole where their replies said
    single_acked: int = 0  # append-full requests acknowledged (not in a transaction)
    single_events: int = 0
    single_verified: int = 0
    optimistic_refused: int = 0  # guessed expected versions refused
    probes_refused: int = 0  # wrong expected versions and reused ids refused as predicted
    replays: int = 0  # exact retries answered with their first reply during the load
    twins: int = 0  # requests sent on two connections at once
    lost: int = 0  # requests whose reply the kill swallowed
    lost_stored: int = 0  # ... found stored whole after the restart
    lost_partial: int = 0  # ... found stored in part (a problem)
    retry_first_reply: int = 0  # retries answered with the first reply (stored before)
    retry_stored: int = 0  # retries stored now
    retry_refused: int = 0  # retries refused as the store state predicts
    ids: int = 0  # event ids stored (each once)
    problems: list[str] = field(default_factory=list)


class Torture:
    def __init__(self, args: argparse.Namespace, data_dir: Path, work_dir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.data_dir = data_dir
        extra = ["--backend", "postgres", "--postgres-dsn", args.postgres_dsn] \
            if args.postgres_dsn else []
        self.server = Server(data_dir, args.port, work_dir / "server.log", extra)
        self.log_offset = 0
        self.totals = Totals()
        self.streams: dict[bytes, Stream] = {}
        self.owned: list[list[Stream]] = []
        self.next_seq = [0] * args.publishers
        self.foreign: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for p in range(args.publishers):
            mine = [Stream(b"tort-p%d-s%d" % (p, k), p) for k in range(args.streams)]
            self.owned.append(mine)
            self.streams.update((s.name, s) for s in mine)
        #: --tx-writers: the whole store by position, the writers' streams, and a token
        #: that keeps this run's event ids apart from any run before on the directory.
        self.store = StoreModel() if args.tx_writers else None
        self.shared = [TX_PREFIX + b"shared-%d" % k for k in range(SHARED_STREAMS)]
        self.private = [[TX_PREFIX + b"w%d-%d" % (w, k) for k in range(PRIVATE_STREAMS)]
                        for w in range(args.tx_writers)]
        self.tx_names = set(self.shared).union(*self.private)
        self.token = os.urandom(4).hex().encode()

    def problem(self, text: str) -> None:
        self.totals.problems.append(text)
        print(f"  PROBLEM: {text}", flush=True)

    # The baseline: whatever the directory holds before the first round.
    def baseline(self) -> None:
        self.server.start()
        stored, problems = read_everything(self.args.port)
        for text in problems:
            self.problem(text)
        for name, events in stored.items():
            if name in self.streams:
                self.streams[name].events = list(events)
                self.streams[name].seqs = [-1] * len(events)
            elif not (self.store is not None and name.startswith(TX_PREFIX)):
                self.foreign[name] = events
        if self.store is not None:
            problems: list[str] = []
            try:
                self.store.scan(self.args.port, problems)
            except (UnexpectedReply, OSError, ConnectionError) as exc:
                problems.append(f"range $all failed: {exc}")
            for text in problems:
                self.problem(text)
            self.totals.ids = len(self.store.ids)
        self.stop_and_fsck(force_sigterm=True)

    def run_round(self, number: int) -> None:
        rng, totals = self.rng, self.totals
        started = time.monotonic()
        self.server.start()
        problems: list[str] = []
        budgets = [rng.choice([50, 300, 1000, 2000]) for _ in range(self.args.publishers)]
        publishers = [Publisher(p, self.args.port, self.owned[p], budgets[p],
                                random.Random(rng.random()), self.next_seq[p], problems)
                      for p in range(self.args.publishers)]
        writers = self.tx_writers(number, problems)
        subscribers = [Subscriber(self.args.port, self.subscription_spec(), rng.choice(
            [None, 4096])) for _ in range(rng.randint(2, 6))]
        since_ms = time.time_ns() // 1_000_000 - 1000
        for thread in subscribers + publishers + writers:
            thread.start()
        last_loss = self.args.inject_loss and number == self.args.rounds
        kill_after = self.kill_moment(publishers, writers, idle=last_loss)
        self.server.kill()
        for thread in publishers + writers + subscribers:
            thread.join(DEADLINE)
            if thread.is_alive():
                problems.append(f"{thread.name} still running {DEADLINE}s after the kill")
        if last_loss:
            self.inject_loss()
        # fsck of the crashed directory: at most a torn tail.
        code, report, output = fsck(self.data_dir)
        totals.fsck_runs += 1
        kinds = {p["kind"] for p in (report or {}).get("problems", [])}
        if report is None or code not in (0, 1) or not kinds <= CRASH_PROBLEMS:
            problems.append(f"fsck of the crashed directory (exit {code}): {output[-2000:]}")
        torn = "torn-tail" in kinds
        totals.torn_tails += torn
        if rng.random() < 0.1:  # a crash during start-up and recovery, too
            self.server.start(wait=False)
            time.sleep(rng.uniform(0.0, 0.4))
            self.server.kill()
            totals.startup_kills += 1
        try:
            self.server.start()
        except StartFailed as exc:
            problems.append(f"restart after the crash failed: {exc}\n{self.log_tail()}")
            self.finish_round(number, problems, started, kill_after, torn, publishers, writers)
            return
        self.verify(publishers, subscribers, problems)
        if self.store is not None:
            self.verify_transactions(writers, problems, since_ms)
        self.check_log(problems)
        self.stop_and_fsck(problems=problems)
        self.finish_round(number, problems, started, kill_after, torn, publishers, writers)

    def tx_writers(self, number: int, problems: list[str]) -> list[TxWriter]:
        """This round's writers (none without --tx-writers), each told what the store
        holds: its streams' last numbers and a sample of stored ids to reuse."""
        if self.store is None:
            return []
        rng, store = self.rng, self.store
        sample = []
        for position in rng.sample(range(len(store.frames)), min(64, len(store.frames))):
            frame = store.frames[position]
            if frame.id is not None:
                sample.append((frame.id, frame.stream, frame.number))
        writers = []
        for w in range(self.args.tx_writers):
            streams = self.private[w] + self.shared
            writers.append(TxWriter(
                w, self.args.port, self.private[w], self.shared,
                {s: store.last.get(s) for s in streams}, sample,
                rng.choice([50, 200, 600, 1500]), random.Random(rng.random()),
                b"%s-r%d" % (self.token, number), problems))
        return writers

    def subscription_spec(self) -> bytes:
        rng = self.rng
        stream = rng.choice(list(self.streams.values()))
        n = len(stream.events)
        kind = rng.random()
        if kind < 0.1:
            low = rng.randrange(max(n, 1) + 50)
            return b"$all:%d" % low
        if kind < 0.35:
            return b"%s:0" % stream.name
        if kind < 0.6:
            return b"%s:%d" % (stream.name, rng.randrange(n + 20))
        if kind < 0.8:
            low = rng.randrange(n + 20)
            return b"%s:%d:%d" % (stream.name, low, low + rng.randint(1, 500))
        return stream.name

    def kill_moment(self, publishers: list[Publisher], writers: list[TxWriter],
                    idle: bool = False) -> float:
        """Sleep until a random moment of the load (or, with ``idle``, its end; with
        --kill-mid-load, once every writer has had a few replies); return the delay in
        seconds."""
        rng = self.rng
        start = time.monotonic()
        roll = 1.0 if idle else rng.random()
        if self.args.kill_mid_load and writers and not idle:
            while time.monotonic() - start < DEADLINE and not all(
                    w.done.is_set() or len(w.acked_units) >= 3 for w in writers):
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.005))
        elif roll < 0.1:
            time.sleep(rng.uniform(0, 0.01))
        elif roll < 0.6:
            time.sleep(rng.uniform(0.01, 0.3))
        elif roll < 0.9:
            time.sleep(rng.uniform(0.3, 1.5))
        else:  # after the load, on an idle server
            self.totals.idle_kills += 1
            for thread in publishers + writers:
                thread.done.wait(DEADLINE)
            time.sleep(rng.uniform(0, 0.05))
        return time.monotonic() - start

    def verify(self, publishers: list[Publisher], subscribers: list[Subscriber],
               problems: list[str]) -> None:
        stored, read_problems = read_everything(self.args.port)
        problems.extend(read_problems)
        totals = self.totals
        expected_names = {s.name for s in self.streams.values() if s.events} | set(self.foreign)
        if self.store is not None:
            expected_names |= self.tx_names
        sent: dict[bytes, list[Request]] = {}
        for publisher in publishers:
            for request in publisher.requests:
                sent.setdefault(request.stream.name, []).append(request)
                if request.events:
                    expected_names.add(request.stream.name)
        extra = set(stored) - expected_names
        if extra:
            problems.append(f"streams nobody wrote to: {sorted(extra)!r}")
        for name, events in self.foreign.items():
            if stored.get(name) != events:
                problems.append(f"stream {name!r} (there before the torture) changed")
        acked = {}
        for publisher in publishers:
            totals.acked_requests += publisher.acked
            totals.wrong_expected += publisher.wrong_expected
            for request in publisher.requests[:publisher.acked]:
                acked[request.stream.name] = acked.get(request.stream.name, 0) + len(request.events)
        for stream in self.streams.values():
            got = stored.get(stream.name, [])
            before = len(stream.events)
            if got[:before] != stream.events:
                at = next((i for i, (a, b) in enumerate(zip(got, stream.events)) if a != b),
                          min(len(got), before))
                problems.append(f"stream {stream.name!r}: {before} events verified before,"
                                f" now {len(got)}, first difference at {at} (LOSS)")
                continue
            totals.rechecked += before
            tail = got[before:]
            requests = sent.get(stream.name, [])
            flat = [e for r in requests for e in r.events]
            seqs = [r.seq + i for r in requests for i in range(len(r.events))]
            n_acked = acked.get(stream.name, 0)
            totals.acked_events += n_acked
            boundaries = {0}
            at = 0
            for request in requests:
                at += len(request.events)
                boundaries.add(at)
            if tail != flat[:len(tail)]:
                problems.append(f"stream {stream.name!r}: events {before}.. are not what was"
                                " sent, in order")
            elif len(tail) < n_acked:
                problems.append(f"stream {stream.name!r}: {n_acked} events acknowledged in this"
                                f" round, only {len(tail)} stored (LOSS)")
            elif len(tail) not in boundaries:
                problems.append(f"stream {stream.name!r}: a request stored in part"
                                f" ({len(tail)} of the round's events)")
            else:
                totals.verified += n_acked
                totals.inflight_stored += len(tail) - n_acked
                totals.inflight_lost += len(flat) - len(tail)
                stream.events.extend(tail)
                stream.seqs.extend(seqs[:len(tail)])
        for publisher in publishers:
            self.next_seq[publisher.index] = publisher.seq
        self.check_all_stream(stored, problems)
        for subscriber in subscribers:
            self.check_subscriber(subscriber, stored, problems)

    def check_all_stream(self, stored, problems: list[str]) -> None:
        """``$all:0`` is every stored event once, per stream in order, and each
        publisher's events in the order it sent them."""
        total = sum(len(events) for events in stored.values())
        events = read_all_stream(self.args.port, total)
        per_stream: dict[bytes, list[tuple[bytes, bytes]]] = {}
        last_seq = [-1] * len(self.owned)
        for stream_name, number, name, data in events:
            mine = per_stream.setdefault(stream_name, [])
            if number != len(mine):
                problems.append(f"$all:0: {stream_name!r} event {number} after {len(mine) - 1}")
                return
            mine.append((name, data))
            stream = self.streams.get(stream_name)
            if stream is not None and number < len(stream.seqs):
                seq = stream.seqs[number]
                if seq >= 0:
                    if seq < last_seq[stream.owner]:
                        problems.append(f"$all:0: {stream_name!r} event {number} out of the"
                                        f" order publisher {stream.owner} sent it")
                        return
                    last_seq[stream.owner] = seq
        if per_stream != {k: v for k, v in stored.items() if v}:
            problems.append("$all:0 does not hold exactly the stored events")
        self.totals.rechecked += total

    def check_subscriber(self, subscriber: Subscriber, stored, problems: list[str]) -> None:
        totals = self.totals
        totals.subscribers += 1
        totals.subscriber_events += len(subscriber.seen)
        spec = subscriber.spec
        if subscriber.error:
            problems.append(subscriber.error)
            return
        parts = spec.split(b":")
        low = int(parts[1]) if len(parts) > 1 else None
        high = int(parts[2]) if len(parts) > 2 else None
        by_stream: dict[bytes, list[tuple[int, bytes, bytes]]] = {}
        for stream, number, name, data in subscriber.seen:
            if parts[0] != b"$all" and stream != parts[0]:
                problems.append(f"subscriber {spec!r} got an event of {stream!r}")
                return
            by_stream.setdefault(stream, []).append((number, name, data))
        for stream, seen in by_stream.items():
            first = seen[0][0]
            if low is not None and first != low:
                problems.append(f"subscriber {spec!r}: first event of {stream!r} is {first},"
                                f" not {low}")
                return
            if high is not None and seen[-1][0] >= high:
                problems.append(f"subscriber {spec!r}: got event {seen[-1][0]} of {stream!r}")
                return
            events = stored.get(stream, [])
            want = [(first + i, *e) for i, e in enumerate(events[first:first + len(seen)])]
            if seen != want:
                problems.append(f"subscriber {spec!r}: saw {len(seen)} events of {stream!r}"
                                f" from {first}; the store has {len(events)}, and they differ"
                                " (a gap, a duplicate, or an event seen that did not survive)")
                return

    # -- transactions and idempotent retries (--tx-writers) ------------------------------

    def verify_transactions(self, writers: list[TxWriter], problems: list[str],
                            since_ms: int) -> None:
        """The whole store by ``range $all`` against the model; each writer request
        stored whole and as answered (acknowledged), not at all (refused), whole or not
        at all (reply lost); then every lost request retried, answered as predicted."""
        totals, store = self.totals, self.store
        try:
            new = store.scan(self.args.port, problems, since_ms)
        except (UnexpectedReply, OSError, ConnectionError) as exc:
            problems.append(f"range $all failed: {exc}")
            return
        sent = {e.id for w in writers for u in w.units for _w, _k, e in u.own_events()}
        stored: dict[bytes, list] = {}
        for raw in new:
            stream, event_id, metadata = raw[1], raw[7], raw[8]
            if stream in self.streams:
                if event_id is not None or metadata is not None:
                    problems.append(f"{stream!r} event {raw[2]} was published without id and"
                                    f" metadata, stored with {event_id!r}, {metadata!r}")
            elif stream in self.tx_names:
                if event_id not in sent:
                    problems.append(f"{stream!r} event {raw[2]} (position {raw[5]}, id"
                                    f" {event_id!r}) is stored but no writer sent it")
                else:
                    stored[event_id] = raw
        for writer in writers:
            self.check_units(writer, stored, problems)
        self.retry_lost(writers, problems)
        totals.ids = len(store.ids)

    def check_units(self, writer: TxWriter, stored: dict[bytes, list],
                    problems: list[str]) -> None:
        """One writer's requests against the events stored in this round (``stored``, by
        id), and their order; at most MAX_UNIT_PROBLEMS of its problems are told, then
        how many more."""
        totals = self.totals
        totals.twins += writer.twins
        last_position = -1
        found_problems: list[str] = []
        for unit in writer.units:
            found = self.check_unit(unit, stored, found_problems)
            if found:
                first = found[0][5]
                if first <= last_position:
                    found_problems.append(
                        f"{unit.describe()}: stored at position {first}, before the writer's"
                        f" earlier request at {last_position} (order of one connection not"
                        " kept)")
                last_position = found[-1][5]
        problems.extend(found_problems[:MAX_UNIT_PROBLEMS])
        if len(found_problems) > MAX_UNIT_PROBLEMS:
            problems.append(f"writer {writer.index}: {len(found_problems) - MAX_UNIT_PROBLEMS}"
                            " more problems like these")

    def check_unit(self, unit: Unit, stored: dict[bytes, list], problems: list[str]
                   ) -> list[list] | None:
        """Check one request by its fate; return its stored events (in request order)
        when it is stored whole and as it must be."""
        totals = self.totals
        if unit.kind == REPLAY:  # its events are its original's, acknowledged
            totals.replays += unit.state == ACKED
            totals.lost += unit.state == LOST
            totals.lost_stored += unit.state == LOST
            return None
        own = unit.own_events()
        found = [stored.get(e.id) for _w, _k, e in own]
        count = sum(f is not None for f in found)
        what = "transaction" if unit.tx else "append-full"
        if unit.state == REFUSED:
            if unit.kind == OPTIMISTIC:
                totals.optimistic_refused += 1
            else:
                totals.probes_refused += 1
            if count:
                problems.append(f"{unit.describe()}: refused ({unit.reply}) but {count} of its"
                                f" {len(own)} events are stored")
            return None
        if unit.state == ACKED:
            if unit.tx:
                totals.tx_acked += 1
                totals.tx_writes += len(unit.writes)
                totals.tx_events += len(own)
            else:
                totals.single_acked += 1
                totals.single_events += len(own)
            if count < len(own):
                pipeline = ", ".join(f"{u.seq} {u.kind} {u.state}" for u in unit.batch)
                problems.append(f"{unit.describe()}: acknowledged with {unit.reply!r},"
                                f" {len(own) - count} of its {len(own)} events are not stored"
                                f" (LOSS of an acknowledged {what}); pipelined with:"
                                f" {pipeline}")
                return None
            reply, wrong = stored_reply(unit, found)
            if wrong or reply != unit.reply:
                problems.append(f"{unit.describe()}: acknowledged with {unit.reply!r}, stored"
                                f" as {reply!r}: {wrong or 'elsewhere'}")
                return None
            if unit.tx:
                totals.tx_verified += 1
            else:
                totals.single_verified += 1
            return found
        totals.lost += 1  # the kill swallowed the reply
        if not count:
            return None
        if count < len(own):
            totals.lost_partial += 1
            problems.append(f"{unit.describe()}: its reply was lost and {count} of its"
                            f" {len(own)} events are stored (a {what} stored in PART)")
            return None
        if unit.kind == DUPLICATE_ID:
            problems.append(f"{unit.describe()}: reuses a stored id, yet its other events are"
                            " stored")
            return None
        _reply, wrong = stored_reply(unit, found)
        if wrong:
            problems.append(f"{unit.describe()}: its reply was lost; stored, but {wrong}")
            return None
        totals.lost_stored += 1
        return found

    def retry_lost(self, writers: list[TxWriter], problems: list[str]) -> None:
        """Send every request whose reply was lost again, writer by writer in the order
        they were sent; each reply must be exactly what the store predicts, and what
        they store exactly what it predicts."""
        totals = self.totals
        overlay = Overlay(self.store)
        since_ms = time.time_ns() // 1_000_000 - 1000
        conn = Conn(self.args.port)
        try:
            for writer in writers:
                for unit in writer.units:
                    if unit.state != LOST:
                        continue
                    want, new = overlay.predict(unit)
                    conn.send(unit.wire())
                    reply = read_unit_reply(conn, unit)
                    unit.retried = True
                    got = str(reply) if isinstance(reply, hiredis.ReplyError) else reply
                    if got != want:
                        problems.append(f"{unit.describe()}: its reply was lost; retried after"
                                        f" the restart it got {reply!r}, not {want!r}")
                        return
                    if isinstance(want, str):
                        totals.retry_refused += 1
                    elif new:
                        totals.retry_stored += 1
                        overlay.apply(new)
                    else:
                        totals.retry_first_reply += 1
        except (UnexpectedReply, OSError, ConnectionError) as exc:
            problems.append(f"retrying the lost requests failed: {exc}")
            return
        finally:
            conn.close()
        try:
            tail = self.store.scan_tail(self.args.port, problems, since_ms)
        except (UnexpectedReply, OSError, ConnectionError) as exc:
            problems.append(f"range $all after the retries failed: {exc}")
            return
        got = [frame_of(raw)._replace(timestamp=0) for raw in tail]
        if got != overlay.frames:
            at = next((i for i, (a, b) in enumerate(zip(got, overlay.frames)) if a != b),
                      min(len(got), len(overlay.frames)))
            problems.append(f"the retries stored {len(got)} events, {len(overlay.frames)}"
                            f" predicted; first difference at {at}:"
                            f" {got[at] if at < len(got) else None} !="
                            f" {overlay.frames[at] if at < len(overlay.frames) else None}")

    def final_check(self) -> None:
        """After the last round: the whole store once more against the model (nothing
        changed, no id twice), then a clean stop and fsck."""
        problems: list[str] = []
        self.server.start()
        try:
            new = self.store.scan(self.args.port, problems)
            if new:
                problems.append(f"{len(new)} events appeared after the last round")
        except (UnexpectedReply, OSError, ConnectionError) as exc:
            problems.append(f"range $all failed: {exc}")
        self.stop_and_fsck(problems=problems, force_sigterm=True)
        print(f"final check: {len(self.store.frames)} events by range $all as verified,"
              f" {len(self.store.ids)} ids each stored once"
              f"{'' if not problems else f', {len(problems)} PROBLEMS'}", flush=True)
        for text in problems:
            self.problem(text)

    def tx_summary(self) -> str:
        t = self.totals
        retried = t.retry_first_reply + t.retry_stored + t.retry_refused
        return (f"  transactions:          {t.tx_acked} acknowledged ({t.tx_events} events in"
                f" {t.tx_writes} append-full), {t.tx_verified} found whole where their"
                " replies said\n"
                f"  append-full:           {t.single_acked} acknowledged ({t.single_events}"
                f" events), {t.single_verified} found where their replies said; {t.replays}"
                f" exact repeats answered with the first reply ({t.twins} sent on two"
                " connections at once)\n"
                f"  refused as predicted:  {t.optimistic_refused + t.probes_refused}"
                f" ({t.optimistic_refused} optimistic expected versions,"
                f" {t.probes_refused} wrong expected versions and reused ids)\n"
                f"  replies lost:          {t.lost} ({t.lost_stored} of those requests stored"
                f" whole, {t.lost_partial} in part)\n"
                f"  retries:               {retried} (first reply again: {t.retry_first_reply};"
                f" stored now: {t.retry_stored}; refused as predicted: {t.retry_refused})\n"
                f"  ids:                   {t.ids} stored, each once\n")

    def stop_and_fsck(self, problems: list[str] | None = None, force_sigterm: bool = False
                      ) -> None:
        problems = self.totals.problems if problems is None else problems
        if force_sigterm or self.rng.random() < 0.5:
            code = self.server.terminate()
            if code != 0:
                problems.append(f"SIGTERM: meilies-server exited with {code}\n{self.log_tail()}")
        else:
            self.server.kill()  # idle: nothing in flight
        code, report, output = fsck(self.data_dir)
        self.totals.fsck_runs += 1
        if code != 0:
            problems.append(f"meilies-fsck exited with {code}: {output[-2000:]}")

    def check_log(self, problems: list[str]) -> None:
        text = self.server.log_path.read_text(errors="replace")
        new, self.log_offset = text[self.log_offset:], len(text)
        if "Traceback" in new or " ERROR " in new:
            problems.append(f"the server log shows an error:\n{new[-3000:]}")

    def log_tail(self) -> str:
        return self.server.log_path.read_text(errors="replace")[-3000:]

    def inject_loss(self) -> None:
        """Self-test (--inject-loss): cut the log back to where this round began, as a
        server that acknowledged without writing would leave it."""
        for path, size in self.round_start_sizes.items():
            if path.exists():
                os.truncate(path, size)
        for path in self.data_dir.glob("*.seg"):
            if path not in self.round_start_sizes:
                path.unlink()
        print("  (--inject-loss: the log was cut back to where this round began)", flush=True)

    def finish_round(self, number, problems, started, kill_after, torn, publishers,
                     writers) -> None:
        totals = self.totals
        totals.rounds += 1
        acked = sum(p.acked_events for p in publishers)
        tx = ""
        if writers:
            units = [u for w in writers for u in w.units if u.state == ACKED and u.kind != REPLAY]
            tx = (f" {sum(u.tx for u in units)} transactions and"
                  f" {sum(not u.tx for u in units)} append-full acknowledged,"
                  f" {sum(u.retried for w in writers for u in w.units)} retried,")
        print(f"round {number}: killed after {kill_after * 1000:.0f} ms, {acked} events"
              f" acknowledged, {sum(len(s.events) for s in self.streams.values())} stored,"
              f"{tx}{' torn tail,' if torn else ''} {time.monotonic() - started:.1f}s"
              f"{'' if not problems else f', {len(problems)} PROBLEMS'}", flush=True)
        for text in problems:
            self.problem(text)

    def run(self) -> int:
        args = self.args
        began = time.monotonic()
        self.baseline()
        for number in range(1, args.rounds + 1):
            if time.monotonic() - began > args.max_seconds:
                print(f"time limit: stopping after {number - 1} of {args.rounds} rounds",
                      flush=True)
                break
            self.round_start_sizes = {p: p.stat().st_size for p in self.data_dir.glob("*.seg")}
            self.run_round(number)
            if self.totals.problems and args.stop_on_problem:
                break
        if self.store is not None and self.totals.rounds and not (
                self.totals.problems and args.stop_on_problem):
            self.final_check()
        self.server.kill()
        self.summary(time.monotonic() - began)
        return 1 if self.totals.problems else 0

    def summary(self, seconds: float) -> None:
        t = self.totals
        stored = sum(len(s.events) for s in self.streams.values())
        print(f"\ntorture summary (seed {self.args.seed}, {seconds:.0f}s)\n"
              f"  rounds:                {t.rounds} (kill -9 mid-load: {t.rounds - t.idle_kills},"
              f" once idle: {t.idle_kills}; also during start-up: {t.startup_kills})\n"
              f"  events acknowledged:   {t.acked_events} ({t.acked_requests} requests;"
              f" {t.wrong_expected} wrong expected versions refused)\n"
              f"  events verified:       {t.verified} acknowledged events intact after their"
              f" crash; {t.rechecked} event reads re-checked in later rounds\n"
              f"  in flight at a kill:   {t.inflight_stored} stored whole,"
              f" {t.inflight_lost} not stored\n"
              f"  stored at the end:     {stored} events in"
              f" {sum(1 for s in self.streams.values() if s.events)} streams\n"
              f"  subscribers checked:   {t.subscribers} ({t.subscriber_events} events seen)\n"
              f"  torn tails:            {t.torn_tails}; fsck runs: {t.fsck_runs}\n"
              f"{self.tx_summary() if self.store is not None else ''}"
              f"  problems:              {len(t.problems)}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, required=True, help="crash rounds to run")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data directory (default: a temporary one, removed after a clean"
                             " run); events already in it are verified too")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=12, help="streams per publisher")
    parser.add_argument("--tx-writers", type=int, default=2,
                        help="writers of append-full requests and MULTI/EXEC transactions"
                             " over shared streams, whose lost replies are retried after"
                             " each restart (0: none; default 2)")
    parser.add_argument("--postgres-dsn", default=None, metavar="DSN",
                        help="run the server with --backend postgres on this (empty)"
                             " database: the kills then hit a server whose data directory"
                             " is a replica of PostgreSQL's log")
    parser.add_argument("--max-seconds", type=float, default=4 * 3600,
                        help="stop starting rounds after this long")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--stop-on-problem", action="store_true")
    parser.add_argument("--inject-loss", action="store_true", help=argparse.SUPPRESS)
    # For the test: kill every round while the writers are busy (replies in flight).
    parser.add_argument("--kill-mid-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.publishers < 1 or args.streams < 1 or args.tx_writers < 0:
        parser.error("--rounds, --publishers and --streams must be at least 1, --tx-writers"
                     " at least 0")
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    if not args.port:
        args.port = free_port()
    work_dir = Path(tempfile.mkdtemp(prefix="meilies-torture-"))
    data_dir = args.data_dir or work_dir / "data"
    print(f"torture: {args.rounds} rounds, seed {args.seed}, port {args.port}, data {data_dir},"
          f" log {work_dir / 'server.log'}", flush=True)
    torture = Torture(args, data_dir, work_dir)
    try:
        code = torture.run()
    except StartFailed as exc:
        print(f"torture: cannot start meilies-server: {exc}\n{torture.log_tail()}",
              file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("torture: interrupted", file=sys.stderr)
        code = 2
    finally:
        torture.server.kill()
    if code == 0 and not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        print(f"torture: kept {work_dir} (server.log{', data' if not args.data_dir else ''})",
              flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
