"""Reading the outputs (docs/operations.md "Reading the outputs"), with the real CLI in this process, one pipeline, the
real broker and the real S3 server:

- ``imagefork submit --wait`` with IMAGEFORK_PRESIGN_TTL_S prints presigned URLs that answer 200 with the
  object's bytes to a plain HTTP client, while the final event's own URL answers 403 (the bucket is private);
- ``imagefork get`` writes every output (right size, format and dimensions); ``--urls`` prints openable URLs;
  an unknown id, a workflow still running and one that did not complete are one line and exit code 1;
- ``imagefork demo --keep-stack``'s bookkeeping: a kept worker outlives the process that started it, and the
  printed stop command (``imagefork demo --stop``) stops it; a recorded pid that is now another process is
  left alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from streams.stack.processes import KEPT_WORKERS, _start_ticks, process_group_members
from tests.integration.pipeline import run_cli, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SIZES = [{"width": 64, "height": 48}]
FORMATS = ["png", "jpg"]
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def env(pipeline) -> dict[str, str]:
    """What a user of the pipeline's stack has in the environment, with presigned URLs for 10 minutes."""
    return {**pipeline.env, "IMAGEFORK_PRESIGN_TTL_S": "600"}


@pytest.fixture(scope="module")
def submitted(pipeline, files, env, tmp_path_factory):
    """One small request through ``imagefork submit --wait``: (workflow id, final event, CLI stdout)."""
    workflow_id = f"out-{uuid.uuid4().hex[:10]}"
    request = tmp_path_factory.mktemp("request") / "request.json"
    request.write_text(json.dumps({"fileLocation": files.url("sample.png"), "outputFormats": FORMATS,
                                   "outputSizes": SIZES, "maintainAspectRatio": True}))
    code, out, err = run_cli(env, "submit", str(request), "--wait", "--timeout", "120", "--workflow-id", workflow_id)
    assert code == 0, (out, err, pipeline.logs())
    final = pipeline.finals_for([workflow_id])[0]
    assert final.status == "COMPLETED" and len(final.outputs) == len(FORMATS) * len(SIZES)
    return workflow_id, final, out


def test_submit_prints_presigned_urls_that_open_while_the_plain_urls_are_refused(pipeline, submitted):
    _workflow_id, final, out = submitted
    assert "presigned for 10m (IMAGEFORK_PRESIGN_TTL_S)" in out
    links = re.findall(r"^http\S+X-Amz-Signature=\S+$", out, re.M)
    assert len(links) == len(final.outputs), out
    for output, link in zip(final.outputs, links):
        assert link.startswith(f"{pipeline.config.s3_endpoint_url}/") and "X-Amz-Expires=600" in link
        status, body = http_get(link)
        assert status == 200 and body == pipeline.object(output.s3Uri.split("/", 3)[3])
        assert len(body) == output.bytes
        status, body = http_get(output.url)  # the final event's own URL: the bucket is private
        assert status == 403 and b"AccessDenied" in body, (output.url, status, body[:200])


def test_submitting_a_finished_workflow_id_again_is_answered_at_once_with_its_final_event(
        pipeline, submitted, files, env, tmp_path):
    """issue 11 #2: the same id again gets an answer at once (the join's RunIgnored notice), not a wait
    until --timeout; it is not run again."""
    workflow_id, final, _out = submitted
    request = tmp_path / "again.json"
    request.write_text(json.dumps({"fileLocation": files.url("sample.png"), "outputFormats": FORMATS,
                                   "outputSizes": SIZES, "maintainAspectRatio": True}))
    code, out, err = run_cli(env, "submit", str(request), "--wait", "--timeout", "60", "--workflow-id", workflow_id,
                             "--json")
    assert code == 0, (out, err)
    assert f"workflow {workflow_id} had already finished" in err and "was not run again" in err, err
    assert json.loads(out) == final.to_dict()
    assert len(pipeline.finals_for([workflow_id])) == 1


def test_get_writes_every_output(submitted, env, tmp_path):
    workflow_id, final, _out = submitted
    folder = tmp_path / "outputs"
    code, out, err = run_cli(env, "get", workflow_id, "--dir", str(folder))
    assert code == 0, err
    written = sorted(p.name for p in folder.iterdir())
    assert written == sorted(f"{o.taskRef}.{o.format}" for o in final.outputs)  # and no .part file left
    for output in final.outputs:
        path = folder / f"{output.taskRef}.{output.format}"
        assert path.stat().st_size == output.bytes and str(path) in out
        with Image.open(path) as im:
            assert (im.format, im.size) == (PIL_FORMAT[output.format], (output.width, output.height))
    assert f"{len(final.outputs)} outputs of workflow {workflow_id}" in err


def test_get_without_dir_writes_to_a_folder_named_after_the_workflow(submitted, env, tmp_path, monkeypatch):
    workflow_id, final, _out = submitted
    monkeypatch.chdir(tmp_path)
    code, _out, err = run_cli(env, "get", workflow_id)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / workflow_id).iterdir()) == \
        sorted(f"{o.taskRef}.{o.format}" for o in final.outputs)


def test_get_urls_prints_a_presigned_url_per_output_or_the_events_own(pipeline, submitted, env):
    workflow_id, final, _out = submitted
    code, out, err = run_cli(env, "get", workflow_id, "--urls")
    assert code == 0, err
    links = out.split()
    assert len(links) == len(final.outputs)
    for output, link in zip(final.outputs, links):
        assert http_get(link) == (200, pipeline.object(output.s3Uri.split("/", 3)[3]))
    code, out, err = run_cli({**env, "IMAGEFORK_PRESIGN_TTL_S": "0"}, "get", workflow_id, "--urls")
    assert code == 0 and out.split() == [o.url for o in final.outputs], err


def test_get_of_an_unknown_workflow_is_one_line_and_exit_1(env, submitted, tmp_path):
    unknown = f"never-{uuid.uuid4().hex[:8]}"
    code, out, err = run_cli(env, "get", unknown, "--dir", str(tmp_path / "x"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"imagefork: no final event for workflow {unknown} "), err
    assert not (tmp_path / "x").exists()


def test_get_of_a_workflow_that_did_not_complete_is_one_line_and_exit_1(pipeline, files, env, tmp_path):
    workflow_id = f"rej-{uuid.uuid4().hex[:8]}"
    follower = pipeline.follower()
    try:
        pipeline.submit({"fileLocation": files.url("sample.png"), "outputFormats": ["png"],
                         "outputSizes": [{"width": 0, "height": 10}]}, workflow_id)
        assert follower.wait([workflow_id], 120)[workflow_id].status == "REJECTED"
    finally:
        follower.close()
    code, out, err = run_cli(env, "get", workflow_id, "--dir", str(tmp_path / "x"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and f"workflow {workflow_id} did not complete: REJECTED" in err, err
    assert "outputSizes[0].width" in err
    assert not (tmp_path / "x").exists()


def test_get_of_a_running_workflow_is_one_line_and_exit_1(pipeline, env, tmp_path):
    """A workflow the join holds open (RUNNING: its plan is in, no task of it will ever run, as with no
    resize worker) has no final event yet: `get` is one line and exit code 1, and writes nothing."""
    from streams import serde
    from streams.client import consume_completed
    from streams.core.models import TaskDescriptor, WorkflowPlan
    workflow_id = f"running-{uuid.uuid4().hex[:8]}"
    now = int(time.time() * 1000)
    plan = WorkflowPlan(workflow_id, "http://example.invalid/x.png",
                        (TaskDescriptor("image_convert_resize_png_16x16_0", "png", 16, 16),),
                        now, now + 60_000, runId="r1")
    producer = pipeline.client.producer
    producer.produce(pipeline.config.topics.events, key=workflow_id.encode(),
                     value=serde.encode_join_event("WorkflowPlan", plan.to_dict()))
    assert producer.flush(10) == 0
    pipeline.wait_join_handled(workflow_id, plans=1, results=0)  # the join holds it open now
    assert consume_completed(pipeline.config, [workflow_id], 30) == []
    code, out, err = run_cli(env, "get", workflow_id, "--dir", str(tmp_path / "x"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"imagefork: no final event for workflow {workflow_id} "), err
    assert "a workflow still running" in err, err
    assert not (tmp_path / "x").exists()


# --- demo --keep-stack: kept workers ------------------------------------------------------------------
KEEP_ONE = """
import sys
from pathlib import Path
from streams.stack.processes import WorkerProcess, keep_workers, wait_for_log
folder = Path(sys.argv[1])
worker = WorkerProcess("planner", {}, folder / "workers")
if not wait_for_log(worker, "imagefork ready", 120):
    sys.exit("the planner did not start: " + worker.log_tail())
keep_workers(folder, [worker])
print(worker.pid)
"""


def test_a_kept_worker_outlives_its_starter_and_demo_stop_stops_it(pipeline, env, tmp_path):
    """What ``imagefork demo --keep-stack`` does with its workers, and the stop command it prints: a worker
    (a planner in a namespace of its own) kept by a process that then exits is still running, and
    ``imagefork demo --stop`` stops it, process group and all."""
    stack_dir = tmp_path / "stack"  # the demo's stack folder is its sibling: tmp_path/demo-stack
    demo_dir = tmp_path / "demo-stack"
    worker_env = {**os.environ, **env, "IMAGEFORK_NAMESPACE": pipeline.config.namespace + "kept."}
    starter = subprocess.run([sys.executable, "-c", KEEP_ONE, str(demo_dir)], cwd=ROOT, env=worker_env,
                             capture_output=True, text=True, timeout=180)
    assert starter.returncode == 0, starter.stderr
    pid = int(starter.stdout.split()[-1])
    try:
        assert _start_ticks(pid) is not None, "the kept worker died with its starter"
        assert json.loads((demo_dir / KEPT_WORKERS).read_text())[0]["pid"] == pid
        code, out, err = run_cli({"IMAGEFORK_STACK_DIR": str(stack_dir)}, "demo", "--stop")
        assert code == 0, err
        assert out.startswith("stopped: worker planner") and str(demo_dir) in out, out
        assert wait_until(lambda: _start_ticks(pid) is None, 10), "the kept worker is still running"
        assert process_group_members(pid) == []  # nothing of its process group is left, as `ps` would show
        assert not (demo_dir / KEPT_WORKERS).exists()
        code, out, _err = run_cli({"IMAGEFORK_STACK_DIR": str(stack_dir)}, "demo", "--stop")
        assert (code, out.split(" (")[0]) == (0, "stopped: nothing was running")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_a_recorded_pid_that_is_now_another_process_is_left_alone(tmp_path):
    """The record holds the pid and its start time: a pid reused by another process is not ``ours``."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        record = {"pid": stranger.pid, "name": "planner", "role": "planner",
                  "started": _start_ticks(stranger.pid) - 1, "log": ""}  # the worker that had this pid
        (tmp_path / KEPT_WORKERS).write_text(json.dumps([record]))
        code, out, err = run_cli({}, "stack", "down", "--dir", str(tmp_path))
        assert (code, out.strip()) == (0, "stopped: nothing was running"), err
        time.sleep(0.2)
        assert stranger.poll() is None, "a stranger was stopped"
    finally:
        stranger.kill()
        stranger.wait()


def test_the_example_request_in_the_repository_runs_as_it_is_but_for_its_source(pipeline, env, files, tmp_path):
    """examples/request.json (the seed's request, shown in the README) through `imagefork submit --wait`, as a
    user would send it, with its fileLocation pointed at a loopback copy of an image (its own is on the
    public internet, which nothing here may reach): nine outputs, COMPLETED."""
    example = Path(__file__).resolve().parents[2] / "examples" / "request.json"
    doc = json.loads(example.read_text())
    assert doc["outputFormats"] == ["png", "jpg", "webp"] and len(doc["outputSizes"]) == 3
    request = tmp_path / "request.json"
    request.write_text(json.dumps({**doc, "fileLocation": files.url("sample.png")}))
    workflow_id = f"example-{uuid.uuid4().hex[:10]}"
    code, out, err = run_cli(env, "submit", str(request), "--wait", "--timeout", "120", "--workflow-id", workflow_id)
    assert code == 0 and "Traceback" not in err, (code, err)
    final = pipeline.finals_for([workflow_id])[0]
    assert final.status == "COMPLETED" and len(final.outputs) == 9, (final.status, final.errors)


def test_retry_runs_a_failed_workflow_again_from_the_command_line(pipeline, files, env, submitted):
    """`imagefork retry ID --wait`: a workflow that FAILED at its source (404) runs again once the source is
    there, as a new run of the same id (retryOf: the failed run), and completes; a completed or unknown
    workflow is one line and exit code 1."""
    workflow_id = f"cli-retry-{uuid.uuid4().hex[:8]}"
    name = f"later-{workflow_id}.png"
    follower = pipeline.follower()
    try:
        pipeline.submit({"fileLocation": files.url(name), "outputFormats": ["png"],
                         "outputSizes": [{"width": 32, "height": 32}]}, workflow_id)
        failed = follower.wait([workflow_id], 120)[workflow_id]
    finally:
        follower.close()
    assert failed.status == "FAILED", failed.errors
    (files.folder / name).write_bytes((files.folder / "sample.png").read_bytes())
    code, out, err = run_cli(env, "retry", workflow_id, "--wait", "--timeout", "120", "--json")
    assert code == 0 and "Traceback" not in err, (code, err)
    assert f"retrying run {failed.runId} of workflow {workflow_id} (FAILED): every task again" in err, err
    final = json.loads(out)
    assert final["status"] == "COMPLETED" and final["retryOf"] == failed.runId and len(final["outputs"]) == 1
    assert [f.status for f in pipeline.finals_for([workflow_id])] == ["FAILED", "COMPLETED"]
    done_id = submitted[0]
    code, _out, err = run_cli(env, "retry", done_id)
    assert code == 1 and err.strip() == (f"imagefork: workflow {done_id} cannot be retried: it completed: every task "
                                         "succeeded, there is nothing to retry"), err
    code, _out, err = run_cli(env, "retry", "nobody-has-this-id", "--timeout", "10")
    assert code == 1 and err.startswith("imagefork: no final event for workflow nobody-has-this-id"), err
