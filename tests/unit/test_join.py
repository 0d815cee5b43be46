from streams.core import join
from streams.core.models import PlanFailure, TaskError, TaskOutput, TaskResult, WorkflowPlan

REFS = ("a", "b", "c")
PLAN = WorkflowPlan("wf", "http://x/y.png", REFS, submittedAt=1000, deadline=5000, correlationId="corr")


def ok(ref, wf="wf"):
    return TaskResult(wf, ref, "SUCCEEDED", 1, 10, output=TaskOutput(ref, "png", 1, 1, 10, "image/png",
                                                                   f"s3://b/{ref}", f"http://s3/b/{ref}"))


def bad(ref):
    return TaskResult("wf", ref, "FAILED", 3, 10, error=TaskError(ref, "SOURCE_NOT_FOUND", "gone", 3))


def feed(events, now=2000):
    state, finals = None, []
    for e in events:
        fn = join.record_plan if isinstance(e, WorkflowPlan) else join.record_result
        out = fn(state, e, now)
        state = out.state
        if out.final:
            finals.append(out.final)
    return state, finals


def test_in_order():
    state, finals = feed([PLAN, ok("a"), ok("b"), ok("c")])
    assert len(finals) == 1
    f = finals[0]
    assert f.status == "COMPLETED" and f.fileLocations == ("http://s3/b/a", "http://s3/b/b", "http://s3/b/c")
    assert f.correlationId == "corr" and f.taskCount == 3 and f.submittedAt == 1000
    assert state["finished"]["status"] == "COMPLETED" and state["plan"] is None and state["results"] == {}


def test_results_before_plan_and_out_of_order():
    state, finals = feed([ok("c"), ok("a"), ok("b"), PLAN])
    assert len(finals) == 1
    assert [o.taskRef for o in finals[0].outputs] == ["a", "b", "c"]  # plan order, not arrival order


def test_duplicates_do_not_count_twice():
    state, finals = feed([PLAN, ok("a"), ok("a"), ok("a"), ok("b")])
    assert finals == [] and join.progress(state) == (2, 3)
    state2, finals = feed([PLAN, ok("a"), ok("a"), ok("b"), ok("c"), ok("c"), PLAN, ok("a")])
    assert len(finals) == 1


def test_failed_lists_errors_and_successes():
    _, finals = feed([PLAN, ok("a"), bad("b"), ok("c")])
    f = finals[0]
    assert f.status == "FAILED" and [e.taskRef for e in f.errors] == ["b"]
    assert [o.taskRef for o in f.outputs] == ["a", "c"] and len(f.fileLocations) == 2


def test_a_later_success_replaces_a_failure_before_completion():
    _, finals = feed([PLAN, bad("a"), ok("a"), ok("b"), ok("c")])
    assert finals[0].status == "COMPLETED"


def test_unknown_task_refs_are_ignored():
    state, finals = feed([PLAN, ok("zzz")])
    assert finals == [] and join.progress(state) == (0, 3)


def test_rejected_plan_finishes_at_once():
    plan = WorkflowPlan("wf", "", (), 1, 2, failure=PlanFailure("REJECTED", "REQUEST_INVALID", "outputSizes: bad"))
    state, finals = feed([plan, ok("a")])
    assert len(finals) == 1 and finals[0].status == "REJECTED"
    assert finals[0].errors[0].message == "outputSizes: bad"


def test_deadline_times_out_once_and_ignores_late_results():
    state, _ = feed([PLAN, ok("a")])
    assert join.check_deadline(state, 4999, default_timeout_ms=1, retention_ms=10).final is None
    out = join.check_deadline(state, 5000, default_timeout_ms=1, retention_ms=10_000)
    assert out.final.status == "TIMED_OUT" and [o.taskRef for o in out.final.outputs] == ["a"]
    assert {e.taskRef for e in out.final.errors} == {"b", "c"}
    late = join.record_result(out.state, ok("b"), 5001)
    assert late.final is None and not late.changed
    again = join.check_deadline(out.state, 6000, default_timeout_ms=1, retention_ms=10_000)
    assert again.final is None


def test_results_without_plan_time_out_from_first_seen():
    state, _ = feed([ok("a")], now=100)
    out = join.check_deadline(state, 100 + 300_000, default_timeout_ms=300_000, retention_ms=1)
    assert out.final.status == "TIMED_OUT" and out.final.workflowId == "wf"


def test_finished_marker_is_forgotten_after_retention():
    state, _ = feed([PLAN, ok("a"), ok("b"), ok("c")], now=2000)
    assert join.check_deadline(state, 2500, default_timeout_ms=1, retention_ms=1000).state is not None
    gone = join.check_deadline(state, 3000, default_timeout_ms=1, retention_ms=1000)
    assert gone.state is None and gone.final is None


def test_resubmitted_plan_after_completion_emits_nothing():
    state, _ = feed([PLAN, ok("a"), ok("b"), ok("c")])
    again = join.record_plan(state, PLAN, 3000)
    assert again.final is None and not again.changed


def test_stalled_workflows_and_their_missing_refs():
    from streams.core.planning import format_of
    state, _ = feed([PLAN, ok("a")], now=1000)
    assert join.missing_refs(state) == ["b", "c"]
    assert not join.stalled(state, 1500, after_ms=1000) and join.stalled(state, 2000, after_ms=1000)
    done, _ = feed([PLAN, ok("a"), ok("b"), ok("c")])
    assert join.missing_refs(done) == [] and not join.stalled(done, 10**9, after_ms=1)
    assert format_of("image_convert_resize_webp_64x48_5") == "webp" and format_of("other") is None
