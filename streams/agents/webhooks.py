"""The webhook role: every final event whose request has a ``callbackUrl`` is POSTed there as JSON, signed
(streams/core/webhooks.py), at least once, off the join's path: its own consumer group on the completed
topic (and on the redeliver topic, where a webhook's dead letter is replayed).

Each delivery runs on a thread of a pool with its own retries (5xx, 408, 429, a timeout, a refused
connection: again after a doubling pause; another 4xx, or a redirect: refused for good), so one slow
receiver holds no other. An offset is committed only once every final event before it is delivered or
dead-lettered (a contiguous prefix per partition): a crash or a deploy redelivers what was under way, and
the receiver, which sees the same idempotency key, does nothing twice. Each try's outcome goes to the
compacted ``imagefork.webhooks`` topic, where the API reads a workflow's delivery state."""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import Consumer, KafkaException, Producer

from streams import serde
from streams.adapters.agent_loop import Offsets
from streams.adapters.http import serve
from streams.adapters.kafka import (
    MAX_MESSAGE_BYTES, client_config, dead_letter_headers, group_timing, producer_config,
)
from streams.adapters.source import USER_AGENT
from streams.adapters.webhook import Undelivered, post
from streams.config import Config
from streams.core.models import WorkflowCompleted, now_ms
from streams.core.webhooks import (
    DELIVERED, IDEMPOTENCY_HEADER, REFUSED, RETRY, SIGNATURE_HEADER, backoff_s, outcome, sign,
)
from streams.errors import StartError
from streams.metrics import DEAD_LETTERS, WEBHOOKS

log = logging.getLogger("imagefork")
COMMIT_EVERY_S = 1.0


def callback_of(final: WorkflowCompleted) -> str | None:
    try:
        request = json.loads(final.request) if final.request else {}
    except ValueError:
        return None
    url = request.get("callbackUrl") if isinstance(request, dict) else None
    return url if isinstance(url, str) and url else None


class WebhookSender:
    def __init__(self, config: Config):
        if not config.webhook_secret:
            raise StartError("IMAGEFORK_WEBHOOK_SECRET is not set: the webhook role signs every delivery with it "
                             "(and receivers check the signature with the same secret)")
        self.config = config
        self.topics = config.topics
        self.secret = config.webhook_secret.encode()
        self.allow = config.fetch_allow_networks
        self.consumer = Consumer(client_config(config, **{
            "group.id": config.group_id("webhook"), "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "isolation.level": "read_committed", "partition.assignment.strategy": "cooperative-sticky",
            **group_timing(config)}))
        self.producer = Producer(producer_config(config, **{"message.max.bytes": MAX_MESSAGE_BYTES + 65536}))
        self.pool = ThreadPoolExecutor(config.webhook_concurrency, thread_name_prefix="webhook")
        self.offsets = Offsets()
        self.stopping = threading.Event()
        self.ready = False
        self.paused = False

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        self.consumer.subscribe([self.topics.completed, self.topics.webhook_redeliver], on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._lost)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        last_commit = time.monotonic()
        try:
            while not self.stopping.is_set():
                self._flow()
                for msg in self.consumer.consume(100, 0.5):
                    if msg.error() is None:
                        self._take(msg)
                if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                    self._commit()
                    last_commit = time.monotonic()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)  # a try under way ends within its timeout
            self._commit()
            self.consumer.close()
            self.producer.flush(10)
        return 0

    def _flow(self) -> None:
        """At most ``4 x concurrency`` deliveries taken and not done: past that, reading pauses."""
        full = self.offsets.under_way() >= 4 * self.config.webhook_concurrency
        if full != self.paused:
            assignment = self.consumer.assignment()
            (self.consumer.pause if full else self.consumer.resume)(assignment)
            self.paused = full

    def _take(self, msg) -> None:
        topic, p, offset = msg.topic(), msg.partition(), msg.offset()
        self.offsets.take(topic, p, offset)
        self.pool.submit(self._handle, msg.key(), msg.value() or b"", (topic, p, offset))

    def _handle(self, key: bytes | None, raw: bytes, where: tuple[str, int, int]) -> None:
        """One record: decoded (a version this process does not know yet is asked for again for a minute:
        its writer publishes it), then delivered if it has a callbackUrl; whatever goes wrong, it ends
        delivered, dead-lettered, or not done (so it comes again): never skipped."""
        try:
            final = self._decoded(raw)
            if final is None:
                return self._dead_letter(raw, key, None, "", "WEBHOOK_UNREADABLE",
                                         "not a final event this role can read", 0, where)
            url = callback_of(final)
            if url is None:
                return self.offsets.done(*where)
            self._deliver_with_retries(raw, final, url, where)
        except Exception as exc:  # a bug, or what a receiver's URL makes of the HTTP client: dead-lettered
            log.exception("webhook: delivering %s[%d:%d] failed", *where)
            self._dead_letter(raw, key, None, "", "WEBHOOK_FAILED", f"{type(exc).__name__}: {exc}"[:1000], 0, where)

    def _decoded(self, raw: bytes) -> WorkflowCompleted | None:
        for _ in range(20):
            try:
                return WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", raw))
            except serde.SerdeError as exc:
                if "does not know" not in str(exc) or self.stopping.wait(3.0):
                    return None
        return None

    def _commit(self) -> None:
        ready = self.offsets.committable()
        if not ready:
            return
        if self.producer.flush(30):  # the state records and dead letters of what is committed go first
            log.warning("webhook: delivery records not confirmed by Kafka; offsets not committed this time")
            return
        try:
            self.consumer.commit(offsets=ready, asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance: what was delivered is delivered again, at least once
            log.warning("webhook: committing offsets: %s", exc)

    # --- one delivery ------------------------------------------------------------------------------
    def _deliver_with_retries(self, raw: bytes, final: WorkflowCompleted, url: str, where) -> None:
        body = json.dumps({"event": "workflow.completed", **final.document()}, separators=(",", ":")).encode()
        key = f"{final.workflowId}:{final.runId}"
        cfg = self.config
        for attempt in range(1, cfg.webhook_max_tries + 1):
            t = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       SIGNATURE_HEADER: sign(self.secret, body, t), IDEMPOTENCY_HEADER: key,
                       "Imagefork-Event": "workflow.completed", "Imagefork-Delivery": str(uuid.uuid4()),
                       "Imagefork-Attempt": str(attempt)}
            try:
                status = post(url, body, headers, self.allow, cfg.webhook_timeout_s, cfg.limits.source_ca_file)
                result, why = outcome(status), f"HTTP {status}"
            except Undelivered as exc:
                status, result, why = 0, RETRY if exc.retry else REFUSED, str(exc)
            if result == DELIVERED:
                self._record(final, url, "DELIVERED", attempt, status, "")
                WEBHOOKS.labels("DELIVERED").inc()
                log.info("webhook: %s run %s delivered to %s (attempt %d)", final.workflowId, final.runId, url,
                         attempt)
                return self.offsets.done(*where)
            if result == REFUSED or attempt == cfg.webhook_max_tries:
                code = "WEBHOOK_REFUSED" if result == REFUSED else "WEBHOOK_UNDELIVERED"
                self._record(final, url, "FAILED", attempt, status, why)
                return self._dead_letter(raw, final.workflowId.encode(), final, url, code,
                                         f"{why} (after {attempt} tries)", attempt, where)
            pause = backoff_s(attempt, cfg.webhook_delay_s, cfg.webhook_max_delay_s)
            self._record(final, url, "RETRYING", attempt, status, why, now_ms() + int(pause * 1000))
            log.info("webhook: %s run %s: %s from %s; try %d of %d in %.1fs", final.workflowId, final.runId, why,
                     url, attempt + 1, cfg.webhook_max_tries, pause)
            if self.stopping.wait(pause):
                return  # stopping: not done, so delivered again after the restart

    def _record(self, final, url: str, state: str, attempts: int, status: int, error: str, next_at: int = 0) -> None:
        self.producer.produce(self.topics.webhooks, key=final.workflowId.encode(), value=serde.encode(
            "WebhookDelivery", {"workflowId": final.workflowId, "runId": final.runId, "url": url, "state": state,
                                "attempts": attempts, "lastStatus": status, "lastError": error[:500],
                                "at": now_ms(), "nextAt": next_at}))
        self.producer.poll(0)

    def _dead_letter(self, raw: bytes, key: bytes | None, final, url: str, code: str, reason: str, attempts: int,
                     where: tuple[str, int, int]) -> None:
        """The final event, on the dead-letter topic; its offset is done once the broker has it (until then
        it is not: a dead letter lost comes again). Its origin header names the redeliver topic, so replaying
        it (`imagefork dlq replay --to origin ID`) gives it to this role again, not a second final event;
        where it was read is in ``imagefork.webhook.from``."""
        log.warning("webhook: %s not delivered to %s: %s", final.workflowId if final else key, url or "-", reason)
        origin = {"topic": self.topics.webhook_redeliver}
        headers = [*dead_letter_headers(code, reason, origin).items(), ("imagefork.attempts", str(attempts).encode()),
                   ("imagefork.agent", b"webhook"), ("imagefork.webhook.url", url.encode("utf-8", "replace")),
                   ("imagefork.webhook.from", "%s/%d/%d".encode() % (where[0].encode(), where[1], where[2]))]

        def acked(err, _msg):
            if err is None:
                self.offsets.done(*where)
                WEBHOOKS.labels("FAILED").inc()
                DEAD_LETTERS.labels("webhook", code).inc()
            else:  # not done: the event is read and tried again after a restart; said loudly meanwhile
                log.error("webhook: the dead letter of %s[%d:%d] was refused (%s)", *where, err)
        try:
            self.producer.produce(self.topics.dead_letter, key=key, value=raw, headers=headers, on_delivery=acked)
        except (KafkaException, BufferError) as exc:
            log.error("webhook: the dead letter of %s[%d:%d] could not be sent (%s)", *where, exc)

    # --- partitions come and go ---------------------------------------------------------------------
    def _assigned(self, consumer, partitions) -> None:
        if not self.ready:
            log.info("imagefork ready: webhook (%d partitions)", len(partitions))
            self.ready = True
        if self.paused:
            consumer.pause(partitions)

    def _revoked(self, consumer, partitions) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        ready = self.offsets.committable(keys)
        if ready and not self.producer.flush(30):
            try:
                consumer.commit(offsets=ready, asynchronous=False)
            except KafkaException as exc:
                log.warning("webhook: committing revoked partitions: %s", exc)
        self.offsets.drop(keys)  # their deliveries under way finish; the new owner sends them again

    def _lost(self, consumer, partitions) -> None:
        self.offsets.drop({(tp.topic, tp.partition) for tp in partitions})


def run(config: Config) -> int:
    sender = WebhookSender(config)
    serve(config, "webhook", lambda: (sender.ready, "assigned" if sender.ready else "joining its group"))
    return sender.run()
