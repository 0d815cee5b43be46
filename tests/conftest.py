"""Broker and S3 choice for the integration tests.

Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` if set, else Testcontainers Kafka when a Docker
engine answers, else the project's local stack (Apache Kafka 4 in KRaft mode).
S3: ``S3_ENDPOINT_URL`` (with AWS_* credentials and S3_BUCKET) if set, else the
local stack's S3Proxy. Each test (or module) gets its own namespace: topics and
consumer groups nobody else uses.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
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


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


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


@pytest.fixture(scope="session")
def kafka_container():
    """Testcontainers Kafka when a Docker engine answers (and no broker is given), else None; stopped at
    the end of the session."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or not docker_answers():
        yield None
        return
    from testcontainers.kafka import KafkaContainer
    container = KafkaContainer("apache/kafka:4.1.1").with_kraft()
    try:
        container.start()
        yield container
    finally:
        container.stop()


@pytest.fixture(scope="session")
def stack_env(local_stack, kafka_container) -> dict[str, str]:
    env: dict[str, str] = {}
    stack = None
    have_s3 = bool(os.environ.get("S3_ENDPOINT_URL"))
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        env["KAFKA_BOOTSTRAP_SERVERS"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif kafka_container is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka_container.get_bootstrap_server()
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


def config_for(env: dict[str, str]) -> Config:
    return Config.from_env({**os.environ, **env})
