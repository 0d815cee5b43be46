"""The join's bookkeeping, as plain functions over a JSON-able state dict.

An aggregation in three verbs: a plan arrives, a result arrives, the clock
ticks. Each returns the new state and, at most once per workflow, the final
event. A finished workflow keeps only a small marker (status and time) so that
late, duplicated or replayed messages cannot open it again; the marker is
dropped after the retention period.

State shape::

    {"workflowId": str, "plan": {...} | None, "results": {taskRef: {...}}, "firstSeen": ms,
     "finished": None | {"status": str, "at": ms}}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streams.core.models import (
    COMPLETED, FAILED, SUCCEEDED, TIMED_OUT,
    TaskError, TaskResult, WorkflowCompleted, WorkflowPlan,
)

State = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    state: State | None  # None: delete the key
    final: WorkflowCompleted | None = None
    changed: bool = True


def new_state(workflow_id: str, now: int) -> State:
    return {"workflowId": workflow_id, "plan": None, "results": {}, "firstSeen": now, "finished": None}


def is_finished(state: State | None) -> bool:
    return bool(state and state.get("finished"))


def record_plan(state: State | None, plan: WorkflowPlan, now: int) -> Outcome:
    state = state or new_state(plan.workflowId, now)
    if is_finished(state) or state["plan"] is not None:
        return Outcome(state, changed=False)  # a resubmission or a replay: the first plan stands
    state = {**state, "plan": plan.to_dict()}
    if plan.failure is not None:
        return _finish(state, plan.failure.status, now)
    return _maybe_complete(state, now)


def record_result(state: State | None, result: TaskResult, now: int) -> Outcome:
    state = state or new_state(result.workflowId, now)
    if is_finished(state):
        return Outcome(state, changed=False)
    plan = state["plan"]
    if plan is not None and result.taskRef not in plan["taskRefs"]:
        return Outcome(state, changed=False)
    previous = state["results"].get(result.taskRef)
    if previous is not None and not (previous["status"] != SUCCEEDED and result.status == SUCCEEDED):
        return Outcome(state, changed=False)  # duplicates never count twice
    state = {**state, "results": {**state["results"], result.taskRef: result.to_dict()}}
    return _maybe_complete(state, now)


def deadline_of(state: State, default_timeout_ms: int) -> int:
    plan = state.get("plan")
    return plan["deadline"] if plan else state["firstSeen"] + default_timeout_ms


def check_deadline(state: State | None, now: int, *, default_timeout_ms: int, retention_ms: int) -> Outcome:
    """The clock: time out an open workflow past its deadline; forget a finished one past retention."""
    if state is None:
        return Outcome(None, changed=False)
    if is_finished(state):
        if now - state["finished"]["at"] >= retention_ms:
            return Outcome(None)
        return Outcome(state, changed=False)
    if now >= deadline_of(state, default_timeout_ms):
        return _finish(state, TIMED_OUT, now)
    return Outcome(state, changed=False)


def needs_attention(state: State, now: int, *, default_timeout_ms: int, retention_ms: int) -> bool:
    if is_finished(state):
        return now - state["finished"]["at"] >= retention_ms
    return now >= deadline_of(state, default_timeout_ms)


def progress(state: State) -> tuple[int, int | None]:
    plan = state.get("plan")
    return len(state.get("results", {})), (len(plan["taskRefs"]) if plan else None)


def missing_refs(state: State) -> list[str]:
    """Task references of the plan with no result yet (empty without a plan)."""
    plan = state.get("plan")
    if not plan or is_finished(state):
        return []
    return [ref for ref in plan["taskRefs"] if ref not in state["results"]]


def stalled(state: State, now: int, after_ms: int) -> bool:
    """An open workflow with a plan that has made no progress for ``after_ms``."""
    return bool(missing_refs(state)) and now - state.get("updatedAt", state["firstSeen"]) >= after_ms


def _maybe_complete(state: State, now: int) -> Outcome:
    state = {**state, "updatedAt": now}
    plan = state["plan"]
    if plan is None or any(ref not in state["results"] for ref in plan["taskRefs"]):
        return Outcome(state)
    failed = any(state["results"][ref]["status"] != SUCCEEDED for ref in plan["taskRefs"])
    return _finish(state, FAILED if failed else COMPLETED, now)


def _finish(state: State, status: str, now: int) -> Outcome:
    final = build_final(state, status, now)
    return Outcome({**new_state(state["workflowId"], state["firstSeen"]),
                    "finished": {"status": status, "at": now}}, final)


def build_final(state: State, status: str, now: int) -> WorkflowCompleted:
    plan = WorkflowPlan.from_dict(state["plan"]) if state.get("plan") else None
    results = {ref: TaskResult.from_dict(r) for ref, r in state["results"].items()}
    refs = list(plan.taskRefs) if plan else sorted(results)
    outputs = [results[r].output for r in refs if r in results and results[r].status == SUCCEEDED]
    errors: list[TaskError] = []
    if plan and plan.failure:
        errors.append(TaskError(taskRef="", code=plan.failure.code, message=plan.failure.message))
    for ref in refs:
        res = results.get(ref)
        if res is None:
            if status == TIMED_OUT:
                errors.append(TaskError(taskRef=ref, code="TIMED_OUT",
                                        message="no result before the workflow deadline"))
        elif res.status != SUCCEEDED and res.error is not None:
            errors.append(res.error)
    return WorkflowCompleted(
        workflowId=state["workflowId"],
        correlationId=plan.correlationId if plan else None,
        status=status,
        fileLocation=plan.fileLocation if plan else "",
        fileLocations=tuple(o.url for o in outputs),
        outputs=tuple(outputs),
        errors=tuple(errors),
        taskCount=len(refs),
        submittedAt=plan.submittedAt if plan else state["firstSeen"],
        completedAt=now,
    )
