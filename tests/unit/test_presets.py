"""Named presets without a broker: a preset's document checked as a request's, a request that names one
(alone, besides its own sizes, unknown, too many tasks), the plan (the preset's outputs, then the request's
own less those), the request as its final event carries it (read back by a retry), the regeneration of a
finished run (a new size made, the rest carried under the new references, a dropped size listed, changed
options made again), the Avro record, and the join taking a regeneration of a COMPLETED run (and no other
retry of one)."""
import json

import pytest

from streams import serde
from streams.core.errors import RequestInvalid
from streams.core.join import JoinState
from streams.core.models import PresetRef, SourceFacts, TaskOutput, TaskResult, WorkflowCompleted, WorkflowPlan
from streams.core.planning import make_plan, parse_preset, parse_request, plan_tasks, request_json, retry_split
from streams.core.presets import preset_from_record, preset_record, regeneration, same_outputs

LIMITS = {"max_dimension": 4000, "max_tasks": 50, "max_pixels": 0}
SIZES = [{"width": 300, "height": 300}, {"width": 200, "height": 200}, {"width": 100, "height": 100}]
SRC = "https://images.example.com/a.png"


def preset(version=1, sizes=SIZES, **extra):
    return parse_preset({"outputFormats": ["png", "webp"], "outputSizes": sizes, "quality": 70, **extra},
                        "gallery", version, **LIMITS)


def request(doc, presets=None):
    return parse_request({"fileLocation": SRC, **doc}, presets={"gallery": preset()} if presets is None else presets,
                         **LIMITS)


def refs(req):
    return [t.taskRef for t in plan_tasks(req, "wf", source_uri="", deadline=0)]


def test_a_preset_is_checked_as_a_request_is_and_every_problem_is_named():
    p = preset(description="shop")
    assert (p.name, p.version, p.outputFormats, p.options.quality, p.options.resizeMode) == \
        ("gallery", 1, ("png", "webp"), 70, "fit")
    with pytest.raises(RequestInvalid) as caught:
        parse_preset({"outputFormats": ["png", "bmp?"], "outputSizes": [{"width": 0, "height": 5}], "quality": 500,
                      }, "Bad Name", 0, description=7, **LIMITS)
    fields = {f for f, _ in caught.value.problems}
    assert {"name", "version", "description", "outputFormats[1]", "outputSizes[0].width", "quality"} <= fields
    with pytest.raises(RequestInvalid, match="more than the limit of 50"):
        preset(sizes=[{"width": i, "height": i} for i in range(1, 27)])  # 2 x 26 tasks


def test_a_request_names_a_preset_alone_or_besides_its_own_outputs():
    alone = request({"preset": "gallery"})
    assert alone.preset == preset() and alone.outputFormats == ()
    assert refs(alone) == ["image_convert_resize_png_300x300_0", "image_convert_resize_png_200x200_1",
                           "image_convert_resize_png_100x100_2", "image_convert_resize_webp_300x300_3",
                           "image_convert_resize_webp_200x200_4", "image_convert_resize_webp_100x100_5"]
    # its own: a jpg, and a png the preset already makes (same box, same options): made once
    both = request({"preset": "gallery", "outputFormats": ["jpg", "png"], "quality": 70,
                    "outputSizes": [{"width": 300, "height": 300}]})
    assert refs(both)[6:] == ["image_convert_resize_jpg_300x300_6"]
    # the same box with other options is another output
    assert len(refs(request({"preset": "gallery", "outputFormats": ["png"], "outputSizes": [SIZES[0]]}))) == 7
    task = plan_tasks(alone, "wf", source_uri="", deadline=0)[0]
    assert task.options.quality == 70 and task.maxWidth == 300


def test_a_request_with_a_preset_is_refused_as_planners_refuse_it():
    cases = [
        ({"preset": "nope"}, "preset", "no preset named 'nope' (known: gallery)"),
        ({"preset": {"name": "gallery", "version": 1}}, "preset", "must be the name of a preset"),
        ({"preset": 5}, "preset", "must be the name of a preset"),
        ({"preset": "gallery", "outputFormats": ["png"]}, "outputSizes", "is required"),
        ({"preset": "gallery", "outputFormats": ["png"], "outputSizes": [{"width": i, "height": i}
                                                                         for i in range(1, 46)]},
         "outputSizes", "45 tasks and the preset's 6, more than the limit of 50"),
    ]
    for doc, field, why in cases:
        with pytest.raises(RequestInvalid) as caught:
            request(doc)
        assert any(f == field and why in m for f, m in caught.value.problems), (doc, caught.value.problems)
    with pytest.raises(ValueError):  # a caller that names no presets cannot resolve one
        parse_request({"fileLocation": SRC, "preset": "gallery"}, **LIMITS)


def test_the_final_events_request_carries_the_preset_as_it_was_and_a_retry_reads_it_back():
    req = request({"preset": "gallery", "workflowId": "wf"})
    doc = json.loads(request_json(req))
    assert doc["preset"] == preset().snapshot() and "outputFormats" not in doc
    plan = make_plan(req, "wf", plan_tasks(req, "wf", source_uri="", deadline=0), submitted_at=1, deadline=2)
    assert plan.preset == PresetRef("gallery", 1)
    # a retry (of a FAILED run) reads it without the presets: the same outputs, even after the preset changed
    again = parse_request({**doc, "retry": {"runId": "r1", "taskRefs": []}}, presets={}, **LIMITS)
    assert refs(again) == refs(req) and again.preset == preset()


def completed(req, made=None, facts=None, run="r1"):
    tasks = plan_tasks(req, "wf", source_uri="", deadline=0)
    outs = tuple(TaskOutput(t.taskRef, t.format, t.width, t.height, 10, "image/png", f"s3://b/wf/{t.taskRef}", "u",
                            options=t.options)
                 for t in tasks if made is None or t.taskRef in made)
    return WorkflowCompleted("wf", None, "COMPLETED", SRC, (), outs, (), len(tasks), 1, 2, runId=run,
                             request=request_json(req), preset=req.preset.ref, facts=facts)


def test_a_regeneration_makes_the_new_size_and_carries_the_rest_under_the_new_references():
    facts = SourceFacts("ab" * 32, 10, 10, "png", 1, False, 1, "RGB")
    final = completed(request({"preset": "gallery", "workflowId": "wf"}), facts=facts)
    grown = preset(2, sizes=SIZES + [{"width": 400, "height": 400}])
    plan = regeneration(final, grown, **LIMITS)
    assert plan.make == ("image_convert_resize_png_400x400_3", "image_convert_resize_webp_400x400_7")
    assert [o.taskRef.removeprefix("image_convert_resize_") for o in plan.kept] == [
        "png_300x300_0", "png_200x200_1", "png_100x100_2", "webp_300x300_4", "webp_200x200_5", "webp_100x100_6"]
    # a kept output keeps its object: only its reference follows the new plan
    assert plan.kept[3].s3Uri == "s3://b/wf/image_convert_resize_webp_300x300_3" and plan.dropped == ()
    assert plan.request["retry"]["sourceSha256"] == "ab" * 32 and plan.request["preset"]["version"] == 2
    # what the planner makes of it: the two new tasks run, the six outputs carried
    req = parse_request(plan.request, presets={}, **LIMITS)
    run, carried = retry_split(req, plan_tasks(req, "wf", source_uri="", deadline=0))
    assert [t.taskRef for t in run] == list(plan.make) and len(carried) == 6


def test_a_regeneration_lists_a_dropped_size_remakes_changed_options_and_a_failed_output():
    req = request({"preset": "gallery", "workflowId": "wf"})
    final = completed(req, made={"image_convert_resize_png_300x300_0", "image_convert_resize_png_200x200_1",
                                 "image_convert_resize_png_100x100_2", "image_convert_resize_webp_300x300_3",
                                 "image_convert_resize_webp_200x200_4"})  # webp 100 failed
    shrunk = regeneration(final, preset(2, sizes=SIZES[:2]), **LIMITS)
    assert shrunk.make == () and shrunk.request is None  # nothing to make: no run
    assert [o.taskRef for o in shrunk.dropped] == ["image_convert_resize_png_100x100_2"]
    requality = regeneration(final, parse_preset({"outputFormats": ["png", "webp"], "outputSizes": SIZES,
                                                  "quality": 90}, "gallery", 3, **LIMITS), **LIMITS)
    assert len(requality.make) == 6 and requality.kept == () and len(requality.dropped) == 5
    same = regeneration(final, preset(4), **LIMITS)  # outputs unchanged: only the failed one is made
    assert same.make == ("image_convert_resize_webp_100x100_5",) and len(same.kept) == 5
    with pytest.raises(RequestInvalid, match="did not use preset"):
        regeneration(completed(req), parse_preset({"outputFormats": ["png"], "outputSizes": SIZES}, "other", 1,
                                                  **LIMITS), **LIMITS)


def test_the_preset_record_round_trips_and_a_new_version_needs_new_outputs():
    p = preset(3, sizes=[{"width": 10, "height": 20, "quality": 40, "resizeMode": "fill"}], description="d")
    back = preset_from_record(serde.decode("Preset", serde.encode("Preset", preset_record(p))))
    assert back == p
    assert same_outputs(p, preset(4, sizes=[{"width": 10, "height": 20, "quality": 40, "resizeMode": "fill"}],
                                  description="d"))
    assert not same_outputs(p, preset(4, sizes=[{"width": 10, "height": 20}], description="d"))


def test_the_join_takes_a_regeneration_of_a_completed_run_and_no_other_retry_of_one():
    state = JoinState(default_timeout_ms=300_000, retention_ms=86_400_000)
    req = request({"preset": "gallery", "workflowId": "wf"})
    tasks = plan_tasks(req, "wf", source_uri="", deadline=0)
    first = make_plan(req, "wf", tasks, submitted_at=1, deadline=10**13, run_id="r1")
    state.record_plan(first, 1)
    for output in completed(req).outputs:
        out = state.record_result(TaskResult("wf", output.taskRef, "SUCCEEDED", 1, 2, output=output, runId="r1"), 2)
    assert out.final is not None and out.final.preset == PresetRef("gallery", 1)
    plain = WorkflowPlan(**{**first.__dict__, "runId": "r2", "retryOf": "r1", "preset": None})
    assert state.record_plan(plain, 3).ignored == "finished"  # a plain retry of a COMPLETED run: refused
    regen = WorkflowPlan(**{**first.__dict__, "runId": "r3", "retryOf": "r1", "preset": PresetRef("gallery", 2)})
    taken = state.record_plan(regen, 4)
    assert not taken.ignored and "wf" in state.open


def test_an_output_is_never_kept_under_an_object_a_new_one_is_written_to():
    one = parse_preset({"outputFormats": ["png"], "outputSizes": [{"width": 100, "height": 100, "quality": 80}]},
                       "gallery", 1, **LIMITS)
    final = completed(parse_request({"fileLocation": SRC, "preset": "gallery", "workflowId": "wf"},
                                    presets={"gallery": one}, **LIMITS))
    two = parse_preset({"outputFormats": ["png"], "outputSizes": [{"width": 100, "height": 100, "quality": 90},
                                                                  {"width": 100, "height": 100, "quality": 80}]},
                       "gallery", 2, **LIMITS)
    plan = regeneration(final, two, **LIMITS)
    # the q80 output's object is ..._0.png, which the new q90 task (reference _0) writes: it is made again too
    assert plan.make == ("image_convert_resize_png_100x100_0", "image_convert_resize_png_100x100_1")
    assert plan.kept == () and plan.dropped == ()


def test_a_preset_that_asks_for_an_output_twice_is_refused():
    for doc, field in (({"outputFormats": ["png", "png"], "outputSizes": SIZES}, "outputFormats[1]"),
                       ({"outputFormats": ["png"], "outputSizes": SIZES + SIZES[:1]}, "outputSizes[3]")):
        with pytest.raises(RequestInvalid) as caught:
            parse_preset(doc, "gallery", 1, **LIMITS)
        assert [f for f, _ in caught.value.problems] == [field]
    parse_preset({"outputFormats": ["png"], "outputSizes": [SIZES[0], {**SIZES[0], "quality": 50}]}, "gallery", 1,
                 **LIMITS)  # the same box with other options is another output
    with pytest.raises(RequestInvalid, match="lone surrogate"):
        parse_preset({"outputFormats": ["png"], "outputSizes": SIZES, "description": "\ud800"}, "gallery", 1,
                     **LIMITS)
