"""A running pipeline for a test: its own namespace, real worker processes, a client."""
from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path

from PIL import Image

from streams.adapters.kafka import ensure_topics
from streams.adapters.objectstore import ObjectStore
from streams.client import Client, Follower, consume_completed
from streams.config import Config
from streams.stack.processes import WorkerProcess, wait_for_log

FAST = {
    "IMAGEFORK_FETCH_ALLOW": "127.0.0.0/8",
    "IMAGEFORK_PARTITIONS": "4",
    "IMAGEFORK_RETRY_DELAY_S": "0.5",
    "IMAGEFORK_RETRY_MAX_DELAY_S": "2",
    "IMAGEFORK_WORKFLOW_TIMEOUT_S": "120",
    "IMAGEFORK_RESIZE_CONCURRENCY": "2",
    "IMAGEFORK_LOG_LEVEL": "info",
    "IMAGEFORK_REPAIR_AFTER_S": "5",
    "IMAGEFORK_SOURCE_S3_ALLOW": "imagefork/inputs/",  # the stack's bucket; tests put s3:// sources there
}


class Pipeline:
    def __init__(self, stack_env: dict[str, str], namespace: str, log_dir: Path, **overrides: str):
        self.env = {**stack_env, **FAST, "IMAGEFORK_NAMESPACE": namespace, **overrides}
        self.config = Config.from_env({**os.environ, **self.env})
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        ensure_topics(self.config)
        self.store = ObjectStore(self.config)
        self.store.ensure_bucket()
        self.client = Client(self.config)

    def start(self, role: str, name: str | None = None, wait: bool = True, **env: str) -> WorkerProcess:
        worker = WorkerProcess(role, {**self.env, **env}, self.log_dir, name=name or f"{role}-{len(self.workers)}")
        self.workers.append(worker)
        if wait:
            assert wait_for_log(worker, "imagefork ready", 120), f"{role} did not start:\n{worker.log_tail(40)}"
        return worker

    def start_all(self) -> "Pipeline":
        for role in ("join", "resize", "planner"):
            self.start(role)
        return self

    def follower(self) -> Follower:
        return Follower(self.config)

    def submit(self, request: dict, workflow_id: str | None = None, **kw) -> str:
        return self.client.submit(request, workflow_id or f"wf-{uuid.uuid4().hex[:12]}", **kw)

    def finals_for(self, ids, settle: float = 3.0):
        """Every final event on the completed topic for ``ids`` (to count them)."""
        return consume_completed(self.config, ids, timeout=settle)

    def object(self, key: str) -> bytes:
        return self.store.client.get_object(Bucket=self.config.bucket, Key=key)["Body"].read()

    def check_outputs(self, final) -> None:
        """Every listed output exists, decodes to its declared format and size, under the workflow's prefix."""
        for out in final.outputs:
            key = out.s3Uri.split("/", 3)[3]
            assert key.startswith(f"{self.config.output_prefix}{final.workflowId}/"), key
            data = self.object(key)
            assert len(data) == out.bytes
            im = Image.open(io.BytesIO(data))
            assert im.size == (out.width, out.height)
            assert im.format == {"jpg": "JPEG", "jpeg": "JPEG"}.get(out.format, out.format.upper())
            head = self.store.head(key)
            assert head["ContentType"] == out.contentType

    def stop(self) -> None:
        for w in self.workers:
            w.stop(timeout=15)
        self.client.close()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log_tail(30)}" for w in self.workers)


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
