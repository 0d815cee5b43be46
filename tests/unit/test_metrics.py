"""The metrics without a broker: the consumer-lag reading and collector on a fake admin client, the status
report's layout, and the byte counts a resize pool's process sends back with a task."""
from __future__ import annotations

import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from confluent_kafka import ConsumerGroupState, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, generate_latest

from streams import metrics
from streams.adapters.kafka import KafkaUnavailable
from streams.adapters.lag import GroupStatus, LagCollector, Member, PartitionLag, format_status, read_groups
from streams.config import Config

CONFIG = Config()
T = CONFIG.topics


def done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


def failed(exc) -> Future:
    f = Future()
    f.set_exception(exc)
    return f


class FakeAdmin:
    """Topics of 2 partitions; ``committed``: group -> {(topic, partition): offset}; ``ends`` and ``starts``:
    (topic, partition) -> offset; ``members``: group -> [(client, host, [(topic, partition)])]."""

    def __init__(self, committed, ends, starts=None, members=None, down=False, hang=False):
        self.committed, self.ends, self.starts = committed, ends, starts or {}
        self.members, self.down, self.hang = members or {}, down, hang
        self.calls = 0

    def poll(self, timeout):
        return 0

    def list_topics(self, timeout):
        self.calls += 1
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT,
                                            "Failed to get metadata: Local: Broker transport failure"))
        return SimpleNamespace(topics={t: SimpleNamespace(error=None, partitions={0: None, 1: None}) for t in T.all()})

    def list_consumer_group_offsets(self, request, request_timeout):
        group = request[0].group_id
        if self.hang:
            return {group: Future()}  # never answered
        tps = [TopicPartition(t, p, o) for (t, p), o in self.committed.get(group, {}).items()]
        return {group: done(ConsumerGroupTopicPartitions(group, tps))}

    def list_offsets(self, wanted, isolation_level=None, request_timeout=None):
        table = self.ends if wanted and next(iter(wanted.values())).__class__.__name__ == "LatestSpec" else self.starts
        return {tp: done(SimpleNamespace(offset=table.get((tp.topic, tp.partition), 0))) for tp in wanted}

    def describe_consumer_groups(self, groups, request_timeout):
        out = {}
        for g in groups:
            members = [SimpleNamespace(member_id=f"{client}-{i}", client_id=client, host=host, assignment=SimpleNamespace(
                topic_partitions=[TopicPartition(t, p) for t, p in tps]))
                       for i, (client, host, tps) in enumerate(self.members.get(g, []))]
            out[g] = done(SimpleNamespace(state=ConsumerGroupState.STABLE if members else ConsumerGroupState.EMPTY,
                                          members=members))
        return out


def test_lag_is_the_end_offset_less_the_committed_one_and_a_partition_never_committed_counts_from_its_start():
    admin = FakeAdmin(committed={"imagefork-resize": {(T.tasks, 0): 10, (T.tasks, 1): 7}},
                      ends={(T.tasks, 0): 12, (T.tasks, 1): 7, (T.retries, 0): 3, (T.retries, 1): 0},
                      starts={(T.retries, 0): 1})
    [g] = read_groups(admin, CONFIG, ["resize"])
    assert g.group == "imagefork-resize" and not g.error
    assert [(p.topic, p.partition, p.committed, p.end, p.lag) for p in g.partitions if p.topic != T.tasks_batch] == [
        (T.tasks, 0, 10, 12, 2), (T.tasks, 1, 7, 7, 0), (T.retries, 0, None, 3, 2), (T.retries, 1, None, 0, 0)]
    assert [p.lag for p in g.partitions if p.topic == T.tasks_batch] == [0, 0]  # the batch lane, empty
    assert g.lag == 4


def test_a_committed_offset_past_the_end_is_no_negative_lag():
    assert PartitionLag("t", 0, committed=9, end=8).lag == 0


def test_the_collector_exports_lag_and_committed_offsets_and_reads_at_most_once_per_cache_period():
    admin = FakeAdmin(committed={"imagefork-join": {(T.events, 0): 5}}, ends={(T.events, 0): 8, (T.events, 1): 0})
    collector = LagCollector(CONFIG, cache_s=60, admin=admin)
    collector.add(["join"])
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert f'imagefork_consumer_lag{{group="imagefork-join",partition="0",topic="{T.events}"}} 3.0' in text
    assert f'imagefork_consumer_lag{{group="imagefork-join",partition="1",topic="{T.events}"}} 0.0' in text
    assert f'imagefork_consumer_committed_offset{{group="imagefork-join",partition="0",topic="{T.events}"}} 5.0' in text
    assert 'committed_offset{group="imagefork-join",partition="1"' not in text  # never committed there
    generate_latest(registry)
    assert admin.calls == 1


def test_a_broker_away_gives_no_lag_samples_and_counts_a_scrape_error():
    before = metrics.LAG_SCRAPE_ERRORS._value.get()
    collector = LagCollector(CONFIG, cache_s=0, admin=FakeAdmin({}, {}, down=True))
    collector.add(["planner", "resize"])
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert "imagefork_consumer_lag{" not in text and "# TYPE imagefork_consumer_lag gauge" in text
    assert metrics.LAG_SCRAPE_ERRORS._value.get() == before + 1


def test_a_broker_that_does_not_answer_holds_a_scrape_no_longer_than_the_timeout():
    before = metrics.LAG_SCRAPE_ERRORS._value.get()
    collector = LagCollector(CONFIG, cache_s=0, timeout_s=0.5, admin=FakeAdmin({}, {}, hang=True))
    collector.add(["join"])
    started = time.monotonic()
    assert collector.groups() == [] or all(g.error for g in collector.groups())
    assert time.monotonic() - started < 3
    assert metrics.LAG_SCRAPE_ERRORS._value.get() > before


def test_read_groups_raises_a_one_line_kafka_unavailable_when_the_cluster_is_away():
    with pytest.raises(KafkaUnavailable) as err:
        read_groups(FakeAdmin({}, {}, down=True), CONFIG, ["join"], describe=True)
    assert "\n" not in str(err.value) and "Broker transport failure" in str(err.value)


def test_read_groups_describes_each_groups_state_and_members():
    admin = FakeAdmin(committed={"imagefork-join": {(T.events, 0): 4, (T.events, 1): 2}},
                      ends={(T.events, 0): 4, (T.events, 1): 5},
                      members={"imagefork-join": [("join-b", "/10.0.0.2", [(T.events, 1)]),
                                                  ("join-a", "/10.0.0.1", [(T.events, 0)])]})
    planner, join = read_groups(admin, CONFIG, ["planner", "join"], describe=True)
    assert planner.state == "Empty" and planner.members == []
    assert join.state == "Stable"
    assert [(m.client_id, m.host, m.assigned) for m in join.members] == [
        ("join-a", "/10.0.0.1", ((T.events, 0),)), ("join-b", "/10.0.0.2", ((T.events, 1),))]


def test_the_status_report_shows_each_role_its_members_partitions_and_totals():
    groups = [
        GroupStatus("planner", "imagefork-planner", [PartitionLag("imagefork.requests", 0, None, 0),
                                                     PartitionLag("imagefork.requests", 1, 40, 42)], state="Empty"),
        GroupStatus("resize", "imagefork-resize",
                    [PartitionLag("imagefork.tasks", 0, 120, 125), PartitionLag("imagefork.tasks", 1, 7, 7)],
                    state="Stable", members=[
                        Member("m-1", "rdkafka", "/127.0.0.1", (("imagefork.tasks", 0),)),
                        Member("rdkafka-5f17b60e", "rdkafka", "/127.0.0.2", (("imagefork.tasks", 1),))]),
        GroupStatus("join", "imagefork-join", state="", error="KafkaException: coordinator not available"),
    ]
    assert format_status(groups) == """\
planner  group imagefork-planner  Empty, 0 members, lag 2
  not assigned to a member
    imagefork.requests  0  committed -   end 0   lag 0
    imagefork.requests  1  committed 40  end 42  lag 2
  total: lag 2 over 2 partitions, committed in 1

resize  group imagefork-resize  Stable, 2 members, lag 5
  member rdkafka on /127.0.0.1 (m-1)
    imagefork.tasks  0  committed 120  end 125  lag 5
  member rdkafka on /127.0.0.2 (5f17b60e)
    imagefork.tasks  1  committed 7    end 7    lag 0
  total: lag 5 over 2 partitions, committed in 2

join  group imagefork-join  state unknown, 0 members, lag 0
  offsets not read: KafkaException: coordinator not available
  total: lag 0 over 0 partitions, committed in 0

all roles: lag 7 (offsets not read for join)"""


def test_a_pool_process_tallies_its_bytes_and_the_worker_counts_them_once():
    read = metrics.BYTES_READ.labels("s3")._value.get()
    written = metrics.BYTES_WRITTEN.labels("output")._value.get()
    saved = metrics._io_tally
    try:
        metrics.tally_io()
        metrics.count_read("s3", 100)
        metrics.count_written("output", 30)
        metrics.count_written("output", 12)
        assert metrics.BYTES_READ.labels("s3")._value.get() == read  # not counted in the pool's process
        taken = metrics.take_io()
        assert metrics.take_io() == []
    finally:
        metrics._io_tally = saved
    metrics.add_io(taken)
    assert metrics.BYTES_READ.labels("s3")._value.get() == read + 100
    assert metrics.BYTES_WRITTEN.labels("output")._value.get() == written + 42


def test_the_resize_job_reports_its_time_and_counts_its_bytes(monkeypatch):
    import io

    from PIL import Image

    from streams.agents import resize_job

    class Store:
        objects: dict = {}

        def get(self, uri, max_bytes):
            buf = io.BytesIO()
            Image.new("RGB", (64, 48), "red").save(buf, "PNG")
            metrics.count_read("s3", len(buf.getvalue()))
            return buf.getvalue()

        def put(self, key, data, content_type, metadata=None):
            self.objects[key] = data
            metrics.count_written("output", len(data))

        def uri(self, key):
            return f"s3://b/{key}"

        def url(self, key):
            return f"http://s3/b/{key}"

    resize_job.init(Config())
    monkeypatch.setattr(resize_job, "_store", Store())
    monkeypatch.setattr(metrics, "_io_tally", {})  # as in a pool's process
    out = resize_job.run({"sourceUri": "s3://b/metrics-src", "taskRef": "png_32x24", "format": "png",
                          "width": 32, "height": 24, "maintainAspectRatio": True, "outputKey": "w/png_32x24.png"})
    assert out["ok"] and 0 <= out["seconds"] < 30
    io_counts = {(what, label): n for what, label, n in out["io"]}
    assert io_counts[("written", "output")] == out["output"]["bytes"] == len(Store.objects["w/png_32x24.png"])
    assert io_counts[("read", "s3")] > 0


def test_a_message_put_on_its_retry_topic_counts_a_retry_and_a_dead_letter_does_not():
    import asyncio

    from streams.agents.policy import Message, MessagePolicy
    from streams.config import Retry
    from tests.unit.test_policy import FakeTopic

    policy = MessagePolicy("metrics-test", Config(retry=Retry(max_retries=1, delay_s=0.01, max_delay_s=0.01)),
                           dead_letter=FakeTopic("x.dlq"), retry_topic=FakeTopic("x.retry"))
    retries = metrics.RETRIES.labels("metrics-test", "INTERNAL")

    async def broken(_msg):
        raise RuntimeError("a bug")

    for attempts in (b"1", b"2"):  # retried, then dead-lettered (retries spent)
        asyncio.run(policy.process(Message(b"k", b"v", {"imagefork.attempts": attempts},
                                           {"topic": "in", "partition": "0", "offset": "1"}), broken))
    assert retries._value.get() == 1


def test_the_status_report_of_an_unreachable_cluster_is_one_line():
    from streams.adapters.lag import status_report
    from streams.stack.local import free_port

    started = time.monotonic()
    with pytest.raises(KafkaUnavailable) as err:
        status_report(Config(bootstrap_servers=f"127.0.0.1:{free_port()}"), timeout_s=2)
    assert time.monotonic() - started < 10
    assert "\n" not in str(err.value) and "127.0.0.1" in str(err.value), err.value
