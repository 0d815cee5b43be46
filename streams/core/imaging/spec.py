"""What one output asks for (``OutputSpec``, from a task), how its source must be prepared for it, and what
was made (``EncodedImage``). Resize modes and gravities have imgproxy's names (rs:fit, rs:fill, rs:force;
pad is rs:fit + ex:1)."""
from __future__ import annotations

from dataclasses import dataclass

from streams.core.formats import FORMATS

# Resize modes and gravities, with imgproxy's names (rs:fit, rs:fill, rs:force; pad is rs:fit + ex:1).
MODES = ("fit", "fill", "force", "pad")


GRAVITIES = ("center", "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest",
             "smart")


# keepMetadata: none (the default), copyright (EXIF Copyright and Artist), all (EXIF, orientation 1, and XMP)
KEEP_METADATA = ("none", "copyright", "all")


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
        row = FORMATS.get(self.format.lower())
        if row is None:
            return SourceOptions()
        return SourceOptions(animated=self.animated and row.animation, keep_profile=self.keep_profile and row.profile,
                             keep_metadata=self.keep_metadata if row.metadata else "none")


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


def task_spec(task) -> OutputSpec:
    """The output a task (its record as a dict) asks for."""
    return OutputSpec(task["format"], task["width"], task["height"], task["maintainAspectRatio"],
                      mode=task.get("resizeMode", ""), gravity=task.get("gravity", "center"),
                      enlarge=task.get("enlarge", True), background=task.get("background", ""),
                      quality=task.get("quality", 0), effort=task.get("effort", -1),
                      progressive=task.get("progressive"), lossless=task.get("lossless", False),
                      animated=task.get("animated", False), keep_metadata=task.get("keepMetadata") or "none",
                      keep_profile=task.get("keepProfile", False))
