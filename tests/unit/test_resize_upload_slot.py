"""A thread pool's task holds its compute slot for making its output, not for uploading it (agents/resize.py):
with one slot, the next task computes while the first one's PUT is still on its way. Before, the slot was held
through the upload, and a two-slot worker's cores waited on S3 (docs/performance.md)."""
import asyncio
import io
import threading
from types import SimpleNamespace

from PIL import Image

from streams.agents import resize, resize_job
from streams.agents.common import now_ms
from streams.agents.crashes import Entry
from streams.agents.policy import Disposition
from streams.config import Config
from streams.core.lanes import INTERACTIVE
from streams.core.models import ResizeTask


class _Topic:
    def get_topic_name(self):
        return "tasks"


class _Ledger:
    async def begin(self, partition, offset, source):
        return Entry(partition, f"{partition}:{offset}".encode(), source), False

    async def end(self, entry, keep=False):
        pass


class _Store:
    """S3 as the job sees it; the first output's PUT waits until ``release`` is set."""

    def __init__(self, slow_key: str):
        self.slow_key, self.release, self.objects, self.events = slow_key, threading.Event(), {}, []
        self.slow_started = threading.Event()

    def get(self, uri, max_bytes):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), "red").save(buf, "PNG")
        return buf.getvalue()

    def put(self, key, data, content_type, metadata=None):
        self.events.append(("put", key))
        if key == self.slow_key:
            self.slow_started.set()
            assert self.release.wait(10), "the slow upload was never released"
        self.objects[key] = data
        self.events.append(("stored", key))

    def uri(self, key):
        return f"s3://b/{key}"

    def url(self, key):
        return f"http://s3/b/{key}"


def _task(name: str) -> ResizeTask:
    return ResizeTask(workflowId="wf", taskRef=name, index=0, total=2, sourceUri="s3://b/_staging/wf/source",
                      fileLocation="https://example.test/a.png", format="png", width=32, height=24,
                      maintainAspectRatio=True, outputKey=f"out/{name}.png", deadline=now_ms() + 60_000)


def test_the_next_task_computes_while_the_first_ones_upload_is_on_its_way(monkeypatch):
    config = Config.from_env({"IMAGEFORK_RESIZE_CONCURRENCY": "1", "IMAGEFORK_RESIZE_POOL": "thread"})
    store = _Store("out/t1.png")
    r = resize.Resizer(config, SimpleNamespace(task_attempts=_Topic(), tasks=_Topic(), task_attempts_batch=_Topic(),
                                               tasks_batch=_Topic()))
    r.ensure_pool()  # a thread pool: resize_job.init in this process, then its store replaced
    monkeypatch.setattr(resize_job, "_store", store)
    r.cancels = SimpleNamespace(cancelled=lambda *_: False, flag=lambda *_: "", close=lambda: None)
    reported = []

    async def report(task, outcome):
        reported.append((task.taskRef, outcome["ok"], outcome.get("output", {}).get("bytes")))
    r.report = report

    async def go():
        msg = [SimpleNamespace(where={"partition": "0", "offset": str(i)}) for i in range(2)]
        first = asyncio.ensure_future(r._handle(msg[0], _task("t1"), _Ledger(), INTERACTIVE))
        second = asyncio.ensure_future(r._handle(msg[1], _task("t2"), _Ledger(), INTERACTIVE))
        assert await asyncio.wait_for(second, 10) == Disposition.PROCESSED  # through the one slot, t1 still uploading
        assert await asyncio.to_thread(store.slow_started.wait, 10)
        assert ("stored", "out/t1.png") not in store.events
        assert ("stored", "out/t2.png") in store.events and not first.done()
        store.release.set()
        assert await asyncio.wait_for(first, 10) == Disposition.PROCESSED

    try:
        asyncio.run(go())
    finally:
        store.release.set()
        r.close()
    assert [ref for ref, _ok, _n in reported] == ["t2", "t1"]
    assert all(ok for _ref, ok, _n in reported)
    sizes = {ref: n for ref, _ok, n in reported}
    assert sizes == {ref: len(store.objects[f"out/{ref}.png"]) for ref in ("t1", "t2")}


def test_a_process_pool_runs_the_whole_task_in_its_job():
    """A process pool's job uploads in its own process: nothing made there comes back to be uploaded."""
    config = Config.from_env({"IMAGEFORK_RESIZE_POOL": "process"})
    r = resize.Resizer(config, SimpleNamespace(task_attempts=_Topic(), tasks=_Topic(), task_attempts_batch=_Topic(),
                                               tasks_batch=_Topic()))
    assert r.job_fn is resize_job.run
    assert resize.Resizer(Config.from_env({"IMAGEFORK_RESIZE_POOL": "thread"}), r.topics).job_fn is resize_job.make


def test_an_output_waiting_for_its_upload_is_held_in_the_memory_budget(monkeypatch):
    """Made and not uploaded yet, an output's bytes count in the process's memory budget (so outputs queued for
    their upload threads cannot grow past it); its upload gives them back, and says how long it waited."""
    import time

    resize_job.init(Config.from_env({"IMAGEFORK_RESIZE_POOL": "thread"}))
    store = _Store("nothing is slow")
    monkeypatch.setattr(resize_job, "_store", store)
    made = resize_job.make(_task("t3").to_dict())
    assert made["ok"] and resize_job._budget.reserved == len(made["upload"].data) > 0
    made["made_at"] = time.perf_counter()
    done = resize_job.deliver(made)
    assert done["ok"] and resize_job._budget.reserved == 0
    assert done["output"]["bytes"] == len(store.objects["out/t3.png"])
    assert {"upload", "upload_wait", "resize_encode"} <= done["stages"].keys()
    assert "upload" not in made["stages"]  # the caller's own stages are not written from the upload thread
    assert 0 <= done["seconds"] < 30
