"""Join: a Faust table keyed by workflow id, fed by the events topic (plans, results,
clock ticks) that is co-partitioned with it. Emits exactly one final event per workflow."""
from __future__ import annotations

import asyncio
import json
import time

import faust

from streams import serde
from streams.adapters.objectstore import ObjectStore
from streams.agents.common import log, now_ms, send
from streams.app import Topics
from streams.config import Config
from streams.core import join as core
from streams.core.models import SUCCEEDED, DeadlineCheck, TaskOutput, TaskResult, WorkflowCompleted, WorkflowPlan
from streams.core.planning import format_of, output_key
from streams.serde import SerdeError


class Joiner:
    def __init__(self, config: Config, topics: Topics, table: faust.Table, store: ObjectStore):
        self.config = config
        self.topics = topics
        self.table = table
        self.store = store
        self.timeout_ms = int(config.workflow_timeout_s * 1000)
        self.retention_ms = int(config.finished_retention_s * 1000)
        self._ticked: dict[bytes, float] = {}
        self._ticker = None
        self._repaired: dict[bytes, float] = {}

    async def handle(self, key: bytes, value: bytes) -> None:
        try:
            kind, body = serde.decode_join_event(value)
        except SerdeError as exc:
            log.error("join: ignoring an undecodable event for key %r: %s", key, exc)
            return
        now = now_ms()
        state = self.load(key)
        if kind == "WorkflowPlan":
            outcome = core.record_plan(state, WorkflowPlan.from_dict(body), now)
        elif kind == "TaskResult":
            outcome = core.record_result(state, TaskResult.from_dict(body), now)
        else:
            outcome = core.check_deadline(state, now, default_timeout_ms=self.timeout_ms,
                                          retention_ms=self.retention_ms)
        if outcome.final is not None:
            await self.emit(key, outcome.final)
        if outcome.changed:
            if outcome.state is None:
                if key in self.table:
                    del self.table[key]
            else:
                self.table[key] = json.dumps(outcome.state).encode()  # assigned back: the changelog sees it
            # Faust queues changelog writes in a buffer; hand this one to the producer before the event
            # is acked, so no offset commit can pass it.
            await self.table.app.producer.buffer.flush()
            if outcome.final is not None:
                # wait for the changelog's ack too: this narrows the window in which a crash could
                # replay this event with its final event already out to the time between two acks
                await self.table.app.producer.flush()

    def load(self, key: bytes) -> core.State | None:
        raw = self.table.get(key)
        return json.loads(raw) if raw else None

    async def emit(self, key: bytes, final: WorkflowCompleted) -> None:
        await send(self.topics.completed, key=key, value=serde.encode("WorkflowCompleted", final.to_dict()))
        log.info("workflow %s %s: %d of %d outputs", final.workflowId, final.status,
                 len(final.outputs), final.taskCount)
        staged = f"{self.config.staging_prefix}{final.workflowId}/source"
        asyncio.get_running_loop().run_in_executor(None, self._forget_source, staged)

    def find_outputs(self, state: core.State) -> list[TaskResult]:
        """Repair: a workflow stalled with tasks missing. The outputs are deterministic S3 objects that
        describe themselves, so a result that never reached the table (lost in a crash) is rebuilt
        from its object, and fed back through the stream like any result."""
        found = []
        workflow_id = state["workflowId"]
        for ref in core.missing_refs(state):
            fmt = format_of(ref)
            if fmt is None:
                continue
            key = output_key(self.config.output_prefix, workflow_id, ref, fmt)
            try:
                head = self.store.head(key)
            except Exception:
                continue
            meta = (head or {}).get("Metadata", {})
            if not head or meta.get("imagefork-task") != ref:
                continue
            output = TaskOutput(ref, meta.get("imagefork-format", fmt), int(meta.get("imagefork-width", 0)),
                                int(meta.get("imagefork-height", 0)), int(head.get("ContentLength", 0)),
                                head.get("ContentType", ""), self.store.uri(key), self.store.url(key))
            found.append(TaskResult(workflow_id, ref, SUCCEEDED, 0, now_ms(), output=output))
        if found:
            log.warning("workflow %s stalled: recovered %d result(s) from their objects", workflow_id, len(found))
        return found

    async def send_tick(self, key: bytes, tick: DeadlineCheck | TaskResult) -> None:
        """Ticks go out on a plain idempotent producer of their own, apart from the stream's sends
        (a tick is safe to repeat; the table decides)."""
        from aiokafka import AIOKafkaProducer
        if self._ticker is None:
            ticker = AIOKafkaProducer(bootstrap_servers=self.config.bootstrap_servers.split(","),
                                      enable_idempotence=True, acks="all")
            await ticker.start()
            self._ticker = ticker
        try:
            await self._ticker.send_and_wait(self.topics.events.get_topic_name(), key=key,
                                             value=serde.encode_join_event(type(tick).__name__, tick.to_dict()))
        except Exception as exc:  # the next tick tries again
            log.warning("could not send a deadline tick for %r: %s", key, exc)

    def _forget_source(self, key: str) -> None:
        try:
            self.store.delete(key)
        except Exception as exc:  # best effort: a leftover staged copy is only storage
            log.debug("could not delete staged source %s: %s", key, exc)

    async def tick(self) -> None:
        """The clock: ask the stream to time out or forget what is due (the table changes only in the stream)."""
        now = now_ms()
        mono = time.monotonic()
        for key, raw in list(self.table.items()):
            try:
                state = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if core.needs_attention(state, now, default_timeout_ms=self.timeout_ms,
                                    retention_ms=self.retention_ms):
                if mono - self._ticked.get(key, 0.0) < 10.0:
                    continue
                self._ticked[key] = mono
                await self.send_tick(key, DeadlineCheck(state["workflowId"], now))
            elif core.stalled(state, now, int(self.config.repair_after_s * 1000)):
                if mono - self._repaired.get(key, 0.0) < self.config.repair_after_s:
                    continue
                self._repaired[key] = mono
                for result in await asyncio.to_thread(self.find_outputs, state):
                    await self.send_tick(key, result)
        if len(self._repaired) > 10000:
            self._repaired = {k: v for k, v in self._repaired.items() if mono - v < self.config.repair_after_s}
        if len(self._ticked) > 10000:
            self._ticked = {k: v for k, v in self._ticked.items() if mono - v < 10.0}


def register(app: faust.App, config: Config, topics: Topics) -> Joiner:
    # keys and values are bytes (the app's raw serializer); values are the JSON of core.join's state
    table = app.Table("workflows", default=None, partitions=config.partitions, key_type=bytes, value_type=bytes)
    joiner = Joiner(config, topics, table, ObjectStore(config))

    @app.agent(topics.events, name="imagefork.join")
    async def join_events(stream):
        async for event in stream.events():
            if event.key is None:
                log.error("join: ignoring an event without a key at offset %s", event.message.offset)
                continue
            try:
                await joiner.handle(event.key, event.value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("join failed on %r", event.key)

    @app.timer(interval=config.deadline_check_interval_s)
    async def deadlines():
        try:
            await joiner.tick()
        except Exception:
            log.exception("join clock failed")

    return joiner
