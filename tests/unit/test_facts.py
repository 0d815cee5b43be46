"""Source facts (streams/core/imaging/facts.py) on real images: a photo with an EXIF orientation, a
transparent PNG, an animated GIF, a CMYK JPEG with its profile; the placeholder's colour against the
source's (CIEDE2000), the perceptual hash against near and far images; and how one task of a run is asked
for them."""
import hashlib
import io

import blurhash
import pytest
from PIL import Image, ImageDraw

from streams.config import Limits
from streams.core.errors import RequestInvalid
from streams.core.imaging import prepare
from streams.core.imaging.facts import pixel_facts, placeholder_data_url, source_info
from streams.core.imaging.limits import open_image
from streams.core.planning import parse_request, plan_tasks, with_facts
from tests.unit.images import encode, jpeg_with_orientation, photo
from tests.unit.test_imaging_colour import ADOBE_RGB, cmyk_profile
from tests.unit.test_imaging_delta_e import delta_e_2000, srgb_to_lab

LIM = Limits()


def info_of(data: bytes):
    return source_info(open_image(data, LIM), data, LIM)


def facts_of(data: bytes) -> dict:
    source = prepare(data, LIM)
    return {**source.info.__dict__, **pixel_facts(source.frames[0])}


def test_a_photo_turned_by_its_exif_orientation():
    data = jpeg_with_orientation(6, size=(60, 30))  # stored 60x30, shown 30x60
    facts = facts_of(data)
    assert (facts["width"], facts["height"], facts["orientation"], facts["format"]) == (30, 60, 6, "jpeg")
    assert facts["sha256"] == hashlib.sha256(data).hexdigest() and not facts["alpha"] and facts["frames"] == 1
    assert facts["colorSpace"] == "RGB" and facts["profile"] is None


def test_a_transparent_png():
    im = Image.new("RGBA", (80, 40), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((10, 5, 70, 35), fill=(200, 30, 30, 255))
    facts = facts_of(encode(im, "PNG"))
    assert (facts["alpha"], facts["colorSpace"], facts["width"], facts["height"]) == (True, "RGBA", 80, 40)
    # composited on white: the palette has the white around and the red inside
    assert set(facts["palette"][:2]) >= {"#ffffff"} and any(int(c[1:3], 16) > 150 > int(c[3:5], 16)
                                                            for c in facts["palette"])


def test_an_animated_gif_counts_its_frames():
    frames = [Image.new("RGB", (20, 20), (i * 40, 0, 0)) for i in range(6)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50)
    facts = facts_of(out.getvalue())
    assert (facts["frames"], facts["format"], facts["colorSpace"]) == (6, "gif", "P")


def test_a_gif_of_more_frames_than_the_limit_is_counted_not_refused():
    frames = [Image.new("L", (2, 2), i % 256) for i in range(30)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    assert info_of(out.getvalue()).frames == 30  # the limit applies to a kept animation only
    tight = Limits(max_frames=5)
    assert source_info(open_image(out.getvalue(), tight), out.getvalue(), tight).frames == 21  # 4 x 5 + 1


def test_a_cmyk_jpeg_says_its_space_and_profile():
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))
    facts = facts_of(encode(cmyk, "JPEG", icc_profile=cmyk_profile()))
    assert facts["colorSpace"] == "CMYK" and facts["profile"]
    adobe = facts_of(encode(photo((40, 30)), "JPEG", icc_profile=ADOBE_RGB))
    assert adobe["profile"] == "Adobe RGB (1998), rebuilt"


@pytest.mark.parametrize("colour", [(200, 40, 40), (30, 120, 220), (240, 230, 200), (20, 20, 20)])
def test_the_placeholder_has_the_sources_colour(colour):
    """The BlurHash decodes to an image whose mean colour is within CIEDE2000 5 of the source's."""
    im = photo((120, 80))
    tinted = Image.blend(im, Image.new("RGB", im.size, colour), 0.8)
    facts = facts_of(encode(tinted, "PNG"))
    decoded = Image.new("RGB", (32, 21))
    decoded.putdata([tuple(max(0, min(255, round(c))) for c in px[:3])
                     for row in blurhash.decode(facts["blurhash"], 32, 21) for px in row])
    mean = [sum(c) / (decoded.width * decoded.height) for c in zip(*decoded.getdata())]
    source = [sum(c) / (tinted.width * tinted.height) for c in zip(*tinted.getdata())]
    assert delta_e_2000(srgb_to_lab(mean), srgb_to_lab(source)) < 5
    assert facts["dominantColor"] == facts["palette"][0]
    url = placeholder_data_url(facts["blurhash"], 120, 80)
    assert url.startswith("data:image/png;base64,")


def test_the_perceptual_hash_finds_near_duplicates():
    """The sample photo, and the same at half the size as a low-quality JPEG: a few bits apart; turned
    upside down: far."""
    import imagehash

    from streams.demo import SAMPLE
    im = Image.open(SAMPLE).convert("RGB")
    near = facts_of(encode(im.resize((im.width // 2, im.height // 2)), "JPEG", quality=60))["phash"]
    same = facts_of(encode(im, "PNG"))["phash"]
    other = facts_of(encode(im.transpose(Image.Transpose.ROTATE_180), "PNG"))["phash"]
    distance = imagehash.hex_to_hash(same) - imagehash.hex_to_hash(near)
    assert len(same) == 16 and distance <= 6 < imagehash.hex_to_hash(same) - imagehash.hex_to_hash(other)


def test_costly_facts_are_left_out_when_not_asked():
    source = prepare(encode(photo((50, 50)), "PNG"), LIM)
    assert pixel_facts(source.frames[0], ()) == {"dominantColor": None, "palette": [], "blurhash": None,
                                                 "phash": None}
    only = pixel_facts(source.frames[0], ("phash",))
    assert only["phash"] and only["blurhash"] is None and only["palette"] == []


def test_a_drafted_jpeg_still_says_its_whole_size():
    data = encode(photo((1600, 1200)), "JPEG")
    source = prepare(data, LIM, max_box=(100, 100))
    assert source.frames[0].width < 1600 and (source.info.width, source.info.height) == (1600, 1200)


# --- one task of a run is asked --------------------------------------------------------------------------
SEED = {"fileLocation": "http://x/y.png", "outputFormats": ["png", "jpg"],
        "outputSizes": [{"width": 30, "height": 20}, {"width": 10, "height": 10}]}


def parse(doc):
    return parse_request(doc, max_dimension=100, max_tasks=10)


def test_the_first_task_that_runs_reports_the_facts():
    request = parse(SEED)
    tasks = plan_tasks(request, "wf", source_uri="s3://b/s", deadline=1)
    marked = with_facts(tasks, request)
    assert [t.facts for t in marked] == [("basic", "colors", "placeholder", "phash"), (), (), ()]
    assert [t.facts for t in with_facts(tasks[2:], request)][0] == ("basic", "colors", "placeholder", "phash")
    cheap = parse({**SEED, "facts": ["PHASH", "phash"]})
    assert cheap.facts == ("phash",) and with_facts(tasks, cheap)[0].facts == ("basic", "phash")
    assert with_facts(tasks, parse({**SEED, "facts": []}))[0].facts == ("basic",)
    assert with_facts([], request) == []


@pytest.mark.parametrize("value", ["phash", ["colours"], [1]])
def test_unknown_facts_are_refused(value):
    with pytest.raises(RequestInvalid) as info:
        parse({**SEED, "facts": value})
    assert "facts" in dict(info.value.problems)


def test_a_png_says_its_orientation_without_being_decoded():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(photo((40, 20)), "PNG", exif=exif.tobytes())
    header = open_image(data, LIM)
    info = source_info(header, data, LIM)
    assert (info.orientation, info.width, info.height) == (8, 20, 40)
    assert getattr(header, "_im", None) is None  # nothing was decoded for it


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "WEBP", "PNG"])
def test_the_size_is_the_decoded_one_whatever_the_format(fmt):
    """Pillow's TIFF header is turned already by its orientation, a JPEG's is not: the facts say what the
    decode makes either way."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo((64, 48)), fmt, exif=exif.tobytes())
    facts = facts_of(data)
    assert (facts["width"], facts["height"]) == prepare(data, LIM).frames[0].size == (48, 64)
