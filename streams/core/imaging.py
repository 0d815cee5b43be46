"""Bytes in, encoded image out: an ordered list of small steps.

check limits -> open (header only) -> check pixels -> draft -> load -> orient
-> to sRGB -> normalise mode -> strip metadata -> resize (fit, fill + crop at a gravity, force, pad on a
background) -> convert for the target -> encode (tagged sRGB).
Pixel limits are checked from the header, before any pixel is allocated.
"""
from __future__ import annotations

import hashlib
import io
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

from PIL import Image, ImageChops, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from streams.config import Encoding, Limits
from streams.core.errors import ImageTooLarge, ImageUndecodable, UnsupportedFormat
from streams.core.models import CONTENT_TYPES

# We enforce our own pixel limit before decoding; Pillow's global one would
# raise a different error at a different place.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "tiff": "TIFF"}
# Modes each encoder takes as they are; anything else is converted first.
_TARGET_MODES = {
    "PNG": ("1", "L", "LA", "RGB", "RGBA", "P"),
    "JPEG": ("L", "RGB"),
    "WEBP": ("RGB", "RGBA"),
    "GIF": ("P", "L"),
    "TIFF": ("1", "L", "LA", "RGB", "RGBA", "CMYK"),
}

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
_ALPHA_FORMATS = ("png", "webp", "gif", "tiff")
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
    quality: int = 0  # 1-100 for jpg/webp; 0 -> the Encoding's

    @property
    def resize_mode(self) -> str:
        return self.mode or ("fit" if self.maintain_aspect_ratio else "force")


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
    quality: int = 0  # jpg and webp only


@dataclass(frozen=True)
class Layout:
    """Where the pixels go, for a source of a given size: the whole source scaled to ``scaled``, the
    window ``crop`` (x, y, w, h, in scaled pixels) of it kept, and that pasted at ``offset`` on a
    ``canvas`` (pad only; else canvas is the crop's size and offset (0, 0))."""
    scaled: tuple[int, int]
    crop: tuple[int, int, int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int] = (0, 0)


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
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageUndecodable("source is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, TypeError, struct.error, EOFError) as exc:
        raise ImageUndecodable(f"source image header is damaged ({type(exc).__name__})") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - MAX_IMAGE_PIXELS is off
        raise ImageTooLarge(str(exc)) from None
    check_pixels(im.width, im.height, limits)
    return im


def check_pixels(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise ImageUndecodable(f"source declares an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"source is {width}x{height} = {width * height} pixels, more than the limit of {limits.max_pixels}")


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
            im = _orient(im)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, struct.error, IndexError) as exc:
        raise ImageUndecodable(f"source image data is damaged or truncated ({type(exc).__name__}: {str(exc)[:120]})") from None
    except MemoryError:
        raise ImageTooLarge("source image does not fit in memory") from None
    return im


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
        return im.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        return im.convert("RGBA" if has_alpha else "RGB")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: scale to 8 bits, rounded, instead of clipping at 255.
        top = 65535 if mode.startswith("I;16") else max(1, im.getextrema()[1] or 1)
        wide = im if mode == "I" else im.convert("I")
        if top <= 255:
            return wide.convert("L")
        return wide.point(lambda v: v * (255.0 / top) + 0.5).convert("L")
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


def encode(im: Image.Image, fmt: str, encoding: Encoding) -> bytes:
    """Pixels and the sRGB tag, nothing else: no EXIF, XMP, IPTC, comments or text chunks."""
    pil_format = PIL_FORMATS[fmt]
    out = io.BytesIO()
    if set(im.info) - {"transparency"} or hasattr(im, "tag_v2"):
        # not stripped (an image from elsewhere than prepare_source): the PNG, TIFF, JPEG and GIF writers
        # would copy its profile, comments and TIFF tags; a copy with none of it
        transparency = im.info.get("transparency")
        im = im.copy()
        im.info = {} if transparency is None else {"transparency": transparency}
    params: dict = {}
    if pil_format in ("PNG", "JPEG", "WEBP", "TIFF"):
        params["icc_profile"] = SRGB_ICC if im.mode in ("RGB", "RGBA") else None
    if pil_format == "PNG":
        params.update(compress_level=encoding.png_compress_level)
    elif pil_format == "JPEG":
        params.update(quality=encoding.jpeg_quality, optimize=False, progressive=False)
    elif pil_format == "WEBP":
        params.update(quality=encoding.webp_quality, method=encoding.webp_method)
    elif pil_format == "TIFF":
        params.update(compression="tiff_adobe_deflate")
    im.save(out, pil_format, **params)
    return out.getvalue()


def resize_image(data: bytes | Image.Image, spec: OutputSpec, limits: Limits, encoding: Encoding) -> EncodedImage:
    """The whole step list for one output. ``data`` may be an already decoded image (a cache hit)."""
    fmt = spec.format.lower()
    if fmt not in PIL_FORMATS:
        raise UnsupportedFormat(f"output format {spec.format!r} is not supported")
    mode = spec.resize_mode
    if mode not in MODES or spec.gravity not in GRAVITIES:
        raise UnsupportedFormat(f"resize mode {mode!r} with gravity {spec.gravity!r} is not supported")
    background = pad_background(spec) if mode == "pad" else ""
    if isinstance(data, Image.Image):
        im = data
    else:
        header = open_image(data, limits)
        box = layout(header.width, header.height, spec).scaled
        header.close()
        im = _normalise(decode(data, limits, draft_box=box))
    plan = layout(im.width, im.height, spec, im)
    out = convert_for(apply_layout(im, plan, background or "#ffffff00"), PIL_FORMATS[fmt], encoding.gif_colors)
    quality = 0
    if spec.quality and PIL_FORMATS[fmt] in ("JPEG", "WEBP"):
        encoding = replace(encoding, jpeg_quality=spec.quality, webp_quality=spec.quality)
    if PIL_FORMATS[fmt] in ("JPEG", "WEBP"):
        quality = encoding.jpeg_quality if PIL_FORMATS[fmt] == "JPEG" else encoding.webp_quality
    body = encode(out, fmt, encoding)
    return EncodedImage(body, out.width, out.height, fmt, CONTENT_TYPES[fmt], mode=mode,
                        gravity=spec.gravity if mode in ("fill", "pad") else "", enlarge=spec.enlarge,
                        background=background, quality=quality)


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
    """Decode once for many outputs: oriented, mode-normalised, ready for ``resize_image``.
    With ``max_box``, a JPEG is decoded at the smallest reduced scale that still covers it."""
    im = _normalise(decode(data, limits, draft_box=draft_box_for(data, limits, max_box)))
    im.load()
    return im


def _normalise(im: Image.Image) -> Image.Image:
    """A decoded, oriented source -> sRGB, L/LA/RGB/RGBA, no metadata."""
    return strip_metadata(normalise_mode(to_srgb(im)))
