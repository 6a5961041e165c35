"""MeiliES as the persistence module of the ``eventsourcing`` library (PyPI, 9.5).

    pip install 'meilies[eventsourcing]'
    PERSISTENCE_MODULE=meilies.eventsourcing MEILIES_PORT=6480 python app.py

The mapping (each module says why in detail):

=============================  =========================================================
library                        MeiliES
=============================  =========================================================
aggregate (originator id)      a stream ``<prefix><app>.events.<uuid | ~str id>``
                               (names.py; snapshots in ``<app>.snapshots.<id>``)
originator version             event number = version - the stream's first version;
                               the version also rides in the event's metadata
                               (versions.py)
topic / state                  event name / event data
notification id                global position + 1 (the library's ids start at 1)
insert_events                  one ``append-full`` per run of one aggregate's events,
                               in one ``MULTI``/``EXEC`` when there are several; a
                               refused expected version is ``IntegrityError``
tracking record                an event on ``<app>.tracking.<upstream app>`` with
                               increasing notification ids, in the same transaction
select_notifications           ``range $all <start> <stop> COUNT <n>``, the
                               application's streams and the topics kept client-side
max_notification_id            ``revrange $all + - COUNT 1`` (further back past other
                               applications' events)
subscribe(gt)                  ``subscribe $all@<gt>`` with full frames, resumed over
                               reconnects by the client
=============================  =========================================================

The library's ``DCBApplication`` (dynamic consistency boundaries) is served too: its
events are one stream per application, positions its numbers + 1 (dcb.py).

Settings: see :class:`MeiliesFactory`. What differs from the SQL recorders, knowingly:
an aggregate's versions cannot have gaps nor be inserted below the first one stored; a
snapshot older than the aggregate's newest is refused; names are limited to 255 bytes
and event data to the server's ``--max-event-size`` (``DataError`` beyond).
"""

from .dcb import MeiliesDCBRecorder, MeiliesDCBSubscription
from .factory import MeiliesFactory
from .recorders import (MeiliesAggregateRecorder, MeiliesApplicationRecorder,
                        MeiliesProcessRecorder, MeiliesRecorder, MeiliesTrackingRecorder)
from .subscription import MeiliesSubscription

#: The library finds the factory of a persistence module by its class; ``Factory`` is
#: the name its own modules (``eventsourcing.sqlite``, ``.postgres``) also give it.
Factory = MeiliesFactory

__all__ = [
    "Factory", "MeiliesAggregateRecorder", "MeiliesApplicationRecorder",
    "MeiliesDCBRecorder", "MeiliesDCBSubscription", "MeiliesFactory",
    "MeiliesProcessRecorder", "MeiliesRecorder", "MeiliesSubscription",
    "MeiliesTrackingRecorder",
]
