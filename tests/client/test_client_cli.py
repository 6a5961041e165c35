"""``meilies-cli``: every subcommand through click's CliRunner, and ``subscribe`` as a
real process through ``kill -9`` restarts, Ctrl-C and ``--exec``."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from click.testing import CliRunner
from client_support import TIMEOUT
from serverproc import free_port, wait_for

from meilies.cli.client import main, printable


def cli(port: int, *args: str, input=None, env=None):
    result = CliRunner().invoke(main, ["-p", str(port), *args], input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_publish_takes_data_from_the_argument_or_stdin(server, client):
    result = cli(server.port, "publish", "s", "created", '{"total": 12}')
    assert (result.exit_code, result.stdout, result.stderr) == (0, "OK\n", "")
    assert cli(server.port, "publish", "s", "raw", "-", input=b"a\r\n\x00\xff").exit_code == 0
    events = list(client.subscribe("s:0:2"))
    assert [(e.name, e.data) for e in events] == [("created", b'{"total": 12}'),
                                                  ("raw", b"a\r\n\x00\xff")]


def test_append_prints_the_last_number_and_exits_3_on_a_conflict(server, client):
    result = cli(server.port, "append", "s", "none", "a", "1", "b", "-", input=b"stdin")
    assert (result.exit_code, result.stdout) == (0, "1\n")
    assert [e.data for e in client.subscribe("s:0:2")] == [b"1", b"stdin"]
    result = cli(server.port, "append", "s", "0", "c", "x")
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr == "meilies-cli: WRONGEXPECTED stream s is at 1, expected 0\n"
    assert cli(server.port, "append", "s", "ANY", "c", "x").stdout == "2\n"


@pytest.mark.parametrize("args", [("s", "any", "a"), ("s", "any"), ("s", "sometimes", "a", "1"),
                                  ("s", "any", "a", "-", "b", "-")])
def test_append_usage_errors_exit_2(server, args):
    result = cli(server.port, "append", *args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_last_event_number_prints_a_number_or_none(server, client):
    assert cli(server.port, "last-event-number", "s").stdout == "none\n"
    client.publish_many("s", [("e", "")] * 3)
    assert cli(server.port, "last-event-number", "s").stdout == "2\n"


def test_stream_names_one_per_line(server, client):
    assert cli(server.port, "stream-names").stdout == ""
    for name in ["b", "a", "é"]:
        client.publish(name, "e", "")
    assert cli(server.port, "stream-names").stdout == "a\nb\né\n"


def test_ping(server):
    assert cli(server.port, "ping").stdout == "PONG\n"
    assert cli(server.port, "ping", "hello").stdout == "hello\n"
    result = CliRunner().invoke(main, ["-h", "127.0.0.1", "--port", str(server.port), "ping"])
    assert result.stdout == "PONG\n"


def test_help_is_long_only_because_h_is_the_host():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "-h, --host" in result.stdout
    assert "subscribe" in result.stdout


@pytest.mark.parametrize("args", [("ping",), ("publish", "s", "e", "d"), ("stream-names",),
                                  ("last-event-number", "s"), ("append", "s", "any", "e", "d"),
                                  ("subscribe", "s:0")])
def test_connection_refused_is_one_line_and_exit_1(args):
    result = cli(free_port(), *args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("meilies-cli: cannot connect to 127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_a_server_error_is_one_line_and_exit_1(server):
    result = cli(server.port, "publish", "bad name", "e", "d")
    assert result.exit_code == 1
    assert result.stderr.startswith("meilies-cli: server error: ERR invalid stream")
    assert result.stderr.count("\n") == 1


def test_password_from_the_option_or_the_environment(start_server):
    server = start_server("--requirepass", "sesame")
    result = cli(server.port, "ping")
    assert result.exit_code == 1
    assert "NOAUTH" in result.stderr
    assert cli(server.port, "--password", "wrong", "ping").stderr.startswith(
        "meilies-cli: server error: WRONGPASS")
    assert cli(server.port, "--password", "sesame", "ping").stdout == "PONG\n"
    assert cli(server.port, "ping", env={"MEILIES_PASSWORD": "sesame"}).stdout == "PONG\n"


def test_printable_keeps_an_event_on_one_unambiguous_line():
    assert printable(b'{"a": "\xc3\xa9"}') == '{"a": "é"}'
    assert printable(b"a\nb\r\tc\x00\x7f") == "a\\nb\\r\\tc\\x00\\x7f"
    assert printable(b"\xff\xfe") == "\\xff\\xfe"
    assert printable(b"back\\slash \\xff") == "back\\\\slash \\\\xff"
    assert printable("\u2028\u0085".encode()) == "\\u2028\\x85"


def test_subscribe_prints_lines_and_ends_with_a_bounded_range(server, client):
    client.publish("s", "created", "hello world")
    client.publish("s", "bin", b"\x00\xffz\n")
    result = cli(server.port, "subscribe", "s:0:2")
    assert result.exit_code == 0
    assert result.stdout == "s 0 created hello world\ns 1 bin \\x00\\xffz\\n\n"


def test_subscribe_json_lines(server, client):
    client.publish("s", "created", "héllo")
    client.publish("s", "bin", b"\xff")
    result = cli(server.port, "subscribe", "--json", "s:0:2")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [{"stream": "s", "number": 0, "name": "created", "data": "héllo"},
                     {"stream": "s", "number": 1, "name": "bin", "data_base64": "/w=="}]


@pytest.mark.parametrize("spec", ["s:", "s:3:1", "$all", "a:1:2:3"])
def test_subscribe_refuses_a_bad_spec_with_exit_2(server, spec):
    result = cli(server.port, "subscribe", *(["$all", "s"] if spec == "$all" else [spec]))
    assert result.exit_code == 2


RECORDER = textwrap.dedent("""\
    import json, os, sys
    out, code = sys.argv[1], int(sys.argv[2])
    record = {key: os.environ.get(key) for key in
              ("MEILIES_STREAM_NAME", "MEILIES_EVENT_NAME", "MEILIES_EVENT_NUMBER")}
    record["stdin"] = sys.stdin.buffer.read().hex()
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\\n")
    sys.exit(code)
""")


@pytest.fixture
def recorder(tmp_path):
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    out = tmp_path / "calls.jsonl"

    def command(exit_code: int = 0) -> str:
        return shlex.join([sys.executable, str(script), str(out), str(exit_code)])

    def calls() -> list[dict]:
        return [json.loads(line) for line in out.read_text().splitlines()] \
            if out.exists() else []

    command.calls = calls
    return command


def test_subscribe_exec_runs_the_command_per_event_with_env_and_stdin(server, client, recorder):
    client.publish("orders", "created", b"\x00data\n")
    client.publish("orders", "paid", b"")
    result = cli(server.port, "subscribe", "orders:0:2", "--exec", recorder())
    assert result.exit_code == 0, result.output
    assert recorder.calls() == [
        {"MEILIES_STREAM_NAME": "orders", "MEILIES_EVENT_NAME": "created",
         "MEILIES_EVENT_NUMBER": "0", "stdin": b"\x00data\n".hex()},
        {"MEILIES_STREAM_NAME": "orders", "MEILIES_EVENT_NAME": "paid",
         "MEILIES_EVENT_NUMBER": "1", "stdin": ""},
    ]


def test_subscribe_exec_stops_with_the_command_exit_code(server, client, recorder):
    client.publish_many("s", [("e", str(i)) for i in range(3)])
    result = cli(server.port, "subscribe", "s:0:3", "--exec", recorder(7))
    assert result.exit_code == 7
    assert len(recorder.calls()) == 1
    assert "command exited with 7 on event 0 of s" in result.stderr


def test_subscribe_exec_keep_going(server, client, recorder):
    client.publish_many("s", [("e", str(i)) for i in range(3)])
    result = cli(server.port, "subscribe", "s:0:3", "--exec", recorder(7), "--keep-going")
    assert result.exit_code == 0
    assert [call["stdin"] for call in recorder.calls()] == [b"0".hex(), b"1".hex(), b"2".hex()]
    assert result.stderr.count("going on") == 3


# -- subscribe as a real process ---------------------------------------------------------------


class CliProcess:
    """``meilies-cli ... subscribe`` as a child process; stdout lines collected."""

    def __init__(self, port: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meilies.cli.client", "-p", str(port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.stderr = ""
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip("\n"))

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr += line.decode()

    def wait_lines(self, n: int) -> list[str]:
        wait_for(lambda: len(self.lines) >= n or self.proc.poll() is not None, TIMEOUT,
                 what=f"{n} lines from meilies-cli (have {len(self.lines)})")
        assert len(self.lines) >= n, f"meilies-cli exited {self.proc.returncode}: {self.stderr}"
        return self.lines

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(TIMEOUT)
        for thread in self._threads:
            thread.join(TIMEOUT)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


@pytest.fixture
def cli_process():
    started: list[CliProcess] = []

    def start(port: int, *args: str) -> CliProcess:
        process = CliProcess(port, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def test_cli_subscribe_resumes_through_kill_9_and_exits_0_on_ctrl_c(
        server, start_server, client, cli_process):
    client.publish_many("s", [("e", f"d{i}") for i in range(100)])
    process = cli_process(server.port, "subscribe", "s:0")
    expected = [f"s {i} e d{i}" for i in range(100)]
    for round_ in range(2):
        process.wait_lines(1)
        server.kill()  # likely in the middle of the 100
        server = start_server(data_dir=server.data_dir, port=server.port)
        start = len(expected)
        client.publish_many("s", [("e", f"d{i}") for i in range(start, start + 100)])
        expected += [f"s {i} e d{i}" for i in range(start, start + 100)]
        process.wait_lines(len(expected))
    assert process.lines == expected
    assert process.stderr.count("reconnected") == 2
    assert process.interrupt() == 0
    assert "Traceback" not in process.stderr
    assert "Aborted" not in process.stderr


def test_cli_subscribe_all_resumes_through_kill_9(server, start_server, client, cli_process):
    client.publish("old", "e", "before")
    process = cli_process(server.port, "subscribe", "--json", "$all")
    wait_for(lambda: b"subscribers:1" in client.execute_command("info"), TIMEOUT,
             what="the CLI to subscribe")
    counts: dict[str, int] = {"old": 1}
    for round_ in range(2):
        for i in range(60):
            stream = ["a", "b", "old", f"new{round_}"][i % 4]
            client.publish(stream, "e", f"{stream}{counts.get(stream, 0)}")
            counts[stream] = counts.get(stream, 0) + 1
        server.kill()
        server = start_server(data_dir=server.data_dir, port=server.port)
        client.publish("a", "e", f"a{counts['a']}")
        counts["a"] += 1
        process.wait_lines(sum(counts.values()) - 1)
    got: dict[str, list[tuple[int, str]]] = {}
    for line in process.lines:
        event = json.loads(line)
        got.setdefault(event["stream"], []).append((event["number"], event["data"]))
    first = {"old": 1}
    assert got == {stream: [(i, f"{stream}{i}") for i in range(first.get(stream, 0), count)]
                   for stream, count in counts.items()}
    assert process.interrupt() == 0


def test_the_console_script_reports_connection_refused_without_a_traceback():
    result = subprocess.run(["meilies-cli", "-p", str(free_port()), "stream-names"],
                            capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("meilies-cli: cannot connect to")
    assert b"Traceback" not in result.stderr
