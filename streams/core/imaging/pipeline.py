"""One output from a source: ``resize_image`` runs the steps of ``STEPS`` in order over one ``Context``
(as imgproxy's ``processing/processing.go``). Each step reads what the ones before it set and sets its own
part; adding an image option is a field of ``ImageOptions`` (``core/options.py``) and, where it acts,
a step here."""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageFilter

from streams.config import Encoding, Limits
from streams.core.errors import UnsupportedFormat
from streams.core.formats import FORMATS, EncoderSettings, Format
from streams.core.imaging.encode import convert_for, encode, encoder_settings
from streams.core.imaging.geometry import Layout, apply_layout, layout, pad_background
from streams.core.imaging.limits import check_output, open_image
from streams.core.imaging.source import Source, prepare_opened
from streams.core.imaging.spec import GRAVITIES, KEEP_METADATA, MODES, EncodedImage, OutputSpec, SourceOptions
from streams.core.options import ImageOptions


@dataclass
class Context:
    spec: OutputSpec
    limits: Limits
    encoding: Encoding
    data: bytes | Image.Image | Source
    fmt: str = ""
    row: Format | None = None
    mode: str = ""
    background: str = ""  # pad only, #rrggbbaa
    options: SourceOptions = field(default_factory=SourceOptions)
    source: Source | None = None
    plan: Layout | None = None
    frames: list[Image.Image] = field(default_factory=list)  # the output's, converted for its format
    settings: EncoderSettings | None = None
    kept: bool = False  # the source's EXIF/XMP are written
    icc: bytes | None = None  # the source's own profile is embedded
    body: bytes = b""


def check_spec(ctx: Context) -> None:
    """The format (and the feature it needs), the mode, the gravity and the metadata level are ours."""
    spec = ctx.spec
    ctx.fmt = spec.format.lower()
    ctx.row = FORMATS.get(ctx.fmt)
    if ctx.row is None or not ctx.row.available():
        raise UnsupportedFormat(f"output format {spec.format!r} is not supported")
    o = spec.options
    ctx.mode = o.resizeMode
    if ctx.mode not in MODES or o.gravity not in GRAVITIES:
        raise UnsupportedFormat(f"resize mode {ctx.mode!r} with gravity {o.gravity!r} is not supported")
    if o.keepMetadata not in KEEP_METADATA:
        raise UnsupportedFormat(f"keepMetadata {o.keepMetadata!r} is not one of {', '.join(KEEP_METADATA)}")
    ctx.background = pad_background(spec) if ctx.mode == "pad" else ""
    ctx.options = spec.source_options


def load_source(ctx: Context) -> None:
    """A decoded ``Source`` as given (a cache hit), a bare image (it keeps no metadata or profile of its own),
    or bytes: opened once, decoded at the smallest JPEG draft scale that covers this output."""
    data = ctx.data
    if isinstance(data, Source):
        ctx.source = data
    elif isinstance(data, Image.Image):
        ctx.source = Source((data,))
    else:
        header = open_image(data, ctx.limits)
        box = layout(header.width, header.height, ctx.spec).scaled
        ctx.source = prepare_opened(header, data, ctx.limits, box, ctx.options)


def plan_layout(ctx: Context) -> None:
    """Where the pixels go (the smart gravity looks at the first frame), within the output pixel limit."""
    first = ctx.source.frames[0]
    ctx.plan = layout(first.width, first.height, ctx.spec, first)
    frames = ctx.source.frames if ctx.options.animated else ctx.source.frames[:1]
    check_output(ctx.plan, len(frames), ctx.limits)
    ctx.frames = list(frames)


def transform(ctx: Context) -> None:
    """Each frame through ``FRAME_STEPS``, one frame at a time (an animation is not held twice)."""
    ctx.frames = [_frame(ctx, f) for f in ctx.frames]


def _frame(ctx: Context, frame: Image.Image) -> Image.Image:
    for step in FRAME_STEPS:
        frame = step(ctx, frame)
    return frame


def place(ctx: Context, frame: Image.Image) -> Image.Image:
    """Scale, crop and pad."""
    return apply_layout(frame, ctx.plan, ctx.background or "#ffffff00")


def sharpen(ctx: Context, frame: Image.Image) -> Image.Image:
    """An unsharp mask of the asked sigma on the colour channels; alpha is left as it is."""
    sigma = ctx.spec.options.sharpen
    if not sigma:
        return frame
    mask = ImageFilter.UnsharpMask(radius=sigma, percent=100, threshold=0)
    if frame.mode in ("RGB", "L"):
        return frame.filter(mask)
    with_alpha = frame if frame.mode in ("RGBA", "LA") else frame.convert("RGBA")
    out = with_alpha.convert(with_alpha.mode[:-1] or "RGB").filter(mask)
    out.putalpha(with_alpha.getchannel("A"))
    return out


def convert(ctx: Context, frame: Image.Image) -> Image.Image:
    """What the format's writer takes (JPEG: no alpha; GIF: a palette)."""
    return convert_for(frame, ctx.fmt, ctx.encoding.gif_colors)


FRAME_STEPS = (place, sharpen, convert)


def choose_settings(ctx: Context) -> None:
    """The encoder's parameters, and what of the source's metadata and profile is written."""
    ctx.settings = encoder_settings(ctx.fmt, ctx.spec, ctx.encoding)
    ctx.kept = ctx.options.keep_metadata != "none" and ctx.row.metadata
    keep_icc = ctx.options.keep_profile and ctx.frames[0].mode in ("RGB", "RGBA")
    ctx.icc = ctx.source.icc if keep_icc else None


def write(ctx: Context) -> None:
    source, frames = ctx.source, ctx.frames
    ctx.body = encode(frames[0], ctx.fmt, ctx.encoding, ctx.settings, frames=tuple(frames[1:]),
                      durations=source.durations[:len(frames)], loop=source.loop, icc=ctx.icc,
                      exif=source.exif if ctx.kept else None, xmp=source.xmp if ctx.kept else None)


STEPS = (check_spec, load_source, plan_layout, transform, choose_settings, write)


def resize_image(data: bytes | Image.Image | Source, spec: OutputSpec, limits: Limits,
                 encoding: Encoding) -> EncodedImage:
    """One output of ``spec`` from ``data`` (bytes, a decoded image, or a ``Source``): every step in order."""
    ctx = Context(spec, limits, encoding, data)
    for step in STEPS:
        step(ctx)
    out, settings, mode = ctx.frames[0], ctx.settings, ctx.mode
    applied = ImageOptions(
        resizeMode=mode, gravity=spec.options.gravity if mode in ("fill", "pad") else None,
        enlarge=spec.options.enlarge, background=ctx.background or None, quality=settings.quality or None,
        effort=settings.effort if settings.effort >= 0 else None, progressive=settings.progressive,
        lossless=settings.lossless, animated=len(ctx.frames) > 1 or None,
        keepMetadata=ctx.options.keep_metadata if ctx.kept else "none", keepProfile=ctx.icc is not None,
        sharpen=spec.options.sharpen)
    return EncodedImage(ctx.body, out.width, out.height, ctx.fmt, ctx.row.mime, applied, frames=len(ctx.frames))
