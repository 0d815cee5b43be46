"""Kafka admin (explicit topic creation) and client settings, with confluent-kafka."""
from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streams.config import Config


# the largest record the join writes (a wide final event); its topics accept it
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class KafkaUnavailable(RuntimeError):
    pass


def security_config(config: Config) -> dict:
    """The connection settings every confluent-kafka client of the project uses."""
    sec = config.kafka_security
    out: dict = {"security.protocol": sec.protocol}
    if sec.sasl:
        out.update({"sasl.mechanisms": sec.sasl_mechanism, "sasl.username": sec.sasl_username,
                    "sasl.password": sec.sasl_password})
    if sec.ssl_cafile:
        out["ssl.ca.location"] = sec.ssl_cafile
    if sec.ssl_certfile:
        out.update({"ssl.certificate.location": sec.ssl_certfile, "ssl.key.location": sec.ssl_keyfile})
    return out


def faust_credentials(config: Config):
    """The same settings for Faust (aiokafka): None, or a faust Credentials object."""
    import ssl

    import faust
    sec = config.kafka_security
    context = None
    if sec.ssl:
        context = ssl.create_default_context(cafile=sec.ssl_cafile or None)
        if sec.ssl_certfile:
            context.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile)
    if sec.sasl:
        return faust.SASLCredentials(username=sec.sasl_username, password=sec.sasl_password,
                                     mechanism=sec.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def client_config(config: Config, **extra) -> dict:
    return {"bootstrap.servers": config.bootstrap_servers, **security_config(config), **extra}


def producer_config(config: Config, **extra) -> dict:
    # murmur2_random is the Java client's (and Faust's) partitioner: a key lands
    # on the same partition whoever produces it.
    return client_config(config, **{"partitioner": "murmur2_random", "enable.idempotence": True,
                                    "linger.ms": 5, **extra})


def topic_specs(config: Config) -> dict[str, dict]:
    """Every topic with its settings; all have ``config.partitions`` partitions (the join's state
    topic must match the events topic partition for partition)."""
    t = config.topics
    day = str(24 * 3600 * 1000)
    week = str(7 * 24 * 3600 * 1000)
    return {
        t.requests: {"retention.ms": week},
        t.request_retries: {"retention.ms": day},
        t.tasks: {"retention.ms": day},
        t.retries: {"retention.ms": day},
        t.events: {"retention.ms": day},
        t.completed: {"retention.ms": week, "max.message.bytes": str(MAX_MESSAGE_BYTES)},
        t.dead_letter: {"retention.ms": str(30 * 24 * 3600 * 1000)},
        # resize's crash ledger: one row per task in flight, a tombstone when it ends
        t.task_attempts: {"cleanup.policy": "compact", "segment.ms": str(10 * 60 * 1000),
                          "min.cleanable.dirty.ratio": "0.2", "delete.retention.ms": str(3600 * 1000)},
        # every schema version any writer used, keyed by fingerprint; kept for good
        t.schemas: {"cleanup.policy": "compact"},
        # the join's state: compacted, and compacted soon (small segments, low dirty ratio), so a
        # restart replays little more than the live rows; tombstones stay an hour (a restore takes seconds)
        t.join_state: {"cleanup.policy": "compact", "segment.ms": str(10 * 60 * 1000),
                       "segment.bytes": str(16 * 1024 * 1024), "min.cleanable.dirty.ratio": "0.2",
                       "delete.retention.ms": str(3600 * 1000), "max.message.bytes": str(MAX_MESSAGE_BYTES)},
    }


def ensure_topics(config: Config, timeout: float = 30.0) -> list[str]:
    """Create missing topics with the configured partitions and replication; return those created."""
    admin = AdminClient(client_config(config))
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise KafkaUnavailable(f"Kafka at {config.bootstrap_servers} does not answer: {exc}") from None
    wanted = topic_specs(config)
    new = [NewTopic(name, config.partitions, config.replication_factor, config=cfg)
           for name, cfg in wanted.items() if name not in existing]
    created = []
    if new:
        for name, future in admin.create_topics(new, request_timeout=timeout).items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: another worker won the race
                    raise
    # Partitions are never grown here: the events topic must keep the partition
    # count of the join table's changelog (co-partitioning). See the README.
    return created
