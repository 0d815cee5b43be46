"""Cancel: the join's verbs (a run ends CANCELLED with the outputs it has, once), what a cancel message may
say, the index resize workers keep, the changelog across a restart, and the status documents."""
import json
from dataclasses import replace

import pytest

from streams import serde
from streams.adapters.changelog import load_state, row_key, row_value
from streams.core.cancels import CancelIndex, decode_cancellation, parse_cancellation
from streams.core.errors import RequestInvalid
from streams.core.join import CANCEL, MARKER
from streams.core.models import Cancellation, ResizeTask, WorkflowCompleted
from streams.core.planning import parse_request, retry_split
from streams.core.status import final_doc, retry_request, retryable
from tests.unit.test_join import PLAN_, bad, new_state, ok

NOW = 2000


def run(state, events, now=NOW):
    """Feed plans, results and cancels; return the outcomes."""
    outs = []
    for e in events:
        if isinstance(e, Cancellation):
            outs.append(state.record_cancel(e, now))
        elif hasattr(e, "tasks"):
            outs.append(state.record_plan(e, now))
        else:
            outs.append(state.record_result(e, now))
    return outs


def finals(outs):
    return [o.final for o in outs if o.final is not None]


def test_a_cancel_ends_the_run_with_the_outputs_it_has_once():
    state = new_state()
    outs = run(state, [PLAN_, ok("a"), bad("b"), Cancellation("wf", reason="a mistake", by="api")])
    [final] = finals(outs)
    assert final.status == "CANCELLED" and [o.taskRef for o in final.outputs] == ["a"]
    assert final.fileLocations == ("http://s3/b/a",) and final.taskCount == 3
    assert [(e.taskRef, e.code) for e in final.errors] == [("", "CANCELLED"), ("b", "SOURCE_NOT_FOUND")]
    assert "by api: a mistake; 1 of 3 outputs" in final.errors[0].message
    marker = next(r.value for r in outs[-1].rows if r.kind == MARKER)
    assert marker.status == "CANCELLED" and marker.runId == "r1" and marker.kept == ("a",)
    # the same cancel again, and the task results that come after it: no second final event
    later = run(state, [Cancellation("wf", runId="r1"), ok("c"), ok("a")])
    assert finals(later) == [] and [o.ignored for o in later] == ["finished", "cancelled", "finished"]
    assert later[1].orphan == ("s3://b/c", "wf", "r1") and later[2].orphan is None  # a's object is listed


def test_a_cancel_for_another_run_changes_nothing():
    state = new_state()
    outs = run(state, [PLAN_, ok("a"), Cancellation("wf", runId="r0")])
    assert finals(outs) == [] and outs[-1].ignored == "another run"
    assert finals(run(state, [ok("b"), ok("c")]))[0].status == "COMPLETED"


def test_a_cancel_before_the_plan_waits_for_it_and_ends_it_at_once():
    state = new_state()
    outs = run(state, [Cancellation("wf", by="cli"), ok("a")])
    assert finals(outs) == [] and [(r.kind, r.value is not None) for r in outs[0].rows] == [(CANCEL, True)]
    outs = run(state, [PLAN_])
    [final] = finals(outs)
    assert final.status == "CANCELLED" and [o.taskRef for o in final.outputs] == ["a"]
    assert (CANCEL, True) in [(r.kind, r.value is None) for r in outs[0].rows]  # the waiting row goes


def test_a_waiting_cancel_for_another_run_is_dropped_when_the_plan_comes():
    state = new_state()
    run(state, [Cancellation("wf", runId="r0")])
    outs = run(state, [PLAN_])
    assert finals(outs) == [] and (CANCEL, True) in [(r.kind, r.value is None) for r in outs[0].rows]
    assert finals(run(state, [ok("a"), ok("b"), ok("c")]))[0].status == "COMPLETED"


def test_a_cancel_without_a_run_of_a_run_that_did_not_complete_waits_for_a_retry_of_it():
    state = new_state()
    run(state, [PLAN_, ok("a"), bad("b"), ok("c")])
    assert state.marker("wf").status == "FAILED"
    outs = run(state, [Cancellation("wf")], now=NOW + 10)  # sent just after a retry, before the retry's plan
    assert outs[0].ignored == "" and [(r.kind, r.value is not None) for r in outs[0].rows] == [(CANCEL, True)]
    retry = replace(PLAN_, runId="r2", retryOf="r1", submittedAt=NOW + 5)
    [final] = finals(run(state, [retry], now=NOW + 20))
    assert final.status == "CANCELLED" and final.runId == "r2"
    # a cancel of a completed run has nothing to wait for (no retry of it can come)
    done = new_state()
    run(done, [PLAN_, ok("a"), ok("b"), ok("c")])
    assert run(done, [Cancellation("wf")])[0].ignored == "finished"


def test_a_cancel_whose_workflow_never_comes_is_forgotten_at_its_deadline_without_a_final_event():
    state = new_state(timeout=1000)
    run(state, [Cancellation("wf")], now=NOW)
    outs = state.due(NOW + 1000)
    assert [o.final for o in outs] == [None] and state.open == {} and state.marker("wf") is None
    assert [(r.kind, r.value) for r in outs[0].rows] == [(CANCEL, None)]


def test_results_without_a_plan_and_a_cancel_end_cancelled_at_the_deadline():
    state = new_state(timeout=1000)
    run(state, [ok("a"), Cancellation("wf")], now=NOW)
    [final] = [o.final for o in state.due(NOW + 1000) if o.final]
    assert final.status == "CANCELLED" and [o.taskRef for o in final.outputs] == ["a"]


def test_a_cancelled_run_is_retried_as_the_rest_of_its_tasks():
    state = new_state()
    [final] = finals(run(state, [PLAN_, ok("a"), bad("b"), Cancellation("wf")]))
    final = WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", final.encode()))
    final = WorkflowCompleted(**{**final.__dict__, "request": json.dumps({
        "fileLocation": "http://x/y.png", "outputFormats": ["png"], "outputSizes": [{"width": 1, "height": 1}]})})
    assert retryable(final) == (True, "")
    doc, refs = retry_request(final)
    assert refs == ["b", "c"] and [o["taskRef"] for o in doc["retry"]["outputs"]] == ["a"]  # the rest; a kept
    # as the planner reads it: b and c run again, a's output is kept
    request = parse_request(doc, max_dimension=100, max_tasks=10)
    tasks = [ResizeTask("wf", ref, i, 3, "s", "x", "png", 1, 1, True, f"k/{ref}", 9) for i, ref in enumerate("abc")]
    again, kept = retry_split(request, tasks)
    assert [t.taskRef for t in again] == ["b", "c"] and [o.taskRef for o in kept] == ["a"]


def test_the_status_document_of_a_cancelled_run():
    state = new_state()
    [final] = finals(run(state, [PLAN_, ok("a"), Cancellation("wf")]))
    doc = final_doc(WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", final.encode())))
    assert doc["status"] == "CANCELLED"
    assert [(t["taskRef"], t["status"]) for t in doc["tasks"]] == [("a", "SUCCEEDED"), ("b", "CANCELLED"),
                                                                  ("c", "CANCELLED")]
    assert doc["progress"] == {"done": 1, "total": 3, "failed": 0}


def test_cancels_and_cancelled_markers_survive_a_restart():
    state = new_state()
    rows = {}
    for out in run(state, [Cancellation("w2"), PLAN_, ok("a"), Cancellation("wf")]):
        for r in out.rows:
            rows[row_key(r)] = row_value(r)
    rows = {k: v for k, v in rows.items() if v is not None}
    again = new_state()
    load_state(rows, again, 5000)
    assert again.marker("wf").status == "CANCELLED" and again.cancelled["wf"] == frozenset({"a"})
    assert again.open["w2"].cancel.workflowId == "w2"
    late = again.record_result(ok("b"), 5000)
    assert late.orphan == ("s3://b/b", "wf", "r1")
    # the waiting cancel's workflow has the deadline it had before the restart (it opened when the join had it)
    assert again.open["w2"].firstSeen == state.open["w2"].firstSeen == NOW
    assert again.open["w2"].deadline(again.default_timeout_ms) == state.open["w2"].deadline(state.default_timeout_ms)


@pytest.mark.parametrize("doc, field", [
    ({"workflowId": ""}, "workflowId"), ({"workflowId": "a/b"}, "workflowId"), ({}, "workflowId"),
    ({"workflowId": "w", "reason": 5}, "reason"), ({"workflowId": "w", "reason": "x" * 501}, "reason"),
    ({"workflowId": "w", "at": -1}, "at"), ({"workflowId": "w", "at": True}, "at"),
    ({"workflowId": "w", "applied": "yes"}, "applied"), ({"workflowId": "w", "force": True}, "force"),
    ({"workflowId": "w", "at": 2 ** 63}, "at"), ({"workflowId": "w", "reason": "\ud800"}, "reason"),
    ({"workflowId": "w", "runId": "\udfff"}, "runId"), ({"workflowId": "w", "runId": "r" * 201}, "runId"),
])
def test_a_cancel_message_that_is_not_one_says_why(doc, field):
    with pytest.raises(RequestInvalid) as caught:
        parse_cancellation(doc, NOW)
    assert field in [f for f, _why in caught.value.problems]


def test_a_cancel_message_as_json_or_avro():
    c = decode_cancellation(b"w", b'\xef\xbb\xbf{"workflowId": "w", "reason": "oops"}')  # a BOM is no error
    assert (c.workflowId, c.runId, c.reason, c.applied) == ("w", "", "oops", False) and c.at > 0
    avro = serde.encode("Cancellation", Cancellation("w", "r1", "", "api", 7).to_dict())
    assert decode_cancellation(b"w", avro) == Cancellation("w", "r1", "", "api", 7)
    for key, value in [(b"other", b'{"workflowId": "w"}'), (b"w", b"\xff\xfe"), (b"w", b"[1]"), (b"w", b"")]:
        with pytest.raises(RequestInvalid):
            decode_cancellation(key, value)


def test_the_resize_index_keeps_cancels_that_name_their_run():
    index = CancelIndex()
    assert not index.add(Cancellation("w", "", at=1))  # the join resolves it, and writes it back with the run
    assert index.add(Cancellation("w", "r1", at=1)) and not index.add(Cancellation("w", "r1", at=2))
    assert index.cancelled("w", "r1") and not index.cancelled("w", "r2") and not index.cancelled("x", "r1")
    assert index.prune(older_than=3) == [("w", "r1")] and len(index) == 0


class FakeMsg:
    def __init__(self, key, value, offset=0):
        self._key, self._value, self._offset = key, value, offset

    def key(self):
        return self._key

    def value(self):
        return self._value

    def topic(self):
        return "imagefork.cancellations"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def headers(self):
        return None

    def error(self):
        return None


class FakeProducer:
    def __init__(self, refuse_over: int = 1 << 20):
        self.sent, self.refuse_over = [], refuse_over

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None):
        if value is not None and len(value) > self.refuse_over:
            raise BufferError("message too large")
        self.sent.append((topic, key, value, dict(headers or [])))


HOSTILE = [
    (b"w", b'{"workflowId": "w", "at": 9223372036854775808}'),
    (b"w", b'{"workflowId": "w", "reason": "\\ud800"}'),
    (b"w", b'{"workflowId": "w", "runId": "\\udfff"}'),
    (b"w", b"\xc3\x01" + b"\x00" * 30),
    (b"w", b"[" * 50000),
    (b"other", b'{"workflowId": "w"}'),
    (None, b'{"workflowId": "w", "reason": "' + b"x" * (2 << 20) + b'"}'),
]


def test_the_forwarder_dead_letters_what_is_not_a_cancel_and_goes_on():
    from streams.config import Config
    from streams.join.cancels import CancelForwarder
    forwarder = CancelForwarder.__new__(CancelForwarder)
    forwarder.topics, forwarder.producer, forwarder.forwarded = Config().topics, FakeProducer(), 0
    failed = []
    for i, (key, value) in enumerate(HOSTILE):
        forwarder._forward(FakeMsg(key, value, i), failed)
    forwarder._forward(FakeMsg(b"w", b'{"workflowId": "w", "reason": "oops"}', 99), failed)
    forwarder._forward(FakeMsg(b"w", None, 100), failed)  # a tombstone: nothing
    topics = [t for t, *_ in forwarder.producer.sent]
    assert topics == ["imagefork.requests.dlq"] * len(HOSTILE) + ["imagefork.events"], topics
    dead = forwarder.producer.sent[:-1]
    assert all(h["imagefork.error.code"] == b"NOT_A_CANCEL" for *_x, h in dead)
    assert len(dead[-1][2]) <= 65536 and dead[-1][3]["imagefork.truncated"]  # the 2 MB one: its start
    kind, body = serde.decode_join_event(forwarder.producer.sent[-1][2])
    assert kind == "Cancellation" and body["reason"] == "oops" and forwarder.forwarded == 1


def test_the_resize_watch_skips_what_is_not_a_cancel_and_goes_on(tmp_path):
    from streams.agents.cancels import CancelWatch
    from streams.config import Config
    watch = CancelWatch(Config())
    for i, (key, value) in enumerate(HOSTILE):
        watch._take(FakeMsg(key, value, i))
    watch._take(FakeMsg(b"w", serde.encode("Cancellation", Cancellation("w", "r1", by="join", applied=True).to_dict())))
    assert watch.cancelled("w", "r1") and len(watch.index) == 1
    import os
    assert os.path.exists(watch.flag("w", "r1"))
    watch._prune(older_than=2 ** 62)
    assert not watch.cancelled("w", "r1") and not os.path.exists(watch.flag("w", "r1"))
    watch.close()


class FakeStore:
    bucket = "b"

    def __init__(self, objects):
        self.objects = objects  # key -> run

    def uri(self, key):
        return f"s3://b/{key}"

    def list_keys(self, prefix):
        return sorted(k for k in self.objects if k.startswith(prefix))

    def head(self, key):
        return {"Metadata": {"imagefork-run": self.objects[key]}} if key in self.objects else None


def test_what_a_cancelled_run_leaves_goes_and_nothing_else():
    from streams.join.cleanup import SourceCleaner
    cleaner = SourceCleaner.__new__(SourceCleaner)
    cleaner.store, cleaner.output_prefix = FakeStore({
        "out/wf/a.png": "r1", "out/wf/b.png": "r1", "out/wf/c.png": "r2", "out/wf2/a.png": "r1"}), "out/"
    # the sweep: every object of the run under the workflow's prefix that its final event does not list
    assert cleaner._of_run("wf", "r1", None, frozenset({"s3://b/out/wf/a.png"})) == ["out/wf/b.png"]
    # an orphan: only if it is the cancelled run's (a retry's object at the same key stays), under its prefix
    assert cleaner._of_run("wf", "r1", ["out/wf/c.png"], frozenset()) == []
    assert cleaner._of_run("wf", "r1", ["out/wf2/a.png"], frozenset()) == []
