"""Priority lanes without a broker: the rule (interactive first, batch keeps its share while both wait,
never more slots than there are), the gate that applies it to handlers (oldest first in a lane, a cancelled
waiter gives back what it was given), a request's priority and its tasks' lane, and the lag per lane in
``imagefork status``."""
import asyncio

import pytest

from streams.adapters.lag import GroupStatus, PartitionLag, format_status, lanes_of
from streams.adapters.inflight import DRAIN, IN_FLIGHT
from streams.agents.lanes import LaneGate
from streams.core.errors import RequestInvalid
from streams.core.lanes import BATCH, INTERACTIVE, batch_floor, lane_of, next_lane
from streams.core.planning import parse_request, plan_tasks

LIMITS = {"max_dimension": 4000, "max_tasks": 50}
SEED = {"fileLocation": "https://x/a.png", "outputFormats": ["png"], "outputSizes": [{"width": 10, "height": 10}]}


def counts(i, b):
    return {INTERACTIVE: i, BATCH: b}


def test_the_rule_serves_interactive_first_and_keeps_batchs_share():
    assert batch_floor(6, 0.2) == 1 and batch_floor(10, 0.25) == 2 and batch_floor(2, 0.01) == 1
    assert batch_floor(4, 1.0) == 3 and batch_floor(1, 0.5) == 0  # never every slot
    assert next_lane(counts(3, 3), counts(1, 1), 6, 1) is None  # no free slot
    assert next_lane(counts(2, 1), counts(1, 1), 6, 1) == INTERACTIVE  # batch has its share: interactive first
    assert next_lane(counts(5, 0), counts(1, 1), 6, 1) == BATCH  # batch below its share goes first
    assert next_lane(counts(0, 5), counts(0, 1), 6, 1) == BATCH  # nothing interactive: batch takes it
    assert next_lane(counts(1, 1), counts(0, 1), 6, 1) is None  # interactive under way: batch keeps its share
    assert next_lane(counts(0, 0), counts(0, 0), 6, 1) is None
    assert lane_of("batch") == BATCH and lane_of("") == lane_of("anything") == INTERACTIVE


def test_the_gate_runs_interactive_waiters_before_batch_ones_and_batch_keeps_a_slot():
    async def go():
        gate = LaneGate("test", slots=3, share=0.2)  # batch keeps 1 of 3 while interactive waits
        order: list[str] = []
        release = asyncio.Event()

        async def work(lane, name):
            async with gate.slot(lane):
                order.append(name)
                await release.wait()

        batch = [asyncio.create_task(work(BATCH, f"b{i}")) for i in range(4)]
        await asyncio.sleep(0)
        assert order == ["b0", "b1", "b2"]  # nothing interactive: batch takes every slot
        interactive = [asyncio.create_task(work(INTERACTIVE, f"i{i}")) for i in range(3)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*batch, *interactive)
        # as the batch ones end: interactive ones take their slots, in order, until batch is down to its one
        # slot; the next slot freed goes to batch (its share), the one after to interactive again
        return order[3:]
    assert asyncio.run(go()) == ["i0", "i1", "b3", "i2"]


def test_a_steady_interactive_stream_does_not_starve_batch():
    async def go():
        gate = LaneGate("test", slots=4, share=0.25)
        done = {INTERACTIVE: 0, BATCH: 0}

        async def work(lane):
            async with gate.slot(lane):
                await asyncio.sleep(0.001)
                done[lane] += 1

        await asyncio.gather(*(work(INTERACTIVE) for _ in range(200)), *(work(BATCH) for _ in range(50)))
        return done, gate.running
    done, running = asyncio.run(go())
    assert done == {INTERACTIVE: 200, BATCH: 50} and running == counts(0, 0)


def test_one_slot_is_shared_by_turns():
    async def go(share):
        gate = LaneGate("test", slots=1, share=share)
        order: list[str] = []
        hold = asyncio.Event()

        async def work(lane, name):
            async with gate.slot(lane):
                order.append(name)
                await hold.wait()

        first = asyncio.create_task(work(INTERACTIVE, "i0"))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(work(BATCH, f"b{i}")) for i in range(3)] + \
            [asyncio.create_task(work(INTERACTIVE, f"i{i}")) for i in range(1, 8)]
        await asyncio.sleep(0)
        hold.set()
        await asyncio.gather(first, *rest)
        return "".join(name[0] for name in order)
    # interactive first, batch every fourth turn (share 0.25) while both wait, never waiting for ever
    assert asyncio.run(go(0.25)) == "iiiibiiibib"
    assert asyncio.run(go(0.5)).startswith("iibibib")


def test_a_waiter_cancelled_gives_back_its_slot():
    async def go():
        gate = LaneGate("test", slots=1, share=0.5)
        hold = asyncio.Event()

        async def work(lane):
            async with gate.slot(lane):
                await hold.wait()

        first = asyncio.create_task(work(INTERACTIVE))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(work(BATCH))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert len(gate.waiting[BATCH]) == 0
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return gate.running
    assert asyncio.run(go()) == counts(0, 0)


def test_a_drain_waits_for_the_task_with_a_slot_and_hands_back_those_waiting_for_one():
    async def go():
        gate = LaneGate("test", slots=1, share=0.5)
        release, ran = asyncio.Event(), []
        busy, parked, in_flight = DRAIN.busy(), DRAIN.parked, IN_FLIGHT.count()  # other tests' leftovers, if any

        async def task(n: int):
            IN_FLIGHT.begin("gate-tasks", 0, n)  # as MessagePolicy counts a message it handles
            try:
                async with gate.slot_unless_draining(INTERACTIVE):
                    ran.append(n)
                    await release.wait()
            finally:
                IN_FLIGHT.end("gate-tasks", 0, n)

        first, second = asyncio.ensure_future(task(1)), asyncio.ensure_future(task(2))
        await asyncio.sleep(0.01)
        assert ran == [1] and DRAIN.busy() == busy + 1  # the one waiting for a slot is not waited for
        DRAIN.start()
        try:
            release.set()
            await asyncio.sleep(0.02)
            assert first.done() and ran == [1] and not second.done()  # given its slot, it gives it back and waits
            assert gate.running[INTERACTIVE] == 0 and DRAIN.busy() == busy
            second.cancel()  # the stop: never finished, so never committed
            await asyncio.gather(second, return_exceptions=True)
            assert DRAIN.parked == parked and IN_FLIGHT.count() == in_flight
        finally:
            DRAIN.started = False

    asyncio.run(go())


def test_a_requests_priority_names_its_lane_and_its_tasks_carry_it():
    batch = parse_request({**SEED, "priority": "Batch"}, **LIMITS)
    assert batch.priority == "batch" and batch.to_dict()["priority"] == "batch"
    assert [t.priority for t in plan_tasks(batch, "w", source_uri="", deadline=0)] == ["batch"]
    plain = parse_request(SEED, **LIMITS)
    assert plain.priority == "interactive" and "priority" not in plain.to_dict()
    assert plan_tasks(plain, "w", source_uri="", deadline=0)[0].priority == ""
    for bad in ("urgent", 3, ["batch"]):
        with pytest.raises(RequestInvalid, match="priority"):
            parse_request({**SEED, "priority": bad}, **LIMITS)


def test_status_shows_the_lag_of_each_lane():
    lanes = {"t": INTERACTIVE, "t.batch": BATCH}
    g = GroupStatus("resize", "imagefork-resize", [PartitionLag("t", 0, 5, 7), PartitionLag("t.batch", 0, 0, 900),
                                                   PartitionLag("t.batch", 1, 10, 110), PartitionLag("retry", 0, 1, 1)])
    assert lanes_of(g, lanes) == {INTERACTIVE: 2, BATCH: 1000}
    assert "  lanes: interactive lag 2, batch lag 1000" in format_status([g], lanes).splitlines()
