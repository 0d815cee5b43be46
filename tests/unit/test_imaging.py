import io

import pytest
from PIL import Image

from streams.config import Encoding, Limits
from streams.core.errors import ImageTooLarge, ImageUndecodable, UnsupportedFormat
from streams.core.formats import FORMATS
from streams.core.imaging import OutputSpec, probe_image, resize_image, target_size
from tests.unit.images import encode, jpeg_with_orientation, photo, png_declaring

LIM, ENC = Limits(), Encoding()
MAGIC = {
    "png": b"\x89PNG\r\n\x1a\n",
    "jpg": b"\xff\xd8\xff",
    "jpeg": b"\xff\xd8\xff",
    "gif": b"GIF8",
    "tiff": (b"II*\x00", b"MM\x00*"),
}


def run(data, fmt, w, h, keep=True):
    out = resize_image(data, OutputSpec(fmt, w, h, keep), LIM, ENC)
    decoded = Image.open(io.BytesIO(out.data))
    decoded.load()
    return out, decoded


@pytest.mark.parametrize("fmt", ["png", "jpg", "jpeg", "webp", "gif", "tiff"])
@pytest.mark.parametrize("box,keep,expected", [
    ((300, 300), True, (300, 200)),     # fit inside, 3:2 source
    ((200, 200), True, (200, 133)),
    ((1200, 1200), True, (1200, 800)),  # enlarges, as the seed's 1200x1200 asks
    ((300, 300), False, (300, 300)),    # exact
    ((50, 400), False, (50, 400)),
])
def test_formats_and_sizes(fmt, box, keep, expected):
    src = encode(photo((900, 600)), "PNG")
    out, decoded = run(src, fmt, *box, keep=keep)
    if fmt == "webp":
        assert out.data[:4] == b"RIFF" and out.data[8:12] == b"WEBP"
    else:
        magic = MAGIC[fmt]
        assert out.data.startswith(magic if isinstance(magic, bytes) else magic[0]) or \
            out.data.startswith(magic[1] if isinstance(magic, tuple) else magic)
    assert decoded.size == expected == (out.width, out.height)
    assert decoded.format == {"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper())
    assert out.content_type == {"jpg": "image/jpeg", "jpeg": "image/jpeg"}.get(fmt, f"image/{fmt}")


def test_target_size_rounding_never_zero():
    assert target_size(10000, 1, OutputSpec("png", 100, 100)) == (100, 1)
    assert target_size(1, 10000, OutputSpec("png", 100, 100)) == (1, 100)


@pytest.mark.parametrize("orientation,expected_size", [(1, (60, 30)), (3, (60, 30)), (6, (30, 60)), (8, (30, 60))])
def test_exif_orientation_applied(orientation, expected_size):
    src = jpeg_with_orientation(orientation)
    out, decoded = run(src, "png", 600, 600)
    w, h = expected_size
    scale = min(600 / w, 600 / h)
    assert decoded.size == (round(w * scale), round(h * scale))
    rgb = decoded.convert("RGB")
    if orientation == 1:
        assert rgb.getpixel((5, decoded.height // 2))[2] > 200  # blue stays left
    if orientation == 3:
        assert rgb.getpixel((decoded.width - 5, decoded.height // 2))[2] > 200  # rotated 180: blue right
    if orientation == 6:
        assert rgb.getpixel((decoded.width // 2, 5))[2] > 200  # rotated 90 cw: blue on top
    if orientation == 8:
        assert rgb.getpixel((decoded.width // 2, decoded.height - 5))[2] > 200


def test_alpha_to_jpeg_is_flattened_on_white():
    im = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 50, 100))
    out, decoded = run(encode(im, "PNG"), "jpg", 100, 100)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((90, 50))[0] > 240 and decoded.getpixel((90, 50))[1] > 240  # transparent -> white
    r, g, b = decoded.getpixel((10, 50))
    assert r > 200 and g < 60 and b < 60


def test_alpha_kept_in_png_and_webp():
    im = Image.new("RGBA", (80, 80), (0, 255, 0, 128))
    for fmt in ("png", "webp"):
        _, decoded = run(encode(im, "PNG"), fmt, 40, 40)
        assert decoded.mode == "RGBA"
        assert 100 < decoded.getpixel((20, 20))[3] < 160


def test_cmyk_source():
    cmyk = Image.new("CMYK", (120, 80), (0, 255, 255, 0))  # pure red in CMYK
    for fmt in ("png", "jpg", "webp"):
        _, decoded = run(encode(cmyk, "JPEG"), fmt, 60, 60)
        r, g, b = decoded.convert("RGB").getpixel((30, 20))
        assert r > 200 and g < 70 and b < 70, (fmt, (r, g, b))


def test_16_bit_grey_is_scaled_not_clipped():
    row = (32768).to_bytes(2, "little") * 32 + (65535).to_bytes(2, "little") * 32  # half | full
    im = Image.frombytes("I;16", (64, 64), row * 64)
    assert im.getpixel((8, 32)) == 32768
    _, decoded = run(encode(im, "PNG"), "png", 64, 64)
    assert decoded.mode in ("L", "RGB")
    left, right = decoded.convert("L").getpixel((8, 32)), decoded.convert("L").getpixel((56, 32))
    assert 110 < left < 145 and right > 245


def test_palette_source_with_transparency():
    im = Image.new("P", (50, 50), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (25, 0, 50, 50))
    data = encode(im, "PNG", transparency=0)
    _, decoded = run(data, "png", 50, 50)
    assert decoded.mode == "RGBA" and decoded.getpixel((5, 5))[3] == 0
    _, as_jpeg = run(data, "jpg", 50, 50)
    assert as_jpeg.getpixel((5, 25))[0] > 240  # transparent red -> white, not red
    r, g, b = as_jpeg.getpixel((45, 25))
    assert b > 200 and r < 60


def test_palette_gif_source_to_webp():
    data = encode(photo((64, 64)).convert("P"), "GIF")
    out, decoded = run(data, "webp", 32, 32)
    assert decoded.size == (32, 32) and decoded.mode == "RGB"


def test_decompression_bomb_refused_from_header():
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="30000x30000"):
        resize_image(bomb, OutputSpec("png", 10, 10), LIM, ENC)
    with pytest.raises(ImageTooLarge):
        probe_image(bomb, LIM)


def test_truncated_file_is_a_clear_error():
    data = encode(photo((400, 400)), "PNG")
    with pytest.raises(ImageUndecodable, match="truncated|damaged"):
        resize_image(data[: len(data) // 2], OutputSpec("png", 10, 10), LIM, ENC)
    jpeg = encode(photo((400, 400)), "JPEG")
    with pytest.raises(ImageUndecodable):
        resize_image(jpeg[: len(jpeg) // 3], OutputSpec("png", 10, 10), LIM, ENC)


def test_not_an_image():
    with pytest.raises(ImageUndecodable):
        resize_image(b"<html>not found</html>", OutputSpec("png", 10, 10), LIM, ENC)
    with pytest.raises(ImageUndecodable):
        resize_image(b"", OutputSpec("png", 10, 10), LIM, ENC)


def test_unsupported_output():
    with pytest.raises(UnsupportedFormat):
        resize_image(encode(photo((10, 10)), "PNG"), OutputSpec("bmp", 10, 10), LIM, ENC)


def test_source_byte_limit():
    data = encode(photo((200, 200)), "PNG")
    with pytest.raises(ImageTooLarge, match="bytes"):
        resize_image(data, OutputSpec("png", 10, 10), Limits(max_source_bytes=100), ENC)


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    _, decoded = run(out.getvalue(), "png", 20, 20)
    assert decoded.convert("RGB").getpixel((10, 10))[0] > 200


def test_jpeg_draft_decodes_smaller_but_outputs_keep_their_size():
    from streams.core.imaging import prepare_source
    data = encode(photo((3200, 2400)), "JPEG", quality=90)
    full = prepare_source(data, LIM)
    small = prepare_source(data, LIM, max_box=(300, 300))
    assert full.size == (3200, 2400) and small.size[0] < 3200 and min(small.size) >= 300
    for im in (full, small):
        out = resize_image(im, OutputSpec("png", 300, 300, True), LIM, ENC)
        assert (out.width, out.height) == (300, 225)
    stretched = prepare_source(data, LIM, max_box=(50, 1000))
    assert stretched.height >= 1000  # an exact 50x1000 output still has the rows it needs
    oriented = prepare_source(jpeg_with_orientation(6, size=(1600, 800)), LIM, max_box=(400, 400))
    assert min(oriented.size) >= 400


def test_one_shared_image_encoded_from_many_threads_at_once():
    """A cached source that needs no resize is the very image every thread's output encodes. Image.save
    keeps its settings on the object it saves while it runs, so two threads saving one image mixed them
    (a TIFF save given JPEG's quality failed; seen in CI). Each encode works on its own object now."""
    import threading
    from streams.core import imaging
    shared = Image.new("RGB", (300, 300), (10, 200, 30))
    errors: list[str] = []

    def save(fmt: str) -> None:
        settings = imaging.encoder_settings(fmt, OutputSpec(fmt, 300, 300), Encoding())
        for _ in range(25):
            try:
                data = imaging.encode(shared, fmt, Encoding(), settings)
                assert Image.open(io.BytesIO(data)).format == FORMATS[fmt].pil
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(f"{fmt}: {exc!r}")

    threads = [threading.Thread(target=save, args=(fmt,)) for fmt in ("jpg", "tiff", "webp", "png", "tiff")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not getattr(shared, "encoderinfo", None)  # nothing left on the shared image


def test_settings_left_on_an_image_do_not_reach_another_format():
    """What a racing save leaves on an image (Pillow merges an image's encoderinfo into every save of it)
    reaches no output: a TIFF is written with its own settings only."""
    from streams.core import imaging
    im = Image.new("RGB", (40, 30), (1, 2, 3))
    im.encoderinfo = {"quality": 85, "optimize": False}
    data = imaging.encode(im, "tiff", Encoding(), imaging.encoder_settings("tiff", OutputSpec("tiff", 40, 30), Encoding()))
    out = Image.open(io.BytesIO(data))
    assert out.format == "TIFF" and out.size == (40, 30)


def test_a_big_output_is_written_in_few_blocks(monkeypatch):
    """Each block a Pillow writer hands back takes the GIL again, and beside a thread running Python each of
    them may wait a switch interval for it (a 1200 px PNG went 139 -> 426 ms in 64 KiB blocks). A 1200 px
    PNG of noise (about 4 MiB) is written in two blocks, not the 66 of Pillow's default."""
    import os
    from streams.core import imaging
    calls = []

    class Counting:
        def __init__(self, encoder):
            self._encoder = encoder

        def encode(self, bufsize):
            calls.append(bufsize)
            return self._encoder.encode(bufsize)

        def __getattr__(self, name):
            return getattr(self._encoder, name)

    real = Image._getencoder
    monkeypatch.setattr(Image, "_getencoder", lambda *a, **k: Counting(real(*a, **k)))
    noise = Image.frombytes("RGB", (1200, 1200), os.urandom(1200 * 1200 * 3))
    settings = imaging.encoder_settings("png", OutputSpec("png", 1200, 1200), Encoding())
    data = imaging.encode(noise, "png", Encoding(), settings)
    assert len(data) > 4_000_000
    assert 1 <= len(calls) <= 2, len(calls)
    assert Image.open(io.BytesIO(data)).tobytes() == noise.tobytes()
