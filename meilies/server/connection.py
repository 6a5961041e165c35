"""One client connection: read requests, run them in order, write replies back.

``handle(sock, address)`` runs in its own greenlet and its return closes the socket
(gevent's StreamServer). Each read is parsed into every complete request it holds;
they run in order and their replies go back in one ``sendall`` (pipelining). Replies
to writes wait for group commit (commit.py) under ``--fsync always``. Before a read
(``last-event-number``, ``subscribe``, ...) the connection's own earlier writes are
made durable and visible first, so a client always reads its own writes.

Subscriptions of a connection run in greenlets of their own and share the socket
through ``_send_lock``, so replies and events never interleave mid-frame.
"""

from __future__ import annotations

import logging
import socket
from operator import itemgetter
from typing import TYPE_CHECKING

import gevent
from gevent.lock import Semaphore
from gevent.hub import get_hub

from ..engine import ANY
from ..engine.errors import EngineError, InvalidArgument, StorageError
from ..engine.writes import Write, check_write
from . import commands, ranges, resp, subscription, transaction
from .errors import NOAUTH, CommandError, engine_error_reply, unknown_command, wrong_arity
from .transaction import Transaction

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("meilies.server")

RECV_SIZE = 256 * 1024
INTERNAL_ERROR = resp.error("ERR internal error")
#: The global position a settled write ends at, in ``Connection._writes`` entries.
_END_POSITION = itemgetter(2)
#: Subscriptions started between two turns of the event loop (see subscribe).
SPAWN_SLICE = 256
#: Up to this many views of the log are sent with sendmsg as they are, not joined.
FEW_FRAMES = 16
#: Pipelined publishes grouped into one record stop growing past this many bytes.
GROUP_BYTES = 4 * 1024 * 1024
# One receive buffer for every connection: all run on one thread, and a connection
# hands what it read to its parser (which copies it) before it can yield. A buffer
# per connection would cost 256 KiB of RSS per idle client.
_RECV_BUFFER = bytearray(RECV_SIZE)
_RECV_VIEW = memoryview(_RECV_BUFFER)


def _ok(results: list) -> bytes:
    """The reply to a deferred publish (backends/), whatever numbers it got."""
    return resp.OK


class Connection:
    def __init__(self, server: Server, sock: socket.socket, address) -> None:
        self.server = server
        self.engine = server.engine
        #: Where writes go (backends/): the engine itself, or the postgres backend.
        self.writer = server.writer
        #: Writes go to a backend that answers later (postgres): they are submitted
        #: as they come (so a pipeline's writes share commits) and their replies are
        #: filled in by ``_settle_writes``.
        self.deferred = server.writer is not server.engine
        #: (index in ``_out``, how many replies, the backend's AsyncResult, what makes
        #: a reply from the results) per deferred request, in order.
        self._deferred: list[tuple[int, int, object, object]] = []
        self.sock = sock
        self.address = address
        self.authenticated = server.config.requirepass is None
        self.closing = False
        #: True while a batch of requests is being run (graceful stop lets it finish).
        self.busy = False
        self._out: list[bytes | ranges.StreamedReply] = []
        #: Whether ``_out`` holds a reply sent as it is read (ranges.py).
        self._streamed = False
        #: Subscriptions made from now on send full frames (``envelope full``).
        self.full_envelope = False
        #: The queue between MULTI and EXEC/DISCARD (transaction.py), or None.
        self.transaction: Transaction | None = None
        #: Replies to appends not yet settled, one entry per append: (index of its
        #: first reply in ``_out``, how many replies, the global position the append
        #: ends at, ``engine.loss_mark`` before it). Each is judged on its own: a
        #: failure may take back one append of a pipeline and not the next.
        self._writes: list[tuple[int, int, int, int]] = []
        self._always = server.engine.fsync == "always"
        self._send_lock = Semaphore()
        #: A set: a subscription that ends removes itself, and a connection may hold
        #: 10,000 (a list made ending them all quadratic: 0.7 s of loop for 10,000).
        self._subscriptions: set[gevent.Greenlet] = set()

    # -- the request loop -------------------------------------------------------------------

    def run(self) -> None:
        parser = resp.RequestParser(max_bulk=self.server.config.max_bulk)
        sock = self.sock
        hub = get_hub()
        readable = hub.loop.io(sock.fileno(), 1)  # one watcher for the connection's life
        try:
            while not self.closing:
                # Back to the event loop before every read, even when data is waiting:
                # one read per connection per loop turn, as Redis serves clients, so
                # a client that keeps its socket full cannot starve the others.
                hub.wait(readable)
                n = sock.recv_into(_RECV_BUFFER)
                if not n:
                    return
                try:
                    requests = parser.feed(_RECV_VIEW[:n])
                    refusal = None
                except resp.ProtocolError as exc:
                    # Keep the reason, not the exception: its traceback refers to this
                    # frame, and the cycle would keep the connection (and what it holds)
                    # alive until the garbage collector came by.
                    requests, refusal = exc.requests, exc.reason
                self.busy = True
                self._run_batch(requests)
                if refusal is not None and not self.closing:
                    self._out.append(resp.error(f"ERR Protocol error: {refusal}"))
                    self.closing = True
                self.flush()
                self.busy = False
        except OSError as exc:
            log.debug("connection %s: %s", self.address, exc)
        finally:
            readable.close()
            self.busy = False
            self._end_subscriptions()

    def _run_batch(self, requests: list[list[bytes]]) -> None:
        """Run a read's requests in order; a run of publishes to one stream is one append.

        Pipelined publishes to the same stream (what a busy producer sends) become one
        record: one encoding, one checksum, and contiguous numbers, as they would get
        one after the other. They are acknowledged together anyway, after the same
        write (and sync); a request that fails its checks still gets its own error.
        """
        count = len(requests)
        if count == 1:
            self._execute(requests[0])
            return
        if self.authenticated and self.transaction is None and \
                _publishes_to_one_stream(requests):
            self._publish_run(requests[0][1], requests)  # a producer's batch, whole
            return
        i = 0
        while i < count and not self.closing:
            request = requests[i]
            if len(request) == 4 and self.authenticated and self.transaction is None and \
                    _is_publish(request[0]):
                stream = request[1]
                j = i + 1
                while (j < count and len(requests[j]) == 4 and requests[j][1] == stream
                       and _is_publish(requests[j][0])):
                    j += 1
                if j - i > 1:
                    self._publish_run(stream, requests[i:j])
                    i = j
                    continue
            self._execute(request)
            i += 1

    def _publish_run(self, stream: bytes, run: list[list[bytes]]) -> None:
        sizes = list(map(len, map(_DATA, run)))
        if sum(sizes) <= GROUP_BYTES:
            self._append_group(stream, run)
            return
        start = size = 0
        for i, length in enumerate(sizes):
            size += length
            if size > GROUP_BYTES:  # keep records (and what a failure takes back) modest
                self._append_group(stream, run[start:i + 1])
                start, size = i + 1, 0
        if start < len(run):
            self._append_group(stream, run[start:])

    def _append_group(self, stream: bytes, requests: list[list[bytes]]) -> None:
        """One append of the publishes ``requests``; if the engine refuses an argument,
        each is appended on its own, so that only the bad ones get the error."""
        out = self._out
        if self.deferred:
            write = Write(stream, list(map(_EVENT, requests)))
            try:
                check_write(write, self.engine.max_event_size)
            except InvalidArgument:  # one request each: a bad one is refused alone
                for request in requests:
                    out.append(self.defer([Write(stream, [_EVENT(request)])], _ok))
                return
            out.append(self.defer([write], _ok, len(requests)))
            out.extend([b""] * (len(requests) - 1))
            return
        try:
            result = self.writer.append(stream, list(map(_EVENT, requests)), ANY,
                                        flush=False)
        except InvalidArgument as exc:  # raised before anything is appended
            if len(requests) > 1:
                for request in requests:
                    self._append_group(stream, [request])
                return
            out.append(engine_error_reply(exc))
            return
        except EngineError as exc:
            reply = engine_error_reply(exc)
            if reply is None:
                log.exception("internal error appending %d publishes", len(requests))
                reply = INTERNAL_ERROR
            out.extend([reply] * len(requests))
            return
        except Exception:  # a bug: answer as _execute does, and keep serving
            log.exception("internal error appending %d publishes", len(requests))
            out.extend([INTERNAL_ERROR] * len(requests))
            return
        self.wrote(result.end_position, len(requests))
        out.extend([resp.OK] * len(requests))

    def _execute(self, request: list[bytes]) -> None:
        if self.transaction is not None:
            self._out.append(self._in_transaction(request))
            return
        command = commands.lookup(request[0])
        out = self._out
        if command is None:
            # Before AUTH, an unknown name is refused like any command (PROTOCOL.md:
            # "every command but AUTH and QUIT"): no telling which ones exist.
            out.append(unknown_command(request[0]).reply if self.authenticated else NOAUTH)
            return
        if not self.authenticated and not command.before_auth:
            out.append(NOAUTH)
            return
        if len(request) < command.min_args or (
                command.max_args is not None and len(request) > command.max_args):
            out.append(wrong_arity(command.name).reply)
            return
        if command.reads and (self._writes or self._deferred):
            self._settle_writes()
        try:
            reply = command.handler(self, request)
            if type(reply) is not bytes:
                self._streamed = True
            out.append(reply)
        except CommandError as exc:
            out.append(exc.reply)
        except EngineError as exc:
            reply = engine_error_reply(exc)
            if reply is None:
                log.exception("internal error running %r", request[0][:64])
                reply = INTERNAL_ERROR
            out.append(reply)
        except (gevent.GreenletExit, ConnectionError):
            # ConnectionError: the peer is gone (a subscribe sends as it runs); the
            # request loop ends the connection. Not a bug to log.
            raise
        except Exception:
            log.exception("internal error running %r", request[0][:64])
            out.append(INTERNAL_ERROR)

    # -- transactions (transaction.py) -------------------------------------------------------

    def begin_transaction(self) -> None:
        """``MULTI``: queue writes from now on (``-ERR`` if already queueing)."""
        if self.transaction is not None:
            raise transaction.NESTED
        self.transaction = Transaction()

    def _in_transaction(self, request: list[bytes]) -> bytes:
        """The reply to a request made between MULTI and EXEC/DISCARD."""
        txn = self.transaction
        name = request[0].lower()
        if name == b"exec" or name == b"discard":
            if len(request) != 1:
                return txn.refuse(wrong_arity(name.decode()).reply)
            self.transaction = None
            if name == b"discard":
                return resp.OK
            try:
                return txn.execute(self)
            except EngineError as exc:
                reply = engine_error_reply(exc)
                if reply is None:
                    log.exception("internal error running EXEC")
                    reply = INTERNAL_ERROR
                return reply
            except Exception:  # a bug: answer as _execute does, and keep serving
                log.exception("internal error running EXEC")
                return INTERNAL_ERROR
        if name == b"multi":
            return transaction.NESTED.reply
        if name in transaction.WRITES:
            return txn.queue(self, name, request)
        if commands.lookup(name) is None:
            return txn.refuse(unknown_command(request[0]).reply)
        shown = name[:64].decode("utf-8", "replace")
        return txn.refuse(resp.error(f"ERR '{shown}' is not allowed in a transaction: only"
                                     " publish, append and append-full are"))

    # -- durability of writes ---------------------------------------------------------------

    def wrote(self, position: int, replies: int = 1) -> None:
        """The next ``replies`` replies answer one append, ending at ``position``, not
        yet durable; ``_settle_writes`` settles them before anything is sent. (Called
        right after the append: nothing can have taken it back in between, so the loss
        mark noted now is the one from before it.)"""
        self._writes.append((len(self._out), replies, position, self.engine.loss_mark))

    def defer(self, writes: list[Write], render, replies: int = 1) -> bytes:
        """Submit one request of ``writes`` (stored all or none) to a backend that
        answers later; its ``replies`` replies, ``render(results)`` each (or the
        error), are filled in by ``_settle_writes``. Returns the placeholder the caller
        puts next in ``_out`` (and ``replies - 1`` more after it)."""
        self._deferred.append((len(self._out), replies, self.writer.submit(writes), render))
        return b""

    def _settle_deferred(self) -> None:
        out = self._out
        for at, replies, pending, render in self._deferred:
            try:
                reply = render(pending.get())
            except EngineError as exc:
                reply = engine_error_reply(exc)
                if reply is None:
                    log.error("internal error storing a write: %r", exc)
                    reply = INTERNAL_ERROR
            except Exception as exc:  # a bug: answer as _execute does, and keep serving
                log.error("internal error storing a write: %r", exc)
                reply = INTERNAL_ERROR
            if replies == 1:
                out[at] = reply
            else:
                out[at:at + replies] = [reply] * replies
        self._deferred.clear()

    def _settle_writes(self) -> None:
        """Make this connection's appends safe before replying: under ``--fsync
        always`` wait for the group commit (which writes and syncs them with everyone
        else's), otherwise write them now. Then each append whose events a failure took
        back (that write or sync, or any before it, such as a roll's) gets the error
        as its replies; the others stand. (With a deferred backend: wait for its
        answers.)"""
        if self._deferred:
            self._settle_deferred()
        writes = self._writes
        if not writes:
            return
        engine = self.engine
        failure = None
        try:
            if self._always:
                # Waiting for the append still standing that ends last waits for all
                # of them. Not simply the last one: an idempotent retry answers with
                # the position its events were first stored at, which may lie before
                # a new append pipelined ahead of it (a take-back rewinds positions,
                # so the survivors of one still end before the appends after it).
                standing = [w for w in writes if engine.lost_since(w[3], w[2]) is None]
                if standing:
                    _at, _count, position, mark = max(standing, key=_END_POSITION)
                    self.server.commit.wait(position, mark)
            else:
                engine.flush()
        except StorageError as exc:
            failure = exc  # each append is judged below
        judged = False
        for at, count, position, mark in writes:
            lost = engine.lost_since(mark, position)
            if lost is not None:
                self._out[at:at + count] = [engine_error_reply(lost)] * count
                judged = True
        if failure is not None and not judged:
            # The failure took back none of these appends by the engine's account:
            # never claim them stored on an unexplained failure.
            log.error("storage failure not traced to any append; answering them all with"
                      " it: %s", failure)
            for at, count, _position, _mark in writes:
                self._out[at:at + count] = [engine_error_reply(failure)] * count
        failure = None  # no frame-traceback cycle left for the garbage collector
        writes.clear()

    def flush(self) -> None:
        """Send every reply built so far, once their writes are durable."""
        self._settle_writes()
        if self._streamed:
            self._flush_streamed()
        elif self._out:
            out = self._out
            # One reply (a client waiting for each answer) goes as it is, not copied.
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not data:
                return  # a subscribe's reply is its confirmations, sent already
            if not self._subscriptions:
                _send_all(self.sock, data)  # no other sender on this socket
                return
            with self._send_lock:
                _send_all(self.sock, data)

    def _flush_streamed(self) -> None:
        """Send replies of which some are read as they are sent (ranges.py), in order.
        The lock is held throughout, so that no subscriber's frame lands inside one."""
        out = list(self._out)
        self._out.clear()
        self._streamed = False
        pending: list[bytes] = []
        with self._send_lock:
            for reply in out:
                if type(reply) is bytes:
                    pending.append(reply)
                    continue
                pending.append(reply.head)
                try:
                    for part in reply.parts:
                        pending.append(part)
                        _send_all(self.sock, b"".join(pending))
                        pending.clear()
                except ConnectionError:
                    raise  # the peer is gone: the request loop ends the connection
                except Exception as exc:  # noqa: BLE001 -- a reply cannot be mended halfway
                    # ReplyCut, or e.g. damage found by a later part's read: the array
                    # header is out, so the connection cannot go on; the server does.
                    log.error("connection %s: %s reply cut short, closing the connection:"
                              " %s", self.address, type(exc).__name__, exc)
                    self.closing = True
                    pending.clear()
                    break
            if pending:
                _send_all(self.sock, b"".join(pending))

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(self, specs: list[subscription.Spec]) -> None:
        """Confirm each spec, then start serving it from a pinned start."""
        server = self.server
        starts = []
        wakeups = []
        for spec in specs:
            # Registered before the confirmation goes out, so that INFO counts it by then.
            wakeups.append(server.notifier.watch(spec.stream))
            self._out.append(b"*2\r\n+subscribed\r\n" + resp.simple(spec.label))
            if spec.by_position:
                start = spec.start
            elif spec.stream is None:
                start = 0 if spec.start is not None else self.engine.visible_position
            else:
                start = spec.start if spec.start is not None \
                    else self.engine.next_number(spec.stream)
            starts.append(start)
        # The confirmations must reach the client before any event of these specs.
        try:
            self.flush()
        except BaseException:
            # The peer is gone (a large reply before this subscribe was still being
            # sent): nothing will serve these watchers, so they must not stay counted
            # and woken forever.
            for spec, wakeup in zip(specs, wakeups):
                server.notifier.unwatch(spec.stream, wakeup)
            raise
        full = self.full_envelope
        for i, (spec, start, wakeup) in enumerate(zip(specs, starts, wakeups), 1):
            greenlet = gevent.spawn(self._serve, spec, start, wakeup, full)
            self._subscriptions.add(greenlet)
            if i % SPAWN_SLICE == 0:
                # Let the loop poll (a timer does, sleep(0) may not) and serve others
                # between slices of a subscribe with thousands of specs.
                gevent.sleep(0.0001)
        server.subscriptions_started += len(specs)

    def _serve(self, spec: subscription.Spec, start: int, wakeup, full: bool) -> None:
        try:
            subscription.serve(spec, self.engine, self.server.notifier, self._send_frames, start,
                               wakeup, full)
        except OSError as exc:
            log.debug("subscription of %s ended: %s", self.address, exc)
            self._abort()
        finally:
            self._subscriptions.discard(gevent.getcurrent())

    def _send_frames(self, views: list[bytes | memoryview]) -> None:
        """Send stored frames: a few views of the log as they are (no copy of ours while
        a slow client drains them; a stored batch is one view), many small ones joined
        (one copy is cheaper than a view per frame to the kernel)."""
        with self._send_lock:
            if len(views) <= FEW_FRAMES:
                _send_views(self.sock, views)
            else:
                _send_all(self.sock, b"".join(views))

    def _abort(self) -> None:
        """The peer is gone: make the request loop's ``recv`` return."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed or never connected: nothing left to shut

    def _end_subscriptions(self) -> None:
        """End every subscription of the connection without holding the loop: each
        greenlet killed runs its cleanup, so thousands are ended a slice per loop turn
        (as ``subscribe`` starts them), in a greenlet of their own."""
        greenlets = list(self._subscriptions)
        if len(greenlets) <= SPAWN_SLICE:
            gevent.killall(greenlets, block=False)
        else:
            gevent.spawn(_kill_in_slices, greenlets)

    def stop(self) -> None:
        """Graceful stop: end subscriptions; end the request loop once it is idle."""
        self._end_subscriptions()
        self.closing = True
        if not self.busy:
            self._abort()


def _kill_in_slices(greenlets: list[gevent.Greenlet]) -> None:
    """Kill ``greenlets`` a slice per loop turn. Each slice is let go of as soon as it
    is dead: dead greenlets still referenced made each full garbage collection that ran
    meanwhile take up to 0.3 s (10,000 subscriptions), holding the loop."""
    for at in range(0, len(greenlets), SPAWN_SLICE):
        chunk = greenlets[at:at + SPAWN_SLICE]
        greenlets[at:at + SPAWN_SLICE] = [None] * len(chunk)
        gevent.killall(chunk, block=True)
        chunk = None
        gevent.sleep(0.0001)  # let the loop poll and serve others between slices


def _send_all(sock, data: bytes) -> None:
    """``sendall``, minus the ``getsockopt`` gevent's does first on every call: try one
    ``send``, which takes the whole reply when the socket buffer has room."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def _is_publish(name: bytes) -> bool:
    return name == b"publish" or name == b"PUBLISH" or name.lower() == b"publish"


#: A publish request's (event name, data), and its data.
_EVENT = itemgetter(2, 3)
_DATA = itemgetter(3)


def _publishes_to_one_stream(requests: list[list[bytes]]) -> bool:
    """Whether every request is a ``publish`` with its three arguments, all to one
    stream: checked with C-level passes, not a Python step per request (and no tuple
    per request: sets of the streams and of the names hash cached bytes)."""
    try:
        streams = set(map(_STREAM, requests))
    except IndexError:  # a request without arguments
        return False
    if len(streams) != 1:
        return False
    names = set(map(_NAME, requests))
    if len(names) != 1 or not _is_publish(names.pop()):
        return False
    return set(map(len, requests)) == {4}


_NAME = itemgetter(0)
_STREAM = itemgetter(1)


def _send_views(sock, views: list[bytes | memoryview]) -> None:
    """Send every byte of ``views`` with ``sendmsg`` (gather, no joined copy)."""
    pending = [memoryview(view) for view in views]
    while pending:
        sent = sock.sendmsg(pending)
        while pending and sent >= pending[0].nbytes:
            sent -= pending.pop(0).nbytes
        if sent:
            pending[0] = pending[0][sent:]
