"""Group commit: fdatasyncs run back to back off the event loop, each covering every
write made before it began.

A connection appends its requests' events (the engine keeps them in memory), then
waits here for durability. At the end of the loop turn, once every connection with a
request ready has run it (Redis' ``beforeSleep``), the engine writes everything
appended so far with one ``pwritev`` (``Engine.begin_sync``) and the syncer (syncer.py:
a helper process) is asked for an fdatasync; the waiting writers are that sync's.
Meanwhile the event loop serves other connections, and a later turn asks again for
its own writers while the first sync still runs: the helper takes every request
waiting for it into its next fdatasync, which it starts the moment the previous one
returns. So the disk never waits for the loop to read an answer and ask again, and
under load each sync covers everything written while the previous one ran. Answers
come back in order; a writer is released once the log is durable past its appends, or
with the error if a failure took them back (its sync's, or any write or sync before
it: under ``always`` a failed sync takes back every append not durable, so the
writers of the syncs still in flight behind it are answered at once).

Measured on this project's 2-core machine, 4 connections publishing 100-byte events
(``python3 tools/bench_server.py``; medians, Redis 7 in the same runs): with one
fdatasync per loop turn on the loop itself, as Redis does, every client waited for
the sync plus all the Python work of the turn: 14,000 events/s at depth 1 (Redis
20,400-22,000) and 185,000-208,000 at depth 64 (Redis 290,000). With the helper
process, one sync at a time, started as soon as a writer waited: 15,300 and 233,000
(Redis 21,400 and 296,000); but between two syncs the helper waited about 50 us for
the loop to read its answer and ask again (``perf trace``: 116 us in fdatasync, 51 us
in recvmsg per sync at depth 1). Asking at the end of the turn, with up to
MAX_IN_FLIGHT requests outstanding and the helper taking all that wait: at depth 64,
184,000 events/s against 150,000 for one at a time (Redis 171,000), medians of four
alternating 3-second runs on a busy host; at depth 1 no difference (9,200 and 9,300).
With cheaper indexing on top, ``bench_server.py --runs 5`` on a quieter host: 276,100
against Redis' 269,200 at depth 64, 13,600 against 20,200 at depth 1. See syncer.py
for why not a thread.

Under ``--fsync everysec`` the same syncer makes the log durable once a second, so
that a second's worth of writes never blocks the loop while the disk takes it.
"""

from __future__ import annotations

import collections
import logging
import os
import time

import gevent
from gevent import getcurrent
from gevent.hub import Waiter, get_hub

from ..engine import Engine
from ..engine.errors import EngineError, StorageError
from ..engine.log import SyncTicket
from .syncer import GONE, SyncProcess, Syncer

log = logging.getLogger("meilies.server")

#: How long a stopping server waits for the answers to the syncs in flight.
STOP_WAIT_SECONDS = 30.0

#: (waiter, global position its appends end at, ``engine.loss_mark`` before them)
Writer = tuple[Waiter, int, int]

#: Syncs asked of the syncer and not yet answered, at most. More are never needed: the
#: helper covers every request waiting for it with one fdatasync.
MAX_IN_FLIGHT = 8


class GroupCommit:
    def __init__(self, engine: Engine, syncer: Syncer | None = None) -> None:
        self._engine = engine
        self._queued: list[Writer] = []
        #: Syncs asked of the syncer, oldest first, each with the writers it covers.
        self._inflight: collections.deque[tuple[SyncTicket, list[Writer]]] = \
            collections.deque()
        self._scheduled = False
        #: The helper (or a test's syncer); None: not started yet, or syncing on the
        #: loop (``_inline``) because it could not start or died.
        self._syncer: Syncer | None = None
        self._inline = False
        self._answered = None
        self._periodic: gevent.Greenlet | None = None
        self._closing = False
        if syncer is not None:
            self._use(syncer)

    def start(self) -> None:
        """Start the syncer now (else the first sync starts it): a server that will
        sync starts its helper process with itself, not in a client's request."""
        if self._syncer is None and not self._inline:
            try:
                self._use(SyncProcess())
            except OSError as exc:
                log.error("cannot start the fdatasync helper process (%s); syncing on the"
                          " event loop", exc)
                self._inline = True

    def _use(self, syncer: Syncer) -> None:
        self._syncer = syncer
        self._answered = get_hub().loop.io(syncer.fileno(), 1, ref=False)
        self._answered.start(self._on_answer)

    # -- writers ------------------------------------------------------------------------

    def wait(self, position: int, mark: int) -> None:
        """Block this greenlet until the log is durable up to ``position`` (unless
        :meth:`close` came first: then until the server ends it).

        ``mark`` is ``engine.loss_mark`` from before the caller's appends. Raises the
        engine's :class:`StorageError` if they did not stay: the sync failed, or a write
        or sync before it (another writer's flush, a roll) took them back.
        """
        engine = self._engine
        while True:
            lost = engine.lost_since(mark, position)
            if lost is not None:
                raise lost
            if engine.durable_position >= position:
                return
            # Released only once durable or lost; should anything else wake us, we
            # check again and wait for the next sync.
            waiter = Waiter()
            self._queued.append((waiter, position, mark))
            if not self._scheduled and not self._closing:
                # At the end of this turn of the loop, once every connection with a
                # request ready has run it (Redis' beforeSleep): one sync for them all.
                self._scheduled = True
                get_hub().loop.run_callback(self._end_of_turn)
            waiter.get()

    def _end_of_turn(self) -> None:
        self._scheduled = False
        if self._queued and not self._closing:
            self._start()

    def _start(self) -> None:
        """Ask for a sync of everything appended, for the queued writers (unless
        MAX_IN_FLIGHT are asked already: then when an answer comes); release them at
        once if their appends are already durable or lost."""
        while len(self._inflight) < MAX_IN_FLIGHT:
            try:
                ticket = self._engine.begin_sync()
            except StorageError as exc:
                # The write failed and took its appends back: those writers get the
                # error; the others (whose appends were written before) try again.
                log.error("write failed; the appends not written get an error: %s", exc)
                self._release(self._sort(self._take_queued()))
                continue
            if ticket is None:  # durable already (another sync covered them)
                self._release(self._sort(self._take_queued()))
                return
            if self._inflight:
                last, covered = self._inflight[-1]
                if ticket.position <= last.position and ticket.mark == last.mark:
                    covered.extend(self._take_queued())  # written before it began
                    return
            self._inflight.append((ticket, self._take_queued()))
            self._request(ticket)
            return

    def _request(self, ticket: SyncTicket) -> None:
        """Have the ticket's fdatasync run: by the helper, or here (inline mode), its
        answer then handled from the hub like the helper's."""
        if self._syncer is None:
            self.start()
        if self._syncer is not None:
            try:
                self._syncer.request(ticket.fd, ticket.segment)
            except OSError as exc:
                self._syncer_failed(exc)  # syncs every ticket in flight, this one too
            return
        try:
            os.fdatasync(ticket.fd)
            error = None
        except OSError as exc:
            error = exc
        get_hub().loop.run_callback(self._finish, error, ticket)

    def _take_queued(self) -> list[Writer]:
        queued, self._queued = self._queued, []
        return queued

    def _on_answer(self) -> None:
        """The syncer answered (we run in the hub): finish each sync answered, oldest
        first (the helper answers requests in order; one fdatasync may answer several)."""
        while self._syncer is not None:
            try:
                error = self._syncer.result()
            except BlockingIOError:
                return  # every answer there is read (or part of one: the rest follows)
            except OSError as exc:  # the socket itself failed: as good as gone
                log.error("reading the fdatasync helper's answer: %s", exc)
                error = GONE
            if error is GONE:
                self._syncer_failed(error)
                return
            if not self._inflight:
                log.error("the fdatasync helper answered a sync never asked; ignored")
                continue
            self._finish(error)
            if not self._inflight:
                return  # every sync asked is answered: no read that could only block

    def _finish(self, error: OSError | None, ticket: SyncTicket | None = None) -> None:
        """Finish the oldest sync in flight (``ticket``, if given, must still be it),
        ask for the next one if writers wait for room (so that it overlaps the
        replies), then release the writers it covered."""
        if not self._inflight or (ticket is not None and ticket is not self._inflight[0][0]):
            return
        ticket, covered = self._inflight.popleft()
        ready = covered
        try:
            try:
                self._engine.end_sync(ticket, error)
            except EngineError as exc:
                log.error("sync failed (%d writers waited for it): %s", len(covered), exc)
                # Under "always" it took back every append not durable: the writers
                # of the syncs still in flight learn it now, not when those return.
                for _later, writers in self._inflight:
                    covered.extend(writers)
                    writers.clear()
            ready = self._sort(covered)
            if self._queued and not self._closing:
                self._start()
        finally:
            # Whatever failed above, no writer is left waiting for this sync: each one
            # released tells for itself whether its appends are durable or lost.
            self._release(ready)

    def _sort(self, writers: list[Writer]) -> list[Writer]:
        """The writers whose appends are durable or lost; the others (written after
        the sync began) go back to the queue for the next sync."""
        engine = self._engine
        ready = []
        for writer in writers:
            _waiter, position, mark = writer
            if engine.durable_position >= position or \
                    engine.lost_since(mark, position) is not None:
                ready.append(writer)
            else:
                self._queued.append(writer)
        return ready

    def _release(self, writers: list[Writer]) -> None:
        """Wake each writer; wait() itself tells lost appends from durable ones."""
        if not writers:
            return
        hub = get_hub()
        if getcurrent() is not hub:  # from wait(): waiters are switched from the hub
            hub.loop.run_callback(self._release, writers)
            return
        # Each switch runs that greenlet until it blocks again and comes back here.
        for waiter, _position, _mark in writers:
            waiter.switch(None)

    def _syncer_failed(self, cause: OSError) -> None:
        """The helper process is gone: sync on the event loop from now on, starting
        with the syncs it had (the written pages are still there to sync)."""
        process = getattr(self._syncer, "process", None)
        code = process.poll() if process is not None else None
        log.error("the fdatasync helper process is gone (%s, exit code %s); syncing on the"
                  " event loop from now on", cause, code)
        self._answered.stop()
        try:
            self._syncer.close()
        except OSError as exc:
            log.warning("closing the fdatasync helper: %s", exc)
        self._syncer = None
        self._inline = True
        for ticket, _covered in list(self._inflight):
            self._request(ticket)

    # -- everysec -----------------------------------------------------------------------

    def sync_periodically(self, seconds: float) -> None:
        """Make the log durable every ``seconds`` (``--fsync everysec``), off the loop."""
        self.start()
        self._periodic = gevent.spawn(self._every, seconds)

    def _every(self, seconds: float) -> None:
        while True:
            gevent.sleep(seconds)
            if not self._inflight:
                self._start()

    # -- stopping -----------------------------------------------------------------------

    def close(self) -> None:
        """Finish the syncs in flight (if any), then stop the syncer; no sync starts
        after this. Writers still queued are the server's to end (it syncs once more
        itself at stop, and closes their connections)."""
        self._closing = True
        if self._periodic is not None:
            self._periodic.kill()
        if self._syncer is None:  # never started, or inline: nothing is in flight
            return
        self._answered.stop()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while self._inflight:
            error = self._wait_for_answer(deadline)
            if error is GONE:  # the pages it was to sync are still there: sync them here
                try:
                    os.fdatasync(self._inflight[0][0].fd)
                    error = None
                except OSError as exc:
                    error = exc
            self._finish(error)
        self._syncer.close()

    def _wait_for_answer(self, deadline: float) -> OSError | None:
        """The answer to the oldest sync in flight, waiting for it until ``deadline``
        (at stop only)."""
        while True:
            try:
                return self._syncer.result()
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return GONE
                gevent.sleep(0.001)
