"""Schema evolution: every kept version and today's read each other, so a rolling deploy can add
an optional field. A ``serde.Schemas`` over a temporary folder stands for a process of another
version (it knows only the files in that folder, plus what its resolver finds)."""
import io
import json
import random
import shutil
import subprocess
import sys

import fastavro
import pytest
from fastavro.utils import generate_many

from streams import serde
from streams.adapters.schemas import SchemaTopicError, SchemaTopicResolver, publish_schemas
from streams.config import Config
from streams.core.models import TaskOutput
from streams.core.options import LEGACY, ImageOptions, options_of
from tests.unit.test_serde import RECORDS

CURRENT = serde.schemas_dir()
HISTORY = sorted((CURRENT / "history").glob("*.avsc"))
SAMPLES = {**RECORDS,
           "JoinEvent": {"workflowId": "w", "body": ("io.imagefork.TaskResult", RECORDS["TaskResult"])},
           "JoinEvent.plan": {"workflowId": "w", "body": ("io.imagefork.WorkflowPlan", RECORDS["WorkflowPlan"])}}
# what the writers before schemas/history/ existed put on the topics (their fingerprints, from git history)
RELEASED = {"JoinEvent": ["e8b539d590cddb8c"], "ResizeTask": ["e5980020971ed5f6", "69e7355a500d5d0e"],
            "TaskResult": ["744ec077da67bd0c"], "WorkflowPlan": ["d2440972960e87d8"]}


def load(path) -> dict:
    return json.loads(path.read_text())


def record_of(path) -> str:
    """``io.imagefork.TaskResult.v1.avsc`` -> ``TaskResult``."""
    return path.name.split(".")[2]


def current(name: str) -> dict:
    return serde.expanded(CURRENT / f"io.imagefork.{name}.avsc")


def named_types(schema, out: dict) -> dict:
    if isinstance(schema, list):
        for branch in schema:
            named_types(branch, out)
    elif isinstance(schema, dict):
        if schema["type"] in ("record", "enum", "fixed"):
            out[schema["name"]] = schema
        for field in schema.get("fields", ()):
            named_types(field["type"], out)
        if "items" in schema:
            named_types(schema["items"], out)
    return out


def conform(value, schema, names=None):
    """``value`` as a reader with ``schema`` gets it: a field the value lacks gets its default, a key
    the schema lacks is dropped (Avro schema resolution, for the types these schemas use)."""
    names = named_types(schema, {}) if names is None else names
    schema = names.get(schema, schema) if isinstance(schema, str) else schema
    if isinstance(schema, list):
        if isinstance(value, tuple):  # (record name, record): a union of several records
            return value[0], conform(value[1], value[0], names)
        branches = [names.get(b, b) if isinstance(b, str) else b for b in schema]
        records = [b for b in branches if isinstance(b, dict) and b["type"] == "record"]
        return conform(value, records[0], names) if isinstance(value, dict) else value
    if isinstance(schema, dict) and schema["type"] == "record":
        return {f["name"]: conform(value[f["name"]], f["type"], names) if f["name"] in value else f["default"]
                for f in schema["fields"]}
    if isinstance(schema, dict) and schema["type"] == "array":
        return [conform(v, schema["items"], names) for v in value]
    return value


def process_with(folder, versions: dict[str, dict]) -> serde.Schemas:
    """A process whose schema files are today's but for ``versions`` (name -> schema); no history."""
    folder.mkdir()
    for path in CURRENT.glob("io.imagefork.*.avsc"):
        shutil.copy(path, folder / path.name)
    for name, schema in versions.items():
        (folder / f"io.imagefork.{name}.avsc").write_text(json.dumps(schema))
    # A record that embeds an overridden one may no longer load beside it (an old, self-contained
    # TaskResult defines TaskOutput inline, today's JoinEvent defines it through WorkflowPlan too). A real
    # old process has the old embedding record as well, and each record's own versions are tested on
    # their own: leave such a record out.
    for path in folder.glob("io.imagefork.*.avsc"):
        if path.name[len("io.imagefork."):-len(".avsc")] not in versions:
            try:
                serde.expanded(path)
            except serde.SerdeError:
                path.unlink()
    return serde.Schemas(folder)


def with_foo(schema: dict) -> dict:
    """A made-up next version: one optional field more."""
    return {**schema, "fields": [*schema["fields"], {"name": "foo", "type": "string", "default": "bar"}]}


# --- the kept versions ----------------------------------------------------------------------
def test_history_holds_self_contained_numbered_versions():
    versions: dict[str, list[int]] = {}
    for path in HISTORY:
        schema = load(path)
        assert schema["name"] == f"io.imagefork.{record_of(path)}"
        fastavro.parse_schema(schema)  # raises on a named type defined in another file
        versions.setdefault(record_of(path), []).append(int(path.name.split(".")[3][1:]))
    assert all(sorted(v) == list(range(1, len(v) + 1)) for v in versions.values())
    fingerprints = [serde.fingerprint_of(load(p)) for p in HISTORY]
    fingerprints += [serde.schema(n).fingerprint for n in serde.registry().names()]
    assert len(set(fingerprints)) == len(fingerprints), "a kept version equals another or a current one"


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_every_released_fingerprint_is_known(name):
    process = serde.Schemas(CURRENT)
    for fp in RELEASED[name]:
        assert process.writer(bytes.fromhex(fp))["name"] == f"io.imagefork.{name}"


@pytest.mark.parametrize("path", HISTORY, ids=lambda p: p.name)
def test_current_schema_reads_random_records_of_every_version(path):
    """fastavro alone, on generated records: every kept version resolves to today's schema."""
    old, new = fastavro.parse_schema(load(path)), current(record_of(path))
    parsed_new = fastavro.parse_schema(new)
    random.seed(path.name)
    for record in generate_many(old, 50):
        out = io.BytesIO()
        fastavro.schemaless_writer(out, old, record)
        as_written = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), old, None, True, True)
        as_read = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), old, parsed_new, True, True)
        assert as_read == conform(as_written, new)


# --- through serde: both directions of a rolling deploy ---------------------------------------
@pytest.mark.parametrize("path", HISTORY, ids=lambda p: p.name)
def test_old_writer_new_reader_gets_defaults(path, tmp_path):
    name, old = record_of(path), load(path)
    written = conform(SAMPLES[name], old)
    data = process_with(tmp_path / "old", {name: old}).encode(name, written)
    assert data[2:10] == serde.fingerprint_of(old)
    expected = conform(written, current(name))
    assert serde.Schemas(CURRENT).decode(name, data) == expected
    assert serde.decode(name, data) == expected  # the process's own registry knows history too
    if name == "JoinEvent":
        assert serde.decode_join_event(data) == ("TaskResult", expected["body"][1])
        if "runId" not in json.dumps(old):  # v1: written before run ids, read with the default
            assert expected["body"][1]["runId"] == ""


@pytest.mark.parametrize("path", HISTORY, ids=lambda p: p.name)
def test_new_writer_old_reader_with_a_resolver(path, tmp_path):
    name, old = record_of(path), load(path)
    data = serde.encode(name, SAMPLES[name])
    reader = process_with(tmp_path / "old", {name: old})
    with pytest.raises(serde.SerdeError, match=data[2:10].hex()):
        reader.decode(name, data)
    reader.resolver = serde.current_schemas().get
    assert reader.decode(name, data) == conform(SAMPLES[name], old)


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_an_added_optional_field_both_ways(sample, tmp_path):
    name = sample.split(".")[0]
    v3 = process_with(tmp_path / "v3", {name: with_foo(current(name))})
    today = serde.Schemas(CURRENT)
    record = SAMPLES[sample]
    # v3 writes, today reads (v3's schema found by the resolver): foo is skipped
    data = v3.encode(name, {**record, "foo": "hello"})
    with pytest.raises(serde.SerdeError, match="no schema resolver"):
        today.decode(name, data)
    today.resolver = v3.current().get
    assert today.decode(name, data) == record
    # today writes, v3 reads: foo gets its default
    data = today.encode(name, record)
    v3.resolver = today.current().get
    assert v3.decode(name, data) == {**record, "foo": "bar"}


def test_an_added_field_in_an_embedded_record(tmp_path):
    """TaskResult v3 changes JoinEvent too: the v3 process's JoinEvent embeds TaskResult with foo."""
    v3 = process_with(tmp_path / "v3", {"TaskResult": with_foo(current("TaskResult"))})
    today = serde.Schemas(CURRENT, resolver=v3.current().get)
    result = {**RECORDS["TaskResult"], "foo": "hello"}
    data = v3.encode("JoinEvent", {"workflowId": "w", "body": ("io.imagefork.TaskResult", result)})
    assert today.decode("JoinEvent", data) == SAMPLES["JoinEvent"]
    v3.resolver = today.current().get
    assert v3.decode("JoinEvent", today.encode("JoinEvent", SAMPLES["JoinEvent"]))["body"][1]["foo"] == "bar"


def test_the_process_resolver_is_asked_once_per_fingerprint(tmp_path):
    # a version no other test (nor the process's registry, shared with them) has seen
    schema = with_foo(current("DeadlineCheck"))
    schema["fields"].append({"name": f"once_{tmp_path.name}".replace("-", "_"), "type": "int", "default": 0})
    v3 = process_with(tmp_path / "v3", {"DeadlineCheck": schema})
    data = v3.encode("DeadlineCheck", {"workflowId": "w", "at": 1, "foo": "x"})
    asked = []

    def resolver(fp):
        asked.append(fp)
        return v3.current().get(fp)

    serde.set_resolver(resolver)
    try:
        assert serde.decode("DeadlineCheck", data) == {"workflowId": "w", "at": 1}
        assert serde.decode("DeadlineCheck", data) == {"workflowId": "w", "at": 1}
    finally:
        serde.set_resolver(None)
    assert asked == [data[2:10]]


# --- fingerprints nobody knows ------------------------------------------------------------------
UNKNOWN = b"\xc3\x01" + bytes.fromhex("0123456789abcdef") + b"\x02w\x02"


def test_unknown_fingerprint_without_resolver_is_a_serde_error():
    with pytest.raises(serde.SerdeError, match="0123456789abcdef.*no schema resolver installed"):
        serde.Schemas(CURRENT).decode("DeadlineCheck", UNKNOWN)
    with pytest.raises(serde.SerdeError, match="0123456789abcdef"):
        serde.decode("DeadlineCheck", UNKNOWN)


@pytest.mark.parametrize("answer, match", [
    (None, "does not know"),
    ('{"type": "record"', "does not parse"),
    (json.dumps(current("Size")), "has fingerprint"),  # a real schema, not the one asked for
])
def test_resolver_answers_are_checked(answer, match):
    with pytest.raises(serde.SerdeError, match=match):
        serde.Schemas(CURRENT, resolver=lambda fp: answer).decode("DeadlineCheck", UNKNOWN)


def test_a_known_schema_of_another_record_is_refused():
    data = serde.encode("DeadlineCheck", {"workflowId": "w", "at": 1})
    with pytest.raises(serde.SerdeError, match="written as io.imagefork.DeadlineCheck"):
        serde.Schemas(CURRENT).decode("WorkflowCompleted", data)


# --- adding a version -----------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("git") is None, reason="the archive script reads git history")
def test_archive_keeps_what_a_change_replaces(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(CURRENT, repo / "schemas")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "v"], check=True)
    path = repo / "schemas" / "io.imagefork.TaskResult.avsc"
    path.write_text(json.dumps(with_foo(json.loads(path.read_text()))))
    script = [sys.executable, str(repo / "schemas" / "history" / "archive")]
    printed = subprocess.run(script, check=True, capture_output=True, text=True).stdout.split()
    kept = {p.split("/")[-1]: load(repo / "schemas" / "history" / p.split("/")[-1]) for p in printed}
    n_result = len([p for p in HISTORY if record_of(p) == "TaskResult"]) + 1
    n_event = len([p for p in HISTORY if record_of(p) == "JoinEvent"]) + 1
    assert {k: serde.fingerprint_of(v) for k, v in kept.items()} == {
        f"io.imagefork.TaskResult.v{n_result}.avsc": serde.schema("TaskResult").fingerprint,
        f"io.imagefork.JoinEvent.v{n_event}.avsc": serde.schema("JoinEvent").fingerprint}
    assert subprocess.run(script, check=True, capture_output=True, text=True).stdout == ""


# --- the schemas topic, with no broker to reach (the real one: tests/integration/test_schemas.py) --
def test_publish_without_a_broker_is_a_clear_error():
    with pytest.raises(SchemaTopicError, match="cannot publish the schemas to imagefork.schemas at 127.0.0.1:1"):
        publish_schemas(Config(bootstrap_servers="127.0.0.1:1"), timeout_s=1)


def test_resolver_without_a_broker_answers_none_and_waits_before_asking_again():
    resolver = SchemaTopicResolver(Config(bootstrap_servers="127.0.0.1:1"), min_interval_s=60, timeout_s=1)
    assert resolver(bytes(8)) is None
    asked_at = resolver.read_at
    assert resolver(bytes.fromhex("0123456789abcdef")) is None and resolver.read_at == asked_at
    resolver.close()


# --- resize modes (issue 9): what records written before them mean now --------------------------------
@pytest.mark.parametrize("keep, mode", [(True, "fit"), (False, "force")])
def test_an_old_request_decodes_unchanged(keep, mode, tmp_path):
    from streams.core.planning import parse_request, plan_tasks
    old = load(CURRENT / "history" / "io.imagefork.ImageRequest.v1.avsc")
    written = {"fileLocation": "s3://b/k", "outputFormats": ["jpg"], "outputSizes": [{"width": 30, "height": 20}],
               "maintainAspectRatio": keep, "workflowId": "w", "correlationId": None}
    data = process_with(tmp_path / "old", {"ImageRequest": old}).encode("ImageRequest", written)
    doc = serde.decode_request_bytes(data)
    assert doc["outputSizes"] == [{"width": 30, "height": 20, "resizeMode": None, "gravity": None, "quality": None,
                                   "options": None}]
    assert (doc["resizeMode"], doc["gravity"], doc["enlarge"], doc["background"], doc["quality"]) == \
        (None, None, True, None, None)
    request = parse_request(doc, max_dimension=100, max_tasks=10)
    task = plan_tasks(request, "w", source_uri="s3://b/s", deadline=1)[0]
    o = task.options.resolved()
    assert (o.resizeMode, o.gravity, o.enlarge, o.background, o.quality) == (mode, "center", True, None, None)


@pytest.mark.parametrize("keep, mode", [(True, "fit"), (False, "force")])
def test_an_old_task_resizes_as_before(keep, mode, tmp_path):
    from streams.core.imaging import OutputSpec
    from streams.core.models import ResizeTask
    old = load(CURRENT / "history" / "io.imagefork.ResizeTask.v3.avsc")
    task = {k: v for k, v in SAMPLES["ResizeTask"].items() if k in {f["name"] for f in old["fields"]}}
    data = process_with(tmp_path / "old", {"ResizeTask": old}).encode("ResizeTask", {**task, "maintainAspectRatio": keep})
    read = ResizeTask.from_dict(serde.decode("ResizeTask", data))
    assert read.options.resolved() == ImageOptions().resolved()  # a v3 task said no option: the defaults
    spec = OutputSpec(read.format, read.width, read.height, read.maintainAspectRatio, read.options)
    assert spec.options.resizeMode == mode


def test_an_old_output_record_says_no_mode(tmp_path):
    old = load(CURRENT / "history" / "io.imagefork.TaskOutput.v1.avsc")
    written = conform(SAMPLES["TaskOutput"], old)
    data = process_with(tmp_path / "old", {"TaskOutput": old}).encode("TaskOutput", written)
    read = serde.decode("TaskOutput", data)
    assert read == {**written, "mode": "", "gravity": "", "enlarge": True, "background": "", "quality": 0,
                    **NO_FORMAT_OPTIONS, "options": None, "reused": False, "reusedFrom": ""}
    assert TaskOutput.from_dict(read).options == ImageOptions(enlarge=True, progressive=False, lossless=False,
                                                              keepProfile=False)


# --- formats and encoder options (issue 9): records written before them --------------------------------
NO_FORMAT_OPTIONS = {"effort": -1, "progressive": False, "lossless": False, "frames": 1, "keepMetadata": "",
                     "keepProfile": False}


def test_a_request_before_the_format_options_plans_as_before(tmp_path):
    from streams.core.planning import parse_request, plan_tasks
    old = load(CURRENT / "history" / "io.imagefork.ImageRequest.v3.avsc")
    written = conform(SAMPLES["ImageRequest"], old)
    data = process_with(tmp_path / "old", {"ImageRequest": old}).encode("ImageRequest", written)
    doc = serde.decode_request_bytes(data)
    assert {k: doc[k] for k in ("effort", "progressive", "lossless", "animated", "keepMetadata", "keepProfile")} \
        == {"effort": None, "progressive": None, "lossless": False, "animated": False, "keepMetadata": None,
            "keepProfile": False}
    task = plan_tasks(parse_request(doc, max_dimension=100, max_tasks=10), "w", source_uri="s3://b/s", deadline=1)[0]
    o = task.options.resolved()
    assert (o.effort, o.progressive, o.lossless, o.animated, o.keepMetadata, o.keepProfile) == \
        (None, None, False, False, "none", False)


def test_a_task_before_the_format_options_encodes_as_configured(tmp_path):
    from streams.core.models import ResizeTask
    old = load(CURRENT / "history" / "io.imagefork.ResizeTask.v4.avsc")
    written = conform(SAMPLES["ResizeTask"], old)
    data = process_with(tmp_path / "old", {"ResizeTask": old}).encode("ResizeTask", written)
    read = ResizeTask.from_dict(serde.decode("ResizeTask", data)).options.resolved()
    assert (read.effort, read.progressive, read.lossless, read.animated, read.keepMetadata, read.keepProfile) == \
        (None, None, False, False, "none", False)



# --- ImageOptions (issue 23): every kept version's flat options mean what they meant ------------------
# one value of each legacy flat field that is not its default (ImageRequest, Size, ResizeTask, TaskOutput)
SAID = {"resizeMode": "pad", "mode": "pad", "gravity": "smart", "enlarge": False, "background": "#102030",
        "quality": 42, "effort": 3, "progressive": True, "lossless": True, "animated": True,
        "keepMetadata": "copyright", "keepProfile": True}
WITH_OPTIONS = {"ImageRequest", "Size", "ResizeTask", "TaskOutput", "TaskResult", "JoinEvent", "WorkflowCompleted"}


def _with_options(record: str, value: dict):
    """(record, dict) of every record carrying options in ``value`` (a ``record``), outermost first."""
    if record in LEGACY:
        yield record, value
    if record == "ImageRequest":
        for size in value["outputSizes"]:
            yield "Size", size
    if record == "JoinEvent":
        yield from _with_options(value["body"][0].rsplit(".", 1)[-1], value["body"][1])
    if record == "TaskResult" and value.get("output"):
        yield "TaskOutput", value["output"]
    if record == "WorkflowCompleted":
        for output in value["outputs"]:
            yield "TaskOutput", output


@pytest.mark.parametrize("path", [p for p in HISTORY if record_of(p) in WITH_OPTIONS], ids=lambda p: p.name)
def test_every_kept_version_reads_its_flat_options_into_image_options(path, tmp_path):
    """A record of each kept version, written with every flat option field it has set to a value that is
    not its default, reads today into ``ImageOptions`` that say each of them; a field it did not have reads
    as today's schema's default says. A version that has ``options`` is read from them."""
    name, old = record_of(path), load(path)
    today = named_types(current(name), {})
    written = conform(SAMPLES[name], old)
    had = []
    for record, value in _with_options(name, written):
        flat = {field: SAID[field] for field in LEGACY[record] if field in value}
        value.update(flat)
        had.append((record, flat))
    data = process_with(tmp_path / "old", {name: old}).encode(name, written)
    read = list(_with_options(name, serde.decode(name, data)))
    assert [r for r, _ in read] == [r for r, _ in had]
    for (record, value), (_, flat), (_, before) in zip(read, had, _with_options(name, written)):
        if before.get("options") is not None:  # a version with ImageOptions: they are read as written
            assert options_of(record, value) == ImageOptions.from_dict(before["options"]), record
            continue
        schema = today.get(f"io.imagefork.{record}") or today[record]
        defaults = {f["name"]: f["default"] for f in schema["fields"] if f["name"] in LEGACY[record]}
        options = options_of(record, value)
        assert options == options_of(record, {**defaults, **flat}), record
        assert options.said().items() >= {LEGACY[record][f][0]: v for f, v in flat.items()}.items(), record


def test_the_flat_fields_are_still_written_for_older_readers():
    """A resize worker of the version before ImageOptions reads a new task's flat fields: they say what
    ``options`` says."""
    from streams.core.models import ResizeTask
    task = ResizeTask.from_dict(SAMPLES["ResizeTask"])
    assert task.options.said() and task.to_dict()["options"] == task.options.to_dict()
    data = serde.encode("ResizeTask", task.to_dict())
    v5 = fastavro.parse_schema(load(CURRENT / "history" / "io.imagefork.ResizeTask.v5.avsc"))
    as_v5 = fastavro.schemaless_reader(io.BytesIO(data[10:]), serde.schema("ResizeTask").parsed, v5)
    assert "options" not in as_v5 and options_of("ResizeTask", as_v5) == task.options
