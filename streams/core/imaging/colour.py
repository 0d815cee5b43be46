"""Colour: a source's embedded ICC profile converted to sRGB (lcms), exotic modes brought to L/LA/RGB/RGBA,
and the one sRGB profile every RGB output is tagged with.

Sources with an embedded ICC profile are converted to sRGB before resizing, and every RGB(A) output in a
format that can carry a profile is tagged with this small sRGB profile (lcms's built-in, ICC v4, 588 bytes).
A reader that knows only ICC v2 ignores the tag and is back at untagged, never worse. Grey outputs and GIFs
are untagged. Intent: relative colorimetric with black-point compensation (colours inside sRGB stay exactly
as the source profile says; a CMYK profile's paper black maps to sRGB black, as Photoshop does).
"""
from __future__ import annotations

import hashlib
import io
import struct
import threading
from collections import OrderedDict

from PIL import Image, ImageChops, ImageCms, ImageMath


def _stable_srgb_profile() -> bytes:
    """lcms's sRGB profile, the same bytes in every process: lcms stamps the creation time into the
    header, and a task run twice must write the same object. The date is set to a fixed one and the
    profile ID (the MD5 of the profile with its flags, intent and ID zeroed, as ICC v4 defines it) is
    computed again. Pinned by
    tests/unit/test_imaging_colour.py::test_the_same_task_gives_the_same_bytes_in_every_process."""
    raw = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    raw[24:36] = struct.pack(">6H", 2020, 1, 1, 0, 0, 0)
    probe = bytearray(raw)
    probe[44:48], probe[64:68], probe[84:100] = bytes(4), bytes(4), bytes(16)
    raw[84:100] = hashlib.md5(bytes(probe)).digest()
    return bytes(raw)


SRGB_ICC = _stable_srgb_profile()


_SRGB = ImageCms.ImageCmsProfile(io.BytesIO(SRGB_ICC))


_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC


_FLAGS = ImageCms.Flags.BLACKPOINTCOMPENSATION


_PROFILE_SPACE = {"RGB": "RGB", "RGBA": "RGB", "CMYK": "CMYK", "L": "GRAY", "I;16": "GRAY"}


_TRANSFORMS: OrderedDict[tuple[bytes, str, str], ImageCms.ImageCmsTransform | None] = OrderedDict()


_TRANSFORMS_LOCK = threading.Lock()


_TRANSFORMS_MAX = 32


def to_srgb(im: Image.Image) -> Image.Image:
    """Convert a source with an embedded ICC profile to sRGB (modifies ``im`` in place when the mode stays).

    A source without a profile is taken as sRGB, as browsers take it (CMYK then gets Pillow's naive
    conversion in ``normalise_mode``). A profile that lcms cannot read, or that does not fit the image's
    mode, is ignored the same way rather than failing the task; EncodedImage has no notes to say so.
    Precision: lcms reads 16-bit grey (I;16) as it is and rounds once, to 8 bits. Pillow has no 16-bit
    per channel RGB mode, so 48-bit PNG/TIFF sources are already 8 bits a channel when they are decoded.
    Pillow reads every CMYK JPEG with Adobe's inverted polarity (the APP14 convention), so Photoshop's
    CMYK JPEGs arrive with the right values; one written without that marker would arrive inverted."""
    icc = im.info.get("icc_profile")
    if not icc:
        return im
    if im.mode == "CMYK":
        transform = _srgb_transform(icc, "CMYK", "RGB")
        return transform.apply(im) if transform else im
    if im.mode in ("L", "LA", "I;16"):
        transform = _srgb_transform(icc, "L" if im.mode == "LA" else im.mode, "RGB")
        if transform is None:
            return im
        grey = transform.apply(im.getchannel("L") if im.mode == "LA" else im).convert("L")
        return Image.merge("LA", (grey, im.getchannel("A"))) if im.mode == "LA" else grey
    if im.mode in ("I", "I;16L", "I;16B", "I;16N", "F", "1", "LAB", "HSV"):
        return im  # lcms takes none of these from Pillow: the profile is ignored
    im = normalise_mode(im)  # P, RGBX, YCbCr, ... -> RGB or RGBA
    transform = _srgb_transform(icc, im.mode, im.mode) if im.mode in ("RGB", "RGBA") else None
    return transform.apply_in_place(im) if transform else im


def _srgb_transform(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform | None:
    """The profile's transform to sRGB, or None when there is nothing to convert (the profile is sRGB
    already, is broken, or is not for this mode). Building one costs milliseconds (a CMYK profile's much
    more), so the answer is kept per profile digest and modes, for the last few profiles."""
    key = (hashlib.sha256(icc).digest(), in_mode, out_mode)
    with _TRANSFORMS_LOCK:
        if key in _TRANSFORMS:
            _TRANSFORMS.move_to_end(key)
            return _TRANSFORMS[key]
    transform = _build_srgb_transform(icc, in_mode, out_mode)
    with _TRANSFORMS_LOCK:
        _TRANSFORMS[key] = transform
        while len(_TRANSFORMS) > _TRANSFORMS_MAX:
            _TRANSFORMS.popitem(last=False)
    return transform


def _build_srgb_transform(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform | None:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != _PROFILE_SPACE[in_mode]:
            return None  # e.g. an RGB profile on a grey image: ignored
        transform = ImageCms.buildTransform(profile, _SRGB, in_mode, out_mode, _INTENT, _FLAGS)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # unreadable: the source is taken as sRGB
    return None if _is_identity(transform, in_mode) else transform


def _is_identity(transform: ImageCms.ImageCmsTransform, in_mode: str) -> bool:
    """Whether the transform leaves every colour of a coarse grid within 2 levels: an sRGB profile
    (under any of its many names and versions), not worth a pass over the pixels."""
    if in_mode == "CMYK":
        return False
    if in_mode in ("RGB", "RGBA"):
        levels = range(0, 256, 17)
        expected = Image.new("RGB", (16, 256))
        expected.putdata([(r, g, b) for r in levels for g in levels for b in levels])
        probe = expected.convert(in_mode)
    else:
        expected = Image.frombytes("L", (256, 1), bytes(range(256)))
        probe = expected if in_mode == "L" else \
            Image.frombytes("I;16", (256, 1), struct.pack("<256H", *(v * 257 for v in range(256))))
    got = transform.apply(probe).convert("RGB")
    return max(hi for _, hi in ImageChops.difference(got, expected.convert("RGB")).getextrema()) <= 2


def normalise_mode(im: Image.Image) -> Image.Image:
    """Bring exotic modes to L/LA/RGB/RGBA with correct values."""
    mode = im.mode
    if mode in ("L", "RGB") and "transparency" in im.info:
        return im.convert("LA" if mode == "L" else "RGBA")  # a colour key becomes alpha
    if mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if mode == "1":
        grey = im.convert("L")
        return _keyed(grey, grey, im.info.get("transparency"))
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        return im.convert("RGBA" if has_alpha else "RGB")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: scale to 8 bits, rounded, instead of clipping at 255.
        top = 65535 if mode.startswith("I;16") else max(1, im.getextrema()[1] or 1)
        wide = im if mode == "I" else im.convert("I")
        grey = wide.convert("L") if top <= 255 else wide.point(lambda v: v * (255.0 / top) + 0.5).convert("L")
        return _keyed(grey, wide, im.info.get("transparency"))
    if mode == "F":
        lo, hi = im.getextrema()
        span = (hi - lo) or 1.0
        return im.point(lambda v: (v - lo) * 255.0 / span + 0.5).convert("L")
    if mode == "La":
        return im.convert("LA")
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode == "CMYK":
        return im.convert("RGB")
    if mode in ("RGBX", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    return im.convert("RGBA" if "A" in mode else "RGB")


def _keyed(grey: Image.Image, raw: Image.Image, key) -> Image.Image:
    """``grey`` with the alpha a colour key (a PNG's tRNS) gives: 0 where ``raw`` (the pixels before scaling
    to 8 bits) equals the key: converting a 1-bit or 16-bit grey PNG to L drops the key."""
    if not isinstance(key, int) or isinstance(key, bool):
        return grey
    alpha = ImageMath.lambda_eval(lambda a: (a["raw"] != key) * 255, raw=raw.convert("I")).convert("L")
    out = grey.convert("LA")
    out.putalpha(alpha)
    return out
