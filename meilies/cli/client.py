"""``meilies-cli``: the command-line client, a thin click layer over :mod:`meilies.client`.

Exit codes: 0 success; 1 cannot connect, connection lost, or the server refused the
request; 2 usage; 3 ``append`` whose expected version did not match; 4 ``append --id``
with an id already stored otherwise than by this very append (a retry of the same
command is not an error: it prints the first answer again). ``subscribe --exec``
exits with the failing command's code. No error prints a traceback: one
line on stderr.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone

import click

from ..client import (DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, Client, ConnectionError,
                      DuplicateEventId, Event, EventData, MeiliesError, ResponseError,
                      WrongExpectedVersion, parse_spec)

EXIT_ERROR = 1
EXIT_CONFLICT = 3
#: Not EXIT_CONFLICT: a script retries or re-reads on a version conflict, while an id
#: stored elsewhere means the id (or the script) is wrong and a retry cannot help.
EXIT_DUPLICATE_ID = 4

CLI_EPILOG = """\b
Examples:
  meilies-cli publish orders-17 created '{"total": 12}'
  echo '{"card": "..."}' | meilies-cli publish orders-17 paid -
  meilies-cli append orders-17 1 shipped '{}' delivered '{}'
  meilies-cli append orders-17 3 refunded '{}' --id 6f1c0e2a-... --metadata '{"by": "ops"}'
  meilies-cli subscribe orders-17:0 'customers-3:0:10'
  meilies-cli subscribe --json '$all'
  meilies-cli subscribe orders-17:0 --exec 'jq .total'
  meilies-cli last-event-number orders-17
  meilies-cli range orders-17 - + --count 50
  meilies-cli revrange '$all' + - --count 1
  meilies-cli subscribe --full '$all@1200'
  meilies-cli -h 10.0.0.5 -p 6480 --password secret stream-names
"""


def _fail(message: str, code: int = EXIT_ERROR):
    click.echo(f"meilies-cli: {message}", err=True)
    raise click.exceptions.Exit(code)


class _ClientGroup(click.Group):
    """Turns every client error into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WrongExpectedVersion as exc:
            _fail(str(exc), EXIT_CONFLICT)
        except DuplicateEventId as exc:
            _fail(str(exc), EXIT_DUPLICATE_ID)
        except ResponseError as exc:
            _fail(f"server error: {exc}")
        except ConnectionError as exc:
            _fail(str(exc))
        except MeiliesError as exc:
            _fail(f"{type(exc).__name__}: {exc}")


@click.group(cls=_ClientGroup, epilog=CLI_EPILOG,
             context_settings={"help_option_names": ["--help"]})
@click.option("-h", "--host", default=DEFAULT_HOST, show_default=True,
              help="Server address.")
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT,
              show_default=True, help="Server port.")
@click.option("--password", default=None, envvar="MEILIES_PASSWORD", metavar="PASS",
              help="Send AUTH PASS first (or set MEILIES_PASSWORD, which stays out of ps).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT,
              show_default=True, help="Seconds to wait to connect or for a reply.")
@click.pass_context
def main(ctx: click.Context, host: str, port: int, password: str | None,
         timeout: float) -> None:
    """Talk to a MeiliES server: publish, append, subscribe, inspect."""
    ctx.obj = Client(host, port, password=password, timeout=timeout)
    ctx.call_on_close(ctx.obj.close)


def _data(value: str) -> bytes:
    """DATA as given on the command line, or stdin's bytes for ``-``."""
    if value == "-":
        return sys.stdin.buffer.read()
    return os.fsencode(value)  # the argument's original bytes, even if not UTF-8


@main.command()
@click.argument("stream")
@click.argument("event")
@click.argument("data")
@click.pass_obj
def publish(client: Client, stream: str, event: str, data: str) -> None:
    """Append one EVENT with DATA to STREAM (DATA '-' reads stdin)."""
    client.publish(stream, event, _data(data))
    click.echo("OK")


@main.command()
@click.argument("stream")
@click.argument("expected")
@click.argument("events", nargs=-1, required=True, metavar="EVENT DATA [EVENT DATA]...")
@click.option("--id", "ids", multiple=True, metavar="ID",
              help="An event id: once per event, in order (a UUID is typical).")
@click.option("--metadata", multiple=True, metavar="M",
              help="Event metadata: once per event, in order, or once for every event.")
@click.pass_obj
def append(client: Client, stream: str, expected: str, events: tuple[str, ...],
           ids: tuple[str, ...], metadata: tuple[str, ...]) -> None:
    """Append EVENT DATA pairs to STREAM atomically; print the last event's number.

    EXPECTED is 'any', 'none' (STREAM must be empty) or the number STREAM's last event
    must have; on mismatch nothing is stored and the exit code is 3. One DATA may be
    '-' to read stdin.

    With --id or --metadata the events are stored with them (append-full), and the
    output is the last number and the last global position, on one line. With ids
    the command is safe to run again after a lost reply: if it was stored, the rerun
    stores nothing and prints the same line; an id stored by anything else exits 4.
    """
    if len(events) % 2:
        raise click.UsageError("events come in EVENT DATA pairs")
    if events[1::2].count("-") > 1:
        raise click.UsageError("only one DATA may be '-' (stdin)")
    count = len(events) // 2
    if ids and len(ids) != count:
        raise click.UsageError(f"give --id once per event: {len(ids)} for {count} events")
    if len(set(ids)) != len(ids):
        raise click.UsageError("each --id must be different")
    if "" in ids:
        raise click.UsageError("an --id cannot be empty")
    if len(metadata) not in (0, 1, count):
        raise click.UsageError(f"give --metadata once per event or once for all:"
                               f" {len(metadata)} for {count} events")
    expected_value = _expected(expected)
    pairs = [(events[i], _data(events[i + 1])) for i in range(0, len(events), 2)]
    if not (ids or metadata):
        click.echo(client.append(stream, pairs, expected=expected_value))
        return
    # Metadata as given, like DATA: the argument's own bytes, even if not UTF-8.
    metas: list[bytes | None] = [os.fsencode(m) for m in metadata] or [None]
    if len(metas) == 1:
        metas *= count  # one --metadata (or none) for every event
    event_ids: list[str | None] = list(ids) or [None] * count
    full = [EventData(name, data, event_id, meta)
            for (name, data), event_id, meta in zip(pairs, event_ids, metas)]
    result = client.append_full(stream, full, expected=expected_value)
    click.echo(f"{result.last_number} {result.last_position}")


def _expected(value: str) -> int | str:
    lowered = value.lower()
    if lowered in ("any", "none"):
        return lowered
    if value.isdigit() and value.isascii():
        return int(value)
    raise click.BadParameter("must be 'any', 'none' or an event number", param_hint="EXPECTED")


@main.command("last-event-number")
@click.argument("stream")
@click.pass_obj
def last_event_number(client: Client, stream: str) -> None:
    """Print the number of STREAM's last event, or 'none' when it has none
    (what 'append STREAM EXPECTED' takes)."""
    number = client.last_event_number(stream)
    click.echo("none" if number is None else number)


@main.command("stream-names")
@click.pass_obj
def stream_names(client: Client) -> None:
    """Print the name of every stream that has events, one per line, in byte order."""
    for name in client.stream_names():
        click.echo(name)


@main.command()
@click.argument("message", required=False)
@click.pass_obj
def ping(client: Client, message: str | None) -> None:
    """Check the server answers: print PONG (or MESSAGE echoed)."""
    click.echo(client.ping(message).decode(errors="backslashreplace"))


RANGE_HELP = """\b
START and END are event numbers of STREAM, or global positions with STREAM '$all'
(quote it in the shell); '-' is the first event, '+' the last, both ends included.
At most --count events (the server's cap without it: 10,000).

\b
Output: one line per event, 'stream number event-name data position timestamp'
(timestamp in ISO 8601 UTC, data escaped as for subscribe), or with --json
{"stream", "number", "name", "data", "position", "timestamp"} per line.
"""


def _range_bound(value: str, param: str) -> int | str:
    if value in ("-", "+"):
        return value
    if value.isdigit() and value.isascii():
        return int(value)
    raise click.BadParameter("must be '-', '+' or a non-negative integer", param_hint=param)


@main.command("range", epilog=RANGE_HELP)
@click.argument("stream")
@click.argument("start", default="-")
@click.argument("end", default="+")
@click.option("--count", type=click.IntRange(1, 100_000), default=None,
              help="Print at most this many events.")
@click.option("--json", "json_lines", is_flag=True, help="Print JSON lines.")
@click.pass_obj
def range_(client: Client, stream: str, start: str, end: str, count: int | None,
           json_lines: bool) -> None:
    """Print the events of STREAM from START to END, ascending."""
    events = client.range(stream, _range_bound(start, "START"), _range_bound(end, "END"),
                          count)
    _print_events(events, json_lines)


@main.command("revrange", epilog=RANGE_HELP)
@click.argument("stream")
@click.argument("end", default="+")
@click.argument("start", default="-")
@click.option("--count", type=click.IntRange(1, 100_000), default=None,
              help="Print at most this many events (the last ones).")
@click.option("--json", "json_lines", is_flag=True, help="Print JSON lines.")
@click.pass_obj
def revrange(client: Client, stream: str, end: str, start: str, count: int | None,
             json_lines: bool) -> None:
    """Print the events of STREAM from END down to START, descending."""
    events = client.revrange(stream, _range_bound(end, "END"), _range_bound(start, "START"),
                             count)
    _print_events(events, json_lines)


def _print_events(events, json_lines: bool) -> None:
    try:
        for event in events:
            click.echo(json.dumps(_as_json(event), ensure_ascii=False) if json_lines
                       else _as_line(event))
    except BrokenPipeError:
        _silence_stdout()


SUBSCRIBE_EPILOG = """\b
Specs: NAME (live only), NAME:FROM, NAME:FROM:TO (TO exclusive; ends after TO-1),
and the same for '$all' (quote it in the shell). One '$all' alone, or named
streams, each once.

\b
Output: one line per event, 'stream number event-name data'. Data that is not
printable UTF-8 is escaped (\\n, \\t, \\xNN; a backslash as \\\\), so an event is
always one line. --json prints {"stream", "number", "name", "data"} per line, with
"data_base64" instead of "data" when the data is not UTF-8. --full adds each
event's global position and timestamp (ISO 8601 UTC) to the line, and "position",
"timestamp" (ms since the epoch) to the JSON.

\b
'$all@POSITION' and '$all@FROM:TO' subscribe by global position.

\b
--exec COMMAND runs COMMAND with /bin/sh once per event, data on stdin, and
MEILIES_STREAM_NAME, MEILIES_EVENT_NAME, MEILIES_EVENT_NUMBER in its environment.
"""


@main.command(epilog=SUBSCRIBE_EPILOG)
@click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
@click.option("--json", "json_lines", is_flag=True, help="Print JSON lines.")
@click.option("--exec", "command", metavar="COMMAND",
              help="Run COMMAND per event instead of printing it.")
@click.option("--keep-going", is_flag=True,
              help="With --exec: go on after a failing COMMAND (default: stop with its code).")
@click.option("--max-retries", type=click.IntRange(min=0), default=None,
              help="Give up after this many failed reconnects in a row (default: never).")
@click.option("--no-reconnect", is_flag=True, help="Exit 1 when the connection drops.")
@click.option("--full", is_flag=True,
              help="Ask for full frames: print positions and timestamps too.")
@click.pass_obj
def subscribe(client: Client, specs: tuple[str, ...], json_lines: bool, command: str | None,
              keep_going: bool, max_retries: int | None, no_reconnect: bool,
              full: bool) -> None:
    """Print the events of SPEC... as they come; reconnect and resume after the last
    event printed when the connection drops (saying so on stderr). Ctrl-C exits 0."""
    for spec in specs:
        try:
            parse_spec(spec)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="SPEC") from None
    handler = _StderrHandler()
    logger = logging.getLogger("meilies.client")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    subscription = None
    try:
        try:
            subscription = client.subscribe(*specs, reconnect=not no_reconnect,
                                            max_retries=max_retries, full=full)
        except ValueError as exc:  # specs that cannot go together ('$all' and 's', 's' twice)
            raise click.UsageError(str(exc)) from None
        for event in subscription:
            if command is not None:
                _run(command, event, keep_going)
            elif json_lines:
                # A $all subscription gets positions anyway (it resumes by them): they
                # are printed only when asked for, as the help says.
                click.echo(json.dumps(_as_json(event, positions=full), ensure_ascii=False))
            else:
                click.echo(_as_line(event) if full else
                           f"{event.stream} {event.number} {event.name} {printable(event.data)}")
    except KeyboardInterrupt:
        raise click.exceptions.Exit(0) from None
    except BrokenPipeError:
        _silence_stdout()
        raise click.exceptions.Exit(0) from None
    finally:
        logger.removeHandler(handler)
        if subscription is not None:
            subscription.close()


class _StderrHandler(logging.Handler):
    """Reconnect news on stderr, as ``meilies-cli: ...`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"meilies-cli: {record.getMessage()}", err=True)


def _run(command: str, event: Event, keep_going: bool) -> None:
    env = dict(os.environ, MEILIES_STREAM_NAME=event.stream, MEILIES_EVENT_NAME=event.name,
               MEILIES_EVENT_NUMBER=str(event.number))
    sys.stdout.flush()
    code = subprocess.run(command, shell=True, input=event.data, env=env).returncode
    if code == 0:
        return
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention
    where = f"event {event.number} of {event.stream}"
    if keep_going:
        click.echo(f"meilies-cli: command exited with {code} on {where}; going on", err=True)
        return
    _fail(f"command exited with {code} on {where}; stopping", code)


def _as_json(event: Event, positions: bool = True) -> dict:
    line = {"stream": event.stream, "number": event.number, "name": event.name}
    try:
        line["data"] = event.data.decode()
    except UnicodeDecodeError:
        line["data_base64"] = base64.b64encode(event.data).decode()
    if positions and event.position is not None:
        line["position"] = event.position
        line["timestamp"] = event.timestamp
    if event.id is not None:
        line["id"] = event.id
    if event.metadata is not None:
        try:
            line["metadata"] = event.metadata.decode()
        except UnicodeDecodeError:
            line["metadata_base64"] = base64.b64encode(event.metadata).decode()
    return line


def _as_line(event: Event) -> str:
    """'stream number name data position timestamp' (the last two when known)."""
    line = f"{event.stream} {event.number} {event.name} {printable(event.data)}"
    if event.position is None:
        return line
    stamp = datetime.fromtimestamp(event.timestamp / 1000, timezone.utc)
    return f"{line} {event.position} {stamp.isoformat(timespec='milliseconds')[:-6]}Z"


# Control characters (C0, DEL, C1) and Unicode line/paragraph separators, escaped.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})


def printable(data: bytes) -> str:
    """``data`` as one line of text: UTF-8 shown as is, anything else escaped.

    Invalid UTF-8 bytes become ``\\xNN``, control characters ``\\n``, ``\\t``, ``\\xNN``,
    and a backslash ``\\\\``, so the escaping can be undone without ambiguity.
    """
    text = data.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text.translate(_ESCAPES)


def _silence_stdout() -> None:
    """stdout's reader went away (``| head``): drop what is left instead of failing
    again when Python flushes it at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # no real file descriptor (e.g. under CliRunner): nothing to redirect


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
