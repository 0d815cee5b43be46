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
    ours, lib = logging.getLogger("imagefork"), logging.getLogger("imagefork.kafka")
    refused = ("FAIL", "rdkafka#consumer-1", "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: "
               "Connection refused (after 0ms in state CONNECT)")
    level = lib.level
    ours.addHandler(handler)  # librdkafka's logger (imagefork.kafka) propagates to it
    ours.setLevel(logging.INFO)
    lib.setLevel(logging.INFO)
    try:
        lib.error("%s [%s] %s", *refused)  # it answers (one connection refused): as is
        up[0] = False
        now[0] = 1030.0
        for _ in range(50):
            lib.error("%s [%s] %s", *refused)
            lib.error("%s [%s] %s", "ERROR", "rdkafka#consumer-1", "1/1 brokers are down")
        ours.warning("our own lines still show")
        now[0] = 1090.0
        up[0] = True
        away.check()
        lib.error("%s [%s] %s", "ERROR", "rdkafka#consumer-1", "1/1 brokers are down")  # it is back: as it is again
    finally:
        ours.removeHandler(handler)
        lib.setLevel(level)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ERROR imagefork.kafka FAIL [rdkafka#consumer-1] 127.0.0.1:9092/1: Connect"), lines
    assert lines[1].startswith("WARNING imagefork Kafka at 127.0.0.1:9092 does not answer (last seen ") and \
        "30s ago" in lines[1], lines
    assert lines[2:] == ["WARNING imagefork our own lines still show",
                         "INFO imagefork Kafka at 127.0.0.1:9092 is back, after 60s away",
                         "ERROR imagefork.kafka ERROR [rdkafka#consumer-1] 1/1 brokers are down"], lines
