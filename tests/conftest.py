"""Broker and S3 choice for the integration tests.

Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else the project's local stack (Apache Kafka 4
in KRaft mode). The tests of tests/integration/test_testcontainers.py (the seed end to end,
the dead letters, a SIGKILL) run on Testcontainers Kafka instead: the local image
``imagefork/kafka:<version>`` (``make images``) on the host's network, on loopback, when a
Docker engine answers; they skip, saying why, when none does (they fail instead with
``IMAGEFORK_REQUIRE_DOCKER=1``, as in CI), and their originals then run on the local stack.
S3: ``S3_ENDPOINT_URL`` (with AWS_* credentials and S3_BUCKET) if set, else the
local stack's S3Proxy. Each test (or module) gets its own namespace: topics and
consumer groups nobody else uses. The line ``broker: ...`` after the collection says which
broker the run uses.
"""
from __future__ import annotations

import atexit
import functools
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from streams.config import Config

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """A SIGTERM (a CI time limit, `kill`) ends the run like Ctrl-C: the fixtures' teardown stops the
    brokers, S3 servers and workers the run started, instead of leaving them running."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


@functools.cache
def docker_unavailable() -> str | None:
    """None when Testcontainers can run the local Kafka image here, else why not (one line)."""
    from streams.stack import images
    reason = images.docker_answers()
    if reason is None:
        # built from the sources as they are now, not merely built: a stale image would test old code
        reason = images.not_current(images.KAFKA_IMAGE)
    return reason


def docker_required() -> bool:
    return os.environ.get("IMAGEFORK_REQUIRE_DOCKER", "") not in ("", "0")


def skip_without_docker(what: str) -> None:
    """Skip (or, with IMAGEFORK_REQUIRE_DOCKER=1, fail) the test when Docker cannot run it here."""
    reason = docker_unavailable()
    if reason is None:
        return
    if docker_required():
        pytest.fail(f"{what}: IMAGEFORK_REQUIRE_DOCKER is set but {reason}", pytrace=False)
    pytest.skip(f"{what}: {reason}")


TESTCONTAINERS_MODULE = "test_testcontainers.py"


# The long runs (issue 21, item 6): `make test` leaves them out (`-m "not long"`) so that the suite stays well
# under 20 minutes on 2 cores; `make test-long` runs them, and `.ci/run` too when IMAGEFORK_TEST_LONG=1.
# Each stays a real test of a promise; a shorter sibling of each runs in `make test` (named here).
LONG = {
    "tests/integration/test_faults.py::test_storm_of_sigkills_on_every_role":
        "about 70 s of SIGKILLs on every role; test_sigkill_one_of_two_resize_workers_mid_run and "
        "test_sigkill_join_and_restart_completes_from_the_changelog kill one role each in `make test`",
    "tests/integration/test_offsets.py::test_a_planner_stopped_with_a_slow_request_at_the_head_loses_nothing"
    "[SIGTERM past the grace]":
        "a drain that waits out the whole grace; the SIGKILL variant proves the same hand-back in `make test`",
    "tests/integration/test_offsets.py::test_a_resize_worker_stopped_with_a_big_task_at_the_head_loses_nothing"
    "[SIGTERM within the grace]":
        "a resize drain; the planner's drain (SIGTERM within the grace) and the resize SIGKILL run in `make test`",
    "tests/integration/test_cluster.py::test_a_node_killed_the_next_request_still_ends_exactly_once":
        "a node of the loopback cluster SIGKILLed; test_hosts.py kills nodes of the hosts' cluster in "
        "`make test-long` too, and test_three_broker_cluster runs the cluster without a kill in `make test`",
    "tests/integration/test_join_faults.py::test_a_join_down_across_deadlines_judges_them_after_reading_its_backlog":
        "waits out a 40 s workflow timeout; test_lost_tasks_end_in_timed_out judges deadlines and "
        "test_sigkill_join_and_restart_completes_from_the_changelog restarts the join in `make test`",
    "tests/integration/test_faults.py::test_two_resize_workers_share_the_work":
        "two resize workers and eight requests; test_sigkill_one_of_two_resize_workers_mid_run checks that each "
        "of its two workers made outputs in `make test` (and bench/scale.py measures the sharing)",
    "tests/integration/test_faults.py::test_a_thousand_wide_request_through_the_whole_stack":
        "1,000 outputs through the stack; test_cancel.py's 500-output request and the join's 1,000-wide unit "
        "tests run in `make test`",
    "tests/integration/test_hosts.py::test_a_node_killed_mid_run_and_restarted_later"
    "[the leader of events partition 0]":
        "about 60 s; the hosts' link cut (test_the_seed_across_hosts_with_a_resize_host_cut_past_its_session) "
        "runs in `make test`",
    "tests/integration/test_hosts.py::test_a_node_killed_mid_run_and_restarted_later[the join group's coordinator]":
        "about 60 s; as above",
    "tests/integration/test_hosts.py::test_a_second_join_host_added_mid_run_then_the_first_removed":
        "about 60 s; test_a_join_frozen_past_its_session_is_fenced_and_gives_no_second_final_event hands a join's "
        "partitions and state to a second join in `make test`",
    "tests/integration/test_faults.py::test_a_second_join_takes_over_a_killed_ones_partitions":
        "a join SIGKILLed and a second one taking over (25 s); in `make test` the frozen join's partitions go to a "
        "second join (test_join_faults.py) and test_sigkill_join_and_restart_completes_from_the_changelog restores "
        "a killed join's state",
    "tests/integration/test_faults.py::test_readyz_says_503_and_which_check_failed_while_s3_is_away":
        "S3 cut off until /readyz says so (15 s); test_broker_restart_mid_run checks /readyz's 503 and its named "
        "check (the broker's) in `make test`",
    "tests/integration/test_hosts.py::test_a_resize_host_on_a_slow_lossy_link":
        "20 s of a lossy link; the link cut (test_the_seed_across_hosts_with_a_resize_host_cut_past_its_session) "
        "runs in `make test`",
    "tests/integration/test_hosts.py::test_a_broker_whose_disk_fills_up":
        "a cluster of its own on small disks; test_broker_restart_mid_run stops the broker in `make test`",
    "tests/integration/test_hosts.py::test_a_broker_paused_past_the_request_timeout":
        "a 42 s pause of a broker; test_broker_restart_mid_run stops the broker in `make test`",
    "tests/integration/test_join_faults.py::test_results_back_after_the_marker_horizon_are_late_not_a_second_final_event":
        "waits out a marker's retention (25 s); tests/unit/test_join.py's late results (test_a_result_past_its_deadline_"
        "and_the_grace_never_opens_a_workflow, test_markers_outlive_*) judge the same horizon in `make test`",
    "tests/integration/test_join_faults.py::test_a_final_event_the_topic_always_refuses_ends_failed_final_too_large":
        "aborts until the join gives up (25 s); tests/unit/test_join.py::test_a_degraded_final_event_is_small_"
        "whatever_the_workflow and the frozen join (aborted transactions) run in `make test`",
}


# `make test` runs on two pytest-xdist workers (`-n 2 --dist loadgroup`): a file's tests stay together on one
# worker, so a module's pipeline starts once; the two Docker files share a group (compose publishes fixed ports).
XDIST_GROUPS = {"tests/integration/test_testcontainers.py": "docker",
                "tests/integration/test_docker_compose.py": "docker"}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects and xdist groups: the markers must be on the items by then
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in LONG:
            item.add_marker(pytest.mark.long)
        where = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS.get(where, where)))
    _dedupe_testcontainers(config, items)


def _dedupe_testcontainers(config, items):
    """With Docker, a test that tests/integration/test_testcontainers.py runs on the Testcontainers broker
    does not run a second time on the local stack (without Docker its copy there skips and it does)."""
    on_container = {item.obj for item in items if item.path.name == TESTCONTAINERS_MODULE}
    if not on_container or docker_unavailable() is not None:
        return
    twice = [item for item in items if item.path.name != TESTCONTAINERS_MODULE and item.obj in on_container]
    if twice:
        config.hook.pytest_deselected(items=twice)
        items[:] = [item for item in items if item not in twice]


COMPOSE_MODULE = "test_docker_compose.py"


def pytest_report_collectionfinish(config, start_path, items):
    """Which broker this run's integration tests use (shown with -q too)."""
    return broker_lines([item.nodeid for item in items if item.get_closest_marker("integration")])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """The same lines once under pytest-xdist, whose main process collects nothing itself."""
    config = node.config
    if getattr(config, "_imagefork_broker_said", False):
        return
    config._imagefork_broker_said = True
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for line in broker_lines([i for i in ids if i.startswith("tests/integration/")]) if reporter else ():
        reporter.write_line(line)


def broker_lines(integration: list[str]) -> list[str]:
    """``integration``: the node ids of the run's integration tests."""
    if not integration:
        return []
    from streams.stack import images
    module = [nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid in integration]
    on_container = module.count(TESTCONTAINERS_MODULE)
    on_compose = module.count(COMPOSE_MODULE)
    rest = len(integration) - on_container - on_compose
    reason = docker_unavailable() if on_container or on_compose else None
    outcome = "fail" if docker_required() else "skip"
    lines = []
    if on_container and reason is None:
        lines.append(f"broker: testcontainers {images.KAFKA_IMAGE} ({on_container} tests, {TESTCONTAINERS_MODULE})")
    if rest:
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            lines.append(f"broker: KAFKA_BOOTSTRAP_SERVERS={os.environ['KAFKA_BOOTSTRAP_SERVERS']} ({rest} tests)")
        else:
            lines.append(f"broker: local stack ({rest} tests)")
    if on_compose and reason is None:
        lines.append(f"broker: docker-compose.yml + docker-compose.local.yml ({on_compose} tests, {COMPOSE_MODULE})")
    if (on_container or on_compose) and reason is not None:
        lines.append(f"docker: {reason}: the {on_container + on_compose} Testcontainers and compose "
                     f"tests {outcome}" + (", their originals run on the local stack" if on_container else ""))
    return lines


# The only skips CI accepts (IMAGEFORK_FORBID_SKIPS=1, set by .ci/run): any other skipped test fails the
# run, so a skip cannot hide a break (a listener gone, a library that stopped importing). At most 5.
SKIPS_ALLOWED = {
    "tests/unit/test_wheel.py::": "building and installing the wheel needs a package index; an index outage "
                                  "is not a break of ours",
    "tests/unit/test_urls.py::": "a kernel without the whole 127.0.0.0/8 on loopback cannot bind 127.0.0.2",
}
_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def _skip_allowed(nodeid: str) -> bool:
    return any(nodeid.startswith(prefix) for prefix in SKIPS_ALLOWED)


def skips_forbidden() -> bool:
    return os.environ.get("IMAGEFORK_FORBID_SKIPS", "").strip().lower() not in ("", "0", "false", "no")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    write = terminalreporter.write_line
    write(f"skip allow-list ({len(SKIPS_ALLOWED)}): " + "; ".join(f"{k} {v}" for k, v in SKIPS_ALLOWED.items()))
    bad = [(n, r) for n, r in _skipped if not _skip_allowed(n)]
    write(f"skipped: {len(_skipped)} ({len(_skipped) - len(bad)} on the allow-list)")
    for nodeid, reason in _skipped:
        write(f"  {'allowed' if _skip_allowed(nodeid) else 'NOT ALLOWED'}: {nodeid}: {reason}")
    if bad and skips_forbidden():
        write(f"FAILED: {len(bad)} skipped tests are not on the allow-list (IMAGEFORK_FORBID_SKIPS is set)", red=True)


def pytest_sessionfinish(session, exitstatus):
    if skips_forbidden() and any(not _skip_allowed(n) for n, _r in _skipped) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    from streams.stack.local import LocalStack
    stacks = []

    def start(kafka: bool = True) -> LocalStack:
        stack = LocalStack(tmp_path_factory.mktemp("stack"))
        stacks.append(stack)  # before up(): whatever it started goes down at the end, even if it failed
        # and at exit too, should a SIGTERM or Ctrl-C cut the teardown short (down() twice is harmless)
        atexit.register(stack.down)
        stack.up(kafka=kafka)
        return stack

    yield start
    for stack in stacks:
        stack.down()  # a stack stopped already (say, by its test) stops nothing here


class KafkaOnDocker:
    """Testcontainers Kafka: the local image, KRaft, one node, on the host's network listening on loopback
    only (free ports), configured as the local stack's broker."""

    def __init__(self):
        from streams.stack import images
        from streams.stack.local import free_port
        # Ryuk, Testcontainers' reaper, is an image we cannot pull: the fixture and atexit stop the container
        os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
        from testcontainers.core.container import DockerContainer
        self.image = images.KAFKA_IMAGE
        port, controller = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{port}"
        self.container = DockerContainer(self.image).with_kwargs(network_mode="host").with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS=f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://127.0.0.1:{port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_CONTROLLER_QUORUM_VOTERS=f"1@127.0.0.1:{controller}",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            KAFKA_NUM_PARTITIONS="6",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="6",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS="6",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_AUTO_CREATE_TOPICS_ENABLE="true",
        )
        self.started = False

    def start(self, timeout: float = 120.0) -> None:
        from confluent_kafka.admin import AdminClient
        self.started = True
        self.container.start()
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.container.reload()
            if self.container.status == "exited":
                raise RuntimeError(f"{self.image} exited at start: {self.logs()[-1500:]}")
            try:
                admin.list_topics(timeout=2)
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(f"{self.image} did not answer on {self.bootstrap} within {timeout:.0f}s: {self.logs()[-1500:]}")

    def logs(self) -> str:
        out, err = self.container.get_logs()
        return (out + err).decode(errors="replace")

    def stop(self) -> None:
        if self.started:
            self.started = False
            self.container.stop()


@pytest.fixture(scope="module")
def kafka_container():
    """Testcontainers Kafka (see KafkaOnDocker), stopped at the end of the module that uses it; the test
    skips, saying why, when Docker cannot run it here."""
    skip_without_docker("Testcontainers Kafka")
    kafka = KafkaOnDocker()
    atexit.register(kafka.stop)  # should a SIGTERM or Ctrl-C cut the teardown short
    try:
        kafka.start()
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def stack_env(local_stack) -> dict[str, str]:
    env: dict[str, str] = {}
    stack = None
    have_s3 = bool(os.environ.get("S3_ENDPOINT_URL"))
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        env["KAFKA_BOOTSTRAP_SERVERS"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    else:
        stack = local_stack(kafka=True)
        env.update(stack.env())
    if have_s3:
        for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "S3_BUCKET"):
            if os.environ.get(k):
                env[k] = os.environ[k]
    elif stack is None:
        s3_env = local_stack(kafka=False).env()
        env.update({k: v for k, v in s3_env.items() if k != "KAFKA_BOOTSTRAP_SERVERS"})
    else:
        env.update({k: v for k, v in stack.env().items() if k != "KAFKA_BOOTSTRAP_SERVERS"})
    return env


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}."


def drop_schema_resolver() -> None:
    """Close and forget the process-wide schema resolver a client of this process installed: after a test
    whose broker goes away (a container's), none keeps reading that broker's schemas topic."""
    from streams import serde
    resolver = serde.registry().resolver
    if resolver is not None:
        serde.set_resolver(None)
        close = getattr(resolver, "close", None)
        if close:
            close()


def config_for(env: dict[str, str]) -> Config:
    return Config.from_env({**os.environ, **env})
