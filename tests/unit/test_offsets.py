"""Offsets the Faust agents commit (adapters/offsets.py): never past a message still in flight."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
from faust.types import TP
from intervaltree import IntervalTree

from streams.adapters import offsets
from streams.adapters.offsets import IN_FLIGHT, new_offset

T = TP("tasks", 0)


class FakeConsumer:
    """The state Faust's consumer keeps per partition, as ``_new_offset`` reads it."""

    def __init__(self, committed=None, acked=(), unacked=(), gaps=(), acked_duplicates=()):
        self._acked = defaultdict(list, {T: list(acked)})
        self._acked_index = defaultdict(set, {T: set(acked)})
        self._committed_offset = defaultdict(lambda: None, {T: committed})
        self._gap = defaultdict(IntervalTree)
        for begin, end in gaps:
            self._gap[T].addi(begin, end)
        self._unacked_messages = [SimpleNamespace(tp=T, offset=o, acked=False) for o in unacked] + [
            SimpleNamespace(tp=T, offset=o, acked=True) for o in acked_duplicates]


@pytest.mark.parametrize("committed,acked,unacked,expected", [
    (10, [10, 11, 12], [], 13),      # all done: past the last
    (10, [11, 12], [10], None),      # the message at the committed offset is slow: nothing (Faust: 13)
    (None, [1, 2, 3], [0], None),    # nothing committed yet, the first one slow: nothing (Faust: 4)
    (None, [0, 1, 3], [2], 2),       # up to the first unfinished one
    (10, [10, 11, 13], [], 12),      # a gap in the acks (13 acked before 12): up to it
    (None, [5, 6], [], 7),           # nothing committed, nothing below: from the first handed
])
def test_a_commit_stops_before_the_first_unfinished_message(committed, acked, unacked, expected):
    consumer = FakeConsumer(committed, acked, unacked)
    assert new_offset(consumer, T) == expected


def test_offsets_with_no_message_count_as_done():
    consumer = FakeConsumer(10, [10, 13], gaps=[(11, 13)])  # 11 and 12: transaction markers, compacted away
    assert new_offset(consumer, T) == 14


def test_the_ledger_holds_a_message_faust_acked_when_its_agent_was_cancelled():
    IN_FLIGHT.begin("tasks", 0, 11)
    try:
        consumer = FakeConsumer(10, [10, 11, 12])
        assert new_offset(consumer, T) == 11
        assert consumer._acked[T] == [11, 12]  # kept for the next commit
        consumer._committed_offset[T] = 11  # what Faust records once that commit is done
        assert new_offset(consumer, T) is None
    finally:
        IN_FLIGHT.end("tasks", 0, 11)
    assert new_offset(consumer, T) == 13


def test_install_replaces_fausts_computation():
    from faust.transport.consumer import Consumer
    offsets.install()
    assert Consumer._new_offset is new_offset


def test_leftovers_below_the_committed_offset_hold_nothing_up():
    """A message of an earlier assignment of the partition, still unacked or in the ledger, that the
    partition's owner since then committed past: it does not stop this owner's commits."""
    IN_FLIGHT.begin("tasks", 0, 3)
    try:
        consumer = FakeConsumer(10, [10, 11], unacked=[4])
        assert new_offset(consumer, T) == 12
    finally:
        IN_FLIGHT.end("tasks", 0, 3)


def test_a_drain_waits_for_the_work_in_flight_not_for_parked_retries():
    """A stop's drain (IMAGEFORK_SHUTDOWN_GRACE_S) returns once every message being worked on is done; a
    message only waiting for its not-before time does not hold it; past the grace it gives up (False)."""
    import asyncio

    from streams.adapters.offsets import IN_FLIGHT, Drain

    async def go():
        drain = Drain()
        IN_FLIGHT.begin("drain-t", 0, 5)
        IN_FLIGHT.begin("drain-t", 0, 6)
        drain.parked = 1  # offset 6: parked on a retry topic
        late = await drain.wait(0.2, poll_s=0.01)  # offset 5 is still being worked on
        asyncio.get_running_loop().call_later(0.1, IN_FLIGHT.end, "drain-t", 0, 5)
        done = await drain.wait(5, poll_s=0.01)
        IN_FLIGHT.end("drain-t", 0, 6)
        return late, done

    assert asyncio.run(go()) == (False, True)


def test_an_acked_second_delivery_left_in_fausts_set_holds_nothing_up():
    """The partition came back to this consumer after a rebalance and offset 5 was read again: the first
    delivery was acked, then the second one too, but Faust's ``ack`` takes a message out of
    ``_unacked_messages`` only when its offset was not acked before, so the second stays there (marked
    acked) while an idle agent holds it as its last event. It must not stop the commits (CI: a resize group
    that never committed past it, the drain never ended); an unacked second delivery still does."""
    consumer = FakeConsumer(5, [5, 6], acked_duplicates=[5])
    assert new_offset(consumer, T) == 7
    consumer = FakeConsumer(5, [5, 6], unacked=[5])
    assert new_offset(consumer, T) is None
