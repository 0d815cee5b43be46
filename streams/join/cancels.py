"""Cancels into the join: a thread of the join process that reads the cancellations topic (where the API,
``imagefork cancel`` and any Kafka client write them) and puts each on the events topic, keyed by its
workflow id, so the join takes it in order with that workflow's plan and results, in its transactions.

At least once (a cancel forwarded twice changes nothing the second time); a cancel the join wrote back
(``applied``) is not forwarded; one that is not a cancel is dead-lettered with the reason."""
from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from streams import serde
from streams.adapters.kafka import client_config, dead_letter_headers, group_timing, producer_config
from streams.config import Config
from streams.core.cancels import decode_cancellation
from streams.metrics import DEAD_LETTERS

log = logging.getLogger("imagefork")


class CancelForwarder:
    def __init__(self, config: Config):
        self.config = config
        self.topics = config.topics
        self.consumer = Consumer(client_config(config, **{
            "group.id": config.group_id("join-cancels"), "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": "read_committed", **group_timing(config)}))
        self.producer = Producer(producer_config(config, **{"linger.ms": 0}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancels", daemon=True)
        self.forwarded = 0

    def start(self) -> CancelForwarder:
        self.consumer.subscribe([self.topics.cancellations])
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.debug("join: closing the cancels consumer: %s", exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = []
            try:
                batch = [m for m in self.consumer.consume(500, 0.5) if m.error() is None]
                if not batch:
                    continue
                failed: list[str] = []
                for msg in batch:
                    self._forward(msg, failed)
                left = self.producer.flush(30)
                if left or failed:
                    raise KafkaException(f"{left} record(s) not confirmed, {len(failed)} refused"
                                         f"{': ' + failed[0] if failed else ''}")
                self.consumer.commit(asynchronous=False)
            except Exception as exc:  # not committed: the batch is read again once the broker answers
                log.warning("join: forwarding cancels: %s: %s", type(exc).__name__, exc)
                self._rewind(batch)
                self._stop.wait(1.0)

    def _rewind(self, batch: list) -> None:
        """Back to the first record of ``batch`` on each partition (what is committed may be nothing yet)."""
        first: dict[tuple[str, int], int] = {}
        for msg in batch:
            first.setdefault((msg.topic(), msg.partition()), msg.offset())
        for (topic, p), offset in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, p, offset))
            except (KafkaException, RuntimeError) as exc:  # not assigned any more: its new owner reads it
                log.debug("join: rewinding %s[%d]: %s", topic, p, exc)

    def _forward(self, msg, failed: list[str]) -> None:
        """One record: forwarded, skipped (the join's own), or dead-lettered with the reason; never raises
        for what the record holds."""
        def delivered(err, _msg):
            if err is not None:
                failed.append(str(err))
        if msg.value() is None:
            return  # a tombstone: compaction's, not a cancel
        try:
            cancel = decode_cancellation(msg.key(), msg.value())
            if cancel.applied and cancel.by == "join":
                return  # the join's own record: the run is over already
            value = serde.encode_join_event("Cancellation", cancel.to_dict())
        except Exception as exc:  # RequestInvalid, SerdeError, or what a hostile value makes of the encoder
            return self._dead_letter(msg, f"{type(exc).__name__}: {exc}"[:1000], delivered)
        self.producer.produce(self.topics.events, key=cancel.workflowId.encode(), value=value, on_delivery=delivered)
        self.forwarded += 1
        log.info("join: cancel of %s%s forwarded (by %s)", cancel.workflowId,
                 f" run {cancel.runId}" if cancel.runId else "", cancel.by or "a Kafka client")

    def _dead_letter(self, msg, reason: str, delivered) -> None:
        where = {"topic": msg.topic(), "partition": str(msg.partition()), "offset": str(msg.offset())}
        log.warning("join: dead-lettered %s: not a cancel: %s", where, reason)
        headers = [*(msg.headers() or [])[:50], *dead_letter_headers("NOT_A_CANCEL", reason, where).items(),
                   ("imagefork.attempts", b"1"), ("imagefork.agent", b"join")]
        value = msg.value()
        try:
            self.producer.produce(self.topics.dead_letter, key=msg.key(), value=value, headers=headers,
                                  on_delivery=delivered)
        except (KafkaException, BufferError, ValueError):  # too large for the dead-letter topic: its start only
            headers.append(("imagefork.truncated", str(len(value or b"")).encode()))
            self.producer.produce(self.topics.dead_letter, key=(msg.key() or b"")[:1024], value=(value or b"")[:65536],
                                  headers=headers, on_delivery=delivered)
        DEAD_LETTERS.labels("join", "NOT_A_CANCEL").inc()
