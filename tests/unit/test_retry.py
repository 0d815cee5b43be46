"""Retries and the API's documents, with no Kafka: the request a retry sends (core.status), how the
planner splits it (core.planning), how the join reopens a finished workflow with the kept outputs
(core.join), and that the changelog restores such a run."""
import json

import pytest

from streams.adapters.changelog import load_state, row_key, row_value
from streams.core.errors import RequestInvalid
from streams.core.join import MARKER, describe, open_summaries
from streams.core.models import TaskDescriptor, WorkflowCompleted, WorkflowPlan, descriptors_of
from streams.core.planning import make_plan, parse_request, plan_tasks, request_json, retry_split
from streams.core.status import final_doc, retry_request, retryable, running_doc
from tests.unit.test_join import PLAN_, bad, feed, new_state, ok

DOC = {"fileLocation": "http://x/y.png", "outputFormats": ["png", "jpg"], "outputSizes": [{"width": 10, "height": 8}],
       "workflowId": "wf"}


def parse(doc):
    return parse_request(doc, max_dimension=100, max_tasks=10)


def failed_final() -> WorkflowCompleted:
    """wf's run r1 ended FAILED: a and c done, b failed."""
    _, finals, _ = feed([PLAN_.__class__(**{**PLAN_.__dict__, "request": request_json(parse(DOC))}),
                         ok("a"), bad("b"), ok("c")])
    return finals[0]


def test_a_retry_request_names_the_failed_tasks_and_keeps_the_outputs():
    final = failed_final()
    assert final.status == "FAILED" and final.runId == "r1" and json.loads(final.request)["outputFormats"] == ["png", "jpg"]
    assert retryable(final) == (True, "")
    doc, refs = retry_request(final)
    assert refs == ["b"] and doc["workflowId"] == "wf"
    assert doc["retry"]["runId"] == "r1" and [o["taskRef"] for o in doc["retry"]["outputs"]] == ["a", "c"]
    again = parse(doc)  # the planner reads it back
    assert again.retry.runId == "r1" and again.retry.taskRefs == ("b",)
    assert [o.taskRef for o in again.retry.outputs] == ["a", "c"]


def test_what_cannot_be_retried_says_why():
    final = failed_final()
    assert not retryable(WorkflowCompleted(**{**final.__dict__, "status": "COMPLETED"}))[0]
    assert "rejected" in retryable(WorkflowCompleted(**{**final.__dict__, "status": "REJECTED"}))[1]
    assert "predates" in retryable(WorkflowCompleted(**{**final.__dict__, "request": ""}))[1]


def test_a_run_that_failed_as_a_whole_is_retried_whole():
    final = WorkflowCompleted("wf", None, "FAILED", "http://x/y.png", (), (), (), 0, 1, 2, runId="r1",
                              request=request_json(parse(DOC)))
    from streams.core.models import TaskError
    final = WorkflowCompleted(**{**final.__dict__, "errors": (TaskError("", "SOURCE_UNAVAILABLE", "503", 4),)})
    doc, refs = retry_request(final)
    assert refs == [] and doc["retry"]["taskRefs"] == []


def test_the_planner_runs_only_the_retried_tasks_and_the_plan_keeps_the_rest():
    request = parse({**DOC, "retry": {"runId": "r1", "taskRefs": ["image_convert_resize_jpg_10x8_1"],
                                      "outputs": [{"taskRef": "image_convert_resize_png_10x8_0", "format": "png",
                                                   "width": 10, "height": 8, "bytes": 5, "contentType": "image/png",
                                                   "s3Uri": "s3://b/k", "url": "http://s/b/k"}]}})
    tasks = plan_tasks(request, "wf", source_uri="s3://b/s", deadline=9)
    to_run, kept = retry_split(request, tasks)
    assert [t.taskRef for t in to_run] == ["image_convert_resize_jpg_10x8_1"]
    assert [o.taskRef for o in kept] == ["image_convert_resize_png_10x8_0"]
    plan = make_plan(request, "wf", tasks, submitted_at=1, deadline=9, run_id="r2", carried=kept)
    assert plan.retryOf == "r1" and plan.taskRefs == tuple(t.taskRef for t in tasks) and plan.carried == kept
    assert "retry" not in json.loads(plan.request)  # a retry of the retry starts from the request itself
    assert WorkflowPlan.from_dict(plan.to_dict()) == plan
    everything, nothing = retry_split(parse({**DOC, "retry": {"runId": "r1"}}), tasks)
    assert everything == tasks and nothing == ()


def test_a_retry_must_name_tasks_of_the_request():
    request = parse({**DOC, "retry": {"runId": "r1", "taskRefs": ["image_convert_resize_gif_10x8_9"]}})
    with pytest.raises(RequestInvalid, match="retry.taskRefs"):
        retry_split(request, plan_tasks(request, "wf", source_uri="", deadline=9))
    with pytest.raises(RequestInvalid, match="retry.runId"):
        parse({**DOC, "retry": {"taskRefs": []}})


def retry_plan(**kw):
    final = failed_final()
    kept = tuple(o for o in final.outputs)
    return WorkflowPlan(**{**PLAN_.__dict__, "runId": "r2", "retryOf": "r1", "carried": kept, **kw})


def test_the_join_reopens_a_failed_workflow_for_its_retry_and_lists_every_output():
    state, finals, _ = feed([PLAN_, ok("a"), bad("b"), ok("c")])
    assert finals[0].status == "FAILED"
    out = state.record_plan(retry_plan(), 3000)
    assert out.notice is None and out.final is None
    assert out.rows[0].kind == MARKER and out.rows[0].value is None  # the marker goes
    assert state.open["wf"].progress() == (2, 3) and "wf" not in state.finished
    assert state.record_result(ok("b", run="r1"), 3001).ignored  # the old run's late result
    final = state.record_result(ok("b", run="r2"), 3002).final
    assert final.status == "COMPLETED" and final.runId == "r2" and final.retryOf == "r1"
    assert [o.taskRef for o in final.outputs] == ["a", "b", "c"]
    # the retry finished: a retry of r1 again is a resubmission (answered with a notice)
    assert state.record_plan(retry_plan(runId="r3"), 4000).notice.reason == "finished"


def test_a_retry_of_another_run_or_of_a_completed_one_is_not_taken():
    state, _, _ = feed([PLAN_, ok("a"), ok("b"), ok("c")])
    out = state.record_plan(retry_plan(), 3000)
    assert out.notice is not None and out.notice.reason == "finished"
    state, _, _ = feed([PLAN_, ok("a"), bad("b"), ok("c")])
    assert state.record_plan(retry_plan(retryOf="r0"), 3000).notice is not None


def test_a_reopened_workflow_restores_from_its_rows():
    state, _, outs = feed([PLAN_, ok("a"), bad("b"), ok("c")])
    outs.append(state.record_plan(retry_plan(), 3000))
    rows = {}
    for out in outs:
        for r in out.rows:
            rows[row_key(r)] = row_value(r)
    rows = {k: v for k, v in rows.items() if v is not None}
    again = new_state()
    load_state(rows, again, 5000)
    assert set(again.open) == {"wf"} and not again.finished and again.open["wf"].progress() == (2, 3)
    final = again.record_result(ok("b", run="r2"), 5001).final
    assert final.status == "COMPLETED" and len(final.outputs) == 3


def test_documents_for_running_and_finished_workflows():
    state, _, _ = feed([PLAN_, ok("a"), bad("b")])
    answer = describe(state, "wf")
    doc = running_doc(answer)
    assert doc["status"] == "RUNNING" and doc["progress"] == {"done": 2, "total": 3, "failed": 1}
    assert [t["status"] for t in doc["tasks"]] == ["SUCCEEDED", "FAILED", "PENDING"]
    assert doc["outputs"][0]["href"] == "/v1/workflows/wf/outputs/a" and doc["errors"][0]["code"] == "SOURCE_NOT_FOUND"
    assert open_summaries([state], 5)[0]["done"] == 2
    assert describe(state, "nope")["state"] == "unknown"
    final = failed_final()
    doc = final_doc(final)
    assert doc["status"] == "FAILED" and doc["retryable"] and [t["status"] for t in doc["tasks"]] == [
        "SUCCEEDED", "FAILED", "SUCCEEDED"]
    assert descriptors_of({"taskRefs": ["image_convert_resize_webp_1200x800_7"]}) == (
        TaskDescriptor("image_convert_resize_webp_1200x800_7", "webp", 1200, 800),)  # a plan written before tasks
