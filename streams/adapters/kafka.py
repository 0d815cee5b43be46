"""Kafka admin (explicit topic creation) and client settings, with confluent-kafka."""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.config import Config
from streams.errors import ImageforkError


# the largest record the join writes (a wide final event); its topics accept it
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class KafkaUnavailable(ImageforkError, RuntimeError):
    pass


def dead_letter_headers(code: str, reason: str, where: dict[str, str]) -> dict[str, bytes]:
    """The headers of a dead-lettered message: why, and where it came from."""
    return {"imagefork.error.code": code.encode(), "imagefork.error.reason": reason[:1000].encode(),
            **{f"imagefork.source.{k}": str(v).encode() for k, v in where.items()}}


# what a partition's leader answers while it moves (a topic just created, a leader election, a broker
# restarting): asked again, the next answer is the real one
LEADER_MOVING = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                           KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.FENCED_LEADER_EPOCH,
                           KafkaError.UNKNOWN_LEADER_EPOCH, KafkaError.OFFSET_NOT_AVAILABLE,
                           KafkaError.REPLICA_NOT_AVAILABLE, KafkaError._TRANSPORT})


def watermarks(consumer, tp: TopicPartition, timeout: float = 30.0) -> tuple[int, int]:
    """``consumer.get_watermark_offsets(tp)``, asked again while the partition's leader is moving
    (``LEADER_MOVING``), for up to ``timeout`` seconds in all; any other error, or one that lasts, raises."""
    give_up, delay = time.monotonic() + timeout, 0.05
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=max(0.1, give_up - time.monotonic()))
        except KafkaException as exc:
            err = exc.args[0]
            if not isinstance(err, KafkaError) or err.code() not in LEADER_MOVING \
                    or time.monotonic() + delay > give_up:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def read_to_end(config: Config, topic: str, timeout: float = 60.0) -> list:
    """Every committed record of ``topic`` up to its end offsets, taken first (read_committed: the last
    stable offset). No group is joined and no time window is guessed: a partition is done when its
    position reaches its end (commit markers take offsets no record is returned for). Raises
    TimeoutError rather than return a list that may be short."""
    return list(committed_records(config, topic, timeout=timeout))


def committed_records(config: Config, topic: str, *, follow: bool = False, timeout: float = 60.0,
                      partitions: list[int] | None = None, on_end: Callable[[], None] | None = None,
                      stop: Callable[[], bool] = lambda: False):
    """``read_to_end`` one record at a time (of ``partitions``, else all); with ``follow``, then every record
    committed after, for as long as the caller reads (a generator: close it, or stop iterating, to close the
    consumer). ``on_end`` is called once the end offsets taken at the start are reached; ``stop`` is asked
    between polls (True: the generator ends). The one reader of a topic to its end in the project (the CLI,
    the client, dead letters, the crash ledger, the API's index)."""
    consumer = Consumer(client_config(config, **{
        "group.id": f"imagefork-reader-{uuid.uuid4()}",  # required by the client; never joined (assign)
        "enable.auto.commit": False, "isolation.level": "read_committed"}))
    try:
        meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if meta is None or meta.error is not None:
            raise KafkaUnavailable(f"topic {topic} is not there at {config.bootstrap_servers}")
        chosen = list(meta.partitions) if partitions is None else [p for p in partitions if p in meta.partitions]
        ends = {}
        for p in chosen:
            low, high = watermarks(consumer, TopicPartition(topic, p))
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in (chosen if follow else ends)])
        pending, deadline = dict(ends), time.monotonic() + timeout
        while pending:
            if stop():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: partitions {sorted(pending)} not read to their end within {timeout:.0f}s")
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                if msg.offset() < ends.get(msg.partition(), 0):
                    yield msg
                elif follow:
                    yield msg  # a record committed since the start: the follow part, already
            for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
                if tp.offset >= ends[tp.partition]:
                    del pending[tp.partition]
        if on_end is not None:
            on_end()
        while follow and not stop():
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                yield msg
    finally:
        consumer.close()


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


# librdkafka's own lines (every failed reconnect, at error level) go to this logger, not straight to
# stderr: a worker's log shows them; a command-line user gets one line about what went wrong instead
KAFKA_LOG = logging.getLogger("imagefork.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())


def client_config(config: Config, **extra) -> dict:
    return {"bootstrap.servers": config.bootstrap_servers, "logger": KAFKA_LOG, **security_config(config), **extra}


def group_timing(config: Config) -> dict:
    """A group member's session and heartbeat. A member learns of a rebalance (another member left or joined)
    from its next heartbeat's answer: at a third of a 15 s session, a deploy's rebalance waited up to 3 s
    for it (bench/roll.py: the slowest requests of a resize restart); one heartbeat a second at most."""
    session_ms = int(config.session_timeout_s * 1000)
    return {"session.timeout.ms": session_ms, "heartbeat.interval.ms": max(250, min(1000, session_ms // 5))}


def producer_config(config: Config, **extra) -> dict:
    # murmur2_random is the Java client's partitioner: a key lands on the same partition whoever produces it
    # idempotence (which implies acks=all, said here too): a retried batch is written once
    return client_config(config, **{"partitioner": "murmur2_random", "enable.idempotence": True, "acks": "all",
                                    "linger.ms": 5, **extra})


# the replication factor ensure_topics chose, per bootstrap address
_REPLICATION: dict[str, int] = {}


def replication_for(config: Config, brokers: int) -> int:
    """The replication factor of the project's topics on a cluster of ``brokers`` brokers:
    IMAGEFORK_REPLICATION_FACTOR when it is set above 1, otherwise min(3, brokers) (1 on a single
    broker, as always; 3 on the ``stack up --brokers 3`` cluster)."""
    if config.replication_factor > 1:
        return config.replication_factor
    return max(1, min(3, brokers))


def replication_factor(config: Config) -> int:
    """The replication factor ensure_topics chose in this process, else the configured one."""
    return _REPLICATION.get(config.bootstrap_servers, config.replication_factor)


def topic_config(cfg: dict, replication: int) -> dict:
    """A topic's settings with ``min.insync.replicas=2`` once it has 3 replicas or more (acks=all
    then needs two copies: one broker lost loses no acknowledged record, and writes go on)."""
    return {**cfg, "min.insync.replicas": "2"} if replication >= 3 else dict(cfg)


def topic_specs(config: Config) -> dict[str, dict]:
    """Every topic with its settings; all have ``config.partitions`` partitions (the join's state
    topic must match the events topic partition for partition)."""
    t = config.topics
    day = str(24 * 3600 * 1000)
    week = str(7 * 24 * 3600 * 1000)
    mirror = {config.completed_json_topic: {"retention.ms": week, "max.message.bytes": str(MAX_MESSAGE_BYTES)}} \
        if config.completed_json_topic else {}
    return {
        **mirror,
        t.requests: {"retention.ms": week},
        t.requests_batch: {"retention.ms": week},
        t.request_retries: {"retention.ms": day},
        t.tasks: {"retention.ms": day},
        t.tasks_batch: {"retention.ms": week},  # a backfill may take days to drain
        t.retries: {"retention.ms": day},
        t.events: {"retention.ms": day},
        t.completed: {"retention.ms": week, "max.message.bytes": str(MAX_MESSAGE_BYTES)},
        t.notices: {"retention.ms": day},
        t.dead_letter: {"retention.ms": str(30 * 24 * 3600 * 1000), "max.message.bytes": str(MAX_MESSAGE_BYTES + 65536)},
        # resize's crash ledger: a row per source and partition while its tasks run, a tombstone after
        t.task_attempts: {"cleanup.policy": "compact", "segment.ms": str(10 * 60 * 1000),
                          "min.cleanable.dirty.ratio": "0.2", "delete.retention.ms": str(3600 * 1000)},
        t.task_attempts_batch: {"cleanup.policy": "compact", "segment.ms": str(10 * 60 * 1000),
                          "min.cleanable.dirty.ratio": "0.2", "delete.retention.ms": str(3600 * 1000)},
        # every schema version any writer used, keyed by fingerprint; kept for good
        t.schemas: {"cleanup.policy": "compact"},
        # the final events of the workflows whose source is known, keyed {sha256}/{workflowId}: what the API's
        # /v1/sources and /v1/similar answer from; one record per source and workflow, kept for good
        t.sources: {"cleanup.policy": "compact", "max.message.bytes": str(MAX_MESSAGE_BYTES)},
        # each run's webhook delivery state, by workflow id (the API shows it), and final events sent to the
        # webhook role again (`imagefork dlq replay --to origin` of a webhook's dead letter)
        t.webhooks: {"cleanup.policy": "compact", "segment.ms": str(3600 * 1000), "min.cleanable.dirty.ratio": "0.2"},
        t.webhook_redeliver: {"retention.ms": week, "max.message.bytes": str(MAX_MESSAGE_BYTES)},
        # the named presets, by name: every planner and API reads the whole topic, kept for good
        t.presets: {"cleanup.policy": "compact"},
        # cancels by workflow id: clients write them, the join writes them back applied; resize workers read
        # the whole topic at start, so it keeps one record per id for about as long as a finished marker
        t.cancellations: {"cleanup.policy": "compact,delete",
                          "retention.ms": str(max(int(config.finished_retention_s * 1000), 24 * 3600 * 1000)),
                          "segment.ms": str(3600 * 1000), "min.cleanable.dirty.ratio": "0.2"},
        # the join's state: compacted, and compacted soon (small segments, low dirty ratio), so a
        # restart replays little more than the live rows; tombstones stay an hour (a restore takes seconds)
        t.join_state: {"cleanup.policy": "compact", "segment.ms": str(10 * 60 * 1000),
                       "segment.bytes": str(16 * 1024 * 1024), "min.cleanable.dirty.ratio": "0.2",
                       "delete.retention.ms": str(3600 * 1000), "max.message.bytes": str(MAX_MESSAGE_BYTES)},
    }


def ensure_topics(config: Config, timeout: float = 30.0) -> list[str]:
    """Create missing topics with the configured partitions and replication; return those created.

    The first Kafka call of every worker, so it says in one line what is wrong: credentials the
    broker refuses (or a SASL handshake it rejects) end it at once with ``KafkaUnavailable``; a
    broker that does not answer ends it after ``timeout`` seconds, saying where it looked."""
    import re

    servers = config.bootstrap_servers
    sec = config.kafka_security
    errors: list[KafkaError] = []
    last_log: list[str] = []

    class _Log:
        """librdkafka's lines go to DEBUG (they repeat every reconnect); the last failure is kept for
        the message."""
        def log(self, level, fmt, *args):
            line = fmt % args if args else fmt
            if " FAIL " in f" {line} " or line.startswith("FAIL"):
                last_log[:] = [line.split("]: ", 1)[-1]]
            logging.getLogger("imagefork.kafka").debug("librdkafka: %s", line)

    def clean(text: str) -> str:
        # "sasl_plaintext://127.0.0.1:9093/bootstrap: <what> (after 305ms in state AUTH_REQ)" -> "<what>"
        text = re.sub(r"^\S+/(bootstrap|\d+): ", "", text.strip())
        return re.sub(r" \(after \d+ms in state \w+\)$", "", text)

    auth_codes = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
                  KafkaError.ILLEGAL_SASL_STATE, KafkaError.UNSUPPORTED_SASL_MECHANISM}
    transient = {KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._RESOLVE, KafkaError._ALL_BROKERS_DOWN}

    def refused() -> KafkaUnavailable | None:
        for err in errors:
            reason = clean(err.str())
            if err.code() in auth_codes or ("SASL" in reason and err.code() not in transient):
                if re.search(r"supported mechanisms:\s*$", reason):  # a listener without SASL answered
                    return KafkaUnavailable(f"Kafka at {servers} offers no SASL mechanism there, so it cannot "
                                            f"check the credentials of {sec.sasl_username} ({sec.sasl_mechanism}): "
                                            f"{reason.rstrip()} (none; a listener for another security protocol?)")
                who = sec.sasl_username or "(no user)"
                return KafkaUnavailable(f"Kafka at {servers} refused the credentials of {who} "
                                        f"({sec.sasl_mechanism or sec.protocol}): {reason}")
            if err.code() == KafkaError._SSL:
                if "certificate verify failed" in reason:
                    # librdkafka's advice names its own setting (ssl.ca.location): name ours instead
                    reason = re.sub(r",? verify that ssl\.ca\.location .*$", "", reason)
                    trusted = f"KAFKA_SSL_CAFILE={sec.ssl_cafile}" if sec.ssl_cafile else \
                        "the system's CA certificates (KAFKA_SSL_CAFILE is not set)"
                    return KafkaUnavailable(f"Kafka at {servers}: the TLS handshake failed ({sec.protocol}): the "
                                            f"broker's certificate is not signed by a CA in {trusted}, or not "
                                            f"issued for that host: {reason}")
                return KafkaUnavailable(f"Kafka at {servers}: the TLS handshake failed ({sec.protocol}): {reason}")
        return None

    def unusable(exc: KafkaException) -> KafkaUnavailable:
        """The client refuses its own settings (a TLS file it cannot read): which setting, which file."""
        import os
        for name, path in (("KAFKA_SSL_CAFILE", sec.ssl_cafile), ("KAFKA_SSL_CERTFILE", sec.ssl_certfile),
                           ("KAFKA_SSL_KEYFILE", sec.ssl_keyfile)):
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                return KafkaUnavailable(f"Kafka at {servers}: {name}={path} is not a file this process can read "
                                        f"({sec.protocol})")
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        return KafkaUnavailable(f"Kafka at {servers}: the client cannot use its settings ({sec.protocol}): "
                                f"{err.str() if err else exc}")

    def unreachable(last: str) -> KafkaUnavailable:
        reasons = [clean(e.str()) for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
        reason = reasons[-1] if reasons else clean(last_log[-1]) if last_log else last
        hint = ""
        if "closed by peer" in reason or "Disconnected" in reason:
            hint = f" (is it a listener for another security protocol than {sec.protocol}?)"
        return KafkaUnavailable(f"Kafka at {servers} is not reachable (no answer within {timeout:.0f}s, "
                                f"{sec.protocol}): {reason}{hint}")

    try:
        admin = AdminClient(client_config(config, error_cb=errors.append, logger=_Log()))
    except KafkaException as exc:
        raise unusable(exc) from None
    deadline = time.monotonic() + timeout
    step = 1.0
    while True:
        # list_topics blocks for its whole timeout when the broker refuses us, and errors reach
        # error_cb only through poll(): ask in short steps and look at the errors in between
        try:
            meta = admin.list_topics(timeout=max(0.1, min(step, deadline - time.monotonic())))
            existing = meta.topics
            break
        except KafkaException as exc:
            last = exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else str(exc)
        admin.poll(0.1)
        failure = refused()
        if failure:
            raise failure
        if time.monotonic() >= deadline:
            raise unreachable(last)
        step = min(step * 2, 5.0)
    wanted = topic_specs(config)
    replication = replication_for(config, len(meta.brokers))
    _REPLICATION[config.bootstrap_servers] = replication
    new = [NewTopic(name, config.partitions, replication, config=topic_config(cfg, replication))
           for name, cfg in wanted.items() if name not in existing]
    created = []
    if new:
        for name, future in admin.create_topics(new, request_timeout=timeout).items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:  # another worker won the race
                    continue
                if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
                    raise KafkaUnavailable(f"Kafka at {servers} does not let {sec.sasl_username or 'this client'} "
                                           f"create topic {name}: {err.str()}") from None
                raise
    # the controller has the topics; the brokers learn of them a moment later: return once the metadata
    # shows every partition of them led (a read or a write right after then finds them)
    while created and time.monotonic() < deadline:
        try:
            shown = admin.list_topics(timeout=max(0.1, min(2.0, deadline - time.monotonic()))).topics
        except KafkaException:
            shown = {}
        if all(name in shown and shown[name].error is None and shown[name].partitions
               and all(p.leader >= 0 and p.error is None for p in shown[name].partitions.values())
               for name in created):
            break
        time.sleep(0.05)
    # Partitions are never grown here: the events topic must keep the partition
    # count of the join table's changelog (co-partitioning): docs/operations.md.
    return created


def partition_for(key: bytes, partitions: int) -> int:
    """The partition a keyed record goes to with the Java client's default partitioner, which every producer
    of ours uses (librdkafka's ``murmur2_random``): murmur2 of the key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as an unsigned 32-bit value;
    its test vectors (Kafka's own, from its UtilsTest) are in tests/unit/test_cluster_config.py."""
    m, mask, length = 0x5BD1E995, 0xFFFFFFFF, len(data)
    h = 0x9747B28C ^ length
    for i in range(0, length - length % 4, 4):
        k = (int.from_bytes(data[i:i + 4], "little") * m) & mask
        k = ((k ^ (k >> 24)) * m) & mask
        h = ((h * m) & mask) ^ k
    tail = length % 4
    if tail:
        h ^= int.from_bytes(data[length - tail:], "little")
        h = (h * m) & mask
    h = ((h ^ (h >> 13)) * m) & mask
    return h ^ (h >> 15)


def describe_assignment(partitions) -> str:
    """``12 partitions assigned: imagefork.requests 6 + imagefork.requests.retry 6``:
    the count per topic, so a total above IMAGEFORK_PARTITIONS is no mystery."""
    per_topic: dict[str, int] = {}
    for tp in partitions:
        per_topic[tp.topic] = per_topic.get(tp.topic, 0) + 1
    topics = sorted(per_topic, key=lambda t: ("__" in t, t))  # internal topics last
    listed = " + ".join(f"{t} {per_topic[t]}" for t in topics)
    total = sum(per_topic.values())
    return f"{total} partition{'s' if total != 1 else ''} assigned" + (f": {listed}" if listed else "")


@dataclass(frozen=True)
class Topics:
    """The topics the planner and resize agents send to and read from (adapters/agent_loop.KafkaTopic: or a
    test's fakes)."""
    requests: object
    requests_batch: object
    request_retries: object
    tasks: object
    tasks_batch: object
    retries: object
    events: object
    completed: object
    dead_letter: object
    task_attempts: object
    task_attempts_batch: object


def topics_of(config: Config, make) -> Topics:
    """Every field of :class:`Topics` as ``make(its configured name)``."""
    names = config.topics
    return Topics(**{f.name: make(getattr(names, f.name)) for f in dataclasses.fields(Topics)})
