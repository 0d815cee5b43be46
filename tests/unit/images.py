"""Real images made in memory for the tests: every mode and format the pipeline must handle."""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def photo(size=(900, 600), mode="RGB") -> Image.Image:
    """A gradient with structure (not flat), so encoders do real work."""
    w, h = size
    base = Image.radial_gradient("L").resize(size)
    lin = Image.linear_gradient("L").resize(size)
    im = Image.merge("RGB", (base, lin, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    return im.convert(mode) if mode != "RGB" else im


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_with_orientation(orientation: int, size=(60, 30)) -> bytes:
    im = Image.new("RGB", size, (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, size[0] // 2, size[1]))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)
