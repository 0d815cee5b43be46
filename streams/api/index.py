"""The completed topic, indexed: the API's Kafka adapter for finished workflows (their final events)."""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict

from streams import serde
from streams.adapters.kafka import committed_records
from streams.config import Config
from streams.core.models import WorkflowCompleted
from streams.core.sources import SourceCatalog

log = logging.getLogger("imagefork")


class FinalsReader:
    """A topic of final events, read from its start (read_committed) in a thread, each one given to
    ``take``; ``caught_up`` is set once the topic's end was reached."""

    topic_name = "completed"

    def __init__(self, config: Config):
        self.config = config
        self.topic = getattr(config.topics, self.topic_name)
        self.lock = threading.Lock()
        self.caught_up = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    def take(self, final: WorkflowCompleted) -> None:
        raise NotImplementedError

    def decode(self, value: bytes):
        return WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", value))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        threading.Thread(target=self._run, name=f"{self.topic_name}-index", daemon=True).start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._follow(self.topic)
            except Exception as exc:  # the broker away: read again from the start
                log.warning("api: reading %s failed (%s); again in 2s", self.topic, exc)
                time.sleep(2)

    def _follow(self, topic: str) -> None:
        records = committed_records(self.config, topic, follow=True, timeout=math.inf, on_end=self.caught_up.set,
                                    stop=lambda: self.stopping)
        for msg in records:
            if msg.value() is None:
                continue
            try:
                final = self.decode(msg.value())
            except Exception as exc:  # not a record of the topic's: not ours to judge here
                log.debug("api: skipping %s/%d/%d: %s", topic, msg.partition(), msg.offset(), exc)
                continue
            with self.lock:
                self.take(final)


class CompletedIndex(FinalsReader):
    """The completed topic: the latest final event of each workflow id, at most ``capacity`` of them (the
    oldest forgotten first)."""

    def __init__(self, config: Config, capacity: int = 100_000):
        super().__init__(config)
        self.capacity = capacity
        self.finals: OrderedDict[str, WorkflowCompleted] = OrderedDict()

    def get(self, workflow_id: str) -> WorkflowCompleted | None:
        with self.lock:
            return self.finals.get(workflow_id)

    def recent(self) -> list[WorkflowCompleted]:
        with self.lock:
            return list(self.finals.values())

    def take(self, final: WorkflowCompleted) -> None:
        self.finals.pop(final.workflowId, None)
        self.finals[final.workflowId] = final
        while len(self.finals) > self.capacity:
            self.finals.popitem(last=False)


class SourceIndex(FinalsReader):
    """The sources topic (the final events of workflows whose source is known, by its bytes): a
    ``SourceCatalog`` the API's /v1/sources and /v1/similar answer from."""

    topic_name = "sources"

    def __init__(self, config: Config, capacity: int = 100_000):
        super().__init__(config)
        self.catalog = SourceCatalog(capacity)

    def take(self, final: WorkflowCompleted) -> None:
        self.catalog.add(final)

    def source(self, sha256: str) -> dict | None:
        with self.lock:
            return self.catalog.source(sha256)

    def similar(self, phash: int, distance: int, limit: int) -> list[dict]:
        with self.lock:
            return self.catalog.similar(phash, distance, limit)


class DeliveryIndex(FinalsReader):
    """The webhooks topic: the latest delivery state (``WebhookDelivery``) of each workflow with a callbackUrl."""

    topic_name = "webhooks"

    def __init__(self, config: Config, capacity: int = 100_000):
        super().__init__(config)
        self.capacity = capacity
        self.states: OrderedDict[str, dict] = OrderedDict()

    def decode(self, value: bytes) -> dict:
        return serde.decode("WebhookDelivery", value)

    def take(self, state: dict) -> None:  # type: ignore[override]
        self.states.pop(state["workflowId"], None)
        self.states[state["workflowId"]] = state
        while len(self.states) > self.capacity:
            self.states.popitem(last=False)

    def get(self, workflow_id: str) -> dict | None:
        with self.lock:
            return self.states.get(workflow_id)
