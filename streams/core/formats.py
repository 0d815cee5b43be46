"""One row per output format (as imgproxy's ``imagetype/defs.go``): Pillow's name, the MIME type and file
extension, what the format can carry (alpha, an ICC profile, EXIF/XMP, animation), the modes its encoder
takes as they are, and how a request's quality and effort become the encoder's own parameters.

Adding an output format is one row in ``FORMATS`` (and its tests); nothing else lists the formats.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Callable, Protocol

from PIL import features

from streams.config import Encoding

EFFORT_MAX = 9  # a request's effort: 0 (fastest) ... 9 (smallest)
# lossless WebP: libwebp's own 0-9 presets (WebPConfigLosslessPreset: method, quality), indexed by effort
_WEBP_LOSSLESS = ((0, 0), (1, 20), (2, 25), (3, 30), (3, 50), (4, 50), (4, 75), (4, 90), (5, 90), (6, 100))

# The formats a source may be in (Pillow's names; JPEG includes MPO, a camera's multi-picture JPEG). Anything
# else is IMAGE_UNDECODABLE before a byte of it is decoded: Pillow would run Ghostscript on an EPS, decode an
# ICO's or ICNS's embedded PNG of any size while opening it, and decode QOI, XPM or plain PPM in pure Python
# for minutes.
INPUT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF", "HEIF")
INPUT_FORMAT_NAMES = "JPEG, PNG, GIF, WebP, TIFF, BMP, AVIF, HEIC/HEIF"
ANIMATED_SOURCES = ("GIF", "WEBP", "AVIF", "PNG")  # PNG: APNG


class Asked(Protocol):
    """What a request asks of the encoder (an output's ``ImageOptions``)."""
    quality: int | None
    progressive: bool | None
    lossless: bool


@dataclass(frozen=True)
class EncoderSettings:
    """The encoder's own parameters for one output, and what the output record says was applied."""
    params: dict
    quality: int = 0
    effort: int = -1
    progressive: bool = False
    lossless: bool = False


def _png(asked: Asked, encoding: Encoding, effort: int) -> EncoderSettings:
    return EncoderSettings({"compress_level": encoding.png_compress_level if effort < 0 else effort}, effort=effort)


def _jpeg(asked: Asked, encoding: Encoding, effort: int) -> EncoderSettings:
    quality = asked.quality or encoding.jpeg_quality
    progressive = encoding.jpeg_progressive if asked.progressive is None else asked.progressive
    return EncoderSettings({"quality": quality, "optimize": effort >= 5, "progressive": progressive},
                           quality=quality, effort=effort, progressive=progressive)


def _webp(asked: Asked, encoding: Encoding, effort: int) -> EncoderSettings:
    if asked.lossless:
        method, effort_q = _WEBP_LOSSLESS[max(effort, 0)]  # preset 0 unless asked: see docs/benchmarks.md
        return EncoderSettings({"lossless": True, "quality": effort_q, "method": method, "exact": True},
                               effort=effort, lossless=True)
    quality = asked.quality or encoding.webp_quality
    method = encoding.webp_method if effort < 0 else round(effort * 6 / EFFORT_MAX)
    return EncoderSettings({"quality": quality, "method": method}, quality=quality, effort=effort)


def _avif(asked: Asked, encoding: Encoding, effort: int) -> EncoderSettings:
    quality = asked.quality or encoding.avif_quality
    # speed 10 ... 2 (1 and 0 take minutes for a 1200 px image on one thread); one encoder thread: the pool
    # already runs a task per core
    speed = encoding.avif_speed if effort < 0 else 10 - round(effort * 8 / EFFORT_MAX)
    return EncoderSettings({"quality": quality, "speed": speed, "max_threads": 1}, quality=quality, effort=effort)


def _jxl(asked: Asked, encoding: Encoding, effort: int) -> EncoderSettings:
    # libjxl's effort runs 1 (fastest) ... 9; its default is 7. One thread: the pool runs a task per core,
    # and the same task encoded twice writes the same bytes.
    level = 7 if effort < 0 else max(1, effort)
    if asked.lossless:
        return EncoderSettings({"lossless": True, "effort": level, "num_threads": 1}, effort=effort, lossless=True)
    quality = asked.quality or 90  # libjxl's default (distance 1.0: visually lossless)
    return EncoderSettings({"quality": quality, "effort": level, "num_threads": 1}, quality=quality, effort=effort)


def _no_knobs(params: dict) -> Callable[[Asked, Encoding, int], EncoderSettings]:
    return lambda asked, encoding, effort: EncoderSettings(dict(params))


@dataclass(frozen=True)
class Format:
    name: str  # as a request names it
    pil: str  # Pillow's writer
    mime: str
    modes: tuple[str, ...]  # the modes its encoder takes as they are; anything else is converted first
    settings: Callable[[Asked, Encoding, int], EncoderSettings]  # (request, configuration, effort or -1)
    alpha: bool = False  # keeps alpha: pad's default background is transparent (else white)
    profile: bool = False  # carries an ICC profile (RGB outputs are tagged sRGB, or keep the source's)
    metadata: bool = False  # carries kept EXIF/XMP (TIFF: XMP and its first IFD's text tags)
    animation: bool = False  # an animated source may stay animated (``animated: true``)
    extension: str = ""  # of its objects' keys: the name unless said
    needs: str = ""  # a Pillow feature it needs (features.check): without it the format is refused
    plugin: str = ""  # the module that adds its writer to Pillow (imported on first use)

    @property
    def suffix(self) -> str:
        return self.extension or self.name

    def available(self) -> bool:
        if self.plugin:
            try:
                importlib.import_module(self.plugin)  # registers the format with Pillow
            except ImportError:
                return False
        return not self.needs or bool(features.check(self.needs))

    def encoder(self, asked: Asked, encoding: Encoding, effort: int) -> EncoderSettings:
        return self.settings(asked, encoding, effort if 0 <= effort <= EFFORT_MAX else -1)


_JPG = Format("jpg", "JPEG", "image/jpeg", ("L", "RGB"), _jpeg, profile=True, metadata=True)
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("png", "PNG", "image/png", ("1", "L", "LA", "RGB", "RGBA", "P"), _png, alpha=True, profile=True,
           metadata=True),
    _JPG,
    replace(_JPG, name="jpeg"),
    Format("webp", "WEBP", "image/webp", ("RGB", "RGBA"), _webp, alpha=True, profile=True, metadata=True,
           animation=True),
    # GIF: no profile (its pixels are converted to sRGB), no metadata
    Format("gif", "GIF", "image/gif", ("P", "L"), _no_knobs({}), alpha=True, animation=True),
    Format("tiff", "TIFF", "image/tiff", ("1", "L", "LA", "RGB", "RGBA", "CMYK"),
           _no_knobs({"compression": "tiff_adobe_deflate"}), alpha=True, profile=True, metadata=True),
    Format("avif", "AVIF", "image/avif", ("RGB", "RGBA"), _avif, alpha=True, profile=True, metadata=True,
           animation=True, needs="avif"),
    # JPEG XL (pillow-jxl-plugin): no ICC profile is written (the pixels are sRGB), no animation
    Format("jxl", "JXL", "image/jxl", ("L", "LA", "RGB", "RGBA"), _jxl, alpha=True, metadata=True,
           plugin="pillow_jxl"),
)}
