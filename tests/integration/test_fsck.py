"""``meilies-fsck`` against real data directories: damage scripted on disk, the real
program run as a subprocess, assertions on what it says and on its exit status
(Redis ``tests/integration/aof.tcl`` + ``redis-check-aof --fix``).

Damage helpers are named after the damage (LevelDB ``log_test.cc``); each test name
states the scenario.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meilies.engine import Engine, fsck
from meilies.engine import format as fmt
from meilies.engine.files import SEGMENT_SUFFIX

#: Small segments: a few thousand events roll over several files.
SMALL_SEGMENT = 64 * 1024
DATA = b"x" * 60  # about a 100-byte event once framed


# -- building and damaging a data directory --------------------------------------------------


def write_events(directory: Path, streams: int = 20, batches: int = 10, batch: int = 10,
                 segment_size: int = SMALL_SEGMENT) -> list[tuple[bytes, int, bytes, bytes]]:
    """Append ``batches`` rounds of one batch per stream; return every event in log order."""
    with Engine.open(directory, fsync="no", segment_size=segment_size) as engine:
        for round_ in range(batches):
            for s in range(streams):
                engine.append(b"orders-%d" % s,
                              [(b"created", DATA + b"%d" % round_)] * batch)
    return read_all(directory)


def read_all(directory: Path) -> list[tuple[bytes, int, bytes, bytes]]:
    with Engine.open(directory) as engine:
        return [(e.stream, e.number, e.name, bytes(e.data)) for e in engine.read_all()]


def segment_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == SEGMENT_SUFFIX)


def record_spans(segment: Path) -> list[tuple[int, int, fmt.RecordHeader]]:
    """(offset, size, header) of each record of a segment, by walking the headers."""
    raw = segment.read_bytes()
    spans, at = [], fmt.SEGMENT_HEADER_SIZE
    while at < len(raw):
        header = fmt.decode_record_header(raw, at)
        spans.append((at, header.size, header))
        at += header.size
    return spans


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x5A]))


def fix_checksum(raw: bytearray, offset: int, size: int) -> None:
    """Recompute a record's checks after its bytes were changed on purpose."""
    fmt.reseal_record(raw, offset)


def append_torn_record(segment: Path, stream: bytes, stream_id: int, position: int,
                       number: int, keep_short_by: int = 20) -> int:
    """Append a record minus its last bytes, as a crash mid-write leaves it; its size."""
    record = fmt.encode_record(stream, stream_id, position, number,
                               [(b"created", DATA)] * 3).data
    with open(segment, "ab") as handle:
        handle.write(record[:-keep_short_by])
    return len(record) - keep_short_by


def append_record(segment: Path, stream: bytes, stream_id: int, position: int,
                  number: int) -> None:
    """Append a whole, checksummed record (that may contradict the log's numbering)."""
    record = fmt.encode_record(stream, stream_id, position, number, [(b"created", DATA)])
    with open(segment, "ab") as handle:
        handle.write(record.data)


def run_fsck(directory: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meilies.cli.fsck", str(directory), *args],
                          capture_output=True, text=True, timeout=300)


def json_report(directory: Path, *args: str) -> tuple[int, dict]:
    done = run_fsck(directory, "--json", *args)
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


# -- a clean directory -------------------------------------------------------------------------


def test_clean_directory_exits_0_with_a_summary(data_dir):
    events = write_events(data_dir)
    done = run_fsck(data_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    segments = len(segment_files(data_dir))
    assert segments > 3
    assert f"{segments} segments, 20 streams, {len(events)} events" in done.stdout
    assert done.stdout.strip().endswith("clean")


def test_clean_directory_json_has_counts_and_no_problems(data_dir):
    events = write_events(data_dir)
    code, report = json_report(data_dir)
    assert code == 0
    assert report["clean"] is True and report["problems"] == []
    assert report["events"] == len(events) and report["streams"] == 20
    assert report["bytes"] == sum(p.stat().st_size for p in segment_files(data_dir))


def test_fsck_changes_nothing_without_repair(data_dir):
    write_events(data_dir)
    segment = segment_files(data_dir)[1]
    offset = record_spans(segment)[1][0]
    flip_byte(segment, offset + 70)
    before = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"}
    assert run_fsck(data_dir).returncode == 1
    assert {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"} == before


# -- damage in the log -------------------------------------------------------------------------


def test_flipped_byte_in_old_record_names_file_and_offset_and_repair_keeps_earlier_events(
        data_dir):
    events = write_events(data_dir)
    segments = segment_files(data_dir)
    old = segments[1]  # sealed, with newer segments after it
    spans = record_spans(old)
    offset, _size, header = spans[2]
    flip_byte(old, offset + fmt.RECORD_HEADER_SIZE + 30)  # inside the record's body

    done = run_fsck(data_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"segment {old.name}: ok_up_to={offset} size={old.stat().st_size}"
            f" bad_bytes={old.stat().st_size - offset} reason=\"checksum mismatch\"") \
        in done.stdout
    removed = sum(p.stat().st_size for p in segments[2:]) + old.stat().st_size - offset
    assert f"--repair would remove {removed} bytes" in done.stdout
    # The damaged record's stream comes first; its range runs on into later records.
    assert re.search(rf"\(events {header.first_number}\.\.\d+ of stream"
                     rf" 'orders-{header.stream_id}'", done.stdout)

    repaired = run_fsck(data_dir, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"removed {removed} bytes" in repaired.stdout
    assert f"{old.name}: cut to {offset} bytes" in repaired.stdout
    for gone in segments[2:]:
        assert f"{gone.name}: the whole file" in repaired.stdout
        assert not gone.exists()
    assert run_fsck(data_dir).returncode == 0
    assert read_all(data_dir) == events[:header.base_position]


def test_torn_tail_on_newest_segment_is_damage_and_repair_drops_only_it(data_dir):
    events = write_events(data_dir)
    newest = segment_files(data_dir)[-1]
    size = newest.stat().st_size
    torn = append_torn_record(newest, b"orders-3", 3, len(events), 100)

    done = run_fsck(data_dir)
    assert done.returncode == 1
    assert f"segment {newest.name}: ok_up_to={size} size={size + torn} bad_bytes={torn}" \
        in done.stdout
    assert "kind=torn-tail" in done.stdout
    assert f"--repair would remove {torn} bytes (events 100..102 of stream 'orders-3')" \
        in done.stdout

    repaired = run_fsck(data_dir, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert newest.stat().st_size == size
    assert run_fsck(data_dir).returncode == 0
    assert read_all(data_dir) == events


def test_truncated_tail_that_the_checkpoint_covered_is_damage_not_torn(data_dir):
    write_events(data_dir)
    newest = segment_files(data_dir)[-1]
    with open(newest, "r+b") as handle:
        handle.truncate(newest.stat().st_size - 10)
    code, report = json_report(data_dir)
    assert code == 1
    assert report["problems"][0]["kind"] == "damaged-record"
    assert "checkpoint" in report["problems"][0]["reason"]
    assert run_fsck(data_dir, "--repair").returncode == 0
    assert run_fsck(data_dir).returncode == 0


def test_checksummed_record_that_breaks_numbering_is_damage(data_dir):
    events = write_events(data_dir)
    newest = segment_files(data_dir)[-1]
    size = newest.stat().st_size
    append_record(newest, b"orders-5", 5, len(events), 7)  # orders-5 is at 100, not 7
    code, report = json_report(data_dir)
    assert code == 1
    problem = report["problems"][0]
    assert problem["kind"] == "damaged-record" and problem["offset"] == size
    assert "event number 7 of stream 'orders-5', expected 100" in problem["reason"]
    code, report = json_report(data_dir, "--repair")
    assert code == 0 and report["repaired"] and report["after"]["clean"]
    assert read_all(data_dir) == events


def test_frame_that_contradicts_its_header_under_a_valid_checksum_is_damage(data_dir):
    """The deep check: a frame spelling the wrong number, re-checksummed (FixChecksum)."""
    write_events(data_dir)
    segment = segment_files(data_dir)[0]
    offset, size, header = record_spans(segment)[4]
    raw = bytearray(segment.read_bytes())
    frame = raw.index(b"\r\n:%d\r\n" % header.first_number, offset)
    raw[frame + 3] = ord("7") if raw[frame + 3] != ord("7") else ord("8")
    fix_checksum(raw, offset, size)
    segment.write_bytes(bytes(raw))
    code, report = json_report(data_dir)
    assert code == 1
    problem = report["problems"][0]
    assert (problem["file"], problem["offset"]) == (segment.name, offset)
    assert problem["reason"] == (
        f"event 'orders-{header.stream_id}':{header.first_number} (position"
        f" {header.base_position}, event 0 of the record's 10): its frame does not match"
        " its header")


def test_damaged_segment_header_removes_that_segment_and_later_ones(data_dir):
    events = write_events(data_dir)
    segments = segment_files(data_dir)
    flip_byte(segments[2], 3)  # the magic
    code, report = json_report(data_dir)
    assert code == 1
    assert report["problems"][0]["kind"] == "bad-segment"
    assert report["problems"][0]["file"] == segments[2].name
    assert {d["file"] for d in report["removal"]["delete"]} == {p.name for p in segments[2:]}
    assert run_fsck(data_dir, "--repair").returncode == 0
    base = int(segments[2].name[:20])
    assert read_all(data_dir) == events[:base]


# -- derived files ------------------------------------------------------------------------------


def test_deleted_index_files_are_damage_and_repair_rebuilds_them(data_dir):
    events = write_events(data_dir)
    for index in list(data_dir.glob("*.pidx")) + list(data_dir.glob("*.sidx")):
        index.unlink()
    done = run_fsck(data_dir)
    assert done.returncode == 1
    assert re.search(r'index \d{20}\.pidx: reason="missing"', done.stdout)
    assert "no event is lost" in done.stdout
    assert "would remove" not in done.stdout  # the log is intact

    repaired = run_fsck(data_dir, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    sealed = segment_files(data_dir)[:-1]
    assert all(p.with_suffix(".pidx").exists() and p.with_suffix(".sidx").exists()
               for p in sealed)
    assert run_fsck(data_dir).returncode == 0
    assert read_all(data_dir) == events


def test_wrong_position_index_entry_is_named_with_its_offset(data_dir):
    write_events(data_dir)
    pidx = segment_files(data_dir)[0].with_suffix(".pidx")
    flip_byte(pidx, 24 * 5 + 16)  # entry 5, its number
    code, report = json_report(data_dir)
    assert code == 1
    problem = report["problems"][0]
    assert (problem["kind"], problem["file"], problem["offset"]) == ("index", pidx.name, 120)
    assert problem["severity"] == "derived" and problem["repairable"]
    assert json_report(data_dir, "--repair")[0] == 0


def test_damaged_checkpoint_is_derived_damage_and_repair_rewrites_it(data_dir):
    events = write_events(data_dir)
    flip_byte(data_dir / "checkpoint", 40)
    code, report = json_report(data_dir)
    assert code == 1
    assert [(p["kind"], p["reason"]) for p in report["problems"]] == \
        [("checkpoint", "checksum mismatch")]
    assert report["removal"] is None
    code, report = json_report(data_dir, "--repair")
    assert code == 0
    assert "checkpoint" in report["repair"]["deleted_derived"]
    assert report["repair"]["removed"] is None
    assert read_all(data_dir) == events


def test_checkpoint_with_a_wrong_stream_table_is_reported(data_dir):
    from meilies.engine import checkpoint as ckpt

    write_events(data_dir)
    state = ckpt.read(data_dir)
    state.next_number[4] += 1
    ckpt.write(data_dir, state)  # a valid checksum over a false claim
    code, report = json_report(data_dir)
    assert code == 1
    assert report["problems"][0]["kind"] == "checkpoint"
    assert "stream 4 has event count" in report["problems"][0]["reason"]


def test_stale_checkpoint_and_short_newest_index_are_notes_not_problems(data_dir):
    events = write_events(data_dir, segment_size=1 << 20)
    crash = ("import os, sys; from meilies.engine import Engine;"
             " e = Engine.open(sys.argv[1], fsync='always');"
             " e.append(b'orders-1', [(b'created', b'x')] * 5); e.sync(); os._exit(0)")
    subprocess.run([sys.executable, "-c", crash, str(data_dir)], check=True)
    # The process died without closing: the checkpoint and .pidx stay behind the log.
    code, report = json_report(data_dir)
    assert code == 0, report["problems"]
    assert report["events"] == len(events) + 5
    assert any("checkpoint covers the log up to position" in n for n in report["notes"])
    assert any("flushed at checkpoints" in n for n in report["notes"])


# -- the JSON report ------------------------------------------------------------------------------


def test_json_report_carries_the_same_facts_as_the_text(data_dir):
    write_events(data_dir)
    segment = segment_files(data_dir)[1]
    offset = record_spans(segment)[3][0]
    flip_byte(segment, offset + 100)
    (data_dir / segment_files(data_dir)[0].with_suffix(".sidx").name).unlink()
    text = run_fsck(data_dir).stdout
    code, report = json_report(data_dir)
    assert code == 1
    kinds = [p["kind"] for p in report["problems"]]
    assert kinds == ["index", "damaged-record"]
    damage = report["problems"][1]
    assert damage["file"] == segment.name and damage["ok_up_to"] == offset
    assert f"ok_up_to={damage['ok_up_to']} size={damage['size']}" \
           f" bad_bytes={damage['bad_bytes']}" in text
    assert f"--repair would remove {report['removal']['bytes']} bytes" in text
    for line in report["removal"]["events"][:5]:
        assert f"of stream '{line['stream']}'" in text
    assert f"{report['events']} good events" in text


# -- refusals: exit 2 ------------------------------------------------------------------------------


def test_nonexistent_directory_exits_2(tmp_path):
    done = run_fsck(tmp_path / "missing")
    assert done.returncode == 2
    assert "no such directory" in done.stderr


def test_directory_of_other_files_exits_2_and_is_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("not a data directory")
    done = run_fsck(tmp_path)
    assert done.returncode == 2
    assert "not a MeiliES data directory" in done.stderr
    assert not (tmp_path / "LOCK").exists()


def test_directory_locked_by_an_open_engine_exits_2_with_a_clear_message(data_dir):
    write_events(data_dir)
    with Engine.open(data_dir):
        done = run_fsck(data_dir, "--repair")
    assert done.returncode == 2
    assert "is locked by another process" in done.stderr
    assert "stop the meilies-server" in done.stderr
    assert done.stdout == ""


def test_usage_errors_exit_2(data_dir):
    write_events(data_dir)
    assert run_fsck(data_dir, "--no-such-option").returncode == 2
    missing = subprocess.run([sys.executable, "-m", "meilies.cli.fsck"], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "Missing argument" in missing.stderr


def test_foreign_file_is_damage_that_repair_will_not_touch(data_dir):
    write_events(data_dir)
    (data_dir / "backup.tar").write_bytes(b"mine")
    code, report = json_report(data_dir, "--repair")
    assert code == 1
    assert report["problems"][0]["kind"] == "foreign-file"
    assert "move it out" in report["repair"]["error"]
    assert (data_dir / "backup.tar").read_bytes() == b"mine"


# -- with the real server (Redis aof.tcl style) ------------------------------------------------------


def test_server_refuses_damaged_directory_until_fsck_repairs_it(data_dir, start_server):
    events = write_events(data_dir)
    old = segment_files(data_dir)[0]
    offset, _size, header = record_spans(old)[1]
    flip_byte(old, offset + 90)

    server = start_server(data_dir=data_dir, wait=False)
    assert server.wait_exit() != 0
    assert f"{old.name} at offset {offset}" in server.log()

    assert run_fsck(data_dir).returncode == 1
    assert run_fsck(data_dir, "--repair").returncode == 0
    server = start_server(data_dir=data_dir)
    client = server.client()
    assert client.call("last-event-number", "orders-0") == \
        b"*3\r\n+last-event-number\r\n+orders-0\r\n:9\r\n"
    client.close()
    assert server.stop() == 0
    assert read_all(data_dir) == events[:header.base_position]


# -- the library, in process: the parallel path and the report values ----------------------------


def test_parallel_verify_finds_damage_in_a_middle_chunk(data_dir, monkeypatch):
    events = write_events(data_dir, streams=30, batches=20, segment_size=1 << 20)
    monkeypatch.setattr(fsck.verifier, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(fsck.verifier, "CHUNK_BYTES", 16 * 1024)
    clean = fsck.verify(data_dir)
    assert clean.clean and clean.events == len(events)

    segment = segment_files(data_dir)[0]
    spans = record_spans(segment)
    offset, _size, header = spans[len(spans) // 2]
    flip_byte(segment, offset + 8)  # the checksum itself
    size = segment.stat().st_size
    seen = []
    report = fsck.verify(data_dir, progress=lambda done, total: seen.append((done, total)))
    assert [type(p) for p in report.problems] == [fsck.DamagedRecord]
    problem = report.problems[0]
    assert (problem.path, problem.offset, problem.reason) == \
        (segment, offset, "checksum mismatch")
    assert report.events == header.base_position
    assert seen[0][0] == 0 and all(done <= total for done, total in seen)

    repaired = fsck.verify(data_dir, repair=True)
    assert repaired.repaired and repaired.after.clean
    assert repaired.repair.removed.truncate == [(segment, offset, size - offset)]
    assert read_all(data_dir) == events[:header.base_position]


def test_parallel_verify_catches_numbering_broken_across_chunks(data_dir, monkeypatch):
    events = write_events(data_dir, streams=5, batches=40, segment_size=1 << 20)
    monkeypatch.setattr(fsck.verifier, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(fsck.verifier, "CHUNK_BYTES", 4 * 1024)
    newest = segment_files(data_dir)[-1]
    size = newest.stat().st_size
    append_record(newest, b"orders-2", 2, len(events), 399)  # orders-2 is at 400
    append_record(newest, b"orders-2", 2, len(events) + 1, 400)
    report = fsck.verify(data_dir)
    assert [(type(p), p.offset) for p in report.problems] == [(fsck.DamagedRecord, size)]
    assert "expected 400" in report.problems[0].reason
    assert report.events == len(events)
    assert [(r.stream, r.first, r.last) for r in report.removal.events] == \
        [(b"orders-2", 399, 400)]


def test_progress_bar_goes_to_stderr_for_a_large_log(data_dir, monkeypatch):
    from click.testing import CliRunner

    from meilies.cli import fsck as fsck_cli

    write_events(data_dir)
    monkeypatch.setattr(fsck_cli, "PROGRESS_MIN_BYTES", 0)  # every log is "large"
    result = CliRunner().invoke(fsck_cli.main, [str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "verifying" in result.stderr and "verifying" not in result.stdout
    assert result.stdout.strip().endswith("clean")


# -- docs/format.md stays true ------------------------------------------------------------------


def test_format_doc_worked_example_is_what_the_encoder_writes():
    doc = (Path(__file__).parents[2] / "docs" / "format.md").read_text()
    block = doc.split("### Worked example\n", 1)[1].split("```\n", 2)[1]
    dumped = bytes.fromhex("".join(line[10:57] for line in block.splitlines()[1:]))
    record = fmt.encode_record(b"orders-17", 0, 0, 0, [(b"created", b'{"total":12}'),
                                                      (b"paid", b"")],
                               timestamp_ms=1795000000000)
    assert dumped == fmt.encode_segment_header(0) + record.data
