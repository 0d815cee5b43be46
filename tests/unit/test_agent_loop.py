"""The planner's and resize's confluent-kafka loop (streams/adapters/agent_loop.py) without a broker: which send
errors are final, how a lane's records are held and paused. Against the real broker: tests/integration/test_offsets.py
(a slow message at the head of its partition, SIGKILL and SIGTERM) and the rest of the integration suite, whose every
planner and resize worker runs on it."""
import asyncio

import pytest
from confluent_kafka import KafkaError, TopicPartition

from streams.adapters.agent_loop import READ_AHEAD, REJOIN_AFTER_S, RESUME_AT, AgentLoop, Lane, send_error
from streams.adapters.inflight import DRAIN
from streams.agents.common import SendRejected, send
from streams.config import Config


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                  KafkaError.INVALID_RECORD])
def test_a_record_the_broker_refuses_for_good_is_not_sent_again(code):
    class Refusing:
        calls = 0

        def get_topic_name(self):
            return "out"

        async def send(self, **_):
            Refusing.calls += 1
            future = asyncio.get_running_loop().create_future()
            future.set_exception(send_error(KafkaError(code)))
            return future

    with pytest.raises(SendRejected):
        asyncio.run(send(Refusing(), key=b"k", value=b"v"))
    assert Refusing.calls == 1


def test_a_broker_away_is_sent_again():
    class Flaky:
        calls = 0

        def get_topic_name(self):
            return "out"

        async def send(self, **_):
            Flaky.calls += 1
            future = asyncio.get_running_loop().create_future()
            if Flaky.calls == 1:
                future.set_exception(send_error(KafkaError(KafkaError._MSG_TIMED_OUT)))
            else:
                future.set_result(None)
            return future

    asyncio.run(send(Flaky(), key=b"k", value=b"v"))
    assert Flaky.calls == 2


class FakeConsumer:
    def __init__(self):
        self.paused, self.resumed = [], []

    def pause(self, tps):
        self.paused.append(sorted((tp.topic, tp.partition) for tp in tps))

    def resume(self, tps):
        self.resumed.append(sorted((tp.topic, tp.partition) for tp in tps))

    def assign(self, tps):
        self.given = sorted((tp.topic, tp.partition) for tp in tps)

    def commit(self, offsets, asynchronous):
        self.committed = [(tp.topic, tp.partition, tp.offset) for tp in offsets]

    def subscribe(self, topics, **callbacks):
        self.subscribed = getattr(self, "subscribed", 0) + 1

    def unsubscribe(self):
        self.unsubscribed = getattr(self, "unsubscribed", 0) + 1


class Record:
    def __init__(self, topic, partition, offset):
        self._where = (topic, partition, offset)

    def topic(self):
        return self._where[0]

    def partition(self):
        return self._where[1]

    def offset(self):
        return self._where[2]

    def error(self):
        return None


def on_fake_consumer(lanes: list[Lane]) -> tuple[AgentLoop, "FakeConsumer"]:
    """A loop whose consumer is a FakeConsumer, on the running asyncio loop."""
    loop = AgentLoop(Config.from_env({}), "resize", lanes)
    loop.consumer.close()
    fake = loop.consumer = FakeConsumer()
    loop._loop = asyncio.get_running_loop()
    return loop, fake


def test_a_lane_reads_ahead_then_pauses_runs_its_concurrency_and_commits_only_a_finished_prefix():
    async def go():
        loop, fake = on_fake_consumer([Lane("tasks", 2, None), Lane("retry", 8, None)])
        started = []

        async def handle(msg, taken_at):
            started.append(msg.offset())
            await gate.wait()
        gate = asyncio.Event()
        loop.lanes["tasks"] = Lane("tasks", 2, handle)
        loop._assigned(fake, [TopicPartition("tasks", 0), TopicPartition("tasks", 1), TopicPartition("retry", 0)])
        # assigned and resumed at once: a partition paused when it went away would come back paused
        assert fake.given == fake.resumed[0] == [("retry", 0), ("tasks", 0), ("tasks", 1)]
        assert loop._flow() == READ_AHEAD * 10
        for offset in range(5, 5 + READ_AHEAD * 2):
            loop._take(Record("tasks", 0, offset))
        await asyncio.sleep(0.01)
        assert started == [5, 6]  # two at once; the rest read ahead, waiting
        assert loop._flow() == READ_AHEAD * 8  # the tasks lane is full: paused, only the retry lane has room
        assert fake.paused == [[("tasks", 0), ("tasks", 1)]]
        assert loop.offsets.committable() == []  # nothing finished
        gate.set()
        await asyncio.sleep(0.05)
        assert started == list(range(5, 5 + READ_AHEAD * 2)) and loop.held["tasks"] == 0
        assert [(tp.topic, tp.partition, tp.offset) for tp in loop.offsets.committable()] == \
            [("tasks", 0, 5 + READ_AHEAD * 2)]
        loop._flow()
        assert fake.resumed[1:] == [[("tasks", 0), ("tasks", 1)]]

    asyncio.run(go())


def test_a_paused_lane_reads_again_while_it_still_has_work_queued():
    """Resumed only once it ran dry, a lane's slots waited on the fetch the resume starts."""
    async def go():
        loop, fake = on_fake_consumer([Lane("tasks", 2, None)])
        gates = {}

        async def handle(msg, taken_at):
            await gates.setdefault(msg.offset(), asyncio.Event()).wait()
        loop.lanes["tasks"] = Lane("tasks", 2, handle)
        loop._assigned(fake, [TopicPartition("tasks", 0)])
        for offset in range(READ_AHEAD * 2):
            loop._take(Record("tasks", 0, offset))
        await asyncio.sleep(0.01)
        loop._flow()
        assert loop.paused == {"tasks"}
        finished = 0
        while loop.held["tasks"] > RESUME_AT * 2:  # one at a time: paused until it holds RESUME_AT x 2
            assert loop.paused == {"tasks"}
            gates.setdefault(finished, asyncio.Event()).set()
            finished += 1
            await asyncio.sleep(0.01)
            loop._flow()
        assert loop.paused == set() and fake.resumed[-1] == [("tasks", 0)]
        assert loop.held["tasks"] == RESUME_AT * 2 > loop.running["tasks"]  # resumed with records still queued
        for event in gates.values():
            event.set()

    asyncio.run(go())


def test_a_drain_hands_back_what_was_read_ahead_and_takes_nothing_new():
    async def go():
        loop, fake = on_fake_consumer([Lane("tasks", 1, None)])
        release = asyncio.Event()

        async def handle(msg, taken_at):
            await release.wait()
        loop.lanes["tasks"] = Lane("tasks", 1, handle)
        loop._assigned(fake, [TopicPartition("tasks", 0)])
        for offset in (1, 2, 3):
            loop._take(Record("tasks", 0, offset))
        await asyncio.sleep(0.01)
        DRAIN.start()
        try:
            loop._hand_back()
            loop._take(Record("tasks", 0, 4))  # not taken: never committed, the next owner reads it
            assert loop.held["tasks"] == 1  # only the one running
            release.set()
            await asyncio.sleep(0.05)
            # 1 finished; 2 and 3 were handed back, so the commit stops before them
            assert [(tp.partition, tp.offset) for tp in loop.offsets.committable()] == [(0, 2)]
            loop._flow()
            assert fake.paused[-1] == [("tasks", 0)]
        finally:
            DRAIN.started = False

    asyncio.run(go())


def test_a_revoked_partition_drops_what_it_read_ahead_lets_what_runs_finish_and_commits_it_first():
    async def go():
        loop, fake = on_fake_consumer([Lane("tasks", 1, None)])
        release, started = asyncio.Event(), []

        async def handle(msg, taken_at):
            started.append((msg.partition(), msg.offset()))
            if msg.offset() != 1:
                await release.wait()
        loop.lanes["tasks"] = Lane("tasks", 1, handle)
        loop._assigned(fake, [TopicPartition("tasks", 0), TopicPartition("tasks", 1)])
        for where in ((0, 1), (0, 2), (0, 3), (1, 7)):
            loop._take(Record("tasks", *where))
        await asyncio.sleep(0.02)
        assert started == [(0, 1), (0, 2)]  # 1 done, 2 running; 3 and 7 read ahead
        asyncio.get_running_loop().call_later(0.2, release.set)  # 2 finishes while the rebalance waits
        await asyncio.to_thread(loop._revoked, fake, [TopicPartition("tasks", 0)])  # as the consumer's thread does
        assert fake.committed == [("tasks", 0, 3)]  # 1 and 2: done before the partition went; 3 is the next owner's
        await asyncio.sleep(0.05)
        assert started == [(0, 1), (0, 2), (1, 7)] and loop.assigned == {("tasks", 1)}
        assert loop.held["tasks"] == 0 and not loop.queued["tasks"]

    asyncio.run(go())


def test_partitions_lost_and_never_given_back_make_the_consumer_join_again():
    """librdkafka can stay waiting for an unassign after partitions were lost across a broker restart, and never
    join again (a CI run: resize held nothing for two minutes while the planner rejoined in 11 s)."""
    async def go():
        loop, fake = on_fake_consumer([Lane("tasks", 2, None)])
        loop._assigned(fake, [TopicPartition("tasks", 0)])
        loop._lost(fake, [TopicPartition("tasks", 0)])
        lost = loop._lost_at
        patience = max(REJOIN_AFTER_S, 3 * loop.config.session_timeout_s)
        loop._rejoin_if_stuck(lost + patience - 1)
        assert not hasattr(fake, "unsubscribed")  # a rejoin under way is given its time
        loop._rejoin_if_stuck(lost + patience)
        assert fake.unsubscribed == fake.subscribed == 1
        loop._rejoin_if_stuck(lost + patience + 1)
        assert fake.subscribed == 1  # then its own time again
        loop._assigned(fake, [TopicPartition("tasks", 0)])
        loop._rejoin_if_stuck(lost + 10 * patience)
        assert fake.subscribed == 1  # assigned again: nothing to do

    asyncio.run(go())
