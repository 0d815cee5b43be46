"""The submit/await side, with confluent-kafka: produce a request, follow it to its final event."""
from __future__ import annotations

import json
import time
import uuid
from typing import Callable, Iterable

from confluent_kafka import Consumer, Producer, TopicPartition

from streams import serde
from streams.adapters.kafka import client_config, producer_config, read_to_end, watermarks
from streams.adapters.schemas import install_resolver, publish_schemas
from streams.config import Config
from streams.core.models import Cancellation, WorkflowCompleted
from streams.core.options import ImageOptions, flat_fields, parse_options
from streams.core.planning import parse_boolean
from streams.errors import ImageforkError

Progress = Callable[[str, int, int | None], None]


class SubmitError(ImageforkError, RuntimeError):
    pass


class Follower:
    """Reads the events, completed and notices topics from *now* on (assigned before the request is
    sent, so nothing can slip by) and reports progress and final events per workflow id.

    A resubmitted workflow id is answered at once: the join commits a ``RunIgnored`` notice for the run
    it does not take. If the id's run already finished, its final event (committed before this
    follower started) is looked up on the completed topic and returned; if it is still running, the
    wait goes on for that run's final event. ``notices`` keeps the notice per workflow id."""

    def __init__(self, config: Config):
        self.config = config
        install_resolver(config)  # final events of workers newer than this client decode too
        self.consumer = Consumer(client_config(
            config, **{"group.id": f"imagefork-client-{uuid.uuid4()}", "enable.auto.commit": False,
                       "isolation.level": "read_committed", "auto.offset.reset": "latest"}))
        assignment = []
        for topic in (config.topics.events, config.topics.completed, config.topics.notices):
            meta = self.consumer.list_topics(topic, timeout=30).topics.get(topic)
            if meta is None or meta.error is not None:
                if topic == config.topics.notices:
                    continue  # workers older than the notices topic: no early answer, the rest works
                raise SubmitError(f"topic {topic} is not there (are the workers or `imagefork topics` run?)")
            for p in meta.partitions:
                _low, high = watermarks(self.consumer, TopicPartition(topic, p))
                assignment.append(TopicPartition(topic, p, high))
        self.consumer.assign(assignment)
        self.done: dict[str, int] = {}
        self.total: dict[str, int | None] = {}
        self.finals: dict[str, WorkflowCompleted] = {}
        self.notices: dict[str, dict] = {}

    def wait(self, ids: Iterable[str], timeout: float, progress: Progress | None = None) -> dict[str, WorkflowCompleted]:
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while not wanted <= set(self.finals):
            if time.monotonic() > deadline:
                missing = sorted(wanted - set(self.finals))
                raise TimeoutError(f"no final event within {timeout:.0f}s for {', '.join(missing[:5])}")
            msg = self.consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                self._take(msg, wanted, progress)
        return {i: self.finals[i] for i in wanted}

    def pump(self, seconds: float, wanted: set[str] | None = None, progress: Progress | None = None) -> None:
        """Read what arrives for ``seconds`` (all workflows when ``wanted`` is None)."""
        end = time.monotonic() + seconds
        while True:
            msg = self.consumer.poll(max(0.0, min(0.2, end - time.monotonic())))
            if msg is not None and msg.error() is None:
                self._take(msg, wanted, progress)
            if time.monotonic() >= end:
                return

    def _take(self, msg, wanted: set[str] | None, progress: Progress | None) -> None:
        key = (msg.key() or b"").decode("utf-8", "replace")
        if wanted is not None and key not in wanted:
            return
        if msg.topic() == self.config.topics.completed:
            try:
                final = WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", msg.value()))
            except serde.SerdeError:
                return
            self.finals.setdefault(key, final)
        elif msg.topic() == self.config.topics.notices:
            try:
                notice = serde.decode("RunIgnored", msg.value())
            except serde.SerdeError:
                return
            self.notices.setdefault(key, notice)
            if notice["reason"] == "finished" and key not in self.finals:
                self.finals[key] = self._earlier_final(key, notice)
        else:
            try:
                kind, body = serde.decode_join_event(msg.value())
            except serde.SerdeError:
                return
            if kind == "WorkflowPlan":
                self.total[key] = len(body["taskRefs"])
            elif kind == "TaskResult":
                self.done[key] = self.done.get(key, 0) + 1
        if progress:
            progress(key, self.done.get(key, 0), self.total.get(key))

    def _earlier_final(self, key: str, notice: dict) -> WorkflowCompleted:
        """The final event of the run that took ``key``: committed before this follower began."""
        earlier = consume_completed(self.config, [key], 60)
        if not earlier:
            raise SubmitError(f"workflow {key} already ran ({notice['takenStatus']}, run {notice['takenRunId']}) "
                              f"and is not run again, but its final event is no longer on "
                              f"{self.config.topics.completed} (past its retention)")
        return earlier[-1]

    def results_seen(self) -> int:
        return sum(self.done.values())

    def close(self) -> None:
        self.consumer.close()


class Client:
    def __init__(self, config: Config):
        self.config = config
        self.producer = Producer(producer_config(config))
        self._published = False

    def submit(self, request: dict | bytes, workflow_id: str | None = None, *, avro: bool = False,
               timeout_s: float = 30.0) -> str:
        """Produce one request; the key is the workflow id (given, from the document, or a new UUID)."""
        if isinstance(request, dict):
            workflow_id = workflow_id or request.get("workflowId") or str(uuid.uuid4())
            if avro:
                body = avro_request(request)
                value = serde.encode("ImageRequest", body)
                self._publish_schemas()
            else:
                value = json.dumps(request).encode()
        else:
            value = request
        errors: list[str] = []

        def delivered(err, _msg):
            if err is not None:
                errors.append(str(err))

        batch = isinstance(request, dict) and str(request.get("priority") or "").strip().lower() == "batch"
        topic = self.config.topics.requests_batch if batch else self.config.topics.requests  # its lane
        self.producer.produce(topic, key=workflow_id.encode() if workflow_id else None, value=value,
                              on_delivery=delivered)
        remaining = self.producer.flush(timeout_s)
        if remaining or errors:
            raise SubmitError(f"request not delivered to {self.config.bootstrap_servers}: "
                              f"{errors[0] if errors else 'timed out'}")
        return workflow_id or ""

    def cancel(self, cancel: Cancellation, timeout_s: float = 30.0) -> None:
        """Produce a cancel on the cancellations topic (the join takes it from there)."""
        errors: list[str] = []
        self._publish_schemas()
        self.producer.produce(self.config.topics.cancellations, key=cancel.workflowId.encode(),
                              value=serde.encode("Cancellation", cancel.to_dict()),
                              on_delivery=lambda err, _msg: err is not None and errors.append(str(err)))
        remaining = self.producer.flush(timeout_s)
        if remaining or errors:
            raise SubmitError(f"cancel not delivered to {self.config.bootstrap_servers}: "
                              f"{errors[0] if errors else 'timed out'}")

    def _publish_schemas(self) -> None:
        """An Avro writer publishes its schemas first, so a planner older than this client reads it."""
        if not self._published:
            publish_schemas(self.config)
            self._published = True

    def close(self) -> None:
        self.producer.flush(10)
        self.producer = None


def consume_completed(config: Config, ids: Iterable[str], timeout: float) -> list[WorkflowCompleted]:
    """Every final event for ``ids`` committed on the completed topic when this is called (tests count
    them with it), read to the end offsets (``read_to_end``): a slow broker makes it slower, never short."""
    wanted = set(ids)
    return [WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", msg.value()))
            for msg in read_to_end(config, config.topics.completed, timeout)
            if (msg.key() or b"").decode() in wanted]


__all__ = ["Client", "Follower", "SubmitError", "consume_completed"]


def avro_request(doc: dict) -> dict:
    """A request document (the seed's JSON form) as an ImageRequest record: its options in ``options`` (and
    in the flat fields a planner older than ``options`` reads). "false" means false and "80" means 80, as
    the JSON path reads them; a value no option takes is passed as given, for the planner to refuse with
    its reason (or the encoder, when the record cannot hold it)."""
    flag, why = parse_boolean(doc.get("maintainAspectRatio", True))
    if why:
        raise SubmitError(f"maintainAspectRatio {why}")
    options = parse_options(doc, "", [], keep_bad=True)
    sizes = []
    for size in doc.get("outputSizes") or []:
        if not isinstance(size, dict):
            sizes.append(size)
            continue
        own = parse_options(size, "", [], keep_bad=True)
        sizes.append({"width": size.get("width"), "height": size.get("height"), **flat_fields("Size", own),
                      "options": own.to_dict() if own.said() else None})
    body = {k: v for k, v in doc.items() if k not in ImageOptions.__dataclass_fields__ and k != "options"}
    return {"workflowId": None, "correlationId": None, "outputFormats": [], **body,  # a preset alone: none of its own
            "maintainAspectRatio": flag, "outputSizes": sizes,
            **flat_fields("ImageRequest", options), "options": options.to_dict() if options.said() else None}

