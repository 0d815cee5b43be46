"""Bytes in, encoded image out: an ordered list of small steps.

check limits -> open (header only) -> check pixels (every frame of a kept animation) -> draft -> load
-> orient -> keep what the request keeps (EXIF/XMP, the source profile) -> to sRGB -> normalise mode
-> strip metadata -> resize (fit, fill + crop at a gravity, force, pad on a background; each frame
with the same layout) -> convert for the target -> encode (tagged sRGB or the kept profile; the kept
EXIF/XMP; quality, effort, progressive, lossless).
Pixel limits are checked from the header, before any pixel is allocated.
HEIC/HEIF sources are read through pillow-heif (registered here, at import); AVIF through Pillow's own.
"""
from __future__ import annotations

import hashlib
import io
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from PIL import (
    ExifTags, Image, ImageChops, ImageCms, ImageFile, ImageMath, ImageOps, PngImagePlugin, UnidentifiedImageError,
    features,
)

from streams.config import Encoding, Limits
from streams.core.errors import ImageTooLarge, ImageUndecodable, UnsupportedFormat
from streams.core.models import CONTENT_TYPES

# We enforce our own pixel limit before decoding; Pillow's global one would
# raise a different error at a different place.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

try:  # HEIC/HEIF input (iPhone photos): pillow-heif's opener, so Image.open reads them like any other
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - a dependency; without it HEIC sources are IMAGE_UNDECODABLE
    pass

# The formats a source may be in (Pillow's names; JPEG includes MPO, a camera's multi-picture JPEG). Anything
# else is IMAGE_UNDECODABLE before a byte of it is decoded: Pillow would run Ghostscript on an EPS, decode an
# ICO's or ICNS's embedded PNG of any size while opening it, and decode QOI, XPM or plain PPM in pure Python
# for minutes.
INPUT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF", "HEIF")
INPUT_FORMAT_NAMES = "JPEG, PNG, GIF, WebP, TIFF, BMP, AVIF, HEIC/HEIF"

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "tiff": "TIFF",
               "avif": "AVIF"}
# Modes each encoder takes as they are; anything else is converted first.
_TARGET_MODES = {
    "PNG": ("1", "L", "LA", "RGB", "RGBA", "P"),
    "JPEG": ("L", "RGB"),
    "WEBP": ("RGB", "RGBA"),
    "GIF": ("P", "L"),
    "TIFF": ("1", "L", "LA", "RGB", "RGBA", "CMYK"),
    "AVIF": ("RGB", "RGBA"),
}
# output formats that keep an animated source animated (``animated: true``); the others take its first frame
ANIMATED_FORMATS = ("gif", "webp", "avif")
_ANIMATED_SOURCES = ("GIF", "WEBP", "AVIF", "PNG")  # PNG: APNG
# keepMetadata: none (the default), copyright (EXIF Copyright and Artist), all (EXIF, orientation 1, and XMP)
KEEP_METADATA = ("none", "copyright", "all")
_COPYRIGHT_TAGS = (ExifTags.Base.Copyright, ExifTags.Base.Artist)
# formats that carry kept metadata (GIF has no place for it); TIFF keeps XMP and the text tags of its
# first IFD (Copyright, Artist, Make, Model, ...), not EXIF's sub-IFDs (Exif, GPS)
_METADATA_FORMATS = ("png", "jpg", "jpeg", "webp", "avif", "tiff")
# formats that carry an ICC profile: keepProfile keeps the source's there; a GIF's pixels are converted to sRGB
_PROFILE_FORMATS = ("png", "jpg", "jpeg", "webp", "avif", "tiff")
EFFORT_MAX = 9
# lossless WebP: libwebp's own 0-9 presets (WebPConfigLosslessPreset: method, quality), indexed by effort
_WEBP_LOSSLESS = ((0, 0), (1, 20), (2, 25), (3, 30), (3, 50), (4, 50), (4, 75), (4, 90), (5, 90), (6, 100))

# Colour. Sources with an embedded ICC profile are converted to sRGB before resizing, and every RGB(A)
# output in a format that can carry a profile (PNG, JPEG, WebP, TIFF) is tagged with this small sRGB
# profile (lcms's built-in, ICC v4, 588 bytes). Browsers take an untagged image as sRGB too, but editors
# and viewers may take it as their working space or the display's; a reader that knows only ICC v2
# (Firefox unless gfx.color_management.enablev4 is set) ignores the tag and is back at untagged, never
# worse. Grey outputs and GIFs are untagged (an RGB profile cannot describe a grey image; Pillow writes
# no profile into GIF).
# Intent: relative colorimetric with black-point compensation. Colours inside sRGB stay exactly as the
# source profile says and only the ones outside are clipped; for matrix profiles (Display P3, Adobe RGB:
# what phones and cameras embed) perceptual has no table of its own and lcms would use the colorimetric
# one anyway; black-point compensation maps a CMYK profile's paper black to sRGB black, as Photoshop does.


def _stable_srgb_profile() -> bytes:
    """lcms's sRGB profile, the same bytes in every process: lcms stamps the creation time into the
    header, so each worker process made its own profile and a task run twice (after a worker was
    killed) wrote an object that differed by a byte from the result already recorded. The date is set
    to a fixed one and the profile ID (the MD5 of the profile with its flags, intent and ID zeroed, as
    ICC v4 defines it) is computed again."""
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


# Resize modes and gravities, with imgproxy's names (rs:fit, rs:fill, rs:force; pad is rs:fit + ex:1).
MODES = ("fit", "fill", "force", "pad")
GRAVITIES = ("center", "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest",
             "smart")
# formats that keep alpha: pad's default background is transparent there, white elsewhere (JPEG)
_ALPHA_FORMATS = ("png", "webp", "gif", "tiff", "avif")
_SMART_SIDE = 128  # smart gravity scores crop windows on a greyscale thumbnail this long
_SMART_STEPS = 8   # ... at this many steps (plus one) along each axis that has room to slide


@dataclass(frozen=True)
class OutputSpec:
    format: str
    width: int
    height: int
    maintain_aspect_ratio: bool = True
    mode: str = ""  # fit | fill | force | pad; "" -> fit if maintain_aspect_ratio else force
    gravity: str = "center"
    enlarge: bool = True
    background: str = ""  # #rrggbb or #rrggbbaa, for pad; "" -> transparent, white for JPEG
    quality: int = 0  # 1-100 for jpg/webp/avif; 0 -> the Encoding's
    effort: int = -1  # 0 (fastest) - 9 (smallest) for png/jpg/webp/avif; -1 -> the Encoding's
    progressive: bool | None = None  # jpg; None -> the Encoding's
    lossless: bool = False  # webp
    animated: bool = False  # gif/webp/avif: an animated source stays animated
    keep_metadata: str = "none"  # none | copyright | all
    keep_profile: bool = False  # an RGB source's own ICC profile instead of the conversion to sRGB

    @property
    def resize_mode(self) -> str:
        return self.mode or ("fit" if self.maintain_aspect_ratio else "force")

    @property
    def source_options(self) -> "SourceOptions":
        """How the source must be prepared for this output (what a cached source is keyed by)."""
        fmt = self.format.lower()
        return SourceOptions(animated=self.animated and fmt in ANIMATED_FORMATS,
                             keep_profile=self.keep_profile and fmt in _PROFILE_FORMATS,
                             keep_metadata=self.keep_metadata if fmt in _METADATA_FORMATS else "none")


@dataclass(frozen=True)
class SourceOptions:
    animated: bool = False  # every frame, not only the first
    keep_profile: bool = False
    keep_metadata: str = "none"

    @property
    def key(self) -> str:
        return f"a{int(self.animated)}p{int(self.keep_profile)}m{self.keep_metadata}"


@dataclass(frozen=True)
class Source:
    """A decoded source, ready for any number of ``resize_image`` calls: its frames (one for a still;
    oriented, L/LA/RGB/RGBA, no metadata in ``info``), each frame's duration (ms) and the loop count of an
    animation (None: play once), and what it keeps: the source profile (its pixels are then in that
    profile's space), the EXIF (orientation 1) and XMP to write."""
    frames: tuple[Image.Image, ...]
    durations: tuple[int, ...] = ()
    loop: int | None = 0
    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None

    @property
    def image(self) -> Image.Image:
        return self.frames[0]

    @property
    def nbytes(self) -> int:
        return sum(f.width * f.height * max(1, len(f.getbands())) for f in self.frames)


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int
    format: str
    content_type: str
    # what was applied (the final event's output records say it)
    mode: str = ""
    gravity: str = ""  # fill and pad only
    enlarge: bool = True
    background: str = ""  # pad only, #rrggbbaa
    quality: int = 0  # jpg, webp (lossy) and avif only
    effort: int = -1  # the request's 0-9 effort where the format has a knob; -1: the configured one
    progressive: bool = False  # jpg only
    lossless: bool = False  # webp only
    frames: int = 1
    keep_metadata: str = "none"  # what was written: none | copyright | all
    keep_profile: bool = False  # the source's own profile was embedded


@dataclass(frozen=True)
class Layout:
    """Where the pixels go, for a source of a given size: the whole source scaled to ``scaled``, the
    window ``crop`` (x, y, w, h, in scaled pixels) of it kept, and that pasted at ``offset`` on a
    ``canvas`` (pad only; else canvas is the crop's size and offset (0, 0))."""
    scaled: tuple[int, int]
    crop: tuple[int, int, int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int] = (0, 0)


def task_spec(task) -> OutputSpec:
    """The output a task (its record as a dict) asks for."""
    return OutputSpec(task["format"], task["width"], task["height"], task["maintainAspectRatio"],
                      mode=task.get("resizeMode", ""), gravity=task.get("gravity", "center"),
                      enlarge=task.get("enlarge", True), background=task.get("background", ""),
                      quality=task.get("quality", 0), effort=task.get("effort", -1),
                      progressive=task.get("progressive"), lossless=task.get("lossless", False),
                      animated=task.get("animated", False), keep_metadata=task.get("keepMetadata") or "none",
                      keep_profile=task.get("keepProfile", False))


def certain_output_pixels(src_w: int, src_h: int, spec: OutputSpec) -> int:
    """The fewest pixels one frame of this output can have over a source whose header says ``src_w`` x
    ``src_h``, whichever way its EXIF orientation turns it: the planner refuses what is over the limit even
    so, before any task runs."""
    return min(w * h for w, h in (target_size(src_w, src_h, spec), target_size(src_h, src_w, spec)))


def target_size(src_w: int, src_h: int, spec: OutputSpec) -> tuple[int, int]:
    """The size of the output image (the canvas)."""
    return layout(src_w, src_h, spec).canvas


def layout(src_w: int, src_h: int, spec: OutputSpec, image: Image.Image | None = None) -> Layout:
    """The geometry of one output (pure; ``image`` is needed only for the smart gravity).

    fit: inside the box. fill: cover the box, then crop it at the gravity. force: exactly the box.
    pad: fit, then centred (or at the gravity) on a box-sized canvas. Without ``enlarge`` nothing is
    scaled up: fit, fill and pad scale by at most 1 (fill's crop is then at most the source; pad's canvas
    is still the box), force scales both axes down together until neither is enlarged (imgproxy's rule)."""
    box_w, box_h = spec.width, spec.height
    mode = spec.resize_mode
    if mode == "force":
        sx, sy = box_w / src_w, box_h / src_h
        if not spec.enlarge and max(sx, sy) > 1:
            sx, sy = sx / max(sx, sy), sy / max(sx, sy)
        size = (max(1, round(src_w * sx)), max(1, round(src_h * sy)))
        return Layout(size, (0, 0, *size), size)
    scale = max(box_w / src_w, box_h / src_h) if mode == "fill" else min(box_w / src_w, box_h / src_h)
    if not spec.enlarge:
        scale = min(scale, 1.0)
    scaled = (max(1, round(src_w * scale)), max(1, round(src_h * scale)))
    if mode == "fill":
        window = (min(box_w, scaled[0]), min(box_h, scaled[1]))
        if spec.gravity == "smart" and image is not None:
            x, y = _smart_offset(image, scaled, window)
        else:
            x, y = _gravity_offset(spec.gravity, scaled[0] - window[0], scaled[1] - window[1])
        return Layout(scaled, (x, y, *window), window)
    if mode == "pad":
        offset = _gravity_offset(spec.gravity, box_w - scaled[0], box_h - scaled[1])
        return Layout(scaled, (0, 0, *scaled), (box_w, box_h), offset)
    return Layout(scaled, (0, 0, *scaled), scaled)


def _gravity_offset(gravity: str, room_x: int, room_y: int) -> tuple[int, int]:
    """Where a window (or an image on a canvas) sits when it has ``room`` pixels to spare on each axis."""
    x = 0 if "west" in gravity else room_x if "east" in gravity else room_x // 2
    y = 0 if "north" in gravity else room_y if "south" in gravity else room_y // 2
    return x, y


def _smart_offset(im: Image.Image, scaled: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """The crop window with the most detail: slide it along each axis with room, in 8 equal steps
    (and the centre), and keep the one whose part of a small greyscale thumbnail has the highest
    entropy; ties go to the one nearest the centre. Cheap and deterministic."""
    room_x, room_y = scaled[0] - window[0], scaled[1] - window[1]
    if not room_x and not room_y:
        return 0, 0
    t = min(1.0, _SMART_SIDE / max(im.size))
    thumb = im.convert("RGB").resize((max(1, round(im.width * t)), max(1, round(im.height * t))),
                                     Image.Resampling.BOX).convert("L")
    fx, fy = thumb.width / scaled[0], thumb.height / scaled[1]

    def steps(room: int) -> list[int]:
        return sorted({round(room * i / _SMART_STEPS) for i in range(_SMART_STEPS + 1)} | {room // 2})

    def score(xy: tuple[int, int]) -> tuple[float, float, int, int]:
        x, y = xy
        part = thumb.crop((int(x * fx), int(y * fy), max(int(x * fx) + 1, round((x + window[0]) * fx)),
                           max(int(y * fy) + 1, round((y + window[1]) * fy))))
        return (-round(part.entropy(), 9), abs(x - room_x / 2) + abs(y - room_y / 2), x, y)

    return min(((x, y) for x in steps(room_x) for y in steps(room_y)), key=score)


def parse_colour(text: str) -> tuple[int, int, int, int]:
    """``#rrggbb`` or ``#rrggbbaa`` -> (r, g, b, a); raises ValueError."""
    digits = text[1:] if text.startswith("#") else ""
    if len(digits) not in (6, 8) or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"must be #rrggbb or #rrggbbaa, got {text!r}")
    rgba = [int(digits[i:i + 2], 16) for i in range(0, len(digits), 2)]
    return (*rgba, 255)[:4] if len(rgba) == 3 else tuple(rgba)  # type: ignore[return-value]


def pad_background(spec: OutputSpec) -> str:
    """The pad canvas colour as ``#rrggbbaa``: the spec's, else transparent where the format keeps
    alpha, white for JPEG."""
    if spec.background:
        return "#%02x%02x%02x%02x" % parse_colour(spec.background)
    return "#ffffff00" if spec.format.lower() in _ALPHA_FORMATS else "#ffffffff"


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Open lazily (header only) and refuse what breaks the limits."""
    if len(data) > limits.max_source_bytes:
        raise ImageTooLarge(f"source is {len(data)} bytes, more than the limit of {limits.max_source_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except UnidentifiedImageError:
        raise ImageUndecodable(f"source is not an image in a format imagefork reads ({INPUT_FORMAT_NAMES})") from None
    except (OSError, SyntaxError, ValueError, TypeError, struct.error, EOFError, RuntimeError) as exc:
        raise ImageUndecodable(f"source image header is damaged ({type(exc).__name__})") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - MAX_IMAGE_PIXELS is off
        raise ImageTooLarge(str(exc)) from None
    check_pixels(im.width, im.height, limits)
    if im.format == "TIFF":  # a tile is decoded whole, and its size is the file's word, not the image's
        tile_w, tile_h = im.tag_v2.get(322), im.tag_v2.get(323)
        if isinstance(tile_w, int) and isinstance(tile_h, int) and tile_w * tile_h > limits.max_pixels:
            im.close()
            raise ImageTooLarge(f"source TIFF has tiles of {tile_w}x{tile_h} = {tile_w * tile_h} pixels, "
                                f"more than the limit of {limits.max_pixels}")
    return im


def check_output(plan: "Layout", frames: int, limits: Limits) -> None:
    """An output is held whole, every frame of it (a crop resamples only its window): within the pixel limit
    too (a 1x1 source asked at 10000x10000 is 100 million pixels, and a GIF encoder's several copies of them)."""
    w, h = plan.canvas
    if frames * w * h > limits.max_pixels:
        what = f"{w}x{h}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageTooLarge(f"output would be {what} = {frames * w * h} pixels, more than the limit of "
                            f"{limits.max_pixels}")


def check_pixels(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise ImageUndecodable(f"source declares an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"source is {width}x{height} = {width * height} pixels, more than the limit of {limits.max_pixels}")


def check_frames(frames: int, width: int, height: int, limits: Limits) -> None:
    """An animation kept animated holds every frame: their count, and frames x pixels, within the limits."""
    if frames > limits.max_frames:
        raise ImageTooLarge(f"source is an animation of {frames} frames, more than the limit of {limits.max_frames}")
    if frames * width * height > limits.max_pixels:
        raise ImageTooLarge(f"source is an animation of {frames} frames of {width}x{height} = "
                            f"{frames * width * height} pixels, more than the limit of {limits.max_pixels}")


def frame_count(im: Image.Image, data: bytes | None = None, limits: Limits | None = None) -> int:
    """Frames of an animation in an opened source (from its headers: GIF skips over the frame data, WebP and
    AVIF read their index); 1 for a still, and for the pages of a TIFF or the images of a HEIF collection,
    which are not an animation. With ``data`` and ``limits``, a GIF of more frames than the limit is refused
    after counting one past it (Pillow's count of 3 million tiny frames took 15 s)."""
    if im.format not in _ANIMATED_SOURCES:
        return 1
    if im.format == "GIF" and data is not None and limits is not None:
        bound = 4 * limits.max_frames
        quick = _gif_frames(data, bound + 1)
        if quick > limits.max_frames:
            many = f"more than {bound}" if quick > bound else str(quick)
            raise ImageTooLarge(f"source is an animation of {many} frames, more than the limit of {limits.max_frames}")
    try:
        return max(1, int(getattr(im, "n_frames", 1) or 1))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error, IndexError, RuntimeError):
        raise ImageUndecodable("source animation is damaged (its frames cannot be counted)") from None


def _gif_frames(data: bytes, stop: int) -> int:
    """Image descriptors in a GIF, counted by walking its blocks (no pixel decoded), up to ``stop``. Every
    frame Pillow reads has one, so this many frames at least are there."""
    if len(data) < 13 or not data.startswith(b"GIF"):
        return 0
    pos = 13 + ((3 << ((data[10] & 7) + 1)) if data[10] & 0x80 else 0)  # after the global colour table
    end, frames = len(data), 0
    while pos < end and frames < stop:
        kind = data[pos]
        if kind == 0x21:  # an extension: its label, then sub-blocks
            pos += 2
        elif kind == 0x2C and pos + 10 < end:  # a frame: its descriptor, colour table, LZW size, sub-blocks
            frames += 1
            flags = data[pos + 9]
            pos += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1
        else:  # the trailer, or something Pillow will judge
            break
        while pos < end:
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return frames


def probe_image(data: bytes, limits: Limits) -> tuple[str, int, int]:
    """Format and size from the header, within the limits (used by the planner to fail fast)."""
    im = open_image(data, limits)
    try:
        return im.format or "unknown", im.width, im.height
    finally:
        im.close()


def decode(data: bytes, limits: Limits, *, draft_box: tuple[int, int] | None = None) -> Image.Image:
    """Open, check, and load the first frame, EXIF-oriented. ``draft_box`` lets JPEG decode at a reduced scale."""
    im = open_image(data, limits)
    try:
        if draft_box and im.format == "JPEG":
            im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", draft_box)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            _png_grey_key(im, data)
            im = _orient(im)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error, IndexError, RuntimeError) as exc:
        raise ImageUndecodable(f"source image data is damaged or truncated ({type(exc).__name__}: {str(exc)[:120]})") from None
    except MemoryError:
        raise ImageTooLarge("source image does not fit in memory") from None
    return im


def _png_grey_key(im: Image.Image, data: bytes) -> None:
    """A 2- or 4-bit grey PNG's colour key (tRNS) on the scale of its pixels: Pillow widens the pixels to
    8 bits (x85, x17) and leaves the key as written, so no pixel matched it and the transparency was lost."""
    key = im.info.get("transparency")
    if im.format == "PNG" and im.mode == "L" and isinstance(key, int) and data[12:16] == b"IHDR" \
            and data[25] == 0 and data[24] in (2, 4):
        im.info["transparency"] = key * 255 // ((1 << data[24]) - 1)


def _orient(im: Image.Image) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not lose the image
        return im
    if oriented is not im:
        oriented.info.setdefault("icc_profile", im.info.get("icc_profile"))
    return oriented if oriented is not None else im


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


def strip_metadata(im: Image.Image) -> Image.Image:
    """Drop what Pillow carries from the source (EXIF with GPS, XMP, IPTC, comments, text chunks,
    the profile): writers pick some of it up from ``info`` unasked. Orientation is applied already."""
    im.info = {}
    return im


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
    to 8 bits) equals the key. A 1-bit or 16-bit grey PNG's transparency was lost in the conversion."""
    if not isinstance(key, int) or isinstance(key, bool):
        return grey
    alpha = ImageMath.lambda_eval(lambda a: (a["raw"] != key) * 255, raw=raw.convert("I")).convert("L")
    out = grey.convert("LA")
    out.putalpha(alpha)
    return out


def resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    if im.size == size:
        return im
    shrinking = size[0] < im.width and size[1] < im.height
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0 if shrinking else None)


def apply_layout(im: Image.Image, plan: Layout, background: str = "#ffffff00") -> Image.Image:
    """Scale, crop and pad as ``plan`` says. A crop resamples only the source region it keeps."""
    x, y, w, h = plan.crop
    if (w, h) == plan.scaled:
        out = resize(im, plan.scaled)
    else:
        fx, fy = im.width / plan.scaled[0], im.height / plan.scaled[1]
        box = (x * fx, y * fy, (x + w) * fx, (y + h) * fy)
        if (fx, fy) == (1.0, 1.0):
            out = im.crop(tuple(int(v) for v in box))
        else:
            shrinking = w < box[2] - box[0] and h < box[3] - box[1]
            out = im.resize((w, h), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0 if shrinking else None)
    if plan.canvas == (w, h):
        return out
    colour = parse_colour(background)
    canvas = Image.new("RGBA", plan.canvas, colour)
    canvas.alpha_composite(out.convert("RGBA"), dest=plan.offset)
    if colour[3] == 255 and out.mode in ("L", "RGB"):
        grey = colour[0] == colour[1] == colour[2]
        return canvas.convert("L" if out.mode == "L" and grey else "RGB")
    return canvas


def convert_for(im: Image.Image, pil_format: str, gif_colors: int = 256) -> Image.Image:
    """Make the image something the encoder writes right: JPEG has no alpha (flatten on white)."""
    allowed = _TARGET_MODES[pil_format]
    if im.mode in allowed:
        return im
    if pil_format == "GIF":
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


@dataclass(frozen=True)
class EncoderSettings:
    """The encoder's own parameters for one output, and what the output record says was applied."""
    params: dict
    quality: int = 0
    effort: int = -1
    progressive: bool = False
    lossless: bool = False


def encoder_settings(fmt: str, spec: OutputSpec, encoding: Encoding) -> EncoderSettings:
    """Quality and effort per format. ``effort`` (0 fastest ... 9 smallest) maps to each encoder's own knob:
    png compress_level = effort; webp method = effort x 6/9 (lossless: libwebp's preset of that level, its
    method and effort); avif speed = 10 - effort x 8/9 (10 ... 2: speeds 1 and 0 take minutes for a 1200 px
    image on one thread); jpg optimize (Huffman tables) from effort 5. GIF and TIFF have none."""
    pil_format = PIL_FORMATS[fmt]
    effort = spec.effort if 0 <= spec.effort <= EFFORT_MAX else -1
    if pil_format == "PNG":
        level = encoding.png_compress_level if effort < 0 else effort
        return EncoderSettings({"compress_level": level}, effort=effort)
    if pil_format == "JPEG":
        quality = spec.quality or encoding.jpeg_quality
        progressive = encoding.jpeg_progressive if spec.progressive is None else spec.progressive
        return EncoderSettings({"quality": quality, "optimize": effort >= 5, "progressive": progressive},
                               quality=quality, effort=effort, progressive=progressive)
    if pil_format == "WEBP":
        if spec.lossless:
            level = max(effort, 0)  # preset 0 unless asked: see docs/benchmarks.md
            method, effort_q = _WEBP_LOSSLESS[level]
            return EncoderSettings({"lossless": True, "quality": effort_q, "method": method, "exact": True},
                                   effort=effort, lossless=True)
        quality = spec.quality or encoding.webp_quality
        method = encoding.webp_method if effort < 0 else round(effort * 6 / EFFORT_MAX)
        return EncoderSettings({"quality": quality, "method": method}, quality=quality, effort=effort)
    if pil_format == "AVIF":
        quality = spec.quality or encoding.avif_quality
        speed = encoding.avif_speed if effort < 0 else 10 - round(effort * 8 / EFFORT_MAX)
        # one encoder thread: the pool already runs a task per core
        return EncoderSettings({"quality": quality, "speed": speed, "max_threads": 1}, quality=quality,
                               effort=effort)
    if pil_format == "TIFF":
        return EncoderSettings({"compression": "tiff_adobe_deflate"})
    return EncoderSettings({})


def encode(im: Image.Image, fmt: str, encoding: Encoding, settings: EncoderSettings | None = None, *,
           frames: tuple[Image.Image, ...] = (), durations: tuple[int, ...] = (), loop: int | None = 0,
           icc: bytes | None = None, exif: bytes | None = None, xmp: bytes | None = None) -> bytes:
    """Pixels, the profile (sRGB, or ``icc``: a kept source profile) and the kept ``exif``/``xmp``, nothing
    else: no other EXIF, XMP, IPTC, comments or text chunks. ``frames`` after ``im`` make an animation."""
    pil_format = PIL_FORMATS[fmt]
    settings = settings or encoder_settings(fmt, OutputSpec(fmt, 1, 1), encoding)
    out = io.BytesIO()
    im, frames = _bare(im), tuple(_bare(f) for f in frames)
    params: dict = dict(settings.params)
    if pil_format in ("PNG", "JPEG", "WEBP", "TIFF", "AVIF"):
        params["icc_profile"] = (icc or SRGB_ICC) if im.mode in ("RGB", "RGBA") else None
    if exif or xmp:
        params.update(_metadata_params(pil_format, exif, xmp))
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
    (``encoderinfo``) while it runs, and merges what it finds there into its own: two threads saving one
    shared image (a cached source that needs no resize, written as JPEG and TIFF at once) mixed their
    settings, and the loser's ``finally`` left them on the image for good ("quality setting only
    supported for 'jpeg' compression")."""
    im.load()
    own = im._new(im.im)
    transparency = im.info.get("transparency")
    own.info = {} if transparency is None else {"transparency": transparency}
    return own


def _metadata_params(pil_format: str, exif: bytes | None, xmp: bytes | None) -> dict:
    """Save parameters that write the kept EXIF and XMP in each format."""
    if pil_format == "JPEG":  # one APP1 segment each: what does not fit one is not kept
        return {k: v for k, v, room in (("exif", exif, _JPEG_EXIF_ROOM), ("xmp", xmp, _JPEG_XMP_ROOM))
                if v and len(v) <= room}
    if pil_format in ("WEBP", "AVIF"):
        return {k: v for k, v in (("exif", exif), ("xmp", xmp)) if v}
    if pil_format == "PNG":
        params: dict = {"exif": exif} if exif else {}
        if xmp:
            info = PngImagePlugin.PngInfo()
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
            params["pnginfo"] = info
        return params
    if pil_format == "TIFF":
        tags = {}
        if exif:
            kept = Image.Exif()
            kept.load(exif)
            tags = {tag: value for tag, value in kept.items() if isinstance(value, str) and tag in _TIFF_TEXT_TAGS}
        if xmp:
            tags[700] = xmp
        return {"tiffinfo": tags} if tags else {}
    return {}


# a JPEG marker segment holds 65533 bytes of data: EXIF after its 6-byte header, XMP after its 29-byte namespace
_JPEG_EXIF_ROOM = 65533 - 6
_JPEG_XMP_ROOM = 65533 - 29

# the text tags of a TIFF's first IFD that keepMetadata carries into a TIFF output
_TIFF_TEXT_TAGS = (ExifTags.Base.ImageDescription, ExifTags.Base.Make, ExifTags.Base.Model, ExifTags.Base.Software,
                   ExifTags.Base.DateTime, ExifTags.Base.Artist, ExifTags.Base.Copyright)


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


def resize_image(data: bytes | Image.Image | Source, spec: OutputSpec, limits: Limits,
                 encoding: Encoding) -> EncodedImage:
    """The whole step list for one output. ``data`` may be an already decoded image or ``Source`` (a cache
    hit; a bare image keeps no metadata or profile of its own)."""
    fmt = spec.format.lower()
    if fmt not in PIL_FORMATS or (fmt == "avif" and not features.check("avif")):
        raise UnsupportedFormat(f"output format {spec.format!r} is not supported")
    mode = spec.resize_mode
    if mode not in MODES or spec.gravity not in GRAVITIES:
        raise UnsupportedFormat(f"resize mode {mode!r} with gravity {spec.gravity!r} is not supported")
    if spec.keep_metadata not in KEEP_METADATA:
        raise UnsupportedFormat(f"keepMetadata {spec.keep_metadata!r} is not one of {', '.join(KEEP_METADATA)}")
    background = pad_background(spec) if mode == "pad" else ""
    options = spec.source_options
    if isinstance(data, Source):
        source = data
    elif isinstance(data, Image.Image):
        source = Source((data,))
    else:
        header = open_image(data, limits)
        box = layout(header.width, header.height, spec).scaled
        header.close()
        source = _prepare(data, limits, box, options)
    first = source.frames[0]
    plan = layout(first.width, first.height, spec, first)
    frames = source.frames if options.animated else source.frames[:1]
    check_output(plan, len(frames), limits)
    outs = [convert_for(apply_layout(f, plan, background or "#ffffff00"), PIL_FORMATS[fmt], encoding.gif_colors)
            for f in frames]
    settings = encoder_settings(fmt, spec, encoding)
    kept = options.keep_metadata != "none" and fmt in _METADATA_FORMATS
    icc = source.icc if options.keep_profile and outs[0].mode in ("RGB", "RGBA") else None
    body = encode(outs[0], fmt, encoding, settings, frames=tuple(outs[1:]), durations=source.durations[:len(outs)],
                  loop=source.loop, icc=icc, exif=source.exif if kept else None, xmp=source.xmp if kept else None)
    out = outs[0]
    return EncodedImage(body, out.width, out.height, fmt, CONTENT_TYPES[fmt], mode=mode,
                        gravity=spec.gravity if mode in ("fill", "pad") else "", enlarge=spec.enlarge,
                        background=background, quality=settings.quality, effort=settings.effort,
                        progressive=settings.progressive, lossless=settings.lossless, frames=len(outs),
                        keep_metadata=options.keep_metadata if kept else "none", keep_profile=icc is not None)


def draft_box_for(data: bytes, limits: Limits, max_box: tuple[int, int]) -> tuple[int, int] | None:
    """The smallest decode size that still covers every output of a request whose largest box is ``max_box``.

    Exact (non-fitting) outputs may stretch one axis and EXIF may swap the axes, so the box is a square
    of the largest side, covered on both axes."""
    side = max(max_box)
    if not side:
        return None
    header = open_image(data, limits)
    w, h = header.width, header.height
    header.close()
    scale = max(side / w, side / h)
    return (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else None


def prepare_source(data: bytes, limits: Limits, *, max_box: tuple[int, int] = (0, 0)) -> Image.Image:
    """Decode once for many outputs: the first frame, oriented, sRGB, mode-normalised, no metadata.
    With ``max_box``, a JPEG is decoded at the smallest reduced scale that still covers it."""
    return prepare(data, limits, max_box=max_box).image


def prepare(data: bytes, limits: Limits, *, max_box: tuple[int, int] = (0, 0),
            options: SourceOptions = SourceOptions()) -> Source:
    """Decode once for many outputs that share ``options`` (``OutputSpec.source_options``)."""
    return _prepare(data, limits, None if options.animated else draft_box_for(data, limits, max_box), options)


def _prepare(data: bytes, limits: Limits, draft_box: tuple[int, int] | None, options: SourceOptions) -> Source:
    if options.animated:
        header = open_image(data, limits)
        try:
            count = frame_count(header, data, limits)
        finally:
            header.close()
        if count > 1:
            return _prepare_animation(data, limits, count, options)
    im = decode(data, limits, draft_box=draft_box)
    exif, xmp = kept_metadata(im, options.keep_metadata)
    icc = _kept_profile(im, options.keep_profile)
    try:
        im = strip_metadata(normalise_mode(im) if icc else _normalise(im))
        im.load()
    except (OSError, ValueError, TypeError, IndexError) as exc:  # e.g. a tRNS longer than its palette
        raise ImageUndecodable(f"source image data is inconsistent ({type(exc).__name__}: {str(exc)[:120]})") from None
    except MemoryError:
        raise ImageTooLarge("source image does not fit in memory") from None
    return Source((im,), icc=icc, exif=exif, xmp=xmp)


def _prepare_animation(data: bytes, limits: Limits, count: int, options: SourceOptions) -> Source:
    """Every frame of an animated source, whole (GIF's and WebP's disposal and blending applied by Pillow),
    within the limits: the frame count and frames x pixels, from the headers, before any frame is decoded."""
    im = open_image(data, limits)
    check_frames(count, im.width, im.height, limits)
    frames: list[Image.Image] = []
    durations: list[int] = []
    icc = exif = xmp = source_icc = None
    loop: int | None = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(count):
                im.seek(i)
                check_frames(count, im.width, im.height, limits)  # a GIF frame past the screen grows it
                im.load()
                durations.append(max(0, int(im.info.get("duration") or 0)))
                frame = _orient(im.copy())
                if i == 0:
                    exif, xmp = kept_metadata(frame, options.keep_metadata)
                    icc = _kept_profile(frame, options.keep_profile)
                    source_icc = frame.info.get("icc_profile")
                    loop = im.info.get("loop", None if im.format == "GIF" else 0)  # a GIF without one plays once
                else:
                    frame.info["icc_profile"] = source_icc  # the first frame's profile holds for every frame
                if frame.mode in ("RGB", "RGBA") and not isinstance(frame.info.get("transparency"), tuple):
                    frame.info.pop("transparency", None)  # a GIF's palette index, meaningless after its frame 0
                frames.append(strip_metadata(normalise_mode(frame) if icc else _normalise(frame)))
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error, IndexError, RuntimeError) as exc:
        raise ImageUndecodable(f"source animation is damaged or truncated ({type(exc).__name__}: {str(exc)[:120]})") from None
    except MemoryError:
        raise ImageTooLarge("source animation does not fit in memory") from None
    finally:
        im.close()
    if len({f.mode for f in frames}) > 1 or len({f.size for f in frames}) > 1:
        size = frames[0].size
        wide = "RGBA" if any("A" in f.mode for f in frames) else "RGB"
        frames = [f.convert(wide) if f.size == size else _on_canvas(f.convert(wide), size) for f in frames]
    return Source(tuple(frames), tuple(durations), loop, icc=icc, exif=exif, xmp=xmp)


def _on_canvas(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    canvas = Image.new(im.mode, size)
    canvas.paste(im.crop((0, 0, min(size[0], im.width), min(size[1], im.height))), (0, 0))
    return canvas


def kept_metadata(im: Image.Image, level: str) -> tuple[bytes | None, bytes | None]:
    """The EXIF and XMP that ``keepMetadata`` keeps, read from an oriented image: none; copyright (EXIF
    Copyright and Artist only, no XMP); all (the EXIF with its orientation set to 1, since the pixels are
    turned already, GPS included, and the XMP). A block that cannot be read is dropped, never fatal."""
    if level not in ("copyright", "all"):
        return None, None
    try:
        exif = im.getexif()
    except Exception:  # a broken EXIF block: nothing of it is kept
        exif = Image.Exif()
    if level == "copyright":
        kept = Image.Exif()
        for tag in _COPYRIGHT_TAGS:
            if exif.get(tag):
                kept[tag] = exif[tag]
        return (kept.tobytes() if len(kept) else None), None
    try:
        if len(exif):
            for ifd in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
                if ifd in exif:
                    exif.get_ifd(ifd)  # loaded, so tobytes writes the sub-IFD again
            exif[ExifTags.Base.Orientation] = 1
            raw_exif = exif.tobytes()
        else:
            raw_exif = None
    except Exception:
        raw_exif = None
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return raw_exif, (xmp if isinstance(xmp, bytes) and xmp else None)


def _kept_profile(im: Image.Image, keep: bool) -> bytes | None:
    """The source's ICC profile when ``keepProfile`` asks for it and it can describe the output: an RGB
    profile on an RGB(A) (or palette) source. A CMYK or grey profile is never embedded in an RGB output:
    those sources are converted to sRGB as without the option."""
    icc = im.info.get("icc_profile")
    if not keep or not icc or len(icc) < 128 or icc[16:20] != b"RGB ":
        return None
    return icc if im.mode in ("RGB", "RGBA", "RGBX", "P", "PA") else None


def _normalise(im: Image.Image) -> Image.Image:
    """A decoded, oriented source -> sRGB, L/LA/RGB/RGBA, no metadata."""
    return strip_metadata(normalise_mode(to_srgb(im)))
