"""The project's Prometheus metrics, declared once (prometheus-client's default registry).

Consumer lag is a custom collector (streams/adapters/lag.py): ``imagefork_consumer_lag`` and
``imagefork_consumer_committed_offset``, per group, topic and partition, read from the brokers at scrape time.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("imagefork_messages", "Messages consumed, by agent and how each one ended "
                   "(processed, retried, dead_lettered)", ["agent", "outcome"])
DEAD_LETTERS = Counter("imagefork_dead_letters", "Messages written to the dead-letter topic, by agent and code",
                       ["agent", "code"])
WORKER_CRASHES = Counter("imagefork_worker_crashes", "Resize processes that died on a task: seen as a task "
                         "found in flight after its worker died (suspected) or a sandbox that died (observed)",
                         ["kind"])
REPAIR_ERRORS = Counter("imagefork_repair_errors", "Failed lookups of lost results in the object store")
REPAIRED = Counter("imagefork_repaired_results", "Task results the join's repair rebuilt from their output objects")
SOURCES_REVALIDATED = Counter("imagefork_sources_revalidated", "Sources a server answered 304 Not Modified: "
                              "staged from the copy kept of their bytes, not downloaded (IMAGEFORK_REUSE)")
OUTPUTS_REUSED = Counter("imagefork_outputs_reused", "Outputs copied from one made before from the same source "
                         "bytes and spec (IMAGEFORK_REUSE), not made again")

# --- workflows (observed by the join) ------------------------------------------------------------
WORKFLOWS = Counter("imagefork_workflows", "Workflows finished, by final status", ["status"])
WEBHOOKS = Counter("imagefork_webhooks", "Final events POSTed to their callbackUrl, by outcome (DELIVERED, FAILED: "
                   "dead-lettered)", ["outcome"])
WORKFLOW_SECONDS = Histogram("imagefork_workflow_duration_seconds",
                             "End-to-end latency: request submitted to final event", ["status"],
                             buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
OPEN_WORKFLOWS = Gauge("imagefork_open_workflows", "Workflows open in this join process's partitions")
LANE_TASKS = Gauge("imagefork_lane_tasks", "Messages of each priority lane a process is running or holding "
                   "for a slot (interactive first; batch keeps IMAGEFORK_BATCH_SHARE)", ["role", "lane", "state"])
SOURCE_CACHE_BYTES = Gauge("imagefork_source_cache_bytes", "Decoded source pixels a resize process holds (cache + in use)")
SOURCE_CACHE_LOOKUPS = Counter("imagefork_source_cache_lookups", "Decoded-source lookups of a resize process, by "
                               "result (hit: decoded already; miss: fetched and decoded)", ["result"])

# --- tasks (observed by resize) ------------------------------------------------------------------
TASKS = Counter("imagefork_tasks", "Resize tasks ended, by status (SUCCEEDED, FAILED, CANCELLED: its run was "
                "cancelled) and code (empty when SUCCEEDED); a task retried counts once, when it ends", ["status", "code"])
TASK_SECONDS = Histogram("imagefork_task_duration_seconds", "A succeeded task's resize, encode and upload "
                         "time, by output format", ["format"],
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
STAGE_SECONDS = Histogram("imagefork_stage_seconds", "Wall time of each step of a message's handling, by role and "
                          "step (resize: slot_wait, ledger, pool_wait, fetch, decode, resize_encode, upload, "
                          "result_send, loop; planner: fetch, stage, plan_send, task_send, loop); "
                          "docs/breakdown.md adds them up",
                          ["role", "stage"],
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
COMPUTE_CPU = Counter("imagefork_compute_cpu_seconds", "CPU seconds resize spent decoding, resizing and encoding "
                      "(its process tree's other CPU is the pipeline's overhead: docs/breakdown.md)")
RETRIES = Counter("imagefork_retries", "Messages and tasks put on a retry topic for another attempt, "
                  "by agent and error code", ["agent", "code"])

# --- object store and sources --------------------------------------------------------------------
BYTES_READ = Counter("imagefork_bytes_read", "Source bytes fetched, by source (http, s3)", ["source"])
BYTES_WRITTEN = Counter("imagefork_bytes_written", "Bytes uploaded to the object store, by kind "
                        "(output: resized images; staging: fetched sources kept for resize)", ["kind"])

# --- consumer lag (streams/adapters/lag.py) ------------------------------------------------------
LAG_SCRAPE_ERRORS = Counter("imagefork_lag_scrape_errors", "Failed reads of the consumer groups' offsets "
                            "(a scrape then has no imagefork_consumer_lag samples)")


# A resize pool's process (IMAGEFORK_RESIZE_POOL=process, or a sandbox) serves no metrics of its own: its byte
# counts are tallied here and go back to the worker with the task's outcome (take_io, then add_io).
_io_tally: dict[tuple[str, str], int] | None = None


def count_read(source: str, nbytes: int) -> None:
    if _io_tally is None:
        BYTES_READ.labels(source).inc(nbytes)
    else:
        _io_tally[("read", source)] = _io_tally.get(("read", source), 0) + nbytes


def count_written(kind: str, nbytes: int) -> None:
    if _io_tally is None:
        BYTES_WRITTEN.labels(kind).inc(nbytes)
    else:
        _io_tally[("written", kind)] = _io_tally.get(("written", kind), 0) + nbytes


def tally_io() -> None:
    """In a pool's process: keep byte counts for take_io instead of counting them here."""
    global _io_tally
    _io_tally = {}


def take_io() -> list[tuple[str, str, int]]:
    """The byte counts tallied since the last call (none outside a pool's process)."""
    if not _io_tally:
        return []
    taken = [(what, label, n) for (what, label), n in _io_tally.items()]
    _io_tally.clear()
    return taken


def add_io(taken) -> None:
    for what, label, n in taken or ():
        (BYTES_READ if what == "read" else BYTES_WRITTEN).labels(label).inc(n)
