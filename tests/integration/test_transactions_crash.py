"""Transactions across ``kill -9`` (PROTOCOL.md "Transactions": all or none even across a
crash; "Idempotent appends": a client that lost a reply retries safely).

Client threads run MULTI/EXEC transactions of ``append-full`` with unique ids over shared
streams under ``--fsync always`` and record which EXECs were answered. The real server is
killed with SIGKILL mid-load and restarted on the same data directory. Then:

- positions are dense from 0, each stream's numbers are dense from 0;
- every answered transaction is there, whole, contiguous, in queue order, byte for byte,
  and its EXEC reply names where its writes landed;
- an unanswered transaction is wholly there or not at all;
- sending every unanswered transaction again (same ids) gets the reply it would first
  have had if it was stored, or stores it now; nothing is ever stored twice. Sending every
  answered one again changes nothing and gets its first reply.

Small segments (16 KiB) roll often, so many transactions sit next to a roll. Three rounds
run on the same data directory, so later rounds recover a log that was recovered before.
"""

from __future__ import annotations

import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import hiredis

from serverproc import DEADLINE, RawClient, command, wait_for

OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"
STREAMS = [b"acct-%d" % i for i in range(6)]
WRITERS = 6
ROUNDS = 3
#: Answered transactions to wait for before each kill (the kill lands while writers run).
ACKED_BEFORE_KILL = 120

#: One event of an append-full: (id, event name, metadata, data).
Event = tuple[bytes, bytes, bytes, bytes]


def parse(raw: bytes):
    reader = hiredis.Reader()
    reader.feed(raw)
    value = reader.gets()
    assert value is not False and reader.gets() is False, raw[:300]
    return value


@dataclass
class Txn:
    """One transaction as sent; ``reply`` is EXEC's answer once one arrived."""

    writes: list[tuple[bytes, list[Event]]]
    reply: bytes | None = None

    def request(self) -> bytes:
        parts = [command("multi")]
        for stream, events in self.writes:
            parts.append(command("append-full", stream, "any",
                                 *[part for event in events for part in event]))
        parts.append(command("exec"))
        return b"".join(parts)

    def ids(self) -> list[bytes]:
        return [event[0] for _, events in self.writes for event in events]

    def reply_from(self, by_id: dict[bytes, list]) -> bytes:
        """The EXEC reply this transaction had if it is stored as ``by_id`` shows."""
        parts = [b"*%d\r\n" % len(self.writes)]
        for _, events in self.writes:
            last = by_id[events[-1][0]]
            parts.append(b"*2\r\n:%d\r\n:%d\r\n" % (last[2], last[5]))
        return b"".join(parts)


def make_txn(rng: random.Random, tag: bytes) -> Txn:
    writes = []
    for w in range(rng.randint(2, 3)):
        events = [(b"%s.%d.%d" % (tag, w, j), b"ev-%d" % j, rng.randbytes(rng.randrange(0, 40)),
                   rng.randbytes(rng.randrange(0, 1500))) for j in range(rng.randint(1, 3))]
        writes.append((rng.choice(STREAMS), events))
    return Txn(writes)


class Writer(threading.Thread):
    """Sends transactions one after another until the server goes away."""

    def __init__(self, port: int, tag: bytes, seed: int) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port)
        self.tag = tag
        self.rng = random.Random(seed)
        self.sent: list[Txn] = []
        self.acked = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            k = 0
            while True:
                txn = make_txn(self.rng, b"%s-%d" % (self.tag, k))
                k += 1
                self.sent.append(txn)  # before it is sent: it may be stored unanswered
                self.client.send(txn.request())
                self.client.expect(OK + QUEUED * len(txn.writes))
                reply = self.client.read_reply()
                assert reply.startswith(b"*%d\r\n*2\r\n" % len(txn.writes)), reply
                txn.reply = reply
                self.acked += 1
        except (ConnectionError, BrokenPipeError):
            pass  # the kill
        except BaseException as exc:  # reported by the test through .error
            self.error = exc
        finally:
            self.client.close()


def read_all(client: RawClient) -> list:
    """Every stored event as a parsed full frame, by position, a page at a time."""
    frames: list = []
    while True:
        page = parse(client.call("range", "$all", str(len(frames)), "+", "COUNT", "10000"))
        if not page:
            return frames
        frames += page


def check_store(client: RawClient, txns: list[Txn]) -> tuple[list, dict[bytes, list]]:
    """The store after a restart, against what the clients sent and were told."""
    frames = read_all(client)
    for stream in STREAMS:
        ranged = parse(client.call("range", stream, "-", "+", "COUNT", "100000"))
        assert ranged == [f for f in frames if f[1] == stream]
    return frames, verify(frames, txns)


def verify(frames: list, txns: list[Txn]) -> dict[bytes, list]:
    """``frames`` (all of ``range $all``) against the transactions sent and their answers;
    returns the frames by id."""
    assert [f[5] for f in frames] == list(range(len(frames))), "positions are not dense"
    for stream in STREAMS:
        mine = [f for f in frames if f[1] == stream]
        assert [f[2] for f in mine] == list(range(len(mine))), f"{stream!r} numbers not dense"
    ids = [f[7] for f in frames]
    assert None not in ids
    assert len(set(ids)) == len(ids), "an event id is stored twice"
    by_id = {f[7]: f for f in frames}
    planned = {event_id for txn in txns for event_id in txn.ids()}
    assert set(ids) <= planned, "an event nobody sent"
    stored = 0
    for txn in txns:
        present = [event_id in by_id for event_id in txn.ids()]
        if txn.reply is not None:
            assert all(present), f"an answered transaction lost events: {txn.ids()} {present}"
        else:
            assert all(present) or not any(present), \
                f"an unanswered transaction is there in part: {txn.ids()} {present}"
        if not all(present):
            continue
        stored += len(present)
        first = by_id[txn.ids()[0]][5]
        at = first
        for stream, events in txn.writes:
            for event_id, name, metadata, data in events:
                frame = by_id[event_id]
                assert frame[5] == at, "a transaction's positions are not contiguous in queue order"
                assert (frame[1], frame[3], frame[4], frame[8]) == \
                    (stream, name, data, metadata or None)
                at += 1
        if txn.reply is not None:
            assert txn.reply == txn.reply_from(by_id)
    assert stored == len(frames)
    return by_id


def run_round(server, txns: list[Txn], round_: int) -> None:
    """Load, kill -9 mid-load, restart, check, retry."""
    writers = [Writer(server.port, b"r%dw%d" % (round_, i), seed=1000 * round_ + i)
               for i in range(WRITERS)]
    for writer in writers:
        writer.start()
    wait_for(lambda: sum(w.acked for w in writers) >= ACKED_BEFORE_KILL
             or not all(w.is_alive() for w in writers), what="transactions answered")
    assert all(w.is_alive() for w in writers), [w.error for w in writers]
    server.kill()
    for writer in writers:
        writer.join(DEADLINE)
        assert not writer.is_alive()
        assert writer.error is None, writer.error
        txns += writer.sent
    server.start()
    client = server.client()
    frames, by_id = check_store(client, txns)
    # Every unanswered transaction again, with the same ids.
    for txn in [t for t in txns if t.reply is None]:
        was_stored = txn.ids()[0] in by_id
        client.send(txn.request())
        client.expect(OK + QUEUED * len(txn.writes))
        reply = client.read_reply()
        if was_stored:
            assert reply == txn.reply_from(by_id), "a stored transaction retried: not its reply"
        else:
            assert reply.startswith(b"*%d\r\n*2\r\n" % len(txn.writes)), reply
        txn.reply = reply
    after, by_id = check_store(client, txns)
    assert after[:len(frames)] == frames, "a retry changed what was stored"
    # Every transaction again: all answered now, each gets its reply and stores nothing.
    for txn in txns:
        client.send(txn.request())
        client.expect(OK + QUEUED * len(txn.writes) + txn.reply)
    assert client.call("revrange", "$all", "+", "-", "COUNT", "1") == \
        client.call("range", "$all", str(len(after) - 1), "+")
    assert len(read_all(client)) == len(after)
    client.close()


def test_transactions_are_whole_and_retried_safely_across_kill_9(start_server):
    server = start_server("--fsync", "always", "--segment-size", "16384")
    txns: list[Txn] = []
    for round_ in range(ROUNDS):
        run_round(server, txns, round_)
    assert sum(t.reply is not None for t in txns) == len(txns) >= ROUNDS * ACKED_BEFORE_KILL
    assert len(list(server.data_dir.glob("*.seg"))) > 10
    assert "Traceback" not in server.log()


def newest_segment(data_dir: Path) -> Path:
    """The active segment: segment names sort in log order."""
    return sorted(data_dir.glob("*.seg"))[-1]


def test_a_transaction_cut_short_by_a_power_loss_is_all_or_none(start_server, tmp_path):
    """Under ``--fsync no`` a power loss may keep any prefix of what was written after
    the last checkpoint. A transaction's bytes cut anywhere short of its end leave none of
    it (not its first writes, not the stream it created, not its ids): the client's retry
    stores it whole, with the reply it was first given. Cut at its end, it is all there."""
    data = tmp_path / "data"
    server = start_server("--fsync", "no", data_dir=data)
    client = server.client()
    for i in range(3):
        assert client.call("append-full", "acct-0", "any", b"before-%d" % i, "e", "", "x") \
            .startswith(b"*2\r\n")
    assert server.stop() == 0  # the checkpoint covers these
    server.start()
    client = server.client()
    before = client.call("range", "$all", "-", "+")
    segment = newest_segment(data)
    start = segment.stat().st_size
    rng = random.Random(8)
    txn = Txn([(b"acct-0", [(b"cut-0", b"e", b"m", rng.randbytes(300))]),
               (b"fresh", [(b"cut-1", b"e", b"", rng.randbytes(200)),
                           (b"cut-2", b"e", b"m2", rng.randbytes(100))]),
               (b"acct-0", [(b"cut-3", b"e", b"", rng.randbytes(250))])])
    client.send(txn.request())
    client.expect(OK + QUEUED * 3)
    first = client.read_reply()
    assert first == b"*3\r\n*2\r\n:3\r\n:3\r\n*2\r\n:1\r\n:5\r\n*2\r\n:4\r\n:6\r\n"
    whole = client.call("range", "$all", "-", "+")
    server.kill()
    assert newest_segment(data) == segment
    end = segment.stat().st_size
    assert end > start + 850
    cuts = sorted({start, start + 1, end - 1, end} | {start + (end - start) * k // 11
                                                     for k in range(1, 11)})
    for cut in cuts:
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(data, copy)
        with open(copy / segment.name, "r+b") as handle:
            handle.truncate(cut)
        cut_server = start_server("--fsync", "no", data_dir=copy)
        c = cut_server.client()
        if cut == end:
            assert c.call("range", "$all", "-", "+") == whole
        else:
            assert c.call("range", "$all", "-", "+") == before, f"cut at {cut - start}"
            assert c.call("stream-names") == b"*2\r\n+stream-names\r\n+acct-0\r\n"
        c.send(txn.request())
        c.expect(OK + QUEUED * 3 + first)
        frames = parse(c.call("range", "$all", "-", "+"))
        assert [f[:6] + f[7:] for f in frames] == [f[:6] + f[7:] for f in parse(whole)]
        cut_server.kill()
        shutil.rmtree(copy)


def frames_of(txns: list[Txn]) -> list:
    """What the server would store for ``txns`` in this order (timestamp 0)."""
    frames, numbers = [], {}
    for txn in txns:
        for stream, events in txn.writes:
            for event_id, name, metadata, data in events:
                numbers[stream] = numbers.get(stream, -1) + 1
                frames.append([b"event", stream, numbers[stream], name, data, len(frames), 0,
                               event_id, metadata or None])
    return frames


def test_the_checker_sees_a_transaction_in_part_or_lost_or_twice():
    """Self-test of ``verify``: it must catch what the crash test is there to catch."""
    rng = random.Random(3)
    answered, unanswered = make_txn(rng, b"a"), make_txn(rng, b"b")
    frames = frames_of([answered, unanswered])
    answered.reply = answered.reply_from({f[7]: f for f in frames})
    verify(frames, [answered, unanswered])  # both whole: fine
    verify(frames_of([answered]), [answered, unanswered])  # the unanswered one absent: fine
    in_part = frames[:len(frames) - len(unanswered.writes[-1][1])]
    with pytest.raises(AssertionError, match="in part"):
        verify(in_part, [answered, unanswered])
    with pytest.raises(AssertionError, match="lost events"):
        verify(frames_of([unanswered]), [answered, unanswered])
    again = list(frames[-1])
    again[2] = 1 + max(f[2] for f in frames if f[1] == again[1])
    again[5] = len(frames)
    with pytest.raises(AssertionError, match="stored twice"):
        verify(frames + [again], [answered, unanswered])
    elsewhere = {f[7]: f[:5] + [f[5] + 1] + f[6:] for f in frames}
    with pytest.raises(AssertionError):
        verify(frames, [Txn(answered.writes, reply=answered.reply_from(elsewhere)), unanswered])
