"""Click options shared by the command-line programs, each defined once (pip-tools'
``scripts/options.py``). Apply them as decorators::

    @click.command()
    @options.data_dir
    @options.host
    @options.port
    def main(data_dir, host, port): ...
"""

from __future__ import annotations

import click

#: The original MeiliES' port (PROTOCOL.md, "Transport").
DEFAULT_PORT = 6480
DEFAULT_HOST = "127.0.0.1"

#: ``--data-dir DIR`` for the programs that open (and create) a data directory.
data_dir = click.option(
    "--data-dir", type=click.Path(file_okay=False), required=True,
    help="Directory holding segments and indexes (created if missing).")

#: ``DATA_DIR`` as a positional argument, for the tools that inspect one (meilies-fsck).
data_dir_argument = click.argument("data_dir", type=click.Path(file_okay=False))

#: ``--json``: print the result as one JSON document on stdout instead of text.
json_output = click.option("--json", "json_output", is_flag=True,
                           help="Print the report as JSON instead of text.")

host = click.option("--host", default=DEFAULT_HOST, show_default=True,
                    help="Address to listen on or connect to.")

port = click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT,
                    show_default=True, help="TCP port (0 picks a free one when listening).")
