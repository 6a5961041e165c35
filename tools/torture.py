#!/usr/bin/env python3
"""Crash torture: the real ``meilies-server --fsync always``, a mixed load, ``kill -9`` at
random moments, and after every crash a check that nothing acknowledged was lost.

One round::

    start the server ........ (sometimes killed during its own start-up first)
    load .................... publishers pipelining publish/append on their own streams,
                              subscribers from 0, from the middle, past the end, live,
                              bounded, and $all
    kill -9 ................. at a random moment (a few ms in, mid-load, or idle)
    fsck the crashed dir .... only a torn tail may be wrong with it
    restart and verify ...... every stream read from 0: every acknowledged event there
                              with its number and bytes, numbering contiguous, what was
                              in flight stored whole or not at all, nothing else; $all:0
                              agrees; what every subscriber saw is exactly what is stored
    stop and fsck ........... SIGTERM (exit 0) or kill -9 of the idle server, then
                              ``meilies-fsck`` must exit 0

Each publisher owns its streams, so the order it sent them is the order they must be
stored in. The model of a stream is what the last verification read: it must survive
every later crash, whether or not it was acknowledged when it was first written.

    python3 tools/torture.py --rounds 200 --seed 7
    python3 tools/torture.py --rounds 3 --data-dir /tmp/t --port 7000 --keep

Prints one line per round and a summary; exit status 0 when nothing was lost and
every check passed, 1 on any problem (the data directory and server log are kept
and named), 2 on a usage or setup error. Bounded: ``--max-seconds`` stops early
(the rounds run are reported). All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
    def __init__(self, data_dir: Path, port: int, log_path: Path) -> None:
        self.data_dir, self.port, self.log_path = data_dir, port, log_path
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meilies.cli.server", "--data-dir", str(self.data_dir),
                 "--host", HOST, "--port", str(self.port), "--fsync", "always"],
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
    problems: list[str] = field(default_factory=list)


class Torture:
    def __init__(self, args: argparse.Namespace, data_dir: Path, work_dir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.data_dir = data_dir
        self.server = Server(data_dir, args.port, work_dir / "server.log")
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
            else:
                self.foreign[name] = events
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
        subscribers = [Subscriber(self.args.port, self.subscription_spec(), rng.choice(
            [None, 4096])) for _ in range(rng.randint(2, 6))]
        for thread in subscribers + publishers:
            thread.start()
        last_loss = self.args.inject_loss and number == self.args.rounds
        kill_after = self.kill_moment(publishers, idle=last_loss)
        self.server.kill()
        for thread in publishers + subscribers:
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
            self.finish_round(number, problems, started, kill_after, torn, publishers)
            return
        self.verify(publishers, subscribers, problems)
        self.check_log(problems)
        self.stop_and_fsck(problems=problems)
        self.finish_round(number, problems, started, kill_after, torn, publishers)

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

    def kill_moment(self, publishers: list[Publisher], idle: bool = False) -> float:
        """Sleep until a random moment of the load (or, with ``idle``, its end); return
        the delay in seconds."""
        rng = self.rng
        start = time.monotonic()
        roll = 1.0 if idle else rng.random()
        if roll < 0.1:
            time.sleep(rng.uniform(0, 0.01))
        elif roll < 0.6:
            time.sleep(rng.uniform(0.01, 0.3))
        elif roll < 0.9:
            time.sleep(rng.uniform(0.3, 1.5))
        else:  # after the load, on an idle server
            self.totals.idle_kills += 1
            for publisher in publishers:
                publisher.done.wait(DEADLINE)
            time.sleep(rng.uniform(0, 0.05))
        return time.monotonic() - start

    def verify(self, publishers: list[Publisher], subscribers: list[Subscriber],
               problems: list[str]) -> None:
        stored, read_problems = read_everything(self.args.port)
        problems.extend(read_problems)
        totals = self.totals
        expected_names = {s.name for s in self.streams.values() if s.events} | set(self.foreign)
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

    def finish_round(self, number, problems, started, kill_after, torn, publishers) -> None:
        totals = self.totals
        totals.rounds += 1
        acked = sum(p.acked_events for p in publishers)
        print(f"round {number}: killed after {kill_after * 1000:.0f} ms, {acked} events"
              f" acknowledged, {sum(len(s.events) for s in self.streams.values())} stored,"
              f"{' torn tail,' if torn else ''} {time.monotonic() - started:.1f}s"
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
    parser.add_argument("--max-seconds", type=float, default=4 * 3600,
                        help="stop starting rounds after this long")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--stop-on-problem", action="store_true")
    parser.add_argument("--inject-loss", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.publishers < 1 or args.streams < 1:
        parser.error("--rounds, --publishers and --streams must be at least 1")
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
