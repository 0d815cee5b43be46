"""The Celery side of bench/peer.py: imagefork's per-output work as Celery tasks, joined by a chord.

Started by bench/peer.py as ``celery -A bench.peer_tasks worker --concurrency 2 --pool prefork`` (cwd: the
repository), with the broker and result backend on the bench's own redis-server (``IMAGEFORK_PEER_REDIS``)
and the local stack's S3 settings in the environment.

One task per output, as imagefork's resize role does it: fetch the source over HTTP (the same guarded
fetch as imagefork's planner), decode it (``prepare``, at the request's largest box), resize and encode
(``resize_image``) and upload (``ObjectStore.put``, with the same object metadata). ``cached=True``
keeps the decoded source per request in the worker process (a small dict, most recent requests only),
as imagefork's resize worker keeps one decode per source per process; ``cached=False`` fetches and
decodes for every task. The chord's callback, ``collect``, gathers the outputs' locations: the
final event.
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict

from celery import Celery
from celery.signals import worker_process_init

from streams.adapters.objectstore import ObjectStore
from streams.adapters.source import fetch_http
from streams.config import Config
from streams.core.imaging import OutputSpec, prepare, resize_image, task_spec

REDIS_URL = os.environ.get("IMAGEFORK_PEER_REDIS", "redis://127.0.0.1:6379")

app = Celery("imagefork_peer")
app.conf.update(
    broker_url=f"{REDIS_URL}/0",
    result_backend=f"{REDIS_URL}/1",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Celery's defaults otherwise: acks on receipt (not late), prefetch 4 per process, no task events
)

CACHE_REQUESTS = 4  # decoded sources kept per worker process (the most recent requests)

_config: Config | None = None
_store: ObjectStore | None = None
_cache: OrderedDict[str, object] = OrderedDict()


def _init() -> None:
    global _config, _store
    if _config is None:
        _config = Config.from_env()
        _store = ObjectStore(_config)


@worker_process_init.connect
def _worker_process_init(**_):
    """Each prefork child: its own configuration and S3 client (boto3 clients are not fork-safe)."""
    global _config, _store
    _config = None
    _store = None
    _cache.clear()
    _init()


def _decoded(request_id: str, url: str, max_box: tuple[int, int], spec: OutputSpec, cached: bool):
    key = f"{request_id}#{url}#{spec.source_options.key}"
    if cached and key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    data = fetch_http(url, _config.limits, _config.fetch_allow_networks)
    source = prepare(data, _config.limits, max_box=max_box, options=spec.source_options)
    if cached:
        _cache[key] = source
        while len(_cache) > CACHE_REQUESTS:
            _cache.popitem(last=False)
    return source


@app.task(name="peer.resize")
def resize(task: dict, url: str, cached: bool) -> dict:
    """One output: ``task`` is imagefork's own task record (streams.core.planning.plan_tasks)."""
    _init()
    spec = task_spec(task)  # its options, or (a task written before them) its flat fields
    source = _decoded(task["workflowId"], url, (task["maxWidth"], task["maxHeight"]), spec, cached)
    started = time.perf_counter()
    out = resize_image(source, spec, _config.limits, _config.encoding)
    applied = {"frames": out.frames, "options": out.applied.said()}  # as the resize worker writes it
    _store.put(task["outputKey"], out.data, out.content_type, metadata={
        "imagefork-task": task["taskRef"], "imagefork-format": out.format,
        "imagefork-width": str(out.width), "imagefork-height": str(out.height),
        "imagefork-options": json.dumps(applied, separators=(",", ":"))})
    return {"taskRef": task["taskRef"], "format": out.format, "width": out.width, "height": out.height,
            "bytes": len(out.data), "s3Uri": _store.uri(task["outputKey"]),
            "seconds": time.perf_counter() - started}


@app.task(name="peer.collect")
def collect(outputs: list[dict], request_id: str) -> dict:
    """The chord's callback: the final event, every output's location."""
    return {"workflowId": request_id, "status": "COMPLETED", "outputs": [o["s3Uri"] for o in outputs],
            "count": len(outputs)}


@app.task(name="peer.ping")
def ping() -> str:
    _init()
    return "pong"
