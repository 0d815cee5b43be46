"""Request -> tasks: validate the seed's document, then fan out one task per format x size."""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace
from typing import Any, Iterable
from urllib.parse import urlsplit

from streams.core.errors import RequestInvalid
from streams.core.formats import FORMATS
from streams.core.models import (
    COSTLY_FACTS, ImageRequest, Preset, ResizeTask, RetryOf, Size, TaskDescriptor, TaskOutput, WorkflowPlan,
)
from streams.core.options import ImageOptions, boolean, integer, parse_options
from streams.core.webhooks import callback_problem

TASK_NAME = "image_convert_resize"
LANES = ("interactive", "batch")  # a request's priority: the lane its tasks go to (core/lanes.py)
SCHEMES = ("http", "https", "s3")
_WORKFLOW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_MAX_ID_TEXT = 512


def task_ref(fmt: str, size: Size, index: int) -> str:
    """The seed's reference name: ``image_convert_resize_{format}_{w}x{h}_{i}``."""
    return f"{TASK_NAME}_{fmt}_{size.width}x{size.height}_{index}"


def output_key(prefix: str, workflow_id: str, ref: str, fmt: str) -> str:
    row = FORMATS.get(fmt)
    return f"{prefix}{workflow_id}/{ref}.{row.suffix if row else fmt}"


def parse_request(doc: Any, *, max_dimension: int, max_tasks: int, max_pixels: int = 0,
                  formats: Iterable[str] = tuple(FORMATS), presets=None) -> ImageRequest:
    """Read and validate one request document; every problem is reported with its field. With
    ``max_pixels``, an output whose size is certain before the source is read (pad; force and fill when
    they may enlarge) and over that many pixels is refused here, not failed after its source was fetched.
    A request that names a preset is parsed with ``presets`` (name -> Preset)."""
    if not isinstance(doc, dict):
        raise RequestInvalid([("$", f"must be a JSON object, got {type(doc).__name__}")])
    bad_text = _unencodable(doc, "")
    if bad_text:  # a lone surrogate ("\ud800" in JSON) passes json.loads and breaks every encoder after it
        raise RequestInvalid([(bad_text, "is not valid Unicode text (a lone surrogate)")])
    problems: list[tuple[str, str]] = []
    known = tuple(formats)

    location = doc.get("fileLocation")
    if not isinstance(location, str) or not location.strip():
        problems.append(("fileLocation", "is required and must be a non-empty string"))
    else:
        location = location.strip()
        problems.extend(_check_location(location))

    preset = _preset(doc, presets, problems, max_dimension=max_dimension, max_tasks=max_tasks,
                     max_pixels=max_pixels, formats=known)
    # a request that names a preset may ask for nothing of its own (no formats, no sizes, or both empty)
    own = doc.get("preset") is None or bool(doc.get("outputFormats")) or bool(doc.get("outputSizes"))
    out_formats, sizes, size_fields, keep, options = _outputs(doc, "", problems, max_dimension, known, own=own)
    ids = {}
    for name in ("workflowId", "correlationId"):
        value = doc.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > _MAX_ID_TEXT):
            problems.append((name, f"must be a string of at most {_MAX_ID_TEXT} characters"))
        else:
            ids[name] = value or None
    if ids.get("workflowId") is not None and not valid_workflow_id(ids["workflowId"]):
        problems.append(("workflowId", "must be 1-128 characters of A-Z a-z 0-9 . _ : - (it names S3 keys)"))

    retry = _retry(doc.get("retry"), problems)
    priority = doc.get("priority")
    priority = "interactive" if priority is None or priority == "" else priority
    if not isinstance(priority, str) or priority.strip().lower() not in LANES:
        problems.append(("priority", f"must be one of {', '.join(LANES)} (absent: interactive)"))
        priority = "interactive"
    facts = _facts(doc.get("facts"), problems)
    callback = doc.get("callbackUrl")
    if callback is not None and (why := callback_problem(callback)):
        problems.append(("callbackUrl", why))
    if max_pixels and not problems:
        problems.extend(_certain_boxes_over(sizes, size_fields, options, max_pixels))

    count = len(out_formats) * len(sizes) + (len(preset.outputFormats) * len(preset.outputSizes) if preset else 0)
    if not problems and count > max_tasks:
        problems.append(("outputSizes",
                         f"{len(out_formats)} formats x {len(sizes)} sizes = {len(out_formats) * len(sizes)} tasks"
                         + (f" and the preset's {count - len(out_formats) * len(sizes)}" if preset else "")
                         + f", more than the limit of {max_tasks}"))
    if problems:
        raise RequestInvalid(problems)
    return ImageRequest(
        fileLocation=location,
        outputFormats=tuple(out_formats),
        outputSizes=tuple(sizes),
        maintainAspectRatio=keep,
        workflowId=ids.get("workflowId"),
        correlationId=ids.get("correlationId"),
        options=options,
        retry=retry,
        facts=facts,
        callbackUrl=callback,
        preset=preset,
        priority=priority.strip().lower(),
    )


def _outputs(doc: dict, where: str, problems: list[tuple[str, str]], max_dimension: int, known: tuple[str, ...],
             own: bool = True) -> tuple[list[str], list[Size], list[str], bool, ImageOptions]:
    """The formats, sizes (and the field each came from), maintainAspectRatio and options of a request or
    a preset; without ``own`` (a request that names a preset and asks for nothing else), no formats or sizes."""
    out_formats: list[str] = []
    raw_formats = doc.get("outputFormats") if own else []
    if not isinstance(raw_formats, list) or (own and not raw_formats):
        problems.append((f"{where}outputFormats", "is required and must be a non-empty list"))
    else:
        for i, f in enumerate(raw_formats):
            name = f.strip().lower().lstrip(".") if isinstance(f, str) else None
            if name not in known:
                problems.append((f"{where}outputFormats[{i}]", f"{f!r} is not one of {', '.join(known)}"[:300]))
            else:
                out_formats.append(name)

    sizes: list[Size] = []
    size_fields: list[str] = []  # the field each of ``sizes`` came from
    raw_sizes = doc.get("outputSizes") if own else []
    if not isinstance(raw_sizes, list) or (own and not raw_sizes):
        problems.append((f"{where}outputSizes", "is required and must be a non-empty list of {width, height}"))
    else:
        for i, s in enumerate(raw_sizes):
            if not isinstance(s, dict):
                problems.append((f"{where}outputSizes[{i}]", "must be an object {width, height}"))
                continue
            dims = []
            for axis in ("width", "height"):
                value, why = _dimension(s.get(axis), max_dimension)
                if why:
                    problems.append((f"{where}outputSizes[{i}].{axis}", why))
                dims.append(value)
            own = parse_options(s, f"{where}outputSizes[{i}].", problems)
            if all(d is not None for d in dims):
                sizes.append(Size(dims[0], dims[1], own))
                size_fields.append(f"{where}outputSizes[{i}]")

    keep, why = parse_boolean(doc.get("maintainAspectRatio", True))
    if why:
        problems.append((f"{where}maintainAspectRatio", why))
    options = parse_options(doc, where, problems)
    # resizeMode wins over maintainAspectRatio when both are given and disagree
    options = replace(options, resizeMode=options.resizeMode or ("fit" if keep else "force"))
    return out_formats, sizes, size_fields, keep, options


def parse_preset(doc: Any, name: str, version: int, *, max_dimension: int, max_tasks: int, max_pixels: int = 0,
                 formats: Iterable[str] = tuple(FORMATS), where: str = "", description: Any = "",
                 updated_at: int = 0) -> Preset:
    """A preset's document (formats, sizes, options, as a request writes them), validated as a request's;
    its problems are named under ``where`` (RequestInvalid)."""
    problems: list[tuple[str, str]] = []
    if not isinstance(doc, dict):
        raise RequestInvalid([(where.rstrip(".") or "$", "must be a JSON object {outputFormats, outputSizes, ...}")])
    bad_text = _unencodable(doc, where.rstrip("."))
    if bad_text:
        raise RequestInvalid([(bad_text, "is not valid Unicode text (a lone surrogate)")])
    if not valid_preset_name(name):
        problems.append((f"{where}name", "must be 1-64 characters of a-z 0-9 . _ - (starting with a letter or digit)"))
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2 ** 31:
        problems.append((f"{where}version", "must be an integer from 1"))
    if not isinstance(description, str) or len(description) > 1000:
        problems.append((f"{where}description", "must be a string of at most 1000 characters"))
    known = tuple(formats)
    out_formats, sizes, size_fields, keep, options = _outputs(doc, where, problems, max_dimension, known)
    if max_pixels and not problems:
        problems.extend(_certain_boxes_over(sizes, size_fields, options, max_pixels))
    # an output asked twice would be two tasks writing one output (a regeneration keeps outputs by spec)
    for i, fmt in enumerate(out_formats):
        if fmt in out_formats[:i]:
            problems.append((f"{where}outputFormats[{i}]", f"repeats {fmt!r}"))
    for i, size in enumerate(sizes):
        first = next((j for j, other in enumerate(sizes[:i]) if other == size), None)
        if first is not None:
            problems.append((size_fields[i], f"repeats {size_fields[first]} (the same box and options)"))
    if not problems and len(out_formats) * len(sizes) > max_tasks:
        count = len(out_formats) * len(sizes)
        problems.append((f"{where}outputSizes", f"{len(out_formats)} formats x {len(sizes)} sizes = {count} tasks, "
                                                f"more than the limit of {max_tasks}"))
    if problems:
        raise RequestInvalid(problems)
    return Preset(name, version, tuple(out_formats), tuple(sizes), keep, options, description, updated_at)


_PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def valid_preset_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_PRESET_NAME.fullmatch(name))


def _preset(doc: dict, presets, problems: list[tuple[str, str]], **limits) -> Preset | None:
    """The request's ``preset``: a name, resolved in ``presets`` (a mapping name -> Preset); or, in a retry
    (a regeneration), the preset as the run is to use it, written whole."""
    value = doc.get("preset")
    if value is None:
        return None
    if isinstance(value, str):
        if presets is None:
            raise ValueError("a request that names a preset is parsed with the presets")
        found = presets.get(value.strip())
        if found is None:
            known = ", ".join(sorted(presets)[:20]) or "none"
            problems.append(("preset", f"no preset named {value[:100]!r} (known: {known})"[:400]))
        return found
    if isinstance(value, dict) and "retry" in doc:
        try:
            return parse_preset(value, value.get("name"), value.get("version"), where="preset.", **limits)
        except RequestInvalid as exc:
            problems.extend(exc.problems)
            return None
    problems.append(("preset", "must be the name of a preset (GET /v1/presets)"))
    return None


def _retry(value: Any, problems: list[tuple[str, str]]) -> RetryOf | None:
    """The ``retry`` field (written by the API's retry): which run, which tasks again, which outputs kept."""
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(("retry", "must be an object {runId, taskRefs, outputs}"))
        return None
    run_id, refs, outputs = value.get("runId"), value.get("taskRefs") or [], value.get("outputs") or []
    sha = value.get("sourceSha256") or ""
    if not isinstance(sha, str) or (sha and not re.fullmatch(r"[0-9a-f]{64}", sha)):
        problems.append(("retry.sourceSha256", "must be 64 lower-case hex digits"))
        sha = ""
    if not isinstance(run_id, str) or not run_id:
        problems.append(("retry.runId", "is required: the run id of the finished run to retry"))
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        problems.append(("retry.taskRefs", "must be a list of task references"))
        refs = []
    kept = []
    if not isinstance(outputs, list):
        problems.append(("retry.outputs", "must be a list of outputs"))
        outputs = []
    for i, o in enumerate(outputs):
        try:
            kept.append(TaskOutput.from_dict(o))
        except (TypeError, KeyError, AttributeError):
            problems.append((f"retry.outputs[{i}]", "is not an output record"))
    return RetryOf(run_id if isinstance(run_id, str) else "", tuple(refs), tuple(kept), sha)


def _facts(value: Any, problems: list[tuple[str, str]]) -> tuple[str, ...] | None:
    """The costly source facts asked: a list of ``COSTLY_FACTS`` (None: all of them)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(("facts", f"must be a list of {', '.join(COSTLY_FACTS)} (or absent: all)"))
        return None
    names = [v.strip().lower() for v in value]
    unknown = [v for v in names if v not in COSTLY_FACTS]
    if unknown:
        problems.append(("facts", f"{unknown[0]!r} is not one of {', '.join(COSTLY_FACTS)}"[:200]))
        return None
    return tuple(dict.fromkeys(names))


def with_facts(tasks: list[ResizeTask], request: ImageRequest) -> list[ResizeTask]:
    """The tasks to run, the first of them (in plan order) asked to report the source's facts: one task per
    run does, from the decode it makes anyway."""
    if not tasks:
        return tasks
    first = min(range(len(tasks)), key=lambda i: tasks[i].index)
    wanted = ("basic", *(COSTLY_FACTS if request.facts is None else request.facts))
    return [replace(t, facts=wanted) if i == first else t for i, t in enumerate(tasks)]


RUN = 5  # a request's tasks per partition, at least: each worker that takes some decodes the source once


def window(count: int, partitions: int) -> int:
    """The partitions a request of ``count`` tasks is dealt over: the fewest that give each ``RUN`` or more."""
    return min(partitions, max(1, -(-count // RUN)))


def spread(count: int, partitions: int, start: int) -> list[int | None]:
    """The partitions of a request's ``count`` tasks (largest first), dealt in turn over the ``window``
    beginning at ``start`` (``Dealer``'s). A source is fetched and decoded once by every worker that takes a
    task of it: nine tasks over eight partitions took 22 % more CPU on four hosts than on one, and hashing
    their keys left one of four workers 40 % more work than another. ``partitions`` 0: the key decides."""
    if partitions <= 0:
        return [None] * count
    width = window(count, partitions)
    turn = start // partitions  # each time round, another partition of the window takes the odd tasks
    return [(start + (turn + i) % width) % partitions for i in range(count)]


class Dealer:
    """Where each request's window begins, for one topic: a cursor per window width goes round the partitions
    a window at a time, so each partition gets an even share of the requests of each width (of their tasks
    when the requests are alike). A cursor begins at a multiple of its width and steps by it: the range
    assignor gives each worker a block of neighbouring partitions, and when the width divides the partitions
    and the blocks, a window stays in one block (8 partitions, 4 workers: a seed request, over 2, reaches one
    worker and is decoded once; one cursor from a random start sent each to two in half of the runs)."""

    def __init__(self, seed: int = 0):
        self.seed = seed  # a planner's own (random) starting point: planners side by side deal apart
        self.cursors: dict[int, int] = {}

    def deal(self, count: int, partitions: int) -> list[int | None]:
        if partitions <= 0 or count <= 0:  # not known (the keys decide), or nothing to deal: no cursor moves
            return [None] * count
        width = window(count, partitions)
        start = self.cursors.get(width, self.seed - self.seed % width)
        self.cursors[width] = start + width
        return spread(count, partitions, start)


def request_json(request: ImageRequest) -> str:
    """The validated request as the final event carries it (so a finished run can be retried)."""
    return json.dumps(request.to_dict(), separators=(",", ":"), sort_keys=True)


def retry_split(request: ImageRequest, tasks: list[ResizeTask]) -> tuple[list[ResizeTask], tuple[TaskOutput, ...]]:
    """A retry's tasks to run again and the outputs it keeps; every retried reference must be a task of
    the request (else RequestInvalid). Not a retry: every task, nothing kept."""
    if request.retry is None:
        return tasks, ()
    refs = {t.taskRef for t in tasks}
    unknown = [r for r in request.retry.taskRefs if r not in refs]
    if unknown:
        raise RequestInvalid([("retry.taskRefs", f"{unknown[0]!r} is not a task of this request"[:200])])
    again = set(request.retry.taskRefs) or refs
    kept = tuple(o for o in request.retry.outputs if o.taskRef in refs and o.taskRef not in again)
    return [t for t in tasks if t.taskRef in again], kept


def _unencodable(value: Any, path: str, depth: int = 0) -> str | None:
    """The path of the first string (or key) in a parsed JSON document that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "$"
        return None
    if depth > 20:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _unencodable(key, path) is not None:
                return (path or "$") + " (a key)"
            found = _unencodable(item, where, depth + 1)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _unencodable(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
    return None


def valid_workflow_id(value: str) -> bool:
    return bool(_WORKFLOW_ID.fullmatch(value))  # fullmatch: `$` alone lets a trailing newline through


def _check_location(location: str) -> list[tuple[str, str]]:
    try:
        parts = urlsplit(location)
    except ValueError as exc:
        return [("fileLocation", f"is not a URL: {exc}")]
    if parts.scheme.lower() not in SCHEMES:
        return [("fileLocation", f"scheme must be one of {', '.join(SCHEMES)}, got {parts.scheme or 'none'!r}")]
    if not parts.netloc:
        return [("fileLocation", "has no host (or bucket)")]
    if parts.scheme.lower() == "s3" and not parts.path.strip("/"):
        return [("fileLocation", "s3:// location needs a key: s3://bucket/key")]
    if any(c in location for c in "\r\n\t "):
        return [("fileLocation", "must not contain whitespace")]
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        return [("fileLocation", "must not contain control characters")]
    try:
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:
        return [("fileLocation", f"has a bad port: {exc}")]
    return []


def _dimension(value: Any, maximum: int) -> tuple[int | None, str | None]:
    return integer(1, maximum)(value)


def parse_boolean(value: Any) -> tuple[bool, str | None]:
    """A JSON boolean, or the strings "true"/"false" (as the seed's worker took them); else why not."""
    flag, why = boolean(value)
    return (True, why) if why else (flag, None)


def outputs_of(request: ImageRequest) -> list[tuple[str, Size, ImageOptions]]:
    """Every output the request asks for, in plan order: its preset's (formats outer, sizes inner), then its
    own, less those its preset already makes; a size's own options over the request's (or the preset's)."""
    preset = [(fmt, size, size.options.over(request.preset.options)) for fmt in request.preset.outputFormats
              for size in request.preset.outputSizes] if request.preset else []
    made = {(fmt, size.width, size.height, options) for fmt, size, options in preset}
    own = [(fmt, size, size.options.over(request.options)) for fmt in request.outputFormats
           for size in request.outputSizes]
    return preset + [o for o in own if (o[0], o[1].width, o[1].height, o[2]) not in made]


def plan_tasks(request: ImageRequest, workflow_id: str, *, source_uri: str, deadline: int,
               output_prefix: str = "", run_id: str = "") -> list[ResizeTask]:
    """One task per output asked (``outputs_of``: format x size, the preset's then the request's own)."""
    outputs = outputs_of(request)
    total = len(outputs)
    max_w = max(s.width for _f, s, _o in outputs)
    max_h = max(s.height for _f, s, _o in outputs)
    tasks = []
    for i, (fmt, size, options) in enumerate(outputs):
        ref = task_ref(fmt, size, i)
        tasks.append(ResizeTask(
            workflowId=workflow_id,
            taskRef=ref,
            index=i,
            total=total,
            sourceUri=source_uri,
            fileLocation=request.fileLocation,
            format=fmt,
            width=size.width,
            height=size.height,
            maintainAspectRatio=options.resizeMode != "force",  # what a resize worker older than modes does best
            outputKey=output_key(output_prefix, workflow_id, ref, fmt),
            deadline=deadline,
            maxWidth=max_w,
            maxHeight=max_h,
            runId=run_id,
            options=options,
            priority="" if request.priority == "interactive" else request.priority,
        ))
    return tasks


def make_plan(request: ImageRequest, workflow_id: str, tasks: list[ResizeTask], *,
              submitted_at: int, deadline: int, run_id: str = "", carried: tuple[TaskOutput, ...] = ()) -> WorkflowPlan:
    """The plan of all the request's tasks; a retry's carries the outputs it keeps (``carried``)."""
    return WorkflowPlan(
        workflowId=workflow_id,
        correlationId=request.correlationId,
        fileLocation=request.fileLocation,
        tasks=tuple(TaskDescriptor(t.taskRef, t.format, t.width, t.height) for t in tasks),
        submittedAt=submitted_at,
        deadline=deadline,
        runId=run_id,
        retryOf=request.retry.runId if request.retry else "",
        carried=carried,
        request=request_json(request),
        preset=request.preset.ref if request.preset else None,
    )


def _certain_boxes_over(sizes: list[Size], fields: list[str], options: ImageOptions,
                        max_pixels: int) -> list[tuple[str, str]]:
    """The sizes whose output is exactly their box whatever the source (pad always; force and fill when
    they may enlarge) and whose box is over ``max_pixels``: certain to fail, so refused up front."""
    side = math.isqrt(max_pixels)
    problems = []
    for size, name in zip(sizes, fields):
        own = size.options.over(options)
        enlarge = own.enlarge is not False
        certain = own.resizeMode == "pad" or (own.resizeMode in ("force", "fill") and enlarge)
        if certain and size.width * size.height > max_pixels:
            problems.append((name, f"{size.width}x{size.height} is {size.width * size.height / 1e6:.1f} megapixels, "
                                   f"more than the limit of {max_pixels / 1e6:g} (IMAGEFORK_MAX_PIXELS; the largest "
                                   f"square is {side}x{side}); with resizeMode fit the output follows the "
                                   "source's shape, and is checked against its header"))
    return problems


def run_id_of(topic: str, partition: int | str, offset: int | str, timestamp_ms: int = 0) -> str:
    """The run id of a request message: the same message (replayed) always gets the same one,
    another message (a resubmission) another one. The record's timestamp is part of it: a topic deleted
    and made again numbers its records from 0 again, and a new request must not take an old one's id
    (keyless, its workflow id would be an old workflow's, and the join would take it for a replay)."""
    where = f"{topic}/{partition}/{offset}" + (f"@{timestamp_ms}" if timestamp_ms > 0 else "")
    return hashlib.blake2b(where.encode(), digest_size=8).hexdigest()


def staging_key(prefix: str, workflow_id: str, run_id: str) -> str:
    """Where the planner stages a fetched source for one run of a workflow."""
    return f"{prefix}{workflow_id}/{run_id}/source" if run_id else f"{prefix}{workflow_id}/source"


def retry_delay_s(attempt: int, *, policy: str, delay_s: float, max_delay_s: float,
                  jitter: float = 0.0) -> float:
    """Delay before attempt ``attempt + 1``. ``jitter`` in [0, 1) spreads exponential delays."""
    if policy == "fixed":
        return delay_s
    base = min(max_delay_s, delay_s * (2 ** max(0, attempt - 1)))
    return base * (0.5 + jitter / 2) if jitter else base
