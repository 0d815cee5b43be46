"""Limits, checked from the header before any pixel is allocated: the source's bytes and pixels, an
animation's frames, an output's pixels; and the one place a source is opened (only the formats we read)."""
from __future__ import annotations

import io
import struct
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

from streams.config import Limits
from streams.core import formats
from streams.core.errors import ImageTooLarge, ImageUndecodable
from streams.core.imaging.geometry import Layout

# We enforce our own pixel limit before decoding; Pillow's global one would
# raise a different error at a different place.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

# what Pillow's readers raise on damaged or hostile bytes (each is IMAGE_UNDECODABLE, never a crash)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error, IndexError, RuntimeError)

try:  # HEIC/HEIF input (iPhone photos): pillow-heif's opener, so Image.open reads them like any other
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - a dependency; without it HEIC sources are IMAGE_UNDECODABLE
    pass


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Open lazily (header only) and refuse what breaks the limits."""
    if len(data) > limits.max_source_bytes:
        raise ImageTooLarge(f"source is {len(data)} bytes, more than the limit of {limits.max_source_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=formats.INPUT_FORMATS)
    except UnidentifiedImageError:
        raise ImageUndecodable(f"source is not an image in a format imagefork reads ({formats.INPUT_FORMAT_NAMES})") from None
    except DECODE_ERRORS as exc:
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


def check_output(plan: "Layout", frames: int, limits: Limits) -> None:
    """An output is held whole, every frame of it (a crop resamples only its window): within the pixel limit
    too (a 1x1 source asked at 10000x10000 is 100 million pixels, and a GIF encoder's several copies of them)."""
    w, h = plan.canvas
    if frames * w * h > limits.max_pixels:
        what = f"{w}x{h}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageTooLarge(f"output would be {what} = {frames * w * h} pixels, more than the limit of "
                            f"{limits.max_pixels}")


def frame_count(im: Image.Image, data: bytes | None = None, limits: Limits | None = None) -> int:
    """Frames of an animation in an opened source (from its headers: GIF skips over the frame data, WebP and
    AVIF read their index); 1 for a still, and for the pages of a TIFF or the images of a HEIF collection,
    which are not an animation. With ``data`` and ``limits``, a GIF of more frames than the limit is refused
    after counting one past it (Pillow's own count is slow on millions of tiny frames)."""
    if im.format not in formats.ANIMATED_SOURCES:
        return 1
    if im.format == "GIF" and data is not None and limits is not None:
        bound = 4 * limits.max_frames
        quick = gif_frames(data, bound + 1)
        if quick > limits.max_frames:
            many = f"more than {bound}" if quick > bound else str(quick)
            raise ImageTooLarge(f"source is an animation of {many} frames, more than the limit of {limits.max_frames}")
    try:
        return max(1, int(getattr(im, "n_frames", 1) or 1))
    except DECODE_ERRORS:
        raise ImageUndecodable("source animation is damaged (its frames cannot be counted)") from None


def gif_frames(data: bytes, stop: int) -> int:
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
