"""``imagefork api``: the HTTP API and the dashboard (aiohttp).

- A workflow's status comes from the join's state: the API finds the join process that owns the
  workflow's partition in the join group's description (each join's client id carries the URL of its
  own endpoints) and asks it (``/internal/workflows/{id}``). During a rebalance it asks again until the
  new owner has restored the partition. A finished workflow's document is its final event, read from
  the completed topic into an index this process keeps.
- Requests are validated like the planner does, then produced to the request topic.
- A retry produces the finished run's request again with a ``retry`` field: the planner runs only the
  failed and timed-out tasks, the join opens the workflow again with the kept outputs, and the new
  final event lists every output.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import aiohttp
from aiohttp import web
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from streams import serde
from streams.adapters.http import health_routes, json_error
from streams.adapters.kafka import client_config, partition_for
from streams.adapters.lag import register_lag
from streams.adapters.objectstore import ObjectStore
from streams.client import Client, SubmitError
from streams.config import Config, parse_host_port
from streams.core.errors import PipelineError, RequestInvalid
from streams.core.models import WorkflowCompleted
from streams.core.planning import parse_request, valid_workflow_id
from streams.core.status import (
    STATUSES, TERMINAL, final_doc, marker_doc, pending_doc, retry_request, retryable, running_doc, summary,
)
from streams.errors import StartError
from streams.join.queries import CLIENT_ID

log = logging.getLogger("imagefork")
DASHBOARD = Path(__file__).parent / "assets" / "dashboard.html"
MAX_BODY = 1024 * 1024
BODY_TIMEOUT_S = float(os.environ.get("IMAGEFORK_API_BODY_TIMEOUT_S", "30"))  # to read a whole request body
MAX_OUTPUT_BYTES = 256 * 1024 * 1024


class Unavailable(Exception):
    """No join answers for the workflow's partition (yet)."""


def now_ms() -> int:
    return int(time.time() * 1000)


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
        consumer = Consumer(client_config(self.config, **{
            "group.id": f"imagefork-api-{uuid.uuid4()}", "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest"}))
        try:
            meta = consumer.list_topics(topic, timeout=30).topics.get(topic)
            if meta is None or meta.error is not None:
                raise KafkaException(f"topic {topic} is not there")
            ends = {}
            for p in meta.partitions:
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                ends[p] = high
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
            while not self.stopping:
                msgs = consumer.consume(500, timeout=0.2)
                for msg in msgs:
                    if msg.error() is not None or msg.value() is None:
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
                if not self.caught_up.is_set() and not msgs:
                    # a partition not fetched yet has no position (negative): not caught up unless empty
                    positions = consumer.position([TopicPartition(topic, p) for p in ends])
                    if all(ends[tp.partition] <= 0 or tp.offset >= ends[tp.partition] for tp in positions):
                        self.caught_up.set()
        finally:
            consumer.close()


class JoinRouter:
    """Which join process owns a workflow's partition, and its answer."""

    def __init__(self, config: Config, session: aiohttp.ClientSession):
        self.config, self.session = config, session
        self.admin = AdminClient(client_config(config))
        self.group = config.group_id("join")
        self.owners: dict[int, str] = {}  # events partition -> join URL
        self.urls: list[str] = []
        self.partitions = 0
        self.fresh_at = 0.0
        self.describing = asyncio.Lock()

    def _describe(self, timeout_s: float = 10.0) -> None:
        try:
            self._describe_with(self.admin, timeout_s)
        except Exception:
            # a client whose calls failed (the broker away, restarted) may stay stuck timing out after the
            # broker is back: the next look uses a new one
            self.admin = AdminClient(client_config(self.config))
            raise

    def _describe_with(self, admin: AdminClient, timeout_s: float = 10.0) -> None:
        topic = self.config.topics.events
        meta = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
        partitions = len(meta.partitions) if meta is not None and meta.error is None else 0
        group = admin.describe_consumer_groups([self.group], request_timeout=timeout_s)[self.group].result()
        owners, urls = {}, []
        for member in group.members:
            name, _, url = (member.client_id or "").partition(" ")
            if name != CLIENT_ID or not url:
                continue
            urls.append(url)
            for tp in member.assignment.topic_partitions:
                if tp.topic == topic:
                    owners[tp.partition] = url
        self.owners, self.urls, self.partitions, self.fresh_at = owners, urls, partitions, time.monotonic()

    async def refresh(self, max_age_s: float = 2.0, timeout_s: float = 10.0) -> None:
        if time.monotonic() - self.fresh_at > max_age_s:
            async with self.describing:  # many requests at once: one look at the group serves them all
                if time.monotonic() - self.fresh_at > max_age_s:
                    await asyncio.to_thread(self._describe, timeout_s)

    async def ask(self, workflow_id: str, patience_s: float = 15.0) -> dict:
        """The owner's answer for ``workflow_id`` (state open, finished or unknown); asks again while the
        partition has no owner or its owner has not restored it (a rebalance), up to ``patience_s``."""
        give_up = time.monotonic() + patience_s
        last = "no join process is running"
        while True:
            try:
                # a broker away: each Kafka call waits no longer than the caller's patience (a submit's
                # look-up, 3 s, waited the calls' own 10 s before its produce got its 10 s)
                await self.refresh(timeout_s=min(10.0, max(1.0, give_up - time.monotonic())))
                if not self.urls and time.monotonic() - self.fresh_at < 1.0:
                    # the group, just described, has no join at all: nothing to wait for
                    raise Unavailable(f"no join process is running (the group {self.group} has no members)")
                if self.partitions:
                    url = self.owners.get(partition_for(workflow_id.encode(), self.partitions))
                    if url is None:
                        last = "the workflow's partition has no join process (a rebalance, or none running)"
                    else:
                        async with self.session.get(f"{url}/internal/workflows/{workflow_id}",
                                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                            body = await resp.json()
                            if resp.status == 200:
                                return body
                            last = f"the join at {url} answered {resp.status}: {body.get('message')}"
            except (aiohttp.ClientError, asyncio.TimeoutError, KafkaException, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > give_up:
                raise Unavailable(last)
            self.fresh_at = 0.0  # ask the group again
            await asyncio.sleep(0.25)

    async def open_workflows(self, limit: int) -> list[dict]:
        await self.refresh()

        async def one(url):
            try:
                async with self.session.get(f"{url}/internal/open", params={"limit": str(limit)},
                                            timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    return (await resp.json()).get("workflows", []) if resp.status == 200 else []
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return []

        lists = await asyncio.gather(*(one(u) for u in self.urls))
        return [w for found in lists for w in found]


class Api:
    def __init__(self, config: Config):
        self.config = config
        self.index = CompletedIndex(config)
        self.accepted: OrderedDict[str, tuple[int, str]] = OrderedDict()  # id -> (accepted at, location)
        self.retries: dict[str, tuple[str, int]] = {}  # id -> (the run retried, when), until the retry shows
        # one submit or retry at a time per workflow id: two at once would both find it unknown (or
        # finished) and both send
        self.busy: dict[str, list] = {}  # id -> [its lock, holder and waiters]
        self.polls: dict[str, tuple[float, asyncio.Future]] = {}  # id -> the last look the streams share
        self.router: JoinRouter | None = None
        self.client = None
        self.store = None

    # --- set-up ---------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self.errors])
        app.add_routes([
            web.get("/", self.dashboard),
            web.post("/v1/workflows", self.submit),
            web.get("/v1/workflows", self.listing),
            web.get("/v1/workflows/{id}", self.status),
            web.get("/v1/workflows/{id}/events", self.events),
            web.post("/v1/workflows/{id}/retry", self.retry),
            web.get("/v1/workflows/{id}/outputs/{ref}", self.output),
            *health_routes(self.config, "api", self.readiness),
        ])
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        self.session = aiohttp.ClientSession()
        self.router = JoinRouter(self.config, self.session)
        self.client = Client(self.config)
        self.store = ObjectStore(self.config)
        self.index.start(asyncio.get_running_loop())

    async def _stop(self, _app) -> None:
        self.index.stopping = True
        await self.session.close()

    def readiness(self) -> tuple[bool, str]:
        if not self.index.caught_up.is_set():
            return False, f"reading {self.config.topics.completed}"
        return True, f"{len(self.index.finals)} finished workflows indexed"

    @web.middleware
    async def errors(self, request, handler):
        """Every error is JSON, with a code and a message."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.content_type == "application/json" or exc.status < 400:
                raise
            resp = json_error(exc.status, exc.reason.upper().replace(" ", "_"), exc.text or exc.reason)
            for name in ("Allow", "Retry-After"):
                if name in exc.headers:
                    resp.headers[name] = exc.headers[name]
            return resp
        except Unavailable as exc:
            resp = json_error(503, "JOIN_UNAVAILABLE", f"the join's state cannot be asked now: {exc}")
            resp.headers["Retry-After"] = "5"
            return resp
        except Exception as exc:  # a bug: say so in JSON, log the trace
            log.exception("api: %s %s failed", request.method, request.path)
            return json_error(500, "INTERNAL", f"{type(exc).__name__}: {exc}"[:500])

    # --- pages ----------------------------------------------------------------------------------
    async def dashboard(self, _request):
        if not DASHBOARD.exists():
            return json_error(404, "NO_DASHBOARD", "the dashboard is not installed")
        return web.Response(body=DASHBOARD.read_bytes(), content_type="text/html", charset="utf-8")

    # --- workflows ------------------------------------------------------------------------------
    @staticmethod
    def _foreign(request) -> web.Response | None:
        """A browser's POST from another site (a form or fetch aimed at this API on localhost): refused. Any
        client may POST; a browser says where the page that sends it came from."""
        origin = request.headers.get("Origin")
        if not origin or origin.split("://", 1)[-1] == request.host:  # not a browser, or our own page
            return None
        return json_error(403, "FOREIGN_ORIGIN", f"a page from {origin} may not POST here")  # "null" too

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, workflow_id: str):
        """Submits and retries of one workflow id, one after another. The entry counts its holder and its
        waiters, and goes when the last has left (a lock dropped while a waiter was being woken would let
        a newcomer in beside it)."""
        entry = self.busy.get(workflow_id)
        if entry is None:
            entry = self.busy[workflow_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self.busy[workflow_id]

    async def _send(self, body: dict, workflow_id: str) -> web.Response | None:
        """Produce; a Kafka that does not confirm within 10 s is a 503 the client may repeat."""
        try:
            await asyncio.to_thread(self.client.submit, body, workflow_id, timeout_s=10.0)
        except SubmitError as exc:
            resp = json_error(503, "KAFKA_UNAVAILABLE",
                              f"{exc}; it may still be delivered once Kafka answers: send it again with the same "
                              f"workflowId ({workflow_id}), which is never run twice")
            resp.headers["Retry-After"] = "5"
            return resp
        return None

    async def submit(self, request):
        refused = self._foreign(request)
        if refused is not None:
            return refused
        try:
            # a body that trickles (a Content-Length never met) would hold a connection for ever
            doc = await asyncio.wait_for(request.json(loads=json.loads), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            return json_error(408, "REQUEST_TIMEOUT", f"the body did not arrive within {BODY_TIMEOUT_S:.0f}s")
        except (ValueError, UnicodeDecodeError, RecursionError, LookupError) as exc:
            return json_error(400, "INVALID_JSON", f"the body is not JSON: {type(exc).__name__}: {exc}"[:300])
        except web.RequestPayloadError as exc:
            return json_error(400, "INVALID_BODY", f"the body cannot be read: {exc}"[:300])
        lim = self.config.limits
        try:
            if isinstance(doc, dict) and "retry" in doc:
                raise RequestInvalid([("retry", "is set by POST /v1/workflows/{id}/retry, not by a request")])
            parsed = parse_request(doc, max_dimension=lim.max_dimension, max_tasks=lim.max_tasks,
                                   max_pixels=lim.max_pixels)
        except RequestInvalid as exc:
            return json_error(400, "INVALID_REQUEST", exc.message,
                              problems=[{"field": f, "message": m} for f, m in exc.problems])
        workflow_id = parsed.workflowId or str(uuid.uuid4())
        location = {"Location": f"/v1/workflows/{workflow_id}"}
        async with self._one_at_a_time(workflow_id):
            try:
                existing = await self._known(workflow_id, patience_s=3.0)
            except Unavailable:  # no join to ask: the request waits in Kafka; a duplicate id is ignored there
                existing = None
            if existing is not None:  # the same id again: nothing is sent twice
                return web.json_response({"workflowId": workflow_id, "status": existing["status"],
                                          "existing": True, "links": self._links(workflow_id)},
                                         status=200, headers=location)
            doc = {**doc, "workflowId": workflow_id}
            failed = await self._send(doc, workflow_id)
            if failed is not None:
                return failed
            self._remember(workflow_id, parsed.fileLocation)
        log.info("api: workflow %s accepted", workflow_id)
        return web.json_response({"workflowId": workflow_id, "status": "PENDING", "existing": False,
                                  "links": self._links(workflow_id)}, status=202, headers=location)

    def _remember(self, workflow_id: str, location: str) -> None:
        self.accepted.pop(workflow_id, None)
        self.accepted[workflow_id] = (now_ms(), location)
        while len(self.accepted) > 10_000:
            self.accepted.popitem(last=False)

    @staticmethod
    def _links(workflow_id: str) -> dict:
        base = f"/v1/workflows/{workflow_id}"
        return {"self": base, "events": f"{base}/events", "retry": f"{base}/retry"}

    async def _known(self, workflow_id: str, patience_s: float = 10.0) -> dict | None:
        """The workflow's document, or None when no one has heard of it. A retry just sent shows as
        PENDING until its run replaces the one it retries (for at most the workflow timeout)."""
        doc = await self._lookup(workflow_id, patience_s)
        retried = self.retries.get(workflow_id)
        if retried is not None and doc is not None:
            run_id, at = retried
            if doc["runId"] == run_id and now_ms() - at < self.config.workflow_timeout_s * 1000:
                return {**pending_doc(workflow_id, at, doc["fileLocation"]), "retryOf": run_id}
            del self.retries[workflow_id]
        return doc

    async def _lookup(self, workflow_id: str, patience_s: float) -> dict | None:
        try:
            answer = await self.router.ask(workflow_id, patience_s)
        except Unavailable:
            # no join answers for its partition now (one was killed and its session has not expired,
            # or none runs): a finished workflow is still answered from its final event, and one this
            # process accepted is PENDING (its request waits in Kafka)
            final = self.index.get(workflow_id)
            if final is not None:
                return final_doc(final)
            if workflow_id in self.accepted:
                at, location = self.accepted[workflow_id]
                return pending_doc(workflow_id, at, location)
            raise
        state = answer.get("state")
        if state == "open":
            return running_doc(answer)
        if state == "finished":
            final = await self._final(workflow_id, answer.get("runId", ""))
            return final_doc(final) if final is not None else marker_doc(answer)
        final = self.index.get(workflow_id)  # its marker expired; its final event is still on the topic
        if final is not None:
            return final_doc(final)
        if workflow_id in self.accepted:
            at, location = self.accepted[workflow_id]
            return pending_doc(workflow_id, at, location)
        return None

    async def _final(self, workflow_id: str, run_id: str, wait_s: float = 5.0) -> WorkflowCompleted | None:
        """The final event of that run (the index may be a moment behind the join's state)."""
        give_up = time.monotonic() + wait_s
        while True:
            final = self.index.get(workflow_id)
            if final is not None and (not run_id or not final.runId or final.runId == run_id):
                return final
            if time.monotonic() > give_up:
                return final
            await asyncio.sleep(0.1)

    async def status(self, request):
        workflow_id = self._id(request)
        doc = await self._known(workflow_id)
        if doc is None:
            return json_error(404, "NOT_FOUND", f"no workflow {workflow_id!r} is known here")
        return web.json_response(doc)

    def _id(self, request) -> str:
        workflow_id = request.match_info["id"]
        if not valid_workflow_id(workflow_id):
            raise web.HTTPBadRequest(text=json.dumps({
                "error": "INVALID_ID", "message": "a workflow id is 1-128 characters of A-Z a-z 0-9 . _ : -"}),
                content_type="application/json")
        return workflow_id

    async def listing(self, request):
        status = request.query.get("status", "").upper() or None
        if status is not None and status not in STATUSES:
            return json_error(400, "INVALID_REQUEST", f"status must be one of {', '.join(STATUSES)}",
                              problems=[{"field": "status", "message": f"{status!r} is not one of {', '.join(STATUSES)}"}])
        try:
            limit = int(request.query.get("limit", "50"))
            if not 1 <= limit <= 1000:
                raise ValueError
        except ValueError:
            return json_error(400, "INVALID_REQUEST", "limit must be an integer 1-1000",
                              problems=[{"field": "limit", "message": "must be an integer 1-1000"}])
        rows: dict[str, dict] = {}
        for final in self.index.recent():
            rows[final.workflowId] = summary(final_doc(final))
        try:
            open_now = await self.router.open_workflows(limit)
        except KafkaException as exc:  # the broker away: the finished ones, and say so
            open_now = []
            log.warning("api: the open workflows cannot be listed now: %s", exc)
        for w in open_now:
            rows[w["workflowId"]] = {"workflowId": w["workflowId"], "status": "RUNNING", "runId": w["runId"],
                                     "fileLocation": w["fileLocation"], "submittedAt": w["submittedAt"],
                                     "completedAt": None,
                                     "progress": {"done": w["done"], "total": w["total"], "failed": w["failed"]}}
        for wf, (at, location) in self.accepted.items():
            if wf not in rows:
                rows[wf] = summary(pending_doc(wf, at, location))
        chosen = [r for r in rows.values() if status is None or r["status"] == status]
        chosen.sort(key=lambda r: r.get("submittedAt") or 0, reverse=True)
        return web.json_response({"workflows": chosen[:limit]})

    async def output(self, request):
        workflow_id, ref = self._id(request), request.match_info["ref"]
        doc = await self._known(workflow_id)
        found = next((o for o in (doc or {}).get("outputs", []) if o["taskRef"] == ref), None)
        if found is None:
            return json_error(404, "NOT_FOUND", f"workflow {workflow_id!r} has no output {ref!r} (yet)")
        try:
            data = await asyncio.to_thread(self.store.get, found["s3Uri"], MAX_OUTPUT_BYTES)
        except PipelineError as exc:
            if exc.code == "SOURCE_NOT_FOUND":  # the object was deleted (a lifecycle rule, by hand)
                return json_error(410, "OUTPUT_GONE",
                                  f"output {ref!r} of {workflow_id} is no longer in the bucket ({found['s3Uri']})")
            return json_error(502, exc.code, f"the object store: {exc.message}")
        return web.Response(body=data, content_type=found["contentType"],
                            headers={"Cache-Control": "private, max-age=300"})

    async def events(self, request):
        """Server-sent events: ``progress`` as tasks finish, then ``final`` (the whole document)."""
        workflow_id = self._id(request)
        doc = await self._known(workflow_id)
        if doc is None:
            return json_error(404, "NOT_FOUND", f"no workflow {workflow_id!r} is known here")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)

        async def send(event: str, data: dict) -> None:
            await resp.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

        seen: dict[str, str] = {}
        told_pending = False
        last_beat = time.monotonic()
        try:
            while True:
                # every task that finished since the last look, in the order they finished (the ones the
                # final document reports too: a stream shows each task once, then the end)
                finished = [t for t in doc["tasks"] if t["status"] != "PENDING" and seen.get(t["taskRef"]) != t["status"]]
                finished.sort(key=lambda t: t["finishedAt"] or 0)
                for task in finished:
                    seen[task["taskRef"]] = task["status"]
                    await send("progress", {**doc["progress"], "done": len(seen), "status": doc["status"],
                                            "task": task})
                if doc["status"] in TERMINAL:
                    await send("final", doc)
                    break
                if doc["status"] == "PENDING" and not told_pending:
                    await send("progress", {**doc["progress"], "status": doc["status"], "task": None})
                    told_pending = True
                if time.monotonic() - last_beat > 15:
                    await resp.write(b": keep-alive\n\n")
                    last_beat = time.monotonic()
                await asyncio.sleep(0.25)
                if request.transport is None or request.transport.is_closing():
                    return resp  # the client has gone: stop asking for it
                try:
                    doc = await self._poll(workflow_id) or doc
                except Unavailable as exc:  # the headers are sent: say it in the stream, and end it
                    await send("error", {"error": "JOIN_UNAVAILABLE", "message": f"the join's state cannot be "
                                         f"asked now: {exc}", "retryAfter": 5})
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            return resp
        await resp.write_eof()
        return resp

    async def _poll(self, workflow_id: str, every_s: float = 0.25) -> dict | None:
        """A stream's look at its workflow, shared by every stream that follows the same one: 200 streams on
        a workflow ask its join 4 times a second, not 800."""
        now = time.monotonic()
        last = self.polls.get(workflow_id)
        if last is None or now - last[0] >= every_s:
            if len(self.polls) > 1000:
                self.polls = {k: v for k, v in self.polls.items() if now - v[0] < 10}
            last = self.polls[workflow_id] = (now, asyncio.ensure_future(self._known(workflow_id)))
        return await asyncio.shield(last[1])  # a stream that goes away does not cancel the others' look

    async def retry(self, request):
        refused = self._foreign(request)
        if refused is not None:
            return refused
        workflow_id = self._id(request)
        async with self._one_at_a_time(workflow_id):
            return await self._retry(workflow_id)

    async def _retry(self, workflow_id: str):
        doc = await self._known(workflow_id)
        if doc is None:
            return json_error(404, "NOT_FOUND", f"no workflow {workflow_id!r} is known here")
        if doc["status"] not in TERMINAL:
            return json_error(409, "NOT_FINISHED", f"workflow {workflow_id} is {doc['status']}: retry it once it has ended")
        final = self.index.get(workflow_id)
        if final is None:
            return json_error(409, "NO_FINAL_EVENT", f"the final event of {workflow_id} is no longer on "
                                                     f"{self.config.topics.completed}: submit it again")
        ok, why = retryable(final)
        if not ok:
            return json_error(409, "NOT_RETRYABLE", f"workflow {workflow_id} cannot be retried: {why}")
        body, refs = retry_request(final)
        failed = await self._send(body, workflow_id)
        if failed is not None:
            return failed
        self.retries[workflow_id] = (final.runId, now_ms())
        log.info("api: workflow %s: retry of run %s sent (%s)", workflow_id, final.runId,
                 f"{len(refs)} tasks" if refs else "every task")
        return web.json_response({"workflowId": workflow_id, "retryOf": final.runId, "tasks": refs or "all",
                                  "links": self._links(workflow_id)}, status=202,
                                 headers={"Location": f"/v1/workflows/{workflow_id}"})


def check_listen(host: str, port: int) -> None:
    """A taken or impossible address is one line (StartError), not aiohttp's traceback."""
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _name, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise StartError(f"the API cannot listen on {host}:{port} (IMAGEFORK_API_LISTEN): "
                         f"{exc.strerror or exc}") from None


def run(config: Config) -> int:
    host, port = parse_host_port(config.api_listen)
    register_lag(config, ["planner", "resize", "join"])  # the whole pipeline's lag on the API's /metrics
    check_listen(host, port)
    api = Api(config)
    app = api.app()

    async def announce(_app):
        print(f"imagefork api: http://{host if host not in ('0.0.0.0', '') else '127.0.0.1'}:{port}/ "
              f"(dashboard; the API under /v1/workflows)", flush=True)
        log.info("imagefork ready: api on %s:%d", host, port)

    app.on_startup.append(announce)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
    return 0
