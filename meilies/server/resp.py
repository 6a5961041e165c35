"""RESP2 on the wire: parsing requests, encoding replies.

Requests are arrays of bulk strings (what redis-cli, redis-py and hiredis send),
parsed by ``hiredis.Reader`` in C, or inline commands (a line of words, as typed
into telnet or nc), parsed here. Whether the next request is inline is decided when
the parser holds no partial request: a line that does not start with ``*``.

hiredis has no cap on the lengths a client announces, so while a request is still
incomplete a header-level scan here checks the announced array and bulk lengths
against our limits (``MAX_ARRAY_LENGTH``, ``max_bulk``, and ``max_request`` for the
sum of one request's bulks) and that every element is a bulk string; it runs only
when a read ends inside a request or something is wrong, so the usual path costs, per
request, one ``gets()``, one ``has_data()``, and its canonical size summed from table
lookups, one per element, with an exact type check; a read that starts and ends at a
request boundary is not even copied (RequestParser). The scan of a request that
spans many reads resumes where the previous read left it, so a large request costs
time in proportion to its size, not to its size times the number of reads.

hiredis allocates a list of the announced size the moment it reads an aggregate header
(``*``, and RESP3's ``~``, ``>``, ``%``, ``|``), at any depth, before any of our checks
can run: ``*2000000000\r\n`` (14 bytes) made it reserve 16 GB, whose release then held
the event loop for seconds (issue 10). So hiredis never sees a header that could
announce 1,000 elements or more: every read is searched for such a header (a regex
with a literal first byte, about 0.5 ns a byte) and, where one may be (a false alarm
inside event data is harmless), the requests up to the next clean boundary take the
checked path, ``_feed_checked``: each request is walked and verified first, and hiredis
is handed it only once it is whole. With counts under 1,000, what hiredis can hold
for a request is bounded by its nesting limit (1,024 levels): 8 MB at worst, and only
during the one ``feed`` that finds the request malformed and refuses it. The checked
path also takes a RESP3 aggregate at the start of a line (``_needs_checking``): hiredis
reads a set as a list, and a request must start with ``*``.
"""

from __future__ import annotations

import re

import hiredis

#: Most elements one request may have (an ``append`` of ~500,000 events).
MAX_ARRAY_LENGTH = 1024 * 1024
#: Longest inline command line (Redis' PROTO_INLINE_MAX_SIZE).
MAX_INLINE_LENGTH = 64 * 1024
#: Most bytes of bulk data one request may announce in all (or one ``max_bulk``, if
#: that is more): what a client can make the server hold for a request it has not
#: finished sending (twice over: hiredis' buffer and the scan's). 128 events of the
#: default maximum size in one ``append``. Without it the bound was
#: MAX_ARRAY_LENGTH * max_bulk, a terabyte.
MAX_REQUEST_BYTES = 128 * 1024 * 1024

CRLF = b"\r\n"
OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
EMPTY_ARRAY = b"*0\r\n"

_NOT_AN_ARRAY = "expected an array of bulk strings"

#: Canonical encoded sizes, looked up by the parse loop (one cheap bytecode, where
#: ``len(str(n))`` builds a string): ``_HEADER[count]`` for ``*<count>CRLF``,
#: ``_ELEMENT[n]`` for ``$<n>CRLF<n bytes>CRLF``. They cover the counts and lengths of
#: nearly every request (about 400 KB); past them, ``_canonical_size``.
_HEADER = [3 + len(str(count)) for count in range(1024)]
_ELEMENT = [n + 5 + len(str(n)) for n in range(10_000)]

#: An aggregate header that may announce 1,000 elements or more: what hiredis must not
#: see before we have checked it (module doc). hiredis takes counts as plain decimal
#: digits only (no sign but ``-1``, no spaces, no leading zeros), so four digits after
#: the type byte are where a large count begins. ``*`` is searched for on its own, with a
#: literal first byte (regex then skips with memchr); the rarer RESP3 aggregates only
#: when their byte occurs at all.
_LARGE_ARRAY = re.compile(rb"\*[0-9]{4}")
#: The RESP3 aggregates' type bytes; a short read without any of them (a request at a
#: time) is cleared by one C-level pass (``translate``) instead of a search per mark.
_RESP3_MARKS = b"~>%|"
SHORT_READ = 512
_LARGE_RESP3 = tuple((bytes([mark]), re.compile(re.escape(bytes([mark])) + rb"[0-9]{4}"))
                     for mark in _RESP3_MARKS)
#: The bytes of a read kept to search a header split between two reads (one short of
#: a match).
_TAIL = 4

#: Returned by ``hiredis.Reader.gets()`` when the buffer holds no complete request.
#: (``False``, the default, could not be told apart from a parsed value.)
NOT_ENOUGH_DATA = object()


class ProtocolError(Exception):
    """Malformed RESP: the reply is ``-ERR Protocol error: <reason>``, then close."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The complete requests that came before the malformed one: they are run.
        self.requests: list[list[bytes]] = []


def simple(value: bytes) -> bytes:
    return b"+" + value + CRLF


def error(message: str | bytes) -> bytes:
    """An error reply; CR/LF in the message are replaced so the line stays one line."""
    if isinstance(message, str):
        message = message.encode("utf-8", "replace")
    return b"-" + message.replace(b"\r", b" ").replace(b"\n", b" ") + CRLF


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array_header(count: int) -> bytes:
    return b"*%d\r\n" % count


class RequestParser:
    """Turns the bytes of one connection into requests (lists of ``bytes``).

    hiredis parses any RESP value, so an array it returns may have held simple
    strings (``*1\r\n+PING\r\n`` comes back as ``[b"PING"]``, exactly like
    ``*1\r\n$4\r\nPING\r\n``). Requests must be arrays of *bulk* strings: the cheap
    check is that each value hiredis completed is a non-empty ``list`` of ``bytes``
    (exact types) and that together they take exactly the bytes their canonical
    encoding takes (a simple string is shorter, hiredis refuses leading zeros). Only
    when that fails, or hiredis raises, or a read ends inside a request, does
    ``_scan`` walk the bytes in Python to find the offending request.

    A read ends at a clean boundary when ``has_data()`` is false right after hiredis
    completed a request. Comparing sizes cannot stand in for that call: after
    ``*1\r\n+0123456789\r\n*2\r\n`` hiredis holds part of a request, yet the
    first request is 4 bytes short of its canonical size, just what ``*2\r\n`` adds.
    """

    def __init__(self, max_bulk: int, max_request: int | None = None) -> None:
        self.max_bulk = max_bulk
        #: Most bulk bytes one request may announce in all.
        self.max_request = max(max_bulk, MAX_REQUEST_BYTES if max_request is None
                               else max_request)
        self._reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
        #: Bytes fed to hiredis since it last held no partial request (less a prefix
        #: already verified and dropped, see ``_guard``): what ``_scan`` walks.
        self._partial = bytearray()
        #: Requests hiredis completed that start in ``_partial``, and the sum of their
        #: canonical encoded sizes.
        self._completed = 0
        self._encoded = 0
        #: ``_partial[:_verified]`` holds ``_verified_count`` requests that ``_scan``
        #: found well-formed and hiredis completed.
        self._verified = 0
        self._verified_count = 0
        #: hiredis holds no part of a request. (``has_data()`` cannot tell: hiredis
        #: drops the bytes of an array's header and finished bulks while it waits.)
        self._clean = True
        self._inline = bytearray()
        #: Where ``_skip_request`` stopped in the incomplete request at ``_partial``
        #: offset ``[0]``: (start, element count, elements checked, offset of the next
        #: element, bulk bytes announced by the checked ones). None: nothing to resume.
        self._resume: tuple[int, int, int, int, int] | None = None
        #: Not None: the checked path (module doc) holds these bytes, which start at a
        #: request boundary and which hiredis has not seen; hiredis then holds nothing.
        self._checked: bytearray | None = None
        #: The last bytes handed to hiredis since the last clean boundary, to find a
        #: header split across reads.
        self._tail = b""

    def feed(self, data: bytes | memoryview) -> list[list[bytes]]:
        """Parse ``data``; return the complete requests. Raises :class:`ProtocolError`."""
        requests: list[list[bytes]] = []
        data = bytes(data)
        try:
            while data:
                if self._checked is not None:
                    data = self._feed_checked(data, requests)
                elif self._inline or (self._clean and data[:1] != b"*"):
                    data = self._feed_inline(data, requests)
                else:
                    data = self._feed_resp(data, requests)
        except ProtocolError as exc:
            exc.requests = requests
            self._discard()
            raise
        return requests

    def _discard(self) -> None:
        """After a refusal: let go of everything held now, not when the parser goes.

        The connection closes after a protocol error, but whatever still refers to the
        parser (an exception's traceback, a frame) would keep hiredis' partial request
        alive until the garbage collector finds it."""
        self._reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
        self._forget_partial()
        self._inline = bytearray()
        self._checked = None
        self._tail = b""
        self._clean = True

    def _feed_resp(self, data: bytes, requests: list[list[bytes]]) -> bytes:
        """Parse RESP requests; return the bytes of an inline command that follows them.

        The loop counts in locals what it completes; ``_hold`` writes the counts to the
        parser before anything reads them (``_resync``, ``_guard``, the size check). A
        read that starts at a clean boundary, where the parser holds nothing (see
        ``_forget_partial``), is copied to ``_partial`` by ``_hold`` too, and so not at
        all when it holds only canonically encoded requests, ending with the last.
        """
        fresh_read = self._clean
        if _needs_checking(data) or (
                not fresh_read and _needs_checking(self._tail + data[:_TAIL])):
            return self._check_from_here(data)
        reader = self._reader
        reader.feed(data)
        # The last bytes hiredis has, whatever the sizes of the reads that brought them
        # (reads of a byte or two must not let a header through in pieces).
        self._tail = (self._tail + data[-_TAIL:])[-_TAIL:] if not fresh_read else data[-_TAIL:]
        fresh = self._clean
        if not fresh:
            self._partial += data
        self._clean = False
        first = len(requests)  # requests[first:] are completed by this call
        before = self._completed  # requests of _partial completed by earlier calls
        gets = reader.gets
        has_data = reader.has_data
        append = requests.append
        header, element = _HEADER, _ELEMENT
        encoded = 0  # the canonical size of requests[first:]
        while True:
            try:
                request = gets()
            except hiredis.ProtocolError as exc:
                self._hold(data, fresh, requests, first, encoded)
                return self._resync(requests, first, before, str(exc))
            if request is NOT_ENOUGH_DATA:
                break
            if type(request) is not list or not request:
                self._hold(data, fresh, requests, first, encoded)
                return self._resync(requests, first, before, _NOT_AN_ARRAY)
            # The canonical size: *<count>CRLF, then $<len>CRLF<data>CRLF per element.
            try:
                size = header[len(request)]
                for item in request:
                    if type(item) is not bytes:
                        size = -1
                        break
                    size += element[len(item)]
            except IndexError:  # a count or a length past the tables
                size = _canonical_size(request)
            if size < 0:
                self._hold(data, fresh, requests, first, encoded)
                return self._resync(requests, first, before, _NOT_AN_ARRAY)
            append(request)
            encoded += size
            if not has_data():  # the data ended with this request: a clean boundary
                self._clean = True
                break
        if self._clean and fresh and encoded == len(data):
            return b""  # the usual case: the state is as _forget_partial leaves it
        self._hold(data, fresh, requests, first, encoded)
        if self._clean:
            if self._encoded != len(self._partial):
                return self._resync(requests, first, before, None)
            self._forget_partial()
        else:
            self._guard(requests, first, before)
        return b""

    def _check_from_here(self, data: bytes) -> bytes:
        """Switch to the checked path for ``data`` (see the module doc); return what to
        go on with.

        If hiredis holds part of a request, that part is taken back from it: ``_scan``
        finds where the incomplete request starts in ``_partial`` (the requests before
        it were completed and returned), and the checked path starts there.
        """
        rest = data
        if not self._clean:
            at, _count, _inline = self._scan([], 0, self._completed)
            rest = bytes(self._partial[at:]) + data
            self._reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
            self._forget_partial()
            self._clean = True
            self._tail = b""
        if rest[:1] == b"*":
            self._checked = bytearray()
        return rest  # else an inline line: ``feed`` takes it as one

    def _feed_checked(self, data: bytes, requests: list[list[bytes]]) -> bytes:
        """The checked path: walk each request (``_skip_request`` verifies its header
        and elements against our limits) and hand it to hiredis only once it is whole and
        well-formed. Returns the bytes of an inline line that follows, if any.

        Back to the fast path at the first clean boundary: a client that sent one large
        ``append`` pays for the walk of that request only.
        """
        buf = self._checked
        assert buf is not None
        buf += data
        reader = self._reader
        at, size = 0, len(buf)
        while at < size:
            if buf[at] != 0x2A:  # not '*': an inline line
                rest = bytes(buf[at:])
                self._checked = None
                self._resume = None
                return rest
            end = self._skip_request(buf, at)
            if end < 0:
                break
            reader.feed(buf, at, end - at)
            try:
                request = reader.gets()
            except hiredis.ProtocolError as exc:  # what the walk lets through: "$01"
                raise ProtocolError(str(exc)) from None
            if type(request) is not list:
                raise ProtocolError(_NOT_AN_ARRAY)
            requests.append(request)
            at = end
        if at == size:
            self._checked = None  # a clean boundary: back to the fast path
            self._resume = None
        elif at:
            del buf[:at]
            if self._resume is not None:
                start, count, checked, offset, announced = self._resume
                self._resume = (start - at, count, checked, offset - at, announced)
        return b""

    def _hold(self, data: bytes, fresh: bool, requests: list[list[bytes]], first: int,
              encoded: int) -> None:
        """Bring the state up to date with what ``_feed_resp`` has parsed of ``data``.

        Adds ``data`` to ``_partial`` if ``_feed_resp`` has not (the read began at a
        clean boundary), and counts the requests completed since ``first``, of canonical
        size ``encoded``.
        """
        if fresh:
            self._partial += data
        self._completed += len(requests) - first
        self._encoded += encoded

    def _forget_partial(self) -> None:
        """Hold nothing: what the state is at every clean boundary (``_clean`` True)."""
        self._partial.clear()
        self._completed = self._encoded = self._verified = self._verified_count = 0
        self._resume = None

    def _scan(self, requests: list[list[bytes]], first: int, before: int) -> tuple[int, int, bool]:
        """Walk ``_partial`` from the verified prefix, request by request.

        Returns ``(offset, count, inline)``: where the walk stopped, how many requests
        start before that offset, and whether it stopped at a line that is not RESP
        (an inline command). On a malformed request, drops it and every later one
        from ``requests`` (the earlier ones run) and raises :class:`ProtocolError`.
        """
        buf = self._partial
        at, count = self._verified, self._verified_count
        while at < len(buf):
            if buf[at] != 0x2A:  # not '*'
                return at, count, True
            try:
                end = self._skip_request(buf, at)
            except ProtocolError:
                del requests[first + max(count - before, 0):]
                raise
            if end < 0:
                break
            at = end
            count += 1
            if count <= self._completed:
                self._verified, self._verified_count = at, count
        return at, count, False

    def _resync(self, requests: list[list[bytes]], first: int, before: int,
                reason: str | None) -> bytes:
        """hiredis refused the data, or returned what is not a request: find out why.

        Returns the bytes to go on with as inline commands, if that is what follows
        the last good request.
        """
        at, count, inline = self._scan(requests, first, before)
        if inline and count <= self._completed:  # else the scan passed what hiredis refused
            del requests[first + max(count - before, 0):]
            rest = bytes(self._partial[at:])
            self._reader = hiredis.Reader(notEnoughData=NOT_ENOUGH_DATA)
            self._forget_partial()
            self._clean = True
            return rest
        if reason is not None:
            raise ProtocolError(reason)
        self._forget_partial()  # sizes differed, yet nothing we check is wrong
        return b""

    def _guard(self, requests: list[list[bytes]], first: int, before: int) -> None:
        """A read ended inside a request: check what was announced (see module doc)."""
        at, _count, inline = self._scan(requests, first, before)
        if inline and len(self._partial) - at > MAX_INLINE_LENGTH and \
                self._partial.find(b"\n", at) < 0:
            raise ProtocolError("too big inline request")
        # Drop the verified prefix: a client that streams requests without ever
        # pausing at a request boundary must not make each read rescan all before it.
        verified = self._verified
        if verified:
            del self._partial[:verified]
            self._encoded -= verified  # verified requests are canonically encoded
            self._completed -= self._verified_count
            self._verified = self._verified_count = 0
            if self._resume is not None:
                start, count, checked, at, announced = self._resume
                self._resume = (start - verified, count, checked, at - verified, announced)

    def _skip_request(self, buf: bytearray, start: int) -> int:
        """Offset after the request at ``start``, or -1 if it is incomplete.

        Raises :class:`ProtocolError` for an element that is not a bulk string and for
        announced lengths that are malformed or over the limits. An incomplete request
        leaves ``_resume``, and the next call for it goes on from there.
        """
        resume = self._resume
        if resume is not None and resume[0] == start:
            _start, count, checked, at, announced = resume
        else:
            line_end = buf.find(CRLF, start)
            if line_end < 0:
                if len(buf) - start > MAX_INLINE_LENGTH:
                    raise ProtocolError("too big multibulk count")
                return -1
            count = _parse_length(buf, start + 1, line_end, "multibulk length")
            if count <= 0 or count > MAX_ARRAY_LENGTH:
                raise ProtocolError("invalid multibulk length")
            checked, at, announced = 0, line_end + 2, 0
        max_bulk, max_request, size = self.max_bulk, self.max_request, len(buf)
        while checked < count:
            line_end = buf.find(CRLF, at)
            if line_end < 0:
                if size - at > 32:
                    raise ProtocolError("bulk length line too long")
                break
            if buf[at] != 0x24:  # not '$'
                raise ProtocolError(f"expected '$', got '{chr(buf[at])}'")
            length = _parse_length(buf, at + 1, line_end, "bulk length")
            if length < 0:
                raise ProtocolError("invalid bulk length")
            if length > max_bulk:
                raise ProtocolError(f"invalid bulk length {length} (at most {max_bulk})")
            if announced + length > max_request:
                raise ProtocolError(f"request too big (its bulks announce over {max_request}"
                                    " bytes)")
            end = line_end + 2 + length + 2
            if end > size:
                break
            announced += length
            at = end
            checked += 1
        else:
            if resume is not None:
                self._resume = None
            return at
        self._resume = (start, count, checked, at, announced)
        return -1

    def _feed_inline(self, data: bytes, requests: list[list[bytes]]) -> bytes:
        """Consume inline lines from ``data``; return what follows them (RESP)."""
        self._inline += data
        buf = self._inline
        at = 0
        while at < len(buf):
            if buf[at:at + 1] == b"*":
                rest = bytes(buf[at:])
                self._inline = bytearray()
                return rest
            line_end = buf.find(b"\n", at)
            if line_end < 0:
                if len(buf) - at > MAX_INLINE_LENGTH:
                    raise ProtocolError("too big inline request")
                break
            line = bytes(buf[at:line_end]).rstrip(b"\r")
            at = line_end + 1
            words = split_inline(line)
            if words:
                requests.append(words)
        del buf[:at]
        return b""


def _needs_checking(data: bytes) -> bool:
    """Whether ``data`` may hold what hiredis must not see unchecked (module doc): an
    aggregate header announcing 1,000 elements or more (see ``_LARGE_ARRAY``), or a
    RESP3 aggregate at the start of a line, where a request may start.

    hiredis reads ``~2\r\n$4\r\nping\r\n...`` (a set) as a list like any array, of
    the same size; but a request that does not start with ``*`` is an inline command,
    as it is at a clean boundary, where ``feed`` sends it to ``_feed_inline``. Taken
    from hiredis unchecked, the same bytes were a request or inline lines depending on
    where reads ended, and, cut at some points, both (run twice). False alarms (such
    bytes inside event data) only cost the checked path.
    """
    if _LARGE_ARRAY.search(data) is not None:
        return True
    if len(data) <= SHORT_READ and len(data.translate(None, _RESP3_MARKS)) == len(data):
        return False
    for mark, pattern in _LARGE_RESP3:
        if mark in data and (b"\n" + mark in data or pattern.search(data) is not None):
            return True
    return False


def _canonical_size(request: list) -> int:
    """The bytes ``request`` takes as an array of bulk strings; -1 if an item is not bytes.

    The general form of the table lookups in ``RequestParser._feed_resp``, for counts
    and lengths past ``_HEADER`` and ``_ELEMENT``. An ``append`` of many events is
    past ``_HEADER``, so its elements still use ``_ELEMENT`` here.
    """
    element, tabled = _ELEMENT, len(_ELEMENT)
    size = 3 + len(str(len(request)))
    for item in request:
        if type(item) is not bytes:
            return -1
        n = len(item)
        size += element[n] if n < tabled else n + 5 + len(str(n))
    return size


def _parse_length(buf: bytearray, start: int, end: int, what: str) -> int:
    digits = bytes(buf[start:end])
    if not digits or len(digits) > 20 or not (digits.isdigit() or
                                              (digits[:1] == b"-" and digits[1:].isdigit())):
        raise ProtocolError(f"invalid {what}")
    return int(digits)


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
            ord("a"): b"\a"}


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command into words, with Redis' quoting (``sdssplitargs``).

    ``"..."`` takes escapes (``\\n``, ``\\xHH``, ...); ``'...'`` is literal but for
    ``\\'``. A closing quote must be followed by a space or the end of the line.

    One departure, on purpose: a quote opens a quoted word only at the start of a
    word; inside one it is a plain byte. Redis opens a quote anywhere, so that JSON
    typed in telnet (``publish s e {"a":1}``) is refused there as "unbalanced quotes";
    here it is stored as typed, which is what an event store's user means by it.
    """
    words: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t":
            i += 1
        if i >= n:
            return words
        word = bytearray()
        quote = None
        while i < n:
            c = line[i]
            if quote == ord('"'):
                if c == ord("\\") and i + 3 < n and line[i + 1] == ord("x") and \
                        _is_hex(line[i + 2:i + 4]):
                    word.append(int(line[i + 2:i + 4], 16))
                    i += 4
                    continue
                if c == ord("\\") and i + 1 < n:
                    word += _ESCAPES.get(line[i + 1], bytes([line[i + 1]]))
                    i += 2
                    continue
                if c == quote:
                    i += 1
                    if i < n and line[i] not in b" \t":
                        raise ProtocolError("unbalanced quotes in request")
                    quote = None
                    break
                word.append(c)
            elif quote == ord("'"):
                if c == ord("\\") and i + 1 < n and line[i + 1] == quote:
                    word.append(quote)
                    i += 2
                    continue
                if c == quote:
                    i += 1
                    if i < n and line[i] not in b" \t":
                        raise ProtocolError("unbalanced quotes in request")
                    quote = None
                    break
                word.append(c)
            else:
                if c in b" \t":
                    break
                if c in b"\"'" and not word:
                    quote = c
                else:
                    word.append(c)
            i += 1
        if quote is not None:
            raise ProtocolError("unbalanced quotes in request")
        words.append(bytes(word))


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(ch in b"0123456789abcdefABCDEF" for ch in pair)
