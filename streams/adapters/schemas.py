"""The schemas topic: how a reader finds the schema of a writer newer than itself.

Every process that writes publishes its current schemas at start, before it writes any record
(key: the fingerprint in hex; value: the self-contained schema JSON). The topic is compacted, so it
keeps one entry per version ever used however often processes restart. A reader that meets a
fingerprint none of its files has reads the topic to its end and decodes with what it finds
(``serde`` resolves the writer's schema to its own). That is the new-writer/old-reader half of a
rolling deploy; the other half (old records, new reader) needs only ``schemas/history/``.
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streams import serde
from streams.adapters.kafka import client_config, producer_config, watermarks
from streams.config import Config
from streams.errors import ImageforkError

log = logging.getLogger("imagefork.schemas")


class SchemaTopicError(ImageforkError, RuntimeError):
    """The schemas topic could not be written; a writer must not start (its readers could not
    decode what it writes)."""


def publish_schemas(config: Config, timeout_s: float = 30.0) -> int:
    """Write every current schema to the schemas topic and wait until the broker has them all;
    return how many. Raise ``SchemaTopicError`` naming the first failure."""
    topic = config.topics.schemas
    schemas = serde.current_schemas()
    failures: list[str] = []

    def delivered(err, msg) -> None:
        if err is not None:
            failures.append(f"{msg.key().decode()}: {err.str()}")

    producer = Producer(producer_config(config, **{"message.timeout.ms": int(timeout_s * 1000)}))
    try:
        for fp, text in schemas.items():
            producer.produce(topic, key=fp.hex().encode(), value=text.encode(), on_delivery=delivered)
    except (KafkaException, BufferError) as exc:
        raise SchemaTopicError(f"cannot publish the schemas to {topic}: {exc}") from None
    left = producer.flush(timeout_s + 5)
    if failures or left:
        first = failures[0] if failures else f"{left} not acknowledged within {timeout_s:.0f}s"
        raise SchemaTopicError(f"cannot publish the schemas to {topic} at {config.bootstrap_servers}: "
                               f"{len(failures) or left} of {len(schemas)} failed ({first})")
    return len(schemas)


class SchemaTopicResolver:
    """A ``serde`` resolver over the schemas topic: on a fingerprint it does not hold, it reads the
    topic to its end and keeps every schema it read.

    Its consumer is made on the first unknown fingerprint and kept: assigned to every partition
    from the beginning (no group, no commits), it keeps fetching in the background, so later
    lookups first take what has already arrived, without asking the broker. Asking the broker
    where the topic ends happens at most once per ``min_interval_s``, so records with made-up
    fingerprints cannot hammer it; within that interval a schema published after the last read is
    found only if the background fetch has brought it already.
    """

    def __init__(self, config: Config, min_interval_s: float = 3.0, timeout_s: float = 10.0):
        self.topic = config.topics.schemas
        self.settings = client_config(config, **{"group.id": config.group_id("schema-reader"),
                                                 "enable.auto.commit": False, "enable.partition.eof": True})
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.schemas: dict[bytes, str] = {}
        self._next: dict[int, int] = {}  # partition -> the offset after the last record read
        self._consumer: Consumer | None = None
        self.read_at = -float("inf")  # time.monotonic() of the last read to the end
        self._lock = threading.Lock()

    def __call__(self, fp: bytes) -> str | None:
        with self._lock:
            if fp not in self.schemas:
                try:
                    if time.monotonic() - self.read_at >= self.min_interval_s:
                        self._read_to_end()
                    elif self._consumer is not None:
                        self._take(self._consumer.consume(10_000, timeout=0))
                except (KafkaException, TimeoutError) as exc:
                    log.warning("schemas topic %s not read: %s", self.topic, exc)
            return self.schemas.get(fp)

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None

    def _read_to_end(self) -> None:
        try:
            if self._consumer is None:
                self._consumer = self._assigned()
            ends = {p: watermarks(self._consumer, TopicPartition(self.topic, p), self.timeout_s)[1]
                    for p in self._next}
            give_up = time.monotonic() + self.timeout_s
            while any(self._next[p] < end for p, end in ends.items()):
                if time.monotonic() > give_up:
                    raise TimeoutError(f"not at its end within {self.timeout_s:.0f}s")
                self._take(self._consumer.consume(10_000, timeout=0.1))
        finally:
            # the interval counts from the end of a read: a slow read (a loaded broker) is not followed at
            # once by another for every unknown fingerprint (a test hung 300 s in such a chain)
            self.read_at = time.monotonic()

    def _assigned(self) -> Consumer:
        consumer = Consumer(self.settings)
        try:
            topic = consumer.list_topics(self.topic, timeout=self.timeout_s).topics[self.topic]
            if topic.error is not None:
                raise KafkaException(topic.error)
            self._next = {p: 0 for p in topic.partitions}
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in self._next])
        except KafkaException:
            consumer.close()
            raise
        return consumer

    def _take(self, messages) -> None:
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:  # the end, even if its last offsets hold no record
                    self._next[msg.partition()] = max(self._next[msg.partition()], msg.offset())
                else:
                    log.warning("schemas topic %s: %s", self.topic, err.str())
                continue
            self._next[msg.partition()] = msg.offset() + 1
            try:
                fp = bytes.fromhex(msg.key().decode())
                self.schemas[fp] = msg.value().decode()
            except (AttributeError, ValueError):  # no key, a key that is not hex, a tombstone, not UTF-8
                log.warning("schemas topic %s: skipped the entry at %s/%s", self.topic, msg.partition(), msg.offset())


def install_resolver(config: Config, min_interval_s: float = 3.0) -> SchemaTopicResolver:
    """Let ``serde.decode`` find writer schemas on the schemas topic; return the resolver (close it
    at shutdown)."""
    current = serde.registry().resolver
    if isinstance(current, SchemaTopicResolver) and current.settings == SchemaTopicResolver(
            config, min_interval_s).settings and current.topic == config.topics.schemas:
        return current  # the same cluster and topic: keep the one already reading it
    resolver = SchemaTopicResolver(config, min_interval_s)
    serde.set_resolver(resolver)
    return resolver
