"""Planner: request -> (validate, stage the source once) -> plan to the join + one task per format x size."""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import OrderedDict, defaultdict
from dataclasses import replace
from functools import partial
from typing import Callable

from streams import serde
from streams.adapters.agent_loop import AgentLoop
from streams.adapters.kafka import Topics
from streams.adapters.objectstore import ObjectStore
from streams.adapters.presets import PresetTable
from streams.agents.lanes import LaneGate
from streams.adapters.source import Fetched, fetch_http_validated
from streams.agents.common import TopicLike, backoff_s, log, now_ms, run_agents, send, send_all
from streams.agents.policy import (
    Disposition, Message, MessagePolicy, Reject, RetryLater, header_int, policy_lane, wait_not_before,
)
from streams.config import Config
from streams.core.errors import PipelineError, RequestInvalid, SourceForbidden
from streams.core.lanes import BATCH, INTERACTIVE, lane_of
from streams.core.imaging import certain_output_pixels, probe_image, target_size, task_spec
from streams.core.models import FAILED, REJECTED, PlanFailure, TaskError, TaskResult, WorkflowPlan
from streams.core.planning import (
    make_plan, parse_request, plan_tasks, request_json, retry_split, run_id_of, staging_key, valid_workflow_id,
    Dealer, with_facts,
)
from streams.core.reuse import scope_prefix, source_key
from streams.metrics import SOURCES_REVALIDATED, STAGE_SECONDS
from streams.serde import SerdeError


LEGACY_ATTEMPT = "imagefork.attempt"  # the source attempts of a request parked by a planner before 0.2
SUBMITTED_AT = "imagefork.submitted-at"
RUN_ID = "imagefork.run-id"


class Planner:
    def __init__(self, config: Config, topics: Topics, store: ObjectStore):
        self.config = config
        self.topics = topics
        self.store = store
        self.sources = Revalidator(config, store)
        self.presets = PresetTable(config)  # started by run(): the topic is read in a thread
        self.gate = LaneGate("planner", config.planner_concurrency, config.batch_share)
        self.dealers = defaultdict(partial(Dealer, random.randrange(1 << 16)))  # a task topic's (a lane's) own

    # --- the steps ------------------------------------------------------------
    async def handle(self, key: bytes | None, value: bytes | None, where: dict[str, str],
                     attempt: int = 1, submitted_at: int | None = None, run_id: str | None = None,
                     timestamp_ms: int = 0) -> Disposition:
        # one run id per request message: a replay of this message is the same run, a resubmission another
        run_id = run_id or run_id_of(where["topic"], where["partition"], where["offset"], timestamp_ms)
        try:
            doc = serde.decode_request_bytes(value if value is not None else b"")
        except SerdeError as exc:
            raise Reject("NOT_A_REQUEST", str(exc)) from None
        if not isinstance(doc, dict):
            raise Reject("NOT_A_REQUEST", f"value is JSON {type(doc).__name__}, not a request object")
        workflow_id, key_problem = self.workflow_id(key, doc, run_id)
        now = submitted_at or now_ms()
        deadline = now + int(self.config.workflow_timeout_s * 1000)
        # echoed in a REJECTED final event: text UTF-8 can encode (a lone surrogate becomes "?")
        location = _text(doc.get("fileLocation")) or ""
        correlation = _text(doc.get("correlationId"))
        presets = None
        if isinstance(doc.get("preset"), str):  # resolved against the presets topic, read whole first
            presets = await asyncio.to_thread(self.presets.for_name, doc["preset"], 30.0)
            if presets is None:
                exc = PipelineError(f"the presets topic {self.config.topics.presets} cannot be read now",
                                    code="PRESETS_UNAVAILABLE", transient=True)
                return self.retry(workflow_id, attempt, now, deadline, exc, run_id) or await self.send_plan(
                    WorkflowPlan(workflowId=workflow_id, correlationId=correlation, fileLocation=location[:2048],
                                 tasks=(), submittedAt=now, deadline=deadline, runId=run_id,
                                 failure=PlanFailure(FAILED, exc.code, exc.message, attempts=attempt)))
        try:
            if key_problem:
                raise RequestInvalid([("workflowId", key_problem)])
            request = self.parse(doc, presets)
            tasks = plan_tasks(request, workflow_id, source_uri="", deadline=deadline,
                               output_prefix=self.config.output_prefix, run_id=run_id)
            to_run, carried = retry_split(request, tasks)
        except RequestInvalid as exc:
            log.info("workflow %s rejected: %s", workflow_id, exc.message)
            return await self.send_plan(WorkflowPlan(
                workflowId=workflow_id, correlationId=correlation, fileLocation=location[:2048], tasks=(),
                submittedAt=now, deadline=deadline, runId=run_id,
                failure=PlanFailure(REJECTED, exc.code, exc.message)))
        try:
            source_uri, (src_w, src_h), sha256 = await asyncio.to_thread(self._stage, request.fileLocation,
                                                                         workflow_id, run_id)
        except PipelineError as exc:
            retry = self.retry(workflow_id, attempt, now, deadline, exc, run_id) if exc.transient else None
            if retry is not None:
                return retry
            if exc.transient:
                exc.message += f" (after {attempt} attempts)"
            log.info("workflow %s failed at its source: %s", workflow_id, exc)
            return await self.send_plan(WorkflowPlan(
                workflowId=workflow_id, correlationId=request.correlationId, fileLocation=request.fileLocation,
                tasks=(), submittedAt=now, deadline=deadline, runId=run_id,
                retryOf=request.retry.runId if request.retry else "", request=request_json(request),
                failure=PlanFailure(FAILED, exc.code, exc.message, attempts=attempt)))
        if request.retry is not None and request.retry.sourceSha256 and request.retry.sourceSha256 != sha256:
            # a regeneration whose kept outputs were made from other bytes: every output is made again
            log.warning("workflow %s: the source's bytes changed since run %s (sha256 %s, now %s): every output is "
                        "made again", workflow_id, request.retry.runId, request.retry.sourceSha256[:12], sha256[:12])
            to_run, carried = tasks, ()
        sending = time.perf_counter()
        await self.send_plan(make_plan(request, workflow_id, tasks, submitted_at=now, deadline=deadline,
                                       run_id=run_id, carried=carried))
        to_run = with_facts(await self.fail_the_certainly_too_large(to_run, src_w, src_h), request)
        planned = time.perf_counter()
        STAGE_SECONDS.labels("planner", "plan_send").observe(planned - sending)
        lane = self.topics.tasks_batch if request.priority == BATCH else self.topics.tasks
        staged = [replace(task, sourceUri=source_uri, sourceSha256=sha256) for task in to_run]
        # dealt at once: requests planned side by side get other windows
        spots = self.dealers[lane.get_topic_name()].deal(len(staged), await lane.partition_count())
        await send_tasks(lane, staged, spots)
        STAGE_SECONDS.labels("planner", "task_send").observe(time.perf_counter() - planned)
        if request.retry is not None:
            log.info("workflow %s planned: a retry of run %s, %d of %d tasks again", workflow_id,
                     request.retry.runId, len(to_run), len(tasks))
        else:
            log.info("workflow %s planned: %d tasks", workflow_id, len(tasks))
        return Disposition.PROCESSED

    async def handle_message(self, msg: Message, lane: str = INTERACTIVE) -> Disposition:
        """A request topic (of ``lane``). A message back from the retry topic (its handling failed once) keeps
        its run id and its first submission time, so its deadline counts from the first submission."""
        run_id = msg.headers.get(RUN_ID)
        attempt = max(msg.attempts, header_int(msg.headers, LEGACY_ATTEMPT, 1))
        async with self.gate.slot_unless_draining(lane):  # interactive first; batch with what is left
            return await self.handle(msg.key, msg.value, msg.where, attempt=attempt,
                                     submitted_at=header_int(msg.headers, SUBMITTED_AT, 0) or None,
                                     run_id=run_id.decode("ascii", "replace") if run_id else None,
                                     timestamp_ms=msg.timestamp_ms)

    async def release(self, msg: Message) -> Disposition:
        """Retry topic: wait until the request's not-before time, then plan it again (a waiting
        request holds one of many light slots of this agent, never the request partitions)."""
        await wait_not_before(msg)
        return await self.handle_message(msg, request_lane(msg.value))  # back in its own lane

    @staticmethod
    def retry_headers(msg: Message) -> dict[str, bytes]:
        """What a request keeps when its handling failed and it goes round the retry topic."""
        where = msg.where
        return {RUN_ID: msg.headers.get(RUN_ID) or run_id_of(where["topic"], where["partition"],
                                                             where["offset"], msg.timestamp_ms).encode(),
                SUBMITTED_AT: msg.headers.get(SUBMITTED_AT) or str(now_ms()).encode()}

    def parse(self, doc: dict, presets=None):
        lim = self.config.limits
        return parse_request(doc, max_dimension=lim.max_dimension, max_tasks=lim.max_tasks, max_pixels=lim.max_pixels,
                             presets=presets)

    @staticmethod
    def workflow_id(key: bytes | None, doc: dict, run_id: str) -> tuple[str, str | None]:
        """The message key, else the field, else ``req-{run id}`` (from the message's topic, partition
        and offset, so a replay of the request topic does not make a second workflow). An id that cannot
        name S3 keys is reported (the request is REJECTED under that same id, so its sender finds the
        final event)."""
        rule = "must be 1-128 characters of A-Z a-z 0-9 . _ : - (it names S3 keys)"
        if key:
            text = key.decode("utf-8", "replace")[:512]
            return text, (None if valid_workflow_id(text) else f"(the message key) {rule}")
        field = _text(doc.get("workflowId"))
        if field:
            return field[:512], None  # an invalid field is reported by parse_request
        return f"req-{run_id}", None

    def retry(self, workflow_id: str, attempt: int, submitted_at: int, deadline: int, exc: PipelineError,
              run_id: str) -> RetryLater | None:
        """The request again later from the retry topic (keeping its run id and first submission time); None
        when its retries are spent or its deadline would pass first."""
        delay = backoff_s(self.config.retry, attempt)
        if attempt > self.config.retry.max_retries or now_ms() + int(delay * 1000) >= deadline:
            return None
        log.warning("workflow %s: source attempt %d failed (%s); retry in %.1fs", workflow_id, attempt, exc, delay)
        return RetryLater(exc.code, delay, key=workflow_id.encode(),
                          headers={SUBMITTED_AT: str(submitted_at).encode(), RUN_ID: run_id.encode()})

    async def fail_the_certainly_too_large(self, tasks, src_w: int, src_h: int) -> list:
        """The tasks whose output is over IMAGEFORK_MAX_PIXELS whatever happens (from the source's header,
        either orientation) end FAILED here with IMAGE_TOO_LARGE and the limit in the message, before any
        runs (a 9000x9000 box over a 2:1 source is 40 MP and goes on); returns the others."""
        limit = self.config.limits.max_pixels
        keep, failed = [], []
        for task in tasks:
            spec = task_spec(task.to_dict())
            if certain_output_pixels(src_w, src_h, spec) <= limit:
                keep.append(task)
                continue
            w, h = target_size(src_w, src_h, spec)
            message = (f"output {task.width}x{task.height} of this {src_w}x{src_h} source would be {w}x{h} = "
                       f"{w * h} pixels, more than the limit of {limit} (IMAGEFORK_MAX_PIXELS)")
            result = TaskResult(task.workflowId, task.taskRef, FAILED, 1, now_ms(), runId=task.runId,
                                deadline=task.deadline, error=TaskError(task.taskRef, "IMAGE_TOO_LARGE", message, 1))
            failed.append((task.workflowId.encode(), serde.encode_join_event("TaskResult", result.to_dict())))
        if failed:
            await send_all(self.topics.events, failed)
            log.info("workflow %s: %d output(s) over the pixel limit failed at planning", tasks[0].workflowId,
                     len(failed))
        return keep

    def _stage(self, location: str, workflow_id: str, run_id: str) -> tuple[str, tuple[int, int], str]:
        """Stage the source (an S3 one is read where it is); its URI, its header's size and its bytes' SHA-256
        (what an output is reused by: the same bytes, whatever URL they came from)."""
        lim = self.config.limits
        if location.startswith("s3://"):
            bucket, _, key = location[len("s3://"):].partition("/")
            if not self.config.s3_source_allowed(bucket, key):
                raise SourceForbidden(f"s3://{bucket}/ sources are not allowed here (IMAGEFORK_SOURCE_S3_ALLOW "
                                      f"lists the buckets and prefixes a request may read)")
            data = self.store.get(location, lim.max_source_bytes)
            _fmt, width, height = probe_image(data, lim)
            return location, (width, height), hashlib.sha256(data).hexdigest()
        started = time.perf_counter()
        key = staging_key(self.config.staging_prefix, workflow_id, run_id)
        kept, got = self.sources.revalidated(location, key)
        if kept is not None:
            return kept
        got = got or fetch_http_validated(location, lim, self.config.fetch_allow_networks)
        data = got.data
        _fmt, width, height = probe_image(data, lim)
        sha = hashlib.sha256(data).hexdigest()
        fetched = time.perf_counter()
        self.store.put(key, data, "application/octet-stream")
        self.sources.keep(location, got, key, sha, (width, height), len(data))
        STAGE_SECONDS.labels("planner", "fetch").observe(fetched - started)
        STAGE_SECONDS.labels("planner", "stage").observe(time.perf_counter() - fetched)
        return self.store.uri(key), (width, height), sha

    async def send_plan(self, plan: WorkflowPlan) -> None:
        await send(self.topics.events, key=plan.workflowId.encode(),
                   value=serde.encode_join_event("WorkflowPlan", plan.to_dict()))


class Revalidator:
    """With IMAGEFORK_REUSE on, a source seen before is asked for only if it changed: the validators and hash
    of the bytes last fetched from each URL (the newest 10,000), and a copy of those bytes kept by their
    hash beside the reuse pointers."""

    def __init__(self, config: Config, store: ObjectStore):
        self.config, self.store = config, store
        self.validators: OrderedDict[str, dict] = OrderedDict()

    def revalidated(self, location: str, key: str) -> tuple[tuple[str, tuple[int, int], str] | None, Fetched | None]:
        """With reuse on, a URL fetched before is asked with its validators: a ``304 Not Modified`` stages the
        copy kept of its bytes (a server-side copy) instead of downloading them again, and is returned
        staged; a 200 is returned fetched. (None, None): not known, or the kept copy failed: fetch it whole."""
        if scope_prefix(self.config.reuse, self.config.output_prefix) is None:
            return None, None
        known = self.validators.get(location)
        if known is None:
            return None, None
        got = fetch_http_validated(location, self.config.limits, self.config.fetch_allow_networks,
                                   etag=known["etag"], last_modified=known["lastModified"])
        if got.data is not None:
            return None, got
        copy = source_key(self.config.staging_prefix, known["sha256"])
        try:
            head = self.store.head(copy)
            if head is None or head.get("ContentLength") != known["bytes"]:
                raise LookupError("the kept copy is gone")
            self.store.copy(copy, key, "application/octet-stream", {})
        except Exception as exc:  # a copy that fails (deleted meanwhile, refused): the source is fetched whole
            log.info("source %s not modified, but its kept copy cannot be staged (%s: %s): fetched whole",
                     location[:200], type(exc).__name__, str(exc)[:200])
            self.validators.pop(location, None)
            return None, None
        SOURCES_REVALIDATED.inc()
        return (self.store.uri(key), known["size"], known["sha256"]), None

    def keep(self, location: str, got: Fetched, key: str, sha: str, size: tuple[int, int], length: int) -> None:
        """Remember a fetched source's validators, and keep a copy of its bytes by their hash, so that the
        next request for it can be answered 304 and staged without a download (reuse on only; never the
        request's failure)."""
        if scope_prefix(self.config.reuse, self.config.output_prefix) is None:
            return
        if got.redirected or not (got.etag or got.last_modified):
            self.validators.pop(location, None)
            return
        copy = source_key(self.config.staging_prefix, sha)
        try:
            if self.store.head(copy) is None:
                self.store.copy(key, copy, "application/octet-stream", {})
        except Exception as exc:
            log.warning("source %s: its copy for revalidation was not kept (%s: %s)", location[:200],
                        type(exc).__name__, str(exc)[:200])
            return
        self.validators.pop(location, None)
        self.validators[location] = {"etag": got.etag, "lastModified": got.last_modified, "sha256": sha,
                                     "size": size, "bytes": length}
        while len(self.validators) > 10_000:
            self.validators.popitem(last=False)


async def send_tasks(lane: TopicLike, tasks: list, spots: list[int | None]) -> None:
    """Send a request's tasks, largest outputs first (the longest start first, so the workflow ends sooner),
    the first to the first of ``spots`` (their partitions: ``Dealer.deal``) and so on."""
    ordered = sorted(tasks, key=lambda t: t.width * t.height, reverse=True)
    await send_all(lane, [(f"{t.workflowId}/{t.taskRef}".encode(), serde.encode("ResizeTask", t.to_dict()))
                          for t in ordered], partitions=spots)


def run(config: Config) -> int:
    """The planner role: its agents on a confluent-kafka loop (adapters/agent_loop.py), until a signal."""
    async def setup(topics: Topics) -> tuple[AgentLoop, Callable[[], None]]:
        planner = Planner(config, topics, ObjectStore(config))

        def policy(name: str) -> MessagePolicy:
            return MessagePolicy(name, config, dead_letter=topics.dead_letter, retry_topic=topics.request_retries,
                                 retry_headers=Planner.retry_headers)

        # both request lanes run up to the planner's slots at once; planner.gate shares the slots between them
        # (interactive first; batch with what is left, and its share). A request waiting on the retry topic for
        # its not-before time only sleeps: many wait at once
        agents = AgentLoop(config, "planner", [
            policy_lane(topics.requests, policy("planner"), planner.handle_message, config.planner_concurrency),
            policy_lane(topics.requests_batch, policy("planner.batch"),
                        lambda msg: planner.handle_message(msg, BATCH), config.planner_concurrency),
            policy_lane(topics.request_retries, policy("planner.retry"), planner.release, 64),
        ])
        planner.presets.start()
        await asyncio.to_thread(planner.store.ensure_bucket)
        return agents, lambda: None

    return run_agents(config, "planner", setup)


def request_lane(value: bytes | None) -> str:
    """The lane of a request's bytes (not a request: interactive, and handle() says what it is)."""
    try:
        return lane_of(serde.decode_request_bytes(value or b"").get("priority") or "")
    except (SerdeError, AttributeError):
        return INTERACTIVE


def _text(value) -> str | None:
    """A string field of a request as UTF-8 can carry it (a lone surrogate, valid in JSON, becomes "?")."""
    if not isinstance(value, str):
        return None
    return value.encode("utf-8", "replace").decode("utf-8")
