"""The pipeline across hosts (issue 22): a 3-broker KRaft cluster, S3Proxy and every worker each on a host of
its own (tests/hosts.py: a network namespace on a bridge of 198.18.k.0/24, a cgroup CPU quota), reaching
each other over that bridge only. Faults on it, each counting exactly one correct final event per request
after the drain and checking every output object.

Root only: without namespaces these tests skip with the reason, and fail instead when
IMAGEFORK_REQUIRE_NETNS=1 (as `.ci/run` sets)."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from streams.demo import SEED_SIZES
from tests.hosts import Hosts, HostStack, unavailable
from tests.integration.pipeline import Pipeline, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("java") is None, reason="the hosts' cluster needs Java 17+"),
              pytest.mark.timeout(600)]

FORMATS = ("png", "jpg", "webp")
RESIZE_CPU = 0.5  # cores per resize host


def require_hosts() -> None:
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("IMAGEFORK_REQUIRE_NETNS", "") not in ("", "0"):
        pytest.fail(f"IMAGEFORK_REQUIRE_NETNS is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Hosts, and on them three Kafka nodes and S3Proxy; torn down at the end, also on failure."""
    require_hosts()
    hosts = Hosts()
    stack = None
    try:
        stack = HostStack(hosts, tmp_path_factory.mktemp("hosts"), brokers=3)
        yield hosts, stack
    finally:
        if stack is not None:
            stack.close()
        hosts.close()


@pytest.fixture
def pipeline(cluster, namespace, tmp_path):
    hosts, stack = cluster
    p = Pipeline(stack.env, namespace, tmp_path / "logs", IMAGEFORK_SESSION_TIMEOUT_S="6")
    try:
        yield p
    finally:
        p.stop()


def put_source(p: Pipeline) -> str:
    """The sample photo in the bucket (the workers read s3:// sources; they cannot reach this process's
    file server, which listens on loopback)."""
    from streams.demo import SAMPLE
    key = f"inputs/{p.config.output_prefix}sample.png"
    p.store.put(key, SAMPLE.read_bytes(), "image/png")
    return f"s3://{p.config.bucket}/{key}"


def seed(location: str) -> dict:
    return {"fileLocation": location, "outputFormats": list(FORMATS), "outputSizes": SEED_SIZES,
            "maintainAspectRatio": True}


def exactly_once(p: Pipeline, ids: list[str]) -> None:
    """After the drain: one final event per id, COMPLETED with the nine outputs, every object checked."""
    finals = p.finals_for(ids, timeout=120)
    counts = Counter(f.workflowId for f in finals)
    assert counts == Counter({i: 1 for i in ids}), counts
    for final in finals:
        assert final.status == "COMPLETED", (final.workflowId, final.errors)
        assert {(o.format, o.width, o.height) for o in final.outputs} == {
            (f, s["width"], s["height"]) for f in FORMATS for s in SEED_SIZES}, final.outputs
        p.check_outputs(final)

def start_roles(hosts: Hosts, p: Pipeline, resize: int = 1) -> dict:
    """Join, planner and ``resize`` resize workers, each on a host of its own, all ready."""
    tag = p.config.output_prefix.strip("/")[-6:]
    made = {"join": hosts.add(f"join-{tag}"), "planner": hosts.add(f"planner-{tag}"),
            **{f"r{i}": hosts.add(f"r{i}-{tag}", cpu=RESIZE_CPU) for i in range(1, resize + 1)}}
    p.start_together(("join", {"host": made["join"]}), ("planner", {"host": made["planner"]}),
                     *(("resize", {"host": made[f"r{i}"], "name": f"r{i}"}) for i in range(1, resize + 1)))
    return made


def test_hosts_are_separate_and_reach_each_other_only_over_their_bridge(cluster):
    hosts, stack = cluster
    host = stack.s3_host
    routes = subprocess.run(["ip", "-n", host.netns, "route"], capture_output=True, text=True).stdout
    assert "default" not in routes and str(hosts.subnet) in routes, routes
    assert hosts.subnet.subnet_of(ipaddress.ip_network("198.18.0.0/15"))
    # a host reaches a broker over the bridge, and not this machine's loopback services
    probe = "import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))"
    broker = stack.kafka_hosts[1].address
    assert subprocess.run([*host.prefix(), "python3", "-c", probe, broker, "9092"]).returncode == 0
    assert subprocess.run([*host.prefix(), "python3", "-c", probe, "127.0.0.1", "9092"]).returncode != 0
    # a quota of its own
    worker = hosts.add("quota-probe", cpu=0.25)
    assert (worker.cgroups[0] / "cpu.cfs_quota_us").read_text().strip() == "25000"
    busy = worker.popen(["python3", "-c", "import time\nt=time.time()\nwhile time.time()-t<2: pass"])
    started = time.monotonic()
    busy.wait(30)
    used, wall = worker.cpu_seconds(), time.monotonic() - started
    assert used <= 0.25 * wall * 1.2 + 0.05, (used, wall)
    # and a worker there reads it (streams/cgroups.py), as resize sizes its slots: one core's worth
    sized = subprocess.run([*worker.prefix(), sys.executable, "-c",
                            "from streams import cgroups; print(cgroups.cpu_limit(), cgroups.cpu_cores())"],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert sized.stdout.split() == ["0.25", "1"], sized


def test_the_seed_across_hosts_with_a_resize_host_cut_past_its_session(cluster, pipeline):
    """Join, planner and two resize workers on hosts of their own (0.5 core each for resize). One resize
    host's link is cut for longer than the session timeout while its tasks run, then restored: its
    partitions move to the other, its late results are harmless; every request ends once, complete."""
    hosts, _stack = cluster
    p = pipeline
    role_hosts = start_roles(hosts, p, resize=2)
    location = put_source(p)
    follower = p.follower()
    first = p.submit(seed(location), "hosts-first")
    assert follower.wait([first], 120)[first].status == "COMPLETED"
    r1, r2 = (w for w in p.workers if w.name in ("r1", "r2"))
    ids = [p.submit(seed(location), f"hosts-{i}") for i in range(6)]
    # the cut comes once the new requests' tasks run (not the first request's)
    assert wait_until(lambda: any(re.search(r"task hosts-\d", w.log_tail(400)) for w in (r1, r2)), 60)
    seen = r2.log_path.stat().st_size  # r2's lines from the cut on (it may have held all before r1 joined)
    role_hosts["r1"].cut()
    cut = time.monotonic()
    # the session ends: r2 owns every task partition (its "ready" line says so), r1 is still running
    session = float(p.env["IMAGEFORK_SESSION_TIMEOUT_S"])
    tasks = p.config.topics.tasks

    def r2_took_all() -> bool:
        with open(r2.log_path, "rb") as f:
            f.seek(seen)
            return f"{tasks} {p.config.partitions} +".encode() in f.read()
    assert wait_until(r2_took_all, session * 6), r2.log_tail(30)
    assert time.monotonic() - cut >= session * 0.8 and r1.alive()
    time.sleep(2)
    role_hosts["r1"].restore()
    follower.wait(ids, 240)
    exactly_once(p, [first, *ids])



def running(cluster, p: Pipeline, resize: int = 2):
    """Every role on a host of its own, the sample in the bucket: (its s3:// location, a follower)."""
    hosts, _stack = cluster
    start_roles(hosts, p, resize=resize)
    return put_source(p), p.follower()


@pytest.mark.parametrize("victim", ["the leader of events partition 0", "the join group's coordinator"])
def test_a_node_killed_mid_run_and_restarted_later(cluster, pipeline, victim):
    """A node is SIGKILLed while requests run (the leader of an events partition; or the join group's
    coordinator, which also holds the join's transactions when they hash alike), more requests come while
    it is down (two nodes left: min.insync.replicas=2 still met), and it is restarted later: every request
    ends once, complete."""
    _hosts, stack = cluster
    p = pipeline
    location, follower = running(cluster, p)
    first = p.submit(seed(location), "node-first")
    assert follower.wait([first], 120)[first].status == "COMPLETED"
    ids = [p.submit(seed(location), f"node-{i}") for i in range(4)]
    if victim.startswith("the leader"):
        node = stack.leader_of(p.config.topics.events, 0)
    else:
        node = stack.coordinator_of(p.config.group_id("join"))
    stack.kill_kafka(node)
    ids += [p.submit(seed(location), f"node-down-{i}") for i in range(4)]
    time.sleep(15)
    stack.start_kafka(node)
    follower.wait(ids, 300)
    exactly_once(p, [first, *ids])


def test_a_second_join_host_added_mid_run_then_the_first_removed(cluster, pipeline):
    """The join's partitions and their state move twice while requests run: a second join host joins the
    group (cooperative rebalance: the first keeps what it is not asked to give), then the first leaves
    (SIGTERM, a deploy): every request ends once, complete, and the second join holds every partition."""
    hosts, _stack = cluster
    p = pipeline
    location, follower = running(cluster, p)
    j1 = next(w for w in p.workers if w.role == "join")
    tag = p.config.output_prefix.strip("/")[-6:]
    j1_host = hosts.hosts[f"join-{tag}"]
    ids = [p.submit(seed(location), f"joins-a{i}") for i in range(4)]
    j2 = p.start("join", name="join-2", host=hosts.add(f"join2-{tag}"))
    ids += [p.submit(seed(location), f"joins-b{i}") for i in range(4)]
    assert wait_until(lambda: "partitions revoked" in j1.log_tail(200), 60), j1.log_tail(40)
    j1.stop(timeout=30)
    assert j1_host.pids() == [], "the first join's host still runs something"
    ids += [p.submit(seed(location), f"joins-c{i}") for i in range(4)]
    follower.wait(ids, 300)
    exactly_once(p, ids)
    events = p.config.topics.events
    assert wait_until(lambda: f"{events} {p.config.partitions}," in j2.log_tail(60), 30), j2.log_tail(20)


def test_a_broker_paused_past_the_request_timeout(cluster, pipeline):
    """The node leading events partition 0 is paused (SIGSTOP: it holds its connections and answers
    nothing) for longer than the clients' request timeout, while requests run, then resumed: every request
    ends once, complete."""
    _hosts, stack = cluster
    p = pipeline
    location, follower = running(cluster, p)
    ids = [p.submit(seed(location), f"paused-{i}") for i in range(4)]
    node = stack.kafka_hosts[stack.leader_of(p.config.topics.events, 0)]
    node.signal(signal.SIGSTOP)
    try:
        paused = time.monotonic()
        # a request whose partition the paused node leads waits for a new leader (its session, 9 s)
        ids += [p.submit(seed(location), f"paused-late-{i}", timeout_s=120) for i in range(4)]
        # past librdkafka's request.timeout.ms (30 s), with a margin
        time.sleep(max(0.0, 42 - (time.monotonic() - paused)))
    finally:
        node.signal(signal.SIGCONT)
    follower.wait(ids, 300)
    exactly_once(p, ids)


def test_a_resize_host_on_a_slow_lossy_link(cluster, pipeline):
    """One resize host's link slow and lossy (1 Mbit/s out, 10 % of the packets in and out dropped: tbf and
    iptables' statistic match, this machine's kernel has no netem) while requests run, then healed: slower,
    but every request ends once, complete."""
    hosts, _stack = cluster
    p = pipeline
    made = start_roles(hosts, p, resize=2)
    location, follower = put_source(p), p.follower()
    made["r1"].shape("1mbit", loss=0.1)
    try:
        ids = [p.submit(seed(location), f"lossy-{i}") for i in range(6)]
        time.sleep(20)
    finally:
        made["r1"].shape(None)
    follower.wait(ids, 300)
    exactly_once(p, ids)


def test_a_broker_whose_disk_fills_up(tmp_path, namespace):
    """A cluster of its own whose nodes keep their data on 256 MB disks (tmpfs). The disk of the node
    leading events partition 0 is filled while requests run: Kafka takes the node down (its only log
    folder failed); the disk is freed and the node started again: every request ends once, complete."""
    require_hosts()
    with Hosts() as hosts:
        stack = HostStack(hosts, tmp_path / "disk", brokers=3, disk_mb=256)
        try:
            p = Pipeline(stack.env, namespace, tmp_path / "logs", IMAGEFORK_SESSION_TIMEOUT_S="6")
            try:
                start_roles(hosts, p, resize=2)
                location, follower = put_source(p), p.follower()
                ids = [p.submit(seed(location), f"disk-{i}") for i in range(4)]
                node = stack.leader_of(p.config.topics.events, 0)
                filler = stack.fill_disk(node)
                ids += [p.submit(seed(location), f"disk-late-{i}", timeout_s=120) for i in range(4)]
                down = wait_until(lambda: stack.procs[f"kafka-{node}"].poll() is not None, 90)
                filler.unlink()
                stack.kill_kafka(node)  # when the full disk did not stop it, a restart frees its state
                stack.start_kafka(node)
                follower.wait(ids, 300)
                exactly_once(p, ids)
                assert down, "the node whose disk filled up kept running"
            finally:
                p.stop()
        finally:
            stack.close()


def test_a_harness_killed_is_torn_down_by_the_next():
    """A test run SIGKILLed with its hosts up leaves namespaces, a bridge and cgroups behind: the next
    harness to start removes them (its registry names their owner, who is gone)."""
    require_hosts()
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests.hosts import Hosts; h = Hosts(); "
            "x = h.add('left', cpu=0.2); print(h.bridge, x.netns, x.cgroups[0], flush=True); time.sleep(600)")
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", code, root], stdout=subprocess.PIPE, text=True)
    bridge, netns, cgroup = proc.stdout.readline().split()
    proc.kill()
    proc.wait(10)
    assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    with Hosts():
        pass
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode != 0
    assert not os.path.exists(cgroup)
