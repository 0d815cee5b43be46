"""The API's HTTP side (aiohttp): the application, its error middleware, the handlers and the event
stream. A handler parses the request, asks the workflow directory (``directory.py``) and shapes the
answer; every error is JSON with a code and a message."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

from streams.adapters.http import health_routes, json_body, json_error, path_part
from streams.adapters.objectstore import ObjectStore
from streams.adapters.presets import PresetTable
from streams.api.auth import WORKFLOW, Gate, foreign, middleware, session_routes
from streams.api.control import cancel_workflow, links, not_found, retry_workflow
from streams.api.directory import Directory, Unavailable
from streams.api.index import CompletedIndex, DeliveryIndex, SourceIndex
from streams.api.presets import routes as preset_routes, unavailable
from streams.api.router import JoinRouter
from streams.client import Client, SubmitError
from streams.config import Config
from streams.core.errors import PipelineError, RequestInvalid
from streams.core.planning import parse_request, valid_workflow_id
from streams.core.status import STATUSES, TERMINAL

log = logging.getLogger("imagefork")
DASHBOARD = Path(__file__).parent.parent / "assets" / "dashboard.html"
MAX_BODY = 1024 * 1024
MAX_OUTPUT_BYTES = 256 * 1024 * 1024
SHA256 = re.compile(r"[0-9a-f]{64}")
PHASH = re.compile(r"[0-9a-f]{16}")


@web.middleware
async def errors(request, handler):
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
        return join_unavailable(exc)
    except Exception as exc:  # a bug: say so in JSON, log the trace
        log.exception("api: %s %s failed", request.method, request.path)
        return json_error(500, "INTERNAL", f"{type(exc).__name__}: {exc}"[:500])


def join_unavailable(exc: Unavailable) -> web.Response:
    resp = json_error(503, "JOIN_UNAVAILABLE", f"the join's state cannot be asked now: {exc}")
    resp.headers["Retry-After"] = "5"
    return resp


def still_reading(topic: str) -> web.Response:
    """A question about what a topic holds, asked before the API has read it to its end."""
    resp = json_error(503, "UNAVAILABLE", f"the API is still reading {topic}; ask again")
    resp.headers["Retry-After"] = "2"
    return resp


def source_answer(sources, sha: str, topic: str) -> web.Response:
    sha = sha.strip().lower()
    if not SHA256.fullmatch(sha):
        return json_error(400, "INVALID_REQUEST", "a source is named by its SHA-256: 64 hex digits",
                          problems=[{"field": "sha256", "message": "must be 64 hex digits"}])
    doc = sources.source(sha)
    if doc is None and not sources.caught_up.is_set():
        return still_reading(topic)
    if doc is None:
        return json_error(404, "NOT_FOUND", f"no workflow made from source {sha} is known here")
    return web.json_response(doc)


def similar_answer(sources, query, topic: str) -> web.Response:
    problems = []
    phash = query.get("phash", "").strip().lower()
    if not PHASH.fullmatch(phash):
        problems.append({"field": "phash", "message": "must be 16 hex digits (a 64-bit pHash, as the facts say)"})
    numbers = {}
    for name, default, low, top in (("distance", 8, 0, 64), ("limit", 50, 1, 500)):
        try:
            numbers[name] = int(query.get(name, str(default)))
            if not low <= numbers[name] <= top:
                raise ValueError
        except ValueError:
            problems.append({"field": name, "message": f"must be an integer {low}-{top}"})
    if problems:
        return json_error(400, "INVALID_REQUEST", "; ".join(f"{p['field']} {p['message']}" for p in problems),
                          problems=problems)
    if not sources.caught_up.is_set():
        return still_reading(topic)
    found = sources.similar(int(phash, 16), numbers["distance"], numbers["limit"])
    return web.json_response({"phash": phash, "distance": numbers["distance"], "sources": found})


def workflow_id_of(request) -> str:
    return path_part(request, "id", valid_workflow_id, "INVALID_ID",
                     "a workflow id is 1-128 characters of A-Z a-z 0-9 . _ : -")


async def stream(request, doc: dict, poll: Callable[[], Awaitable[dict | None]]) -> web.StreamResponse:
    """Server-sent events: ``progress`` as tasks finish, then ``final`` (the whole document); ``doc`` is the
    first look, ``poll`` the next ones."""
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
                doc = await poll() or doc
            except Unavailable as exc:  # the headers are sent: say it in the stream, and end it
                await send("error", {"error": "JOIN_UNAVAILABLE", "message": f"the join's state cannot be "
                                     f"asked now: {exc}", "retryAfter": 5})
                break
    except (ConnectionResetError, asyncio.CancelledError):
        return resp
    await resp.write_eof()
    return resp


class Api:
    """The handlers, and what they share: the directory, the index, the Kafka client and the store."""

    def __init__(self, config: Config):
        self.config = config
        self.index = CompletedIndex(config)
        self.sources = SourceIndex(config)
        self.deliveries = DeliveryIndex(config)
        self.directory = Directory(self.index, workflow_timeout_s=config.workflow_timeout_s)
        self.gate = Gate(config)
        self.presets = PresetTable(config)
        self.client = None
        self.store = None

    # --- set-up ---------------------------------------------------------------------------------
    def app(self) -> web.Application:
        routes = [  # method, path, handler, the scope a token needs (streams/core/access.py)
            ("GET", "/v1/workflows", self.listing, "read"),
            ("POST", "/v1/workflows", self.submit, "submit"),
            ("GET", "/v1/workflows/{id}", self.status, "read"),
            ("GET", "/v1/workflows/{id}/events", self.events, "read"),
            ("POST", "/v1/workflows/{id}/retry", self.retry, "operate"),
            ("POST", "/v1/workflows/{id}/cancel", self.cancel, "operate"),
            ("GET", "/v1/workflows/{id}/outputs/{ref}", self.output, "read"),
            ("GET", "/v1/sources/{sha256}", self.source, "read"),
            ("GET", "/v1/similar", self.similar, "read"),
            *preset_routes(self),
        ]
        self.scopes = {(method, path): scope for method, path, _handler, scope in routes}
        app = web.Application(client_max_size=MAX_BODY, middlewares=[middleware(self.gate, self.scopes), errors])
        app.add_routes([
            web.get("/", self.dashboard),  # the page itself holds no data: it signs in (/v1/session)
            *(web.get(path, handler) if method == "GET" else web.route(method, path, handler)
              for method, path, handler, _scope in routes),
            *session_routes(self.gate),
            *health_routes(self.config, "api", self.readiness),
        ])
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        self.session = aiohttp.ClientSession()
        self.directory.join = JoinRouter(self.config, self.session)
        self.client = Client(self.config)
        self.store = ObjectStore(self.config)
        self.index.start(asyncio.get_running_loop())
        self.sources.start(asyncio.get_running_loop())
        self.deliveries.start(asyncio.get_running_loop())
        self.presets.start()

    async def _stop(self, _app) -> None:
        self.index.stopping = self.sources.stopping = self.deliveries.stopping = self.presets.stopping = True
        await self.session.close()

    def readiness(self) -> tuple[bool, str]:
        if not self.index.caught_up.is_set():
            return False, f"reading {self.config.topics.completed}"
        return True, f"{len(self.index.finals)} finished workflows indexed"

    # --- pages ----------------------------------------------------------------------------------
    async def dashboard(self, _request):
        if not DASHBOARD.exists():
            return json_error(404, "NO_DASHBOARD", "the dashboard is not installed")
        return web.Response(body=DASHBOARD.read_bytes(), content_type="text/html", charset="utf-8")

    # --- workflows ------------------------------------------------------------------------------
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
        refused = foreign(request)
        if refused is not None:
            return refused
        doc, refused = await json_body(request, self.config.api_body_timeout_s)
        if refused is not None:
            return refused
        lim = self.config.limits
        presets = None
        if isinstance(doc, dict) and isinstance(doc.get("preset"), str):  # checked as the planner will
            presets = await asyncio.to_thread(self.presets.for_name, doc["preset"], 5.0)
            if presets is None:
                return unavailable("the presets topic cannot be read")
        try:
            if isinstance(doc, dict) and "retry" in doc:
                raise RequestInvalid([("retry", "is set by POST /v1/workflows/{id}/retry, not by a request")])
            parsed = parse_request(doc, max_dimension=lim.max_dimension, max_tasks=lim.max_tasks,
                                   max_pixels=lim.max_pixels, presets=presets)
        except RequestInvalid as exc:
            return json_error(400, "INVALID_REQUEST", exc.message,
                              problems=[{"field": f, "message": m} for f, m in exc.problems])
        workflow_id = parsed.workflowId or str(uuid.uuid4())
        request[WORKFLOW] = workflow_id  # for the audit line
        location = {"Location": f"/v1/workflows/{workflow_id}"}
        async with self.directory.one_at_a_time(workflow_id):
            try:
                existing = await self.directory.known(workflow_id, patience_s=3.0)
            except Unavailable:  # no join to ask: the request waits in Kafka; a duplicate id is ignored there
                existing = None
            if existing is not None:  # the same id again: nothing is sent twice
                return web.json_response({"workflowId": workflow_id, "status": existing["status"],
                                          "existing": True, "links": links(workflow_id)},
                                         status=200, headers=location)
            doc = {**doc, "workflowId": workflow_id}
            failed = await self._send(doc, workflow_id)
            if failed is not None:
                return failed
            self.directory.accept(workflow_id, parsed.fileLocation)
        log.info("api: workflow %s accepted", workflow_id)
        return web.json_response({"workflowId": workflow_id, "status": "PENDING", "existing": False,
                                  "links": links(workflow_id)}, status=202, headers=location)

    async def status(self, request):
        workflow_id = workflow_id_of(request)
        doc = await self.directory.known(workflow_id)
        if doc is None:
            return not_found(workflow_id)
        delivery = self.deliveries.get(workflow_id)  # its callbackUrl's delivery (streams/agents/webhooks.py)
        mine = delivery is not None and delivery["runId"] == doc.get("runId")  # not an earlier run's
        return web.json_response({**doc, "webhook": delivery} if mine else doc)

    async def source(self, request):
        """The workflows made from one source's bytes, and its facts."""
        return source_answer(self.sources, request.match_info["sha256"], self.config.topics.sources)

    async def similar(self, request):
        """The sources whose perceptual hash is within ``distance`` bits of ``phash``, nearest first."""
        return similar_answer(self.sources, request.query, self.config.topics.sources)

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
        return web.json_response({"workflows": await self.directory.listing(status, limit)})

    async def output(self, request):
        workflow_id, ref = workflow_id_of(request), request.match_info["ref"]
        doc = await self.directory.known(workflow_id)
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
        workflow_id = workflow_id_of(request)
        doc = await self.directory.known(workflow_id)
        if doc is None:
            return not_found(workflow_id)
        return await stream(request, doc, lambda: self.directory.poll(workflow_id))

    async def retry(self, request):
        refused = foreign(request)
        if refused is not None:
            return refused
        workflow_id = workflow_id_of(request)
        async with self.directory.one_at_a_time(workflow_id):
            return await self._retry(workflow_id)

    async def cancel(self, request):
        refused = foreign(request)
        if refused is not None:
            return refused
        return await cancel_workflow(self, request, workflow_id_of(request))

    async def _retry(self, workflow_id: str):
        return await retry_workflow(self, workflow_id)
