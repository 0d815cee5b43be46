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

log = logging.getLogger("imagefork")


class CompletedIndex:
    """The completed topic, read from its start (read_committed) in a thread: the latest final event of
    each workflow id, at most ``capacity`` of them (the oldest forgotten first)."""

    def __init__(self, config: Config, capacity: int = 100_000):
        self.config, self.capacity = config, capacity
        self.finals: OrderedDict[str, WorkflowCompleted] = OrderedDict()
        self.lock = threading.Lock()
        self.caught_up = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    def get(self, workflow_id: str) -> WorkflowCompleted | None:
        with self.lock:
            return self.finals.get(workflow_id)

    def recent(self) -> list[WorkflowCompleted]:
        with self.lock:
            return list(self.finals.values())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        threading.Thread(target=self._run, name="completed-index", daemon=True).start()

    def _run(self) -> None:
        topic = self.config.topics.completed
        while not self.stopping:
            try:
                self._follow(topic)
            except Exception as exc:  # the broker away: read again from the start
                log.warning("api: reading %s failed (%s); again in 2s", topic, exc)
                time.sleep(2)

    def _follow(self, topic: str) -> None:
        records = committed_records(self.config, topic, follow=True, timeout=math.inf, on_end=self.caught_up.set,
                                    stop=lambda: self.stopping)
        for msg in records:
            if msg.value() is None:
                continue
            try:
                final = WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", msg.value()))
            except Exception as exc:  # not a final event: not ours to judge here
                log.debug("api: skipping %s/%d/%d: %s", topic, msg.partition(), msg.offset(), exc)
                continue
            with self.lock:
                self.finals.pop(final.workflowId, None)
                self.finals[final.workflowId] = final
                while len(self.finals) > self.capacity:
                    self.finals.popitem(last=False)
