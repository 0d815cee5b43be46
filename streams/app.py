"""The Faust apps, one per role, each its own consumer group, and nothing else."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import faust

from streams.adapters.kafka import faust_credentials
from streams.config import Config

ROLES = ("planner", "resize")  # the Faust roles; the join is a confluent-kafka loop (agents/join.py)


@dataclass(frozen=True)
class Topics:
    requests: faust.TopicT
    request_retries: faust.TopicT
    tasks: faust.TopicT
    retries: faust.TopicT
    events: faust.TopicT
    completed: faust.TopicT
    dead_letter: faust.TopicT
    task_attempts: faust.TopicT


def create_app(role: str, config: Config) -> faust.App:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    return faust.App(
        config.group_id(role),
        broker=[f"kafka://{server.strip()}" for server in config.bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(config),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=tempfile.mkdtemp(prefix=f"imagefork-{role}-"),
        store="memory://",
        topic_partitions=config.partitions,
        topic_replication_factor=config.replication_factor,
        # planner and resize are at-least-once (idempotent outputs); the join is transactional on its own
        # (agents/join.py); see the README ("Delivery guarantees")
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        # a killed worker's partitions move to the others after this long
        broker_session_timeout=config.session_timeout_s,
        broker_heartbeat_interval=max(0.5, config.session_timeout_s / 5),
        stream_wait_empty=False,
        table_standby_replicas=0,
        table_cleanup_interval=3600.0,
    )


def declare_topics(app: faust.App, config: Config) -> Topics:
    t = config.topics

    def topic(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, partitions=config.partitions,
                         replicas=config.replication_factor)

    return Topics(
        requests=topic(t.requests),
        request_retries=topic(t.request_retries),
        tasks=topic(t.tasks),
        retries=topic(t.retries),
        events=topic(t.events),
        completed=topic(t.completed),
        dead_letter=topic(t.dead_letter),
        task_attempts=topic(t.task_attempts),
    )
