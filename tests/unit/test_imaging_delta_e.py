"""Colour against a reference colour engine: libvips (``pyvips`` + ``pyvips-binary``, test-only) converts
the same source through its embedded profile to sRGB; our output's patch must be within CIEDE2000 2 of
libvips's, for a wide-gamut RGB source (Adobe RGB) and a CMYK JPEG (Adobe's inverted polarity) with a
press-like profile. The profiles are the ones built by hand in ``test_imaging_colour.py`` (ICC v2, made
for these tests, no licence attached to them: they are this project's own)."""
from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from streams.config import Encoding, Limits
from streams.core.imaging import OutputSpec, resize_image
from tests.unit.images import encode
from tests.unit.test_imaging_colour import ADOBE_RGB, DISPLAY_P3, cmyk_profile, two_colours

pyvips = pytest.importorskip("pyvips", reason="pyvips (the test extra) is the reference colour engine")
LIM, ENC = Limits(), Encoding()


def srgb_to_lab(rgb) -> tuple[float, float, float]:
    """8-bit sRGB -> CIELAB (D65), by the book."""
    lin = [(c / 255 / 12.92) if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    m = [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    x, y, z = (sum(m[i][k] * lin[k] for k in range(3)) for i in range(3))
    white = (0.95047, 1.0, 1.08883)

    def f(t):
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    fx, fy, fz = (f(v / w) for v, w in zip((x, y, z), white))
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def delta_e_2000(lab1, lab2) -> float:
    """CIEDE2000 (Sharma, Wu, Dalal 2005)."""
    (l1, a1, b1), (l2, a2, b2) = lab1, lab2
    c1, c2 = math.hypot(a1, b1), math.hypot(a2, b2)
    cm = (c1 + c2) / 2
    g = 0.5 * (1 - math.sqrt(cm ** 7 / (cm ** 7 + 25 ** 7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)
    h1p = math.degrees(math.atan2(b1, a1p)) % 360 if c1p else 0.0
    h2p = math.degrees(math.atan2(b2, a2p)) % 360 if c2p else 0.0
    dlp, dcp = l2 - l1, c2p - c1p
    if c1p * c2p == 0:
        dhp = 0.0
    elif abs(h2p - h1p) <= 180:
        dhp = h2p - h1p
    else:
        dhp = h2p - h1p - 360 if h2p > h1p else h2p - h1p + 360
    dhp_big = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dhp / 2))
    lpm, cpm = (l1 + l2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        hpm = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        hpm = (h1p + h2p) / 2
    else:
        hpm = (h1p + h2p + 360) / 2 if h1p + h2p < 360 else (h1p + h2p - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(hpm - 30)) + 0.24 * math.cos(math.radians(2 * hpm))
         + 0.32 * math.cos(math.radians(3 * hpm + 6)) - 0.20 * math.cos(math.radians(4 * hpm - 63)))
    sl = 1 + 0.015 * (lpm - 50) ** 2 / math.sqrt(20 + (lpm - 50) ** 2)
    sc, sh = 1 + 0.045 * cpm, 1 + 0.015 * cpm * t
    rt = (-2 * math.sqrt(cpm ** 7 / (cpm ** 7 + 25 ** 7))
          * math.sin(math.radians(60 * math.exp(-(((hpm - 275) / 25) ** 2)))))
    return math.sqrt((dlp / sl) ** 2 + (dcp / sc) ** 2 + (dhp_big / sh) ** 2 + rt * (dcp / sc) * (dhp_big / sh))


def test_the_delta_e_formula_on_sharmas_published_pairs():
    # pairs 1, 7, 17, 18 and 34 of Sharma et al.'s test data, with their published CIEDE2000
    assert delta_e_2000((50, 2.6772, -79.7751), (50, 0, -82.7485)) == pytest.approx(2.0425, abs=1e-4)
    assert delta_e_2000((50, 0, 0), (50, -1, 2)) == pytest.approx(2.3669, abs=1e-4)
    assert delta_e_2000((50, 2.5, 0), (73, 25, -18)) == pytest.approx(27.1492, abs=1e-4)
    assert delta_e_2000((50, 2.5, 0), (61, -5, 29)) == pytest.approx(22.8977, abs=1e-4)
    assert delta_e_2000((2.0776, 0.0795, -1.135), (0.9033, -0.0636, -0.5514)) == pytest.approx(0.9082, abs=1e-4)


def vips_srgb(data: bytes, x: int, y: int) -> tuple[int, ...]:
    """libvips: decode, convert through the embedded profile to sRGB (relative colorimetric), one pixel."""
    im = pyvips.Image.new_from_buffer(data, "")
    out = im.icc_transform("srgb", embedded=True, intent="relative")
    return tuple(round(v) for v in out.getpoint(x, y)[:3])


def ours(data: bytes, fmt: str, box: tuple[int, int], x: int, y: int) -> tuple[int, ...]:
    out = resize_image(data, OutputSpec(fmt, *box, True), LIM, ENC)
    with Image.open(io.BytesIO(out.data)) as decoded:
        return decoded.convert("RGB").getpixel((x, y))


PATCHES = [(200, 60, 60), (60, 200, 60), (40, 80, 220), (230, 200, 40), (128, 128, 128), (20, 20, 20)]


@pytest.mark.parametrize("fmt", ["png", "tiff", "webp"])
@pytest.mark.parametrize("profile", [ADOBE_RGB, DISPLAY_P3], ids=["adobe-rgb", "display-p3"])
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: "-".join(map(str, p)))
def test_wide_gamut_patches_are_within_delta_e_2_of_libvips(patch, profile, fmt):
    src = encode(two_colours(patch, patch, size=(80, 80)), "PNG", icc_profile=profile)
    reference = vips_srgb(src, 40, 40)
    got = ours(src, fmt, (40, 40), 20, 20)
    de = delta_e_2000(srgb_to_lab(got), srgb_to_lab(reference))
    assert de <= 2.0, (patch, got, reference, de)


@pytest.mark.parametrize("ink", [(0, 255, 255, 0), (255, 0, 255, 0), (255, 255, 0, 0), (40, 40, 40, 60),
                                 (0, 0, 0, 0), (0, 0, 0, 255)], ids=lambda c: "-".join(map(str, c)))
def test_cmyk_patches_are_within_delta_e_2_of_libvips(ink):
    src = encode(Image.new("CMYK", (80, 80), ink), "JPEG", quality=98, icc_profile=cmyk_profile())
    reference = vips_srgb(src, 40, 40)
    got = ours(src, "png", (40, 40), 20, 20)
    de = delta_e_2000(srgb_to_lab(got), srgb_to_lab(reference))
    assert de <= 2.0, (ink, got, reference, de)


@pytest.mark.parametrize("profile", [ADOBE_RGB, DISPLAY_P3], ids=["adobe-rgb", "display-p3"])
def test_the_check_can_fail_a_conversion_left_out(profile):
    """A saturated red taken as sRGB numbers (what a pipeline that ignores the profile writes) is more than
    delta E 3 from the reference (Adobe RGB 6.4, Display P3 3.2): the check above has teeth."""
    patch = PATCHES[0]
    src = encode(two_colours(patch, patch, size=(80, 80)), "PNG", icc_profile=profile)
    assert delta_e_2000(srgb_to_lab(patch), srgb_to_lab(vips_srgb(src, 40, 40))) > 3.0
