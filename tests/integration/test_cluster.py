"""``imagefork stack up --brokers 3``: a KRaft cluster of three nodes (each broker and controller) of the
test's own. The seed request goes end to end on it with one worker per role; the topics have 3 replicas
and min.insync.replicas=2. A broker SIGKILLed, a second request ends exactly once on the other two: in
`make test-long`, known to fail when the killed node held the join's coordinator (issue 22, item 3)."""
import atexit
import contextlib
import io
import shutil
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from streams import cli
from streams.adapters.kafka import topic_specs
from streams.stack.local import LocalStack
from tests.integration.pipeline import Pipeline

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("java") is None, reason="the local stack needs Java 17+"),
              pytest.mark.timeout(400)]

SEED_SIZES = [{"width": 300, "height": 300}, {"width": 200, "height": 200}, {"width": 1200, "height": 1200}]
FORMATS = ("png", "jpg", "webp")


def seed(files) -> dict:
    return {"fileLocation": files.url("sample.png"), "outputFormats": list(FORMATS), "outputSizes": SEED_SIZES,
            "maintainAspectRatio": True}


@pytest.fixture
def cluster(tmp_path_factory):
    """Three Kafka nodes and S3Proxy in a folder of the test's own; all stopped at the end, even on failure."""
    stack = LocalStack(tmp_path_factory.mktemp("cluster"))
    atexit.register(stack.down)  # should a SIGTERM cut the teardown short
    try:
        stack.up(brokers=3)
        yield stack
    finally:
        stack.down()


def check_final(p: Pipeline, final, workflow_id: str) -> None:
    assert final.status == "COMPLETED", final.errors
    assert {(o.format, o.width, o.height) for o in final.outputs} == {
        (f, s["width"], s["height"]) for f in FORMATS for s in SEED_SIZES}, final.outputs
    p.check_outputs(final)


def run_first(p: Pipeline, files):
    """One worker per role on the cluster, and the seed request through them: (the follower, its id)."""
    p.start_together("join", "resize", "planner")
    follower = p.follower()
    first = p.submit(seed(files), "cluster-1")
    check_final(p, follower.wait([first], 60)[first], first)
    return follower, first


def test_three_broker_cluster(cluster, files, tmp_path):
    started = time.monotonic()
    env = cluster.env()
    servers = env["KAFKA_BOOTSTRAP_SERVERS"].split(",")
    assert len(servers) == 3 and len(set(servers)) == 3, servers
    # `stack env` prints the three addresses; `up` with the same count reuses the running cluster
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["stack", "env", "--dir", str(cluster.dir)]) == 0
    assert f"KAFKA_BOOTSTRAP_SERVERS={env['KAFKA_BOOTSTRAP_SERVERS']}" in out.getvalue().splitlines()
    pids = {name: svc["pid"] for name, svc in cluster._load()["services"].items()}
    assert sorted(pids) == ["kafka", "kafka-2", "kafka-3", "s3proxy"], pids
    assert cluster.up(brokers=3) == env
    assert {name: svc["pid"] for name, svc in cluster._load()["services"].items()} == pids

    p = Pipeline(env, f"c{uuid.uuid4().hex[:8]}.", tmp_path / "logs", IMAGEFORK_SESSION_TIMEOUT_S="10")
    try:
        follower, first = run_first(p, files)

        # every topic of the project: 3 replicas, min.insync.replicas=2; the internal ones 3 replicas
        admin = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"], "log_level": 0})
        topics = admin.list_topics(timeout=10).topics
        ours = list(topic_specs(p.config))
        for name in [*ours, "__consumer_offsets", "__transaction_state"]:
            assert name in topics, (name, sorted(topics))
            assert {len(part.replicas) for part in topics[name].partitions.values()} == {3}, name
        configs = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t) for t in ours])
        for resource, future in configs.items():
            assert future.result(timeout=10)["min.insync.replicas"].value == "2", resource

        follower.close()
        assert Counter(f.workflowId for f in p.finals_for([first], settle=5)) == Counter({first: 1})
        assert all(w.alive() for w in p.workers), p.logs()
    finally:
        p.stop()
    print(f"cluster test body took {time.monotonic() - started:.1f}s")


def test_a_node_killed_the_next_request_still_ends_exactly_once(cluster, files, tmp_path):
    """KNOWN TO FAIL when the killed node holds the join's group or transaction coordinator (issue 22, item
    3): the join's restore then took 61 s, and its next send_offsets_to_transaction never returned, so the
    drain never ends. It passed when the node killed was only the active controller. In `make test-long`
    (tests/conftest.py LONG) until the join rides out a coordinator's loss."""
    env = cluster.env()
    p = Pipeline(env, f"c{uuid.uuid4().hex[:8]}.", tmp_path / "logs", IMAGEFORK_SESSION_TIMEOUT_S="10")
    try:
        follower, first = run_first(p, files)
        # a broker SIGKILLed: a second request still ends, exactly once, on the two left
        cluster.stop_kafka(2, kill=True)
        second = p.submit(seed(files), "cluster-2")
        check_final(p, follower.wait([second], 120)[second], second)
        follower.close()
        counts = Counter(f.workflowId for f in p.finals_for([first, second], settle=5))
        assert counts == Counter({first: 1, second: 1}), counts
        assert all(w.alive() for w in p.workers), p.logs()
    finally:
        p.stop()
