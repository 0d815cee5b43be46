"""Encode: the image made something its format's writer takes as it is, then written with the format's
settings, the profile and the kept metadata, and nothing else."""
from __future__ import annotations

import io
import struct

from PIL import Image, ImageFile

from streams.config import Encoding
from streams.core.formats import FORMATS, EncoderSettings
from streams.core.imaging.colour import SRGB_ICC
from streams.core.imaging.metadata import metadata_params
from streams.core.imaging.spec import OutputSpec

# Pillow's writers (PNG, JPEG, TIFF...) hand their output back in blocks of ``ImageFile.MAXBLOCK`` bytes, 64 KiB
# by default, and each block takes the GIL back: a 1200 px PNG is some 40 of them, and beside a thread running
# Python (an upload, the consumer loop) each waits up to the switch interval for it. Measured on the seed's
# 1200 px PNG beside a busy Python thread: 139 ms alone, 426 ms with 64 KiB blocks, 197 with 1 MiB, 164 with
# 8 MiB (docs/performance.md). 4 MiB: a PNG block is one IDAT chunk, and some readers cap a chunk's size (libpng
# allocates at most 8,000,000 bytes for one by default). A block is a bytes object sized to it and trimmed to what
# was written (freed at once: resize_job's mmap threshold). Images opened after this read their data in blocks of
# the same size (``decodermaxblock``).
ENCODE_BLOCK = 4 << 20
ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, ENCODE_BLOCK)


def convert_for(im: Image.Image, fmt: str, gif_colors: int = 256) -> Image.Image:
    """Make the image something the encoder writes right: JPEG has no alpha (flatten on white)."""
    allowed = FORMATS[fmt].modes
    if im.mode in allowed:
        return im
    if FORMATS[fmt].pil == "GIF":
        if im.mode in ("RGBA", "LA"):
            rgba = im.convert("RGBA")
            alpha = rgba.getchannel("A")
            pal = rgba.convert("RGB").quantize(colors=max(2, gif_colors - 1), method=Image.Quantize.MEDIANCUT)
            mask = alpha.point(lambda a: 255 if a < 128 else 0)
            pal.paste(gif_colors - 1, mask=mask)
            pal.info["transparency"] = gif_colors - 1
            return pal
        return im.convert("RGB").quantize(colors=gif_colors, method=Image.Quantize.MEDIANCUT)
    if im.mode in ("RGBA", "LA"):
        if "A" in "".join(allowed) and im.mode == "LA":
            return im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        rgba = im.convert("RGBA")
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg if "RGB" in allowed else bg.convert("L")
    return im.convert("RGB" if "RGB" in allowed else "L")


def encoder_settings(fmt: str, spec: OutputSpec, encoding: Encoding) -> EncoderSettings:
    """Quality and effort for one output, as its format's row maps them (``core/formats.py``)."""
    effort = spec.options.effort
    return FORMATS[fmt].encoder(spec.options, encoding, -1 if effort is None else effort)


def encode(im: Image.Image, fmt: str, encoding: Encoding, settings: EncoderSettings | None = None, *,
           frames: tuple[Image.Image, ...] = (), durations: tuple[int, ...] = (), loop: int | None = 0,
           icc: bytes | None = None, exif: bytes | None = None, xmp: bytes | None = None) -> bytes:
    """Pixels, the profile (sRGB, or ``icc``: a kept source profile) and the kept ``exif``/``xmp``, nothing
    else: no other EXIF, XMP, IPTC, comments or text chunks. ``frames`` after ``im`` make an animation."""
    row = FORMATS[fmt]
    pil_format = row.pil
    settings = settings or encoder_settings(fmt, OutputSpec(fmt, 1, 1), encoding)
    out = io.BytesIO()
    im, frames = _bare(im), tuple(_bare(f) for f in frames)
    params: dict = dict(settings.params)
    if row.profile:
        params["icc_profile"] = (icc or SRGB_ICC) if im.mode in ("RGB", "RGBA") else None
    if exif or xmp:
        params.update(metadata_params(pil_format, exif, xmp))
    if frames:
        params.update(save_all=True, append_images=list(frames), duration=list(durations))
        if pil_format == "GIF":
            params["disposal"] = 2  # every frame is whole: clear before the next, so transparency stays
        if loop is not None or pil_format == "WEBP":
            params["loop"] = 1 if loop is None else loop  # WebP: 1 plays once, as a GIF without a loop
    im.save(out, pil_format, **params)
    data = out.getvalue()
    return _fixed_times(data) if frames and pil_format == "AVIF" else data


def _bare(im: Image.Image) -> Image.Image:
    """A new Image object on the same pixels (nothing is copied) carrying nothing from elsewhere: not what
    the PNG, TIFF, JPEG and GIF writers would copy from a decoded file (its profile, comments, TIFF tags),
    and not another save's settings. ``Image.save`` keeps its parameters on the object it saves
    (``encoderinfo``) while it runs, and merges what it finds there into its own, so threads saving one
    shared image (a cached source that needs no resize) would mix their settings. Pinned by
    tests/unit/test_imaging.py::test_one_shared_image_encoded_from_many_threads_at_once."""
    im.load()
    own = im._new(im.im)
    transparency = im.info.get("transparency")
    own.info = {} if transparency is None else {"transparency": transparency}
    return own


def _fixed_times(data: bytes) -> bytes:
    """An animated AVIF (an ISO BMFF movie) with its creation and modification times zeroed: libavif stamps
    the clock into mvhd, tkhd and mdhd, so the same task run twice would write other bytes."""
    out = bytearray(data)

    def walk(start: int, end: int) -> None:
        pos = start
        while pos + 8 <= end:
            size, kind = struct.unpack(">I4s", out[pos:pos + 8])
            header = 8
            if size == 1 and pos + 16 <= end:
                size, header = struct.unpack(">Q", out[pos + 8:pos + 16])[0], 16
            elif size == 0:
                size = end - pos
            if size < header or pos + size > end:
                return
            body = pos + header
            if kind in (b"moov", b"trak", b"mdia"):
                walk(body, pos + size)
            elif kind in (b"mvhd", b"tkhd", b"mdhd") and body + 4 <= pos + size:
                width = 8 if out[body] == 1 else 4
                if body + 4 + 2 * width <= pos + size:
                    out[body + 4:body + 4 + 2 * width] = bytes(2 * width)
            pos += size

    walk(0, len(out))
    return bytes(out)
