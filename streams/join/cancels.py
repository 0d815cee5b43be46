"""Cancels into the join: a thread of the join process that reads the cancellations topic (where the API,
``imagefork cancel`` and any Kafka client write them) and puts each on the events topic, keyed by its
workflow id, so the join takes it in order with that workflow's plan and results, in its transactions.

At least once (a cancel forwarded twice changes nothing the second time); a cancel the join wrote back
(``applied``) is not forwarded; one that is not a cancel is dead-lettered with the reason."""
from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer, KafkaException, Producer

from streams import serde
from streams.adapters.kafka import client_config, dead_letter_headers, producer_config
from streams.config import Config
from streams.core.cancels import decode_cancellation
from streams.core.errors import RequestInvalid
from streams.metrics import DEAD_LETTERS

log = logging.getLogger("imagefork")


class CancelForwarder:
    def __init__(self, config: Config):
        self.config = config
        self.topics = config.topics
        self.consumer = Consumer(client_config(config, **{
            "group.id": config.group_id("join-cancels"), "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": "read_committed"}))
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
            try:
                batch = self.consumer.consume(500, 0.5)
                sent = [self._forward(m) for m in batch if m.error() is None]
                if any(sent):
                    left = self.producer.flush(30)
                    if left:
                        raise KafkaException(f"{left} cancel(s) not delivered to {self.topics.events}")
                if batch:
                    self.consumer.commit(asynchronous=False)
            except KafkaException as exc:  # not committed: read again once the broker answers
                log.warning("join: forwarding cancels: %s", exc)
                self._rewind()
                self._stop.wait(1.0)
            except Exception:  # a bug must not end cancels for good
                log.exception("join: forwarding cancels failed")
                self._rewind()
                self._stop.wait(1.0)

    def _rewind(self) -> None:
        try:
            committed = self.consumer.committed(self.consumer.assignment(), timeout=10)
            for tp in committed:
                if tp.offset >= 0:
                    self.consumer.seek(tp)
        except (KafkaException, RuntimeError) as exc:
            log.debug("join: rewinding the cancels consumer: %s", exc)

    def _forward(self, msg) -> bool:
        try:
            cancel = decode_cancellation(msg.key(), msg.value())
        except (RequestInvalid, serde.SerdeError) as exc:
            self._dead_letter(msg, str(exc))
            return False
        if cancel.applied:
            return False  # the join's own record: the run is over already
        self.producer.produce(self.topics.events, key=cancel.workflowId.encode(),
                              value=serde.encode_join_event("Cancellation", cancel.to_dict()))
        self.forwarded += 1
        log.info("join: cancel of %s%s forwarded (by %s)", cancel.workflowId,
                 f" run {cancel.runId}" if cancel.runId else "", cancel.by or "a Kafka client")
        return True

    def _dead_letter(self, msg, reason: str) -> None:
        where = {"topic": msg.topic(), "partition": str(msg.partition()), "offset": str(msg.offset())}
        log.warning("join: dead-lettered %s: not a cancel: %s", where, reason)
        headers = [*(msg.headers() or []), *dead_letter_headers("NOT_A_CANCEL", reason, where).items(),
                   ("imagefork.attempts", b"1"), ("imagefork.agent", b"join")]
        self.producer.produce(self.topics.dead_letter, key=msg.key(), value=msg.value(), headers=headers)
        DEAD_LETTERS.labels("join", "NOT_A_CANCEL").inc()
