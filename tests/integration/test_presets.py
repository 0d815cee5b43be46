"""Named presets on the real stack: defined through the API (PUT, a new version only when the outputs
change) and the CLI, listed by GET /v1/presets, named by requests through the API and straight on Kafka
(alone, or besides sizes of the request's own); an unknown one is 400 at the API and REJECTED on Kafka; the
final event records the preset and its version. The preset then changes from 3 to 4 sizes:
``imagefork regenerate --dry-run`` counts, then ``regenerate --wait`` makes exactly the new size for each
workflow that used it (the other outputs are carried, their objects untouched), and a second regenerate
has nothing to do."""
from __future__ import annotations

import json
import uuid

import pytest

from streams import serde
from streams.adapters.kafka import read_to_end
from tests.integration.pipeline import Pipeline, run_cli, wait_until
from tests.integration.test_api import answers, call, free_port

pytestmark = pytest.mark.integration

SIZES = [{"width": 120, "height": 120}, {"width": 80, "height": 80}, {"width": 40, "height": 40}]


def results_of_run(p: Pipeline, workflow_id: str, run_id: str) -> list[str]:
    """The task references of every result of one run on the events topic."""
    refs = []
    for msg in read_to_end(p.config, p.config.topics.events):
        if msg.key() == workflow_id.encode():
            kind, body = serde.decode_join_event(msg.value() or b"")
            if kind == "TaskResult" and body.get("runId") == run_id:
                refs.append(body["taskRef"])
    return refs


def stamp(p: Pipeline, uri: str) -> tuple:
    """What changes when an object is written again."""
    head = p.store.head(uri.split("/", 3)[3])
    return head["ETag"], head["LastModified"]


def test_a_preset_is_named_recorded_and_regenerated_for_its_new_size_only(stack_env, files, tmp_path):
    p = Pipeline(stack_env, f"p{uuid.uuid4().hex[:8]}.", tmp_path / "logs")
    port = free_port()
    try:
        p.start_together("join", "planner", "resize", ("api", {"IMAGEFORK_API_LISTEN": f"127.0.0.1:{port}"}))
        api = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: answers(api, "/readyz") == 200, 60)

        gallery = {"outputFormats": ["png", "webp"], "outputSizes": SIZES, "quality": 70, "description": "thumbs"}
        status, body, _ = call(api, "PUT", "/v1/presets/gallery", gallery)
        assert status == 201 and body["version"] == 1 and body["changed"], body
        status, body, _ = call(api, "PUT", "/v1/presets/gallery", gallery)
        assert status == 200 and body["version"] == 1 and not body["changed"]  # the same outputs: no new version
        status, body, _ = call(api, "PUT", "/v1/presets/gallery", {"outputFormats": ["bmp?"], "outputSizes": []})
        assert status == 400 and body["error"] == "INVALID_PRESET" and body["problems"], body
        assert wait_until(lambda: [x["name"] for x in call(api, "GET", "/v1/presets")[1].get("presets", [])]
                          == ["gallery"], 20)

        source = files.url("sample.png")
        status, body, _ = call(api, "POST", "/v1/workflows", {"fileLocation": source, "preset": "gallery"})
        assert status == 202, body
        alone = body["workflowId"]
        both = p.submit({"fileLocation": source, "preset": "gallery", "outputFormats": ["jpg"],
                         "outputSizes": [{"width": 50, "height": 50}]})
        status, body, _ = call(api, "POST", "/v1/workflows", {"fileLocation": source, "preset": "nope"})
        assert status == 400 and body["problems"][0]["field"] == "preset", body
        unknown = p.submit({"fileLocation": source, "preset": "nope"})
        finals = {f.workflowId: f for f in p.finals_for([alone, both, unknown], timeout=120)}
        assert finals[unknown].status == "REJECTED" and "no preset named 'nope'" in finals[unknown].errors[0].message
        for wf, count in ((alone, 6), (both, 7)):
            final = finals[wf]
            assert final.status == "COMPLETED" and len(final.outputs) == count, final
            assert (final.preset.name, final.preset.version) == ("gallery", 1)
            assert json.loads(final.request)["preset"]["version"] == 1
            p.check_outputs(final)
        assert call(api, "GET", f"/v1/workflows/{alone}")[1]["preset"] == {"name": "gallery", "version": 1}
        before = {wf: {o.s3Uri: stamp(p, o.s3Uri) for o in finals[wf].outputs} for wf in (alone, both)}

        # the preset grows a size, through the CLI
        changed = tmp_path / "gallery.json"
        changed.write_text(json.dumps({**gallery, "outputSizes": SIZES + [{"width": 160, "height": 160}]}))
        code, out, err = run_cli(p.env, "presets", "put", "gallery", str(changed))
        assert code == 0 and out.strip() == "gallery: version 2 (changed)", (out, err)

        code, out, err = run_cli(p.env, "regenerate", "--preset", "gallery", "--dry-run")
        assert code == 0, err
        assert ("gallery v2: 2 workflow(s) to regenerate, 4 output(s) to make, 13 kept, 0 dropped; 0 already at v2 "
                "(dry run: nothing sent)") in out, out
        assert f"{alone}: v1 -> v2: make 2, keep 6, dropped 0" in out and f"{both}: v1 -> v2: make 2, keep 7" in out

        code, out, err = run_cli(p.env, "regenerate", "--preset", "gallery", "--wait", "--timeout", "120")
        assert code == 0, (out, err)
        again = {f.workflowId: f for f in p.finals_for([alone, both], timeout=120)}
        for wf, count in ((alone, 8), (both, 9)):
            final, old = again[wf], finals[wf]
            assert final.status == "COMPLETED" and final.retryOf == old.runId and final.preset.version == 2, final
            assert len(final.outputs) == count and final.taskCount == count
            new = [o for o in final.outputs if o.s3Uri not in before[wf]]
            assert sorted((o.format, o.width) for o in new) == [("png", 160), ("webp", 160)], new
            # exactly the new size was made: two results in the new run, the old objects untouched
            assert sorted(results_of_run(p, wf, final.runId)) == sorted(o.taskRef for o in new)
            for uri, head in before[wf].items():
                assert stamp(p, uri) == head, uri
            p.check_outputs(final)

        code, out, err = run_cli(p.env, "regenerate", "--preset", "gallery")
        assert code == 0 and "0 workflow(s) to regenerate" in out and "2 already at v2" in out, out

        # deleted, then defined again: its versions go on (a workflow of version 1 is never taken for current)
        status, body, _ = call(api, "DELETE", "/v1/presets/gallery")
        assert status == 200 and body == {"deleted": "gallery", "version": 2}
        assert wait_until(lambda: call(api, "GET", "/v1/presets/gallery")[0] == 404, 20)
        status, body, _ = call(api, "PUT", "/v1/presets/gallery", gallery)
        assert status == 200 and body["version"] == 3 and body["changed"], body
    finally:
        p.stop()
