#!/usr/bin/env python3
"""Instructions per event of a catch-up's reads, counted by valgrind. Prints JSON.

    python3 tools/count_catchup.py                  # 300,000 events, about 2 minutes
    python3 tools/count_catchup.py --events 100000

On a shared machine a catch-up's events per second swing by 20% from one run to the
next (README, "Target not met"), more than a change to the read path moves them. The
instructions it executes do not swing: this counts them with valgrind's callgrind, so
that two versions of the read path can be compared exactly.

It stores ``--events`` events published one at a time (a record each), alternating the
stream ``solo`` with 15 others as tools/bench_reads.py does, then reads them back
in-process the way a subscriber is served (``all_spans`` / ``stream_spans`` with the
server's SEND_BYTES budget, each read joined as the server joins it before a send):
``$all`` from position 0, and ``solo`` (half the events) from number 0. Each case runs
under callgrind twice, reading once and not at all; the difference, divided by the
events read, is the figure. Needs ``valgrind`` (Debian package valgrind).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time

from meilies.engine import ANY, Engine
from meilies.server.subscription import SEND_BYTES

DATA = b"x" * 100
STREAMS = [name for j in range(15) for name in (b"solo", b"c-%d" % j)]
_COLLECTED = re.compile(r"Collected : (\d+)")


def fill(directory: str, events: int) -> None:
    with Engine.open(directory, fsync="no") as engine:
        for i in range(events):
            engine.append(STREAMS[i % len(STREAMS)], [(b"ev", DATA)], ANY, flush=False)
            if i % 1000 == 999:
                engine.flush()
        engine.flush()


def read(directory: str, case: str, times: int) -> int:
    """Catch up ``times`` times; the events read by one catch-up."""
    read_events = 0
    with Engine.open(directory, fsync="no") as engine:
        for _ in range(times):
            at = 0
            while True:
                if case == "all":
                    views, after = engine.all_spans(at, max_bytes=SEND_BYTES)
                else:
                    views, after = engine.stream_spans(b"solo", at, max_bytes=SEND_BYTES)
                if after == at:
                    break
                b"".join(views)
                at = after
            read_events = at
    return read_events


def instructions(directory: str, case: str, times: int) -> int:
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--child", directory, case, str(times)],
        capture_output=True, text=True, check=True)
    found = _COLLECTED.search(done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]}")
    return int(found.group(1))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        read(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000,
                        help="events to store and read back with $all (default 300,000)")
    args = parser.parse_args()
    if args.events < len(STREAMS):
        parser.error(f"--events must be at least {len(STREAMS)}")
    if shutil.which("valgrind") is None:
        sys.exit("count_catchup: valgrind is not installed (apt-get install valgrind)")
    started = time.monotonic()
    per_event = {}
    with tempfile.TemporaryDirectory(prefix="meilies-count-") as directory:
        print(f"storing {args.events:,} single-event records", file=sys.stderr)
        fill(directory, args.events)
        for case in ("all", "solo"):
            events = read(directory, case, 1)
            base = instructions(directory, case, 0)
            once = instructions(directory, case, 1)
            per_event[case] = {"events": events,
                               "instructions_per_event": round((once - base) / events)}
            print(f"{case}: {per_event[case]}", file=sys.stderr)
    print(json.dumps({"tool": "count_catchup", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "python": sys.version.split()[0], "send_bytes": SEND_BYTES,
                      "cases": per_event, "seconds": round(time.monotonic() - started, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
