"""A broker away is one WARNING (where, when it last answered), not a line per reconnect, and one line when
it is back (issue 26 item 6)."""
import io
import logging

from streams.logs import BrokerAway


def test_one_line_when_the_broker_goes_and_one_when_it_is_back():
    now = [1000.0]
    up = [True]
    away = BrokerAway("127.0.0.1:9092", clock=lambda: now[0], reachable=lambda: up[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(away)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    ours, lib = logging.getLogger("imagefork"), logging.getLogger("aiokafka")
    for logger in (ours, lib):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        lib.error("Unable connect to node with id 1: [Errno 111] Connect call failed")  # it answers: as is
        up[0] = False
        now[0] = 1030.0
        for _ in range(50):
            lib.error("Unable connect to node with id %s: [Errno 111] Connect call failed", 1)
            lib.warning("Heartbeat failed for group g: coordinator (node 1) is either not started or not valid")
        ours.warning("our own lines still show")
        now[0] = 1090.0
        up[0] = True
        away.check()
        lib.error("Unable to update metadata from [1]")  # after it is back: as it is again
    finally:
        for logger in (ours, lib):
            logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ERROR aiokafka Unable connect"), lines
    assert lines[1].startswith("WARNING imagefork Kafka at 127.0.0.1:9092 does not answer (last seen ") and \
        "30s ago" in lines[1], lines
    assert lines[2:] == ["WARNING imagefork our own lines still show",
                         "INFO imagefork Kafka at 127.0.0.1:9092 is back, after 60s away",
                         "ERROR aiokafka Unable to update metadata from [1]"], lines
