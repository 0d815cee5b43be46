"""What a stop waits for (adapters/inflight.py): the messages being worked on, not those parked."""
from streams.adapters.inflight import IN_FLIGHT, Drain


def test_a_drain_is_busy_with_the_work_in_flight_not_with_parked_messages():
    drain = Drain()
    IN_FLIGHT.begin("drain-t", 0, 5)
    IN_FLIGHT.begin("drain-t", 0, 6)
    IN_FLIGHT.begin("drain-t", 0, 6)  # the same offset twice (a second delivery): counted twice
    drain.parked = 1  # one of them only waits for its not-before time
    try:
        assert drain.busy() == 2
        IN_FLIGHT.end("drain-t", 0, 5)
        IN_FLIGHT.end("drain-t", 0, 6)
        assert drain.busy() == 0
        IN_FLIGHT.end("drain-t", 0, 7)  # never begun: nothing to end
        assert drain.busy() == 0
    finally:
        IN_FLIGHT.end("drain-t", 0, 6)
    assert IN_FLIGHT.count() == 0
