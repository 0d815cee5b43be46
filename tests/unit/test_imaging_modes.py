"""Resize modes (fit, fill, force, pad), gravities, enlarge, background and quality: exact sizes,
crop windows and pixels, on small images made here."""
import io
import random

import pytest
from PIL import Image

from streams.config import Encoding, Limits
from streams.core.errors import UnsupportedFormat
from streams.core.imaging import GRAVITIES, Layout, OutputSpec, layout, parse_colour, resize_image

LIM, ENC = Limits(), Encoding()
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def quadrants(size=(400, 200)) -> Image.Image:
    """Top left red, top right green, bottom left blue, bottom right yellow."""
    w, h = size
    im = Image.new("RGB", size)
    for x, y, colour in ((0, 0, RED), (w // 2, 0, GREEN), (0, h // 2, BLUE), (w // 2, h // 2, YELLOW)):
        im.paste(colour, (x, y, x + w // 2, y + h // 2))
    return im


def png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def run(src: Image.Image, fmt="png", w=100, h=100, **options) -> tuple[Image.Image, object]:
    out = resize_image(png(src), OutputSpec(fmt, w, h, **options), LIM, ENC)
    im = Image.open(io.BytesIO(out.data))
    im.load()
    assert (im.width, im.height) == (out.width, out.height)
    return im, out


def near(pixel, colour, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


# --- geometry, pure -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    # fit: inside the box (enlarging by default, as maintainAspectRatio: true always did)
    (OutputSpec("png", 100, 100, resizeMode="fit"), Layout((100, 50), (0, 0, 100, 50), (100, 50))),
    (OutputSpec("png", 1000, 1000, resizeMode="fit"), Layout((1000, 500), (0, 0, 1000, 500), (1000, 500))),
    (OutputSpec("png", 1000, 1000, resizeMode="fit", enlarge=False), Layout((400, 200), (0, 0, 400, 200), (400, 200))),
    (OutputSpec("png", 100, 100, True), Layout((100, 50), (0, 0, 100, 50), (100, 50))),  # no mode: fit
    # force: exactly the box; without enlarge scaled down together until no axis is enlarged
    (OutputSpec("png", 100, 100, resizeMode="force"), Layout((100, 100), (0, 0, 100, 100), (100, 100))),
    (OutputSpec("png", 100, 100, False), Layout((100, 100), (0, 0, 100, 100), (100, 100))),  # no mode: force
    (OutputSpec("png", 1000, 1000, resizeMode="force", enlarge=False), Layout((200, 200), (0, 0, 200, 200), (200, 200))),
    (OutputSpec("png", 800, 100, resizeMode="force", enlarge=False), Layout((400, 50), (0, 0, 400, 50), (400, 50))),
    (OutputSpec("png", 300, 100, resizeMode="force", enlarge=False), Layout((300, 100), (0, 0, 300, 100), (300, 100))),
    # fill: cover, then crop the box at the gravity; without enlarge the crop is at most the source
    (OutputSpec("png", 100, 100, resizeMode="fill"), Layout((200, 100), (50, 0, 100, 100), (100, 100))),
    (OutputSpec("png", 400, 100, resizeMode="fill"), Layout((400, 200), (0, 50, 400, 100), (400, 100))),
    (OutputSpec("png", 800, 800, resizeMode="fill"), Layout((1600, 800), (400, 0, 800, 800), (800, 800))),
    (OutputSpec("png", 800, 800, resizeMode="fill", enlarge=False), Layout((400, 200), (0, 0, 400, 200), (400, 200))),
    (OutputSpec("png", 300, 300, resizeMode="fill", enlarge=False), Layout((400, 200), (50, 0, 300, 200), (300, 200))),
    # pad: fit, then on a canvas of the box, centred
    (OutputSpec("png", 100, 100, resizeMode="pad"), Layout((100, 50), (0, 0, 100, 50), (100, 100), (0, 25))),
    (OutputSpec("png", 800, 800, resizeMode="pad", enlarge=False), Layout((400, 200), (0, 0, 400, 200), (800, 800), (200, 300))),
    (OutputSpec("png", 200, 100, resizeMode="pad"), Layout((200, 100), (0, 0, 200, 100), (200, 100), (0, 0))),
])
def test_layout_of_each_mode(spec, expected):
    assert layout(400, 200, spec) == expected


@pytest.mark.parametrize("gravity, crop", [
    ("center", (50, 0)), ("north", (50, 0)), ("south", (50, 0)), ("west", (0, 0)), ("east", (100, 0)),
    ("northwest", (0, 0)), ("northeast", (100, 0)), ("southwest", (0, 0)), ("southeast", (100, 0)),
])
def test_fill_crop_window_per_gravity_wide_source(gravity, crop):
    assert layout(400, 200, OutputSpec("png", 100, 100, resizeMode="fill", gravity=gravity)).crop == (*crop, 100, 100)


@pytest.mark.parametrize("gravity, crop", [
    ("center", (0, 50)), ("north", (0, 0)), ("south", (0, 100)), ("west", (0, 50)), ("east", (0, 50)),
    ("northwest", (0, 0)), ("northeast", (0, 0)), ("southwest", (0, 100)), ("southeast", (0, 100)),
])
def test_fill_crop_window_per_gravity_tall_source(gravity, crop):
    assert layout(200, 400, OutputSpec("png", 100, 100, resizeMode="fill", gravity=gravity)).crop == (*crop, 100, 100)


@pytest.mark.parametrize("gravity, offset", [
    ("center", (0, 25)), ("north", (0, 0)), ("south", (0, 50)), ("west", (0, 25)), ("east", (0, 25)),
    ("northwest", (0, 0)), ("southeast", (0, 50)), ("smart", (0, 25)),
])
def test_pad_offset_per_gravity(gravity, offset):
    assert layout(400, 200, OutputSpec("png", 100, 100, resizeMode="pad", gravity=gravity)).offset == offset


def test_rounding_never_gives_an_empty_side():
    assert layout(10000, 1, OutputSpec("png", 100, 100, resizeMode="fit")).canvas == (100, 1)
    assert layout(1, 10000, OutputSpec("png", 100, 100, resizeMode="pad")).canvas == (100, 100)


def test_fill_of_a_sliver_resamples_only_the_window():
    """Covering 100x100 with a 10000x1 source means a 1000000x100 scaled image: never allocated."""
    assert layout(10000, 1, OutputSpec("png", 100, 100, resizeMode="fill")) == \
        Layout((1000000, 100), (499950, 0, 100, 100), (100, 100))
    im, _ = run(Image.new("RGB", (10000, 1), BLUE), w=100, h=100, resizeMode="fill")
    assert im.size == (100, 100) and near(im.getpixel((50, 50)), BLUE)


# --- pixels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gravity, left, right", [
    ("west", (RED, BLUE), (RED, BLUE)),          # the left half: red over blue
    ("east", (GREEN, YELLOW), (GREEN, YELLOW)),  # the right half
    ("center", (RED, BLUE), (GREEN, YELLOW)),    # the middle: all four
])
def test_fill_shows_the_gravity_side(gravity, left, right):
    im, out = run(quadrants(), w=100, h=100, resizeMode="fill", gravity=gravity)
    assert im.size == (100, 100) and out.applied.resizeMode == "fill" and out.applied.gravity == gravity
    assert near(im.getpixel((10, 10)), left[0]) and near(im.getpixel((10, 90)), left[1])
    assert near(im.getpixel((90, 10)), right[0]) and near(im.getpixel((90, 90)), right[1])


def test_fill_on_a_tall_box_north_and_south():
    im, _ = run(quadrants(), w=100, h=200, resizeMode="fill", gravity="north")  # cover: 400x200 stays, crop 100x200
    assert im.size == (100, 200)
    assert near(im.getpixel((50, 10)), RED) or near(im.getpixel((50, 10)), GREEN)
    tall = quadrants((200, 400))
    im, _ = run(tall, w=100, h=100, resizeMode="fill", gravity="north")
    assert near(im.getpixel((10, 10)), RED) and near(im.getpixel((90, 90)), GREEN)
    im, _ = run(tall, w=100, h=100, resizeMode="fill", gravity="south")
    assert near(im.getpixel((10, 10)), BLUE) and near(im.getpixel((90, 90)), YELLOW)


def test_fill_smart_finds_the_detail():
    """A flat grey source with noise in its right quarter: smart moves the window there; center does not."""
    random.seed(7)
    src = Image.new("L", (400, 100), 128)
    src.paste(Image.frombytes("L", (100, 100), bytes(random.randrange(256) for _ in range(100 * 100))), (300, 0))
    assert layout(400, 100, OutputSpec("png", 100, 100, resizeMode="fill", gravity="smart"), src).crop == (300, 0, 100, 100)
    assert layout(400, 100, OutputSpec("png", 100, 100, resizeMode="fill", gravity="smart"), src.transpose(
        Image.Transpose.FLIP_LEFT_RIGHT)).crop == (0, 0, 100, 100)
    im, out = run(src.convert("RGB"), w=100, h=100, resizeMode="fill", gravity="smart")
    assert out.applied.gravity == "smart" and len(set(im.convert("L").getdata())) > 100  # the noise, not flat grey


def test_smart_on_a_uniform_source_is_the_centre():
    assert layout(400, 200, OutputSpec("png", 100, 100, resizeMode="fill", gravity="smart"), quadrants()).crop == \
        (50, 0, 100, 100)


def test_force_stretches():
    im, out = run(quadrants(), w=100, h=100, resizeMode="force")
    assert im.size == (100, 100) and out.applied.resizeMode == "force" and out.applied.gravity is None
    assert near(im.getpixel((10, 10)), RED) and near(im.getpixel((90, 90)), YELLOW)


def test_pad_png_is_transparent_around_and_jpeg_white():
    im, out = run(quadrants(), "png", 100, 100, resizeMode="pad")
    assert im.size == (100, 100) and im.mode == "RGBA" and out.applied.background == "#ffffff00"
    assert im.getpixel((50, 5))[3] == 0 and im.getpixel((50, 95))[3] == 0
    assert near(im.getpixel((10, 40)), (*RED, 255)) and near(im.getpixel((90, 60)), (*YELLOW, 255))
    im, out = run(quadrants(), "jpg", 100, 100, resizeMode="pad")
    assert im.mode == "RGB" and out.applied.background == "#ffffffff"
    assert near(im.getpixel((50, 5)), (255, 255, 255)) and near(im.getpixel((10, 40)), RED)


def test_pad_background_and_gravity():
    im, out = run(quadrants(), "png", 100, 100, resizeMode="pad", background="#102030", gravity="north")
    assert im.mode == "RGB" and out.applied.background == "#102030ff" and out.applied.gravity == "north"
    assert im.getpixel((50, 95)) == (16, 32, 48) and near(im.getpixel((10, 5)), RED)
    im, out = run(quadrants(), "webp", 100, 100, resizeMode="pad", background="#00000080")
    assert im.mode == "RGBA" and out.applied.background == "#00000080" and abs(im.getpixel((50, 5))[3] - 128) <= 2


def test_pad_keeps_a_grey_source_grey():
    im, _ = run(Image.new("L", (40, 20), 30), "png", 50, 50, resizeMode="pad", background="#808080")
    assert im.mode == "L" and im.size == (50, 50) and im.getpixel((25, 2)) == 128


@pytest.mark.parametrize("mode, size", [("fit", (400, 200)), ("fill", (400, 200)), ("force", (200, 200)),
                                        ("pad", (1000, 1000))])
def test_enlarge_false_never_scales_up(mode, size):
    im, out = run(quadrants(), w=1000, h=1000, resizeMode=mode, enlarge=False)
    assert im.size == size and out.applied.enlarge is False


def test_enlarge_by_default_as_today():
    im, _ = run(quadrants(), w=1000, h=1000, resizeMode="fit")
    assert im.size == (1000, 500)


def test_quality_for_jpeg_and_webp_only():
    photo = Image.effect_noise((200, 200), 60).convert("RGB")
    _, low = run(photo, "jpg", 200, 200, quality=10)
    _, high = run(photo, "jpg", 200, 200, quality=95)
    _, default = run(photo, "jpg", 200, 200)
    assert (low.applied.quality, high.applied.quality, default.applied.quality) == (10, 95, ENC.jpeg_quality)
    assert len(low.data) < len(default.data) < len(high.data)
    _, webp = run(photo, "webp", 200, 200, quality=30)
    _, png_out = run(photo, "png", 200, 200, quality=30)
    assert webp.applied.quality == 30 and png_out.applied.quality is None


def test_every_gravity_and_mode_gives_the_box_or_less():
    for mode in ("fit", "fill", "force", "pad"):
        for gravity in GRAVITIES:
            im, out = run(quadrants((60, 30)), w=40, h=40, resizeMode=mode, gravity=gravity)
            assert im.width <= 40 and im.height <= 40 and out.applied.resizeMode == mode
            assert (im.size == (40, 40)) == (mode != "fit")


def test_unknown_mode_or_gravity_in_a_task_fails_the_task():
    with pytest.raises(UnsupportedFormat):
        resize_image(png(quadrants()), OutputSpec("png", 10, 10, resizeMode="stretch"), LIM, ENC)
    with pytest.raises(UnsupportedFormat):
        resize_image(png(quadrants()), OutputSpec("png", 10, 10, resizeMode="fill", gravity="up"), LIM, ENC)


@pytest.mark.parametrize("text, rgba", [("#ff0000", (255, 0, 0, 255)), ("#00FF0080", (0, 255, 0, 128))])
def test_parse_colour(text, rgba):
    assert parse_colour(text) == rgba


@pytest.mark.parametrize("text", ["ff0000", "#fff", "#ff00001", "#gg0000", "", "red"])
def test_parse_colour_refuses(text):
    with pytest.raises(ValueError):
        parse_colour(text)


def test_the_resize_job_applies_a_task_and_reports_it(monkeypatch):
    """Task (as the planner writes it) -> OutputSpec -> the output record of the final event."""
    from streams.agents import resize_job
    from streams.config import Config
    from streams.core.models import ResizeTask, TaskOutput
    from streams.core.options import ImageOptions

    class Store:
        def __init__(self):
            self.objects = {}

        def get(self, uri, cap):
            return png(quadrants())

        def put(self, key, data, content_type, metadata):
            self.objects[key] = data

        def uri(self, key):
            return "s3://b/" + key

        def url(self, key):
            return "http://x/" + key

    resize_job.init(Config())
    monkeypatch.setattr(resize_job, "_store", Store())
    task = ResizeTask("w", "r0", 0, 1, "s3://b/modes-src", "http://x/y", "png", 100, 100, True, "w/r0.png", 99,
                      maxWidth=100, maxHeight=100,
                      options=ImageOptions(resizeMode="pad", gravity="south", enlarge=False, background="#ff0000"))
    result = resize_job.run(task.to_dict())
    assert result["ok"], result
    output = TaskOutput.from_dict(result["output"])
    assert (output.width, output.height, output.options.resizeMode, output.options.gravity, output.options.enlarge,
            output.options.background, output.options.quality) == (100, 100, "pad", "south", False, "#ff0000ff", None)
    im = Image.open(io.BytesIO(resize_job._store.objects["w/r0.png"]))
    assert im.getpixel((50, 5)) == (255, 0, 0) and near(im.getpixel((10, 95)), BLUE)  # at the bottom
    # a task written before modes (no such keys) resizes as maintainAspectRatio says
    old = {k: v for k, v in task.to_dict().items() if k not in ("options", "resizeMode", "gravity", "enlarge",
                                                                 "background", "quality")}
    output = TaskOutput.from_dict(resize_job.run({**old, "maintainAspectRatio": False})["output"])
    assert (output.width, output.height, output.options.resizeMode, output.options.gravity) == \
        (100, 100, "force", None)
