"""Starting and stopping the real process: clean stops, refusals to start, damaged logs."""

import os
import re
import signal
import socket
import threading

import pytest

from serverproc import DEADLINE, ServerProcess, command, event_frame, subscribed, wait_for


def publish_many(client, stream: str, count: int, size: int = 100) -> list[bytes]:
    datas = [b"%s-%06d-" % (stream.encode(), i) + b"." * size for i in range(count)]
    client.send(b"".join(command("publish", stream, "e", d) for d in datas))
    client.expect(b"+OK\r\n" * count)
    return datas


def read_frames(client, stream: str, count: int) -> bytes:
    client.send(command("subscribe", f"{stream}:0:{count}"))
    client.expect(subscribed(stream.encode()))
    return b"".join(client.read_reply() for _ in range(count))


def frames(stream: bytes, datas: list[bytes]) -> bytes:
    return b"".join(event_frame(stream, i, b"e", d) for i, d in enumerate(datas))


def segments(data_dir) -> list:
    return sorted(data_dir.glob("*.seg"))


def failure_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if line.startswith("meilies-server:")]


def info_field(client, key: str) -> str:
    body = client.call("info").split(b"\r\n", 1)[1].decode()
    return dict(line.split(":", 1) for line in body.splitlines() if ":" in line)[key]


# -- clean stops --------------------------------------------------------------------------


def test_sigterm_with_idle_and_subscribed_clients_exits_0_and_keeps_everything(start_server,
                                                                              tmp_path):
    server = start_server()
    client = server.client()
    datas = publish_many(client, "s", 200, size=20_000)  # 4 MB: more than socket buffers
    idle = server.client()
    live = server.client()
    live.send(command("subscribe", "s:0", "$all"))
    live.expect(subscribed(b"s") + subscribed(b"$all"))
    # One that subscribed to a backlog and never reads (its subscriptions block in a
    # send), one mid-request.
    stuck = server.client()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send(command("subscribe", "s:0", "s:0", "s:0"))
    partial = server.client()
    partial.send(command("publish", "s", "e", "never finished")[:-5])
    wait_for(lambda: info_field(client, "subscribers") == "5", what="subscribers:5")
    assert server.stop() == 0
    for connection in (idle, live, partial, client):
        assert connection.closed_by_peer()
    assert "Traceback" not in server.log()
    restarted = start_server(data_dir=tmp_path / "data")
    reader = restarted.client()
    assert read_frames(reader, "s", 200) == frames(b"s", datas)
    assert reader.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:199\r\n"


def test_sigint_stops_cleanly_too(start_server, tmp_path):
    server = start_server()
    datas = publish_many(server.client(), "s", 10)
    server.proc.send_signal(signal.SIGINT)
    assert server.wait_exit(DEADLINE) == 0
    restarted = start_server(data_dir=tmp_path / "data")
    assert read_frames(restarted.client(), "s", 10) == frames(b"s", datas)


def caught_signals(pid: int) -> set[int]:
    """The signals the process has handlers for (``SigCgt`` in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return {signum for signum in range(1, 65) if mask & (1 << (signum - 1))}


@pytest.mark.embedded_only
@pytest.mark.parametrize("policy", ["always", "no"])
def test_a_server_that_accepts_connections_already_stops_cleanly_on_sigterm(start_server,
                                                                           tmp_path, policy):
    # A supervisor may stop the server the moment its port opens: the handlers and the
    # fdatasync helper come before listening, not after.
    for attempt in range(3):
        server = start_server("--fsync", policy, data_dir=tmp_path / f"{policy}{attempt}")
        assert signal.SIGTERM in caught_signals(server.proc.pid), server.log()
        assert len(helper_pids(server)) == (policy == "always")
        assert server.stop() == 0, server.log()


def test_sigterm_while_publishers_pipeline_keeps_every_acknowledged_event(start_server, tmp_path):
    server = start_server()
    client = server.client()
    datas = publish_many(client, "s", 50)
    more = [b"more-%d" % i for i in range(2000)]
    client.send(b"".join(command("publish", "s", "e", d) for d in more))
    client.read_exactly(5)  # at least one more acknowledged: the stop comes mid-stream
    assert server.stop() == 0
    acked = 1
    while True:
        try:
            if client.read_reply() != b"+OK\r\n":
                break
            acked += 1
        except ConnectionError:
            break
    restarted = start_server(data_dir=tmp_path / "data")
    reader = restarted.client()
    reply = reader.call("last-event-number", "s")
    stored_count = int(reply.rsplit(b":", 1)[1]) + 1
    assert stored_count >= 50 + acked
    assert read_frames(reader, "s", stored_count) == frames(b"s", (datas + more)[:stored_count])


def test_a_missing_data_directory_is_created(start_server, tmp_path):
    data_dir = tmp_path / "not-yet"
    assert not data_dir.exists()
    server = start_server(data_dir=data_dir)
    assert server.client().call("publish", "s", "e", "x") == b"+OK\r\n"
    assert segments(data_dir)


# -- refusals to start ----------------------------------------------------------------------


def test_a_port_already_in_use_exits_1_with_a_one_line_message(start_server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(port=port, wait=False)
        assert server.wait_exit(DEADLINE) == 1
    lines = failure_lines(server)
    assert len(lines) == 1, server.log()
    assert str(port) in lines[0] and "in use" in lines[0]
    assert "Traceback" not in server.log()


def test_a_locked_data_directory_exits_1_naming_the_lock(start_server, tmp_path):
    first = start_server()
    assert first.client().call("publish", "s", "e", "x") == b"+OK\r\n"
    second = start_server(data_dir=tmp_path / "data", wait=False)
    assert second.wait_exit(DEADLINE) == 1
    lines = failure_lines(second)
    assert len(lines) == 1, second.log()
    assert "lock" in lines[0] and str(tmp_path / "data") in lines[0]
    assert "Traceback" not in second.log()
    # The first one is untouched.
    assert first.client().call("last-event-number", "s") == \
        b"*3\r\n+last-event-number\r\n+s\r\n:0\r\n"


def test_a_byte_flipped_in_an_old_record_refuses_to_start_naming_file_and_offset(start_server,
                                                                                tmp_path):
    server = start_server()
    client = server.client()
    marker = b"FIRST-EVENT-PAYLOAD" + b"#" * 500
    assert client.call("publish", "s", "e", marker) == b"+OK\r\n"
    publish_many(client, "s", 20, size=500)
    assert server.stop() == 0
    segment = segments(tmp_path / "data")[0]
    raw = bytearray(segment.read_bytes())
    at = raw.index(marker) + 250
    raw[at] ^= 0x01
    segment.write_bytes(bytes(raw))

    damaged = start_server(data_dir=tmp_path / "data", wait=False)
    assert damaged.wait_exit(DEADLINE) == 1
    lines = failure_lines(damaged)
    assert len(lines) == 1, damaged.log()
    assert segment.name in lines[0]
    match = re.search(r"offset (\d+)", lines[0])
    assert match and int(match.group(1)) <= at, lines[0]
    assert "meilies-fsck" in lines[0]
    assert "Traceback" not in damaged.log()


@pytest.mark.embedded_only
def test_a_torn_record_at_the_tail_is_truncated_and_logged(start_server, tmp_path):
    server = start_server()
    client = server.client()
    # One round trip each: pipelined publishes to one stream share a record.
    datas = [publish_many(client, "s", 1, size=300)[0] for _ in range(10)]
    server.kill()  # no clean stop: the tail is where a crash leaves it
    segment = segments(tmp_path / "data")[-1]
    raw = segment.read_bytes()
    segment.write_bytes(raw[:-7])
    restarted = start_server(data_dir=tmp_path / "data")
    reader = restarted.client()
    assert reader.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:8\r\n"
    assert read_frames(reader, "s", 9) == frames(b"s", datas[:9])
    assert "truncated" in restarted.log()
    assert reader.call("publish", "s", "e", "again") == b"+OK\r\n"
    assert reader.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:9\r\n"


def _send_ignoring_errors(client, data: bytes) -> None:
    try:
        client.send(data)
    except OSError:
        pass  # the server went away while we were still sending


def test_sigterm_with_a_client_that_never_reads_its_replies_still_exits_0(start_server,
                                                                         tmp_path):
    server = start_server()
    client = server.client()
    assert client.call("publish", "s", "e", "kept") == b"+OK\r\n"
    hog = server.client()
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # 20 MB of replies nobody reads: the server blocks sending them, then stops
    # reading, so the requests go from a thread of their own.
    requests = command("ping", b"p" * 1_000_000) * 20
    sender = threading.Thread(target=lambda: _send_ignoring_errors(hog, requests), daemon=True)
    sender.start()
    wait_for(lambda: int(info_field(client, "connected_clients")) == 2, what="two clients")
    assert server.stop() == 0
    sender.join(DEADLINE)
    restarted = start_server(data_dir=tmp_path / "data")
    assert read_frames(restarted.client(), "s", 1) == frames(b"s", [b"kept"])


def test_a_byte_flipped_in_a_sealed_segment_refuses_to_start_naming_it(start_server, tmp_path):
    server = start_server("--fsync", "no")
    client = server.client()
    big = b"B" * (1024 * 1024 - 200)
    marker = b"IN-THE-FIRST-SEGMENT" + b"#" * 1000
    assert client.call("publish", "s", "e", marker) == b"+OK\r\n"
    for _ in range(70):  # past the 64 MiB default segment size: a roll seals the first
        assert client.call("publish", "s", "e", big) == b"+OK\r\n"
    assert server.stop() == 0
    sealed = segments(tmp_path / "data")
    assert len(sealed) >= 2
    raw = bytearray(sealed[0].read_bytes())
    at = raw.index(marker) + 500
    raw[at] ^= 0x40
    sealed[0].write_bytes(bytes(raw))
    damaged = start_server(data_dir=tmp_path / "data", wait=False)
    assert damaged.wait_exit(DEADLINE) == 1
    lines = failure_lines(damaged)
    assert len(lines) == 1, damaged.log()
    assert sealed[0].name in lines[0] and "meilies-fsck" in lines[0]
    match = re.search(r"offset (\d+)", lines[0])
    assert match and int(match.group(1)) <= at, lines[0]


# -- the fdatasync helper process ---------------------------------------------------------


def helper_pids(server: ServerProcess) -> list[int]:
    """The server's child processes (the fdatasync helper), from /proc."""
    pid = server.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.embedded_only
def test_the_fdatasync_helper_runs_under_always_and_everysec_only(start_server, tmp_path):
    for policy, helpers in (("always", 1), ("everysec", 1), ("no", 0)):
        server = start_server("--fsync", policy, data_dir=tmp_path / policy)
        assert len(helper_pids(server)) == helpers, policy
        assert server.stop() == 0


@pytest.mark.embedded_only
def test_the_helper_ends_with_the_server_on_sigterm_and_on_kill_9(start_server, tmp_path):
    server = start_server()
    client = server.client()
    publish_many(client, "s", 10)
    [helper] = helper_pids(server)
    assert server.stop() == 0
    wait_for(lambda: not alive(helper), what="the helper to exit after SIGTERM")
    server = start_server(data_dir=tmp_path / "again")
    [helper] = helper_pids(server)
    server.kill()  # kill -9: the helper sees its socket close and exits
    wait_for(lambda: not alive(helper), what="the helper to exit after kill -9")


@pytest.mark.embedded_only
def test_publishes_go_on_when_the_helper_is_killed(start_server):
    server = start_server()
    client = server.client()
    first = publish_many(client, "s", 50)
    [helper] = helper_pids(server)
    os.kill(helper, signal.SIGKILL)
    wait_for(lambda: not alive(helper), what="the helper to die")
    second = publish_many(client, "s", 50)  # synced on the event loop from now on
    assert read_frames(server.client(), "s", 100) == frames(b"s", first + second)
    assert "the fdatasync helper process is gone" in server.log()
    assert server.stop() == 0
