"""The project's Prometheus metrics, declared once (prometheus-client's default registry)."""
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

# --- workflows (observed by the join) ------------------------------------------------------------
WORKFLOWS = Counter("imagefork_workflows", "Workflows finished, by final status", ["status"])
WORKFLOW_SECONDS = Histogram("imagefork_workflow_duration_seconds",
                             "End-to-end latency: request submitted to final event", ["status"],
                             buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
OPEN_WORKFLOWS = Gauge("imagefork_open_workflows", "Workflows open in this join process's partitions")


def install(config, role: str) -> None:
    """Per-process metrics set up at a worker's start (``role``: planner, resize, join, api)."""
