"""Disk full and I/O errors, for real: the server's writes and syncs fail because a small
filesystem is full or the process' file size limit is reached, not because a test
replaced a function.

* a tmpfs of a few MiB (mounted here, so root only): ``pwritev`` fails with ENOSPC, part
  way through a record;
* an ext4 image on a loop device whose backing file lives on a small tmpfs: the page
  cache takes the write, then ``fdatasync`` fails when the loop device cannot store it;
* ``RLIMIT_FSIZE`` lowered on the running server (``prlimit``; CPython ignores SIGXFSZ):
  ``pwritev`` fails with EFBIG.

Every time: the request gets ``-ERR storage failure, nothing was stored: ...`` naming
the cause, nothing of it is ever visible (a live subscriber sees no trace of it) or
survives a restart, what was stored stays readable, and once space returns the next
write succeeds without a restart. ``meilies-fsck`` then finds the directory clean.
(EIO itself cannot be provoked here without device-mapper; the engine's tests inject
it into ``os.fdatasync``. ENOSPC from ``fdatasync`` takes the same path.)
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import hiredis
import pytest

from serverproc import DEADLINE, RawClient, ServerProcess, command, subscribed, wait_for

STORAGE_FAILURE = b"-ERR storage failure, nothing was stored: "


# -- filesystems --------------------------------------------------------------------------------


class Disks:
    """Mounts made for one test and the servers that use them; torn down in that order:
    servers killed, then everything unmounted (lazily if something still holds it)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounts: list[Path] = []
        self.servers: list[ServerProcess] = []

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE)

    def tmpfs(self, name: str, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip(f"mounting a small tmpfs needs root (running as uid {os.geteuid()})")
        point = self.tmp_path / name
        point.mkdir()
        done = self._run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.mounts.append(point)
        return point

    def ext4_on_small_backing(self, backing_size: str) -> tuple[Path, Path]:
        """An ext4 of 64 MiB whose loop device's backing file sits on a tmpfs of
        ``backing_size``: ext4 has room to spare, the device under it does not."""
        backing = self.tmpfs("backing", backing_size)
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("mkfs.ext4 is not installed")
        image = backing / "ext4.img"
        with open(image, "wb") as handle:
            handle.truncate(64 * 1024 * 1024)
        done = self._run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(image))
        if done.returncode != 0:
            pytest.skip(f"mkfs.ext4 failed: {done.stderr.strip()}")
        point = self.tmp_path / "ext4"
        point.mkdir()
        done = self._run("mount", "-o", "loop,errors=continue", str(image), str(point))
        if done.returncode != 0:
            pytest.skip(f"cannot loop-mount an ext4 image here: {done.stderr.strip()}")
        self.mounts.append(point)
        return point, backing

    def server(self, data_dir: Path, *args: str, port: int | None = None) -> ServerProcess:
        server = ServerProcess(data_dir, *args, port=port)
        server.log_path = self.tmp_path / f"server-{server.port}.log"  # not on the small disk
        self.servers.append(server)
        return server.start()

    def teardown(self) -> None:
        for server in self.servers:
            server.kill()
        for point in reversed(self.mounts):
            if self._run("umount", str(point)).returncode != 0:
                self._run("umount", "-l", str(point))


@pytest.fixture
def disks(tmp_path):
    disks = Disks(tmp_path)
    yield disks
    disks.teardown()


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    chunk = b"\xee" * 65536
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    # The last chunk may have been written in part; top up what is left page by page.
    try:
        while True:
            os.write(fd, chunk[:4096])
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def free(filler: Path, nbytes: int) -> None:
    os.truncate(filler, max(filler.stat().st_size - nbytes, 0))


# -- reading back ------------------------------------------------------------------------------


def parse(frame: bytes):
    reader = hiredis.Reader()
    reader.feed(frame)
    return reader.gets()


def stored(client: RawClient, stream: str, count: int) -> list[tuple[bytes, bytes]]:
    """Events 0..count-1 of ``stream`` as (name, data), read by a bounded subscription."""
    if count == 0:
        return []
    client.send(command("subscribe", f"{stream}:0:{count}"))
    client.expect(subscribed(stream.encode()))
    events = []
    for number in range(count):
        kind, name_of_stream, got_number, name, data = parse(client.read_reply())
        assert (kind, name_of_stream, got_number) == (b"event", stream.encode(), number)
        events.append((name, data))
    return events


def last_number(client: RawClient, stream: str) -> int | None:
    reply = parse(client.call("last-event-number", stream))
    return reply[2]


def fsck_clean(data_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "meilies.cli.fsck", str(data_dir)],
                          capture_output=True, text=True, timeout=DEADLINE)
    assert done.returncode == 0, done.stdout + done.stderr


def assert_no_traceback(server: ServerProcess) -> None:
    log = server.log()
    assert "Traceback" not in log, log[-4000:]


def assert_storage_failure(reply: bytes, cause: str) -> None:
    assert reply.startswith(STORAGE_FAILURE), reply
    assert cause.encode() in reply and reply.count(b"\r\n") == 1, reply


# -- ENOSPC on write ---------------------------------------------------------------------------


def test_a_full_disk_fails_writes_by_name_keeps_the_rest_and_recovers_when_space_returns(
        disks):
    fs = disks.tmpfs("fs", "4m")
    data_dir = fs / "data"
    server = disks.server(data_dir)
    client = server.client()
    events = [(b"before-%d" % i, bytes([i]) * 10_000) for i in range(20)]
    client.send(b"".join(command("publish", "a", *e) for e in events))
    client.expect(b"+OK\r\n" * 20)
    watcher = server.client()
    watcher.send(command("subscribe", "a:0"))
    watcher.expect(subscribed(b"a"))
    for number in range(20):
        assert parse(watcher.read_reply())[2] == number

    filler = fill(fs)
    free(filler, 24 * 1024)
    # Each of these is larger than the space left: the write stores part of it, fails,
    # and the server cuts the file back. Pipelined, and as an atomic append.
    too_big = b"x" * 40_000
    client.send(command("publish", "a", "big", too_big) * 5)
    for _ in range(5):
        assert_storage_failure(client.read_reply(), "No space left on device")
    assert_storage_failure(client.call("append", "a", "19", "small", "1", "big", too_big),
                           "No space left on device")
    assert_storage_failure(client.call("publish", "fresh", "big", too_big),
                           "No space left on device")
    assert client.call("stream-names") == b"*2\r\n+stream-names\r\n+a\r\n"
    assert last_number(client, "a") == 19
    # What was stored stays readable; what fits in the space left is stored after it.
    assert stored(server.client(), "a", 20) == events
    assert client.call("publish", "a", "fits", "small") == b"+OK\r\n"
    events.append((b"fits", b"small"))
    # The live subscriber never saw a trace of the failed writes.
    assert parse(watcher.read_reply()) == [b"event", b"a", 20, b"fits", b"small"]

    filler.unlink()  # space returns: no restart needed
    assert client.call("publish", "a", "big", too_big) == b"+OK\r\n"
    events.append((b"big", too_big))
    assert client.call("append", "fresh", "none", "one", "1", "two", "2") == b":1\r\n"
    assert parse(watcher.read_reply()) == [b"event", b"a", 21, b"big", too_big]
    assert stored(server.client(), "a", 22) == events

    # Nothing partial survives a crash either: the log ends on a whole record.
    server.kill()
    fsck_clean(data_dir)
    restarted = disks.server(data_dir, port=server.port)
    client = restarted.client()
    assert stored(client, "a", 22) == events
    assert last_number(client, "a") == 21
    assert stored(client, "fresh", 2) == [(b"one", b"1"), (b"two", b"2")]
    assert "recovery:" not in restarted.log()  # no torn record to truncate
    assert_no_traceback(restarted)


def test_stop_and_start_on_a_full_disk(disks):
    fs = disks.tmpfs("fs", "2m")
    data_dir = fs / "data"
    server = disks.server(data_dir)
    client = server.client()
    events = [(b"e%d" % i, b"d" * 100_000) for i in range(5)]
    for event in events:
        assert client.call("publish", "s", *event) == b"+OK\r\n"
    filler = fill(fs)
    # SIGTERM: every event is durable; only the checkpoint (derived data) cannot be
    # written. That is a warning, not a traceback, and the stop is still clean.
    assert server.stop() == 0
    assert "could not write the checkpoint" in server.log()
    assert_no_traceback(server)
    # Start on the full disk: reads are served, writes refused by name.
    restarted = disks.server(data_dir, port=server.port)
    client = restarted.client()
    assert stored(client, "s", 5) == events
    assert_storage_failure(client.call("publish", "s", "e", b"y" * 100_000),
                           "No space left on device")
    filler.unlink()
    assert client.call("publish", "s", "e5", b"y" * 100_000) == b"+OK\r\n"
    events.append((b"e5", b"y" * 100_000))
    assert restarted.stop() == 0
    fsck_clean(data_dir)
    again = disks.server(data_dir, port=server.port)
    assert stored(again.client(), "s", 6) == events
    assert_no_traceback(again)


def test_a_segment_roll_on_a_full_disk_fails_cleanly_and_succeeds_later(disks):
    fs = disks.tmpfs("fs", "96m")
    data_dir = fs / "data"
    server = disks.server(data_dir, "--max-event-size", str(8 * 1024 * 1024))
    client = server.client()
    big = [bytes([65 + i]) * (8 * 1024 * 1024) for i in range(10)]
    for data in big[:7]:  # 56 MiB of the 64 MiB segment
        assert client.call("publish", "s", "e", data) == b"+OK\r\n"
    filler = fill(fs)
    # The 8th needs a new segment: creating it fails (no room for its header).
    reply = client.call("publish", "s", "e", big[7])
    assert_storage_failure(reply, "No space left on device")
    assert b"create " in reply and b".seg" in reply, reply
    assert last_number(client, "s") == 6
    # Room for a segment header, not for the indexes of the segment being sealed.
    free(filler, 4096)
    reply = client.call("publish", "s", "e", big[7])
    assert_storage_failure(reply, "No space left on device")
    assert b".pidx" in reply or b".sidx" in reply, reply
    assert last_number(client, "s") == 6
    assert len(list(data_dir.glob("*.seg"))) == 1  # the new segment was taken back
    filler.unlink()
    for data in big[7:]:
        assert client.call("publish", "s", "e", data) == b"+OK\r\n"
    assert last_number(client, "s") == 9
    assert [d for _n, d in stored(server.client(), "s", 10)] == big
    server.kill()
    fsck_clean(data_dir)
    restarted = disks.server(data_dir, "--max-event-size", str(8 * 1024 * 1024),
                             port=server.port)
    client = restarted.client()
    assert [d for _n, d in stored(client, "s", 10)] == big
    assert client.call("publish", "s", "e", "after") == b"+OK\r\n"
    assert_no_traceback(restarted)


# -- fdatasync fails ---------------------------------------------------------------------------


def test_a_failed_fdatasync_fails_the_waiting_group_and_the_next_write_succeeds(disks):
    ext4, backing = disks.ext4_on_small_backing("8m")
    data_dir = ext4 / "data"
    server = disks.server(data_dir)
    clients = {name: server.client() for name in ("c1", "c2")}
    acked: dict[str, list[tuple[bytes, bytes]]] = {name: [] for name in clients}
    for name, client in clients.items():
        for i in range(5):
            event = (b"small-%d" % i, b"s" * 10_000)
            assert client.call("publish", name, *event) == b"+OK\r\n"
            acked[name].append(event)
    filler = fill(backing)
    # ext4 takes every write into the page cache; the sync is what fails. Two clients
    # pipelining: whoever waits on a failed group commit gets the error.
    failures = []
    for round_ in range(30):
        for name, client in clients.items():
            client.send(b"".join(command("publish", name, b"r%d-%d" % (round_, k),
                                         bytes([k]) * 200_000) for k in range(3)))
        for name, client in clients.items():
            for k in range(3):
                reply = client.read_reply()
                if reply == b"+OK\r\n":
                    acked[name].append((b"r%d-%d" % (round_, k), bytes([k]) * 200_000))
                else:
                    assert_storage_failure(reply, "No space left on device")
                    failures.append(reply)
        if failures:
            break
    assert failures, "30 MB were synced onto an 8 MB device"
    assert any(b"fdatasync" in reply for reply in failures), failures
    for name, client in clients.items():
        assert last_number(client, name) == len(acked[name]) - 1
        assert stored(server.client(), name, len(acked[name])) == acked[name]

    filler.unlink()  # space returns
    for name, client in clients.items():
        event = (b"after", b"a" * 200_000)
        assert client.call("publish", name, *event) == b"+OK\r\n"
        acked[name].append(event)
    server.kill()
    fsck_clean(data_dir)
    restarted = disks.server(data_dir, port=server.port)
    client = restarted.client()
    for name in clients:
        assert stored(client, name, len(acked[name])) == acked[name]
        assert last_number(client, name) == len(acked[name]) - 1
    assert "sync failed" in server.log()
    assert_no_traceback(server)
    assert_no_traceback(restarted)


# -- EFBIG --------------------------------------------------------------------------------------


def test_the_file_size_limit_fails_writes_with_efbig_until_it_is_raised(start_server, tmp_path):
    server = start_server()
    client = server.client()
    events = [(b"e%d" % i, b"k" * 1000) for i in range(10)]
    client.send(b"".join(command("publish", "s", *e) for e in events))
    client.expect(b"+OK\r\n" * 10)
    segment = next((tmp_path / "data").glob("*.seg"))
    limit = segment.stat().st_size + 20_000
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    # Two fit under the limit; the third is written in part, fails and is cut back.
    for i in range(2):
        assert client.call("publish", "s", b"big-%d" % i, b"b" * 8000) == b"+OK\r\n"
        events.append((b"big-%d" % i, b"b" * 8000))
    assert_storage_failure(client.call("publish", "s", "big-2", b"b" * 8000), "File too large")
    assert_storage_failure(client.call("append", "s", "11", "x", b"1" * 3000, "y", b"2" * 3000),
                           "File too large")
    assert_storage_failure(client.call("publish", "other", "e", b"o" * 8000), "File too large")
    assert segment.stat().st_size <= limit
    assert client.call("stream-names") == b"*2\r\n+stream-names\r\n+s\r\n"
    assert stored(server.client(), "s", 12) == events
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert client.call("append", "s", "11", "x", b"1" * 3000, "y", b"2" * 3000) == b":13\r\n"
    events += [(b"x", b"1" * 3000), (b"y", b"2" * 3000)]
    assert server.stop() == 0
    fsck_clean(tmp_path / "data")
    restarted = start_server(data_dir=tmp_path / "data")
    assert stored(restarted.client(), "s", 14) == events
    assert "recovery:" not in restarted.log()
    assert_no_traceback(server)
    assert_no_traceback(restarted)
