#!/usr/bin/env python3
"""What the per-frame checks of format 3 cost a publish: this tree against a baseline
revision that writes format 2, side by side, through the real server. Prints JSON.

    python3 tools/bench_bitrot.py --baseline 8586353            # median of 5 runs
    python3 tools/bench_bitrot.py --baseline 8586353 --runs 9 --seconds 5

The baseline is checked out into a temporary git worktree and its server started from
there (``python -m meilies.cli.server`` with the worktree as working directory, so its
own package is imported); the two servers differ by the commits between them. Both
run ``--fsync no``, where the CPU cost of a publish is not hidden behind a disk flush
(the worst case for the ratio), and are measured alternately, run after run, by the
publish loop of ``bench_server.py`` (4 connections, 100-byte events, pipeline depth 64
and 1). Each server's data directory is checked afterwards: the baseline's segments
must be format 2 and ours format 3, or the comparison is void.

The client's ceiling: one process, one thread, epoll, replies counted by newline; its
CPU share is reported next to the server's (``cpu``), and a figure where the client is
near 1.0 while the server is not is the client's limit, not the server's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REPO, ServerProcess, free_port, log  # noqa: E402
from bench_server import run_publish, stored_count  # noqa: E402

DEPTHS = (64, 1)
CONNS = 4


def start(tree: Path, workdir: Path, tag: str) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "meilies.cli.server", "--data-dir",
            str(workdir / f"data-{tag}"), "--port", str(port), "--fsync", "no",
            "--log-level", "warning"]
    server = ServerProcess(tag, argv, port, workdir / f"{tag}.log", cwd=tree)
    server.wait_ready()
    return server


def segment_versions(data_dir: Path) -> set[int]:
    return {int.from_bytes(p.read_bytes()[8:12], "little") for p in data_dir.glob("*.seg")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="a git revision writing format 2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="meilies-bench-bitrot-") as tmp:
        workdir = Path(tmp)
        baseline = workdir / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline),
                        args.baseline], check=True, capture_output=True)
        servers = {}
        try:
            servers["format2"] = start(baseline, workdir, "format2")
            servers["format3"] = start(REPO, workdir, "format3")
            runs: dict[tuple[str, int], list[dict]] = {}
            for run in range(args.runs):
                order = ("format2", "format3") if run % 2 == 0 else ("format3", "format2")
                for depth in DEPTHS:
                    for kind in order:
                        stream = b"s-%d-%d" % (run, depth)
                        r = run_publish("meilies", servers[kind], stream, depth, CONNS,
                                        args.seconds, 0.5, max_events=10_000_000, limit=300)
                        stored = stored_count("meilies", servers[kind].port, stream)
                        if stored != r["issued"]:
                            raise RuntimeError(f"{kind}: {r['issued']} sent, {stored} stored")
                        runs.setdefault((kind, depth), []).append(r)
                        log(f"run {run + 1} depth {depth} {kind}: "
                            f"{r['events_per_s']:,.0f} events/s cpu {r['cpu']}")
        finally:
            for server in servers.values():
                server.stop()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(baseline)], capture_output=True)
        versions = {tag: sorted(segment_versions(workdir / f"data-{tag}")) for tag in servers}
        if versions != {"format2": [2], "format3": [3]}:
            raise RuntimeError(f"the servers wrote formats {versions}: not a comparison")
        out: dict = {"baseline": args.baseline, "runs": args.runs, "seconds": args.seconds,
                     "connections": CONNS, "event_bytes": 100, "fsync": "no",
                     "formats_written": versions}
        for depth in DEPTHS:
            two = [r["events_per_s"] for r in runs[("format2", depth)]]
            three = [r["events_per_s"] for r in runs[("format3", depth)]]
            # Ratio per run (the two servers measured back to back), then the median.
            ratios = [b / a for a, b in zip(two, three)]
            out[f"depth{depth}"] = {
                "format2_events_per_s": round(statistics.median(two)),
                "format3_events_per_s": round(statistics.median(three)),
                "ratio_median": round(statistics.median(ratios), 3),
                "ratios": [round(x, 3) for x in ratios],
                "cost_percent": round((1 - statistics.median(ratios)) * 100, 1),
                "cpu_format3": statistics.median_low(
                    [(r["events_per_s"], r["cpu"]) for r in runs[("format3", depth)]])[1],
            }
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
