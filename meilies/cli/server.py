"""``meilies-server``: open a data directory and serve it over RESP."""

from __future__ import annotations

import errno
import logging
import sys

import click

from ..backends import BackendUnavailable
from ..backends.pgschema import SchemaTooNew
from ..backends.postgres import PostgresBackend
from ..engine import Engine
from ..engine.errors import CorruptionError, DirectoryLocked, EngineError
from ..engine.framecache import DEFAULT_MAX_BYTES as DEFAULT_FRAME_CACHE_BYTES
from ..engine.log import DEFAULT_SEGMENT_SIZE
from ..engine.names import DEFAULT_MAX_EVENT_SIZE
from ..server.app import DEFAULT_MAXCLIENTS, DEFAULT_PORT, Config, Server, raise_open_file_limit

log = logging.getLogger("meilies.server")

SERVER_EPILOG = """\b
Examples:
  meilies-server --data-dir ./data
  meilies-server --data-dir /var/lib/meilies --port 6480 --fsync everysec
  redis-cli -p 6480 publish orders-17 created '{"total": 12}'
"""


@click.command(epilog=SERVER_EPILOG)
@click.option("--data-dir", type=click.Path(file_okay=False), required=True,
              help="Directory holding segments and indexes (created if missing).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port to listen on (0 picks a free one).")
@click.option("--fsync", type=click.Choice(["always", "everysec", "no"]), default="always",
              show_default=True,
              help="always: answer writes once on stable storage (group commit); everysec:"
                   " sync once a second; no: leave it to the OS. No policy loses events on a"
                   " process crash. With --backend postgres: always waits for PostgreSQL's"
                   " commit (synchronous_commit on), the others do not (off).")
@click.option("--max-event-size", type=click.IntRange(0, 512 * 1024 * 1024),
              default=DEFAULT_MAX_EVENT_SIZE, show_default=True,
              help="Largest event data accepted, in bytes.")
@click.option("--requirepass", default=None, metavar="PASS",
              help="Require AUTH PASS before any other command.")
@click.option("--maxclients", type=click.IntRange(1), default=DEFAULT_MAXCLIENTS,
              show_default=True, help="Connections served at once; more are refused.")
@click.option("--segment-size", type=click.IntRange(1024, 2**32 - 1), default=DEFAULT_SEGMENT_SIZE,
              show_default=True, metavar="BYTES",
              help="Size at which the log rolls to a new segment file (a record never spans"
                   " two; one larger than this gets a segment of its own).")
@click.option("--range-cache-size", type=click.IntRange(0, 2**40), default=DEFAULT_FRAME_CACHE_BYTES,
              show_default=True, metavar="BYTES",
              help="Memory kept for the full frames of recently read streams, so that"
                   " reading an aggregate again (range) copies them instead of assembling"
                   " them; least recently read streams go first, one stream takes at most a"
                   " 16th. 0 turns it off.")
@click.option("--backend", type=click.Choice(["embedded", "postgres"]), default="embedded",
              show_default=True,
              help="Where the log of record lives. embedded: in DATA_DIR. postgres: in"
                   " PostgreSQL (--postgres-dsn), DATA_DIR then holding this server's"
                   " replica of it, rebuilt from PostgreSQL when missing.")
@click.option("--postgres-dsn", envvar="MEILIES_POSTGRES_DSN", default=None, metavar="DSN",
              help="libpq connection string or URI for --backend postgres (also from"
                   " MEILIES_POSTGRES_DSN), e.g. 'host=db1,db2 dbname=meilies"
                   " target_session_attrs=read-write'.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def main(data_dir: str, host: str, port: int, fsync: str, max_event_size: int,
         requirepass: str | None, maxclients: int, segment_size: int, range_cache_size: int,
         backend: str,
         postgres_dsn: str | None, log_level: str) -> None:
    """Serve the MeiliES event store in DATA_DIR over the Redis protocol (RESP)."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if backend == "postgres" and not postgres_dsn:
        _fail("--backend postgres needs --postgres-dsn (or MEILIES_POSTGRES_DSN)")
    config = Config(host=host, port=port, fsync=fsync, max_event_size=max_event_size,
                    requirepass=requirepass, maxclients=maxclients, backend=backend)
    limit = raise_open_file_limit(maxclients + 1024)
    log.info("open-file limit is %d", limit)
    writer = None
    try:
        if backend == "postgres":
            writer = PostgresBackend.open(postgres_dsn, data_dir, commit=fsync,
                                          max_event_size=max_event_size,
                                          segment_size=segment_size,
                                          frame_cache_bytes=range_cache_size)
            engine = writer.engine
        else:
            engine = Engine.open(data_dir, fsync=fsync, max_event_size=max_event_size,
                                 segment_size=segment_size, frame_cache_bytes=range_cache_size)
    except BackendUnavailable as exc:
        _fail(str(exc.reason))
    except SchemaTooNew as exc:
        _fail(str(exc))
    except DirectoryLocked as exc:
        _fail(f"{exc}: is another meilies-server running on it?")
    except CorruptionError as exc:
        _fail(str(exc))
    except (EngineError, OSError) as exc:
        _fail(f"cannot open {data_dir}: {exc}")
    report = engine.open_report
    for recovered in report.recovered:
        log.warning("recovery: %s: truncated %d bytes at offset %d (%s)", recovered.path.name,
                    recovered.truncated_bytes, recovered.valid_bytes, recovered.reason)
    log.info("opened %s in %.3fs: %d streams, %d events, %d segments%s", data_dir,
             report.seconds, report.streams, report.events, report.segments,
             "" if report.used_checkpoint else " (state rebuilt from the log)")
    try:
        server = Server(engine, config, writer)
        server.stop_on_signals()
        server.start()
    except OSError as exc:
        if writer is not None:
            writer.close()
        engine.close()
        if exc.errno == errno.EADDRINUSE:
            _fail(f"cannot listen on {host}:{port}: address already in use")
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    if writer is not None:
        log.info("listening on %s:%d (backend postgres, replica in %s)", host, server.port,
                 data_dir)
    else:
        log.info("listening on %s:%d (fsync %s)", host, server.port, fsync)
    if not server.serve_until_signalled():
        # The last sync failed: acknowledged events (under everysec or no) may not be on
        # stable storage. The log said why; the exit code says so too.
        sys.exit(1)


def _fail(message: str) -> None:
    click.echo(f"meilies-server: {message}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
