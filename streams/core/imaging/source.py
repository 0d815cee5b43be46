"""The source, decoded once for any number of outputs: the first frame (or every frame of an animation kept
animated), oriented, in sRGB or with its kept profile, L/LA/RGB/RGBA, its metadata set aside."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

from PIL import Image

from streams.config import Limits
from streams.core.errors import ImageTooLarge, ImageUndecodable
from streams.core.imaging.colour import normalise_mode, to_srgb
from streams.core.imaging.facts import SourceInfo, source_info
from streams.core.imaging.limits import DECODE_ERRORS, check_frames, frame_count, open_image
from streams.core.imaging.metadata import kept_metadata, kept_profile, orient, strip_metadata
from streams.core.imaging.spec import SourceOptions


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
    info: SourceInfo | None = None  # what the source is (its header's facts, its SHA-256)

    @property
    def image(self) -> Image.Image:
        return self.frames[0]

    @property
    def nbytes(self) -> int:
        return sum(f.width * f.height * max(1, len(f.getbands())) for f in self.frames)


def decode(im: Image.Image, data: bytes, *, draft_box: tuple[int, int] | None = None) -> Image.Image:
    """Load the first frame of the opened (and checked) ``im``, EXIF-oriented. ``draft_box`` lets JPEG decode at
    a reduced scale."""
    try:
        if draft_box and im.format == "JPEG":
            im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", draft_box)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            _png_grey_key(im, data)
            im = orient(im)
    except DECODE_ERRORS as exc:
        raise ImageUndecodable(f"source image data is damaged or truncated ({type(exc).__name__}: {str(exc)[:120]})") from None
    except MemoryError:
        raise ImageTooLarge("source image does not fit in memory") from None
    return im


def _png_grey_key(im: Image.Image, data: bytes) -> None:
    """A 2- or 4-bit grey PNG's colour key (tRNS) on the scale of its pixels: Pillow widens the pixels to
    8 bits (x85, x17) but leaves the key as written, where no pixel would match it."""
    key = im.info.get("transparency")
    if im.format == "PNG" and im.mode == "L" and isinstance(key, int) and data[12:16] == b"IHDR" \
            and data[25] == 0 and data[24] in (2, 4):
        im.info["transparency"] = key * 255 // ((1 << data[24]) - 1)


def draft_box_for(header: Image.Image, max_box: tuple[int, int]) -> tuple[int, int] | None:
    """The smallest decode size that still covers every output of a request whose largest box is ``max_box``.

    Exact (non-fitting) outputs may stretch one axis and EXIF may swap the axes, so the box is a square
    of the largest side, covered on both axes."""
    side = max(max_box)
    if not side:
        return None
    w, h = header.width, header.height
    scale = max(side / w, side / h)
    return (max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else None


def prepare_source(data: bytes, limits: Limits, *, max_box: tuple[int, int] = (0, 0)) -> Image.Image:
    """Decode once for many outputs: the first frame, oriented, sRGB, mode-normalised, no metadata.
    With ``max_box``, a JPEG is decoded at the smallest reduced scale that still covers it."""
    return prepare(data, limits, max_box=max_box).image


def prepare(data: bytes, limits: Limits, *, max_box: tuple[int, int] = (0, 0),
            options: SourceOptions = SourceOptions(), header: Image.Image | None = None) -> Source:
    """Decode once for many outputs that share ``options`` (``OutputSpec.source_options``). ``header``: the
    source opened already (``open_image``), so that its header is read once."""
    header = header if header is not None else open_image(data, limits)
    return prepare_opened(header, data, limits, None if options.animated else draft_box_for(header, max_box), options)


def decode_cost(header: Image.Image, data: bytes, limits: Limits, max_box: tuple[int, int],
                options: SourceOptions = SourceOptions()) -> int:
    """Bytes the decode of the opened ``header`` may hold at its peak: the frame (at its draft size) and one
    converted copy, 4 bytes a pixel; an animation kept animated holds every frame (and one copy)."""
    w, h = header.width, header.height
    try:
        frames = frame_count(header, data, limits) if options.animated else 1
    except BaseException:
        header.close()
        raise
    jpeg = header.format == "JPEG"
    if frames > 1:
        return (frames + 1) * w * h * 4
    # only JPEG decodes at a reduced scale, and not when asked to keep an animation (prepare draws no draft
    # then: a still JPEG under `animated: true` is decoded whole)
    box = draft_box_for(header, max_box) if jpeg and not options.animated else None
    if box:
        scale = 1
        while w // (scale * 2) >= box[0] and h // (scale * 2) >= box[1] and scale < 8:
            scale *= 2  # JPEG's reduced decode halves the size per step, up to 1/8
        w, h = -(-w // scale), -(-h // scale)
    return 2 * w * h * 4


def prepare_opened(im: Image.Image, data: bytes, limits: Limits, draft_box: tuple[int, int] | None,
                   options: SourceOptions) -> Source:
    """``prepare`` of a source opened already (``open_image``: its header read and checked, once)."""
    try:
        info = source_info(im, data, limits)  # before the decode: a JPEG draft changes the header's size
        count = frame_count(im, data, limits) if options.animated else 1
    except BaseException:
        im.close()
        raise
    if count > 1:
        return replace(_prepare_animation(im, limits, count, options), info=info)
    im = decode(im, data, draft_box=draft_box)
    exif, xmp = kept_metadata(im, options.keep_metadata)
    icc = kept_profile(im, options.keep_profile)
    try:
        im = strip_metadata(normalise_mode(im) if icc else _normalise(im))
        im.load()
    except (OSError, ValueError, TypeError, IndexError) as exc:  # e.g. a tRNS longer than its palette
        raise ImageUndecodable(f"source image data is inconsistent ({type(exc).__name__}: {str(exc)[:120]})") from None
    except MemoryError:
        raise ImageTooLarge("source image does not fit in memory") from None
    return Source((im,), icc=icc, exif=exif, xmp=xmp, info=info)


def _prepare_animation(im: Image.Image, limits: Limits, count: int, options: SourceOptions) -> Source:
    """Every frame of an animated source, whole (GIF's and WebP's disposal and blending applied by Pillow),
    within the limits: the frame count and frames x pixels, from the headers, before any frame is decoded."""
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
                frame = orient(im.copy())
                if i == 0:
                    exif, xmp = kept_metadata(frame, options.keep_metadata)
                    icc = kept_profile(frame, options.keep_profile)
                    source_icc = frame.info.get("icc_profile")
                    loop = im.info.get("loop", None if im.format == "GIF" else 0)  # a GIF without one plays once
                else:
                    frame.info["icc_profile"] = source_icc  # the first frame's profile holds for every frame
                if frame.mode in ("RGB", "RGBA") and not isinstance(frame.info.get("transparency"), tuple):
                    frame.info.pop("transparency", None)  # a GIF's palette index, meaningless after its frame 0
                frames.append(strip_metadata(normalise_mode(frame) if icc else _normalise(frame)))
    except DECODE_ERRORS as exc:
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


def _normalise(im: Image.Image) -> Image.Image:
    """A decoded, oriented source -> sRGB, L/LA/RGB/RGBA, no metadata."""
    return strip_metadata(normalise_mode(to_srgb(im)))
