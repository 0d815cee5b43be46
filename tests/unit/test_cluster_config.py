"""The local stack's Kafka configuration for ``stack up --brokers 3`` (no process is started here), and the
replication the project's topics get on such a cluster."""
import json

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.adapters.kafka import (
    group_timing, murmur2, partition_for, producer_config, replication_for, topic_config, watermarks,
)
from streams.config import Config
from streams.stack.local import (NODE_PORTS, PORTS, LocalStack, StackError, free_ports, kafka_properties,
                                 node_ports, port_names)


def props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_three_nodes_have_their_own_ports_and_the_same_voters(tmp_path):
    ports = free_ports(port_names(3))
    assert len(set(ports.values())) == len(ports) == len(PORTS) + 2 * len(NODE_PORTS)
    nodes = {n: props(kafka_properties(n, 3, ports, tmp_path / f"data-{n}", tmp_path / "ks.pem", "pw"))
             for n in (1, 2, 3)}
    voters = {p["controller.quorum.voters"] for p in nodes.values()}
    assert voters == {",".join(f"{n}@127.0.0.1:{node_ports(ports, n)['controller']}" for n in (1, 2, 3))}
    assert [p["node.id"] for p in nodes.values()] == ["1", "2", "3"]
    assert all(p["process.roles"] == "broker,controller" for p in nodes.values())
    # every node its own listeners (PLAINTEXT, SASL_PLAINTEXT, SSL, SASL_SSL and CONTROLLER), its own data
    listened = [int(addr.rsplit(":", 1)[1]) for p in nodes.values() for addr in p["listeners"].split(",")]
    assert len(listened) == 15 and len(set(listened)) == 15
    assert all(len(p["listeners"].split(",")) == 5 for p in nodes.values())
    assert len({p["log.dirs"] for p in nodes.values()}) == 3
    for p in nodes.values():
        assert p["offsets.topic.replication.factor"] == "3"
        assert p["transaction.state.log.replication.factor"] == "3"
        assert p["transaction.state.log.min.isr"] == "2"
        assert p["min.insync.replicas"] == "2"
        assert p["default.replication.factor"] == "3"


def test_a_single_node_is_configured_as_before(tmp_path):
    ports = free_ports(port_names(1))
    assert port_names(1) == PORTS
    p = props(kafka_properties(1, 1, ports, tmp_path / "kafka-data", tmp_path / "ks.pem", "pw"))
    assert p["controller.quorum.voters"] == f"1@127.0.0.1:{ports['controller']}"
    assert p["offsets.topic.replication.factor"] == "1"
    assert p["transaction.state.log.replication.factor"] == "1"
    assert p["transaction.state.log.min.isr"] == "1"
    assert "min.insync.replicas" not in p and "default.replication.factor" not in p
    assert p["listeners"].split(",")[0] == f"PLAINTEXT://127.0.0.1:{ports['kafka']}"


def test_a_stack_with_another_broker_count_is_outdated(tmp_path):
    stack = LocalStack(tmp_path)
    from streams.stack.local import KAFKA_LAYOUT
    stack._save({"ports": {}, "services": {"kafka": {"pid": 1, "port": 1}}, "env": {}, "layout": KAFKA_LAYOUT,
                 "brokers": 3})
    assert stack.brokers() == 3
    assert not stack._outdated(3) and stack._outdated(1)
    state = json.loads(stack.state_file.read_text())
    del state["brokers"]  # a stack of an older imagefork: one broker
    stack._save(state)
    assert stack.brokers() == 1 and not stack._outdated(1) and stack._outdated(3)
    with pytest.raises(StackError):
        stack.up(brokers=0)


def test_replication_follows_the_brokers_unless_set():
    config = Config.from_env({})
    assert [replication_for(config, n) for n in (0, 1, 2, 3, 5)] == [1, 1, 2, 3, 3]
    assert replication_for(Config.from_env({"IMAGEFORK_REPLICATION_FACTOR": "2"}), 3) == 2
    assert topic_config({"retention.ms": "1"}, 3) == {"retention.ms": "1", "min.insync.replicas": "2"}
    assert topic_config({"retention.ms": "1"}, 1) == {"retention.ms": "1"}


def test_producers_wait_for_all_replicas_and_are_idempotent_and_partition_as_java_does():
    conf = producer_config(Config.from_env({}))
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True and conf["partitioner"] == "murmur2_random"


@pytest.mark.parametrize("key,signed", [  # Kafka's own vectors (UtilsTest.testMurmur2), as Java's signed ints
    (b"21", -973932308), (b"foobar", -790332482), (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829), (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
])
def test_murmur2_is_the_java_clients(key, signed):
    assert murmur2(key) == signed % (1 << 32)
    assert partition_for(key, 12) == (signed & 0x7FFFFFFF) % 12


class _Leaders:
    """A consumer whose partition leader answers ``errors`` first, then its watermarks."""

    def __init__(self, *errors):
        self.errors, self.asked = list(errors), 0

    def get_watermark_offsets(self, tp, timeout):
        self.asked += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return 0, 7


def test_watermarks_are_asked_again_while_the_leader_moves():
    # a topic just created, or a leader election on a cluster: NOT_LEADER, then the answer (CI saw this)
    moving = _Leaders(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
    assert watermarks(moving, TopicPartition("t", 1), timeout=5) == (0, 7)
    assert moving.asked == 3


def test_watermarks_raise_other_errors_at_once_and_a_moving_leader_after_the_timeout():
    refused = _Leaders(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        watermarks(refused, TopicPartition("t", 0), timeout=5)
    assert refused.asked == 1
    stuck = _Leaders(*[KafkaError.NOT_LEADER_FOR_PARTITION] * 100)
    with pytest.raises(KafkaException, match="NOT_LEADER"):
        watermarks(stuck, TopicPartition("t", 0), timeout=0.3)
    assert 2 <= stuck.asked < 100


def test_a_group_member_heartbeats_once_a_second_at_most_so_a_rebalance_is_seen_soon():
    """A member learns of a rebalance from a heartbeat's answer: at a third of a 15 s session a deploy's
    rebalance waited up to 3 s for it (bench/roll.py)."""
    from streams.join.loop import consumer_settings

    assert group_timing(Config(session_timeout_s=15.0)) == {"session.timeout.ms": 15000, "heartbeat.interval.ms": 1000}
    assert group_timing(Config(session_timeout_s=2.0))["heartbeat.interval.ms"] == 400  # a fifth of a short session
    assert group_timing(Config(session_timeout_s=0.5))["heartbeat.interval.ms"] == 250
    join = consumer_settings(Config(session_timeout_s=15.0), "g", "")
    assert (join["session.timeout.ms"], join["heartbeat.interval.ms"]) == (15000, 1000)
