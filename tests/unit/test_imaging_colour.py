"""Colour and metadata: embedded ICC profiles are converted to sRGB, outputs are tagged sRGB and carry
no EXIF, XMP, IPTC, GPS, comments or text chunks.

Pillow can create only sRGB, LAB and XYZ profiles, so the wide-gamut, grey and CMYK profiles here are
built by hand (ICC v2: matrix/TRC for RGB, a TRC for grey, a 16-bit LUT for CMYK)."""
from __future__ import annotations

import io
import struct

import pytest
from PIL import Image, ImageCms, PngImagePlugin, TiffImagePlugin

from streams.config import Encoding, Limits
from streams.core.imaging import colour
from streams.core.imaging import SRGB_ICC, OutputSpec, prepare_source, resize_image
from tests.unit.images import encode, photo

LIM, ENC = Limits(), Encoding()
FORMATS = ("png", "jpg", "webp", "gif", "tiff")
TAGGED = ("png", "jpg", "webp", "tiff")  # the formats that carry a profile
LOSSY = {"jpg": 4, "webp": 6}  # tolerance per channel; exact elsewhere (+-1 for rounding)

# --- hand-built ICC profiles -------------------------------------------------------------------------
D50 = (0.9642, 1.0, 0.8249)


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _desc(text: str) -> bytes:
    a = text.encode("ascii") + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(a)) + a + struct.pack(">IIHB", 0, 0, 0, 0) + b"\0" * 67


def _curv(gamma: float | None = None, table: list[int] | None = None) -> bytes:
    if table is None:
        return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))
    return b"curv\0\0\0\0" + struct.pack(f">I{len(table)}H", len(table), *table)


def _profile(device_class: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    start = 128 + 4 + 12 * len(tags)
    table = data = b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", start + len(data), len(body))
        data += body
    header = struct.pack(">I4sI4s4s4s", start + len(data), b"", 0x02100000, device_class, space, pcs)
    header += b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(D50[0]) + _s15(D50[1]) + _s15(D50[2])
    return header.ljust(128, b"\0") + struct.pack(">I", len(tags)) + table + data


def _mul(a, b):
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _inv(m):
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return [[(e * i - f * h) / det, (c * h - b * i) / det, (b * f - c * e) / det],
            [(f * g - d * i) / det, (a * i - c * g) / det, (c * d - a * f) / det],
            [(d * h - e * g) / det, (b * g - a * h) / det, (a * e - b * d) / det]]


def _rgb_to_xyz_d50(primaries, white=(0.3127, 0.3290)):
    """The RGB -> XYZ matrix of a colour space, adapted to D50 (Bradford) as ICC colorants are."""
    def xyz(x, y):
        return [x / y, 1.0, (1 - x - y) / y]
    m = [list(col) for col in zip(*(xyz(*p) for p in primaries))]
    w = xyz(*white)
    s = [sum(r * v for r, v in zip(row, w)) for row in _inv(m)]
    m = [[m[i][j] * s[j] for j in range(3)] for i in range(3)]
    brad = [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
    cone = [[sum(brad[i][k] * D50[k] for k in range(3)) / sum(brad[i][k] * w[k] for k in range(3))
             if i == j else 0.0 for j in range(3)] for i in range(3)]
    return _mul(_inv(brad), _mul(cone, _mul(brad, m)))


SRGB_PRIMARIES = [(0.64, 0.33), (0.30, 0.60), (0.15, 0.06)]
ADOBE_PRIMARIES = [(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)]
P3_PRIMARIES = [(0.680, 0.320), (0.265, 0.690), (0.150, 0.060)]
SRGB_CURVE = [round(65535 * (v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4))
              for v in (i / 1023 for i in range(1024))]


def rgb_profile(name: str, primaries, gamma: float | None = None) -> bytes:
    m = _rgb_to_xyz_d50(primaries)
    trc = _curv(gamma) if gamma else _curv(table=SRGB_CURVE)
    return _profile(b"mntr", b"RGB ", b"XYZ ", [
        (b"desc", _desc(name)), (b"wtpt", _xyz(*D50)),
        (b"rXYZ", _xyz(*(row[0] for row in m))), (b"gXYZ", _xyz(*(row[1] for row in m))),
        (b"bXYZ", _xyz(*(row[2] for row in m))), (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)])


ADOBE_RGB = rgb_profile("Adobe RGB (1998), rebuilt", ADOBE_PRIMARIES, gamma=563 / 256)
DISPLAY_P3 = rgb_profile("Display P3, rebuilt", P3_PRIMARIES)
SRGB_V2 = rgb_profile("sRGB IEC61966-2.1, rebuilt", SRGB_PRIMARIES)  # another sRGB than lcms's


def gray_profile(gamma: float) -> bytes:
    return _profile(b"mntr", b"GRAY", b"XYZ ", [
        (b"desc", _desc(f"Grey gamma {gamma}")), (b"wtpt", _xyz(*D50)), (b"kTRC", _curv(gamma))])


def _srgb_to_lab(rgb):
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    m = _rgb_to_xyz_d50(SRGB_PRIMARIES)
    xyz = [sum(m[i][k] * lin[k] for k in range(3)) / D50[i] for i in range(3)]
    fx, fy, fz = (t ** (1 / 3) if t > 216 / 24389 else t * 841 / 108 + 4 / 29 for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def cmyk_profile(chroma: float = 0.5, grid: int = 5) -> bytes:
    """A press-like CMYK profile: the naive formula's colours at ``chroma`` of their saturation, so a
    conversion through it gives duller colours than Pillow's naive one."""
    steps = [i / (grid - 1) for i in range(grid)]
    clut = []
    for c in steps:
        for m in steps:
            for y in steps:
                for k in steps:
                    lum, a, b = _srgb_to_lab(((1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)))
                    clut += [round(lum / 100 * 0xFF00), round((a * chroma + 128) * 256), round((b * chroma + 128) * 256)]
    lut = b"mft2\0\0\0\0" + struct.pack(">BBBB", 4, 3, grid, 0)
    lut += b"".join(_s15(1.0 if i == j else 0.0) for i in range(3) for j in range(3))
    lut += struct.pack(">HH", 2, 2) + struct.pack(">8H", *[0, 0xFFFF] * 4)
    lut += struct.pack(f">{len(clut)}H", *(min(0xFFFF, max(0, v)) for v in clut))
    lut += struct.pack(">6H", *[0, 0xFFFF] * 3)
    return _profile(b"prtr", b"CMYK", b"Lab ", [(b"desc", _desc("CMYK, rebuilt")), (b"wtpt", _xyz(*D50)), (b"A2B0", lut)])


def adobe_to_srgb(rgb):
    """Adobe RGB -> sRGB by the book (both D65: one matrix), independent of lcms; out-of-gamut clipped."""
    lin = [(c / 255) ** (563 / 256) for c in rgb]
    m = [[1.39835, -0.39835, 0.0], [0.0, 1.0, 0.0], [0.0, -0.04292, 1.04292]]
    out = [min(1.0, max(0.0, sum(m[i][k] * lin[k] for k in range(3)))) for i in range(3)]
    return tuple(round(255 * (12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055)) for v in out)


# --- helpers -------------------------------------------------------------------------------------------
def run(data, fmt, w=40, h=40, keep=True):
    out = resize_image(data, OutputSpec(fmt, w, h, keep), LIM, ENC)
    decoded = Image.open(io.BytesIO(out.data))
    decoded.load()
    return out, decoded


def two_colours(left, right, mode="RGB", size=(80, 40)) -> Image.Image:
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def close(got, want, tol):
    return all(abs(g - w) <= tol for g, w in zip(got, want))


# --- colour ------------------------------------------------------------------------------------------
RED, GREEN = (200, 60, 60), (60, 200, 60)


@pytest.mark.parametrize("fmt", FORMATS)
def test_adobe_rgb_source_comes_out_as_srgb(fmt):
    src = encode(two_colours(RED, GREEN), "PNG", icc_profile=ADOBE_RGB)
    _, decoded = run(src, fmt)
    rgb = decoded.convert("RGB")
    left, right = rgb.getpixel((5, 10)), rgb.getpixel((35, 10))
    tol = LOSSY.get(fmt, 1)
    assert close(left, adobe_to_srgb(RED), tol) and close(right, adobe_to_srgb(GREEN), tol), (left, right)
    # the expected direction: the same numbers mean more saturated colours in Adobe RGB
    assert left[0] > RED[0] + 20 and right[0] < GREEN[0] - 40 and right[2] < GREEN[2] - 15


@pytest.mark.parametrize("fmt", ("png", "jpg"))
def test_display_p3_source_comes_out_more_saturated_in_srgb(fmt):
    src = encode(two_colours(RED, (255, 0, 0)), "PNG", icc_profile=DISPLAY_P3)
    _, decoded = run(src, fmt)
    r, g, b = decoded.getpixel((5, 10))
    assert r > RED[0] + 10 and g < RED[1] - 10 and b < RED[2] - 3, (r, g, b)
    assert close(decoded.getpixel((35, 10)), (255, 0, 0), LOSSY.get(fmt, 1))  # P3 red clips to sRGB red


@pytest.mark.parametrize("fmt", TAGGED)
def test_rgb_outputs_are_tagged_srgb_and_grey_and_gif_are_not(fmt):
    for source in (encode(photo((60, 40)), "PNG"), encode(photo((60, 40)), "JPEG", icc_profile=ADOBE_RGB)):
        _, decoded = run(source, fmt)
        assert decoded.info.get("icc_profile") == SRGB_ICC
    _, grey = run(encode(photo((60, 40), "L"), "PNG", icc_profile=gray_profile(2.2)), fmt)
    if fmt == "webp":  # WebP has no grey: RGB, so tagged
        assert grey.mode == "RGB" and grey.info.get("icc_profile") == SRGB_ICC
    else:
        assert grey.mode == "L" and not grey.info.get("icc_profile")
    _, gif = run(encode(photo((60, 40)), "JPEG", icc_profile=ADOBE_RGB), "gif")
    assert not gif.info.get("icc_profile")
    assert ImageCms.ImageCmsProfile(io.BytesIO(SRGB_ICC)).profile.xcolor_space.strip() == "RGB"


def test_srgb_tagged_source_is_left_as_it_is():
    im = photo((64, 48))
    for profile in (SRGB_ICC, SRGB_V2):
        _, decoded = run(encode(im, "PNG", icc_profile=profile), "png", 64, 48)
        assert decoded.tobytes() == im.tobytes()
        assert colour._srgb_transform(profile, "RGB", "RGB") is None  # no pass over the pixels


def test_alpha_survives_the_conversion():
    im = Image.new("RGBA", (40, 40), RED + (77,))
    for fmt in ("png", "webp"):
        _, decoded = run(encode(im, "PNG", icc_profile=ADOBE_RGB), fmt)
        r, g, b, a = decoded.getpixel((20, 20))
        assert close((r, g, b), adobe_to_srgb(RED), LOSSY.get(fmt, 1)) and abs(a - 77) <= 2, (r, g, b, a)
    la = Image.new("LA", (40, 40), (128, 77))
    _, decoded = run(encode(la, "PNG", icc_profile=gray_profile(1.0)), "png")
    assert decoded.mode == "LA" and close(decoded.getpixel((20, 20)), (188, 77), 1)  # linear 0.5 -> sRGB 188


@pytest.mark.parametrize("box", [(60, 40), (600, 400)])  # a reduced (draft) decode and a full one
def test_cmyk_jpeg_converts_through_its_profile(box):
    cmyk = two_colours((0, 255, 255, 0), (0, 0, 0, 0), "CMYK", size=(1200, 800))  # red | paper white
    src = encode(cmyk, "JPEG", quality=95, icc_profile=cmyk_profile())
    assert b"Adobe" in src[:400]  # Pillow writes (and reads) CMYK JPEGs inverted, Adobe's way
    for im in (src, prepare_source(src, LIM, max_box=box)):
        out = resize_image(im, OutputSpec("png", *box), LIM, ENC)
        decoded = Image.open(io.BytesIO(out.data))
        r, g, b = decoded.getpixel((box[0] // 8, box[1] // 2))
        assert 185 < r < 220 and 80 < g < 115 and 55 < b < 90, (r, g, b)  # duller than the naive (255, 0, 0)
        assert close(decoded.getpixel((box[0] - 3, box[1] // 2)), (255, 255, 255), 2)
        assert decoded.info.get("icc_profile") == SRGB_ICC  # never the CMYK profile


def test_cmyk_without_profile_is_converted_naively_and_tagged_srgb():
    src = encode(Image.new("CMYK", (60, 40), (0, 255, 255, 0)), "JPEG", quality=95)
    for fmt in ("png", "jpg", "tiff"):
        _, decoded = run(src, fmt)
        assert close(decoded.getpixel((20, 20)), (255, 0, 0), 3)
        assert decoded.info.get("icc_profile") == SRGB_ICC


@pytest.mark.parametrize("bad", [
    b"garbage" * 30,                 # not a profile
    ADOBE_RGB[:200],                 # truncated
    ADOBE_RGB[:36] + b"xxxx" + ADOBE_RGB[40:],  # no 'acsp' signature
])
def test_broken_profile_is_taken_as_srgb(bad):
    _, decoded = run(encode(Image.new("RGB", (40, 40), RED), "PNG", icc_profile=bad), "png")
    assert decoded.getpixel((20, 20)) == RED and decoded.info.get("icc_profile") == SRGB_ICC
    _, decoded = run(encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", icc_profile=bad), "png")
    assert close(decoded.getpixel((20, 20)), (255, 0, 0), 3)
    _, decoded = run(encode(Image.new("L", (40, 40), 100), "PNG", icc_profile=bad), "jpg")
    assert abs(decoded.getpixel((20, 20)) - 100) <= 1


def test_profile_for_another_colour_space_is_ignored():
    for im, profile in ((Image.new("RGB", (40, 40), RED), cmyk_profile()), (Image.new("L", (40, 40), 100), ADOBE_RGB)):
        _, decoded = run(encode(im, "PNG", icc_profile=profile), "png")
        assert decoded.getpixel((20, 20)) == im.getpixel((0, 0))
    _, decoded = run(encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", icc_profile=ADOBE_RGB), "png")
    assert close(decoded.getpixel((20, 20)), (255, 0, 0), 3)


def test_sixteen_bit_grey_ramp_has_every_level_and_even_steps():
    ramp = Image.frombytes("I;16", (4096, 16), struct.pack("<65536H", *range(65536)))
    _, decoded = run(encode(ramp, "PNG"), "png", 4096, 16)
    hist = decoded.histogram()
    assert decoded.mode == "L" and all(hist)  # 256 levels
    assert set(hist[1:255]) <= {256, 257} and 120 < hist[0] < 140 and 120 < hist[255] < 140  # rounded, not truncated
    # through a (linear) grey profile: lcms reads all 16 bits; converting to 8 bits first leaves ~183 levels
    _, decoded = run(encode(ramp, "PNG", icc_profile=gray_profile(1.0)), "png", 4096, 16)
    assert decoded.mode == "L" and sum(1 for n in decoded.histogram() if n) >= 250
    assert abs(decoded.getpixel((0, 8)) - 188) <= 1  # 32768: linear 0.5 -> sRGB 188


def test_colour_key_transparency_becomes_alpha():
    im = two_colours((1, 2, 3), RED)
    _, decoded = run(encode(im, "PNG", transparency=(1, 2, 3)), "png")
    assert decoded.mode == "RGBA" and decoded.getpixel((5, 10))[3] == 0 and decoded.getpixel((35, 10)) == RED + (255,)


def test_transforms_are_built_once_per_profile_and_bounded():
    first = colour._srgb_transform(ADOBE_RGB, "RGB", "RGB")
    assert first is not None and colour._srgb_transform(bytes(ADOBE_RGB), "RGB", "RGB") is first
    for i in range(colour._TRANSFORMS_MAX + 5):
        colour._srgb_transform(rgb_profile(f"gamma {i}", ADOBE_PRIMARIES, gamma=1.8 + i / 64), "RGB", "RGB")
    assert len(colour._TRANSFORMS) <= colour._TRANSFORMS_MAX


# --- metadata -----------------------------------------------------------------------------------------
SECRET = b"secret"
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:rights="(c) secret"/></rdf:RDF></x:xmpmeta>')


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "secret camera"
    exif[0x8298] = "(c) secret"
    exif[0x0112] = 1
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 17.0)})
    return exif


def metadata_sources() -> dict[str, bytes]:
    im = photo((64, 48))
    png_text = PngImagePlugin.PngInfo()
    png_text.add_text("Comment", "secret")
    png_text.add_text("Author", "secret", zip=True)
    png_text.add_itxt("XML:com.adobe.xmp", XMP.decode())
    tiff_tags = TiffImagePlugin.ImageFileDirectory_v2()
    tiff_tags[270] = "secret description"
    tiff_tags[305] = "secret software"
    tiff_tags[315] = "secret artist"
    tiff_tags[33432] = "(c) secret"
    tiff_tags[700] = XMP
    tiff_tags[33723] = b"\x1c\x02\x74\x00\x06secret"  # IPTC copyright notice
    tiff_tags.tagtype[33723] = 7
    return {
        "jpeg": encode(im, "JPEG", exif=_exif(), xmp=XMP, comment=b"secret comment", icc_profile=ADOBE_RGB),
        "png": encode(im, "PNG", pnginfo=png_text, exif=_exif()),
        "webp": encode(im, "WEBP", exif=_exif(), xmp=XMP),
        "tiff": encode(im, "TIFF", tiffinfo=tiff_tags),
        "gif": encode(im.convert("P"), "GIF", comment=b"secret comment"),
    }


TIFF_STRUCTURE = {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 34675}  # size, layout, ICC


@pytest.mark.parametrize("source", ["jpeg", "png", "webp", "tiff", "gif"])
@pytest.mark.parametrize("prepared", [False, True])
def test_outputs_carry_no_metadata(source, prepared):
    data = metadata_sources()[source]
    assert SECRET in data
    src = prepare_source(data, LIM) if prepared else data
    for fmt in FORMATS:
        for box in ((64, 48), (32, 24)):  # the source's own size (no resize) and a resize
            out = resize_image(src, OutputSpec(fmt, *box), LIM, ENC)
            assert SECRET not in out.data and b"xmpmeta" not in out.data, (fmt, box)
            decoded = Image.open(io.BytesIO(out.data))
            assert not {"exif", "xmp", "comment", "Comment", "Author", "XML:com.adobe.xmp"} & set(decoded.info)
            exif = decoded.getexif()
            assert not exif.get_ifd(0x8825) and 0x8298 not in exif and 0x010F not in exif
            if fmt == "tiff":
                assert set(decoded.tag_v2) <= TIFF_STRUCTURE, set(decoded.tag_v2) - TIFF_STRUCTURE
            if fmt == "png":
                assert not decoded.text


def test_orientation_is_applied_before_the_exif_goes():
    im = two_colours((0, 0, 255), (255, 0, 0), size=(60, 30))  # blue | red
    exif = _exif()
    exif[0x0112] = 6  # rotate 90 cw to display
    _, decoded = run(encode(im, "JPEG", exif=exif, quality=95), "png", 30, 60)
    assert decoded.size == (30, 60) and decoded.getpixel((15, 5))[2] > 200  # blue on top
    assert not decoded.getexif()


def test_the_same_task_gives_the_same_bytes_in_every_process():
    """A task can run twice, in two processes (a worker killed after its upload); the second upload
    overwrites the first under the same key, so it must be the very bytes the first result recorded.
    lcms stamps the time into a profile it makes: the sRGB tag must not carry it."""
    import subprocess
    import sys
    import time
    script = ("import hashlib, sys\n"
              "from streams.config import Encoding, Limits\n"
              "from streams.core.imaging import OutputSpec, resize_image\n"
              "from streams.demo import SAMPLE\n"
              "data = SAMPLE.read_bytes()\n"
              "outs = [resize_image(data, OutputSpec(f, 40, 30), Limits(), Encoding()).data for f in ('png', 'jpg', 'webp', 'gif', 'tiff')]\n"
              "print(hashlib.sha256(b''.join(outs)).hexdigest())\n")
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    time.sleep(1.1)  # the profile's time stamp has seconds
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert first == second and len(first.strip()) == 64


def test_the_srgb_tag_is_a_valid_v4_profile_with_its_id():
    import hashlib

    from streams.core.imaging import SRGB_ICC
    probe = bytearray(SRGB_ICC)
    probe[44:48], probe[64:68], probe[84:100] = bytes(4), bytes(4), bytes(16)
    assert SRGB_ICC[84:100] == hashlib.md5(bytes(probe)).digest()
    assert SRGB_ICC[36:40] == b"acsp" and SRGB_ICC[8] == 4  # the signature and version 4
    profile = ImageCms.ImageCmsProfile(io.BytesIO(SRGB_ICC))
    assert profile.profile.xcolor_space.strip() == "RGB"
