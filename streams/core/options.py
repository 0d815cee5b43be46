"""How an output is made, beyond its format and box: one ``ImageOptions`` record shared by the request
(what is asked), the task (what one output asks, a size's own options over the request's) and the output
(what was applied). Each option is one row of ``OPTIONS``: its field, how a request's value is read, and
its default. Adding an option is one field here (and in ``schemas/io.imagefork.ImageOptions.avsc``) plus
the imaging step that uses it; the request's JSON, its validation, the task and the output follow.

None means "not said": the configured value, or the default of the row, or (in an output) not applicable
to its format."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from streams.core.formats import EFFORT_MAX

# Resize modes and gravities, with imgproxy's names (rs:fit, rs:fill, rs:force; pad is rs:fit + ex:1).
MODES = ("fit", "fill", "force", "pad")
GRAVITIES = ("center", "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest",
             "smart")
# keepMetadata: none (the default), copyright (EXIF Copyright and Artist), all (EXIF, orientation 1, and XMP)
KEEP_METADATA = ("none", "copyright", "all")

# (value, why): why is None when the value is good
Parsed = tuple[Any, "str | None"]


@dataclass(frozen=True)
class ImageOptions:
    resizeMode: str | None = None  # fit | fill | force | pad; None: fit, or force if maintainAspectRatio is false
    gravity: str | None = None  # fill's crop and pad's placement; None: center
    enlarge: bool | None = None  # False: never scale up; None: true
    background: str | None = None  # pad's canvas, #rrggbb or #rrggbbaa; None: transparent, white for JPEG
    quality: int | None = None  # 1-100, jpg, webp and avif; None: the configured one
    effort: int | None = None  # 0 (fastest) - 9 (smallest): png, jpg, webp, avif; None: the configured ones
    progressive: bool | None = None  # jpg; None: the configured one
    lossless: bool | None = None  # webp; None: false
    animated: bool | None = None  # gif, webp, avif outputs of an animated source stay animated; None: false
    keepMetadata: str | None = None  # none | copyright | all; None: none
    keepProfile: bool | None = None  # an RGB source's own ICC profile instead of sRGB; None: false
    sharpen: float | None = None  # an unsharp mask of this sigma (px) after the resize; None: none

    def over(self, base: "ImageOptions") -> "ImageOptions":
        """These options where said, ``base``'s elsewhere."""
        said = {k: v for k, v in self.said().items()}
        return replace(base, **said) if said else base

    def said(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def resolved(self) -> "ImageOptions":
        """Every option with a default set to it (the ones left None mean "the configured one")."""
        return self.over(DEFAULTS)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)  # the fields, in order (a frozen dataclass without slots)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ImageOptions":
        d = d or {}
        return cls(**{k: d[k] for k in NAMES if d.get(k) is not None})


NAMES = tuple(f.name for f in fields(ImageOptions))


# --- reading a request's values -------------------------------------------------------------------------
def boolean(value: Any) -> Parsed:
    """A JSON boolean, or the strings "true"/"false" (as the seed's worker took them)."""
    if isinstance(value, bool):
        return value, None
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true", None
    return None, f"must be true or false, got {value!r}"[:200]


def integer(minimum: int, maximum: int) -> Callable[[Any], Parsed]:
    def parse(value: Any) -> Parsed:
        if isinstance(value, bool):
            return None, "must be an integer, got a boolean"
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 9:
            value = int(value.strip())  # ASCII digits only: "²" is a digit to isdigit() and not to int()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            return None, f"is required and must be an integer, got {value!r}"[:200]
        if not minimum <= value <= maximum:
            return None, f"must be between {minimum} and {maximum}, got {value}"
        return value, None
    return parse


def number(minimum: float, maximum: float) -> Callable[[Any], Parsed]:
    """A finite number in [minimum, maximum], as a float."""
    def parse(value: Any) -> Parsed:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return None, f"must be a number, got {value!r}"[:200]
        if not minimum <= value <= maximum:  # an int of any size compares; none is formatted as a float
            return None, f"must be between {minimum:g} and {maximum:g}, got {value!r}"[:200]
        return float(value), None
    return parse


def choice(names: tuple[str, ...]) -> Callable[[Any], Parsed]:
    """One of ``names``, case and surrounding blanks ignored."""
    def parse(value: Any) -> Parsed:
        picked = value.strip().lower() if isinstance(value, str) else None
        if picked not in names:
            return None, f"{value!r} is not one of {', '.join(names)}"[:200]
        return picked, None
    return parse


def parse_colour(text: str) -> tuple[int, int, int, int]:
    """``#rrggbb`` or ``#rrggbbaa`` -> (r, g, b, a); raises ValueError."""
    digits = text[1:] if text.startswith("#") else ""
    if len(digits) not in (6, 8) or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"must be #rrggbb or #rrggbbaa, got {text!r}")
    rgba = [int(digits[i:i + 2], 16) for i in range(0, len(digits), 2)]
    return (*rgba, 255)[:4] if len(rgba) == 3 else tuple(rgba)  # type: ignore[return-value]


def colour(value: Any) -> Parsed:
    try:
        parse_colour(value if isinstance(value, str) else "")
    except ValueError:
        return None, f"must be #rrggbb or #rrggbbaa, got {value!r}"[:200]
    return value.lower(), None


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Parsed]
    default: Any = None  # what None resolves to; None here: the configured one


OPTIONS = (
    Option("resizeMode", choice(MODES)),  # its default comes from the request's maintainAspectRatio
    Option("gravity", choice(GRAVITIES), "center"),
    Option("enlarge", boolean, True),
    Option("background", colour),
    Option("quality", integer(1, 100)),
    Option("effort", integer(0, EFFORT_MAX)),
    Option("progressive", boolean),
    Option("lossless", boolean, False),
    Option("animated", boolean, False),
    Option("keepMetadata", choice(KEEP_METADATA), "none"),
    Option("keepProfile", boolean, False),
    Option("sharpen", number(0.1, 10.0)),
)
assert tuple(o.name for o in OPTIONS) == NAMES, "every field of ImageOptions has its row"
DEFAULTS = ImageOptions(**{o.name: o.default for o in OPTIONS if o.default is not None})


def parse_options(doc: dict, where: str, problems: list[tuple[str, str]], *, keep_bad: bool = False) -> ImageOptions:
    """The options of a request document or one of its sizes: given flat (``{"quality": 80}``, the seed's
    form) or in an ``options`` object, which wins; each bad value is noted with its field (``keep_bad``: kept
    as given instead, for a reader further on to refuse with its reason)."""
    nested = doc.get("options")
    if nested is not None and not isinstance(nested, dict):
        problems.append((f"{where}options", "must be an object"))
        nested = None
    values = {}
    for option in OPTIONS:
        field, value = option.name, doc.get(option.name)
        if nested is not None and nested.get(option.name) is not None:
            field, value = f"options.{option.name}", nested[option.name]
        if value is None:
            continue
        values[option.name], why = option.parse(value)
        if why and keep_bad:
            values[option.name] = value
        elif why:
            problems.append((f"{where}{field}", why))
    return ImageOptions(**{k: v for k, v in values.items() if v is not None})


# --- records written before ImageOptions ------------------------------------------------------------------
# Each record once carried its options as flat fields; they are still written beside ``options``, so that
# a process of an older version reads what a newer one wrote in a rolling deploy, and read when a record has
# no ``options`` (it was written before). The fields are frozen: a new option is in ``options`` only.
# record -> {flat field: (option, the flat value that meant "not said")}
_UNSAID = object()
LEGACY: dict[str, dict[str, tuple[str, Any]]] = {
    "ImageRequest": {"resizeMode": ("resizeMode", None), "gravity": ("gravity", None), "enlarge": ("enlarge", _UNSAID),
                     "background": ("background", None), "quality": ("quality", None),
                     "effort": ("effort", None), "progressive": ("progressive", None),
                     "lossless": ("lossless", _UNSAID), "animated": ("animated", _UNSAID),
                     "keepMetadata": ("keepMetadata", None), "keepProfile": ("keepProfile", _UNSAID)},
    "Size": {"resizeMode": ("resizeMode", None), "gravity": ("gravity", None), "quality": ("quality", None)},
    "ResizeTask": {"resizeMode": ("resizeMode", ""), "gravity": ("gravity", _UNSAID), "enlarge": ("enlarge", _UNSAID),
                   "background": ("background", ""), "quality": ("quality", 0), "effort": ("effort", -1),
                   "progressive": ("progressive", None), "lossless": ("lossless", _UNSAID),
                   "animated": ("animated", _UNSAID), "keepMetadata": ("keepMetadata", _UNSAID),
                   "keepProfile": ("keepProfile", _UNSAID)},
    "TaskOutput": {"mode": ("resizeMode", ""), "gravity": ("gravity", ""), "enlarge": ("enlarge", _UNSAID),
                   "background": ("background", ""), "quality": ("quality", 0), "effort": ("effort", -1),
                   "progressive": ("progressive", _UNSAID), "lossless": ("lossless", _UNSAID),
                   "keepMetadata": ("keepMetadata", ""), "keepProfile": ("keepProfile", _UNSAID)},
}
# what an older reader of a record finds in a flat field when the option is not said
_FLAT_DEFAULTS = {"ResizeTask": {"gravity": "center", "enlarge": True, "lossless": False, "animated": False,
                                 "keepMetadata": "none", "keepProfile": False},
                  "TaskOutput": {"enlarge": True, "progressive": False, "lossless": False, "keepProfile": False},
                  "ImageRequest": {"enlarge": True, "lossless": False, "animated": False, "keepProfile": False}}


def options_of(record: str, d: dict[str, Any]) -> ImageOptions:
    """A record's options: its ``options`` field, else (written before it) its flat fields."""
    if d.get("options") is not None:
        return ImageOptions.from_dict(d["options"])
    lifted = {}
    for flat, (name, unsaid) in LEGACY[record].items():
        value = d.get(flat)
        if value is not None and value != unsaid:
            lifted[name] = value
    return ImageOptions(**lifted)


def flat_fields(record: str, options: ImageOptions) -> dict[str, Any]:
    """The flat fields an older reader of ``record`` looks at, for ``options``."""
    given = options.__dict__
    out = {}
    for flat, name, unsaid in _FLAT[record]:
        value = given[name]
        out[flat] = unsaid if value is None else value
    return out


# record -> (flat field, option, what the field says when the option is not)
_FLAT = {record: tuple((flat, name, _FLAT_DEFAULTS.get(record, {}).get(flat, None if unsaid is _UNSAID else unsaid))
                       for flat, (name, unsaid) in fields_.items())
         for record, fields_ in LEGACY.items()}
