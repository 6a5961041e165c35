"""The client under gevent: ``monkey.patch_all()`` first, then greenlets share a Client,
a subscription iterates in its own greenlet and resumes after a dropped connection.

It runs in a child interpreter, since monkey-patching the test process would change
every other test's threads and sockets.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from client_support import TIMEOUT

SCRIPT = textwrap.dedent("""\
    from gevent import monkey
    monkey.patch_all()

    import logging
    import sys
    import gevent
    from meilies.client import Client

    resumed = []
    logging.getLogger("meilies.client").addHandler(logging.Handler())
    logging.getLogger("meilies.client").handlers[0].emit = lambda r: resumed.append(
        r.getMessage())

    port = int(sys.argv[1])
    client = Client(port=port, timeout=20)
    received = []
    subscription = client.subscribe("g:0", backoff_base=0.01, backoff_max=0.1)

    def consume():
        for event in subscription:
            received.append(event.number)
            if event.number == 99:
                subscription._conn.shutdown()  # a dropped connection, mid-stream
            if len(received) == 200:
                return

    def publish(worker):
        for i in range(25):
            client.publish("g", "e", f"{worker}-{i}")
            assert client.ping() == b"PONG"

    consumer = gevent.spawn(consume)
    gevent.joinall([gevent.spawn(publish, w) for w in range(8)], raise_error=True)
    consumer.join(timeout=20)
    assert received == list(range(200)), received
    assert client.last_event_number("g") == 199
    assert any(m.startswith("reconnected") for m in resumed), resumed
    print("ok", flush=True)
""")


def test_client_and_subscription_under_gevent_monkey_patching(server):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(server.port)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
