import json

import pytest

from streams import serde
from streams.core.models import (
    DeadlineCheck, PlanFailure, PresetRef, ResizeTask, SourceFacts, TaskDescriptor, TaskError, TaskOutput, TaskResult,
    WorkflowCompleted, WorkflowPlan,
)
from streams.core.options import ImageOptions

OUT = TaskOutput("r0", "png", 300, 200, 1234, "image/png", "s3://b/k.png", "http://s3/b/k.png", frames=3,
                 options=ImageOptions(resizeMode="pad", gravity="west", enlarge=False, background="#ff000080",
                                      effort=7, progressive=False, lossless=False, animated=True,
                                      keepMetadata="copyright", keepProfile=True))
OPTIONS = ImageOptions(resizeMode="fill", gravity="north", enlarge=False, background="#123456", quality=90, effort=0,
                       progressive=False, lossless=True, animated=True, keepMetadata="copyright", keepProfile=True)
FACTS = SourceFacts("ab" * 32, 900, 600, "jpeg", 6, False, 1, "CMYK", "U.S. Web Coated (SWOP) v2", "#102030",
                    ("#102030", "#ffffff"), "LEHV6nWB2yk8pyo0adR*.7kCMdnj", "ee4a9862f66b8926")
TASKS = (TaskDescriptor("image_convert_resize_png_3x4_0", "png", 3, 4), TaskDescriptor("r1", "webp", 5, 6))
ERR = TaskError("r1", "IMAGE_UNDECODABLE", "bad", 1)
RECORDS = {
    "ImageRequest": {"fileLocation": "s3://b/k", "outputFormats": ["png"],
                     "outputSizes": [{"width": 1, "height": 2, "resizeMode": None, "gravity": None, "quality": None,
                                      "options": None},
                                     {"width": 3, "height": 4, "resizeMode": "fill", "gravity": "smart",
                                      "quality": 90, "options": {**ImageOptions().to_dict(), "lossless": False}}],
                     "maintainAspectRatio": False, "workflowId": "w", "correlationId": None,
                     "resizeMode": "pad", "gravity": "southeast", "enlarge": False, "background": "#00ff00",
                     "quality": 70, "retry": None, "effort": 4, "progressive": True, "lossless": True,
                     "animated": True, "keepMetadata": "all", "keepProfile": True,
                     "options": OPTIONS.to_dict(), "facts": ["phash"], "callbackUrl": "https://hooks.example.com/x",
                     "preset": "product-gallery", "priority": "batch"},
    "ResizeTask": ResizeTask("w", "r0", 0, 1, "s3://b/s", "http://x/y", "png", 3, 4, True, "w/r0.png", 99, 2, 5,
                             options=OPTIONS, facts=("basic", "phash"), priority="batch").to_dict(),
    "TaskResult": TaskResult("w", "r0", "SUCCEEDED", 1, 7, output=OUT, runId="r1", facts=FACTS).to_dict(),
    "WorkflowPlan": WorkflowPlan("w", "http://x", TASKS, 1, 2, "c",
                                 PlanFailure("REJECTED", "REQUEST_INVALID", "x"), preset=PresetRef("g", 2)).to_dict(),
    "DeadlineCheck": DeadlineCheck("w", 5).to_dict(),
    "WorkflowCompleted": WorkflowCompleted("w", None, "FAILED", "http://x", ("u",), (OUT,), (ERR,), 2, 1, 2,
                                           tasks=TASKS, facts=FACTS, preset=PresetRef("g", 3)).to_dict(),
    "TaskOutput": OUT.to_dict(),
    "TaskError": ERR.to_dict(),
    "Size": {"width": 1, "height": 2, "resizeMode": "force", "gravity": None, "quality": 55,
             "options": {**ImageOptions().to_dict(), "resizeMode": "force", "quality": 55, "keepProfile": True}},
    "ImageOptions": OPTIONS.to_dict(),
    "SourceFacts": FACTS.to_dict(),
    "TaskDescriptor": TASKS[0].to_dict(),
    "PlanFailure": {"status": "FAILED", "code": "c", "message": "m", "attempts": 4},
    "JoinMarker": {"status": "CANCELLED", "at": 5, "runId": "r1", "kept": ["r0", "r2"]},
    "WebhookDelivery": {"workflowId": "w", "runId": "r1", "url": "https://h/x", "state": "RETRYING", "attempts": 2,
                        "lastStatus": 503, "lastError": "HTTP 503", "at": 5, "nextAt": 9},
    "Cancellation": {"workflowId": "w", "runId": "r1", "reason": "a mistake", "by": "api", "at": 5, "applied": True},
    "PresetRef": {"name": "g", "version": 3},
    "Preset": {"name": "g", "version": 3, "outputFormats": ["png", "webp"],
               "outputSizes": [{"width": 1, "height": 2, "resizeMode": None, "gravity": None, "quality": None,
                                "options": {**ImageOptions().to_dict(), "quality": 50}}],
               "maintainAspectRatio": True, "options": OPTIONS.to_dict(), "description": "d", "updatedAt": 9,
               "deleted": True},
    "RunIgnored": {"workflowId": "w", "runId": "r2", "reason": "finished", "takenRunId": "r1",
                   "takenStatus": "COMPLETED", "takenFinishedAt": 5, "at": 6},
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_round_trip_every_schema(name):
    data = serde.encode(name, RECORDS[name])
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == serde.schema(name).fingerprint
    assert serde.decode(name, data) == RECORDS[name]


def test_every_schema_file_is_covered():
    files = {p.name.split(".")[-2] for p in serde.schemas_dir().glob("*.avsc")}
    assert files == set(RECORDS) | {"JoinEvent"}


def test_schemas_dir_override(monkeypatch, tmp_path):
    assert (serde.schemas_dir() / "io.imagefork.JoinEvent.avsc").exists()
    monkeypatch.setenv("IMAGEFORK_SCHEMAS_DIR", str(tmp_path))
    assert serde.schemas_dir() == tmp_path


@pytest.mark.parametrize("kind", ["WorkflowPlan", "TaskResult", "DeadlineCheck"])
def test_join_event_union_round_trip(kind):
    data = serde.encode_join_event(kind, RECORDS[kind])
    assert serde.decode_join_event(data) == (kind, RECORDS[kind])


def test_rabin_fingerprint_matches_the_avro_spec():
    # the spec's CRC-64-AVRO of the canonical form "null" is 0x63dd24e7cc258f8a, written little-endian
    from fastavro.schema import fingerprint
    assert bytes.fromhex(fingerprint('"null"', "CRC-64-AVRO")) == (0x63DD24E7CC258F8A).to_bytes(8, "little")


@pytest.mark.parametrize("garbage", [b"", b"\xc3", b"\xc3\x01" + b"\x00" * 8 + b"x", b"\x00" * 20,
                                     serde.encode("DeadlineCheck", {"workflowId": "w", "at": 1})])
def test_garbage_raises_serde_error(garbage):
    with pytest.raises(serde.SerdeError):
        serde.decode("WorkflowCompleted", garbage)


def test_truncated_body_raises():
    data = serde.encode("WorkflowCompleted", RECORDS["WorkflowCompleted"])
    with pytest.raises(serde.SerdeError):
        serde.decode("WorkflowCompleted", data[:-3])


def test_request_bytes_json_or_avro():
    doc = RECORDS["ImageRequest"]
    assert serde.decode_request_bytes(json.dumps(doc).encode()) == doc
    assert serde.decode_request_bytes(serde.encode("ImageRequest", doc)) == doc
    assert serde.decode_request_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode()) == doc
    for bad in (b"\xff\xfe", b"{not json", b"\xc3\x01garbagegarbage"):
        with pytest.raises(serde.SerdeError):
            serde.decode_request_bytes(bad)
    deep = b"[" * 100000 + b"]" * 100000
    with pytest.raises(serde.SerdeError):
        serde.decode_request_bytes(deep)


def test_avro_submit_keeps_a_string_false():
    """`imagefork submit --avro` with "maintainAspectRatio": "false" must mean false, as JSON does."""
    from streams.client import Client
    from streams.config import Config

    class Producer:
        def produce(self, topic, key, value, on_delivery):
            self.value = value
            on_delivery(None, None)

        def flush(self, timeout):
            return 0

    client = Client.__new__(Client)
    client.config, client.producer, client._published = Config(), Producer(), True
    doc = {"fileLocation": "https://example.com/a.png", "outputFormats": ["png"],
           "outputSizes": [{"width": 10, "height": 10}], "maintainAspectRatio": "false"}
    client.submit(doc, "wf-1", avro=True)
    assert serde.decode("ImageRequest", client.producer.value)["maintainAspectRatio"] is False
    client.submit({**doc, "maintainAspectRatio": "TRUE"}, "wf-2", avro=True)
    assert serde.decode("ImageRequest", client.producer.value)["maintainAspectRatio"] is True
    # the same for enlarge, and a quality written as a string, as the JSON path takes them
    client.submit({**doc, "enlarge": "false", "quality": "70", "resizeMode": "fill"}, "wf-3", avro=True)
    sent = serde.decode("ImageRequest", client.producer.value)
    assert (sent["enlarge"], sent["quality"], sent["resizeMode"]) == (False, 70, "fill")
    # and the format options
    client.submit({**doc, "lossless": "true", "animated": "TRUE", "keepProfile": "false", "progressive": "true",
                   "effort": "4"}, "wf-4", avro=True)
    sent = serde.decode("ImageRequest", client.producer.value)
    assert (sent["lossless"], sent["animated"], sent["keepProfile"], sent["progressive"], sent["effort"]) == \
        (True, True, False, True, 4)
    client.submit(doc, "wf-5", avro=True)
    assert serde.decode("ImageRequest", client.producer.value)["progressive"] is None  # the configured one


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_naming_union_branches_writes_the_same_bytes(name):
    """serde names the record branch of each union it writes (so fastavro does not validate the value
    against every branch first): the bytes are the ones fastavro writes by itself."""
    import io

    import fastavro
    plain = io.BytesIO()
    fastavro.schemaless_writer(plain, serde.schema(name).parsed, RECORDS[name])
    assert serde.encode(name, RECORDS[name])[10:] == plain.getvalue()
    if serde.schema(name).tag is not None:
        assert serde.schema(name).tag(RECORDS[name]) is not RECORDS[name]  # a copy: the caller's dict unchanged


def test_a_join_event_names_its_body_and_the_unions_inside_it():
    event = {"workflowId": "w", "body": ("io.imagefork.TaskResult", RECORDS["TaskResult"])}
    tagged = serde.schema("JoinEvent").tag(event)
    assert tagged["body"][1]["output"][0] == "io.imagefork.TaskOutput"
    assert tagged["body"][1]["output"][1]["options"][0] == "io.imagefork.ImageOptions"
    assert serde.decode("JoinEvent", serde.encode("JoinEvent", event))["body"][1] == RECORDS["TaskResult"]
