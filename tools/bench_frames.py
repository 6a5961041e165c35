#!/usr/bin/env python3
"""Full frames: assembled from the stored original frames (what MeiliES does) against
stored as they are sent (the alternative), in-process. Prints JSON.

    python3 tools/bench_frames.py            # 200,000 events per layout, median of 5 runs
    python3 tools/bench_frames.py --events 50000 --runs 3

Two layouts of 100-byte events: published one at a time (a record each) and in
batches of 50 (a record each). For each, the bytes a reader is sent, per second:

* ``original_spans``: the stored original frames, as a subscriber of the original
  protocol is served (``all_spans``: a batch is one slice of the log).
* ``full_assembled``: full frames as range/revrange and ``envelope full`` send them
  (``all_full_frames``: ``*9``, the stored frame after ``*5``, and a suffix with the
  position and the record's timestamp; three pieces per event, joined).

``command_loop`` is an event-sourced command handler's read: an aggregate's stream
read whole (``stream_full_frames``), then one event appended to it, aggregate after
aggregate (200 streams of 50 single-event records to start with), with the frame cache
(framecache.py: the read after an append assembles the new event only) and without it
(every read assembles every frame): microseconds per read, appends not counted.

Storing full frames instead would make a full read cost what ``original_spans`` costs
on that layout (the frames would be slices of the log), and an original read cost at
least what ``full_assembled`` costs (each frame cut out of a stored full one and given
back its ``*5``: no batch as one slice any more), while every stored event grows by
its suffix: ``suffix_bytes`` below. The joined bytes are what a server writes to its
socket, so both figures include the one copy a send makes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from meilies.engine import ANY, Engine
from meilies.engine.envelope import suffix
from meilies.engine.framecache import DEFAULT_MAX_BYTES

DATA = b"x" * 100
SEND_BYTES = 256 * 1024


def fill(directory: str, events: int, batch: int) -> Engine:
    engine = Engine.open(directory, fsync="no")
    for first in range(0, events, batch):
        stream = b"s%d" % ((first // batch) % 2)
        engine.append(stream, [(b"ev", DATA)] * min(batch, events - first), ANY)
    engine.flush()
    return engine


def original_spans(engine: Engine) -> tuple[int, float]:
    position, sent, started = 0, 0, time.perf_counter()
    while True:
        views, after = engine.all_spans(position, max_bytes=SEND_BYTES)
        if after == position:
            return sent, time.perf_counter() - started
        sent += len(b"".join(views))
        position = after


def full_assembled(engine: Engine) -> tuple[int, float]:
    position, sent, started = 0, 0, time.perf_counter()
    while True:
        pieces, count, position = engine.all_full_frames(position, max_bytes=SEND_BYTES)
        if not count:
            return sent, time.perf_counter() - started
        sent += len(b"".join(pieces))


def command_loop(directory: str, cache_bytes: int, rounds: int) -> float:
    """Microseconds per aggregate read in the read-decide-append loop (module doc)."""
    aggregates = [b"order-%d" % i for i in range(200)]
    with Engine.open(directory, fsync="no", frame_cache_bytes=cache_bytes) as engine:
        for _ in range(50):
            for stream in aggregates:
                engine.append(stream, [(b"ev", DATA)], ANY, flush=False)
        engine.flush()
        spent = 0.0
        for _ in range(rounds):
            for stream in aggregates:
                started = time.perf_counter()
                pieces, _count, _next = engine.stream_full_frames(stream, 0)
                b"".join(pieces)
                spent += time.perf_counter() - started
                engine.append(stream, [(b"ev", DATA)], ANY)
    return spent / (rounds * len(aggregates)) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = {"events": args.events, "runs": args.runs, "python": sys.version.split()[0],
               "suffix_bytes": len(suffix(args.events, int(time.time() * 1000)))}
    for layout, batch in (("published_singly", 1), ("batches_of_50", 50)):
        with tempfile.TemporaryDirectory() as directory:
            engine = fill(directory, args.events, batch)
            figures: dict[str, list[float]] = {"original_spans": [], "full_assembled": []}
            for _ in range(args.runs):
                for name, read in (("original_spans", original_spans),
                                   ("full_assembled", full_assembled)):
                    _bytes, seconds = read(engine)
                    figures[name].append(args.events / seconds)
            engine.close()
        medians = {name: round(statistics.median(values)) for name, values in figures.items()}
        medians["full_over_original"] = round(medians["full_assembled"]
                                              / medians["original_spans"], 3)
        results[layout] = {"events_per_s": medians,
                           "runs": {k: [round(v) for v in vs] for k, vs in figures.items()}}
        print(f"{layout}: {medians}", file=sys.stderr)
    loop: dict[str, list[float]] = {"cache": [], "no_cache": []}
    for _ in range(args.runs):
        for name, cache_bytes in (("cache", DEFAULT_MAX_BYTES), ("no_cache", 0)):
            with tempfile.TemporaryDirectory() as directory:
                loop[name].append(command_loop(directory, cache_bytes, 20))
    results["command_loop_us_per_read"] = {
        **{name: round(statistics.median(values), 2) for name, values in loop.items()},
        "runs": {name: [round(v, 2) for v in values] for name, values in loop.items()}}
    print(f"command_loop: {results['command_loop_us_per_read']}", file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
