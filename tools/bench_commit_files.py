#!/usr/bin/env python3
"""What a durable commit costs with a segment in one file against two. Prints JSON.

    python3 tools/bench_commit_files.py                 # 2,000 commits a run, median of 5
    python3 tools/bench_commit_files.py --dir /data --commits 500 --runs 3

docs/format.md section 8 weighs a format in which a segment's frames live in a file of
their own, apart from the record headers, so that a catch-up of single-event records
reads any run of positions as one slice. Its cost is on the write side: a commit must
make both files durable. This measures that cost on the disk under ``--dir``, for a
single-event record (a 72-byte header, name and lengths entry; a 140-byte frame)
committed one at a time, as ``publish`` under ``--fsync always`` at depth 1 does:

* ``one_file``: the record written whole, then one ``fdatasync`` (format 4 today);
* ``two_files``: the frame to one file, the header to the other, an ``fdatasync`` each;
* ``two_files_threads``: the same, the two ``fdatasync`` calls issued at once from two
  threads (so that the filesystem may fold them into one journal commit).

Microseconds per commit; the ratios are against ``one_file`` in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HEADER = b"h" * 72
FRAME = b"f" * 140


def one_file(directory: str, commits: int) -> float:
    fd = os.open(os.path.join(directory, "one.seg"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
    record = HEADER + FRAME
    try:
        started = time.perf_counter()
        for _ in range(commits):
            os.write(fd, record)
            os.fdatasync(fd)
        return (time.perf_counter() - started) / commits * 1e6
    finally:
        os.close(fd)


def two_files(directory: str, commits: int, pool: ThreadPoolExecutor | None = None) -> float:
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    frames = os.open(os.path.join(directory, "two.frm"), flags)
    records = os.open(os.path.join(directory, "two.seg"), flags)
    try:
        started = time.perf_counter()
        for _ in range(commits):
            os.write(frames, FRAME)
            os.write(records, HEADER)
            if pool is None:
                os.fdatasync(frames)
                os.fdatasync(records)
            else:
                other = pool.submit(os.fdatasync, frames)
                os.fdatasync(records)
                other.result()
        return (time.perf_counter() - started) / commits * 1e6
    finally:
        os.close(frames)
        os.close(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".", help="where to write (the disk to measure); "
                        "a temporary directory is made there and removed")
    parser.add_argument("--commits", type=int, default=2000, help="commits per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median)")
    args = parser.parse_args()
    if args.commits < 1 or args.runs < 1:
        parser.error("--commits and --runs must be at least 1")
    runs: dict[str, list[float]] = {"one_file": [], "two_files": [], "two_files_threads": []}
    with tempfile.TemporaryDirectory(prefix="meilies-commit-", dir=args.dir) as directory, \
            ThreadPoolExecutor(max_workers=1) as pool:
        for run in range(args.runs):
            runs["one_file"].append(one_file(directory, args.commits))
            runs["two_files"].append(two_files(directory, args.commits))
            runs["two_files_threads"].append(two_files(directory, args.commits, pool))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f} µs" for k, v in runs.items()),
                  file=sys.stderr)
    medians = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    print(json.dumps({
        "tool": "bench_commit_files",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dir": os.path.abspath(args.dir),
        "commits_per_run": args.commits,
        "us_per_commit": medians,
        "ratio_to_one_file": {k: round(v / medians["one_file"], 2) for k, v in medians.items()},
        "runs_us": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
