"""``meilies-fsck``: verify a data directory, and repair it with ``--repair``.

A thin layer over :func:`meilies.engine.fsck.verify`: it prints the report (text or
JSON) and maps it to PROTOCOL.md's exit codes.
"""

from __future__ import annotations

import json
import sys

import click

from ..engine import fsck
from ..engine.errors import DirectoryLocked, EngineError
from . import options

#: Show a progress bar (on stderr) when the log is at least this large.
PROGRESS_MIN_BYTES = 200 * 1024 * 1024
#: Streams named on the "--repair would remove" line; the rest are counted (--json has all).
STREAMS_SHOWN = 5

EXIT_CLEAN, EXIT_DAMAGE, EXIT_USAGE = 0, 1, 2

FSCK_EPILOG = """\b
Examples:
  meilies-fsck /var/lib/meilies            verify; change nothing
  meilies-fsck /var/lib/meilies --repair   cut the log after its last good record,
                                           rebuild indexes and checkpoint
  meilies-fsck /var/lib/meilies --repair --salvage
                                           keep the log after the damage: a
                                           placeholder ($damaged) for each event
                                           that cannot be trusted
  meilies-fsck /var/lib/meilies --json     the same report as one JSON document

\b
Exit status: 0 clean (or repaired), 1 damage found (or left after --repair),
2 usage error, unreadable directory, or directory locked by a running server.
Index and checkpoint problems count as damage, but --repair rebuilds them from
the log without losing an event. See docs/format.md.
"""


@click.command(epilog=FSCK_EPILOG)
@options.data_dir_argument
@click.option("--repair", is_flag=True,
              help="Truncate the log after its last good record, then rebuild the indexes and"
                   " the checkpoint; say exactly what was removed.")
@click.option("--salvage", is_flag=True,
              help="With --repair: keep every record after the damage instead of cutting"
                   " the log; each event that cannot be trusted becomes a placeholder (event"
                   " name $damaged, empty data, same stream and number), and each is named.")
@options.json_output
def main(data_dir: str, repair: bool, salvage: bool, json_output: bool) -> None:
    """Verify every record and index entry of the MeiliES data directory DATA_DIR.

    Stop the server first: fsck takes the directory's lock and refuses to run while a
    server holds it.
    """
    if salvage and not repair:
        _fail("--salvage works with --repair: meilies-fsck DIR --repair --salvage",
              json_output)
    bar = _ProgressBar()
    try:
        report = fsck.verify(data_dir, repair=repair, progress=bar, salvage=salvage)
    except DirectoryLocked as exc:
        _fail(f"{exc}: stop the meilies-server that uses it, then run meilies-fsck again",
              json_output)
    except (EngineError, OSError) as exc:
        _fail(str(exc), json_output)
    finally:
        bar.close()
    if json_output:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in _text(report, repair):
            click.echo(line)
    ok = report.clean or (repair and report.repaired)
    sys.exit(EXIT_CLEAN if ok else EXIT_DAMAGE)


def _fail(message: str, json_output: bool) -> None:
    if json_output:
        click.echo(json.dumps({"error": message, "exit": EXIT_USAGE}))
    click.echo(f"meilies-fsck: {message}", err=True)
    sys.exit(EXIT_USAGE)


class _ProgressBar:
    """``progress(done, total)`` for verify: a click bar on stderr for large logs."""

    def __init__(self) -> None:
        self._bar = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        if self._bar is None or done < self._done:  # a new pass (the check after a repair)
            self.close()
            self._bar = click.progressbar(length=total, label="verifying", file=sys.stderr)
            self._bar.__enter__()
            self._done = 0
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


# -- the text report ---------------------------------------------------------------------


def _text(report: fsck.FsckReport, repair: bool) -> list[str]:
    lines = [_summary(report)]
    lines += [problem.describe() for problem in report.problems]
    done = report.repair
    if done is not None and done.salvaged is not None:
        lines += _salvaged(done.salvaged)
    elif report.removal is not None:
        verb = "removed" if done and done.removed else "--repair would remove"
        lines += _removal(report.removal, verb)
    derived = [p for p in report.problems if p.severity == "derived"]
    if (derived or report.removal) and not done:
        lines.append("--repair also deletes the index files and the checkpoint and rebuilds"
                     " them from the log (derived data: no event is lost)")
    lines += [f"note: {note}" for note in report.notes]
    if done is not None:
        if done.deleted_derived:
            lines.append(f"deleted {', '.join(done.deleted_derived)}; the engine rebuilt the"
                         " index files and checkpoint of the remaining log")
        lines += [f"rebuilt: {what}" for what in done.rebuilt]
        if done.error:
            lines.append(f"repair failed: {done.error}")
    if report.after is not None:
        lines.append("after repair: " + _summary(report.after))
        lines += ["after repair: " + p.describe() for p in report.after.problems]
    lines.append(_verdict(report, repair))
    return lines


def _summary(report: fsck.FsckReport) -> str:
    good = "good " if report.removal is not None else ""
    return (f"{report.path}: {report.segments} segments, {report.streams} streams,"
            f" {report.events} {good}events, {report.bytes} bytes of log,"
            f" {report.index_bytes} bytes of indexes"
            + (f", {report.frame_copy_bytes} of frame copies" if report.frame_copy_bytes else "")
            + f"; checked in {report.seconds:.2f}s"
            f" ({report.events_per_second:,.0f} events/s)")


def _removal(removal: fsck.Removal, verb: str) -> list[str]:
    ranges = [r.describe() for r in removal.events[:STREAMS_SHOWN]]
    if len(removal.events) > STREAMS_SHOWN:
        ranges.append(f"and {len(removal.events) - STREAMS_SHOWN} more streams")
    if removal.undecodable_bytes:
        ranges.append(f"{removal.undecodable_bytes} bytes with no decodable record")
    what = ", ".join(ranges) if ranges else "no events"
    lines = [f"{verb} {removal.bytes} bytes ({what})"]
    claimed = [r.describe() for r in removal.events if not r.verified]
    if claimed:
        lines.append("  named only by the header of a damaged record: " + ", ".join(
            claimed[:STREAMS_SHOWN]) + (", ..." if len(claimed) > STREAMS_SHOWN else ""))
    if removal.rewrite is not None:
        path, offset, record, kept = removal.rewrite
        done = "kept" if verb == "removed" else "--repair would keep"
        lines.append(f"  {done} {kept.describe()}: the whole events before the damaged one,"
                     f" written back as a record of {len(record)} bytes at {path.name}"
                     f" offset {offset}")
    for path, size, removed in removal.truncate:
        lines.append(f"  {path.name}: cut to {size} bytes ({removed} bytes after the last good"
                     " event)" if removal.rewrite is not None else
                     f"  {path.name}: cut to {size} bytes ({removed} bytes after the last good"
                     " record)")
    for path, size in removal.delete:
        lines.append(f"  {path.name}: the whole file ({size} bytes)")
    return lines


def _salvaged(result) -> list[str]:
    """Every event replaced, every byte span lost: nothing summarised away."""
    lines = [f"salvaged: {result.replaced_count} events replaced by placeholders ($damaged),"
             f" every record after the damage kept"]
    lines += [f"  replaced {r.describe()}" for r in result.replaced]
    lines += [f"  lost {path.name} bytes {start}..{end - 1} ({end - start} bytes)"
              for path, start, end in result.lost]
    if result.torn is not None:
        path, offset, size = result.torn
        lines.append(f"  dropped a torn tail: {path.name} offset {offset} ({size} bytes)")
    lines += [f"  note: {note}" for note in result.notes]
    lines += [f"  rewrote {name}" for name in result.rewritten]
    return lines


def _verdict(report: fsck.FsckReport, repair: bool) -> str:
    if report.clean:
        return "clean"
    log = sum(1 for p in report.problems if p.severity == "log")
    derived = sum(1 for p in report.problems if p.severity == "derived")
    other = len(report.problems) - log - derived
    counts = ", ".join(f"{n} {what}" for n, what in ((log, "in the log"),
                                                     (derived, "in derived files"),
                                                     (other, "foreign files")) if n)
    n = len(report.problems)
    found = f"damage found: {n} problem{'s' if n != 1 else ''} ({counts})"
    if not repair:
        fixable = all(p.repairable for p in report.problems)
        return found + ("; run with --repair to fix" if fixable else
                        "; move the foreign files out of the directory first")
    if report.repaired:
        return found + "; repaired: clean"
    return found + "; not repaired"


if __name__ == "__main__":
    main()
