"""Geometry: where one output's pixels go (fit, fill and crop at a gravity, force, pad on a canvas), and
the scaling and cropping that put them there."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from streams.core.formats import FORMATS
from streams.core.options import parse_colour
from streams.core.imaging.spec import OutputSpec

_SMART_SIDE = 128  # smart gravity scores crop windows on a greyscale thumbnail this long


_SMART_STEPS = 8   # ... at this many steps (plus one) along each axis that has room to slide


@dataclass(frozen=True)
class Layout:
    """Where the pixels go, for a source of a given size: the whole source scaled to ``scaled``, the
    window ``crop`` (x, y, w, h, in scaled pixels) of it kept, and that pasted at ``offset`` on a
    ``canvas`` (pad only; else canvas is the crop's size and offset (0, 0))."""
    scaled: tuple[int, int]
    crop: tuple[int, int, int, int]
    canvas: tuple[int, int]
    offset: tuple[int, int] = (0, 0)


def layout(src_w: int, src_h: int, spec: OutputSpec, image: Image.Image | None = None) -> Layout:
    """The geometry of one output (pure; ``image`` is needed only for the smart gravity).

    fit: inside the box. fill: cover the box, then crop it at the gravity. force: exactly the box.
    pad: fit, then centred (or at the gravity) on a box-sized canvas. Without ``enlarge`` nothing is
    scaled up: fit, fill and pad scale by at most 1 (fill's crop is then at most the source; pad's canvas
    is still the box), force scales both axes down together until neither is enlarged (imgproxy's rule)."""
    box_w, box_h, o = spec.width, spec.height, spec.options
    mode = o.resizeMode
    if mode == "force":
        sx, sy = box_w / src_w, box_h / src_h
        if not o.enlarge and max(sx, sy) > 1:
            sx, sy = sx / max(sx, sy), sy / max(sx, sy)
        size = (max(1, round(src_w * sx)), max(1, round(src_h * sy)))
        return Layout(size, (0, 0, *size), size)
    scale = max(box_w / src_w, box_h / src_h) if mode == "fill" else min(box_w / src_w, box_h / src_h)
    if not o.enlarge:
        scale = min(scale, 1.0)
    scaled = (max(1, round(src_w * scale)), max(1, round(src_h * scale)))
    if mode == "fill":
        window = (min(box_w, scaled[0]), min(box_h, scaled[1]))
        if o.gravity == "smart" and image is not None:
            x, y = _smart_offset(image, scaled, window)
        else:
            x, y = _gravity_offset(o.gravity, scaled[0] - window[0], scaled[1] - window[1])
        return Layout(scaled, (x, y, *window), window)
    if mode == "pad":
        offset = _gravity_offset(o.gravity, box_w - scaled[0], box_h - scaled[1])
        return Layout(scaled, (0, 0, *scaled), (box_w, box_h), offset)
    return Layout(scaled, (0, 0, *scaled), scaled)


def target_size(src_w: int, src_h: int, spec: OutputSpec) -> tuple[int, int]:
    """The size of the output image (the canvas)."""
    return layout(src_w, src_h, spec).canvas


def certain_output_pixels(src_w: int, src_h: int, spec: OutputSpec) -> int:
    """The fewest pixels one frame of this output can have over a source whose header says ``src_w`` x
    ``src_h``, whichever way its EXIF orientation turns it: the planner refuses what is over the limit even
    so, before any task runs."""
    return min(w * h for w, h in (target_size(src_w, src_h, spec), target_size(src_h, src_w, spec)))


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


def pad_background(spec: OutputSpec) -> str:
    """The pad canvas colour as ``#rrggbbaa``: the spec's, else transparent where the format keeps
    alpha, white for JPEG."""
    if spec.options.background:
        return "#%02x%02x%02x%02x" % parse_colour(spec.options.background)
    row = FORMATS.get(spec.format.lower())
    return "#ffffff00" if row is not None and row.alpha else "#ffffffff"


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
