"""Stream names for the records of the ``eventsourcing`` library (PROTOCOL.md, "Names
and sizes": 1..255 bytes of UTF-8, no ``:``, whitespace or control characters, not
beginning with ``$``).

    stream    := prefix namespace "." kind "." key
    prefix    := MEILIES_STREAM_PREFIX as given (default empty): servers shared by teams
    namespace := escaped(application name), "stored" when the Environment has no name
    kind      := escaped(purpose): "events", "snapshots", ... or "tracking"
    key       := uuid | "~" escaped(str id)          (an aggregate's originator id)
               | escaped(upstream application name)  (kind "tracking")
    uuid      := the canonical 36-character form, lower case
    escaped   := the text with '%', ':', '.' (namespace and kind only), whitespace and
                 Unicode category C characters written as %XX of their UTF-8 bytes

For example ``BankAccounts.events.1f0c3ad2-...``, ``BankAccounts.snapshots.1f0c3ad2-...``,
``BankAccounts.events.~order%3A17`` (the str id ``"order:17"``) and
``EmailProcess.tracking.BankAccounts``.

Why this shape:

* The namespace is the application's name, as the library's PostgreSQL module names its
  tables (``bankaccounts_events``): every application of a system has a notification
  log of its own, and a follower must not read its upstream's events as its own.
* The key says whether the id was a UUID or a str, so that a notification (read from
  ``$all``, where only the stream name is known) gives back the id's own type; the
  SQL recorders need an ``ORIGINATOR_ID_TYPE`` setting for that.
* Only ``namespace`` and ``kind`` escape ``.``, so the first two dots after the prefix
  split the name without ambiguity whatever the key holds; ``%`` is always escaped,
  so unescaping is the exact inverse.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote
from uuid import UUID

from eventsourcing.persistence import DataError

MAX_STREAM_BYTES = 255
#: What marks a key as a str originator id (a UUID's canonical form never starts so).
STR_ID_MARK = "~"
#: The namespace of an Environment without a name (the PostgreSQL module's table prefix).
DEFAULT_NAMESPACE = "stored"
TRACKING_KIND = "tracking"

# Printable ASCII other than '%' and ':' needs no escaping: one C-level search decides
# the common case.
_PLAIN_KEY = re.compile(r"[\x21-\x24\x26-\x39\x3b-\x7e]*").fullmatch
_PLAIN_PART = re.compile(r"[\x21-\x24\x26-\x2d\x2f-\x39\x3b-\x7e]*").fullmatch  # no '.'


def escape(text: str, dots: bool = False) -> str:
    """``text`` with what a stream name may not hold (and ``%``; ``.`` too when
    ``dots``) percent-encoded, byte by byte of its UTF-8."""
    if (_PLAIN_PART if dots else _PLAIN_KEY)(text):
        return text
    out = []
    for ch in text:
        if ch == "%" or (dots and ch == ".") or _forbidden(ch):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


def _forbidden(ch: str) -> bool:
    """True for a character no stream name may hold (what the server refuses, and the
    rest of Unicode category C: format, private use, unassigned, surrogates)."""
    return ch == ":" or ch.isspace() or unicodedata.category(ch)[0] == "C"


def unescape(text: str) -> str:
    return unquote(text, errors="surrogatepass") if "%" in text else text


def check_prefix(prefix: str) -> str:
    """``prefix`` if it may begin stream names; else ValueError saying why."""
    if prefix.startswith("$"):
        raise ValueError(f"stream prefix {prefix!r} begins with '$' (reserved for the server)")
    if any(_forbidden(ch) for ch in prefix):
        raise ValueError(f"stream prefix {prefix!r} holds ':', whitespace or control"
                         " characters, which stream names may not")
    if len(prefix.encode()) > 200:
        raise ValueError(f"stream prefix {prefix!r} is longer than 200 bytes")
    return prefix


class StreamNames:
    """The stream names of one application (``namespace``) on one server (``prefix``)."""

    def __init__(self, namespace: str, prefix: str = "") -> None:
        self.prefix = check_prefix(prefix)
        self.namespace = namespace or DEFAULT_NAMESPACE
        # A leading '$' of the namespace is escaped too: without a prefix it would begin
        # the stream name.
        ns = escape(self.namespace, dots=True)
        if ns.startswith("$"):
            ns = "%24" + ns[1:]
        self._root = f"{prefix}{ns}."

    def __repr__(self) -> str:
        return f"StreamNames(namespace={self.namespace!r}, prefix={self.prefix!r})"

    def head(self, kind: str) -> str:
        """What every stream of ``kind`` begins with, e.g. ``"BankAccounts.events."``."""
        return f"{self._root}{escape(kind, dots=True)}."

    def aggregate(self, head: str, originator_id: UUID | str) -> str:
        """The stream of an aggregate, under ``head``."""
        if isinstance(originator_id, UUID):
            return _checked(head + str(originator_id), originator_id)
        if not isinstance(originator_id, str):
            raise DataError(f"an originator id is a UUID or a str, not"
                            f" {type(originator_id).__name__}: {originator_id!r}")
        return _checked(head + STR_ID_MARK + escape(originator_id), originator_id)

    def tracking(self, application_name: str) -> str:
        """The stream of the tracking records of notifications from ``application_name``."""
        return _checked(self.head(TRACKING_KIND) + escape(application_name),
                        application_name)


def originator_id(key: str) -> UUID | str:
    """The originator id whose stream's key (the name after the head) is ``key``."""
    if key.startswith(STR_ID_MARK):
        return unescape(key[1:])
    return UUID(key)


def _checked(name: str, given: object) -> str:
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_STREAM_BYTES:
        raise DataError(f"the stream name for {given!r} would be {size} bytes, more than"
                        f" the {MAX_STREAM_BYTES} a MeiliES stream name may have: {name!r}")
    return name
