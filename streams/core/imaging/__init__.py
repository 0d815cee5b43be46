"""Bytes in, encoded image out (pure: no I/O), in small steps.

check limits -> open (header only, once) -> check pixels (every frame of a kept animation) -> draft -> load
-> orient -> keep what the request keeps (EXIF/XMP, the source profile) -> to sRGB -> normalise mode
-> strip metadata -> resize (fit, fill + crop at a gravity, force, pad on a background; each frame
with the same layout) -> convert for the target -> encode (tagged sRGB or the kept profile; the kept
EXIF/XMP; quality, effort, progressive, lossless).

- ``limits``: opening a source (only the formats we read) and every pixel and frame limit
- ``source``: decoding once for many outputs (``prepare``: a ``Source``)
- ``colour``, ``metadata``, ``geometry``, ``encode``: the steps' own work
- ``spec``: what an output asks for; ``pipeline``: ``resize_image``, its steps in order
- the formats themselves: ``streams/core/formats.py``
"""
from streams.core.formats import EFFORT_MAX
from streams.core.imaging.colour import SRGB_ICC
from streams.core.options import parse_colour
from streams.core.imaging.encode import encode, encoder_settings
from streams.core.imaging.geometry import Layout, apply_layout, certain_output_pixels, layout, resize, target_size
from streams.core.imaging.limits import frame_count, open_image, probe_image
from streams.core.imaging.pipeline import resize_image
from streams.core.imaging.source import Source, decode_cost, draft_box_for, prepare, prepare_source
from streams.core.imaging.spec import GRAVITIES, KEEP_METADATA, MODES, EncodedImage, OutputSpec, SourceOptions, task_spec

__all__ = [
    "EFFORT_MAX", "GRAVITIES", "KEEP_METADATA", "MODES", "SRGB_ICC", "EncodedImage", "Layout", "OutputSpec", "Source",
    "SourceOptions", "apply_layout", "certain_output_pixels", "decode_cost", "draft_box_for", "encode", "encoder_settings",
    "frame_count", "layout", "open_image", "parse_colour", "prepare", "prepare_source", "probe_image", "resize",
    "resize_image", "target_size", "task_spec",
]
