"""Real clients against the real server: ``redis-cli`` and redis-py."""

import shutil
import subprocess

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from serverproc import DEADLINE, command, event_frame, subscribed, wait_for

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed")


def cli(server, *args: str, stdin: bytes | None = None, raw: bool = True) -> subprocess.CompletedProcess:
    """Run ``redis-cli -p PORT ARGS`` (under ``timeout``) and return what it did."""
    cmd = ["timeout", str(int(DEADLINE)), "redis-cli", "-p", str(server.port)]
    if not raw:
        cmd.append("--no-raw")
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True,
                          timeout=DEADLINE + 5)


def info_field(client, key: str) -> str:
    body = client.call("info").split(b"\r\n", 1)[1].decode()
    return dict(line.split(":", 1) for line in body.splitlines() if ":" in line)[key]


# -- redis-cli -------------------------------------------------------------------------------


def test_redis_cli_publish_and_last_event_number(server):
    assert cli(server, "publish", "s", "created", "hello world").stdout == b"OK\n"
    assert cli(server, "PUBLISH", "s", "renamed", "").stdout == b"OK\n"
    assert cli(server, "last-event-number", "s").stdout == b"last-event-number\ns\n1\n"
    formatted = cli(server, "last-event-number", "s", raw=False).stdout
    # Simple strings print bare, the number as an integer, the nil as (nil).
    assert formatted == b"1) last-event-number\n2) s\n3) (integer) 1\n"
    assert cli(server, "last-event-number", "none", raw=False).stdout == \
        b"1) last-event-number\n2) none\n3) (nil)\n"


def test_redis_cli_stream_names(server):
    for stream in ["b", "a", "c"]:
        assert cli(server, "publish", stream, "e", "x").stdout == b"OK\n"
    assert cli(server, "stream-names").stdout == b"stream-names\na\nb\nc\n"
    assert cli(server, "stream-names", raw=False).stdout == \
        b"1) stream-names\n2) a\n3) b\n4) c\n"


def test_redis_cli_append_and_its_errors(server):
    assert cli(server, "append", "s", "none", "a", "1", "b", "2").stdout == b"1\n"
    assert cli(server, "append", "s", "1", "c", "3", raw=False).stdout == b"(integer) 2\n"
    failed = cli(server, "-e", "append", "s", "0", "d", "4")
    assert failed.returncode == 1
    assert b"WRONGEXPECTED stream s is at 2, expected 0" in failed.stdout + failed.stderr
    assert cli(server, "nosuch", raw=False).stdout == b"(error) ERR unknown command 'nosuch'\n"


def test_redis_cli_publishes_binary_data_from_stdin_byte_exact(server):
    data = bytes(range(256)) * 4 + b"\r\n\x00"
    assert cli(server, "-x", "publish", "s", "blob", stdin=data).stdout == b"OK\n"
    client = server.client()
    client.send(command("subscribe", "s:0:1"))
    client.expect(subscribed(b"s") + event_frame(b"s", 0, b"blob", data))


def test_redis_cli_authenticates_with_a_password(start_server):
    server = start_server("--requirepass", "s3cret")
    refused = cli(server, "publish", "s", "e", "x")
    assert refused.stdout.startswith(b"NOAUTH Authentication required.")
    assert cli(server, "-a", "s3cret", "--no-auth-warning", "publish", "s", "e", "x").stdout \
        == b"OK\n"
    wrong = cli(server, "-a", "nope", "--no-auth-warning", "ping")
    assert b"WRONGPASS" in wrong.stdout + wrong.stderr


def test_redis_cli_reads_commands_from_stdin(server):
    out = cli(server, stdin=b"publish s e one\nlast-event-number s\nping\n").stdout
    assert out == b"OK\nlast-event-number\ns\n0\nPONG\n"


def test_redis_cli_subscribe_streams_stored_then_live_events(server):
    client = server.client()
    assert client.call("publish", "s", "first", "one") == b"+OK\r\n"
    proc = subprocess.Popen(["timeout", str(int(DEADLINE)), "redis-cli", "-p", str(server.port),
                             "subscribe", "s:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def lines(n):
            return [proc.stdout.readline() for _ in range(n)]

        assert lines(2) == [b"subscribed\n", b"s\n"]
        assert lines(5) == [b"event\n", b"s\n", b"0\n", b"first\n", b"one\n"]
        wait_for(lambda: info_field(client, "subscribers") == "1", what="subscribers:1")
        assert client.call("publish", "s", "second", "two") == b"+OK\r\n"
        assert client.call("publish", "s", "third", "three") == b"+OK\r\n"
        assert lines(10) == [b"event\n", b"s\n", b"1\n", b"second\n", b"two\n",
                             b"event\n", b"s\n", b"2\n", b"third\n", b"three\n"]
    finally:
        proc.terminate()  # timeout(1) passes SIGTERM on to redis-cli
        proc.wait(DEADLINE)
        proc.stdout.close()
        proc.stderr.close()
    wait_for(lambda: info_field(client, "subscribers") == "0", what="subscribers:0")


def test_redis_cli_with_resp3_works_too(server):
    assert cli(server, "-3", "publish", "s", "e", "x").stdout == b"OK\n"
    assert cli(server, "-3", "last-event-number", "s").stdout == b"last-event-number\ns\n0\n"


# -- redis-py ----------------------------------------------------------------------------------


def redis_py(server, **kwargs) -> redis.Redis:
    # No retries: redis-py would retry a refused AUTH with backoff, for seconds.
    return redis.Redis(port=server.port, socket_timeout=DEADLINE, socket_connect_timeout=DEADLINE,
                       retry=Retry(NoBackoff(), 0), **kwargs)


@pytest.mark.parametrize("protocol", [None, 2, 3])
def test_redis_py_runs_every_command(server, protocol):
    r = redis_py(server, **({} if protocol is None else {"protocol": protocol}))
    try:
        assert r.execute_command("publish", "s", "created", b"a\r\nb\x00") in (b"OK", True)
        assert r.execute_command("append", "s", "any", "x", "1", "y", b"") == 2
        assert r.execute_command("append", "s", 2, "z", "2") == 3
        assert r.execute_command("last-event-number", "s") == [b"last-event-number", b"s", 3]
        assert r.execute_command("last-event-number", "empty") == \
            [b"last-event-number", b"empty", None]
        assert r.execute_command("publish", "a", "e", "1") in (b"OK", True)
        assert r.execute_command("stream-names") == [b"stream-names", b"a", b"s"]
        assert r.ping() is True
        assert r.execute_command("PING", "hi") in (b"hi", False)
    finally:
        r.close()
    client = server.client()
    client.send(command("subscribe", "s:0:2"))
    client.expect(subscribed(b"s") + event_frame(b"s", 0, b"created", b"a\r\nb\x00")
                  + event_frame(b"s", 1, b"x", b"1"))


def test_redis_py_raises_response_error_for_error_replies(server):
    r = redis_py(server)
    try:
        r.execute_command("append", "s", "none", "a", "1")
        with pytest.raises(redis.ResponseError, match="WRONGEXPECTED stream s is at 0, expected 5"):
            r.execute_command("append", "s", 5, "b", "2")
        with pytest.raises(redis.ResponseError, match="unknown command 'nosuch'"):
            r.execute_command("nosuch")
        with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'publish'"):
            r.execute_command("publish", "s", "e")
        with pytest.raises(redis.ResponseError, match="stream"):
            r.execute_command("publish", "a:b", "e", "x")
        with pytest.raises(redis.ResponseError, match="invalid subscription spec"):
            r.execute_command("subscribe", "s:5:2")
        assert r.execute_command("last-event-number", "s") == [b"last-event-number", b"s", 0]
    finally:
        r.close()


def test_redis_py_pipeline_answers_in_order(server):
    r = redis_py(server)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(200):
            pipe.execute_command("publish", "s", "e", str(i))
        pipe.execute_command("last-event-number", "s")
        results = pipe.execute()
        assert results[:200] == [b"OK"] * 200 or results[:200] == [True] * 200
        assert results[200] == [b"last-event-number", b"s", 199]
    finally:
        r.close()


def test_redis_py_with_a_password(start_server):
    server = start_server("--requirepass", "s3cret")
    for protocol in (2, 3):
        r = redis_py(server, password="s3cret", protocol=protocol)
        try:
            assert r.execute_command("publish", "s", "e", "x") in (b"OK", True)
        finally:
            r.close()
        wrong = redis_py(server, password="nope", protocol=protocol)
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        wrong.close()
        anonymous = redis_py(server, protocol=protocol)
        with pytest.raises((redis.AuthenticationError, redis.ResponseError),
                           match="Authentication required"):
            anonymous.execute_command("stream-names")
        anonymous.close()


def test_redis_py_info_parses(server):
    r = redis_py(server)
    try:
        r.execute_command("publish", "s", "e", "x")
        info = r.info()
        assert info["events"] == 1 and info["streams"] == 1 and info["fsync"] == "always"
    finally:
        r.close()


# -- the read side of PROTOCOL.md v2, through both ----------------------------------------------


def test_redis_cli_range_revrange_scan_and_envelope(server):
    assert cli(server, "append", "s", "any", "a", "1", "b", "2").stdout == b"1\n"
    assert cli(server, "publish", "t", "c", "3").stdout == b"OK\n"
    ranged = cli(server, "range", "s", "-", "+").stdout.split(b"\n")
    # Nine lines per event: event, stream, number, name, data, position, timestamp, and
    # two nils (empty lines in --raw).
    assert len(ranged) == 19 and ranged[:6] == [b"event", b"s", b"0", b"a", b"1", b"0"]
    assert ranged[9:15] == [b"event", b"s", b"1", b"b", b"2", b"1"]
    assert ranged[6].isdigit() and ranged[7:9] == [b"", b""]
    formatted = cli(server, "revrange", "$all", "+", "-", "COUNT", "1", raw=False).stdout
    assert formatted.startswith(b"1) 1) event\n   2) t\n   3) (integer) 0\n   4) c\n"
                                b"   5) \"3\"\n   6) (integer) 2\n   7) (integer) ")
    assert formatted.endswith(b"\n   8) (nil)\n   9) (nil)\n")
    assert cli(server, "range", "none", "-", "+", raw=False).stdout == b"(empty array)\n"
    assert cli(server, "scan-streams", "0", "MATCH", "t*", raw=False).stdout == \
        b"1) \"0\"\n2) 1) t\n"
    assert cli(server, "envelope", "full").stdout == b"OK\n"
    bad = cli(server, "range", "s", "x", "+", raw=False).stdout
    assert bad.startswith(b"(error) ERR invalid start 'x'")


def test_redis_cli_subscribes_by_position(server):
    client = server.client()
    for i in range(3):
        assert client.call("publish", f"s{i}", "e", str(i)) == b"+OK\r\n"
    proc = subprocess.Popen(["timeout", str(int(DEADLINE)), "redis-cli", "-p", str(server.port),
                             "subscribe", "$all@1:3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert [proc.stdout.readline() for _ in range(12)] == [
            b"subscribed\n", b"$all\n", b"event\n", b"s1\n", b"0\n", b"e\n", b"1\n",
            b"event\n", b"s2\n", b"0\n", b"e\n", b"2\n"]
    finally:
        proc.terminate()
        proc.wait(DEADLINE)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("protocol", [None, 2, 3])
def test_redis_py_runs_the_read_commands(server, protocol):
    r = redis_py(server, **({} if protocol is None else {"protocol": protocol}))
    try:
        assert r.execute_command("append", "s", "any", "a", "1", "b", b"\x00\r\n") == 1
        assert r.execute_command("publish", "t", "c", "3") in (b"OK", True)
        ranged = r.execute_command("range", "s", "-", "+")
        assert [f[:6] for f in ranged] == [[b"event", b"s", 0, b"a", b"1", 0],
                                           [b"event", b"s", 1, b"b", b"\x00\r\n", 1]]
        assert all(isinstance(f[6], int) and f[7:] == [None, None] for f in ranged)
        last = r.execute_command("revrange", "$all", "+", "-", "COUNT", "1")
        assert [f[:6] for f in last] == [[b"event", b"t", 0, b"c", b"3", 2]]
        assert r.execute_command("range", "$all", "1", "1")[0][1] == b"s"
        assert r.execute_command("range", "nope", "-", "+") == []
        assert r.execute_command("scan-streams", "0", "COUNT", "1") == [b"73", [b"s"]]
        assert r.execute_command("scan-streams", "73") == [b"0", [b"t"]]
        assert r.execute_command("envelope", "original") in (b"OK", True)
        with pytest.raises(redis.ResponseError, match="invalid COUNT '0'"):
            r.execute_command("range", "s", "-", "+", "COUNT", "0")
        pipe = r.pipeline(transaction=False)
        pipe.execute_command("range", "s", "0", "0")
        pipe.execute_command("revrange", "s", "+", "-", "COUNT", "1")
        pipe.execute_command("ping")
        first, second, pong = pipe.execute()
        assert first[0][4] == b"1" and second[0][4] == b"\x00\r\n" and pong in (True, b"PONG")
    finally:
        r.close()
