"""The join's state for the partitions one process owns: plain data and verbs, no I/O.

A workflow is open from its first event (normally its plan) until it finishes; then
only a small *finished marker* (status, time, run id) stays, so that late, duplicated
or replayed events and resubmissions of the same id cannot open it again. Markers
expire after the retention period, which is never shorter than the workflow timeout plus
the late grace: a result that comes after its workflow's marker has gone is past its
deadline plus that grace, and is refused as late instead of opening the workflow again.

Every verb returns an :class:`Outcome`: the *rows* to write to the changelog (one
small row per plan, per task result and per marker, so the work per result does not
grow with the fan-out) and, at most once per workflow, the final event. Applying the
same rows in order (see :meth:`JoinState.restore`) rebuilds the same state.

The clock is an index, not a scan: a heap of open workflows by deadline and a queue
of markers by finishing time, so a tick costs in proportion to what is due.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field, replace

from streams.core.models import (
    CANCELLED, COMPLETED, FAILED, SUCCEEDED, TIMED_OUT,
    Cancellation, TaskDescriptor, TaskError, TaskResult, WorkflowCompleted, WorkflowPlan,
)

PLAN, RESULT, MARKER, CANCEL = "plan", "result", "marker", "cancel"


@dataclass(frozen=True, slots=True)
class Marker:
    """What is left of a finished workflow."""
    status: str
    at: int
    runId: str = ""
    kept: tuple[str, ...] = ()  # a CANCELLED run: the tasks whose outputs its final event lists


@dataclass(frozen=True, slots=True)
class Row:
    """One changelog change: ``value`` None deletes the row."""
    kind: str  # PLAN | RESULT | MARKER | CANCEL (a cancel waiting for its plan)
    workflowId: str
    taskRef: str = ""
    value: WorkflowPlan | TaskResult | Marker | Cancellation | None = None


@dataclass(frozen=True, slots=True)
class Ignored:
    """A plan not taken because its workflow id belongs to another run, finished (``taken`` is its
    marker) or still open (``taken.status`` is RUNNING): the submitter is told so at once."""
    workflowId: str
    runId: str
    reason: str  # "finished" | "running"
    taken: Marker


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    final: WorkflowCompleted | None = None
    # (workflow id, run id) of a plan that was not taken (a resubmission): its staged source can go
    discarded: tuple[str, str] | None = None
    ignored: str = ""  # why the event changed nothing ("" when it did)
    notice: Ignored | None = None  # a resubmission's answer (with ``discarded``)
    late: bool = False  # a result for no known workflow, past its deadline and the grace: refused
    # (s3:// URI, workflow id, run id) of an output made for a cancelled run after its final event, which
    # does not list it: its object goes (if it is still that run's: the key is the task's in every run)
    orphan: tuple[str, str, str] | None = None


class Workflow:
    """An open workflow: its plan (once known) and one result per task."""
    __slots__ = ("workflowId", "plan", "results", "firstSeen", "updatedAt", "index", "done", "failed", "cancel")

    def __init__(self, workflow_id: str, now: int):
        self.workflowId = workflow_id
        self.plan: WorkflowPlan | None = None
        self.results: dict[str, TaskResult] = {}
        self.firstSeen = now
        self.updatedAt = now
        self.index: frozenset[str] = frozenset()  # the plan's task refs
        self.done = 0  # results counted against the plan
        self.failed = 0  # of which not SUCCEEDED
        self.cancel: Cancellation | None = None  # a cancel that came before the plan it is for

    def deadline(self, default_timeout_ms: int) -> int:
        return self.plan.deadline if self.plan else self.firstSeen + default_timeout_ms

    def missing(self) -> list[TaskDescriptor]:
        """The plan's tasks with no result yet."""
        if self.plan is None:
            return []
        return [t for t in self.plan.tasks if t.taskRef not in self.results]

    def progress(self) -> tuple[int, int | None]:
        return (self.done, len(self.plan.tasks)) if self.plan else (len(self.results), None)


class JoinState:
    """The open workflows and finished markers of one partition."""

    def __init__(self, *, default_timeout_ms: int, retention_ms: int, late_grace_ms: int = 60_000):
        self.default_timeout_ms = default_timeout_ms
        self.late_grace_ms = late_grace_ms
        # a marker outlives every deadline its workflow's results can carry, plus the grace (see above)
        self.retention_ms = max(retention_ms, default_timeout_ms + late_grace_ms)
        self.open: dict[str, Workflow] = {}
        # finished markers packed as "status at runId" strings: a dict of strings only is never tracked
        # by the garbage collector, so a million markers cost no collection pauses (a tuple value would
        # put the whole dict back in the youngest generation, to be walked by every young collection)
        self.finished: dict[str, str] = {}
        self._deadlines: list[tuple[int, str]] = []  # (deadline, workflow id); stale entries skipped
        self._expiry: deque[tuple[int, str]] = deque()  # (finished at, workflow id), in finishing order
        self.cancelled: dict[str, frozenset[str]] = {}  # CANCELLED markers' kept task refs

    # --- the verbs ------------------------------------------------------------------------
    def record_plan(self, plan: WorkflowPlan, now: int) -> Outcome:
        wf = plan.workflowId
        marker = self.marker(wf)
        rows: list[Row] = []
        if marker is not None:
            if plan.runId == marker.runId:
                # the same run's plan again (its request replayed): the planner staged the source again
                return Outcome(discarded=(wf, plan.runId), ignored="finished")
            again = marker.status != COMPLETED or plan.preset is not None  # COMPLETED: only a regeneration
            if not (plan.retryOf and plan.retryOf == marker.runId and again):
                return Outcome(discarded=(wf, plan.runId), ignored="finished",
                               notice=Ignored(wf, plan.runId, "finished", marker))
            # a retry of the run that finished last (which did not complete, or is regenerated): it opens again
            del self.finished[wf]  # its expiry entry is skipped when it comes up (no marker)
            self.cancelled.pop(wf, None)
            rows.append(Row(MARKER, wf))
        flow = self.open.get(wf)
        if flow is not None and flow.plan is not None:
            if plan.runId == flow.plan.runId:
                return Outcome(ignored="duplicate plan")
            return Outcome(discarded=(wf, plan.runId), ignored="another run is open",
                           notice=Ignored(wf, plan.runId, "running", Marker("RUNNING", 0, flow.plan.runId)))
        if flow is None:
            flow = self._open(wf, now)
        rows.append(Row(PLAN, wf, value=plan))
        flow.plan, flow.index, flow.updatedAt = plan, frozenset(plan.taskRefs), now
        for output in plan.carried:  # a retry's kept outputs count as this run's results
            if output.taskRef in flow.index:
                kept = TaskResult(wf, output.taskRef, SUCCEEDED, attempts=0, finishedAt=now, output=output,
                                  runId=plan.runId)
                flow.results[output.taskRef] = kept
                rows.append(Row(RESULT, wf, output.taskRef, kept))
        for ref, res in list(flow.results.items()):  # results that came first: keep this run's own
            if res.runId != plan.runId or ref not in flow.index:
                del flow.results[ref]
                rows.append(Row(RESULT, wf, ref))
        flow.done = len(flow.results)
        flow.failed = sum(1 for r in flow.results.values() if r.status != SUCCEEDED)
        heapq.heappush(self._deadlines, (plan.deadline, wf))
        if plan.failure is not None:
            return self._finish(flow, plan.failure.status, now, rows)
        if flow.cancel is not None:
            if cancels(flow.cancel, plan):  # cancelled before it was planned: it ends here
                return self._finish(flow, CANCELLED, now, rows)
            flow.cancel = None  # for another run of the id
            rows.append(Row(CANCEL, wf))
        return self._maybe_complete(flow, now, rows)

    def record_cancel(self, cancel: Cancellation, now: int) -> Outcome:
        """End the workflow's run CANCELLED with the outputs it has; before its plan comes (the planner is at
        its source, or it is a retry of a finished run not planned yet), wait for it until the timeout."""
        wf = cancel.workflowId
        cancel = replace(cancel, at=now)  # when the join had it: the client's clock decides nothing here
        flow = self.open.get(wf)
        if flow is not None and flow.plan is not None:
            if not cancels(cancel, flow.plan):
                return Outcome(ignored="another run")
            flow.cancel = cancel
            return self._finish(flow, CANCELLED, now, [])
        marker = self.marker(wf)
        # a cancel without a run, of an id whose run ended without completing, waits: a retry of it may come
        if marker is not None and (cancel.runId == marker.runId or not cancel.runId and marker.status == COMPLETED):
            return Outcome(ignored="finished")
        if flow is None:
            flow = self._open(wf, now)
        flow.cancel = cancel
        return Outcome([Row(CANCEL, wf, value=cancel)])

    def record_result(self, result: TaskResult, now: int) -> Outcome:
        wf = result.workflowId
        if wf in self.finished:
            kept = self.cancelled.get(wf)
            run = self.marker(wf).runId
            if kept is not None and result.output is not None and result.taskRef not in kept and result.runId == run:
                # made for a cancelled run after its final event, which does not list it: no orphan is left
                return Outcome(ignored="cancelled", orphan=(result.output.s3Uri, wf, run))
            return Outcome(ignored="finished")
        flow = self.open.get(wf)
        if flow is None:
            if 0 < result.deadline <= now - self.late_grace_ms:
                # its workflow finished so long ago that its marker has gone (or was never planned):
                # opening it would give it a second, empty final event
                return Outcome(ignored="late", late=True)
            flow = self._open(wf, now)
        ref = result.taskRef
        if flow.plan is not None and (ref not in flow.index or result.runId != flow.plan.runId):
            return Outcome(ignored="not in the plan's run")
        previous = flow.results.get(ref)
        if previous is not None and not (previous.status != SUCCEEDED and result.status == SUCCEEDED):
            return Outcome(ignored="duplicate")  # a task counts once; a later success replaces a failure
        flow.results[ref] = result
        flow.updatedAt = now
        if previous is None:
            flow.done += 1
        else:
            flow.failed -= 1
        if result.status != SUCCEEDED:
            flow.failed += 1
        return self._maybe_complete(flow, now, [Row(RESULT, wf, ref, result)])

    def due(self, now: int, limit: int = 2000) -> list[Outcome]:
        """The clock: time out open workflows past their deadline and forget markers past
        retention; at most ``limit`` of each per call (the rest on the next tick)."""
        outcomes: list[Outcome] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now and len(outcomes) < limit:
            deadline, wf = heapq.heappop(heap)
            flow = self.open.get(wf)
            if flow is None or flow.deadline(self.default_timeout_ms) != deadline:
                continue  # finished, or its deadline moved (a later entry stands for it)
            if flow.cancel is not None and flow.plan is None and not flow.results:
                del self.open[wf]  # a cancel whose workflow never came: nothing to end
                outcomes.append(Outcome([Row(CANCEL, wf)], ignored="cancel of nothing"))
                continue
            outcomes.append(self._finish(flow, CANCELLED if flow.cancel else TIMED_OUT, now, []))
        expired = 0
        queue = self._expiry
        while queue and queue[0][0] + self.retention_ms <= now and expired < limit:
            at, wf = queue.popleft()
            marker = self.marker(wf)
            if marker is None or marker.at != at:
                continue
            del self.finished[wf]
            self.cancelled.pop(wf, None)
            outcomes.append(Outcome([Row(MARKER, wf)]))
            expired += 1
        return outcomes

    def stalled(self, now: int, after_ms: int) -> list[Workflow]:
        """Open workflows with a plan and missing results that made no progress for ``after_ms``."""
        return [f for f in self.open.values()
                if f.plan is not None and f.done < len(f.plan.tasks) and now - f.updatedAt >= after_ms]

    def next_due(self) -> int | None:
        """When the clock next has something to do (epoch ms), or None."""
        times = []
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._expiry:
            times.append(self._expiry[0][0] + self.retention_ms)
        return min(times) if times else None

    def marker(self, wf: str) -> Marker | None:
        packed = self.finished.get(wf)
        if packed is None:
            return None
        status, at, run_id = packed.split(" ", 2)
        return Marker(status, int(at), run_id)

    def remember(self, wf: str, marker: Marker) -> None:
        """Keep a finished marker (markers must come in finishing order: the expiry queue is FIFO)."""
        self.finished[wf] = f"{marker.status} {marker.at} {marker.runId}"
        self._expiry.append((marker.at, wf))
        if marker.status == CANCELLED:
            self.cancelled[wf] = frozenset(marker.kept)

    # --- inside ---------------------------------------------------------------------------
    def _open(self, wf: str, now: int) -> Workflow:
        flow = self.open[wf] = Workflow(wf, now)
        heapq.heappush(self._deadlines, (now + self.default_timeout_ms, wf))
        return flow

    def _maybe_complete(self, flow: Workflow, now: int, rows: list[Row]) -> Outcome:
        plan = flow.plan
        if plan is None or flow.done < len(plan.tasks):
            return Outcome(rows)
        return self._finish(flow, FAILED if flow.failed else COMPLETED, now, rows)

    def _finish(self, flow: Workflow, status: str, now: int, rows: list[Row]) -> Outcome:
        wf = flow.workflowId
        final = build_final(flow, status, now)
        del self.open[wf]
        kept = tuple(o.taskRef for o in final.outputs) if status == CANCELLED else ()
        marker = Marker(status, now, flow.plan.runId if flow.plan else "", kept)
        self.remember(wf, marker)
        # the state rows go (tombstones, so compaction reclaims them) and the marker stays
        refs = set(flow.results) | {r.taskRef for r in rows if r.kind == RESULT}
        rows = ([Row(PLAN, wf)] if flow.plan is not None else []) + [Row(RESULT, wf, ref) for ref in refs]
        if flow.cancel is not None:
            rows.append(Row(CANCEL, wf))
        rows.append(Row(MARKER, wf, value=marker))
        return Outcome(rows, final)


def cancels(cancel: Cancellation, plan: WorkflowPlan) -> bool:
    """Whether ``cancel`` is for ``plan``'s run: it names that run, or none (the open one, or the next
    planned: a request waits in the planner's backlog, or at its source, before its plan comes)."""
    return cancel.runId in ("", plan.runId)


def restore(state: JoinState, plans: list[WorkflowPlan], results: list[TaskResult], markers: dict[str, Marker],
            now: int, cancels: list[Cancellation] = ()) -> None:
    """Rebuild ``state`` (new) from the changelog's surviving rows (what compaction would keep)."""
    for wf, marker in sorted(markers.items(), key=lambda kv: kv[1].at):
        state.remember(wf, marker)
    for plan in plans:
        flow = state._open(plan.workflowId, plan.submittedAt)
        flow.plan, flow.index = plan, frozenset(plan.taskRefs)
        heapq.heappush(state._deadlines, (plan.deadline, plan.workflowId))
    for res in results:
        flow = state.open.get(res.workflowId) or state._open(res.workflowId, res.finishedAt)
        flow.results[res.taskRef] = res
    for cancel in cancels:
        flow = state.open.get(cancel.workflowId) or state._open(cancel.workflowId, cancel.at or now)
        flow.cancel = cancel
    for flow in state.open.values():
        flow.done = len(flow.results)
        flow.failed = sum(1 for r in flow.results.values() if r.status != SUCCEEDED)
        # progress is measured from the restore: a restart does not make every workflow look stalled
        flow.updatedAt = now


def build_final(flow: Workflow, status: str, now: int) -> WorkflowCompleted:
    plan = flow.plan
    results = flow.results
    refs = list(plan.taskRefs) if plan else sorted(results)
    outputs = [results[r].output for r in refs if r in results and results[r].status == SUCCEEDED]
    errors: list[TaskError] = []
    if plan and plan.failure:
        errors.append(TaskError(taskRef="", code=plan.failure.code, message=plan.failure.message,
                                attempts=plan.failure.attempts))
    if status == CANCELLED:
        cancel = flow.cancel
        who = f" by {cancel.by}" if cancel and cancel.by else ""
        why = f": {cancel.reason}" if cancel and cancel.reason else ""
        errors.append(TaskError(taskRef="", code="CANCELLED", message=(
            f"cancelled{who}{why}; {len(outputs)} of {len(refs)} outputs had been made")[:1000]))
    for ref in refs:
        res = results.get(ref)
        if res is None:
            if status == TIMED_OUT:
                errors.append(TaskError(taskRef=ref, code="TIMED_OUT",
                                        message="no result before the workflow deadline"))
        elif res.status != SUCCEEDED and res.error is not None:
            errors.append(res.error)
    return WorkflowCompleted(
        workflowId=flow.workflowId,
        correlationId=plan.correlationId if plan else None,
        status=status,
        fileLocation=plan.fileLocation if plan else "",
        fileLocations=tuple(o.url for o in outputs if o is not None),
        outputs=tuple(o for o in outputs if o is not None),
        errors=tuple(errors),
        taskCount=len(refs),
        submittedAt=plan.submittedAt if plan else flow.firstSeen,
        completedAt=now,
        runId=plan.runId if plan else "",
        retryOf=plan.retryOf if plan else "",
        request=plan.request if plan else "",
        tasks=plan.tasks if plan else (),
        facts=next((results[r].facts for r in refs if r in results and results[r].facts), None),
        preset=plan.preset if plan else None,
    )


# --- queries (the API's view of a partition's state) ------------------------------------------
def describe_open(flow: Workflow) -> dict:
    """An open workflow as plain data: its plan (None until it is known) and the results so far."""
    done, total = flow.progress()
    return {
        "state": "open",
        "workflowId": flow.workflowId,
        "plan": flow.plan.to_dict() if flow.plan else None,
        "results": [r.to_dict() for r in flow.results.values()],
        "firstSeen": flow.firstSeen,
        "updatedAt": flow.updatedAt,
        "done": done,
        "total": total,
        "failed": flow.failed,
    }


def describe(state: JoinState, workflow_id: str) -> dict:
    """What this partition knows of ``workflow_id``: open (with its results), finished (its marker), or
    unknown. A cancel waiting for a plan is not a workflow yet."""
    flow = state.open.get(workflow_id)
    if flow is not None and (flow.plan is not None or flow.results):
        return describe_open(flow)
    marker = state.marker(workflow_id)
    if marker is not None:
        return {"state": "finished", "workflowId": workflow_id, "status": marker.status, "at": marker.at,
                "runId": marker.runId}
    return {"state": "unknown", "workflowId": workflow_id}


def open_summaries(states: list[JoinState], limit: int) -> list[dict]:
    """The ``limit`` most recently started open workflows of these partitions, newest first."""
    flows = heapq.nlargest(limit, (f for s in states for f in s.open.values() if f.plan is not None or f.results),
                           key=lambda f: f.plan.submittedAt if f.plan else f.firstSeen)
    out = []
    for f in flows:
        done, total = f.progress()
        out.append({"workflowId": f.workflowId, "runId": f.plan.runId if f.plan else "",
                    "fileLocation": f.plan.fileLocation if f.plan else "",
                    "submittedAt": f.plan.submittedAt if f.plan else f.firstSeen, "updatedAt": f.updatedAt,
                    "done": done, "total": total, "failed": f.failed})
    return out
