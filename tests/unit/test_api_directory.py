"""The API's workflow directory (streams/api/directory.py) with no aiohttp and no Kafka: the join's answers
come from a real JoinState (what its ``/internal/workflows/{id}`` returns), final events from a dict,
and the clock is ours. Last, the two answers the HTTP side makes of it: unknown is 404, no join 503."""
import ast
import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from streams.api.directory import Directory, Unavailable
from streams.api.routes import Api
from streams.config import Config
from streams.core.join import JoinState, describe, open_summaries
from streams.core.models import TaskError, TaskOutput, TaskResult, WorkflowPlan, descriptors_of

ROOT = Path(__file__).resolve().parents[2]
REFS = tuple(f"image_convert_resize_png_{w}x{w}_{i}" for i, w in enumerate((10, 20, 30)))
SOURCE = "http://img.test/cat.png"


def plan(wf="wf", run="r1", submitted=1000, **kw):
    return WorkflowPlan(wf, SOURCE, descriptors_of({"taskRefs": REFS}), submittedAt=submitted,
                        deadline=submitted + 300_000,
                        correlationId="corr", runId=run, **kw)


def ok(ref, wf="wf", run="r1", at=1500):
    return TaskResult(wf, ref, "SUCCEEDED", 1, at, output=TaskOutput(ref, "png", 1, 1, 10, "image/png",
                                                                    f"s3://b/{ref}", f"http://s3/b/{ref}"), runId=run)


def bad(ref, wf="wf", run="r1"):
    return TaskResult(wf, ref, "FAILED", 3, 1600, error=TaskError(ref, "SOURCE_NOT_FOUND", "gone", 3), runId=run)


class Finals:
    """The completed topic's index: the latest final event of each workflow id."""

    def __init__(self):
        self.finals = {}

    def add(self, final):
        self.finals[final.workflowId] = final

    def get(self, workflow_id):
        return self.finals.get(workflow_id)

    def recent(self):
        return list(self.finals.values())


class Join:
    """What the join owning the workflow's partition answers; ``down``: no join answers (Unavailable)."""

    def __init__(self):
        self.state = JoinState(default_timeout_ms=300_000, retention_ms=86_400_000)
        self.down = False
        self.asked = 0

    def feed(self, *events, now=2000):
        finals = []
        for e in events:
            out = self.state.record_plan(e, now) if isinstance(e, WorkflowPlan) else self.state.record_result(e, now)
            finals += [out.final] if out.final else []
        return finals

    async def ask(self, workflow_id, patience_s=15.0):
        self.asked += 1
        await asyncio.sleep(0)
        if self.down:
            raise Unavailable("no join process is running")
        return describe(self.state, workflow_id)

    async def open_workflows(self, limit):
        return open_summaries([self.state], limit)


class World:
    def __init__(self, final_wait_s=0.2, workflow_timeout_s=300.0):
        self.now = 50_000
        self.index, self.join = Finals(), Join()
        self.directory = Directory(self.index, self.join, workflow_timeout_s=workflow_timeout_s,
                                   final_wait_s=final_wait_s, clock=lambda: self.now)

    def status(self, workflow_id="wf"):
        return asyncio.run(self.directory.known(workflow_id))


def test_accepted_and_not_planned_yet_is_pending():
    w = World()
    w.directory.accept("wf", SOURCE)
    doc = w.status()
    assert (doc["status"], doc["workflowId"], doc["submittedAt"], doc["fileLocation"]) == ("PENDING", "wf", 50_000, SOURCE)
    assert doc["tasks"] == [] and doc["progress"] == {"done": 0, "total": None, "failed": 0}


def test_open_in_the_join_is_running_with_its_tasks_so_far():
    w = World()
    w.directory.accept("wf", SOURCE)  # the join's answer wins over this process's bookkeeping
    w.join.feed(plan(), ok(REFS[1]), bad(REFS[2]))
    doc = w.status()
    assert (doc["status"], doc["runId"], doc["submittedAt"], doc["correlationId"]) == ("RUNNING", "r1", 1000, "corr")
    assert doc["progress"] == {"done": 2, "total": 3, "failed": 1}
    assert [(t["taskRef"], t["status"], t["width"]) for t in doc["tasks"]] == [
        (REFS[0], "PENDING", 10), (REFS[1], "SUCCEEDED", 20), (REFS[2], "FAILED", 30)]
    assert [o["taskRef"] for o in doc["outputs"]] == [REFS[1]] and [e["code"] for e in doc["errors"]] == ["SOURCE_NOT_FOUND"]


def test_finished_is_the_final_event_from_the_index():
    w = World()
    [final] = w.join.feed(plan(), *(ok(r) for r in REFS))
    w.index.add(final)
    doc = w.status()
    assert (doc["status"], doc["runId"], doc["completedAt"], doc["retryable"]) == ("COMPLETED", "r1", 2000, False)
    assert [o["taskRef"] for o in doc["outputs"]] == list(REFS)
    assert all(t["status"] == "SUCCEEDED" for t in doc["tasks"]) and doc["progress"]["total"] == 3


def test_finished_while_the_index_is_behind_waits_for_that_run_then_answers_the_marker():
    w = World(final_wait_s=0.3)
    [final] = w.join.feed(plan(), ok(REFS[0]), ok(REFS[1]), bad(REFS[2]))
    doc = w.status()  # not in the index: the join's marker, after waiting for the index a moment
    assert (doc["status"], doc["runId"], doc["completedAt"], doc["tasks"]) == ("FAILED", "r1", 2000, [])

    async def index_catches_up():
        asking = asyncio.ensure_future(w.directory.known("wf"))
        await asyncio.sleep(0.1)
        w.index.add(final)
        return await asking
    doc = asyncio.run(index_catches_up())
    assert doc["status"] == "FAILED" and len(doc["tasks"]) == 3 and doc["retryable"] is False  # no request kept


def test_finished_and_forgotten_by_the_join_is_answered_from_the_index():
    w = World()
    [final] = w.join.feed(plan(), *(ok(r) for r in REFS))
    w.index.add(final)
    w.join.state = JoinState(default_timeout_ms=300_000, retention_ms=86_400_000)  # its marker expired
    assert w.status()["status"] == "COMPLETED"


def test_a_retry_in_flight_is_pending_until_its_run_shows():
    w = World(workflow_timeout_s=60)
    [final] = w.join.feed(plan(), ok(REFS[0]), ok(REFS[1]), bad(REFS[2]))
    w.index.add(final)
    w.directory.retry_sent("wf", "r1")
    doc = w.status()
    assert (doc["status"], doc["retryOf"], doc["submittedAt"], doc["fileLocation"]) == ("PENDING", "r1", 50_000, SOURCE)
    # the retry's run opens in the join: its document, and the retry is no longer remembered
    w.join.state = JoinState(default_timeout_ms=300_000, retention_ms=86_400_000)
    w.join.feed(plan(run="r2", retryOf="r1"))
    doc = w.status()
    assert (doc["status"], doc["runId"], doc["retryOf"]) == ("RUNNING", "r2", "r1")
    assert "wf" not in w.directory.retries


def test_a_retry_that_never_shows_is_forgotten_after_the_workflow_timeout():
    w = World(workflow_timeout_s=60)
    [final] = w.join.feed(plan(), ok(REFS[0]), ok(REFS[1]), bad(REFS[2]))
    w.index.add(final)
    w.directory.retry_sent("wf", "r1")
    w.now += 59_999
    assert w.status()["status"] == "PENDING"
    w.now += 1
    assert w.status()["status"] == "FAILED" and "wf" not in w.directory.retries


def test_unknown_everywhere_is_none():
    w = World()
    w.directory.accept("other", SOURCE)
    w.join.feed(plan(wf="open-one"))
    assert w.status("wf") is None


def test_with_no_join_answering_the_index_and_the_accepted_still_answer_and_the_rest_is_unavailable():
    w = World()
    [final] = w.join.feed(plan(wf="done"), *(ok(r, wf="done") for r in REFS))
    w.index.add(final)
    w.directory.accept("sent", SOURCE)
    w.join.feed(plan(wf="open-one"))
    w.join.down = True
    assert w.status("done")["status"] == "COMPLETED"
    assert w.status("sent")["status"] == "PENDING"
    with pytest.raises(Unavailable, match="no join process is running"):
        w.status("open-one")


def test_the_list_is_finished_open_and_accepted_newest_first():
    w = World()
    [final] = w.join.feed(plan(wf="done", submitted=1000), *(ok(r, wf="done") for r in REFS))
    w.index.add(final)
    w.join.feed(plan(wf="open-one", submitted=3000), ok(REFS[0], wf="open-one"))
    w.directory.accept("sent", SOURCE)  # at 50 000: the newest
    rows = asyncio.run(w.directory.listing(None, 50))
    assert [(r["workflowId"], r["status"]) for r in rows] == [
        ("sent", "PENDING"), ("open-one", "RUNNING"), ("done", "COMPLETED")]
    assert rows[1]["progress"] == {"done": 1, "total": 3, "failed": 0}
    assert [r["workflowId"] for r in asyncio.run(w.directory.listing("RUNNING", 50))] == ["open-one"]
    assert [r["workflowId"] for r in asyncio.run(w.directory.listing(None, 2))] == ["sent", "open-one"]


def test_one_submit_at_a_time_per_id_and_the_lock_goes_with_the_last():
    w = World()
    order = []

    async def hold(wf, name):
        async with w.directory.one_at_a_time(wf):
            order.append(f"{name} in")
            await asyncio.sleep(0.05)
            order.append(f"{name} out")

    async def go():
        await asyncio.gather(hold("wf", "a"), hold("wf", "b"), hold("other", "c"))
    asyncio.run(go())
    assert order.index("a out") < order.index("b in")  # the same id: one after the other
    assert order.index("c in") < order.index("a out")  # another id: beside them
    assert w.directory.busy == {}


def test_streams_on_one_workflow_share_one_look():
    w = World()
    w.join.feed(plan())

    async def go():
        return await asyncio.gather(*(w.directory.poll("wf") for _ in range(20)))
    docs = asyncio.run(go())
    assert w.join.asked == 1 and all(d["status"] == "RUNNING" for d in docs)


def test_the_directory_imports_neither_aiohttp_nor_kafka():
    tree = ast.parse((ROOT / "streams" / "api" / "directory.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in names if m.split(".")[0] in ("aiohttp", "confluent_kafka")
                or m.startswith(("streams.adapters", "streams.api.router", "streams.api.index"))}, names


# --- what the HTTP side makes of it ----------------------------------------------------------------

class Offline(Api):
    """The API's handlers over a world's directory: no Kafka, no S3."""

    def __init__(self, directory: Directory):
        super().__init__(Config())
        self.directory = directory

    async def _start(self, _app):
        pass

    async def _stop(self, _app):
        pass


def ask_http(world: World, path: str):
    async def go():
        async with TestClient(TestServer(Offline(world.directory).app())) as client:
            resp = await client.get(path)
            return resp.status, dict(resp.headers), json.loads(await resp.read())
    return asyncio.run(go())


def test_unknown_is_404_and_known_is_its_document():
    w = World()
    w.join.feed(plan())
    status, _headers, body = ask_http(w, "/v1/workflows/nobody")
    assert (status, body["error"]) == (404, "NOT_FOUND") and "nobody" in body["message"]
    status, _headers, body = ask_http(w, "/v1/workflows/wf")
    assert (status, body["status"], body["runId"]) == (200, "RUNNING", "r1")


def test_no_join_to_ask_is_503_join_unavailable_with_retry_after():
    w = World()
    w.join.down = True
    status, headers, body = ask_http(w, "/v1/workflows/wf")
    assert (status, body["error"], headers.get("Retry-After")) == (503, "JOIN_UNAVAILABLE", "5")
    assert body["message"] == "the join's state cannot be asked now: no join process is running"
