"""The API's workflow documents, from what the join's state says (an open workflow) or from a final
event: plain data in, plain data out (no I/O)."""
from __future__ import annotations

from urllib.parse import quote

from streams.core.imaging.facts import placeholder_data_url
from streams.core.models import SUCCEEDED, TIMED_OUT, WorkflowCompleted, descriptors_of

PENDING, RUNNING = "PENDING", "RUNNING"
TERMINAL = ("COMPLETED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELLED")
STATUSES = (PENDING, RUNNING, *TERMINAL)
def output_href(workflow_id: str, ref: str) -> str:
    return f"/v1/workflows/{quote(workflow_id, safe='')}/outputs/{quote(ref, safe='')}"


def _output(workflow_id: str, output: dict | None) -> dict | None:
    if output is None:
        return None
    return {**output, "href": output_href(workflow_id, output["taskRef"])}


def _task(workflow_id: str, task: dict, status: str, attempts: int = 0, finished_at: int | None = None,
          output: dict | None = None, error: dict | None = None) -> dict:
    """One task's line: its descriptor (reference, format, box), where it stands, its output or error."""
    ref = task["taskRef"]
    return {"taskRef": ref, "format": task["format"] or None, "width": task["width"] or None,
            "height": task["height"] or None, "status": status, "attempts": attempts, "finishedAt": finished_at,
            "output": _output(workflow_id, output), "error": error}


def pending_doc(workflow_id: str, accepted_at: int, file_location: str = "") -> dict:
    """Accepted by the API, not planned yet."""
    return {"workflowId": workflow_id, "status": PENDING, "runId": "", "retryOf": "", "fileLocation": file_location,
            "correlationId": None, "submittedAt": accepted_at, "completedAt": None, "deadline": None,
            "progress": {"done": 0, "total": None, "failed": 0}, "tasks": [], "outputs": [], "errors": [],
            "facts": None}


def running_doc(answer: dict) -> dict:
    """An open workflow, from the join's answer (``streams.core.join.describe_open``)."""
    wf = answer["workflowId"]
    plan = answer.get("plan")
    results = {r["taskRef"]: r for r in answer.get("results", [])}
    planned = descriptors_of(plan) if plan else descriptors_of({"taskRefs": sorted(results)})
    tasks = []
    for task in (t.to_dict() for t in planned):
        r = results.get(task["taskRef"])
        if r is None:
            tasks.append(_task(wf, task, PENDING))
        else:
            tasks.append(_task(wf, task, r["status"], r.get("attempts", 0), r.get("finishedAt"), r.get("output"),
                               r.get("error")))
    outputs = [t["output"] for t in tasks if t["output"] is not None and t["status"] == SUCCEEDED]
    errors = [t["error"] for t in tasks if t["error"] is not None and t["status"] != SUCCEEDED]
    return {
        "workflowId": wf, "status": RUNNING, "runId": plan.get("runId", "") if plan else "",
        "retryOf": plan.get("retryOf", "") if plan else "",
        "fileLocation": plan["fileLocation"] if plan else "", "correlationId": plan.get("correlationId") if plan else None,
        "submittedAt": plan["submittedAt"] if plan else answer.get("firstSeen"), "updatedAt": answer.get("updatedAt"),
        "completedAt": None, "deadline": plan["deadline"] if plan else None,
        "progress": {"done": answer.get("done", len(results)), "total": answer.get("total"),
                     "failed": answer.get("failed", 0)},
        "tasks": tasks, "outputs": outputs, "errors": errors, "preset": plan.get("preset") if plan else None,
        "facts": facts_doc(next((r["facts"] for r in answer.get("results", []) if r.get("facts")), None)),
    }


def final_doc(final: WorkflowCompleted, placeholder: bool = True) -> dict:
    """A finished workflow, from its final event: every task, in plan order, with its output or error."""
    wf = final.workflowId
    # a final event written before it carried the plan's tasks: they are read from the references
    planned = final.tasks or descriptors_of({"taskRefs": [o.taskRef for o in final.outputs] +
                                                         [e.taskRef for e in final.errors if e.taskRef]})
    order = {t.taskRef: i for i, t in enumerate(planned)}
    described = {t.taskRef: t.to_dict() for t in planned}
    for ref in [o.taskRef for o in final.outputs] + [e.taskRef for e in final.errors if e.taskRef]:
        if ref not in described:  # not in its plan (a writer's mistake): still shown, as its reference says
            described[ref] = descriptors_of({"taskRefs": [ref]})[0].to_dict()
    by_ref: dict[str, dict] = {}
    for o in final.outputs:
        by_ref[o.taskRef] = _task(wf, described[o.taskRef], SUCCEEDED, output=o.to_dict())
    for e in final.errors:
        if e.taskRef and e.taskRef not in by_ref:
            by_ref[e.taskRef] = _task(wf, described[e.taskRef], TIMED_OUT if e.code == "TIMED_OUT" else "FAILED",
                                      e.attempts, error=e.to_dict())
    if final.status == "CANCELLED":  # the tasks it had not made when it was cancelled
        for t in planned:
            by_ref.setdefault(t.taskRef, _task(wf, described[t.taskRef], "CANCELLED"))
    tasks = sorted(by_ref.values(), key=lambda t: (order.get(t["taskRef"], len(order)), t["taskRef"]))
    done = sum(1 for t in tasks if t["status"] != "CANCELLED")
    return {
        "workflowId": wf, "status": final.status, "runId": final.runId, "retryOf": final.retryOf,
        "fileLocation": final.fileLocation, "correlationId": final.correlationId,
        "submittedAt": final.submittedAt, "updatedAt": final.completedAt, "completedAt": final.completedAt,
        "deadline": None,
        "progress": {"done": done, "total": final.taskCount,
                     "failed": sum(1 for t in tasks if t["status"] not in (SUCCEEDED, "CANCELLED"))},
        "tasks": tasks, "outputs": [_output(wf, o.to_dict()) for o in final.outputs],
        "errors": [e.to_dict() for e in final.errors],
        "retryable": retryable(final)[0], "preset": final.preset.to_dict() if final.preset else None,
        "facts": facts_doc(final.facts.to_dict() if final.facts else None, placeholder),
    }


def facts_doc(facts: dict | None, placeholder: bool = True) -> dict | None:
    """The source's facts, with the placeholder as a data URL a page can paint at once (a few ms to paint:
    a list of workflows does without it)."""
    if not facts:
        return None
    paint = placeholder and facts.get("blurhash")
    return {**facts, "placeholder": placeholder_data_url(facts["blurhash"], facts["width"], facts["height"]) if paint
            else None}


def marker_doc(answer: dict) -> dict:
    """A finished workflow whose final event is not at hand (only the join's marker)."""
    return {"workflowId": answer["workflowId"], "status": answer["status"], "runId": answer.get("runId", ""),
            "retryOf": "", "fileLocation": "", "correlationId": None, "submittedAt": None,
            "completedAt": answer.get("at"), "deadline": None, "progress": {"done": 0, "total": None, "failed": 0},
            "tasks": [], "outputs": [], "errors": [], "facts": None}


def summary(doc: dict) -> dict:
    """A document's line in the list."""
    return {k: doc.get(k) for k in ("workflowId", "status", "runId", "fileLocation", "submittedAt", "completedAt",
                                    "progress")}


def retryable(final: WorkflowCompleted) -> tuple[bool, str]:
    """Whether a finished workflow can be retried, and why not."""
    if final.status == "COMPLETED":
        return False, "it completed: every task succeeded, there is nothing to retry"
    if final.status == "REJECTED":
        return False, "it was rejected: the request itself is invalid; fix it and submit it again"
    if not final.request:
        return False, "its final event predates retries (it does not carry the request): submit it again"
    return True, ""


def retry_request(final: WorkflowCompleted) -> tuple[dict, list[str]]:
    """The request that retries ``final``'s failed and timed-out tasks (all of them when the run failed
    before its tasks: its source), keeping its outputs; and the task references it runs again."""
    import json
    doc = json.loads(final.request)
    failed = [e.taskRef for e in final.errors if e.taskRef]
    if final.status == "CANCELLED" and final.tasks:  # the tasks it had not made: the rest of the run
        made = {o.taskRef for o in final.outputs}
        failed = [t.taskRef for t in final.tasks if t.taskRef not in made]
    elif any(not e.taskRef for e in final.errors) or not final.taskCount:
        failed = []  # the run failed as a whole (e.g. its source): every task again
    doc["workflowId"] = final.workflowId
    doc["retry"] = {"runId": final.runId, "taskRefs": failed, "outputs": [o.to_dict() for o in final.outputs]}
    return doc, failed
