"""Hostile sources found by probing the core as the resize job calls it (prepare + resize_image) and as the
planner does (probe_image): each ends in a clear code, quickly and in little memory, or is written right."""
import io
import resource
import struct
import time
import zlib

import pytest
from PIL import Image

from streams.config import Encoding, Limits
from streams.core.errors import ImageTooLarge, ImageUndecodable
from streams.core.imaging import OutputSpec, prepare, probe_image, resize_image

LIM, ENC = Limits(), Encoding()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(w: int, h: int, depth: int, ctype: int, idat: bytes, pre=()) -> bytes:
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
    for kind, data in pre:
        out += chunk(kind, data)
    return out + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def run(data: bytes, spec: OutputSpec):
    src = prepare(data, LIM, max_box=(spec.width, spec.height), options=spec.source_options)
    return resize_image(src, spec, LIM, ENC)


def tiff_tiled(w: int, h: int, tile_w: int, tile_h: int) -> bytes:
    """A little-endian RGB TIFF of w x h in one tile of tile_w x tile_h (its data a few zero bytes)."""
    body = zlib.compress(bytes(64))
    entries = [(256, 4, w), (257, 4, h), (259, 3, 8), (262, 3, 2), (277, 3, 3), (284, 3, 1),
               (322, 4, tile_w), (323, 4, tile_h), (324, 4, 0), (325, 4, len(body))]
    n = len(entries) + 1  # + BitsPerSample (3 shorts: its value lives after the IFD)
    data_at = 8 + 2 + n * 12 + 4
    bps = struct.pack("<3H", 8, 8, 8)
    body_at = data_at + len(bps) + 2
    entries = [(t, k, body_at if t == 324 else v) for t, k, v in entries]
    ifd = struct.pack("<H", n) + struct.pack("<HHII", 258, 3, 3, data_at)
    for tag, kind, value in sorted(entries):
        ifd += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bps + b"\0\0" + body


@pytest.mark.parametrize("name, data", [
    ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\nshowpage\n%%EOF\n"),
    ("ico", struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, 10, 22) + b"\x89PNG\r\n\x1a\n\0\0"),
    ("qoi", b"qoif" + struct.pack(">IIBB", 2000, 2000, 4, 0) + b"\x6a" * 64 + bytes(7) + b"\x01"),
    ("xpm", b'/* XPM */\nstatic char *x[] = {\n"2 1 1 1",\n"a c #ff0000",\n"aa"};\n'),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
], ids=["eps", "ico", "qoi", "xpm", "svg"])
def test_only_the_formats_we_read_are_opened(name, data, tmp_path, monkeypatch):
    """EPS would run Ghostscript, ICO decodes its embedded PNG (of any size) while opening, QOI and XPM
    decode in pure Python for minutes: none is opened at all, in the planner or the resize job."""
    gs = tmp_path / "gs"  # a Ghostscript that says it ran
    gs.write_text(f"#!/bin/sh\ntouch {tmp_path}/gs-ran\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    for call in (lambda: probe_image(data, LIM), lambda: run(data, OutputSpec("png", 10, 10))):
        with pytest.raises(ImageUndecodable, match="not an image in a format imagefork reads"):
            call()
    assert not (tmp_path / "gs-ran").exists()


def test_a_tiff_tile_bigger_than_the_pixel_limit_is_refused_from_the_header():
    data = tiff_tiled(16, 16, 16384, 32752)  # one tile of 536 million pixels for a 16x16 image
    with pytest.raises(ImageTooLarge, match="tiles of 16384x32752"):
        probe_image(data, LIM)
    with pytest.raises(ImageTooLarge, match="tiles of 16384x32752"):
        run(data, OutputSpec("png", 10, 10))


def test_a_gif_frame_that_grows_the_screen_past_the_limit_is_refused_before_it_is_decoded():
    side = 12000  # the screen is 100x100, frame 1 is 12000x12000: 144 million pixels once decoded
    b = io.BytesIO()
    Image.new("P", (side, side), 0).save(b, "GIF")
    big = b.getvalue()
    frame1 = big[big.index(b",", 19):-1]
    gce = b"!\xf9\x04\x00\x0a\x00\x00\x00"
    data = (b"GIF89a" + struct.pack("<HHBBB", 100, 100, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + gce + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00" + gce + frame1 + b";")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match="12000x12000"):
        run(data, OutputSpec("webp", 100, 100, animated=True))
    assert time.monotonic() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300 << 10  # KiB: no 576 MB canvas


@pytest.mark.parametrize("fmt, animated", [("gif", False), ("avif", False), ("webp", True)])
def test_an_output_over_the_pixel_limit_is_refused_before_it_is_made(fmt, animated):
    """A 1x1 source at 10000x10000 (each side within IMAGEFORK_MAX_DIMENSION) is 100 million pixels: 2 GB
    in a GIF encoder; 8 frames of it would be 800 million. Refused at once, not tried."""
    b = io.BytesIO()
    frames = [Image.new("P", (1, 1), i % 2) for i in range(8)]
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=50)
    with pytest.raises(ImageTooLarge, match="output would be 10000x10000"):
        run(b.getvalue(), OutputSpec(fmt, 10000, 10000, animated=animated))


def test_a_palette_transparency_longer_than_its_palette_is_undecodable_not_internal():
    data = png(4, 1, 8, 3, zlib.compress(b"\0" + bytes([0, 1, 2, 3])),
               pre=[(b"PLTE", b"\xff\x00\x00\x00\xff\x00\x00\x00\xff\xff\xff\xff"), (b"tRNS", b"\x00" * 300)])
    with pytest.raises(ImageUndecodable, match="palette index out of range"):
        run(data, OutputSpec("png", 4, 1))


def test_metadata_too_long_for_a_jpeg_segment_is_left_out_not_fatal():
    """keepMetadata all, a JPEG output, and a source whose EXIF (a 70 KB maker note) cannot fit one APP1
    segment: the JPEG is written without it (Pillow would raise "EXIF data is too long")."""
    exif = Image.Exif()
    exif[0x010F] = "Cam"
    exif.get_ifd(0x8769)[0x927C] = b"\0" * 70000
    b = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(b, "PNG", exif=exif.tobytes())
    out = run(b.getvalue(), OutputSpec("jpg", 64, 48, keepMetadata="all"))
    im = Image.open(io.BytesIO(out.data))
    assert im.format == "JPEG" and im.size == (64, 48) and not im.getexif()


@pytest.mark.parametrize("animated", [False, True])
def test_the_memory_budget_reserves_what_a_decode_holds(animated):
    """A still JPEG under `animated: true` is decoded whole (no draft), so its reservation must not assume
    the 1/8 draft (it reserved 7 MiB and held 171 MiB); an RGB image is held in 4 bytes a pixel."""
    from streams.agents.resize_job import image_bytes
    from streams.core.imaging import decode_cost, open_image
    b = io.BytesIO()
    Image.new("RGB", (2400, 1600), (9, 9, 9)).save(b, "JPEG")
    spec = OutputSpec("webp", 100, 100, animated=animated)
    source = prepare(b.getvalue(), LIM, max_box=(100, 100), options=spec.source_options)
    assert image_bytes(source) == source.image.width * source.image.height * 4
    assert decode_cost(open_image(b.getvalue(), LIM), b.getvalue(), LIM, (100, 100), spec.source_options) >= \
        image_bytes(source)


@pytest.mark.parametrize("depth, row, key", [
    (1, bytes([0b10100000]), b"\x00\x01"),  # 1-bit grey: white is transparent
    (16, struct.pack(">4H", 65535, 0, 32768, 65535), b"\xff\xff"),  # 16-bit grey: 65535 is transparent
    (2, bytes([0b11000110]), b"\x00\x03"),  # 2-bit grey 3,0,1,2: 3 is transparent (Pillow kept the key at 3)
    (4, bytes([0xF0, 0x4F]), b"\x00\x0f"),  # 4-bit grey 15,0,4,15
])
def test_a_grey_colour_key_stays_transparent(depth, row, key):
    """A 1-, 2-, 4- or 16-bit grey PNG with tRNS: the keyed pixels stay clear in a PNG output (they came out
    opaque: the conversion to 8-bit grey dropped the key, or Pillow left it off the pixels' scale)."""
    out = run(png(4, 1, depth, 0, zlib.compress(b"\0" + row), pre=[(b"tRNS", key)]), OutputSpec("png", 4, 1))
    im = Image.open(io.BytesIO(out.data)).convert("RGBA")
    alphas = [im.getpixel((x, 0))[3] for x in range(4)]
    assert alphas == {1: [0, 255, 0, 255], 16: [0, 255, 255, 0], 2: [0, 255, 255, 255], 4: [0, 255, 255, 0]}[depth], alphas


def test_a_gif_of_a_million_tiny_frames_is_refused_at_once():
    """Counting a million 1x1 frames took Pillow about 10 s, twice per task (the budget, then the decode);
    they are refused after counting one past IMAGEFORK_MAX_FRAMES."""
    from streams.core.imaging import decode_cost, open_image
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    data = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff" + frame * 1_000_000 + b";"
    spec = OutputSpec("webp", 10, 10, animated=True)
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match=f"more than {4 * LIM.max_frames} frames, more than the limit of {LIM.max_frames}"):
        decode_cost(open_image(data, LIM), data, LIM, (10, 10), spec.source_options)
    with pytest.raises(ImageTooLarge, match=f"more than {4 * LIM.max_frames} frames, more than the limit of {LIM.max_frames}"):
        run(data, spec)
    assert time.monotonic() - start < 3


def test_the_quick_gif_count_agrees_with_pillow():
    from streams.core.imaging.limits import gif_frames
    frames = [Image.new("RGB", (7, 5), (i * 20, 255 - i * 20, 0)) for i in range(12)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0, comment=b"x" * 600)
    assert gif_frames(b.getvalue(), 100) == Image.open(io.BytesIO(b.getvalue())).n_frames == 12
    assert gif_frames(b.getvalue(), 5) == 5
