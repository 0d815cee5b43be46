"""The resize sandbox (docs/failure-semantics.md, "Poison pills"): a suspect task runs alone in a one-process
pool under an address-space limit (IMAGEFORK_MEMORY_BUDGET_MB + 1 GiB), and a run that hangs is killed at the
workflow's deadline (120 s at most) and ends WORKER_HUNG.

The product's own ``Resizer.run(..., sandboxed=True)`` with real spawned sandbox processes, on a worker's
real configuration; the decoder is the test-only crash plugin (``tests/integration/crashplugin``, on the
sandboxes' PYTHONPATH), which hangs or asks for gigabytes when the file says so. The staged sources and the
outputs live in a small in-test S3 endpoint (GetObject / PutObject of a dict): storage is not under test."""
import asyncio
import http.server
import io
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from streams.agents import resize
from streams.agents.common import now_ms
from streams.agents.crashes import Entry
from streams.config import Config
from streams.core.models import ResizeTask

CRASH_PLUGIN = str(Path(__file__).resolve().parents[1] / "integration" / "crashplugin")
BUCKET = "sandbox-test"
pytestmark = pytest.mark.timeout(60)  # a sandbox that is never cut must fail the test, not hang it
BUDGET_MB = 64  # the sandbox's address-space limit is then 64 MiB + 1 GiB


class _S3(http.server.BaseHTTPRequestHandler):
    """Path-style GetObject and PutObject, nothing else."""
    protocol_version = "HTTP/1.1"
    objects: dict[str, bytes] = {}

    def do_GET(self):
        body = self.objects.get(self.path.split("?", 1)[0])
        if body is None:
            body = b"<Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>"
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("ETag", '"0"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        self.objects[self.path.split("?", 1)[0]] = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("ETag", '"0"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def s3():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _S3)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _S3.objects = {}

    def stage(name: str, data: bytes) -> str:
        _S3.objects[f"/{BUCKET}/_staging/{name}"] = data
        return f"s3://{BUCKET}/_staging/{name}"

    yield SimpleNamespace(stage=stage, objects=_S3.objects, url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.shutdown()
    httpd.server_close()


class _Topic:
    def get_topic_name(self):
        return "tasks"


@pytest.fixture
def resizer(s3, monkeypatch):
    # the sandboxes are spawned: they take the plugin from the environment, as a worker's would
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (CRASH_PLUGIN, os.environ.get("PYTHONPATH")) if p))
    config = Config.from_env({"S3_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                              "S3_BUCKET": BUCKET, "IMAGEFORK_MEMORY_BUDGET_MB": str(BUDGET_MB),
                              "IMAGEFORK_CONNECT_TIMEOUT_S": "2", "IMAGEFORK_READ_TIMEOUT_S": "5",
                              "IMAGEFORK_RESIZE_CONCURRENCY": "1"})  # one sandbox: every run in the same slot
    assert config.resize_processes == 1
    r = resize.Resizer(config, SimpleNamespace(task_attempts=_Topic(), tasks=_Topic(), task_attempts_batch=_Topic(),
                                               tasks_batch=_Topic()))
    yield r
    for pool in r.sandboxes:
        if pool is not None:
            resize._shut(pool, kill=True)


def _task(uri: str, name: str, deadline_s: float = 60) -> ResizeTask:
    return ResizeTask(workflowId="wf-sandbox", taskRef=name, index=0, total=1, sourceUri=uri,
                      fileLocation=f"https://example.test/{name}", format="png", width=32, height=32,
                      maintainAspectRatio=True, outputKey=f"out/{name}.png", deadline=now_ms() + int(deadline_s * 1000))


def _entry(uri: str) -> Entry:
    return Entry(partition=0, key=b"0:0", source=uri)


def _sandbox_pid(r: resize.Resizer) -> int:
    pools = [p for p in r.sandboxes if p is not None]
    assert len(pools) == 1, r.sandboxes
    (pid,) = pools[0]._processes
    return pid


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """The process exited (reaped, or a zombie waiting for its pool's manager thread)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    return not _gone(pid, within_s=0)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def test_a_decode_past_the_memory_limit_ends_image_too_large_and_the_sandbox_goes_on(resizer, s3):
    """The plugin asks for 2 GiB in one piece: over the sandbox's 1 GiB + 64 MiB address space, the decode
    fails with MemoryError, which is IMAGE_TOO_LARGE (permanent), in the same process that then runs the next
    task. Without the limit the 2 GiB would be granted (calloc'd, untouched) and the task would succeed."""
    greedy = s3.stage("greedy.crashme", b"CRASHME\nALLOC 2048\n")
    good = s3.stage("good.png", _png())

    async def go():
        first = await resizer.run(_task(greedy, "greedy"), _entry(greedy), sandboxed=True)
        pid = _sandbox_pid(resizer)
        second = await resizer.run(_task(good, "good"), _entry(good), sandboxed=True)
        return first, pid, second, _sandbox_pid(resizer)

    first, pid, second, pid_after = asyncio.run(go())
    assert (first["ok"], first["code"], first["transient"]) == (False, "IMAGE_TOO_LARGE", False), first
    assert "does not fit in memory" in first["message"]
    assert second["ok"], second
    assert pid_after == pid and _alive(pid)  # the sandbox went on: no death, no new process
    with Image.open(io.BytesIO(s3.objects[f"/{BUCKET}/out/good.png"])) as out:
        assert (out.format, out.size) == ("PNG", (32, 21))


def test_a_hung_sandboxed_run_ends_worker_hung_at_the_deadline_and_its_process_is_replaced(resizer, s3):
    """A decoder that never returns: the run is cut at the workflow's deadline (2 s here; 120 s at most),
    ends WORKER_HUNG (transient: retried), its process is killed, and the next task gets a new one."""
    good = s3.stage("good2.png", _png())
    stuck = s3.stage("stuck.crashme", b"CRASHME\nHANG\n")

    async def go():
        warm = await resizer.run(_task(good, "warm"), _entry(good), sandboxed=True)  # the sandbox is up
        pid = _sandbox_pid(resizer)
        started = time.monotonic()
        hung = await resizer.run(_task(stuck, "stuck", deadline_s=2), _entry(stuck), sandboxed=True)
        took = time.monotonic() - started
        replaced_slot = list(resizer.sandboxes)
        after = await resizer.run(_task(good, "after"), _entry(good), sandboxed=True)
        return warm, pid, hung, took, replaced_slot, after, _sandbox_pid(resizer)

    warm, pid, hung, took, slots, after, new_pid = asyncio.run(go())
    assert warm["ok"], warm
    assert (hung["ok"], hung["code"], hung["transient"]) == (False, "WORKER_HUNG", True), hung
    assert re.fullmatch(r"the sandboxed run did not finish within [12]s", hung["message"]), hung  # not "120s"
    assert 1.5 <= took < 5, took  # the deadline, not the 120 s cap, and not forever
    assert slots == [None] * len(slots)  # the hung sandbox was dropped
    assert _gone(pid), "the hung sandbox process was not killed"
    assert after["ok"], after
    assert new_pid != pid and _alive(new_pid)
