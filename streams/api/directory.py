"""The workflow directory: a workflow's status document, from what this process is given.

A status comes from the join's answer (open, finished or unknown), the completed topic's index of final
events, the requests this process accepted and not yet seen planned, and the retries it sent. No aiohttp
and no Kafka here: the join (``ask``, ``open_workflows``) and the index (``get``, ``recent``) are passed
in, a :class:`~streams.api.router.JoinRouter` and a :class:`~streams.api.index.CompletedIndex` in the
process, small fakes in tests.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import Callable, Protocol

from streams.core.models import WorkflowCompleted, now_ms
from streams.core.status import final_doc, marker_doc, pending_doc, running_doc, summary

ACCEPTED_KEPT = 10_000  # accepted ids remembered (the oldest forgotten first)


class Unavailable(Exception):
    """No join answers for the workflow's partition (yet)."""


class Finals(Protocol):
    """The latest final event of each workflow id (the completed topic)."""

    def get(self, workflow_id: str) -> WorkflowCompleted | None: ...

    def recent(self) -> list[WorkflowCompleted]: ...


class Join(Protocol):
    """The join's state: ``ask`` answers ``{"state": "open" | "finished" | "unknown", ...}`` or raises
    :class:`Unavailable`; ``open_workflows`` lists what every join holds open."""

    async def ask(self, workflow_id: str, patience_s: float = 15.0) -> dict: ...

    async def open_workflows(self, limit: int) -> list[dict]: ...


class Directory:
    def __init__(self, index: Finals, join: Join | None = None, workflow_timeout_s: float = 300.0,
                 final_wait_s: float = 5.0, clock: Callable[[], int] = now_ms):
        self.index, self.join = index, join  # the join: set once the process has its HTTP session
        self.workflow_timeout_s, self.final_wait_s, self.clock = workflow_timeout_s, final_wait_s, clock
        self.accepted: OrderedDict[str, tuple[int, str]] = OrderedDict()  # id -> (accepted at, location)
        self.retries: dict[str, tuple[str, int]] = {}  # id -> (the run retried, when), until the retry shows
        # one submit or retry at a time per workflow id: two at once would both find it unknown (or
        # finished) and both send
        self.busy: dict[str, list] = {}  # id -> [its lock, holder and waiters]
        self.polls: dict[str, tuple[float, asyncio.Future]] = {}  # id -> the last look the streams share

    # --- what this process sent -----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def one_at_a_time(self, workflow_id: str):
        """Submits and retries of one workflow id, one after another. The entry counts its holder and its
        waiters, and goes when the last has left (a lock dropped while a waiter was being woken would let
        a newcomer in beside it)."""
        entry = self.busy.get(workflow_id)
        if entry is None:
            entry = self.busy[workflow_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self.busy[workflow_id]

    def accept(self, workflow_id: str, location: str) -> None:
        """A request sent: PENDING until the join has heard of it."""
        self.accepted.pop(workflow_id, None)
        self.accepted[workflow_id] = (self.clock(), location)
        while len(self.accepted) > ACCEPTED_KEPT:
            self.accepted.popitem(last=False)

    def retry_sent(self, workflow_id: str, run_id: str) -> None:
        """A retry of ``run_id`` sent: PENDING until its run replaces that one."""
        self.retries[workflow_id] = (run_id, self.clock())

    # --- status ---------------------------------------------------------------------------------
    async def known(self, workflow_id: str, patience_s: float = 10.0) -> dict | None:
        """The workflow's document, or None when no one has heard of it. A retry just sent shows as
        PENDING until its run replaces the one it retries (for at most the workflow timeout)."""
        doc = await self._lookup(workflow_id, patience_s)
        retried = self.retries.get(workflow_id)
        if retried is not None and doc is not None:
            run_id, at = retried
            if doc["runId"] == run_id and self.clock() - at < self.workflow_timeout_s * 1000:
                return {**pending_doc(workflow_id, at, doc["fileLocation"]), "retryOf": run_id}
            del self.retries[workflow_id]
        return doc

    async def _lookup(self, workflow_id: str, patience_s: float) -> dict | None:
        try:
            answer = await self.join.ask(workflow_id, patience_s)
        except Unavailable:
            # no join answers for its partition now (one was killed and its session has not expired,
            # or none runs): a finished workflow is still answered from its final event, and one this
            # process accepted is PENDING (its request waits in Kafka)
            doc = self._finished_or_accepted(workflow_id)
            if doc is None:
                raise
            return doc
        state = answer.get("state")
        if state == "open":
            return running_doc(answer)
        if state == "finished":
            final = await self._final(workflow_id, answer.get("runId", ""))
            return final_doc(final) if final is not None else marker_doc(answer)
        return self._finished_or_accepted(workflow_id)  # its marker expired; its final event is still on the topic

    def _finished_or_accepted(self, workflow_id: str) -> dict | None:
        final = self.index.get(workflow_id)
        if final is not None:
            return final_doc(final)
        if workflow_id in self.accepted:
            at, location = self.accepted[workflow_id]
            return pending_doc(workflow_id, at, location)
        return None

    async def _final(self, workflow_id: str, run_id: str) -> WorkflowCompleted | None:
        """The final event of that run (the index may be a moment behind the join's state)."""
        give_up = time.monotonic() + self.final_wait_s
        while True:
            final = self.index.get(workflow_id)
            if final is not None and (not run_id or not final.runId or final.runId == run_id):
                return final
            if time.monotonic() > give_up:
                return final
            await asyncio.sleep(0.1)

    async def poll(self, workflow_id: str, every_s: float = 0.25) -> dict | None:
        """A stream's look at its workflow, shared by every stream that follows the same one: 200 streams on
        a workflow ask its join 4 times a second, not 800."""
        now = time.monotonic()
        last = self.polls.get(workflow_id)
        if last is None or now - last[0] >= every_s:
            if len(self.polls) > 1000:
                self.polls = {k: v for k, v in self.polls.items() if now - v[0] < 10}
            last = self.polls[workflow_id] = (now, asyncio.ensure_future(self.known(workflow_id)))
        return await asyncio.shield(last[1])  # a stream that goes away does not cancel the others' look

    async def listing(self, status: str | None, limit: int) -> list[dict]:
        """Finished, open and accepted workflows (of ``status``, any when None), newest first."""
        rows: dict[str, dict] = {}
        for final in self.index.recent():
            rows[final.workflowId] = summary(final_doc(final, placeholder=False))
        for w in await self.join.open_workflows(limit):
            rows[w["workflowId"]] = {"workflowId": w["workflowId"], "status": "RUNNING", "runId": w["runId"],
                                     "fileLocation": w["fileLocation"], "submittedAt": w["submittedAt"],
                                     "completedAt": None,
                                     "progress": {"done": w["done"], "total": w["total"], "failed": w["failed"]}}
        for wf, (at, location) in self.accepted.items():
            if wf not in rows:
                rows[wf] = summary(pending_doc(wf, at, location))
        chosen = [r for r in rows.values() if status is None or r["status"] == status]
        chosen.sort(key=lambda r: r.get("submittedAt") or 0, reverse=True)
        return chosen[:limit]
