#!/usr/bin/env python3
"""Id index benchmark: what idempotent appends cost at N ids, in-process on the real
engine. Prints a figure block (``--json``: the same figures as JSON). Not a test:
nothing is asserted, but wrong lookup answers are counted and printed.

    python3 tools/bench_ids.py                    # 2,000,000 ids, medians of 3 runs
    python3 tools/bench_ids.py --ids 10000000     # ~10x the load, rebuild and disk
    python3 tools/bench_ids.py --ids 200000 --runs 1   # a quick look

What it measures (meilies/engine/ids.py: hash-addressed tables in levels, every hit
checked against the log; writes.py: ``find_event_id``), on one data directory under
a temp dir (``/tmp``), with ``fsync="no"`` so that the disk is not what is measured
(checkpoints at segment rolls still fdatasync the log and msync the id tables; their
time is printed apart):

1. Loading N ids with ``engine.append(stream, events, ids=...)``, batches of
   ``--batch`` 100-byte events with UUID-like 36-byte ids over 1,000 streams (ids are
   made from a counter between timed chunks, never held all at once): ids/s, then the
   id tables' apparent and allocated size (``st_blocks * 512``), their levels, and the
   process's memory (RSS, and how much of it is the tables' mapped pages).
2. ``engine.find_event_id`` of random present ids and of absent ids (what every new
   id costs), lookups/s (median of ``--runs``); the index alone
   (``IdIndex.candidates``); and, by walking each level's slots as ``_Level.positions``
   does, the slots read per lookup and how many log reads the hits cost.
3. ``Engine.open`` of the directory with its ``ids.state``, then without it (the
   tables rebuilt from the log): seconds, ids/s, and how much of it is the log scan.
4. Appends of one event each, one call at a time, with a fresh id (an
   ``append-full``) and without: events/s and their ratio, on the loaded engine; and
   ``engine.write`` without ids, to split the cost between the general write path
   and the ids themselves.

The last line extrapolates to 100,000,000 ids from the layout (ids.FIRST_BITS,
ids.MAX_LOAD), the linear-probing model checked against the measured levels, and the
measured bytes per id. It is a model, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import log, median  # noqa: E402

from meilies.engine import Engine  # noqa: E402
from meilies.engine import ids as id_index  # noqa: E402
from meilies.engine.files import id_state_path  # noqa: E402
from meilies.engine.reads import stored_ids  # noqa: E402
from meilies.engine.writes import Write  # noqa: E402

PAYLOAD = b"x" * 100
EVENT = (b"created", PAYLOAD)
STREAMS = 1000
#: Ids are made (untimed) and appended (timed) this many at a time while loading.
CHUNK = 100_000
TARGET = 100_000_000
MIB = 1024 * 1024


def make_id(i: int, salt: bytes) -> bytes:
    """The ``i``-th id of a family: 36 bytes shaped like a UUID, from a 128-bit hash."""
    h = xxhash.xxh3_128_hexdigest(salt + i.to_bytes(8, "little"))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode()


PRESENT, ABSENT, FRESH = b"present", b"absent", b"fresh"


class TimedEngine(Engine):
    """The engine, timing its checkpoints and the id index's part of opening (a
    subclass, so that nothing in the engine changes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0
        self.open_ids_seconds = 0.0

    def checkpoint(self) -> None:
        started = time.perf_counter()
        try:
            super().checkpoint()
        finally:
            self.checkpoints += 1
            self.checkpoint_seconds += time.perf_counter() - started

    def _open_ids(self, end: int) -> int:
        started = time.perf_counter()
        try:
            return super()._open_ids(end)
        finally:
            self.open_ids_seconds = time.perf_counter() - started


def time_id_checkpoints(engine: Engine) -> dict:
    """Wrap ``engine.ids.checkpoint`` (msync of every table, then ids.state) to time it."""
    spent = {"count": 0, "seconds": 0.0}
    inner = engine.ids.checkpoint

    def checkpoint(covered: int) -> None:
        started = time.perf_counter()
        try:
            inner(covered)
        finally:
            spent["count"] += 1
            spent["seconds"] += time.perf_counter() - started

    engine.ids.checkpoint = checkpoint
    return spent


# -- what the process and the disk hold --------------------------------------------------------

def memory_kb() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, and the resident pages of the id
    tables' mappings (from /proc/self/smaps)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    tables = 0
    in_table = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                in_table = bool(re.search(r"/ids-\d+\.table$", line.rstrip()))
            elif in_table and line.startswith("Rss:"):
                tables += int(line.split()[1])
    out["id_tables_rss"] = tables
    return out


def write_bytes() -> int | None:
    """Bytes this process caused to be written to storage (page-granular; mapped pages
    count when they are dirtied)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def table_files(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("ids-*.table")):
        st = path.stat()
        out.append({"name": path.name, "apparent": st.st_size, "allocated": st.st_blocks * 512})
    return out


def log_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.suffix in (".seg", ".pidx", ".sidx"))


# -- the model of the layout ---------------------------------------------------------------------

def level_counts(n: int, first_bits: int = id_index.FIRST_BITS,
                 max_load: float = id_index.MAX_LOAD) -> list[int]:
    """How ``n`` ids fill the levels (IdIndex.add: a level takes ids up to its capacity)."""
    counts = []
    bits = first_bits
    while n > 0:
        take = min(n, int((1 << bits) * max_load))
        counts.append(take)
        n -= take
        bits += 1
    return counts


def slots_unsuccessful(load: float) -> float:
    """Slots read by a lookup that ends at an empty slot, linear probing at ``load``
    (Knuth: (1 + 1/(1-a)^2) / 2)."""
    return (1 + 1 / (1 - load) ** 2) / 2


def model_slots(n: int) -> list[float]:
    return [slots_unsuccessful(count / (1 << (id_index.FIRST_BITS + k)))
            for k, count in enumerate(level_counts(n))]


def table_bytes(levels: int) -> int:
    return sum(id_index.HEADER_SIZE + id_index.SLOT_SIZE * (1 << (id_index.FIRST_BITS + k))
               for k in range(levels))


def slots_read(level, tag: int) -> int:
    """Slots ``_Level.positions`` reads for ``tag``: from ``tag & mask`` up to and
    including the first empty slot (every level is walked, hit or not)."""
    mapping, mask, unpack = level.map, level.mask, id_index.SLOT.unpack_from
    i = tag & mask
    n = 0
    while True:
        n += 1
        if not unpack(mapping, id_index.HEADER_SIZE + id_index.SLOT_SIZE * i)[1]:
            return n
        i = (i + 1) & mask


# -- the phases ----------------------------------------------------------------------------------

def load(directory: Path, count: int, batch: int) -> tuple[TimedEngine, dict]:
    mem_before = memory_kb()
    engine = TimedEngine.open(directory, fsync="no")
    engine.checkpoints, engine.checkpoint_seconds = 0, 0.0  # not the one opening wrote
    id_checkpoints = time_id_checkpoints(engine)
    names = [b"stream-%d" % i for i in range(STREAMS)]
    events = [EVENT] * batch
    append = engine.append
    seconds = 0.0
    written_before = write_bytes()
    k = 0
    for start in range(0, count, CHUNK):
        stop = min(count, start + CHUNK)
        chunk = [make_id(i, PRESENT) for i in range(start, stop)]
        gc.collect()
        began = time.perf_counter()
        for at in range(0, len(chunk), batch):
            ids = chunk[at:at + batch]
            append(names[k % STREAMS], events[:len(ids)], ids=ids)
            k += 1
        seconds += time.perf_counter() - began
        if stop % (10 * CHUNK) == 0 or stop == count:
            log(f"load: {stop:,} ids, {stop / seconds:,.0f} ids/s")
    rolls = engine.checkpoints
    roll_seconds = engine.checkpoint_seconds
    roll_id_seconds = id_checkpoints["seconds"]
    began = time.perf_counter()
    engine.checkpoint()  # msync: the tables' blocks are allocated and st_blocks is true
    final_checkpoint = time.perf_counter() - began
    written = write_bytes()
    tables = table_files(directory)
    out = {
        "ids": count, "batch": batch, "seconds": seconds, "ids_per_s": count / seconds,
        "checkpoints_at_rolls": rolls, "checkpoint_seconds": roll_seconds,
        "id_checkpoint_seconds": roll_id_seconds, "final_checkpoint_seconds": final_checkpoint,
        "levels": len(engine.ids.levels),
        "level_counts": [lv.count for lv in engine.ids.levels],
        "tables": tables,
        "tables_apparent": sum(t["apparent"] for t in tables),
        "tables_allocated": sum(t["allocated"] for t in tables),
        "log_bytes": log_bytes(directory),
        "write_bytes": None if written is None or written_before is None
        else written - written_before,
        "memory_kb_before": mem_before, "memory_kb": memory_kb(),
    }
    return engine, out


def rate(count: int, fn) -> float:
    gc.collect()
    began = time.perf_counter()
    fn()
    return count / (time.perf_counter() - began)


def lookups(engine: Engine, count: int, runs: int, batch: int, sample: int, seed: int
            ) -> dict:
    n = engine.ids.count  # every id loaded (no take-back happens with fsync=no)
    rng = random.Random(seed)
    present = [make_id(i, PRESENT) for i in rng.sample(range(n), min(count, n))]
    absent = [make_id(i, ABSENT) for i in range(count)]
    find, candidates = engine.find_event_id, engine.ids.candidates
    wrong = {"present_not_found": 0, "absent_found": 0}

    def find_present():
        misses = 0
        for event_id in present:
            event = find(event_id)
            if event is None or event.id != event_id:
                misses += 1
        wrong["present_not_found"] = misses

    def find_absent():
        wrong["absent_found"] = sum(1 for event_id in absent if find(event_id) is not None)

    def index_only(ids):
        def run():
            for event_id in ids:
                candidates(event_id)
        return run

    out: dict[str, object] = {"lookups": count}
    figures = {
        "present_per_s": (len(present), find_present),
        "absent_per_s": (len(absent), find_absent),
        "present_index_only_per_s": (len(present), index_only(present)),
        "absent_index_only_per_s": (len(absent), index_only(absent)),
    }
    if batch > 1:  # a hit's check reads its record: does where it sits in it matter?
        m = min(count, 20_000, n // batch)
        records = rng.sample(range(n // batch), m)
        first = [make_id(r * batch, PRESENT) for r in records]
        last = [make_id(r * batch + batch - 1, PRESENT) for r in records]
        figures["present_first_in_record_per_s"] = (m, lambda: all(map(find, first)))
        figures["present_last_in_record_per_s"] = (m, lambda: all(map(find, last)))
    for name, (k, fn) in figures.items():
        values = [rate(k, fn) for _ in range(runs)]
        out[name] = median(values)
        out[name + "_runs"] = values
        log(f"lookups: {name} {out[name]:,.0f}/s")
    out.update(wrong)

    # Slots read, per level and in all, and log reads (candidates), on a sample.
    levels = engine.ids.levels
    for kind, ids in (("present", present[:sample]), ("absent", absent[:sample])):
        per_level = [0] * len(levels)
        reads = 0
        for event_id in ids:
            tag = id_index.tag_of(event_id)
            for k, level in enumerate(levels):
                per_level[k] += slots_read(level, tag)
            reads += len(candidates(event_id))
        out[f"{kind}_slots_per_level"] = [s / len(ids) for s in per_level]
        out[f"{kind}_slots"] = sum(per_level) / len(ids)
        out[f"{kind}_log_reads"] = reads / len(ids)
    out["sample"] = min(sample, len(present))
    return out


def appends(engine: Engine, count: int, runs: int) -> dict:
    """Single-event appends three ways: ``append`` without ids (its one-event fast path),
    ``write`` without ids (the path every append with ids takes, less the ids), and
    ``append`` with a fresh id; so that what the id index costs can be told from what
    the general write path costs."""
    names = [b"single-%d" % i for i in range(STREAMS)]
    append, write = engine.append, engine.write
    events = [EVENT]
    made = 0

    def plain():
        for k in range(count):
            append(names[k % STREAMS], events)

    def write_path():
        for k in range(count):
            write([Write(names[k % STREAMS], events)])

    def with_ids(ids):
        def run():
            for k in range(count):
                append(names[k % STREAMS], events, ids=ids[k:k + 1])
        return run

    runs_of: dict[str, list[float]] = {"plain": [], "write": [], "ids": []}
    for r in range(runs):
        ids = [make_id(i, FRESH) for i in range(made, made + count)]
        made += count
        # Rotate which goes first, so that a drift of the host reaches all alike.
        order = [("plain", plain), ("write", write_path), ("ids", with_ids(ids))]
        order = order[r % 3:] + order[:r % 3]
        for kind, fn in order:
            runs_of[kind].append(rate(count, fn))
    p, w, i = (median(runs_of[k]) for k in ("plain", "write", "ids"))
    log(f"appends: plain {p:,.0f}/s, write path {w:,.0f}/s, with ids {i:,.0f}/s")
    return {"appends": count, "plain_per_s": p, "write_path_per_s": w, "ids_per_s": i,
            "plain_runs": runs_of["plain"], "write_path_runs": runs_of["write"],
            "ids_runs": runs_of["ids"], "ratio": i / p, "us_per_id": 1e6 / i - 1e6 / p,
            "us_write_path": 1e6 / w - 1e6 / p, "us_ids_on_write_path": 1e6 / i - 1e6 / w}


def reopen(directory: Path, runs: int) -> dict:
    out: dict[str, object] = {}
    opens, id_parts = [], []
    for _ in range(runs):
        gc.collect()
        began = time.perf_counter()
        engine = TimedEngine.open(directory, fsync="no")
        opens.append(time.perf_counter() - began)
        id_parts.append(engine.open_ids_seconds)
        engine.close()
    out["open_seconds"], out["open_ids_seconds"] = median(opens), median(id_parts)
    out["open_runs"] = opens
    log(f"reopen with ids.state: {out['open_seconds']:.3f} s")

    id_state_path(directory).unlink()
    gc.collect()
    began = time.perf_counter()
    engine = TimedEngine.open(directory, fsync="no")
    seconds = time.perf_counter() - began
    out["rebuild_open_seconds"] = seconds
    out["rebuild_ids_seconds"] = engine.open_ids_seconds
    out["rebuild_checkpoint_seconds"] = engine.checkpoint_seconds
    out["rebuilt_ids"] = engine.ids.count
    out["rebuild_ids_per_s"] = engine.ids.count / engine.open_ids_seconds
    out["rebuild_levels"] = len(engine.ids.levels)
    gc.collect()
    began = time.perf_counter()
    scanned = sum(1 for _ in stored_ids(engine, 0))
    out["log_scan_seconds"] = time.perf_counter() - began
    out["log_scan_ids"] = scanned
    engine.close()
    log(f"reopen without ids.state: {seconds:.1f} s")
    return out


# -- the report ----------------------------------------------------------------------------------

def extrapolate(ld: dict, lk: dict) -> dict:
    counts = level_counts(TARGET)
    slots = model_slots(TARGET)
    apparent = table_bytes(len(counts))
    return {
        "ids": TARGET,
        "levels": len(counts),
        "bytes_at_measured_per_id": ld["tables_allocated"] / ld["ids"] * TARGET,
        "layout_apparent_bytes": apparent,
        "absent_slots": sum(slots),
        # A hit is in one level; every level is walked to an empty slot all the same.
        "present_slots": sum(slots) + (lk["present_slots"] - lk["absent_slots"]),
        "model_slots_at_n": sum(model_slots(ld["ids"])),
    }


def fmt_mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def print_block(r: dict) -> None:
    ld, lk, ap, ro, ex = r["load"], r["lookups"], r["appends"], r["reopen"], r["extrapolation"]
    n = ld["ids"]
    mem, mem0 = ld["memory_kb"], ld["memory_kb_before"]
    p = print
    p("MeiliES id index benchmark: in-process meilies.engine.Engine, fsync=\"no\" (the disk is"
      " not measured), page cache warm")
    p(f"  {r['meta']['cpus']} CPUs, load average {r['meta']['loadavg_before']} before,"
      f" {r['meta']['loadavg_after']} after; Python {r['meta']['python']};"
      f" medians of {r['meta']['runs']} runs where marked [m], single run otherwise")
    p("")
    p(f"1. load     {n:,} ids in {ld['seconds']:.1f} s = {ld['ids_per_s']:,.0f} ids/s"
      f"  (append with ids, {ld['batch']} x 100-byte events per call, 36-byte ids,"
      f" {STREAMS} streams)")
    p(f"            of which {ld['checkpoints_at_rolls']} checkpoints at segment rolls:"
      f" {ld['checkpoint_seconds']:.2f} s ({ld['id_checkpoint_seconds']:.2f} s msync of the"
      f" id tables + ids.state); final checkpoint {ld['final_checkpoint_seconds']:.2f} s")
    p(f"   tables   {ld['levels']} levels, ids per level {ld['level_counts']};"
      f" apparent {fmt_mib(ld['tables_apparent'])}, allocated {fmt_mib(ld['tables_allocated'])}"
      f" = {ld['tables_allocated'] / n:.1f} B/id (log + indexes {fmt_mib(ld['log_bytes'])}"
      f" = {ld['log_bytes'] / n:.0f} B/id)")
    for k, t in enumerate(ld["tables"]):
        slots = 1 << (id_index.FIRST_BITS + k)
        cnt = ld["level_counts"][k] if k < len(ld["level_counts"]) else 0
        absent = lk["absent_slots_per_level"][k] if k < len(lk["absent_slots_per_level"]) \
            else float("nan")
        p(f"            {t['name']}: {slots:>11,} slots, load {cnt / slots:.3f}, apparent"
          f" {fmt_mib(t['apparent'])}, allocated {fmt_mib(t['allocated'])}; absent lookup reads"
          f" {absent:.2f} slots (model {slots_unsuccessful(cnt / slots):.2f})")
    if ld["write_bytes"] is not None:
        p(f"   written  {fmt_mib(ld['write_bytes'])} dirtied by the process while loading"
          f" (/proc/self/io write_bytes: log, indexes and the tables' pages)"
          f" = {ld['write_bytes'] / n:.0f} B/id")
        extra = ld["write_bytes"] - ld["log_bytes"] - ld["tables_allocated"]
        p(f"            of which beyond the files' own sizes {fmt_mib(extra)}: pages dirtied"
          f" again after a writeback (msync at each checkpoint, or the kernel's)")
    p(f"   memory   RSS {mem['VmRSS'] / 1024:,.1f} MiB (anon {mem['RssAnon'] / 1024:,.1f},"
      f" file {mem['RssFile'] / 1024:,.1f}; id tables' mapped pages"
      f" {mem['id_tables_rss'] / 1024:,.1f}); before opening RSS {mem0['VmRSS'] / 1024:,.1f}"
      f" MiB")
    p("")
    p(f"2. lookups  engine.find_event_id at {n:,} ids, {lk['lookups']:,} per run [m]:")
    p(f"            absent  {lk['absent_per_s']:>11,.0f}/s  (index alone"
      f" {lk['absent_index_only_per_s']:,.0f}/s); {lk['absent_slots']:.2f} slots read,"
      f" {lk['absent_log_reads']:.4f} log reads per lookup")
    p(f"            present {lk['present_per_s']:>11,.0f}/s  (index alone"
      f" {lk['present_index_only_per_s']:,.0f}/s); {lk['present_slots']:.2f} slots read,"
      f" {lk['present_log_reads']:.4f} log reads per lookup")
    if "present_first_in_record_per_s" in lk:
        p(f"            present, first event of its {ld['batch']}-event record"
          f" {lk['present_first_in_record_per_s']:,.0f}/s; last"
          f" {lk['present_last_in_record_per_s']:,.0f}/s")
    p(f"            slots counted on {lk['sample']:,} ids of each kind by walking each level"
      f" as _Level.positions does (model at this N: {ex['model_slots_at_n']:.2f} for absent);"
      f" wrong answers: {lk['present_not_found']} present not found,"
      f" {lk['absent_found']} absent found")
    p("")
    p(f"3. re-open  with ids.state: {ro['open_seconds']:.3f} s"
      f" (id index {ro['open_ids_seconds'] * 1000:.1f} ms) [m]")
    p(f"            without ids.state (rebuilt from the log): {ro['rebuild_open_seconds']:.1f} s;"
      f" id index {ro['rebuild_ids_seconds']:.1f} s for {ro['rebuilt_ids']:,} ids ="
      f" {ro['rebuild_ids_per_s']:,.0f} ids/s, {ro['rebuild_levels']} levels; of which the"
      f" log scan alone {ro['log_scan_seconds']:.1f} s; checkpoint after"
      f" {ro['rebuild_checkpoint_seconds']:.2f} s")
    p("")
    p(f"4. appends  1 event per call, {ap['appends']:,} per run, on the loaded engine [m]:"
      f" plain {ap['plain_per_s']:,.0f}/s, with a fresh id {ap['ids_per_s']:,.0f}/s;"
      f" ratio {ap['ratio']:.2f} ({ap['us_per_id']:.1f} us per event for idempotency)")
    p(f"            of which the general write path (engine.write without ids,"
      f" {ap['write_path_per_s']:,.0f}/s) {ap['us_write_path']:.1f} us, the ids on it"
      f" (checks, lookup, extras, index insert) {ap['us_ids_on_write_path']:.1f} us")
    p("")
    p(f"extrapolation to {ex['ids']:,} ids (a model from the layout and the measured"
      f" B/id, not a measurement): {ex['levels']} levels; tables"
      f" {ex['bytes_at_measured_per_id'] / 1e9:,.1f} GB at the measured"
      f" {ld['tables_allocated'] / n:.1f} B/id ({ex['layout_apparent_bytes'] / 1e9:.1f} GB"
      f" apparent by the layout); ~{ex['absent_slots']:.1f} slots read per absent lookup and"
      f" ~{ex['present_slots']:.1f} per present one, in {ex['levels']} pages of"
      f" {ex['levels']} files (random I/O unless the tables stay in the page cache)")


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2_000_000, help="ids to load")
    parser.add_argument("--batch", type=int, default=100, help="events per append while loading")
    parser.add_argument("--lookups", type=int, default=100_000, help="lookups per run and kind")
    parser.add_argument("--appends", type=int, default=20_000,
                        help="single-event appends per run and kind")
    parser.add_argument("--sample", type=int, default=20_000,
                        help="lookups whose slots are counted")
    parser.add_argument("--runs", type=int, default=3, help="runs per cheap figure (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default=None,
                        help="scratch directory (default: a temp dir under /tmp, removed)")
    parser.add_argument("--json", action="store_true", help="print JSON, not the figure block")
    args = parser.parse_args()
    if args.ids < args.batch or args.batch < 1 or args.runs < 1:
        parser.error("--ids must be at least --batch, which must be positive; --runs too")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="meilies-bench-ids-",
                                                                 dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    directory = root / "data"
    started = time.perf_counter()
    load_before = os.getloadavg()
    report: dict[str, object] = {}
    try:
        engine, report["load"] = load(directory, args.ids, args.batch)
        report["lookups"] = lookups(engine, args.lookups, args.runs, args.batch, args.sample,
                                    args.seed)
        report["appends"] = appends(engine, args.appends, args.runs)
        engine.close()
        report["reopen"] = reopen(directory, args.runs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report["extrapolation"] = extrapolate(report["load"], report["lookups"])
    report["meta"] = {
        "tool": "bench_ids", "argv": sys.argv[1:], "runs": args.runs,
        "seconds": round(time.perf_counter() - started, 1), "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "fsync": "no",
        "first_bits": id_index.FIRST_BITS, "max_load": id_index.MAX_LOAD,
    }
    if args.json:
        print(json.dumps(rounded(report), indent=2))
    else:
        print_block(report)
        print(f"({report['meta']['seconds']} s in all)")


if __name__ == "__main__":
    main()
