"""Repair: find, in S3, the results of a stalled workflow that are really lost.

Outputs are deterministic, self-describing objects (metadata: task, format, size, run id). The
join asks for a repair only when it has read its events partition to the end and the workflow has
made no progress for a while; an object is taken as a lost result only if it belongs to the
workflow's current run and was written longer ago than ``repair_after_s`` (a result sent right
after its upload has had ample time to arrive). The lookups run in a small pool, off the join's
loop, a bounded number of workflows at a time, each with a growing pause between attempts.
"""
from __future__ import annotations

import json
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor

from streams.adapters.objectstore import ObjectStore
from streams.config import Config
from streams.core.join import Workflow
from streams.core.models import SUCCEEDED, TaskDescriptor, TaskOutput, TaskResult, now_ms
from streams.core.options import OPTIONS, ImageOptions, options_of
from streams.core.planning import output_key
from streams.metrics import REPAIR_ERRORS, REPAIRED

log = logging.getLogger("imagefork")


class Repairer:
    def __init__(self, config: Config, store: ObjectStore, workers: int = 4):
        self.config = config
        self.store = store
        self.after_ms = int(config.repair_after_s * 1000)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="repair")
        self.workers = workers
        self.found: queue.SimpleQueue[tuple[int, list[TaskResult]]] = queue.SimpleQueue()
        self._in_flight: set[str] = set()
        self._next: dict[str, tuple[int, float]] = {}  # workflow id -> (attempts, not before, monotonic)

    def consider(self, partition: int, stalled: list[Workflow]) -> None:
        """Start lookups for stalled workflows whose pause is over, while the pool has room."""
        mono = time.monotonic()
        for flow in stalled:
            if len(self._in_flight) >= self.workers:
                return
            wf = flow.workflowId
            attempts, not_before = self._next.get(wf, (0, 0.0))
            if wf in self._in_flight or mono < not_before:
                continue
            self._next[wf] = (attempts + 1, mono + min(300.0, self.config.repair_after_s * 2 ** attempts))
            self._in_flight.add(wf)
            missing = flow.missing()
            run_id = flow.plan.runId if flow.plan else ""
            self.pool.submit(self._look, partition, wf, run_id, missing)

    def scan(self, partitions, consumer) -> None:
        """Look for the stalled workflows of the partitions read to their end (no result on its way)."""
        now = now_ms()
        for p, state in partitions.states.items():
            if partitions.caught_up(consumer, p):
                stalled = state.stalled(now, self.after_ms)
                if stalled:
                    self.consider(p, stalled)
        self.forget({wf for s in partitions.states.values() for wf in s.open})

    def forget(self, open_ids) -> None:
        """Drop the pauses of workflows that are no longer open."""
        if len(self._next) > 1000:
            self._next = {wf: v for wf, v in self._next.items() if wf in open_ids}

    def take(self) -> list[tuple[int, list[TaskResult]]]:
        out = []
        while True:
            try:
                out.append(self.found.get_nowait())
            except queue.Empty:
                return out

    def _look(self, partition: int, workflow_id: str, run_id: str, tasks: list[TaskDescriptor]) -> None:
        try:
            found = self.find(workflow_id, run_id, tasks)
            if found:
                log.warning("workflow %s: %d result(s) were lost; recovered them from their objects",
                            workflow_id, len(found))
                REPAIRED.inc(len(found))
                self.found.put((partition, found))
        except Exception as exc:  # the next attempt, after a longer pause, tries again
            REPAIR_ERRORS.inc()
            log.warning("repair lookup for workflow %s failed: %s: %s", workflow_id, type(exc).__name__, exc)
        finally:
            self._in_flight.discard(workflow_id)

    def find(self, workflow_id: str, run_id: str, tasks: list[TaskDescriptor]) -> list[TaskResult]:
        found = []
        older_than = time.time() - self.config.repair_after_s
        for task in tasks:
            ref, fmt = task.taskRef, task.format
            if not fmt:
                continue
            key = output_key(self.config.output_prefix, workflow_id, ref, fmt)
            head = self.store.head(key)
            meta = (head or {}).get("Metadata", {})
            if not head or meta.get("imagefork-task") != ref or meta.get("imagefork-run", "") != run_id:
                continue
            modified = head.get("LastModified")
            if modified is not None and modified.timestamp() > older_than:
                continue  # written recently: its result is most likely on its way
            try:
                output = TaskOutput(ref, meta.get("imagefork-format", fmt), int(meta.get("imagefork-width", 0)),
                                    int(meta.get("imagefork-height", 0)), int(head.get("ContentLength", 0)),
                                    head.get("ContentType", ""), self.store.uri(key), self.store.url(key),
                                    **applied_options(meta.get("imagefork-options", "")))
            except (TypeError, ValueError) as exc:  # written by hand, or by something else: the others still count
                REPAIR_ERRORS.inc()
                log.warning("repair lookup for workflow %s: the object of %s is not an output it can read "
                            "(%s: %s): not used", workflow_id, ref, type(exc).__name__, exc)
                continue
            found.append(TaskResult(workflow_id, ref, SUCCEEDED, 0, now_ms(), output=output, runId=run_id))
        return found

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def applied_options(text: str) -> dict:
    """What an output object says was applied (its ``imagefork-options`` metadata, JSON: ``frames`` and
    ``options``, or the flat fields of a worker older than ``options``), as TaskOutput's fields; a value
    an option would not take, or the wrong type, is left out (an object written by hand gives defaults)."""
    try:
        given = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(given, dict):
        return {}
    raw = options_of("TaskOutput", given).said() if isinstance(given.get("options"), (dict, type(None))) else {}
    kept = {}
    for option in OPTIONS:
        if option.name in raw:
            value, why = option.parse(raw[option.name])
            if why is None and type(value) is type(raw[option.name]):
                kept[option.name] = value
    out: dict = {"options": ImageOptions(**kept)}
    frames = given.get("frames")
    if type(frames) is int and frames > 0:
        out["frames"] = frames
    return out
