"""Durability and visibility: syncs (whole or in two halves), take-backs, publishing.

``append`` writes a record to the operating system and returns; :meth:`Durability.sync`
makes everything appended so far durable with one fdatasync, so many appends share one
(group commit). Readers see an event only once it is durable under the policy in force:
with ``fsync="always"`` after the sync that covers it, with ``everysec`` or ``no`` once
written (a process crash loses nothing the kernel has). When a write or sync fails,
the appends it was for are *taken back*: the stream table and the log's end rewind,
the file is cut back, and writers learn it from :meth:`Durability.lost_since`.

A mixin of :class:`~meilies.engine.log.Engine`, split out so that durability is one
file; the state it uses (``_pending``, ``_durable_position``, ``_visible_position``,
``_losses``...) is the engine's, set up in ``Engine.__init__``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from .errors import StorageError
from .segment import Segment

log = logging.getLogger("meilies.engine")

#: Take-backs remembered for writers waiting to hear whether their appends stayed.
LOSSES_KEPT = 4096

Listener = Callable[[set[int]], None]


class SyncTicket(NamedTuple):
    """A sync begun by :meth:`Engine.begin_sync`: the log is durable up to ``position``
    once an fdatasync of the file behind ``fd`` (the active segment's) returns. (A
    named tuple: one per sync, on the hot path.)"""

    fd: int
    position: int
    #: Size of ``segment`` (the active one) at ``position``.
    size: int
    segment: Segment
    #: ``Engine.loss_mark`` when the sync began.
    mark: int



class Durability:
    """Syncing, taking back and publishing appended events (see the module docstring)."""

    def sync(self) -> int:
        """Make every appended event durable (one fdatasync); return the durable position.

        On failure the events appended since the last sync are taken back (never
        visible, cut from the file) and :class:`StorageError` is raised.
        """
        self._check_open()
        self.flush()
        if self._durable_position < self._next_position:
            try:
                self.segments[-1].sync()
            except StorageError as exc:
                if self.fsync == "always":
                    self._take_back(0, exc)
                    self.segments[-1].truncate_to(self._durable_size)
                raise
            self._durable_position = self._next_position
            self._durable_size = self.segments[-1].size
        if self._pending:
            self._publish()
        return self._durable_position

    def begin_sync(self) -> SyncTicket | None:
        """Write everything appended and return what makes it durable, or None if it is.

        :meth:`sync` in two halves, for a caller that runs the fdatasync elsewhere (in
        another process, on a descriptor of the same file) while appends go on: then it
        calls :meth:`end_sync` with the outcome. Meanwhile anything may happen here,
        including :meth:`sync` itself (a roll's) and its failure, and further
        tickets; :meth:`end_sync` accounts for it. The caller ends tickets in the order
        it began them (each fdatasync covers the writes before it: a later ticket's
        sync covers an earlier one's too). Raises :class:`StorageError` if the write
        fails (the unwritten appends are then taken back).
        """
        self._check_open()
        self.flush()
        if self._durable_position >= self._next_position:
            return None
        segment = self.segments[-1]
        return SyncTicket(segment.fileno(), self._next_position, segment.size, segment,
                          self.loss_mark)

    def end_sync(self, ticket: SyncTicket, error: OSError | None) -> int:
        """Finish a :meth:`begin_sync` whose fdatasync gave ``error`` (None: it worked).

        On success everything up to ``ticket.position`` is durable and visible. On
        failure it is :meth:`sync`'s failure: under ``always`` every append not durable
        is taken back and cut from the file, and :class:`StorageError` is raised.
        Either way nothing happens if a failed sync since :meth:`begin_sync` already
        took back what the ticket was for, or another sync covered it. Returns the
        durable position.
        """
        if self.lost_since(ticket.mark, ticket.position) is not None:
            # The ticket's appends were all written at begin_sync, and only a failed
            # sync takes written appends back: every one of them not yet durable is
            # gone (positions are handed out again since), so its outcome concerns
            # nothing that remains; its writers learn it from lost_since.
            return self._durable_position
        if ticket.position <= self._durable_position:
            if error is not None:  # another sync (a roll's) said these were durable
                log.error("an fdatasync of %s failed (%s) after another sync of the file"
                          " had succeeded; the events it covered stay acknowledged",
                          ticket.segment.path.name, error)
            return self._durable_position
        # Not covered and nothing taken back, so no roll since begin_sync (a roll syncs
        # everything first): the ticket's segment is still the active one.
        if error is None:
            self._durable_position = ticket.position
            self._durable_size = ticket.size
            self._publish(ticket.position)
            return self._durable_position
        exc = StorageError(ticket.segment.path, "fdatasync", error)
        if self.fsync == "always":
            self._take_back(0, exc)
            self.segments[-1].truncate_to(self._durable_size)
        raise exc

    def _take_back(self, first: int, error: StorageError) -> None:
        """Forget pending appends ``first`` and after: their write or sync failed.

        Rewinds the stream table and the log's end, so that no part of them is ever
        read; the caller cuts the file back (a failed write already has). Remembered
        for :meth:`lost_since`.
        """
        taken = self._pending[first:]
        if not taken:
            return
        self._losses.append((taken[0][4], error))
        if len(self._losses) > LOSSES_KEPT:
            self._forgotten_loss = self._losses.pop(0)[1]
            self._losses_forgotten += 1
        del self._pending[first:]
        self._written_pending = min(self._written_pending, first)
        streams = self.streams
        for _segment, _offsets, _lengths, sid, _position, number in reversed(taken):
            streams.next_number[sid] = number
        newest = len(streams) - 1
        while newest >= 0 and streams.next_number[newest] == 0:
            streams.drop_newest(newest)
            newest -= 1
        self._next_position = taken[0][4]
        if self._unpublished_order:
            self._forget_ids_from(self._next_position)

    @property
    def loss_mark(self) -> int:
        """How many times appends were taken back so far: what a writer notes when it
        appends, to ask :meth:`lost_since` once it is told its sync is done."""
        return self._losses_forgotten + len(self._losses)

    def lost_since(self, mark: int, end_position: int) -> StorageError | None:
        """The error that took back appends ending at or before ``end_position`` made
        after ``loss_mark`` was ``mark``, or None if none of them was taken back.

        Positions are handed out again after a take-back, so ``durable_position``
        alone cannot tell a writer that its events went: any sync may fail (a roll's,
        a checkpoint's, another writer's flush), not only the one it waits for. A
        take-back of the appends from position P on took this writer's when P is
        below its ``end_position``. Beyond the LOSSES_KEPT newest take-backs the
        answer is the conservative one: an error.
        """
        start = mark - self._losses_forgotten
        if start < 0:
            return self._forgotten_loss
        for position, error in self._losses[start:]:
            if position < end_position:
                return error
        return None

    def _publish(self, upto: int | None = None) -> None:
        """Make pending events visible (those before position ``upto``, if given) and
        tell the listeners which streams changed."""
        pending = self._pending
        count = len(pending)
        if upto is not None:
            while count and pending[count - 1][4] >= upto:
                count -= 1
            if not count:
                return
        changed: set[int] = set()
        streams = self.streams
        for segment, offsets, lengths, sid, position, number in pending[:count]:
            segment.index.add_run(offsets, lengths, sid, position - segment.base_position,
                                  number)
            streams.make_visible(sid, number + len(offsets))
            changed.add(sid)
        _segment, offsets, _lengths, _sid, position, _number = pending[count - 1]
        self._visible_position = position + len(offsets)
        if self._unpublished_order:
            self._index_visible_ids()
        del pending[:count]
        self._written_pending = max(0, self._written_pending - count)
        self.segments[-1].copies.follow()
        for listener in self._listeners:
            listener(changed)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(stream_ids)`` whenever events of those streams become visible.

        It runs inside ``append``/``sync``: it must not block or call back in.
        """
        self._listeners.append(listener)
