"""What one output asks for (``OutputSpec``, from a task), how its source must be prepared for it, and what
was made (``EncodedImage``). Resize modes and gravities have imgproxy's names (rs:fit, rs:fill, rs:force;
pad is rs:fit + ex:1)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from streams.core.formats import FORMATS
from streams.core.options import GRAVITIES, KEEP_METADATA, MODES, ImageOptions, options_of

__all__ = ["GRAVITIES", "KEEP_METADATA", "MODES", "EncodedImage", "OutputSpec", "SourceOptions", "task_spec"]


@dataclass(frozen=True, init=False)
class OutputSpec:
    """One output: its format, its box, and its options with every default filled in (``quality``,
    ``effort``, ``progressive`` and ``background`` may stay None: the configured one, the format's)."""
    format: str
    width: int
    height: int
    options: ImageOptions

    def __init__(self, format: str, width: int, height: int, maintain_aspect_ratio: bool = True,
                 options: ImageOptions | None = None, **given):
        """``given``: options by their contract names, over ``options``; with no resizeMode, fit (force
        when ``maintain_aspect_ratio`` is false, the seed's flag)."""
        asked = ImageOptions(**given).over(options or ImageOptions())
        if asked.resizeMode is None:
            asked = replace(asked, resizeMode="fit" if maintain_aspect_ratio else "force")
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "options", asked.resolved())

    @property
    def source_options(self) -> "SourceOptions":
        """How the source must be prepared for this output (what a cached source is keyed by)."""
        row = FORMATS.get(self.format.lower())
        if row is None:
            return SourceOptions()
        o = self.options
        return SourceOptions(animated=o.animated and row.animation, keep_profile=o.keepProfile and row.profile,
                             keep_metadata=o.keepMetadata if row.metadata else "none")


@dataclass(frozen=True)
class SourceOptions:
    animated: bool = False  # every frame, not only the first
    keep_profile: bool = False
    keep_metadata: str = "none"

    @property
    def key(self) -> str:
        return f"a{int(self.animated)}p{int(self.keep_profile)}m{self.keep_metadata}"


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int
    format: str
    content_type: str
    applied: ImageOptions  # what was applied; None: not applied (not a knob of the format, or not asked)
    frames: int = 1


def task_spec(task: dict) -> OutputSpec:
    """The output a task (its record as a dict) asks for."""
    return OutputSpec(task["format"], task["width"], task["height"], task["maintainAspectRatio"],
                      options_of("ResizeTask", task))
