"""The CPU side of a resize task, run in a pool (one per core): read the staged
source (decoded once per process, kept while the memory budget allows), resize and encode (core), upload.
A process pool's job is ``run`` (all of it); a thread pool runs ``make`` in a compute slot and ``deliver`` (the
upload) outside it.

Returns a plain dict so it crosses a process boundary cheaply:
``{"ok": True, "output": {...}, "seconds"}`` or ``{"ok": False, "code", "message", "transient"}``, each with
``"io"``: the bytes read and written in a pool's own process, for the worker to count (streams.metrics).
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any

from PIL import Image

from streams import metrics
from streams.adapters.objectstore import ObjectStore
from streams.config import Config
from streams.core.errors import Cancelled, ImageTooLarge, PipelineError
from streams.core.imaging import (
    Source, SourceOptions, decode_cost, open_image, prepare, resize_image, task_spec,
)
from streams.core.imaging.facts import pixel_facts
from streams.core.models import SourceFacts, TaskOutput, now_ms
from streams.core.reuse import (
    facts_cover, facts_key, pointer, pointer_key, same_object, scope_prefix, spec_key, usable,
)
from streams.metrics import SOURCE_CACHE_BYTES, SOURCE_CACHE_LOOKUPS

log = logging.getLogger("imagefork")
_config: Config | None = None
_store: ObjectStore | None = None
_lock = threading.Lock()


class MemoryBudget:
    """Decoded pixels a process may hold: sources in use or cached, plus the decodes in flight.

    A decode reserves its estimated size (from the header, before any pixel is allocated) and waits
    while the budget is spent, after the cache has given back the sources nobody uses; an image that
    could never fit is refused at once. A task holds a lease on its source until it is done, so a
    source in use is never counted as gone."""

    def __init__(self, budget_bytes: int, idle_s: float = 10.0):
        self.budget = budget_bytes
        self.idle_s = idle_s  # a source no task has used for this long is dropped (its workflow is done here)
        self.entries: OrderedDict[str, list] = OrderedDict()  # key -> [image, bytes, leases, last used]
        self.held = 0  # bytes of the entries
        self.reserved = 0
        self._cond = threading.Condition()
        self._sweeper: threading.Thread | None = None

    @property
    def cached_bytes(self) -> int:
        return self.held

    def lease(self, key: str) -> Source | None:
        with self._cond:
            entry = self.entries.get(key)
            if entry is None:
                return None
            self.entries.move_to_end(key)
            entry[2] += 1
            entry[3] = time.monotonic()
            return entry[0]

    def unlease(self, key: str) -> None:
        with self._cond:
            entry = self.entries.get(key)
            if entry is not None:
                entry[2] -= 1
                entry[3] = time.monotonic()
                self._cond.notify_all()

    def sweep(self, now: float | None = None) -> int:
        """Drop the sources no task has used for ``idle_s``; returns how many. A worker's memory then
        follows its work: the sources of finished workflows do not wait for the budget to fill up."""
        now = time.monotonic() if now is None else now
        with self._cond:
            idle = [k for k, (_im, _size, leases, used) in self.entries.items()
                    if leases == 0 and now - used >= self.idle_s]
            for key in idle:
                self.held -= self.entries.pop(key)[1]
            if idle:
                self._cond.notify_all()
            SOURCE_CACHE_BYTES.set(self.held)
            return len(idle)

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(max(0.5, self.idle_s / 2))
            self.sweep()

    def reserve(self, nbytes: int, timeout_s: float = 120.0) -> None:
        if nbytes > self.budget:
            raise ImageTooLarge(f"decoding this source needs about {nbytes >> 20} MiB, more than this worker's "
                                f"memory budget of {self.budget >> 20} MiB (IMAGEFORK_MEMORY_BUDGET_MB)")
        with self._cond:
            while self.held + self.reserved + nbytes > self.budget:
                if not self._evict_one() and not self._cond.wait(timeout_s):
                    raise ImageTooLarge("no memory came free for this decode within "
                                        f"{timeout_s:.0f}s (IMAGEFORK_MEMORY_BUDGET_MB)", transient=True)
            self.reserved += nbytes

    def settle(self, nbytes: int, key: str | None = None, im: Source | Image.Image | None = None) -> None:
        """End a reservation; with ``im``, hold the decoded source, leased once to its decoder."""
        with self._cond:
            self.reserved -= nbytes
            if im is not None and key is not None:
                size = image_bytes(im)
                self.entries[key] = [im, size, 1, time.monotonic()]
                self.held += size
                SOURCE_CACHE_BYTES.set(self.held)
                if self._sweeper is None:
                    self._sweeper = threading.Thread(target=self._sweep_forever, name="source cache sweep",
                                                     daemon=True)
                    self._sweeper.start()
            self._cond.notify_all()

    def _evict_one(self) -> bool:
        for key, (_im, size, leases, _used) in self.entries.items():
            if leases == 0:
                del self.entries[key]
                self.held -= size
                SOURCE_CACHE_BYTES.set(self.held)
                return True
        return False


def image_bytes(im: Source | Image.Image) -> int:
    if isinstance(im, Source):
        return sum(image_bytes(f) for f in im.frames)
    # what Pillow holds a pixel in: a byte for 1, L and P, two for I;16, else a 32-bit word (RGB too)
    per_pixel = 1 if im.mode in ("1", "L", "P") else 2 if im.mode.startswith("I;16") else 4
    return im.width * im.height * per_pixel


_budget: MemoryBudget | None = None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 << 10


def return_freed_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc serves blocks over its mmap threshold with mmap and gives them back to the system when freed,
    but raises the threshold (up to 32 MiB) each time such a block is freed: after the first decoded image
    is freed, the next ones come from its heaps, which keep them once freed. So the threshold is fixed (at
    128 KiB; pinned by tests/unit/test_memory_budget.py). A ``MALLOC_MMAP_THRESHOLD_`` in the environment
    is the user's choice and stands; not glibc: nothing."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def init(config: Config) -> None:
    global _config, _store, _budget
    return_freed_buffers()
    _config = config
    _store = ObjectStore(config)
    _budget = MemoryBudget(config.memory_budget, idle_s=config.source_idle_s)


def init_pooled(config: Config) -> None:
    """A pool's own process: as init, its byte counts going back with each outcome."""
    init(config)
    metrics.tally_io()


def init_sandbox(config: Config) -> None:
    """The suspect's process: the same job, under an address-space limit, so a runaway decode fails
    there with MemoryError (IMAGE_TOO_LARGE) instead of being killed by the kernel with the worker."""
    import resource
    init_pooled(config)
    _budget.budget = max(64 << 20, config.memory_budget >> 1)  # one task at a time: half is plenty
    limit = config.memory_budget + (1 << 30)  # the budget, plus the interpreter and libraries
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


_loading: dict[str, threading.Lock] = {}


def _source(uri: str, max_box: tuple[int, int], options: SourceOptions = SourceOptions(),
            stages: dict[str, float] | None = None, sha256: str = "") -> tuple[str, Source]:
    """The decoded source, leased (unlease it when done): fetched and decoded once per process (and per way
    of preparing it: animated, keeping the profile or metadata) even when threads ask at once."""
    key = f"{uri}#{sha256}#{max_box[0]}x{max_box[1]}#{options.key}"  # the bytes' hash: an s3:// source rewritten
    im = _budget.lease(key)
    if im is not None:
        SOURCE_CACHE_LOOKUPS.labels("hit").inc()
        return key, im
    with _lock:
        loading = _loading.setdefault(key, threading.Lock())
    with loading:
        im = _budget.lease(key)
        if im is not None:
            SOURCE_CACHE_LOOKUPS.labels("hit").inc()
        else:
            SOURCE_CACHE_LOOKUPS.labels("miss").inc()
            started = time.perf_counter()
            data = _store.get(uri, _config.limits.max_source_bytes)
            fetched, cpu = time.perf_counter(), time.thread_time()
            header = open_image(data, _config.limits)  # read once: for the cost, then the decode
            cost = decode_cost(header, data, _config.limits, max_box, options)
            try:
                _budget.reserve(cost)
            except BaseException:  # over the budget, or no memory came free: the header goes with the task
                header.close()
                raise
            try:
                im = prepare(data, _config.limits, max_box=max_box, options=options, header=header)
                if stages is not None:
                    stages["fetch"] = fetched - started
                    stages["decode"] = time.perf_counter() - fetched
                    stages["cpu"] = time.thread_time() - cpu
            except BaseException:
                _budget.settle(cost)
                raise
            del data
            _budget.settle(cost, key, im)
    with _lock:
        _loading.pop(key, None)
    return key, im


def run(task: dict[str, Any]) -> dict[str, Any]:
    """The whole task in one call (a process pool's job, the sandbox's): made, then uploaded."""
    return deliver(make(task))


def make(task: dict[str, Any]) -> dict[str, Any]:
    """The task up to its upload: its outcome, or with ``"upload"`` the output still to put (``deliver``).
    A thread pool runs this in a compute slot and the upload outside it, so the next task computes meanwhile."""
    if _config is None:
        raise RuntimeError("resize_job.init() was not called in this process")
    stages: dict[str, float] = {}
    outcome = _make(task, stages)
    outcome["io"] = metrics.take_io()
    outcome["stages"] = stages
    return outcome


def deliver(outcome: dict[str, Any]) -> dict[str, Any]:
    """``make``'s outcome with its output uploaded (if it has one to upload); ``"made_at"`` (perf_counter), if
    given, times the wait for an upload thread."""
    upload, made_at = outcome.pop("upload", None), outcome.pop("made_at", None)
    if upload is not None:
        stages = dict(outcome["stages"])  # a copy: the caller reads its own while this runs, if it stops waiting
        if made_at is not None:
            stages["upload_wait"] = time.perf_counter() - made_at
        outcome = {**_upload(upload, stages), "stages": stages, "io": outcome["io"] + metrics.take_io()}
    return outcome


def _go_on(task: dict[str, Any]) -> None:
    """Between steps: a task whose run was cancelled since it started stops here (agents/cancels.py)."""
    flag = task.get("cancelFlag")
    if flag and os.path.exists(flag):
        raise Cancelled("the workflow's run was cancelled while this task ran")


@dataclass(frozen=True)
class _Made:
    """An output made and not uploaded yet; its bytes are held in the memory budget until it is."""
    task: dict[str, Any]
    spec: Any
    output: TaskOutput
    data: bytes
    facts: dict | None
    made_s: float  # its resize and encode


def _make(task: dict[str, Any], stages: dict[str, float]) -> dict[str, Any]:
    facts: dict | None = None
    try:
        spec = task_spec(task)
        _go_on(task)
        reused = _reused(task, spec)
        if reused is not None:
            return reused
        key, im = _source(task["sourceUri"], (task.get("maxWidth", 0), task.get("maxHeight", 0)), spec.source_options,
                          stages, task.get("sourceSha256", ""))
        try:
            _go_on(task)
            if task.get("facts"):
                facts = _facts(task, im, stages)
            # the bytes decoded are the ones the planner hashed (an s3:// source is read where it is, and may
            # have been written over since): else no pointer is filed under that hash
            given = im.info.sha256 if im.info is not None else None
            if task.get("sourceSha256") and given != task["sourceSha256"]:
                task = {**task, "sourceSha256": ""}
            started, cpu = time.perf_counter(), time.thread_time()
            out = resize_image(im, spec, _config.limits, _config.encoding)
            stages["resize_encode"] = time.perf_counter() - started
            stages["cpu"] = stages.get("cpu", 0.0) + time.thread_time() - cpu
        finally:
            del im
            _budget.unlease(key)
        output = TaskOutput(task["taskRef"], out.format, out.width, out.height, len(out.data), out.content_type,
                            _store.uri(task["outputKey"]), _store.url(task["outputKey"]), out.frames, out.applied)
        _budget.reserve(len(out.data))  # released by _upload, whatever becomes of it
        return {"ok": True, "upload": _Made(task, spec, output, out.data, facts, stages["resize_encode"])}
    except Exception as exc:
        return _failed(exc, facts)


def _upload(made: _Made, stages: dict[str, float]) -> dict[str, Any]:
    try:
        _go_on(made.task)
        uploading = time.perf_counter()
        _store.put(made.task["outputKey"], made.data, made.output.contentType,
                   metadata=_metadata(made.task, made.output))
        stages["upload"] = time.perf_counter() - uploading
        _remember(made.task, made.spec, made.output, made.facts)
        return {"ok": True, "output": made.output.to_dict(), "facts": made.facts,
                "seconds": made.made_s + time.perf_counter() - uploading}
    except Exception as exc:
        return _failed(exc, made.facts)
    finally:
        _budget.settle(len(made.data))


def _failed(exc: Exception, facts: dict | None) -> dict[str, Any]:
    if isinstance(exc, PipelineError):
        return {"ok": False, "code": exc.code, "message": exc.message, "transient": exc.transient, "facts": facts}
    if isinstance(exc, MemoryError):
        gc.collect()
        err = ImageTooLarge("the image does not fit in this worker's memory")
        return {"ok": False, "code": err.code, "message": err.message, "transient": False, "facts": facts}
    # hostile input can raise anything from a decoder
    return {"ok": False, "code": "INTERNAL", "message": f"{type(exc).__name__}: {str(exc)[:200]}",
            "transient": False, "facts": facts}


def _facts(task: dict[str, Any], source: Source, stages: dict[str, float]) -> dict | None:
    """The source's facts (``SourceFacts`` as a dict), as the task asks; never the task's failure."""
    if source.info is None:
        return None
    started = time.thread_time()
    try:
        facts = {**asdict(source.info), **pixel_facts(source.frames[0], tuple(task["facts"]))}
    except Exception as exc:  # a placeholder is not worth an output
        log.warning("task %s/%s: the source's facts failed (%s: %s); the output goes on without them",
                    task.get("workflowId"), task.get("taskRef"), type(exc).__name__, str(exc)[:200])
        facts = asdict(source.info)
    stages["facts"] = time.thread_time() - started
    return facts


def _metadata(task: dict[str, Any], output: TaskOutput) -> dict[str, str]:
    """The object describes itself (its task, run and the options applied), so the join can recover a result
    it lost, as it was (see join/repair.py)."""
    return {"imagefork-task": task["taskRef"], "imagefork-format": output.format,
            "imagefork-width": str(output.width), "imagefork-height": str(output.height),
            "imagefork-run": task.get("runId", ""),
            "imagefork-options": json.dumps({"frames": output.frames, "options": output.options.said()},
                                            separators=(",", ":"))}


# --- reuse (streams/core/reuse.py): the same source bytes and spec, made before ---------------------------
def _reuse_prefix(task: dict[str, Any]) -> str | None:
    return scope_prefix(_config.reuse, _config.output_prefix) if task.get("sourceSha256") else None


def _json(key: str) -> Any:
    try:
        return json.loads(_store.get(_store.uri(key), 1 << 20))
    except (PipelineError, ValueError):
        return None


def _reused(task: dict[str, Any], spec) -> dict[str, Any] | None:
    """The task's output copied from one made before from the same bytes and spec, if there is one, young
    enough and still there (and, for the task that reports the facts, the source's facts too); else None:
    the task is made. A lookup that fails makes the task."""
    prefix = _reuse_prefix(task)
    if prefix is None:
        return None
    started, sha = time.perf_counter(), task["sourceSha256"]
    try:
        facts = None
        if task.get("facts"):
            facts = _json(facts_key(prefix, sha))
            if not facts_cover(facts, tuple(task["facts"])):
                return None  # this task decodes the source for its facts: it may as well make its output
            facts = SourceFacts.from_dict(facts).to_dict()  # a stored file that is not facts: made
        doc = usable(_json(pointer_key(prefix, sha, _spec_key(spec))), now_ms(), _config.reuse_ttl_s)
        if doc is None:
            return None
        if not same_object(doc, _store.head(doc["key"])):
            return None  # deleted, or replaced by something else
        record = TaskOutput.from_dict(doc["output"])
        output = replace(record, taskRef=task["taskRef"], s3Uri=_store.uri(task["outputKey"]),
                         url=_store.url(task["outputKey"]), reused=True, reusedFrom=_store.uri(doc["key"]))
        if doc["key"] != task["outputKey"]:
            _store.copy(doc["key"], task["outputKey"], record.contentType, _metadata(task, output))
    except Exception as exc:  # a lookup or a copy that fails, a pointer not ours: the task is made
        log.info("task %s/%s: no reuse (%s: %s); made", task.get("workflowId"), task.get("taskRef"),
                 type(exc).__name__, str(exc)[:200])
        return None
    return {"ok": True, "output": output.to_dict(), "seconds": time.perf_counter() - started, "facts": facts}


def _remember(task: dict[str, Any], spec, output: TaskOutput, facts: dict | None) -> None:
    """Point the task's (bytes, spec) at the output just made, and keep the source's facts; never the
    task's failure."""
    prefix = _reuse_prefix(task)
    if prefix is None:
        return
    sha = task["sourceSha256"]
    try:
        _store.put(pointer_key(prefix, sha, _spec_key(spec)),
                   pointer(task["outputKey"], output.to_dict(), now_ms(), task.get("runId", "")), "application/json")
        if facts and facts.get("sha256") == sha:
            _store.put(facts_key(prefix, sha), json.dumps(facts).encode(), "application/json")
    except PipelineError as exc:
        log.warning("task %s/%s: its reuse pointer was not written (%s)", task.get("workflowId"),
                    task.get("taskRef"), exc)


def _spec_key(spec) -> str:
    return spec_key(spec.format, spec.width, spec.height, spec.options, _config.encoding)
