"""The join's core: plans, results and the clock over JoinState, with no Kafka."""
from dataclasses import replace

from streams.core.join import MARKER, PLAN, RESULT, Ignored, JoinState, Marker, restore
from streams.core.models import PlanFailure, TaskError, TaskOutput, TaskResult, WorkflowPlan, descriptors_of

REFS = ("a", "b", "c")
PLAN_ = WorkflowPlan("wf", "http://x/y.png", descriptors_of({"taskRefs": REFS}), submittedAt=1000, deadline=5000,
                     correlationId="corr",
                     runId="r1")


def ok(ref, wf="wf", run="r1"):
    return TaskResult(wf, ref, "SUCCEEDED", 1, 10, output=TaskOutput(ref, "png", 1, 1, 10, "image/png",
                                                                   f"s3://b/{ref}", f"http://s3/b/{ref}"), runId=run)


def bad(ref):
    return TaskResult("wf", ref, "FAILED", 3, 10, error=TaskError(ref, "SOURCE_NOT_FOUND", "gone", 3), runId="r1")


def new_state(timeout=300_000, retention=86_400_000, grace=60_000):
    return JoinState(default_timeout_ms=timeout, retention_ms=retention, late_grace_ms=grace)


def feed(events, now=2000, state=None):
    state = state or new_state()
    finals, outcomes = [], []
    for e in events:
        out = state.record_plan(e, now) if isinstance(e, WorkflowPlan) else state.record_result(e, now)
        outcomes.append(out)
        if out.final:
            finals.append(out.final)
    return state, finals, outcomes


def test_in_order():
    state, finals, _ = feed([PLAN_, ok("a"), ok("b"), ok("c")])
    assert len(finals) == 1
    f = finals[0]
    assert f.status == "COMPLETED" and f.fileLocations == ("http://s3/b/a", "http://s3/b/b", "http://s3/b/c")
    assert f.correlationId == "corr" and f.taskCount == 3 and f.submittedAt == 1000
    assert state.open == {} and state.marker("wf") == Marker("COMPLETED", 2000, "r1")


def test_one_small_row_per_result_and_tombstones_at_the_end():
    _, _, outs = feed([PLAN_, ok("a"), ok("b"), ok("c")])
    assert [(r.kind, r.taskRef, r.value is not None) for r in outs[0].rows] == [(PLAN, "", True)]
    assert [(r.kind, r.taskRef) for r in outs[1].rows] == [(RESULT, "a")]
    last = outs[3].rows
    assert sorted((r.kind, r.taskRef, r.value is None) for r in last) == [
        (MARKER, "", False), (PLAN, "", True), (RESULT, "a", True), (RESULT, "b", True), (RESULT, "c", True)]


def test_results_before_plan_and_out_of_order():
    _, finals, _ = feed([ok("c"), ok("a"), ok("b"), PLAN_])
    assert len(finals) == 1
    assert [o.taskRef for o in finals[0].outputs] == ["a", "b", "c"]  # plan order, not arrival order


def test_duplicates_do_not_count_twice():
    state, finals, outs = feed([PLAN_, ok("a"), ok("a"), ok("a"), ok("b")])
    assert finals == [] and state.open["wf"].progress() == (2, 3)
    assert outs[2].rows == [] and outs[2].ignored == "duplicate"
    _, finals, _ = feed([PLAN_, ok("a"), ok("a"), ok("b"), ok("c"), ok("c"), PLAN_, ok("a")])
    assert len(finals) == 1


def test_failed_lists_errors_and_successes():
    _, finals, _ = feed([PLAN_, ok("a"), bad("b"), ok("c")])
    f = finals[0]
    assert f.status == "FAILED" and [e.taskRef for e in f.errors] == ["b"]
    assert [o.taskRef for o in f.outputs] == ["a", "c"] and len(f.fileLocations) == 2


def test_a_later_success_replaces_a_failure_before_completion():
    _, finals, _ = feed([PLAN_, bad("a"), ok("a"), ok("b"), ok("c")])
    assert finals[0].status == "COMPLETED"


def test_unknown_task_refs_and_other_runs_are_ignored():
    state, finals, _ = feed([PLAN_, ok("zzz"), ok("a", run="r0")])
    assert finals == [] and state.open["wf"].progress() == (0, 3)


def test_results_of_another_run_that_came_first_are_dropped_by_the_plan():
    state, finals, outs = feed([ok("a", run="old"), ok("b"), PLAN_])
    assert state.open["wf"].progress() == (1, 3)
    assert (RESULT, "a") in [(r.kind, r.taskRef) for r in outs[2].rows if r.value is None]


def test_rejected_plan_finishes_at_once():
    plan = WorkflowPlan("wf", "", (), 1, 2, failure=PlanFailure("REJECTED", "REQUEST_INVALID", "outputSizes: bad"))
    _, finals, _ = feed([plan, ok("a")])
    assert len(finals) == 1 and finals[0].status == "REJECTED"
    assert finals[0].errors[0].message == "outputSizes: bad"


def test_a_resubmission_is_another_run_and_is_not_taken():
    state, _, _ = feed([PLAN_, ok("a")])
    again = state.record_plan(WorkflowPlan(**{**PLAN_.__dict__, "runId": "r2"}), 2500)
    assert again.final is None and again.rows == [] and again.discarded == ("wf", "r2")
    # its submitter is told at once: the id belongs to the open run r1
    assert again.notice == Ignored("wf", "r2", "running", Marker("RUNNING", 0, PLAN_.runId))
    same = state.record_plan(PLAN_, 2500)  # a replay of the same request message
    assert same.discarded is None and same.rows == [] and same.notice is None
    _, finals, _ = feed([ok("b"), ok("c")], state=state)
    after = state.record_plan(WorkflowPlan(**{**PLAN_.__dict__, "runId": "r3"}), 3000)
    assert len(finals) == 1 and after.final is None and after.discarded == ("wf", "r3")
    # after the end: the notice carries the finished run's status and time
    assert after.notice == Ignored("wf", "r3", "finished", Marker("COMPLETED", finals[0].completedAt, PLAN_.runId))
    replay = state.record_plan(PLAN_, 3000)  # the finished run's own plan again: no notice
    # its request was replayed, so the planner staged the source again: that copy goes
    assert replay.notice is None and replay.discarded == ("wf", "r1") and replay.rows == []


def test_deadline_times_out_once_and_ignores_late_results():
    state, _, _ = feed([PLAN_, ok("a")])
    assert state.due(4999) == []
    outs = state.due(5000)
    assert len(outs) == 1 and outs[0].final.status == "TIMED_OUT"
    assert [o.taskRef for o in outs[0].final.outputs] == ["a"]
    assert {e.taskRef for e in outs[0].final.errors} == {"b", "c"}
    late = state.record_result(ok("b"), 5001)
    assert late.final is None and late.rows == []
    assert state.due(6000) == []


def test_results_without_plan_time_out_from_first_seen():
    state, _, _ = feed([ok("a")], now=100)
    outs = state.due(100 + 300_000)
    assert outs[0].final.status == "TIMED_OUT" and outs[0].final.workflowId == "wf"


def test_finished_marker_is_forgotten_after_retention():
    state, _, _ = feed([PLAN_, ok("a"), ok("b"), ok("c")], now=2000,
                       state=new_state(timeout=500, retention=1000, grace=500))
    assert state.due(2500) == []
    gone = state.due(3000)
    assert [(r.kind, r.value) for r in gone[0].rows] == [(MARKER, None)] and "wf" not in state.finished
    # forgotten: the id can run again
    assert state.record_plan(WorkflowPlan(**{**PLAN_.__dict__, "runId": "r9"}), 3001).rows


def test_markers_outlive_the_timeout_plus_the_late_grace():
    assert new_state(timeout=300_000, retention=1000, grace=60_000).retention_ms == 360_000
    assert new_state(timeout=300_000, retention=86_400_000).retention_ms == 86_400_000


def late(ref, deadline):
    return TaskResult(**{**ok(ref).__dict__, "deadline": deadline})


def test_a_result_past_its_deadline_and_the_grace_never_opens_a_workflow():
    """A resize fleet back after its workflows' markers expired: their results are refused as late,
    so no workflow opens again and none gets a second, empty final event."""
    state = new_state(timeout=1000, retention=2000, grace=500)
    state, finals, _ = feed([PLAN_, ok("a"), ok("b"), ok("c")], now=2000, state=state)
    assert len(finals) == 1
    assert state.due(4000)[0].rows[0].kind == MARKER and "wf" not in state.finished  # the marker expired
    out = state.record_result(late("a", deadline=5000), 5500)
    assert out.late and out.rows == [] and out.final is None and "wf" not in state.open
    assert state.due(10_000_000) == []  # nothing opened, nothing times out
    # within the grace (clocks of two hosts), or with no deadline (an older writer): opened as before
    assert not state.record_result(late("a", deadline=5000), 5499).late and "wf" in state.open
    assert not new_state().record_result(late("a", deadline=0), 10**12).late


def test_a_late_result_of_a_workflow_still_open_or_finished_is_not_refused_as_late():
    state, _, _ = feed([PLAN_])
    out = state.record_result(late("a", deadline=5000), 5000 + 10**6)
    assert not out.late and out.rows  # its workflow is open: the clock decides, not this result
    state, _, _ = feed([PLAN_, ok("a"), ok("b"), ok("c")])
    out = state.record_result(late("a", deadline=5000), 5000 + 10**6)
    assert not out.late and out.ignored == "finished"


def test_stalled_workflows_and_their_missing_refs():
    state, _, _ = feed([PLAN_, ok("a")], now=1000)
    assert [t.taskRef for t in state.open["wf"].missing()] == ["b", "c"]
    assert state.stalled(1500, after_ms=1000) == [] and [f.workflowId for f in state.stalled(2000, 1000)] == ["wf"]


def test_restore_rebuilds_the_same_state():
    from streams.adapters.changelog import row_key
    w2 = WorkflowPlan(**{**PLAN_.__dict__, "workflowId": "w2", "tasks": descriptors_of({"taskRefs": ("x",)})})
    state, _, outs = feed([PLAN_, ok("a"), bad("b"), w2,
                           ok("x", wf="w2")])
    rows = {}
    for out in outs:
        for r in out.rows:
            if r.value is None:
                rows.pop(row_key(r), None)
            else:
                rows[row_key(r)] = r
    plans = [r.value for r in rows.values() if r.kind == PLAN]
    results = [r.value for r in rows.values() if r.kind == RESULT]
    markers = {r.workflowId: r.value for r in rows.values() if r.kind == MARKER}
    again = new_state()
    restore(again, plans, results, markers, 9000)
    assert set(again.open) == {"wf"} and again.open["wf"].progress() == (2, 3) and again.open["wf"].failed == 1
    assert set(again.finished) == {"w2"}
    final = again.record_result(ok("c"), 9001).final
    assert final.status == "FAILED" and [o.taskRef for o in final.outputs] == ["a", "c"]


def test_changelog_codec_round_trip():
    from streams.adapters.changelog import load_state, row_key, row_value
    state, _, outs = feed([PLAN_, ok("a")])
    rows = {row_key(r): row_value(r) for out in outs for r in out.rows}
    again = new_state()
    load_state(rows, again, 5)
    restored = again.open["wf"].results["a"]  # its output passed on as the bytes it came in
    assert again.open["wf"].plan == PLAN_ and replace(restored, output=restored.output.full()) == ok("a")
    _, _, done = feed([ok("b"), ok("c")], state=state)
    marker = next(r for r in done[-1].rows if r.kind == MARKER)
    again2 = new_state()
    load_state({row_key(marker): row_value(marker)}, again2, 5)
    assert again2.marker("wf") == marker.value and marker.value.status == "COMPLETED" and marker.value.runId == "r1"


def test_a_tick_costs_what_is_due_not_the_size_of_the_table():
    state = new_state(timeout=500, retention=1000, grace=500)
    for i in range(200_000):  # finished markers, oldest first
        state.remember(f"w{i}", Marker("COMPLETED", i, ""))
    outs = state.due(1000 + 1999)  # 2,000 markers are due: only they are looked at
    assert len(outs) == 2000 and len(state.finished) == 198_000 and len(state._expiry) == 198_000
    assert state.due(1000 + 1999) == [] and len(state._expiry) == 198_000
    assert state.next_due() == 2000 + 1000


def test_wide_workflow_costs_the_same_per_result():
    refs = tuple(f"t{i}" for i in range(1000))
    plan = WorkflowPlan("big", "http://x", descriptors_of({"taskRefs": refs}), 1, 10**12, runId="r")
    state = new_state()
    state.record_plan(plan, 1)
    rows = 0
    for ref in refs[:-1]:
        rows += len(state.record_result(ok(ref, wf="big", run="r"), 2).rows)
    assert rows == 999  # one row per result, whatever the width
    last = state.record_result(ok(refs[-1], wf="big", run="r"), 3)
    assert last.final.status == "COMPLETED" and len(last.final.outputs) == 1000


def test_a_degraded_final_event_is_small_whatever_the_workflow():
    """The final event the completed topic refused is sent without its outputs, request, task list and facts:
    a 1000-task workflow's fits in 1 KB (the integration test caps the topic there)."""
    from streams import serde
    from streams.core.models import SourceFacts, TaskDescriptor, WorkflowCompleted
    from streams.join.apply import degraded
    tasks = tuple(TaskDescriptor(f"image_convert_resize_png_{i}x{i}_{i}", "png", i, i) for i in range(1, 1001))
    out = TaskOutput("r", "png", 1, 1, 10, "image/png", "s3://b/k", "http://s3/b/k")
    big = WorkflowCompleted("wf", "corr", "COMPLETED", "http://x/y.png", ("u",) * 1000, (out,) * 1000, (), 1000, 1, 2,
                            request="{}" * 1000, tasks=tasks,
                            facts=SourceFacts("a" * 64, 1, 1, "png", 1, False, 1, "RGB", blurhash="L" * 30))
    small = degraded(big, None)
    assert (small.status, small.outputs, small.tasks, small.facts, small.request) == ("FAILED", (), (), None, "")
    assert len(serde.encode("WorkflowCompleted", small.to_dict())) < 1024
