"""The join's pass-through of outputs (streams/segments.py): a result's output read for two fields and kept
as its bytes, and the final event written around those bytes, must be exactly what decoding and encoding
the whole records gives; anything else is decoded whole."""
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_writer

from streams import segments, serde
from streams.core.models import PassedOutput, TaskOutput, TaskResult, WorkflowCompleted
from streams.core.options import ImageOptions
from tests.unit.test_serde import ERR, FACTS, OUT, TASKS

PLAIN = TaskOutput("r1", "jpg", 16, 9, 10, "image/jpeg", "s3://b/r1.jpg", "http://s3/b/r1.jpg")
SHARP = replace(PLAIN, taskRef="r2", options=ImageOptions(resizeMode="fit", sharpen=0.5, quality=80), reused=True,
                reusedFrom="s3://b/old/r2.jpg")
HISTORY = Path(__file__).resolve().parents[2] / "schemas" / "history"


def result(output, **kw) -> TaskResult:
    return TaskResult("wf", output.taskRef if output else "r9", "SUCCEEDED" if output else "FAILED", 1, 7,
                      output=output, runId="run-1", **kw)


def passed(res: TaskResult) -> tuple[str, dict, bytes | None]:
    return segments.decode_join_event_passing(serde.encode_join_event("TaskResult", res.to_dict()))


@pytest.mark.parametrize("output", [OUT, PLAIN, SHARP], ids=["options", "plain", "sharpen-reused"])
@pytest.mark.parametrize("extra", [{}, {"facts": FACTS}, {"error": ERR, "deadline": 99}], ids=["bare", "facts", "error"])
def test_a_result_reads_as_decoding_it_whole_does_with_its_output_kept_as_bytes(output, extra):
    res = result(output, **extra)
    kind, body, kept = passed(res)
    whole_kind, whole = serde.decode_join_event(serde.encode_join_event("TaskResult", res.to_dict()))
    assert kind == whole_kind == "TaskResult"
    assert body["output"]["taskRef"] == output.taskRef and body["output"]["s3Uri"] == output.s3Uri
    assert {**body, "output": whole["output"]} == whole
    again = TaskResult.from_dict(body, kept)
    assert isinstance(again.output, PassedOutput) and again.output.full() == output
    assert replace(again, output=output) == res and again.output.to_dict() == output.to_dict()


def test_a_failed_result_has_no_output_to_pass():
    kind, body, kept = passed(result(None, error=ERR))
    assert kind == "TaskResult" and kept is None and body["output"] is None
    assert TaskResult.from_dict(body, kept) == result(None, error=ERR)


@pytest.mark.parametrize("outputs", [(), (PLAIN,), (OUT, PLAIN, SHARP), tuple(replace(PLAIN, taskRef=f"t{i}")
                                                                              for i in range(300))],
                         ids=["none", "one", "three", "300"])
def test_the_final_written_around_passed_outputs_is_the_bytes_of_encoding_it_whole(outputs):
    final = WorkflowCompleted("wf", "corr", "COMPLETED", "http://x/y.png", tuple(o.url for o in outputs), outputs,
                              (ERR,), len(outputs) + 1, 1, 2, runId="run-1", request='{"a": 1}', tasks=TASKS,
                              facts=FACTS)
    whole = serde.encode("WorkflowCompleted", final.to_dict())
    assert final.encode() == whole
    as_passed = tuple(TaskResult.from_dict(*passed(result(o))[1:]).output for o in outputs)
    assert all(isinstance(o, PassedOutput) for o in as_passed)
    spliced = replace(final, outputs=as_passed)
    assert spliced.encode() == whole
    assert WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted", whole)) == final
    assert spliced.document() == final.document()  # the JSON mirror decodes them


def test_a_final_without_facts_or_correlation_is_spliced_the_same():
    final = WorkflowCompleted("wf", None, "TIMED_OUT", "s3://b/s", (), (), (), 0, 1, 2)
    assert final.encode() == serde.encode("WorkflowCompleted", final.to_dict())


def test_the_output_a_result_carries_is_the_output_a_final_holds():
    # the bytes kept from a result go into a final as they are: both must embed the same TaskOutput version
    inside = json.loads(serde.current_schemas()[serde.schema("JoinEvent").fingerprint])
    result_schema = next(b for b in inside["fields"][1]["type"] if b["name"].endswith("TaskResult"))
    output_in_result = next(f["type"] for f in result_schema["fields"] if f["name"] == "output")[1]
    if isinstance(output_in_result, str):  # defined by an earlier branch (WorkflowPlan)
        output_in_result = serde.schema("TaskOutput").expanded
    assert serde.fingerprint_of(output_in_result) == serde.schema("TaskOutput").fingerprint


def test_plans_ticks_and_results_of_older_versions_are_decoded_whole():
    from tests.unit.test_serde import RECORDS
    for kind in ("WorkflowPlan", "DeadlineCheck"):
        data = serde.encode_join_event(kind, RECORDS[kind])
        assert segments.decode_join_event_passing(data) == (*serde.decode_join_event(data), None)
    old = sorted(HISTORY.glob("io.imagefork.JoinEvent.v*.avsc"))
    assert old, "the JoinEvent's history is kept"
    latest = max(old, key=lambda p: int(p.name.split(".v")[-1].split(".")[0]))
    schema = parse_schema(json.loads(latest.read_text()))
    body = {"workflowId": "wf", "body": ("io.imagefork.TaskResult", {
        "workflowId": "wf", "taskRef": "r1", "status": "SUCCEEDED", "attempts": 1, "finishedAt": 7,
        "output": {**{k: v for k, v in PLAIN.to_dict().items() if k != "options"}},
        "error": None, "runId": "run-1", "deadline": 0})}
    buf = io.BytesIO()
    schemaless_writer(buf, schema, body)
    data = serde.MAGIC + serde.fingerprint_of(schema) + buf.getvalue()
    kind, record, kept = segments.decode_join_event_passing(data)
    assert kind == "TaskResult" and kept is None and record["output"]["url"] == PLAIN.url
    assert TaskResult.from_dict(record).output.url == PLAIN.url


@pytest.mark.parametrize("cut", [1, 5, 40, 120])
def test_a_result_cut_short_or_padded_is_refused_not_passed(cut):
    data = serde.encode_join_event("TaskResult", result(OUT, facts=FACTS).to_dict())
    for broken in (data[:-cut], data + b"\x00" * cut):
        with pytest.raises(serde.SerdeError):
            segments.decode_join_event_passing(broken)


def test_garbage_inside_the_output_is_refused_not_passed():
    res = result(SHARP)
    data = bytearray(serde.encode_join_event("TaskResult", res.to_dict()))
    at = data.index(b"s3://b/old/r2.jpg")  # reusedFrom: a string's length byte before it, made absurd
    data[at - 1] = 0x7F
    with pytest.raises(serde.SerdeError):
        segments.decode_join_event_passing(bytes(data))
    with pytest.raises(serde.SerdeError):
        segments.decode_join_event_passing(serde.MAGIC + serde.schema("JoinEvent").fingerprint + b"\x80" * 12)


@pytest.mark.parametrize("field", ["contentType", "reusedFrom", "background"])
def test_a_string_that_is_not_utf8_anywhere_in_the_output_is_refused_not_passed(field):
    # every string of the output is checked, not only those the join uses: a final event that holds it could
    # be read by no one
    output = replace(SHARP, contentType="image/jpeg", reusedFrom="s3://b/old/zz.jpg",
                     options=replace(SHARP.options, background="#aabbcc"))
    marker = {"contentType": b"image/jpeg", "reusedFrom": b"s3://b/old/zz.jpg", "background": b"#aabbcc"}[field]
    data = bytearray(serde.encode_join_event("TaskResult", result(output).to_dict()))
    at = data.index(marker)
    data[at + 1] = 0xFF  # the same length, no longer UTF-8
    with pytest.raises(serde.SerdeError):
        segments.decode_join_event_passing(bytes(data))


def test_record_names_are_read_only_where_a_union_has_two_named_branches():
    reader = segments._passing(serde.schema("JoinEvent"))
    assert reader.head_options == reader.tail_options == {}  # no such union in a result today
    two = {"type": "record", "name": "x.R", "fields": [{"name": "v", "type": ["null", "x.A", "x.B"]}]}
    nested = {"type": "record", "name": "x.R", "fields": [{"name": "v", "type": {"type": "array", "items": two}}]}
    assert segments._options(two) == segments._options(nested) == segments.READ_OPTIONS
    assert segments._options({"type": "record", "name": "x.R", "fields": [
        {"name": "v", "type": ["null", "string", "int"]}, {"name": "w", "type": ["null", "x.A"]}]}) == {}
