"""The join's guard around librdkafka calls that may not keep their own timeout (streams/join/session.py: bounded)."""
import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams.join.session import StuckCall, bounded


def test_a_call_that_returns_gives_its_result():
    assert bounded("add", lambda: 2 + 2, 5) == 4


def test_a_call_that_raises_raises_the_same_error_in_the_caller():
    def fail():
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "away"))

    with pytest.raises(KafkaException) as caught:
        bounded("fail", fail, 5)
    assert not isinstance(caught.value, StuckCall)
    assert caught.value.args[0].code() == KafkaError._TRANSPORT


def test_a_call_that_never_returns_is_given_up_on_time_as_a_retriable_timeout():
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(StuckCall) as caught:
        bounded("send_offsets_to_transaction", release.wait, 0.3)
    elapsed = time.monotonic() - started
    release.set()  # let the helper thread end
    # given up on, not before its time; the upper bound only has to hold on a loaded 2-core machine
    assert 0.3 <= elapsed < 15, elapsed
    err = caught.value.args[0]
    assert isinstance(caught.value, KafkaException)  # the join's abort path handles it like any other
    assert err.code() == KafkaError._TIMED_OUT and err.retriable() and not err.fatal()
    assert "send_offsets_to_transaction did not return within" in err.str()


def test_calls_share_one_helper_thread_and_a_late_call_does_not_hold_up_the_next():
    names = {bounded("name", lambda: threading.current_thread().ident, 5) for _ in range(50)}
    assert len(names) == 1  # one thread for every call, not one started per call
    release = threading.Event()
    with pytest.raises(StuckCall):
        bounded("commit_transaction", release.wait, 0.2)
    try:
        started = time.monotonic()
        # the helper is still inside the late call: the next call runs on a thread of its own at once
        assert bounded("add", lambda: 2 + 2, 5) == 4
        assert time.monotonic() - started < 4
        assert bounded("name", lambda: threading.current_thread().ident, 5) not in names
    finally:
        release.set()
