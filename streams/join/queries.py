"""What the API asks a join (over HTTP, from the join's own server thread): one workflow's state, the
open workflows of its partitions. Answered from the partitions this process owns, as of the last batch
applied; a finish is answered once committed (the batch that makes one holds the lock until it commits)."""
from __future__ import annotations

from aiohttp import web

from streams.core.join import describe, open_summaries
from streams.join.partitions import Partitions

CLIENT_ID = "imagefork-join"  # its consumer's client id (with its URL): the API finds the owner by it
PATIENCE_S = 1.0  # a query waits this long at most for a batch and its commit (it runs on the HTTP loop)
NOT_READY = (503, {"error": "NOT_READY", "message": "the join is starting"})
BUSY = (503, {"error": "BUSY", "message": "the join is committing a batch; ask again"})


def query(partitions: Partitions, ready: bool, workflow_id: str) -> tuple[int, dict]:
    """One workflow, if its partition is this process's (else 409: ask its owner)."""
    if not ready or not partitions.count:
        return NOT_READY
    p = partitions.of(workflow_id)
    if not partitions.lock.acquire(timeout=PATIENCE_S):
        return BUSY
    try:
        state = partitions.states.get(p)
        if state is None:
            return 409, {"error": "NOT_OWNER", "message": f"partition {p} is not this join's",
                         "owned": False, "partition": p}
        return 200, {"owned": True, "partition": p, **describe(state, workflow_id)}
    finally:
        partitions.lock.release()


def open_workflows(partitions: Partitions, limit: int) -> tuple[int, dict]:
    """The open workflows of this process's partitions."""
    if not partitions.lock.acquire(timeout=PATIENCE_S):
        return BUSY
    try:
        return 200, {"partitions": sorted(partitions.states),
                     "workflows": open_summaries(list(partitions.states.values()), limit)}
    finally:
        partitions.lock.release()


def readiness_of(worker) -> tuple[bool, str]:
    """A JoinWorker's answer to /readyz."""
    if not worker.ready:
        return False, "joining its consumer group and restoring its partitions"
    states = worker.partitions.states
    return True, f"{len(states)} partitions of {worker.topic} restored: {sorted(states)}"


def query_routes(box: dict) -> list[web.RouteDef]:
    """The join's own HTTP routes (``box["worker"]``, a JoinWorker, answers once it exists)."""

    async def one(request):
        w = box.get("worker")
        status, body = NOT_READY if w is None else query(w.partitions, w.ready, request.match_info["id"])
        return web.json_response(body, status=status)

    async def listing(request):
        w = box.get("worker")
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            limit = 100
        status, body = NOT_READY if w is None else open_workflows(w.partitions, limit)
        return web.json_response(body, status=status)

    return [web.get("/internal/workflows/{id}", one), web.get("/internal/open", listing)]
