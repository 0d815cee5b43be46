"""ImageOptions (streams/core/options.py): one record from the request to the output. An option is one
field and one row; these tests follow every option through every record, so a new one is covered when it
is added."""
import json

import pytest

from streams import serde
from streams.client import avro_request
from streams.core.errors import RequestInvalid
from streams.core.imaging import task_spec
from streams.core.models import (
    ResizeTask, TaskDescriptor, TaskOutput, WorkflowCompleted, WorkflowPlan, descriptors_of,
)
from streams.core.options import (
    DEFAULTS, LEGACY, NAMES, OPTIONS, ImageOptions, flat_fields, options_of, parse_options,
)
from streams.core.planning import make_plan, parse_request, plan_tasks, request_json

SEED = {"fileLocation": "http://x/y.png", "outputFormats": ["jpg", "webp"],
        "outputSizes": [{"width": 30, "height": 20}, {"width": 10, "height": 10}]}
# a valid value of every option, none of them its default
GIVEN = {"resizeMode": "pad", "gravity": "southwest", "enlarge": False, "background": "#112233", "quality": 61,
         "effort": 2, "progressive": True, "lossless": True, "animated": True, "keepMetadata": "all",
         "keepProfile": True, "sharpen": 1.5}


def parse(doc):
    return parse_request(doc, max_dimension=100, max_tasks=10)


def test_every_option_has_its_row_its_schema_field_and_a_test_value():
    schema = json.loads((serde.schemas_dir() / "io.imagefork.ImageOptions.avsc").read_text())
    fields = {f["name"]: f for f in schema["fields"]}
    assert tuple(fields) == NAMES == tuple(o.name for o in OPTIONS) == tuple(GIVEN)
    assert all(f["type"][0] == "null" and f["default"] is None for f in fields.values()), "every option optional"
    assert all(o.parse(GIVEN[o.name]) == (GIVEN[o.name], None) for o in OPTIONS)


def test_every_option_goes_from_the_request_to_the_resize_worker():
    request = parse({**SEED, **GIVEN})
    assert request.options == ImageOptions(**GIVEN)
    for task in plan_tasks(request, "wf", source_uri="s3://b/s", deadline=1):
        record = serde.decode("ResizeTask", serde.encode("ResizeTask", task.to_dict()))
        assert ResizeTask.from_dict(record) == task
        assert task_spec(record).options == ImageOptions(**GIVEN)


@pytest.mark.parametrize("name", NAMES)
def test_a_size_may_override_any_option(name):
    other = {**SEED, "outputFormats": ["png"],
             "outputSizes": [{"width": 5, "height": 5, name: GIVEN[name]}, {"width": 6, "height": 6}]}
    tasks = plan_tasks(parse(other), "wf", source_uri="s3://b/s", deadline=1)
    assert getattr(tasks[0].options, name) == GIVEN[name]
    assert getattr(tasks[1].options.resolved(), name) == (getattr(DEFAULTS, name) if name != "resizeMode" else "fit")


def test_options_in_an_options_object_win_over_flat_ones_and_are_named_by_their_path():
    request = parse({**SEED, "quality": 50, "options": {"quality": 90, "gravity": "north"}})
    assert (request.options.quality, request.options.gravity) == (90, "north")
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, "options": {"quality": 0},
               "outputSizes": [{"width": 1, "height": 1, "options": {"gravity": "up"}}]})
    assert [f for f, _ in info.value.problems] == ["outputSizes[0].options.gravity", "options.quality"]
    with pytest.raises(RequestInvalid, match="options: must be an object"):
        parse({**SEED, "options": [1]})


def test_the_validated_request_parses_again_to_itself():
    request = parse({**SEED, **GIVEN, "outputSizes": [{"width": 5, "height": 5, "quality": 99}]})
    assert parse(json.loads(request_json(request))) == request


def test_an_avro_request_means_what_its_json_means():
    """``submit --avro`` writes the options in ``options`` and the flat fields an older planner reads."""
    doc = {**SEED, **{k: str(v).lower() if isinstance(v, bool) else v for k, v in GIVEN.items()},
           "outputSizes": [{"width": 5, "height": 5, "quality": "80"}]}
    record = serde.decode_request_bytes(serde.encode("ImageRequest", avro_request(doc)))
    assert parse(record) == parse(doc)
    assert record["options"]["enlarge"] is False and record["enlarge"] is False  # "false" is false, both ways
    assert record["outputSizes"][0]["options"]["quality"] == 80 and record["outputSizes"][0]["quality"] == 80


@pytest.mark.parametrize("record", ["ImageRequest", "Size", "ResizeTask", "TaskOutput"])
def test_flat_fields_and_back_keep_what_they_can_say(record):
    said = ImageOptions(**{name: GIVEN[name] for name, _ in LEGACY[record].values()})
    assert options_of(record, flat_fields(record, said)) == said
    assert options_of(record, {**flat_fields(record, said), "options": ImageOptions(quality=7).to_dict()}) == \
        ImageOptions(quality=7)  # a record with options is read from them alone


def test_plans_and_final_events_carry_their_tasks():
    request = parse(SEED)
    tasks = plan_tasks(request, "wf", source_uri="s3://b/s", deadline=1)
    plan = make_plan(request, "wf", tasks, submitted_at=1, deadline=2, run_id="r")
    assert plan.tasks[1] == TaskDescriptor("image_convert_resize_jpg_10x10_1", "jpg", 10, 10)
    assert plan.taskRefs == tuple(t.taskRef for t in tasks)
    kind, body = serde.decode_join_event(serde.encode_join_event("WorkflowPlan", plan.to_dict()))
    assert WorkflowPlan.from_dict(body) == plan
    final = WorkflowCompleted("wf", None, "COMPLETED", "http://x", (), (), (), 4, 1, 2, tasks=plan.tasks)
    assert WorkflowCompleted.from_dict(serde.decode("WorkflowCompleted",
                                                    serde.encode("WorkflowCompleted", final.to_dict()))) == final


def test_a_plan_written_before_tasks_is_read_from_its_references():
    refs = ["image_convert_resize_webp_1200x800_7", "image_convert_resize_my_fmt_3x4_0", "not-a-ref"]
    assert descriptors_of({"taskRefs": refs}) == (TaskDescriptor(refs[0], "webp", 1200, 800),
                                                  TaskDescriptor(refs[1], "my_fmt", 3, 4),
                                                  TaskDescriptor(refs[2], "", 0, 0))


def test_an_output_round_trips_with_its_applied_options():
    out = TaskOutput("r", "jpg", 3, 2, 10, "image/jpeg", "s3://b/k", "http://s3/b/k", 1,
                     ImageOptions(resizeMode="fit", enlarge=True, quality=80, progressive=True, lossless=False,
                                  keepMetadata="none", keepProfile=False))
    record = serde.decode("TaskOutput", serde.encode("TaskOutput", out.to_dict()))
    assert TaskOutput.from_dict(record) == out
    assert (record["mode"], record["quality"], record["gravity"], record["effort"]) == ("fit", 80, "", -1)


def test_parse_options_reports_every_bad_value():
    problems = []
    parse_options({"quality": "x", "gravity": 1, "enlarge": "maybe"}, "", problems)
    assert [f for f, _ in problems] == ["gravity", "enlarge", "quality"]


# --- sharpen: the option added as one field and its step (issue 23's example) ---------------------------
def _detail(im) -> float:
    """High-frequency energy: how far the image is from itself blurred."""
    from PIL import ImageChops, ImageFilter, ImageStat
    grey = im.convert("RGB").convert("L")
    return ImageStat.Stat(ImageChops.difference(grey, grey.filter(ImageFilter.GaussianBlur(1)))).mean[0]


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_sharpen_sharpens_and_says_so(fmt):
    import io

    from PIL import Image, ImageDraw

    from streams.config import Encoding, Limits
    from streams.core.imaging import OutputSpec, resize_image
    src = Image.new("RGBA", (400, 400), (255, 255, 255, 255))
    draw = ImageDraw.Draw(src)
    for x in range(0, 400, 100):
        draw.rectangle((x, 0, x + 49, 399), fill=(20, 40, 200, 128 if x % 200 else 255))
    plain = resize_image(src, OutputSpec(fmt, 150, 150), Limits(), Encoding())
    sharp = resize_image(src, OutputSpec(fmt, 150, 150, sharpen=2.0), Limits(), Encoding())
    assert (plain.applied.sharpen, sharp.applied.sharpen) == (None, 2.0)
    a, b = Image.open(io.BytesIO(plain.data)), Image.open(io.BytesIO(sharp.data))
    assert b.size == a.size and _detail(b) > 1.2 * _detail(a)
    if fmt != "jpg":  # alpha is left as it is
        assert list(a.getchannel("A").getdata()) == list(b.getchannel("A").getdata())


@pytest.mark.parametrize("value, why", [(0, "between 0.1 and 10"), (11, "between 0.1 and 10"), ("x", "a number"),
                                        (True, "a number"), ("nan", "a number"), (float("inf"), "between")])
def test_sharpen_refuses_what_is_not_a_sigma(value, why):
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, "sharpen": value})
    assert why in dict(info.value.problems)["sharpen"]


def test_a_task_retried_after_a_transient_failure_keeps_its_options():
    """The resize worker's retry writes the task again with its next attempt: same options, same record."""
    from types import SimpleNamespace

    from streams.agents.resize import Resizer
    from streams.config import Config
    task = plan_tasks(parse({**SEED, **GIVEN}), "wf", source_uri="s3://b/s", deadline=2**62)[0]
    later = Resizer.retry(SimpleNamespace(config=Config()), task, {"code": "SOURCE_UNAVAILABLE", "message": "x"})
    again = ResizeTask.from_dict(serde.decode("ResizeTask", later.value))
    assert again.attempt == 2 and again.notBefore > 0 and again.options == task.options
    assert again == ResizeTask(**{**task.__dict__, "attempt": 2, "notBefore": again.notBefore})


def test_a_sharpen_of_a_400_digit_number_is_refused_not_a_crash():
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, "sharpen": 10 ** 400})
    assert "between 0.1 and 10" in dict(info.value.problems)["sharpen"]
