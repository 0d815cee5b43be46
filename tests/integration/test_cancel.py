"""Cancel on the real broker and S3 server, through the API, the CLI and a plain Kafka message:

- a 500-output request cancelled through the API after some of its tasks finished ends CANCELLED with
  exactly the outputs made before the cancel: each listed object is there, no other object of it is left
  in the bucket (outputs uploaded after the final event are deleted), its staged source is gone, fewer than
  half its tasks ran and none finished later than shortly after the cancel was acknowledged;
- a finished workflow is 409, an unknown one 404;
- a JSON cancel written to the cancellations topic by a client without the API (no run id) ends its run;
  one that comes before its plan ends the run when the plan comes, with no output; a message that is not
  a cancel is dead-lettered with the reason;
- ``imagefork cancel`` waits for the CANCELLED final event (exit code 3), refuses a finished workflow
  (exit code 1); ``imagefork get`` of a cancelled workflow fetches what was made and exits 3.
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

from streams import serde
from streams.adapters.kafka import read_to_end
from streams.core.models import TaskResult
from tests.integration.pipeline import run_cli, wait_until
from tests.integration.test_api import answers, call, free_port

pytestmark = pytest.mark.integration


def wide(files, workflow_id: str, count: int) -> dict:
    """``count`` small jpg outputs of the sample photo (16-515 px wide)."""
    return {"fileLocation": files.url("sample.png"), "outputFormats": ["jpg"], "workflowId": workflow_id,
            "outputSizes": [{"width": 16 + i, "height": 16 + i} for i in range(count)], "maintainAspectRatio": True}


@pytest.fixture
def api(make_pipeline):
    p = make_pipeline(IMAGEFORK_MAX_RETRIES="1")
    port = free_port()
    p.start_together("join", "planner", "resize", ("api", {"IMAGEFORK_API_LISTEN": f"127.0.0.1:{port}"}))
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: answers(base, "/readyz") == 200, 60), call(base, "GET", "/readyz")
    return p, base


def results_of(p, workflow_id: str) -> list[TaskResult]:
    found = []
    for msg in read_to_end(p.config, p.config.topics.events):
        if msg.key() == workflow_id.encode():
            kind, body = serde.decode_join_event(msg.value())
            if kind == "TaskResult":
                found.append(TaskResult.from_dict(body))
    return found


def test_a_500_output_request_cancelled_through_the_api_keeps_exactly_what_was_made(api, files):
    p, base = api
    wf = f"cancel-{uuid.uuid4().hex[:8]}"
    status, body, _ = call(base, "POST", "/v1/workflows", wide(files, wf, 500))
    assert status == 202, body

    def some_done():
        _s, doc, _h = call(base, "GET", f"/v1/workflows/{wf}")
        return doc.get("progress", {}).get("done", 0) >= 20
    assert wait_until(some_done, 120, interval=0.05), p.logs()
    status, body, headers = call(base, "POST", f"/v1/workflows/{wf}/cancel", {"reason": "a mistake"})
    acknowledged = time.time() * 1000
    assert status == 202 and body["status"] == "CANCELLING" and body["runId"], body
    assert headers["Location"] == f"/v1/workflows/{wf}"

    [final] = p.finals_for([wf])
    assert final.status == "CANCELLED", final.errors[:3]
    assert final.errors[0].code == "CANCELLED" and "by api: a mistake" in final.errors[0].message
    made = {o.taskRef for o in final.outputs}
    assert 20 <= len(made) < 250, len(made)
    p.check_outputs(final)
    results = results_of(p, wf)
    # a task that had started stops at its next step, one that had not is skipped: nothing finishes much
    # later than the cancel (the tasks of this request take well under a second each)
    late = [r for r in results if r.finishedAt > acknowledged + 3000]
    assert not late, [(r.taskRef, r.finishedAt - acknowledged) for r in late[:5]]
    assert len(results) < 250
    # no orphan: the objects of the workflow are exactly the listed outputs (one made after the final event
    # is deleted by the join once its result comes), and the staged source is gone
    listed = {o.s3Uri.split("/", 3)[3] for o in final.outputs}
    assert wait_until(lambda: set(p.output_keys(wf)) == listed, 30), sorted(set(p.output_keys(wf)) - listed)[:5]
    time.sleep(2.0)  # and it stays so: nothing of the run comes later
    assert set(p.output_keys(wf)) == listed
    assert wait_until(lambda: p.staged_keys(wf) == [], 30), p.staged_keys(wf)
    # the API's document: the tasks not made are CANCELLED; the workflow cannot be cancelled again
    _s, doc, _h = call(base, "GET", f"/v1/workflows/{wf}")
    assert doc["status"] == "CANCELLED" and doc["progress"]["done"] == len(made)
    assert sum(t["status"] == "CANCELLED" for t in doc["tasks"]) == 500 - len(made) - doc["progress"]["failed"]
    status, body, _ = call(base, "POST", f"/v1/workflows/{wf}/cancel")
    assert status == 409 and body["error"] == "FINISHED" and body["workflowStatus"] == "CANCELLED"
    status, body, _ = call(base, "POST", "/v1/workflows/no-such-workflow/cancel")
    assert status == 404 and body["error"] == "NOT_FOUND"
    status, body, _ = call(base, "POST", f"/v1/workflows/{wf}/cancel", b"{not json")
    assert status == 400 and body["error"] == "INVALID_JSON"
    # exactly one final event, and the join wrote the cancel back for the resize workers, with the run
    assert len(p.finals_for([wf], drain=False)) == 1
    written = [serde.decode("Cancellation", m.value()) for m in read_to_end(p.config, p.config.topics.cancellations)
               if m.key() == wf.encode()]
    assert written[-1]["applied"] and written[-1]["runId"] == final.runId


def test_kafka_clients_and_the_cli_cancel_too(make_pipeline, files, tmp_path):
    p = make_pipeline()
    p.start_all()
    env = p.env
    # a stranger's JSON cancel, without a run id, for a workflow that runs
    wf = f"kafka-{uuid.uuid4().hex[:8]}"
    p.submit(wide(files, wf, 200), wf)
    assert wait_until(lambda: len(results_of(p, wf)) >= 5, 120, interval=0.2), p.logs()
    p.client.producer.produce(p.config.topics.cancellations, key=wf.encode(),
                              value=json.dumps({"workflowId": wf, "reason": "from a script", "by": "ops"}).encode())
    p.client.producer.flush(10)
    # a cancel that comes before its workflow (the request waits in the planner's backlog, or at its source):
    # the plan ends it at once
    early = f"early-{uuid.uuid4().hex[:8]}"
    p.client.producer.produce(p.config.topics.cancellations, key=early.encode(),
                              value=json.dumps({"workflowId": early}).encode())
    # a message that is not a cancel
    p.client.producer.produce(p.config.topics.cancellations, key=b"junk", value=b"\x00\x01 not a cancel")
    p.client.producer.flush(10)

    def cancel_read():  # forwarded to the events topic, and the join committed past it
        found = [(part, off) for part, off, kind in p.events(early) if kind == "Cancellation"]
        committed = p.join_committed()
        return bool(found) and all(committed.get(part, -1) > off for part, off in found)
    assert wait_until(cancel_read, 60, interval=0.3), p.logs()
    p.submit(wide(files, early, 3), early)
    finals = {f.workflowId: f for f in p.finals_for([wf, early])}
    assert finals[wf].status == "CANCELLED" and "by ops: from a script" in finals[wf].errors[0].message
    assert 5 <= len(finals[wf].outputs) < 200
    assert finals[early].status == "CANCELLED" and finals[early].outputs == () and finals[early].taskCount == 3
    for f in finals.values():
        p.check_outputs(f)
        listed = {o.s3Uri.split("/", 3)[3] for o in f.outputs}
        assert wait_until(lambda: set(p.output_keys(f.workflowId)) == listed, 30)
        assert wait_until(lambda: p.staged_keys(f.workflowId) == [], 30)
    dead = [m for m in read_to_end(p.config, p.config.topics.dead_letter) if m.key() == b"junk"]
    assert [dict(m.headers())["imagefork.error.code"] for m in dead] == [b"NOT_A_CANCEL"]

    # the CLI: a running workflow is cancelled and waited for (exit code 3); a finished one is refused
    wf2 = f"cli-{uuid.uuid4().hex[:8]}"
    p.submit(wide(files, wf2, 500), wf2)  # 200 tiny outputs were done once before the cancel came (CI)
    assert wait_until(lambda: len(results_of(p, wf2)) >= 5, 120, interval=0.2), p.logs()
    code, out, err = run_cli(env, "cancel", wf2, "--reason", "not needed", "--json")
    assert code == 3, err
    doc = json.loads(out)
    assert doc["status"] == "CANCELLED" and doc["errors"][0]["code"] == "CANCELLED", doc["errors"][:2]
    code, _out, err = run_cli(env, "cancel", wf2)
    assert code == 1 and "has ended (CANCELLED" in err
    code, _out, err = run_cli(env, "get", wf2, "--dir", str(tmp_path / "got"))
    assert code == 3 and "was cancelled" in err
    assert len(list((tmp_path / "got").iterdir())) == len(doc["outputs"])
