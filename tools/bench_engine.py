#!/usr/bin/env python3
"""Engine benchmark: prints JSON figures (issue 2's table). Not a test: nothing is asserted.

    python3 tools/bench_engine.py                 # full run (10M-event logs: ~2 GB each)
    python3 tools/bench_engine.py --scale 0.1     # a tenth of every size, for a quick look
    python3 tools/bench_engine.py --runs 3        # median of 3 runs per figure

Figures: append events/s (100-byte events; single appends and batches of 100; fsync
no and always), stream-range and $all read events/s (a view per frame; views of whole
batches, as the server sends them; and decoded Event objects), open seconds for logs of 1M and 10M events with 10,000 and
1,000,000 streams, and fsck verify events/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meilies.engine import Engine  # noqa: E402

PAYLOAD = b"x" * 100


def timed(fn) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_appends(root: Path, count: int, batch: int, fsync: str, streams: int) -> float:
    directory = root / f"append-{batch}-{fsync}"
    engine = Engine.open(directory, fsync=fsync)
    names = [b"stream-%d" % i for i in range(streams)]
    events = [(b"created", PAYLOAD)] * batch
    sync_each = fsync == "always"

    def run():
        append, sync = engine.append, engine.sync
        for i in range(count // batch):
            append(names[i % streams], events)
            if sync_each:
                sync()

    seconds, _ = timed(run)
    engine.close()
    shutil.rmtree(directory)
    return (count // batch) * batch / seconds


def build_log(directory: Path, count: int, streams: int, batch: int = 100) -> None:
    """A log of ``count`` 100-byte events over ``streams`` streams, batches of ``batch``.

    With fewer events per stream than ``batch``, each stream gets one batch.
    """
    engine = Engine.open(directory, fsync="no")
    per = min(batch, max(1, count // streams))
    events = [(b"created", PAYLOAD)] * per
    names = [b"aggregate-%d" % i for i in range(streams)]
    append = engine.append
    for i in range(count // per):
        append(names[i % streams], events)
    engine.close()


def bench_reads(directory: Path, stream: bytes) -> dict[str, float]:
    engine = Engine.open(directory, fsync="no")
    figures = {}

    def frames_of_stream():
        n, number = 0, 0
        while True:
            frames, number = engine.stream_frames(stream, number)
            if not frames:
                return n
            n += len(frames)

    seconds, n = timed(frames_of_stream)
    figures["stream_read_frames_events_per_s"] = n / seconds

    def spans_of_stream():  # what a catch-up subscriber is sent: views of whole batches
        number = 0
        while True:
            views, after = engine.stream_spans(stream, number, max_bytes=256 * 1024)
            if not views:
                return number
            number = after

    seconds, n = timed(spans_of_stream)
    figures["stream_read_spans_events_per_s"] = n / seconds

    def events_of_stream():
        return sum(1 for _ in engine.read_stream(stream, 0))

    seconds, n = timed(events_of_stream)
    figures["stream_read_events_per_s"] = n / seconds

    def frames_of_all():
        n, position = 0, 0
        while True:
            frames, after = engine.all_frames(position)
            if after == position:
                return n
            n += len(frames)
            position = after

    seconds, n = timed(frames_of_all)
    figures["all_read_frames_events_per_s"] = n / seconds

    def spans_of_all():
        position = 0
        while True:
            _views, after = engine.all_spans(position, max_bytes=256 * 1024)
            if after == position:
                return position
            position = after

    seconds, n = timed(spans_of_all)
    figures["all_read_spans_events_per_s"] = n / seconds
    figures["read_log_events"] = n
    engine.close()
    return figures


def bench_open(directory: Path) -> float:
    seconds, engine = timed(lambda: Engine.open(directory, fsync="no"))
    engine.close()
    return seconds


def bench_fsck(directory: Path, events: int) -> float:
    from meilies.engine import fsck
    seconds, report = timed(lambda: fsck.verify(directory))
    if report.problems:
        raise RuntimeError(f"fsck found problems in the benchmark's own log: {report.problems}")
    return events / seconds


def median_of(runs: int, fn):
    values = [fn() for _ in range(runs)]
    if isinstance(values[0], dict):
        return {k: statistics.median(v[k] for v in values) for k in values[0]}
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 10M-event logs")
    parser.add_argument("--skip-fsck", action="store_true", help="skip the fsck figure")
    args = parser.parse_args()
    s = args.scale
    root = Path(args.dir or tempfile.mkdtemp(prefix="meilies-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {"scale": s, "runs": args.runs}
    try:
        def progress(what):
            print(f"bench_engine: {what}", file=sys.stderr, flush=True)

        progress("appends")
        out["append_single_no_events_per_s"] = median_of(
            args.runs, lambda: bench_appends(root, int(200_000 * s), 1, "no", 1000))
        out["append_batch100_no_events_per_s"] = median_of(
            args.runs, lambda: bench_appends(root, int(2_000_000 * s), 100, "no", 1000))
        out["append_single_always_events_per_s"] = median_of(
            args.runs, lambda: bench_appends(root, max(200, int(3000 * s)), 1, "always", 100))
        out["append_batch100_always_events_per_s"] = median_of(
            args.runs, lambda: bench_appends(root, max(2000, int(200_000 * s)), 100, "always",
                                             100))

        progress("reads")
        reads_dir = root / "reads"
        build_log(reads_dir, int(1_000_000 * s), 10)
        out.update({k: v for k, v in median_of(
            args.runs, lambda: bench_reads(reads_dir, b"aggregate-3")).items()})
        if not args.skip_fsck:
            out["fsck_verify_events_per_s"] = median_of(
                args.runs, lambda: bench_fsck(reads_dir, int(1_000_000 * s)))
        shutil.rmtree(reads_dir)

        sizes = [(1_000_000, 10_000), (1_000_000, 1_000_000)]
        if not args.skip_large:
            sizes += [(10_000_000, 10_000), (10_000_000, 1_000_000)]
        for events, streams in sizes:
            events_s, streams_s = int(events * s), max(1, int(streams * s))
            progress(f"open: building {events_s} events over {streams_s} streams")
            directory = root / f"open-{events_s}-{streams_s}"
            build_log(directory, events_s, streams_s)
            out[f"open_seconds_{events}_events_{streams}_streams"] = median_of(
                args.runs, lambda: bench_open(directory))
            shutil.rmtree(directory)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()},
                     indent=2))


if __name__ == "__main__":
    main()
