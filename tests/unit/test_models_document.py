"""The final event as plain JSON (WorkflowCompleted.document): what `imagefork events --json` prints and
the IMAGEFORK_COMPLETED_JSON_TOPIC mirror carries."""
import json

from streams.core.models import WorkflowCompleted


def final(request: str) -> WorkflowCompleted:
    return WorkflowCompleted("wf", None, "COMPLETED", "http://x/a.png", ("http://s3/b/k",), (), (), 1, 1, 2,
                             runId="r", request=request)


def test_the_document_has_the_request_as_an_object_and_every_field_of_the_record():
    doc = final(json.dumps({"outputFormats": ["png"]})).document()
    assert doc["request"] == {"outputFormats": ["png"]}
    assert {k: v for k, v in doc.items() if k != "request"} == \
        {k: v for k, v in final("").to_dict().items() if k != "request"}
    assert json.loads(json.dumps(doc)) == doc  # plain JSON all the way down


def test_a_rejected_workflow_has_no_request_and_text_that_is_not_json_is_kept():
    assert final("").document()["request"] is None
    assert final("{not json").document()["request"] == "{not json"
