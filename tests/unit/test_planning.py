import pytest
from hypothesis import given, settings, strategies as st

from streams.core.errors import RequestInvalid
from streams.core.models import Size
from streams.core.options import ImageOptions
from streams.core.planning import RUN, Dealer, parse_request, plan_tasks, retry_delay_s, spread, window

SEED = {
    "fileLocation": "https://example.com/media/FJY7ud0XEAYVCS8?format=png&name=900x900",
    "outputFormats": ["png", "jpg", "webp"],
    "outputSizes": [{"width": 300, "height": 300}, {"width": 200, "height": 200}, {"width": 1200, "height": 1200}],
}


def parse(doc, max_dimension=10000, max_tasks=1000):
    return parse_request(doc, max_dimension=max_dimension, max_tasks=max_tasks)


def test_seed_document_parses_with_defaults():
    req = parse(SEED)
    assert req.outputFormats == ("png", "jpg", "webp")
    assert req.outputSizes == (Size(300, 300), Size(200, 200), Size(1200, 1200))
    assert req.maintainAspectRatio is True and req.workflowId is None


def test_fan_out_names_count_and_inputs():
    req = parse(SEED)
    tasks = plan_tasks(req, "wf-1", source_uri="s3://b/_staging/wf-1/source", deadline=99, output_prefix="out/")
    assert len(tasks) == 9
    assert [t.taskRef for t in tasks] == [
        "image_convert_resize_png_300x300_0", "image_convert_resize_png_200x200_1",
        "image_convert_resize_png_1200x1200_2", "image_convert_resize_jpg_300x300_3",
        "image_convert_resize_jpg_200x200_4", "image_convert_resize_jpg_1200x1200_5",
        "image_convert_resize_webp_300x300_6", "image_convert_resize_webp_200x200_7",
        "image_convert_resize_webp_1200x1200_8"]
    t = tasks[5]
    assert (t.format, t.width, t.height, t.index, t.total) == ("jpg", 1200, 1200, 5, 9)
    assert t.outputKey == "out/wf-1/image_convert_resize_jpg_1200x1200_5.jpg"
    assert t.sourceUri == "s3://b/_staging/wf-1/source" and t.fileLocation == SEED["fileLocation"]
    assert len({t.outputKey for t in tasks}) == 9


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("false", False),
                                            ("TRUE", True), (" False ", False)])
def test_maintain_aspect_ratio_accepts_seed_strings(value, expected):
    assert parse({**SEED, "maintainAspectRatio": value}).maintainAspectRatio is expected


@pytest.mark.parametrize("change,field", [
    ({"fileLocation": None}, "fileLocation"),
    ({"fileLocation": "ftp://x/y.png"}, "fileLocation"),
    ({"fileLocation": "file:///etc/passwd"}, "fileLocation"),
    ({"fileLocation": "s3://bucket-only"}, "fileLocation"),
    ({"fileLocation": "http:///nohost"}, "fileLocation"),
    ({"fileLocation": "http://127.0.0.1/\x00x"}, "fileLocation"),
    ({"fileLocation": "http://example.com:99999/a.png"}, "fileLocation"),
    ({"fileLocation": "http://example.com:port/a.png"}, "fileLocation"),
    ({"outputFormats": []}, "outputFormats"),
    ({"outputFormats": "png"}, "outputFormats"),
    ({"outputFormats": ["png", "bmp"]}, "outputFormats[1]"),
    ({"outputFormats": [7]}, "outputFormats[0]"),
    ({"outputSizes": []}, "outputSizes"),
    ({"outputSizes": [{"width": 0, "height": 10}]}, "outputSizes[0].width"),
    ({"outputSizes": [{"width": 10, "height": 10001}]}, "outputSizes[0].height"),
    ({"outputSizes": [{"width": -5, "height": 10}]}, "outputSizes[0].width"),
    ({"outputSizes": [{"width": True, "height": 10}]}, "outputSizes[0].width"),
    ({"outputSizes": [{"width": 1.5, "height": 10}]}, "outputSizes[0].width"),
    ({"outputSizes": [{"height": 10}]}, "outputSizes[0].width"),
    ({"outputSizes": [[10, 10]]}, "outputSizes[0]"),
    ({"maintainAspectRatio": "yes"}, "maintainAspectRatio"),
    ({"maintainAspectRatio": 1}, "maintainAspectRatio"),
    ({"workflowId": "a/b"}, "workflowId"),
    ({"workflowId": 12}, "workflowId"),
    ({"workflowId": "ends-in-a-newline\n"}, "workflowId"),  # `$` alone matched before a final newline
    ({"outputSizes": [{"width": "²", "height": 10}]}, "outputSizes[0].width"),  # isdigit() yes, int() no
    ({"outputSizes": [{"width": "9" * 5000, "height": 10}]}, "outputSizes[0].width"),  # over int()'s digits
    ({"quality": "³"}, "quality"),
    ({"correlationId": "\ud800"}, "correlationId"),  # a lone surrogate: valid JSON, not encodable text
    ({"outputSizes": [{"width": 10, "height": 10, "gravity": "\udfff"}]}, "outputSizes[0].gravity"),
])
def test_invalid_requests_name_the_field(change, field):
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, **change})
    assert field in [f for f, _ in info.value.problems], info.value.problems


def test_not_an_object():
    for doc in ([1, 2], "x", 3, None):
        with pytest.raises(RequestInvalid):
            parse(doc)


def test_bounded_fan_out():
    doc = {**SEED, "outputSizes": [{"width": i, "height": i} for i in range(1, 401)]}
    with pytest.raises(RequestInvalid, match="1200 tasks"):
        parse(doc)
    assert len(parse(doc, max_tasks=1200).outputSizes) == 400


def test_numeric_strings_and_case_are_normalised():
    req = parse({**SEED, "outputFormats": ["PNG", " Webp "], "outputSizes": [{"width": "30", "height": 40.0}]})
    assert req.outputFormats == ("png", "webp") and req.outputSizes == (Size(30, 40),)


def test_retry_delays():
    assert retry_delay_s(1, policy="fixed", delay_s=15, max_delay_s=60) == 15
    assert [retry_delay_s(a, policy="exponential", delay_s=1, max_delay_s=5) for a in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]
    assert 2 <= retry_delay_s(2, policy="exponential", delay_s=2, max_delay_s=30, jitter=0.99) <= 4


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["fileLocation", "outputFormats", "outputSizes", "maintainAspectRatio",
                                        "workflowId", "correlationId", "extra"]), json_values))
def test_any_document_parses_or_names_its_problems(doc):
    try:
        req = parse(doc)
    except RequestInvalid as exc:
        assert exc.problems and all(isinstance(f, str) and why for f, why in exc.problems)
        return
    assert req.outputFormats and req.outputSizes
    assert all(1 <= s.width <= 10000 and 1 <= s.height <= 10000 for s in req.outputSizes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["png", "jpg", "jpeg", "webp", "gif", "tiff"]), min_size=1, max_size=5),
       st.lists(st.tuples(st.integers(1, 10000), st.integers(1, 10000)), min_size=1, max_size=8),
       st.booleans())
def test_valid_documents_fan_out_to_formats_times_sizes(formats, sizes, keep):
    doc = {"fileLocation": "s3://bucket/key.png", "outputFormats": formats,
           "outputSizes": [{"width": w, "height": h} for w, h in sizes], "maintainAspectRatio": keep}
    tasks = plan_tasks(parse(doc), "wf", source_uri="s3://bucket/key.png", deadline=1)
    assert len(tasks) == len(formats) * len(sizes)
    assert len({t.taskRef for t in tasks}) == len(tasks)
    assert [t.index for t in tasks] == list(range(len(tasks)))


def test_run_ids_and_ids_without_key_are_deterministic_per_request_message():
    from streams.agents.planner import Planner
    from streams.core.planning import run_id_of, staging_key
    run = run_id_of("imagefork.requests", "3", "1234")
    assert run == run_id_of("imagefork.requests", 3, 1234)  # a replay of the same message: the same run
    assert run != run_id_of("imagefork.requests", 3, 1235)  # a resubmission: another run
    # a request topic deleted and made again numbers its records from 0 again: the timestamp tells them apart
    stamped = run_id_of("imagefork.requests", 3, 1234, 1_765_000_000_000)
    assert stamped == run_id_of("imagefork.requests", "3", "1234", 1_765_000_000_000)
    assert stamped != run_id_of("imagefork.requests", 3, 1234, 1_765_000_000_001) and stamped != run
    assert Planner.workflow_id(None, {}, run) == (f"req-{run}", None)
    assert Planner.workflow_id(b"given", {"workflowId": "field"}, run) == ("given", None)
    assert Planner.workflow_id(None, {"workflowId": "field"}, run) == ("field", None)
    assert staging_key("_staging/", "wf", run) == f"_staging/wf/{run}/source"


# --- resize modes (issue 9) ------------------------------------------------------------------------
def test_seed_request_means_what_it_meant():
    for keep, mode in ((True, "fit"), (False, "force")):
        req = parse({**SEED, "maintainAspectRatio": keep})
        o = req.options.resolved()
        assert (o.resizeMode, o.gravity, o.enlarge, o.background, o.quality) == (mode, "center", True, None, None)
        assert req.options == ImageOptions(resizeMode=mode)  # only what was said (the mode, from the seed's flag)
        tasks = plan_tasks(req, "wf", source_uri="s3://b/s", deadline=1)
        assert {(t.options.resolved(), t.maintainAspectRatio) for t in tasks} == {(o, keep)}
        # what a resize worker older than ImageOptions reads
        assert {tuple(t.to_dict()[k] for k in ("resizeMode", "gravity", "enlarge", "background", "quality"))
                for t in tasks} == {(mode, "center", True, "", 0)}


def test_resize_mode_wins_over_maintain_aspect_ratio():
    assert parse({**SEED, "maintainAspectRatio": False, "resizeMode": "fit"}).options.resizeMode == "fit"
    assert parse({**SEED, "maintainAspectRatio": True, "resizeMode": "force"}).options.resizeMode == "force"


def test_every_option_reaches_the_tasks():
    req = parse({**SEED, "resizeMode": " FILL ", "gravity": "SouthEast", "enlarge": "false",
                 "background": "#AABBCC80", "quality": "70"})
    o = req.options
    assert (o.resizeMode, o.gravity, o.enlarge, o.background, o.quality) == ("fill", "southeast", False, "#aabbcc80", 70)
    t = plan_tasks(req, "wf", source_uri="s3://b/s", deadline=1)[0]
    assert t.options == o and t.maintainAspectRatio


def test_a_size_overrides_mode_and_gravity():
    doc = {**SEED, "outputFormats": ["png"], "resizeMode": "pad", "gravity": "north",
           "outputSizes": [{"width": 10, "height": 10},
                           {"width": 20, "height": 20, "resizeMode": "fill", "gravity": "smart"},
                           {"width": 30, "height": 30, "resizeMode": "force"},
                           {"width": 40, "height": 40, "gravity": None, "resizeMode": None}]}
    req = parse(doc)
    assert req.outputSizes[1] == Size(20, 20, ImageOptions(resizeMode="fill", gravity="smart"))
    tasks = plan_tasks(req, "wf", source_uri="s3://b/s", deadline=1)
    assert [(t.options.resizeMode, t.options.gravity, t.maintainAspectRatio) for t in tasks] == [
        ("pad", "north", True), ("fill", "smart", True), ("force", "north", False), ("pad", "north", True)]


@pytest.mark.parametrize("change, field, message", [
    ({"resizeMode": "stretch"}, "resizeMode", "'stretch' is not one of fit, fill, force, pad"),
    ({"resizeMode": 3}, "resizeMode", "3 is not one of fit, fill, force, pad"),
    ({"gravity": "up"}, "gravity", "'up' is not one of center, north, south, east, west, northeast, northwest, "
                                   "southeast, southwest, smart"),
    ({"gravity": "ce"}, "gravity", "'ce' is not one of"),
    ({"enlarge": "no"}, "enlarge", "must be true or false, got 'no'"),
    ({"background": "white"}, "background", "must be #rrggbb or #rrggbbaa, got 'white'"),
    ({"background": "#fff"}, "background", "must be #rrggbb or #rrggbbaa"),
    ({"background": 16777215}, "background", "must be #rrggbb or #rrggbbaa"),
    ({"quality": 0}, "quality", "must be between 1 and 100, got 0"),
    ({"quality": 101}, "quality", "must be between 1 and 100, got 101"),
    ({"quality": "high"}, "quality", "must be an integer"),
    ({"quality": True}, "quality", "got a boolean"),
    ({"outputSizes": [{"width": 1, "height": 1}, {"width": 1, "height": 1, "resizeMode": "crop"}]},
     "outputSizes[1].resizeMode", "'crop' is not one of fit, fill, force, pad"),
    ({"outputSizes": [{"width": 1, "height": 1, "gravity": "top"}]}, "outputSizes[0].gravity", "'top' is not one of"),
])
def test_unknown_option_values_are_rejected_with_the_field_named(change, field, message):
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, **change})
    problems = dict(info.value.problems)
    assert field in problems and message in problems[field], info.value.problems


def test_several_bad_options_are_all_named():
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, "resizeMode": "x", "gravity": "y", "quality": -1, "background": "z"})
    assert [f for f, _ in info.value.problems] == ["resizeMode", "gravity", "background", "quality"]


def test_avro_nulls_are_absent_options():
    """An Avro ImageRequest carries every optional field, null when not given."""
    req = parse({**SEED, "resizeMode": None, "gravity": None, "enlarge": None, "background": None,
                 "quality": None, "outputSizes": [{"width": 5, "height": 5, "resizeMode": None, "gravity": None}]})
    o = req.options.resolved()
    assert (o.resizeMode, o.gravity, o.enlarge, o.background, o.quality) == ("fit", "center", True, None, None)
    assert req.outputSizes == (Size(5, 5),)


# --- formats and encoder options (issue 9) -------------------------------------------------------
FORMAT_OPTIONS = ("effort", "progressive", "lossless", "animated", "keepMetadata", "keepProfile")


def test_format_options_default_to_what_was_done_before():
    req = parse(SEED)
    assert tuple(getattr(req.options.resolved(), k) for k in FORMAT_OPTIONS) == (None, None, False, False, "none", False)
    t = plan_tasks(req, "wf", source_uri="s3://b/s", deadline=1)[0]
    assert tuple(getattr(t.options.resolved(), k) for k in FORMAT_OPTIONS) == (None, None, False, False, "none", False)
    assert tuple(t.to_dict()[k] for k in FORMAT_OPTIONS) == (-1, None, False, False, "none", False)  # flat, as before


def test_format_options_reach_the_tasks_and_avif_is_a_format():
    req = parse({**SEED, "outputFormats": ["avif", "JPG"], "effort": "0", "progressive": "true",
                 "lossless": True, "animated": True, "keepMetadata": " Copyright ", "keepProfile": "true"})
    assert req.outputFormats == ("avif", "jpg")
    assert tuple(getattr(req.options, k) for k in FORMAT_OPTIONS) == (0, True, True, True, "copyright", True)
    tasks = plan_tasks(req, "wf", source_uri="s3://b/s", deadline=1)
    assert tasks[0].taskRef == "image_convert_resize_avif_300x300_0" and tasks[0].outputKey.endswith(".avif")
    assert {tuple(getattr(t.options, k) for k in FORMAT_OPTIONS) for t in tasks} == {(0, True, True, True, "copyright", True)}
    # the final event carries the request as JSON: it parses again to the same request (a retry does that)
    import json
    from streams.core.planning import request_json
    assert parse(json.loads(request_json(req))) == req


@pytest.mark.parametrize("change, field, message", [
    ({"effort": 10}, "effort", "must be between 0 and 9, got 10"),
    ({"effort": -1}, "effort", "must be between 0 and 9, got -1"),
    ({"effort": "max"}, "effort", "must be an integer"),
    ({"progressive": "yes"}, "progressive", "must be true or false, got 'yes'"),
    ({"lossless": 1}, "lossless", "must be true or false, got 1"),
    ({"animated": "always"}, "animated", "must be true or false"),
    ({"keepMetadata": "exif"}, "keepMetadata", "'exif' is not one of none, copyright, all"),
    ({"keepMetadata": True}, "keepMetadata", "True is not one of none, copyright, all"),
    ({"keepProfile": "source"}, "keepProfile", "must be true or false, got 'source'"),
    ({"outputFormats": ["png", "heic"]}, "outputFormats[1]", "'heic' is not one of"),  # HEIC is input only
])
def test_unknown_format_option_values_are_rejected_with_the_field_named(change, field, message):
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, **change})
    problems = dict(info.value.problems)
    assert field in problems and message in problems[field], info.value.problems


def test_avro_nulls_are_absent_format_options():
    req = parse({**SEED, "effort": None, "progressive": None, "lossless": None, "animated": None,
                 "keepMetadata": None, "keepProfile": None})
    assert tuple(getattr(req.options.resolved(), k) for k in FORMAT_OPTIONS) == (None, None, False, False, "none", False)


def test_a_size_may_have_its_own_quality():
    req = parse({**SEED, "outputFormats": ["jpg"], "quality": 70,
                 "outputSizes": [{"width": 100, "height": 100, "quality": "92"}, {"width": 900, "height": 900}]})
    assert req.outputSizes[0] == Size(100, 100, ImageOptions(quality=92))
    assert [t.options.quality for t in plan_tasks(req, "wf", source_uri="s3://b/s", deadline=1)] == [92, 70]
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, "outputSizes": [{"width": 1, "height": 1}, {"width": 1, "height": 1, "quality": 0}]})
    assert dict(info.value.problems)["outputSizes[1].quality"] == "must be between 1 and 100, got 0"


def test_the_example_request_is_the_seeds_and_plans_nine_tasks():
    import json
    from pathlib import Path

    from streams.core.planning import parse_request, plan_tasks
    doc = json.loads((Path(__file__).resolve().parents[2] / "examples" / "request.json").read_text())
    request = parse_request(doc, max_dimension=10000, max_tasks=1000)
    tasks = plan_tasks(request, "wf", source_uri="s3://b/k", deadline=1, output_prefix="")
    assert [(t.format, t.width, t.height) for t in tasks] == [
        (f, s, s) for f in ("png", "jpg", "webp") for s in (300, 200, 1200)]


def test_an_exact_box_over_the_pixel_limit_is_refused_before_the_source_is_read():
    """9000x9000 with maintainAspectRatio false is certain to be 81 MP whatever the source: refused with the
    field and the limit. A fit box of the same size depends on the source's shape: left to its header."""
    import pytest

    from streams.core.errors import RequestInvalid
    from streams.core.planning import parse_request
    doc = {"fileLocation": "http://h/x.png", "outputFormats": ["png"], "maintainAspectRatio": False,
           "outputSizes": [{"width": 300, "height": 300}, {"width": 9000, "height": 9000}]}
    with pytest.raises(RequestInvalid) as info:
        parse_request(doc, max_dimension=10000, max_tasks=1000, max_pixels=60_000_000)
    assert [f for f, _ in info.value.problems] == ["outputSizes[1]"]
    assert "81.0 megapixels" in info.value.message and "7745x7745" in info.value.message
    fit = {**doc, "maintainAspectRatio": True}
    assert parse_request(fit, max_dimension=10000, max_tasks=1000, max_pixels=60_000_000).outputSizes[1].width == 9000
    # pad is the box whatever enlarge says; force and fill without enlarging depend on the source
    pad = {**fit, "resizeMode": "pad", "enlarge": False}
    with pytest.raises(RequestInvalid):
        parse_request(pad, max_dimension=10000, max_tasks=1000, max_pixels=60_000_000)
    shrink_only = {**doc, "enlarge": False}
    assert parse_request(shrink_only, max_dimension=10000, max_tasks=1000, max_pixels=60_000_000)
    per_size = {**fit, "outputSizes": [{"width": 9000, "height": 9000, "resizeMode": "fill"}]}
    with pytest.raises(RequestInvalid):
        parse_request(per_size, max_dimension=10000, max_tasks=1000, max_pixels=60_000_000)


def test_certain_output_pixels_takes_either_orientation_and_the_mode():
    """The planner refuses an output only when it is over the limit whichever way EXIF turns the source."""
    from streams.core.imaging import OutputSpec, certain_output_pixels
    assert certain_output_pixels(2000, 1000, OutputSpec("png", 9000, 9000)) == 9000 * 4500  # fit: 40.5 MP
    # 6000x3000 as the header says, 1500x3000 if EXIF turns it: only the fewer is certain
    assert certain_output_pixels(2000, 1000, OutputSpec("png", 9000, 3000)) == 1500 * 3000
    assert certain_output_pixels(2000, 1000, OutputSpec("png", 800, 800, resizeMode="fill")) == 800 * 800
    assert certain_output_pixels(2000, 1000, OutputSpec("png", 9000, 9000, enlarge=False)) == 2000 * 1000


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40), st.integers(1, 64), st.integers(0, 1 << 20))
def test_a_stream_of_requests_is_dealt_evenly_over_the_partitions(counts, partitions, seed):
    # requests, not tasks, are what is dealt: for each window width, how many requests reached a partition
    # differs by one at most from one partition to another, whatever came between them, and a request's
    # tasks differ by one at most over its window (equal requests: equal load, the test below)
    dealer, reached = Dealer(seed), {}
    for count in counts:
        spots = dealer.deal(count, partitions)
        assert len(spots) == count and all(0 <= p < partitions for p in spots)
        if not count:
            continue
        used = set(spots)
        assert len(used) == window(count, partitions) == min(partitions, -(-count // RUN))  # RUN or more each
        assert max(spots.count(p) for p in used) - min(spots.count(p) for p in used) <= 1
        for p in used:
            reached.setdefault(len(used), [0] * partitions)[p] += 1
    for load in reached.values():
        assert max(load) - min(load) <= 1


def test_equal_requests_load_every_partition_alike():
    load, dealer = [0] * 8, Dealer(3)
    for _ in range(8 * 9):
        for p in dealer.deal(9, 8):
            load[p] += 1
    assert max(load) == min(load)


@pytest.mark.parametrize("seed", [0, 1, 5, 12345])
def test_windows_stay_aligned_so_a_request_stays_inside_one_range_assigned_worker(seed):
    # the range assignor gives 4 workers of 8 partitions {0, 1}, {2, 3}, {4, 5}, {6, 7}: a seed request (9
    # tasks, 2 partitions) reaches one worker, and decodes once, whatever the planner's seed and whatever
    # widths came before it
    dealer = Dealer(seed)
    for count in (9, 3, 9, 1000, 9, 12, 9, 9, 2, 9):
        spots = dealer.deal(count, 8)
        if window(count, 8) == 2:
            assert len({p // 2 for p in spots}) == 1, spots
    firsts = [min(dealer.deal(9, 8)) for _ in range(4)]
    assert sorted(firsts) == [0, 2, 4, 6]  # and still every worker in turn


def test_a_request_without_tasks_moves_no_cursor():
    # every output carried over from an earlier run, or each one certainly too large: nothing is dealt
    dealer = Dealer(0)
    firsts = []
    for _ in range(4):
        firsts.append(dealer.deal(1, 2))
        assert dealer.deal(0, 2) == []
    assert firsts == [[0], [1], [0], [1]]


def test_a_request_s_tasks_are_dealt_over_the_fewest_partitions_and_unknown_partitions_leave_it_to_the_keys():
    assert spread(9, 8, 6) == [6, 7, 6, 7, 6, 7, 6, 7, 6]  # the largest two on two partitions, not one
    assert spread(9, 8, 14) == [7, 6, 7, 6, 7, 6, 7, 6, 7]  # round again: the other one takes five
    assert spread(1000, 8, 0) == [i % 8 for i in range(1000)]
    assert spread(4, 8, 2) == [2, 2, 2, 2]
    assert spread(3, 0, 5) == [None, None, None]
