"""What a source image is, computed once per source from the decode the pipeline already does (pure: no
I/O): its header's facts and SHA-256 (``source_info``, with every decode), and what its pixels say
(``pixel_facts``: dominant colour and palette, a BlurHash placeholder, a perceptual hash), asked by one
task of each run.

BlurHash rather than ThumbHash: every front-end stack has a decoder for it (the npm ``blurhash`` package,
Android, iOS, Flutter), which is what a placeholder is for; ours is the ``blurhash`` package's encoder on a
32 px thumbnail. The perceptual hash is ``imagehash``'s pHash (64 bits, hex): near-duplicates are a
small Hamming distance apart."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import blurhash
from PIL import Image, ImageCms

from streams.config import Limits
from streams.core.errors import PipelineError
from streams.core.imaging.limits import frame_count, gif_frames
from streams.core.models import COSTLY_FACTS as COSTLY  # what a request may leave out; the rest is always there

_ORIENTATION = 0x0112
_THUMB = 32  # the side the colours are computed on
_HASHED = 20  # and the placeholder's (the BlurHash encoder is pure Python: its time goes with the pixels)


@dataclass(frozen=True)
class SourceInfo:
    """The header's facts and the bytes' hash: cheap, kept with every decoded source."""
    sha256: str
    width: int  # as shown: after the EXIF orientation
    height: int
    format: str  # jpeg, png, webp, gif, tiff, avif, heif, ...
    orientation: int  # the EXIF orientation the pixels were turned by (1: none)
    alpha: bool
    frames: int
    colorSpace: str  # the decoder's mode: RGB, RGBA, L, LA, P, CMYK, I;16, ...
    profile: str | None  # the embedded ICC profile's description; None: no profile


def source_info(header: Image.Image, data: bytes, limits: Limits) -> SourceInfo:
    """From the opened header (nothing decoded) and the source's bytes. An animation of more frames than
    the limit (an error only when kept animated) is counted to one past the limit's bound."""
    orientation = _orientation(header)
    width, height = header.size
    if orientation >= 5 and header.format != "TIFF":  # 5-8 turn a quarter (Pillow's TIFF header is turned already)
        width, height = height, width
    mode = header.mode
    alpha = "A" in mode or "a" in mode or "transparency" in header.info
    return SourceInfo(sha256=hashlib.sha256(data).hexdigest(), width=width, height=height,
                      format=(header.format or "").lower(), orientation=orientation, alpha=alpha,
                      frames=_frames(header, data, limits), colorSpace=mode,
                      profile=_profile_name(header.info.get("icc_profile")))


def _orientation(header: Image.Image) -> int:
    """The EXIF orientation, read without decoding: a PNG's ``getexif`` decodes the image to look for an
    eXIf chunk after the pixels, so a PNG's is read from the chunk before them (where the PNG spec puts it)."""
    try:
        if header.format == "PNG":
            raw = header.info.get("exif")
            exif = Image.Exif()
            if raw:
                exif.load(raw)
        else:
            exif = header.getexif()
        value = int(exif.get(_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block is not a reason to fail the image
        return 1
    return value if 1 <= value <= 8 else 1


def _frames(header: Image.Image, data: bytes, limits: Limits) -> int:
    try:
        return frame_count(header, data, limits)
    except PipelineError:
        return gif_frames(data, 4 * limits.max_frames + 1) if header.format == "GIF" else 1


def _profile_name(icc: bytes | None) -> str | None:
    if not icc:
        return None
    try:
        name = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
    except Exception:  # a broken profile: there is one, without a name we can read
        return ""
    return name[:200]


def pixel_facts(frame: Image.Image, wanted: tuple[str, ...] = COSTLY) -> dict:
    """Of the first frame as decoded (oriented, sRGB): ``dominantColor`` and ``palette`` (#rrggbb, most
    common first; "colors"), ``blurhash`` ("placeholder"), ``phash`` ("phash"); what is not wanted is None."""
    out: dict = {"dominantColor": None, "palette": [], "blurhash": None, "phash": None}
    if not any(w in COSTLY for w in wanted):
        return out
    import imagehash  # with numpy and scipy, 70 ms at import: paid by the processes that compute facts only
    import numpy
    # one pass over the frame, to 128 px; then everything works on that
    scale = min(1.0, 128 / max(frame.size))
    small = frame.resize((max(1, round(frame.width * scale)), max(1, round(frame.height * scale))),
                         Image.Resampling.BOX) if scale < 1 else frame
    thumb = _flattened(small)
    thumb.thumbnail((_THUMB, _THUMB), Image.Resampling.BOX)
    if "colors" in wanted:
        quantized = thumb.quantize(colors=5, method=Image.Quantize.MEDIANCUT)
        flat = quantized.getpalette() or []
        counts = sorted(quantized.getcolors() or [], reverse=True)
        out["palette"] = ["#%02x%02x%02x" % tuple(flat[3 * i:3 * i + 3]) for _, i in counts]
        out["dominantColor"] = out["palette"][0] if out["palette"] else None
    if "placeholder" in wanted:
        x, y = (4, 3) if thumb.width >= thumb.height else (3, 4)
        tiny = thumb.copy()
        tiny.thumbnail((_HASHED, _HASHED), Image.Resampling.BOX)  # 4x3 components need no more pixels
        out["blurhash"] = blurhash.encode(numpy.asarray(tiny), components_x=x, components_y=y)
    if "phash" in wanted:
        out["phash"] = str(imagehash.phash(small.convert("L") if small.mode != "L" else small))
    return out


def _flattened(frame: Image.Image) -> Image.Image:
    """RGB, alpha composited on white (what a page behind a transparent image most often is)."""
    if frame.mode in ("RGBA", "LA", "PA") or "transparency" in frame.info:
        rgba = frame.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return frame.convert("RGB")


def placeholder_data_url(hash_: str, width: int, height: int) -> str | None:
    """The BlurHash painted at 32 px on the long side, as a PNG ``data:`` URL for a page to show while the
    image loads; None for a hash that does not decode."""
    import base64
    side = _THUMB
    w, h = (side, max(1, round(side * height / width))) if width >= height else (max(1, round(side * width / height)), side)
    try:
        pixels = blurhash.decode(hash_, w, h)
    except Exception:  # a hash from elsewhere, damaged: no placeholder rather than no document
        return None
    im = Image.new("RGB", (w, h))
    im.putdata([tuple(max(0, min(255, round(c))) for c in px[:3]) for row in pixels for px in row])
    out = io.BytesIO()
    im.save(out, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")
