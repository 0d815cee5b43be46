"""The whole pipeline against the real broker and the real S3 server."""
import hashlib
import io
import json
import time

import pytest
from PIL import Image

from streams.demo import SAMPLE, seed_request
from tests.integration.pipeline import wait_until

pytestmark = pytest.mark.integration


def run(pipeline, requests: dict[str, dict], timeout=120, **submit):
    follower = pipeline.follower()
    try:
        for wf, req in requests.items():
            pipeline.submit(req, wf, **submit)
        return follower.wait(list(requests), timeout)
    finally:
        follower.close()


def test_a_normal_start_logs_no_error_and_no_terminal_codes(pipeline):
    """First in the module: the logs hold the start only (the workers run at info, see FAST)."""
    for worker in pipeline.workers:
        text = worker.log_path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if " ERROR " in line or "[ERROR]" in line]
        assert "\x1b[" not in text and not errors, f"{worker.name}:\n{errors or text[-2000:]}"
    planner = next(w for w in pipeline.workers if w.role == "planner").log_path.read_text()
    assert f"partitions assigned: {pipeline.config.topics.requests} {pipeline.config.partitions} + " in planner


def test_seed_request_gives_nine_objects_and_one_final_event(pipeline, files):
    finals = run(pipeline, {"seed-1": seed_request(files.url("sample.png"))})
    final = finals["seed-1"]
    assert final.status == "COMPLETED", final.errors
    assert len(final.outputs) == 9 and len(final.fileLocations) == 9
    sizes = {(o.format, o.width, o.height) for o in final.outputs}
    assert sizes == {(f, s, s) for f in ("png", "jpg", "webp") for s in (300, 200, 1200)}  # 1200: enlarged
    assert [o.taskRef for o in final.outputs][:3] == [
        "image_convert_resize_png_300x300_0", "image_convert_resize_png_200x200_1",
        "image_convert_resize_png_1200x1200_2"]
    assert final.fileLocations == tuple(o.url for o in final.outputs)
    assert all(url.startswith(pipeline.config.s3_endpoint_url) for url in final.fileLocations)
    pipeline.check_outputs(final)
    assert len(pipeline.output_keys("seed-1")) == 9
    assert len(pipeline.finals_for(["seed-1"])) == 1
    # what the source is, from one task's decode (issue 25): its bytes' hash, its size, a placeholder
    facts = final.facts
    assert facts is not None and facts.sha256 == hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert (facts.width, facts.height, facts.format, facts.orientation, facts.frames) == (900, 900, "png", 1, 1)
    assert facts.blurhash and len(facts.phash) == 16 and facts.dominantColor == facts.palette[0]
    assert final.tasks[0].taskRef == "image_convert_resize_png_300x300_0" and len(final.tasks) == 9


def test_a_request_may_leave_out_the_costly_facts(pipeline, files):
    request = {**seed_request(files.url("sample.png")), "outputFormats": ["png"],
               "outputSizes": [{"width": 32, "height": 32}, {"width": 16, "height": 16}], "facts": []}
    final = run(pipeline, {"facts-1": request})["facts-1"]
    assert final.status == "COMPLETED", final.errors
    assert final.facts.sha256 and (final.facts.width, final.facts.colorSpace) == (900, "RGB")
    assert (final.facts.blurhash, final.facts.phash, final.facts.dominantColor) == (None, None, None)


def test_every_resize_mode_and_format_through_the_stack(pipeline, files):
    """issue 9: one request asking for fit, fill (smart), force and pad (north) per output size, in every
    format, with enlarge false: every output decodes at its exact size, and its record says what was
    applied."""
    box = {"width": 300, "height": 150}
    sizes = [{**box, "resizeMode": "fit"}, {**box, "resizeMode": "fill", "gravity": "smart"},
             {**box, "resizeMode": "force"}, {**box, "resizeMode": "pad", "gravity": "north"},
             {"width": 2000, "height": 1000}]  # fit (the request's), never enlarged: the source's 900x900
    formats = ["png", "jpg", "webp", "gif", "tiff"]
    request = {"fileLocation": files.url("sample.png"), "outputFormats": formats, "outputSizes": sizes,
               "resizeMode": "fit", "enlarge": False}
    final = run(pipeline, {"modes-1": request})["modes-1"]
    assert final.status == "COMPLETED", final.errors
    assert len(final.outputs) == len(formats) * len(sizes)
    pipeline.check_outputs(final)
    expected = [("fit", "", (150, 150)), ("fill", "smart", (300, 150)), ("force", "", (300, 150)),
                ("pad", "north", (300, 150)), ("fit", "", (900, 900))]
    for i, out in enumerate(final.outputs):
        mode, gravity, size = expected[i % len(sizes)]
        assert (out.format, out.options.resizeMode, out.options.gravity or "", (out.width, out.height),
                out.options.enlarge) == \
            (formats[i // len(sizes)], mode, gravity, size, False), out
    # pad: the image (150x150) sits at the top centre; the sides are the background
    pads = {o.format: o for o in final.outputs if o.options.resizeMode == "pad"}
    png = Image.open(io.BytesIO(pipeline.object(pads["png"].s3Uri.split("/", 3)[3]))).convert("RGBA")
    assert png.getpixel((10, 75))[3] == 0 and png.getpixel((150, 75))[3] == 255  # transparent sides
    jpg = Image.open(io.BytesIO(pipeline.object(pads["jpg"].s3Uri.split("/", 3)[3]))).convert("RGB")
    assert min(jpg.getpixel((10, 75))) >= 245  # white sides for a format without alpha


def test_three_requests_together_do_not_mix(pipeline, files):
    reqs = {
        "mix-a": {**seed_request(files.url("sample.png")), "outputFormats": ["png"]},
        "mix-b": {"fileLocation": files.url("alpha.png"), "outputFormats": ["jpg", "webp"],
                  "outputSizes": [{"width": 64, "height": 64}], "maintainAspectRatio": "false"},
        "mix-c": {"fileLocation": files.url("sample.png"), "outputFormats": ["webp"],
                  "outputSizes": [{"width": 10, "height": 20}, {"width": 90, "height": 30}],
                  "maintainAspectRatio": True},
    }
    finals = run(pipeline, reqs)
    assert [finals[w].status for w in reqs] == ["COMPLETED"] * 3
    assert len(finals["mix-a"].outputs) == 3 and len(finals["mix-b"].outputs) == 2
    assert {(o.width, o.height) for o in finals["mix-b"].outputs} == {(64, 64)}
    assert [(o.width, o.height) for o in finals["mix-c"].outputs] == [(10, 10), (30, 30)]
    for wf, final in finals.items():
        assert all(f"/{wf}/" in url for url in final.fileLocations)
        pipeline.check_outputs(final)
    assert len(pipeline.finals_for(list(reqs))) == 3


def test_missing_source_fails_instead_of_hanging(pipeline, files):
    finals = run(pipeline, {"missing-1": seed_request(files.url("no-such-file.png"))}, timeout=60)
    final = finals["missing-1"]
    assert final.status == "FAILED" and final.outputs == ()
    assert final.errors[0].code == "SOURCE_NOT_FOUND" and "404" in final.errors[0].message
    assert [e.attempts for e in final.errors] == [1], final.errors  # permanent: failed at once, no retry


@pytest.mark.parametrize("name,code", [("not-an-image.png", "IMAGE_UNDECODABLE"),
                                       ("truncated.png", "IMAGE_UNDECODABLE"),
                                       ("bomb.png", "IMAGE_TOO_LARGE")])
def test_hostile_sources_fail_with_a_clear_error(pipeline, files, name, code):
    wf = f"hostile-{name.split('.')[0]}"
    final = run(pipeline, {wf: seed_request(files.url(name))}, timeout=60)[wf]
    assert final.status == "FAILED"
    assert {e.code for e in final.errors} == {code}, final.errors
    assert {e.attempts for e in final.errors} == {1}, final.errors  # permanent: failed at once, no retry


def test_invalid_request_is_rejected_with_the_field(pipeline, files):
    req = {**seed_request(files.url("sample.png")), "outputSizes": [{"width": 0, "height": 10}]}
    huge = {**seed_request(files.url("sample.png")), "outputSizes": [{"width": 9000, "height": 9000}],
            "maintainAspectRatio": False}  # certain to be 81 MP: refused before the source is read
    finals = run(pipeline, {"rejected-1": req, "rejected-huge": huge}, timeout=60)
    final = finals["rejected-1"]
    assert final.status == "REJECTED" and "outputSizes[0].width" in final.errors[0].message
    assert pipeline.output_keys("rejected-1") == []
    final = finals["rejected-huge"]
    assert final.status == "REJECTED" and "outputSizes[0]: 9000x9000 is 81.0 megapixels" in final.errors[0].message


def test_metadata_address_is_refused(pipeline):
    req = seed_request("http://169.254.169.254/latest/meta-data/iam")
    final = run(pipeline, {"ssrf-1": req}, timeout=60)["ssrf-1"]
    assert final.status == "FAILED" and final.errors[0].code == "SOURCE_FORBIDDEN"
    assert {e.attempts for e in final.errors} == {1}, final.errors  # permanent: failed at once, no retry


def test_avro_request_and_s3_source(pipeline, files):
    source = f"inputs/{pipeline.config.output_prefix}sample.png"  # IMAGEFORK_SOURCE_S3_ALLOW has inputs/
    pipeline.store.put(source, (files.folder / "sample.png").read_bytes(), "image/png")
    req = {"fileLocation": f"s3://{pipeline.config.bucket}/{source}", "outputFormats": ["jpeg"],
           "outputSizes": [{"width": 120, "height": 60}], "maintainAspectRatio": False,
           "correlationId": "corr-7"}
    final = run(pipeline, {"avro-1": req}, avro=True)["avro-1"]
    assert final.status == "COMPLETED" and final.correlationId == "corr-7"
    assert (final.outputs[0].width, final.outputs[0].height, final.outputs[0].format) == (120, 60, "jpeg")
    pipeline.check_outputs(final)


def test_malformed_messages_go_to_the_dead_letter_topic_and_nothing_stops(pipeline, files):
    from confluent_kafka import Consumer
    from streams.adapters.kafka import client_config
    bad = [b"\x00\x01garbage", b"{not json", json.dumps([1, 2, 3]).encode(), b"\xc3\x01" + b"\x07" * 20]
    for value in bad:
        pipeline.client.producer.produce(pipeline.config.topics.requests, key=b"bad", value=value)
    pipeline.client.producer.flush(10)
    final = run(pipeline, {"after-bad": {**seed_request(files.url("sample.png")), "outputFormats": ["jpg"]}})
    assert final["after-bad"].status == "COMPLETED"
    consumer = Consumer(client_config(pipeline.config, **{"group.id": "dlq-check", "auto.offset.reset": "earliest"}))
    seen = []
    try:
        consumer.subscribe([pipeline.config.topics.dead_letter])
        end = time.monotonic() + 20
        while len(seen) < len(bad) and time.monotonic() < end:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                seen.append(msg)
    finally:
        consumer.close()
    assert sorted(m.value() for m in seen) == sorted(bad)
    for m in seen:
        headers = dict(m.headers())
        assert headers["imagefork.error.code"] == b"NOT_A_REQUEST"
        assert headers["imagefork.error.reason"] and headers["imagefork.source.offset"]


def test_same_workflow_twice_gives_one_final_event(pipeline, files):
    req = {**seed_request(files.url("sample.png")), "outputFormats": ["webp"]}
    follower = pipeline.follower()
    try:
        pipeline.submit(req, "twice-1")
        pipeline.submit(req, "twice-1")
        final = follower.wait(["twice-1"], 120)["twice-1"]
        # the second copy's submitter is told that the id is taken (running, or finished by then)
        assert wait_until(lambda: follower.pump(0.2) or "twice-1" in follower.notices, 30)
    finally:
        follower.close()
    assert final.status == "COMPLETED"
    assert follower.notices["twice-1"]["reason"] in ("running", "finished")
    # the second copy runs through: both plans and the 3 results of each run, all handled by the join
    pipeline.wait_join_handled("twice-1", plans=2, results=6)
    assert len(pipeline.finals_for(["twice-1"])) == 1
    assert len(pipeline.output_keys("twice-1")) == 3
    # each run staged its own copy of the source (its run id in the key); the join removes both once
    # what ended each run is committed
    assert wait_until(lambda: pipeline.staged_keys("twice-1") == [], 30), pipeline.staged_keys("twice-1")


def test_formats_animation_and_encoder_options_through_the_stack(pipeline, files):
    """issue 9, formats: AVIF out, HEIC in, an animated GIF kept animated, and effort, progressive, lossless,
    keepMetadata and keepProfile, in one go through the real stack; every output decoded and checked."""
    from PIL import ExifTags
    import pillow_heif
    from tests.unit.test_imaging_colour import ADOBE_RGB
    from tests.unit.test_imaging_formats import animation, frames_of

    exif = Image.Exif()
    exif[ExifTags.Base.Copyright], exif[ExifTags.Base.Make] = "(c) Jane Doe", "PhoneCo"
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 0.0)
    Image.open(files.folder / "sample.png").convert("RGB").save(files.folder / "tagged.jpg", "JPEG", quality=92,
                                                                 exif=exif.tobytes(), icc_profile=ADOBE_RGB)
    (files.folder / "anim.gif").write_bytes(animation())
    pillow_heif.from_pillow(Image.open(files.folder / "sample.png").convert("RGB")).save(files.folder / "sample.heic")
    sizes = [{"width": 300, "height": 200, "resizeMode": "fill", "quality": 90}, {"width": 200, "height": 200}]
    requests = {
        "opts-1": {"fileLocation": files.url("tagged.jpg"), "outputFormats": ["avif", "jpg", "webp", "png"],
                   "outputSizes": sizes, "effort": 4, "progressive": True, "lossless": True,
                   "keepMetadata": "copyright", "keepProfile": True},
        "anim-1": {"fileLocation": files.url("anim.gif"), "outputFormats": ["gif", "webp", "avif", "png"],
                   "outputSizes": [{"width": 40, "height": 40}], "animated": True},
        "heic-1": {"fileLocation": files.url("sample.heic"), "outputFormats": ["avif", "jpg"],
                   "outputSizes": [{"width": 120, "height": 120}]},
    }
    finals = run(pipeline, requests, timeout=180)
    for wf in requests:
        assert finals[wf].status == "COMPLETED", (wf, finals[wf].errors)
        pipeline.check_outputs(finals[wf])

    def image(out):
        im = Image.open(io.BytesIO(pipeline.object(out.s3Uri.split("/", 3)[3])))
        im.load()
        return im

    opts = finals["opts-1"].outputs
    assert [(o.format, o.width, o.height) for o in opts] == \
        [(f, *wh) for f in ("avif", "jpg", "webp", "png") for wh in ((300, 200), (200, 200))]
    for out in opts:
        im = image(out)
        assert out.options.effort == 4 and out.options.keepMetadata == "copyright" and out.options.keepProfile, out
        assert im.info["icc_profile"] == ADOBE_RGB  # the source's profile, not sRGB
        kept = im.getexif()
        assert kept.get(ExifTags.Base.Copyright) == "(c) Jane Doe" and ExifTags.Base.Make not in kept
        assert ExifTags.IFD.GPSInfo not in kept  # GPS gone
        assert out.options.progressive == (out.format == "jpg") and out.options.lossless == (out.format == "webp")
        assert (im.info.get("progressive") == 1) == (out.format == "jpg")
    enc = pipeline.config.encoding  # the first size asks for quality 90, the second takes the configured one
    assert [o.options.quality or 0 for o in opts] == [90, enc.avif_quality, 90, enc.jpeg_quality, 0, 0, 0, 0]

    anim = {o.format: o for o in finals["anim-1"].outputs}
    for fmt in ("gif", "webp", "avif"):
        assert anim[fmt].frames == 4 and (anim[fmt].width, anim[fmt].height) == (40, 30)
        assert frames_of(pipeline.object(anim[fmt].s3Uri.split("/", 3)[3])) == (4, [100, 200, 300, 400])
    assert anim["png"].frames == 1 and image(anim["png"]).size == (40, 30)

    heic = finals["heic-1"].outputs
    assert [(o.format, o.width, o.height, o.options.keepMetadata) for o in heic] == \
        [("avif", 120, 120, "none"), ("jpg", 120, 120, "none")]
    assert all(image(o).info.get("icc_profile") != ADOBE_RGB for o in heic)
